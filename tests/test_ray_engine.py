"""compute.engine: ray: the same bytes as the local engine, whatever the number of actors; shards
recomputed alone; a killed worker retried; clear errors. One local Ray of 2 CPUs (conftest.ray_session)."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest
from helpers import extract_split, image_parts
from imagegen import make_class_folders

from tlpipe.runtime.errors import ConfigError, DataError
from tlpipe.features import engine as engines
from tlpipe.features import viewcache
from tlpipe.features.boundary import boundary_layer
from tlpipe.features.augment import augment_settings
from tlpipe.features.pretrained import build_base
from tlpipe.features.extract import BaseSpec

SIZE = 32
SPEC = BaseSpec("vgg16", "none", "block3_pool", "avg", SIZE)  # a small, fast feature model
AUG = dict(rotation_range=20.0, width_shift_range=0.1, height_shift_range=0.1, shear_range=0.1,
           zoom_range=0.1, horizontal_flip=True, fill_mode="nearest", seed=3)


class KillOnce:
    """A worker factory whose worker SIGKILLs its own process (a Ray actor) on its first shard
    `victim`, once per `marker` file: the engine must retry that shard on a fresh actor."""

    def __init__(self, make_worker, victim: str, marker: str):
        self.make_worker, self.victim, self.marker = make_worker, victim, marker

    def __call__(self):
        worker = self.make_worker()

        def run(job):
            if job["shard"] == self.victim and not os.path.exists(self.marker):
                Path(self.marker).write_text(str(os.getpid()))
                os.kill(os.getpid(), signal.SIGKILL)
            return worker(job)

        return run


class KillingEngine(engines.Engine):
    def __init__(self, victim: str, marker: Path, **kw):
        super().__init__("ray", **kw)
        object.__setattr__(self, "victim", victim)
        object.__setattr__(self, "marker", str(marker))

    def run(self, jobs, make_worker, progress=None):
        return super().run(jobs, KillOnce(make_worker, self.victim, self.marker), progress)


@pytest.fixture(scope="module")
def ray(ray_session):
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests/
    return ray_session


@pytest.fixture(scope="module")
def base():
    return build_base("vgg16", "none", SIZE)


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    return image_parts(tmp_path_factory.mktemp("imgs"), per_class=6)


def spec_for(base, views=2):
    return viewcache.CacheSpec(mode="cached", backbone="vgg16", weights="none", weights_sha256=None,
                               image_size=SIZE, preprocessing="caffe", precision="float32",
                               boundary=boundary_layer(base, "block5_conv1"), unfreeze_from="block5_conv1",
                               views=views, augment=augment_settings(AUG), class_names=("cat", "dog"))


def cache(folder: Path, base, parts, engine=None) -> Path:
    return viewcache.build_cache(folder / "views.h5", parts, base=base, spec=spec_for(base), batch_size=2,
                                 rows_per_shard=2, progress=False, engine=engine)


def tree_bytes(out: Path) -> dict:
    """The table file and every file of its shard folder, by name."""
    folder = out.with_name(out.stem + ".shards")
    return {out.name: out.read_bytes(), **{f"{folder.name}/{p.name}": p.read_bytes() for p in folder.iterdir()}}


@pytest.fixture(scope="module")
def local_cache(tmp_path_factory, base, parts):
    return tree_bytes(cache(tmp_path_factory.mktemp("local"), base, parts))


@pytest.mark.parametrize("actors", [1, 2])
def test_view_cache_on_ray_is_byte_identical_to_local(ray, tmp_path, base, parts, local_cache, actors):
    out = cache(tmp_path, base, parts, engines.Engine("ray", actors=actors))
    got = tree_bytes(out)
    assert sorted(got) == sorted(local_cache)
    assert len(got) == 2 + 4 + 1 + 1  # views.h5, manifest, 4 train + 1 validation + 1 test shards
    for name in got:
        assert got[name] == local_cache[name], name


def test_a_worker_killed_mid_run_is_retried_and_the_bytes_are_the_same(ray, tmp_path, base, parts, local_cache):
    marker = tmp_path / "killed"
    out = cache(tmp_path / "run", base, parts, KillingEngine("train-000001.h5", marker, actors=2))
    assert marker.exists()  # a worker did die on that shard
    assert int(marker.read_text()) != os.getpid()
    assert tree_bytes(out) == local_cache


class UnmountingEngine(engines.Engine):
    """Ray, after `path` vanished: what a worker on a node that does not mount the data sees
    (the driver, which fingerprints the inputs first, still saw it)."""

    def run(self, jobs, make_worker, progress=None):
        os.unlink(self.address_of_missing)
        return super().run(jobs, make_worker, progress)


def test_a_worker_that_cannot_read_an_input_says_where_data_must_live(ray, tmp_path, base, parts):
    lost = tmp_path / "not-mounted" / "x.png"
    lost.parent.mkdir()
    lost.write_bytes(Path(parts["test"][0][1]).read_bytes())
    broken = {k: (list(v[0]), v[1], v[2]) for k, v in parts.items()}
    broken["test"][0][1] = str(lost)
    engine = UnmountingEngine("ray", actors=1)
    object.__setattr__(engine, "address_of_missing", str(lost))
    with pytest.raises(DataError, match=r"not-mounted/x\.png: cannot be read on host .*same path"):
        cache(tmp_path, base, broken, engine)
    assert not (tmp_path / "views.h5").exists()


def test_engine_ray_without_ray_names_the_key_and_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    with pytest.raises(ConfigError, match=r"compute\.engine: ray.*pip install -e '\.\[ray\]'"):
        engines.Engine("ray").run([{"shard": "x"}], lambda: None)


def test_pool_shape_one_actor_per_gpu_else_per_thread_pool():
    gpu = engines.Engine("ray", device="gpu")
    assert engines.pool_shape(gpu, 100, {"CPU": 16.0, "GPU": 4.0}) == (4, 4.0, 1.0)
    # compute.device: cpu leaves the cards alone: one actor per pool of 4 intra-op threads.
    assert engines.pool_shape(engines.Engine("ray"), 100, {"CPU": 16.0, "GPU": 4.0}) == (4, 4.0, 0.0)
    assert engines.pool_shape(engines.Engine("ray"), 100, {"CPU": 16.0}) == (4, 4.0, 0.0)
    assert engines.pool_shape(engines.Engine("ray"), 100, {"CPU": 2.0}) == (1, 2.0, 0.0)
    assert engines.pool_shape(engines.Engine("ray", actors=1), 100, {"CPU": 2.0}) == (1, 2.0, 0.0)
    assert engines.pool_shape(engines.Engine("ray"), 1, {"CPU": 8.0}) == (1, 8.0, 0.0)  # no idle actors


def fits(shape, nodes) -> bool:
    """Whether a pool of that shape can start on nodes of those resources, each actor on one node
    (Ray places an actor whole), greedily, as the scheduler would."""
    actors, cpu, gpu = shape
    free = [dict(n) for n in nodes]
    for _ in range(actors):
        node = next((n for n in free if n.get("CPU", 0) >= cpu - 1e-9 and n.get("GPU", 0) >= gpu), None)
        if node is None:
            return False
        node["CPU"] = node.get("CPU", 0) - cpu
        node["GPU"] = node.get("GPU", 0) - gpu
    return True


HEAD = {"CPU": 64.0, "memory": 1e11}  # a CPU-only head node
GPU_NODE = {"CPU": 16.0, "GPU": 4.0}


def test_pool_shape_fits_each_actor_on_one_node_of_a_mixed_cluster():
    gpu = engines.Engine("ray", device="gpu")
    nodes = [HEAD, GPU_NODE, GPU_NODE]
    # One actor per card; the CPUs each asks for are what a GPU node has per card, not the
    # cluster's 96 CPUs over 8 actors (12 each: no GPU node could hold its 4 actors).
    shape = engines.pool_shape(gpu, 100, nodes)
    assert shape == (8, 4.0, 1.0) and fits(shape, nodes)
    uneven = [HEAD, GPU_NODE, {"CPU": 8.0, "GPU": 4.0}]
    shape = engines.pool_shape(gpu, 100, uneven)
    assert shape == (8, 2.0, 1.0) and fits(shape, uneven)
    few = [{"CPU": 2.0, "GPU": 4.0}]  # fewer CPUs than cards: a share of one
    shape = engines.pool_shape(gpu, 100, few)
    assert shape[0] == 4 and 0 < shape[1] < 1 and fits(shape, few)
    # compute.device: cpu: actors of INTRA_OP_THREADS CPUs on every node, each within one node.
    shape = engines.pool_shape(engines.Engine("ray"), 100, nodes)
    assert shape == (24, 4.0, 0.0) and fits(shape, nodes)
    small = [{"CPU": 3.0}, {"CPU": 2.0}, {"CPU": 2.0}]  # no node has 7 CPUs: 2 each, one per node
    shape = engines.pool_shape(engines.Engine("ray", actors=3), 100, small)
    assert shape == (3, 2.0, 0.0) and fits(shape, small)
    # Few jobs: fewer actors, each as large as the nodes allow.
    shape = engines.pool_shape(engines.Engine("ray"), 2, [{"CPU": 8.0}, {"CPU": 6.0}])
    assert shape == (2, 6.0, 0.0) and fits(shape, [{"CPU": 8.0}, {"CPU": 6.0}])


@pytest.mark.parametrize("device", ["cpu", "gpu"])
@pytest.mark.parametrize("n_jobs", [1, 3, 50])
@pytest.mark.parametrize("nodes", [[{"CPU": 2.0}], [HEAD, GPU_NODE], [{"CPU": 1.0}, {"CPU": 5.0, "GPU": 1.0}],
                                   [{"CPU": 48.0, "GPU": 8.0}, {"CPU": 4.0, "GPU": 2.0}, {"CPU": 2.0}]])
def test_every_pool_shape_fits_the_nodes(nodes, n_jobs, device):
    shape = engines.pool_shape(engines.Engine("ray", device=device), n_jobs, nodes)
    assert 1 <= shape[0] <= n_jobs and shape[1] > 0 and fits(shape, nodes), shape


class Recording(engines.Engine):
    """Ray, keeping each shard's result (whether it was computed or found whole)."""

    def run(self, jobs, make_worker, progress=None):
        results = super().run(jobs, make_worker, progress)
        object.__setattr__(self, "results", results)
        return results


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    """10 images and their manifest, as the data stage writes them."""
    import pandas as pd

    root = tmp_path_factory.mktemp("split")
    written = make_class_folders(root / "images", {"cat": 5, "dog": 5}, size=40)
    rows = [{"path": f"{name}/{p.name}", "class_name": name, "label": label, "sha256": "x",
             "file": f"{name}/{p.name}"} for label, name in enumerate(written) for p in written[name]]
    pd.DataFrame(sorted(rows, key=lambda r: r["path"])).to_csv(root / "train.csv", index=False)
    return root / "train.csv", root / "images"


