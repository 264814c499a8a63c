"""Import an open_clip / DataComp training run directory as a trajectory (DESIGN §2.5).

An open_clip run directory (``<logs>/<name>/``) holds ``params.txt`` and
``checkpoints/epoch_K.pt`` (plus ``epoch_latest.pt`` with ``--save-most-recent``).

``params.txt`` is written by ``open_clip_train.main`` as one ``name: str(value)`` line per
argument, sorted by name: strings appear unquoted (``model: ViT-B-32``, ``pretrained: `` for
the empty string, ``csv_separator: <TAB>``), everything else as its Python repr (``None``,
``True``, ``0.0005``, ``[224, 224]``, ``{}``). It is written after the distributed setup, so
``world_size`` is the run's real number of processes.

The global optimizer step of ``epoch_K.pt`` and its learning rate are recomputed from the
run's schedule the way open_clip_train does it:

- ``num_batches`` — micro-batches per epoch on each process — depends on the dataset type:
  webdataset rounds ``ceil(N / (batch_size * world_size))`` up to a multiple of
  ``max(1, workers)``; csv and synthetic use a ``DataLoader`` with ``drop_last=True`` over
  ``N`` samples (or ``ceil(N / world_size)`` per process under a ``DistributedSampler``).
- ``steps_per_epoch = num_batches // accum_freq``; ``total_steps = steps_per_epoch * epochs``.
- the scheduler is called before every micro-batch ``i`` of epoch ``e`` with
  ``step = steps_per_epoch * e + i // accum_freq``, so ``epoch_K.pt`` holds
  θ_t with ``t = K * steps_per_epoch``.

Each checkpoint's stored ``epoch`` must match its file name, and the learning rate left in
its saved optimizer (the one assigned before the last micro-batch of epoch K) must equal
the recomputed schedule's — a strong check that the batch count, hence every t, is right.
"""

from __future__ import annotations

import ast
import copy
import logging
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from pipeline.errors import UsageError
from pipeline.model.schedule import LRSchedule
from pipeline.model.trajectory import CheckpointRef, Trajectory, checkpoint_location, load_checkpoint_state

log = logging.getLogger(__name__)

PARAMS_FILE = "params.txt"
CHECKPOINT_DIR = "checkpoints"
LATEST_CHECKPOINT = "epoch_latest.pt"
_EPOCH_FILE = re.compile(r"^epoch_(\d+)\.pt$")
_PARAM_LINE = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*): ?(.*)$", re.DOTALL)
_LR_RTOL = 1e-9

# Parameters recorded in the manifest's ``source.params`` (when present in params.txt).
RELEVANT_PARAMS = (
    "accum_freq", "batch_size", "beta1", "beta2", "dataset_resampled", "dataset_type",
    "distributed", "epochs", "epochs_cooldown", "eps", "force_context_length",
    "force_custom_text", "force_image_size", "force_patch_dropout", "force_quick_gelu",
    "grad_clip_norm", "horovod", "lr", "lr_cooldown_end", "lr_cooldown_power", "lr_scheduler",
    "model", "name", "opt", "precision", "pretrained", "save_frequency", "seed", "siglip",
    "skip_scheduler", "train_data", "train_num_samples", "warmup", "wd", "workers",
    "world_size",
)


# --------------------------------------------------------------------------- params.txt


def read_params(path: str | os.PathLike) -> dict[str, str]:
    """Raw ``name -> text`` pairs of an open_clip ``params.txt`` (values not yet parsed).

    Only the line break is removed from a value (``csv_separator`` is a tab). A line that
    does not start with ``name:`` continues the previous value (a string with a newline).
    """
    file = Path(path)
    if not file.is_file():
        raise UsageError(f"{file} not found: not an open_clip run directory?")
    raw: dict[str, str] = {}
    last: str | None = None
    for line in file.read_text(encoding="utf-8").split("\n"):
        match = _PARAM_LINE.match(line)
        if match:
            last = match.group(1)
            raw[last] = match.group(2)
        elif last is not None:
            raw[last] += "\n" + line
        elif line.strip():
            raise UsageError(f"{file}: unparsable line {line[:80]!r}")
    if not raw:
        raise UsageError(f"{file} holds no parameters")
    return raw


