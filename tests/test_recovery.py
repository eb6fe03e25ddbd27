"""A fit that survives lost stats actors: exactly once, equal to an undisturbed fit (identical embeddings)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray

from padim_ray.checkpoint import CheckpointError, Checkpoints
from padim_ray.config import ClusterConfig
from padim_ray.accumulate import FitLostError, accumulate
from padim_ray.fit import fit_model, update_model
from padim_ray.stc import scene_videos
from padim_ray.store import StoreError, open_model
from padim_ray.files import Location, StorageError
from helpers import (
    BIN, CHECKPOINT_EACH_BATCH, DIMS, EMBEDDINGS, GRID, SMALL_CLUSTER, SMALL_FIT, SMALL_MODEL, TESTS, ActorKiller,
    embeddings_dataset, relative_error, run_fit, start_local_ray,
)
from holding import RELEASE_ENV

SMALL_FIT_OPTIONS = [*SMALL_FIT, "--batch-size", "4"]
RESUME_TOLERANCE = 1e-12


@pytest.fixture(scope="module")
def undisturbed():
    start_local_ray()
    return run_fit(ClusterConfig(actors=1, cpus_per_actor=0.5, **CHECKPOINT_EACH_BATCH))


@pytest.mark.parametrize("actors", [2, 1], ids=["a-survivor-redoes", "new-actors-redo"])
def test_killed_stats_actor_is_redone_from_its_checkpoint(ray_local, undisturbed, tmp_path, actors):
    cluster = ClusterConfig(actors=actors, cpus_per_actor=0.5, **CHECKPOINT_EACH_BATCH)
    accumulated, mean, m2 = run_fit(cluster, tmp_path / "checkpoints", ActorKiller(tmp_path / "checkpoints"))
    assert accumulated.lost_actors == 1
    _, mean_ref, m2_ref = undisturbed
    assert relative_error(mean, mean_ref) <= 1e-12
    assert relative_error(m2, m2_ref) <= 1e-12


def test_losing_more_actors_than_max_retries_fails_in_one_line(ray_local, tmp_path):
    cluster = ClusterConfig(actors=1, cpus_per_actor=0.5, max_retries=0, **CHECKPOINT_EACH_BATCH)
    message = r"1 stats actors were lost, more than --max-retries 0 .*; \d+ of 15 work units are unfinished; .*rerun the same command to resume"
    with pytest.raises(FitLostError, match=message) as error:
        run_fit(cluster, tmp_path / "checkpoints", ActorKiller(tmp_path / "checkpoints"))
    assert "\n" not in str(error.value)
    assert Checkpoints(Location(tmp_path / "checkpoints")).files()  # the lost actor's work is kept for a rerun


def stop_when_held(command: list[str], env: dict, checkpoints: Path, stop: signal.Signals) -> subprocess.CompletedProcess:
    """Run `command` (tests/holding.py: its stats actors hold after their first checkpoint) and send it
    `stop` once a checkpoint file appears that was not there before. The fit cannot end first."""
    before = set(checkpoints.glob("actor-*.npz"))
    driver = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 600  # a bound for a hung start, not a race: the fit holds once the file exists
    while not set(checkpoints.glob("actor-*.npz")) - before and driver.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    if driver.poll() is not None or not set(checkpoints.glob("actor-*.npz")) - before:
        driver.kill()
        pytest.fail(f"no new checkpoint while the command ran (exit {driver.poll()}):\n{driver.communicate()[0][-4000:]}")
    driver.send_signal(stop)
    try:
        output = driver.communicate(timeout=120)[0]
    except subprocess.TimeoutExpired:
        driver.send_signal(signal.SIGUSR1)  # holding.py: every thread's stack on its output, then it is killed
        time.sleep(2)
        driver.kill()
        pytest.fail(f"the command did not end within 120 s of {stop.name}; its output and threads:\n{driver.communicate()[0][-8000:]}")
    if "threads' stacks in " in output:  # its stop grace ran out (padim_ray/stop_signals.py): show where it hung
        stacks = Path(output.rsplit("threads' stacks in ", 1)[1].split(")")[0])
        pytest.fail(f"the command hung while stopping:\n{output[-3000:]}\n{stacks.read_text()}")
    return subprocess.CompletedProcess(command, driver.returncode, output)


@pytest.mark.slow
def test_stopped_driver_resumes_from_checkpoints(ray_local, small_model, stc_root, tmp_path):
    """`padim-ray fit` killed (SIGKILL), resumed and interrupted (SIGINT), each held mid-fit (tests/holding.py),
    resumed again as is: equals an uninterrupted fit. The commands join the session's Ray (--address):
    a driver's actors end with it on any Ray (test_unattended.py stops commands on their own Rays)."""
    out = tmp_path / "model"
    arguments = [
        "fit", "videos", *map(str, scene_videos(stc_root, "01")), "--out", str(out), *SMALL_FIT_OPTIONS, "--checkpoint-every", "0",
        "--address", ray.get_runtime_context().gcs_address,
    ]
    command, held = [str(BIN / "padim-ray"), *arguments], [sys.executable, str(TESTS / "holding.py"), *arguments]
    env = {**os.environ, RELEASE_ENV: str(tmp_path / "never-released")}
    checkpoints = tmp_path / ".model.checkpoint"

    killed = stop_when_held(held, env, checkpoints, signal.SIGKILL)
    assert killed.returncode == -signal.SIGKILL, killed.stdout[-2000:]  # killed mid-fit, not finished
    assert not out.exists() and len(list(checkpoints.glob("actor-*.npz"))) == 1

    interrupted = stop_when_held(held, env, checkpoints, signal.SIGINT)
    assert interrupted.returncode == 130, interrupted.stdout[-2000:]
    lines = interrupted.stdout.strip().splitlines()
    assert "resuming with" in interrupted.stdout and lines[-1] == "error: interrupted" and "Traceback" not in interrupted.stdout
    assert f"progress is kept in {checkpoints}; rerun the same command to resume" in interrupted.stdout
    assert not out.exists() and len(list(checkpoints.glob("actor-*.npz"))) == 2

    resumed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming with" in resumed.stderr and "model: " in resumed.stdout
    assert not checkpoints.exists() and not list(tmp_path.glob(".model.partial-*"))  # nothing left behind

    a, b = open_model(out), open_model(small_model)  # small_model: the same fit, undisturbed (other batch sizes)
    assert a.attrs["frames"] == b.attrs["frames"] == 60
    for name in ("mean", "m2", "covariance"):
        assert relative_error(a.read(name), b.read(name)) <= RESUME_TOLERANCE, name


