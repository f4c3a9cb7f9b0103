"""End to end, once per cut `backbone.layer: auto` can choose (block3_pool, block4_pool, block5_pool):
the whole pipeline runs to the report with every default that depends on the cut or the data left
`auto` (finetune.unfreeze_from, visualize.filter_layers, visualize.gradcam_layer, head.lr,
head_aug.lr, finetune.lr, finetune.epochs), so no default can name a layer that a cut removes. The
probe's own choice is test_pipeline's run; the cut is named here, since generated images cannot make
the probe pick each one."""

from __future__ import annotations

import json

import h5py
import pytest

from helpers import dvc, make_project, read_model_info, set_params, stages_run

from tlpipe.config.choices import probe_layers
from tlpipe.train.finetune import auto_epochs, auto_lr

pytestmark = pytest.mark.slow

CUTS = probe_layers("vgg16")
ALL_STAGES = {"data", "extract", "train_head", "augment_preview", "viewcache", "train_head_aug", "finetune",
              "evaluate", "visualize"}


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    from imagegen import make_class_folders

    images = tmp_path_factory.mktemp("images")
    make_class_folders(images, classes={"circle": 8, "square": 8}, size=40, seed=3)
    # FAST_PARAMS keeps the images and epochs small; every cut- or data-dependent key is its default.
    # head_aug.epochs stays FAST_PARAMS' 2: its auto gives these 8 images 100 epochs per candidate rate
    # (tests/test_finetune.py runs it).
    auto = {"head": {"lr": "auto"}, "head_aug": {"lr": "auto"}, "finetune": {"lr": "auto", "epochs": "auto"},
            "visualize": {"filter_layers": "auto", "gradcam_layer": None}}
    return make_project(tmp_path_factory.mktemp("project"), images, {"backbone": {"layer": CUTS[0]}, **auto})


def test_the_cuts_are_the_probes():
    assert CUTS == ("block3_pool", "block4_pool", "block5_pool")


@pytest.mark.parametrize("cut", CUTS)
def test_every_stage_runs_with_the_defaults_at_each_cut(repo, cut):
    # finetune.epochs: auto gives these 8 images its cap of 30 one-step epochs: run once, then 2 (time).
    set_params(repo, {"backbone": {"layer": cut}, "finetune": {"epochs": "auto" if cut == CUTS[0] else 2}})
    proc = dvc(repo, "repro")
    ran = set(stages_run(proc))
    assert ran == (ALL_STAGES if cut == CUTS[0] else ALL_STAGES - {"data", "augment_preview"}), ran
    block = cut.split("_")[0]
    assert read_model_info(repo / "models" / "finetuned.keras")["trainable_from"] == f"{block}_conv1"
    with h5py.File(repo / "features" / "views.h5", "r") as f:  # the view cache stops where training starts
        assert f.attrs["boundary"] == f"block{int(block[-1]) - 1}_pool"
    # The filter gallery shows the first convolution of each block the model keeps, up to four.
    kept = ["block1", "block2", "block3", "block4", "block5"][: int(block[-1])][:4]
    page = (repo / "reports" / "index.html").read_text()
    for b in kept:
        assert f"{b}_conv1" in page
    # The values `auto` resolved are in the stages' metrics, where `dvc exp show` shows them.
    metrics = {stage: json.loads((repo / "metrics" / f"{stage}.json").read_text())
               for stage in ("train_head", "train_head_aug", "finetune")}
    head_aug_lr = metrics["train_head_aug"]["head_aug"]["lr_used"]
    assert [r["lr"] for r in metrics["train_head_aug"]["head_aug"]["lr_search"]].count(head_aug_lr) == 1
    assert metrics["finetune"]["finetuned"]["lr_used"] == pytest.approx(auto_lr(head_aug_lr))
    assert metrics["finetune"]["finetuned"]["epochs_used"] == (auto_epochs(8, 8) if cut == CUTS[0] else 2)
    assert "lr_search" in metrics["train_head"]["head"]
