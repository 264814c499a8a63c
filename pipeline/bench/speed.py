"""Speed benchmark: cost of scoring relative to a plain forward pass.

Same model, same real data (OpenMoji pairs), same process, interleaved repeats (the minimum
of each is kept, so background load hurts every method alike):

- ``forward``        plain forward pass (eval, inference mode, default attention kernels)
- ``embedding_columns`` the cheap filters' columns: a plain forward pass, then
                     ``neg_clip_loss`` (10 pools of 255 negatives), ``norm_sim_2``/``norm_sim_inf``
                     (against the target images) and the k-means ``cluster`` (10 centroids)
- ``unrolled``       d only: one JVP along the unrolled direction (``diffin_unrolled``)
- ``unrolled_compiled`` the same JVP through ``torch.compile`` (``score.compile``; the
                     one-off compile time is reported as ``compile_s``)
- ``tracin``         a only (one JVP)
- ``diffin_fd``      a, b, c with the paper's finite-difference c (the default)
- ``diffin_exact``   a, b, c with the exact c (nested forward mode)
- ``reference``      the reference code's per-sample algorithm: per sample, a fresh proxy
                     gradient on one batch, the target gradient over V, the per-sample
                     gradient and two finite-difference HVPs — all by backward passes

Reported: seconds per sample per checkpoint, ratios to ``forward``, pairs/s, and the
one-off prepare costs per checkpoint, which do not grow with the corpus: u, g, w, and the
unrolled direction (K Lanczos Hessian–vector products on the proxy batch).
"""

from __future__ import annotations

import json
import logging
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from pipeline.data.corpora.openmoji import iter_openmoji_pairs
from pipeline.data.pairs import PairTable, table_from_pairs
from pipeline.influence.embeddings import EmbeddingReference, EmbeddingSettings
from pipeline.influence.forward import CheckpointScorer, compiled_features_jvp
from pipeline.influence.objective import CLIPBankObjective, forward_mode_safe
from pipeline.influence.params import axpy, dot, from_vector, norm, params_of, scale, sub
from pipeline.influence.prepare import mean_loss_grad, prepare_checkpoint, prepare_unrolled
from pipeline.influence.unrolled import UnrolledSettings
from pipeline.io.atomic import write_json_atomic
from pipeline.model.clip import build_clip, context_length, make_tokenizer, model_spec, normalize_images

log = logging.getLogger(__name__)

DEFAULT_OUT = "benchmarks/results/speed.json"
QUICK_OUT = "benchmarks/results/speed_quick.json"


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Wall seconds of one call of ``fn`` (the device synchronised before and after)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def interleaved_min(methods: dict[str, Callable[[], object]], repeats: int, device: torch.device,
                    budget_s: float | None = None) -> dict[str, float]:
    """Run each method once to warm up, then ``repeats`` rounds in turn; keep each minimum.

    ``budget_s``: no further round starts once this many seconds (warm-up included) have
    passed; at least one timed round always runs."""
    start = time.perf_counter()
    for fn in methods.values():
        fn()
    best = {name: float("inf") for name in methods}
    for round_index in range(repeats):
        if round_index and budget_s is not None and time.perf_counter() - start > budget_s:
            break
        for name, fn in methods.items():
            best[name] = min(best[name], timed(fn, device))
    return best


def reference_per_sample(objective, params, target_batches, proxy_batch, sample, eps: float = 1e-3) -> torch.Tensor:
    """One sample's Eq. 9 bracket the way the reference code computes it (backward passes only)."""
    u = mean_loss_grad(objective, params, target_batches)
    g = mean_loss_grad(objective, params, [proxy_batch])
    grad_z = mean_loss_grad(objective, params, [sample])
    hb_gz = scale(norm(grad_z) / eps, sub(mean_loss_grad(objective, axpy(eps / norm(grad_z), grad_z, params), [proxy_batch]), g))
    hz_g = scale(norm(g) / eps, sub(mean_loss_grad(objective, axpy(eps / norm(g), g, params), [sample]), grad_z))
    return dot(u, hb_gz) + dot(u, hz_g)


def _table(image_size: int, count: int) -> PairTable:
    pairs = iter_openmoji_pairs(image_size=64, limit=count + 400)
    return table_from_pairs((p for _, p in zip(range(count), pairs)), image_size, "openmoji")


