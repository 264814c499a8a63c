"""Shards follow their selection: the stale-output rule, one owner.

A run's shards are derived from one selection: ``shards/`` from ``selection/``,
``selections/NAME/shards/`` from the named selection NAME (:class:`~pipeline.io.layout.RunLayout`).
The reshard stage records, in the shards' ``reshard_plan.json``, the fingerprint of the
selection they were made from (``selection_fingerprint``: the one its ``done.json`` holds).

Removal
    When a selection is recomputed with another fingerprint, the select stage first calls
    :func:`remove_stale_shards`: the shards made from the selection it replaces go (the plan
    record and ``sizes.json`` first, so an interruption never leaves shards that look complete),
    with one log line.
Refusal
    Every reader of a run's shards (``diffin train --on-selection``, the report) goes through
    :func:`current_shards`, which refuses in one line (UsageError, exit 2) shards whose recorded
    fingerprint is not the selection's current one, or that record none (written before shards
    recorded it). Removal keeps the run dir tidy; the check makes a missed removal (an
    interrupted job, a copied run dir, an older version) harmless. The reshard stage itself
    replaces such shards in the run dir instead of resuming into them.

This module imports neither the select stage nor reshard (both import it): it reads
``done.json`` by the selection files' contract (:mod:`pipeline.stages.select.files`).
"""

from __future__ import annotations

import json
import logging

from pipeline.config import RESHARD_PLAN_FILE as PLAN_FILE
from pipeline.data.shards import SIZES_FILE
from pipeline.errors import UsageError
from pipeline.io.layout import RunLayout
from pipeline.io.storage import StoragePath, remove_tree

log = logging.getLogger(__name__)

SELECTION_KEY = "selection_fingerprint"  # in reshard_plan.json: the selection the shards are made from


def clear_shards_dir(out_dir: StoragePath) -> None:
    """Remove a shards directory: the plan record and ``sizes.json`` first, so an interruption
    never leaves old shards that look complete."""
    for name in (PLAN_FILE, SIZES_FILE):
        if (out_dir / name).exists():
            (out_dir / name).unlink()
    remove_tree(out_dir)


def selection_done(layout: RunLayout, name: str | None = None) -> str | None:
    """The fingerprint the selection's completion marker records (``done.json``), None when the
    selection is absent or incomplete. The one reader of the marker: derived outputs (shards)
    compare their recorded fingerprint with it."""
    from pipeline.stages.select.files import DONE_FILE  # here: the select package imports this module

    marker = layout.selection_dir(name) / DONE_FILE
    if not marker.is_file():
        return None
    try:
        return json.loads(marker.read_text()).get("fingerprint")
    except (OSError, ValueError, AttributeError):
        return None


def selection_label(name: str | None) -> str:
    """How messages name a selection: ``selection/`` or ``selection 'NAME'``."""
    return "selection/" if name is None else f"selection {name!r}"


def reshard_command(name: str | None) -> str:
    """The command that (re)writes the shards of selection ``name``."""
    return "`diffin reshard`" + ("" if name is None else f" --selection {name}")


def remove_stale_shards(layout: RunLayout, name: str | None, fingerprint: str) -> bool:
    """Before selection ``name`` (None: ``selection/``) is rewritten with ``fingerprint``: remove
    the shards made from another selection (all of its shards directory; one log line). True
    when something was removed."""
    out = layout.shards_dir(name)
    if not out.exists():
        return False
    plan = out / PLAN_FILE
    try:
        recorded = json.loads(plan.read_text()).get(SELECTION_KEY) if plan.is_file() else None
    except (OSError, ValueError, AttributeError):
        recorded = None
    if recorded == fingerprint:
        return False
    log.info("select: %s changes; removing the shards made from the previous one (%s)",
             selection_label(name), out)
    clear_shards_dir(out)
    return True


def current_shards(layout: RunLayout, name: str | None = None) -> dict[str, int]:
    """The ``sizes.json`` of the shards made from selection ``name`` (None: ``shards/`` of
    ``selection/``), after checking that they are complete and made from the selection as it
    is now: the fingerprint their plan records is the one of its ``done.json``. Every reader of
    a run's shards (train on a selection, the report) goes through here; UsageError in one line
    otherwise, never stale shards."""
    out = layout.shards_dir(name)
    sizes, plan = out / SIZES_FILE, out / PLAN_FILE
    current = selection_done(layout, name)
    if current is None:
        raise UsageError(f"{selection_label(name)} of {layout.root} is not complete (no done.json); "
                         "run `diffin select` first")
    if not sizes.is_file() or not plan.is_file():
        raise UsageError(f"no complete shards of {selection_label(name)} in {out}; run {reshard_command(name)} "
                         "with this run's config first")
    try:
        recorded = json.loads(plan.read_text()).get(SELECTION_KEY)
        counts = json.loads(sizes.read_text())
    except (OSError, ValueError, AttributeError) as exc:
        raise UsageError(f"cannot read the shards' records in {out}: {exc}") from None
    if recorded is None:
        raise UsageError(f"the shards in {out} do not record the selection they were made from (written by an "
                         f"older version): they may be stale; rerun {reshard_command(name)} to rewrite them")
    if recorded != current:
        raise UsageError(f"the shards in {out} were made from another {selection_label(name)} than the current "
                         f"one (fingerprint {recorded} vs {current}): stale; rerun {reshard_command(name)}")
    return {str(k): int(v) for k, v in counts.items()}
