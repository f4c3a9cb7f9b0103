"""End to end: fine-tuning follows the cut. Every backbone.layer x finetune.unfreeze_from that params
validation accepts runs the whole pipeline (`dvc repro`, generated images); one it refuses stops every
stage before any work, naming both keys. (Each cut with unfreeze_from auto is test_every_cut.py's run;
backbone.layer auto with auto is test_pipeline's; every pair's model, without DVC, is
test_cut_combinations.py's.)"""

from __future__ import annotations

import h5py
import pytest

from helpers import dvc, make_project, set_params, sh, stage_cmd, stages_run, user_lines

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    from imagegen import make_class_folders

    images = tmp_path_factory.mktemp("images")
    make_class_folders(images, classes={"circle": 8, "square": 8}, size=40, seed=1)
    repo = make_project(tmp_path_factory.mktemp("project"), images, {"backbone": {"layer": "block4_pool"}})
    dvc(repo, "repro", "train_head", "augment_preview")  # the stages no unfreeze_from changes, run once
    return repo


def trained_from(repo) -> tuple[str, str]:
    """(the view cache's boundary, the finetuned model's first trainable base layer)."""
    from helpers import read_model_info

    with h5py.File(repo / "features" / "views.h5", "r") as f:
        boundary = f.attrs["boundary"]
    return boundary, read_model_info(repo / "models" / "finetuned.keras")["trainable_from"]


def test_an_explicit_layer_inside_the_kept_base(repo):
    # `dvc repro evaluate`: visualize, the slowest stage, adds nothing here (test_every_cut runs it).
    set_params(repo, {"finetune": {"unfreeze_from": "block4_conv2"}})  # mid-block: no residual anywhere
    ran = set(stages_run(dvc(repo, "repro", "evaluate")))
    assert {"viewcache", "train_head_aug", "finetune", "evaluate"} <= ran and not ran & {"data", "extract"}, ran
    assert trained_from(repo) == ("block4_conv1", "block4_conv2")
    # Across a block boundary: the cache stops inside block 3 and fine-tuning trains on into block 4.
    set_params(repo, {"finetune": {"unfreeze_from": "block3_conv2"}})
    ran = set(stages_run(dvc(repo, "repro", "evaluate")))
    assert {"viewcache", "train_head_aug", "finetune", "evaluate"} <= ran and not ran & {"data", "extract"}, ran
    assert trained_from(repo) == ("block3_conv1", "block3_conv2")


def test_a_layer_after_the_cut_stops_every_stage_before_any_work(repo):
    set_params(repo, {"finetune": {"unfreeze_from": "block5_conv1"}})
    proc = dvc(repo, "repro", check=False)
    assert proc.returncode != 0
    message = ("error: params.yaml: invalid parameters:", "finetune.unfreeze_from: 'block5_conv1' lies after the "
               "cut (backbone.layer: block4_pool)")
    assert all(m in proc.stderr for m in message), proc.stderr
    assert "residual" not in proc.stderr
    # The first stage to rerun (viewcache; DVC removed its old output) stopped before its first image.
    assert stages_run(proc) == ["viewcache"] and "view cache ->" not in proc.stderr
    assert not (repo / "features" / ".views.h5.work").exists()
    # Even the data stage, which reads only `data`, refuses before touching anything.
    data = sh(stage_cmd("data", "--images", "tmp_images", "--out", "tmp_split"), repo, check=False)
    assert data.returncode == 1 and not (repo / "tmp_images").exists()
    assert [line for line in user_lines(data.stderr) if line.startswith("error:")][0] == message[0]