class RunParams:
    """Typed read access to the values of a ``params.txt`` (with optional overrides)."""

    def __init__(self, raw: Mapping[str, str], source: str,
                 overrides: Mapping[str, Any] | None = None) -> None:
        self.raw = dict(raw)
        self.source = source
        self.overrides = {k: v for k, v in (overrides or {}).items() if v is not None}

    def has(self, key: str) -> bool:
        return key in self.overrides or key in self.raw

    def _text(self, key: str, default: str | None) -> str | None:
        if key not in self.raw:
            if default is None:
                raise UsageError(f"{self.source}: parameter {key!r} is missing")
            return default
        return self.raw[key]

    def _bad(self, key: str, kind: str) -> UsageError:
        return UsageError(f"{self.source}: {key} = {self.raw.get(key)!r} is not {kind}")

    def value(self, key: str, default: str | None = None) -> Any:
        """The value as a Python literal, or the plain text when it is not one."""
        if key in self.overrides:
            return self.overrides[key]
        text = self._text(key, default)
        try:
            return ast.literal_eval(text)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            return text

    def text(self, key: str, default: str | None = None) -> str | None:
        """A string parameter (``None`` when params.txt says ``None``)."""
        if key in self.overrides:
            return str(self.overrides[key])
        text = self._text(key, default)
        return None if text == "None" else text

    def integer(self, key: str, default: str | None = None, optional: bool = False) -> int | None:
        """An integer parameter; ``optional`` allows ``None``."""
        value = self.value(key, default)
        if value is None and optional:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise self._bad(key, "an integer")
        return value

    def number(self, key: str, default: str | None = None, optional: bool = False) -> float | None:
        """A real-valued parameter; ``optional`` allows ``None``."""
        value = self.value(key, default)
        if value is None and optional:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self._bad(key, "a number")
        return float(value)

    def flag(self, key: str, default: str = "False") -> bool:
        """A boolean parameter."""
        value = self.value(key, default)
        if not isinstance(value, bool):
            raise self._bad(key, "True or False")
        return value

    def relevant(self) -> dict[str, Any]:
        """The parameters recorded in the manifest, JSON-friendly."""
        out: dict[str, Any] = {}
        for key in RELEVANT_PARAMS:
            if self.has(key):
                value = self.value(key) if key not in ("model", "name", "train_data", "pretrained") \
                    else self.text(key)
                out[key] = _jsonable(value)
        return out


def _jsonable(value: Any) -> Any:
    """Tuples become lists, other non-JSON values become their text."""
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


# --------------------------------------------------------------------------- batch counts


@dataclass(frozen=True)
class EpochLayout:
    """How one epoch of the run splits into batches and optimizer steps."""

    dataset_type: str       # "webdataset" | "csv" | "synthetic"
    num_samples: int        # N: samples in the training set as the run declared it
    num_batches: int        # micro-batches per epoch on each process (dataloader.num_batches)
    samples_per_epoch: int  # samples drawn per epoch over all processes
    accum_freq: int

    @property
    def steps_per_epoch(self) -> int:
        return self.num_batches // self.accum_freq


def webdataset_num_batches(num_samples: int, batch_size: int, world_size: int,
                           workers: int) -> int:
    """Per-process batches per epoch of open_clip's webdataset loader (training, ceil rounding)."""
    per_process = math.ceil(num_samples / (batch_size * world_size))
    loaders = max(1, workers)
    return math.ceil(per_process / loaders) * loaders


def map_style_num_batches(num_samples: int, batch_size: int, world_size: int,
                          distributed: bool) -> int:
    """Per-process batches of a ``drop_last=True`` DataLoader (DistributedSampler when distributed)."""
    per_process = math.ceil(num_samples / world_size) if distributed else num_samples
    return per_process // batch_size


def resolve_dataset_type(params: RunParams) -> str:
    """open_clip's dataset type, resolving ``auto`` from the training data's extension."""
    kind = params.text("dataset_type", "auto")
    if kind == "auto":
        data = params.text("train_data", "None")
        ext = data.split(".")[-1] if data else ""
        kind = {"csv": "csv", "tsv": "csv", "tar": "webdataset"}.get(ext, "")
        if not kind:
            raise UsageError(f"{params.source}: dataset_type is auto and train_data {data!r} "
                             "has no .csv/.tsv/.tar extension")
    if kind not in ("webdataset", "csv", "synthetic"):
        raise UsageError(f"{params.source}: unsupported dataset_type {kind!r}")
    return kind


def _expand_shards(spec: str) -> list[str]:
    import braceexpand

    return [url for part in spec.split("::") for url in braceexpand.braceexpand(part)]


