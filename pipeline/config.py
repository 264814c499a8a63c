"""Run configuration: one YAML file, one section per stage, unknown keys are errors.

Relative paths in a config resolve against the current working directory (the repository
root for ``make`` targets, the uploaded working dir under ``ray job submit``).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import (BaseModel, ConfigDict, Field, NonNegativeFloat, NonNegativeInt,
                      PositiveFloat, PositiveInt, ValidationError, field_validator, model_validator)

from pipeline.data.shards import SIZES_FILE
from pipeline.data.uids import DEFAULT_UID_FROM, LEGACY_REQUIRE_UID, check_uid_from
from pipeline.errors import UsageError
from pipeline.influence.scores import (DEFAULT_COLUMN, DEFAULT_METHOD, ESTIMATE_COLUMNS, METHOD_COMPONENTS,
                                       SCORE_COLUMNS, columns_computed, method_components)
from pipeline.influence.unrolled import STEP_FACTORS
from pipeline.influence.window import CHECKPOINT_WINDOWS, MIN_WINDOW


class Section(BaseModel):
    """Base of every config section: unknown keys and wrong types are rejected."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)


class DataConfig(Section):
    """Input shards."""

    shards: str | list[str] = Field(description="brace pattern, glob, or list of shard URLs")
    sizes: str | None = Field(None, description="sizes.json with per-shard counts")
    uid_from: tuple[Literal["json", "url", "image"], ...] = Field(
        DEFAULT_UID_FROM, description="where a pair's uid comes from, first source that applies (the rule: "
                                      "pipeline/data/uids.py): json uid, hash of json url + caption, hash of "
                                      "image bytes + caption; a pair with none is a failed row")

    @model_validator(mode="before")
    @classmethod
    def _legacy_require_uid(cls, data: Any) -> Any:
        """``require_uid`` (before ``uid_from``): true = ``[json]``, false = ``[json, url, image]``."""
        if not isinstance(data, dict) or "require_uid" not in data:
            return data
        data = dict(data)
        legacy = data.pop("require_uid")
        if "uid_from" in data:
            raise ValueError("require_uid is replaced by uid_from: set only uid_from")
        if not isinstance(legacy, bool):
            raise ValueError("require_uid: must be true or false (better: set uid_from)")
        data["uid_from"] = list(LEGACY_REQUIRE_UID[legacy])
        return data

    @field_validator("uid_from", mode="before")
    @classmethod
    def _uid_sources(cls, value: Any) -> Any:
        if isinstance(value, (str, list, tuple)):
            return check_uid_from(value)
        return value
    max_failed_fraction: float = Field(0.1, ge=0.0, le=1.0,
                                       description="the score stage fails (exit 1, scores kept) when more than this "
                                                   "fraction of the expected pairs failed or is missing")


class TrainConfig(Section):
    """Proxy CLIP training: deterministic for a seed."""

    model: str = "tiny-clip-32"
    steps: PositiveInt = 200
    batch_size: PositiveInt = 64
    lr: PositiveFloat = 1e-3
    weight_decay: NonNegativeFloat = 0.1
    betas: tuple[float, float] = (0.9, 0.98)
    eps: PositiveFloat = 1e-6
    warmup: NonNegativeInt = 10
    schedule: Literal["cosine", "const"] = "cosine"
    checkpoints: PositiveInt = 4
    save_steps: list[NonNegativeInt] | None = None
    seed: int = 0
    max_samples: PositiveInt | None = None
    exclude_uids: str | None = None
    threads: PositiveInt | None = None

    @model_validator(mode="after")
    def _check_steps(self) -> "TrainConfig":
        if self.warmup >= self.steps:
            raise ValueError(f"warmup ({self.warmup}) must be smaller than steps ({self.steps})")
        if self.save_steps is not None:
            bad = [s for s in self.save_steps if s > self.steps]
            if bad:
                raise ValueError(f"save_steps {bad} exceed steps ({self.steps})")
            if len(set(self.save_steps)) != len(self.save_steps) or not self.save_steps:
                raise ValueError("save_steps must be a non-empty list of distinct steps")
        elif self.checkpoints > self.steps:
            raise ValueError(f"checkpoints ({self.checkpoints}) exceeds steps ({self.steps})")
        return self

    def checkpoint_steps(self) -> list[int]:
        """The global steps at which checkpoints are saved (evenly spaced, ending at steps)."""
        if self.save_steps is not None:
            return sorted(self.save_steps)
        m = self.checkpoints
        return [round(self.steps * (i + 1) / m) for i in range(m)]


class TrajectoryConfig(Section):
    """Either an existing trajectory (``path``) or proxy-training settings (``train``)."""

    path: str | None = None
    train: TrainConfig | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> "TrajectoryConfig":
        if (self.path is None) == (self.train is None):
            raise ValueError("give exactly one of 'path' (existing trajectory) or 'train' (proxy run)")
        return self


