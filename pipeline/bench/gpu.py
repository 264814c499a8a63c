"""GPU throughput benchmark: what scoring costs per pair on one device, in one call.

Built for a short lease of an accelerator (``benchmarks/gpu/run.sh``): every number comes from
one process that needs only torch, numpy, PIL and the project's own code (no Ray, no hub
downloads), on synthetic data it makes itself. A synthetic trajectory — randomly initialised
weights of the model, perturbed per checkpoint — is written to a temporary folder and scored
through :class:`~pipeline.model.scorer.TrajectoryInfluence`, the facade the score stage uses,
so the measured path is the real one.

Sections, in the order they run (each is written to ``speed_gpu.json`` atomically as soon as it
finishes, so a run cut short still leaves the numbers measured so far):

- ``setup``     building and loading the trajectory (seconds; not a throughput)
- ``forward``   a plain forward pass (eval, inference mode, default attention kernels) in float32,
                TF32 and bfloat16; and the forward-only baseline columns (``neg_clip_loss``,
                ``norm_sim_2``, ``norm_sim_inf``: one forward pass at the last checkpoint plus
                their reductions against fixed pools and target embeddings)
- ``prepare``   per checkpoint: u alone (what ``method: unrolled`` prepares), u + g + w, and the
                unrolled directions (K Lanczos Hessian–vector products per checkpoint)
- ``methods``   seconds per sample per checkpoint of ``diffin_unrolled`` (d, one JVP), ``tracin``
                (a, one JVP), ``diffin`` (a, b and the finite-difference c) and ``all``; and the
                JVP-only scores in TF32 and bfloat16 with their relative error against float32
- ``score_task`` pairs/s of a whole score task (every checkpoint), with JPEG decode, resize and
                tokenisation in a pool of CPU worker processes (uint8 images copied to the device and
                normalised there): decode alone, the device alone (inputs already decoded) and both
                overlapped; which one bounds
- ``memory``    peak memory per scoring batch size and the largest batch that fits
- ``compile``   ``score.compile`` on and off (the one-off compile time apart)

Times: a warm-up call, then up to ``repeats`` calls while the measurement's ``budget_s`` lasts
(minimum kept; the device synchronised around each call). A section that would start after
``deadline_s`` is skipped and says so; a section that fails records its one-line error and the
run goes on.
"""

from __future__ import annotations

import contextlib
import copy
import io
import math
import os
import platform
import resource
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from pipeline.bench.speed import interleaved_min, timed
from pipeline.data.pairs import PairTable, decode_image
from pipeline.data.uids import make_uid
from pipeline.errors import UsageError
from pipeline.influence.embeddings import neg_clip_loss, norm_sim
from pipeline.influence.scores import METHOD_COMPONENTS
from pipeline.io.atomic import write_json_atomic
from pipeline.model.clip import build_clip, make_tokenizer, model_spec, normalize_images
from pipeline.model.schedule import LRSchedule
from pipeline.model.scorer import InfluenceSettings, PreparedTrajectory, TrajectoryInfluence, split_bank
from pipeline.model.trajectory import CheckpointRef, Trajectory

JSON_NAME = "speed_gpu.json"
FORMAT = "diffin-speed-gpu/1"
SECTIONS = ("setup", "forward", "prepare", "methods", "score_task", "memory", "compile")
# The methods timed per sample per checkpoint (score.method → components, as the score stage runs them).
TIMED_METHODS = {"diffin_unrolled": METHOD_COMPONENTS["unrolled"], "tracin": METHOD_COMPONENTS["tracin"],
                 "diffin": METHOD_COMPONENTS["diffin"], "all": METHOD_COMPONENTS["all"]}
# JVP-only scores: one JVP per checkpoint, so lower precision may do (checked against float32).
JVP_ONLY = {"diffin_unrolled": ("d", "diffin_unrolled"), "tracin": ("a", "tracin")}


