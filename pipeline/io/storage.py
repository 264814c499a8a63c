"""Opening inputs by URL: local paths, ``file://``, any fsspec protocol, and ``pipe:`` commands."""

from __future__ import annotations

from typing import IO, Any


def is_remote(url: str) -> bool:
    """Whether ``url`` names something other than a plain local path."""
    return "://" in url or url.startswith("pipe:")


def open_input(url: str, storage_options: dict[str, Any] | None = None) -> IO[bytes]:
    """A readable binary stream for ``url`` (caller closes it).

    Local paths open directly; ``pipe:CMD`` runs CMD and reads its stdout (WebDataset's
    convention); anything with a protocol goes through fsspec with ``storage_options``.
    """
    if url.startswith("pipe:"):
        from webdataset.gopen import gopen

        return gopen(url)
    if "://" in url:
        import fsspec

        return fsspec.open(url, "rb", **(storage_options or {})).open()
    return open(url, "rb")
