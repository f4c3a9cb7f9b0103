"""The HTML report: one self-contained page, images beside it (relative links), no scripts.

`render_html` is pure (data in, text out; every piece of text HTML-escaped); `write_report` writes
it atomically. What it shows comes from readers.py (metrics files) and the figure modules; its
stylesheet is style.py's.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from html import escape
from pathlib import Path

from tlpipe import atomic
from tlpipe.report.style import CSS


@dataclass
class Figure:
    file: str               # path relative to the report folder
    caption: str
    alt: str = ""
    wide: bool = False      # spans the page width (activation grids, curves)
    tone: str = ""          # "right" / "wrong": a coloured caption badge
    width: int = 0          # display width in CSS px (0: natural size); small images are enlarged


@dataclass
class Group:
    title: str
    figures: list[Figure]
    intro: str = ""


@dataclass
class Section:
    id: str
    title: str
    intro: str = ""
    groups: list[Group] = field(default_factory=list)
    empty: str = "Nothing to show."
    table: str = ""         # HTML from `metrics_table`, shown above the figures


def _fmt(v: float, count: bool = False) -> str:
    if math.isnan(v):
        return "–"
    # A score of exactly 1 stays "1.0000"; counts (an epoch, a number of images) are whole numbers.
    return str(int(v)) if float(v).is_integer() and (count or abs(v) >= 2) else f"{v:.4f}"


# The headline figures first (as `dvc exp show` has them), then the rest; unknown columns last.
COLUMN_ORDER = ["best_epoch", "val_accuracy", "accuracy", "roc_auc", "loss", "precision", "recall", "f1", "n"]
NOT_SCORES = {"n", "count", "support", "samples", "epochs", "best_epoch", "dim"}  # no "best" mark


def metrics_table(metrics: dict[str, dict[str, float]], first: str = "model", mark_best: bool = True,
                  empty: str = "No test metrics (metrics file missing or empty).") -> str:
    """An HTML table, one row per key of `metrics` (a model, say); with `mark_best`, the best value
    of each score column is highlighted (lowest for a loss, else highest)."""
    if not metrics:
        return f'<p class="empty">{escape(empty)}</p>'
    cols: list[str] = []
    for m in metrics.values():
        cols += [c for c in m if c not in cols]
    first_seen = list(cols)
    cols = sorted(cols, key=lambda c: (COLUMN_ORDER.index(c) if c in COLUMN_ORDER else len(COLUMN_ORDER),
                                       first_seen.index(c)))
    best = {}
    if mark_best and len(metrics) > 1:
        for c in cols:
            if c in NOT_SCORES:
                continue
            vals = [m[c] for m in metrics.values() if c in m and not math.isnan(m[c])]
            if vals:
                best[c] = min(vals) if "loss" in c.lower() else max(vals)
    head = "".join(f"<th>{escape(c)}</th>" for c in [first] + cols)
    rows = []
    for model, m in metrics.items():
        cells = [f"<td>{escape(model)}</td>"]
        for c in cols:
            v = m.get(c)
            cls = ' class="best"' if v is not None and c in best and v == best[c] else ""
            cells.append(f"<td{cls}>{escape(_fmt(v, c in NOT_SCORES)) if v is not None else ''}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return f'<table class="metrics"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def _figure(f: Figure) -> str:
    cls = "wide" if f.wide else ""
    badge = f'<span class="badge {escape(f.tone)}">{escape(f.tone)}</span>' if f.tone else ""
    src = escape(Path(f.file).as_posix(), quote=True)
    size = f' style="width:{int(f.width)}px"' if f.width else ""
    cap = f' style="max-width:{int(f.width)}px"' if f.width else ""
    return (f'<figure class="{cls}"><img src="{src}" alt="{escape(f.alt or f.caption, quote=True)}"{size}>'
            f'<figcaption{cap}>{badge}{escape(f.caption)}</figcaption></figure>')


def _section(s: Section) -> str:
    parts = [f'<section id="{escape(s.id, quote=True)}"><h2>{escape(s.title)}</h2>']
    if s.intro:
        parts.append(f'<p class="intro">{escape(s.intro)}</p>')
    if s.table:
        parts.append(s.table)
    if not any(g.figures for g in s.groups) and s.empty:
        parts.append(f'<p class="empty">{escape(s.empty)}</p>')
    for g in s.groups:
        if g.title:
            parts.append(f"<h3>{escape(g.title)}</h3>")
        if g.intro:
            parts.append(f'<p class="intro">{escape(g.intro)}</p>')
        if g.figures:
            parts.append('<div class="gallery">' + "".join(_figure(f) for f in g.figures) + "</div>")
    parts.append("</section>")
    return "\n".join(parts)


def render_html(title: str, subtitle: str, notes: list[str], metrics: dict[str, dict[str, float]],
                sections: list[Section], params_text: str,
                per_class: dict[str, dict[str, float]] | None = None) -> str:
    """The whole page: header, notes, test metrics (and per class), the figure sections, the parameters."""
    nav = [("metrics", "Metrics")] + [(s.id, s.title.split(":")[0]) for s in sections] + [("params", "Parameters")]
    notes_html = "".join(f"<div>{escape(n)}</div>" for n in notes)
    body = [
        f"<header><h1>{escape(title)}</h1><p>{escape(subtitle)}</p></header>",
        "<nav>" + "".join(f'<a href="#{escape(i, quote=True)}">{escape(t)}</a>' for i, t in nav) + "</nav>",
        "<main>",
        f'<div class="notes">{notes_html}</div>' if notes else "",
        '<section id="metrics"><h2>Test metrics</h2>'
        '<p class="intro">Every evaluated model on the held-out test split.</p>'
        f"{metrics_table(metrics)}",
        ('<h3>Per class</h3><p class="intro">Each class against the rest; n: its test images.</p>'
         f'{metrics_table(per_class, first="model · class", mark_best=False)}' if per_class else ""),
        "</section>",
        *(_section(s) for s in sections),
        '<section id="params"><h2>Parameters</h2><p class="intro">The params.yaml values this run\'s outputs '
        'depend on (the how keys compute.engine, compute.ray_address and compute.strategy change none).</p>'
        f"<pre>{escape(params_text)}</pre></section>",
        "</main>",
    ]
    return ("<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{escape(title)}</title>"
            f"<style>{CSS}</style></head>\n<body>\n" + "\n".join(p for p in body if p) + "\n</body></html>\n")


def write_report(out_dir, html: str) -> Path:
    return atomic.write_bytes(Path(out_dir) / "index.html", html.encode("utf-8"))
