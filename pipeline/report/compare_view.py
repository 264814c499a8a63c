"""The report's sections about a run's selections side by side (data: :mod:`.compare`)."""

from __future__ import annotations

from html import escape
from typing import Any, Hashable, Sequence

from pipeline.report import plots, render
from pipeline.report.compare import (DEFAULT_LABEL, MAX_VALUES, POOL_LABEL, QUANTILES, ColumnComparison,
                                     Comparison, Coverage)
from pipeline.report.render import Section

ANCHOR = "selections"  # the first section's id: RUN_DIR/report/index.html#selections


def comparison_sections(comparison: Comparison) -> list[Section]:
    """The overview (selections, overlap), the kept score distributions, the coverage by field."""
    sections = [Section("Selections compared", _overview(comparison), ANCHOR)]
    if comparison.columns:
        sections.append(Section("Kept scores by selection", _scores(comparison), f"{ANCHOR}-scores"))
    if comparison.coverage is not None:
        sections.append(Section(f"Coverage by {comparison.coverage.column}", _coverage(comparison),
                                f"{ANCHOR}-coverage"))
    return sections


def _overview(comparison: Comparison) -> str:
    refs = comparison.selections
    distinct = dict(zip(comparison.labels, comparison.distinct))
    rows = [(ref.label, ref.directory, ref.rule, ref.column, ref.budget, ref.kept, distinct.get(ref.label),
             "compared" if ref.label in distinct else ref.problem) for ref in refs]
    table = render.table(["selection", "directory", "rule", "column", "budget", "kept", "distinct kept uids",
                          "state"], rows)
    default = (f" {DEFAULT_LABEL} is <code>selection/</code> (the <code>select:</code> section's)."
               if any(ref.label == DEFAULT_LABEL for ref in refs) else "")
    note = (f'<p class="note">{len(refs)} selections in this run.{default} Compared: the complete ones '
            '(summary.json and kept_uids.npy; a named one also done.json) selected from this run\'s '
            'scores; the others are listed with why not.</p>')
    if len(comparison.labels) < 2:
        return note + table + '<p class="note">Fewer than two complete selections: nothing to compare.</p>'
    return note + table + _overlap(comparison)


def _matrix(labels: Sequence[str], values: Any, cell) -> str:
    return render.table(["", *labels], ([label, *(cell(v) for v in row)] for label, row in zip(labels, values)))


def _overlap(comparison: Comparison) -> str:
    labels = comparison.labels
    jaccard = _matrix(labels, comparison.jaccard, lambda v: None if v != v else float(v))
    shared = _matrix(labels, comparison.shared, int)
    note = ('<p class="note">Overlap of the kept pairs (distinct uids of kept_uids.npy): Jaccard = '
            'pairs kept by both / pairs kept by either (left); pairs kept by both (right; the diagonal: '
            'each selection\'s distinct kept pairs).</p>')
    return note + f'<div class="row">{jaccard}{shared}</div>'


def _score_rows(column: ColumnComparison) -> list[tuple[Any, ...]]:
    rows = []
    for label, scores in column.sets.items():
        quantiles = scores.quantiles() or [None] * len(QUANTILES)
        rows.append((column.column, label, scores.n, scores.mean, *quantiles,
                     "sample" if scores.sampled else "exact"))
    return rows


def _scores(comparison: Comparison) -> str:
    headers = ["column", "set", "pairs", "mean", *(f"q{q:g}" for q in QUANTILES), "quantiles"]
    rows = [row for column in comparison.columns for row in _score_rows(column)]
    figures = "".join(f"<figure>{_distribution_img(column)}</figure>" for column in comparison.columns)
    note = (f'<p class="note">Each selection\'s kept pairs and the {POOL_LABEL} (rows with status ok), '
            'over the rows with a finite score in the column: the common column first, then each '
            'selection\'s own. Pairs and means are exact; the quantiles are exact up to '
            f'{comparison.max_points:,} pairs a set, else from an evenly strided sample of that many. '
            'Plots: share of each set\'s pairs per bin over the column\'s histogram range.</p>')
    if comparison.empty_columns:
        note += (f'<p class="note">No scores to compare in: {escape(", ".join(comparison.empty_columns))}.</p>')
    return note + render.table(headers, rows) + f'<div class="plots">{figures}</div>'


def _distribution_img(column: ColumnComparison) -> str:
    pool = column.sets[POOL_LABEL].counts
    kept = [(label, scores.counts) for label, scores in column.sets.items() if label != POOL_LABEL]
    png = plots.kept_distributions(column.column, column.edges, pool, kept)
    return render.img(png, "image/png", f"kept {column.column} by selection")


def _value_label(value: Hashable) -> str:
    return "(none)" if value is None else str(value)


def _percent(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f} %" if whole else "–"


def _coverage_rows(coverage: Coverage, labels: list[str]) -> tuple[list[str], list[list[int]]]:
    """Value labels and per value the pool's then each selection's count (top values, then other)."""
    values = coverage.values()
    shown, rest = values[:MAX_VALUES], values[MAX_VALUES:]
    sets = [POOL_LABEL, *labels]
    names = [_value_label(v) for v in shown]
    counts = [[coverage.counts[s][v] for s in sets] for v in shown]
    if rest:
        names.append(f"other ({len(rest):,} values)")
        counts.append([sum(coverage.counts[s][v] for v in rest) for s in sets])
    return names, counts


def _coverage(comparison: Comparison) -> str:
    coverage, labels = comparison.coverage, comparison.labels
    names, counts = _coverage_rows(coverage, labels)
    totals = [sum(row[i] for row in counts) for i in range(len(labels) + 1)]
    headers = ["value", POOL_LABEL, *(h for label in labels for h in (f"{label} kept", f"{label} kept / pool"))]
    rows = [[name, row[0], *(c for n in row[1:] for c in (n, _percent(n, row[0])))]
            for name, row in zip(names + ["all values"], counts + [totals])]
    rates = [(label, [row[i + 1] / row[0] if row[0] else 0.0 for row in counts]) for i, label in enumerate(labels)]
    png = plots.coverage_rates(coverage.column, names, rates)
    note = (f'<p class="note">Pairs per value of <code>{escape(coverage.column)}</code>: in the {POOL_LABEL} '
            '(status ok) and kept by each selection, with the kept share of the pool\'s pairs of that value'
            f'{"" if len(names) <= MAX_VALUES else f"; the {MAX_VALUES} commonest values, the rest summed"}.'
            ' <code>diffin report --field NAME</code> picks another field (<code>cluster</code> or a '
            '<code>json.FIELD</code> column of the score files).</p>')
    figure = render.img(png, "image/png", f"coverage by {coverage.column}")
    return note + render.table(headers, rows) + f'<div class="wide">{figure}</div>'
