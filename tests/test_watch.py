"""`padim-ray watch`: a clip replayed as a live camera yields its event as it happens (stdout, events.jsonl,
a snapshot); a dead camera is retried while the other is scored; SIGTERM closes open events and ends it."""

from __future__ import annotations

import http.server
import json
import logging
import signal
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import ray
from PIL import Image

from padim_ray.config import ConfigError
from padim_ray.decisions import DecisionOptions
from padim_ray.readers import Reader, SourceError, camera_names
from padim_ray.score import Scorer
from padim_ray.synthetic import _background, _Mover, _Scene, write_video
from padim_ray.video import VideoError, _video_frames
from padim_ray.watch import WatchOptions, watch
from helpers import BIN, SMALL_DATA, assert_clean_failure, run, start_local_ray
from streams import LiveCamera

CLIP_FPS = 24
NORMAL = 20  # frames before the vehicle enters (and about 1.3 s after it has left)
FRAMES = 100  # 4.2 s
DEAD_URL = "http://127.0.0.1:9/none.ts"  # the discard port: nothing listens


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """A camera's clip: the synthetic scene, a vehicle crossing it from frame NORMAL (about 2.3 s), then the scene alone."""
    spec = SMALL_DATA
    rng = np.random.default_rng([spec.seed, 0])  # scene 01's background, as the small model was fitted on
    camera = _Scene(spec, rng, _background(spec, rng))
    h, w = spec.height, spec.width
    vehicle = _Mover(y=0.7 * h, x=-0.1 * w, vy=0.0, vx=0.02 * w, ry=0.1 * h, rx=0.1 * w, color=np.array([220.0, 30.0, 30.0]))
    frames = [camera.frame([vehicle] if t >= NORMAL else [])[0] for t in range(FRAMES)]
    path = tmp_path_factory.mktemp("camera") / "gate.avi"
    write_video(path, frames, CLIP_FPS)
    return path


@pytest.fixture(scope="module")
def threshold(small_model, clip) -> float:
    """Halfway between the clip's highest normal frame score and its highest (at model size, as watch scores)."""
    scorer = Scorer(small_model)
    frames = np.stack([frame for _, frame in _video_frames(str(clip), 1, scorer.embedder.image_size)])
    scores = scorer.maps(frames, (scorer.embedder.image_size,) * 2).flatten(1).max(dim=1).values.numpy()
    normal = scores[:NORMAL].max()
    assert scores.max() > 1.5 * normal, scores  # the vehicle stands out
    return float((normal + scores.max()) / 2)


def test_camera_names_and_bad_sources(clip):
    names = camera_names([str(clip), f"door={clip}", DEAD_URL, str(clip)])
    assert [name for name, _ in names] == ["gate", "door", "127.0.0.1_9_none.ts", "gate_2"]
    with pytest.raises(SourceError, match="neither a video file nor a URL"):
        camera_names(["/no/such/clip.avi"])
    with pytest.raises(VideoError, match="cannot open video"):
        camera_names([__file__])


def test_bad_options_fail_in_one_line_before_ray_starts(small_model, clip, tmp_path):
    out = tmp_path / "out"
    assert_clean_failure(run("watch", small_model, clip, "--out", out), "not calibrated", out=out)  # and no --threshold
    assert_clean_failure(run("watch", small_model, clip, "--out", out, "--threshold", "1", "--fps", "0"), "--fps", out=out)
    assert_clean_failure(run("watch", small_model, "/no/such.avi", "--out", out, "--threshold", "1"), "/no/such.avi", out=out)


def test_a_live_reader_keeps_only_the_newest_frames_and_counts_the_rest(clip):
    reader = Reader("gate", str(clip), fps=50, size=32, realtime=False, buffer=3)
    reader.blocking = False  # as a live camera: nobody takes its frames
    reader.start()
    deadline = time.monotonic() + 20
    while not reader.ended and time.monotonic() < deadline:
        time.sleep(0.02)
    assert reader.ended and reader.stats.read == FRAMES  # 24 fps taken at up to 50: every frame
    assert reader.stats.dropped == FRAMES - 3
    kept = reader.take(10)
    assert [s.index for s in kept] == [FRAMES - 3, FRAMES - 2, FRAMES - 1] and reader.done
    assert kept[0].frame.shape == (SMALL_DATA.height, SMALL_DATA.width, 3) and kept[0].model_frame.shape == (32, 32, 3)


def test_a_file_read_as_fast_as_it_is_scored_loses_no_frame(clip):
    reader = Reader("gate", str(clip), fps=5, size=32, realtime=False, buffer=2).start()
    taken = []
    while not reader.done:
        taken += reader.take(1)
        time.sleep(0.005)
    assert [s.index for s in taken] == list(range(len(taken))) and reader.stats.dropped == 0
    assert len(taken) == reader.stats.read == 21  # 100 frames at 24 fps, one each 1/5 s from the first


