"""The distributed fit: frames -> stats actors -> tree reduction per position shard -> model store."""

from __future__ import annotations

import functools
import logging
import math
import time
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Callable

import numpy as np
import ray
import torch

from padim_ray.accounting import Accounting, FrameAccountingError
from padim_ray.config import ClusterConfig, ModelConfig
from padim_ray.embedding import Embedder
from padim_ray.errors import PadimError
from padim_ray.gaussian import GaussianStats, StatsAccumulator, finalize, merge_stats
from padim_ray.runtime import SplitConsumer, connect, describe_plan, plan_actors, stream_to_actors, user_errors
from padim_ray.store import create_model_store, publish, set_model_attributes, staged_output, write_shard
from padim_ray.video import WorkUnit, expand_inputs, frames_dataset, make_units

log = logging.getLogger(__name__)

# (device) -> (frames batch) -> embeddings (B, d, h, w); picklable, built once inside each actor
EmbedderFactory = Callable[[torch.device], Callable[[np.ndarray], torch.Tensor]]


@ray.remote(max_concurrency=2)  # one thread consumes, one answers progress()
class StatsActor(SplitConsumer):
    """Embeds its split of the frame stream and accumulates per-position statistics locally."""

    def __init__(self, make_embedder: EmbedderFactory, positions: int, dims: int, threads: int):
        torch.set_num_threads(threads)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # Ray may set CUDA_VISIBLE_DEVICES on CPU nodes
        self.embed = make_embedder(device)
        self.accumulator = StatsAccumulator(positions, dims, device)

    def process(self, batch: dict) -> None:
        self.accumulator.update(self.embed(batch["frame"]))

    def result(self) -> int:
        return self.accumulator.count  # what the statistics hold, checked against the decoder

    def shards(self, bounds: list[tuple[int, int]]) -> list[GaussianStats] | GaussianStats:
        parts = [self.accumulator.stats(start, stop, in_place=True) for start, stop in bounds]  # called once, at the end
        return parts if len(parts) > 1 else parts[0]  # Ray stores a single return value as is


def shard_bounds(positions: int, dims: int, shard_bytes: int) -> list[tuple[int, int]]:
    """Equal position ranges whose float64 M2 is at most `shard_bytes` each (at least one position)."""
    per_position = dims * dims * 8
    count = max(1, math.ceil(positions * per_position / shard_bytes))
    size = math.ceil(positions / count)
    return [(start, min(start + size, positions)) for start in range(0, positions, size)]


@ray.remote
def merge_partials(*partials: GaussianStats) -> GaussianStats:
    """One node of the reduction tree."""
    return functools.reduce(merge_stats, partials)


def reduce_tree(refs: list, fan_in: int):
    """Merge partials of one shard in a tree of Ray tasks; returns the root's ObjectRef."""
    if fan_in < 2:
        raise PadimError(f"--fan-in must be at least 2, got {fan_in}")
    while len(refs) > 1:
        refs = [merge_partials.remote(*refs[i : i + fan_in]) for i in range(0, len(refs), fan_in)]
    return refs[0]


def accumulate(
    dataset,
    make_embedder: EmbedderFactory,
    positions: int,
    dims: int,
    cluster: ClusterConfig,
    expected_frames: int | None = None,
) -> tuple[list, list[tuple[int, int]], Accounting]:
    """Stream `dataset` (columns frame, unit, unit_total) through stats actors.

    Returns:
        One reduced ObjectRef of GaussianStats per position shard, the shard bounds, and the
        merged accounting. Only the caller owns the refs; the driver never fetches them.
    """
    plan = plan_actors(cluster)
    bounds = shard_bounds(positions, dims, cluster.shard_bytes)
    actors = [StatsActor.options(**spec.options()).remote(make_embedder, positions, dims, spec.threads) for spec in plan]
    log.info("fit: %d actors (%s), %d position shards", len(plan), describe_plan(plan), len(bounds))
    try:
        accounting, counts = stream_to_actors(dataset, actors, cluster.batch_size, expected_frames, "fit")
        if sum(counts) != accounting.count:
            raise FrameAccountingError(f"statistics hold {sum(counts)} frames, the actors counted {accounting.count}")
        per_actor = [actor.shards.options(num_returns=len(bounds)).remote(bounds) for actor in actors]
        per_actor = [refs if isinstance(refs, list) else [refs] for refs in per_actor]
        ray.wait([ref for refs in per_actor for ref in refs], num_returns=len(bounds) * len(actors), fetch_local=False)
    finally:
        for actor in actors:  # the shards live on in the object store, owned by this driver
            ray.kill(actor)
    roots = [reduce_tree([refs[s] for refs in per_actor], cluster.fan_in) for s in range(len(bounds))]
    return roots, bounds, accounting


