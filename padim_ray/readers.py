"""Live sources for `padim-ray watch`: one reader thread per camera that decodes with PyAV, samples to
--fps and keeps only the newest frames, so a slow scorer drops old frames (counted) rather than
queueing them without bound.

A URL (rtsp:// over TCP, http(s)://, udp://, anything ffmpeg opens) is opened with timeouts and
reopened with backoff whenever it fails or ends. A file is read once: replayed at its own frame
rate with `realtime` (frames kept as a camera would give them), else as fast as the scorer takes
them (the reader waits for room instead of dropping). Frame indices count samples at --fps from the
camera's start and keep increasing across reconnects, so events.RegionTracker sees one stream.
"""

from __future__ import annotations

import collections
import logging
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from padim_ray.errors import PadimError, first_line

log = logging.getLogger(__name__)

URL_SCHEMES = ("rtsp://", "rtsps://", "http://", "https://", "udp://", "rtp://", "tcp://", "srt://", "rtmp://")
OPEN_TIMEOUT = 5.0  # seconds to open a stream
READ_TIMEOUT = 5.0  # seconds without data before a stream counts as stalled
BACKOFF = (0.5, 30.0)  # first and longest wait between reopening attempts; doubles after each failure
BUFFER_FRAMES = 4  # newest frames a live camera keeps for the scorer


class SourceError(PadimError):
    """A watch source that cannot be used at all (a missing file, a bad name)."""


@dataclass(frozen=True)
class Sample:
    """A frame taken from a camera: its sample index (at --fps), its capture time (time.time()),
    the frame as decoded (H, W, 3) uint8 RGB, and resized to the model's input (S, S, 3)."""

    index: int
    captured: float
    frame: np.ndarray
    model_frame: np.ndarray


@dataclass
class ReaderStats:
    read: int = 0  # frames taken at --fps
    dropped: int = 0  # taken but pushed out of the buffer before the scorer got them
    reconnects: int = 0  # failed or ended openings of a URL that were retried
    error: str = ""  # the last failure, "" once frames flow again
    open: bool = False  # frames are flowing now


def is_url(source: str) -> bool:
    return source.lower().startswith(URL_SCHEMES)


def camera_names(sources: list[str]) -> list[tuple[str, str]]:
    """(name, source) per SOURCE: `NAME=SOURCE` names it, else a file's stem or the URL's host and path;
    names made unique with _2, _3..."""
    named = []
    for source in sources:
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)=(.+)", source)
        if match and not is_url(source) and not Path(source).exists():
            name, source = match[1], match[2]
        elif is_url(source):
            name = re.sub(r"[^A-Za-z0-9_.-]+", "_", source.split("://", 1)[1]).strip("_.") or "camera"
        else:
            name = Path(source).stem or "camera"
        check_source(source)
        named.append((name, source))
    seen: collections.Counter = collections.Counter()
    unique = []
    for name, source in named:
        seen[name] += 1
        unique.append((name if seen[name] == 1 else f"{name}_{seen[name]}", source))
    return unique


def check_source(source: str) -> None:
    """A source that is not a URL must be a file that holds a video stream (SourceError or VideoError, before any cluster work)."""
    from padim_ray.video import _video_stream

    if is_url(source):
        return
    if not Path(source).is_file():
        raise SourceError(f"source {source} is neither a video file nor a URL ({', '.join(s.rstrip(':/') for s in URL_SCHEMES)})")
    with _video_stream(source):
        pass


