"""Rolling, downsampled anomaly maps of a watched camera, with a retention limit (`watch --map-segments`).

Each camera's maps go to OUT/maps/CAMERA/ in segments of `seconds` of capture time: one NumPy .npz per
segment, named by the capture times (epoch milliseconds) of its first and last frame,
`FIRST-LAST.npz`, holding `maps` (T, side, side) float16 (the model-size maps, area-averaged),
`index` (T,) the frames' sample indices and `captured` (T,) their capture times (epoch seconds).
A segment is written whole (a temp file renamed), so a reader never sees half of one. Once a segment is
written, those whose last frame was captured more than `retention` seconds before it are removed:
only files named like segments, in the camera's own folder. Storage is bounded by retention: at 5 fps,
64 x 64 float16 maps take 41 kB per second per camera, 3.5 GB per camera-day.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from padim_ray.config import ConfigError

SEGMENT_NAME = re.compile(r"(\d{13})-(\d{13})\.npz")
DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*(s|min|h|d)")
SECONDS_PER = {"s": 1.0, "min": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: str, option: str) -> float:
    """Seconds in a duration like 90s, 30min, 24h or 7d (ConfigError naming `option` otherwise)."""
    match = DURATION.fullmatch(text.strip())
    if not match or float(match[1]) <= 0:
        raise ConfigError(f"{option} must be a duration above 0 like 90s, 30min, 24h or 7d, got {text!r}")
    return float(match[1]) * SECONDS_PER[match[2]]


@dataclass(frozen=True)
class SegmentOptions:
    seconds: float = 0.0  # capture time per segment; 0: no maps kept
    side: int = 64  # maps are kept at side x side
    retention: float = 24 * 3600.0  # seconds of segments kept, counted back from the newest frame

    def __post_init__(self):
        if self.seconds < 0:
            raise ConfigError(f"--map-segments must be 0 (no maps kept) or seconds above 0, got {self.seconds:g}")
        if not 8 <= self.side <= 1024:
            raise ConfigError(f"--map-side must be from 8 to 1024, got {self.side}")
        if self.seconds and self.retention < self.seconds:
            raise ConfigError(f"--map-retention ({self.retention:g} s) must be at least --map-segments ({self.seconds:g} s)")


class MapSegments:
    """One camera's rolling map segments (see the module's docstring): add() each scored frame, flush() at the end."""

    def __init__(self, folder: Path, options: SegmentOptions):
        self.folder, self.options = Path(folder), options
        self.folder.mkdir(parents=True, exist_ok=True)
        self.rows: list[tuple[int, float, np.ndarray]] = []
        self.written = 0  # segments written by this run
        self.removed = 0  # segments removed by retention

    def add(self, index: int, captured: float, anomaly_map: np.ndarray) -> None:
        if self.rows and captured - self.rows[0][1] >= self.options.seconds:
            self.flush()
        side = self.options.side
        small = Image.fromarray(np.asarray(anomaly_map, dtype=np.float32), mode="F").resize((side, side), Image.Resampling.BOX)  # area means
        self.rows.append((index, captured, np.asarray(small).astype(np.float16)))

    def flush(self) -> None:
        """Write the segment held so far (if any), then apply the retention."""
        if not self.rows:
            return
        index, captured, maps = (np.array(column) for column in zip(*self.rows))
        self.rows = []
        name = f"{_ms(captured[0])}-{_ms(captured[-1])}.npz"
        temp = self.folder / f".{name}.tmp"
        with open(temp, "wb") as file:
            np.savez(file, maps=np.stack(maps), index=index.astype(np.int64), captured=captured.astype(np.float64))
        os.replace(temp, self.folder / name)
        self.written += 1
        self._expire(captured[-1] - self.options.retention)

    def _expire(self, before: float) -> None:
        for path in self.folder.iterdir():
            match = SEGMENT_NAME.fullmatch(path.name)
            if match and int(match[2]) < round(before * 1000):
                path.unlink(missing_ok=True)
                self.removed += 1


def read_segments(folder: str | Path) -> dict[str, np.ndarray]:
    """A camera's segments in capture order, concatenated: {"maps", "index", "captured"}."""
    paths = sorted(p for p in Path(folder).iterdir() if SEGMENT_NAME.fullmatch(p.name))
    parts = [np.load(path) for path in paths]
    return {key: np.concatenate([part[key] for part in parts]) for key in ("maps", "index", "captured")} if parts else {}


def _ms(seconds: float) -> str:
    return f"{round(seconds * 1000):013d}"
