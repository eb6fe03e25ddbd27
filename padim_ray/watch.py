"""`padim-ray watch`: score live cameras (or files replayed as cameras) until stopped, and emit events as they happen.

This first step runs in one driver process:
- one reader thread per source (readers.py) decodes, samples to --fps and keeps the newest frames;
- one Ray actor holds the model's Scorer (on a GPU when the cluster has one) and scores batches mixed
  from all cameras; a lost actor is replaced (its batch is counted as dropped);
- the driver runs one events.RegionTracker per camera on the maps (at the model's input size) with the
  model's calibrated threshold or --threshold, and writes every notice (opened, updated, closed) as a
  JSON line on stdout and to OUT/events.jsonl (flushed per line), and at each close a JPEG of the
  event's peak frame with its heatmap and box to OUT/snapshots/;
- every --status-every seconds a line per camera (frames read, scored, dropped, reconnects, median
  and p99 latency from capture to score) is logged on stderr.
Ctrl-C and stop signals end it within a few seconds, open events closed and files flushed; with only
file sources it ends when they all end. Not built yet: docs/design.md, "Live cameras".
"""

from __future__ import annotations

import collections
import json
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import ray
from PIL import Image

from padim_ray.camera_metrics import CameraMetrics
from padim_ray.config import ClusterConfig, ConfigError, ScoreConfig
from padim_ray.decisions import Decision, DecisionOptions, resolve_decision
from padim_ray.devices import actor_device
from padim_ray.embedding import Embedder
from padim_ray.events import Event, Notice, RegionTracker
from padim_ray.readers import Reader, Sample, camera_names
from padim_ray.runtime import ActorSpec, connect, start_actors
from padim_ray.score import SCORE_REFUSAL, Scorer
from padim_ray.stop_signals import deferred
from padim_ray.store import open_model
from padim_ray.thresholds import NOT_CALIBRATED
from padim_ray.viz import Marks, draw_boxes, overlay  # imported before a stop needs a snapshot: matplotlib takes seconds to load
from padim_ray.webhook import Webhook

log = logging.getLogger(__name__)
EVENTS_LOG = "events.jsonl"
SNAPSHOTS = "snapshots"
WEBHOOK_WAIT = 2.0  # seconds the end of a watch waits for queued webhook notices (a stop must end within seconds)
LATENCY_WINDOW = 2000  # latest latencies per camera that the status's median and p99 are read from


@dataclass(frozen=True)
class WatchOptions:
    fps: float = 5.0  # frames taken per second of each source
    realtime: bool = False  # files are replayed at their own frame rate (as cameras), else read as fast as scored
    status_every: float = 10.0  # seconds between status lines
    batch: int = 16  # most frames per scoring call
    max_restarts: int = 3  # lost scoring actors replaced before watch stops
    decisions: DecisionOptions = DecisionOptions()
    webhook: str | None = None  # an http(s) URL every notice is POSTed to (padim_ray.webhook)

    def __post_init__(self):
        if not 0 < self.fps <= 120:
            raise ConfigError(f"--fps must be above 0 and at most 120, got {self.fps:g}")
        if not self.status_every > 0:
            raise ConfigError(f"--status-every must be above 0 seconds, got {self.status_every:g}")
        if self.webhook is not None and not self.webhook.lower().startswith(("http://", "https://")):
            raise ConfigError(f"--webhook must be an http:// or https:// URL, got {self.webhook}")


@dataclass
class Camera:
    """One source's reader, tracker, and what its status and snapshots need."""

    name: str
    reader: Reader
    tracker: RegionTracker
    recent: collections.deque  # (index, frame, map) of the last frames: an event's peak may precede its opening
    peaks: dict = field(default_factory=dict)  # open event id -> (frame, map) at its peak
    scored: int = 0
    latencies: collections.deque = field(default_factory=lambda: collections.deque(maxlen=LATENCY_WINDOW))
    ending: str = ""  # "ended" (its file was read) or "stopped" (by a stop), once finished

    @property
    def finished(self) -> bool:
        return bool(self.ending)

    def status(self) -> dict:
        stats = self.reader.stats
        latency = np.array(self.latencies) * 1000 if self.latencies else np.full(1, np.nan)
        return {
            "camera": self.name, "read": stats.read, "scored": self.scored, "dropped": stats.dropped, "reconnects": stats.reconnects,
            "latency_ms_median": float(np.median(latency)), "latency_ms_p99": float(np.percentile(latency, 99)),
            "state": self.ending or ("up" if stats.open else "down"), "error": stats.error,
        }


