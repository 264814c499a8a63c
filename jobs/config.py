"""``diffin config show``: the full effective configuration of a config file or of a run directory.

Every key of every section is printed, the code's defaults (the pydantic field defaults of
``pipeline/config.py``) filled in, as YAML with a trailing comment on each value that is *not*
the code default::

    select:                        # default: null
      rule: top_fraction           # default: drop_fill
      fraction: 0.5                # default: 0.3
      seed: 0

A value without a comment is the code default; ``# default: X``: the config sets it, the
code's default is X; ``# required``: a key without a default. ``--diff`` keeps only the keys
not at the code default (and one at its default where another key would change it if left
out): the shortest config that reads back as the same configuration.
``--format json`` prints the same keys as JSON (what ``config.json`` of a run holds).

Also runnable as ``python -m jobs.config show --config FILE`` (or ``--run-dir DIR``).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, replace
from typing import Any, Sequence

from jobs._common import run_subcommand, standalone  # first: applies environment defaults

import yaml
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo
from pydantic_core import to_jsonable_python

from pipeline.config import RunConfig, check_consistency, parse_config
from pipeline.errors import UsageError
from pipeline.io.layout import CONFIG_FILE, RunLayout

DESCRIPTION = "Show run configurations: every key, the code's defaults filled in."
SHOW_DESCRIPTION = (
    "Print the full effective configuration of a config file (--config) or of a run directory's "
    f"{CONFIG_FILE} (--run-dir): every key of every section, the code's defaults filled in. YAML: a value "
    "without a comment is the code default; '# default: X' marks a value the config sets (the code's "
    "default is X); '# required' a key without a default. The input is validated as a run would "
    "validate it, except that input paths are not opened (--check-paths: also that).")
_DIFF_ROUNDS = 4  # --diff: rounds of adding back keys whose default depends on another key


@dataclass(frozen=True)
class Entry:
    """One key of a configuration: a leaf value, or a section with ``children``.

    ``value`` and ``default`` are JSON-able; ``required``: the key has no default. A section's
    ``value`` is None and its ``default`` the section's own (None for an optional section, a
    mapping for one that is always present)."""

    key: str
    value: Any
    default: Any
    required: bool = False
    children: tuple["Entry", ...] | None = None

    @property
    def is_section(self) -> bool:
        return self.children is not None

    @property
    def at_default(self) -> bool:
        """True when the key holds the code's default (a section: all of its keys do)."""
        if self.required:
            return False
        if self.is_section:
            return isinstance(self.default, dict) and all(child.at_default for child in self.children or ())
        return self.value == self.default


def _field_default(field: FieldInfo) -> Any:
    """The field's default, JSON-able (None for a required field: see ``Entry.required``)."""
    if field.is_required():
        return None
    return to_jsonable_python(field.get_default(call_default_factory=True))


def config_entries(model: BaseModel) -> tuple[Entry, ...]:
    """The keys of ``model`` (a :class:`RunConfig` or one of its sections), in field order."""
    entries = []
    for name, field in type(model).model_fields.items():
        value, default, required = getattr(model, name), _field_default(field), field.is_required()
        if isinstance(value, BaseModel):
            entries.append(Entry(name, None, default, required, config_entries(value)))
        else:
            entries.append(Entry(name, to_jsonable_python(value), default, required))
    return tuple(entries)


def as_mapping(entries: Sequence[Entry]) -> dict[str, Any]:
    """The configuration mapping of ``entries`` (sections nested)."""
    return {e.key: as_mapping(e.children) if e.children is not None else e.value for e in entries}


def leaves(entries: Sequence[Entry], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Entry]:
    """Every leaf key by its path (``("select", "fraction")``)."""
    found: dict[tuple[str, ...], Entry] = {}
    for entry in entries:
        path = (*prefix, entry.key)
        if entry.children is not None:
            found.update(leaves(entry.children, path))
        else:
            found[path] = entry
    return found


def _differing(entries: Sequence[Entry], keep: frozenset[tuple[str, ...]],
               prefix: tuple[str, ...] = ()) -> tuple[Entry, ...]:
    """Only the keys not at their default (and those in ``keep``), sections kept when needed."""
    out = []
    for entry in entries:
        path = (*prefix, entry.key)
        if entry.children is not None:
            children = _differing(entry.children, keep, path)
            if children or not entry.at_default:
                out.append(replace(entry, children=children))
        elif not entry.at_default or path in keep:
            out.append(entry)
    return tuple(out)


def differing(config: RunConfig) -> tuple[Entry, ...]:
    """The keys of ``config`` that differ from the code's defaults: validated again, they give
    ``config``. A key whose default depends on another key (``select.drop_share_from`` follows
    an estimate ``select.column``) is kept where leaving it out would change what it reads."""
    full = config_entries(config)
    values = {path: entry.value for path, entry in leaves(full).items()}
    keep: frozenset[tuple[str, ...]] = frozenset()
    for _ in range(_DIFF_ROUNDS):
        shown = _differing(full, keep)
        try:
            again = RunConfig.model_validate(as_mapping(shown))
        except ValidationError:
            return full
        if again == config:
            return shown
        keep |= {path for path, entry in leaves(config_entries(again)).items() if values.get(path) != entry.value}
    return full


