"""The report: a fake run folder rendered by the visualize stage, then opened in headless Chromium."""
from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from tlpipe.report import page as rpt
from tlpipe.report import readers
from tlpipe.report.confusion import confusion_counts

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["cat", "dog"]
SIZE = 32
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


# -- pure pieces ----------------------------------------------------------------------------

def test_metrics_table_escapes_and_marks_the_best():
    html = rpt.metrics_table({"head": {"accuracy": 0.8, "loss": 0.5, "n": 100},
                              "<b>x</b>": {"accuracy": 0.9, "loss": 0.7, "n": 100}})
    assert "&lt;b&gt;x&lt;/b&gt;" in html and "<b>x</b>" not in html
    assert '<td class="best">0.9000</td>' in html    # higher accuracy is better
    assert '<td class="best">0.5000</td>' in html    # lower loss is better
    assert html.index("<th>accuracy</th>") < html.index("<th>loss</th>") < html.index("<th>n</th>")
    cols = rpt.metrics_table({"m": {"f1": 0.5, "n": 4, "zeta": 1.5, "loss": 0.3, "roc_auc": 0.7, "accuracy": 0.6}})
    assert [c.split("</th>")[0] for c in cols.split("<th>")[1:]] == ["model", "accuracy", "roc_auc", "loss", "f1",
                                                                       "n", "zeta"]
    assert "No test metrics" in rpt.metrics_table({})


def test_tables_read_the_scores_and_training_files(tmp_path):
    scores = tmp_path / "scores.json"
    scores.write_text(json.dumps({"head": {"accuracy": 0.5, "roc_auc": None, "n": 4, "per_class": {
        "cat": {"precision": 1.0, "recall": 0.25, "f1": 0.4, "n": 2}}}}))
    assert readers.read_metrics(scores) == {"head": {"accuracy": 0.5, "n": 4.0}}  # undefined AUC: no cell
    assert readers.read_per_class(scores) == {"head · cat": {"precision": 1.0, "recall": 0.25, "f1": 0.4, "n": 2.0}}
    (tmp_path / "train_head.json").write_text('{"head": {"best_epoch": 3, "val_accuracy": 0.75}}')
    got = readers.read_training([tmp_path / "train_head.json", tmp_path / "finetune.json"])
    assert got == {"train_head": {"best_epoch": 3.0, "val_accuracy": 0.75}}  # a missing file: no row
    (tmp_path / "bad.json").write_text("[1]")
    from tlpipe.runtime.errors import DataError
    with pytest.raises(DataError, match="bad.json: expected a JSON object; rerun the bad stage"):
        readers.read_training([tmp_path / "bad.json"])
    # Epochs are not scores: the later one is not marked best; per-class rows are never marked.
    html = rpt.metrics_table({"a": {"best_epoch": 3, "val_accuracy": 0.7},
                              "b": {"best_epoch": 9, "val_accuracy": 0.8}}, first="stage")
    assert "<th>stage</th>" in html and '<td class="best">0.8000</td>' in html and 'class="best">9' not in html
    assert "<td>1</td>" in rpt.metrics_table({"a": {"best_epoch": 1, "accuracy": 1.0}})  # accuracy: 1.0000
    assert 'class="best"' not in rpt.metrics_table({"a": {"f1": 0.1}, "b": {"f1": 0.9}}, mark_best=False)


def test_render_html_escapes_every_text():
    sec = rpt.Section("s", "A & B", "intro <i>", [rpt.Group("g\"1", [rpt.Figure("viz/a b.png", "cap <script>")])])
    page = rpt.render_html("T<", "sub>", ["note & more"], {}, [sec], "key: <value>")
    for raw in ["<script>", "<i>", "T<<", "key: <value>"]:
        assert raw not in page
    assert "cap &lt;script&gt;" in page and "key: &lt;value&gt;" in page and "note &amp; more" in page
    assert 'src="viz/a b.png"' in page


