"""`watch`'s health per camera as Ray metrics: exported by every node's metrics agent for Prometheus
(`ray_padim_ray_watch_*`, tagged `camera`) and shown in the Ray dashboard's metrics view.

Counters of frames read, scored and dropped and of reconnects follow the readers' totals; a
histogram holds the seconds from each frame's capture to its map.
"""

from __future__ import annotations

from ray.util.metrics import Counter, Histogram

from padim_ray.readers import ReaderStats

LATENCY_BOUNDARIES = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)  # seconds


class CameraMetrics:
    """The metrics of every camera of one `watch`."""

    def __init__(self):
        tags = ("camera",)
        self._totals = {
            "read": Counter("padim_ray_watch_frames_read", "Frames taken from a camera at --fps.", tags),
            "dropped": Counter("padim_ray_watch_frames_dropped", "Frames taken but pushed out before they were scored.", tags),
            "reconnects": Counter("padim_ray_watch_reconnects", "Failed or ended openings of a camera's stream that were retried.", tags),
        }
        self._scored = Counter("padim_ray_watch_frames_scored", "Frames scored.", tags)
        self._latency = Histogram("padim_ray_watch_latency_seconds", "Seconds from a frame's capture to its anomaly map.", LATENCY_BOUNDARIES, tags)
        self._reported: dict[str, dict[str, int]] = {}  # camera -> the reader totals counted so far

    def scored(self, camera: str, latency: float) -> None:
        """One frame of `camera` scored, `latency` seconds after its capture."""
        self._scored.inc(1, {"camera": camera})
        self._latency.observe(latency, {"camera": camera})

    def follow(self, camera: str, stats: ReaderStats) -> None:
        """Bring the counters of `camera` up to its reader's totals."""
        reported = self._reported.setdefault(camera, dict.fromkeys(self._totals, 0))
        for name, counter in self._totals.items():
            total = getattr(stats, name)
            if total > reported[name]:
                counter.inc(total - reported[name], {"camera": camera})
                reported[name] = total
