"""Where extract and viewcache run their shards: in this process, or on Ray Data (compute.engine).

A stage cuts its output into shards (features/shards.py) and hands this module one job per shard
(a JSON-able dict) and a worker factory: a picklable callable that builds the worker, which holds
the frozen model and turns a job into a result dict (the shard's hash and timings). The local engine
builds one worker here and runs the jobs in order. The Ray engine runs the same workers as a Ray
Data actor pool (`map_batches(..., compute=ActorPoolStrategy(size=...))`), one job per call, each
actor building its worker (and so the model) once: one actor per GPU with `num_gpus=1` where the
cluster has GPUs, else one per tlpipe.runtime.threads.INTRA_OP_THREADS CPUs, each actor's request sized to
fit one node (pool_shape); every actor runs TensorFlow with
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

from tlpipe.config.choices import ENGINES
from tlpipe.runtime import errors
from tlpipe.runtime.errors import ConfigError, TlpipeError
from tlpipe.features.shards import run_local

RAY_MISSING = ("compute.engine: ray needs Ray, which is not installed; install it with "
               "`pip install -e '.[ray]'` (or `pip install 'ray[data]>=2.51'`), or set compute.engine: local")


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


def _node_resources(resources) -> list[dict]:
    """One dict of resources per node: `resources` is a list of them (ray.nodes()'s "Resources"), or
    one dict, which stands for a single node."""
    nodes = [resources] if isinstance(resources, dict) else list(resources)
    return [n for n in nodes if float(n.get("CPU", 0)) > 0 or float(n.get("GPU", 0)) > 0] or [{"CPU": 1.0}]


def _fits(slots: list[tuple[float, int]], cpu: float, actors: int) -> bool:
    """Whether `actors` actors of `cpu` CPUs each fit on nodes of (CPUs, most actors it may hold)."""
    return sum(min(int(c / cpu + 1e-9), cap) for c, cap in slots) >= actors


def _cpu_per_actor(slots: list[tuple[float, int]], actors: int, most: float) -> float:
    """The most CPUs per actor (whole CPUs where possible, at most `most`) with which `actors`
    actors still fit the nodes, each actor on one node."""
    for cpu in range(int(most), 0, -1):
        if _fits(slots, cpu, actors):
            return float(cpu)
    shares = sorted({c / k for c, cap in slots for k in range(1, actors + 1) if c / k < 1}, reverse=True)
    return next((round(s - 5e-3, 2) for s in shares if s > 0.01 and _fits(slots, s - 5e-3, actors)), 0.01)


def pool_shape(engine: Engine, n_jobs: int, resources) -> tuple[int, float, float]:
    """(actors, num_cpus, num_gpus) per actor, from the resources of each node (a list of dicts, as
    ray.nodes() gives them; one dict stands for one node): one actor per GPU, else one per
    INTRA_OP_THREADS CPUs (or engine.actors), never more actors than jobs. Each actor's request fits
    on one node: Ray places an actor on a single node, so a request sized from the cluster's totals
    (a big CPU-only head node next to GPU nodes) could fit nowhere. With GPUs, the CPUs per actor are
    what every GPU node can give each of its cards."""
    from tlpipe.runtime.threads import INTRA_OP_THREADS

    nodes = _node_resources(resources)
    cards = [(float(n.get("CPU", 0)), int(n.get("GPU", 0))) for n in nodes] if engine.device == "gpu" else []
    cards = [(c, g) for c, g in cards if g > 0]  # compute.device cpu: the cards are not used
    if cards:
        slots = cards  # an actor per card, on the nodes that have them
        actors = max(1, min(engine.actors or sum(g for _, g in cards), n_jobs))
        most = max(c / g for c, g in cards)
    else:
        big = max(float(n.get("CPU", 0)) for n in nodes)
        slots = [(float(n.get("CPU", 0)), 1 << 30) for n in nodes]
        base = max(1, min(INTRA_OP_THREADS, int(big)))
        actors = max(1, min(engine.actors or sum(int(c // base) for c, _ in slots) or 1, n_jobs))
        most = big
    cpu = float(engine.cpus_per_actor) if engine.cpus_per_actor else _cpu_per_actor(slots, actors, most)
    return actors, cpu, (1.0 if cards else 0.0)


class _Actor:
    """One Ray Data actor: configures TensorFlow for its share of the machine, builds the worker once."""

    def __init__(self, make_worker, threads: int, gpu: bool):
        import tensorflow as tf

        from tlpipe import device
        from tlpipe.runtime import threads as pools

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
        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
        actors, cpus, gpus = pool_shape(engine, len(jobs), nodes)
        # One block per job, so the pool hands shards out one by one (one block would go to one actor).
        ds = ray.data.from_items([{"job": json.dumps(j)} for j in jobs], override_num_blocks=len(jobs))
        out = ds.map_batches(_Actor, fn_constructor_args=(make_worker, max(1, int(cpus)), gpus > 0), batch_size=1,
                             compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=cpus, num_gpus=gpus)
        for row in out.iter_rows():
            yield json.loads(row["result"])
    finally:
        if started:
            ray.shutdown()