def test_confusion_counts(tmp_path):
    csv = tmp_path / "m.csv"
    csv.write_text("actual,predicted\ncat,cat\ncat,dog\ndog,dog\ndog,dog\nbird,dog\n")
    labels, counts = confusion_counts(csv, CLASSES)
    assert labels == ["cat", "dog", "bird"]  # a label outside the class list still counts
    assert counts.tolist() == [[1, 1, 0], [0, 2, 0], [0, 1, 0]]
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    from tlpipe.runtime.errors import DataError
    with pytest.raises(DataError, match="actual,predicted"):
        confusion_counts(bad, CLASSES)


# -- a fake run folder -----------------------------------------------------------------------

def _tiny_vgg():
    """VGG16's layout and layer names at a few channels: a real tlpipe model that loads in a blink."""
    import keras

    keras.utils.set_random_seed(0)
    inp = keras.Input((SIZE, SIZE, 3))
    x = inp
    for block, (convs, width) in enumerate([(2, 8), (2, 12), (1, 16)], start=1):
        for k in range(1, convs + 1):
            x = keras.layers.Conv2D(width, 3, padding="same", activation="relu", name=f"block{block}_conv{k}")(x)
        x = keras.layers.MaxPooling2D(name=f"block{block}_pool")(x)
    return keras.Model(inp, x, name="vgg16")


def _tlpipe_model(path: Path):
    from tlpipe.model.dense_head import build_head
    from tlpipe.model.saved import assemble, save_model

    base = _tiny_vgg()
    head = build_head(4 * 4 * 16, 2, units=8)
    info = {"class_names": CLASSES, "image_size": SIZE, "backbone": "vgg16", "weights": "none",
            "preprocessing": "caffe"}
    save_model(assemble(base, None, "flatten", head, info), path)


def _image(label: int, i: int) -> Image.Image:
    rng = np.random.default_rng(100 * label + i)
    a = rng.integers(0, 90, (40, 40, 3), dtype=np.uint8)
    a[8:24, 8:24, label] = 250  # a red or green square
    return Image.fromarray(a)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """What the pipeline leaves before the visualize stage: models, split, metrics, plots, dvclive."""
    root = tmp_path_factory.mktemp("run")
    _tlpipe_model(root / "models" / "head_aug.keras")
    (root / "data" / "images").mkdir(parents=True)
    rows, preds, confusion = [], [], []
    rng = np.random.default_rng(0)
    for label, c in enumerate(CLASSES):
        for i in range(4):
            file = f"{label}{i:02d}.png"
            _image(label, i).save(root / "data" / "images" / file)
            rows.append(f"{c}/{c}.{i}.jpg,{c},{label},{file[:-4]},{file}")
            p = float(rng.uniform())
            predicted = CLASSES[int(p >= 0.5)]
            preds.append(f"{c}/{c}.{i}.jpg,{c},{predicted},{1 - p:.6f},{p:.6f}")
            confusion.append(f"{c},{predicted}")
    split = root / "data" / "split"
    split.mkdir()
    (split / "test.csv").write_text("path,class_name,label,sha256,file\n" + "\n".join(rows) + "\n")
    (split / "classes.json").write_text(json.dumps({"classes": CLASSES}))
    (root / "reports" / "predictions").mkdir(parents=True)
    (root / "reports" / "predictions" / "head_aug.csv").write_text(
        "path,true,predicted,p_cat,p_dog\n" + "\n".join(preds) + "\n")
    per_class = {c: {"precision": 0.8, "recall": 0.9, "f1": 0.85, "n": 4} for c in CLASSES}
    (root / "reports" / "predictions" / "scores.json").write_text(json.dumps({
        "head": {"accuracy": 0.75, "loss": 0.52, "f1": 0.74, "n": 8, "roc_auc": None, "per_class": per_class},
        "head_aug": {"accuracy": 0.875, "loss": 0.41, "f1": 0.88, "n": 8, "roc_auc": 0.9, "per_class": per_class,
                     "tta": "mirror"}}))
    (root / "metrics").mkdir()
    (root / "metrics" / "train_head.json").write_text(json.dumps({"head": {"best_epoch": 4, "val_accuracy": 0.8125}}))
    (root / "metrics" / "train_head_aug.json").write_text(json.dumps({"head_aug": {"best_epoch": 2, "val_accuracy": 0.6875}}))
    (root / "plots" / "confusion").mkdir(parents=True)
    for m in ("head", "head_aug"):
        (root / "plots" / "confusion" / f"{m}.csv").write_text("actual,predicted\n" + "\n".join(confusion) + "\n")
    for stage in ("train_head", "train_head_aug"):
        for split_name in ("train", "val"):
            for metric in ("loss", "accuracy"):
                d = root / "dvclive" / stage / "plots" / "metrics" / split_name
                d.mkdir(parents=True, exist_ok=True)
                vals = [(0.9 if metric == "loss" else 0.5) * (0.9 ** e if metric == "loss" else 1 + 0.05 * e)
                        for e in range(5)]
                (d / f"{metric}.tsv").write_text(f"step\t{metric}\n" + "".join(f"{e}\t{v}\n" for e, v in enumerate(vals, 1)))
    from tlpipe.features.cut import write_cut

    write_cut(root / "features" / "cut.json", "block4_pool", "avg", "probe",
              [{"layer": "block4_pool", "pooling": "flatten", "dim": 8192, "val_accuracy": 0.8, "val_loss": 0.45},
               {"layer": "block4_pool", "pooling": "avg", "dim": 512, "val_accuracy": 0.84, "val_loss": 0.39}])
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["visualize"].update({"model": "finetuned", "images": 2, "layers": 4, "filters": 4, "filter_steps": 3,
                                "filter_layers": ["block1_conv1", "block3_conv1"], "gradcam_per_class": 1})
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return root


