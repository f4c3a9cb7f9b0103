"""All splits' features at once, and the cut they are stored at (the extract stage): with backbone.layer or backbone.pooling
`auto`, every split's candidate activations are computed first (one forward pass), the linear probe
(features.probe) picks the cut on train -> validation, and each split's file is assembled at that cut.
Writes `<out>/cut.json` (features.cut) either way.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Sequence

import numpy as np

from tlpipe.data.manifests import SPLITS, read_class_names
from tlpipe.runtime.errors import DataError
from tlpipe.features import cut, probe
from tlpipe.features.extract import BaseSpec, Extractor, ComputedSplit, assemble_split, compute_split
from tlpipe.runtime.log import log


def extract_splits(split_dir, images_dir, out_dir, spec: BaseSpec, batch_size: int = 32,
                   precision: str = "float32", splits: Sequence[str] = SPLITS, engine=None) -> list[Path]:
    """`<out_dir>/<split>.h5` for each split manifest `<split_dir>/<split>.csv`, one model for all, and
    `<out_dir>/cut.json`: the layer and pooling stored, with the linear probe's table (features.cut).
    `engine`: a features.engine.Engine (compute.engine) the shards run on; None: this process."""
    split_dir, out_dir = Path(split_dir), Path(out_dir)
    classes = read_class_names(split_dir / "classes.json")
    extractor = Extractor(spec, precision)
    # Work folders stay until every split is done: DVC deletes a stage's outputs before rerunning
    # it, so a kill during `validation` would otherwise re-extract all of `train`.
    work = {name: compute_split(split_dir / f"{name}.csv", images_dir, out_dir / f"{name}.h5", extractor, classes,
                                batch_size, engine=engine)
            for name in splits}
    rows = _probe(extractor, work["train"], work["validation"]) if {"train", "validation"} <= set(work) else []
    if extractor.probing and not rows:
        raise DataError(f"backbone.layer/pooling auto: the probe needs training images of at least two classes "
                        f"and validation images in {split_dir}; check data.split, or name backbone.layer and "
                        f"backbone.pooling")
    winner = probe.best(rows) if extractor.probing else {"layer": extractor.layer, "pooling": spec.pooling}
    layer, pooling = winner["layer"], winner["pooling"]
    select = selector(extractor, layer, pooling)
    dim = extractor.dim if select is None else extractor.pooled_dim(layer, pooling)
    outs = [assemble_split(w, dim, extractor.attrs(classes, layer, pooling), select) for w in work.values()]
    cut.write_cut(out_dir / cut.CUT_FILE, layer, pooling, "probe" if extractor.probing else "params", rows)
    for w in work.values():
        shutil.rmtree(w.work, ignore_errors=True)
    return outs


def _probe(extractor: Extractor, train: ComputedSplit, validation: ComputedSplit) -> list[dict]:
    """The probe's table over the extractor's candidates (a single one when the params name it)."""
    it = probe.spaced_rows(train.n, probe.MAX_TRAIN_ROWS)
    iv = probe.spaced_rows(validation.n, probe.MAX_VALIDATION_ROWS)
    yt, yv = np.asarray(train.labels)[it], np.asarray(validation.labels)[iv]
    if len(set(yt.tolist())) < 2 or not len(iv):
        return []  # nothing to fit or score (a named cut goes on: such a split fails later, saying why)
    rt, rv = train.rows(it), validation.rows(iv)
    if not extractor.probing:
        return [{"layer": extractor.layer, "pooling": extractor.spec.pooling, "dim": int(rt.shape[1]),
                 **probe.score(rt, yt, rv, yv)}]
    log.info(f"probe: {len(extractor.candidates)} candidates on {len(it)} training and {len(iv)} "
             "validation images")
    return probe.run_probe(extractor.candidates, lambda layer: extractor.raw(rt, layer),
                           lambda layer: extractor.raw(rv, layer), yt, yv)


def selector(extractor: Extractor, layer: str, pooling: str):
    """rows -> the stored features of candidate (layer, pooling); None: the rows are those already."""
    if not extractor.probing:
        return None
    return lambda rows: probe.pool(extractor.raw(rows, layer), pooling)