def webdataset_size(params: RunParams) -> int:
    """N of a webdataset run: ``train_num_samples``, else the shards' sizes.json / __len__."""
    declared = params.integer("train_num_samples", "None", optional=True)
    if declared is not None:
        return declared
    hint = "; pass --train-num-samples"
    spec = params.text("train_data", "None")
    if not spec:
        raise UsageError(f"{params.source}: webdataset run without train_data or train_num_samples")
    shards = _expand_shards(spec)
    directory = Path(os.path.dirname(shards[0]))
    sizes, length = directory / "sizes.json", directory / "__len__"
    if "://" in shards[0] or shards[0].startswith("pipe:"):
        raise UsageError(f"train_num_samples unset and shards {spec!r} are not local{hint}")
    if sizes.is_file():
        import json

        try:
            table = json.loads(sizes.read_text())
            return sum(int(table[os.path.basename(s)]) for s in shards)
        except KeyError as exc:
            raise UsageError(f"{sizes} has no size for shard {exc.args[0]}{hint}") from None
        except (ValueError, TypeError) as exc:
            raise UsageError(f"{sizes} is not a shard-size table ({exc}){hint}") from None
    if length.is_file():
        try:
            return int(ast.literal_eval(length.read_text().strip()))
        except (ValueError, SyntaxError, TypeError):
            raise UsageError(f"{length} does not hold a sample count{hint}") from None
    raise UsageError(f"train_num_samples unset and no sizes.json or __len__ in {directory}{hint}")


def csv_size(params: RunParams) -> int:
    """N of a csv run: rows of the training CSV (open_clip ignores train_num_samples there)."""
    if "train_num_samples" in params.overrides:
        return int(params.overrides["train_num_samples"])
    path = params.text("train_data", "None")
    if not path or not Path(path).is_file():
        raise UsageError(f"csv train_data {path!r} is not readable here; pass --train-num-samples "
                         "with its number of rows")
    import pandas as pd

    try:
        return len(pd.read_csv(path, sep=params.text("csv_separator", "\t")))
    except (ValueError, pd.errors.ParserError) as exc:
        raise UsageError(f"cannot read csv train_data {path}: {exc}") from None


def epoch_layout(params: RunParams) -> EpochLayout:
    """Batches per epoch and N as open_clip_train derived them for this run."""
    kind = resolve_dataset_type(params)
    batch_size = params.integer("batch_size")
    world_size = params.integer("world_size", "1")
    accum = params.integer("accum_freq", "1")
    if batch_size < 1 or world_size < 1 or accum < 1:
        raise UsageError(f"{params.source}: batch_size, world_size and accum_freq must be >= 1")
    if kind == "webdataset":
        n = webdataset_size(params)
        batches = webdataset_num_batches(n, batch_size, world_size, params.integer("workers", "4"))
    else:
        n = csv_size(params) if kind == "csv" else params.integer("train_num_samples")
        distributed = world_size > 1 if "world_size" in params.overrides \
            else params.flag("distributed", str(world_size > 1))
        batches = map_style_num_batches(n, batch_size, world_size, distributed)
    layout = EpochLayout(kind, n, batches, batches * batch_size * world_size, accum)
    if layout.steps_per_epoch < 1:
        raise UsageError(f"{params.source}: {n} samples give no optimizer step per epoch "
                         f"(batch_size {batch_size} x world_size {world_size}, accum_freq {accum})")
    return layout


# --------------------------------------------------------------------------- schedule, model


def run_schedule(params: RunParams, layout: EpochLayout) -> LRSchedule:
    """The run's learning-rate schedule over its total number of optimizer steps."""
    total = layout.steps_per_epoch * params.integer("epochs")
    base_lr = params.number("lr")
    if params.flag("skip_scheduler"):
        return LRSchedule(base_lr=base_lr, total_steps=total, warmup=0, kind="const")
    kind = params.text("lr_scheduler", "cosine")
    warmup = params.integer("warmup", "10000")
    if kind in ("cosine", "const"):
        return LRSchedule(base_lr=base_lr, total_steps=total, warmup=warmup, kind=kind)
    if kind == "const-cooldown":
        epochs_cooldown = params.integer("epochs_cooldown", "None", optional=True)
        if epochs_cooldown is None:
            raise UsageError(f"{params.source}: lr_scheduler const-cooldown needs epochs_cooldown")
        return LRSchedule(
            base_lr=base_lr, total_steps=total, warmup=warmup, kind=kind,
            cooldown_steps=layout.steps_per_epoch * epochs_cooldown,
            cooldown_power=params.number("lr_cooldown_power", "1.0"),
            cooldown_end_lr=params.number("lr_cooldown_end", "0.0"),
        )
    raise UsageError(f"{params.source}: unknown lr_scheduler {kind!r}")


