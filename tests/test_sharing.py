"""Sharing results through a DVC remote: a teammate's clone pulls instead of recomputing.

Alice runs the pipeline and pushes to a local-folder remote (the same commands work for S3, GCS,
SSH; see docs/sharing.md). Teammates clone her git repo and use the remote:
- Bob pulls: everything is up to date and `dvc repro` runs nothing; a new `head.lr` reruns
  train_head and what follows, reusing the pulled features.
- Carol gets an uncommitted experiment of Alice's (another head.lr) by `dvc exp pull`, without
  running it; Alice's own run cache restores that run when she comes back to the same value.
- Erin, with the same code, data and params as a run Alice pushed with `--run-cache`: `dvc repro
  --pull` restores the stages whose outputs are all cached (finetune, visualize) and reruns the cheap
  ones with a `cache: false` metric or plot (train_head, evaluate), because DVC 3 records those files
  in the run cache but `dvc push --run-cache` does not send their bytes (see dvc.yaml); the rerun
  gives Alice's bytes.
- Dave has no copy of the raw photos: `dvc pull` + `dvc repro --allow-missing` still work.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from helpers import dvc, dvc_stages, set_params, sh, stages_run

pytestmark = pytest.mark.slow

NOT_AFTER_HEAD = {"data", "extract", "viewcache"}  # upstream of the head: must never rerun for head.lr


def _norm(path: str) -> str:
    return Path(path).as_posix().rstrip("/")


def _entries(items) -> list[str]:
    """Paths of a dvc.yaml deps/outs list (entries are strings or {path: options})."""
    out = []
    for item in items or []:
        out.extend([item] if isinstance(item, str) else list(item))
    return [_norm(p) for p in out]


def downstream(repo: Path, stage: str) -> set[str]:
    """Stages that depend (transitively) on `stage`'s outputs, read from the repo's dvc.yaml."""
    stages = dvc_stages(repo)
    outs = {name: _entries(s.get("outs")) + _entries(s.get("metrics")) + _entries(s.get("plots"))
            for name, s in stages.items()}
    deps = {name: _entries(s.get("deps")) for name, s in stages.items()}

    def feeds(a: str, b: str) -> bool:  # does an output of a feed a dependency of b?
        return any(d == o or d.startswith(o + "/") or o.startswith(d + "/") for o in outs[a] for d in deps[b])

    found, todo = set(), [stage]
    while todo:
        current = todo.pop()
        for name in stages:
            if name not in found and name != stage and feeds(current, name):
                found.add(name)
                todo.append(name)
    return found


def lock_outs(repo: Path, stage: str) -> dict[str, str]:
    """{path: md5} of a stage's outputs as recorded in dvc.lock."""
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    return {o["path"]: o["md5"] for o in lock["stages"][stage]["outs"]}


def commit_all(repo: Path, message: str) -> None:
    sh(["git", "add", "-A"], repo)
    sh(["git", "commit", "-q", "-m", message], repo)


@pytest.fixture(scope="module")
def team(tmp_path_factory, class_images, ran_project):
    """Alice's repo (run, committed, pushed), the remote, and the photo folder data.source names."""
    base = tmp_path_factory.mktemp("team")
    photos = base / "photos"  # our own copy: one test hides it to play a teammate without it
    shutil.copytree(class_images, photos)
    remote = base / "remote"
    # The project after its first repro, pointed at the copy: only the data stage reruns (same images).
    alice = ran_project.copy(base / "alice")
    set_params(alice, {"data": {"source": str(photos)}})
    dvc(alice, "remote", "add", "-d", "shared", str(remote))
    dvc(alice, "repro")
    commit_all(alice, "pipeline run")  # dvc.lock and .dvc/config go through git, outputs through DVC
    dvc(alice, "push")
    hub = base / "hub.git"  # the team's git server
    sh(["git", "init", "-q", "--bare", "-b", "main", str(hub)], base)
    sh(["git", "remote", "add", "origin", str(hub)], alice)
    sh(["git", "push", "-q", "origin", "main"], alice)
    return {"base": base, "alice": alice, "hub": hub, "remote": remote, "photos": photos}


def clone(team, name: str) -> Path:
    dst = team["base"] / name
    sh(["git", "clone", "-q", str(team["hub"]), str(dst)], team["base"])
    return dst


def test_a_pulled_clone_is_up_to_date_and_repro_runs_nothing(team):
    alice, bob = team["alice"], clone(team, "bob")
    assert not (bob / "models").exists() and not (bob / "features").exists()
    dvc(bob, "pull")
    for rel in ("models/head.keras", "features/train.h5", "features/test.h5", "data/split/train.csv"):
        assert (bob / rel).read_bytes() == (alice / rel).read_bytes(), rel
    assert sorted(p.name for p in (bob / "data" / "images").iterdir()) == \
        sorted(p.name for p in (alice / "data" / "images").iterdir())
    status = dvc(bob, "status")
    assert "up to date" in status.stdout, status.stdout
    again = dvc(bob, "repro")
    assert stages_run(again) == [], again.stdout