def _stage(root: Path, *args: str):
    """stages/visualize.py with its dvc.yaml defaults, run in `root` through run_stage like its
    __main__ does (in this interpreter: TensorFlow is loaded once for the whole file)."""
    import os
    import runpy

    from tlpipe.cli import run_stage

    stage = runpy.run_path(str(REPO / "stages" / "visualize.py"), run_name="visualize_stage")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        run_stage(stage["main"], list(args))
    finally:
        os.chdir(cwd)


@pytest.fixture(scope="module")
def rendered(run_dir) -> Path:
    _stage(run_dir)
    return run_dir / "reports"


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.imgs, self.ids, self.tables, self.cells, self.text = [], [], 0, [], []
        self._in_td = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.imgs.append(a.get("src"))
        if "id" in a:
            self.ids.append(a["id"])
        if tag == "table" and "metrics" in (a.get("class") or ""):
            self.tables += 1
        self._in_td = tag in ("td", "th")

    def handle_data(self, data):
        if self._in_td:
            self.cells.append(data.strip())
        self.text.append(data)


def _parse(html: str) -> _Page:
    p = _Page()
    p.feed(html)
    return p


def test_report_page_and_images(rendered):
    page = _parse((rendered / "index.html").read_text())
    assert page.ids[:1] == ["metrics"] and {"cut", "confusion", "curves", "gradcam", "activations", "filters",
                                            "params"} <= set(page.ids)
    # test scores, per class, the probe's table, training: finetune.json is absent, so two training stages
    assert page.tables == 4 and {"head", "head_aug", "0.8750", "0.4100", "0.8800"} <= set(page.cells)
    assert {"block4_pool flatten", "block4_pool avg", "8192", "0.8400", "0.3900"} <= set(page.cells)
    assert {"head_aug · cat", "head · dog", "0.8500"} <= set(page.cells)
    assert {"train_head", "train_head_aug", "0.8125", "0.6875", "4", "2"} <= set(page.cells)
    assert "finetune" not in page.cells
    text = " ".join(page.text)
    # visualize.model is "finetuned", absent: the best model present is shown, with a note
    assert "showing 'head_aug' instead, the best test accuracy" in text and "true cat, predicted" in text
    assert "filter_steps: 3" in text  # the parameters block
    assert "Features taken at block4_pool, pooling avg: chosen by a linear probe" in text
    # evaluate.tta as scores.json records it: head_aug's test outputs were mirror-averaged, head's were not
    assert "Test-time augmentation (head_aug): each image's class probabilities are the mean" in text
    assert "mirror" not in page.cells  # a how, not a score: no column in the tables
    srcs = page.imgs
    import pandas as pd
    pred = pd.read_csv(rendered / "predictions" / "head_aug.csv")
    right = pred["true"] == pred["predicted"]
    cams = sum(min(1, int(((pred["true"] == c) & ok).sum())) for c in CLASSES for ok in (right, ~right))
    assert len(srcs) == 2 + 2 + cams + 2 * (1 + 4) + 2  # confusion, curves, grad-cam, inputs + 4 layers, filters
    assert sum(s.startswith("viz/gradcam_") for s in srcs) == cams
    on_disk = sorted(p.relative_to(rendered).as_posix() for p in (rendered / "viz").iterdir())
    assert sorted(srcs) == on_disk  # every image is used, every link resolves, nothing stale
    for s in srcs:
        assert not s.startswith(("/", "http")), s
        with Image.open(rendered / s) as im:
            im.load()
            assert im.width >= 32 and im.height >= 32
    # the activation grid of block2_conv1: 12 channels of 16 x 16 px maps enlarged to 32, one row
    with Image.open(rendered / "viz" / "act_0_block2_conv1.png") as im:
        assert im.size == (12 * 32 + 11, 32)
    assert (rendered / "predictions" / "head_aug.csv").is_file()  # evaluate's output is left alone
    assert not [p for p in rendered.iterdir() if p.name.startswith(".")]
    # Ordinary permissions (they once came out 0600 via mkstemp), as a plain open()/mkdir would give.
    mask = os.umask(0)
    os.umask(mask)
    assert {stat.S_IMODE(p.stat().st_mode) for p in (rendered / "viz").iterdir()} | \
        {stat.S_IMODE((rendered / "index.html").stat().st_mode)} == {0o666 & ~mask}
    assert stat.S_IMODE((rendered / "viz").stat().st_mode) == 0o777 & ~mask


