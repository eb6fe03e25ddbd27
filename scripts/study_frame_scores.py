"""Frame-level scores on real footage, measured: what should one frame's score be?

For each footage and backbone: fit PaDiM on the first normal frames, score the held-out fit footage
for calibration (k-fold: each time slice by the model fitted without it, statistics merged with
Chan's formula, exactly what a fit's calibration slice would see), then score test frames holding
pasted moving objects with exact masks (seeded ellipses, like padim_ray.synthetic._Mover) and
natural events labelled by hand (boxes at keyframes, interpolated). Every frame score below is then
computed from the same maps and compared by frame AUROC against the injected events alone and
against injected + natural events; methods that change the maps (per-position normalisation) also
report pixel AUROC, and every map kind how often its peak sits on an event.

The maths are the package's: Embedder, StatsAccumulator / merge_stats / finalize, mahalanobis,
anomaly_maps with ScoreConfig's defaults (sigma 4 blur at the model's 256x256, then resized), on
frames decoded by the package's PyAV path (padim_ray.video.iter_unit_frames); no Ray, no stores.
Maps are made at half the native size for vtest (288x384; the blur happens at 256x256 before the
resize, so the scores barely change) and at native size for tree. docs/frame_scores.md has the method,
the labels and the figures.

    PYTHONPATH=$PWD python scripts/study_frame_scores.py --vtest data/vtest.avi --tree tree.avi
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parent))
import runrecord  # noqa: E402

from padim_ray.config import ModelConfig, ScoreConfig  # noqa: E402
from padim_ray.embedding import Embedder  # noqa: E402
from padim_ray.events import RegionTracker, frame_events, map_events  # noqa: E402
from padim_ray.gaussian import GaussianStats, StatsAccumulator, finalize, mahalanobis, merge_stats  # noqa: E402
from padim_ray.maps import anomaly_maps, gaussian_kernel  # noqa: E402
from padim_ray.metrics import frame_auroc  # noqa: E402
from padim_ray.synthetic import _Mover  # noqa: E402
from padim_ray.thresholds import EventConfig, threshold_for_rate  # noqa: E402
from padim_ray.video import VideoError, WorkUnit, iter_unit_frames  # noqa: E402

MODELS = {
    "lite0": ModelConfig(backbone="efficientnet_lite0", weights="imagenet"),  # the demo's offline-pretrained model
    "r18-random": ModelConfig(backbone="resnet18", weights="none"),  # seeded random init, no download
}
BATCH = 16
SD_FLOOR = 0.1  # per-position standard deviations are floored at this fraction of their median (fixed in advance)
TOP_FRACTIONS = (0.001, 0.01)  # top-k means: the top 0.1 % and 1 % of a map's pixels
AREA_QUANTILES = (0.999, 0.9999)  # area over the calibration pixels' 99.9th / 99.99th percentile
MOVING_AVERAGE = 5  # frames, causal
GAUSSIAN_SIGMA = 2.0  # frames, two-sided (offline)
PEAK_MARGIN = 8  # map pixels: a peak this close to an event's region counts as on it
BINS = 100_000  # pixel AUROC histograms
BLOCK = 10  # frames per block of the bootstrap of AUROC differences
RESAMPLES = 1000
BUDGET_PER_HOUR = 1.0  # region events: the threshold of the false-alarm budget 1/h on the calibration frame scores
EVENT_QUANTILE = 0.999  # region events: also raw thresholds at this quantile of the calibration frame scores and pixels


# --- footage, injected objects, labels -------------------------------------------------------------


@dataclass(frozen=True)
class Injected:
    """A pasted object: a _Mover's ellipse, drawn from frame `start` for `frames` frames. `motion` holds
    the _Mover's arguments but its colour: position, velocity, radii and gravity, in native pixels."""

    name: str
    start: int
    frames: int
    motion: dict

    def masks(self, height: int, width: int, seed: int) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        """Frame index -> (mask (H, W) bool, colour (3,)), the colour drawn from a seeded generator."""
        colour = np.random.default_rng([seed, self.start]).uniform(30, 230, size=3)
        mover = _Mover(**self.motion, color=colour)
        out = {}
        for step in range(self.frames):
            out[self.start + step] = (mover.mask(height, width), colour)
            mover.step()
        return out


@dataclass(frozen=True)
class Footage:
    """One video with its split: fit [0, fit_stop) (calibrated by `folds` time slices), test [test_start, end)."""

    name: str
    fit_stop: int
    folds: int
    test_start: int
    map_scale: int  # maps at native size // map_scale
    injected: tuple[Injected, ...]
    natural: dict[str, dict[int, tuple[int, int, int, int]]]  # track -> keyframe -> box (y0, x0, y1, x1), native px
    fps: float = 10.0  # frames per second of the decoded frames, for the events' durations
    box_margin: int = 0  # native px added around natural boxes
    keyframe_scale: int = 1  # the natural boxes are given at native size // keyframe_scale


