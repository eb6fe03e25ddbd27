"""Scoring: frames -> Mahalanobis maps (eq. 2) -> bilinear upsampling -> Gaussian blur -> zarr + Parquet."""

from __future__ import annotations

import functools
import logging
import math
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import ray
import torch

from padim_ray.config import MAX_FRAME_SIDE, ClusterConfig, ConfigError, ScoreConfig
from padim_ray.decisions import Decision, DecisionOptions, frame_columns, input_events, resolve_decision, write_events
from padim_ray.embedding import Embedder
from padim_ray.errors import PadimError, first_line
from padim_ray.frames import frames_dataset
from padim_ray.gaussian import mahalanobis
from padim_ray.maps import anomaly_maps, gaussian_kernel
from padim_ray.accounting import Accounting
from padim_ray.runtime import connect, describe_plan, plan_actors, start_actors, user_errors
from padim_ray.streaming import Progress, SplitConsumer, raise_first_failure, stream_to_actors
from padim_ray.files import Location
from padim_ray.publish import PendingStore, holds_progress, is_committed, staged_store
from padim_ray.store import open_model, open_pending_array
from padim_ray.map_store import (
    MAP_STORE, MAPS_GROUP, MapAttributes, MapChunkWriter, MapTarget, create_map_arrays, map_source, open_maps,
    publish_maps, read_progress, read_scores, trim_map_arrays, write_scores,
)
from padim_ray.video import FRAMES_PER_FOLDER_UNIT, WorkUnit, expand_inputs, input_ids, make_units

log = logging.getLogger(__name__)
SCORE_REFUSAL = "it cannot be scored here: install the padim-ray and weights that fitted it, or refit it"


