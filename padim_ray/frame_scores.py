"""Frame scores for calibration: a model with some frames removed (remove_stats, one Ray task per
position shard) and scoring actors that keep only each frame's score, the maximum of its blurred
anomaly map exactly as `padim-ray score` computes it (native map size), no maps written."""

from __future__ import annotations

import contextlib
import functools
import logging

import numpy as np
import ray
import torch

from padim_ray.accounting import Accounting
from padim_ray.accumulate import SharedJob, accumulate
from padim_ray.config import ClusterConfig, ModelConfig, ScoreConfig
from padim_ray.embedding import Embedder
from padim_ray.errors import PadimError, first_line
from padim_ray.files import Location
from padim_ray.frames import frames_dataset
from padim_ray.gaussian import GaussianStats, finalize, remove_stats
from padim_ray.reduce import shard_bounds, shard_refs, stored_shards
from padim_ray.runtime import describe_plan, plan_actors, start_actors
from padim_ray.score import Scorer, ScorerFactory
from padim_ray.streaming import Progress, SplitConsumer, raise_first_failure, stream_to_actors
from padim_ray.video import WorkUnit

log = logging.getLogger(__name__)
SCORE = ScoreConfig()  # frame scores as `padim-ray score` computes them by default


class CalibrationError(PadimError):
    """Footage that cannot calibrate a model."""


def statistics_of(units: list[WorkUnit], model_config: ModelConfig, embedder: Embedder, cluster: ClusterConfig, shared: SharedJob | None = None):
    """The statistics of the frames of `units` that a fit of `model_config` uses (stats actors, no
    checkpoints): (one ObjectRef of GaussianStats per position shard, their accounting)."""

    def frames_for(todo: dict[int, np.ndarray], credits):
        todo_units = [u for u in units if u.uid in todo]
        skip = {uid: used for uid, used in todo.items() if len(used)}
        return frames_dataset(todo_units, model_config.image_size, model_config.frame_stride, cluster.decode_batch, skip, credits=credits)

    make_embedder = functools.partial(Embedder, model_config)
    accumulated = accumulate(frames_for, units, make_embedder, embedder.positions, embedder.dims, cluster, shared=shared)
    accumulated.accounting.check(units)
    return accumulated.roots, accumulated.accounting


def stored_statistics(model: Location, embedder: Embedder, cluster: ClusterConfig) -> list:
    """A stored model's statistics, one ObjectRef of GaussianStats per position shard (as statistics_of cuts them)."""
    bounds = shard_bounds(embedder.positions, embedder.dims, cluster.shard_bytes)
    return shard_refs(stored_shards.options(num_returns=len(bounds)).remote(model, bounds))


@ray.remote
def remove_shard(total: GaussianStats, part: GaussianStats) -> GaussianStats:
    """One position shard of `total` without `part`."""
    return remove_stats(total, part)


@ray.remote
def scoring_shard(stats: GaussianStats, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """One shard's mean and float32 precision, as finalize_shard stores them (the dtypes scoring reads)."""
    gaussians = finalize(stats, eps)
    return gaussians.mean.numpy(), gaussians.precision.numpy().astype(np.float32)


def without(total: list, part: list) -> list:
    """Per position shard, the ObjectRef of `total`'s statistics without `part`'s (removed in Ray tasks)."""
    return [remove_shard.remote(t, p) for t, p in zip(total, part)]


def held_out_scorer(model_config: ModelConfig, shards: list, device: torch.device) -> Scorer:
    """A Scorer of the Gaussians in `shards` (ObjectRefs of scoring_shard's outputs), built inside an actor."""
    parts = ray.get(shards)
    mean, precision = (np.concatenate([part[i] for part in parts]) for i in (0, 1))
    return Scorer.from_arrays(Embedder(model_config, device), mean, precision, SCORE)


def scorer_without(model_config: ModelConfig, stats: list) -> ScorerFactory:
    """A picklable ScorerFactory of the model whose statistics are `stats` (ObjectRefs per shard)."""
    shards = [scoring_shard.remote(s, model_config.eps) for s in stats]
    return functools.partial(held_out_scorer, model_config, shards)


@ray.remote(max_concurrency=2)  # one thread consumes, one answers progress()
class FrameScoreActor(SplitConsumer):
    """Scores its split of the frame stream and keeps each frame's score (unit, index, score)."""

    def __init__(self, make_scorer: ScorerFactory, sizes: dict[int, tuple[int, int]], threads: int):
        super().__init__(threads)
        self.scorer = make_scorer(self.device)
        self.sizes = sizes  # map size (H, W) per unit id: the input's own, as `score --map-size native`
        self.rows: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []

    def process(self, batch: dict) -> None:
        sizes = [self.sizes[int(uid)] for uid in batch["unit"]]
        for size in set(sizes):  # a batch may straddle inputs of different resolutions
            rows = np.array([i for i, s in enumerate(sizes) if s == size])
            maps = self.scorer.maps(batch["frame"][rows], size)  # (n, H, W) float32, as ScoreActor's
            self.rows.append((batch["unit"][rows], batch["index"][rows], maps.flatten(1).max(dim=1).values.cpu().numpy()))

    def result(self) -> list:
        return self.rows


def frame_scores(
    units: list[WorkUnit], make_scorer: ScorerFactory, image_size: int, cluster: ClusterConfig, shared: SharedJob | None = None
) -> list[np.ndarray]:
    """Every frame's score, per unit in frame order (float32), each frame scored exactly once.

    A lost actor stops the calibration (it is short): rerun it.
    """
    with shared.actor_slot if shared else contextlib.nullcontext():  # a many-scene job's actors take turns (accumulate.SharedJob)
        outcomes = _stream(units, make_scorer, image_size, cluster, Progress(sum(u.frames for u in units), "calibrate", shared.bar if shared else None))
    accounting = Accounting()
    for part, _ in outcomes:
        accounting = accounting.merge(part)
    accounting.check(units)
    return _per_unit(units, [row for _, rows in outcomes for row in rows])


def _stream(units: list[WorkUnit], make_scorer: ScorerFactory, image_size: int, cluster: ClusterConfig, progress: Progress) -> list:
    """Start scoring actors, stream the frames of `units` to them once; their outcomes, or the first failure raised."""
    plan = plan_actors(cluster)
    sizes = {u.uid: (u.height, u.width) for u in units}
    try:
        actors = start_actors(
            plan, lambda _, spec: FrameScoreActor.options(**spec.options()).remote(make_scorer, sizes, spec.threads), cluster, "calibration",
        )
        log.info("calibrate: %d actors (%s)", len(plan), describe_plan(plan))
        try:
            dataset_for = lambda credits: frames_dataset(units, image_size, 1, cluster.decode_batch, credits=credits)  # noqa: E731
            outcomes = stream_to_actors(dataset_for, actors, cluster, cluster.decode_batch, progress)
        finally:
            for actor in actors:
                ray.kill(actor)
    finally:
        progress.close()
    lost = [o for o in outcomes if isinstance(o, ray.exceptions.RayActorError) and not o.actor_init_failed]
    if lost:
        raise CalibrationError(f"lost {len(lost)} calibration scoring actor(s) ({first_line(lost[0])}); rerun the calibration")
    return raise_first_failure(outcomes)


def _per_unit(units: list[WorkUnit], rows: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> list[np.ndarray]:
    """The scores of each unit's frames, in frame order."""
    uid, index, score = (np.concatenate([row[i] for row in rows]) for i in range(3))
    order = np.lexsort((index, uid))
    uid, score = uid[order], score[order]
    return [score[uid == unit.uid].astype(np.float32) for unit in units]