@ray.remote
def finalize_shard(stats: GaussianStats, staging: str, start: int, eps: float) -> int:
    """Finalize one shard (eq. 1) and write its chunks of the model store; returns its frame count."""
    gaussians = finalize(stats, eps)
    arrays = {
        "mean": gaussians.mean,
        "covariance": gaussians.covariance,
        "precision": gaussians.precision,
        "m2": stats.m2,
    }
    write_shard(Path(staging), start, {name: tensor.numpy() for name, tensor in arrays.items()})
    return stats.count


@dataclass
class FitResult:
    out: Path
    frames: int
    seconds: float


def fit_model(
    inputs: list[str | Path],
    out: str | Path,
    model: ModelConfig = ModelConfig(),
    cluster: ClusterConfig = ClusterConfig(),
    overwrite: bool = False,
    address: str | None = None,
) -> FitResult:
    """Fit one Gaussian per patch position on every frame of `inputs` and write the model store `out`."""
    started = time.monotonic()
    out = Path(out)
    if model.frame_stride < 1:
        raise PadimError(f"--frame-stride must be at least 1, got {model.frame_stride}")
    units, estimate = make_units(expand_inputs(list(inputs)))
    embedder = Embedder(model)  # checks backbone, dims and weights here, before any cluster work
    with staged_output(out, overwrite) as staging, user_errors():
        connect(address)
        ray.data.DataContext.get_current().enable_progress_bars = False  # ours below counts frames
        dataset = frames_dataset(units, model.image_size, model.frame_stride, cluster.decode_batch)
        make_embedder = functools.partial(Embedder, model)
        roots, bounds, accounting = accumulate(
            dataset, make_embedder, embedder.positions, embedder.dims, cluster, math.ceil(estimate / model.frame_stride)
        )
        frames = accounting.check(units)
        create_model_store(staging, embedder.positions, embedder.dims, bounds[0][1] - bounds[0][0])
        counts = ray.get([finalize_shard.remote(root, str(staging), start, model.eps) for root, (start, _) in zip(roots, bounds)])
        if set(counts) != {frames}:
            raise FrameAccountingError(f"reduced shards hold {sorted(set(counts))} frames, the inputs decoded to {frames}")
        set_model_attributes(staging, _attributes(model, embedder, units, accounting))
        publish(staging, out, overwrite)
    seconds = time.monotonic() - started
    log.info("fit: %d frames in %.1f s -> %s", frames, seconds, out)
    return FitResult(out=out, frames=frames, seconds=seconds)


def _attributes(model: ModelConfig, embedder: Embedder, units: list[WorkUnit], accounting: Accounting) -> dict:
    spec = embedder.spec
    return {
        "package_version": version("padim-ray"),
        "config": {**model.to_dict(), "dims": embedder.dims},
        "backbone": spec.name,
        "weights_identity": embedder.weights_identity,
        "stages": list(spec.stages),
        "stage_channels": list(spec.channels),
        "normalization": {"mean": list(spec.mean), "std": list(spec.std)},
        "image_size": model.image_size,
        "grid": list(embedder.grid),
        "dims": embedder.dims,
        "channel_indices": embedder.channel_indices.tolist(),
        "eps": model.eps,
        "frames": accounting.count,
        "sources": [
            {"path": u.path, "start": u.start, "stop": u.stop, "frames": accounting.totals[u.uid]} for u in units
        ],
    }