def format_status(status: dict) -> str:
    latency = (f"latency median {status['latency_ms_median']:.0f} ms, p99 {status['latency_ms_p99']:.0f} ms" if status["scored"]
               else "no latency yet")
    line = (f"camera {status['camera']}: {status['state']}, read {status['read']}, scored {status['scored']}, dropped {status['dropped']}, "
            f"reconnects {status['reconnects']}, {latency}")
    return line + (f" ({status['error']})" if status["error"] and status["state"] != "up" else "")


@dataclass
class WatchResult:
    out: Path
    closed: int  # events closed (all cameras)
    cameras: dict[str, dict]  # name -> its last status


class EventSink:
    """Notices as JSON lines on stdout and appended to OUT/events.jsonl, each flushed at once; snapshots at closes."""

    def __init__(self, out: Path, decision: Decision, stdout=None, webhook: Webhook | None = None):
        self.out, self.decision, self.webhook = out, decision, webhook
        self.run = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())  # in snapshot names: event ids count from 0 in every run
        (out / SNAPSHOTS).mkdir(parents=True, exist_ok=True)
        self.file = open(out / EVENTS_LOG, "a")
        self.stdout = stdout or sys.stdout
        self.closed = 0

    def emit(self, camera: Camera, notice: Notice, at: float) -> None:
        event = notice.event
        record = {"camera": camera.name, "notice": notice.kind, "time": at, **asdict(event), "threshold": self.decision.threshold.value}
        if notice.kind == "closed":
            peak = camera.peaks.pop(event.event, None)
            if peak is not None:
                record["snapshot"] = str(self.snapshot(camera.name, event, *peak))
        line = json.dumps(record) + "\n"
        with deferred():  # a stop waits until the line is in both places
            for stream in (self.file, self.stdout):
                stream.write(line)
                stream.flush()
            self.closed += notice.kind == "closed"
        if self.webhook:
            self.webhook.post(record)

    def snapshot(self, name: str, event: Event, frame: np.ndarray, anomaly_map: np.ndarray) -> Path:
        """The peak frame with the heatmap of its regions over the off level (from there up to the peak) and the event's box, as a JPEG."""
        off = self.decision.events.hysteresis * self.decision.threshold.value
        picture = overlay(frame, np.maximum(anomaly_map - off, 0), max(event.peak_score - off, 1e-6))
        scale = (frame.shape[0] / anomaly_map.shape[0], frame.shape[1] / anomaly_map.shape[1])
        draw_boxes(picture, event.peak_frame, Marks(self.decision.threshold.value, [event]), scale)
        path = self.out / SNAPSHOTS / f"{name}_{self.run}_{event.event:04d}.jpg"
        Image.fromarray(picture).save(path, quality=90)
        return path

    def close(self) -> None:
        self.file.close()
        if self.webhook:
            self.webhook.close(wait=WEBHOOK_WAIT)


class RemoteScorer:
    """The model's Scorer in one Ray actor (a GPU when the cluster has one), replaced when lost."""

    def __init__(self, model: str, max_restarts: int):
        self.model, self.restarts_left = model, max_restarts
        self.actor = self._start()

    def _start(self):
        gpus = 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0
        threads = 1 if gpus else max(1, (os.cpu_count() or 2) - 1)  # the readers decode on the driver
        plan = [ActorSpec(1.0, gpus, threads)]
        return start_actors(plan, lambda i, spec: LiveScorer.options(**spec.options()).remote(self.model), ClusterConfig(), "scoring")[0]

    def maps(self, frames: np.ndarray) -> np.ndarray | None:
        """(B, S, S) float32 maps at the model's input size; None when the actor was lost (and replaced)."""
        try:
            return ray.get(self.actor.maps.remote(frames))
        except ray.exceptions.RayActorError as err:
            if self.restarts_left <= 0:
                raise
            self.restarts_left -= 1
            log.warning("watch: the scoring actor was lost (%s); starting another", str(err).splitlines()[0][:200])
            self.actor = self._start()
            return None

    def close(self) -> None:
        ray.kill(self.actor)


@ray.remote
class LiveScorer:
    """The model's Scorer in an actor: (B, S, S, 3) uint8 frames in, (B, S, S) float32 maps at the model's input size out."""

    def __init__(self, model: str):
        self.scorer = Scorer(model, ScoreConfig(), actor_device())
        self.size = (self.scorer.embedder.image_size,) * 2

    def maps(self, frames: np.ndarray) -> np.ndarray:
        return self.scorer.maps(frames, self.size).float().cpu().numpy()


