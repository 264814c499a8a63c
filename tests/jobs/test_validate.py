"""``diffin validate``: per-shard report and exit codes on clean and damaged shards."""

from __future__ import annotations

import json
from pathlib import Path

from jobs.cli import main
from tests.dirtydata import build_dirty_corpus


def test_clean_shards_exit_0(tiny_corpus: Path, capsys) -> None:
    assert main(["validate", str(tiny_corpus / "*.tar")]) == 0
    out = capsys.readouterr().out
    assert f"counts from {tiny_corpus / 'sizes.json'}" in out
    assert out.count("ok   ") == 3 and "FAIL" not in out
    assert "total: 3 shards, 0 with problems; 48 samples read, 48 ok" in out


def test_damaged_shards_are_reported_per_shard(tmp_path: Path, capsys) -> None:
    urls, expected_rows, expected_shards = build_dirty_corpus(tmp_path / "dirty")
    report = tmp_path / "report.json"
    code = main(["validate", *urls, "--sizes", str(tmp_path / "dirty" / "sizes.json"), "--json", str(report)])
    assert code == 1
    lines = {line.split()[1].rsplit("/", 1)[-1]: line for line in capsys.readouterr().out.splitlines()
             if line.startswith(("ok", "FAIL"))}
    result = {c["shard"].rsplit("/", 1)[-1]: c for c in json.loads(report.read_text())["shards"]}
    for name, rows in expected_rows.items():
        # a NaN score is found by scoring, not by validating: nan.tar's pairs are fine here
        wanted: dict[str, int] = {}
        for key, status in rows.items():
            if status not in ("ok", "non_finite"):
                wanted[status] = wanted.get(status, 0) + (2 if status in ("duplicate_key", "non_contiguous") else 1)
        assert result[name]["problems"] == wanted, name
        assert result[name]["status"] == expected_shards[name], name
        clean = not wanted and expected_shards[name] == "ok"
        assert lines[name].startswith("ok" if clean else "FAIL"), lines[name]
    assert "shard truncated: ReadError" in lines["truncated.tar"]
    assert "decode_error 1" in lines["corrupt_jpeg.tar"]


def test_no_decode_skips_image_bytes(tmp_path: Path, capsys) -> None:
    urls, _, _ = build_dirty_corpus(tmp_path / "dirty")
    corrupt = [u for u in urls if u.endswith("corrupt_jpeg.tar")]
    assert main(["validate", *corrupt, "--no-decode"]) == 0
    assert main(["validate", *corrupt]) == 1


def test_no_shards_is_a_usage_error(tmp_path: Path, capsys) -> None:
    assert main(["validate", str(tmp_path / "*.tar")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "expands to no shards" in err[0]