def features(folder: Path, split, engine=None) -> Path:
    return extract_split(*split, folder / "train.h5", SPEC, ["cat", "dog"], batch_size=2, chunk_rows=2,
                         engine=engine)


@pytest.fixture(scope="module")
def local_features(tmp_path_factory, split):
    return tree_bytes(features(tmp_path_factory.mktemp("local"), split))


@pytest.mark.parametrize("actors", [1, 2])
def test_features_on_ray_are_byte_identical_to_local(ray, tmp_path, split, local_features, actors):
    got = tree_bytes(features(tmp_path, split, engines.Engine("ray", actors=actors)))
    assert sorted(got) == sorted(local_features) and len(got) == 1 + 5 + 1  # train.h5, 5 shards, manifest
    for name in got:
        assert got[name] == local_features[name], name


def test_a_deleted_or_truncated_shard_is_recomputed_alone(ray, tmp_path, split, local_features):
    out = features(tmp_path, split, engines.Engine("ray", actors=2))
    folder = out.with_name("train.shards")
    (folder / "000001.h5").unlink()
    whole = (folder / "000003.h5").read_bytes()
    (folder / "000003.h5").write_bytes(whole[: len(whole) // 2])
    engine = Recording("ray", actors=2)
    out = features(tmp_path, split, engine)
    assert sorted(k for k, r in engine.results.items() if r["computed"]) == ["000001.h5", "000003.h5"]
    assert tree_bytes(out) == local_features
