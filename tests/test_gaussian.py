"""Statistics: exactness against a numpy float64 two-pass reference, merge algebra, Mahalanobis."""

import pickle

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from padim_ray.gaussian import GaussianStats, StatsAccumulator, finalize, mahalanobis, merge_stats
from helpers import reference_gaussians, relative_error


def _embeddings(rng, n, d=6, h=3, w=4, loc=0.0, scale=1.0):
    return rng.normal(loc, scale, size=(n, d, h, w))


@pytest.mark.parametrize("loc", [0.0, 1e4])  # 1e4: mean is 1e4 times the standard deviation
def test_streaming_fit_equals_two_pass_reference(loc):
    rng = np.random.default_rng(0)
    embeddings = _embeddings(rng, 500, loc=loc)
    accumulator = StatsAccumulator(12, 6)
    for batch in np.array_split(embeddings, [7, 8, 100, 333]):  # uneven batches, one of size 1
        accumulator.update(torch.from_numpy(batch))
    stats = accumulator.stats()
    gaussians = finalize(stats, eps=0.01)
    mean, covariance = reference_gaussians(embeddings)
    assert stats.count == 500
    assert relative_error(gaussians.mean.numpy(), mean) <= 1e-9
    assert relative_error(gaussians.covariance.numpy(), covariance) <= 1e-9
    identity = np.broadcast_to(np.eye(6), covariance.shape)
    assert relative_error(gaussians.covariance.numpy() @ gaussians.precision.numpy(), identity) <= 1e-9


def test_float32_embeddings_are_accumulated_in_float64():
    rng = np.random.default_rng(1)
    embeddings = _embeddings(rng, 300, loc=1e4).astype(np.float32)
    accumulator = StatsAccumulator(12, 6)
    for batch in np.array_split(embeddings, 9):
        accumulator.update(torch.from_numpy(batch))
    stats = accumulator.stats()
    mean, covariance = reference_gaussians(embeddings)  # same float32 values, widened
    assert relative_error(finalize(stats, 0.01).covariance.numpy(), covariance) <= 1e-9
    assert relative_error(stats.mean.numpy(), mean) <= 1e-12


def test_folding_positions_in_slices_changes_no_bit():
    rng = np.random.default_rng(5)
    embeddings = torch.from_numpy(_embeddings(rng, 64, loc=50.0).astype(np.float32))
    one_position = 8 * 6 * 8  # bytes of one position of an 8-frame batch in float64
    sliced, whole = StatsAccumulator(12, 6, update_bytes=5 * one_position), StatsAccumulator(12, 6, update_bytes=2**30)
    for batch in embeddings.split(8):
        sliced.update(batch), whole.update(batch)
    assert sliced._widened.numel() == 5 * 8 * 6  # the slice, not the batch, was widened
    for name in ("shift", "sum", "sum_outer"):
        np.testing.assert_array_equal(getattr(sliced, name).numpy(), getattr(whole, name).numpy())


def test_shard_statistics_equal_the_whole():
    rng = np.random.default_rng(2)
    accumulator = StatsAccumulator(12, 6).update(torch.from_numpy(_embeddings(rng, 40, loc=3.0)))
    whole = accumulator.stats()
    part = accumulator.stats(5, 9)
    assert part.count == 40 and part.positions == 4
    np.testing.assert_array_equal(part.mean.numpy(), whole.mean[5:9].numpy())
    np.testing.assert_array_equal(part.m2.numpy(), whole.m2[5:9].numpy())
    spent = [accumulator.stats(0, 5, in_place=True), accumulator.stats(5, 12, in_place=True)]  # no copy of the sums
    assert np.shares_memory(spent[1].m2.numpy(), accumulator.sum_outer.numpy())
    np.testing.assert_array_equal(np.concatenate([s.m2.numpy() for s in spent]), whole.m2.numpy())
    np.testing.assert_array_equal(np.concatenate([s.mean.numpy() for s in spent]), whole.mean.numpy())
    restored = pickle.loads(pickle.dumps(spent[0], protocol=5))  # as Ray stores it: numpy, only the shard's bytes
    np.testing.assert_array_equal(restored.m2.numpy(), whole.m2[:5].numpy())
    assert len(pickle.dumps(spent[0], protocol=5)) < accumulator.sum_outer.numpy().nbytes


def _stats_of(seed: int, n: int, loc: float) -> GaussianStats:
    rng = np.random.default_rng(seed)
    return GaussianStats.from_embeddings(torch.from_numpy(_embeddings(rng, n, d=3, h=2, w=2, loc=loc)))


def _assert_close(a: GaussianStats, b: GaussianStats) -> None:
    assert a.count == b.count
    assert relative_error(a.mean.numpy(), b.mean.numpy()) <= 1e-12
    assert relative_error(a.m2.numpy(), b.m2.numpy()) <= 1e-10


sizes = st.integers(min_value=1, max_value=40)
seeds = st.integers(min_value=0, max_value=2**31)
locs = st.sampled_from([0.0, 3.0, 1e4])


@settings(max_examples=40, deadline=None)
@given(seeds, sizes, sizes, sizes, locs)
def test_merge_is_associative(seed, na, nb, nc, loc):
    a, b, c = _stats_of(seed, na, loc), _stats_of(seed + 1, nb, loc), _stats_of(seed + 2, nc, loc)
    _assert_close(merge_stats(merge_stats(a, b), c), merge_stats(a, merge_stats(b, c)))


@settings(max_examples=40, deadline=None)
@given(seeds, sizes, sizes, locs)
def test_merge_is_commutative_and_equals_one_pass(seed, na, nb, loc):
    rng = np.random.default_rng(seed)
    x = _embeddings(rng, na + nb, d=3, h=2, w=2, loc=loc)
    a = GaussianStats.from_embeddings(torch.from_numpy(x[:na]))
    b = GaussianStats.from_embeddings(torch.from_numpy(x[na:]))
    _assert_close(merge_stats(a, b), merge_stats(b, a))
    _assert_close(merge_stats(a, b), GaussianStats.from_embeddings(torch.from_numpy(x)))


def test_merge_with_empty_is_identity_and_shapes_must_match():
    a = _stats_of(0, 5, 0.0)
    _assert_close(merge_stats(a, GaussianStats.empty(4, 3)), a)
    with pytest.raises(ValueError, match="cannot merge"):
        merge_stats(a, GaussianStats.empty(4, 2))


def test_finalize_needs_two_embeddings():
    with pytest.raises(ValueError, match="at least 2"):
        finalize(_stats_of(0, 1, 0.0), eps=0.01)


def test_mahalanobis_equals_numpy_reference():
    rng = np.random.default_rng(3)
    train, test = _embeddings(rng, 200), _embeddings(rng, 5)
    gaussians = finalize(GaussianStats.from_embeddings(torch.from_numpy(train)), 0.01)
    distances = mahalanobis(torch.from_numpy(test), gaussians.mean, gaussians.precision).numpy()  # (B, h, w)
    mean, covariance = reference_gaussians(train)
    x = test.reshape(5, 6, -1).transpose(0, 2, 1)  # (B, P, d)
    delta = x - mean
    expected = np.sqrt(np.einsum("bpi,pij,bpj->bp", delta, np.linalg.inv(covariance), delta)).reshape(5, 3, 4)
    assert relative_error(distances, expected) <= 1e-9
