"""Where inputs and outputs live: local paths, ``file://``, any fsspec URL (``s3://…``), ``pipe:``.

Locations are turned into path objects once (:func:`as_path`): a :class:`pathlib.Path` for
local ones, a ``universal_pathlib`` :class:`~upath.UPath` bound to its filesystem options for
remote ones, so stages use one pathlib-style API for both. Options come from the run config's
``storage`` section, keyed by protocol (``storage: {s3: {endpoint_url: …}}``); credentials
are best left to the protocol's own environment variables.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import IO, Any, Mapping, Union

from upath import UPath

StoragePath = Union[Path, UPath]
StorageOptions = Mapping[str, Mapping[str, Any]]
LOCAL_PROTOCOLS = ("", "file", "local")


def protocol_of(url: str) -> str:
    """The URL's protocol (``""`` for a plain path)."""
    return url.split("://", 1)[0] if "://" in url else ""


def is_remote(location: str | os.PathLike) -> bool:
    """Whether ``location`` names something other than a local file."""
    if isinstance(location, UPath):
        return location.protocol not in LOCAL_PROTOCOLS
    text = str(location)
    return text.startswith("pipe:") or protocol_of(text) not in LOCAL_PROTOCOLS


def options_for(url: str, storage: StorageOptions | None) -> dict[str, Any]:
    """The fsspec options the config gives for ``url``'s protocol."""
    return dict((storage or {}).get(protocol_of(url), {}))


def as_path(location: str | os.PathLike, storage: StorageOptions | None = None) -> StoragePath:
    """A path object for ``location``: ``Path`` when local, ``UPath`` (with options) when remote."""
    if isinstance(location, UPath):
        return location if is_remote(location) else Path(location.path)
    text = os.fspath(location)
    if text.startswith("file://"):
        return Path(text[len("file://"):])
    if is_remote(text):
        return UPath(text, **options_for(text, storage))
    return Path(text)


def open_input(url: str, storage: StorageOptions | None = None) -> IO[bytes]:
    """A readable binary stream for ``url`` (caller closes it).

    Local paths open directly; ``pipe:CMD`` runs CMD and reads its stdout (WebDataset's
    convention); anything with a protocol goes through fsspec with the config's options.
    """
    if url.startswith("pipe:"):
        from webdataset.gopen import gopen

        return gopen(url)
    if is_remote(url):
        import fsspec

        return fsspec.open(url, "rb", **options_for(url, storage)).open()
    return open(url.removeprefix("file://"), "rb")


def arrow_source(path: StoragePath) -> tuple[str, Any]:
    """(path, filesystem) for pyarrow: the fsspec filesystem for remote paths, None for local."""
    if is_remote(path):
        return path.path, path.fs
    return os.fspath(path), None


def read_torch(path: StoragePath) -> Any:
    """``torch.load(weights_only=True)`` of a local or remote file, on the CPU."""
    import torch

    if is_remote(path):
        return torch.load(io.BytesIO(path.read_bytes()), map_location="cpu", weights_only=True)
    return torch.load(path, map_location="cpu", weights_only=True)


def upload(local: Path, target: UPath) -> None:
    """Copy a local file or directory tree to a remote path (a directory: files first, sorted)."""
    if local.is_dir():
        files = sorted(p for p in local.rglob("*") if p.is_file())
        for file in files:
            dest = target.joinpath(*file.relative_to(local).parts)
            target.fs.put_file(str(file), dest.path)
    else:
        target.fs.put_file(str(local), target.path)


def download_dir(source: UPath, local: Path) -> None:
    """Copy a remote directory tree into ``local`` (created)."""
    local.mkdir(parents=True, exist_ok=True)
    base = source.path.rstrip("/")
    for remote in sorted(source.fs.find(base)):
        dest = local / os.path.relpath(remote, base)
        dest.parent.mkdir(parents=True, exist_ok=True)
        source.fs.get_file(remote, str(dest))


def remove_tree(path: StoragePath) -> None:
    """Remove a local or remote directory tree (nothing when absent)."""
    if not path.exists():
        return
    if is_remote(path):
        path.fs.rm(path.path, recursive=True)
    else:
        import shutil

        shutil.rmtree(path)
