"""A grid search on validation with DVC experiments (docs/results.md, "Chosen on validation").

Queues one experiment per combination (`dvc exp run --queue`, DVC expands comma lists into a
grid), runs the queue one at a time (`dvc exp run --run-all -j 1`: queued runs reuse every cached
stage, so only the stages the grid's params reach rerun), then prints a Markdown table from
`dvc exp show --json`: per experiment the grid's params, each training stage's best epoch and
validation accuracy, the wall time, and the test accuracies labelled as the record (never the
choice). The row with the best validation accuracy of the last training stage run is marked; on
a tie, the one whose best epoch came first (it got there with less training).

Run it in a project whose baseline commit holds the settings under study (data.source etc.):

    python bench/grid.py train_head_aug -S head_aug.lr=2e-5,1e-4,3e-4 -S head_aug.epochs=60
    python bench/grid.py finetune -S finetune.lr=1e-5,3e-5,1e-4
    python bench/grid.py --show exp-a exp-b     # the table of experiments already run
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers import experiments  # noqa: E402  (tests/helpers.py: reads `dvc exp show --json`)

TRAINING = (("train_head", "metrics/train_head.json", "head"),
            ("train_head_aug", "metrics/train_head_aug.json", "head_aug"),
            ("finetune", "metrics/finetune.json", "finetuned"))
MODELS = tuple(model for _, _, model in TRAINING)
DVC = [sys.executable, "-m", "dvc"]


def dvc(*args: str) -> str:
    proc = subprocess.run([*DVC, *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"dvc {' '.join(args)} failed:\n{proc.stdout}{proc.stderr}")
    return proc.stdout + proc.stderr


def flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in (d or {}).items():
        if isinstance(v, dict):
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def runs(show: list) -> dict[str, dict]:
    """{name: {"params" (flattened), "metrics" ({path: data}), "timestamp", "error"}} from `dvc exp show --json`."""
    out = {}
    for name, exp in experiments(show).items():
        data = exp["data"]
        out[name] = {"params": flat((data.get("params") or {}).get("params.yaml", {}).get("data")),
                     "metrics": {path: (m or {}).get("data") or {} for path, m in (data.get("metrics") or {}).items()},
                     "timestamp": data.get("timestamp"), "error": exp["error"]}
    return out


def grid_keys(sets: list[str]) -> list[str]:
    return [s.partition("=")[0] for s in sets]


def pct(v) -> str:
    return "-" if v is None else f"{100 * float(v):.1f}%"


def table(rows: dict[str, dict], keys: list[str], started: float | None = None) -> str:
    """Markdown: one row per experiment, in the order given. Wall time = the gap between finish
    times (the queue runs one at a time); the first from `started`."""
    stages = [t for t in TRAINING if any(t[2] in r["metrics"].get(t[1], {}) for r in rows.values())]
    last = stages[-1] if stages else None
    got = {n: (r["metrics"].get(last[1], {}).get(last[2], {}) or {}) if last else {} for n, r in rows.items()}
    best = max((n for n in rows if got[n].get("val_accuracy") is not None),
               key=lambda n: (round(got[n]["val_accuracy"], 6), -got[n].get("best_epoch", 0)), default=None)
    head = ["experiment", *keys]
    for _, _, model in stages:
        head += [f"{model} best epoch", f"{model} val acc"]
    tested = [m for m in MODELS if any(m in r["metrics"].get("metrics/evaluate.json", {}) for r in rows.values())]
    head += ["wall", *[f"{m} test acc (record)" for m in tested]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    prev = started
    for name, r in rows.items():
        cells = [f"**{name}**" if name == best else name, *[str(r["params"].get(k, "?")) for k in keys]]
        for _, path, model in stages:
            m = r["metrics"].get(path, {}).get(model, {}) or {}
            cells += [str(m.get("best_epoch", "-")), pct(m.get("val_accuracy"))]
        t = datetime.fromisoformat(r["timestamp"]).timestamp() if r.get("timestamp") else None
        cells.append(f"{(t - prev) / 60:.1f} min" if t and prev else "-")
        prev = t or prev
        ev = r["metrics"].get("metrics/evaluate.json", {})
        cells += [pct((ev.get(m) or {}).get("accuracy")) for m in tested]
        lines.append("| " + " | ".join(cells) + " |")
    if best:
        lines.append(f"\nBest on validation ({last[2]} val acc, then the earlier best epoch): {best}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("target", nargs="?", help="the last stage to run (default: the whole pipeline)")
    ap.add_argument("-S", "--set-param", dest="sets", action="append", default=[],
                    help="key=v1,v2,... as `dvc exp run -S` takes it; several make a grid")
    ap.add_argument("--show", nargs="+", metavar="EXP", help="print the table of these experiments, run nothing")
    args = ap.parse_args(argv)
    started = None
    if args.show:
        names = args.show
    else:
        if not args.sets:
            ap.error("give at least one -S key=v1,v2")
        out = dvc("exp", "run", "--queue", *[a for s in args.sets for a in ("-S", s)],
                  *([args.target] if args.target else []))
        names = re.findall(r"Queued experiment '([^']+)'", out)
        if not names:
            raise SystemExit(f"nothing queued:\n{out}")
        print(f"queued {len(names)}: {', '.join(names)}", file=sys.stderr)
        started = time.time()
        # DVC's logs go to stderr: stdout is the table alone.
        subprocess.run([*DVC, "exp", "run", "--run-all", "-j", "1"], check=False, stdout=sys.stderr)
    found = runs(json.loads(dvc("exp", "show", "--json")))
    missing = [n for n in names if n not in found]
    if missing:
        print(f"not in `dvc exp show`: {', '.join(missing)}", file=sys.stderr)
    rows = {n: found[n] for n in names if n in found}
    failed = [n for n, r in rows.items() if r["error"]]
    if failed:
        print(f"failed: {', '.join(failed)} (see `dvc queue logs <name>`)", file=sys.stderr)
    keys = grid_keys(args.sets) or sorted({k for r in rows.values() for k in r["params"]
                                           if len({str(x["params"].get(k)) for x in rows.values()}) > 1})
    print(table(rows, keys, started))
    return 1 if failed or missing else 0


if __name__ == "__main__":
    sys.exit(main())
