"""Inputs and decoding: videos and frame folders cut into work units, decoded by PyAV or Pillow.

Inputs are cut into work units with stable ids (one video, or a range of one folder's frames),
which frames.py turns into the Ray Data source of frames.

Frames are resized while decoding (ffmpeg's scaler; Pillow for image files), so only small uint8
frames travel, and decode workers never import torch.
"""

from __future__ import annotations

import logging
import os
import re
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from padim_ray.config import MAX_FRAME_SIDE
from padim_ray.errors import PadimError, first_line
from padim_ray.files import Location

log = logging.getLogger(__name__)

VIDEO_SUFFIXES = {".avi", ".mp4", ".mkv", ".mov", ".webm", ".m4v", ".mpg", ".mpeg"}
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff"}
FRAMES_PER_FOLDER_UNIT = 256  # folders of frames are split into units this long for parallelism
TRUNCATION_TOLERANCE = 1  # frames a header may over-report without the file being cut off
NOT_LAST = -1  # `unit_total` of every row but a unit's last (the rows of frames.decode_units)
BAD_UNIT = -2  # `unit_total` of the one row that says a unit could not be decoded (--skip-bad-inputs)
FOLDER_FPS = 24.0  # frame rate assumed for folders of frames (ShanghaiTech's), and for videos that declare none


class VideoError(PadimError):
    """An input that cannot be decoded."""


@dataclass(frozen=True)
class InputPolicy:
    """What a run does with inputs that cannot be decoded."""

    skip_bad: bool = False  # leave them out (listed in the model's skipped_inputs) instead of stopping (--skip-bad-inputs)


@dataclass(frozen=True)
class WorkUnit:
    """A slice of one input that one decode task reads in order."""

    uid: int
    path: str  # a video file, or a folder of frames
    start: int = 0  # first frame: a folder's file index; a video's frame index (decoded from the start, earlier frames dropped)
    stop: int | None = None  # one past the last frame (None: to the end). make_units cuts folders only; calibration cuts videos too
    frames: int = 0  # frames the header declares (videos) or frame files (folders); exact count comes from decoding
    height: int = 0  # native frame size
    width: int = 0
    fps: float = FOLDER_FPS  # frames per second: the video's declared rate, FOLDER_FPS for folders

    @property
    def is_video(self) -> bool:
        return _suffix(Location(self.path)) in VIDEO_SUFFIXES


def _natural_key(location: Location) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", location.name)]


def _suffix(location: Location) -> str:
    return os.path.splitext(location.name)[1].lower()


def frame_files(folder: Location | str | Path) -> list[Location]:
    """The image files of a frame folder (local or in a bucket), in natural order (2.jpg before 10.jpg)."""
    return sorted((p for p in Location(folder).iterdir() if _suffix(p) in IMAGE_SUFFIXES), key=_natural_key)


def expand_inputs(paths: list[str | Path | Location]) -> list[Location]:
    """Videos and frame folders named by `paths` (local paths or URIs); a folder of videos expands to its videos.

    An input named twice (directly, through a folder or a link) is refused: its frames would count twice.
    """
    found: list[Location] = []
    for raw in paths:
        location = Location(raw)
        if not location.exists():
            raise VideoError(f"input {location} does not exist; pass video files or folders of frames")
        if location.is_file():
            if _suffix(location) not in VIDEO_SUFFIXES:
                raise VideoError(f"input {location} is not a video ({', '.join(sorted(VIDEO_SUFFIXES))})")
            found.append(location)
        elif frame_files(location):
            found.append(location)
        else:
            videos = sorted((p for p in location.iterdir() if _suffix(p) in VIDEO_SUFFIXES), key=_natural_key)
            if not videos:
                raise VideoError(f"folder {location} holds neither frames nor videos; point at a folder of .jpg/.png or videos")
            found.extend(videos)
    seen: dict[str, Location] = {}
    for location in found:
        if location.resolved in seen:
            raise VideoError(f"input {location} is given twice (also as {seen[location.resolved]}); pass each input once")
        seen[location.resolved] = location
    return found


@contextmanager
def _readable(where: Location | str | Path):
    """What decoders open: a local file's path, or a bucket object as a binary file object."""
    location = Location(where)
    if not location.is_remote:
        yield location.path
    else:
        with location.open("rb") as handle:
            yield handle


