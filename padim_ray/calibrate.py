"""Calibration: the frame scores of normal footage the scoring model did not see, recorded in the model.

`padim-ray calibrate MODEL INPUTS` scores INPUTS with the model; inputs the model was fitted on (work
units by path, start and stop) are first removed from its statistics (gaussian.remove_stats), so every
frame is scored by the model without it. `fit --calibration FRACTION` sets aside a slice of its own
footage (calibration_slice) and does the same before it publishes. The stored model keeps every frame:
only its `calibration` attribute is written (see docs/design.md, "Calibration").
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections import Counter
from dataclasses import dataclass, replace

import numpy as np

from padim_ray.accumulate import SharedJob
from padim_ray.config import MAX_CALIBRATION_FRACTION, ClusterConfig, ConfigError
from padim_ray.embedding import Embedder
from padim_ray.files import Location
from padim_ray.frame_scores import (
    SCORE, CalibrationError, frame_scores, scorer_without, statistics_of, stored_statistics, without,
)
from padim_ray.leases import Lease
from padim_ray.runtime import connect, user_errors
from padim_ray.score import Scorer
from padim_ray.store import ModelStore, open_model, record_calibration
from padim_ray.thresholds import calibration_record
from padim_ray.video import WorkUnit, expand_inputs, make_units

log = logging.getLogger(__name__)
MIN_WHOLE_UNITS = 2  # the slice is whole work units when it holds at least this many, else each input's end


@dataclass
class CalibrationResult:
    model: Location
    calibration: dict
    seconds: float


def check_fraction(fraction: float) -> float:
    """`fraction` if it is a valid --calibration (0 <= f < MAX_CALIBRATION_FRACTION; 0 turns calibration off), else ConfigError."""
    if not (isinstance(fraction, (int, float)) and 0 <= fraction < MAX_CALIBRATION_FRACTION):
        raise ConfigError(f"--calibration must be at least 0 (0: no calibration) and below {MAX_CALIBRATION_FRACTION:g}, got {fraction}")
    return float(fraction)


def calibrate_model(model_path, inputs: list, cluster: ClusterConfig = ClusterConfig(), address: str | None = None) -> CalibrationResult:
    """Score the frames of `inputs` with the model at `model_path`, without those it was fitted on,
    and record them as the model's calibration (its arrays are untouched).

    The model's lease is held throughout: no fit or update replaces it meanwhile, and the one write of its
    root metadata leaves the old attributes or the new.
    """
    started = time.monotonic()
    model_path = Location(model_path)
    open_model(model_path)  # a one-line error for a missing or foreign model, before taking its lease
    lease = Lease(model_path, "model")
    try:
        with user_errors():
            store = open_model(model_path)
            embedder = Embedder(store.attributes.model_config)
            store.check_reproduced(embedder, "it cannot be calibrated here: install the padim-ray and weights that fitted it, or refit it")
            units, _ = make_units(expand_inputs(list(inputs)))
            seen = seen_units(units, store)
            connect(address)
            calibration = score_held_out(units, seen, store, embedder, cluster)
            record_calibration(model_path, calibration)
    finally:
        lease.release()
    return CalibrationResult(model_path, calibration, time.monotonic() - started)


def seen_units(units: list[WorkUnit], store: ModelStore) -> list[WorkUnit]:
    """The units of `units` that the model was fitted on (as its `sources` record them, by path, start and stop).

    An input fitted otherwise (other frame ranges, or twice: `update --force`) cannot be held out exactly: CalibrationError.
    """
    sources = Counter((Location(s["path"]).uri, s["start"], s["stop"]) for s in store.attributes.sources)
    fitted_paths = {path for path, _, _ in sources}
    seen = []
    for unit in units:
        key = (Location(unit.path).uri, unit.start, unit.stop)
        if sources[key] > 1:
            raise CalibrationError(f"input {unit.path} is in model {store.path} {sources[key]} times (update --force); it cannot be held out")
        if sources[key]:
            seen.append(unit)
        elif key[0] in fitted_paths:
            raise CalibrationError(
                f"input {unit.path} is in model {store.path} in other frame ranges than its work units; "
                "calibrate on the inputs as fitted, or on footage the model did not see"
            )
    return seen


def score_held_out(units: list[WorkUnit], seen: list[WorkUnit], store: ModelStore, embedder: Embedder, cluster: ClusterConfig) -> dict:
    """The calibration record of `units`, scored by the stored model without the frames of `seen`."""
    config = store.attributes.model_config
    make_scorer = functools.partial(Scorer, store.path, SCORE)
    if seen:
        fitted = {(Location(s["path"]).uri, s["start"], s["stop"]): s["frames"] for s in store.attributes.sources}
        held = [fitted[(Location(u.path).uri, u.start, u.stop)] for u in seen]
        if store.attributes.frames - sum(held) < 2:
            raise CalibrationError(
                f"the inputs hold {sum(held)} of the {store.attributes.frames} frames of model {store.path}: too few would be left "
                "to score them with; calibrate on footage the model did not see"
            )
        part, accounting = statistics_of(seen, config, embedder, cluster)
        changed = [u.path for u, frames in zip(seen, held) if accounting.totals[u.uid] != frames]
        if changed:
            raise CalibrationError(f"input {changed[0]} decodes to other frames than model {store.path} was fitted on: it changed since the fit")
        make_scorer = scorer_without(config, without(stored_statistics(store.path, embedder, cluster), part))
    sequences = frame_scores(units, make_scorer, config.image_size, cluster)
    return calibration_record(_record_inputs(units, sequences), sequences, held_out=bool(seen))


def calibrate_fit(
    units: list[WorkUnit], totals: dict[int, int], total: list, fraction: float, embedder: Embedder, config, cluster: ClusterConfig,
    shared: SharedJob | None = None,
) -> dict | None:
    """The calibration record of a fit: its slice (calibration_slice) scored by the model without it.

    `units` are the fit's work units, `totals` their fitted frames, `total` its statistics (ObjectRefs per shard). None if no slice.
    """
    held = calibration_slice(units, totals, fraction, config.frame_stride)
    if not held:
        return None
    part, _ = statistics_of(held, config, embedder, cluster, shared)
    sequences = frame_scores(held, scorer_without(config, without(total, part)), config.image_size, cluster, shared)
    return calibration_record(_record_inputs(held, sequences), sequences, held_out=True)


def calibration_slice(units: list[WorkUnit], totals: dict[int, int], fraction: float, stride: int = 1) -> list[WorkUnit]:
    """The fit's frames set aside to calibrate it, as work units (new ids from 0).

    With n work units and k = round(fraction * n) >= MIN_WHOLE_UNITS: k whole units, spread evenly
    (unit floor((j + 1/2) n / k) for j < k, in input order). Else the end of each input: its last
    max(1, round(fraction * m)) fitted frames of its m, within its last run of work units without a gap.
    """
    if fraction <= 0 or not units:
        return []
    count = math.floor(fraction * len(units) + 0.5)
    if count >= MIN_WHOLE_UNITS:
        picked = [units[math.floor((j + 0.5) * len(units) / count)] for j in range(count)]
        return [replace(unit, uid=i) for i, unit in enumerate(picked)]
    inputs: dict[str, list[WorkUnit]] = {}
    for unit in units:
        inputs.setdefault(unit.path, []).append(unit)
    return [_input_end(i, sorted(parts, key=lambda u: u.start), totals, fraction, stride) for i, parts in enumerate(inputs.values())]


def _input_end(uid: int, units: list[WorkUnit], totals: dict[int, int], fraction: float, stride: int) -> WorkUnit:
    """The unit of an input's last fitted frames (see calibration_slice): from the frame its slice starts at to its end."""
    fitted = np.concatenate([math.ceil(u.start / stride) * stride + stride * np.arange(totals[u.uid]) for u in units])
    gaps = np.flatnonzero(np.diff(fitted) != stride)
    run = fitted[gaps[-1] + 1 :] if len(gaps) else fitted
    start = int(run[-min(len(run), max(1, round(fraction * len(fitted))))])
    last = units[-1]
    return replace(last, uid=uid, start=start, frames=max(1, (last.stop or last.frames) - start))


def _record_inputs(units: list[WorkUnit], sequences: list[np.ndarray]) -> list[dict]:
    return [
        {"path": Location(u.path).uri, "start": u.start, "stop": u.stop, "frames": len(s), "fps": float(u.fps)} for u, s in zip(units, sequences)
    ]


def describe_calibration(calibration: dict) -> str:
    """One line: how much footage a calibration scored, and its frame scores' median, 99th percentile and maximum."""
    quantiles = calibration["quantiles"]
    how = "held out of the fit" if calibration["held_out"] else "unseen by the model"
    return (
        f"calibration: {calibration['frames']} frames ({calibration['seconds']:.1f} s of footage in {len(calibration['inputs'])} part(s), {how}); "
        f"frame scores: median {quantiles[50]:.4g}, 99th percentile {quantiles[99]:.4g}, max {quantiles[100]:.4g}"
    )