@dataclass(frozen=True)
class GpuBenchSettings:
    """Everything a run depends on (the defaults: ViT-B-32 at 224 px, 5 checkpoints, ≤ 8 min on an H200)."""

    model: str = "ViT-B-32"
    checkpoints: int = 5
    batch_size: int = 256  # the scoring batch of forward / methods / score_task / compile
    bank_size: int = 255
    target_pairs: int = 512  # |V|: the target set besides the bank
    proxy_batch_size: int = 128
    lanczos_steps: int = 10  # K per checkpoint (the cost is linear in K; the project's default is 20)
    score_pairs: int = 8192  # at most this many pairs per score-task measurement (budget_s ends it sooner)
    jpeg_size: int = 224  # the synthetic JPEGs' side (decoded, then resized to the model's input)
    unique_jpegs: int = 512  # distinct JPEGs, cycled through for score_pairs
    decode_workers: int = 0  # CPU worker processes for decode + preprocessing (0: cores − 2, at most 12)
    memory_batches: tuple[int, ...] = (64, 128, 256, 512, 1024, 2048, 4096)
    memory_methods: tuple[str, ...] = ("unrolled", "all")
    neg_pools: int = 10  # negCLIPLoss: K fixed pools of batch_size pairs each
    repeats: int = 5
    budget_s: float = 10.0  # per timed measurement
    memory_budget_s: float = 60.0  # the memory section's batches, all methods together
    deadline_s: float = 450.0  # no section starts later than this after the run began
    compile: bool = True  # measure score.compile (its one-off compile can take minutes)
    device: str = "auto"  # auto: cuda if available, else cpu
    threads: int | None = None  # torch's CPU threads in this process (None: torch's default)
    seed: int = 0
    tolerance: float = 1e-2  # relative error that a lower precision may have against float32

    def __post_init__(self) -> None:
        positive = {"checkpoints": self.checkpoints, "batch_size": self.batch_size, "bank_size": self.bank_size,
                    "target_pairs": self.target_pairs, "proxy_batch_size": self.proxy_batch_size,
                    "lanczos_steps": self.lanczos_steps, "score_pairs": self.score_pairs,
                    "jpeg_size": self.jpeg_size, "unique_jpegs": self.unique_jpegs, "neg_pools": self.neg_pools,
                    "repeats": self.repeats}
        bad = [f"{k}={v}" for k, v in positive.items() if v < 1]
        if bad:
            raise UsageError(f"GPU bench settings must be >= 1: {', '.join(bad)}")
        if self.score_pairs < 2 * self.batch_size:
            raise UsageError(f"score_pairs ({self.score_pairs}) must be at least two batches ({2 * self.batch_size})")
        if self.decode_workers < 0 or min(self.budget_s, self.memory_budget_s, self.deadline_s) <= 0:
            raise UsageError("decode_workers must be >= 0; budget_s, memory_budget_s and deadline_s > 0")
        if self.threads is not None and self.threads < 1:
            raise UsageError(f"threads must be >= 1, got {self.threads}")
        if not self.memory_batches or min(self.memory_batches) < 1:
            raise UsageError(f"memory_batches must be positive batch sizes, got {self.memory_batches}")
        unknown = [m for m in self.memory_methods if m not in METHOD_COMPONENTS]
        if unknown:
            raise UsageError(f"unknown memory method(s) {unknown}; choose from {', '.join(METHOD_COMPONENTS)}")

    @property
    def workers(self) -> int:
        """Decode worker processes actually used."""
        return self.decode_workers or max(1, min((os.cpu_count() or 2) - 2, 12))


def tiny_settings(**overrides: Any) -> GpuBenchSettings:
    """A seconds-long CPU run of every section (the smoke test's size): the project's tiny
    model, 2 checkpoints, a handful of pairs, one repeat."""
    base = dict(model="tiny-clip-32", checkpoints=2, batch_size=4, bank_size=3, target_pairs=8, proxy_batch_size=4,
                lanczos_steps=2, score_pairs=16, jpeg_size=64, unique_jpegs=8, decode_workers=1,
                memory_batches=(2, 4), memory_methods=("unrolled",), neg_pools=2, repeats=1, budget_s=0.5,
                memory_budget_s=5.0, compile=False)
    return GpuBenchSettings(**{**base, **overrides})