def test_report_is_reproducible(rendered, run_dir, tmp_path):
    before = {p.relative_to(rendered): p.read_bytes() for p in rendered.rglob("*.png")}
    before[Path("index.html")] = (rendered / "index.html").read_bytes()
    out = tmp_path / "again"
    _stage(run_dir, "--out", str(out))
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*.png")}
    after[Path("index.html")] = (out / "index.html").read_bytes()
    assert after.keys() == before.keys()
    assert [k for k in before if before[k] != after[k]] == []


def test_missing_model_is_one_clear_error(run_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        _stage(run_dir, "--models", str(tmp_path / "none"), "--out", str(tmp_path / "r"))
    assert exit_.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "finetuned.keras: not found" in err[-1]
    assert not (tmp_path / "r" / "index.html").exists()


CHECK = """<script>
window.addEventListener('load', () => {
  const bad = [...document.images].filter(i => !i.complete || i.naturalWidth === 0).map(i => i.getAttribute('src'));
  document.body.setAttribute('data-images', document.images.length);
  document.body.setAttribute('data-broken', bad.join(' '));
});
</script>"""


def _chromium(*args: str, user_dir: Path) -> subprocess.CompletedProcess:
    return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                           "--disable-component-update", "--disable-sync", "--no-first-run",
                           f"--user-data-dir={user_dir}", "--hide-scrollbars", *args],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install -y chromium)")