def model_spec(params: RunParams) -> dict[str, Any]:
    """``{"name"}`` plus the inline config when open_clip knows the model, with the run's
    ``force_*`` overrides (and SigLIP's logit bias) applied as open_clip_train applied them."""
    import open_clip

    name = params.text("model")
    config = open_clip.get_model_config(name) if name else None
    if config is None:
        return {"name": name}
    config = copy.deepcopy(config)
    vision, text = config.setdefault("vision_cfg", {}), config.setdefault("text_cfg", {})
    if params.flag("force_quick_gelu"):
        config["quick_gelu"] = True
    if params.flag("force_custom_text"):
        config["custom_text"] = True
    forced = [
        (vision, "patch_dropout", params.number("force_patch_dropout", "None", optional=True)),
        (vision, "image_size", params.value("force_image_size", "None")),
        (text, "context_length", params.integer("force_context_length", "None", optional=True)),
    ]
    for section, key, value in forced:
        if value is not None:
            section[key] = _jsonable(value[0] if isinstance(value, list) and len(value) == 1 else value)
    if params.flag("siglip"):
        config["init_logit_scale"] = math.log(10)
        config["init_logit_bias"] = -10
    return {"name": name, "config": config}


def optimizer_spec(params: RunParams) -> dict[str, Any]:
    """The optimizer as the manifest records it."""
    beta1 = params.number("beta1", "None", optional=True)
    beta2 = params.number("beta2", "None", optional=True)
    return {
        "name": params.text("opt", "adamw").lower(),
        "lr": params.number("lr"),
        "betas": None if beta1 is None or beta2 is None else [beta1, beta2],
        "eps": params.number("eps", "None", optional=True),
        "weight_decay": params.number("wd", "0.2"),
    }


# --------------------------------------------------------------------------- checkpoints


@dataclass(frozen=True)
class RunCheckpoint:
    """One checkpoint file of the run with what it says about itself."""

    path: Path
    epoch: int
    saved_lr: float | None  # lr left in its optimizer's param_groups, if it has one


def _saved_lr(state: dict[str, Any]) -> float | None:
    optimizer = state.get("optimizer")
    groups = optimizer.get("param_groups") if isinstance(optimizer, dict) else None
    if not groups or "lr" not in groups[0]:
        return None
    return float(groups[0]["lr"])


def read_checkpoint(path: Path, name_epoch: int | None) -> RunCheckpoint:
    """Read a checkpoint's stored epoch and lr (tensors memory-mapped, not read)."""
    state = load_checkpoint_state(path, mmap=True)
    stored = state.get("epoch")
    if stored is not None and (isinstance(stored, bool) or not isinstance(stored, int)):
        raise UsageError(f"{path}: stored epoch {stored!r} is not an integer")
    if name_epoch is not None and stored is not None and stored != name_epoch:
        raise UsageError(f"{path}: file name says epoch {name_epoch} but it stores epoch {stored}")
    epoch = stored if stored is not None else name_epoch
    if epoch is None:
        raise UsageError(f"{path}: checkpoint stores no epoch")
    if stored is None:
        log.warning("%s stores no epoch; using %d from its name", path, epoch)
    return RunCheckpoint(path, epoch, _saved_lr(state))


def scan_checkpoints(run_dir: Path) -> list[RunCheckpoint]:
    """``epoch_K.pt`` files of the run in epoch order; ``epoch_latest.pt`` only when its epoch
    has no ``epoch_K.pt`` of its own."""
    directory = run_dir / CHECKPOINT_DIR
    files = sorted(directory.glob("*.pt")) if directory.is_dir() else []
    numbered = [(int(m.group(1)), f) for f in files if (m := _EPOCH_FILE.match(f.name))]
    if not numbered and not (directory / LATEST_CHECKPOINT).is_file():
        raise UsageError(f"no open_clip checkpoints (epoch_K.pt) in {directory}")
    found = {k: read_checkpoint(f, k) for k, f in sorted(numbered)}
    latest = directory / LATEST_CHECKPOINT
    if latest.is_file():
        ckpt = read_checkpoint(latest, None)
        if ckpt.epoch not in found:
            log.warning("%s (epoch %d) is included: it has no epoch_%d.pt copy and is "
                        "overwritten if the run resumes", latest, ckpt.epoch, ckpt.epoch)
            found[ckpt.epoch] = ckpt
    ignored = [f.name for f in files if not _EPOCH_FILE.match(f.name) and f.name != LATEST_CHECKPOINT]
    if ignored:
        log.info("ignoring %s in %s", ", ".join(ignored), directory)
    return [found[k] for k in sorted(found)]


