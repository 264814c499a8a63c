"""Checks shared by the corpus-builder tests: read a built corpus back and validate it."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from pipeline.data.scan import ShardReader
from pipeline.data.shards import IMAGE_EXTS, SIZES_FILE, load_sizes
from pipeline.data.uids import is_uid


def read_corpus(out_dir: Path) -> list[dict[str, Any]]:
    """Read every shard with webdataset, check it against sizes.json and the sample format.

    Returns the samples (``key``, ``ext``, ``image``, ``caption``, ``meta``, ``shard``).
    """
    sizes = load_sizes(out_dir / SIZES_FILE)
    assert sorted(sizes) == sorted(p.name for p in out_dir.glob("*.tar"))
    samples: list[dict[str, Any]] = []
    for name in sorted(sizes):
        reader = ShardReader(str(out_dir / name), sizes[name])
        raw = [{"__key__": r.key, **r.members} for r in reader if r.problem is None]
        assert reader.report.status == "ok", reader.report.as_dict()
        assert len(raw) == sizes[name]
        for sample in raw:
            key = sample["__key__"]
            assert "." not in key and "/" not in key
            exts = [ext for ext in IMAGE_EXTS if ext in sample]
            assert len(exts) == 1, f"{key}: image members {exts}"
            assert "txt" in sample and "json" in sample, key
            samples.append({"key": key, "ext": exts[0], "image": sample[exts[0]],
                            "caption": sample["txt"].decode("utf-8"),
                            "meta": json.loads(sample["json"]), "shard": name})
    uids = [s["meta"]["uid"] for s in samples]
    assert all(is_uid(u) for u in uids)
    assert len(set(uids)) == len(uids), "uids are not unique"
    keys = [s["key"] for s in samples]
    assert len(set(keys)) == len(keys), "keys are not unique"
    corpus = json.loads((out_dir / "corpus.json").read_text())
    assert corpus["num_pairs"] == len(samples) == sum(sizes.values())
    assert corpus["num_shards"] == len(sizes)
    return samples


def tar_digests(out_dir: Path) -> dict[str, str]:
    """SHA-256 of every file in a corpus directory (tars, sizes.json, corpus.json, …)."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out_dir.iterdir()) if p.is_file()}
