"""The report's plots as PNG bytes (matplotlib's object API on the Agg canvas: no pyplot,
no global state, byte-stable output)."""

from __future__ import annotations

import io

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from pipeline.report.gather import ColumnStats

KEPT_COLOUR = "#1f6fb4"
PRUNED_COLOUR = "#e08a2c"
NEUTRAL_COLOUR = "#5b6b7a"
FAILED_COLOUR = "#8e5ba6"
_DPI = 100


def _png(figure: Figure) -> bytes:
    FigureCanvasAgg(figure)
    out = io.BytesIO()
    figure.savefig(out, format="png", dpi=_DPI, metadata={"Software": None})
    return out.getvalue()


def _figure(width: float, height: float) -> Figure:
    return Figure(figsize=(width, height), dpi=_DPI, layout="constrained")


def histogram(stats: ColumnStats, threshold: float | None = None) -> bytes:
    """Histogram of one score column over its shown range; ``threshold`` marks the cut of the
    selection column (bars at or above it drawn as kept)."""
    if stats.edges is None or stats.counts is None:
        raise ValueError(f"column {stats.name} has no values to plot")
    figure = _figure(2.9, 2.5)
    axes = figure.add_subplot()
    edges, counts = stats.edges, stats.counts
    centres = (edges[:-1] + edges[1:]) / 2
    colours = NEUTRAL_COLOUR
    if threshold is not None:
        colours = [KEPT_COLOUR if c >= threshold else PRUNED_COLOUR for c in centres]
        axes.axvline(threshold, color="#222222", linewidth=1, linestyle="--", label=f"cut {threshold:.3g}")
        axes.legend(loc="upper left", fontsize=7, frameon=False)
    axes.bar(edges[:-1], counts, width=np.diff(edges), align="edge", color=colours, linewidth=0)
    axes.set_title(stats.name, fontsize=11)
    axes.set_xlabel(_range_note(stats), fontsize=8)
    axes.set_ylabel("pairs", fontsize=8)
    axes.tick_params(labelsize=7)
    axes.xaxis.set_major_locator(MaxNLocator(6))
    axes.ticklabel_format(axis="x", style="sci", scilimits=(-3, 4))
    axes.xaxis.get_offset_text().set_fontsize(7)
    return _png(figure)


def _range_note(stats: ColumnStats) -> str:
    note = f"{stats.n:,} scored pairs"
    if stats.below or stats.above:
        note += f"\noutside the range: {stats.below:,} below, {stats.above:,} above"
    return note


def status_counts(counts: dict[str, int]) -> bytes:
    """Horizontal bars: rows per status (``ok`` first, then by count)."""
    items = sorted(counts.items(), key=lambda kv: (kv[0] != "ok", -kv[1], kv[0]))
    figure = _figure(4.6, 0.6 + 0.38 * max(1, len(items)))
    axes = figure.add_subplot()
    names = [k for k, _ in items]
    values = [v for _, v in items]
    positions = np.arange(len(items))
    axes.barh(positions, values, color=[KEPT_COLOUR if n == "ok" else FAILED_COLOUR for n in names])
    axes.set_yticks(positions, names, fontsize=9)
    axes.invert_yaxis()
    axes.set_xlim(0, max(values or [1]) * 1.25)
    for y, v in zip(positions, values):
        axes.text(v, y, f" {v:,}", va="center", fontsize=8)
    axes.set_xlabel("rows", fontsize=9)
    axes.tick_params(axis="x", labelsize=8)
    return _png(figure)


def _spearman(x: np.ndarray, y: np.ndarray) -> float | None:
    if len(x) < 3:
        return None
    rx = np.argsort(np.argsort(x)).astype(float)
    ry = np.argsort(np.argsort(y)).astype(float)
    if rx.std() == 0 or ry.std() == 0:
        return None
    return float(np.corrcoef(rx, ry)[0, 1])


