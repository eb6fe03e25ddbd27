"""`padim-ray watch`: a clip replayed as a live camera yields its event as it happens (stdout, events.jsonl,
a snapshot); a dead camera is retried while the other is scored; SIGTERM closes open events and ends it."""

from __future__ import annotations

import http.server
import io
import json
import logging
import re
import shutil
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

from padim_ray.cameras import CameraListError, CameraSpec, watched_cameras
from padim_ray.config import ConfigError
from padim_ray.decisions import DecisionOptions
from padim_ray.live_scoring import ACTOR_PREFIX
from padim_ray.map_segments import MapSegments, SegmentOptions, parse_duration, read_segments
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
    result = watch(watched_cameras(str(small_model), [str(clip)]), tmp_path / "out", options)
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
    connection drops; UDP: the datagrams stall) and started again on its port, and one of the two scoring actors
    is killed meanwhile: the reader reconnects, the actor is replaced, and the event is found again in the new
    stream; SIGTERM then ends the command."""
    start_local_ray()
    camera = LiveCamera(clip, protocol).start()
    out = tmp_path / "out"
    command = [
        str(BIN / "padim-ray"), "watch", str(small_model), f"gate={camera.url}", "--out", str(out), "--threshold", repr(threshold),
        "--scorers", "2", "--status-every", "0.5", "--address", ray.get_runtime_context().gcs_address,
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
        [scorer, _] = [a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(ACTOR_PREFIX)]
        ray.kill(ray.get_actor(scorer["name"], namespace=scorer["namespace"]))
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
    assert "a scoring actor of" in stderr and "was lost" in stderr and "Traceback" not in stderr


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
        result = watch(watched_cameras(str(small_model), [str(clip)]), tmp_path / "out", WatchOptions(decisions=decisions, webhook=receiver.url))
    finally:
        receiver.shutdown()
    written = [json.loads(line) for line in (tmp_path / "out" / "events.jsonl").read_text().splitlines()]
    assert result.closed == 1 and receiver.received == written and written[-1]["notice"] == "closed"

    caplog.set_level(logging.WARNING, logger="padim_ray.webhook")
    dead = WatchOptions(decisions=decisions, webhook=DEAD_URL)  # nothing listens
    result = watch(watched_cameras(str(small_model), [str(clip)]), tmp_path / "dead", dead)
    assert result.closed == 1 and len((tmp_path / "dead" / "events.jsonl").read_text().splitlines()) == len(written)
    failures = [m for m in caplog.messages if "failed (" in m]
    assert len(failures) == 1 and "Connection refused" in failures[0]  # once per run of failures, not per notice
    assert caplog.messages[-1] == f"watch: webhook {DEAD_URL}: 0 notice(s) sent, {len(written)} failed, 0 not sent"
    with pytest.raises(ConfigError, match="--webhook must be an http"):
        WatchOptions(webhook="ftp://example.com/hook")


def test_a_camera_list_gives_each_camera_its_source_model_and_threshold(small_model, clip, tmp_path):
    listed = tmp_path / "cameras.toml"
    listed.write_text(f'[cameras.door]\nsource = "{clip}"\nthreshold = "2/h"\n\n[cameras.lawn]\nsource = "{DEAD_URL}"\nmodel = "other"\n')
    assert watched_cameras(str(small_model), [f"gate={clip}"], listed) == [
        CameraSpec("gate", str(clip), str(small_model)), CameraSpec("door", str(clip), str(small_model), "2/h"), CameraSpec("lawn", DEAD_URL, "other"),
    ]
    bad = {
        "": "must hold [cameras.NAME] tables",
        "[cameras.a]\nsource = 1\n": "camera a: source must be a non-empty string",
        "[cameras.a]\nmodel = 'm'\n": "camera a: no source",
        "[cameras.a]\nsource = '/no/such.avi'\n": "neither a video file nor a URL",
        f"[cameras.a]\nsource = '{clip}'\nfps = 3\n": "camera a: unknown key 'fps'",
        f"[cameras.gate]\nsource = '{clip}'\n": "camera gate is named twice",
        "[cameras\n": "is not TOML",
    }
    for text, message in bad.items():
        listed.write_text(text)
        with pytest.raises((CameraListError, SourceError), match=re.escape(message)):
            watched_cameras(str(small_model), [f"gate={clip}"], listed)
    listed.write_text(f"[cameras.a]\nsource = '{clip}'\n")
    with pytest.raises(CameraListError, match=r"camera list .*cameras.toml, camera a: no model; give it model"):
        watched_cameras(None, [], listed)
    with pytest.raises(CameraListError, match=r"camera list .*missing.toml cannot be read"):
        watched_cameras(str(small_model), [], tmp_path / "missing.toml")
    out = tmp_path / "out"
    assert_clean_failure(run("watch", "--cameras", tmp_path / "missing.toml", "--out", out), "missing.toml cannot be read", out=out)


def test_cameras_of_two_models_are_scored_by_their_own_actors_with_their_own_thresholds(small_model, clip, threshold, tmp_path):
    """A camera list: `gate` on a copy of the model with the threshold that finds the vehicle, `quiet` on the model
    itself with one nothing reaches; both keep rolling map segments, whose maps are those the events came from."""
    start_local_ray()
    copy = tmp_path / "copy"
    shutil.copytree(small_model, copy)
    listed = tmp_path / "cameras.toml"
    listed.write_text(f'[cameras.gate]\nsource = "{clip}"\nmodel = "{copy}"\nthreshold = "{threshold!r}"\n\n'
                      f'[cameras.quiet]\nsource = "{clip}"\nthreshold = "1e9"\n')
    options = WatchOptions(segments=SegmentOptions(seconds=1.0, side=16, retention=3600.0))
    result = watch(watched_cameras(str(small_model), [], listed), tmp_path / "out", options, stdout=io.StringIO())
    notices = [json.loads(line) for line in (tmp_path / "out" / "events.jsonl").read_text().splitlines()]
    assert {n["camera"] for n in notices} == {"gate"} and result.closed == 1 and notices[-1]["threshold"] == threshold
    for name in ("gate", "quiet"):
        status = result.cameras[name]
        assert status["scored"] == status["read"] == 21 and status["dropped"] == 0 and status["state"] == "ended"
        kept = read_segments(tmp_path / "out" / "maps" / name)
        assert kept["maps"].shape == (21, 16, 16) and kept["maps"].dtype == np.float16 and list(kept["index"]) == list(range(21))
    peak = notices[-1]["peak_frame"]
    segment_peak = read_segments(tmp_path / "out" / "maps" / "gate")["maps"][peak].max()
    assert 0.5 * notices[-1]["peak_score"] < segment_peak <= notices[-1]["peak_score"]  # area means of the same map


def test_map_segments_roll_over_by_capture_time_and_expire_after_the_retention(tmp_path):
    folder = tmp_path / "maps" / "gate"
    folder.mkdir(parents=True)
    (folder / "notes.txt").write_text("not a segment")  # never removed: not written by watch
    segments = MapSegments(folder, SegmentOptions(seconds=1.0, side=8, retention=2.0))
    rng = np.random.default_rng(3)
    maps = rng.random((51, 32, 32), dtype=np.float32)
    start = 1_700_000_000.0
    for i in range(51):  # 10 s at 5 fps
        segments.add(i, start + 0.2 * i, maps[i])
    segments.flush()
    assert segments.written == 11 and segments.removed == 8  # each whole second, and the last frame alone
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["1700000008000-1700000008800.npz", "1700000009000-1700000009800.npz", "1700000010000-1700000010000.npz", "notes.txt"]
    kept = read_segments(folder)
    assert list(kept["index"]) == list(range(40, 51)) and np.allclose(kept["captured"], start + 0.2 * np.arange(40, 51))
    area_means = maps[40:].reshape(11, 8, 4, 8, 4).mean(axis=(2, 4))
    assert np.allclose(kept["maps"], area_means, rtol=1e-3, atol=1e-3)
    with pytest.raises(ConfigError, match="--map-retention"):
        SegmentOptions(seconds=60.0, retention=30.0)
    assert parse_duration("90min", "--map-retention") == 5400.0
    with pytest.raises(ConfigError, match="like 90s, 30min, 24h or 7d, got '3 weeks'"):
        parse_duration("3 weeks", "--map-retention")
