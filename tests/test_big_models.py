"""The sharded tree reduction of large models, at reduced positions: many shards, a deep tree, exact."""

from __future__ import annotations

import math

import numpy as np
import ray
import torch

from padim_ray.reduce import reduce_tree, shard_bounds
from padim_ray.gaussian import StatsAccumulator, finalize
from helpers import reference_gaussians, relative_error

GRID, DIMS = (6, 7), 12
PARTIALS, FAN_IN = 7, 2
SHARD_POSITIONS = 5  # positions per shard: 42 positions -> 9 shards


def tree_levels(partials: int, fan_in: int) -> int:
    """Levels of merge tasks reduce_tree builds for `partials` inputs."""
    levels = 0
    while partials > 1:
        partials, levels = math.ceil(partials / fan_in), levels + 1
    return levels


def put_partials(embeddings: np.ndarray, bounds: list[tuple[int, int]]) -> list[list]:
    """One accumulator per slice of `embeddings` (unequal sizes, a few batches each), each split into
    position shards put into the object store; returns refs[partial][shard]."""
    cuts = np.sort(np.random.default_rng(1).choice(np.arange(1, len(embeddings)), PARTIALS - 1, replace=False))
    refs = []
    for part in np.split(embeddings, cuts):
        accumulator = StatsAccumulator(GRID[0] * GRID[1], DIMS)
        for batch in np.array_split(part, 3):
            if len(batch):
                accumulator.update(torch.from_numpy(batch))
        refs.append([ray.put(accumulator.stats(start, stop)) for start, stop in bounds])
    return refs


def test_many_shards_deep_tree_equal_two_pass_reference(ray_local):
    positions = GRID[0] * GRID[1]
    bounds = shard_bounds(positions, DIMS, SHARD_POSITIONS * DIMS * DIMS * 8)
    assert len(bounds) == 9 and bounds[-1] == (40, 42)
    assert tree_levels(PARTIALS, FAN_IN) == 3  # 7 -> 4 -> 2 -> 1
    embeddings = np.random.default_rng(5).normal(1e4, 1.0, size=(157, DIMS, *GRID))  # mean = 1e4 x std
    refs = put_partials(embeddings, bounds)
    roots = [reduce_tree([part[s] for part in refs], FAN_IN) for s in range(len(bounds))]
    shards = ray.get(roots)
    assert [s.count for s in shards] == [len(embeddings)] * len(bounds)
    assert [s.positions for s in shards] == [stop - start for start, stop in bounds]
    mean, covariance = reference_gaussians(embeddings)
    assert relative_error(np.concatenate([s.mean.numpy() for s in shards]), mean) <= 1e-9
    finalized = np.concatenate([finalize(s, 0.01).covariance.numpy() for s in shards])
    assert relative_error(finalized, covariance) <= 1e-9
