"""``diffin report RUN_DIR``: gather a run's outputs, plot them, write one HTML page."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from html import escape
from pathlib import Path
from typing import Any

from pipeline.errors import UsageError
from pipeline.io.atomic import write_bytes_atomic
from pipeline.io.scores import SCORE_COLUMNS
from pipeline.io.layout import CONFIG_FILE, SUMMARY_FILE, RunLayout
from pipeline.io.storage import StorageOptions, StoragePath, as_path
from pipeline.influence.scores import DEFAULT_COLUMN
from pipeline.report import DEFAULT_EXAMPLES, DEFAULT_MAX_POINTS, plots, render
from pipeline.report.compare import Comparison, compare_selections
from pipeline.report.compare_view import comparison_sections
from pipeline.report.examples import Example, attach_media, best_kept, worst_pruned
from pipeline.report.gather import (ScoreScan, check_run_dir, load_kept_uids,
                                    load_shard_stats, read_json, scan_scores, score_files)
from pipeline.report.render import Section
from pipeline.stages.select import SUMMARY_FILE as SELECTION_SUMMARY

log = logging.getLogger(__name__)

CLIP_COLUMN = "clip_score"


@dataclass
class ReportData:
    """Everything the page shows."""

    run_dir: Path
    config: dict[str, Any] | None
    run_summary: dict[str, Any] | None
    selection: dict[str, Any] | None
    scan: ScoreScan | None
    kept: list[Example]
    pruned: list[Example]
    shard_stats: list[dict[str, Any]] | None
    comparison: Comparison | None = None  # with two or more selections

    @property
    def column(self) -> str | None:
        """The selection column (None without a selection)."""
        column = (self.selection or {}).get("column")
        return column if column in SCORE_COLUMNS else None


def gather(run_dir: str | os.PathLike, n_examples: int = DEFAULT_EXAMPLES,
           max_points: int = DEFAULT_MAX_POINTS, storage: StorageOptions | None = None,
           field: str | None = None, compare_column: str | None = None) -> ReportData:
    """Read what the report needs from ``run_dir`` (score files streamed, see
    :mod:`pipeline.report.gather`; thumbnails read only from the shards of the examples; the
    selections compared, see :mod:`pipeline.report.compare`, when there are two or more)."""
    root = as_path(run_dir, storage)
    check_run_dir(root)
    selection_dir = RunLayout(root).selection
    selection = read_json(selection_dir / SELECTION_SUMMARY)
    data = ReportData(root, read_json(root / CONFIG_FILE), read_json(root / SUMMARY_FILE),
                      selection if isinstance(selection, dict) else None, None, [], [],
                      load_shard_stats(root))
    files = score_files(root)
    kept_uids = load_kept_uids(selection_dir) if data.selection else None
    if files:
        data.scan = scan_scores(files, max_points=max_points, kept_uids=kept_uids,
                                lowest_column=data.column,
                                n_lowest=4 * n_examples + 64 if data.column and n_examples else 0)
    if data.column and data.scan is not None:
        data.kept = best_kept(selection_dir, n_examples)
        data.pruned = worst_pruned(files, data.scan.lowest, kept_uids, n_examples)
        both = attach_media(data.kept + data.pruned, storage=storage)
        data.kept, data.pruned = both[:len(data.kept)], both[len(data.kept):]
    data.comparison = compare_selections(RunLayout(root), files, data.scan, field_name=field, max_points=max_points,
                                         common_column=compare_column or _run_column(data.config))
    return data


def _run_column(config: dict[str, Any] | None) -> str:
    """The run's select column (config.json), else the default column."""
    column = ((config or {}).get("select") or {}).get("column")
    return column if column in SCORE_COLUMNS else DEFAULT_COLUMN


# ---------------------------------------------------------------------------------- page


def _headline(data: ReportData) -> str:
    counts = (data.selection or {}).get("counts", {})
    status = data.scan.status if data.scan else {}
    items: list[tuple[str, Any]] = [
        ("pairs in", counts.get("in", data.scan.rows if data.scan else None)),
        ("scored ok", counts.get("scored_ok", status.get("ok"))),
        ("failed", counts.get("failed", sum(v for k, v in status.items() if k != "ok") if status else None)),
        ("kept", counts.get("kept")),
        ("score files", len(data.scan.files) if data.scan else 0),
    ]
    if counts.get("missing"):
        items.insert(3, ("missing (not in the shards)", counts["missing"]))
    seconds = (data.run_summary or {}).get("seconds")
    if seconds is not None:
        items.append(("seconds (last run)", float(seconds)))
    return render.cards(items)


