"""`tlpipe predict`: CSV output, unreadable files, the model's own image size, --evaluate."""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
from PIL import Image  # noqa: E402

from imagegen import (make_class_folders, write_animated_gif, write_exif_rotated_jpeg, write_image,  # noqa: E402
                      write_text_as_image, write_truncated_jpeg, write_zero_byte)
from tlpipe.features import pretrained
from tlpipe.model import dense_head
from tlpipe.features import inputs
from tlpipe.model import saved  # noqa: E402
from tlpipe.cli import run_stage  # noqa: E402
from tlpipe.cli import predict as cmd  # noqa: E402
from tlpipe.runtime.errors import DataError, ModelFileError  # noqa: E402

CLASSES = ["circle", "square", "stripes"]


def build_model(path: Path, class_names: list[str], image_size: int, seed: int = 0) -> Path:
    """A tiny random tlpipe classifier: VGG16 (random weights) cut at block2_pool, avg-pooled, dense head."""
    base = pretrained.build_base("vgg16", "none", image_size, seed=seed)
    head = dense_head.build_head(128, len(class_names), units=8, dropout=0.0, seed=seed)
    info = {"class_names": class_names, "image_size": image_size, "backbone": "vgg16", "weights": "none",
            "pooling": "avg", "preprocessing": "caffe"}
    return saved.save_model(saved.assemble(base, "block2_pool", "avg", head, info), path)


@pytest.fixture(scope="module")
def model3(tmp_path_factory) -> Path:
    return build_model(tmp_path_factory.mktemp("m3") / "head.keras", CLASSES, 32)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("imgs")
    make_class_folders(root, {c: 3 for c in CLASSES}, size=48, seed=1)
    return root


def reference_probs(model_path: Path, files: list[Path], image_size: int, mirror: bool = True) -> np.ndarray:
    """Independent route: the training loader (tlpipe.inputs) + model.predict on every file at once;
    mirror (predict's default --tta): the mean with the outputs for the images flipped left to right."""
    model = saved.load_model(model_path)
    batch = np.stack([inputs.read_resized(str(f), image_size).numpy() for f in files])
    out = np.asarray(model.predict(batch, verbose=0), dtype=np.float64)
    if mirror:
        out = (out + np.asarray(model.predict(np.flip(batch, axis=2), verbose=0), dtype=np.float64)) / 2
    return np.concatenate([1 - out, out], axis=1) if out.shape[1] == 1 else out


def read_csv(text: str) -> list[dict]:
    return list(csv.DictReader(io.StringIO(text)))


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    """Run the command as the CLI does; (exit status, stdout, stderr)."""
    try:
        run_stage(cmd.main, argv)
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_csv_columns_probabilities_and_order(model3, images, tmp_path, capsys):
    out = tmp_path / "sub" / "preds.csv"
    code, _, err = run(["--model", str(model3), "--out", str(out), "--batch-size", "4", str(images)], capsys)
    assert code == 0, err
    text = out.read_text()
    header = text.splitlines()[0].split(",")
    assert header == ["path", "predicted", "p_circle", "p_square", "p_stripes", "error"]
    rows = read_csv(text)
    files = sorted(images.rglob("*.jpg"))
    assert [r["path"] for r in rows] == [f.as_posix() for f in files]
    probs = np.array([[float(r[f"p_{c}"]) for c in CLASSES] for r in rows])
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert [r["predicted"] for r in rows] == [CLASSES[i] for i in probs.argmax(axis=1)]
    assert all(r["error"] == "" for r in rows)
    # Same numbers as the training input path gives (batches of 4 vs one batch of 9).
    np.testing.assert_allclose(probs, reference_probs(model3, files, 32), atol=1e-5)
    assert not [p for p in out.parent.iterdir() if p.name != "preds.csv"], "temp file left behind"


