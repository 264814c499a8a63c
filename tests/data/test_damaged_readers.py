"""Every reader of tars against the same damaged shards (issue #23's audit): a truncated tar,
garbage member bytes, an empty tar and a missing file are each a recorded status, a warning or
one line, never a traceback. Reshard: tests/stages/test_reshard.py; the score stage:
tests/stages/test_dirty_data.py; whole runs: tests/jobs/test_damaged_input.py."""

from __future__ import annotations

import io
import json
import logging
import os
import tarfile
from pathlib import Path

import pytest

from pipeline.data.pairs import load_pairs, raw_sample_uid, sample_pairs
from pipeline.data.shards import SIZES_FILE, add_member
from pipeline.data.uids import UID_SETTING, url_uid
from pipeline.errors import UsageError
from tests.conftest import make_tiny_corpus
from tests.img2dataset import build_img2dataset_corpus, truncate_after


def _rewrite(path: Path, garbage: dict[str, bytes]) -> None:
    """Rewrite the tar at ``path`` with the members named in ``garbage`` replaced (tar structure intact)."""
    with tarfile.open(path) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            add_member(tar, name, garbage.get(name, data))
    path.write_bytes(buf.getvalue())


@pytest.fixture(scope="module")
def damaged(tmp_path_factory) -> tuple[list[str], dict[str, int]]:
    """truncated.tar (2 of 4 pairs before the cut), empty.tar, garbage.tar (pair00008's image
    and pair00009's json are noise), clean.tar, gone.tar (absent); sizes.json lists all five."""
    root = make_tiny_corpus(tmp_path_factory.mktemp("damaged"), n=16, shard_size=4)
    names = ["truncated.tar", "empty.tar", "garbage.tar", "clean.tar"]
    for i, name in enumerate(names):
        (root / f"{i:05d}.tar").rename(root / name)
    truncate_after(root / "truncated.tar", 2)
    (root / "empty.tar").write_bytes(b"")
    _rewrite(root / "garbage.tar", {"pair00008.jpg": os.urandom(600), "pair00009.json": os.urandom(60)})
    sizes = {name: 4 for name in [*names, "gone.tar"]}
    (root / SIZES_FILE).write_text(json.dumps(sizes))
    return [str(root / name) for name in [*names, "gone.tar"]], sizes


def test_training_target_and_proxy_pool_loads(damaged) -> None:
    urls, sizes = damaged
    table = load_pairs(urls, 32, sizes=sizes)
    assert len(table) == 2 + 2 + 4
    assert table.skipped == {"shard_truncated": 2, "shard_empty": 4, "not_image": 1, "bad_json": 1,
                             "shard_unreadable": 4}
    pool = sample_pairs(urls, 32, 100, seed=0, salt="proxy-pool", sizes=sizes)  # target / proxy pool
    assert sorted(pool.keys) == sorted(table.keys)


def test_a_repeated_uid_is_trained_once(damaged) -> None:
    clean = [u for u in damaged[0] if u.endswith("clean.tar")]
    copy = Path(clean[0]).with_name("copy.tar")
    copy.write_bytes(Path(clean[0]).read_bytes())
    table = load_pairs([clean[0], str(copy)], 32)  # was: ValueError "duplicate uid" (a traceback)
    assert len(table) == 4 and table.skipped == {"duplicate_uid": 4}


def test_validate_reports_every_shard(damaged, capsys) -> None:
    from jobs import validate

    urls, _ = damaged
    assert validate.main([*urls, "--sizes", str(Path(urls[0]).with_name(SIZES_FILE))]) == 1
    captured = capsys.readouterr()
    lines = {line.split()[1].rsplit("/", 1)[-1]: line for line in captured.out.splitlines() if line[:4] in ("ok  ", "FAIL")}
    assert "shard truncated: ReadError" in lines["truncated.tar"]
    assert "shard empty" in lines["empty.tar"]
    assert "not_image 1" in lines["garbage.tar"] and "bad_json 1" in lines["garbage.tar"]
    assert "shard unreadable: FileNotFoundError" in lines["gone.tar"]
    assert lines["clean.tar"].startswith("ok") and "Traceback" not in captured.err


def test_report_examples_read_what_is_there(damaged, caplog) -> None:
    from pipeline.report.examples import Example, attach_media

    urls, _ = damaged
    wanted = [("truncated.tar", "pair00001"), ("truncated.tar", "pair00003"), ("empty.tar", "pair00004"),
              ("garbage.tar", "pair00008"), ("garbage.tar", "pair00010"), ("gone.tar", "pair00016")]
    by_name = {u.rsplit("/", 1)[-1]: u for u in urls}
    examples = [Example("0" * 32, key, by_name[name], 0, 0.0) for name, key in wanted]
    with caplog.at_level(logging.WARNING):
        media = {(e.shard.rsplit("/", 1)[-1], e.key): (e.caption, e.thumbnail is not None)
                 for e in attach_media(examples, size=16)}
    assert media == {("truncated.tar", "pair00001"): ("a green square", True),
                     ("truncated.tar", "pair00003"): (None, False),  # after the cut
                     ("empty.tar", "pair00004"): (None, False),
                     ("garbage.tar", "pair00008"): ("a red square", False),  # image is noise
                     ("garbage.tar", "pair00010"): ("a blue square", True),
                     ("gone.tar", "pair00016"): (None, False)}
    assert "gone.tar cannot be read" in caplog.text


