"""Atomic commits of files and directories: write to a temporary name, then rename.

A remote target (an fsspec URL, see :mod:`pipeline.io.storage`) is written to a local
temporary first and uploaded only when complete: an object store's PUT makes a file appear
whole or not at all (a directory's files appear one by one, so write its marker last).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Iterator

from pipeline.errors import DataError
from pipeline.io.storage import as_path, is_remote, upload

NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def _temp_sibling(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling path; rename it onto ``path`` only if the block succeeds.

    Works for files and directories. On failure the temporary is removed and ``path`` is
    left as it was; a full disk (or quota) is reported as a one-line :class:`DataError` naming
    ``path``.
    """
    if is_remote(path):
        with _remote_atomic_path(path) as tmp:
            yield tmp
        return
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_sibling(target)
    try:
        yield tmp
        if target.is_dir() and tmp.is_dir():
            old = _temp_sibling(target)
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException as exc:
        full = out_of_space(exc, target.parent)  # before removing the temporary frees space
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()
        if full:
            raise _no_space_error(target) from exc
        raise


def out_of_space(exc: BaseException, directory: Path) -> bool:
    """Whether ``exc``, raised while writing into ``directory``, means that its disk is full:
    ENOSPC / EDQUOT anywhere in its chain, or, for writers that report a short write without an
    errno (``torch.save``: "unexpected pos"), no free block left on that filesystem."""
    if isinstance(exc, DataError):  # reported already (an inner atomic write), or not about space
        return False
    seen, chain = exc, set()
    while seen is not None and id(seen) not in chain:
        if isinstance(seen, OSError) and seen.errno in NO_SPACE:
            return True
        chain.add(id(seen))
        seen = seen.__cause__ or seen.__context__
    if not isinstance(exc, Exception) or isinstance(exc, OSError):
        return False
    try:
        return os.statvfs(directory).f_bavail == 0
    except OSError:
        return False


def _no_space_error(target: Any) -> DataError:
    return DataError(f"no space left on device while writing {target} (its partial temporary was removed); "
                     "free space there, then rerun: finished outputs are kept and reused")


@contextlib.contextmanager
def _remote_atomic_path(path: Any) -> Iterator[Path]:
    target = as_path(path)
    scratch = Path(tempfile.mkdtemp(prefix="diffin-upload-"))
    try:
        tmp = scratch / target.name
        yield tmp
        upload(tmp, target)
    except Exception as exc:
        if out_of_space(exc, scratch):  # the local scratch disk (TMPDIR)
            raise _no_space_error(f"{target} (its local copy in {scratch})") from exc
        raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def remove_stale_temporaries(directory: Any) -> int:
    """Delete temporaries a killed writer left in a local ``directory`` (``.NAME.tmp-…``);
    return how many. Call only where no writer is active (a stage's start). Remote targets
    never leave any: their temporaries live in local scratch directories."""
    if is_remote(directory):
        return 0
    removed = 0
    for stale in Path(directory).glob(".*.tmp-*"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)
        removed += 1
    return removed


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as stable, human-readable JSON (sorted keys, trailing newline) atomically."""
    text = json.dumps(obj, indent=2, sort_keys=True) + "\n"
    write_bytes_atomic(path, text.encode("utf-8"))
