"""Streaming evaluation metrics: pixel AUROC and PRO from fixed-bin histograms, exact frame AUROC.

Pixel metrics never hold all pixels: each clip's maps are folded into histograms over [0, upper]
(Mahalanobis maps are non-negative; `upper` is the largest frame score). With 10^5 bins the AUROC
differs from the exact rank statistic by well under 1e-3.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage
from scipy.stats import rankdata

PRO_FPR_LIMIT = 0.3  # the paper integrates the PRO curve up to a false positive rate of 30 %
DEFAULT_BINS = 100_000


def frame_auroc(scores: np.ndarray, labels: np.ndarray) -> float | None:
    """Exact AUROC (Mann-Whitney U with midranks for ties); None when only one class is present."""
    labels = np.asarray(labels).astype(bool)
    positives, negatives = labels.sum(), (~labels).sum()
    if positives == 0 or negatives == 0:
        return None
    ranks = rankdata(scores)
    return float((ranks[labels].sum() - positives * (positives + 1) / 2) / (positives * negatives))


@dataclass
class PixelHistograms:
    """Histograms of normal pixels, anomalous pixels, and of region overlap for PRO."""

    upper: float
    bins: int = DEFAULT_BINS
    normal: np.ndarray = field(init=False)
    anomalous: np.ndarray = field(init=False)
    overlap: np.ndarray = field(init=False)  # sum over regions of (region's histogram / region size)
    regions: int = 0

    def __post_init__(self):
        self.normal = np.zeros(self.bins, dtype=np.int64)
        self.anomalous = np.zeros(self.bins, dtype=np.int64)
        self.overlap = np.zeros(self.bins, dtype=np.float64)

    def _bin(self, scores: np.ndarray) -> np.ndarray:
        index = (np.asarray(scores, dtype=np.float64) * (self.bins / self.upper)).astype(np.int64)
        return np.clip(index, 0, self.bins - 1)

    def add(self, anomaly_map: np.ndarray, mask: np.ndarray) -> None:
        """Fold one frame's map (H, W) and 0/1 mask (H, W) in."""
        mask = mask.astype(bool)
        bins = self._bin(anomaly_map)
        self.normal += np.bincount(bins[~mask], minlength=self.bins)
        self.anomalous += np.bincount(bins[mask], minlength=self.bins)
        labels, count = ndimage.label(mask, structure=np.ones((3, 3)))
        for region in range(1, count + 1):
            inside = bins[labels == region]
            self.overlap += np.bincount(inside, minlength=self.bins) / len(inside)
        self.regions += count

    def merge(self, other: PixelHistograms) -> PixelHistograms:
        merged = PixelHistograms(self.upper, self.bins)
        merged.normal = self.normal + other.normal
        merged.anomalous = self.anomalous + other.anomalous
        merged.overlap = self.overlap + other.overlap
        merged.regions = self.regions + other.regions
        return merged

    def _rates(self, counts: np.ndarray) -> np.ndarray:
        """Fraction at or above each threshold, thresholds descending from the top bin, starting at 0."""
        return np.concatenate([[0.0], np.cumsum(counts[::-1]) / counts.sum()])

    def roc(self) -> tuple[np.ndarray, np.ndarray] | None:
        """(FPR, TPR) over all bin thresholds, or None when one class is missing."""
        if self.normal.sum() == 0 or self.anomalous.sum() == 0:
            return None
        return self._rates(self.normal), self._rates(self.anomalous)

    def auroc(self) -> float | None:
        curve = self.roc()
        return None if curve is None else float(np.trapezoid(curve[1], curve[0]))

    def pro(self, fpr_limit: float = PRO_FPR_LIMIT) -> float | None:
        """Area under the per-region-overlap curve for FPR in [0, fpr_limit], divided by fpr_limit."""
        if self.regions == 0 or self.normal.sum() == 0:
            return None
        fpr = self._rates(self.normal)
        overlap = np.concatenate([[0.0], np.cumsum(self.overlap[::-1]) / self.regions])
        return integrate_up_to(fpr, overlap, fpr_limit) / fpr_limit


def integrate_up_to(x: np.ndarray, y: np.ndarray, limit: float) -> float:
    """Trapezoid area under y(x) for x in [0, limit], x ascending, y interpolated at `limit`."""
    keep = x <= limit
    xs, ys = x[keep], y[keep]
    if xs[-1] < limit:
        xs, ys = np.append(xs, limit), np.append(ys, np.interp(limit, x, y))
    return float(np.trapezoid(ys, xs))


SMOOTHING_SECONDS = 0.5  # sigma of the smoothed frame AUROC, fixed in advance (never chosen on test labels)


def smoothed(scores: np.ndarray, fps: float, sigma_seconds: float = SMOOTHING_SECONDS) -> np.ndarray:
    """Frame scores under a centred (not causal) Gaussian of `sigma_seconds`, edges reflected."""
    return ndimage.gaussian_filter1d(np.asarray(scores, dtype=np.float64), sigma_seconds * fps, mode="reflect")


def segments(labels: np.ndarray) -> list[tuple[int, int]]:
    """The anomalous segments of 0/1 frame labels: (first, last) frame of each run of 1s."""
    padded = np.concatenate([[0], np.asarray(labels, dtype=np.int8) > 0, [0]]).astype(np.int8)
    edges = np.flatnonzero(np.diff(padded))
    return [(int(start), int(stop) - 1) for start, stop in zip(edges[::2], edges[1::2])]


@dataclass
class EventCounts:
    """Events against ground-truth segments: recall (segments an event overlaps) and false events (overlapping none)."""

    segments: int = 0
    found: int = 0
    events: int = 0
    false_events: int = 0
    normal_seconds: float = 0.0  # duration of the normal frames, for false events per hour

    @classmethod
    def of(cls, spans: list[tuple[int, int]], labels: np.ndarray, fps: float) -> EventCounts:
        """Counts for events spanning frames [start, end] (inclusive) against frame `labels`."""
        truth = segments(labels)

        def overlaps(a, b):
            return a[0] <= b[1] and b[0] <= a[1]

        found = sum(any(overlaps(segment, span) for span in spans) for segment in truth)
        false = sum(not any(overlaps(span, segment) for segment in truth) for span in spans)
        normal = float((np.asarray(labels) == 0).sum()) / fps
        return cls(len(truth), found, len(spans), false, normal)

    def __add__(self, other: EventCounts) -> EventCounts:
        return EventCounts(*(a + b for a, b in zip(vars(self).values(), vars(other).values())))

    @property
    def recall(self) -> float | None:
        return self.found / self.segments if self.segments else None

    @property
    def false_per_hour(self) -> float | None:
        return 3600 * self.false_events / self.normal_seconds if self.normal_seconds else None


def operating_point(flags: np.ndarray, labels: np.ndarray) -> tuple[float | None, float | None]:
    """(TPR, FPR) of per-frame decisions `flags` against frame `labels` (None where a class is missing)."""
    flags, labels = np.asarray(flags, dtype=bool), np.asarray(labels) > 0
    tpr = float(flags[labels].mean()) if labels.any() else None
    fpr = float(flags[~labels].mean()) if (~labels).any() else None
    return tpr, fpr
