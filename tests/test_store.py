"""The zarr model store: chunking by shard, atomic publish, version checks (on disk and on S3)."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from padim_ray.files import Location, StorageError
from padim_ray.leases import WRITING_MARKER
from padim_ray.publish import abort_store, begin_store, commit_store, staged_store
from padim_ray.store import MODEL_STORE, ModelAttributes, StoreError, create_model_store, open_model, publish_model, write_shard
from padim_ray.map_store import MAP_STORE, MapAttributes, create_map_arrays, open_maps, publish_maps, write_scores


def _attributes(frames: int) -> ModelAttributes:
    """The attributes of a small model holding `frames` frames (the store does not check them against its arrays)."""
    return ModelAttributes(
        package_version="0.0", config={}, backbone="resnet18", weights_identity="none", stages=["layer1"], stage_channels=[64],
        normalization={"mean": [0.5] * 3, "std": [0.5] * 3}, image_size=32, grid=[2, 5], dims=3, channel_indices=[0, 1, 2],
        eps=0.01, frames=frames, sources=[],
    )


def _pending_model(target: Location, positions=10, dims=3, shard=4, overwrite=False):
    pending = begin_store(target, overwrite, kind=MODEL_STORE)
    create_model_store(pending, positions, dims, shard)
    rng = np.random.default_rng(0)
    arrays = {
        "mean": rng.normal(size=(positions, dims)),
        "covariance": rng.normal(size=(positions, dims, dims)),
        "precision": rng.normal(size=(positions, dims, dims)),
        "m2": rng.normal(size=(positions, dims, dims)),
    }
    for start in range(0, positions, shard):
        write_shard(pending.root, start, {k: v[start : start + shard] for k, v in arrays.items()})
    return pending, arrays


def test_store_round_trip_and_chunking(where):
    out = where / "model"
    pending, arrays = _pending_model(out)
    with pytest.raises(StoreError, match="incomplete|not found"):
        open_model(out)  # nothing opens as a model until published
    publish_model(pending, _attributes(7))
    assert not (out / WRITING_MARKER).exists()
    assert [p.name for p in where.iterdir()] == ["model"]  # no staging left beside it
    model = open_model(out)
    assert model.attrs["frames"] == 7 and model.attrs["format_version"] == 1
    np.testing.assert_array_equal(model.read("mean"), arrays["mean"])
    np.testing.assert_array_equal(model.read("m2", 4, 8), arrays["m2"][4:8])
    assert model.read("precision").dtype == np.float32
    assert model.group["covariance"].chunks == (4, 3, 3)


def test_overwrite_replaces_an_existing_store(where):
    out = where / "model"
    pending, _ = _pending_model(out)
    publish_model(pending, _attributes(1))
    with pytest.raises(StorageError, match="already exists.*; pass --overwrite"):
        begin_store(out, overwrite=False, kind=MODEL_STORE)
    assert open_model(out).attrs["frames"] == 1  # a refused run leaves the model alone
    pending, _ = _pending_model(out, overwrite=True)
    publish_model(pending, _attributes(2))
    assert open_model(out).attrs["frames"] == 2
    assert [p.name for p in where.iterdir()] == ["model"]



def _published_maps(target: Location, overwrite: bool = False) -> None:
    """A complete (one-array) anomaly-map store at `target`, as `padim-ray score` publishes it."""
    pending = begin_store(target, overwrite, kind=MAP_STORE)
    create_map_arrays(pending, "float16", 4, {"clip": ((4, 2, 2), "/videos/clip.mp4")})
    write_scores(pending.staging, {"input": ["clip"] * 4, "frame": [0, 1, 2, 3]})
    publish_maps(pending, MapAttributes(model="/models/a", model_facts={}, blur_sigma=4.0, blur_truncate=4.0, blur_at="model"))


def _contents(where: Location) -> dict[str, bytes]:
    """Every file under `where` and its bytes."""
    return {path: where.fs.cat_file(path) for path in where.fs.find(where.path)}


def test_overwrite_replaces_only_a_store_of_its_kind(where):
    images, models, model, maps = where / "frames", where / "models", where / "models" / "a", where / "maps"
    for name in ("000.jpg", "001.jpg"):
        (images / name).write_bytes(b"a user's picture")
    publish_model(_pending_model(model)[0], _attributes(1))
    _published_maps(maps)
    before = _contents(where)
    refused = [(images, MODEL_STORE), (images, MAP_STORE), (model, MAP_STORE), (maps, MODEL_STORE), (models, MODEL_STORE)]
    for target, kind in refused:
        with pytest.raises(StorageError) as err:
            begin_store(target, overwrite=True, kind=kind)
        assert str(err.value) == f"{target}: holds files that are not a padim-ray {kind.name}; choose another --out or remove them"
    assert _contents(where) == before  # nothing a user owns is deleted, no staging left
    publish_model(_pending_model(model, overwrite=True)[0], _attributes(2))  # a model replaces a model
    _published_maps(maps, overwrite=True)  # maps replace maps
    assert open_model(model).attrs["frames"] == 2 and open_maps(maps).attrs["kind"] == "anomaly-maps"


def test_overwrite_never_replaces_a_file(tmp_path):
    video = tmp_path / "clip.mp4"
    video.write_bytes(b"a user's video")
    with pytest.raises(StorageError, match=f"^{video}: holds files that are not a padim-ray anomaly-map store"):
        begin_store(video, overwrite=True, kind=MAP_STORE)
    assert video.read_bytes() == b"a user's video" and sorted(p.name for p in tmp_path.iterdir()) == ["clip.mp4"]

def test_a_failed_write_leaves_nothing_that_opens(where):
    out = where / "model"
    with pytest.raises(RuntimeError), staged_store(out, overwrite=False, kind=MODEL_STORE) as pending:
        create_model_store(pending, 10, 3, 4)
        raise RuntimeError("the fit failed")
    with pytest.raises(StoreError, match="not found"):
        open_model(out)
    assert not where.exists() or where.iterdir() == []  # an S3 prefix with no objects does not exist


def test_unknown_format_version_is_refused(tmp_path):
    out = tmp_path / "model"
    pending, _ = _pending_model(Location(out))
    publish_model(pending, _attributes(0))
    zarr.open_group(str(out), mode="r+").attrs["format_version"] = 99
    with pytest.raises(StoreError, match=f"model {out} has format version 99, this padim-ray reads version 1"):
        open_model(out)


# the attribute names a model store and a map store record, as every model since format version 1 has them
MODEL_ATTRIBUTES = [
    "format_version", "package_version", "config", "backbone", "weights_identity", "stages", "stage_channels", "normalization",
    "image_size", "grid", "dims", "channel_indices", "eps", "frames", "sources", "skipped_inputs", "calibration",
]
MAP_ATTRIBUTES = ["format_version", "kind", "model", "model_facts", "blur_sigma", "blur_truncate", "blur_at"]


def test_stored_attribute_names_do_not_change(tmp_path):
    assert list(_attributes(3).to_attributes()) == MODEL_ATTRIBUTES
    maps = MapAttributes(model="/models/a", model_facts={}, blur_sigma=4.0, blur_truncate=4.0, blur_at="model")
    assert list(maps.to_attributes()) == MAP_ATTRIBUTES
    out = Location(tmp_path / "model")
    pending, _ = _pending_model(out)
    # written before --skip-bad-inputs and calibration
    first_models = {k: v for k, v in _attributes(3).to_attributes().items() if k not in ("skipped_inputs", "calibration")}
    commit_store(pending, first_models)
    model = open_model(out)
    assert model.attributes.frames == 3 and model.attributes.skipped_inputs == [] and model.attributes.calibration is None


def test_not_a_store(tmp_path):
    with pytest.raises(StoreError, match="not found"):
        open_model(tmp_path / "missing")
    (tmp_path / "plain").mkdir()
    with pytest.raises(StoreError, match="is not a padim-ray model store"):
        open_model(tmp_path / "plain")


def test_staging_checks_the_target(tmp_path):
    (tmp_path / "taken").mkdir()
    with pytest.raises(StorageError, match="already exists.*; pass --overwrite"):
        begin_store(tmp_path / "taken", overwrite=False, kind=MODEL_STORE)
    abort_store(begin_store(tmp_path / "no" / "such" / "model", overwrite=False, kind=MODEL_STORE))  # missing folders are made
    assert (tmp_path / "no" / "such").is_dir() and not list((tmp_path / "no" / "such").iterdir())
    (tmp_path / "file").write_text("x")
    with pytest.raises(StorageError, match=f"output folder {tmp_path / 'file'} is a file; choose another --out"):
        begin_store(tmp_path / "file" / "model", overwrite=False, kind=MODEL_STORE)
    with pytest.raises(StorageError, match=f"output folder {tmp_path / 'file' / 'sub'} cannot be created: {tmp_path / 'file'} is a file"):
        begin_store(tmp_path / "file" / "sub" / "model", overwrite=False, kind=MODEL_STORE)


@pytest.fixture(scope="module")
def gs_bucket():
    """A Google Cloud Storage emulator on a free local port (gcsfs finds it through STORAGE_EMULATOR_HOST)."""
    emulator = pytest.importorskip("gcp_storage_emulator.server")
    import socket

    import gcsfs

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = emulator.create_server("127.0.0.1", port, in_memory=True, default_bucket="padim-gs")
    server.start()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{port}")
        gcsfs.GCSFileSystem.clear_instance_cache()
        try:
            yield Location("gs://padim-gs")
        finally:
            gcsfs.GCSFileSystem.clear_instance_cache()
            server.stop()


def test_a_model_store_on_google_cloud_storage(gs_bucket):
    out = gs_bucket / "models" / "model"
    pending, arrays = _pending_model(out)
    with pytest.raises(StoreError, match="incomplete"):
        open_model(out)
    publish_model(pending, _attributes(7))
    model = open_model(out)
    assert model.attrs["frames"] == 7
    np.testing.assert_array_equal(model.read("m2", 4, 8), arrays["m2"][4:8])
    with pytest.raises(StorageError, match=r"^gs://padim-gs/models/missing\.bin: not found"):
        (gs_bucket / "models" / "missing.bin").read_bytes()