def test_tta_none_is_the_image_alone_and_differs_from_the_mirror_mean(model3, images, tmp_path, capsys):
    files = sorted(p for p in images.rglob("*") if p.is_file())
    probs = {}
    for tta in ("none", "mirror"):
        out = tmp_path / f"{tta}.csv"
        assert run(["--model", str(model3), "--out", str(out), "--tta", tta, str(images)], capsys)[0] == 0
        rows = read_csv(out.read_text())
        assert [r["path"] for r in rows] == [f.as_posix() for f in files]
        probs[tta] = np.array([[float(r[f"p_{c}"]) for c in CLASSES] for r in rows])
    np.testing.assert_allclose(probs["none"], reference_probs(model3, files, 32, mirror=False), atol=1e-5)
    np.testing.assert_allclose(probs["mirror"], reference_probs(model3, files, 32), atol=1e-5)
    assert np.abs(probs["none"] - probs["mirror"]).max() > 1e-4  # the images are not their own mirror images


def test_stdout_is_the_same_csv_and_reruns_are_byte_identical(model3, images, tmp_path, capsys):
    out = tmp_path / "p.csv"
    assert run(["--model", str(model3), "--out", str(out), str(images)], capsys)[0] == 0
    code, stdout, _ = run(["--model", str(model3), str(images)], capsys)
    assert code == 0
    assert stdout == out.read_text()


def test_unreadable_files_get_an_error_row_and_the_rest_still_predict(model3, images, tmp_path, capsys):
    folder = tmp_path / "mixed"
    good = []
    for f in sorted((images / "square").iterdir()):
        (folder / f.name).parent.mkdir(parents=True, exist_ok=True)
        (folder / f.name).write_bytes(f.read_bytes())
        good.append(folder / f.name)
    bad = {
        write_truncated_jpeg(folder / "broken.jpg"),
        write_text_as_image(folder / "notes.jpg"),
        write_zero_byte(folder / "empty.png"),
    }
    write_image(folder / ".hidden.png")  # hidden: not listed
    write_image(folder / ".cache" / "x.png")
    code, stdout, err = run(["--model", str(model3), str(folder)], capsys)
    assert code == 0, err
    rows = {r["path"]: r for r in read_csv(stdout)}
    assert set(rows) == {p.as_posix() for p in [*good, *bad]}
    for p in bad:
        row = rows[p.as_posix()]
        assert row["error"] and row["predicted"] == "" and row["p_circle"] == ""
        assert p.as_posix() in err
    probs = np.array([[float(rows[p.as_posix()][f"p_{c}"]) for c in CLASSES] for p in good])
    np.testing.assert_allclose(probs, reference_probs(model3, good, 32), atol=1e-5)


def test_the_models_image_size_is_used_not_params_yaml(tmp_path, images, capsys, monkeypatch):
    model = build_model(tmp_path / "m40.keras", CLASSES, 40, seed=3)
    (tmp_path / "params.yaml").write_text("backbone:\n  image_size: 150\n")
    monkeypatch.chdir(tmp_path)
    files = sorted((images / "circle").iterdir())
    code, stdout, err = run(["--model", str(model), *map(str, files)], capsys)
    assert code == 0, err
    probs = np.array([[float(r[f"p_{c}"]) for c in CLASSES] for r in read_csv(stdout)])
    np.testing.assert_allclose(probs, reference_probs(model, files, 40), atol=1e-5)


def test_binary_model_gives_both_class_probabilities(tmp_path, images, capsys):
    model = build_model(tmp_path / "bin.keras", ["cat", "dog"], 32, seed=5)
    files = sorted(images.rglob("*.jpg"))[:4]
    code, stdout, err = run(["--model", str(model), *map(str, files)], capsys)
    assert code == 0, err
    rows = read_csv(stdout)
    assert list(rows[0]) == ["path", "predicted", "p_cat", "p_dog", "error"]
    probs = np.array([[float(r["p_cat"]), float(r["p_dog"])] for r in rows])
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    # The sigmoid unit is P(class 1) = P(dog).
    np.testing.assert_allclose(probs, reference_probs(model, files, 32), atol=1e-5)


def test_odd_formats_decode_as_in_training(model3, tmp_path, capsys):
    folder = tmp_path / "odd"
    rotated = write_exif_rotated_jpeg(folder / "rotated.jpg", size=(60, 40), orientation=6)
    upright = folder / "upright.png"
    Image.open(rotated).transpose(Image.Transpose.ROTATE_270).save(upright)  # what EXIF 6 means
    write_image(folder / "cmyk.jpg", mode="CMYK", fmt="JPEG")
    write_image(folder / "deep.png", mode="I;16", fmt="PNG")
    write_animated_gif(folder / "anim.gif")
    code, stdout, err = run(["--model", str(model3), str(folder)], capsys)
    assert code == 0, err
    rows = {Path(r["path"]).name: r for r in read_csv(stdout)}
    assert all(r["error"] == "" for r in rows.values()), rows
    p = {n: np.array([float(rows[n][f"p_{c}"]) for c in CLASSES]) for n in rows}
    np.testing.assert_allclose(p["rotated.jpg"], p["upright.png"], atol=2e-3)  # JPEG vs PNG pixels