def resolve_device(name: str) -> torch.device:
    """``auto``: the first CUDA device if there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"unknown device {name!r} (auto, cpu, cuda, cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device {name!r} asked for, but torch sees no CUDA device")
    return device


# ---------------------------------------------------------------- synthetic data and trajectory

COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "black", "white")
THINGS = ("dog", "cat", "car", "tree", "house", "boat", "bird", "flower", "chair", "mountain")


def synthetic_jpegs(count: int, size: int, seed: int) -> list[bytes]:
    """``count`` distinct JPEGs (quality 90) of ``size``² px: a smooth random colour field plus
    noise, which compresses and decodes like a photo rather than like flat colour or pure noise."""
    out = []
    for i in range(count):
        rng = np.random.default_rng([seed, i])
        coarse = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8))
        smooth = np.asarray(coarse.resize((size, size), Image.BICUBIC), dtype=np.float32)
        pixels = np.clip(smooth + rng.normal(0, 12, smooth.shape), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def synthetic_caption(i: int) -> str:
    """A short caption, different for every index."""
    return f"a photo of a {COLOURS[i % len(COLOURS)]} {THINGS[(i // len(COLOURS)) % len(THINGS)]}, number {i}"


def pair_table(jpegs: Sequence[bytes], first: int, count: int, image_size: int) -> PairTable:
    """Pairs ``first`` … ``first + count − 1`` (JPEGs cycled) decoded at ``image_size`` as the project decodes."""
    index = list(range(first, first + count))
    images = np.stack([decode_image(jpegs[i % len(jpegs)], image_size) for i in index])
    return PairTable([make_uid("gpu-bench", str(i)) for i in index], [f"pair{i:06d}" for i in index],
                     ["synthetic"] * count, torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(),
                     [synthetic_caption(i) for i in index], {})


def synthetic_trajectory(model: str, checkpoints: int, directory: Path, seed: int) -> Trajectory:
    """A trajectory of ``checkpoints`` open_clip checkpoints under ``directory``: the model's random
    initialisation, each checkpoint perturbed by 1 % of each tensor's spread, 100 steps apart, with
    a warmup + cosine schedule (so the unrolled score has learning rates to unroll)."""
    torch.manual_seed(seed)
    spec = model_spec(model)
    base = build_clip(spec).state_dict()
    steps = [100 * (k + 1) for k in range(checkpoints)]
    schedule = LRSchedule(base_lr=5e-4, total_steps=steps[-1], warmup=10)
    refs = []
    generator = torch.Generator().manual_seed(seed)
    for k, step in enumerate(steps):
        state = {}
        for name, tensor in base.items():
            if tensor.is_floating_point():
                spread = float(tensor.std()) if tensor.numel() > 1 else abs(float(tensor)) or 1.0
                tensor = tensor + 0.01 * spread * (k + 1) * torch.randn(tensor.shape, generator=generator)
            state[name] = tensor
        path = directory / "checkpoints" / f"step_{step:05d}.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"state_dict": state, "step": step}, path)
        refs.append(CheckpointRef(path.relative_to(directory).as_posix(), step, schedule.checkpoint_lr(step)))
    trajectory = Trajectory(model=spec, num_samples=steps[-1] * 256, total_steps=steps[-1], batch_size=256,
                            optimizer={"name": "adamw", "lr": 5e-4, "betas": [0.9, 0.98], "eps": 1e-6,
                                       "weight_decay": 0.2},
                            schedule=schedule.to_dict(), checkpoints=refs, seed=seed,
                            source={"kind": "synthetic"}, root=directory)
    trajectory.save()
    return trajectory


# ---------------------------------------------------------------- timing and precision helpers

def sync(device: torch.device) -> None:
    """Wait for the device's queued work (no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_time(fn: Callable[[], object], device: torch.device, repeats: int, budget_s: float) -> float:
    """Minimum seconds of one call of ``fn`` (a warm-up, then up to ``repeats`` calls within ``budget_s``)."""
    return interleaved_min({"fn": fn}, repeats, device, budget_s)["fn"]


@contextlib.contextmanager
def float32_matmul(precision: str) -> Iterator[None]:
    """float32 matrix products at ``precision`` ("highest": float32; "high": TF32 on CUDA)."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def relative_error(value: Tensor, reference: Tensor) -> float:
    """‖value − reference‖₂ / ‖reference‖₂ (float64)."""
    value, reference = value.double(), reference.double()
    return float((value - reference).norm() / reference.norm().clamp_min(1e-300))


def per_checkpoint_error(values: dict[str, Tensor], reference: dict[str, Tensor], component: str, column: str) -> dict:
    """The relative error of one JVP-only score: its component at each checkpoint (rows) and its column."""
    rows = [relative_error(v, r) for v, r in zip(values[component], reference[component])]
    return {"component_rel_error_max": max(rows), "column_rel_error": relative_error(values[column], reference[column])}


def peak_memory_mib(device: torch.device) -> float:
    """Peak device memory allocated since the last reset (CUDA), or this process's peak RSS (CPU)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def current_memory_mib(device: torch.device) -> float:
    """Device memory allocated now (CUDA), or this process's resident set now (CPU, Linux)."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2 ** 20
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak-memory window (CUDA; the CPU's peak RSS cannot be reset)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is an allocator's out-of-memory error."""
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


# ---------------------------------------------------------------- the run's state

@dataclass
class BenchState:
    """What the sections share: the device, the synthetic data, the scoring facade and the report."""

    settings: GpuBenchSettings
    device: torch.device
    out: Path
    command: str
    started: float = field(default_factory=time.perf_counter)
    report: dict[str, Any] = field(default_factory=dict)
    influence: TrajectoryInfluence | None = None
    trajectory: Trajectory | None = None
    jpegs: list[bytes] = field(default_factory=list)
    target: PairTable | None = None
    train: PairTable | None = None
    prepared: PreparedTrajectory | None = None
    batch: tuple[Tensor, Tensor] | None = None  # one scoring batch of model inputs on the device

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def write(self) -> None:
        """The report so far, atomically."""
        self.report["meta"]["wall_s"] = round(self.elapsed, 2)
        write_json_atomic(self.out / JSON_NAME, self.report)

    def variant(self, components: Sequence[str], compile_jvp: bool = False,
                base: TrajectoryInfluence | None = None) -> TrajectoryInfluence:
        """The scoring facade for ``components`` (sharing the loaded model and checkpoints)."""
        source = base or self.influence
        clone = copy.copy(source)
        clone.settings = replace(source.settings, components=tuple(components), compile=compile_jvp)
        clone.load_prepared(self.prepared)
        return clone

    def inputs(self, table: PairTable, count: int) -> tuple[Tensor, Tensor]:
        """Model inputs for ``count`` pairs of ``table`` (cycled), on the device."""
        index = [i % len(table) for i in range(count)]
        return self.influence.inputs(table.images[index], [table.captions[i] for i in index])


