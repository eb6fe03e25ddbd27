"""Step (a) of the GPU check: what the device computes, element by element, against references. No Ray.

    python scripts/check_cuda.py [--device cuda] [--backbone resnet18] [--image-size 256] [--frames 8] [--json PATH]

Every quantity passes when |actual - expected| <= rtol * scale holds for every element:

| quantity | actual (on --device) | expected | scale per element | rtol |
|---|---|---|---|---|
| embeddings float32 | Embedder, strict float32 | Embedder on the CPU | abs(expected) + RMS of its channel | 1e-3 |
| embeddings bfloat16 | Embedder, bf16 autocast | Embedder on the CPU, float32 | abs(expected) + RMS of its channel | 1, 99th percentile 0.1 |
| statistics mean | StatsAccumulator, float64, several slices | numpy float64 two-pass | abs(mean) + std | 1e-9 |
| statistics m2 | the same | numpy float64 two-pass | sqrt(m2_ii * m2_jj) | 1e-9 |
| distances | mahalanobis, float32 | numpy float64 | abs(expected) + 1e-3 median | 1e-3 |
| maps | anomaly_maps, float32 | the same operators in float64 on the CPU | abs(expected) | 1e-5 |
| scored maps | embed, distances, maps on --device | the same on the CPU | abs(expected) + 1e-3 median | 1e-2 |

Why these scales and tolerances: a convolution's rounding error is bounded by eps times the sum of
its terms' magnitudes, which follows the channel's typical size, not the output element (that may
cancel to ~0), hence the channel RMS. float32 (eps 1.2e-7) over ~15 layers of sums of up to 2,304
products, with cuDNN free to pick other algorithms than oneDNN, stays far below 1e-3. bfloat16
(eps 3.9e-3) has heavy tails per element: CPU autocast here, 4 frames at 128 px, gave a 99th
percentile of 0.026 and a maximum of 0.34 (ResNet18, random init), 0.063 and 0.17 (EfficientNet-Lite0,
ImageNet): bfloat16 passes with no element off by more than its scale and 99% within 0.1. The statistics are float64 on
both sides of identical float32 inputs whose mean is 10^4 times their spread, so only float64
rounding separates them; |m2_ij| <= sqrt(m2_ii m2_jj) bounds each element by its diagonal's scale.
Distances multiply float32 deviations by the precision matrix (entries up to 1/eps = 100): 1e-3 per
element, with a floor for distances near zero. The maps' operators have non-negative weights, so
float32 loses at most a few eps per element. Scored maps carry the embeddings' 1e-3-sized
differences through the precision: 1e-2.

On the CPU (CI), the embeddings and scored maps compare the CPU with itself; the statistics,
distances and maps still meet independent float64 references. Rows are printed and written to
--json as they come; the exit status is 1 if any failed.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from padim_ray.config import ModelConfig
from padim_ray.embedding import Embedder
from padim_ray.gaussian import StatsAccumulator, finalize, mahalanobis
from padim_ray.maps import anomaly_maps, gaussian_kernel

SLICES = 4  # the statistics are folded in at least this many slices of positions (config.UPDATE_BYTES)


def compare(name: str, actual, expected, scale, rtol: float, p99: float | None = None) -> dict:
    """One row: the largest |actual - expected| / scale over all elements against `rtol`, and its
    99th percentile against `p99` where given."""
    actual, expected = (np.asarray(x, dtype=np.float64) for x in (actual, expected))
    ratio = np.abs(actual - expected) / np.maximum(np.asarray(scale, dtype=np.float64), np.finfo(np.float64).tiny)
    worst = np.unravel_index(int(ratio.argmax()), ratio.shape)
    percentile = float(np.percentile(ratio, 99))
    return {
        "quantity": name, "rtol": rtol, "max_error_over_scale": float(ratio.max()), "p99_tol": p99, "p99_error_over_scale": percentile,
        "passed": bool(ratio.max() <= rtol and (p99 is None or percentile <= p99)),
        "elements": int(ratio.size), "worst_element": [int(i) for i in worst], "shape": list(ratio.shape),
    }


def channel_scale(expected: np.ndarray) -> np.ndarray:
    """abs(expected) + the RMS of each channel over frames and positions, for (B, d, h, w) embeddings."""
    rms = np.sqrt((expected.astype(np.float64) ** 2).mean(axis=(0, 2, 3), keepdims=True))
    return np.abs(expected) + rms


def smooth_frames(count: int, size: int, seed: int = 0) -> np.ndarray:
    """uint8 RGB frames (count, size, size, 3) of smooth random structure (coarse noise, upsampled)."""
    coarse = torch.from_numpy(np.random.default_rng(seed).uniform(0, 255, (count, 3, 16, 16)).astype(np.float32))
    fine = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
    return fine.clamp(0, 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def check_embeddings(model: ModelConfig, device: torch.device, frames: np.ndarray) -> list[dict]:
    expected = Embedder(model, "cpu")(frames).numpy()
    rows = []
    for dtype, rtol, p99 in (("float32", 1e-3, None), ("bfloat16", 1.0, 0.1)):
        config = ModelConfig(**{**model.to_dict(), "backbone_dtype": dtype})
        actual = Embedder(config, device)(frames).cpu().numpy()
        rows.append(compare(f"embeddings {dtype}", actual, expected, channel_scale(expected), rtol, p99))
    return rows


def check_statistics(device: torch.device, positions: int, dims: int) -> list[dict]:
    embeddings = np.random.default_rng(5).normal(1e4, 1.0, size=(48, dims, positions, 1)).astype(np.float32)
    update_bytes = max(1, positions * 16 * dims * 8 // SLICES)  # batches of 16: SLICES slices of positions each
    accumulator = StatsAccumulator(positions, dims, device, update_bytes=update_bytes)
    for batch in torch.from_numpy(embeddings).split(16):
        accumulator.update(batch.to(device))
    stats = accumulator.stats()
    x = embeddings.astype(np.float64).reshape(48, dims, positions).transpose(2, 0, 1)  # (P, N, d)
    mean = x.mean(axis=1)
    deviations = x - mean[:, None]
    m2 = np.einsum("pni,pnj->pij", deviations, deviations)
    diagonal = np.sqrt(np.einsum("pii->pi", m2))
    return [
        compare("statistics mean", stats.mean.numpy(), mean, np.abs(mean) + diagonal / np.sqrt(48), 1e-9),
        compare("statistics m2", stats.m2.numpy(), m2, diagonal[:, :, None] * diagonal[:, None, :], 1e-9),
    ]


def fitted(embedder: Embedder, frames: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, precision) in float64 on the CPU, fitted on the CPU embeddings of `frames`."""
    embeddings = embedder(frames)
    accumulator = StatsAccumulator(embedder.positions, embedder.dims).update(embeddings)
    gaussians = finalize(accumulator.stats(), eps=0.01)
    return gaussians.mean, gaussians.precision