def scatter(values: dict[str, np.ndarray], columns: list[ColumnStats], clip: ColumnStats,
            kept: np.ndarray | None) -> bytes:
    """One panel per score column: score (x, over its shown range) vs ``clip_score`` (y),
    coloured kept / pruned when ``kept`` is known."""
    figure = _figure(4.2 * len(columns), 3.6)
    panels = figure.subplots(1, len(columns), squeeze=False)[0]
    y_all = values[clip.name]
    for axes, stats in zip(panels, columns):
        x_all = values[stats.name]
        both = np.isfinite(x_all) & np.isfinite(y_all)
        x, y = x_all[both], y_all[both]
        groups = [(np.ones(len(x), bool), NEUTRAL_COLOUR, None)]
        if kept is not None:
            k = kept[both]
            groups = [(~k, PRUNED_COLOUR, "pruned"), (k, KEPT_COLOUR, "kept")]
        for mask, colour, label in groups:
            axes.scatter(x[mask], y[mask], s=4 if len(x) > 2000 else 12, alpha=0.5, color=colour,
                         linewidths=0, label=label, rasterized=True)
        if stats.shown_range:
            axes.set_xlim(*stats.shown_range)
        if clip.shown_range:
            axes.set_ylim(*clip.shown_range)
        rho = _spearman(x, y)
        axes.set_title(f"{stats.name} vs clip_score" + (f"  (Spearman {rho:.2f})" if rho is not None else ""),
                       fontsize=10)
        axes.set_xlabel(f"{stats.name} ({len(x):,} sampled pairs)", fontsize=8)
        axes.set_ylabel("clip_score", fontsize=9)
        axes.tick_params(labelsize=8)
        axes.ticklabel_format(axis="x", style="sci", scilimits=(-3, 4))
        if kept is not None:
            axes.legend(loc="lower right", fontsize=8, markerscale=3, frameon=False)
    return _png(figure)


# --------------------------------------------------------------------- selections compared

SET_COLOURS = ("#1f6fb4", "#e08a2c", "#2a9d5c", "#c23b52", "#8e5ba6", "#8c6d31", "#17a2b8", "#d16ba5")
POOL_COLOUR = "#aab4be"
_LINESTYLES = ("-", "--", "-.", ":")


def set_style(i: int) -> tuple[str, str]:
    """Colour and line style of the i-th compared selection (colours first, then styles)."""
    return SET_COLOURS[i % len(SET_COLOURS)], _LINESTYLES[(i // len(SET_COLOURS)) % len(_LINESTYLES)]


def _shares(counts: np.ndarray) -> np.ndarray:
    total = counts.sum()
    return counts / total if total else counts.astype(float)


def kept_distributions(column: str, edges: np.ndarray, pool: np.ndarray,
                       kept: list[tuple[str, np.ndarray]]) -> bytes:
    """Share of each set's pairs per bin over the pool's range: the scored pool as grey bars,
    each selection's kept pairs as a step line."""
    figure = _figure(4.2, 3.0)
    axes = figure.add_subplot()
    axes.bar(edges[:-1], _shares(pool), width=np.diff(edges), align="edge", color=POOL_COLOUR, linewidth=0,
             label="scored pool")
    for i, (label, counts) in enumerate(kept):
        colour, style = set_style(i)
        axes.stairs(_shares(counts), edges, color=colour, linestyle=style, linewidth=1.4, label=label)
    axes.set_title(column, fontsize=11)
    axes.set_xlabel("score", fontsize=8)
    axes.set_ylabel("share of the set's pairs", fontsize=8)
    axes.tick_params(labelsize=7)
    axes.xaxis.set_major_locator(MaxNLocator(6))
    axes.ticklabel_format(axis="x", style="sci", scilimits=(-3, 4))
    axes.xaxis.get_offset_text().set_fontsize(7)
    axes.legend(loc="upper left", fontsize=7, frameon=False)
    return _png(figure)


def coverage_rates(field: str, values: list[str], rates: list[tuple[str, list[float]]]) -> bytes:
    """Grouped horizontal bars: per value of ``field``, each selection's kept pairs as a share
    of the pool's pairs of that value."""
    n_sets = max(1, len(rates))
    figure = _figure(6.0, 0.9 + len(values) * (0.1 + 0.14 * n_sets))
    axes = figure.add_subplot()
    positions = np.arange(len(values))
    height = 0.8 / n_sets
    for i, (label, shares) in enumerate(rates):
        colour, _ = set_style(i)
        axes.barh(positions - 0.4 + height * (i + 0.5), shares, height=height, color=colour, label=label)
    axes.set_yticks(positions, values, fontsize=8)
    axes.invert_yaxis()
    top = max((r for _, shares in rates for r in shares), default=0.0)
    axes.set_xlim(0, max(top * 1.15, 0.01))
    axes.set_xlabel(f"kept pairs / scored pairs with that {field}", fontsize=8)
    axes.tick_params(axis="x", labelsize=8)
    axes.legend(loc="lower right", fontsize=7, frameon=False)
    return _png(figure)
