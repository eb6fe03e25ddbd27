"""Scoring that survives a lost actor and resumes after a killed driver: maps equal an undisturbed run's.

Scoring is deterministic per frame, but not bit-exact across batch compositions: oneDNN picks its
convolution kernels by batch size, and a 64x64 R18 embedding of the same frame differs by up to
1.5e-6 relative between a batch of 16 and batches of 5 or 1 (float32). A redo batches frames
differently, so maps are compared at 1e-4 relative, as test_score compares the pipeline's maps with
a direct Scorer's; which frames were scored, and where, is compared exactly.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import logging
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pytest
import ray
import zarr

import padim_ray.score
from padim_ray.config import ClusterConfig, ScoreConfig
from padim_ray.evaluate import ScoringOptions, evaluate_stc
from padim_ray.score import score_inputs
from padim_ray import stc
from padim_ray.publish import commit_store, holds_progress, staged_store
from padim_ray.store import MODEL_STORE
from padim_ray.map_store import read_scores
from helpers import SMALL_CLUSTER, SMALL_CLUSTER_OPTIONS, TESTS, relative_error, run, start_local_ray
from holding import HOLD_AFTER_ENV, RELEASE_ENV, HeldScorer

SCORE = ScoreConfig(map_dtype="float32", chunk_frames=4)
MAPS_TOLERANCE = 1e-4  # batch composition changes float32 rounding (module docstring)


def score_inputs_of(stc_root) -> list[Path]:
    """A folder of 12 frames and a 30-frame video: blocks of 16 and 12, and 16 and 14 frames."""
    return [stc_root / "testing" / "frames" / "01_0001", stc_root / "training" / "videos" / "01_002.avi"]


@pytest.fixture(scope="module")
def undisturbed(small_model, stc_root, tmp_path_factory):
    start_local_ray()
    out = tmp_path_factory.mktemp("undisturbed") / "maps"
    score_inputs(small_model, score_inputs_of(stc_root), out, score=SCORE, cluster=dataclasses.replace(SMALL_CLUSTER, batch_size=4))
    return out


def assert_equal_maps(out: Path, reference: Path) -> None:
    """The same frames of the same inputs, the same peaks, and maps equal to MAPS_TOLERANCE."""
    ours, theirs = read_scores(out), read_scores(reference)
    assert ours[["input", "frame"]].equals(theirs[["input", "frame"]])
    assert relative_error(ours["score"], theirs["score"]) <= MAPS_TOLERANCE
    a, b = zarr.open_group(str(out / "maps.zarr"), mode="r"), zarr.open_group(str(reference / "maps.zarr"), mode="r")
    assert sorted(a.array_keys()) == sorted(b.array_keys()) == ["01_0001", "01_002"]
    for name in a.array_keys():
        assert a[name].shape == b[name].shape
        assert relative_error(a[name][:], b[name][:]) <= MAPS_TOLERANCE, name
    assert not list(out.parent.glob(f".{out.name}.*"))  # no staging or progress left


class ScoreActorKiller(threading.Thread):
    """Kills (`ray.kill`) a scoring actor that has scored a batch, and so written its first chunk;
    the actors hold after their first batch (holding.HeldScorer) until this has acted. It looks until
    it has acted or `done` is set (scoring ended without it: the test fails on `killed`)."""

    def __init__(self):
        super().__init__(daemon=True)
        self.killed = None
        self.done = threading.Event()
        self.release = Path(tempfile.gettempdir()) / f"padim-release-{uuid.uuid4().hex[:12]}"

    def run(self):
        try:
            while self.killed is None and not self.done.is_set():
                for name in [n for n in ray.util.list_named_actors() if n.startswith("padim-ray-score-")]:
                    actor = ray.get_actor(name)
                    if ray.get(actor.progress.remote())[0] > 0:  # frames done, answered while it holds (max_concurrency=2)
                        ray.kill(actor)
                        self.killed = name
                        break
                self.done.wait(0.01)
        finally:
            self.release.touch()


@pytest.mark.parametrize("actors", [2, 1], ids=["a-survivor-redoes", "a-new-actor-redoes"])
def test_killed_score_actor_is_redone(ray_local, small_model, stc_root, undisturbed, tmp_path, monkeypatch, actors):
    killer = ScoreActorKiller()
    monkeypatch.setattr(padim_ray.score, "Scorer", functools.partial(HeldScorer, release=str(killer.release)))
    killer.start()
    out = tmp_path / "maps"
    cluster = ClusterConfig(actors=actors, cpus_per_actor=0.5, batch_size=4)
    try:
        result = score_inputs(small_model, score_inputs_of(stc_root), out, score=SCORE, cluster=cluster)
    finally:
        killer.done.set()
        killer.join()
        killer.release.unlink(missing_ok=True)
    assert killer.killed is not None, "no scoring actor was killed: the test did not test recovery"
    assert result.lost_actors == 1 and result.frames == {"01_0001": 12, "01_002": 30}
    assert_equal_maps(out, undisturbed)


@pytest.mark.slow
def test_killed_score_command_resumes(ray_local, small_model, stc_root, undisturbed, tmp_path, caplog):
    """`padim-ray score` on the session's Ray (--address) SIGKILLed once it has written a chunk (held
    there: tests/holding.py), rerun as is in this process: it says it resumed, keeps the chunks scored,
    and its maps equal an undisturbed run's."""
    out = tmp_path / "maps"
    arguments = [
        "score", str(small_model), *map(str, score_inputs_of(stc_root)), "--out", str(out), "--map-dtype", "float32",
        *SMALL_CLUSTER_OPTIONS, "--batch-size", "16",
    ]
    chunks = str(tmp_path / ".maps.partial-*" / ".padim-progress" / "*.npz")  # the rows files of written chunks
    env = {**os.environ, RELEASE_ENV: str(tmp_path / "never-released"), HOLD_AFTER_ENV: chunks}
    command = [sys.executable, str(TESTS / "holding.py"), *arguments, "--address", ray.get_runtime_context().gcs_address]
    held = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 600  # a bound for a hung start, not a race: the command holds once a chunk is written
    while not glob.glob(chunks) and held.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    if held.poll() is None and not glob.glob(chunks):
        held.send_signal(signal.SIGUSR1)  # holding.py: every thread's stack on its output
        time.sleep(2)
    held.kill()
    output = held.communicate(timeout=120)[0]
    assert held.returncode == -signal.SIGKILL, output[-2000:]  # killed mid-run, not finished
    assert glob.glob(chunks), f"no chunk was written:\n{output[-8000:]}"
    assert not out.exists()

    with caplog.at_level(logging.INFO, logger="padim_ray.score"):
        resumed = run(*arguments)
    assert resumed.exit_code == 0, resumed.output
    kept = re.search(r"score: resuming with (\d+) of 42 frames already scored", caplog.text)
    assert kept and 0 < int(kept.group(1)) < 42, caplog.text
    assert f"maps: {out} (42 frames of 2 inputs" in resumed.stdout and f"{kept.group(1)} kept from the stopped run" in resumed.stdout
    assert_equal_maps(out, undisturbed)


