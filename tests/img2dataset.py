"""Shards in img2dataset's exact output layout, built by hand (img2dataset itself downloads).

Per shard ``NNNNN``: ``NNNNN.tar`` with, per successful download, ``KEY.jpg``, ``KEY.json``
and ``KEY.txt`` (webdataset's TarWriter: fields sorted, user/group ``bigdata``, mode 0444),
where ``KEY`` = shard × 10⁴ + index over *all* attempted urls, zero padded to 9 digits — so a
failed download leaves a gap; beside it ``NNNNN.parquet`` (one row per attempted url, failed
ones too) and ``NNNNN_stats.json``. The json holds ``key``, ``url``, ``caption``, ``status``,
``error_message``, ``width``, ``height``, ``original_width``, ``original_height`` — no ``uid``.
No ``sizes.json`` (img2dataset writes none).
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from tests.conftest import COLOURS

KEY_DIGITS, INDEX_DIGITS = 9, 4  # img2dataset: oom_shard_count 5 + oom_sample_per_shard 4


def _jpeg(i: int, size: int = 40) -> bytes:
    names = list(COLOURS)
    arr = np.full((size, size, 3), 255, np.uint8)
    lo = (i * 5) % (size // 2)
    arr[lo:lo + size // 2, lo:lo + size // 2] = COLOURS[names[i % len(names)]]
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 1_700_000_000, 0o444
    info.uname = info.gname = "bigdata"
    tar.addfile(info, io.BytesIO(data))


def write_shard(root: Path, shard: int, attempts: int, failed: set[int]) -> list[dict]:
    """Write shard ``shard`` of ``attempts`` urls of which the indices ``failed`` failed to
    download; return the parquet rows (every attempt, in order)."""
    rows = []
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:  # the default (PAX) format, like TarWriter
        for index in range(attempts):
            key = f"{shard * 10 ** INDEX_DIGITS + index:0{KEY_DIGITS}d}"
            n = shard * 100 + index
            colour = list(COLOURS)[n % len(COLOURS)]
            url, caption = f"https://img.example.com/{shard}/{index}.jpg", f"a {colour} square, photo {n}"
            ok = index not in failed
            meta = {"key": key, "url": url, "caption": caption, "status": "success" if ok else "failed_to_download",
                    "error_message": None if ok else "HTTP Error 404: Not Found",
                    "width": 40 if ok else None, "height": 40 if ok else None,
                    "original_width": 40 if ok else None, "original_height": 40 if ok else None}
            rows.append(meta)
            if ok:
                for field, data in sorted({"jpg": _jpeg(n), "json": json.dumps(meta).encode(),
                                           "txt": caption.encode()}.items()):
                    _add(tar, f"{key}.{field}", data)
    (root / f"{shard:05d}.tar").write_bytes(buf.getvalue())
    pq.write_table(pa.Table.from_pylist(rows), root / f"{shard:05d}.parquet")
    successes = attempts - len(failed)
    (root / f"{shard:05d}_stats.json").write_text(json.dumps({
        "count": attempts, "successes": successes, "failed_to_download": len(failed), "failed_to_resize": 0,
        "duration": 1.0, "start_time": 1_700_000_000.0, "end_time": 1_700_000_001.0,
        "status_dict": {"success": successes, **({"HTTP Error 404: Not Found": len(failed)} if failed else {})}}))
    return rows


def truncate_after(path: Path, samples: int, extra: int = 700) -> None:
    """Cut the tar ``extra`` bytes into the member after its first ``samples`` samples (3 members each)."""
    offsets = []
    try:
        with tarfile.open(path, "r|") as tar:  # a stream: the tar may be cut already
            for info in tar:
                offsets.append(info.offset)
    except tarfile.ReadError:
        pass
    path.write_bytes(path.read_bytes()[:offsets[samples * 3] + extra])


def build_img2dataset_corpus(root: Path, shards: int = 3, attempts: int = 10) -> dict[str, dict]:
    """``shards`` shards of ``attempts`` urls, two failed downloads each (gaps in the keys);
    return the successful rows by key (img2dataset's parquet rows)."""
    root.mkdir(parents=True, exist_ok=True)
    ok: dict[str, dict] = {}
    for shard in range(shards):
        rows = write_shard(root, shard, attempts, failed={(shard + 1) % attempts, (shard + 5) % attempts})
        ok.update({r["key"]: r for r in rows if r["status"] == "success"})
    return ok
