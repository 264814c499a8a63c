"""The selections the quality benchmark compares, by name.

A method is a score column under a rule, the published chain, the seeded random rule, or the
label oracle:

- ``COLUMN`` — ``top_fraction`` of the column (ties by uid);
- ``COLUMN+drop`` — ``drop_fill``: drop what the column calls harmful, fill the budget from the
  rest in the seeded random order. An influence estimate (:data:`ESTIMATE_COLUMNS`) drops the
  pairs it scores below 0 (its own sign: no tuning); a column without a meaningful zero
  (:data:`EMBEDDING_COLUMNS`) drops its bottom :data:`CHEAP_DROP_FRACTION`;
- ``COLUMN+cluster`` — the same drop, the budget filled per k-means cluster of the image
  embeddings (each cluster its share, random within it);
- ``COLUMN+share`` — the hybrid: drop as many pairs as the default influence estimate scores
  below 0 (its harmful share, no tuning), choosing them as the column's lowest, then fill per
  cluster (``select.drop_share_from``);
- ``chain`` — the published negCLIPLoss ∩ NormSim recipe (Wang et al., NeurIPS 2024): the top
  ``CHAIN_FIRST × budget`` of the pool by ``neg_clip_loss``, then the budget by ``norm_sim_inf``;
- ``random`` — the seeded random rule;
- ``oracle`` — every pair whose caption is known to be mismatched (corpus json ``noisy``)
  dropped, the budget filled in the random rule's order: the headroom a perfect harm detector
  gives (datasets with that ground truth only; computed here, not by the reducer).

Every method but ``oracle`` is a :class:`~pipeline.config.SelectConfig` run by the real reducer,
with every drop_fill setting it depends on named (the config's defaults are one of these methods,
``neg_clip_loss+share``, and may change again; a method's selection must not).
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.config import SelectConfig
from pipeline.errors import UsageError
from pipeline.influence.scores import DEFAULT_COLUMN, EMBEDDING_COLUMNS, ESTIMATE_COLUMNS, SCORE_COLUMNS

CHEAP_DROP_FRACTION = 0.35  # bottom share a column without a meaningful zero drops (the measured setting)
CHAIN_STEPS = (("neg_clip_loss", 1.5), ("norm_sim_inf", 1.0))  # (column, multiple of the budget): 30 % → 20 % in the paper
RULE_SUFFIXES = {"": "top", "+drop": "drop", "+cluster": "cluster", "+share": "share"}
SPECIAL = ("chain", "random", "oracle")


@dataclass(frozen=True)
class Method:
    """One selection the benchmark retrains on (see the module docstring)."""

    name: str
    column: str | None
    rule: str  # top | drop | cluster | share | chain | random | oracle

    @classmethod
    def parse(cls, name: str) -> "Method":
        """The method called ``name`` (one line naming the known forms when unknown)."""
        if name in SPECIAL:
            return cls(name, None, name)
        for suffix, rule in sorted(RULE_SUFFIXES.items(), key=lambda kv: -len(kv[0])):
            column = name[:len(name) - len(suffix)] if suffix else name
            if name.endswith(suffix) and column in SCORE_COLUMNS:
                return cls(name, column, rule)
        raise UsageError(f"unknown method {name!r}: use COLUMN, COLUMN+drop or COLUMN+cluster with a score column "
                         f"({', '.join(SCORE_COLUMNS)}), or one of {', '.join(SPECIAL)}")

    @property
    def needs_labels(self) -> bool:
        """True when the method needs the corpus's mismatch ground truth (the oracle)."""
        return self.rule == "oracle"

    def select_config(self, fraction: float, seed: int) -> SelectConfig | None:
        """The reducer's settings for a budget of ``fraction``; None for the oracle."""
        if self.rule == "oracle":
            return None
        if self.rule == "random":
            return SelectConfig(rule="random", fraction=fraction, seed=seed)
        if self.rule == "chain":
            steps = [{"column": c, "fraction": min(1.0, round(multiple * fraction, 6))} for c, multiple in CHAIN_STEPS]
            return SelectConfig(rule="chain", steps=steps)
        if self.rule == "top":
            return SelectConfig(column=self.column, rule="top_fraction", fraction=fraction)
        if self.rule == "share":
            return SelectConfig(column=self.column, rule="drop_fill", fraction=fraction, seed=seed, fill="cluster",
                                drop_share_from=DEFAULT_COLUMN, drop_column=self.column)
        drop = ({"drop_below": 0.0} if self.column in ESTIMATE_COLUMNS
                else {"drop_fraction": CHEAP_DROP_FRACTION})
        return SelectConfig(column=self.column, rule="drop_fill", fraction=fraction, seed=seed,
                            fill="random" if self.rule == "drop" else "cluster", **drop)


def default_methods(estimates: tuple[str, ...] = ("diffin_unrolled", "tracin"),
                    cheap: tuple[str, ...] = EMBEDDING_COLUMNS) -> tuple[str, ...]:
    """The full comparison, most informative first (a partial run still answers the question):
    the references, then every column under each rule, the paper's second-order forms last."""
    ruled = [f"{c}{suffix}" for c in ("diffin_unrolled", "clip_score", "neg_clip_loss", "norm_sim_inf")
             for suffix in RULE_SUFFIXES if suffix != "+share"] + ["neg_clip_loss+share", "clip_score+share"]
    rest = [f"{c}{suffix}" for c in (*cheap, *estimates) for suffix in RULE_SUFFIXES if suffix != "+share"]
    tail = [c for c in SCORE_COLUMNS if c not in (*cheap, *estimates) and c in ESTIMATE_COLUMNS]
    ordered = ["random", "oracle", *ruled, "chain", *rest, *tail]
    return tuple(dict.fromkeys(m for m in ordered if not m.endswith("_adam") and "_adam+" not in m))