def _subtitle(data: ReportData) -> str:
    if not data.selection:
        return "no selection in this run"
    sel = data.selection
    config = sel.get("config") or {}
    budget = next((f"{k} {config[k]}" for k in ("fraction", "k", "threshold") if config.get(k) is not None), "")
    if sel.get("chain"):
        steps = " then ".join(f"{s.get('column')} {s.get('fraction')}" for s in sel["chain"])
        return f"selection: chain {steps}"
    drop = sel.get("drop_fill") or {}
    if drop:
        share = f" (as many as {drop['drop_share_from']} scores below 0)" if drop.get("drop_share_from") else ""
        return (f"selection: drop_fill {budget} on {sel.get('column')}: dropped {drop.get('dropped')}{share} with "
                f"{drop.get('drop_column')} below {drop.get('drop_threshold')}, fill {drop.get('fill')} "
                f"({drop.get('filled_from_dropped')} filled from the dropped)")
    return f"selection: {sel.get('rule')} {budget} on {sel.get('column')}".strip()


def _status_section(scan: ScoreScan, selection: dict[str, Any] | None) -> Section:
    total = sum(scan.status.values())
    rows = [(name, n, f"{100 * n / total:.2f} %") for name, n in
            sorted(scan.status.items(), key=lambda kv: (kv[0] != "ok", -kv[1], kv[0]))]
    chart = render.img(plots.status_counts(dict(scan.status)), "image/png", "rows by status")
    body = (f'<div class="row"><div class="wide">{chart}</div>'
            f'{render.table(["status", "rows", "share"], rows)}</div>')
    if selection:
        without = selection.get("ok_without_score") or {}
        body += (f'<p class="note">Selection on {escape(str(selection.get("column")))}: ok rows without a '
                 f'score: {render.fmt_number(without.get("null"))} null, '
                 f'{render.fmt_number(without.get("non_finite"))} non-finite (never kept).</p>')
    return Section("Rows by status", body)


def _threshold(data: ReportData, column: str) -> float | None:
    sel = data.selection or {}
    config = sel.get("config") or {}
    if (column != data.column or sel.get("rule") not in ("top_fraction", "top_k", "threshold")
            or config.get("stratify_by")):  # only these rules keep every score at or above a cut
        return None
    value = sel.get("threshold_applied")
    return float(value) if isinstance(value, (int, float)) else None


def _histogram_section(data: ReportData) -> Section:
    figures, empty = [], []
    for name in SCORE_COLUMNS:
        stats = data.scan.columns[name]
        if stats.edges is None:  # not computed by this run's score settings (or no finite value)
            empty.append(f"{escape(name)} ({stats.n_null:,} ok rows without a value)")
            continue
        png = plots.histogram(stats, _threshold(data, name))
        figures.append(f"<figure>{render.img(png, 'image/png', f'histogram of {name}')}</figure>")
    note = ('<p class="note">Rows with status ok and a finite score. Where a few extreme values would '
            'squash the plot, the range shown is about the central 99 % of a sample of the rows; the rows '
            'outside it are counted below the axis.'
            + (f' On {escape(data.column)}, blue bars are kept, orange pruned.' if data.column else '')
            + '</p>')
    absent = (f'<p class="note">No scores in these columns (not computed by this run\'s '
              f'<code>score.method</code> / <code>score.adam</code>): {", ".join(empty)}.</p>') if empty else ""
    return Section("Score distributions", note + f'<div class="plots">{"".join(figures)}</div>' + absent)


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n:,}{suffix}"


def _scatter_section(data: ReportData) -> Section | None:
    scan = data.scan
    clip = scan.columns[CLIP_COLUMN]
    others = [scan.columns[c] for c in SCORE_COLUMNS if c != CLIP_COLUMN and scan.columns[c].edges is not None]
    if clip.edges is None or not others or scan.sample is None or not len(scan.sample):
        return None
    # the selection column first
    others.sort(key=lambda s: s.name != data.column)
    png = plots.scatter(scan.sample.values, others, clip, scan.sample.kept)
    colour = " Colour: kept (blue) or pruned (orange)." if scan.sample.kept is not None else ""
    stride = scan.sample.stride
    which = "Every row" if stride == 1 else f"Every {_ordinal(stride)} row"
    note = (f'<p class="note">{which} of the score files ({len(scan.sample):,} rows, a deterministic '
            f'sample; pairs scored in both columns are plotted, over the histograms\' ranges).{colour}</p>')
    figure = render.img(png, "image/png", "scores vs clip_score")
    return Section("Scores vs clip_score", note + f'<div class="wide">{figure}</div>')


def _examples_sections(data: ReportData) -> list[Section]:
    column = data.column
    if column is None:
        return [Section("Examples", '<p class="note">No selection in this run: nothing kept or pruned yet.</p>')]
    return [
        Section(f"Best kept pairs (highest {column})", render.example_grid(data.kept, column, "kept")),
        Section(f"Worst pruned pairs (lowest {column})", render.example_grid(data.pruned, column, "pruned")),
    ]


