"""Calibration: removing a slice's statistics exactly (Chan's merge run backwards), scoring footage with the
model without it, and the record `fit --calibration` and `padim-ray calibrate` store in the model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from padim_ray.gaussian import GaussianStats, finalize, merge_stats, remove_stats
from helpers import reference_gaussians, relative_error


def _embeddings(seed: int, n: int, loc: float) -> np.ndarray:
    return np.random.default_rng(seed).normal(loc, 1.0, size=(n, 5, 3, 4))  # (N, d, h, w)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**31), st.integers(2, 60), st.integers(1, 60), st.sampled_from([0.0, 3.0, 1e4]))
def test_removal_equals_the_statistics_of_the_rest(seed, kept, removed, loc):
    """Removing a part's statistics leaves those of the other embeddings, and merging the part back gives the total."""
    x = _embeddings(seed, kept + removed, loc)
    order = np.random.default_rng(seed + 1).permutation(len(x))  # the part is any subset, not a tail
    rest, part = x[order[:kept]], x[order[kept:]]
    total = GaussianStats.from_embeddings(torch.from_numpy(x))
    left = remove_stats(total, GaussianStats.from_embeddings(torch.from_numpy(part)))
    direct = GaussianStats.from_embeddings(torch.from_numpy(rest))
    assert left.count == kept and left.mean.dtype == left.m2.dtype == torch.float64
    scale = np.abs(direct.mean.numpy()).max()
    assert np.abs(left.mean.numpy() - direct.mean.numpy()).max() <= 1e-12 * scale
    # M2's rounding is relative to the total's M2 (the cancellation), and a tiny rest has a tiny M2
    assert np.abs(left.m2.numpy() - direct.m2.numpy()).max() <= 1e-9 * np.abs(total.m2.numpy()).max()
    if kept >= 2:
        mean, covariance = reference_gaussians(rest)
        assert relative_error(finalize(left, 0.01).covariance.numpy(), covariance) <= 1e-9
    back = merge_stats(left, GaussianStats.from_embeddings(torch.from_numpy(part)))
    assert relative_error(back.m2.numpy(), total.m2.numpy()) <= 1e-12


def test_removal_needs_a_smaller_part_of_the_same_shape():
    total = GaussianStats.from_embeddings(torch.from_numpy(_embeddings(0, 10, 0.0)))
    assert remove_stats(total, GaussianStats.empty(12, 5)) is total
    with pytest.raises(ValueError, match="nothing would be left"):
        remove_stats(total, total)
    with pytest.raises(ValueError, match="cannot remove statistics of shape"):
        remove_stats(total, GaussianStats.empty(12, 4))