def index_video(path: Location | str | Path) -> tuple[int, int, int, float]:
    """(frames, height, width, frames per second) of a video, or a VideoError naming the file; run before any cluster work.

    Frames are counted from the container's packets, decoding only until a first frame shows that
    the stream decodes: headers often declare no count (Matroska, WebM, MPEG-PS), and map stores are
    sized from this one. A video in a bucket is streamed with ranged reads, never held whole.
    """
    import av

    with _video_stream(path) as (container, stream):
        frames, decoded = 0, False
        try:
            for packet in container.demux(stream):
                if packet.size:
                    frames += 1
                    decoded = decoded or bool(stream.decode(packet))
        except av.FFmpegError as err:
            raise _unopenable(path, err) from None
        height, width = stream.codec_context.height, stream.codec_context.width
        _check_frame_size(f"video {path}", height, width)
        rate = stream.average_rate or stream.guessed_rate
        return frames, height, width, float(rate) if rate else FOLDER_FPS


@contextmanager
def _video_stream(path: Location | str | Path):
    """(container, its first video stream) of `path`, opened with PyAV to decode on one thread
    (a decode task reserves one CPU); a file that cannot be opened or has no video is a VideoError."""
    import av

    with _readable(path) as source:
        try:
            container = av.open(source)
        except av.FFmpegError as err:
            raise _unopenable(path, err) from None
        with container:
            if not container.streams.video:
                raise VideoError(f"input {path} has no video stream; pass video files or folders of frames")
            stream = container.streams.video[0]
            stream.codec_context.thread_count = 1
            yield container, stream


def _unopenable(path, err: Exception) -> VideoError:
    """The one-line error for a video that cannot be opened (to index it, or to decode it)."""
    return VideoError(f"cannot open video {path} ({first_line(err)}); is it a complete, readable video file?")


def make_units(
    inputs: list[Location | str | Path], folder_unit_frames: int = FRAMES_PER_FOLDER_UNIT, bad: list[tuple[str, str]] | None = None
) -> tuple[list[WorkUnit], int]:
    """Cut inputs into work units and estimate their total frames (from headers, for progress only).

    Folders are cut every `folder_unit_frames` files (callers that write chunked output pass a
    multiple of their chunk length, so units start on chunk boundaries). An input that cannot be
    opened raises a VideoError, or with a `bad` list is left out and listed there as (path, reason).
    """
    units: list[WorkUnit] = []
    for path in inputs:
        try:
            units.extend(_input_units(path, len(units), folder_unit_frames))
        except VideoError as err:
            if bad is None:
                raise
            bad.append((str(path), str(err)))
    return units, sum(u.frames for u in units)


def _input_units(path: Location | str | Path, first_uid: int, folder_unit_frames: int) -> list[WorkUnit]:
    path = Location(path)
    if path.is_dir():
        files = frame_files(path)
        height, width = read_frame(files[0]).shape[:2]  # validates the format now, before any cluster work
        starts = range(0, len(files), folder_unit_frames)
        return [
            WorkUnit(first_uid + i, path.uri, start, min(start + folder_unit_frames, len(files)),
                     min(folder_unit_frames, len(files) - start), height, width)
            for i, start in enumerate(starts)
        ]
    frames, height, width, fps = index_video(path)  # validates the container now, before any cluster work
    return [WorkUnit(first_uid, path.uri, frames=frames, height=height, width=width, fps=fps)]