# vtest.avi (768x576, 10 fps, 795 frames). Nobody walks on the lawn in frames 0-502. From 503 a couple
# crosses it from the bottom right; the man reaches the path near the tripod at ~606, the woman walks on
# across the lawn to the path at the left (~742). From ~730 a man walks to the car parked at the top right
# and opens its boot; from ~758 another steps off the path onto the lawn's edge near the tripod. After
# frame 502 there is thus no normal frame left: the fit ends at 400 (an earlier experiment fitted
# 0-499 and called 500-599 normal) so that frames 400-502 give the test its normal frames. Boxes were
# read off frames with a 25-px grid at half size (384x288) and are stored at half size (doubled below).
VTEST = Footage(
    name="vtest", fps=10.0, fit_stop=400, folds=4, test_start=400, map_scale=2, box_margin=8, keyframe_scale=2,
    injected=(
        Injected("cart along the path", 420, 30, dict(y=225, x=-80, vy=5.8, vx=29, ry=28, rx=45)),
        Injected("ball thrown over the lawn", 465, 16, dict(y=500, x=200, vy=-20, vx=10, ry=12, rx=12, gravity=2.5)),
        Injected("cart along the path, slower", 600, 60, dict(y=225, x=-80, vy=2.9, vx=14.5, ry=28, rx=45)),
        Injected("thrown ball", 690, 22, dict(y=520, x=560, vy=-22, vx=-9, ry=12, rx=12, gravity=2.0)),
        Injected("fast cart back along the path", 750, 25, dict(y=400, x=830, vy=-6.7, vx=-35, ry=20, rx=30)),
    ),
    natural={
        "couple": {
            503: (225, 362, 288, 384), 506: (215, 350, 288, 384), 512: (210, 300, 288, 350), 518: (205, 255, 288, 310),
            524: (195, 210, 288, 258), 530: (188, 168, 280, 210), 540: (183, 113, 263, 170), 550: (181, 79, 256, 148),
            560: (173, 80, 270, 130), 564: (172, 82, 275, 125),
        },
        "man": {565: (172, 92, 245, 120), 570: (170, 93, 244, 120), 580: (165, 114, 236, 143), 590: (155, 170, 219, 196),
                600: (148, 224, 212, 252), 606: (146, 251, 202, 274)},
        "woman": {
            565: (195, 82, 284, 115), 570: (200, 83, 284, 114), 580: (210, 92, 288, 128), 590: (212, 125, 288, 166),
            600: (211, 138, 288, 167), 606: (211, 159, 288, 188), 612: (210, 175, 288, 202), 620: (208, 183, 288, 217),
            635: (192, 167, 269, 200), 650: (185, 163, 259, 196), 665: (171, 128, 242, 160), 680: (163, 74, 227, 103),
            695: (145, 52, 205, 79), 710: (130, 28, 186, 57), 725: (115, 36, 166, 60), 735: (108, 50, 157, 74),
            742: (106, 60, 150, 80),
        },
        "man at the parked car": {730: (18, 352, 52, 384), 794: (18, 352, 52, 384)},
        "man on the lawn's edge": {758: (108, 116, 160, 136), 762: (105, 118, 164, 140), 772: (120, 154, 174, 174),
                                   786: (130, 195, 186, 215), 794: (138, 215, 192, 235)},
    },
)

# tree.avi (320x240, declared 444 frames at 15 fps; 68 coded frames, the rest are empty AVI entries that
# repeat the previous picture: PyAV, and so the package, decodes 68). A fixed camera on a tree; a hand
# enters from the top right at frame 53 and stays to the end (67). Boxes cover hand and arm.
TREE = Footage(
    name="tree", fps=68 * 15 / 444, fit_stop=32,  # fps: 68 coded frames over the 444 / 15 s the header declares
    folds=4, test_start=32, map_scale=1, box_margin=4,
    injected=(
        Injected("thrown ball", 36, 8, dict(y=200, x=30, vy=-28, vx=35, ry=8, rx=8, gravity=7.0)),
        Injected("object crossing", 57, 8, dict(y=170, x=-20, vy=0.0, vx=45, ry=10, rx=18)),
    ),
    natural={
        "hand": {
            53: (0, 245, 18, 275), 54: (0, 205, 112, 300), 55: (0, 205, 168, 320), 56: (0, 215, 185, 320), 57: (0, 210, 190, 320),
            58: (0, 175, 202, 320), 59: (0, 135, 185, 320), 60: (0, 90, 165, 300), 61: (0, 70, 135, 305), 62: (0, 45, 110, 245),
            63: (0, 30, 95, 230), 64: (0, 30, 85, 240), 65: (0, 55, 135, 255), 66: (0, 110, 150, 295), 67: (0, 145, 170, 290),
        },
    },
)


def natural_boxes(footage: Footage, tracks: tuple[str, ...] | None = None) -> dict[int, list[tuple[int, int, int, int]]]:
    """Frame -> boxes (native px, margin added), linearly interpolated between each track's keyframes
    (every track, or those named in `tracks`)."""
    scale = footage.keyframe_scale
    out: dict[int, list] = {}
    for name, keys in footage.natural.items():
        if tracks is not None and name not in tracks:
            continue
        frames = sorted(keys)
        for a, b in zip(frames, frames[1:] + [frames[-1] + 1]):
            for t in range(a, b):
                if b == frames[-1] + 1:
                    box = np.array(keys[a], float)
                else:
                    w = (t - a) / (b - a)
                    box = (1 - w) * np.array(keys[a], float) + w * np.array(keys[b], float)
                y0, x0, y1, x1 = box * scale
                m = footage.box_margin
                out.setdefault(t, []).append((int(y0 - m), int(x0 - m), int(math.ceil(y1 + m)), int(math.ceil(x1 + m))))
    return out


