"""The report's HTML: one self-contained page (inline CSS, images as base64 data URIs).

Every text taken from the run (captions, keys, statuses, config values) is HTML-escaped.
When the page has loaded, an inline script sets ``<body data-images-loaded="k/n">``: k of
the page's n images decoded with a non-zero width (what the browser test checks).
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from html import escape
from typing import Any, Iterable, Sequence

from pipeline.report.examples import Example

MAX_STATS_ROWS = 200
_CAPTION_CHARS = 140

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;margin:0;
 background:#f4f6f8;color:#1d2733}
main{max-width:1240px;margin:0 auto;padding:18px 20px 40px}
h1{font-size:22px;margin:4px 0 2px}h2{font-size:17px;margin:26px 0 10px;border-bottom:1px solid #d5dce3;
 padding-bottom:4px}
.sub{color:#5b6b7a;font-size:13px}
.cards{display:flex;flex-wrap:wrap;gap:10px;margin-top:14px}
.card{background:#fff;border:1px solid #dde3e9;border-radius:6px;padding:8px 14px;min-width:110px}
.card b{display:block;font-size:20px}.card span{color:#5b6b7a;font-size:12px}
.plots{display:grid;grid-template-columns:repeat(auto-fill,minmax(280px,1fr));gap:10px}
.plots figure,.wide{background:#fff;border:1px solid #dde3e9;border-radius:6px;margin:0;padding:6px}
.plots img,.wide img{display:block;max-width:100%;margin:0 auto}
.empty{display:flex;align-items:center;justify-content:center;height:250px;color:#5b6b7a;
 font-size:13px;text-align:center}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(142px,1fr));gap:8px}
.ex{background:#fff;border:1px solid #dde3e9;border-radius:6px;padding:6px;font-size:11.5px;
 overflow:hidden}
.ex img,.ex .noimg{display:block;width:128px;height:128px;object-fit:contain;margin:0 auto 4px}
.ex .noimg{background:#eef1f4;color:#8795a1;line-height:128px;text-align:center}
.ex .cap{font-weight:600;overflow-wrap:anywhere}.ex .meta{color:#5b6b7a;overflow-wrap:anywhere}
.kept{border-top:3px solid #1f6fb4}.pruned{border-top:3px solid #e08a2c}
table{border-collapse:collapse;background:#fff;font-size:12.5px}
th,td{border:1px solid #dde3e9;padding:3px 8px;text-align:left}th{background:#eef1f4}
td.n{text-align:right;font-variant-numeric:tabular-nums}
.row{display:flex;flex-wrap:wrap;gap:16px;align-items:flex-start}
pre{background:#fff;border:1px solid #dde3e9;border-radius:6px;padding:10px;font-size:12px;
 overflow:auto;max-height:520px}
.note{color:#5b6b7a;font-size:12.5px;margin:6px 0}
.warn{color:#8a3b00;background:#fff4e5;border:1px solid #f0c48a;border-radius:6px;padding:6px 10px;
 font-size:12.5px;margin:6px 0}
"""

_SCRIPT = """
window.addEventListener("load", function () {
  var images = Array.prototype.slice.call(document.images);
  var loaded = images.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  document.body.dataset.imagesLoaded = loaded + "/" + images.length;
});
"""


def data_uri(data: bytes, mime: str) -> str:
    """``data:`` URI of ``data``."""
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def img(data: bytes, mime: str, alt: str, css_class: str = "") -> str:
    """An ``<img>`` with the image embedded."""
    klass = f' class="{css_class}"' if css_class else ""
    return f'<img{klass} src="{data_uri(data, mime)}" alt="{escape(alt)}">'


