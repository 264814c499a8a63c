"""``python -m jobs.data`` / ``diffin data``: summaries, exit code 2 on bad input, no writes."""

from __future__ import annotations

from pathlib import Path

import pytest

from jobs import data as data_job
from tests.data.test_fashion_mnist import make_source
from tests.data.test_openclipart import make_tree


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = data_job.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_synthetic_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_dir = tmp_path / "syn"
    code, out, err = run(["synthetic", "--out", str(out_dir), "--num-pairs", "30",
                          "--noise", "0.1", "--shard-size", "8"], capsys)
    assert code == 0, err
    assert out.strip() == f"synthetic: 30 pairs in 4 shards -> {out_dir} (3 noisy)"
    assert (out_dir / "sizes.json").is_file()


def test_openmoji_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["openmoji", "--out", str(tmp_path / "om"), "--limit", "12"], capsys)
    assert code == 0 and out.startswith("openmoji: 12 pairs in 1 shards -> ")


def test_openclipart_summary_lists_skips(tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    root = make_tree(tmp_path / "svg")
    code, out, _ = run(["openclipart", "--out", str(tmp_path / "oc"), "--source", str(root),
                        "--workers", "1", "--keywords"], capsys)
    assert code == 0
    assert "4 pairs" in out and "skipped: blank_image=1, duplicate_content=1" in out
    assert len(out.strip().splitlines()) == 1


def test_fashion_mnist_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = make_source(tmp_path / "src", n_train=20, n_test=10)
    code, out, _ = run(["fashion-mnist", "--out", str(tmp_path / "fm"), "--source", str(src),
                        "--noise", "0.5"], capsys)
    assert code == 0
    assert "train 20 pairs (10 noisy captions)" in out and "test 10 pairs (0 noisy" in out
    assert (tmp_path / "fm" / "train" / "sizes.json").is_file()
    assert (tmp_path / "fm" / "test" / "sizes.json").is_file()


BAD_INPUTS = [
    (["synthetic", "--noise", "-0.1"], "--noise"),
    (["synthetic", "--noise", "1.5"], "--noise"),
    (["synthetic", "--num-pairs", "0"], "--num-pairs"),
    (["synthetic", "--shard-size", "0"], "--shard-size"),
    (["synthetic", "--image-size", "2"], "--image-size"),
    (["fashion-mnist", "--noise", "-1", "--source", "{src}"], "--noise"),
    (["fashion-mnist", "--noise", "2", "--source", "{src}"], "--noise"),
    (["fashion-mnist", "--source", "{tmp}/missing"], "not found"),
    (["fashion-mnist", "--limit", "0", "--source", "{src}"], "--limit"),
    (["openclipart", "--source", "{tmp}/missing"], "not found"),
    (["openclipart", "--source", "{svg}", "--limit", "-3"], "--limit"),
    (["openmoji", "--image-size", "0"], "--image-size"),
    (["openmoji", "--limit", "0"], "--limit"),
]


@pytest.mark.parametrize("argv, message", BAD_INPUTS)
def test_bad_input_exit_2_and_nothing_written(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                              argv: list[str], message: str) -> None:
    values = {"tmp": str(tmp_path), "src": str(make_source(tmp_path / "src", 10, 10)),
              "svg": str(make_tree(tmp_path / "svg"))}
    out_dir = tmp_path / "out"
    argv = [a.format(**values) for a in argv] + ["--out", str(out_dir)]
    code, out, err = run(argv, capsys)
    assert code == 2
    assert err.startswith("diffin: error: ") and message in err
    assert len(err.strip().splitlines()) == 1 and out == ""
    assert not out_dir.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries


@pytest.mark.parametrize("corpus", ["synthetic", "openmoji", "fashion-mnist"])
def test_non_empty_out_needs_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                       corpus: str) -> None:
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "keep.txt").write_text("precious")
    extra = {"fashion-mnist": ["--source", str(make_source(tmp_path / "src", 10, 10))],
             "openmoji": ["--limit", "5"], "synthetic": ["--num-pairs", "20"]}[corpus]
    code, _, err = run([corpus, "--out", str(out_dir), *extra], capsys)
    assert code == 2 and "--overwrite" in err
    assert sorted(p.name for p in out_dir.iterdir()) == ["keep.txt"]
    code, _, err = run([corpus, "--out", str(out_dir), "--overwrite", *extra], capsys)
    assert code == 0, err
    assert not (out_dir / "keep.txt").exists()


def test_out_is_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "file"
    target.write_text("x")
    code, _, err = run(["synthetic", "--out", str(target)], capsys)
    assert code == 2 and "not a directory" in err


def test_registered_in_diffin_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from jobs import cli  # a broken import fails the test, never skips it

    code = cli.main(["data", "synthetic", "--out", str(tmp_path / "s"), "--num-pairs", "4"])
    assert code == 0
    assert "synthetic: 4 pairs" in capsys.readouterr().out