def watch(model: str, sources: list[str], out: str | Path, options: WatchOptions = WatchOptions(), address: str | None = None, stdout=None) -> WatchResult:
    """Watch `sources` with the model at `model` until stopped (KeyboardInterrupt, re-raised after open
    events are closed and files flushed) or, with only file sources, until they all end."""
    store = open_model(model)
    store.check_reproduced(Embedder(store.attributes.model_config), SCORE_REFUSAL)
    decision = resolve_decision(store.attributes, options.decisions)
    if decision is None:
        raise ConfigError(f"watch needs a threshold: {NOT_CALIBRATED}")
    if "://" in str(out):
        raise ConfigError(f"watch writes --out to a local folder, got {out}")
    named = camera_names(list(sources))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    size = store.attributes.image_size
    log.info("watch: %d camera(s) at %g fps, threshold %.4g (%s) -> %s", len(named), options.fps, decision.threshold.value, decision.threshold.meaning, out)
    connect(address)
    metrics = CameraMetrics()
    sink = EventSink(out, decision, stdout, Webhook(options.webhook) if options.webhook else None)
    scorer, cameras = None, []
    try:
        scorer = RemoteScorer(str(store.path), options.max_restarts)
        for name, source in named:
            tracker = RegionTracker(options.fps, decision.threshold.value, decision.events)
            keep = tracker.min_frames + tracker.merge_frames + 2
            cameras.append(Camera(name, Reader(name, source, options.fps, size, options.realtime).start(), tracker, collections.deque(maxlen=keep)))
        _loop(cameras, scorer, sink, metrics, options)
    finally:
        for camera in cameras:
            camera.reader.stop(wait=0.2)
            metrics.follow(camera.name, camera.reader.stats)
        for camera in cameras:
            _finish(camera, sink, "stopped")
        sink.close()
        if scorer is not None:
            scorer.close()
        for camera in cameras:
            log.info("watch: %s", format_status(camera.status()))
    return WatchResult(out, sink.closed, {camera.name: camera.status() for camera in cameras})


def _loop(cameras: list[Camera], scorer: RemoteScorer, sink: EventSink, metrics: CameraMetrics, options: WatchOptions) -> None:
    next_status = time.monotonic() + options.status_every
    turn = 0
    while True:
        for camera in cameras:
            if camera.reader.done and not camera.finished:
                _finish(camera, sink, "ended")
        live = [camera for camera in cameras if not camera.finished]
        if not live:
            return
        turn += 1
        share = max(1, options.batch // len(live))
        batch: list[tuple[Camera, Sample]] = []
        for camera in live[turn % len(live):] + live[: turn % len(live)]:  # a different camera first each turn
            batch += [(camera, sample) for sample in camera.reader.take(min(share, options.batch - len(batch)))]
        if batch:
            _score(batch, scorer, sink, metrics)
        else:
            time.sleep(0.01)
        for camera in live:
            metrics.follow(camera.name, camera.reader.stats)
        if time.monotonic() >= next_status:
            next_status += options.status_every
            for camera in cameras:
                log.info("watch: %s", format_status(camera.status()))


def _score(batch: list[tuple[Camera, Sample]], scorer: RemoteScorer, sink: EventSink, metrics: CameraMetrics) -> None:
    maps = scorer.maps(np.stack([sample.model_frame for _, sample in batch]))
    if maps is None:  # the actor was lost with this batch
        for camera, _ in batch:
            camera.reader.stats.dropped += 1
        return
    now = time.time()
    for (camera, sample), anomaly_map in zip(batch, maps):
        latency = now - sample.captured
        camera.scored += 1
        camera.latencies.append(latency)
        metrics.scored(camera.name, latency)
        camera.recent.append((sample.index, sample.frame, anomaly_map))
        for notice in camera.tracker.step(sample.index, anomaly_map):
            if notice.kind in ("opened", "updated"):
                _keep_peak(camera, notice.event)
            sink.emit(camera, notice, sample.captured)


def _keep_peak(camera: Camera, event: Event) -> None:
    """Remember the frame and map at the event's peak (among the recent frames; else the latest)."""
    found = next(((frame, m) for index, frame, m in camera.recent if index == event.peak_frame), None)
    camera.peaks[event.event] = found or camera.recent[-1][1:]


def _finish(camera: Camera, sink: EventSink, ending: str) -> None:
    """The camera's end: its open events closed."""
    if camera.finished:
        return
    camera.ending = ending
    for notice in camera.tracker.finish():
        sink.emit(camera, notice, time.time())