def metadata(state: BenchState) -> dict[str, Any]:
    """The run's device, software and settings."""
    device = state.device
    cuda = device.type == "cuda"
    props = torch.cuda.get_device_properties(device) if cuda else None
    return {
        "format": FORMAT, "command": state.command, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if cuda else (platform.processor() or platform.machine()),
        "device_memory_gib": round(props.total_memory / 2 ** 30, 2) if props else None,
        "torch": torch.__version__, "cuda": torch.version.cuda if cuda else None,
        "python": platform.python_version(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "dtype": "float32", "dtypes_measured": ["float32", "tf32", "bfloat16"],
        "tf32_applies": cuda, "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32 if cuda else None,
        "batch_size": state.settings.batch_size, "settings": asdict(state.settings),
        "decode_workers": state.settings.workers, "sections_done": [], "sections_failed": [], "complete": False,
        "units": "s_per_sample_per_ckpt: seconds per pair per checkpoint (min over repeats); pairs_per_s: pairs "
                 "per second; *_mib: MiB",
    }


# ---------------------------------------------------------------- sections

def section_setup(state: BenchState, workdir: Path) -> dict:
    """Synthetic JPEGs, the target and proxy tables, the trajectory and the float32 scoring facade."""
    s = state.settings
    start = time.perf_counter()
    state.jpegs = synthetic_jpegs(s.unique_jpegs, s.jpeg_size, s.seed)
    jpeg_s = time.perf_counter() - start
    start = time.perf_counter()
    state.trajectory = synthetic_trajectory(s.model, s.checkpoints, workdir / "trajectory", s.seed)
    write_s = time.perf_counter() - start
    start = time.perf_counter()
    settings = InfluenceSettings(bank_size=s.bank_size, batch_size=s.batch_size, proxy_batch_size=s.proxy_batch_size,
                                 seed=s.seed, components=METHOD_COMPONENTS["all"],
                                 unrolled=replace(InfluenceSettings().unrolled, lanczos_steps=s.lanczos_steps))
    state.influence = TrajectoryInfluence(state.trajectory, settings, state.device)
    sync(state.device)
    load_s = time.perf_counter() - start
    size = state.influence.image_size
    state.target = pair_table(state.jpegs, 0, s.bank_size + s.target_pairs, size)
    state.train = pair_table(state.jpegs, s.bank_size + s.target_pairs, s.proxy_batch_size, size)
    state.batch = state.inputs(state.train, s.batch_size)
    params = sum(p.numel() for p in state.influence.params[0].values())
    return {"model": s.model, "image_size": size, "parameters": params, "checkpoints": s.checkpoints,
            "jpeg_bytes_mean": float(np.mean([len(j) for j in state.jpegs])), "jpegs_s": jpeg_s,
            "write_trajectory_s": write_s, "load_trajectory_s": load_s}


def _last_checkpoint_model(state: BenchState, dtype: torch.dtype) -> torch.nn.Module:
    """A copy of the model with the last checkpoint's weights, in ``dtype``, on the device."""
    model = copy.deepcopy(state.influence.model)
    model.load_state_dict(state.influence.params[-1], strict=False)
    return model.to(state.device, dtype).eval()


def _embed(model: torch.nn.Module, images: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(image embeddings, text embeddings, exp(logit scale)) of open_clip's forward (embeddings L2-normalised)."""
    out = model(images, tokens)
    return out[0], out[1], out[2]


def section_forward(state: BenchState) -> dict:
    """A plain forward pass in float32, TF32 and bfloat16, and the forward-only baseline columns."""
    s, device = state.settings, state.device
    images, tokens = state.batch
    models = {"float32": _last_checkpoint_model(state, torch.float32),
              "bfloat16": _last_checkpoint_model(state, torch.bfloat16)}
    pools = state.inputs(state.target, s.neg_pools * s.batch_size)
    target = state.inputs(state.target, s.target_pairs)
    result: dict[str, Any] = {}
    for label, dtype_name, precision in (("float32", "float32", "highest"), ("tf32", "float32", "high"),
                                         ("bfloat16", "bfloat16", "highest")):
        model = models[dtype_name]
        dtype = next(model.parameters()).dtype
        x = images.to(dtype)
        with float32_matmul(precision), torch.inference_mode():
            pool_img, pool_txt, scale = _embed(model, pools[0].to(dtype), pools[1])
            pool_img = pool_img.view(s.neg_pools, s.batch_size, -1)
            pool_txt = pool_txt.view(s.neg_pools, s.batch_size, -1)
            target_img = _embed(model, target[0].to(dtype), target[1])[0]
            temperature = float(1.0 / scale.float())  # open_clip returns exp(logit_scale)

            def forward(model: torch.nn.Module = model, x: Tensor = x) -> object:
                return model(x, tokens)

            def columns(model: torch.nn.Module = model, x: Tensor = x) -> dict[str, Tensor]:
                img, txt, _ = _embed(model, x, tokens)
                return {"neg_clip_loss": neg_clip_loss(img, txt, pool_img, pool_txt, temperature),
                        "norm_sim_2": norm_sim(img, target_img, 2.0),
                        "norm_sim_inf": norm_sim(img, target_img, math.inf)}

            times = interleaved_min({"forward": forward, "embedding_columns": columns}, s.repeats, device, s.budget_s)
            values = columns()
        result[label] = {k: {"s_per_sample": t / s.batch_size, "pairs_per_s": s.batch_size / t} for k, t in times.items()}
        result[label]["embedding_columns"]["ratio_to_forward"] = times["embedding_columns"] / times["forward"]
        if label == "float32":
            reference = values
        else:
            result[label]["embedding_columns"]["rel_error_vs_float32"] = {
                k: relative_error(v, reference[k]) for k, v in values.items()}
    result["embedding_columns_setup"] = {"neg_pools": s.neg_pools, "pool_size": s.batch_size,
                                         "target_images": s.target_pairs}
    return result


def _prepare_all(state: BenchState, influence: TrajectoryInfluence) -> dict:
    """Prepare every checkpoint with ``influence``'s sizes, timed; sets ``state.prepared``."""
    s = state.settings
    u_only = copy.copy(influence)
    u_only.settings = replace(influence.settings, components=METHOD_COMPONENTS["unrolled"])
    reset_peak_memory(state.device)
    u_s, ugw_s, prepared = [], [], []
    for k in range(s.checkpoints):
        u_s.append(timed(lambda k=k: u_only.prepare_checkpoint(k, state.target, state.train), state.device))
        start = time.perf_counter()
        prepared.append(influence.prepare_checkpoint(k, state.target, state.train)[0])
        sync(state.device)
        ugw_s.append(time.perf_counter() - start)
    start = time.perf_counter()
    unrolled = influence.prepare_unrolled(state.target, state.train)
    sync(state.device)
    unrolled_s = time.perf_counter() - start
    bank, _ = split_bank(state.target, s.bank_size, s.seed)
    state.prepared = PreparedTrajectory([state.target.uids[i] for i in bank], state.target.images[bank],
                                        [state.target.captions[i] for i in bank], prepared,
                                        [None] * s.checkpoints, unrolled)
    hvps = int(unrolled.diagnostics["hvps"])
    return {"u_s_per_ckpt": u_s, "u_g_w_s_per_ckpt": ugw_s, "unrolled_s": unrolled_s,
            "unrolled_s_per_ckpt": unrolled_s / s.checkpoints, "unrolled_hvps": hvps,
            "unrolled_s_per_hvp": unrolled_s / max(hvps, 1), "peak_mib": peak_memory_mib(state.device),
            "sizes": {"target_pairs": s.target_pairs, "bank_size": s.bank_size,
                      "proxy_batch_size": influence.settings.proxy_batch_size,
                      "target_batch_size": influence.settings.batch_size,
                      "lanczos_steps": s.lanczos_steps, "hvp": influence.settings.hvp}}


def section_prepare(state: BenchState) -> dict:
    """Per checkpoint: u alone, u + g + w, and the unrolled directions (float32). Out of memory,
    it tries again with the proxy and target batches halved (down to 8), and says so: the later
    sections need prepared vectors, whatever their batch."""
    influence, failed = state.influence, []
    while True:
        try:
            result = _prepare_all(state, influence)
            break
        except Exception as exc:
            sizes = (influence.settings.proxy_batch_size, influence.settings.batch_size)
            if not is_out_of_memory(exc) or max(sizes) <= 8:
                raise
            failed.append({"proxy_batch_size": sizes[0], "target_batch_size": sizes[1], "error": _error_line(exc)})
        reset_peak_memory(state.device)
        influence = copy.copy(influence)
        influence.settings = replace(influence.settings, proxy_batch_size=max(8, sizes[0] // 2),
                                     batch_size=max(8, sizes[1] // 2))
    result["out_of_memory"] = failed
    return result


def _score_fn(facade: TrajectoryInfluence, batch: tuple[Tensor, Tensor], precision: str = "highest") -> Callable[[], dict]:
    def run() -> dict[str, Tensor]:
        with float32_matmul(precision):
            return facade.score_inputs(*batch)
    return run


def section_methods(state: BenchState) -> dict:
    """Per sample per checkpoint of each method in float32 (interleaved, with the forward pass),
    then the JVP-only scores in TF32 and bfloat16 against float32."""
    s, device = state.settings, state.device
    if state.prepared is None:
        raise RuntimeError("needs the prepare section's vectors, which failed or did not run")
    m, b = s.checkpoints, s.batch_size
    facades = {name: state.variant(components) for name, components in TIMED_METHODS.items()}
    model = state.influence.model

    def forward() -> object:
        with torch.inference_mode():
            return model(*state.batch)

    fns: dict[str, Callable[[], object]] = {"forward": forward}
    fns.update({name: _score_fn(f, state.batch) for name, f in facades.items()})
    times = interleaved_min(fns, s.repeats, device, s.budget_s)
    per_sample = {k: (t / b if k == "forward" else t / (b * m)) for k, t in times.items()}
    result: dict[str, Any] = {
        "float32": {"s_per_sample_per_ckpt": per_sample,
                    "pairs_per_s_per_ckpt": {k: 1.0 / v for k, v in per_sample.items()},
                    "pairs_per_s_all_ckpts": {k: 1.0 / (v * m) for k, v in per_sample.items() if k != "forward"},
                    "ratio_to_forward": {k: v / per_sample["forward"] for k, v in per_sample.items()}},
    }
    reference = {name: _score_fn(facades[name], state.batch)() for name in JVP_ONLY}
    bf16 = TrajectoryInfluence(state.trajectory, replace(state.influence.settings, dtype="bfloat16"), device)
    bf16_batch = (state.batch[0].to(torch.bfloat16), state.batch[1])
    variants = {"tf32": {name: (_score_fn(facades[name], state.batch, "high")) for name in JVP_ONLY},
                "bfloat16": {name: _score_fn(state.variant(TIMED_METHODS[name], base=bf16), bf16_batch)
                             for name in JVP_ONLY}}
    for label, fns_by_name in variants.items():
        times = interleaved_min(fns_by_name, s.repeats, device, s.budget_s)
        entry: dict[str, Any] = {}
        for name, fn in fns_by_name.items():
            component, column = JVP_ONLY[name]
            error = per_checkpoint_error(fn(), reference[name], component, column)
            worst = max(error.values())
            entry[name] = {"s_per_sample_per_ckpt": times[name] / (b * m), "pairs_per_s_per_ckpt": b * m / times[name],
                           "speedup_vs_float32": per_sample[name] * b * m / times[name], **error,
                           "within_tolerance": worst <= s.tolerance}
        result[label] = entry
    result["tolerance"] = s.tolerance
    result["rel_error"] = "||x - x_float32||_2 / ||x_float32||_2 over the batch; component: worst checkpoint"
    del bf16
    return result


class DecodedBatches(torch.utils.data.Dataset):
    """Batches made on the CPU from JPEG bytes: decode + resize (as the score stage does), stack,
    tokenise; images stay uint8 (a quarter of float32's bytes to pass between processes and to
    copy to the device, where they are normalised). Item i is batch i (for a DataLoader with
    ``batch_size=None``)."""

    def __init__(self, jpegs: Sequence[bytes], pairs: int, batch_size: int, image_size: int, context_length: int) -> None:
        self.jpegs, self.pairs, self.batch_size = list(jpegs), pairs, batch_size
        self.image_size, self.context_length = image_size, context_length
        self._tokenizer = None

    def __len__(self) -> int:
        return self.pairs // self.batch_size

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        if self._tokenizer is None:
            self._tokenizer = make_tokenizer(self.context_length)
        ids = range(index * self.batch_size, (index + 1) * self.batch_size)
        images = np.stack([decode_image(self.jpegs[i % len(self.jpegs)], self.image_size) for i in ids])
        uint8 = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
        return uint8, self._tokenizer([synthetic_caption(i) for i in ids])


def decode_loader(state: BenchState) -> torch.utils.data.DataLoader:
    """The CPU side of a score task: ``workers`` processes decoding and preprocessing batches (kept
    between passes: each pass's first batch, timed apart, is the only one that waits for them)."""
    s = state.settings
    dataset = DecodedBatches(state.jpegs, s.score_pairs, s.batch_size, state.influence.image_size,
                             int(state.influence.model.context_length))
    return torch.utils.data.DataLoader(dataset, batch_size=None, shuffle=False, num_workers=s.workers,
                                       pin_memory=state.device.type == "cuda", prefetch_factor=2,
                                       persistent_workers=True, multiprocessing_context="fork")


def _stream(batches: Iterator[tuple[Tensor, Tensor]], consume: Callable[[Tensor, Tensor], object],
            device: torch.device, budget_s: float) -> dict:
    """Pull batches through ``consume`` until they run out or ``budget_s`` passes; pairs/s over the
    whole stream (the first batch, which pays the workers' start, excluded)."""
    pairs, start, first_s = 0, None, 0.0
    t0 = time.perf_counter()
    for images, tokens in batches:
        consume(images, tokens)
        if start is None:
            sync(device)
            start = time.perf_counter()
            first_s = start - t0
            continue
        pairs += images.shape[0]
        if time.perf_counter() - start > budget_s:
            break
    sync(device)
    seconds = time.perf_counter() - start if start is not None else 0.0
    return {"pairs": pairs, "seconds": seconds, "pairs_per_s": pairs / seconds if seconds > 0 else 0.0,
            "first_batch_s": first_s}


def section_score_task(state: BenchState) -> dict:
    """pairs/s of a whole score task: decode alone, the device alone, both overlapped."""
    s, device = state.settings, state.device
    if state.prepared is None:
        raise RuntimeError("needs the prepare section's vectors, which failed or did not run")
    dtype = state.influence.dtype

    def to_device(images: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor]:
        pixels = normalize_images(images.to(device, non_blocking=True)).to(dtype)
        return pixels, tokens.to(device, non_blocking=True)

    loader = decode_loader(state)
    decode = _stream(iter(loader), lambda images, tokens: None, device, s.budget_s)
    result: dict[str, Any] = {"decode_only": decode, "workers": s.workers, "jpeg_size": s.jpeg_size,
                              "batch_size": s.batch_size}
    host_batch = next(iter(DecodedBatches(state.jpegs, s.batch_size, s.batch_size, state.influence.image_size,
                                          int(state.influence.model.context_length))))
    if device.type == "cuda":
        host_batch = (host_batch[0].pin_memory(), host_batch[1].pin_memory())
    for method in ("unrolled", "all"):
        facade = state.variant(METHOD_COMPONENTS[method])

        def score(images: Tensor, tokens: Tensor, facade: TrajectoryInfluence = facade) -> object:
            return facade.score_inputs(*to_device(images, tokens))

        repeated = (host_batch for _ in range(s.score_pairs // s.batch_size))
        device_only = _stream(repeated, score, device, s.budget_s)
        overlapped = _stream(iter(loader), score, device, s.budget_s)
        bound = "decode" if decode["pairs_per_s"] < device_only["pairs_per_s"] else "device"
        result[method] = {"device_only": device_only, "overlapped": overlapped, "bottleneck": bound,
                          "overlap_efficiency": overlapped["pairs_per_s"] / max(
                              min(decode["pairs_per_s"], device_only["pairs_per_s"]), 1e-12)}
    result["note"] = ("pairs/s for all checkpoints together; decode_only: JPEG decode, resize and tokenisation in "
                      "the worker processes, nothing else; device_only feeds one decoded uint8 batch from host "
                      "memory again and again (host-to-device copy and normalisation included); overlapped: both")
    return result


def _memory_for(state: BenchState, method: str, budget_s: float) -> dict:
    """One scoring batch (every checkpoint) per batch size, ascending, until one does not fit, the
    list ends, or the next would (by the last one's time per pair) overrun ``budget_s``."""
    s, device = state.settings, state.device
    facade = state.variant(METHOD_COMPONENTS[method])
    rows: list[dict] = []
    largest, limited_by = 0, "list"
    start = time.perf_counter()
    for size in sorted(s.memory_batches):
        if rows:
            last = rows[-1]
            if time.perf_counter() - start + last["s_per_batch"] * size / last["batch_size"] > budget_s:
                limited_by = "budget"
                break
        batch = None
        try:
            reset_peak_memory(device)
            resident = current_memory_mib(device)
            batch = state.inputs(state.train, size)
            seconds = timed(lambda: facade.score_inputs(*batch), device)
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            batch = None
            reset_peak_memory(device)
            limited_by = "out_of_memory"
            break
        finally:
            del batch
        peak = peak_memory_mib(device)
        rows.append({"batch_size": size, "peak_mib": peak, "resident_mib": resident, "batch_mib": peak - resident,
                     "s_per_batch": seconds, "pairs_per_s": size / seconds})
        largest = size
    result = {"batches": rows, "largest_fitting_batch": largest, "limited_by": limited_by,
              "first_not_fitting_batch": (min(b for b in s.memory_batches if b > largest)
                                          if limited_by == "out_of_memory" else None)}
    if len(rows) >= 2 and device.type == "cuda":
        (b0, m0), (b1, m1) = [(r["batch_size"], r["peak_mib"]) for r in rows[-2:]]
        slope = (m1 - m0) / (b1 - b0)
        total = torch.cuda.get_device_properties(device).total_memory / 2 ** 20
        result["mib_per_pair"] = slope
        result["predicted_largest_batch"] = int((total - (m1 - slope * b1)) / slope) if slope > 0 else None
    return result


def section_memory(state: BenchState) -> dict:
    """Peak memory of one scoring batch (every checkpoint) per batch size; the largest that fits."""
    if state.prepared is None:
        raise RuntimeError("needs the prepare section's vectors, which failed or did not run")
    methods = state.settings.memory_methods
    result: dict[str, Any] = {m: _memory_for(state, m, state.settings.memory_budget_s / len(methods)) for m in methods}
    result["measure"] = ("torch.cuda.max_memory_allocated per batch: peak_mib includes resident_mib, what was "
                         "allocated before the batch (all checkpoints' parameters and every prepared vector: u, g, w "
                         "and the unrolled directions, more than a worker of one method holds); batch_mib = the rest"
                         if state.device.type == "cuda" else
                         "process peak RSS (CPU: a running maximum over the whole run, not per batch)")
    result["prediction"] = ("CUDA: predicted_largest_batch extrapolates the last two batches' peaks linearly to the "
                            "device's total memory (not measured)")
    return result


def section_compile(state: BenchState) -> dict:
    """``score.compile`` on and off for the default method (diffin_unrolled: a single-direction JVP)."""
    s, device = state.settings, state.device
    if state.prepared is None:
        raise RuntimeError("needs the prepare section's vectors, which failed or did not run")
    m, b = s.checkpoints, s.batch_size
    eager = state.variant(METHOD_COMPONENTS["unrolled"])
    compiled = state.variant(METHOD_COMPONENTS["unrolled"], compile_jvp=True)
    compile_s = timed(_score_fn(compiled, state.batch), device)  # the first call compiles
    times = interleaved_min({"off": _score_fn(eager, state.batch), "on": _score_fn(compiled, state.batch)},
                            s.repeats, device, s.budget_s)
    error = per_checkpoint_error(_score_fn(compiled, state.batch)(), _score_fn(eager, state.batch)(),
                                 "d", "diffin_unrolled")
    per_sample = {k: t / (b * m) for k, t in times.items()}
    return {"method": "diffin_unrolled", "compile_s": compile_s, "s_per_sample_per_ckpt": per_sample,
            "pairs_per_s_per_ckpt": {k: 1.0 / v for k, v in per_sample.items()},
            "speedup": per_sample["off"] / per_sample["on"], **error}


# ---------------------------------------------------------------- the run

def _error_line(exc: BaseException) -> str:
    text = (str(exc).strip().splitlines() or [""])[0][:300]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def run_benchmark(settings: GpuBenchSettings, out: str | os.PathLike, command: str = "",
                  on_section: Callable[[str, dict], None] | None = None, workdir: str | os.PathLike | None = None) -> dict:
    """Run every section, writing ``out/speed_gpu.json`` after each; return the report.

    ``on_section(name, entry)`` is called after each section (entry: its result, or its error or
    skip reason). The synthetic trajectory lives in a temporary folder under ``workdir`` (default:
    the system's), removed at the end. ``settings.threads`` applies for the run only.
    """
    device = resolve_device(settings.device)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    previous_threads = torch.get_num_threads()
    if settings.threads:
        torch.set_num_threads(settings.threads)
    try:
        state = BenchState(settings, device, out, command)
        state.report = {"meta": metadata(state), **{name: None for name in SECTIONS}}
        state.write()
        with tempfile.TemporaryDirectory(prefix="diffin-gpu-bench-", dir=workdir) as tmp:
            _run_sections(state, Path(tmp), on_section)
    finally:
        torch.set_num_threads(previous_threads)
    meta = state.report["meta"]
    meta["complete"] = not meta["sections_failed"] and all(
        "skipped" not in (state.report[n] or {}) for n in SECTIONS if n != "compile" or settings.compile)
    state.write()
    return state.report


def _run_sections(state: BenchState, workdir: Path, on_section: Callable[[str, dict], None] | None) -> None:
    """Each section in turn (skipped past the deadline or without setup; a failure recorded), the
    report written after each."""
    settings, meta = state.settings, state.report["meta"]
    runners: dict[str, Callable[[], dict]] = {
        "setup": lambda: section_setup(state, workdir), "forward": lambda: section_forward(state),
        "prepare": lambda: section_prepare(state), "methods": lambda: section_methods(state),
        "score_task": lambda: section_score_task(state), "memory": lambda: section_memory(state),
        "compile": lambda: section_compile(state)}
    for name in SECTIONS:
        if name == "compile" and not settings.compile:
            entry: dict = {"skipped": "score.compile not asked for (compile: false)"}
        elif name != "setup" and state.influence is None:
            entry = {"skipped": "setup failed"}
        elif state.elapsed > settings.deadline_s:
            entry = {"skipped": f"deadline: {state.elapsed:.0f} s > deadline_s {settings.deadline_s:g}"}
        else:
            start = time.perf_counter()
            try:
                entry = runners[name]()
                meta["sections_done"].append(name)
            except Exception as exc:  # record it, go on: the other sections' numbers still count
                entry = {"error": _error_line(exc), "traceback": traceback.format_exc(limit=6)[-2000:]}
                meta["sections_failed"].append(name)
                if state.device.type == "cuda":
                    torch.cuda.empty_cache()
            entry["section_s"] = round(time.perf_counter() - start, 3)
        state.report[name] = entry
        state.write()
        if on_section is not None:
            on_section(name, entry)


def summary_lines(report: dict) -> list[str]:
    """A few printed lines: the headline numbers of a report (what exists of them)."""
    meta = report["meta"]
    lines = [f"device {meta['device_name']} ({meta['device']}), torch {meta['torch']}, batch {meta['batch_size']}"]
    methods = report.get("methods") or {}
    if "float32" in methods:
        per = methods["float32"]["pairs_per_s_per_ckpt"]
        lines.append("pairs/s per checkpoint (float32): " + ", ".join(f"{k} {v:,.1f}" for k, v in per.items()))
    task = report.get("score_task") or {}
    for method in ("unrolled", "all"):
        if method in task:
            t = task[method]
            lines.append(f"score task ({method}, all checkpoints): device {t['device_only']['pairs_per_s']:,.1f}, "
                         f"decode {task['decode_only']['pairs_per_s']:,.1f}, overlapped "
                         f"{t['overlapped']['pairs_per_s']:,.1f} pairs/s; bound by {t['bottleneck']}")
    off = {"compile"} if not meta["settings"]["compile"] else set()
    bad = meta["sections_failed"] + [n for n in SECTIONS if "skipped" in (report.get(n) or {}) and n not in off]
    if bad:
        lines.append("not measured: " + ", ".join(f"{n} ({(report[n] or {}).get('error') or report[n].get('skipped')})"
                                                  for n in bad))
    return lines