def decode(path: Path) -> tuple[list[np.ndarray], str]:
    """Every frame the package's decode path gives (native size), and a note if it refused the file at the end."""
    frames, note = [], ""
    try:
        for _, frame in iter_unit_frames(WorkUnit(0, str(path))):
            frames.append(frame)
    except VideoError as err:  # raised after the last frame when the header declares more frames than decode
        note = f"padim_ray.video refuses it: {err}"
    return frames, note


def downsample(mask: np.ndarray, scale: int) -> np.ndarray:
    """A native-size bool mask at 1/scale: a map pixel is in it when most of its native pixels are."""
    if scale == 1:
        return mask
    h, w = mask.shape[0] // scale, mask.shape[1] // scale
    return mask[: h * scale, : w * scale].reshape(h, scale, w, scale).mean(axis=(1, 3)) >= 0.5


@dataclass
class TestSet:
    frames: list[np.ndarray]  # fit frames untouched, test frames with the objects pasted
    injected: np.ndarray  # (T_test, h, w) bool, at map size
    natural: np.ndarray  # (T_test, h, w) bool
    decode_note: str
    events: list[dict] = field(default_factory=list)
    object_masks: list[dict[int, np.ndarray]] = field(default_factory=list)  # per injected object: frame -> mask at map size


def prepare(footage: Footage, path: Path, seed: int) -> TestSet:
    frames, note = decode(path)
    height, width = frames[0].shape[:2]
    size = (height // footage.map_scale, width // footage.map_scale)
    test = range(footage.test_start, len(frames))
    injected = np.zeros((len(test), *size), bool)
    natural = np.zeros((len(test), *size), bool)
    events, object_masks = [], []
    for event in footage.injected:
        drawn = event.masks(height, width, seed)
        visible = [t for t, (mask, _) in drawn.items() if mask.any() and t in test]
        events.append({"name": event.name, "first": min(visible), "last": max(visible), "frames": len(visible)})
        object_masks.append({t: downsample(mask, footage.map_scale) for t, (mask, _) in drawn.items() if t in visible})
        for t, (mask, colour) in drawn.items():
            if t in test:
                frames[t] = frames[t].copy()
                frames[t][mask] = colour.astype(np.uint8)
                injected[t - footage.test_start] |= downsample(mask, footage.map_scale)
    for t, boxes in natural_boxes(footage).items():
        for y0, x0, y1, x1 in boxes:
            s = footage.map_scale
            natural[t - footage.test_start, max(y0 // s, 0) : y1 // s, max(x0 // s, 0) : x1 // s] = True
    return TestSet(frames, injected, natural, note, events, object_masks)


# --- the model: k-fold calibration and test maps ---------------------------------------------------


@dataclass
class Maps:
    calibration_distances: torch.Tensor  # (N_cal, gh, gw), each slice scored by the model fitted without it
    test_distances: torch.Tensor  # (T_test, gh, gw), by the model fitted on every fit frame
    calibration: torch.Tensor  # (N_cal, h, w) maps
    test: torch.Tensor  # (T_test, h, w) maps
    seconds: dict


def model_maps(footage: Footage, data: TestSet, config: ModelConfig) -> Maps:
    """Fit on [0, fit_stop) in `folds` time slices; calibration distances by hold-out; test distances; maps."""
    timer = {}
    started = time.monotonic()
    embedder = Embedder(config)
    edges = np.linspace(0, footage.fit_stop, footage.folds + 1).round().astype(int)
    fold_stats, fold_embeddings = [], []
    for lo, hi in zip(edges[:-1], edges[1:]):
        accumulator = StatsAccumulator(embedder.positions, embedder.dims)
        kept = []
        for start in range(lo, hi, BATCH):
            embeddings = embedder(np.stack(data.frames[start : min(start + BATCH, hi)]))
            accumulator.update(embeddings)
            kept.append(embeddings)
        fold_stats.append(accumulator.stats())
        fold_embeddings.append(kept)
    timer["embed_fit"] = time.monotonic() - started

    def gaussians(stats: GaussianStats) -> tuple[torch.Tensor, torch.Tensor]:
        model = finalize(stats, config.eps)
        return model.mean.float(), model.precision.float()  # as Scorer reads the store: float32

    started = time.monotonic()
    calibration = []
    for k in range(footage.folds):  # the slice's contribution left out, as a calibration slice would be
        others = [s for j, s in enumerate(fold_stats) if j != k]
        held_out = others[0]
        for s in others[1:]:
            held_out = merge_stats(held_out, s)
        mean, precision = gaussians(held_out)
        calibration += [mahalanobis(e, mean, precision) for e in fold_embeddings[k]]
    full = fold_stats[0]
    for s in fold_stats[1:]:
        full = merge_stats(full, s)
    mean, precision = gaussians(full)
    del fold_embeddings, fold_stats
    timer["calibrate"] = time.monotonic() - started

    started = time.monotonic()
    test = []
    for start in range(footage.test_start, len(data.frames), BATCH):
        test.append(mahalanobis(embedder(np.stack(data.frames[start : start + BATCH])), mean, precision))
    timer["score_test"] = time.monotonic() - started
    calibration_distances, test_distances = torch.cat(calibration), torch.cat(test)
    return Maps(calibration_distances, test_distances, to_maps(calibration_distances, data), to_maps(test_distances, data), timer)


def to_maps(distances: torch.Tensor, data: TestSet) -> torch.Tensor:
    """Distances (B, gh, gw) -> maps at the labels' size, as Scorer.maps does (ScoreConfig's defaults)."""
    score = ScoreConfig()
    kernel = gaussian_kernel(score.blur_sigma, score.blur_truncate)
    size = tuple(data.injected.shape[1:])
    return torch.cat([anomaly_maps(distances[i : i + 64], size, kernel, (256, 256)) for i in range(0, len(distances), 64)])


# --- frame scores ----------------------------------------------------------------------------------


def normalise(values: torch.Tensor, calibration: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(values - mean) / sd per position, mean and sd over the calibration frames (sd floored); both normalised."""
    mean, sd = calibration.mean(dim=0), calibration.std(dim=0)
    sd = sd.clamp_min(SD_FLOOR * float(sd.median()))
    return (values - mean) / sd, (calibration - mean) / sd


def quantile(values: torch.Tensor, q: float) -> float:
    """The q-quantile of every value (every other pixel in each direction when there are many)."""
    sample = values if values[0].numel() < 50_000 else values[:, ::2, ::2]
    return float(np.quantile(sample.numpy().ravel(), q))


def top_mean(maps: torch.Tensor, fraction: float) -> np.ndarray:
    flat = maps.flatten(1)
    k = max(1, math.ceil(fraction * flat.shape[1]))
    return flat.topk(k, dim=1).values.mean(dim=1).numpy()


def causal_average(scores: np.ndarray, window: int) -> np.ndarray:
    sums = np.cumsum(np.concatenate([[0.0], scores]))
    starts = np.maximum(np.arange(len(scores)) - window + 1, 0)
    return (sums[1:] - sums[starts]) / (np.arange(len(scores)) + 1 - starts)


def map_kinds(maps: Maps, data: TestSet) -> dict[str, tuple[torch.Tensor, torch.Tensor, dict]]:
    """The three maps compared: name -> (test maps, calibration maps, facts)."""
    zmap_test, zmap_cal = normalise(maps.test, maps.calibration)
    zgrid_test, zgrid_cal = normalise(maps.test_distances, maps.calibration_distances)  # per embedding position, before blur
    floored = {
        "zmap": float((maps.calibration.std(0) < SD_FLOOR * float(maps.calibration.std(0).median())).float().mean()),
        "zgrid": float((maps.calibration_distances.std(0) < SD_FLOOR * float(maps.calibration_distances.std(0).median())).float().mean()),
    }
    return {
        "raw": (maps.test, maps.calibration, {}),
        "zmap": (zmap_test, zmap_cal, {"sd_floored_fraction": floored["zmap"]}),
        "zgrid": (to_maps(zgrid_test, data), to_maps(zgrid_cal, data), {"sd_floored_fraction": floored["zgrid"]}),
    }


def frame_scores(kinds: dict) -> dict[str, np.ndarray]:
    """Every frame score tried, on the test frames: method name -> (T_test,)."""
    scores = {}
    for kind, (test, calibration, _) in kinds.items():
        scores[f"{kind} max"] = test.flatten(1).max(dim=1).values.numpy()
        for fraction in TOP_FRACTIONS:
            scores[f"{kind} top {fraction:.1%} mean"] = top_mean(test, fraction)
        for q in AREA_QUANTILES:
            threshold = quantile(calibration, q)
            scores[f"{kind} area over calibration q{q * 100:g}"] = (test > threshold).flatten(1).float().mean(dim=1).numpy()
    for base in ("raw max", "raw top 0.1% mean", "zmap max", "zgrid max"):
        scores[f"{base}, causal mean of {MOVING_AVERAGE}"] = causal_average(scores[base], MOVING_AVERAGE)
        scores[f"{base}, gaussian sigma {GAUSSIAN_SIGMA:g}"] = ndimage.gaussian_filter1d(scores[base], GAUSSIAN_SIGMA, mode="nearest")
    return scores


# --- pixel metrics ---------------------------------------------------------------------------------


def pixel_auroc(maps: torch.Tensor, positive: np.ndarray, ignore: np.ndarray | None = None) -> float:
    """AUROC of map pixels, `positive` against the rest (less `ignore`), from 10^5-bin histograms."""
    values = maps.numpy()
    lo, hi = float(values.min()), float(values.max())
    pos = np.zeros(BINS, np.int64)
    neg = np.zeros(BINS, np.int64)
    for t in range(len(values)):
        index = np.clip(((values[t] - lo) * ((BINS - 1) / (hi - lo))).astype(np.int64), 0, BINS - 1)
        negative = ~positive[t] if ignore is None else ~positive[t] & ~ignore[t]
        pos += np.bincount(index[positive[t]], minlength=BINS)
        neg += np.bincount(index[negative], minlength=BINS)
    below = np.cumsum(neg) - neg
    return float((pos * (below + 0.5 * neg)).sum() / (pos.sum() * neg.sum()))


def block_bootstrap(values: np.ndarray, base: np.ndarray, positive: np.ndarray, keep: np.ndarray, seed: int) -> list[float] | None:
    """90 % interval of AUROC(values) - AUROC(base) over the frames `keep`, by a moving-block bootstrap
    of the test sequence (blocks of BLOCK frames, since neighbouring frames are alike); None if too few."""
    rng = np.random.default_rng(seed)
    frames = len(values)
    block = min(BLOCK, frames)
    deltas = []
    for _ in range(RESAMPLES):
        starts = rng.integers(0, frames - block + 1, size=math.ceil(frames / block))
        index = (starts[:, None] + np.arange(block)).ravel()[:frames]
        index = index[keep[index]]
        a, b = frame_auroc(values[index], positive[index]), frame_auroc(base[index], positive[index])
        if a is not None and b is not None:
            deltas.append(a - b)
    return [float(np.quantile(deltas, 0.05)), float(np.quantile(deltas, 0.95))] if len(deltas) >= RESAMPLES // 2 else None


def peak_on_event(maps: torch.Tensor, regions: np.ndarray) -> float:
    """Fraction of frames with an event whose map peak lies within PEAK_MARGIN map pixels of an event region."""
    frames = np.flatnonzero(regions.reshape(len(regions), -1).any(axis=1))
    flat = maps.flatten(1).argmax(dim=1).numpy()
    hits = 0
    for t in frames:
        grown = ndimage.maximum_filter(regions[t], size=2 * PEAK_MARGIN + 1)
        hits += bool(grown.flat[flat[t]])
    return hits / len(frames)


# --- region events (events.map_events) --------------------------------------------------------------


def boxes_meet(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    """Do two half-open boxes (y0, x0, y1, x1) share a pixel?"""
    return min(a[2], b[2]) > max(a[0], b[0]) and min(a[3], b[3]) > max(a[1], b[1])


def tracked_events(test_maps: torch.Tensor, first: int, fps: float, threshold: float, config: EventConfig) -> tuple[list, dict]:
    """events.map_events' loop, also keeping each event's region box at every frame it had one: (events, id -> [(frame, box)])."""
    tracker = RegionTracker(fps, threshold, config)
    history: dict = {}
    closed = []
    for i, anomaly_map in enumerate(test_maps.numpy()):
        closed += [notice.event for notice in tracker.step(first + i, anomaly_map) if notice.kind == "closed"]
        for track in tracker.tracks:
            if track.last == first + i:  # matched (or started) at this frame: its box is this frame's region's
                history.setdefault(track, []).append((first + i, track.box))
    closed += [notice.event for notice in tracker.finish()]
    return sorted(closed, key=lambda event: event.event), {track.event: boxes for track, boxes in history.items() if track.event is not None}


def region_events(footage: Footage, data: TestSet, maps: Maps) -> dict:
    """Region events (events.map_events) and frame events (thresholds.frame_events on `raw max`) on the test
    maps, at thresholds set on the calibration: the budget 1/h (threshold_for_rate on the held-out slices'
    frame scores, one sequence per slice) and the EVENT_QUANTILE of the calibration frame scores and pixels.
    Each event is matched to the injected objects (its box at a frame of the object meets the object's mask)
    and to the natural events (its box meets the track's box at the same frame); an event meeting none is false."""
    config = EventConfig()
    first, frames = footage.test_start, len(data.injected)
    scale = footage.map_scale
    tracks = {
        name: {t: [(max(y0 // scale, 0), max(x0 // scale, 0), y1 // scale, x1 // scale) for y0, x0, y1, x1 in boxes]
               for t, boxes in natural_boxes(footage, (name,)).items()}
        for name in footage.natural
    }
    natural_any = {t for boxes in tracks.values() for t in boxes}
    injected_any = {t for masks in data.object_masks for t in masks}
    clean_hours = sum(1 for t in range(first, first + frames) if t not in natural_any | injected_any) / footage.fps / 3600
    test_hours = frames / footage.fps / 3600
    calibration_scores = maps.calibration.flatten(1).max(dim=1).values.numpy()
    edges = np.linspace(0, footage.fit_stop, footage.folds + 1).round().astype(int)
    sequences = [calibration_scores[lo:hi] for lo, hi in zip(edges[:-1], edges[1:])]
    thresholds = {
        "budget 1/h": (threshold_for_rate(sequences, [footage.fps] * len(sequences), BUDGET_PER_HOUR, config),
                       f"threshold_for_rate, {BUDGET_PER_HOUR:g} false event per hour, on {len(calibration_scores)} held-out calibration "
                       f"frame scores ({len(calibration_scores) / footage.fps:.0f} s, {len(sequences)} sequences)"),
        f"frame scores q{EVENT_QUANTILE * 100:g}": (float(np.quantile(calibration_scores, EVENT_QUANTILE)),
                                                   f"the {EVENT_QUANTILE:.1%} quantile of the calibration frame scores (raw max)"),
        f"pixels q{EVENT_QUANTILE * 100:g}": (quantile(maps.calibration, EVENT_QUANTILE),
                                             f"the {EVENT_QUANTILE:.1%} quantile of the calibration maps' pixels"),
    }
    test_max = maps.test.flatten(1).max(dim=1).values.numpy()
    out = {"fps": footage.fps, "event_config": config.__dict__, "clean_seconds": clean_hours * 3600, "test_seconds": test_hours * 3600}
    for label, (threshold, meaning) in thresholds.items():
        events, history = tracked_events(maps.test, first, footage.fps, threshold, config)
        reference = map_events(((first + i, m) for i, m in enumerate(maps.test.numpy())), footage.fps, threshold, config)
        assert events == reference, "tracked_events differs from events.map_events"
        listed = []
        for event in events:
            boxes = history[event.event]
            objects = [k for k, masks in enumerate(data.object_masks)
                       if any(t in masks and masks[t][box[0]:box[2], box[1]:box[3]].any() for t, box in boxes)]
            own = [k for k, masks in enumerate(data.object_masks)
                   if any(t in masks and masks[t][box[0]:box[2], box[1]:box[3]].any()
                          and not any(boxes_meet(box, b) for track in tracks.values() for b in track.get(t, ())) for t, box in boxes)]
            natural = [name for name, track in tracks.items() if any(boxes_meet(box, b) for t, box in boxes for b in track.get(t, ()))]
            listed.append({"event": event.event, "start": event.start_frame, "end": event.end_frame, "peak_frame": event.peak_frame,
                           "peak_score": float(f"{event.peak_score:.5g}"), "peak_box": [event.box_y0, event.box_x0, event.box_y1, event.box_x1],
                           "frames_with_region": len(boxes), "objects": objects, "own_objects": own, "natural": natural,
                           "false": not objects and not natural})
        spans = frame_events(test_max, footage.fps, threshold, config)
        spans_listed = []
        for span in spans:
            covered = set(range(span.start + first, span.end + first + 1))
            spans_listed.append({"start": span.start + first, "end": span.end + first, "peak_score": float(f"{span.peak_score:.5g}"),
                                 "objects": [k for k, masks in enumerate(data.object_masks) if covered & set(masks)],
                                 "natural": [name for name, track in tracks.items() if covered & set(track)],
                                 "false": not covered & (natural_any | injected_any)})
        false_regions = sum(e["false"] for e in listed)
        false_spans = sum(e["false"] for e in spans_listed)
        out[label] = {
            "threshold": threshold, "meaning": meaning,
            "region": {
                "events": len(listed), "false_events": false_regions,
                "false_per_hour_of_clean_test": false_regions / clean_hours if clean_hours else None,
                "false_per_hour_of_test": false_regions / test_hours,
                "objects": [{"name": info["name"], "hit": any(k in e["objects"] for e in listed), "own_event": any(k in e["own_objects"] for e in listed),
                             "events": [e["event"] for e in listed if k in e["objects"]]} for k, info in enumerate(data.events)],
                "natural": {name: {"hit": any(name in e["natural"] for e in listed), "events": [e["event"] for e in listed if name in e["natural"]]}
                            for name in tracks},
                "list": listed,
            },
            "frame": {
                "events": len(spans_listed), "false_events": false_spans,
                "false_per_hour_of_clean_test": false_spans / clean_hours if clean_hours else None,
                "false_per_hour_of_test": false_spans / test_hours,
                "objects": [{"name": info["name"], "hit": any(k in e["objects"] for e in spans_listed)} for k, info in enumerate(data.events)],
                "natural": {name: {"hit": any(name in e["natural"] for e in spans_listed)} for name in tracks},
                "list": spans_listed,
            },
        }
    return out


# --- one run ---------------------------------------------------------------------------------------


def study(footage: Footage, path: Path, model: str, seed: int, regions_only: bool = False) -> dict:
    started = time.monotonic()
    data = prepare(footage, path, seed)
    maps = model_maps(footage, data, MODELS[model])
    region_started = time.monotonic()
    regions = region_events(footage, data, maps)
    maps.seconds["region_events"] = time.monotonic() - region_started
    if regions_only:
        return {"footage": footage.name, "model": model, "model_config": MODELS[model].to_dict(), "frames_decoded": len(data.frames),
                "fit_frames": [0, footage.fit_stop], "test_frames": [footage.test_start, len(data.frames)],
                "map_size": list(data.injected.shape[1:]), "injected_events": data.events, "regions": regions,
                "seconds": {**maps.seconds, "total": time.monotonic() - started}}
    kinds = map_kinds(maps, data)
    scores = frame_scores(kinds)
    injected = data.injected.reshape(len(data.injected), -1).any(axis=1)
    natural = data.natural.reshape(len(data.natural), -1).any(axis=1)
    clean = ~(injected | natural)
    everything = np.ones_like(injected)
    label_sets = {  # name -> (positives, the frames compared)
        "injected": (injected, everything),
        "injected+natural": (injected | natural, everything),
        "injected vs clean": (injected, injected & ~natural | clean),  # frames with an injected object alone, against clean ones
        "natural vs clean": (natural, natural & ~injected | clean),
    }
    frame = {
        method: {
            **{name: frame_auroc(values[keep], positive[keep]) for name, (positive, keep) in label_sets.items()},
            "delta_ci90": {
                name: None if method == "raw max" else block_bootstrap(values, scores["raw max"], positive, keep, seed)
                for name, (positive, keep) in label_sets.items()
            },
        }
        for method, values in scores.items()
    }
    pixel = {
        kind: {
            "injected (natural boxes ignored)": pixel_auroc(test, data.injected, data.natural),
            "injected+natural": pixel_auroc(test, data.injected | data.natural),
            "peak on injected": peak_on_event(test, data.injected),
            "peak on any event": peak_on_event(test, data.injected | data.natural),
            **facts,
        }
        for kind, (test, _, facts) in kinds.items()
    }
    raw_cal = maps.calibration.flatten(1).max(dim=1).values.numpy()
    return {
        "footage": footage.name,
        "model": model,
        "model_config": MODELS[model].to_dict(),
        "frames_decoded": len(data.frames),
        "decode_note": data.decode_note,
        "fit_frames": [0, footage.fit_stop],
        "calibration": f"{footage.folds} time slices of the fit frames, each scored by the model fitted without it",
        "test_frames": [footage.test_start, len(data.frames)],
        "map_size": list(data.injected.shape[1:]),
        "injected_events": data.events,
        "counts": {
            "test": int(len(injected)), "injected": int(injected.sum()), "natural": int(natural.sum()),
            "both": int((injected & natural).sum()), "clean": int(clean.sum()),
        },
        "calibration_raw_max": {"min": float(raw_cal.min()), "median": float(np.median(raw_cal)), "max": float(raw_cal.max())},
        "test_raw_max": {"min": float(scores["raw max"].min()), "max": float(scores["raw max"].max())},
        "frame_auroc": frame,
        "pixel": pixel,
        "regions": regions,
        "per_frame": {
            "frame": list(range(footage.test_start, len(data.frames))),
            "injected": injected.tolist(),
            "natural": natural.tolist(),
            "scores": {method: [float(f"{v:.5g}") for v in values] for method, values in scores.items()},
            "raw_peak_yx": [list(divmod(int(i), kinds["raw"][0].shape[2])) for i in kinds["raw"][0].flatten(1).argmax(dim=1)],
            "raw_max_on_injected": [
                float(f"{float(m[torch.from_numpy(mask)].max()):.5g}") if mask.any() else None for m, mask in zip(kinds["raw"][0], data.injected)
            ],
        },
        "seconds": {**maps.seconds, "total": time.monotonic() - started},
    }


def verdict(rows: list[dict]) -> dict[str, dict]:
    """Per method: does it beat `raw max` on both label sets everywhere, and keep pixel AUROC?"""
    out = {}
    for method in rows[0]["frame_auroc"]:
        if method == "raw max":
            continue
        kind = method.split()[0]
        deltas = [
            row["frame_auroc"][method][labels] - row["frame_auroc"]["raw max"][labels]
            for row in rows for labels in ("injected", "injected+natural")
        ]
        pixel = [
            row["pixel"][kind][labels] - row["pixel"]["raw"][labels]
            for row in rows for labels in ("injected (natural boxes ignored)", "injected+natural")
        ]
        wins = min(deltas) >= 0 and max(deltas) > 0 and min(pixel) >= -5e-4
        out[method] = {"min_frame_delta": min(deltas), "max_frame_delta": max(deltas), "min_pixel_delta": min(pixel), "wins_everywhere": wins}
    return out


LABEL_SETS = ("injected", "injected+natural", "injected vs clean")
PIXEL_METRICS = ("injected (natural boxes ignored)", "injected+natural", "peak on injected", "peak on any event")


def markdown_tables(rows: list[dict], verdicts: dict) -> str:
    """The doc's tables: frame AUROC per footage (a method's cell marked + or - where the 90 % block-bootstrap
    interval of its difference to `raw max` excludes 0), then pixel AUROC and peaks per map."""
    lines = []
    for footage in dict.fromkeys(row["footage"] for row in rows):
        own = [row for row in rows if row["footage"] == footage]
        lines += ["", f"**{footage}**, frame AUROC", "", "| frame score | " + " | ".join(f"{row['model']}: {s}" for row in own for s in LABEL_SETS) + " |"]
        lines.append("|---|" + "---|" * (len(own) * len(LABEL_SETS)))
        for method in own[0]["frame_auroc"]:
            cells = []
            for row in own:
                for labels in LABEL_SETS:
                    value, interval = row["frame_auroc"][method][labels], row["frame_auroc"][method]["delta_ci90"][labels]
                    mark = "" if interval is None else "+" if interval[0] > 0 else "-" if interval[1] < 0 else ""
                    cells.append(f"{value:.3f}{mark}")
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines += ["", "Pixel AUROC and where the peak sits (test frames)", ""]
    lines.append("| map: metric | " + " | ".join(f"{row['footage']} {row['model']}" for row in rows) + " |")
    lines.append("|---|" + "---|" * len(rows))
    for kind in rows[0]["pixel"]:
        for metric in PIXEL_METRICS:
            lines.append(f"| {kind}: {metric} | " + " | ".join(f"{row['pixel'][kind][metric]:.3f}" for row in rows) + " |")
    winners = [method for method, v in verdicts.items() if v["wins_everywhere"]]
    lines += ["", "Methods at or above `raw max` on injected and injected+natural everywhere, pixel AUROC kept: "
              + (", ".join(winners) if winners else "none") + "."]
    return "\n".join(lines)


def region_tables(rows: list[dict]) -> str:
    """The doc's region-event tables: a summary per footage, model and threshold, then each injected and natural event."""
    lines = ["", "Region events (events.map_events) and frame events (thresholds.frame_events on raw max), test frames", "",
             "| footage, model | threshold | region events | injected objects hit (own event) | natural events hit | false region events (per h of clean test) "
             "| frame events | injected objects in a frame event | natural events in a frame event | false frame events (per h of clean test) |",
             "|---|---|---|---|---|---|---|---|---|---|"]

    def rate(part: dict) -> str:
        per_hour = part["false_per_hour_of_clean_test"]
        return f"{part['false_events']} ({per_hour:,.0f})" if per_hour is not None else str(part["false_events"])

    labels = [key for key, value in rows[0]["regions"].items() if isinstance(value, dict) and "region" in value]
    for row in rows:
        for label in labels:
            entry = row["regions"][label]
            region, frame = entry["region"], entry["frame"]
            n = len(region["objects"])
            lines.append(
                f"| {row['footage']}, {row['model']} | {label}: {entry['threshold']:.4g} | {region['events']} "
                f"| {sum(o['hit'] for o in region['objects'])}/{n} ({sum(o['own_event'] for o in region['objects'])}/{n}) "
                f"| {sum(v['hit'] for v in region['natural'].values())}/{len(region['natural'])} | {rate(region)} | {frame['events']} "
                f"| {sum(o['hit'] for o in frame['objects'])}/{n} | {sum(v['hit'] for v in frame['natural'].values())}/{len(frame['natural'])} "
                f"| {rate(frame)} |")
    lines += ["", "Each event: region events `own` (an event whose box meets the object where it meets no natural box), `hit` (only events "
              "that also cover a natural event), `-` (none), with the number of region events that meet it; frame events `f` (a frame "
              "event covers some of its frames)", ""]
    columns = [(row, label) for row in rows for label in labels]
    for footage in dict.fromkeys(row["footage"] for row in rows):
        own = [(row, label) for row, label in columns if row["footage"] == footage]
        lines += ["| " + footage + " | " + " | ".join(f"{row['model']}, {label}" for row, label in own) + " |", "|---|" + "---|" * len(own)]
        for k, info in enumerate(own[0][0]["injected_events"]):
            cells = []
            for row, label in own:
                region, frame = row["regions"][label]["region"]["objects"][k], row["regions"][label]["frame"]["objects"][k]
                count = f" ({len(region['events'])})" if region["events"] else ""
                cells.append(("own" if region["own_event"] else "hit" if region["hit"] else "-") + count + (" f" if frame["hit"] else ""))
            lines.append(f"| {info['name']}, {info['first']}-{info['last']} | " + " | ".join(cells) + " |")
        for name in own[0][0]["regions"][labels[0]]["region"]["natural"]:
            cells = [("hit" if row["regions"][label]["region"]["natural"][name]["hit"] else "-")
                     + (" f" if row["regions"][label]["frame"]["natural"][name]["hit"] else "") for row, label in own]
            lines.append(f"| natural: {name} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vtest", type=Path, default=runrecord.REPO / "data" / "vtest.avi", help="OpenCV's vtest.avi (scripts/fetch_vtest.sh)")
    parser.add_argument("--tree", type=Path, help="OpenCV's tree.avi (Debian's opencv-doc, examples/data)")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--seed", type=int, default=0, help="seeds the pasted objects' colours")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--json", type=Path, default=None, help="default: runs/bench/frame_scores/<time>-<commit>.json")
    parser.add_argument("--tables", type=Path, metavar="JSON", help="print the markdown tables of a saved run and stop")
    parser.add_argument("--regions-only", action="store_true", help="only the maps and the region / frame events (no frame-score comparison)")
    args = parser.parse_args()
    if args.tables:
        saved = json.loads(args.tables.read_text())
        if "frame_auroc" in saved["rows"][0]:
            print(markdown_tables(saved["rows"], saved["verdicts"]))
        if "regions" in saved["rows"][0]:
            print(region_tables(saved["rows"]))
        return
    if args.tree is None:
        parser.error("--tree is required to run the study")
    torch.set_num_threads(args.threads)
    started = time.monotonic()
    rows = []
    for footage, path in ((VTEST, args.vtest), (TREE, args.tree)):
        for model in args.models:
            row = study(footage, path, model, args.seed, args.regions_only)
            print(f"{footage.name} {model}: {row['seconds']['total']:.0f} s", flush=True)
            rows.append(row)
    verdicts = None if args.regions_only else verdict(rows)
    if not args.regions_only:
        print(markdown_tables(rows, verdicts))
    print(region_tables(rows))
    cpu = resource.getrusage(resource.RUSAGE_SELF)
    result = runrecord.record(
        "frame_scores", rows, verdicts=verdicts, seed=args.seed, wall_seconds=time.monotonic() - started,
        cpu_seconds=cpu.ru_utime + cpu.ru_stime,
        settings={
            "sd_floor": SD_FLOOR, "top_fractions": TOP_FRACTIONS, "area_quantiles": AREA_QUANTILES, "moving_average": MOVING_AVERAGE,
            "gaussian_sigma": GAUSSIAN_SIGMA, "peak_margin": PEAK_MARGIN, "score": ScoreConfig().__dict__,
            "budget_per_hour": BUDGET_PER_HOUR, "event_quantile": EVENT_QUANTILE, "regions_only": args.regions_only,
        },
    )
    path = args.json or runrecord.default_path("frame_scores")
    runrecord.write(path, result)
    print(f"written {path}")


if __name__ == "__main__":
    main()
