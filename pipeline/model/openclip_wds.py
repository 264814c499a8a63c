"""open_clip_train's WebDataset reader, fixed for ``webdataset >= 0.2.96`` (the pinned 1.0.2).

Since 0.2.96 webdataset's ``tar_file_expander`` yields an end-of-shard marker (``{}``) after
each shard. open_clip_train 3.3.0 groups members into samples with its own
``group_by_keys_nothrow``, which reads ``marker["fname"]`` and stops training with
``KeyError: 'fname'`` at the end of the first shard (open_clip issue #935, webdataset issue
#384). :func:`fix_open_clip_wds_reader` applies the fix proposed there: expand tars with
``eof_value=None`` (no marker; samples are still split where the key changes).
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Iterable, Iterator

Handler = Callable[[Exception], bool]


def _reader_needs_fix() -> bool:
    """Whether webdataset's tar expander yields end-of-shard markers by default."""
    from webdataset.tariterators import tar_file_expander

    default = inspect.signature(tar_file_expander).parameters.get("eof_value")
    return default is not None and default.default is not None


def _tarfile_to_samples_nothrow(src: Iterable[dict[str, Any]],
                                handler: Handler | None = None) -> Iterator[dict[str, Any]]:
    """open_clip_train's ``tarfile_to_samples_nothrow`` without end-of-shard markers."""
    from open_clip_train import data

    handler = handler or data.log_and_continue
    streams = data.url_opener(src, handler=handler)
    files = data.tar_file_expander(streams, handler=handler, eof_value=None)
    return data.group_by_keys_nothrow(files, handler=handler)


def fix_open_clip_wds_reader() -> bool:
    """Make ``open_clip_train.data.get_wds_dataset`` read shards without the end-of-shard
    marker when the installed webdataset yields one; return whether anything was changed."""
    from open_clip_train import data

    if not _reader_needs_fix() or data.tarfile_to_samples_nothrow is _tarfile_to_samples_nothrow:
        return False
    data.tarfile_to_samples_nothrow = _tarfile_to_samples_nothrow
    return True
