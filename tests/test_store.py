"""The zarr model store: chunking by shard, atomic publish, version checks."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from padim_ray.store import StoreError, create_model_store, make_staging, open_model, publish, set_model_attributes, write_shard


def _staged_store(tmp_path, positions=10, dims=3, shard=4):
    out = tmp_path / "model"
    staging = make_staging(out, overwrite=False)
    create_model_store(staging, positions, dims, shard)
    rng = np.random.default_rng(0)
    arrays = {
        "mean": rng.normal(size=(positions, dims)),
        "covariance": rng.normal(size=(positions, dims, dims)),
        "precision": rng.normal(size=(positions, dims, dims)),
        "m2": rng.normal(size=(positions, dims, dims)),
    }
    for start in range(0, positions, shard):
        write_shard(staging, start, {k: v[start : start + shard] for k, v in arrays.items()})
    return out, staging, arrays


def test_store_round_trip_and_chunking(tmp_path):
    out, staging, arrays = _staged_store(tmp_path)
    assert not out.exists()  # nothing at the target until published
    set_model_attributes(staging, {"frames": 7})
    publish(staging, out, overwrite=False)
    assert not staging.exists()
    model = open_model(out)
    assert model.attrs["frames"] == 7 and model.attrs["format_version"] == 1
    np.testing.assert_array_equal(model.read("mean"), arrays["mean"])
    np.testing.assert_array_equal(model.read("m2", 4, 8), arrays["m2"][4:8])
    assert model.read("precision").dtype == np.float32
    assert model.group["covariance"].chunks == (4, 3, 3)


def test_overwrite_replaces_an_existing_store(tmp_path):
    out, staging, _ = _staged_store(tmp_path)
    set_model_attributes(staging, {"frames": 1})
    publish(staging, out, overwrite=False)
    staging = make_staging(out, overwrite=True)
    create_model_store(staging, 10, 3, 4)
    set_model_attributes(staging, {"frames": 2})
    publish(staging, out, overwrite=True)
    assert open_model(out).attrs["frames"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_unknown_format_version_is_refused(tmp_path):
    out, staging, _ = _staged_store(tmp_path)
    set_model_attributes(staging, {})
    publish(staging, out, overwrite=False)
    zarr.open_group(str(out), mode="r+").attrs["format_version"] = 99
    with pytest.raises(StoreError, match=f"model {out} has format version 99, this padim-ray reads version 1"):
        open_model(out)


def test_not_a_store(tmp_path):
    with pytest.raises(StoreError, match="not found"):
        open_model(tmp_path / "missing")
    (tmp_path / "plain").mkdir()
    with pytest.raises(StoreError, match="is not a padim-ray model store"):
        open_model(tmp_path / "plain")


def test_staging_checks_the_target(tmp_path):
    (tmp_path / "taken").mkdir()
    with pytest.raises(StoreError, match="already exists; pass --overwrite"):
        make_staging(tmp_path / "taken", overwrite=False)
    with pytest.raises(StoreError, match="does not exist"):
        make_staging(tmp_path / "no" / "model", overwrite=False)
