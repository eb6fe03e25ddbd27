"""Thresholds with a meaning: a false-alarm budget on calibration footage, or a raw value.

A calibration is the frame scores of normal footage the scoring model did not see (see
calibration_record). A budget such as `1/h` becomes the threshold at which frame-level events
(events.frame_events) on that footage number at most the budget times its duration. Pure numpy.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, replace

import numpy as np

from padim_ray.config import ConfigError, between, require
from padim_ray.events import frame_events

HOURS_PER_UNIT = {"h": 1.0, "min": 1 / 60, "day": 24.0}  # a budget's time unit, in hours
UNIT_WORDS = {"h": "hour", "min": "minute", "day": "day"}
AUTO_BUDGET = "1/h"  # --threshold auto
QUANTILE_LEVELS = 101  # calibration quantiles at 0, 0.01, ..., 1
NOT_CALIBRATED = "the model is not calibrated: run `padim-ray calibrate MODEL NORMAL_VIDEOS` or pass --threshold VALUE"
THRESHOLD_FORMS = "auto, a false-alarm budget N/h, N/min or N/day (N >= 0), or a raw positive score"


log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EventConfig:
    """How frames over a threshold become events (events.py)."""

    hysteresis: float = 0.9  # off level = hysteresis * threshold: an event continues through frames >= off
    min_event: float = 0.15  # shorter tracks are no events: 4 frames at 24 fps, 1 at 5 fps
    event_gap: float = 1.0  # a gap below the off level shorter than this merges its neighbours

    def __post_init__(self):
        require(vars(self), {
            "hysteresis": (lambda v: 0 < v <= 1, "above 0 and at most 1 (the off level as a fraction of the threshold)"),
            "min_event": between(0, math.inf),
            "event_gap": between(0, math.inf),
        })

    def frames(self, fps: float) -> tuple[int, int]:
        """(min_frames, merge_frames) at `fps`: each at least 1."""
        return max(1, math.ceil(self.min_event * fps - 1e-9)), max(1, round(self.event_gap * fps))


@dataclass(frozen=True)
class ThresholdSpec:
    """A parsed --threshold: kind "auto" (the budget 1/h), "rate" (`count` false events per `unit`) or "raw" (`count` is the value)."""

    kind: str
    count: float
    unit: str = ""  # "h", "min" or "day" for auto and rate

    @property
    def events_per_hour(self) -> float:
        return self.count / HOURS_PER_UNIT[self.unit]


@dataclass(frozen=True)
class Threshold:
    """A threshold in raw map units and what it means, in words."""

    value: float
    meaning: str


def parse_threshold(text: str) -> ThresholdSpec:
    """`auto`, `N/h`, `N/min`, `N/day` (false events per time, N >= 0) or a raw positive float; ConfigError otherwise."""
    clean = str(text).strip().lower()
    if clean == "auto":
        return replace(parse_threshold(AUTO_BUDGET), kind="auto")
    budget = re.fullmatch(r"(.*)/(h|min|day)", clean)
    value = _number(budget[1] if budget else clean)
    if value is None or value < 0 or (value == 0 and not budget):
        raise ConfigError(f"--threshold must be {THRESHOLD_FORMS}, got {text!r}")
    return ThresholdSpec("rate", value, budget[2]) if budget else ThresholdSpec("raw", value)


def _number(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def resolve_threshold(spec: ThresholdSpec, calibration: dict | None, events: EventConfig) -> Threshold:
    """The threshold of `spec`: a raw value as is, a budget from the calibration's sequences (threshold_for_rate)."""
    if spec.kind == "raw":
        return Threshold(spec.count, "raw value")
    if calibration is None:
        raise ConfigError(NOT_CALIBRATED)
    fps = [entry["fps"] for entry in calibration["inputs"]]
    value = threshold_for_rate(calibration["sequences"], fps, spec.events_per_hour, events)
    noun = "event" if spec.count == 1 else "events"
    meaning = (
        f"at most {spec.count:g} false {noun} per {UNIT_WORDS[spec.unit]} on {_duration(calibration['seconds'])} "
        f"of calibration footage ({calibration['frames']:,} frames)"
    )
    if spec.events_per_hour * calibration["seconds"] / 3600 < 1:  # the budget allows no event on footage this short
        meaning += "; that footage is too short to measure this rate: the threshold is its highest score, so expect more false events"
        log.warning("threshold: %s of calibration footage cannot measure %g false %s per %s; calibrate on more normal footage (`padim-ray calibrate`)",
                    _duration(calibration["seconds"]), spec.count, noun, UNIT_WORDS[spec.unit])
    return Threshold(value, meaning)


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def threshold_for_rate(sequences, fps_per_sequence, events_per_hour: float, events: EventConfig) -> float:
    """The smallest candidate threshold T such that T and every candidate above it give at most
    `events_per_hour` * hours frame-level events on the sequences.

    Candidates are the sequences' values and the float32 just above their maximum (no event at all).
    The count is not monotone in T (a higher off level can split an event in two, a higher on level
    can shorten one below the minimum duration), so candidates are scanned from the top down, and the
    scan stops at the first one over the budget: a low threshold that merges all frames into a few
    long events never passes.
    """
    arrays = [np.asarray(sequence, dtype=np.float64) for sequence in sequences]
    if len(arrays) != len(fps_per_sequence):
        raise ValueError(f"{len(arrays)} sequences but {len(fps_per_sequence)} frame rates")
    values = np.concatenate(arrays + [np.empty(0)])
    if not len(values):
        raise ValueError("a threshold from a false-alarm budget needs calibration frames")
    allowed = events_per_hour * sum(len(array) / fps for array, fps in zip(arrays, fps_per_sequence)) / 3600
    joined = _joined(arrays, fps_per_sequence, events)
    passing = float(np.nextafter(np.float32(values.max()), np.float32(np.inf)))
    for candidate in np.unique(values)[::-1]:
        if sum(len(frame_events(array, fps, candidate, events)) for fps, array in joined.items()) > allowed:
            break
        passing = float(candidate)
    return passing