def test_page_loads_in_a_browser(rendered, tmp_path):
    # a test-only copy of the page with a load check beside the original (same relative links)
    check = rendered / "_check.html"
    check.write_text((rendered / "index.html").read_text().replace("</body>", CHECK + "</body>"))
    try:
        dom = _chromium("--virtual-time-budget=10000", "--dump-dom", check.as_uri(), user_dir=tmp_path / "u1")
    finally:
        check.unlink()
    assert dom.returncode == 0, dom.stderr[-2000:]
    page = _parse(dom.stdout)
    assert page.tables == 4 and "head_aug" in page.cells
    assert 'data-broken=""' in dom.stdout and f'data-images="{len(page.imgs)}"' in dom.stdout
    shot = tmp_path / "shot.png"
    res = _chromium(f"--screenshot={shot}", "--window-size=1280,2400", (rendered / "index.html").as_uri(),
                    user_dir=tmp_path / "u2")
    assert res.returncode == 0 and shot.is_file(), res.stderr[-2000:]
    with Image.open(shot) as im:
        a = np.asarray(im.convert("RGB"))
    assert a.shape[:2] == (2400, 1280) and a.std() > 20  # a rendered page, not a blank one


def test_curves_read_whatever_dvclive_wrote(tmp_path):
    from tlpipe.report.curves import read_stage_metrics, save_curves, split_metric_name

    assert split_metric_name("train/loss") == ("loss", "train")
    assert split_metric_name("val/accuracy") == ("accuracy", "validation")
    assert split_metric_name("val_loss") == ("loss", "validation")
    assert split_metric_name("accuracy") == ("accuracy", "train")
    d = tmp_path / "live" / "finetune" / "plots" / "metrics"
    d.mkdir(parents=True)
    (d / "loss.tsv").write_text("timestamp\tstep\tloss\n1\t1\t0.9\n2\t2\t0.7\n3\t3\t0.6\n")
    (d / "val_loss.tsv").write_text("timestamp\tstep\tval_loss\n1\t1\t1.0\n2\t2\t0.8\n3\t3\t0.9\n")
    (d / "lr.tsv").write_text("step\tlr\n")  # no rows yet: skipped
    m = read_stage_metrics(d.parent.parent)
    assert list(m) == ["loss"] and m["loss"]["validation"].tolist() == [1.0, 0.8, 0.9]
    assert m["loss"]["train"].index.tolist() == [1, 2, 3]  # the step is the epoch, from 1
    recs = save_curves(tmp_path / "live", tmp_path / "out")
    assert [(r["stage"], r["epochs"], r["best_epoch"]) for r in recs] == [("finetune", 3, 2)]
    assert Image.open(tmp_path / "out" / recs[0]["file"]).size[0] > 300
    assert save_curves(tmp_path / "nothing", tmp_path / "out") == []


def test_select_images_and_model_fallback(tmp_path):
    from tlpipe.runtime.errors import DataError, ModelFileError
    from tlpipe.report.build import choose_model, select_images

    files, labels = ["f0", "f1", "f2", "f3", "f4"], [0, 0, 0, 1, 1]
    paths = ["cat/a", "cat/b", "cat/c", "dog/d", "dog/e"]
    got = select_images(3, files, labels, paths, CLASSES, tmp_path)
    assert [f for f, _ in got] == ["f0", "f3", "f1"]  # classes take turns
    assert len(select_images(99, files, labels, paths, CLASSES, tmp_path)) == 5
    own = tmp_path / "mine.png"
    own.write_bytes(b"x")
    assert select_images(["dog/e", str(own)], files, labels, paths, CLASSES, tmp_path) == [
        ("f4", "dog: dog/e"), (str(own), "mine.png")]
    with pytest.raises(DataError, match="visualize.images.*nope"):
        select_images(["nope"], files, labels, paths, CLASSES, tmp_path)

    models = tmp_path / "models"
    with pytest.raises(ModelFileError, match="finetuned.keras: not found"):
        choose_model(models, "finetuned", {})
    models.mkdir()
    for m in ("head", "head_aug"):
        (models / f"{m}.keras").write_bytes(b"")
    assert choose_model(models, "head", {})[::2] == ("head", None)
    assert choose_model(models, "finetuned", {})[0] == "head_aug"  # latest stage without metrics
    name, _, msg = choose_model(models, "finetuned", {"head": {"accuracy": 0.9}, "head_aug": {"accuracy": 0.8}})
    assert name == "head" and "best test accuracy (0.9000)" in msg


