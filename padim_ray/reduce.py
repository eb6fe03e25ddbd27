"""The reduction: position shards, a tree of merge tasks per shard, finalized shards written to the model store."""

from __future__ import annotations

import functools
import math

import ray
import torch

from padim_ray.gaussian import GaussianStats, finalize, merge_stats
from padim_ray.files import Location
from padim_ray.store import open_model, write_shard


def shard_bounds(positions: int, dims: int, shard_bytes: int) -> list[tuple[int, int]]:
    """Equal position ranges whose float64 M2 is at most `shard_bytes` each (at least one position)."""
    per_position = dims * dims * 8
    count = max(1, math.ceil(positions * per_position / shard_bytes))
    size = math.ceil(positions / count)
    return [(start, min(start + size, positions)) for start in range(0, positions, size)]


def per_shard(parts: list):
    """What a Ray call with num_returns=len(parts) returns: Ray stores a single return value as is."""
    return parts if len(parts) > 1 else parts[0]


def shard_refs(refs) -> list:
    """The ObjectRefs of a call made with num_returns=len(bounds), as a list also for one shard."""
    return refs if isinstance(refs, list) else [refs]


@ray.remote
def merge_partials(*partials: GaussianStats) -> GaussianStats:
    """One node of the reduction tree."""
    return functools.reduce(merge_stats, partials)


def reduce_tree(refs: list, fan_in: int):
    """Merge partials of one shard in a tree of Ray tasks; returns the root's ObjectRef."""
    while len(refs) > 1:
        groups = [refs[i : i + fan_in] for i in range(0, len(refs), fan_in)]
        refs = [merge_partials.remote(*group) if len(group) > 1 else group[0] for group in groups]  # a lone one waits
    return refs[0]


@ray.remote
def finalize_shard(stats: GaussianStats, root: Location, start: int, eps: float) -> int:
    """Finalize one shard (eq. 1) and write its chunks of the model store; returns its frame count."""
    gaussians = finalize(stats, eps)
    arrays = {
        "mean": gaussians.mean,
        "covariance": gaussians.covariance,
        "precision": gaussians.precision,
        "m2": stats.m2,
    }
    write_shard(root, start, {name: tensor.numpy() for name, tensor in arrays.items()})
    return stats.count


@ray.remote
def stored_shards(path: Location, bounds: list[tuple[int, int]]) -> list[GaussianStats] | GaussianStats:
    """A stored model's statistics (frames, mean, m2) split into position shards, for `update`."""
    store = open_model(path)
    frames = store.attributes.frames
    return per_shard([
        GaussianStats(frames, torch.from_numpy(store.read("mean", start, stop)), torch.from_numpy(store.read("m2", start, stop)))
        for start, stop in bounds
    ])