def test_a_clip_replayed_in_realtime_yields_its_event_live_with_a_snapshot(small_model, clip, threshold, tmp_path, capsys):
    start_local_ray()
    options = WatchOptions(fps=5, realtime=True, status_every=1, decisions=DecisionOptions(repr(threshold)))
    started = time.monotonic()
    result = watch(str(small_model), [str(clip)], tmp_path / "out", options)
    took = time.monotonic() - started
    assert took >= FRAMES / CLIP_FPS  # replayed at its own rate, not as fast as it is scored
    stdout = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    written = [json.loads(line) for line in (tmp_path / "out" / "events.jsonl").read_text().splitlines()]
    assert stdout == written and result.closed == 1
    kinds = [n["notice"] for n in written]
    assert kinds[0] == "opened" and kinds[-1] == "closed" and set(kinds) <= {"opened", "updated", "closed"}
    closed = [n for n in written if n["notice"] == "closed"]
    assert len(closed) == 1 and closed[0]["camera"] == "gate" and closed[0]["event"] == 0
    event = closed[0]
    assert NORMAL / CLIP_FPS - 0.25 <= event["start_s"] <= NORMAL / CLIP_FPS + 0.5  # when the vehicle came in
    assert event["end_s"] < FRAMES / CLIP_FPS - 0.9  # closed at its gap, before the clip ended
    assert event["peak_score"] >= threshold and event["box_y1"] > event["box_y0"]
    snapshot = Image.open(event["snapshot"])
    assert snapshot.format == "JPEG" and snapshot.size == (SMALL_DATA.width, SMALL_DATA.height)
    status = result.cameras["gate"]
    assert status["read"] == status["scored"] + status["dropped"] and status["scored"] >= 15  # 4.2 s at 5 fps: 21 taken
    assert status["reconnects"] == 0 and status["state"] == "ended" and 0 < status["latency_ms_median"] < 1000
    deadline = time.monotonic() + 120  # a bound, not a race: the node's metrics agent takes what a process records every 10 s
    while exported("padim_ray_watch_frames_scored_total", "gate") != status["scored"] and time.monotonic() < deadline:
        time.sleep(1)
    assert exported("padim_ray_watch_frames_scored_total", "gate") == status["scored"]  # as Prometheus scrapes it
    assert exported("padim_ray_watch_frames_read_total", "gate") == status["read"]
    assert exported("padim_ray_watch_latency_seconds_count", "gate") == status["scored"]


def exported(name: str, camera: str) -> float | None:
    """This process's value of Ray metric `name` for `camera` at the node's Prometheus endpoint, once exported."""
    port = ray.nodes()[0]["MetricsExportPort"]
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    worker = f'WorkerId="{ray.get_runtime_context().get_worker_id()}"'
    lines = [line for line in text.splitlines() if line.startswith(f"ray_{name}{{") and f'camera="{camera}"' in line and worker in line]
    return float(lines[0].rsplit(" ", 1)[1]) if lines else None


@pytest.mark.slow
def test_sigterm_closes_open_events_while_a_dead_camera_is_retried(small_model, clip, threshold, tmp_path):
    """Two cameras, one dead from the start: the clip is scored and its event opens; SIGTERM then ends the
    command within seconds, the open event closed (with its snapshot) and events.jsonl flushed."""
    start_local_ray()
    out = tmp_path / "out"
    command = [
        str(BIN / "padim-ray"), "watch", str(small_model), f"dead={DEAD_URL}", str(clip), "--out", str(out), "--realtime",
        "--threshold", repr(threshold), "--status-every", "0.5", "--address", ray.get_runtime_context().gcs_address,
    ]
    driver = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []
    for line in driver.stdout:  # until the event opens
        lines.append(json.loads(line))
        if lines[-1]["notice"] == "opened":
            break
    driver.send_signal(signal.SIGTERM)
    stopping = time.monotonic()
    rest, stderr = driver.communicate(timeout=30)
    assert time.monotonic() - stopping < 5, stderr
    assert driver.returncode == 128 + signal.SIGTERM, stderr
    assert stderr.strip().splitlines()[-1] == "error: terminated by SIGTERM", stderr
    notices = lines + [json.loads(line) for line in rest.splitlines()]
    assert [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()] == notices
    opened = lines[-1]
    assert opened["camera"] == "gate" and NORMAL / CLIP_FPS - 0.25 <= opened["start_s"] <= NORMAL / CLIP_FPS + 0.5
    closed = [n for n in notices if n["notice"] == "closed"]
    assert [(n["camera"], n["event"]) for n in closed] == [("gate", 0)]
    assert [str(path) for path in (out / "snapshots").iterdir()] == [closed[0]["snapshot"]] and closed[0]["snapshot"].endswith("_0000.jpg")
    dead = [line for line in stderr.splitlines() if "camera dead:" in line]
    assert any(": down, read 0, scored 0" in line for line in dead) and "stopped" in dead[-1], stderr
    assert int(dead[-1].split("reconnects ")[1].split(",")[0]) >= 1 and "Connection refused" in dead[-1], stderr
    gate = [line for line in stderr.splitlines() if "camera gate:" in line]
    assert "stopped" in gate[-1] and "reconnects 0" in gate[-1], stderr
    assert "Traceback" not in stderr


