"""Every command README.md shows works as written.

Commands are collected from the README itself: the first column of the Commands table, every
line of its ```bash blocks and every inline `code` span that starts a command (`diffin …`,
`python -m jobs.…`, `make …`, `pip install …`, `kubectl …`). Placeholders (FILE, DIR, N, …)
become tiny real values; ``a|b`` alternatives and ``[optional]`` parts are each tried. Then:

- ``diffin …`` / ``python -m jobs.…``: parsed by the real argument parser (the job itself is
  not run: the stage tests run them), and ``--help`` of each runs;
- the cheap ones really run: building a synthetic corpus and validating it;
- ``make T``: the target exists (``make -n T``); ``pip install pkg[extra]``: the extra exists;
  ``kubectl apply -f F``: the files exist.
"""

from __future__ import annotations

import importlib
import itertools
import re
import shlex
import subprocess
import tomllib
from pathlib import Path

import pytest

import jobs._common
import jobs.cli
from tests.readme import README

ROOT = README.parent
# inline spans that are commands (not a bare name such as `diffin run`): they carry an argument
_COMMAND_START = re.compile(r"^(diffin|python -m jobs\.|make|pip install|kubectl)\b")


def _table_commands(text: str) -> list[str]:
    section = text[text.index("\n## Commands\n"):]
    section = section[:section.index("\n## ", 5)]
    return [m.group(1).replace("\\|", "|") for m in re.finditer(r"^\| `([^`]+)`", section, re.M)]


def _block_commands(text: str) -> list[str]:
    commands = []
    for block in re.findall(r"^```bash\n(.*?)^```$", text, re.S | re.M):
        joined = re.sub(r"\\\n\s*", " ", block)
        commands += [line.split("  #")[0].strip() for line in joined.splitlines() if line.strip()]
    return commands


def _inline_commands(text: str) -> list[str]:
    spans = [s.replace("\\|", "|") for s in re.findall(r"(?<!`)`([^`\n]+)`(?!`)", text)]
    return [s for s in spans if _COMMAND_START.match(s) and (" --" in s or s.startswith(("make ", "pip ", "kubectl ")))]


def readme_commands() -> list[str]:
    """Every command the README shows, in order, without duplicates."""
    text = README.read_text()
    found = _table_commands(text) + _block_commands(text) + _inline_commands(text)
    return list(dict.fromkeys(found))


def _variants(command: str) -> list[str]:
    """``[optional]`` parts left out and put in; ``a|b`` alternatives of a word each."""
    optional = re.findall(r"\[([^\[\]]*--[^\[\]]*)\]", command)
    out = []
    for keep in itertools.product((False, True), repeat=len(optional)):
        text = command
        for part, kept in zip(optional, keep):
            text = text.replace(f"[{part}]", part if kept else "", 1)
        words = [w.split("|") if "|" in w and not w.startswith("'") else [w] for w in text.split()]
        out += [" ".join(choice) for choice in itertools.product(*words)]
    return out


@pytest.fixture(scope="module")
def placeholders(tmp_path_factory, tiny_corpus: Path) -> dict[str, str]:
    from tests.conftest import write_config

    root = tmp_path_factory.mktemp("readme")
    config = write_config(root / "run.yaml", tiny_corpus)
    uids = root / "uids.txt"
    uids.write_text("")
    return {"FILE": str(config), "DIR": str(root / "out"), "RUN_DIR": str(root / "run"),
            "SHARDS...": str(tiny_corpus / "00000.tar"), "F": str(tiny_corpus / "sizes.json"),
            "N": "20", "STEP": "300", "P": "0.1", "CKPT": str(root / "w.pt"), "NAME": "tiny-clip-32", "T": "10",
            "ETA": "0.001", "B": "8"}


def _argv(command: str, values: dict[str, str]) -> list[str]:
    return [values.get(word, word) for word in shlex.split(command)]


