"""From scores to decisions: the threshold a scoring uses, per-frame flags, and events read from the maps.

A scoring decides when its model is calibrated (`--threshold auto`, the default) or when given a
threshold: scores.parquet gains `quantile` (the frame score's rank among the calibration's normal
frames), `over` (score / threshold) and `anomalous`, and events.parquet lists the events that
events.RegionTracker finds in each input's maps, in frame order. The threshold, its meaning and the
event settings are recorded in events.parquet's metadata, so evaluate and render read what score used.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, fields

import numpy as np

from padim_ray.events import Event, map_events
from padim_ray.files import Location
from padim_ray.store import ModelAttributes
from padim_ray.map_store import EVENTS_FILE, read_parquet, write_parquet
from padim_ray.thresholds import EventConfig, Threshold, calibrated_quantile, parse_threshold, resolve_threshold

log = logging.getLogger(__name__)
METADATA_KEY = b"padim_ray"  # events.parquet's schema metadata: the decision, as JSON


@dataclass(frozen=True)
class DecisionOptions:
    """What `score --threshold` asked for: None decides only with a calibrated model (auto)."""

    threshold: str | None = None
    events: EventConfig = EventConfig()


@dataclass(frozen=True)
class Decision:
    """A resolved threshold, the event settings, and the calibration the model recorded (if any)."""

    threshold: Threshold
    events: EventConfig
    calibration: dict | None

    def to_json(self) -> dict:
        return {"threshold": self.threshold.value, "meaning": self.threshold.meaning, "events": asdict(self.events)}


def resolve_decision(model: ModelAttributes, options: DecisionOptions) -> Decision | None:
    """The decision a scoring makes with `model`; None when no threshold was given and the model is not
    calibrated. Resolved before any cluster work, so a bad --threshold fails at once."""
    if options.threshold is None and model.calibration is None:
        log.info("score: the model is not calibrated, so frames are not flagged and no events are found; "
                 "run `padim-ray calibrate MODEL NORMAL_VIDEOS` or pass --threshold")
        return None
    spec = parse_threshold(options.threshold or "auto")
    return Decision(resolve_threshold(spec, model.calibration, options.events), options.events, model.calibration)


def frame_columns(scores: np.ndarray, decision: Decision) -> dict[str, list]:
    """The per-frame columns a decision adds to scores.parquet."""
    scores = np.asarray(scores, dtype=np.float64)
    quantile = calibrated_quantile(scores, decision.calibration) if decision.calibration else np.full(len(scores), np.nan)
    return {
        "quantile": quantile.astype(np.float32).tolist(),
        "over": (scores / decision.threshold.value).astype(np.float32).tolist(),
        "anomalous": (scores >= decision.threshold.value).tolist(),
    }


def input_events(maps, scores: np.ndarray, fps: float, decision: Decision, chunk: int) -> list[Event]:
    """The events of one input, from its (T, H, W) `maps` (a zarr array) and frame `scores` (T,):
    only the chunks holding a frame over the off level are read; the others are quiet frames."""
    off = decision.events.hysteresis * decision.threshold.value
    loud = {int(i) // chunk for i in np.flatnonzero(np.asarray(scores) >= off)}
    quiet = np.zeros(maps.shape[1:], dtype=np.float32)

    def frames():
        for start in range(0, maps.shape[0], chunk):
            block = np.asarray(maps[start : start + chunk], dtype=np.float32) if start // chunk in loud else None
            for offset in range(min(chunk, maps.shape[0] - start)):
                yield start + offset, quiet if block is None else block[offset]

    return map_events(frames(), fps, decision.threshold.value, decision.events)


EVENT_COLUMNS = ("input",) + tuple(f.name for f in fields(Event))


def write_events(where: Location, events: dict[str, list[Event]], decision: Decision) -> None:
    """events.parquet in the map store folder `where`: one row per event of every input."""
    import pyarrow as pa

    rows = [{"input": name, **asdict(event)} for name, found in events.items() for event in found]
    table = pa.Table.from_pylist(rows, schema=_events_schema()) if rows else _events_schema().empty_table()
    write_parquet(where / EVENTS_FILE, table.replace_schema_metadata({METADATA_KEY: json.dumps(decision.to_json()).encode()}))


def _events_schema():
    import pyarrow as pa

    types = {"input": pa.string()}
    for field in fields(Event):
        types[field.name] = pa.float64() if field.type in ("float", float) else pa.int64()
    return pa.schema([(name, types[name]) for name in EVENT_COLUMNS])


def read_events(path: Location | str):
    """(events as a pandas table, the decision's JSON) of a map store, or None if it holds no events.parquet."""
    file = Location(path) / EVENTS_FILE
    if not file.is_file():
        return None
    table = read_parquet(file)
    return table.to_pandas(), json.loads(table.schema.metadata[METADATA_KEY])


def decided_alike(maps_path: Location | str, decision: Decision | None) -> bool:
    """Whether the map store at `maps_path` holds the events of `decision` (or none, for None)."""
    stored = read_events(maps_path)
    return (stored is None) if decision is None else (stored is not None and stored[1] == decision.to_json())


def format_events(events: dict[str, list], decision: dict) -> str:
    """A short table of the events of every input (Events, or read_events' rows), headed by the threshold
    and its meaning (`decision`: Decision.to_json(), or read_events' metadata)."""
    lines = [f"threshold {decision['threshold']:.4g} ({decision['meaning']})"]
    total = sum(len(found) for found in events.values())
    lines.append(f"{total} event(s)" + (":" if total else ""))
    if total:
        lines.append(f"  {'input':<24}{'event':>6}{'start s':>9}{'end s':>8}{'peak':>9}  box (y0, x0, y1, x1) at the peak")
    for name, found in events.items():
        for e in found:
            box = f"({e.box_y0}, {e.box_x0}, {e.box_y1}, {e.box_x1})"
            lines.append(f"  {name:<24}{e.event:>6}{e.start_s:>9.2f}{e.end_s:>8.2f}{e.peak_score:>9.4g}  {box}")
    return "\n".join(lines)