def test_open_clip_train_loader_reads_up_to_the_damage(damaged, caplog) -> None:
    pytest.importorskip("open_clip_train")
    from pipeline.model.openclip_wds import _tarfile_to_samples_nothrow

    urls, _ = damaged
    with caplog.at_level(logging.WARNING):
        keys = [s["__key__"] for s in _tarfile_to_samples_nothrow(iter([{"url": u} for u in urls]))]
    assert keys == ["pair00000", "pair00001", *[f"pair{i:05d}" for i in range(8, 16)]]  # decoding comes later
    assert "unexpected end of data" in caplog.text and "No such file" in caplog.text


def test_load_time_filters_read_up_to_the_damage(damaged, tmp_path: Path) -> None:
    """The README's loader (``handler=wds.warn_and_continue``) with either filter: kept pairs
    before a cut come through; a shard that cannot be read is a warning."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import webdataset as wds

    from pipeline.stages.manifest_filter import KeptKeys
    from pipeline.stages.select import MANIFEST_SCHEMA

    urls, _ = damaged
    by_name = {u.rsplit("/", 1)[-1]: u for u in urls}
    rows = {by_name["truncated.tar"]: ["pair00001"], by_name["clean.tar"]: ["pair00012", "pair00015"],
            by_name["empty.tar"]: [], by_name["gone.tar"]: []}
    manifest = tmp_path / "manifest.parquet"
    pq.write_table(pa.table({"shard": list(rows), "n_in": [4] * 4, "n_scored_ok": [4] * 4,
                             "n_kept": [len(k) for k in rows.values()], "keys": list(rows.values())},
                            schema=MANIFEST_SCHEMA), manifest)
    keep = KeptKeys(manifest, unknown="drop")
    with pytest.warns(UserWarning):
        dataset = wds.WebDataset(urls, shardshuffle=False, handler=wds.warn_and_continue).select(keep)
        assert [s["__key__"] for s in dataset] == ["pair00001", "pair00012", "pair00015"]


def test_kept_uids_filter_the_original_img2dataset_shards(tmp_path: Path) -> None:
    """kept_uids.npy of a selection over img2dataset shards filters the original shards (and a
    resharded copy) to exactly the kept pairs, by the uid rule alone."""
    import numpy as np
    import webdataset as wds

    from pipeline.config import ReshardConfig
    from pipeline.data.scan import ShardReader
    from pipeline.runtime.executor import LocalExecutor
    from pipeline.stages.manifest_filter import KeptUids
    from pipeline.stages.reshard import reshard
    from pipeline.stages.select import KEPT_FILE, KEPT_UIDS_FILE, MANIFEST_FILE, SelectConfig, select
    from tests.stages.scorefiles import write_score_file

    corpus = tmp_path / "img2dataset"
    rows = build_img2dataset_corpus(corpus, shards=2)
    files = []
    for s in range(2):
        url = str(corpus / f"{s:05d}.tar")
        raws = list(ShardReader(url))
        uids = [raw_sample_uid(raw.members) for raw in raws]
        assert uids == [url_uid(rows[r.key]["url"], rows[r.key]["caption"]) for r in raws]
        files.append(write_score_file(tmp_path / "scores" / f"{s:05d}.parquet", url,
                                      [float((7 * i + s) % 8) for i in range(len(raws))],
                                      uids=uids, keys=[r.key for r in raws]))
    select(files, SelectConfig(rule="top_fraction", fraction=0.5), tmp_path / "selection")
    kept = set(pq_column(tmp_path / "selection" / KEPT_FILE, "key"))
    assert len(kept) == 8
    run = tmp_path / "run"  # what KeptUids.from_run reads: the run's config and selection
    (run / "selection").mkdir(parents=True)
    (run / "selection" / KEPT_UIDS_FILE).write_bytes((tmp_path / "selection" / KEPT_UIDS_FILE).read_bytes())
    (run / "config.json").write_text(json.dumps({"data": {"shards": "x", "uid_from": ["json", "url"]}}))
    keep = KeptUids.from_run(run)
    original = [str(corpus / f"{s:05d}.tar") for s in range(2)]
    assert {s["__key__"] for s in wds.WebDataset(original, shardshuffle=False).select(keep)} == kept
    reshard(tmp_path / "selection" / MANIFEST_FILE, tmp_path / "out", ReshardConfig(shard_size=3), LocalExecutor())
    copies = sorted(str(p) for p in (tmp_path / "out").glob("*.tar"))
    assert {s["__key__"] for s in wds.WebDataset(copies, shardshuffle=False).select(keep)} == kept
    assert np.load(run / "selection" / KEPT_UIDS_FILE).shape == (8,)
    with pytest.raises(UsageError, match="cannot read data.uid_from"):
        KeptUids.from_run(tmp_path / "no-run")


def pq_column(path: Path, column: str) -> list:
    import pyarrow.parquet as pq

    return pq.read_table(path, columns=[column]).column(column).to_pylist()


def test_no_uid_by_the_rule_names_the_setting(tmp_path: Path) -> None:
    """img2dataset shards under a json-only rule: no pair has a uid; one line names data.uid_from."""
    from pipeline.model.train import check_uids_found

    corpus = tmp_path / "img2dataset"
    build_img2dataset_corpus(corpus, shards=1)
    table = load_pairs([str(corpus / "00000.tar")], 32, uid_from=("json",))
    assert len(table) == 0 and table.skipped == {"missing_uid": 8}
    with pytest.raises(UsageError, match=rf"no training pairs: 8 of 8 .*add a source to {UID_SETTING}") as info:
        check_uids_found(table, ("json",), "training")
    assert "\n" not in str(info.value)
    assert len(load_pairs([str(corpus / "00000.tar")], 32)) == 8  # the default rule: url

