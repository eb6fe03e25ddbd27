"""Real footage: OpenCV's vtest.avi (pedestrians, fixed camera) with a pasted foreign object.

Fetch the file with `bash scripts/fetch_vtest.sh` (CI does); elsewhere a missing file skips the test.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from padim_ray.config import ClusterConfig, ModelConfig, ScoreConfig
from padim_ray.fit import fit_model
from padim_ray.metrics import PixelHistograms
from padim_ray.score import score_inputs
from padim_ray.map_store import open_maps
from padim_ray.video import WorkUnit, iter_unit_frames

VTEST = Path(os.environ.get("PADIM_RAY_VTEST", Path(__file__).parent.parent / "data" / "vtest.avi"))
TRAIN_FRAMES = 600  # of 795
STEP = 4  # every fourth frame (2.5 frames/s), for training and testing: the scene, the walkway and the object's path stay whole


@pytest.fixture(scope="module")
def vtest() -> Path:
    if not VTEST.is_file():
        message = f"{VTEST} is missing: fetch it with `bash scripts/fetch_vtest.sh` (or set PADIM_RAY_VTEST)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return VTEST


def paste_object(frame: np.ndarray, step: int, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """A striped magenta-and-yellow box (48 x 48) crossing the walkway left to right; returns frame, mask."""
    height, width = frame.shape[:2]
    x = int(-48 + (width + 96) * step / steps)
    y = int(0.40 * height + 0.18 * max(x, 0))  # along the road, which falls to the right
    ys, xs = np.mgrid[0:height, 0:width]
    mask = (xs >= x) & (xs < x + 48) & (ys >= y) & (ys < y + 48)
    stripes = ((xs + ys) // 8) % 2 == 0
    out = frame.copy()
    out[mask & stripes] = (230, 30, 200)
    out[mask & ~stripes] = (250, 220, 20)
    return out, mask.astype(np.uint8)


@pytest.mark.slow
def test_pasted_object_is_localised_in_real_footage(ray_local, vtest, tmp_path):
    train, test = tmp_path / "train", tmp_path / "test"
    train.mkdir(), test.mkdir()
    masks = []
    for index, frame in iter_unit_frames(WorkUnit(0, str(vtest))):
        if index % STEP:
            continue
        if index < TRAIN_FRAMES:
            Image.fromarray(frame).save(train / f"{index:04d}.jpg", quality=95)
        else:
            frame, mask = paste_object(frame, index - TRAIN_FRAMES, 795 - TRAIN_FRAMES)
            Image.fromarray(frame).save(test / f"{index:04d}.jpg", quality=95)
            masks.append(mask)
    cluster = ClusterConfig(actors=2, cpus_per_actor=1.0)
    model = fit_model([train], tmp_path / "model", ModelConfig(backbone="efficientnet_lite0"), cluster)
    assert model.frames == TRAIN_FRAMES // STEP
    maps = score_inputs(model.out, [test], tmp_path / "maps", score=ScoreConfig(map_dtype="float32"), cluster=cluster)
    assert maps.frames == {"test": len(masks)} and len(masks) == (795 - TRAIN_FRAMES + 1) // STEP
    stored = open_maps(maps.out)["test"][:]  # (98, 576, 768)
    histograms = PixelHistograms(upper=float(stored.max()) * 1.0001)
    for anomaly_map, mask in zip(stored, masks):
        histograms.add(anomaly_map, mask)
    print(f"vtest pixel AUROC {histograms.auroc():.4f}, PRO {histograms.pro():.4f}")
    assert histograms.auroc() >= 0.90


def test_a_video_of_repeated_pictures_is_not_mistaken_for_a_truncated_one():
    """OpenCV's tree.avi declares 444 frames at 15 fps, of which 68 hold pictures and the rest are empty
    entries that repeat the last one: it decodes to 68 frames and is whole (timestamps reach frame 443)."""
    tree = VTEST.parent / "tree.avi"
    if not tree.is_file():
        message = f"{tree} is missing: fetch it with `bash scripts/fetch_vtest.sh`"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    assert [index for index, _ in iter_unit_frames(WorkUnit(0, str(tree)), size=64)] == list(range(68))
