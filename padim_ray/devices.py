"""Which torch device an actor runs on: the GPU Ray reserved for it, else the CPU."""

from __future__ import annotations

import logging

import ray

log = logging.getLogger(__name__)


def choose_device(gpu_ids: list, cuda_available: bool):
    """An actor's torch device: the first GPU it reserved (Ray makes it cuda:0 by setting
    CUDA_VISIBLE_DEVICES to the reserved ones), else the CPU, even where CUDA is visible."""
    import torch

    return torch.device("cuda", 0) if gpu_ids and cuda_available else torch.device("cpu")


def actor_device():
    """The device this actor's resources reserve (`choose_device` of Ray's GPU ids).

    Ray 2.60 no longer hides GPUs from actors that reserved none: deciding by
    torch.cuda.is_available() alone put a CPU actor on GPU 0, unreserved, beside another's work.
    """
    import torch

    gpu_ids, cuda_available = ray.get_gpu_ids(), torch.cuda.is_available()
    if gpu_ids and not cuda_available:
        log.warning("this actor reserved GPUs %s but torch sees no CUDA device: it runs on the CPU", gpu_ids)
    return choose_device(gpu_ids, cuda_available)