@pytest.mark.slow
@pytest.mark.parametrize("protocol", ["http", "udp"])
def test_a_live_camera_is_watched_through_its_stream_being_killed_and_started_again(small_model, clip, threshold, tmp_path, protocol):
    """A camera streaming MPEG-TS (tests/streams.py, the clip looped at its own rate), served over HTTP or sent over
    UDP: its event comes on stdout and in events.jsonl with a snapshot; the stream is killed mid-way (HTTP: the
    connection drops; UDP: the datagrams stall) and started again on its port: the reader reconnects and the event
    is found again in the new stream; SIGTERM then ends the command."""
    start_local_ray()
    camera = LiveCamera(clip, protocol).start()
    out = tmp_path / "out"
    command = [
        str(BIN / "padim-ray"), "watch", str(small_model), f"gate={camera.url}", "--out", str(out), "--threshold", repr(threshold),
        "--status-every", "0.5", "--address", ray.get_runtime_context().gcs_address,
    ]
    driver = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    watchdog = threading.Timer(300, driver.kill)  # a bound for a hung command, not a race: every wait below is for a line
    watchdog.start()
    notices, errors, reconnecting = [], [], threading.Event()

    def read_errors():
        for line in driver.stderr:
            errors.append(line)
            if "camera gate:" in line and "reconnecting" in line:
                reconnecting.set()

    error_reader = threading.Thread(target=read_errors, daemon=True)
    error_reader.start()

    def next_notice(wanted) -> dict:
        for line in driver.stdout:
            notices.append(json.loads(line))
            if wanted(notices[-1]):
                return notices[-1]
        raise AssertionError(f"watch ended before the notice it was waited for: {notices}")

    try:
        first = next_notice(lambda n: n["notice"] == "closed")
        camera.kill()
        assert reconnecting.wait(120), "".join(errors)  # dropped (HTTP) or stalled past its read timeout (UDP)
        restarted = time.time()
        camera.start()
        again = next_notice(lambda n: n["notice"] == "opened" and n["time"] > restarted)
    finally:
        driver.send_signal(signal.SIGTERM)
        driver.wait(60)
        error_reader.join()
        rest = driver.stdout.read()
        watchdog.cancel()
        camera.kill()
    stderr = "".join(errors)
    notices += [json.loads(line) for line in rest.splitlines()]
    assert driver.returncode == 128 + signal.SIGTERM, stderr
    assert [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()] == notices
    assert first["camera"] == again["camera"] == "gate" and again["event"] > first["event"]
    assert first["peak_score"] >= threshold and Image.open(first["snapshot"]).size == (SMALL_DATA.width, SMALL_DATA.height)
    closed = [n for n in notices if n["notice"] == "closed"]
    assert all(Path(n["snapshot"]).is_file() for n in closed) and closed[-1]["event"] == again["event"]  # closed by the stop
    gate = [line for line in stderr.splitlines() if "camera gate:" in line]
    assert int(gate[-1].split("reconnects ")[1].split(",")[0]) >= 1 and "stopped" in gate[-1], stderr
    assert "Traceback" not in stderr


class Receiver(http.server.ThreadingHTTPServer):
    """A webhook endpoint on a free local port that keeps the JSON bodies POSTed to it."""

    def __init__(self):
        received = self.received = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args):
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}/events"
        threading.Thread(target=self.serve_forever, daemon=True).start()


def test_notices_are_posted_to_a_webhook_and_a_dead_one_costs_only_a_warning(small_model, clip, threshold, tmp_path, caplog):
    start_local_ray()
    receiver = Receiver()
    decisions = DecisionOptions(repr(threshold))
    try:
        result = watch(str(small_model), [str(clip)], tmp_path / "out", WatchOptions(decisions=decisions, webhook=receiver.url))
    finally:
        receiver.shutdown()
    written = [json.loads(line) for line in (tmp_path / "out" / "events.jsonl").read_text().splitlines()]
    assert result.closed == 1 and receiver.received == written and written[-1]["notice"] == "closed"

    caplog.set_level(logging.WARNING, logger="padim_ray.webhook")
    dead = WatchOptions(decisions=decisions, webhook=DEAD_URL)  # nothing listens
    result = watch(str(small_model), [str(clip)], tmp_path / "dead", dead)
    assert result.closed == 1 and len((tmp_path / "dead" / "events.jsonl").read_text().splitlines()) == len(written)
    failures = [m for m in caplog.messages if "failed (" in m]
    assert len(failures) == 1 and "Connection refused" in failures[0]  # once per run of failures, not per notice
    assert caplog.messages[-1] == f"watch: webhook {DEAD_URL}: 0 notice(s) sent, {len(written)} failed, 0 not sent"
    with pytest.raises(ConfigError, match="--webhook must be an http"):
        WatchOptions(webhook="ftp://example.com/hook")
