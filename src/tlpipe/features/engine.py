"""Where extract and viewcache run their shards: in this process, or on Ray Data (compute.engine).

A stage cuts its output into shards (features/shards.py) and hands this module one job per shard
(a JSON-able dict) and a worker factory: a picklable callable that builds the worker, which holds
the frozen model and turns a job into a result dict (the shard's hash and timings). The local engine
builds one worker here and runs the jobs in order. The Ray engine runs the same workers as a Ray
Data actor pool (`map_batches(..., compute=ActorPoolStrategy(size=...))`), one job per call, each
actor building its worker (and so the model) once: one actor per GPU with `num_gpus=1` where the
cluster has GPUs, else one per tlpipe.threads.INTRA_OP_THREADS CPUs; every actor runs TensorFlow with
that fixed intra-op pool, as the local engine does, so the bytes do not depend on the pool's shape.

Results come back keyed by shard, in whatever order Ray finishes them; nothing depends on that
order, because each worker writes its own shard file and the stage assembles the table from the
shard numbers. A worker killed mid-shard leaves only a temp file; Ray restarts the actor and retries
the job, which rewrites the shard from scratch. Ray is imported only here, and only for engine ray.
"""

from __future__ import annotations

import json
import socket
from dataclasses import dataclass
from typing import Callable, Iterable

from tlpipe.choices import ENGINES
from tlpipe import errors
from tlpipe.errors import ConfigError, TlpipeError
from tlpipe.features.shards import run_local

RAY_MISSING = ("compute.engine: ray needs Ray, which is not installed; install it with "
               "`pip install -e '.[ray]'` (or `pip install 'ray[data]>=2.40'`), or set compute.engine: local")


@dataclass(frozen=True)
class Engine:
    """compute.engine, compute.ray_address and compute.device; `actors`, `cpus_per_actor`: the pool
    (None: per GPU or per INTRA_OP_THREADS CPUs)."""

    kind: str = "local"
    address: str | None = None
    actors: int | None = None
    cpus_per_actor: int | None = None
    device: str = "cpu"  # compute.device: the actors compute on the GPUs only with "gpu"

    @classmethod
    def from_params(cls, compute) -> "Engine":
        return cls(compute.engine, compute.ray_address, device=compute.device)

    def run(self, jobs: list[dict], make_worker: Callable, progress: Callable[[dict], None] | None = None) -> dict:
        """{job["shard"]: result} for every job; `progress(result)` is called as each one finishes."""
        if self.kind not in ENGINES:
            raise ConfigError(f"compute.engine: must be one of {', '.join(ENGINES)}, got {self.kind!r}")
        if self.kind == "local":
            return run_local(jobs, make_worker, progress)
        results = {}
        for result in _run_ray(self, jobs, make_worker):
            if "error" in result:  # a deliberate error in a worker: the same error here, same message
                kind = getattr(errors, result["error_type"], TlpipeError)
                raise kind(result["error"])
            results[result["shard"]] = result
            if progress is not None:
                progress(result)
        missing = [j["shard"] for j in jobs if j["shard"] not in results]
        if missing:  # an engine that lost work must not let the stage assemble a table with holes
            raise RuntimeError(f"engine {self.kind} returned no result for shards {missing[:10]}")
        return results


def run_guarded(worker, job: dict) -> dict:
    """worker(job), with a deliberate tlpipe error turned into a result the driver re-raises."""
    try:
        result = worker(job)
    except TlpipeError as exc:
        return {"shard": job["shard"], "error": str(exc), "error_type": type(exc).__name__}
    return {"shard": job["shard"], **result}


# ---------------------------------------------------------------- Ray


def import_ray():
    """Ray, or a ConfigError naming compute.engine and the install command."""
    try:
        import ray
        import ray.data  # noqa: F401  (the extra: ray[data])
    except ImportError:
        raise ConfigError(RAY_MISSING) from None
    return ray


def connect(address: str | None):
    """Join the cluster at `address` (`auto`, `ray://host:10001`), or start Ray here (None).
    Returns whether this call started it (and so should shut it down). A session already
    connected (a test's, a notebook's) is used as it is."""
    ray = import_ray()
    if ray.is_initialized():
        return False
    import logging

    kwargs = dict(logging_level=logging.WARNING, log_to_driver=False, configure_logging=True)
    if address is None:
        ray.init(include_dashboard=False, **kwargs)
    else:
        ray.init(address=address, **kwargs)
    return True


def pool_shape(engine: Engine, n_jobs: int, resources: dict) -> tuple[int, float, float]:
    """(actors, num_cpus, num_gpus) per actor from the cluster's resources: one actor per GPU, else
    one per INTRA_OP_THREADS CPUs (or engine.actors), never more actors than jobs."""
    from tlpipe.threads import INTRA_OP_THREADS

    gpus = int(resources.get("GPU", 0)) if engine.device == "gpu" else 0  # cpu: the cards are not used
    cpus = max(1, int(resources.get("CPU", 1)))
    actors = engine.actors or (gpus or max(1, cpus // INTRA_OP_THREADS))
    actors = max(1, min(actors, n_jobs))
    if engine.cpus_per_actor:
        cpu = engine.cpus_per_actor
    else:
        cpu = max(1, cpus // actors)
    return actors, float(cpu), (1.0 if gpus else 0.0)


class _Actor:
    """One Ray Data actor: configures TensorFlow for its share of the machine, builds the worker once."""

    def __init__(self, make_worker, threads: int, gpu: bool):
        import tensorflow as tf

        from tlpipe import device
        from tlpipe import threads as pools

        device.use("gpu" if gpu else "cpu")  # a CPU actor on a GPU node computes what a CPU does
        # Before TensorFlow initialises. The intra-op pool has the size every engine uses (the bytes
        # depend on it, not on the CPUs the actor holds); inter-op work stays within the actor's share.
        pools.configure()
        tf.config.threading.set_inter_op_parallelism_threads(threads)
        if gpu:  # TensorFlow otherwise takes the whole card at start-up
            for card in tf.config.list_physical_devices("GPU"):
                tf.config.experimental.set_memory_growth(card, True)
        self.worker = make_worker()

    def __call__(self, batch):
        out = []
        for text in batch["job"]:
            job = json.loads(text)
            result = run_guarded(self.worker, job)
            result.setdefault("host", socket.gethostname())
            out.append(json.dumps(result))
        return {"result": out}


def _run_ray(engine: Engine, jobs, make_worker) -> Iterable[dict]:
    if not jobs:
        return
    ray = import_ray()
    started = connect(engine.address)
    try:
        import logging

        logging.getLogger("ray.data").setLevel(logging.WARNING)
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False  # the stage draws its own bar, in images
        actors, cpus, gpus = pool_shape(engine, len(jobs), ray.cluster_resources())
        # One block per job, so the pool hands shards out one by one (one block would go to one actor).
        ds = ray.data.from_items([{"job": json.dumps(j)} for j in jobs], override_num_blocks=len(jobs))
        out = ds.map_batches(_Actor, fn_constructor_args=(make_worker, int(cpus), gpus > 0), batch_size=1,
                             compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=cpus, num_gpus=gpus)
        for row in out.iter_rows():
            yield json.loads(row["result"])
    finally:
        if started:
            ray.shutdown()
