"""The zarr v3 model store: arrays chunked by position, written shard by shard, published atomically.

Layout of MODEL/ (a zarr v3 group):
    mean        (P, d)     float64   per-position mean
    covariance  (P, d, d)  float64   M2 / (N - 1) + eps * I (eq. 1)
    precision   (P, d, d)  float32   inverse covariance, the dtype scoring uses
    m2          (P, d, d)  float64   sum of outer products of deviations: with `frames` and `mean`,
                                     the exact state needed to merge more footage later
    attributes: ModelAttributes (format_version, package_version, model config, backbone facts,
                channel_indices, grid, frames, sources, skipped_inputs, calibration)
Every array is chunked along positions only, one chunk per reduction shard, so each reducer writes
whole chunks (zarr read-modify-writes chunks: two writers in one chunk would race).

Models may be local folders or object-storage URIs, built with publish.begin_store and published
with commit_store: the root metadata is the last write, so nothing opens as a store before it is
complete. The map store (anomaly maps and their tables) is map_store.py.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field

import numpy as np
import zarr

from padim_ray.config import FORMAT_VERSION, ModelConfig
from padim_ray.errors import PadimError
from padim_ray.files import Location, replace_file, storage_errors
from padim_ray.leases import WRITING_MARKER
from padim_ray.publish import ROOT_METADATA, PendingStore, StoreKind, commit_store, is_committed

ARRAYS = {"mean": "float64", "covariance": "float64", "precision": "float32", "m2": "float64"}
MODEL_STORE = StoreKind("model", "", frozenset({ROOT_METADATA, *ARRAYS}))


class StoreError(PadimError):
    """A model store that cannot be written or read."""


def create_model_store(pending: PendingStore, positions: int, dims: int, shard_positions: int) -> None:
    """Create the empty arrays of a model store, chunked by `shard_positions`."""
    with storage_errors(pending.target):
        for name, dtype in ARRAYS.items():
            shape = (positions, dims) if name == "mean" else (positions, dims, dims)
            chunks = (shard_positions,) + shape[1:]
            zarr.create_array(pending.array_store(name), shape=shape, chunks=chunks, dtype=dtype, fill_value=0, zarr_format=3)


def open_pending_array(root: Location, name: str) -> zarr.Array:
    """Array `name` of the group being built at `root` (PendingStore.root), for writing."""
    return zarr.open_array((root / name).zarr_store(read_only=False), mode="r+", zarr_format=3)


def write_shard(root: Location, start: int, arrays: dict[str, np.ndarray]) -> None:
    """Write one position shard [start, start + len) of every array; shards must align with chunks."""
    with storage_errors(root):
        for name, values in arrays.items():
            open_pending_array(root, name)[start : start + len(values)] = values.astype(ARRAYS[name], copy=False)


@dataclass(frozen=True)
class ModelAttributes:
    """What a model store records beside its arrays: its group's attributes, names and values as on disk
    (with `format_version` first). Written by the fit, read by score, scenes, update and render."""

    package_version: str  # the padim-ray that wrote it
    config: dict  # ModelConfig.to_dict(), with `dims` resolved (see `model_config`)
    backbone: str
    weights_identity: str  # which weights the backbone had: a model is only scored or updated with the same
    stages: list[str]
    stage_channels: list[int]
    normalization: dict  # {"mean": [r, g, b], "std": [r, g, b]}
    image_size: int
    grid: list[int]  # (h, w) of the embedding
    dims: int
    channel_indices: list[int]  # the random channel subset "Rd"
    eps: float
    frames: int
    sources: list[dict]  # {"path", "start", "stop", "frames"} per work unit fitted
    skipped_inputs: list[dict] = field(default_factory=list)  # {"path", "reason"}; absent from the first models
    calibration: dict | None = None  # frame scores of footage the scoring model did not see (calibrate.py); None: uncalibrated

    @property
    def model_config(self) -> ModelConfig:
        return ModelConfig(**self.config)

    def to_attributes(self) -> dict:
        return {"format_version": FORMAT_VERSION, **asdict(self)}

    @classmethod
    def from_attributes(cls, attributes: dict) -> ModelAttributes:
        """The schema of stored `attributes` (of this FORMAT_VERSION, which open_model checks); other keys are ignored."""
        return cls(**{name: attributes[name] for name in cls.__dataclass_fields__ if name in attributes})


def publish_model(pending: PendingStore, attributes: ModelAttributes) -> None:
    """Record the attributes and the format version, making the model visible at its target (one last write)."""
    commit_store(pending, attributes.to_attributes())


def record_calibration(path: Location, calibration: dict | None) -> None:
    """Set the `calibration` attribute of the model at `path` in one write of its root metadata (a rename
    locally, one upload on object storage): readers see the old attributes or the new, never a mix. The
    caller holds the model's lease, so no other run replaces the model meanwhile."""
    root = Location(path) / ROOT_METADATA
    with storage_errors(root):
        metadata = json.loads(root.read_bytes())
    metadata["attributes"]["calibration"] = calibration
    replace_file(root, json.dumps(metadata, indent=2).encode())


@dataclass
class ModelStore:
    """An opened model store: attributes in memory, arrays read on demand."""

    path: Location
    attributes: ModelAttributes
    group: zarr.Group

    @property
    def attrs(self) -> dict:
        """The attributes as stored (for tools and tests; code reads `attributes`)."""
        return self.attributes.to_attributes()

    def read(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Positions [start, stop) of array `name` (one of ARRAYS)."""
        with storage_errors(self.path):
            return self.group[name][start:stop]

    def check_reproduced(self, embedder, refusal: str) -> None:
        """Raise StoreError (ending with `refusal`) unless `embedder` has the weights and channel subset
        this model was fitted with: statistics of other features would be silently wrong."""
        for key, ours in (("weights_identity", embedder.weights_identity), ("channel_indices", embedder.channel_indices.tolist())):
            stored = getattr(self.attributes, key)
            if stored != ours:
                raise StoreError(
                    f"model {self.path} was fitted with other {key.replace('_', ' ')} than this padim-ray reproduces "
                    f"({str(stored)[:60]}); {refusal}"
                )


def open_model(path: Location | str | os.PathLike) -> ModelStore:
    """Open a model store (local path or URI), checking that it is one and that this version can read it."""
    path = Location(path)
    if not is_committed(path):
        if not path.is_dir():
            raise StoreError(f"model {path} not found; fit one with `padim-ray fit`")
        if (path / WRITING_MARKER).exists():
            raise StoreError(f"model {path} is incomplete (its fit is running or failed); rerun the fit")
        raise StoreError(f"{path} is not a padim-ray model store (no zarr v3 group); fit one with `padim-ray fit`")
    with storage_errors(path):
        group = zarr.open_group(path.zarr_store(read_only=True), mode="r", zarr_format=3)
    attrs = dict(group.attrs)
    version = attrs.get("format_version")
    if version != FORMAT_VERSION:
        raise StoreError(
            f"model {path} has format version {version}, this padim-ray reads version {FORMAT_VERSION}; "
            "refit it with this version or install the padim-ray that wrote it"
        )
    missing = [name for name in ARRAYS if name not in group]
    if missing:
        raise StoreError(f"model {path} lacks arrays {missing}; it is incomplete, refit it")
    return ModelStore(path=path, attributes=ModelAttributes.from_attributes(attrs), group=group)