class ZeroShotConfig(Section):
    """``target.zero_shot``: L_V is a zero-shot classification task on the target images.

    Instead of the target pairs' CLIP loss, L_V is the cross-entropy of the zero-shot
    classifier built from ``classes`` × ``templates`` (each class's embedding: the normalised
    mean of its prompts' normalised text embeddings, as zero-shot evaluation builds it) on the
    target images, each labelled by its json field ``label_field`` (a class index or a class
    name). The negative bank of the per-pair training loss still comes from the target pairs.
    """

    label_field: str = Field("label", min_length=1, description="json field of each target sample: class index or name")
    classes: list[str] = Field(min_length=2, description="class names, in label-index order")
    templates: list[str] = Field(["a photo of a {}."], min_length=1,
                                 description="prompt templates; '{}' is replaced by the class name")

    @model_validator(mode="after")
    def _prompts(self) -> "ZeroShotConfig":
        if len(set(self.classes)) != len(self.classes):
            raise ValueError("classes: each class name once")
        bad = [t for t in self.templates if "{}" not in t]
        if bad:
            raise ValueError(f"templates: {bad[0]!r} has no '{{}}' for the class name")
        return self

    def prompts(self) -> list[str]:
        """Every prompt, class-major (class 0's templates first)."""
        return [t.replace("{}", c) for c in self.classes for t in self.templates]


class TargetConfig(Section):
    """The target set V: its own shards, or a held-out fraction of the corpus.

    Held-out pairs (chosen by uid hash) are left out of proxy training; the negative bank
    is drawn from V by seed. ``zero_shot`` makes L_V a zero-shot classification task on V's
    images (:class:`ZeroShotConfig`).
    """

    shards: str | list[str] | None = None
    sizes: str | None = None
    holdout_fraction: float | None = Field(None, gt=0, lt=1)
    max_pairs: PositiveInt = 2048
    bank_size: PositiveInt = 255
    seed: int = 0
    zero_shot: ZeroShotConfig | None = None

    def fingerprint_record(self) -> dict[str, Any]:
        """The section as the prepared vectors' fingerprint reads it: ``zero_shot`` left out
        when unset, so runs made before it existed keep their fingerprints."""
        record = self.model_dump(mode="json")
        if record["zero_shot"] is None:
            del record["zero_shot"]
        return record

    @model_validator(mode="after")
    def _one_source(self) -> "TargetConfig":
        if (self.shards is None) == (self.holdout_fraction is None):
            raise ValueError("give exactly one of 'shards' or 'holdout_fraction'")
        return self


class UnrolledConfig(Section):
    """The unrolled Diff-In score (``score.method: unrolled`` or ``all``)."""

    lanczos_steps: PositiveInt = Field(20, description="Hessian–vector products K per checkpoint (prepare cost m·K)")
    f: Literal[STEP_FACTORS] = Field("clamp", description="stabilised per-step factor: clamp = clip(1 − η·max(λ,0), "
                                                          "−1, 1), exp = exp(−η·max(λ,0))")
    proxy_batches: PositiveInt = Field(1, description="training batches (of score.proxy_batch_size) the Hessian "
                                                      "H_k is taken over at each checkpoint")


class EmbeddingsConfig(Section):
    """The embedding columns (``clip_score``, ``neg_clip_loss``, ``norm_sim_2``, ``norm_sim_inf``)
    and the ``cluster`` column: computed from the last scored checkpoint's embeddings by every
    ``score.method``, against reference sets fixed once per run in prepare."""

    pool_pairs: PositiveInt = Field(2048, description="corpus pairs (never target pairs) embedded once: the "
                                                      "negCLIPLoss pools are drawn from them, k-means runs on them")
    pools: PositiveInt = Field(10, description="random negative pools K that neg_clip_loss averages over")
    pool_size: PositiveInt = Field(255, description="negatives per pool (a batch of pool_size + 1 with the pair)")
    temperature: PositiveFloat | None = Field(None, allow_inf_nan=False,
                                              description="neg_clip_loss temperature; null: the checkpoint's "
                                                          "learned 1/exp(logit_scale)")
    clusters: NonNegativeInt = Field(10, description="k-means clusters of image embeddings written as the "
                                                     "score files' cluster column (select.fill: cluster); 0: none")


