"""The visualize stage's work: pick a model and images, draw every visualisation, write the report.

Output: `<out>/index.html` and its images in `<out>/viz/`. Only those two are ours: `<out>` may
hold other stages' outputs (evaluate's `reports/predictions`), so the image folder is built under
a temp name and swapped in whole, then the page is written atomically.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from tlpipe import atomic
from tlpipe.runtime.errors import DataError, ModelFileError
from tlpipe.runtime.log import log
from tlpipe.report import page as rpt
from tlpipe.report.confusion import confusion_counts, save_confusion_png
from tlpipe.report.readers import read_lr_searches, read_metrics, read_per_class, read_training, read_tta
from tlpipe.tiles import tile_grid
from tlpipe.report.plotting import save_png

IMG_DIR = "viz"
FILTER_SIZE = 64    # filter patterns are computed at this size: cheap, and big enough to show texture
FILTER_SEED = 0     # no visualize.seed parameter: a fixed seed keeps reruns byte-identical
GRADCAM_PX = 180    # display size of each Grad-CAM image (the model's input may be as small as 32 px)
MODEL_ORDER = ["head", "head_aug", "finetuned"]
STAGE_ORDER = ["train_head", "head", "train_head_aug", "head_aug", "finetune", "finetuned"]


def choose_model(models_dir, wanted: str, metrics: dict[str, dict[str, float]]):
    """(name, path, note or None): `wanted`, else the best available trained model.

    Best: highest test accuracy in the metrics file, else the latest pipeline stage present.
    """
    models_dir = Path(models_dir)
    path = models_dir / f"{wanted}.keras"
    if path.is_file():
        return wanted, path, None
    present = sorted(p.stem for p in models_dir.glob("*.keras")) if models_dir.is_dir() else []
    if not present:
        raise ModelFileError(f"{path}: not found and no other model in {models_dir}/; "
                             "train one first (`dvc repro train_head`)")
    scored = [(metrics[m]["accuracy"], m) for m in present if "accuracy" in metrics.get(m, {})]
    if scored:
        name = max(scored, key=lambda t: (t[0], -present.index(t[1])))[1]
        why = f"the best test accuracy ({metrics[name]['accuracy']:.4f})"
    else:
        ranked = [m for m in MODEL_ORDER if m in present] or present
        name, why = ranked[-1], "the latest trained model"
    msg = f"visualize.model {wanted!r}: {path} not found; showing {name!r} instead, {why}"
    return name, models_dir / f"{name}.keras", msg


def select_images(spec, files: list[str], labels: list[int], paths: list[str], classes: list[str],
                  images_dir) -> list[tuple[str, str]]:
    """[(image file, caption)] for the activation gallery.

    `spec` int: that many test images, taking classes in turn (in manifest order) so every class
    shows. `spec` list: test-split source paths (as in test.csv) or image files on disk.
    """
    if isinstance(spec, int):
        by_class = [[i for i, y in enumerate(labels) if y == c] for c in range(len(classes))]
        chosen, k = [], 0
        while len(chosen) < min(spec, len(files)):
            for idx in by_class:
                if k < len(idx) and len(chosen) < spec:
                    chosen.append(idx[k])
            k += 1
        return [(files[i], f"{classes[labels[i]]}: {paths[i]}") for i in chosen]
    by_path = {p: i for i, p in enumerate(paths)}
    out = []
    for p in spec:
        if p in by_path:
            i = by_path[p]
            out.append((files[i], f"{classes[labels[i]]}: {p}"))
        elif Path(p).is_file():
            out.append((str(p), Path(p).name))
        else:
            raise DataError(f"visualize.images: {p!r} is neither a path of data/split/test.csv nor an "
                            "image file; use paths as written in test.csv, or a count")
    return out


def _load(files: list[str], size: int) -> np.ndarray:
    from tlpipe.features.inputs import read_resized

    if not files:
        return np.zeros((0, size, size, 3), np.float32)
    return np.stack([read_resized(str(f), size).numpy() for f in files])


def _confusion_section(plots_dir, img: Path, metrics, classes, tta: dict[str, str] | None = None) -> rpt.Section:
    figs = []
    found = sorted(Path(plots_dir, "confusion").glob("*.csv"))
    known = list(metrics)
    for csv in sorted(found, key=lambda p: (known.index(p.stem) if p.stem in known else len(known), p.stem)):
        labels, counts = confusion_counts(csv, classes)
        file = f"confusion_{csv.stem}.png"
        save_confusion_png(labels, counts, csv.stem, img / file)
        right = int(np.trace(counts))
        figs.append(rpt.Figure(f"{IMG_DIR}/{file}", f"{csv.stem}: {right} of {int(counts.sum())} test images "
                                                    "on the diagonal (rows: actual class)."))
    mirrored = sorted(m for m, how in (tta or {}).items() if how == "mirror")
    intro = "Counts of test images by actual (rows) and predicted (columns) class."
    if mirrored:
        intro += (f" Test-time augmentation ({', '.join(mirrored)}): each image's class probabilities are the mean "
                  "of the model's outputs for the image and for its mirror image (evaluate.tta).")
    return rpt.Section("confusion", "Confusion matrices", intro,
                       [rpt.Group("", figs)], empty=f"No confusion data in {plots_dir}/confusion/.")


def _curves_section(live_dir, train_metrics, img: Path) -> rpt.Section:
    from tlpipe.report.curves import save_curves

    recs = save_curves(live_dir, img, order=STAGE_ORDER)
    def dashed(best: int | None) -> str:
        if best is None:
            return "."
        return f"; dashed: the best epoch, {best}" + (": the start model, saved unchanged." if best == 0 else ".")

    figs = [rpt.Figure(f"{IMG_DIR}/{r['file']}", f"{r['stage']}: {', '.join(r['metrics'])} over "
                                                 f"{r['epochs']} epochs, train vs validation{dashed(r['best_epoch'])}",
                       wide=True)
            for r in recs]
    table = rpt.metrics_table(read_training(train_metrics), first="stage",
                              empty="No training metrics files.")
    intro = ("Per training stage: the best epoch (lowest validation loss, the one saved with "
             "train.keep: best) and its validation accuracy, and the learning rate (lr) and epochs it "
             "trained with, as set or as resolved from auto (finetune: lr a fixed fraction of its start model's rate, "
             "epochs from a budget of optimizer steps); then each epoch's figures, the best "
             "epoch dashed. A validation curve that turns up while the training one keeps falling is overfitting.")
    kept_start = [stage for stage, m in read_training(train_metrics).items() if m.get("best_epoch") == 0]
    if kept_start:
        # finetune under train.keep: best: no epoch beat its start model on validation loss.
        intro += (f" Best epoch 0 ({', '.join(kept_start)}): no epoch lowered the start model's validation "
                  "loss, so the start model was saved unchanged (its validation curves start at epoch 0, the "
                  "start model's figures).")
    for stage, rows in read_lr_searches(train_metrics).items():
        # head.lr: auto: the stage trained the head at each rate; the lowest validation loss won.
        intro += (f" {stage} chose its learning rate on validation (lr: auto): the rate whose best epoch had "
                  "the lowest validation loss, of the runs in the table below it.")
        table += rpt.metrics_table({f"{stage} lr {r['lr']:g}": {k: r[k] for k in ("best_epoch", "val_loss",
                                                                              "val_accuracy") if k in r}
                                    for r in rows}, first="learning-rate sweep")
    return rpt.Section("curves", "Training", intro,
                       [rpt.Group("", figs)], empty=f"No dvclive metrics under {live_dir}/.", table=table)


def _gradcam_section(model, name, predictions_dir, files, paths, classes, size, viz, img: Path):
    import pandas as pd

    from tlpipe.report.gradcam import gradcam, overlay, pick_examples

    csv = Path(predictions_dir) / f"{name}.csv"
    section = rpt.Section("gradcam", "Grad-CAM: where the model looks",
                          "Red regions raised the score of the predicted class most (last conv layer "
                          "unless visualize.gradcam_layer says otherwise). Per true class: the most confident "
                          "right answers, then the most confidently wrong ones.",
                          empty=f"No predictions file {csv}: run the evaluate stage first.")
    if not csv.is_file():
        log.info(f"{csv} not found: Grad-CAM gallery left empty (run `dvc repro evaluate`)")
        return section
    picked = pick_examples(pd.read_csv(csv), classes, viz.gradcam_per_class)
    file_of = dict(zip(paths, files))
    n = 0
    for c in classes:
        figs, mistakes = [], 0
        for category in ("right", "wrong"):
            rows = picked[(picked["true"] == c) & (picked["category"] == category)]
            for _, r in rows.iterrows():
                if r["path"] not in file_of:
                    raise DataError(f"{csv}: {r['path']!r} is not in the test split; rerun the evaluate stage")
                image = _load([file_of[r["path"]]], size)[0]
                heat = gradcam(model, image, classes.index(r["predicted"]), viz.gradcam_layer)
                pair = tile_grid(np.stack([image.round().astype(np.uint8), overlay(image, heat)]), cols=2, pad=4)
                file = f"gradcam_{n:03d}.png"
                n += 1
                save_png(pair, img / file)
                mistakes += category == "wrong"
                figs.append(rpt.Figure(f"{IMG_DIR}/{file}", f"true {r['true']}, predicted {r['predicted']} "
                                       f"(p={r['p_pred']:.3f}) — {r['path']}", tone=category,
                                       width=2 * max(size, GRADCAM_PX) + 4))
        intro = "" if mistakes else "No mistakes on this class in the test split."
        section.groups.append(rpt.Group(f"True class: {c}", figs, intro=intro))
    return section


def _cut_section(cut_path) -> rpt.Section:
    """The layer and pooling the features were taken at, and the linear probe's table (features.cut)."""
    from tlpipe.features.cut import read_cut

    c = read_cut(cut_path)
    rows = {f"{r['layer']} {r['pooling']}": {"dim": r["dim"], "val_accuracy": r["val_accuracy"],
                                             "val_loss": r["val_loss"]} for r in c.get("probe") or []}
    how = ("chosen by a linear probe (logistic regression on the training split, scored on validation)"
           if c.get("chosen_by") == "probe" else "named in params.yaml; its linear-probe score below")
    return rpt.Section("cut", "The cut", f"Features taken at {c['layer']}, pooling {c['pooling']}: {how}.",
                       table=rpt.metrics_table(rows, first="layer, pooling", empty="No probe ran."), empty="")


