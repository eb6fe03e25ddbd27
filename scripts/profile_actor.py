"""Where a stats actor's time goes, per batch: the embedding (backbone + stage placement) and the
float64 statistics update, on every device this machine has (CPU with all cores; CUDA if present).

    python scripts/profile_actor.py [--backbone resnet18] [--batch-size 32] [--batches 5]
                                    [--update-mib 16 ...] [--json PATH]

With several --update-mib values, the update is timed with each (the float64 working memory of one
slice of positions, config.UPDATE_BYTES) and the embedding once.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from padim_ray.config import UPDATE_BYTES, ModelConfig
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


def profile(model: ModelConfig, device: torch.device, batch_size: int, repeats: int, update_mibs: list[float]) -> list[dict]:
    """One row per update size: milliseconds per batch of the embedding and of the float64 update."""
    embedder = Embedder(model, device)
    frames = np.random.default_rng(0).integers(0, 256, (batch_size, model.image_size, model.image_size, 3), dtype=np.uint8)
    embeddings = embedder(frames)
    embed_ms = timed(lambda: embedder(frames), device, repeats)
    rows = []
    for mib in update_mibs:
        accumulator = StatsAccumulator(embedder.positions, embedder.dims, device, update_bytes=int(mib * 2**20))
        update_ms = timed(lambda: accumulator.update(embeddings), device, repeats)
        rows.append({
            "device": str(device),
            "update_mib": mib,
            "embed_ms": embed_ms,
            "update_ms": update_ms,
            "update_share": update_ms / (embed_ms + update_ms),
            "frames_per_s": batch_size * 1000 / (embed_ms + update_ms),
        })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=5, help="timed repeats of each step")
    parser.add_argument("--update-mib", type=float, nargs="+", default=[UPDATE_BYTES / 2**20], help="float64 MiB per update slice")
    parser.add_argument("--json", type=Path, default=Path("runs/profile_actor.json"))
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    weights = "imagenet" if args.backbone == "efficientnet_lite0" else "none"  # offline: random init
    model = ModelConfig(backbone=args.backbone, weights=weights)
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    rows = [row for device in devices for row in profile(model, device, args.batch_size, args.batches, args.update_mib)]
    print(f"{args.backbone}, batch {args.batch_size}, {torch.get_num_threads()} CPU threads")
    print("| device | update slice MiB | embed ms | float64 update ms | update share | frames/s |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['device']} | {row['update_mib']:g} | {row['embed_ms']:.1f} | {row['update_ms']:.1f} | "
            f"{row['update_share']:.1%} | {row['frames_per_s']:.1f} |"
        )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"backbone": args.backbone, "batch_size": args.batch_size, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