def test_a_new_head_lr_in_the_clone_reruns_only_the_head_and_what_follows(team):
    bob = team["base"] / "bob"
    if not (bob / "models" / "head.keras").exists():
        pytest.skip("needs the pulled clone of the previous test")
    features = lock_outs(bob, "extract")
    features_bytes = (bob / "features" / "train.h5").read_bytes()
    set_params(bob, {"head": {"lr": 3e-3}})
    proc = dvc(bob, "repro")
    ran = set(stages_run(proc))
    after = downstream(bob, "train_head")
    assert "train_head" in ran and "evaluate" in ran, proc.stdout
    assert ran <= {"train_head"} | after, f"ran {ran}, only train_head and {after} may"
    assert not ran & NOT_AFTER_HEAD, ran
    assert lock_outs(bob, "extract") == features  # same feature hashes: reused, not recomputed
    assert (bob / "features" / "train.h5").read_bytes() == features_bytes
    assert lock_outs(bob, "train_head") != lock_outs(team["alice"], "train_head")


def test_an_uncommitted_experiment_travels_by_exp_push_and_pull(team):
    alice, lr = team["alice"], 5e-3
    dvc(alice, "exp", "run", "-n", "lr5", "-S", f"head.lr={lr}")
    model = (alice / "models" / "head.keras").read_bytes()
    metrics = (alice / "metrics" / "evaluate.json").read_bytes()  # (train_head's may not differ)
    dvc(alice, "exp", "push", "origin", "lr5")  # git ref to the hub, its outputs to the DVC remote
    sh(["git", "checkout", "--", "."], alice)
    dvc(alice, "checkout")
    assert (alice / "metrics" / "evaluate.json").read_bytes() != metrics  # the committed run's
    # Alice's own run cache: coming back to that value restores the outputs instead of training,
    # the `cache: false` metrics files too (DVC copies them into the cache when it records the run).
    set_params(alice, {"head": {"lr": lr}})
    proc = dvc(alice, "repro")
    assert stages_run(proc) == [] and "Stage 'train_head' is cached - skipping run" in proc.stdout, proc.stdout
    assert (alice / "models" / "head.keras").read_bytes() == model
    assert (alice / "metrics" / "evaluate.json").read_bytes() == metrics
    sh(["git", "checkout", "--", "."], alice)
    dvc(alice, "checkout")

    carol = clone(team, "carol")
    dvc(carol, "exp", "pull", "origin", "lr5")
    dvc(carol, "exp", "apply", "lr5")
    assert (carol / "models" / "head.keras").read_bytes() == model
    assert "up to date" in dvc(carol, "status").stdout
    assert stages_run(dvc(carol, "repro")) == []


def test_a_run_shared_through_the_run_cache_is_restored_where_dvc_pushed_every_output(team):
    # Alice tries two learning rates and pushes its run records; Erin, with the same code, data and
    # params, runs `dvc repro --pull`. DVC 3 pushes a run's record and the workspace's cached
    # outputs, never the bytes of `cache: false` ones: a stage with a `cache: false` metric or plot
    # (train_head, evaluate: seconds) finds its record but not those bytes, and runs; finetune (the
    # expensive one) and visualize, all of whose outputs are cached, are restored. Training is
    # deterministic, so the reruns give Alice's bytes.
    alice, lr, ft_lr = team["alice"], 4e-3, 3e-3
    set_params(alice, {"head": {"lr": lr}, "finetune": {"lr": ft_lr}})
    dvc(alice, "repro")
    outputs = ("models/head.keras", "models/finetuned.keras", "metrics/train_head.json",
               "metrics/finetune.json", "metrics/evaluate.json", "plots/confusion/head.csv",
               "reports/index.html")
    made = {rel: (alice / rel).read_bytes() for rel in outputs}
    dvc(alice, "push", "--run-cache")
    sh(["git", "checkout", "--", "."], alice)
    dvc(alice, "checkout")

    erin = clone(team, "erin")
    dvc(erin, "pull")
    set_params(erin, {"head": {"lr": lr}, "finetune": {"lr": ft_lr}})
    proc = dvc(erin, "repro", "--pull")
    out = proc.stdout + proc.stderr
    assert set(stages_run(proc)) == {"train_head", "evaluate"}, out
    for stage in ("finetune", "visualize"):
        assert f"Stage '{stage}' is cached - skipping run" in out, out
    # What DVC says when it gives up on a record: the `cache: false` files it could not fetch.
    assert "Missing cache files" in out and "metrics/train_head.json" in out, out
    for rel, data in made.items():
        assert (erin / rel).read_bytes() == data, rel


def test_a_teammate_without_the_raw_photos_works_from_the_remote(team):
    photos, hidden = team["photos"], team["base"] / "photos-elsewhere"
    dave = clone(team, "dave")
    photos.rename(hidden)  # Dave's machine has no copy of the source folder
    try:
        dvc(dave, "pull")  # outputs only: the missing source is a dependency, not an output
        status = dvc(dave, "status")
        assert "deleted" in status.stdout and str(photos) in status.stdout, status.stdout
        # Plain repro would rerun the data stage on the missing folder; --allow-missing treats a
        # missing dependency as unchanged.
        proc = dvc(dave, "repro", "--allow-missing")
        assert stages_run(proc) == [], proc.stdout
        set_params(dave, {"head": {"lr": 7e-3}})
        proc = dvc(dave, "repro", "--allow-missing")
        ran = set(stages_run(proc))
        assert "train_head" in ran and not ran & NOT_AFTER_HEAD, proc.stdout
    finally:
        hidden.rename(photos)
