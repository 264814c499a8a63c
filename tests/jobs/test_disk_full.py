"""The run directory's disk fills up mid-run (issue #14): ``diffin run`` stops with one line naming
the file it could not write and "no space left on device", exit code 1 (an environment/data
error, not a usage error); no partial file is left under a final name; once space is freed, a
rerun completes from the finished shards and writes the same bytes as an undisturbed run.

Two disks: a real tmpfs of a few MiB (mounting needs root, as on CI), and, where mounting is
not possible, a stand-in that makes the atomic writer's commit fail with ENOSPC once the
directory would exceed its capacity (it cuts the temporary to what fits first, as a write that
ran out of space leaves it). The test runs in process (``--executor local``), so the stand-in
reaches the writer.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

import pipeline.io.atomic as atomic
from jobs.prune import main
from pipeline.errors import DataError
from pipeline.io.atomic import atomic_path, write_bytes_atomic
from tests.conftest import make_tiny_corpus
from tests.stages.test_pipeline import pipeline_config

SHARDS = 4
PAGE = 4096
SELECTION = ("kept.parquet", "kept_uids.npy", "manifest.parquet", "summary.json")


def _config(corpus: Path) -> dict:
    config = pipeline_config(corpus)
    config["target"].update(holdout_fraction=0.25, bank_size=4)  # 8 of 32 pairs: a bank of 4, 4 targets
    config["select"] = {"column": "diffin_unrolled", "rule": "top_fraction", "fraction": 0.5}
    config["reshard"] = {"shard_size": 10}
    return config


def _run(config: Path, run_dir: Path) -> int:
    return main(["--config", str(config), "--run-dir", str(run_dir), "--executor", "local", "--no-progress"])


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The config file and an undisturbed run of it (every stage, in process)."""
    root = tmp_path_factory.mktemp("diskfull")
    corpus = make_tiny_corpus(root / "corpus", n=8 * SHARDS, shard_size=8)
    config = root / "run.yaml"
    config.write_text(yaml.safe_dump(_config(corpus)))
    assert _run(config, root / "undisturbed") == 0
    return config, root / "undisturbed"


# ----------------------------------------------------------------------------- the disks


def _mount_tmpfs(mountpoint: Path, size: int) -> str | None:
    """Mount a tmpfs of ``size`` bytes; None when done, else why not."""
    mountpoint.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return "not root"
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(mountpoint)],
                          capture_output=True, text=True)
    return None if done.returncode == 0 else (done.stderr.strip() or f"mount exited {done.returncode}")


def _umount(mountpoint: Path) -> None:
    if subprocess.run(["umount", str(mountpoint)]).returncode != 0:  # busy (a failed test's open file)
        subprocess.run(["umount", "--lazy", str(mountpoint)], check=True)