class Scorer:
    """A model loaded for scoring: frames in, blurred anomaly maps out (no Ray here)."""

    def __init__(self, model_path: str | Path | Location, score: ScoreConfig = ScoreConfig(), device: torch.device | str = "cpu"):
        store = open_model(model_path)
        embedder = Embedder(store.attributes.model_config, device)
        store.check_reproduced(embedder, SCORE_REFUSAL)
        self._load(embedder, store.read("mean"), store.read("precision"), score)

    @classmethod
    def from_arrays(cls, embedder: Embedder, mean: np.ndarray, precision: np.ndarray, score: ScoreConfig = ScoreConfig()) -> Scorer:
        """A scorer of Gaussians held in memory, (P, d) means and (P, d, d) float32 precisions, as a
        model store holds them (calibrate.py scores with a model some frames were removed from)."""
        scorer = cls.__new__(cls)
        scorer._load(embedder, mean, precision, score)
        return scorer

    def _load(self, embedder: Embedder, mean: np.ndarray, precision: np.ndarray, score: ScoreConfig) -> None:
        self.embedder = embedder
        device, size = embedder.device, embedder.image_size
        self.mean = torch.from_numpy(mean).to(device, torch.float32)  # (P, d)
        self.precision = torch.from_numpy(precision).to(device, torch.float32)  # (P, d, d)
        self.kernel = gaussian_kernel(score.blur_sigma, score.blur_truncate)
        self.blur_size = (size, size) if score.blur_at == "model" else None

    @torch.inference_mode()
    def distances(self, frames: np.ndarray) -> torch.Tensor:
        """Mahalanobis distance of every patch, (B, h, w) float32 (eq. 2)."""
        return mahalanobis(self.embedder(frames), self.mean, self.precision)

    @torch.inference_mode()
    def maps(self, frames: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
        """Blurred anomaly maps (B, H, W) at `size`."""
        return anomaly_maps(self.distances(frames), size, self.kernel, self.blur_size)


# (device) -> Scorer; picklable, built once inside each actor
ScorerFactory = Callable[[torch.device], Scorer]


@ray.remote(max_concurrency=2)  # one thread consumes, one answers progress()
class ScoreActor(SplitConsumer):
    """Scores its split of the frame stream and writes the maps into its own chunks of the map store,
    each chunk's per-frame rows (score and its location) beside them (MapChunkWriter)."""

    def __init__(self, make_scorer: ScorerFactory, score: ScoreConfig, pending: PendingStore, targets: dict[int, MapTarget], threads: int):
        super().__init__(threads)
        self.scorer = make_scorer(self.device)
        self.writer = MapChunkWriter(pending, score.chunk_frames)
        self.targets = targets
        self.map_dtype = getattr(torch, score.map_dtype)  # cast on the device: 10x cheaper than numpy's astype

    def consume(self, *args, **kwargs):
        self.accounting = Accounting()  # progress() counts this pass: earlier passes' frames are in the progress files
        return super().consume(*args, **kwargs)

    def process(self, batch: dict) -> None:
        sizes = [self.targets[int(uid)].size for uid in batch["unit"]]
        for size in set(sizes):  # a batch may straddle inputs of different resolutions
            rows = np.array([i for i, s in enumerate(sizes) if s == size])
            maps = self.scorer.maps(batch["frame"][rows], size)  # (n, H, W) float32
            scores, peaks = (t.cpu().numpy() for t in maps.flatten(1).max(dim=1))
            for row, anomaly_map, score, peak in zip(rows, maps.to(self.map_dtype).cpu().numpy(), scores, peaks):
                uid = int(batch["unit"][row])
                frame_row = (uid, int(batch["index"][row]), int(batch["unit_total"][row]), score, peak // size[1], peak % size[1])
                self.writer.add(self.targets[uid].input_id, frame_row, anomaly_map)

    def result(self) -> None:
        self.writer.drop_incomplete()


class ScoreLostError(PadimError):
    """More scoring actors were lost than --max-retries allows."""


def parse_map_size(text: str, image_size: int) -> tuple[int, int] | None:
    """`native` -> None (each input's own size), `model` -> the model's input size, `HxW` -> (H, W)."""
    if text == "native":
        return None
    if text == "model":
        return image_size, image_size
    try:
        height, width = (int(v) for v in text.lower().split("x"))
    except ValueError:
        height = width = 0
    if not (1 <= height <= MAX_FRAME_SIDE and 1 <= width <= MAX_FRAME_SIDE):
        raise ConfigError(f"--map-size must be native, model or HxW like 480x856 with sides from 1 to {MAX_FRAME_SIDE}, got {text!r}")
    return height, width


def map_targets(units: list[WorkUnit], map_size: tuple[int, int] | None) -> dict[int, MapTarget]:
    """Where each unit's maps go: its input's id (input_ids) and the map size (`map_size`, or the input's own)."""
    ids = input_ids([unit.path for unit in units])
    return {u.uid: MapTarget(ids[u.path], map_size or (u.height, u.width)) for u in units}


@dataclass
class ScoreResult:
    out: Location
    frames: dict[str, int]  # frames per input id
    seconds: float
    lost_actors: int = 0
    resumed_frames: int = 0  # frames an earlier, stopped run had scored
    decision: Decision | None = None  # the threshold used (None: no flags, no events)
    events: dict = field(default_factory=dict)  # input id -> its events (events.Event)


def score_inputs(
    model_path: str | Path | Location,
    inputs: list[str | Path | Location],
    out: str | Path | Location,
    map_size: str = "native",
    score: ScoreConfig = ScoreConfig(),
    cluster: ClusterConfig = ClusterConfig(),
    overwrite: bool = False,
    address: str | None = None,
    decisions: DecisionOptions = DecisionOptions(),
) -> ScoreResult:
    """Score every frame of `inputs` with the model at `model_path`; write maps (zarr) and per-frame scores (Parquet) to `out`,
    and with a threshold (`decisions`, or the model's calibration) per-frame flags and events (decisions.py).

    Finished chunks are recorded as they are written: a lost actor's unfinished ones are redone on the
    others (or new actors), up to `cluster.max_retries` lost actors, and a stopped run's are kept in
    its staging store, where a rerun of the same scoring (model, inputs, options) resumes.
    """
    started = time.monotonic()
    out = Location(out)
    store = open_model(model_path)
    store.check_reproduced(Embedder(store.attributes.model_config), SCORE_REFUSAL)  # before any cluster work
    size = parse_map_size(map_size, store.attributes.image_size)
    decision = resolve_decision(store.attributes, decisions)
    chunk = score.chunk_frames
    units, estimate = make_units(expand_inputs(list(inputs)), folder_unit_frames=math.ceil(FRAMES_PER_FOLDER_UNIT / chunk) * chunk)
    targets = map_targets(units, size)
    identity = _identity(store, score, units, targets)
    with staged_store(out, overwrite, MAP_STORE, resume=identity) as pending, user_errors():
        resumed = _accounting(read_progress(pending)).count
        if resumed:
            log.info("score: resuming with %d of %d frames already scored (%s)", resumed, estimate, pending.staging)
        else:
            create_map_arrays(pending, score.map_dtype, chunk, _map_arrays(units, targets))
        try:
            lost = _score_units(units, targets, store, score, cluster, pending, Progress(estimate, "score"), address)
        except BaseException:
            if holds_progress(pending):
                log.error("score stopped: the chunks scored are kept in %s; rerun the same command to resume", pending.staging)
            raise
        rows = read_progress(pending)
        accounting = _accounting(rows)
        accounting.check(units)
        frames = _frames_per_input(units, targets, accounting)
        trim_map_arrays(pending.root, frames)
        events = _write_tables(pending, rows, units, targets, decision, chunk)
        publish_maps(pending, MapAttributes.of(store, score))
    return ScoreResult(out, frames, time.monotonic() - started, lost, resumed, decision, events)


def _write_tables(pending: PendingStore, rows: dict[str, np.ndarray], units: list[WorkUnit], targets, decision: Decision | None, chunk: int) -> dict:
    """scores.parquet, and with a decision its columns and events.parquet; returns the events per input id."""
    table, events = _score_table(rows, targets), {}
    if decision is not None:
        table |= frame_columns(table["score"], decision)
        events = _events(pending, table, units, targets, decision, chunk)
        write_events(pending.staging, events, decision)
    write_scores(pending.staging, table)
    return events


def _events(pending: PendingStore, table: dict[str, list], units: list[WorkUnit], targets, decision: Decision, chunk: int) -> dict:
    """input id -> its events, read from the maps written to `pending`, inputs in the table's order."""
    fps = {targets[u.uid].input_id: u.fps for u in units}
    names = np.array(table["input"])
    scores = np.array(table["score"])
    events = {}
    for name in dict.fromkeys(table["input"]):
        maps = open_pending_array(pending.root, name)
        events[name] = input_events(maps, scores[names == name], fps[name], decision, chunk)
    return events


def _score_units(units, targets, store, score: ScoreConfig, cluster: ClusterConfig, pending: PendingStore, progress: Progress, address) -> int:
    """Score the frames of `units` not yet recorded in `pending`'s progress, in passes while passes
    record more: when actors are lost, their unfinished chunks are redone on the others (or on new
    actors if none is left), up to `cluster.max_retries` lost actors; a chunk whose blocks went to
    two actors (Ray Data may cut a block) is dropped by both and redone. Returns how many were lost."""
    connect(address)
    ray.data.DataContext.get_current().enable_progress_bars = False  # ours counts frames
    # decode blocks start on chunk boundaries (units do, and recorded frames are whole chunks),
    # so every chunk is written by the one actor that got its block
    decode_batch = math.ceil(cluster.decode_batch / score.chunk_frames) * score.chunk_frames
    size_in = store.attributes.image_size
    make_scorer = functools.partial(Scorer, store.path, score)
    actors, lost, recorded = [], 0, -1
    try:
        while True:
            done = _accounting(read_progress(pending))
            progress.held = done.count
            todo = done.unfinished(units)
            if not todo or done.count == recorded:
                return lost  # done, or a pass recorded nothing: the caller's accounting check names what is missing
            recorded = done.count
            todo_units = [u for u in units if u.uid in todo]
            skip = {uid: used for uid, used in todo.items() if len(used)}
            if not actors:
                actors = _start_actors(make_scorer, score, pending, targets, cluster)
            outcomes = stream_to_actors(
                lambda credits: frames_dataset(todo_units, size_in, 1, decode_batch, skip, credits=credits), actors, cluster, decode_batch, progress
            )
            # an actor that failed in its constructor (e.g. an unreadable model) fails again anywhere: not a loss to redo
            raise_first_failure([o for o in outcomes if not _lost(o)])
            dead = [i for i, o in enumerate(outcomes) if _lost(o)]
            if dead:
                lost += len(dead)
                cause = first_line(outcomes[dead[0]])
                log.warning("score: lost %d scoring actor(s) (%s); rescoring their unfinished chunks", len(dead), cause)
                for i in dead:
                    ray.kill(actors[i])
                actors = [actor for i, actor in enumerate(actors) if i not in dead]
                if lost > cluster.max_retries:
                    scored = _accounting(read_progress(pending)).count
                    kept = f"the {scored} frames scored are kept in {pending.staging}: rerun the same command to resume" if scored else "no frame was scored"
                    raise ScoreLostError(f"{lost} scoring actors were lost, more than --max-retries {cluster.max_retries} ({cause}); {kept}")
    finally:
        progress.close()
        for actor in actors:
            ray.kill(actor)


def _lost(outcome) -> bool:
    """Whether an actor's outcome is its loss (process, node), which other actors may make good."""
    return isinstance(outcome, ray.exceptions.RayActorError) and not outcome.actor_init_failed


def _start_actors(make_scorer: ScorerFactory, score: ScoreConfig, pending: PendingStore, targets: dict[int, MapTarget], cluster: ClusterConfig) -> list:
    """Scoring actors for the cluster as it is now, named (`padim-ray-score-*`) for `ray.get_actor`."""
    plan = plan_actors(cluster)
    actors = start_actors(
        plan,
        lambda _, spec: ScoreActor.options(**spec.options(), name=f"padim-ray-score-{uuid.uuid4().hex[:12]}").remote(
            make_scorer, score, pending, targets, spec.threads
        ),
        cluster, "score",
    )
    log.info("score: %d actors (%s)", len(plan), describe_plan(plan))
    return actors


def _identity(store, score: ScoreConfig, units: list[WorkUnit], targets: dict[int, MapTarget]) -> dict:
    """What makes two scorings the same: a rerun may keep the chunks a stopped one recorded."""
    return {
        **MapAttributes.of(store, score).to_attributes(),
        "model_sources": store.attributes.sources,
        "score": asdict(score),
        "inputs": [[Location(u.path).uri, u.start, u.stop, u.frames, targets[u.uid].input_id, list(targets[u.uid].size)] for u in units],
    }


def _accounting(rows: dict[str, np.ndarray]) -> Accounting:
    """The frames the progress rows hold, per work unit."""
    accounting = Accounting()
    accounting.add_batch(rows["unit"], rows["index"], rows["unit_total"])
    return accounting


def scored_with(maps: str | Path | Location, model_path: str | Path | Location, inputs: list, score: ScoreConfig = ScoreConfig()) -> bool:
    """Whether `maps` is a complete map store of exactly `inputs`, scored by the model at `model_path` as it is now with these settings."""
    if not is_committed(maps, MAPS_GROUP):
        return False
    group = open_maps(maps)
    ids = read_scores(maps)["input"].unique().tolist()  # ids may be path suffixes (a/x), which zarr lists as no array
    sources = {map_source(group[name]) for name in ids}
    same_model = MapAttributes.from_attributes(group.attrs) == MapAttributes.of(open_model(model_path), score)
    return same_model and sources == {Location(path).uri for path in inputs}


def _map_arrays(units: list[WorkUnit], targets: dict[int, MapTarget]) -> dict[str, tuple[tuple[int, int, int], str]]:
    """Shape (frames the headers declare, H, W) and source of each input's map array."""
    arrays: dict[str, tuple[tuple[int, int, int], str]] = {}
    for unit in units:
        target = targets[unit.uid]
        frames = arrays[target.input_id][0][0] if target.input_id in arrays else 0
        arrays[target.input_id] = ((frames + unit.frames, *target.size), unit.path)
    return arrays


def _frames_per_input(units: list[WorkUnit], targets: dict[int, MapTarget], accounting) -> dict[str, int]:
    frames: dict[str, int] = {}
    for unit in units:
        input_id = targets[unit.uid].input_id
        frames[input_id] = frames.get(input_id, 0) + accounting.totals[unit.uid]
    return frames


def _score_table(rows: dict[str, np.ndarray], targets: dict[int, MapTarget]) -> dict[str, list]:
    """One row per frame, ordered by input (as given) and frame."""
    order = np.lexsort((rows["index"], rows["unit"]))
    return {
        "input": [targets[int(uid)].input_id for uid in rows["unit"][order]],
        "frame": rows["index"][order].astype(np.int64).tolist(),
        "score": rows["score"][order].astype(np.float32).tolist(),
        "max_y": rows["max_y"][order].astype(np.int64).tolist(),
        "max_x": rows["max_x"][order].astype(np.int64).tolist(),
    }