class Reader:
    """A camera's reader thread: start(), then take() the newest samples; `ended` once a file is read."""

    def __init__(self, name: str, source: str, fps: float, size: int, realtime: bool = False, buffer: int = BUFFER_FRAMES):
        self.name, self.source, self.fps, self.size, self.realtime = name, source, fps, size, realtime
        self.url = is_url(source)
        self.blocking = not self.url and not realtime  # a file read as fast as it is scored: wait for room, drop nothing
        self.buffer: collections.deque[Sample] = collections.deque()
        self.capacity = buffer
        self.stats = ReaderStats()
        self.ended = False  # no more samples will come (a file that was read, or a stop)
        self._room = threading.Condition()
        self._stop = threading.Event()
        self._index = 0  # the next sample's index
        self._started = time.time()
        self._thread = threading.Thread(target=self._run, name=f"reader {name}", daemon=True)

    def start(self) -> Reader:
        self._thread.start()
        return self

    def stop(self, wait: float = 1.0) -> None:
        self._stop.set()
        with self._room:
            self._room.notify_all()
        self._thread.join(wait)  # a URL blocked in ffmpeg gives up at its read timeout; the thread is a daemon

    def take(self, most: int) -> list[Sample]:
        """Up to `most` of the buffered samples, oldest first."""
        with self._room:
            taken = [self.buffer.popleft() for _ in range(min(most, len(self.buffer)))]
            self._room.notify_all()
        return taken

    @property
    def done(self) -> bool:
        """Ended and every sample taken."""
        return self.ended and not self.buffer

    def _put(self, sample: Sample) -> None:
        with self._room:
            if self.blocking:
                while len(self.buffer) >= self.capacity and not self._stop.is_set():
                    self._room.wait(0.5)
            elif len(self.buffer) >= self.capacity:
                self.buffer.popleft()
                self.stats.dropped += 1
            self.buffer.append(sample)
            self.stats.read += 1

    def _run(self) -> None:
        delay = BACKOFF[0]
        try:
            while not self._stop.is_set():
                try:
                    got = self._read_once()
                except Exception as err:  # noqa: BLE001 - any failure of one camera is reported and retried, never raised
                    got = False
                    self.stats.error = first_line(err) or type(err).__name__
                    if not self.url:
                        log.warning("watch: camera %s: %s; it ends here", self.name, self.stats.error)
                        return
                self.stats.open = False
                if not self.url or self._stop.is_set():
                    return
                if got:
                    delay = BACKOFF[0]  # it was flowing: retry soon
                    self.stats.error = self.stats.error or "stream ended"
                self.stats.reconnects += 1
                log.warning("watch: camera %s: %s; reconnecting in %.1f s (attempt %d)", self.name, self.stats.error, delay, self.stats.reconnects)
                self._stop.wait(delay)
                delay = min(BACKOFF[1], delay * 2)
        finally:
            self.ended = True
            with self._room:
                self._room.notify_all()

    def _read_once(self) -> bool:
        """Open the source and take its frames until it ends, fails or the reader stops; whether any frame came."""
        import av
        from av.video.reformatter import Interpolation, VideoReformatter

        options = {"rtsp_transport": "tcp"} if self.source.lower().startswith("rtsp") else {}
        timeout = (OPEN_TIMEOUT, READ_TIMEOUT) if self.url else None
        got = False
        with av.open(self.source, options=options, timeout=timeout) as container:
            if not container.streams.video:
                raise SourceError(f"{self.source} has no video stream")
            stream = container.streams.video[0]
            stream.codec_context.thread_count = 1
            scaler = VideoReformatter()
            first_time, started, next_time = None, time.time(), 0.0
            for frame in container.decode(stream):
                if self._stop.is_set():
                    break
                at = frame.time if frame.time is not None else time.time() - started
                first_time = at if first_time is None else first_time
                elapsed = at - first_time  # the stream's own clock, from this opening
                if elapsed < next_time - 1.0:  # its clock went back (a live stream's timestamps restarted): follow it
                    first_time, elapsed, next_time = at, 0.0, 0.0
                if elapsed + 1e-6 < next_time:
                    continue  # sampled down to --fps
                next_time = (int(elapsed * self.fps + 1e-6) + 1) / self.fps
                if self.realtime and not self.url:
                    self._stop.wait(max(0.0, started + elapsed - time.time()))  # a camera gives the frame at its time
                rgb = frame.to_ndarray(format="rgb24")
                small = scaler.reformat(frame, width=self.size, height=self.size, format="rgb24", interpolation=Interpolation.BILINEAR).to_ndarray()
                now = time.time()
                # a URL's indices follow the wall clock, so an outage is a gap that closes its events
                index = max(self._index, round((now - self._started) * self.fps)) if self.url else self._index
                self._put(Sample(index, now, rgb, small))
                self._index = index + 1
                if not got:
                    got = True
                    self.stats.open, self.stats.error = True, ""
        return got
