"""Where a stats actor's time goes, per batch: the embedding (backbone + stage placement) and the
float64 statistics update, on every device this machine has (CPU with all cores; CUDA if present).

    python scripts/profile_actor.py [--backbone resnet18] [--batch-size 32 ...] [--dtype float32 ...]
                                    [--update-mib 16 ...] [--device all|cpu|cuda] [--image-size 256] [--batches 5]
                                    [--json PATH]

One row per device, batch size, backbone dtype and update size: the embedding is timed once per
device, batch size and dtype, the update with each --update-mib (the float64 working memory of one
slice of positions, config.UPDATE_BYTES). Rows are printed and written to --json as they come.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import runrecord
import torch

from padim_ray.config import BACKBONE_DTYPES, UPDATE_BYTES, ModelConfig
from padim_ray.embedding import Embedder
from padim_ray.gaussian import StatsAccumulator


def timed(step, device: torch.device, repeats: int) -> float:
    """Median milliseconds of `step()` over `repeats` runs, after one warm-up."""
    step()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - started) * 1000)
    return float(np.median(times))


def timed_update(embeddings: torch.Tensor, device: torch.device, update_bytes: int, repeats: int) -> float:
    """Median milliseconds of folding `embeddings` into a fresh accumulator (freed on return: WR50-Rd550's is 10 GB)."""
    batch, dims, height, width = embeddings.shape
    accumulator = StatsAccumulator(height * width, dims, device, update_bytes=update_bytes)
    return timed(lambda: accumulator.update(embeddings), device, repeats)


def profile(model: ModelConfig, device: torch.device, batch_size: int, repeats: int, update_mibs: list[float]) -> Iterator[dict]:
    """One row per update size: milliseconds per batch of the embedding and of the float64 update."""
    embedder = Embedder(model, device)
    frames = np.random.default_rng(0).integers(0, 256, (batch_size, model.image_size, model.image_size, 3), dtype=np.uint8)
    embeddings = embedder(frames)
    embed_ms = timed(lambda: embedder(frames), device, repeats)
    for mib in update_mibs:
        update_ms = timed_update(embeddings, device, int(mib * 2**20), repeats)
        yield {
            "device": str(device),
            "backbone_dtype": model.backbone_dtype,
            "batch_size": batch_size,
            "update_mib": mib,
            "embed_ms": embed_ms,
            "update_ms": update_ms,
            "update_share": update_ms / (embed_ms + update_ms),
            "frames_per_s": batch_size * 1000 / (embed_ms + update_ms),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--batch-size", type=int, nargs="+", default=[32])
    parser.add_argument("--dtype", nargs="+", default=["float32"], choices=BACKBONE_DTYPES, help="backbone arithmetic")
    parser.add_argument("--device", default="all", choices=["all", "cpu", "cuda"])
    parser.add_argument("--image-size", type=int, default=ModelConfig.image_size, help="frames' side (positions = (side / 4)^2)")
    parser.add_argument("--batches", type=int, default=5, help="timed repeats of each step")
    parser.add_argument("--update-mib", type=float, nargs="+", default=[UPDATE_BYTES / 2**20], help="float64 MiB per update slice")
    parser.add_argument("--json", type=Path, default=runrecord.default_path("profile_actor"), help="where to write the results")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    weights = "imagenet" if args.backbone == "efficientnet_lite0" else "none"  # offline: random init
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    devices = [d for d in devices if args.device in ("all", d.type)]
    if not devices:
        raise SystemExit(f"no {args.device} device here")
    print(f"{args.backbone}, {torch.get_num_threads()} CPU threads", flush=True)
    print("| device | dtype | batch | update slice MiB | embed ms | float64 update ms | update share | frames/s |", flush=True)
    print("|---|---|---|---|---|---|---|---|", flush=True)
    rows = []
    for device in devices:
        for dtype in args.dtype:
            model = ModelConfig(backbone=args.backbone, weights=weights, backbone_dtype=dtype, image_size=args.image_size)
            for batch_size in args.batch_size:
                for row in profile(model, device, batch_size, args.batches, args.update_mib):
                    rows.append(row)
                    print(
                        f"| {row['device']} | {dtype} | {batch_size} | {row['update_mib']:g} | {row['embed_ms']:.1f} | "
                        f"{row['update_ms']:.1f} | {row['update_share']:.1%} | {row['frames_per_s']:.1f} |", flush=True,
                    )
                    runrecord.write(args.json, runrecord.record("profile_actor", rows, backbone=args.backbone, torch_threads=torch.get_num_threads()))


if __name__ == "__main__":
    main()