def test_checkpoint_of_another_fit_is_refused(tmp_path):
    Checkpoints.open(tmp_path / "c", {"config": {"dims": 16}, "inputs": ["a.avi"]})
    with pytest.raises(CheckpointError, match=r"checkpoint .*/c belongs to a fit with other config; .*remove the folder"):
        Checkpoints.open(tmp_path / "c", {"config": {"dims": 32}, "inputs": ["a.avi"]})


def test_a_checkpoint_folder_has_one_writer(tmp_path):
    identity = {"config": {"dims": 16}, "inputs": ["a.avi"]}
    first = Checkpoints.open(tmp_path / "c", identity)
    (tmp_path / "c" / "actor-0.npz").write_bytes(b"progress")
    with pytest.raises(StorageError, match=rf"^--checkpoint-dir {tmp_path / 'c'} is being written by pid {os.getpid()} on host "):
        Checkpoints.open(tmp_path / "c", identity)
    first.remove_if_empty()  # keeps the progress, gives the folder up
    second = Checkpoints.open(tmp_path / "c", identity)
    assert [file.name for file in second.files()] == ["actor-0.npz"]
    second.remove()
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # its files, lock file and folder gone


@pytest.mark.slow
def test_update_merges_new_footage_exactly_and_refuses_repeats(ray_local, stc_root, small_model, tmp_path):
    """fit(video 1) then update(video 2) equals fit(videos 1 and 2): `small_model` is that fit."""
    first, second = scene_videos(stc_root, "01")
    model = tmp_path / "model"
    cluster = SMALL_CLUSTER
    fit_model([first], model, SMALL_MODEL, cluster)
    with pytest.raises(StoreError, match=r"input .*01_001.avi is already in model .*pass --force"):
        update_model(model, [first], cluster)
    before = open_model(model).read("m2")
    result = update_model(model, [second], cluster)
    assert result.frames == 60
    updated, reference = open_model(model), open_model(small_model)
    assert updated.attrs["frames"] == 60 and [s["frames"] for s in updated.attrs["sources"]] == [30, 30]
    assert [Path(s["path"]).name for s in updated.attrs["sources"]] == ["01_001.avi", "01_002.avi"]
    for name in ("mean", "m2", "covariance", "precision"):
        assert relative_error(updated.read(name), reference.read(name)) <= 1e-9, name
    assert relative_error(before, updated.read("m2")) > 1e-3  # the model did change
    assert not list(tmp_path.glob(".model.*"))  # no staging or checkpoint left


def test_update_refuses_a_model_this_version_cannot_reproduce(small_model, stc_root, tmp_path):
    import zarr

    model = tmp_path / "model"
    shutil.copytree(small_model, model)
    zarr.open_group(str(model), mode="r+").attrs["weights_identity"] = "sha256:0123abcd"
    with pytest.raises(StoreError, match=r"was fitted with other weights identity .*cannot be updated"):
        update_model(model, [scene_videos(stc_root, "01")[0]], force=True)
    assert open_model(model).attrs["frames"] == 60  # untouched


broken_embedder = lambda device: int("this backbone cannot start")  # noqa: E731 (raises; by value, like the others)


def test_actors_that_die_before_their_split_starts_do_not_hang_the_fit(ray_local):
    """The splits of a stream wait for each other to start: an actor dead at start must not get one."""
    frames_for, units = embeddings_dataset(EMBEDDINGS)
    cluster = ClusterConfig(actors=2, cpus_per_actor=0.5, max_retries=2, batch_size=5)
    with pytest.raises(FitLostError, match=r"4 stats actors were lost, more than --max-retries 2"):
        accumulate(frames_for, units, broken_embedder, GRID[0] * GRID[1], DIMS, cluster)