def measure_model(name: str, device: torch.device, batch_size: int, repeats: int,
                  bank_size: int, target_size: int, reference_samples: int, seed: int,
                  proxy_batch: int = 128, lanczos_steps: int = 20, compiled: bool = False) -> dict:
    """All methods for one model; returns seconds per sample per checkpoint and ratios.

    ``compiled`` adds ``unrolled_compiled`` (the JVP through torch.compile) and its one-off
    compile time; off for quick runs, where compiling would dominate."""
    torch.manual_seed(seed)
    model = build_clip(model_spec(name)).to(device).eval()
    size = int(model.visual.image_size[0] if isinstance(model.visual.image_size, tuple) else model.visual.image_size)
    tokenizer = make_tokenizer(context_length(model))
    table = _table(size, batch_size + bank_size + target_size + proxy_batch)

    def inputs(lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
        return (normalize_images(table.images[lo:hi]).to(device), tokenizer(table.captions[lo:hi]).to(device))

    batch = inputs(0, batch_size)
    bank = inputs(batch_size, batch_size + bank_size)
    start_t = batch_size + bank_size
    target = [inputs(i, min(i + batch_size, start_t + target_size)) for i in range(start_t, start_t + target_size, batch_size)]
    proxy = inputs(start_t + target_size, start_t + target_size + proxy_batch)
    objective = CLIPBankObjective(model, *bank)
    params = params_of(model)
    with forward_mode_safe():
        prep_time = time.perf_counter()
        prep = prepare_checkpoint(objective, params, target, [proxy], hvp="exact")
        prep_time = time.perf_counter() - prep_time
        unrolled_time = time.perf_counter()
        unrolled = prepare_unrolled(objective, [params], target, lambda k: [proxy], [[1e-3] * 100],
                                    UnrolledSettings(lanczos_steps=lanczos_steps))[0]
        unrolled_time = time.perf_counter() - unrolled_time
        scorers = {
            "unrolled": CheckpointScorer(objective, params, None, None, None, components=("d",),
                                         unrolled=from_vector(unrolled.direction, params)),
            "tracin": CheckpointScorer(objective, params, prep.u, prep.g, prep.w, components=("a",)),
            "diffin_fd": CheckpointScorer(objective, params, prep.u, prep.g, prep.w, c_mode="fd"),
            "diffin_exact": CheckpointScorer(objective, params, prep.u, prep.g, prep.w, c_mode="exact"),
        }
        if compiled:
            scorers["unrolled_compiled"] = CheckpointScorer(
                objective, params, None, None, None, components=("d",),
                unrolled=from_vector(unrolled.direction, params), network_jvp=compiled_features_jvp(objective))

    def forward() -> object:
        with torch.inference_mode():
            return model(*batch)

    reference = _embedding_reference(model, device, target_size, seed)

    def embedding_columns() -> object:
        with torch.inference_mode():
            img, txt = model(*batch)[:2]
            return reference.columns(img, txt)

    def scored(scorer: CheckpointScorer) -> Callable[[], object]:
        def run() -> object:
            with forward_mode_safe():
                return scorer(batch)
        return run

    methods = {"forward": forward, "embedding_columns": embedding_columns, **{k: scored(v) for k, v in scorers.items()}}
    compile_s = timed(methods["unrolled_compiled"], device) if compiled else None  # the first call compiles
    best = interleaved_min(methods, repeats, device)
    per_sample = {k: v / batch_size for k, v in best.items()}
    if reference_samples > 0:
        with forward_mode_safe():
            ref_times = [timed(lambda i=i: reference_per_sample(objective, params, target, proxy, (batch[0][i:i + 1], batch[1][i:i + 1])), device)
                         for i in range(reference_samples)]
        per_sample["reference"] = min(ref_times)
    fwd = per_sample["forward"]
    return {
        "s_per_sample_per_ckpt": per_sample,
        "ratio_to_forward": {k: v / fwd for k, v in per_sample.items()},
        "pairs_per_s_per_ckpt": {k: 1.0 / v for k, v in per_sample.items()},
        "speedup_diffin_fd_vs_reference": per_sample.get("reference", float("nan")) / per_sample["diffin_fd"],
        "prepare_s_per_ckpt": prep_time,
        "prepare_unrolled_s_per_ckpt": unrolled_time,
        "compile_s": compile_s,
        "settings": {"lanczos_steps": lanczos_steps, "batch_size": batch_size, "repeats": repeats, "bank_size": bank_size,
                     "target_size": target_size, "proxy_batch": proxy_batch, "reference_samples": reference_samples,
                     "image_size": size, "dtype": "float32", "device": str(device),
                     "parameters": sum(p.numel() for p in params.values())},
    }


def _embedding_reference(model: torch.nn.Module, device: torch.device, target_size: int,
                         seed: int) -> EmbeddingReference:
    """Reference sets of the default sizes (:class:`EmbeddingSettings`) from random unit
    embeddings: the columns' cost does not depend on the values."""
    settings = EmbeddingSettings()
    dim = int(model.text_projection.shape[-1]) if hasattr(model, "text_projection") else 512
    generator = torch.Generator().manual_seed(seed)

    def unit(n: int) -> torch.Tensor:
        return torch.nn.functional.normalize(torch.randn(n, dim, generator=generator), dim=1).to(device)

    sample = settings.pool_pairs
    pools = torch.randint(sample, (settings.pools, settings.pool_size), generator=generator)
    return EmbeddingReference([str(i) for i in range(sample)], unit(sample), unit(sample), pools.to(device),
                              unit(target_size), 0.01, unit(settings.clusters))


# Per model (full, quick): scoring batch, interleaved repeats, target |V|, proxy batch |B|,
# reference samples. ViT-B-32 uses |B| = 32: the exact HVP's double backward over 128 images at
# 224 px needs more than this 24 GiB machine has (it was OOM-killed at 21 GB).
# The unrolled prepare runs K = lanczos_steps HVPs (the default 20 on the tiny model; 4 on
# ViT-B-32 on CPU, where one HVP takes tens of seconds — its cost is linear in K).
MODEL_PLANS = {
    "tiny-clip-32": ({"batch_size": 128, "repeats": 5, "target_size": 256, "proxy_batch": 128, "reference_samples": 3,
                      "lanczos_steps": 20},
                     {"batch_size": 64, "repeats": 2, "target_size": 128, "proxy_batch": 128, "reference_samples": 1,
                      "lanczos_steps": 4}),
    "ViT-B-32": ({"batch_size": 16, "repeats": 2, "target_size": 32, "proxy_batch": 32, "reference_samples": 1,
                  "lanczos_steps": 4},
                 {"batch_size": 4, "repeats": 1, "target_size": 8, "proxy_batch": 8, "reference_samples": 0,
                  "lanczos_steps": 2}),
}


@dataclass(frozen=True)
class SpeedSettings:
    """Everything a speed run depends on."""

    models: tuple[str, ...] = tuple(MODEL_PLANS)
    quick: bool = False      # the smaller per-model plans, no torch.compile
    threads: int | None = None  # torch threads (None: torch's)
    device: str = "cpu"
    seed: int = 0


def settings_for(quick: bool = False, models: Sequence[str] | None = None, threads: int | None = None,
                 device: str = "cpu", seed: int = 0) -> SpeedSettings:
    """The settings of a run (``models`` empty or None: tiny-clip-32 with ``quick``, else every
    model of :data:`MODEL_PLANS`)."""
    names = tuple(models) if models else (("tiny-clip-32",) if quick else tuple(MODEL_PLANS))
    return SpeedSettings(models=names, quick=quick, threads=threads, device=device, seed=seed)


def run_benchmark(settings: SpeedSettings, out: str | Path, command: str = "", merge: bool = False,
                  on_model: Callable[[str, dict], None] | None = None) -> dict:
    """Measure every model of ``settings``, write the results JSON to ``out`` and return it.

    ``merge``: an existing ``out`` keeps the entries of the models not measured now (the
    measured ones are replaced). ``on_model(name, result)`` is called after each model.
    """
    previous_threads = torch.get_num_threads()
    if settings.threads:
        torch.set_num_threads(settings.threads)
    try:
        device = torch.device(settings.device)
        results: dict = {}
        meta = {"command": command, "device": str(device),
                "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                "torch": torch.__version__}
        for name in settings.models:
            plan = MODEL_PLANS.get(name, MODEL_PLANS["ViT-B-32"])[1 if settings.quick else 0]
            bank = 255 if name == "tiny-clip-32" and not settings.quick else 31
            start = time.perf_counter()
            results[name] = measure_model(name, device, plan["batch_size"], plan["repeats"], bank,
                                          plan["target_size"], plan["reference_samples"], settings.seed,
                                          plan["proxy_batch"], plan["lanczos_steps"], compiled=not settings.quick)
            results[name]["wall_s"] = round(time.perf_counter() - start, 1)
            results[name]["command"] = command
            if on_model is not None:
                on_model(name, results[name])
    finally:
        if settings.threads:
            torch.set_num_threads(previous_threads)
    out = Path(out)
    if merge and out.is_file():  # a run of some models updates their entries, keeps the others
        previous = json.loads(out.read_text())
        results = {**previous.get("_details", {}), **results}
    summary = {name: r["s_per_sample_per_ckpt"] for name, r in results.items()}
    report = {**summary, "_details": results, "_meta": meta}
    write_json_atomic(out, report)
    return report