def _flow(value: Any) -> str:
    """``value`` as one line of YAML (flow style; JSON, itself YAML, if YAML needs more lines)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10**9, sort_keys=False, allow_unicode=True)
    text = text.strip().removesuffix("\n...").strip()
    return text if "\n" not in text else json.dumps(value, ensure_ascii=False)


def _comment(entry: Entry) -> str:
    """The entry's marker: empty at the code default."""
    if entry.required:
        return "required"
    if entry.at_default or entry.is_section and isinstance(entry.default, dict):
        return ""
    return f"default: {_flow(entry.default)}"


def _yaml_lines(entries: Sequence[Entry], depth: int = 0) -> list[tuple[str, str]]:
    """(text, comment) per line."""
    lines = []
    for entry in entries:
        head = f"{'  ' * depth}{entry.key}:"
        if entry.children is None:
            lines.append((f"{head} {_flow(entry.value)}", _comment(entry)))
        elif not entry.children:
            lines.append((f"{head} {{}}", _comment(entry)))
        else:
            lines.append((head, _comment(entry)))
            lines += _yaml_lines(entry.children, depth + 1)
    return lines


def render_yaml(entries: Sequence[Entry], header: Sequence[str] = ()) -> str:
    """``entries`` as YAML, each value not at the code default followed by its marker comment."""
    lines = _yaml_lines(entries)
    width = min(max((len(text) for text, comment in lines if comment), default=0), 48)
    body = [f"{text.ljust(width)}  # {comment}" if comment else text for text, comment in lines]
    return "\n".join([*(f"# {h}" for h in header), *body]) + "\n"


def render_json(entries: Sequence[Entry]) -> str:
    """``entries`` as indented JSON (no markers)."""
    return json.dumps(as_mapping(entries), indent=2, ensure_ascii=False) + "\n"


def validate(data: Any, source: str, paths: bool = False) -> RunConfig:
    """``data`` as a run configuration, checked as :func:`pipeline.config.parse_config` checks
    it, local input paths only when ``paths`` (one-line UsageError on any problem)."""
    if paths or not isinstance(data, dict):
        return parse_config(data, source)
    try:
        config = RunConfig.model_validate(data)
    except ValidationError:
        parse_config(data, source)  # fails the same way, with its one-line message naming the key
        raise
    check_consistency(config, source)
    return config


def read_config_file(path: str) -> tuple[Any, str]:
    """The parsed YAML of config file ``path``, and the name errors give it."""
    try:
        with open(path, encoding="utf-8") as handle:
            return yaml.safe_load(handle), path
    except FileNotFoundError:
        raise UsageError(f"config file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read config file {path}: {exc}".splitlines()[0]) from None
    except yaml.YAMLError as exc:
        raise UsageError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None


def read_run_config(run_dir: str) -> tuple[Any, str]:
    """The parsed ``config.json`` of run directory ``run_dir`` (local or an fsspec URL)."""
    layout = RunLayout.of(run_dir)
    source = str(layout.config)
    try:
        text = layout.config.read_text()
    except FileNotFoundError:
        if not layout.root.exists():
            raise UsageError(f"run directory not found: {run_dir}") from None
        raise UsageError(f"{run_dir} is not a run directory: no {CONFIG_FILE} (diffin run writes it)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read {source}: {exc}".splitlines()[0]) from None
    try:
        return json.loads(text), source
    except ValueError as exc:
        raise UsageError(f"{source}: not valid JSON ({exc})") from None


def _header(args: argparse.Namespace, source: str) -> list[str]:
    what = "the keys that differ from the code's defaults" if args.diff else "every key, code defaults filled in"
    return [f"{source}: {what}",
            "no comment: the code default; 'default: X': set here, the code's default is X; 'required': no default"]


def run_show(args: argparse.Namespace) -> int:
    """Print the effective configuration."""
    data, source = read_config_file(args.config) if args.config else read_run_config(args.run_dir)
    config = validate(data, source, paths=args.check_paths)
    entries = differing(config) if args.diff else config_entries(config)
    print(render_json(entries) if args.format == "json" else render_yaml(entries, _header(args, source)), end="")
    return 0


def add_show_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``config show``."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", metavar="FILE", help="a run config (YAML)")
    source.add_argument("--run-dir", metavar="RUN_DIR",
                        help=f"a run directory (local or fsspec URL): the {CONFIG_FILE} its run wrote")
    parser.add_argument("--format", choices=("yaml", "json"), default="yaml",
                        help="yaml (default; comments mark the values that are not the code default) or json")
    parser.add_argument("--diff", action="store_true",
                        help="only the keys not at the code default: the shortest config that reads the same")
    parser.add_argument("--check-paths", action="store_true",
                        help="also check that local input paths exist, as diffin run does")


def add_actions(parser: argparse.ArgumentParser) -> None:
    """The ``config`` actions (``show``) under ``parser``."""
    actions = parser.add_subparsers(dest="config_action", metavar="ACTION", required=True)
    show = actions.add_parser("show", help="print the full effective configuration (defaults filled in)",
                              description=SHOW_DESCRIPTION)
    add_show_arguments(show)
    show.set_defaults(func=run_show)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``config`` to the ``diffin`` command."""
    parser = subparsers.add_parser("config", help="show a run configuration with every default filled in",
                                   description=DESCRIPTION)
    add_actions(parser)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m jobs.config``."""
    return standalone(add_actions, run_subcommand, DESCRIPTION, argv)


if __name__ == "__main__":
    sys.exit(main())