def test_evaluate_rerun_reuses_scored_scenes(ray_local, small_model, stc_root, tmp_path, caplog):
    """A scene scored by an evaluate that was then stopped is evaluated from its maps, not scored again."""
    out = tmp_path / "evaluation"
    cluster = SMALL_CLUSTER
    score_inputs(small_model, stc.test_clips(stc_root, "01"), out / "maps_01", cluster=cluster)  # what evaluate scored first
    root_metadata = out / "maps_01" / "maps.zarr" / "zarr.json"
    written = root_metadata.stat().st_mtime_ns
    with caplog.at_level(logging.INFO, logger="padim_ray.evaluate"):
        [report] = evaluate_stc(stc_root, "01", out, model=str(small_model), scoring=ScoringOptions(cluster=cluster))
    assert f"{out / 'maps_01'} already holds these clips scored by {small_model}: reusing them" in caplog.text
    assert root_metadata.stat().st_mtime_ns == written  # not scored again
    assert report.pooled.frames == 12 and (out / "scene_01" / "metrics.json").is_file()


def test_a_stopped_runs_progress_is_kept_for_the_same_run_only(where):
    """The staging store of a resumable run that stopped with progress is reused by the same run and
    removed as a leftover by another (local folders and a bucket prefix alike)."""
    target = where / "maps"
    with pytest.raises(RuntimeError), staged_store(target, overwrite=False, kind=MODEL_STORE, resume={"run": 1}) as stopped:
        (stopped.progress / "0-0.npz").write_bytes(b"rows")
        raise RuntimeError("killed")
    with staged_store(target, overwrite=False, kind=MODEL_STORE, resume={"run": 1}) as again:
        assert again.staging == stopped.staging and (again.progress / "0-0.npz").read_bytes() == b"rows"
    assert (again.progress / "0-0.npz").is_file()  # ended without a commit: kept again
    with staged_store(target, overwrite=False, kind=MODEL_STORE, resume={"run": 2}) as other:
        assert not holds_progress(other)
        commit_store(other, {"run": 2})
    assert dict(zarr.open_group(target.zarr_store(read_only=True), mode="r").attrs) == {"run": 2}
    assert sorted(child.name for child in target.iterdir()) == ["zarr.json"]  # no progress, no resume file
    assert [child.name for child in where.iterdir()] == ["maps"]  # no staging left
