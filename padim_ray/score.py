"""Scoring: frames -> Mahalanobis maps (eq. 2) -> bilinear upsampling -> Gaussian blur -> zarr + Parquet."""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import ray
import torch
import torch.nn.functional as F
from tqdm import tqdm

from padim_ray.accounting import Accounting
from padim_ray.config import ClusterConfig, ModelConfig, ScoreConfig
from padim_ray.embedding import Embedder
from padim_ray.errors import PadimError
from padim_ray.gaussian import mahalanobis
from padim_ray.runtime import connect, plan_actors, user_errors
from padim_ray.store import MapWriter, StoreError, open_model, publish, staged_output, write_scores
from padim_ray.video import WorkUnit, expand_inputs, frames_dataset, make_units

log = logging.getLogger(__name__)


def gaussian_kernel(sigma: float, truncate: float) -> torch.Tensor:
    """Normalised 1-D Gaussian taps, radius round(truncate * sigma) as in scipy.ndimage."""
    radius = int(truncate * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return (kernel / kernel.sum()).float()


def anomaly_maps(distances: torch.Tensor, size: tuple[int, int], kernel: torch.Tensor) -> torch.Tensor:
    """Upsample (B, h, w) distances bilinearly (align_corners=False) to `size`, then blur separably."""
    x = F.interpolate(distances.unsqueeze(1), size=size, mode="bilinear", align_corners=False)  # (B, 1, H, W)
    radius = len(kernel) // 2
    taps = kernel.to(x.device, x.dtype)
    x = F.conv2d(F.pad(x, (0, 0, radius, radius), mode="reflect"), taps.view(1, 1, -1, 1))  # along H
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="reflect"), taps.view(1, 1, 1, -1))  # along W
    return x.squeeze(1)  # (B, H, W)


