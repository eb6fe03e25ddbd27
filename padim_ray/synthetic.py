"""STC-shaped synthetic scenes with exact ground truth: a static textured campus, walking people,
and test clips with anomalies (a fast vehicle, a thrown object, both at once, or none) whose pixel masks are exact.

Written in the ShanghaiTech Campus layout (docs/design.md, "ShanghaiTech Campus layout"), deterministic for a seed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SyntheticSpec:
    """Size of a generated dataset; the defaults are small enough for tests."""

    scenes: tuple[str, ...] = ("01",)
    train_videos: int = 3  # per scene; fewer frames leave walkway positions unseen in training
    train_frames: int = 64  # per training video
    test_clips: int = 2  # per scene; clip i shows anomalies[i % len(anomalies)]
    test_frames: int = 40  # per test clip
    width: int = 856  # STC's frame size
    height: int = 480
    walkers: int = 8  # people on screen at a time
    fps: int = 24
    seed: int = 0
    anomalies: tuple[str, ...] = ("vehicle", "thrown")  # per clip, in turn: one of ANOMALIES
    calibration_clips: int = 0  # per scene: normal clips like the test clips, in ROOT/calibration/frames/ (not STC's)


@dataclass
class _Mover:
    """A shape crossing the frame: an ellipse of radii (ry, rx) at (y, x), moving (vy, vx) per frame."""

    y: float
    x: float
    vy: float
    vx: float
    ry: float
    rx: float
    color: np.ndarray
    gravity: float = 0.0

    def step(self) -> None:
        self.y += self.vy
        self.x += self.vx
        self.vy += self.gravity

    def mask(self, height: int, width: int) -> np.ndarray:
        """The ellipse's pixels (H, W) bool."""
        mask = np.zeros((height, width), dtype=bool)
        window, inside = self._window(height, width)
        mask[window] = inside
        return mask

    def paint(self, image: np.ndarray, mask: np.ndarray | None = None) -> None:
        """Fill the ellipse in `image` (H, W, 3) with the colour, and set it in `mask` (H, W) if given:
        as `image[self.mask(h, w)] = color`, computed only in the ellipse's bounding box."""
        window, inside = self._window(*image.shape[:2])
        image[window][inside] = self.color
        if mask is not None:
            mask[window][inside] = 1

    def _window(self, height: int, width: int) -> tuple[tuple[slice, slice], np.ndarray]:
        """The ellipse's bounding box within the frame, and which of its pixels are inside."""
        y0, y1 = max(0, int(np.floor(self.y - self.ry))), min(height, int(np.ceil(self.y + self.ry)) + 1)
        x0, x1 = max(0, int(np.floor(self.x - self.rx))), min(width, int(np.ceil(self.x + self.rx)) + 1)
        y0, x0 = min(y0, y1), min(x0, x1)
        ys = (np.arange(y0, y1) - self.y)[:, None] / self.ry
        xs = (np.arange(x0, x1) - self.x)[None, :] / self.rx
        return (slice(y0, y1), slice(x0, x1)), ys**2 + xs**2 <= 1.0