class ScoreConfig(Section):
    """How pairs are scored."""

    checkpoints: list[NonNegativeInt] | None = Field(
        None, description="indices of the trajectory's checkpoints to score (null: all); checkpoint_window "
                          "chooses among them")
    checkpoint_window: Literal[CHECKPOINT_WINDOWS] = Field(  # type: ignore[valid-type]
        "all", description="all: score every checkpoint of score.checkpoints (or of the trajectory); falling: "
                           "only those up to the one with the lowest target loss L_V (ties: the earliest), the "
                           "later ones, where L_V rises again, dropped; at least 2 must remain")
    batch_size: PositiveInt = 128
    c_mode: Literal["fd", "exact"] = "fd"
    hvp: Literal["exact", "fd"] = "exact"
    eps: PositiveFloat = Field(1e-3, allow_inf_nan=False)
    proxy_batches: PositiveInt = 1
    proxy_batch_size: PositiveInt = 128
    method: Literal[tuple(METHOD_COMPONENTS)] = Field(  # type: ignore[valid-type]
        DEFAULT_METHOD, description="which scores to compute: unrolled (diffin_unrolled, one JVP per checkpoint), "
                                    "tracin (one JVP), diffin (diffin, diffin_eq9, tracin: three JVPs), all")
    unrolled: UnrolledConfig = UnrolledConfig()
    embeddings: EmbeddingsConfig = EmbeddingsConfig()
    adam: bool = Field(False, description="also the optimizer-aware twins (tracin_adam, diffin_unrolled_adam) of the "
                                         "method's first-order/unrolled scores: one more JVP per checkpoint each")
    dtype: Literal["float32", "float64"] = "float32"
    compile: bool = Field(False, description="run single-direction JVPs (method unrolled or tracin) through "
                                             "torch.compile: faster per pair, about a minute of compiling per "
                                             "worker and batch shape")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    keep_json_fields: list[str] = []

    @field_validator("checkpoints")
    @classmethod
    def _check_checkpoints(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and (not value or len(set(value)) != len(value)):
            raise ValueError("must be a non-empty list of distinct checkpoint indices (or null for all)")
        return value

    @model_validator(mode="after")
    def _check_window(self) -> "ScoreConfig":
        if self.checkpoint_window == "falling" and self.checkpoints is not None:
            if len(self.checkpoints) < MIN_WINDOW:
                raise ValueError(f"checkpoint_window 'falling' chooses among score.checkpoints and needs at least "
                                 f"{MIN_WINDOW} of them, got {self.checkpoints}")
            if self.checkpoints != sorted(self.checkpoints):
                raise ValueError(f"checkpoint_window 'falling' reads score.checkpoints in step order: list them "
                                 f"increasing, got {self.checkpoints}")
        return self


_RULE_FIELDS = {"top_fraction": {"fraction"}, "top_k": {"k"}, "threshold": {"threshold"},
                "random": {"fraction", "k", "seed"}, "chain": {"steps"},
                "drop_fill": {"fraction", "k", "seed", "drop_below", "drop_fraction", "drop_share_from", "drop_column",
                              "fill", "cluster_power"}}
_NEW_RULE_FIELDS = ("steps", "drop_below", "drop_fraction", "drop_share_from", "drop_column", "fill", "cluster_power")
_RULE_OPTIONAL = ("fraction", "k", "threshold", *_NEW_RULE_FIELDS)  # refused when set for a rule not using them
_ALTERNATIVES = (("fraction", "k"), ("drop_below", "drop_fraction", "drop_share_from"))  # one of each, at most
# Values the drop_fill fields had by default before the recipe became the default: a config.json
# written then lists them under every rule (fill: random under top_fraction), and must still read.
_FORMER_DEFAULTS: dict[str, Any] = {"fill": "random"}
DEFAULT_DROP_COLUMN = "neg_clip_loss"  # the default recipe's drop (docs/QUALITY.md: the best mismatch detector)
RESHARD_PLAN_FILE = "reshard_plan.json"


class ChainStep(Section):
    """One step of ``rule: chain``: keep ``fraction`` of the whole eligible pool, the best of
    the previous step's survivors by ``column``."""

    column: Literal[SCORE_COLUMNS]  # type: ignore[valid-type]
    fraction: float = Field(gt=0, le=1, description="share of the whole eligible pool kept after this step")


class SelectConfig(Section):
    """The ``select:`` section: which score, which rule, what to do with failed rows.

    The defaults are the recipe the quality benchmark measured best (docs/QUALITY.md, its method
    ``neg_clip_loss+share``): ``rule: drop_fill`` dropping as many pairs as ``diffin_unrolled``
    scores below 0 (``drop_share_from``: Diff-In's own harm count, no quantile to guess), the
    lowest by ``neg_clip_loss`` (``drop_column``: the best measured mismatch detector, computed by
    every ``score.method``), the budget filled per k-means cluster of the image embeddings
    (``fill: cluster``). ``column`` stays ``diffin_unrolled``: kept.parquet's ``score``.

    Every other rule, named, selects as before: the drop_fill fields at their defaults are not
    "given" (:meth:`_given`), so they neither invalidate another rule nor enter its fingerprint
    (:meth:`settings`). Two defaults depend on other keys (:meth:`_recipe_defaults`) and one key
    is refused, each so that a config which names its own choice gets that choice, or one line
    naming the key to set, never an error about a key it did not write:

    - ``drop_share_from`` unset follows ``column`` when ``column`` is an influence estimate
      (``column: tracin`` under ``score.method: tracin`` counts tracin's harmful pairs: the
      estimate the user chose, and one the method computes); else ``diffin_unrolled``.
    - ``drop_below`` or ``drop_fraction`` named: that is the drop's size, so ``drop_share_from``
      is unset (the three are alternatives) and ``drop_column``, unless named, is ``column`` as
      before the recipe (a threshold or quantile is the user's own, on the column they chose;
      ``drop_below: 0.0`` on ``neg_clip_loss``, which is never above 0, would drop everything).
      ``drop_share_from: null`` (the estimate's own zero on ``column``) does the same.
    - ``stratify_by`` without ``rule`` is refused in one line naming ``select.rule``: drop_fill is
      unstratified (its per-cluster fill keeps every kind of image instead), and switching to
      another rule behind the user's back would change what the section means.
    """

    # column: from the fidelity benchmark (docs/FIDELITY.md): diffin_unrolled tracked true
    # leave-one-out effects and LDS best. rule: docs/QUALITY.md (see the class docstring).
    column: Literal[SCORE_COLUMNS] = DEFAULT_COLUMN  # type: ignore[valid-type]
    rule: Literal["top_fraction", "top_k", "threshold", "random", "chain", "drop_fill"] = "drop_fill"
    fraction: float | None = Field(
        0.3, gt=0, le=1, description="kept share (top_fraction; random and drop_fill unless k is given)")
    k: PositiveInt | None = Field(None, description="kept count (top_k; random and drop_fill if given)")
    threshold: float | None = Field(None, description="keep score >= threshold (threshold)")
    seed: int = Field(0, description="seed of the random order (random; drop_fill's fill random and cluster)")
    steps: list[ChainStep] | None = Field(
        None, description="chain: [{column, fraction}, ...], at least 2, fractions of the whole eligible "
                          "pool, non-increasing")
    drop_below: float | None = Field(
        None, allow_inf_nan=False, description="drop_fill: drop rows whose drop_column is below this value "
                                               "(default 0.0 for an influence estimate)")
    drop_fraction: float | None = Field(
        None, ge=0, lt=1, description="drop_fill: drop this bottom share of the eligible rows by drop_column")
    drop_share_from: Literal[ESTIMATE_COLUMNS] | None = Field(  # type: ignore[valid-type]
        DEFAULT_COLUMN, description="drop_fill: drop as many rows as this influence estimate scores below 0 "
                                    "(its harmful share), the lowest by drop_column (default: column if it is "
                                    "an estimate, else diffin_unrolled; unset by drop_below or drop_fraction)")
    drop_column: Literal[SCORE_COLUMNS] | None = Field(  # type: ignore[valid-type]
        DEFAULT_DROP_COLUMN, description="drop_fill: the column the drop reads (default: neg_clip_loss with "
                                         "drop_share_from, else column)")
    fill: Literal["random", "score", "cluster"] = Field(
        "cluster", description="drop_fill: how the budget is filled from the rows not dropped")
    cluster_power: float = Field(
        1.0, ge=0, le=1, description="drop_fill with fill cluster: cluster c's share ∝ n_c^p "
                                     "(1 proportional to size, 0 equal shares)")
    stratify_by: str | None = Field(None, min_length=1,
                                    description="json field; score files carry json.<field>")
    failed: Literal["drop", "error"] = "drop"
    # how the reducer runs, not what it selects: left out of effective() and the selection's fingerprint
    EXECUTION_ONLY: ClassVar[frozenset[str]] = frozenset({"max_rows_in_memory"})
    UNSTRATIFIED_RULES: ClassVar[frozenset[str]] = frozenset({"chain", "drop_fill"})  # no stratify_by
    MEMORY_ONLY_RULES: ClassVar[frozenset[str]] = frozenset({"chain"})  # no bounded reducer

    max_rows_in_memory: PositiveInt = Field(
        1_000_000, description="bounded reducer: rows it sorts at once (not stratify_by or chain); "
                               "does not change the outputs")

    @model_validator(mode="before")
    @classmethod
    def _recipe_defaults(cls, data: Any) -> Any:
        """drop_fill's defaults that depend on other keys (the class docstring says why):
        ``drop_share_from`` follows an estimate ``column``; ``drop_below`` / ``drop_fraction``
        unset it; without it the drop reads ``column`` unless ``drop_column`` is named. Keys the
        input names are kept as they are, so a config written back in full reads the same."""
        if not isinstance(data, dict) or data.get("rule", cls.model_fields["rule"].default) != "drop_fill":
            return data
        data = dict(data)
        if "drop_share_from" not in data:
            if any(data.get(name) is not None for name in ("drop_below", "drop_fraction")):
                data["drop_share_from"] = None
            elif data.get("column") in ESTIMATE_COLUMNS and data["column"] != DEFAULT_COLUMN:
                data["drop_share_from"] = data["column"]
        if "drop_column" not in data and "drop_share_from" in data and data["drop_share_from"] is None:
            data["drop_column"] = None  # the drop reads column (drop_by), as before the recipe
        return data

    @model_validator(mode="after")
    def _check_rule_fields(self) -> "SelectConfig":
        uses = _RULE_FIELDS[self.rule]
        # a rule left at its default is named in the message, with the key that picks another
        default = "" if "rule" in self.model_fields_set else " (the default rule; set select.rule to use it)"
        for name in _RULE_OPTIONAL:
            value = getattr(self, name)
            former = name in _FORMER_DEFAULTS and value == _FORMER_DEFAULTS[name]
            if self._given(name) and value is not None and name not in uses and not former:
                raise ValueError(f"'{name}' is not used by rule '{self.rule}'{default}")
        if self.rule == "drop_fill" and self.fill != "cluster" and self._given("cluster_power"):
            raise ValueError("'cluster_power' is used only with fill 'cluster'")
        if self.rule in self.UNSTRATIFIED_RULES and self.stratify_by is not None:
            if default:
                raise ValueError(f"'stratify_by' is not used by rule '{self.rule}' (the default rule: unstratified, "
                                 "it fills per k-means cluster); set select.rule, e.g. top_fraction, to stratify")
            raise ValueError(f"'stratify_by' is not used by rule '{self.rule}'")
        if self.rule == "chain" and self._given("column"):
            raise ValueError("'column' is not used by rule 'chain' (each step names its column)")
        if self.rule == "top_k" and self.k is None:
            raise ValueError("rule 'top_k' needs 'k'")
        if self.rule == "threshold" and (self.threshold is None or not math.isfinite(self.threshold)):
            raise ValueError("rule 'threshold' needs a finite 'threshold'")
        if self.rule in ("top_fraction", "random", "drop_fill") and self.k is None and self.fraction is None:
            raise ValueError(f"rule '{self.rule}' needs 'fraction'")
        if self.rule in ("random", "drop_fill") and self.k is not None and self._given("fraction"):
            raise ValueError(f"rule '{self.rule}' takes either 'fraction' or 'k', not both")
        if self.rule == "chain":
            self._check_steps()
        if self.rule == "drop_fill":
            self._check_drop()
        return self

    def _given(self, name: str) -> bool:
        """True when ``name`` was set to something other than its default: a config written
        back in full (``config.json``, every field at its value) reads again as it was."""
        return name in self.model_fields_set and getattr(self, name) != type(self).model_fields[name].default

    def given_settings(self) -> dict[str, Any]:
        """The fields given (:meth:`_given`: set, and not to their default), as JSON values: what a
        named selection (``selections:``) inherits from this section."""
        return self.model_dump(mode="json", include={n for n in type(self).model_fields if self._given(n)})

    def _check_steps(self) -> None:
        steps = self.steps or []
        if len(steps) < 2:
            raise ValueError("rule 'chain' needs 'steps': at least 2 of {column, fraction}")
        for i in range(1, len(steps)):
            if steps[i].fraction > steps[i - 1].fraction:
                raise ValueError(f"chain step {i + 1} keeps more ({steps[i].fraction}) than step {i} "
                                 f"({steps[i - 1].fraction}); fractions are of the whole pool and must not increase")

    def _check_drop(self) -> None:
        given = [n for n in ("drop_below", "drop_fraction", "drop_share_from") if getattr(self, n) is not None]
        if len(given) > 1:
            raise ValueError(f"rule 'drop_fill' takes one of 'drop_below', 'drop_fraction', 'drop_share_from', "
                             f"not {' and '.join(repr(n) for n in given)}")
        if not given and self.drop_by not in ESTIMATE_COLUMNS:
            raise ValueError(f"rule 'drop_fill' on '{self.drop_by}' (not an influence estimate: its zero means "
                             "nothing) needs 'drop_below', 'drop_fraction' or 'drop_share_from'")

    @property
    def stratum_column(self) -> str | None:
        """The score-file column holding the stratum, if stratified."""
        return f"json.{self.stratify_by}" if self.stratify_by else None

    @property
    def budget_is_count(self) -> bool:
        """True when the rule keeps a count (``k``) rather than a fraction or a threshold."""
        return self.rule == "top_k" or (self.rule in ("random", "drop_fill") and self.k is not None)

    @property
    def score_column(self) -> str:
        """The column kept.parquet's ``score`` holds: the last chain step's, else ``column``."""
        return self.steps[-1].column if self.rule == "chain" and self.steps else self.column

    @property
    def drop_by(self) -> str:
        """drop_fill: the column the drop reads (``drop_column``: by default ``neg_clip_loss``
        with ``drop_share_from``, else unset, i.e. ``column``); ``column`` under another rule,
        which has no drop (the drop_fill fields' defaults mean nothing there)."""
        return (self.drop_column or self.column) if self.rule == "drop_fill" else self.column

    @property
    def drop_below_applied(self) -> float | None:
        """drop_fill: the drop threshold as applied (0.0 for an influence estimate when
        neither ``drop_below`` nor ``drop_fraction`` is given); None otherwise."""
        if self.rule != "drop_fill" or self.drop_fraction is not None or self.drop_share_from is not None:
            return None
        return self.drop_below if self.drop_below is not None else 0.0

    @property
    def score_columns(self) -> tuple[str, ...]:
        """Every score column the rule reads (a row is eligible when all are finite),
        ``score_column`` first."""
        if self.rule == "chain":
            named = [self.score_column, *(s.column for s in self.steps or [])]
        elif self.rule == "drop_fill":
            named = [self.column, self.drop_by, *([self.drop_share_from] if self.drop_share_from else [])]
        else:
            named = [self.column]
        return tuple(dict.fromkeys(named))

    @property
    def reads_clusters(self) -> bool:
        """True when the rule reads the score files' cluster column."""
        return self.rule == "drop_fill" and self.fill == "cluster"

    def settings(self, mode: Literal["json", "python"] = "json") -> dict[str, Any]:
        """Every setting that can change the selection (the selection fingerprint's input):
        the fields without the execution-only ones and without the new rules' fields under a
        rule that cannot use them (so the older rules' fingerprints stay as they were)."""
        unused = {name for name in _NEW_RULE_FIELDS if name not in _RULE_FIELDS[self.rule]}
        return self.model_dump(mode=mode, exclude=set(self.EXECUTION_ONLY) | unused)

    def effective(self) -> dict[str, Any]:
        """The settings as applied: fields the rule does not use (e.g. the default
        ``fraction`` under ``top_k``, ``seed`` outside ``random``) are shown as null; the
        chain and drop_fill fields appear only under those rules."""
        uses = _RULE_FIELDS[self.rule]
        used = (uses - {"fraction"}) if self.budget_is_count else (uses - {"k"})
        if self.rule == "drop_fill":
            used -= ({"seed"} if self.fill == "score" else set()) | (
                {"cluster_power"} if self.fill != "cluster" else set())
        data = self.settings("python")
        for name in ("seed", *_RULE_OPTIONAL):
            if name in data and name not in used:
                data[name] = None
        if self.rule == "chain":
            data["column"] = None
        if self.rule == "drop_fill":
            data["drop_column"] = self.drop_by
            data["drop_below"] = self.drop_below_applied
        return data


class NamedSelection(Section):
    """One entry of the top-level ``selections:`` list: a selection written side by side with the
    others into ``selections/NAME/`` (:meth:`pipeline.io.layout.RunLayout.selection_dir`).

    ``name`` and ``reshard`` are the entry's own; every other key is a :class:`SelectConfig`
    field. Fields the entry does not name inherit the ``select:`` section's *given* fields
    (:meth:`SelectConfig.given_settings`), so a sweep names only what varies; what the entry
    chooses replaces the inherited fields it contradicts (:meth:`inherited`)."""

    model_config = ConfigDict(extra="allow", frozen=True, strict=False)

    name: str = Field(description="the directory name under selections/: letters, digits, '.', '_', '-'")
    reshard: bool = Field(False, description="also reshard it (into selections/NAME/shards/, with the reshard: "
                                             "section's settings) in `diffin run` and `diffin reshard`")

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        from pipeline.io.layout import check_selection_name

        try:
            return check_selection_name(value)
        except UsageError as exc:
            raise ValueError(str(exc)) from None

    @model_validator(mode="after")
    def _known_fields(self) -> "NamedSelection":
        unknown = sorted(set(self.fields) - set(SelectConfig.model_fields))
        if unknown:
            raise ValueError(f"unknown key {unknown[0]!r} (an entry takes name, reshard and the select: fields)")
        return self

    @property
    def fields(self) -> dict[str, Any]:
        """The select fields the entry names itself."""
        return dict(self.model_extra or {})

    def resolve(self, base: SelectConfig | None) -> SelectConfig:
        """The entry's select settings: ``base``'s given fields, then the entry's own
        (pydantic's ValidationError when they do not make a valid ``select:`` section).

        What the entry chooses replaces what it would contradict (:meth:`inherited`), so
        ``rule: top_k, k: 10`` under a ``select:`` with ``fraction: 0.5`` is top_k with k 10."""
        return SelectConfig.model_validate({**self.inherited(base), **self.fields})

    def inherited(self, base: SelectConfig | None) -> dict[str, Any]:
        """The fields the entry takes from ``base``: its given fields, less those the entry's own
        choice replaces: one of a set of alternatives named by the entry replaces the others
        (``fraction`` / ``k``; ``drop_below`` / ``drop_fraction`` / ``drop_share_from``), and a
        ``rule`` named by the entry drops the fields that rule does not use."""
        given = base.given_settings() if base else {}
        own = self.fields
        unused: set[str] = set()
        for group in _ALTERNATIVES:
            if any(name in own for name in group):
                unused |= set(group)
        rule = own.get("rule")
        if rule in _RULE_FIELDS:
            unused |= {name for name in _RULE_OPTIONAL if name not in _RULE_FIELDS[rule]}
            unused |= {"column"} if rule == "chain" else set()
            unused |= {"stratify_by"} if rule in SelectConfig.UNSTRATIFIED_RULES else set()
        return {name: value for name, value in given.items() if name not in unused or name in own}


class ReshardConfig(Section):
    """The ``reshard:`` section."""

    shard_size: PositiveInt = 10000
    name_format: str = "{:05d}.tar"

    @field_validator("name_format")
    @classmethod
    def _check_name_format(cls, value: str) -> str:
        try:
            names = {value.format(i) for i in (0, 1, 10, 100000)}
        except (IndexError, KeyError, ValueError) as exc:
            raise ValueError(f"name_format {value!r} must format one integer, e.g. '{{:05d}}.tar' ({exc})")
        if len(names) != 4:
            raise ValueError(f"name_format {value!r} gives the same name to different shards")
        if any("/" in n or n.startswith(".") or n in (SIZES_FILE, RESHARD_PLAN_FILE) for n in names):
            raise ValueError(f"name_format {value!r} must give plain file names")
        return value


class ResourcesConfig(Section):
    """Ray resources per task/actor, declared here and never inferred on the driver."""

    actors: PositiveInt = 1
    num_cpus: PositiveFloat = 1.0
    num_gpus: NonNegativeFloat = 0.0
    address: str | None = Field(None, description="Ray address; default: local or RAY_ADDRESS")
    threads: PositiveInt | None = Field(None, description="torch threads per actor (default: ceil(num_cpus))")

    @field_validator("num_gpus")
    @classmethod
    def _check_num_gpus(cls, value: float) -> float:
        if value > 1 and not float(value).is_integer():
            raise ValueError(f"{value} GPUs per actor: a fraction must be at most 1, more must be a whole number")
        return value


class RunConfig(Section):
    """A whole run."""

    data: DataConfig
    trajectory: TrajectoryConfig
    target: TargetConfig | None = None
    score: ScoreConfig = ScoreConfig()
    select: SelectConfig | None = None
    selections: list[NamedSelection] = Field(
        default_factory=list, description="named selections side by side: [{name, reshard, <select fields>}], "
                                          "each inheriting the select: section's given fields")
    reshard: ReshardConfig | None = None
    resources: ResourcesConfig = ResourcesConfig()
    storage: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="fsspec options by protocol, e.g. {s3: {endpoint_url: …}}")

    @field_validator("storage")
    @classmethod
    def _known_protocols(cls, value: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        import fsspec

        unknown = sorted(set(value) - set(fsspec.available_protocols()))
        if unknown:
            raise ValueError(f"unknown storage protocol {unknown[0]!r} (fsspec knows e.g. s3, gcs, abfs, http)")
        return value

    def selection_entry(self, name: str) -> NamedSelection | None:
        """The ``selections:`` entry named ``name``, or None."""
        return next((entry for entry in self.selections if entry.name == name), None)

    def named_selections(self) -> list[tuple[NamedSelection, SelectConfig]]:
        """Each ``selections:`` entry with its resolved select settings (:meth:`NamedSelection.resolve`;
        checked by :func:`parse_config` and :func:`with_selections`)."""
        return [(entry, entry.resolve(self.select)) for entry in self.selections]


def _format_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or "(top level)"
    message = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        message = "unknown key"
    elif err["type"] == "missing":
        message = "required key is missing"
    more = f" (+{len(exc.errors()) - 1} more)" if len(exc.errors()) > 1 else ""
    return f"{where}: {message}{more}"


def parse_config(data: Any, source: str = "config") -> RunConfig:
    """Validate a parsed YAML mapping into a :class:`RunConfig` (UsageError on any problem)."""
    if not isinstance(data, dict):
        raise UsageError(f"{source}: the top level must be a mapping of sections")
    try:
        config = RunConfig.model_validate(data)
    except ValidationError as exc:
        raise UsageError(f"{source}: {_format_error(exc)}") from None
    check_paths(config, source)
    check_selections(config, source)
    check_consistency(config, source)
    return config


def check_selections(config: RunConfig, source: str) -> None:
    """Check the ``selections:`` entries: distinct names, each a valid select section once its
    inherited fields are added (UsageError in one line naming the entry)."""
    seen: set[str] = set()
    for i, entry in enumerate(config.selections):
        if entry.name in seen:
            raise UsageError(f"{source}: selections.{i}: two entries are named {entry.name!r}; names must differ")
        seen.add(entry.name)
        try:
            entry.resolve(config.select)
        except ValidationError as exc:
            raise UsageError(f"{source}: selections.{i} ({entry.name}): {_format_error(exc)}") from None


def parse_selection_override(text: str) -> dict[str, Any]:
    """One ``--selection 'NAME:key=value,key=value'`` as a ``selections:`` entry (values read as
    YAML scalars); UsageError in one line when malformed."""
    usage = "expected NAME:key=value[,key=value...], e.g. keep30:fraction=0.3"
    name, colon, body = text.partition(":")
    if not colon or not name.strip() or not body.strip():
        raise UsageError(f"--selection {text!r}: {usage}")
    entry: dict[str, Any] = {"name": name.strip()}
    for item in body.split(","):
        key, equals, value = item.partition("=")
        key = key.strip()
        if not equals or not key or key in entry:
            why = f"{key!r} given twice" if key in entry and equals else usage
            raise UsageError(f"--selection {text!r}: {why}")
        try:
            parsed = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError:
            raise UsageError(f"--selection {text!r}: {key}={value!r} is not a YAML value") from None
        if isinstance(parsed, (dict, list)):
            raise UsageError(f"--selection {text!r}: {key}={value!r}: give a single value (a list needs the config)")
        entry[key] = parsed
    return entry


def with_selections(config: RunConfig, overrides: list[dict[str, Any]], source: str = "--selection") -> RunConfig:
    """``config`` with ``selections:`` entries added or replaced (same name) by ``overrides``
    (raw entries, e.g. from :func:`parse_selection_override`), checked as the config's are."""
    by_name: dict[str, NamedSelection] = {}
    for override in overrides:
        label = f"{source} {override.get('name')!r}"
        try:
            entry = NamedSelection.model_validate(override)
            entry.resolve(config.select)
        except ValidationError as exc:
            where = _format_error(exc)
            raise UsageError(f"{label}: {where.removeprefix('(top level): ')}") from None
        if entry.name in by_name:
            raise UsageError(f"{label}: given twice")
        by_name[entry.name] = entry
    entries = [by_name.pop(e.name, e) for e in config.selections] + list(by_name.values())
    updated = config.model_copy(update={"selections": entries})
    check_selections(updated, source)
    check_consistency(updated, source)
    return updated


def load_config(path: str | os.PathLike) -> RunConfig:
    """Read and validate a YAML run configuration."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise UsageError(f"{p}: not valid YAML ({str(exc).splitlines()[0]})") from None
    return parse_config(data, str(p))


def _is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def check_paths(config: RunConfig, source: str) -> None:
    """Check that local input paths named by the config exist (remote URLs are checked when a
    stage opens them; the model name by :func:`pipeline.stages.context.check_train_model`)."""
    from pipeline.data.shards import expand_shards  # local import: keeps config import light

    sections = [("data", config.data)] + ([("target", config.target)] if config.target else [])
    for name, section in sections:
        if section.shards is not None:
            try:
                urls = expand_shards(section.shards)
            except UsageError as exc:
                raise UsageError(f"{source}: {name}.shards: {exc}") from None
            missing = [u for u in urls if _is_local(u) and not Path(u.removeprefix("file://")).is_file()]
            # A corpus with some shards absent (failed downloads) is data: those shards are recorded
            # as unreadable, count against max_failed_fraction and are picked up by a rerun. A list
            # of which nothing exists, or a missing target shard, is a configuration mistake.
            if missing and (name == "target" or len(missing) == len(urls)):
                extra = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
                raise UsageError(f"{source}: {name}.shards: shard not found: {missing[0]}{extra}")
        if section.sizes and _is_local(section.sizes) and not Path(section.sizes.removeprefix("file://")).is_file():
            raise UsageError(f"{source}: {name}.sizes: file not found: {section.sizes}")
    traj = config.trajectory
    if traj.path is not None and _is_local(traj.path):
        manifest = Path(traj.path.removeprefix("file://"))
        manifest = manifest if manifest.name == "trajectory.json" else manifest / "trajectory.json"
        if not manifest.is_file():
            raise UsageError(f"{source}: trajectory.path: trajectory manifest not found: {manifest}")
    if traj.train is not None:
        if traj.train.exclude_uids and not Path(traj.train.exclude_uids).is_file():
            raise UsageError(
                f"{source}: trajectory.train.exclude_uids: file not found: {traj.train.exclude_uids}")


def check_consistency(config: RunConfig, source: str) -> None:
    """Check settings of different sections against each other (one line naming the key)."""
    if config.score.device == "cuda" and config.resources.num_gpus == 0:
        raise UsageError(f"{source}: score.device: 'cuda' needs resources.num_gpus > 0 "
                         "(GPUs are declared per actor, never taken from the driver)")
    sections = ([("select", config.select)] if config.select is not None else []) + [
        (f"selections.{entry.name}", entry.resolve(config.select)) for entry in config.selections]
    for where, select in sections:
        _check_select(config, select, where, source)


def _check_select(config: RunConfig, select: SelectConfig, where: str, source: str) -> None:
    """The select settings ``select`` (the ``select:`` section, or a named selection's, reported as
    ``where``) against the score section: the columns it reads are computed, and so on."""
    computed = columns_computed(method_components(config.score.method, config.score.adam))
    for key, column in _select_columns(select):
        key = key.replace("select", where, 1)
        if column not in computed:
            field = key.removeprefix(f"{where}.")
            if select.rule == "drop_fill" and field not in select.model_fields_set:
                # a default of the recipe, not a key the user wrote: say which key to set
                choices = [c for c in computed if c in ESTIMATE_COLUMNS] if field == "drop_share_from" else computed
                raise UsageError(f"{source}: {key}: the default '{column}' is not computed when score.method is "
                                 f"'{config.score.method}' and score.adam is {config.score.adam}; set {key} "
                                 f"to one of {', '.join(choices)}")
            raise UsageError(f"{source}: {key}: '{column}' is not computed when score.method "
                             f"is '{config.score.method}' and score.adam is {config.score.adam} "
                             f"(use one of {', '.join(computed)})")
    if select.reads_clusters and config.score.embeddings.clusters == 0:
        fill = "'cluster'" + ("" if "fill" in select.model_fields_set else " (the default)")
        raise UsageError(f"{source}: {where}.fill: {fill} needs the score files' cluster column; set "
                         f"score.embeddings.clusters > 0, or {where}.fill: random")
    if select.stratify_by and select.stratify_by not in config.score.keep_json_fields:
        raise UsageError(f"{source}: {where}.stratify_by: json field '{select.stratify_by}' is not kept in "
                         "the score files; add it to score.keep_json_fields")


def _select_columns(select: SelectConfig) -> list[tuple[str, str]]:
    """(config key, score column) for every column the select rule reads."""
    if select.rule == "chain":
        return [(f"select.steps[{i}].column", step.column) for i, step in enumerate(select.steps or [])]
    named = [("select.column", select.column)]
    if select.rule == "drop_fill" and select.drop_column is not None:
        named.append(("select.drop_column", select.drop_column))
    if select.rule == "drop_fill" and select.drop_share_from is not None:
        named.append(("select.drop_share_from", select.drop_share_from))
    return named