def check_scoring(model: ModelConfig, device: torch.device, frames: np.ndarray) -> list[dict]:
    cpu = Embedder(model, "cpu")
    mean, precision = fitted(cpu, frames[1:])
    embeddings = cpu(frames[:1])  # a frame the Gaussians did not see
    x = embeddings.double().numpy()
    b, d = x.shape[:2]
    delta = x.reshape(b, d, -1).transpose(0, 2, 1) - mean.numpy()  # (B, P, d)
    expected = np.sqrt(np.einsum("bpi,pij,bpj->bp", delta, precision.numpy(), delta)).reshape(b, *x.shape[2:])
    on_device = mahalanobis(embeddings.to(device), mean.to(device), precision.to(device)).cpu().numpy()
    rows = [compare("distances", on_device, expected, np.abs(expected) + 1e-3 * np.median(expected), 1e-3)]

    size, kernel, blur_size = (480, 856), gaussian_kernel(4.0, 4.0), (model.image_size,) * 2  # STC frames, blurred at the model's size
    distances = torch.from_numpy(expected)
    reference = anomaly_maps(distances, size, kernel.double(), blur_size).numpy()
    maps = anomaly_maps(distances.float().to(device), size, kernel, blur_size).cpu().numpy()
    rows.append(compare("maps", maps, reference, np.abs(reference), 1e-5))

    scored_cpu = anomaly_maps(mahalanobis(embeddings, mean.float(), precision.float()), size, kernel, blur_size).numpy()
    on = Embedder(model, device)
    scored = anomaly_maps(mahalanobis(on(frames[:1]), mean.float().to(device), precision.float().to(device)), size, kernel, blur_size)
    rows.append(compare("scored maps", scored.cpu().numpy(), scored_cpu, np.abs(scored_cpu) + 1e-3 * np.median(scored_cpu), 1e-2))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--frames", type=int, default=8, help="frames embedded (the Gaussians of the scoring rows are fitted on all but one)")
    parser.add_argument("--json", type=Path, default=Path("runs/check_cuda.json"))
    args = parser.parse_args()
    device = torch.device(args.device)
    model = ModelConfig(backbone=args.backbone, weights="none", image_size=args.image_size)
    frames = smooth_frames(args.frames, args.image_size)
    report = {"device": str(device), "torch": torch.__version__, "backbone": args.backbone, "image_size": args.image_size, "rows": []}
    if device.type == "cuda":
        report["gpu"] = torch.cuda.get_device_name(device)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    print(f"check_cuda: {device} against the CPU and float64 references ({args.backbone}, {args.image_size} px, {args.frames} frames)", flush=True)
    print("| quantity | max error / scale | rtol | p99 error / scale | passed | elements |", flush=True)
    steps = (
        lambda: check_embeddings(model, device, frames),
        lambda: check_statistics(device, positions=(args.image_size // 4) ** 2, dims=Embedder(model).dims),
        lambda: check_scoring(model, device, frames),
    )
    for step in steps:
        started = time.perf_counter()
        for row in step():
            row["seconds"] = round(time.perf_counter() - started, 2)
            report["rows"].append(row)
            print(
                f"| {row['quantity']} | {row['max_error_over_scale']:.2e} | {row['rtol']:g} | {row['p99_error_over_scale']:.2e} | "
                f"{row['passed']} | {row['elements']} |", flush=True,
            )
            args.json.write_text(json.dumps(report, indent=1))
    return 0 if all(row["passed"] for row in report["rows"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
