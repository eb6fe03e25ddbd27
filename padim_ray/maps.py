"""Distances to anomaly maps: bilinear upsampling and Gaussian blur as two small matmuls per map.

No Ray, no storage: plain torch, so the maths can be checked on any device on its own
(scripts/check_cuda.py).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from padim_ray.errors import PadimError


def gaussian_kernel(sigma: float, truncate: float) -> torch.Tensor:
    """Normalised 1-D Gaussian taps, radius round(truncate * sigma) as in scipy.ndimage."""
    radius = int(truncate * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return (kernel / kernel.sum()).float()


def anomaly_maps(
    distances: torch.Tensor, size: tuple[int, int], kernel: torch.Tensor, blur_size: tuple[int, int] | None = None
) -> torch.Tensor:
    """Upsample (B, h, w) distances bilinearly (align_corners=False) to `blur_size`, blur separably,
    then resize bilinearly to `size` (when `blur_size` is None or equal, maps are blurred at `size`)."""
    blur_size = blur_size or size
    taps = tuple(kernel.tolist())
    rows = axis_operator(distances.shape[1], blur_size[0], size[0], taps).to(distances.device, distances.dtype)
    columns = axis_operator(distances.shape[2], blur_size[1], size[1], taps).to(distances.device, distances.dtype)
    return rows @ distances @ columns.T  # (H, h) @ (B, h, w) @ (w, W) -> (B, H, W)


@functools.lru_cache(maxsize=64)
def axis_operator(length: int, blur_length: int, out_length: int, taps: tuple[float, ...]) -> torch.Tensor:
    """The (out_length, length) matrix of upsample -> blur (reflect padding) -> resize along one axis.

    Every step is linear and acts on each axis alone, so a whole map is two small matmuls with these
    matrices, instead of interpolating, padding and convolving full-size images (180 -> ~30 ms per
    32 maps at 768x576 here). Built by pushing unit impulses through the steps in float64.
    """
    radius = len(taps) // 2
    if radius >= blur_length:
        raise PadimError(f"a blur of radius {radius} px needs maps larger than {blur_length} px; use a larger --image-size")
    x = torch.eye(length, dtype=torch.float64).unsqueeze(1)  # (length impulses, 1, length)
    x = F.interpolate(x, size=blur_length, mode="linear", align_corners=False)
    x = F.conv1d(F.pad(x, (radius, radius), mode="reflect"), torch.tensor(taps, dtype=torch.float64).view(1, 1, -1))
    if blur_length != out_length:
        x = F.interpolate(x, size=out_length, mode="linear", align_corners=False)
    return x.squeeze(1).T.float()  # (out_length, length)
