"""Scoring: eq. (2) against numpy, upsampling + blur against torch + scipy, the Ray pipeline's output."""

from __future__ import annotations

import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
import zarr
from scipy.ndimage import gaussian_filter

from padim_ray.config import ClusterConfig, ScoreConfig
from padim_ray.score import Scorer, score_inputs
from padim_ray.video import input_ids
from padim_ray.store import open_model
from padim_ray.video import WorkUnit, iter_unit_frames
from helpers import SMALL_CLUSTER, relative_error


def _frames(stc_root, count=5):
    clip = stc_root / "testing" / "frames" / "01_0001"
    return np.stack([f for _, f in iter_unit_frames(WorkUnit(0, str(clip)))][:count])


def test_distances_equal_numpy_float64_reference(small_model, stc_root):
    scorer = Scorer(small_model)
    frames = _frames(stc_root)
    distances = scorer.distances(frames).numpy()  # (B, h, w)
    embeddings = scorer.embedder(frames).numpy().astype(np.float64)  # (B, d, h, w)
    model = open_model(small_model)
    mean, precision = model.read("mean"), np.linalg.inv(model.read("covariance"))
    b, d = embeddings.shape[:2]
    delta = embeddings.reshape(b, d, -1).transpose(0, 2, 1) - mean  # (B, P, d)
    expected = np.sqrt(np.einsum("bpi,pij,bpj->bp", delta, precision, delta)).reshape(distances.shape)
    assert relative_error(distances, expected) <= 1e-4


@pytest.mark.parametrize("blur_at", ["model", "map"])
def test_maps_equal_torch_interpolate_and_scipy_blur(small_model, stc_root, blur_at):
    scorer = Scorer(small_model, ScoreConfig(blur_at=blur_at))
    frames = _frames(stc_root, 3)
    size = frames.shape[1:3]
    maps = scorer.maps(frames, size).numpy()
    blur_size = (64, 64) if blur_at == "model" else size  # SMALL_MODEL's input size
    distances = scorer.distances(frames)[:, None].double()
    upsampled = F.interpolate(distances, size=blur_size, mode="bilinear", align_corners=False)[:, 0]
    blurred = np.stack([gaussian_filter(m, sigma=4, mode="mirror") for m in upsampled.numpy()])  # torch's "reflect"
    expected = F.interpolate(torch.from_numpy(blurred)[:, None], size=size, mode="bilinear", align_corners=False)[:, 0].numpy()
    assert maps.shape == (3, 180, 320)
    assert relative_error(maps, expected) <= 1e-5


def test_score_writes_every_frame_in_order(ray_local, small_model, stc_root, tmp_path):
    clip = stc_root / "testing" / "frames" / "01_0001"  # 12 frames
    video = stc_root / "training" / "videos" / "01_002.avi"  # 30 frames: not a multiple of batch 7
    out = tmp_path / "maps"
    cluster = ClusterConfig(actors=2, cpus_per_actor=0.5, batch_size=7)
    result = score_inputs(small_model, [clip, video], out, score=ScoreConfig(map_dtype="float32", chunk_frames=4), cluster=cluster)
    assert result.frames == {"01_0001": 12, "01_002": 30}
    group = zarr.open_group(str(out / "maps.zarr"), mode="r")
    assert group["01_002"].shape == (30, 180, 320) and group["01_002"].chunks == (4, 180, 320)
    assert group["01_002"].attrs["source"] == str(video)
    table = pq.read_table(out / "scores.parquet").to_pandas()
    assert table["input"].tolist() == ["01_0001"] * 12 + ["01_002"] * 30
    assert table["frame"].tolist() == list(range(12)) + list(range(30))
    frames = np.stack([f for _, f in iter_unit_frames(WorkUnit(0, str(video)), size=64)])  # decoded as the pipeline does
    direct = Scorer(small_model).maps(frames, (180, 320)).numpy()
    stored = group["01_002"][:]
    assert relative_error(stored, direct) <= 1e-4  # same frames, same order
    scores = table[table["input"] == "01_002"]
    np.testing.assert_allclose(scores["score"], stored.reshape(30, -1).max(axis=1), rtol=1e-6)
    peak = np.unravel_index(stored[7].argmax(), stored[7].shape)
    assert (scores["max_y"].iloc[7], scores["max_x"].iloc[7]) == peak


