"""Frames -> PaDiM embeddings: resize, normalise, three CNN stages, random channel subset, concat."""

from __future__ import annotations

import logging
import threading
from contextlib import contextmanager
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from padim_ray.backbones import BackboneSpec, get_backbone, load_weights
from padim_ray.config import ModelConfig
from padim_ray.errors import PadimError

log = logging.getLogger(__name__)

# torch.fx tracing (create_feature_extractor) patches nn.Module.__call__ process-wide while it runs:
# a forward in another thread then fails ("module is not installed as a submodule"). Embedders are
# built one at a time (e.g. by the concurrent scenes of `fit stc --scene all`).
_BUILD_LOCK = threading.Lock()


def resize_frames(frames: torch.Tensor, size: int) -> torch.Tensor:
    """Resize uint8 frames (B, H, W, 3) to (B, size, size, 3), aspect not kept, antialiased bilinear."""
    if frames.shape[1:3] == (size, size):
        return frames
    x = frames.permute(0, 3, 1, 2).float()  # (B, 3, H, W)
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return x.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()  # (B, S, S, 3)


def select_channels(total: int, dims: int, seed: int) -> np.ndarray:
    """The paper's random subset "Rd": `dims` of `total` channel indices, sorted, fixed by `seed`."""
    if not 0 < dims <= total:
        raise PadimError(f"--dims must be between 1 and {total} for this backbone, got {dims}")
    generator = torch.Generator().manual_seed(seed)
    return np.sort(torch.randperm(total, generator=generator)[:dims].numpy())


def fold_batch_norms(extractor: nn.Module) -> nn.Module:
    """Fold every eval-mode BatchNorm into the convolution before it (torch.fx), where tracing allows.

    Same features up to float rounding (~1e-6 relative), 10-15% faster for ResNet18 on CPU here.
    Models with data-dependent control flow (timm's EfficientNet-Lite0) cannot be traced: kept as is.
    """
    from torch.fx.experimental.optimization import fuse

    try:
        return fuse(extractor, inplace=True)  # inplace: a deepcopy of the feature extractor resets eval mode
    except torch.fx.proxy.TraceError:
        log.debug("%s cannot be traced; batch norms stay unfolded", type(extractor).__name__)
        return extractor


def feature_extractor(model: nn.Module, stages: tuple[str, ...]) -> nn.Module:
    """`model` traced to return the outputs of `stages` (torch.fx): with timm's extractor for timm's models
    (it knows their untraceable layers), torchvision's for the others (importing timm costs an actor 0.7 s)."""
    if type(model).__module__.startswith("timm."):
        from timm.layers import create_feature_extractor
    else:
        from torchvision.models.feature_extraction import create_feature_extractor
    return create_feature_extractor(model, return_nodes={s: s for s in stages})