def fmt_number(value: Any) -> str:
    """Integers with thousands separators, floats to 4 significant digits, None as '–'."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """An HTML table; numbers right-aligned, every cell escaped."""
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = []
    for row in rows:
        cells = []
        for value in row:
            numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
            cls = ' class="n"' if numeric else ""
            cells.append(f"<td{cls}>{escape(fmt_number(value))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def cards(items: Sequence[tuple[str, Any]]) -> str:
    """Headline numbers."""
    inner = "".join(f"<div class=card><b>{escape(fmt_number(v))}</b><span>{escape(k)}</span></div>"
                    for k, v in items)
    return f'<div class="cards">{inner}</div>'


def _shorten(text: str, limit: int = _CAPTION_CHARS) -> str:
    return text if len(text) <= limit else text[:limit - 1] + "…"


def example_grid(examples: Sequence[Example], column: str, kind: str) -> str:
    """A grid of example cards (thumbnail, caption, score, rank, key)."""
    if not examples:
        return '<p class="note">No pairs to show.</p>'
    cells = []
    for ex in examples:
        caption = _shorten(ex.caption) if ex.caption is not None else "(caption not available)"
        picture = (img(ex.thumbnail, "image/jpeg", caption) if ex.thumbnail is not None
                   else '<div class="noimg">no image</div>')
        rank = f" · rank {ex.rank:,}" if ex.rank is not None else ""
        cells.append(
            f'<div class="ex {kind}" title="{escape(ex.uid)}">{picture}'
            f'<div class="cap">{escape(caption)}</div>'
            f'<div class="meta">{escape(column)} {ex.score:.4g}{escape(rank)}</div>'
            f'<div class="meta">{escape(ex.key)}</div></div>')
    return f'<div class="grid">{"".join(cells)}</div>'


def _flat(value: Any) -> Any:
    if isinstance(value, dict):
        return ", ".join(f"{k}: {fmt_number(v)}" for k, v in sorted(value.items())) or "–"
    if isinstance(value, (list, tuple)):
        return ", ".join(fmt_number(v) for v in value)
    return value


_STATS_FIRST = ("shard", "status", "expected", "read", "rows", "ok", "failed", "missing", "seconds")
_STATS_HIDDEN = {"scores", "worker.pid"}  # implied by the shard / of no use in a table


def _flatten_stats(stats: dict[str, Any]) -> dict[str, Any]:
    """One level of nested dicts becomes ``outer.inner`` columns (``failed`` stays one cell)."""
    flat: dict[str, Any] = {}
    for key, value in stats.items():
        if isinstance(value, dict) and key != "failed":
            flat.update({f"{key}.{inner}": v for inner, v in value.items()})
        else:
            flat[key] = value
    return {k: v for k, v in flat.items() if k not in _STATS_HIDDEN}


def _has_problem(stats: dict[str, Any]) -> bool:
    failed = stats.get("failed")
    failed_any = any(v for v in failed.values()) if isinstance(failed, dict) else bool(failed)
    status = stats.get("status")
    return failed_any or bool(stats.get("error")) or (status is not None and status not in ("ok", "done"))


def shard_stats_table(stats: list[dict[str, Any]]) -> str:
    """Per-shard stats: shards with failures first, then by name; at most MAX_STATS_ROWS rows."""
    if not stats:
        return '<p class="note">The stats directory holds no per-shard files.</p>'
    stats = [_flatten_stats(s) for s in stats]
    keys = [k for k in _STATS_FIRST if any(k in s for s in stats)]
    keys += sorted({k for s in stats for k in s} - set(keys))
    ordered = sorted(stats, key=lambda s: (not _has_problem(s), str(s.get("shard"))))
    shown = ordered[:MAX_STATS_ROWS]
    problems = sum(_has_problem(s) for s in stats)
    note = (f'<p class="note">{len(stats):,} shards, {problems:,} with failed rows or a status other '
            f'than ok{"" if len(shown) == len(stats) else f"; the first {len(shown):,} are listed"}.</p>')
    return note + table(keys, ([_flat(s.get(k)) for k in keys] for s in shown))


def config_block(config: dict[str, Any] | None) -> str:
    """The resolved run config as pretty JSON (escaped)."""
    if config is None:
        return '<p class="note">No config.json in this run directory.</p>'
    return f"<pre>{escape(json.dumps(config, indent=2, sort_keys=True))}</pre>"


@dataclass(frozen=True)
class Section:
    """A titled part of the page (``body`` is HTML; ``anchor``: its id, linkable as ``#anchor``)."""

    title: str
    body: str
    anchor: str = ""


def _id(anchor: str) -> str:
    return f' id="{escape(anchor)}"' if anchor else ""


def page(title: str, subtitle: str, headline: str, sections: Sequence[Section]) -> str:
    """The whole HTML document."""
    parts = "".join(f"<section{_id(s.anchor)}><h2>{escape(s.title)}</h2>{s.body}</section>" for s in sections)
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<meta name=\"viewport\" content=\"width=device-width\"><title>{escape(title)}</title>"
        f"<style>{_CSS}</style><script>{_SCRIPT}</script></head>"
        f"<body><main><h1>{escape(title)}</h1><div class=\"sub\">{escape(subtitle)}</div>"
        f"{headline}{parts}</main></body></html>\n"
    )
