"""The HTML report: one self-contained page, images beside it (relative links), no scripts.

`render_html` is pure (data in, text out; every piece of text HTML-escaped); `write_report` writes
it atomically. Confusion matrices are rendered here from dvc's plot CSVs (`actual,predicted`).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from html import escape
from pathlib import Path

import numpy as np
import pandas as pd

from tlpipe import atomic
from tlpipe.errors import DataError
from tlpipe.report.plotting import new_figure, save_figure


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


# -- data ---------------------------------------------------------------------------------------

def _read_json(path, stage: str):
    """The parsed file, or None when it does not exist."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({e}); rerun the {stage} stage") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object; rerun the {stage} stage")
    return data


def _numbers(d: dict, prefix: str = "") -> dict[str, float]:
    """The numeric leaves of a JSON object, nested keys joined by '.' (as `dvc metrics show` names them)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_numbers(v, f"{prefix}{k}."))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[f"{prefix}{k}"] = float(v)
    return out


def read_metrics(path) -> dict[str, dict[str, float]]:
    """The evaluate stage's scores file -> {model: {metric: number}} (per-class figures left out)."""
    data = _read_json(path, "evaluate") or {}
    return {str(model): _numbers({k: v for k, v in m.items() if k != "per_class"})
            for model, m in data.items() if isinstance(m, dict)}


def read_per_class(path) -> dict[str, dict[str, float]]:
    """The evaluate stage's scores file -> {"model · class": {precision, recall, f1, n}}."""
    data = _read_json(path, "evaluate") or {}
    return {f"{model} · {cls}": _numbers(v) for model, m in data.items() if isinstance(m, dict)
            for cls, v in (m.get("per_class") or {}).items() if isinstance(v, dict)}


def read_training(paths) -> dict[str, dict[str, float]]:
    """{stage (the file's name): {best_epoch, val_accuracy, ...}} of the training stages' metrics
    files that exist, in the given order. A file holds its figures under the model's name
    ({"head": {...}}, see train.loop.metrics_of); that one level is unwrapped."""
    out = {}
    for path in paths:
        data = _read_json(path, Path(path).stem)
        if data is not None:
            if len(data) == 1 and isinstance(next(iter(data.values())), dict):
                data = next(iter(data.values()))
            out[Path(path).stem] = _numbers(data)
    return out


def confusion_counts(csv, class_names: list[str] | None = None) -> tuple[list[str], np.ndarray]:
    """(labels, counts[actual, predicted]) from a CSV with one row per sample: actual,predicted."""
    csv = Path(csv)
    try:
        df = pd.read_csv(csv, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise DataError(f"{csv}: not a confusion CSV ({e}); rerun the evaluate stage") from None
    if not {"actual", "predicted"} <= set(df.columns):
        raise DataError(f"{csv}: needs columns actual,predicted; has {list(df.columns)}")
    seen = sorted(set(df["actual"]) | set(df["predicted"]))
    labels = list(class_names or []) + [x for x in seen if x not in (class_names or [])]
    pos = {name: i for i, name in enumerate(labels)}
    counts = np.zeros((len(labels), len(labels)), dtype=np.int64)
    np.add.at(counts, (df["actual"].map(pos).to_numpy(int), df["predicted"].map(pos).to_numpy(int)), 1)
    return labels, counts


def save_confusion_png(labels: list[str], counts: np.ndarray, title: str, path) -> Path:
    n = len(labels)
    side = max(3.2, 0.9 * n + 1.8)
    fig = new_figure(side + 0.8, side)
    ax = fig.subplots()
    im = ax.imshow(counts, cmap="Blues", vmin=0)
    ax.set_xticks(range(n), labels, rotation=45 if n > 3 else 0, ha="right" if n > 3 else "center")
    ax.set_yticks(range(n), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    ax.set_title(title)
    top = counts.max() if counts.size else 0
    for (i, j), v in np.ndenumerate(counts):
        ax.text(j, i, str(v), ha="center", va="center", color="white" if v > top / 2 else "black")
    fig.colorbar(im, ax=ax, shrink=0.8)
    return save_figure(fig, path)


# -- html ---------------------------------------------------------------------------------------

CSS = """
:root { --fg:#1f2328; --muted:#59636e; --line:#d1d9e0; --bg:#f6f8fa; --accent:#0969da; }
* { box-sizing: border-box; }
body { margin:0; font:15px/1.5 -apple-system,"Segoe UI",Helvetica,Arial,sans-serif; color:var(--fg); }
header { background:#24292f; color:#fff; padding:22px 32px 16px; }
header h1 { margin:0 0 4px; font-size:26px; }
header p { margin:0; color:#d0d7de; }
nav { position:sticky; top:0; background:#fff; border-bottom:1px solid var(--line); padding:8px 32px; z-index:1; }
nav a { color:var(--accent); text-decoration:none; margin-right:18px; font-weight:600; }
main { padding:8px 32px 40px; max-width:1500px; }
section { margin-top:26px; }
h2 { font-size:21px; border-bottom:1px solid var(--line); padding-bottom:6px; margin-bottom:10px; }
h3 { font-size:16px; margin:18px 0 8px; }
.intro, .empty { color:var(--muted); margin:4px 0 10px; max-width:70em; }
.notes { background:#fff8c5; border:1px solid #d4a72c; border-radius:6px; padding:8px 14px; margin:14px 0 0; color:#3b2300; }
table.metrics { border-collapse:collapse; margin:6px 0; }
table.metrics th, table.metrics td { border:1px solid var(--line); padding:6px 14px; text-align:right; font-variant-numeric:tabular-nums; }
table.metrics th { background:var(--bg); }
table.metrics td:first-child, table.metrics th:first-child { text-align:left; font-weight:600; }
table.metrics td.best { font-weight:700; background:#dafbe1; }
.gallery { display:flex; flex-wrap:wrap; gap:14px; align-items:flex-start; }
figure { margin:0; border:1px solid var(--line); border-radius:6px; padding:8px; background:#fff; max-width:100%; }
figure img { display:block; max-width:100%; height:auto; image-rendering:auto; }
figure.wide { flex-basis:100%; }
figcaption { font-size:13px; color:var(--muted); margin-top:6px; max-width:48em; }
.badge { display:inline-block; border-radius:10px; padding:0 8px; font-size:12px; font-weight:600; margin-right:6px; color:#fff; }
.badge.right { background:#1a7f37; } .badge.wrong { background:#cf222e; }
pre { background:var(--bg); border:1px solid var(--line); border-radius:6px; padding:12px; overflow:auto; font-size:13px; }
"""


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