def build_report(models_dir, split_dir, images_dir, scores_path, train_metrics, predictions_dir, live_dir,
                 plots_dir, out_dir, viz, params_text: str, cut_path=None) -> Path:
    """Everything the visualize stage writes; `viz` is the params.yaml `visualize` section.

    scores_path: the evaluate stage's scores of every model (overall and per class);
    train_metrics: the training stages' metrics files (best epoch, validation accuracy);
    cut_path: features/cut.json (None: no section on the cut).
    """
    from tlpipe.config.choices import AUTO
    from tlpipe.data.manifests import manifest_rows, read_class_names
    from tlpipe.model.saved import load_model, model_info
    from tlpipe.report.activations import save_activation_grids
    from tlpipe.report.filters import auto_layers, save_filter_grids

    out_dir = Path(out_dir)
    metrics = read_metrics(scores_path)
    name, model_path, fallback = choose_model(models_dir, viz.model, metrics)
    notes = [fallback] if fallback else []
    if fallback:
        log.warning(fallback)
    model = load_model(model_path)
    info = model_info(model)
    classes, size = list(info["class_names"]), int(info["image_size"])
    split_classes = read_class_names(Path(split_dir) / "classes.json")
    if split_classes != classes:
        raise ModelFileError(f"{model_path}: trained for classes {classes}, data/split has {split_classes}; "
                             "rerun the training stages (`dvc repro`)")
    files, labels, paths = manifest_rows(Path(split_dir) / "test.csv", images_dir, classes)

    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic.folder(out_dir / IMG_DIR) as img:
        sections = ([_cut_section(cut_path)] if cut_path else []) + [
                    _confusion_section(plots_dir, img, metrics, classes, read_tta(scores_path)),
                    _curves_section(live_dir, train_metrics, img),
                    _gradcam_section(model, name, predictions_dir, files, paths, classes, size, viz, img)]

        chosen = select_images(viz.images, files, labels, paths, classes, images_dir)
        images = _load([f for f, _ in chosen], size)
        recs = save_activation_grids(model, images, [c for _, c in chosen], img, viz.layers)
        groups = []
        for i, (_, caption) in enumerate(chosen):
            save_png(images[i].round().astype(np.uint8), img / f"input_{i}.png")
            figs = [rpt.Figure(f"{IMG_DIR}/input_{i}.png", f"input ({size} px)", width=max(size, GRADCAM_PX))]
            figs += [rpt.Figure(f"{IMG_DIR}/{r['file']}", f"{r['layer']}: {r['channels']} channels, "
                                f"{r['shape'][0]}×{r['shape'][1]}") for r in recs if r["image"] == i]
            groups.append(rpt.Group(f"Image {i + 1} — {caption}", figs))
        sections.append(rpt.Section("activations", "Activations",
                                    f"Every channel of the first {viz.layers} conv/pool layers of the base, "
                                    "one tile per channel, each standardised for contrast.", groups))

        layers = auto_layers(model) if viz.filter_layers == AUTO else list(viz.filter_layers)
        frecs = save_filter_grids(model, layers, viz.filters, viz.filter_steps, img,
                                  size=FILTER_SIZE, seed=FILTER_SEED)
        sections.append(rpt.Section(
            "filters", "Filter patterns",
            f"The {FILTER_SIZE} px input each filter responds to most: {viz.filter_steps} steps of gradient "
            "ascent from grey noise.",
            [rpt.Group("", [rpt.Figure(f"{IMG_DIR}/{r['file']}", f"{r['layer']}: first {r['filters']} filters "
                                       f"(mean activation {r['start']:.3g} → {r['end']:.3g})")
                            for r in frecs])]))

        subtitle = (f"model {name} · backbone {info.get('backbone')} ({info.get('weights')}) · "
                    f"{size} px · classes: {', '.join(classes)}")
        html = rpt.render_html("tlpipe: what the network learned", subtitle, notes, metrics, sections, params_text,
                               read_per_class(scores_path))
    return rpt.write_report(out_dir, html)


def params_text(values: dict) -> str:
    """The run's parameters as YAML, in params.yaml's order (config.what_params: the how keys left out)."""
    import yaml

    return yaml.safe_dump(values, sort_keys=False, default_flow_style=False, width=100)

