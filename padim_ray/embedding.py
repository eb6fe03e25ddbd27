"""Frames -> PaDiM embeddings: resize, normalise, three CNN stages, random channel subset, concat."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from padim_ray.backbones import BackboneSpec, get_backbone, load_weights
from padim_ray.config import ModelConfig
from padim_ray.errors import PadimError


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


class Embedder(nn.Module):
    """Turns uint8 frames into embeddings (B, d, h, w) on a fixed grid."""

    def __init__(self, config: ModelConfig, device: torch.device | str = "cpu"):
        super().__init__()
        from timm.layers import create_feature_extractor  # torchvision's, aware of timm's untraceable layers

        self.spec: BackboneSpec = get_backbone(config.backbone)
        self.image_size = config.image_size
        dims = config.dims or self.spec.default_dims
        self.channel_indices = select_channels(self.spec.total_channels, dims, config.seed)
        model, self.weights_identity = load_weights(self.spec, config.weights, config.seed)
        self.extractor = create_feature_extractor(model, return_nodes={s: s for s in self.spec.stages}).eval()
        offsets = np.cumsum((0,) + self.spec.channels)
        self.stage_channels = [  # indices within each stage, in the sorted global order
            torch.as_tensor(self.channel_indices[(self.channel_indices >= lo) & (self.channel_indices < hi)] - lo)
            for lo, hi in zip(offsets[:-1], offsets[1:])
        ]
        self.register_buffer("mean", torch.tensor(self.spec.mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(self.spec.std).view(1, 3, 1, 1))
        self.to(device)
        self.device = torch.device(device)
        with torch.inference_mode():
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
        """Embed uint8 RGB frames (B, H, W, 3); returns float32 (B, d, h, w) on self.device."""
        frames = torch.as_tensor(frames)
        if frames.ndim != 4 or frames.shape[-1] != 3:
            raise PadimError(f"frames must be (B, H, W, 3) RGB, got shape {tuple(frames.shape)}")
        frames = resize_frames(frames.to(self.device), self.image_size)
        x = frames.permute(0, 3, 1, 2).float().div_(255)  # (B, 3, S, S)
        x = (x - self.mean) / self.std
        features = self.extractor(x)
        grid = features[self.spec.stages[0]].shape[-2:]
        parts = []
        for stage, channels in zip(self.spec.stages, self.stage_channels):
            if len(channels):  # select before upsampling: each chosen channel belongs to one stage
                part = features[stage][:, channels.to(self.device)]  # (B, c_s, h_s, w_s)
                parts.append(F.interpolate(part, size=grid, mode="nearest"))
        return torch.cat(parts, dim=1)  # (B, d, h, w)