class Embedder(nn.Module):
    """Turns uint8 frames into embeddings (B, d, h, w) on a fixed grid."""

    def __init__(self, config: ModelConfig, device: torch.device | str = "cpu"):
        super().__init__()
        self.spec: BackboneSpec = get_backbone(config.backbone)
        self.image_size = config.image_size
        dims = config.dims or self.spec.default_dims
        self.channel_indices = select_channels(self.spec.total_channels, dims, config.seed)
        model, self.weights_identity = load_weights(self.spec, config.weights, config.seed)
        with _BUILD_LOCK:
            self.extractor = fold_batch_norms(feature_extractor(model, self.spec.stages).eval())
        self.device = torch.device(device)
        self.dtype = config.backbone_dtype
        offsets = np.cumsum((0,) + self.spec.channels)
        self.stage_channels = [  # indices within each stage, in the sorted global order, on the device once
            torch.as_tensor(self.channel_indices[(self.channel_indices >= lo) & (self.channel_indices < hi)] - lo, device=self.device)
            for lo, hi in zip(offsets[:-1], offsets[1:])
        ]
        self.register_buffer("mean", torch.tensor(self.spec.mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(self.spec.std).view(1, 3, 1, 1))
        # channels_last: frames arrive as (B, H, W, 3), and both oneDNN (CPU, ~12% faster here) and
        # cuDNN's tensor-core kernels prefer it
        self.to(device, memory_format=torch.channels_last)
        with _BUILD_LOCK, torch.inference_mode():
            probe = torch.zeros(1, 3, self.image_size, self.image_size, device=self.device)
            self.grid: tuple[int, int] = tuple(self.extractor(probe)[self.spec.stages[0]].shape[-2:])

    @property
    def dims(self) -> int:
        return len(self.channel_indices)

    @property
    def positions(self) -> int:
        return self.grid[0] * self.grid[1]

    @torch.inference_mode()
    def forward(self, frames: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Embed uint8 RGB frames (B, H, W, 3); returns float32 (B, d, h, w) on self.device.

        The result is a view of positions-major memory (h, w, B, d), the layout the statistics and
        the Mahalanobis distance work in, so neither has to transpose it.
        """
        frames = torch.as_tensor(frames)
        if frames.ndim != 4 or frames.shape[-1] != 3:
            raise PadimError(f"frames must be (B, H, W, 3) RGB, got shape {tuple(frames.shape)}")
        if self.device.type == "cuda" and frames.device.type == "cpu":
            frames = frames.pin_memory()  # so that the copy below does not block the host
        frames = resize_frames(frames.to(self.device, non_blocking=True), self.image_size)
        x = frames.permute(0, 3, 1, 2).float().div_(255)  # (B, 3, S, S), channels_last strides
        x = ((x - self.mean) / self.std).contiguous(memory_format=torch.channels_last)
        with backbone_arithmetic(self.device, self.dtype):
            features = self.extractor(x)
        batch, (height, width) = len(x), features[self.spec.stages[0]].shape[-2:]
        out = torch.empty(height, width, batch, self.dims, device=self.device)  # (h, w, B, d)
        offset = 0
        for stage, channels in zip(self.spec.stages, self.stage_channels):
            if len(channels):  # select before upsampling: each chosen channel belongs to one stage
                part = features[stage][:, channels].float()  # (B, c_s, h_s, w_s)
                _place_upsampled(out[..., offset : offset + len(channels)], part)
                offset += len(channels)
        return out.permute(2, 3, 0, 1)  # (B, d, h, w), a view


@contextmanager
def backbone_arithmetic(device: torch.device, dtype: str) -> Iterator[None]:
    """The backbone's arithmetic for ModelConfig.backbone_dtype: bfloat16 autocast, or strict float32.

    Strict float32 turns off cuDNN's TF32 convolutions (10-bit mantissa, on by default in torch),
    so that a model's float32 embeddings agree across devices to float32 rounding.
    """
    if dtype == "bfloat16":
        with torch.autocast(device.type, dtype=torch.bfloat16):
            yield
        return
    saved = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = saved


def _place_upsampled(out: torch.Tensor, part: torch.Tensor) -> None:
    """Write `part` (B, c, h_s, w_s), nearest-upsampled to the grid, into `out` (h, w, B, c).

    Where the grid is a whole multiple of the stage's map, nearest upsampling repeats each cell:
    broadcasting into a (h_s, f, w_s, f, B, c) view does that with no intermediate copy.
    """
    height, width = out.shape[:2]
    part_height, part_width = part.shape[-2:]
    if height % part_height or width % part_width:
        part = F.interpolate(part, size=(height, width), mode="nearest")
        out.copy_(part.permute(2, 3, 0, 1))  # (h, w, B, c)
        return
    fy, fx = height // part_height, width // part_width
    cells = out.view(part_height, fy, width // fx, fx, *out.shape[2:])  # (h_s, fy, w_s, fx, B, c)
    cells.copy_(part.permute(2, 3, 0, 1)[:, None, :, None])
