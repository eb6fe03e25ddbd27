"""Scoring: frames -> Mahalanobis maps (eq. 2) -> bilinear upsampling -> Gaussian blur -> zarr + Parquet."""

from __future__ import annotations

import functools
import logging
import math
import os
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import ray
import torch

from padim_ray.config import MAX_FRAME_SIDE, ClusterConfig, ConfigError, ModelConfig, ScoreConfig
from padim_ray.embedding import Embedder
from padim_ray.gaussian import mahalanobis
from padim_ray.maps import anomaly_maps, gaussian_kernel
from padim_ray.accounting import Accounting
from padim_ray.runtime import (
    Progress, SplitConsumer, connect, describe_plan, plan_actors, raise_first_failure, start_actors, stream_to_actors, user_errors,
)
from padim_ray.storage import Location, staged_store
from padim_ray.store import (
    MAP_STORE, MapChunkWriter, MapTarget, check_chunk_owners, create_map_arrays, open_model, publish_maps,
    trim_map_arrays, write_scores,
)
from padim_ray.video import FRAMES_PER_FOLDER_UNIT, NOT_LAST, VIDEO_SUFFIXES, WorkUnit, expand_inputs, frames_dataset, make_units

log = logging.getLogger(__name__)
SCORE_REFUSAL = "it cannot be scored here: install the padim-ray and weights that fitted it, or refit it"