def test_model_sized_float16_maps(ray_local, small_model, stc_root, tmp_path):
    """The default map dtype: float16 maps stay within 1e-3 relative of float32 maps of the same frames
    (config.ScoreConfig.map_dtype), element by element."""
    clip = stc_root / "testing" / "frames" / "01_0001"
    result = score_inputs(small_model, [clip], tmp_path / "m", map_size="model", cluster=SMALL_CLUSTER)
    stored = zarr.open_group(str(result.out / "maps.zarr"), mode="r")["01_0001"]
    assert stored.shape == (12, 64, 64) and stored.dtype == np.float16
    frames = np.stack([f for _, f in iter_unit_frames(WorkUnit(0, str(clip)), size=64)])  # decoded as the pipeline does
    as_float32 = Scorer(small_model).maps(frames, (64, 64)).numpy()
    assert as_float32.dtype == np.float32 and as_float32.min() > 0
    np.testing.assert_allclose(stored[:].astype(np.float32), as_float32, rtol=1e-3, atol=0)


def test_score_refuses_a_model_whose_weights_it_cannot_reproduce(small_model, stc_root, tmp_path):
    """Checked on the driver, before any cluster work, with the same check `update` makes."""
    import shutil

    from padim_ray.store import StoreError

    model = tmp_path / "other_weights"
    shutil.copytree(small_model, model)
    zarr.open_group(str(model), mode="r+", zarr_format=3).attrs["weights_identity"] = "file:r18.pth:sha256=0123"
    out = tmp_path / "maps"
    with pytest.raises(StoreError, match=f"model {model} was fitted with other weights identity .* cannot be scored here"):
        score_inputs(model, [stc_root / "testing" / "frames" / "01_0001"], out)
    assert not out.exists()


@pytest.mark.parametrize("text", ["0x0", "-5x5", "100000x100000", "480x0", "480", "bigxsmall"])
def test_absurd_map_sizes_are_refused_in_one_line(text):
    from padim_ray.config import ConfigError
    from padim_ray.score import parse_map_size

    with pytest.raises(ConfigError, match=f"--map-size must be native, model or HxW like 480x856 with sides from 1 to 8192, got '{text}'"):
        parse_map_size(text, 256)
    assert parse_map_size("8192x1", 256) == (8192, 1) and parse_map_size("model", 64) == (64, 64) and parse_map_size("native", 64) is None


def test_input_ids_are_the_shortest_distinguishing_path_suffixes():
    paths = ["/a/x.mp4", "/x_2.mp4", "/b/x.mp4"]
    expected = {"/a/x.mp4": "a/x", "/x_2.mp4": "x_2", "/b/x.mp4": "b/x"}
    assert input_ids(paths) == expected and input_ids(paths[::-1]) == expected  # whatever the order
    assert input_ids(["/c/a/x.mp4", "/a/x.mp4", "/d/frames/01_0014"]) == {"/c/a/x.mp4": "c/a/x", "/a/x.mp4": "a/x", "/d/frames/01_0014": "01_0014"}
    assert input_ids(["/v/x.mp4", "/v/x.avi", "/v/x"]) == {"/v/x.mp4": "x.mp4", "/v/x.avi": "x.avi", "/v/x": "x"}
    assert input_ids(["s3://bucket/a/x.mp4", "gs://bucket/a/x.mp4"]) == {"s3://bucket/a/x.mp4": "s3:/bucket/a/x", "gs://bucket/a/x.mp4": "gs:/bucket/a/x"}


def test_inputs_of_one_name_get_their_own_maps(ray_local, small_model, stc_root, tmp_path):
    from padim_ray.viz import render_input

    clip = stc_root / "testing" / "frames" / "01_0001"  # 12 frames
    first, second = tmp_path / "a" / "01_0001", tmp_path / "b" / "01_0001"
    shutil.copytree(clip, first)
    shutil.copytree(clip, second, ignore=lambda folder, names: sorted(names)[8:])  # 8 frames
    out = tmp_path / "maps"
    result = score_inputs(small_model, [first, second], out, map_size="model", cluster=SMALL_CLUSTER)
    assert result.frames == {"a/01_0001": 12, "b/01_0001": 8}
    group = zarr.open_group(str(out / "maps.zarr"), mode="r")
    assert [(group[i].shape[0], group[i].attrs["source"]) for i in ("a/01_0001", "b/01_0001")] == [(12, str(first)), (8, str(second))]
    assert pq.read_table(out / "scores.parquet").to_pandas()["input"].tolist() == ["a/01_0001"] * 12 + ["b/01_0001"] * 8
    assert render_input(out, second, tmp_path / "b.mp4").is_file()  # found by its source path


def test_a_fitted_model_reads_back_its_attributes_as_stored(small_model):
    """The typed schema (store.ModelAttributes) reads a fitted model's attributes back unchanged."""
    assert open_model(small_model).attrs == dict(zarr.open_group(str(small_model), mode="r").attrs)
