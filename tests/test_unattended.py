"""Left running unattended: each command on its own Ray, stop signals handled as Ctrl-C, failures shown as they happen."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import ray
import zarr

from padim_ray.config import ClusterConfig
from padim_ray import runtime
from padim_ray.runtime import ActorSpec, ClusterError, start_actors
from padim_ray.score import Scorer
from padim_ray.stc import scene_videos
from padim_ray.store import open_model
from padim_ray.video import WorkUnit, iter_unit_frames
from helpers import (
    BIN, CHECKPOINT_EACH_BATCH, LOCAL_CPUS, SMALL_CLUSTER_OPTIONS, SMALL_FIT, TESTS, Disturbance, relative_error, run_fit,
)
from holding import RELEASE_ENV, held_marker


def cli_env(tmp_path: Path) -> dict:
    """The environment of a padim-ray command started here: no cluster named, so it starts its own Ray."""
    env = {**os.environ, RELEASE_ENV: str(tmp_path / "never-released")}
    env.pop("RAY_ADDRESS", None)
    return env


def stop_when_held(arguments: list[str], env: dict, stop: signal.Signals) -> subprocess.CompletedProcess:
    """Run padim-ray ARGUMENTS with its actors held after their first batch (tests/holding.py) and
    send it `stop` once an actor holds: mid-run, for certain."""
    marker = Path(held_marker(env[RELEASE_ENV]))
    marker.unlink(missing_ok=True)
    command = [sys.executable, str(TESTS / "holding.py"), *arguments]
    driver = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 180
    while not marker.exists() and driver.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    driver.send_signal(stop)
    output = driver.communicate(timeout=120)[0]
    return subprocess.CompletedProcess(command, driver.returncode, output)


def assert_stopped_in_one_line(stopped: subprocess.CompletedProcess, signum: signal.Signals) -> None:
    assert stopped.returncode == 128 + signum, stopped.stdout[-3000:]
    lines = stopped.stdout.strip().splitlines()
    assert lines[-1] == f"error: terminated by {signum.name}", stopped.stdout[-3000:]
    assert "Traceback" not in stopped.stdout and "SIGTERM received" not in stopped.stdout, stopped.stdout[-3000:]


@pytest.mark.slow
def test_sigterm_during_fit_keeps_checkpoints_and_says_so(stc_root, tmp_path):
    out, checkpoints = tmp_path / "model", tmp_path / ".model.checkpoint"
    arguments = ["fit", "videos", *map(str, scene_videos(stc_root, "01")), "--out", str(out), *SMALL_FIT, "--checkpoint-every", "0"]
    stopped = stop_when_held(arguments, cli_env(tmp_path), signal.SIGTERM)
    assert_stopped_in_one_line(stopped, signal.SIGTERM)
    assert f"progress is kept in {checkpoints}; rerun the same command to resume" in stopped.stdout
    assert len(list(checkpoints.glob("actor-*.npz"))) == 1  # resumable
    assert not out.exists() and not list(tmp_path.glob(".model.partial-*"))  # no staging left


@pytest.mark.slow
def test_sigterm_during_score_ends_in_one_line(ray_local, small_model, stc_root, tmp_path):
    """As the fit above, on a Ray the command joined (the session's, by --address) rather than its own."""
    out = tmp_path / "maps"
    videos = map(str, scene_videos(stc_root, "01"))  # 60 frames: batches of 4 are held after the first
    arguments = [
        "score", str(small_model), *videos, "--out", str(out), *SMALL_CLUSTER_OPTIONS, "--batch-size", "4", "--map-size", "model",
        "--address", ray.get_runtime_context().gcs_address,
    ]
    stopped = stop_when_held(arguments, cli_env(tmp_path), signal.SIGTERM)
    assert_stopped_in_one_line(stopped, signal.SIGTERM)
    assert not (out / "maps.zarr" / "zarr.json").exists()  # nothing published


@ray.remote
class Idle:
    """An actor that only reserves what it is given."""


def test_sighup_ends_a_command_in_one_line_with_129():
    """SIGHUP (a closed terminal) ends a command as SIGTERM does, with its own exit code; no Ray needed."""
    script = (
        "import os, signal, typer\n"
        "from padim_ray.cli_errors import one_line_errors\n"
        "from padim_ray.stop_signals import handle_stop_signals\n"
        "handle_stop_signals()\n"
        "try:\n"
        "    with one_line_errors():\n"
        "        os.kill(os.getpid(), signal.SIGHUP)\n"
        "        signal.pause()\n"
        "except typer.Exit as done:\n"
        "    raise SystemExit(done.exit_code)\n"
    )
    ended = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert ended.returncode == 129, ended.stderr[-3000:]
    assert ended.stderr.strip().splitlines() == ["error: terminated by SIGHUP"]


HANGING_CLEANUP = (  # a command whose cleanup after a stop signal never ends
    "import os, signal, sys, time\n"
    "from padim_ray import stop_signals\n"
    "stop_signals.STOP_GRACE = float(sys.argv[1])\n"
    "stop_signals.handle_stop_signals()\n"
    "try:\n"
    "    os.kill(os.getpid(), signal.SIGTERM)\n"
    "    signal.pause()\n"
    "except KeyboardInterrupt:\n"
    "    print('cleaning up', flush=True)\n"
    "    if sys.argv[2] == 'again':\n"
    "        os.kill(os.getpid(), signal.SIGTERM)\n"
    "    time.sleep(600)\n"
)


def test_a_cleanup_that_hangs_ends_after_the_grace_with_the_threads_stacks():
    """A stopped command always ends: STOP_GRACE after the signal it exits (143), naming a file that
    holds every thread's stack, so that the hang can be found."""
    ended = subprocess.run([sys.executable, "-c", HANGING_CLEANUP, "1", "once"], capture_output=True, text=True, timeout=120)
    assert ended.returncode == 143 and ended.stdout == "cleaning up\n", ended.stderr[-3000:]
    [line] = ended.stderr.strip().splitlines()
    assert line.startswith("error: still stopping 1 s after SIGTERM; exiting now (threads' stacks in "), line
    stacks = Path(line.rsplit(" ", 1)[1].rstrip(")"))
    assert 'File "<string>", line 12 in <module>' in stacks.read_text()  # the main thread, in the hanging sleep
    stacks.unlink()


def test_a_second_stop_signal_ends_a_command_at_once():
    """Ctrl-C twice (or SIGTERM then SIGTERM): the second ends the process without waiting for its cleanup."""
    started = time.monotonic()
    ended = subprocess.run([sys.executable, "-c", HANGING_CLEANUP, "600", "again"], capture_output=True, text=True, timeout=120)
    assert ended.returncode == 143 and ended.stdout == "cleaning up\n", ended.stderr[-3000:]
    assert time.monotonic() - started < 60  # not the 600 s grace, nor the 600 s cleanup


def test_actors_without_room_fail_in_one_line_after_the_resource_wait(ray_local, caplog, monkeypatch):
    """On a cluster whose free CPUs cannot hold the actors, say what is awaited at once, then fail after --resource-wait."""
    monkeypatch.setitem(runtime._STARTED_HERE, "local", False)  # the session's Ray, joined (an earlier test may have started one here)
    plan = [ActorSpec(num_cpus=LOCAL_CPUS + 2, num_gpus=0.0, threads=1)]
    created = []

    def create(_, spec):
        created.append(Idle.options(**spec.options()).remote())
        return created[-1]

    with caplog.at_level(logging.WARNING, logger="padim_ray.runtime"):
        with pytest.raises(ClusterError, match=r"1 of 1 stats actors found no room in 1 s \(--resource-wait\): they need 6 CPUs") as error:
            start_actors(plan, create, ClusterConfig(resource_wait=1.0), "stats")
    assert "\n" not in str(error.value)
    assert caplog.messages[0].startswith("waiting for 6 CPUs for 1 stats actor(s); the cluster has ")
    with pytest.raises(ray.exceptions.RayActorError):  # the waiting actor was removed, not left queued
        ray.get(created[0].__ray_ready__.remote(), timeout=60)


class CheckpointFolderBreaker(Disturbance):
    """Replaces the checkpoint folder by a file once the first checkpoint is saved: every later save fails."""

    def act(self, file) -> bool:
        folder = Path(self.checkpoints.path.path)
        shutil.rmtree(folder)
        folder.write_bytes(b"")
        return True


def test_failed_checkpoint_saves_are_reported_on_the_driver_and_counted(ray_local, tmp_path, caplog):
    cluster = ClusterConfig(actors=1, cpus_per_actor=0.5, **CHECKPOINT_EACH_BATCH)
    folder = tmp_path / "checkpoints"
    with caplog.at_level(logging.WARNING, logger="padim_ray.streaming"):
        accumulated, _, _ = run_fit(cluster, folder, CheckpointFolderBreaker(folder))  # completes: every frame once
    reported = [r.message for r in caplog.records if r.name == "padim_ray.streaming" and "cannot write checkpoint" in r.message]
    assert reported and len(reported) == accumulated.warnings  # one line per failed save, all counted
    assert all("\n" not in message and "retrying in 0 s" in message for message in reported)


@pytest.mark.slow
def test_a_fit_and_a_score_started_together_each_finish_on_their_own_ray(small_model, stc_root, tmp_path):
    """Each command starts its own Ray (none joins another's and takes the CPUs its decoding needs):
    all finish, each equal to the same work done alone."""
    clip = stc_root / "testing" / "frames" / "01_0001"
    commands = {
        "fit": ["fit", "stc", "--scene", "01", "--root", str(stc_root), "--out", str(tmp_path / "model"), *SMALL_FIT],
        "score": [
            "score", str(small_model), str(clip), "--out", str(tmp_path / "maps"), *SMALL_CLUSTER_OPTIONS,
            "--map-size", "model", "--map-dtype", "float32",
        ],
    }
    env = cli_env(tmp_path)
    running = {name: subprocess.Popen([str(BIN / "padim-ray"), *arguments], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for name, arguments in commands.items()}
    for name, command in running.items():
        stdout, stderr = command.communicate(timeout=600)
        assert command.returncode == 0, f"{name}: {stderr[-3000:]}"
        assert "Started a local Ray instance" in stderr, name  # its own, not another command's
    model, reference = open_model(tmp_path / "model"), open_model(small_model)
    assert model.attrs["frames"] == reference.attrs["frames"] == 60
    for array in ("mean", "m2", "covariance"):
        assert relative_error(model.read(array), reference.read(array)) <= 1e-12, array
    frames = np.stack([f for _, f in iter_unit_frames(WorkUnit(0, str(clip)), size=64)])
    stored = zarr.open_group(str(tmp_path / "maps" / "maps.zarr"), mode="r")["01_0001"][:]
    assert relative_error(stored, Scorer(small_model).maps(frames, (64, 64)).numpy()) <= 1e-4
