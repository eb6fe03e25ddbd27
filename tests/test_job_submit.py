"""`ray job submit -- padim-ray fit stc ...` against a head started by `ray start --head` (token auth on)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import ray

from padim_ray.fit import fit_model
from padim_ray.stc import scene_videos
from padim_ray.store import open_model
from conftest import SMALL_MODEL, relative_error, start_local_ray
from test_cli import SMALL_FIT

DASHBOARD_PORT = 8297
BIN = Path(sys.executable).parent  # the venv's ray and padim-ray


@pytest.fixture(scope="module")
def ray_head():
    """A Ray head started the way users start one; the session's local Ray is stopped meanwhile."""
    ray.shutdown()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PATH"] = f"{BIN}{os.pathsep}{env['PATH']}"  # the job's entrypoint must find padim-ray
    start = [
        BIN / "ray", "start", "--head", "--port", "6397", "--dashboard-port", str(DASHBOARD_PORT),
        "--num-cpus", "3", "--include-dashboard", "true", "--disable-usage-stats",
    ]
    subprocess.run([str(a) for a in start], check=True, env=env, capture_output=True, text=True)
    yield env
    ray.shutdown()  # `ray stop` ends every Ray process on this machine, this driver's local Ray too
    subprocess.run([str(BIN / "ray"), "stop", "--force"], env=env, capture_output=True)


def test_job_submit_equals_direct_fit(ray_head, stc_root, tmp_path):
    out = tmp_path / "job_model"
    submit = [
        BIN / "ray", "job", "submit", "--address", f"http://127.0.0.1:{DASHBOARD_PORT}", "--",
        "padim-ray", "fit", "stc", "--scene", "01", "--root", stc_root, "--out", out, *SMALL_FIT,
    ]
    job = subprocess.run([str(a) for a in submit], env={**ray_head, "RAY_AUTH_MODE": "token"}, capture_output=True, text=True, timeout=600)
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    assert "succeeded" in job.stdout and f"model: {out} (60 frames" in job.stdout

    subprocess.run([str(BIN / "ray"), "stop", "--force"], env=ray_head, capture_output=True)
    start_local_ray()
    direct = fit_model(scene_videos(stc_root, "01"), tmp_path / "direct", SMALL_MODEL)
    submitted, reference = open_model(out), open_model(direct.out)
    assert submitted.attrs["frames"] == reference.attrs["frames"] == 60
    assert submitted.attrs["channel_indices"] == reference.attrs["channel_indices"]
    for name in ("mean", "covariance"):
        assert relative_error(submitted.read(name), reference.read(name)) <= 1e-6