def test_evaluate_matches_a_hand_computation(model3, images, tmp_path, capsys):
    out = tmp_path / "e.csv"
    code, stdout, err = run(["--model", str(model3), "--out", str(out), "--evaluate", str(images)], capsys)
    assert code == 0, err
    files = sorted(images.rglob("*.jpg"))
    truth = [CLASSES.index(f.parent.name) for f in files]
    pred = reference_probs(model3, files, 32).argmax(axis=1)
    cm = np.zeros((3, 3), dtype=int)
    for t, p in zip(truth, pred):
        cm[t, p] += 1
    acc = np.trace(cm) / len(files)
    assert f"accuracy: {acc:.4f} ({np.trace(cm)}/{len(files)} images)" in stdout
    table = stdout.splitlines()[-3:]
    for name, row, line in zip(CLASSES, cm, table):
        assert line.split() == [name, *map(str, row)]
    # CSV to stdout: the report moves to stderr so the CSV stays clean.
    code, stdout, err = run(["--model", str(model3), "--evaluate", str(images)], capsys)
    assert code == 0 and "accuracy:" in err and "accuracy" not in stdout
    assert stdout == out.read_text()


def test_evaluate_rejects_a_subfolder_that_is_not_a_class(model3, images, tmp_path, capsys):
    folder = tmp_path / "eval"
    for c in ("circle", "horse"):
        (folder / c).mkdir(parents=True)
        src = next((images / "circle").iterdir())
        (folder / c / src.name).write_bytes(src.read_bytes())
    code, stdout, err = run(["--model", str(model3), "--evaluate", str(folder)], capsys)
    assert code == 1 and stdout == ""
    assert err.startswith("error:") and "horse" in err and "circle, square, stripes" in err
    assert "Traceback" not in err


def test_model_without_tlpipe_metadata_is_a_model_file_error(tmp_path, images, capsys):
    plain = keras.Sequential([keras.Input((32, 32, 3)), keras.layers.Flatten(), keras.layers.Dense(2)])
    path = tmp_path / "plain.keras"
    plain.save(path)
    with pytest.raises(ModelFileError, match="plain.keras.*tlpipe"):
        cmd.main(["--model", str(path), str(images)])
    code, _, err = run(["--model", str(path), str(images)], capsys)
    assert code == 1 and err.startswith("error:") and "Traceback" not in err


def test_default_model_is_the_best_one_present(model3, images, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelFileError, match="finetuned.keras, head_aug.keras, head.keras"):
        cmd.main([str(images)])
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "head.keras").write_bytes(model3.read_bytes())
    code, _, err = run([str(images / "circle")], capsys)
    assert code == 0 and "using model models/head.keras" in err
    # finetuned wins over head; a damaged one is an error, not a silent fallback.
    (tmp_path / "models" / "finetuned.keras").write_bytes(b"not a zip")
    code, _, err = run([str(images / "circle")], capsys)
    assert code == 1 and "models/finetuned.keras" in err


def test_missing_path_and_bad_batch_size_fail_before_loading_the_model(tmp_path):
    with pytest.raises(DataError, match="nope.jpg: no such file"):
        cmd.main(["--model", str(tmp_path / "absent.keras"), str(tmp_path / "nope.jpg")])
    with pytest.raises(SystemExit) as exc:  # a usage error, as argparse's own: exit 2
        cmd.main(["--batch-size", "0", str(tmp_path)])
    assert exc.value.code == 2


def test_tlpipe_cli_dispatches_predict(model3, images, tmp_path):
    import subprocess
    import sys

    exe = Path(sys.executable).parent / "tlpipe"
    proc = subprocess.run([str(exe), "predict", "--model", str(model3), str(images / "stripes")],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0] == "path,predicted,p_circle,p_square,p_stripes,error"
    assert len(proc.stdout.splitlines()) == 4