def _background(spec: SyntheticSpec, rng: np.random.Generator) -> np.ndarray:
    """A static campus: smooth colour fields, tiled pavement texture, a lawn and a few buildings."""
    h, w = spec.height, spec.width
    coarse = rng.uniform(60, 200, size=(6, 10, 3))
    ys = np.linspace(0, coarse.shape[0] - 1, h)
    xs = np.linspace(0, coarse.shape[1] - 1, w)
    y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
    y1, x1 = np.minimum(y0 + 1, coarse.shape[0] - 1), np.minimum(x0 + 1, coarse.shape[1] - 1)
    fy, fx = (ys - y0)[:, None, None], (xs - x0)[None, :, None]
    image = (
        coarse[y0][:, x0] * (1 - fy) * (1 - fx) + coarse[y0][:, x1] * (1 - fy) * fx
        + coarse[y1][:, x0] * fy * (1 - fx) + coarse[y1][:, x1] * fy * fx
    )
    tiles = ((np.arange(h)[:, None] // 16 + np.arange(w)[None, :] // 16) % 2) * 18.0
    image += tiles[..., None] + rng.normal(0, 6, size=(h, w, 1))
    walkway = slice(int(h * 0.45), int(h * 0.9))
    image[walkway] = 0.5 * image[walkway] + 0.5 * np.array([150.0, 140.0, 130.0])
    for _ in range(4):  # buildings above the walkway
        top, left = rng.integers(0, h // 4), rng.integers(0, w - w // 5)
        image[top : int(h * 0.4), left : left + w // 6] = rng.uniform(40, 120, size=3)
    return np.clip(image, 0, 255)


LANES = (0.58, 0.68, 0.78)  # walkway paths people follow, as fractions of the frame height
CLOTHES = np.array([[60, 60, 70], [110, 90, 70], [40, 60, 110], [150, 150, 150], [90, 40, 40], [70, 100, 70]], dtype=float)


def _walker(spec: SyntheticSpec, rng: np.random.Generator) -> _Mover:
    """A person walking along one of the lanes, in everyday clothing colours."""
    h, w = spec.height, spec.width
    direction = rng.choice([-1.0, 1.0])
    return _Mover(
        y=(rng.choice(LANES) + rng.normal(0, 0.01)) * h,
        x=rng.uniform(0, w),
        vy=0.0,
        vx=direction * rng.uniform(3.0, 6.0) * w / 856,
        ry=0.05 * h,
        rx=0.012 * w,
        color=CLOTHES[rng.integers(len(CLOTHES))] + rng.normal(0, 8, size=3),
    )


# what a test clip shows from a third of the way in: a vehicle (large, fast, along the walkway), an
# object thrown in an arc, both at once (the object thrown from the far side), or nothing (a normal clip)
ANOMALIES = ("vehicle", "thrown", "vehicle+thrown", "none")


def _anomalies(kind: str, spec: SyntheticSpec) -> list[_Mover]:
    """The movers of one of ANOMALIES."""
    h, w = spec.height, spec.width
    vehicle = _Mover(y=0.7 * h, x=-0.1 * w, vy=0.0, vx=0.04 * w, ry=0.07 * h, rx=0.08 * w, color=np.array([220.0, 30.0, 30.0]))
    thrown = _Mover(
        y=0.6 * h, x=0.1 * w, vy=-0.03 * h, vx=0.03 * w, ry=0.03 * h, rx=0.03 * h,
        color=np.array([30.0, 220.0, 60.0]), gravity=0.0015 * h,
    )
    if kind == "vehicle+thrown":
        thrown.x, thrown.vx = 0.9 * w, -thrown.vx
    return {"vehicle": [vehicle], "thrown": [thrown], "vehicle+thrown": [vehicle, thrown], "none": []}[kind]


class _Scene:
    """One camera: a background, walkers that wrap around, sensor noise."""

    def __init__(self, spec: SyntheticSpec, rng: np.random.Generator, background: np.ndarray):
        self.spec, self.rng, self.background = spec, rng, background
        self.walkers = [_walker(spec, rng) for _ in range(spec.walkers)]
        self.canvas = np.empty_like(background)  # each frame is drawn here: a fresh 10 MB array per frame cost more than drawing it

    def frame(self, anomalies: list[_Mover] = ()) -> tuple[np.ndarray, np.ndarray]:
        """The next frame (H, W, 3) uint8 and its anomaly mask (H, W) uint8."""
        h, w = self.spec.height, self.spec.width
        image = self.canvas
        np.copyto(image, self.background)
        for walker in self.walkers:
            walker.paint(image)
            walker.step()
            if not -0.05 * w < walker.x < 1.05 * w:
                walker.x = 1.04 * w if walker.vx < 0 else -0.04 * w
        mask = np.zeros((h, w), dtype=np.uint8)
        for anomaly in anomalies:
            anomaly.paint(image, mask)
            anomaly.step()
        image += self.rng.normal(0, 2.0, size=(h, w, 1))
        return np.clip(image, 0, 255, out=image).astype(np.uint8), mask


def write_video(path: Path, frames: list[np.ndarray], fps: int) -> None:
    """Write RGB frames as an MPEG-4 Part 2 AVI (what STC ships) with PyAV."""
    import av

    height, width = frames[0].shape[:2]
    with av.open(str(path), "w", format="avi") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.bit_rate = 8_000_000
        stream.thread_count = 1  # deterministic output
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


def _write_clip(folder: Path, camera: _Scene, anomalies: list[_Mover]) -> np.ndarray:
    """Write a clip's frames as JPEGs (as STC's test clips), the anomalies entering a third of the way in; its (T, H, W) masks."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    masks = []
    for t in range(camera.spec.test_frames):
        image, mask = camera.frame(anomalies if t >= camera.spec.test_frames // 3 else [])
        Image.fromarray(image).save(folder / f"{t:03d}.jpg", quality=95)
        masks.append(mask)
    return np.stack(masks)


def make_synthetic(root: str | Path, spec: SyntheticSpec = SyntheticSpec()) -> Path:
    """Generate a dataset in the STC layout under `root` (and normal clips to calibrate on, if asked); returns `root`."""
    unknown = sorted(set(spec.anomalies) - set(ANOMALIES))
    if unknown or not spec.anomalies:
        raise ValueError(f"anomalies must be some of {ANOMALIES}, got {spec.anomalies}")
    root = Path(root)
    videos = root / "training" / "videos"
    frames_dir, frame_masks, pixel_masks = (root / "testing" / n for n in ("frames", "test_frame_mask", "test_pixel_mask"))
    for folder in (videos, frames_dir, frame_masks, pixel_masks):
        folder.mkdir(parents=True, exist_ok=True)
    for scene_index, scene in enumerate(spec.scenes):
        rng = np.random.default_rng([spec.seed, scene_index])
        background = _background(spec, rng)
        for video in range(1, spec.train_videos + 1):
            camera = _Scene(spec, rng, background)
            frames = [camera.frame()[0] for _ in range(spec.train_frames)]
            write_video(videos / f"{scene}_{video:03d}.avi", frames, spec.fps)
        for clip in range(1, spec.test_clips + 1):
            name = f"{scene}_{clip:04d}"
            pixel = _write_clip(frames_dir / name, _Scene(spec, rng, background), _anomalies(spec.anomalies[(clip - 1) % len(spec.anomalies)], spec))
            np.save(pixel_masks / f"{name}.npy", pixel)
            np.save(frame_masks / f"{name}.npy", pixel.reshape(len(pixel), -1).max(axis=1))
        for clip in range(1, spec.calibration_clips + 1):
            _write_clip(root / "calibration" / "frames" / f"{scene}_{clip:04d}", _Scene(spec, rng, background), [])
        log.info("synthetic scene %s: %d training videos, %d test clips", scene, spec.train_videos, spec.test_clips)
    return root