def _parse_only(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> int:
    """Parse ``argv`` with the real parser of ``diffin`` or ``python -m jobs.X``; run nothing."""
    parsed: list[object] = []
    fake = lambda run, args: parsed.append(args) or 0  # noqa: E731
    monkeypatch.setattr(jobs._common, "run_cli", fake)
    monkeypatch.setattr(jobs.cli, "run_cli", fake)
    if argv[0] == "diffin":
        code = jobs.cli.main(argv[1:])
    else:
        code = importlib.import_module(argv[2]).main(argv[3:])
    assert parsed, f"nothing parsed for {argv}"
    return code


def _parsable(command: str) -> bool:
    return command.startswith("diffin ") or (command.startswith("python -m jobs.")
                                              and not command.startswith("python -m jobs.openclip_train"))


def test_commands_are_found() -> None:
    commands = readme_commands()
    assert sum(c.startswith("diffin ") for c in commands) >= 15
    assert any(c.startswith("make ") for c in commands)
    assert any(c.startswith("ray job submit") for c in commands)


def test_every_diffin_and_job_command_parses_as_written(placeholders, monkeypatch) -> None:
    checked = 0
    for command in readme_commands():
        inner = command.split(" -- ", 1)[1] if command.startswith("ray job submit") else command
        if not _parsable(inner):
            continue
        for variant in _variants(inner):
            try:
                assert _parse_only(_argv(variant, placeholders), monkeypatch) == 0, variant
            except SystemExit as exc:
                pytest.fail(f"README command does not parse: {variant!r} (exit {exc.code})")
            checked += 1
    assert checked >= 20


def test_help_of_every_diffin_command(capsys) -> None:
    seen = set()
    for command in readme_commands():
        if not command.startswith("diffin "):
            continue
        words = [w for w in command.split()[1:3] if re.fullmatch(r"[a-z][a-z|-]*", w)]
        for path in itertools.product(*(w.split("|") for w in words)):
            if path in seen:
                continue
            seen.add(path)
            with pytest.raises(SystemExit) as done:
                jobs.cli.main([*path, "--help"])
            assert done.value.code == 0, path
            assert "usage: diffin" in capsys.readouterr().out
    assert len(seen) >= 10


def test_synthetic_corpus_and_validate_run_as_written(placeholders, tmp_path: Path) -> None:
    """The cheap commands really run: build a synthetic corpus, then validate it."""
    synthetic = next(c for c in readme_commands() if c.startswith("diffin data synthetic"))
    values = {**placeholders, "DIR": str(tmp_path / "synthetic")}
    assert jobs.cli.main(_argv(synthetic, values)[1:]) == 0
    sizes = tmp_path / "synthetic" / "sizes.json"
    assert sizes.is_file()
    validate = next(c for c in readme_commands() if c.startswith("diffin validate"))
    shards = sorted(str(p) for p in (tmp_path / "synthetic").glob("*.tar"))
    argv = [w for w in _argv(validate.replace("[", "").replace("]", ""), {**values, "F": str(sizes)})]
    argv = argv[:2] + shards + argv[3:]  # SHARDS... → every shard built
    assert jobs.cli.main(argv[1:]) == 0


def test_make_targets_exist() -> None:
    targets = {c.split()[1] for c in readme_commands() if c.startswith("make ")}
    assert {"demo", "test"} <= targets
    for target in sorted(targets):
        done = subprocess.run(["make", "-n", target], cwd=ROOT, capture_output=True, text=True)
        assert done.returncode == 0, f"make {target}: {done.stderr}"


def test_pip_extras_and_kubectl_files_exist() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = set(project.get("optional-dependencies", {}))
    commands = readme_commands()
    for command in (c for c in commands if c.startswith("pip install")):
        for name, extra in re.findall(r"([\w-]+)\[([\w,-]+)\]", command):
            assert name == project["name"], command
            assert set(extra.split(",")) <= extras, command
    for command in (c for c in commands if c.startswith("kubectl")):
        files = re.findall(r"-f (\S+)", command)
        assert files and all((ROOT / f).is_file() for f in files), command


def test_readme_names_only_files_in_the_repository() -> None:
    """No link or path to a document outside the repository (e.g. a design file)."""
    text = README.read_text()
    for target in re.findall(r"\]\(([^)#]+)\)", text):
        if "://" not in target:
            assert (ROOT / target).exists(), target
    for doc in re.findall(r"\b((?:docs/)?[A-Z][A-Z_]+\.md)\b", text):
        assert (ROOT / doc).exists() or (ROOT / "docs" / doc).exists(), doc