class Tmpfs:
    """A real small filesystem: filled by a ballast file, freed by deleting it."""

    def __init__(self, mountpoint: Path, size: int) -> None:
        why = _mount_tmpfs(mountpoint, size)
        if why is not None:
            pytest.skip(f"cannot mount a tmpfs here ({why}); the 'stand-in' disk covers this test")
        self.mountpoint, self.root = mountpoint, mountpoint / "work"
        self.root.mkdir()
        self.ballast = mountpoint / "ballast"

    def size_of(self, *paths: Path) -> int:
        return sum(-(-p.stat().st_size // PAGE) * PAGE for p in paths)  # tmpfs allocates whole pages

    def fill(self, room: int) -> None:
        """Leave exactly ``room`` bytes free."""
        st = os.statvfs(self.mountpoint)
        free = st.f_bavail * st.f_frsize
        assert free > room
        with open(self.ballast, "wb") as out:
            out.write(bytes(free - room))
        st = os.statvfs(self.mountpoint)
        assert st.f_bavail * st.f_frsize == room

    def free(self) -> None:
        self.ballast.unlink()

    def close(self) -> None:
        _umount(self.mountpoint)


class StandInDisk:
    """A directory with a capacity, enforced where outputs are committed (the atomic writer's
    rename): a temporary that does not fit is cut to what fits and the commit fails with ENOSPC."""

    def __init__(self, root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.root = root
        root.mkdir(parents=True)
        self.capacity: int | None = None
        disk = self

        class Os:
            def __getattr__(self, name: str):
                return getattr(os, name)

            @staticmethod
            def replace(src, dst):
                src = Path(src)
                if disk.capacity is not None and src.is_file() and disk.root in src.parents:
                    over = disk.used() - disk.capacity
                    if over > 0:
                        os.truncate(src, max(0, src.stat().st_size - over))
                        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                return os.replace(src, dst)

        monkeypatch.setattr(atomic, "os", Os())

    def used(self) -> int:  # like a filesystem: symbolic links' targets elsewhere do not count
        return sum(os.lstat(os.path.join(d, f)).st_size for d, _, files in os.walk(self.root) for f in files)

    def size_of(self, *paths: Path) -> int:
        return sum(p.stat().st_size for p in paths)

    def fill(self, room: int) -> None:
        self.capacity = self.used() + room

    def free(self) -> None:
        self.capacity = None

    def close(self) -> None:
        pass


@pytest.fixture(params=["tmpfs", "stand-in"])
def disk(request, tmp_path, monkeypatch):
    made = Tmpfs(tmp_path / "mnt", 4 << 20) if request.param == "tmpfs" else StandInDisk(tmp_path / "disk", monkeypatch)
    try:
        yield made
    finally:
        made.close()


# ----------------------------------------------------------------------------- the tests


def _identity(path: Path) -> tuple[int, int, bytes]:
    st = path.stat()
    return st.st_ino, st.st_mtime_ns, path.read_bytes()


def _temporaries(run_dir: Path) -> list[str]:
    return [f for _, _, files in os.walk(run_dir) for f in files if ".tmp-" in f]


def test_full_disk_mid_scoring_fails_cleanly_and_the_rerun_completes(reference, disk, capsys) -> None:
    config, undisturbed = reference
    run_dir = disk.root / "run"
    run_dir.mkdir()
    for part in ("trajectory", "prepared"):  # same configuration: reused (read only), so the run starts
        (run_dir / part).symlink_to(undisturbed / part)  # scoring; 275 MB that need not fill the disk
    ref = {name: undisturbed / name for name in ("stats/00000.json", "scores/00000.parquet", "stats/00001.json",
                                                  "scores/00001.parquet")}
    # Room for shard 00000 (stats, then score file) and 00001's stats, and half of 00001's score file.
    disk.fill(disk.size_of(*list(ref.values())[:3]) + disk.size_of(ref["scores/00001.parquet"]) // 2)
    capsys.readouterr()

    assert _run(config, run_dir) == 1
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("diffin: error:")]
    assert len(errors) == 1, err[-3000:]
    assert "no space left on device" in errors[0] and str(run_dir / "scores" / "00001.parquet") in errors[0]
    assert "Traceback" not in err
    # Nothing partial under a final name, no temporaries: 00000 is done (and whole), 00001 is not.
    assert sorted(p.name for p in (run_dir / "scores").iterdir()) == ["00000.parquet"]
    assert (run_dir / "scores" / "00000.parquet").read_bytes() == ref["scores/00000.parquet"].read_bytes()
    assert _temporaries(run_dir) == []
    assert not (run_dir / "run_summary.json").exists() and not (run_dir / "selection").exists()
    finished = _identity(run_dir / "scores" / "00000.parquet")

    disk.free()
    assert _run(config, run_dir) == 0
    assert _identity(run_dir / "scores" / "00000.parquet") == finished  # kept, not scored again
    assert _temporaries(run_dir) == []
    names = [f"{i:05d}.parquet" for i in range(SHARDS)]
    assert sorted(p.name for p in (run_dir / "scores").iterdir()) == names
    outputs = [f"scores/{n}" for n in names] + [f"selection/{n}" for n in SELECTION] + sorted(
        str(p.relative_to(undisturbed)) for p in (undisturbed / "shards").iterdir())
    assert any(o.endswith(".tar") for o in outputs)
    assert sorted(str(p.relative_to(run_dir)) for p in (run_dir / "shards").iterdir()) == \
        [o for o in outputs if o.startswith("shards/")]
    for name in outputs:
        assert (run_dir / name).read_bytes() == (undisturbed / name).read_bytes(), name
    assert json.loads((run_dir / "run_summary.json").read_text())["shards_scored_now"] == SHARDS - 1


def test_atomic_writer_names_the_file_on_a_full_tmpfs(tmp_path) -> None:
    """Below the pipeline: a plain write (ENOSPC) and torch.save (which reports a short write
    without an errno) on a full disk both raise the one-line DataError and leave nothing behind."""
    mountpoint = tmp_path / "mnt"
    why = _mount_tmpfs(mountpoint, 64 * PAGE)
    if why is not None:
        pytest.skip(f"cannot mount a tmpfs here ({why}); test_full_disk_mid_scoring_... covers the stand-in")
    try:
        with pytest.raises(DataError, match=r"^no space left on device while writing .*/big\.bin \("):
            write_bytes_atomic(mountpoint / "big.bin", os.urandom(80 * PAGE))
        with pytest.raises(DataError, match=r"^no space left on device while writing .*/tensors\.pt \("):
            with atomic_path(mountpoint / "tensors.pt") as tmp:
                torch.save({"x": torch.randn(40 * PAGE)}, tmp)
        assert list(mountpoint.iterdir()) == []
        # An error that is not about space passes through as itself.
        with pytest.raises(ValueError):
            with atomic_path(mountpoint / "other.bin") as tmp:
                tmp.write_bytes(b"x")
                raise ValueError("not about space")
        assert list(mountpoint.iterdir()) == []
    finally:
        _umount(mountpoint)
