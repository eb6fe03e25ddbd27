"""Streaming metrics against sklearn and a straightforward PRO reference."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from padim_ray.metrics import EventCounts, PixelHistograms, frame_auroc, integrate_up_to, operating_point, segments, smoothed


def _case(seed=0, frames=6, size=(40, 50)):
    """Maps with two blobs of raised scores; masks mark the blobs (with some mismatch)."""
    rng = np.random.default_rng(seed)
    maps = rng.gamma(2.0, 1.0, size=(frames, *size))
    masks = np.zeros((frames, *size), dtype=np.uint8)
    for t in range(frames):
        y, x = rng.integers(5, size[0] - 15), rng.integers(5, size[1] - 15)
        masks[t, y : y + 8, x : x + 10] = 1
        maps[t, y + 2 : y + 10, x + 1 : x + 11] += rng.uniform(0.5, 4.0)
        if t % 2:
            masks[t, 1:4, 1:4] = 1  # a second region the map misses
    return maps, masks


def _histograms(maps, masks):
    hist = PixelHistograms(upper=float(maps.max()))
    for m, k in zip(maps, masks):
        hist.add(m, k)
    return hist


def test_streaming_pixel_auroc_equals_sklearn():
    maps, masks = _case()
    assert abs(_histograms(maps, masks).auroc() - roc_auc_score(masks.ravel(), maps.ravel())) <= 1e-3


def test_merged_histograms_equal_one_pass():
    maps, masks = _case()
    one_pass = _histograms(maps, masks)
    upper = float(maps.max())
    a, c = PixelHistograms(upper), PixelHistograms(upper)
    for m, k in zip(maps[:3], masks[:3]):
        a.add(m, k)
    for m, k in zip(maps[3:], masks[3:]):
        c.add(m, k)
    merged = a.merge(c)
    assert merged.auroc() == pytest.approx(one_pass.auroc(), abs=1e-12)
    assert merged.pro() == pytest.approx(one_pass.pro(), abs=1e-12)


def reference_pro(maps, masks, fpr_limit=0.3):
    """PRO by brute force: every distinct score a threshold, overlaps per connected region."""
    regions = []
    for t in range(len(maps)):
        labels, count = ndimage.label(masks[t], structure=np.ones((3, 3)))
        regions += [maps[t][labels == r] for r in range(1, count + 1)]
    negatives = maps[masks == 0]
    fprs, pros = [0.0], [0.0]
    for threshold in np.unique(maps)[::-1]:
        fprs.append((negatives >= threshold).mean())
        pros.append(np.mean([(region >= threshold).mean() for region in regions]))
    return integrate_up_to(np.array(fprs), np.array(pros), fpr_limit) / fpr_limit


def test_streaming_pro_equals_reference():
    maps, masks = _case(seed=1, frames=3, size=(26, 36))
    assert abs(_histograms(maps, masks).pro() - reference_pro(maps, masks)) <= 1e-3


def test_frame_auroc_equals_sklearn_and_needs_both_classes():
    rng = np.random.default_rng(2)
    scores, labels = rng.normal(size=200), rng.integers(0, 2, size=200)
    scores[labels == 1] += 0.7
    scores[:20] = np.round(scores[:20])  # ties
    assert frame_auroc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert frame_auroc(scores, np.zeros(200)) is None
    assert PixelHistograms(upper=1.0).auroc() is None


def test_segments_are_the_runs_of_anomalous_frames():
    assert segments(np.array([0, 1, 1, 0, 0, 1, 0, 1, 1, 1])) == [(1, 2), (5, 5), (7, 9)]
    assert segments(np.array([1, 1])) == [(0, 1)] and segments(np.zeros(5)) == []


def test_event_counts_recall_and_false_events_per_hour():
    labels = np.array([0] * 10 + [1] * 5 + [0] * 10 + [1] * 5 + [0] * 10)  # segments (10, 14) and (25, 29)
    spans = [(12, 20), (0, 3), (35, 38)]  # the first overlaps a segment; two overlap none
    counts = EventCounts.of(spans, labels, fps=10)
    assert (counts.segments, counts.found, counts.events, counts.false_events) == (2, 1, 3, 2)
    assert counts.normal_seconds == 3.0 and counts.recall == 0.5 and counts.false_per_hour == 2 * 3600 / 3.0
    pooled = counts + EventCounts.of([(25, 25)], labels, fps=10)
    assert (pooled.segments, pooled.found, pooled.events, pooled.false_events, pooled.normal_seconds) == (4, 2, 4, 2, 6.0)
    assert EventCounts.of([], np.ones(4), fps=10).false_per_hour is None  # no normal frames: no rate


def test_operating_point_and_smoothing():
    flags = np.array([1, 0, 1, 1, 0, 0], dtype=bool)
    labels = np.array([1, 1, 0, 1, 0, 0])
    assert operating_point(flags, labels) == (2 / 3, 1 / 3)
    assert operating_point(flags, np.zeros(6)) == (None, 0.5)
    step = np.r_[np.zeros(50), np.ones(50)]
    smooth = smoothed(step, fps=10, sigma_seconds=0.5)  # sigma of 5 frames, centred
    assert smooth[49] == pytest.approx(0.5 - 0.5 * (smooth[50] - smooth[49]), abs=0.05) and smooth[0] == 0 and smooth[-1] == 1
    assert np.allclose(smooth, smooth[::-1] * -1 + 1)  # symmetric: centred, not causal
