"""`ray job submit -- padim-ray fit stc ...` against a head started by `ray start --head` (token auth on)."""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import pytest
import ray

from padim_ray.store import open_model
from helpers import BIN, SMALL_FIT, relative_error

RAY = str(BIN / "ray")

pytestmark = [pytest.mark.slow, pytest.mark.cluster]  # a Ray cluster of its own; the session's local Ray stops meanwhile


def free_ports(n: int) -> list[int]:
    """n distinct TCP ports free right now (bound together, then released)."""
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def live_processes() -> dict[int, tuple[int, int, int, str, str]]:
    """pid -> (parent pid, process group, session, start time, command line) of every live (not zombie) process."""
    procs = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if stat[0] != "Z":
            procs[int(pid)] = (int(stat[1]), int(stat[2]), int(stat[3]), stat[19], cmdline)
    return procs


class RayHead:
    """`ray start --head --block` in its own session, temp dir and ports; `stop()` ends only its processes."""

    def __init__(self, env: dict[str, str]):
        self.env = {**env, "RAY_AUTH_MODE": "token"}  # for `ray status` and `ray job submit`: send the token
        self.temp_dir = tempfile.mkdtemp(prefix="padim-ray-head-")  # short: Ray's socket paths stay < 107 chars
        flags = [
            "--port", "--dashboard-port", "--ray-client-server-port", "--node-manager-port", "--object-manager-port",
            "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--runtime-env-agent-port",
            "--metrics-export-port",
        ]
        ports = dict(zip(flags, free_ports(len(flags))))
        self.gcs_address, self.dashboard_port = f"127.0.0.1:{ports['--port']}", ports["--dashboard-port"]
        self.log = Path(self.temp_dir) / "ray_start.log"
        start = [
            RAY, "start", "--head", "--block", "--temp-dir", self.temp_dir, *itertools.chain(*ports.items()),
            "--min-worker-port", "0", "--max-worker-port", "0",  # workers bind ports the OS picks
            "--num-cpus", "3", "--include-dashboard", "true", "--disable-usage-stats",
        ]
        with self.log.open("w") as log:  # no drain on SIGTERM: up to 30 s waiting for the node to go idle
            self.proc = subprocess.Popen(
                [str(a) for a in start], env={**env, "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"},
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        self.pids: set[tuple[int, str]] = set()  # (pid, start time) of the processes seen by `ours`

    def wait_ready(self, timeout: float = 180) -> None:
        """Until the dashboard accepts connections and `ray status` lists the head node."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            try:
                socket.create_connection(("127.0.0.1", self.dashboard_port), timeout=1).close()
                status = subprocess.run(
                    [RAY, "status", "--address", self.gcs_address], env=self.env,
                    capture_output=True, text=True, timeout=60,
                )
                if status.returncode == 0 and "node_" in status.stdout:
                    return
            except (OSError, subprocess.TimeoutExpired):
                pass
            time.sleep(1)
        raise TimeoutError(f"Ray head not ready after {timeout} s:\n{self.log.read_text()[-3000:]}")

    def ours(self) -> set[int]:
        """Live processes of this head and all their descendants.

        Observed with Ray 2.60: GCS, raylet, dashboard (and its module processes), agents are in the process
        group of `ray start`; the raylet's workers (titled `ray::IDLE`, `ray::JobSupervisor`..., no temp dir in
        their command line) each have a group of their own in its session; a job's entrypoint has a session of
        its own, under its JobSupervisor. Processes seen before are remembered by (pid, start time).
        """
        procs = live_processes()
        children = defaultdict(list)
        for pid, (ppid, *_) in procs.items():
            children[ppid].append(pid)
        todo = [pid for pid, (_, pgid, sid, start, cmdline) in procs.items()
                if self.proc.pid in (pgid, sid) or self.temp_dir in cmdline or (pid, start) in self.pids]
        found = set()
        while todo:
            pid = todo.pop()
            if pid not in found:
                found.add(pid)
                todo += children[pid]
        self.pids |= {(pid, procs[pid][3]) for pid in found}
        return found

    def stop(self, grace: float = 30) -> None:
        """SIGTERM to `ray start` (it stops its GCS, raylet, dashboard...), SIGKILL to whatever of ours outlives
        `grace` seconds; idempotent."""
        if self.temp_dir is None:
            return
        self.ours()  # the process tree while the raylet is alive (its workers get orphaned when it exits)
        self.proc.terminate()
        deadline = time.monotonic() + grace
        while (left := self.ours()) and time.monotonic() < deadline + 10:
            if time.monotonic() > deadline:
                for pid in left:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
            self.proc.poll()  # reap `ray start`
            time.sleep(0.5)
        self.proc.wait()
        assert not left, f"processes of the Ray head in {self.temp_dir} survived SIGKILL: {sorted(left)}"
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        self.temp_dir = None


@pytest.fixture(scope="module")
def ray_head():
    """A Ray head started the way users start one (`ray start --head`), with token auth on.

    It runs as `ray start --head --block` in a session of its own, with its own temp dir and free ports, so it
    neither collides with nor touches any other Ray on the machine (`ray stop` would end them all); teardown
    ends exactly its processes (RayHead.stop). The session's local Ray is shut down meanwhile.
    """
    ray.shutdown()  # after the session-scoped fixtures the tests ask for (small_model) used it
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PATH"] = f"{BIN}{os.pathsep}{env['PATH']}"  # the job's entrypoint must find padim-ray
    head = RayHead(env)
    try:
        head.wait_ready()
        yield head
    finally:
        ray.shutdown()  # the next test that needs the local Ray starts it again
        head.stop()


def test_job_submit_equals_direct_fit(ray_head, small_model, stc_root, tmp_path):
    """The job's model equals `small_model`: the same fit (SMALL_FIT's config), run directly on the local Ray."""
    out = tmp_path / "job_model"
    submit = [
        RAY, "job", "submit", "--address", f"http://127.0.0.1:{ray_head.dashboard_port}", "--",
        "padim-ray", "fit", "stc", "--scene", "01", "--root", stc_root, "--out", out, *SMALL_FIT,
    ]
    job = subprocess.run([str(a) for a in submit], env=ray_head.env, capture_output=True, text=True, timeout=600)
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    assert "succeeded" in job.stdout and f"model: {out} (60 frames" in job.stdout
    submitted, reference = open_model(out), open_model(small_model)
    assert submitted.attrs["frames"] == reference.attrs["frames"] == 60
    assert submitted.attrs["channel_indices"] == reference.attrs["channel_indices"]
    for name in ("mean", "covariance"):
        assert relative_error(submitted.read(name), reference.read(name)) <= 1e-6