def iter_unit_frames(unit: WorkUnit, stride: int = 1, size: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """Decode a unit's (frame index, (H, W, 3) uint8 RGB frame) in order, keeping every `stride`-th.

    With `size`, frames come resized to (size, size) (aspect not kept, as in the paper).
    """
    if unit.is_video:
        yield from _video_frames(unit.path, stride, size, unit.start, unit.stop)
    else:
        files = frame_files(unit.path)
        native = frame_size(files[0])  # every frame of an input must match its first
        for index, file in enumerate(files[unit.start : unit.stop], start=unit.start):
            if index % stride == 0:
                yield index, read_frame(file, size, native)


def _video_frames(path: str, stride: int, size: int | None, start: int = 0, stop: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """A video's (index, frame) in order, decoded with PyAV on one thread, every `stride`-th of frames
    [start, stop) kept (indices count from the video's first frame; earlier frames are decoded, not scaled).

    Not decord, which decoded videos before: decord 0.6's next() keeps queueing packets until its
    decoding thread answers, and that thread decodes the queue whenever the reader waits. A decode
    task that waits for frame credit thus ended up holding the rest of the video decoded (3.37 GiB
    at 16,384 frames at 256x256). PyAV decodes only when asked. With one scaler for the whole video
    it costs what decord did (1.9 ms of CPU per 768x576 frame scaled to 256x256); a new scaler per
    frame (`VideoFrame.reformat`) cost 4.7.
    """
    import av
    from av.video.reformatter import Interpolation, VideoReformatter

    scaler = VideoReformatter()
    index, reached = 0, 0
    with _video_stream(path) as (container, stream):
        declared, rate = stream.frames, stream.average_rate
        try:
            for frame in container.decode(stream):
                if index == stop:
                    return
                if index % stride == 0 and index >= start:
                    scaled = scaler.reformat(frame, width=size, height=size, format="rgb24", interpolation=Interpolation.BILINEAR)
                    yield index, scaled.to_ndarray()
                index += 1
                reached = max(index, _frame_number(frame, stream.time_base, rate) + 1)
        except av.FFmpegError as err:
            raise VideoError(f"video {path} is corrupt at frame {index} ({first_line(err)}); re-encode or remove it") from None
    if reached < declared - TRUNCATION_TOLERANCE:  # the container promised more: the file ends early
        raise VideoError(f"video {path} is truncated: decoded {index} of {declared} frames; re-copy or remove it")


def _frame_number(frame, time_base, rate) -> int:
    """Which of the declared frames `frame` is, by its timestamp: a video may declare empty frames that
    repeat the last picture (OpenCV's tree.avi: 68 pictures in 444 frames), which decode to nothing."""
    if frame.pts is None or not time_base or not rate:
        return -1
    return round(float(frame.pts * time_base * rate))


def read_frame(file: Location | str | Path, size: int | None = None, native: tuple[int, int] | None = None) -> np.ndarray:
    """One image file as (H, W, 3) uint8 RGB, resized to (size, size) if given (antialiased bilinear).

    Other channel counts are an error, not converted; so is a native size other than `native` (H, W).
    """
    from PIL import Image

    with _image(file) as image:
        if image.mode != "RGB":
            raise VideoError(
                f"frame {file} has {len(image.getbands())} channels ({image.mode}), models take 3 (RGB); "
                "convert the frames to RGB"
            )
        if native and (image.height, image.width) != tuple(native):
            raise VideoError(
                f"frame {file} is {image.width}x{image.height}, the first frame of its folder is "
                f"{native[1]}x{native[0]}; all frames of an input must match"
            )
        return np.asarray(image.resize((size, size), Image.BILINEAR) if size else image)


def frame_size(file: Location | str | Path) -> tuple[int, int]:
    """(H, W) of an image file, from its header."""
    with _image(file) as image:
        return image.height, image.width


@contextmanager
def _image(file: Location | str | Path):
    """An image file opened with Pillow: its header read and its size checked, its pixels not yet decoded."""
    from PIL import Image

    try:
        with _readable(file) as source, Image.open(source) as image:
            _check_frame_size(f"frame {file}", image.height, image.width)
            yield image
    except (OSError, Image.DecompressionBombError) as err:  # Pillow refuses > 179 Mpixels itself
        raise VideoError(f"cannot read frame {file} ({first_line(err)})") from None


def _check_frame_size(what: str, height: int, width: int) -> None:
    """A VideoError unless the declared frame size is at least 1x1 and at most MAX_FRAME_SIDE a side
    (a header may declare a huge frame that decoding would then allocate: a decompression bomb)."""
    if not (1 <= height <= MAX_FRAME_SIDE and 1 <= width <= MAX_FRAME_SIDE):
        raise VideoError(
            f"{what} declares {width}x{height} frames, beyond 1x1 to {MAX_FRAME_SIDE}x{MAX_FRAME_SIDE}; "
            "resize it, or leave it out (--skip-bad-inputs)"
        )


def input_ids(paths: list[str]) -> dict[str, str]:
    """A readable id per input, unique by construction and independent of order: the shortest suffix
    of its path that no other input's path ends with (`01_0014`, or `a/x` and `b/x` for /a/x.mp4 and
    /b/x.mp4), video suffixes dropped unless they alone tell two inputs apart."""
    parts = {path: _id_parts(path, keep_suffix=False) for path in dict.fromkeys(paths)}
    shared = Counter(parts.values())
    parts = {path: _id_parts(path, keep_suffix=True) if shared[p] > 1 else p for path, p in parts.items()}
    depth = max(map(len, parts.values()))
    counts = [Counter(p[-k:] for p in parts.values()) for k in range(depth + 1)]
    return {path: "/".join(next((p[-k:] for k in range(1, len(p)) if counts[k][p[-k:]] == 1), p)) for path, p in parts.items()}


def _id_parts(path: str, keep_suffix: bool) -> tuple[str, ...]:
    """The components of an input's path (the bucket's scheme first), its video suffix dropped unless `keep_suffix`."""
    location = Location(path)
    *folders, name = [part for part in location.path.split("/") if part]
    if not keep_suffix and os.path.splitext(name)[1].lower() in VIDEO_SUFFIXES:
        name = os.path.splitext(name)[0]
    return ((f"{location.protocol}:",) if location.is_remote else ()) + (*folders, name)