class Scorer:
    """A model loaded for scoring: frames in, blurred anomaly maps out (no Ray here)."""

    def __init__(self, model_path: str | Path | Location, score: ScoreConfig = ScoreConfig(), device: torch.device | str = "cpu"):
        store = open_model(model_path)
        config = ModelConfig(**store.attrs["config"])
        self.embedder = Embedder(config, device)
        store.check_reproduced(self.embedder, SCORE_REFUSAL)
        device = self.embedder.device
        self.mean = torch.from_numpy(store.read("mean")).to(device, torch.float32)  # (P, d)
        self.precision = torch.from_numpy(store.read("precision")).to(device, torch.float32)  # (P, d, d)
        self.kernel = gaussian_kernel(score.blur_sigma, score.blur_truncate)
        self.blur_size = (config.image_size, config.image_size) if score.blur_at == "model" else None

    @torch.inference_mode()
    def distances(self, frames: np.ndarray) -> torch.Tensor:
        """Mahalanobis distance of every patch, (B, h, w) float32 (eq. 2)."""
        return mahalanobis(self.embedder(frames), self.mean, self.precision)

    @torch.inference_mode()
    def maps(self, frames: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
        """Blurred anomaly maps (B, H, W) at `size`."""
        return anomaly_maps(self.distances(frames), size, self.kernel, self.blur_size)


@ray.remote(max_concurrency=2)  # one thread consumes, one answers progress()
class ScoreActor(SplitConsumer):
    """Scores its split of the frame stream and writes the maps into its own chunks of the map store.

    Only the small per-frame rows (score and its location) go back to the driver.
    """

    def __init__(self, model_path: Location, score: ScoreConfig, maps_root: Location, targets: dict[int, MapTarget], threads: int):
        super().__init__(threads)
        self.scorer = Scorer(model_path, score, self.device)
        self.writer = MapChunkWriter(maps_root, score.chunk_frames)
        self.targets = targets
        self.map_dtype = getattr(torch, score.map_dtype)  # cast on the device: 10x cheaper than numpy's astype
        self.rows: dict[str, list[np.ndarray]] = {column: [] for column in ("unit", "index", "score", "max_y", "max_x")}

    def process(self, batch: dict) -> None:
        sizes = [self.targets[int(uid)].size for uid in batch["unit"]]
        for size in set(sizes):  # a batch may straddle inputs of different resolutions
            rows = np.array([i for i, s in enumerate(sizes) if s == size])
            maps = self.scorer.maps(batch["frame"][rows], size)  # (n, H, W) float32
            peaks = maps.flatten(1).argmax(dim=1)
            self.rows["score"].append(maps.flatten(1).amax(dim=1).cpu().numpy())
            self.rows["max_y"].append((peaks // size[1]).cpu().numpy())
            self.rows["max_x"].append((peaks % size[1]).cpu().numpy())
            for column in ("unit", "index"):
                self.rows[column].append(batch[column][rows])
            for row, anomaly_map in zip(rows, maps.to(self.map_dtype).cpu().numpy()):
                target = self.targets[int(batch["unit"][row])]
                self.writer.add(target.input_id, int(batch["index"][row]), anomaly_map, batch["unit_total"][row] != NOT_LAST)

    def result(self) -> tuple[dict[str, np.ndarray], list[tuple[str, int]]]:
        """This actor's per-frame rows and the chunks it wrote."""
        self.writer.close()
        return {column: np.concatenate(parts) if parts else np.zeros(0) for column, parts in self.rows.items()}, self.writer.written


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


def input_ids(paths: list[str]) -> dict[str, str]:
    """A readable id per input, unique by construction and independent of order: the shortest suffix
    of its path that no other input's path ends with (`01_0014`, or `a/x` and `b/x` for /a/x.mp4 and
    /b/x.mp4), video suffixes dropped unless they alone tell two inputs apart."""
    parts = {path: _id_parts(path, keep_suffix=False) for path in dict.fromkeys(paths)}
    shared = Counter(parts.values())
    parts = {path: _id_parts(path, keep_suffix=True) if shared[p] > 1 else p for path, p in parts.items()}
    depth = max(map(len, parts.values()))
    counts = [Counter(p[-k:] for p in parts.values()) for k in range(depth + 1)]
    return {path: "/".join(next((p[-k:] for k in range(1, len(p)) if counts[k][p[-k:]] == 1), p)) for path, p in parts.items()}


def _id_parts(path: str, keep_suffix: bool) -> tuple[str, ...]:
    """The components of an input's path (the bucket's scheme first), its video suffix dropped unless `keep_suffix`."""
    location = Location(path)
    *folders, name = [part for part in location.path.split("/") if part]
    if not keep_suffix and os.path.splitext(name)[1].lower() in VIDEO_SUFFIXES:
        name = os.path.splitext(name)[0]
    return ((f"{location.protocol}:",) if location.is_remote else ()) + (*folders, name)


@dataclass
class ScoreResult:
    out: Location
    frames: dict[str, int]  # frames per input id
    seconds: float


def score_inputs(
    model: str | Path | Location,
    inputs: list[str | Path | Location],
    out: str | Path | Location,
    map_size: str = "native",
    score: ScoreConfig = ScoreConfig(),
    cluster: ClusterConfig = ClusterConfig(),
    overwrite: bool = False,
    address: str | None = None,
) -> ScoreResult:
    """Score every frame of `inputs` with `model`; write maps (zarr) and per-frame scores (Parquet) to `out`."""
    started = time.monotonic()
    out = Location(out)
    store = open_model(model)
    store.check_reproduced(Embedder(ModelConfig(**store.attrs["config"])), SCORE_REFUSAL)  # before any cluster work
    size = parse_map_size(map_size, store.attrs["image_size"])
    chunk = score.chunk_frames
    units, estimate = make_units(expand_inputs(list(inputs)), folder_unit_frames=math.ceil(FRAMES_PER_FOLDER_UNIT / chunk) * chunk)
    targets = map_targets(units, size)
    with staged_store(out, overwrite, MAP_STORE) as pending, user_errors():
        create_map_arrays(pending, score.map_dtype, chunk, _map_arrays(units, targets))
        connect(address)
        ray.data.DataContext.get_current().enable_progress_bars = False  # ours below counts frames
        # decode blocks start on chunk boundaries, so every chunk is written by the one actor that got its block
        block_rows = math.ceil(cluster.decode_batch / chunk) * chunk
        size_in = store.attrs["image_size"]
        plan = plan_actors(cluster)
        args = (store.path, score, pending.root, targets)
        actors = start_actors(plan, lambda _, spec: ScoreActor.options(**spec.options()).remote(*args, spec.threads), cluster, "score")
        log.info("score: %d actors (%s)", len(plan), describe_plan(plan))
        progress = Progress(estimate, "score")
        try:
            outcomes = raise_first_failure(stream_to_actors(
                lambda credits: frames_dataset(units, size_in, 1, block_rows, credits=credits), actors, cluster, block_rows, progress
            ))
        finally:
            progress.close()
            for actor in actors:
                ray.kill(actor)
        accounting = functools.reduce(Accounting.merge, [accounting for accounting, _ in outcomes])
        accounting.check(units)
        check_chunk_owners([written for _, (_, written) in outcomes])
        frames = _frames_per_input(units, targets, accounting)
        trim_map_arrays(pending.root, frames)
        write_scores(pending.staging, _score_table([rows for _, (rows, _) in outcomes], targets))
        publish_maps(pending, _map_attributes(store, score))
    return ScoreResult(out=out, frames=frames, seconds=time.monotonic() - started)


def _map_arrays(units: list[WorkUnit], targets: dict[int, MapTarget]) -> dict[str, tuple[tuple[int, int, int], dict]]:
    """Shape (frames the headers declare, H, W) and attributes of each input's map array."""
    arrays: dict[str, tuple[tuple[int, int, int], dict]] = {}
    for unit in units:
        target = targets[unit.uid]
        frames = arrays[target.input_id][0][0] if target.input_id in arrays else 0
        arrays[target.input_id] = ((frames + unit.frames, *target.size), {"source": unit.path})
    return arrays


def _map_attributes(store, score: ScoreConfig) -> dict:
    model_facts = {k: store.attrs[k] for k in ("backbone", "weights_identity", "dims", "image_size", "frames")}
    return {
        "kind": "anomaly-maps", "model": store.path.uri, "model_facts": model_facts,
        "blur_sigma": score.blur_sigma, "blur_truncate": score.blur_truncate, "blur_at": score.blur_at,
    }


def _frames_per_input(units: list[WorkUnit], targets: dict[int, MapTarget], accounting) -> dict[str, int]:
    frames: dict[str, int] = {}
    for unit in units:
        input_id = targets[unit.uid].input_id
        frames[input_id] = frames.get(input_id, 0) + accounting.totals[unit.uid]
    return frames


def _score_table(parts: list[dict[str, np.ndarray]], targets: dict[int, MapTarget]) -> dict[str, list]:
    """One row per frame, ordered by input (as given) and frame."""
    rows = {column: np.concatenate([part[column] for part in parts]) for column in parts[0]}
    order = np.lexsort((rows["index"], rows["unit"]))
    return {
        "input": [targets[int(uid)].input_id for uid in rows["unit"][order]],
        "frame": rows["index"][order].astype(np.int64).tolist(),
        "score": rows["score"][order].astype(np.float32).tolist(),
        "max_y": rows["max_y"][order].astype(np.int64).tolist(),
        "max_x": rows["max_x"][order].astype(np.int64).tolist(),
    }