def _joined(arrays: list[np.ndarray], fps_per_sequence, events: EventConfig) -> dict[float, np.ndarray]:
    """The sequences of each frame rate end to end, merge_frames frames of -inf apart: every event ends at its
    sequence's end as at the end of an input, so the joined sequence has the events of its parts."""
    parts = {}
    for array, fps in zip(arrays, fps_per_sequence):
        parts.setdefault(fps, []).extend([np.full(events.frames(fps)[1], -np.inf), array])
    return {fps: np.concatenate(arrays[1:]) for fps, arrays in parts.items()}


def calibrated_quantile(scores, calibration: dict) -> np.ndarray:
    """The fraction of calibration frame scores strictly below each score, in [0, 1] (float64)."""
    reference = np.sort(np.concatenate([np.asarray(sequence, dtype=np.float64) for sequence in calibration["sequences"]]))
    return np.searchsorted(reference, np.asarray(scores, dtype=np.float64), side="left") / len(reference)


def calibration_record(inputs: list[dict], sequences, held_out: bool) -> dict:
    """The model's calibration record from its inputs ({path, start, stop, frames, fps}) and their frame scores, in frame order."""
    arrays = [np.asarray(sequence, dtype=np.float32) for sequence in sequences]
    if len(arrays) != len(inputs) or any(len(array) != entry["frames"] for array, entry in zip(arrays, inputs)):
        raise ValueError(f"calibration: {len(inputs)} inputs of {[entry['frames'] for entry in inputs]} frames, "
                         f"but score sequences of {[len(array) for array in arrays]}")
    values = np.concatenate(arrays + [np.empty(0, np.float32)])
    if not len(values):
        raise ValueError("calibration needs at least one frame")
    return {
        "frames": len(values),
        "seconds": sum(entry["frames"] / entry["fps"] for entry in inputs),
        "fps": float(np.median([entry["fps"] for entry in inputs])),
        "held_out": bool(held_out),
        "score": "max",
        "inputs": [dict(entry) for entry in inputs],
        "sequences": [array.tolist() for array in arrays],
        "quantiles": np.quantile(values.astype(np.float64), np.linspace(0, 1, QUANTILE_LEVELS)).tolist(),
    }