def test_curves_mark_the_best_epoch_as_training_defines_it():
    """Lowest validation loss, the earliest on ties (train.loop.summarize), dashed in every panel with
    a legend entry; none without a validation loss curve."""
    import pandas as pd

    from tlpipe.report.curves import best_epoch, plot_stage
    from tlpipe.train.loop import summarize

    val = [0.9, 0.5, 0.7, 0.5, 0.6]
    metrics = {"loss": {"train": pd.Series([1.0, 0.8, 0.6, 0.5, 0.4], index=range(1, 6)),
                        "validation": pd.Series(val, index=range(1, 6))},
               "accuracy": {"validation": pd.Series([0.5, 0.6, 0.7, 0.8, 0.9], index=range(1, 6))}}
    assert best_epoch(metrics) == 2 == summarize([{"val_loss": v} for v in val])["best_epoch"]
    fig = plot_stage(metrics, "finetune")
    for ax in fig.axes:
        labels = ax.get_legend_handles_labels()[1]
        assert "best epoch 2 (lowest val loss)" in labels
        line = next(l for l in ax.get_lines() if l.get_label().startswith("best epoch"))
        assert list(line.get_xdata()) == [2, 2]
    assert best_epoch({"accuracy": metrics["accuracy"]}) is None
    assert not any(l.get_label().startswith("best") for ax in plot_stage({"accuracy": metrics["accuracy"]}, "x").axes
                   for l in ax.get_lines())


def test_curves_show_a_start_model_logged_at_step_0_and_dash_it_where_kept(tmp_path):
    """Fine-tuning logs its start model's validation figures at step 0 (train.keep: best counts it as
    epoch 0): where no epoch beats it, the dashed best epoch is 0, the model saved; the epochs counted are
    the trained ones."""
    from tlpipe.report.curves import plot_stage, read_stage_metrics, save_curves

    d = tmp_path / "live" / "finetune" / "plots" / "metrics"
    for split, rows in (("train", {1: 0.5, 2: 0.4, 3: 0.3}), ("val", {0: 0.60, 1: 0.9, 2: 0.7, 3: 0.65})):
        (d / split).mkdir(parents=True)
        (d / split / "loss.tsv").write_text("step\tloss\n" + "".join(f"{e}\t{v}\n" for e, v in rows.items()))
    recs = save_curves(tmp_path / "live", tmp_path / "out")
    assert [(r["epochs"], r["best_epoch"]) for r in recs] == [(3, 0)]
    ax = plot_stage(read_stage_metrics(d.parent.parent), "finetune").axes[0]
    line = next(l for l in ax.get_lines() if l.get_label().startswith("best"))
    assert list(line.get_xdata()) == [0, 0] and line.get_label().startswith("best: epoch 0, the start model")
    # An epoch below the start: that epoch is dashed, as without a start row.
    (d / "val" / "loss.tsv").write_text("step\tloss\n0\t0.6\n1\t0.9\n2\t0.5\n3\t0.65\n")
    assert [r["best_epoch"] for r in save_curves(tmp_path / "live", tmp_path / "out")] == [2]

def test_training_section_says_when_finetune_kept_its_start_model(tmp_path):
    from tlpipe.report.build import _curves_section

    files = []
    for stage, model, best in (("train_head", "head", 3), ("finetune", "finetuned", 0)):
        files.append(tmp_path / f"{stage}.json")
        files[-1].write_text(json.dumps({model: {"best_epoch": best, "val_accuracy": 0.8, "lr_used": 1e-4,
                                                 "epochs_used": 4}}))
    (tmp_path / "img").mkdir()
    intro = _curves_section(tmp_path / "live", files, tmp_path / "img").intro
    assert "Best epoch 0 (finetune): no epoch lowered the start model's validation loss" in intro
    intro = _curves_section(tmp_path / "live", files[:1], tmp_path / "img").intro
    assert "Best epoch 0" not in intro