def last_scheduled_step(epoch: int, layout: EpochLayout) -> int:
    """The step open_clip passed to the scheduler for the last micro-batch of ``epoch``
    (1-based epoch count): the lr a checkpoint's optimizer was left with."""
    return layout.steps_per_epoch * (epoch - 1) + (layout.num_batches - 1) // layout.accum_freq


def verify_saved_lr(ckpt: RunCheckpoint, schedule: LRSchedule, layout: EpochLayout) -> None:
    """Raise if the lr in the checkpoint's optimizer is not the recomputed schedule's."""
    if ckpt.saved_lr is None or ckpt.epoch < 1:
        return
    step = last_scheduled_step(ckpt.epoch, layout)
    try:
        expected = schedule.lr_at(step)
    except ZeroDivisionError:
        return
    if not math.isclose(ckpt.saved_lr, expected, rel_tol=_LR_RTOL, abs_tol=1e-15):
        raise UsageError(
            f"{ckpt.path}: its optimizer's lr {ckpt.saved_lr!r} is not the recomputed lr "
            f"{expected!r} of step {step}: the run's batch count differs from params.txt "
            "(fix with --world-size / --train-num-samples / --workers, or skip with --no-verify-lr)"
        )


# --------------------------------------------------------------------------- the import


def import_run(run_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None, *,
               world_size: int | None = None, train_num_samples: int | None = None,
               workers: int | None = None, verify_lr: bool = True) -> Trajectory:
    """Build the trajectory of an open_clip run directory (not yet saved; see ``Trajectory.save``).

    ``world_size`` / ``train_num_samples`` / ``workers`` override params.txt; ``out_dir``
    (default: the run directory) is where the manifest will live.
    """
    run = Path(run_dir)
    if not run.is_dir():
        raise UsageError(f"run directory not found: {run}")
    out = Path(out_dir) if out_dir is not None else run
    overrides = {"world_size": world_size, "train_num_samples": train_num_samples,
                 "workers": workers}
    for key, value in overrides.items():
        if value is not None and value < 1:
            raise UsageError(f"--{key.replace('_', '-')} must be >= 1, got {value}")
    params = RunParams(read_params(run / PARAMS_FILE), str(run / PARAMS_FILE), overrides)
    layout = epoch_layout(params)
    schedule = run_schedule(params, layout)
    epochs = params.integer("epochs")
    checkpoints = scan_checkpoints(run)
    refs = []
    for ckpt in checkpoints:
        if ckpt.epoch > epochs:
            raise UsageError(f"{ckpt.path}: epoch {ckpt.epoch} is beyond the run's {epochs} epochs")
        if verify_lr:
            verify_saved_lr(ckpt, schedule, layout)
        step = ckpt.epoch * layout.steps_per_epoch
        refs.append(CheckpointRef(checkpoint_location(ckpt.path, out), step, schedule.checkpoint_lr(step)))
    return Trajectory(
        model=model_spec(params),
        num_samples=layout.num_samples,
        total_steps=schedule.total_steps,
        batch_size=params.integer("batch_size") * params.integer("world_size", "1") * layout.accum_freq,
        optimizer=optimizer_spec(params),
        schedule=schedule.to_dict(),
        checkpoints=refs,
        seed=params.integer("seed", "0"),
        source={
            "kind": "open_clip",
            "run_dir": str(run.resolve()),
            "params": params.relevant(),
            "overrides": {k: v for k, v in overrides.items() if v is not None},
            "dataset_type": layout.dataset_type,
            "batches_per_epoch": layout.num_batches,
            "steps_per_epoch": layout.steps_per_epoch,
            "samples_per_epoch": layout.samples_per_epoch,
            "epochs": [c.epoch for c in checkpoints],
            "lr_verified": verify_lr and any(c.saved_lr is not None for c in checkpoints),
        },
        root=out,
    )