def _run_section(data: ReportData) -> Section | None:
    summary = data.run_summary
    if not summary:
        return None
    stages = summary.get("stage_seconds") or {}
    order = [s for s in summary.get("stages") or [] if s in stages]  # pipeline order
    order += [s for s in stages if s not in order]
    body = render.table(["stage", "seconds"], [(s, stages[s]) for s in order])
    checkpoints = summary.get("checkpoints") or []
    if checkpoints:
        with_loss = any(c.get("target_loss") is not None for c in checkpoints)
        headers = ["checkpoint", "step", "lr"] + (["target loss"] if with_loss else [])
        rows = [(i, c.get("step"), c.get("lr")) + ((c.get("target_loss"),) if with_loss else ())
                for i, c in enumerate(checkpoints)]
        body = f'<div class="row">{body}{render.table(headers, rows)}</div>'
        body += _target_loss_note(summary) if with_loss else ""
    note = ('<p class="note">Wall time of the last <code>diffin run</code> in this directory, by stage; '
            'a stage whose outputs were already complete was reused and takes about 0 s.</p>')
    return Section("Last run", note + body)


def _target_loss_note(summary: dict[str, Any]) -> str:
    """What the target loss per checkpoint says (the run's verdict, see ``target_loss_warning``)."""
    losses = [c["target_loss"] for c in summary.get("checkpoints") or [] if c.get("target_loss") is not None]
    text = ("Target loss per checkpoint (L_V: mean loss of the target pairs against the negative bank, "
            "from the prepare stage): " + " → ".join(render.fmt_number(x) for x in losses) + ".")
    window = summary.get("checkpoint_window")
    if window:
        text += (f" Scored checkpoints (score.checkpoint_window: {window['rule']}): "
                 f"{', '.join(str(i) for i in window['scored'])}; dropped after L_V's lowest: "
                 f"{', '.join(str(i) for i in window['dropped']) or 'none'}.")
    warning = summary.get("target_loss_warning")
    if warning:
        return f'<p class="note">{escape(text)}</p><p class="warn">Warning: {escape(str(warning))}</p>'
    if len(losses) > 1:
        text += (" It falls over the scored checkpoints: the scores measure influence on a loss that training "
                 "reduces." if window else " It falls: the scores measure influence on a loss that training reduces.")
    return f'<p class="note">{escape(text)}</p>'


def render_page(data: ReportData) -> str:
    """The report's HTML for gathered ``data``."""
    sections: list[Section] = []
    if data.scan is None:
        sections.append(Section("Scores", '<p class="note">No score files in this run directory yet.</p>'))
    else:
        sections.append(_status_section(data.scan, data.selection))
        sections.append(_histogram_section(data))
        scatter = _scatter_section(data)
        if scatter:
            sections.append(scatter)
    if data.comparison is not None:
        sections.extend(comparison_sections(data.comparison))
    if data.scan is not None:
        sections.extend(_examples_sections(data))
    if data.shard_stats is not None:
        sections.append(Section("Per-shard stats", render.shard_stats_table(data.shard_stats)))
    run = _run_section(data)
    if run:
        sections.append(run)
    sections.append(Section("Config", render.config_block(data.config)))
    title = f"diffin report — {data.run_dir.name or data.run_dir}"
    return render.page(title, _subtitle(data), _headline(data), sections)


def write_report(run_dir: str | os.PathLike, out: str | os.PathLike | None = None,
                 n_examples: int = DEFAULT_EXAMPLES, max_points: int = DEFAULT_MAX_POINTS,
                 storage: StorageOptions | None = None, field: str | None = None,
                 compare_column: str | None = None) -> StoragePath:
    """Write the report of ``run_dir`` atomically to ``out`` (default ``RUN_DIR/report/index.html``).

    With two or more selections the page compares them; ``field`` (``cluster`` or a ``json.FIELD``
    column of the score files) is the field of the coverage per value, ``compare_column`` the
    score column every kept set is compared on besides its own (default: the run's select column).
    """
    if compare_column is not None and compare_column not in SCORE_COLUMNS:
        raise UsageError(f"--compare-column {compare_column}: not a score column "
                         f"(one of {', '.join(SCORE_COLUMNS)})")
    if n_examples < 0:
        raise UsageError(f"examples must be >= 0, got {n_examples}")
    if max_points < 1:
        raise UsageError(f"max points must be >= 1, got {max_points}")
    data = gather(run_dir, n_examples, max_points, storage, field, compare_column)
    path = as_path(out, storage) if out is not None else RunLayout.of(run_dir, storage).report
    if path.is_dir():
        raise UsageError(f"--out {path} is a directory; give a file name")
    write_bytes_atomic(path, render_page(data).encode("utf-8"))
    log.info("report: wrote %s", path)
    return path