class Scorer:
    """A model loaded for scoring: frames in, blurred anomaly maps out (no Ray here)."""

    def __init__(self, model_path: str | Path, score: ScoreConfig = ScoreConfig(), device: torch.device | str = "cpu"):
        store = open_model(model_path)
        config = ModelConfig(**store.attrs["config"])
        self.embedder = Embedder(config, device)
        if self.embedder.channel_indices.tolist() != store.attrs["channel_indices"]:
            raise StoreError(f"model {model_path}: its channel indices differ from seed {config.seed}'s; refit it with this version")
        device = self.embedder.device
        self.mean = torch.from_numpy(store.read("mean")).to(device, torch.float32)  # (P, d)
        self.precision = torch.from_numpy(store.read("precision")).to(device, torch.float32)  # (P, d, d)
        self.kernel = gaussian_kernel(score.blur_sigma, score.blur_truncate)

    @torch.inference_mode()
    def distances(self, frames: np.ndarray) -> torch.Tensor:
        """Mahalanobis distance of every patch, (B, h, w) float32 (eq. 2)."""
        return mahalanobis(self.embedder(frames), self.mean, self.precision)

    @torch.inference_mode()
    def maps(self, frames: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
        """Blurred anomaly maps (B, H, W) at `size`."""
        return anomaly_maps(self.distances(frames), size, self.kernel)


class ScoreActor:
    """Ray Data callable class: a batch of decoded frames -> maps, frame scores and argmax."""

    def __init__(self, model_path: str, score: ScoreConfig, map_size: tuple[int, int] | None, threads: int):
        torch.set_num_threads(threads)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.scorer = Scorer(model_path, score, device)
        self.map_size = map_size

    def __call__(self, batch: dict) -> dict:
        sizes = [self.map_size or (int(h), int(w)) for h, w in zip(batch["height"], batch["width"])]
        maps: list[np.ndarray] = [None] * len(sizes)  # type: ignore[list-item]
        for size in set(sizes):  # a batch may straddle inputs of different resolutions
            rows = [i for i, s in enumerate(sizes) if s == size]
            for row, anomaly_map in zip(rows, self.scorer.maps(batch["frame"][rows], size).cpu().numpy()):
                maps[row] = anomaly_map
        peaks = [np.unravel_index(int(m.argmax()), m.shape) for m in maps]
        return {
            "unit": batch["unit"],
            "index": batch["index"],
            "unit_total": batch["unit_total"],
            "map": maps if len(set(sizes)) > 1 else np.stack(maps),
            "score": np.array([m.max() for m in maps], dtype=np.float32),
            "max_y": np.array([p[0] for p in peaks], dtype=np.int64),
            "max_x": np.array([p[1] for p in peaks], dtype=np.int64),
        }


def parse_map_size(text: str, image_size: int) -> tuple[int, int] | None:
    """`native` -> None (each input's own size), `model` -> the model's input size, `HxW` -> (H, W)."""
    if text == "native":
        return None
    if text == "model":
        return image_size, image_size
    try:
        height, width = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise PadimError(f"--map-size must be native, model or HxW like 480x856, got {text!r}") from None
    return height, width


def input_ids(units: list[WorkUnit]) -> dict[int, str]:
    """A readable unique id per input (file stem or folder name, e.g. 01_0014), for each unit."""
    ids: dict[str, str] = {}
    for path in dict.fromkeys(u.path for u in units):
        name = Path(path).stem if Path(path).is_file() else Path(path).name
        ids[path] = name if name not in ids.values() else f"{name}_{len(ids)}"
    return {u.uid: ids[u.path] for u in units}


@dataclass
class ScoreResult:
    out: Path
    frames: dict[str, int]  # frames per input id
    seconds: float


def score_inputs(
    model: str | Path,
    inputs: list[str | Path],
    out: str | Path,
    map_size: str = "native",
    score: ScoreConfig = ScoreConfig(),
    cluster: ClusterConfig = ClusterConfig(),
    overwrite: bool = False,
    address: str | None = None,
) -> ScoreResult:
    """Score every frame of `inputs` with `model`; write maps (zarr) and per-frame scores (Parquet) to `out`."""
    started = time.monotonic()
    out = Path(out)
    store = open_model(model)
    size = parse_map_size(map_size, store.attrs["image_size"])
    units, estimate = make_units(expand_inputs(list(inputs)))
    ids = input_ids(units)
    with staged_output(out, overwrite) as staging, user_errors():
        connect(address)
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False
        context.execution_options.preserve_order = True  # maps are appended in frame order
        plan = plan_actors(cluster)
        scored = frames_dataset(units, store.attrs["image_size"], 1, cluster.decode_batch).map_batches(
            ScoreActor,
            fn_constructor_args=(str(Path(model).resolve()), score, size, plan.torch_threads),
            batch_size=cluster.batch_size,
            compute=ray.data.ActorPoolStrategy(size=plan.actors),
            num_cpus=plan.num_cpus,
            num_gpus=plan.num_gpus,
        )
        frames = _write_maps(scored, units, ids, staging, store, score, estimate)
        publish(staging, out, overwrite)
    return ScoreResult(out=out, frames=frames, seconds=time.monotonic() - started)


def _write_maps(scored, units, ids, staging: Path, store, score: ScoreConfig, estimate: int) -> dict[str, int]:
    model_facts = {k: store.attrs[k] for k in ("backbone", "weights_identity", "dims", "image_size", "frames")}
    writer = MapWriter(
        staging, score.map_dtype, score.chunk_frames,
        {"kind": "anomaly-maps", "model": str(store.path.resolve()), "model_facts": model_facts,
         "blur_sigma": score.blur_sigma, "blur_truncate": score.blur_truncate},
    )
    paths = {u.uid: u.path for u in units}
    table: dict[str, list] = {"input": [], "frame": [], "score": [], "max_y": [], "max_x": []}
    accounting = Accounting()
    with tqdm(total=estimate, unit="frame", desc="score", file=sys.stderr, mininterval=2) as bar:
        for batch in scored.iter_batches(batch_size=None, batch_format="numpy"):
            for i, uid in enumerate(batch["unit"].tolist()):
                input_id, index = ids[uid], int(batch["index"][i])
                writer.add(input_id, index, batch["map"][i], {"source": paths[uid]})
                for column in ("score", "max_y", "max_x"):
                    table[column].append(batch[column][i].item())
                table["input"].append(input_id)
                table["frame"].append(index)
            accounting.add_batch(batch["unit"], batch["unit_total"])
            bar.update(len(batch["unit"]))
    frames = writer.close()
    accounting.check(units)
    write_scores(staging, table)
    return frames
