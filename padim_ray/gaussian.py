"""Per-position Gaussian statistics: streaming update, exact merge, finalize, Mahalanobis distance.

Frames are folded into shifted float64 sums (StatsAccumulator); finished statistics are kept centred
(count, mean, M2 = sum of outer products of deviations) and combined with Chan et al.'s pairwise
formula, so a fit over any split of the frames equals a two-pass float64 computation even when
|mean| >> std; the same formula run backwards removes a part's statistics (calibration). No Ray, no
zarr: plain torch.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch

from padim_ray.config import UPDATE_BYTES


@dataclass
class GaussianStats:
    """Sufficient statistics of `count` embeddings at each of P positions with d dims."""

    count: int
    mean: torch.Tensor  # (P, d) float64
    m2: torch.Tensor  # (P, d, d) float64: sum_k (x_k - mean)(x_k - mean)^T

    @classmethod
    def empty(cls, positions: int, dims: int, device: torch.device | str = "cpu") -> GaussianStats:
        """Statistics of zero embeddings."""
        return cls(
            count=0,
            mean=torch.zeros(positions, dims, dtype=torch.float64, device=device),
            m2=torch.zeros(positions, dims, dims, dtype=torch.float64, device=device),
        )

    @classmethod
    def from_embeddings(cls, embeddings: torch.Tensor) -> GaussianStats:
        """Statistics of a batch of embeddings shaped (B, d, h, w); positions are row-major (h, w)."""
        accumulator = StatsAccumulator(embeddings[0, 0].numel(), embeddings.shape[1], embeddings.device)
        return accumulator.update(embeddings).stats()

    def __reduce__(self):
        # as numpy arrays, which Ray stores out of band: one copy of exactly these bytes into the object
        # store (torch would pickle a view's whole storage: every shard of an accumulator would carry all of it)
        return _stats_from_numpy, (self.count, self.mean.cpu().numpy(), self.m2.cpu().numpy())

    @property
    def positions(self) -> int:
        return self.mean.shape[0]

    @property
    def dims(self) -> int:
        return self.mean.shape[1]


def _stats_from_numpy(count: int, mean: np.ndarray, m2: np.ndarray) -> GaussianStats:
    with warnings.catch_warnings():  # arrays read from Ray's object store are read-only; merges never write them
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return GaussianStats(count, torch.from_numpy(mean), torch.from_numpy(m2))


class StatsAccumulator:
    """Streaming float64 sums of embeddings shifted by a fixed per-position reference.

    Each position keeps S1 = sum_k (x_k - K) and S2 = sum_k (x_k - K)(x_k - K)^T, where K is the
    first batch's mean; then mean = K + S1 / n and M2 = S2 - S1 S1^T / n. Because K is within a few
    standard deviations of the mean, the subtraction loses only a few ulps even when |mean| >> std,
    and a batch costs one subtraction, one sum and one batched rank-B update: no per-batch mean and
    no rank-1 correction (Chan's merge is kept for combining finished statistics).
    """

    def __init__(self, positions: int, dims: int, device: torch.device | str = "cpu", update_bytes: int = UPDATE_BYTES):
        self.count = 0
        self.update_bytes = update_bytes
        self.shift = torch.zeros(positions, 1, dims, dtype=torch.float64, device=device)  # K, (P, 1, d)
        self.sum = torch.zeros(positions, dims, dtype=torch.float64, device=device)  # S1, (P, d)
        self.sum_outer = torch.zeros(positions, dims, dims, dtype=torch.float64, device=device)  # S2, (P, d, d)
        self._widened = None  # float64 copy of the latest slice of positions, reused: see update

    @property
    def dims(self) -> int:
        return self.sum.shape[1]

    def state(self) -> dict[str, np.ndarray]:
        """The accumulator as numpy arrays (CPU), for a checkpoint; see from_state."""
        return {"count": np.array(self.count), **{name: getattr(self, name).cpu().numpy() for name in ("shift", "sum", "sum_outer")}}

    @classmethod
    def from_state(cls, state, device: torch.device | str = "cpu") -> StatsAccumulator:
        """An accumulator holding a saved `state()`."""
        accumulator = cls.__new__(cls)
        accumulator.count = int(state["count"])
        accumulator.update_bytes, accumulator._widened = UPDATE_BYTES, None
        for name in ("shift", "sum", "sum_outer"):
            setattr(accumulator, name, torch.as_tensor(np.asarray(state[name]), device=device))
        return accumulator

    def update(self, embeddings: torch.Tensor) -> StatsAccumulator:
        """Fold a batch (B, d, h, w) in place; returns self.

        In place so that the accumulator of a large model (WR50-Rd550: 10 GB) is never copied. The
        Embedder's output is a view of positions-major memory, so the permute below copies nothing.
        Positions are folded a slice at a time, each slice widened to float64 in at most
        `update_bytes`: the whole batch in float64 (R18-Rd100, 32 frames: 105 MB) would be held
        by every stats actor for the whole fit. Positions are independent, so slicing changes no bit.
        """
        batch, dims = embeddings.shape[:2]
        if dims != self.dims:
            raise ValueError(f"embeddings have {dims} dims, statistics have {self.dims}")
        x = embeddings.reshape(batch, dims, -1).permute(2, 0, 1)  # (P, B, d)
        step = max(1, self.update_bytes // (batch * dims * 8))
        for start in range(0, len(x), step):
            stop = start + step
            widened = self._widen(x[start:stop])  # float32 inputs widen exactly
            if self.count == 0:
                self.shift[start:stop] = widened.mean(dim=1, keepdim=True)
            shifted = widened.sub_(self.shift[start:stop])  # (p, B, d) float64
            self.sum[start:stop].add_(shifted.sum(dim=1))
            self.sum_outer[start:stop].baddbmm_(shifted.transpose(1, 2), shifted)  # batched rank-B update, (p, d, d)
        self.count += batch
        return self

    def _widen(self, x: torch.Tensor) -> torch.Tensor:
        """`x` copied to float64 into memory kept across slices and batches.

        A fresh float64 tensor cost page faults on every batch, and torch's mixed-dtype subtraction
        is slow: copy then subtract in place took 11 ms per batch of 32 on CPU where
        `torch.sub(x, shift)` took 70 (scripts/profile_actor.py).
        """
        if self._widened is None or self._widened.numel() < x.numel() or self._widened.device != x.device:
            self._widened = torch.empty(x.numel(), dtype=torch.float64, device=x.device)
        return self._widened[: x.numel()].view(x.shape).copy_(x)

    def stats(self, start: int = 0, stop: int | None = None, in_place: bool = False) -> GaussianStats:
        """The statistics of positions [start, stop), as contiguous CPU tensors.

        With `in_place`, M2 is computed over the sums' own memory and returned as a view (on CPU), so
        a finished accumulator is not copied (WR50-Rd550: 10 GB); those positions of the accumulator
        are spent: take each range once, and update no more.
        """
        total = self.sum[start:stop]  # (p, d)
        mean = self.shift[start:stop, 0] + total / max(self.count, 1)
        outer = self.sum_outer[start:stop] if in_place else self.sum_outer[start:stop].clone()
        m2 = outer.baddbmm_(total.unsqueeze(2), total.unsqueeze(1), alpha=-1 / max(self.count, 1))  # S2 - S1 S1^T / n
        return GaussianStats(count=self.count, mean=mean.cpu().contiguous(), m2=m2.cpu().contiguous())


def merge_stats(a: GaussianStats, b: GaussianStats) -> GaussianStats:
    """Chan's pairwise merge: M2 = M2a + M2b + delta delta^T * na*nb/n. Associative and commutative."""
    if a.mean.shape != b.mean.shape:
        raise ValueError(f"cannot merge statistics of shapes {tuple(a.mean.shape)} and {tuple(b.mean.shape)}")
    if a.count == 0:
        return b
    if b.count == 0:
        return a
    count = a.count + b.count
    delta = b.mean - a.mean  # (P, d)
    mean = a.mean + delta * (b.count / count)
    m2 = torch.add(a.m2, b.m2)  # the one new (P, d, d) tensor: inputs may be read-only views of Ray's object store
    m2.baddbmm_(delta.unsqueeze(2), delta.unsqueeze(1), alpha=a.count * b.count / count)  # batched rank-1, in place
    return GaussianStats(count=count, mean=mean, m2=m2)


def remove_stats(total: GaussianStats, part: GaussianStats) -> GaussianStats:
    """The statistics of the embeddings of `total` that are not in `part`: Chan's merge run backwards.

    With n = n_total - n_part and d = mean_part - mean_total: mean = mean_total - d * n_part / n and
    M2 = M2_total - M2_part - d d^T * n_total * n_part / n, so merge_stats(result, part) == total.
    Exact in float64 up to rounding (the cancellation is relative to M2_total); `part` must be a subset of `total`.
    """
    if total.mean.shape != part.mean.shape:
        raise ValueError(f"cannot remove statistics of shape {tuple(part.mean.shape)} from statistics of shape {tuple(total.mean.shape)}")
    if part.count == 0:
        return total
    count = total.count - part.count
    if count < 1:
        raise ValueError(f"cannot remove {part.count} embeddings from statistics of {total.count}: nothing would be left")
    delta = part.mean - total.mean  # (P, d)
    mean = total.mean - delta * (part.count / count)
    m2 = torch.sub(total.m2, part.m2)  # one new (P, d, d) tensor: inputs may be read-only views of Ray's object store
    m2.baddbmm_(delta.unsqueeze(2), delta.unsqueeze(1), alpha=-total.count * part.count / count)
    return GaussianStats(count=count, mean=mean, m2=m2)


@dataclass
class Gaussians:
    """One Gaussian per position: eq. (1) of the paper."""

    mean: torch.Tensor  # (P, d) float64
    covariance: torch.Tensor  # (P, d, d) float64, includes eps * I
    precision: torch.Tensor  # (P, d, d) float64, inverse of covariance


def finalize(stats: GaussianStats, eps: float) -> Gaussians:
    """Sigma = M2 / (N - 1) + eps * I and its inverse (eq. 1)."""
    if stats.count < 2:
        raise ValueError(f"a covariance needs at least 2 embeddings, got {stats.count}")
    eye = torch.eye(stats.dims, dtype=torch.float64, device=stats.m2.device)
    covariance = stats.m2 / (stats.count - 1) + eps * eye
    precision = torch.linalg.inv(covariance)
    return Gaussians(mean=stats.mean, covariance=covariance, precision=precision)


def mahalanobis(embeddings: torch.Tensor, mean: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    """Distance of each embedding to its position's Gaussian (eq. 2).

    Args:
        embeddings: (B, d, h, w).
        mean: (P, d) with P = h * w.
        precision: (P, d, d).
    Returns:
        (B, h, w) distances in the embeddings' dtype.
    """
    batch, dims, height, width = embeddings.shape
    dtype = embeddings.dtype
    x = embeddings.reshape(batch, dims, -1).permute(2, 0, 1)  # (P, B, d)
    delta = x - mean.to(dtype).unsqueeze(1)  # (P, B, d)
    projected = torch.bmm(delta, precision.to(dtype))  # (P, B, d)
    squared = (projected * delta).sum(dim=2).clamp_min(0)  # (P, B)
    return squared.sqrt().permute(1, 0).reshape(batch, height, width)
