"""The zarr v3 model store: arrays chunked by position, written shard by shard, published atomically.

Layout of MODEL/ (a zarr v3 group):
    mean        (P, d)     float64   per-position mean
    covariance  (P, d, d)  float64   M2 / (N - 1) + eps * I (eq. 1)
    precision   (P, d, d)  float32   inverse covariance, the dtype scoring uses
    m2          (P, d, d)  float64   sum of outer products of deviations: with `frames` and `mean`,
                                     the exact state needed to merge more footage later
    attributes: format_version, package_version, model config, backbone facts, channel_indices, grid,
                frames, sources, ...
Every array is chunked along positions only, one chunk per reduction shard, so each reducer writes
whole chunks (zarr read-modify-writes chunks: two writers in one chunk would race).
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr

from padim_ray.config import FORMAT_VERSION, MAPS_FORMAT_VERSION
from padim_ray.errors import PadimError
from padim_ray.storage import Location, remove_staging_leftovers

SCORES_FILE = "scores.parquet"  # per-frame results, beside the maps
MAPS_GROUP = "maps.zarr"  # anomaly-map sequences, one array per input
# maps: 3x faster to write than zarr's default zstd (63 vs 184 ms per 32 frames of 768x576 float16
# here), 2.0x smaller instead of 2.3x; scoring writes every frame, so speed wins
MAP_COMPRESSOR = zarr.codecs.BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle")
ARRAYS = {"mean": "float64", "covariance": "float64", "precision": "float32", "m2": "float64"}


class StoreError(PadimError):
    """A model store that cannot be written or read."""


def make_staging(out: Path, overwrite: bool) -> Path:
    """Check the target and create an empty sibling folder to build the store in, before any work.

    The store is renamed onto `out` only when complete, so a failed fit leaves nothing at `out`.
    """
    if out.exists() and not overwrite:
        raise StoreError(f"output {out} already exists; pass --overwrite or choose another --out")
    parent = out.parent
    if not parent.is_dir():
        raise StoreError(f"output folder {parent} does not exist; create it or choose another --out")
    remove_staging_leftovers(Location(parent), out.name)
    staging = parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
    try:
        staging.mkdir()
    except OSError as err:
        raise StoreError(f"output folder {parent} is not writable ({err.strerror}); choose another --out") from None
    return staging


@contextmanager
def staged_output(out: Path, overwrite: bool):
    """Yield a staging folder for `out` (see make_staging) and remove whatever is left of it after."""
    staging = make_staging(out, overwrite)
    try:
        yield staging
    finally:
        remove_tree(staging)


def create_model_store(path: Path, positions: int, dims: int, shard_positions: int) -> None:
    """Create the empty arrays of a model store, chunked by `shard_positions`."""
    group = zarr.open_group(str(path), mode="w", zarr_format=3)
    for name, dtype in ARRAYS.items():
        shape = (positions, dims) if name == "mean" else (positions, dims, dims)
        chunks = (shard_positions,) + shape[1:]
        group.create_array(name, shape=shape, chunks=chunks, dtype=dtype, fill_value=0)


def write_shard(path: Path, start: int, arrays: dict[str, np.ndarray]) -> None:
    """Write one position shard [start, start + len) of every array; shards must align with chunks."""
    group = zarr.open_group(str(path), mode="r+", zarr_format=3)
    for name, values in arrays.items():
        group[name][start : start + len(values)] = values.astype(ARRAYS[name], copy=False)


def set_model_attributes(staging: Path, attributes: dict) -> None:
    """Record the model's attributes and the format version."""
    group = zarr.open_group(str(staging), mode="r+", zarr_format=3)
    group.attrs.update({"format_version": FORMAT_VERSION, **attributes})


def publish(staging: Path, out: Path, overwrite: bool) -> None:
    """Move a finished store onto `out` in one rename (replacing it only with `overwrite`)."""
    if out.exists():
        if not overwrite:
            raise StoreError(f"output {out} appeared during the fit; pass --overwrite or choose another --out")
        trash = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(out, trash)
        os.replace(staging, out)
        remove_tree(trash)
    else:
        os.replace(staging, out)


def remove_tree(path: Path) -> None:
    """Remove a staging or replaced store, ignoring one that is already gone."""
    shutil.rmtree(path, ignore_errors=True)


@dataclass
class ModelStore:
    """An opened model store: attributes in memory, arrays read on demand."""

    path: Path
    attrs: dict
    group: zarr.Group

    def read(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Positions [start, stop) of array `name` (one of ARRAYS)."""
        return self.group[name][start:stop]


def open_model(path: str | Path) -> ModelStore:
    """Open a model store, checking that it is one and that this version can read it."""
    path = Path(path)
    if not path.is_dir():
        raise StoreError(f"model {path} not found; fit one with `padim-ray fit`")
    try:
        group = zarr.open_group(str(path), mode="r", zarr_format=3)
    except Exception:
        raise StoreError(f"{path} is not a padim-ray model store (no zarr v3 group); fit one with `padim-ray fit`") from None
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
    return ModelStore(path=path, attrs=attrs, group=group)


@dataclass(frozen=True)
class MapTarget:
    """Where the maps of one work unit go: the input's array in maps.zarr, at this (H, W)."""

    input_id: str
    size: tuple[int, int]


def create_map_store(path: Path, dtype: str, chunk_frames: int, arrays: dict[str, tuple[tuple, dict]], attributes: dict) -> None:
    """Create `path/maps.zarr` with one (T, H, W) array per input, chunked by `chunk_frames` frames.

    T is what the input's header declares; trim_map_arrays cuts each array to the frames decoded.
    """
    group = zarr.open_group(str(path / MAPS_GROUP), mode="w", zarr_format=3)
    group.attrs.update({"format_version": MAPS_FORMAT_VERSION, **attributes})
    for input_id, (shape, array_attributes) in arrays.items():
        group.create_array(
            input_id, shape=shape, chunks=(chunk_frames, *shape[1:]), dtype=dtype, fill_value=0,
            compressors=[MAP_COMPRESSOR], attributes=array_attributes,
        )


class MapChunkWriter:
    """Writes anomaly maps into the arrays of a map store, one whole chunk per write.

    Many writers share a store; zarr read-modify-writes chunks, so each chunk must have one writer.
    Rows are buffered per chunk until it is full or its input ends; `written` lists the chunks this
    writer wrote, for check_chunk_owners.
    """

    def __init__(self, path: Path, chunk_frames: int):
        self.group = zarr.open_group(str(path / MAPS_GROUP), mode="r+", zarr_format=3)
        self.chunk_frames = chunk_frames
        self.arrays: dict[str, zarr.Array] = {}
        self.pending: dict[tuple[str, int], dict[int, np.ndarray]] = {}
        self.written: list[tuple[str, int]] = []

    def add(self, input_id: str, index: int, anomaly_map: np.ndarray, last: bool) -> None:
        """Buffer the map (in the store's dtype) of frame `index` of `input_id`; `last` marks the input's last frame."""
        if input_id not in self.arrays:  # every chunk gets written: skip zarr's all-fill-value scan (~15 ms each)
            self.arrays[input_id] = self.group[input_id].with_config({"write_empty_chunks": True})
        if index >= self.arrays[input_id].shape[0]:
            source = self.arrays[input_id].attrs["source"]
            raise StoreError(f"{source} decoded to more frames than its header declares ({index + 1} > "
                             f"{self.arrays[input_id].shape[0]}); re-encode it (e.g. ffmpeg -i IN -c:v libx264 OUT.mp4)")
        key = (input_id, index // self.chunk_frames)
        rows = self.pending.setdefault(key, {})
        rows[index] = anomaly_map
        if len(rows) == self.chunk_frames or last:
            self._write(key)

    def _write(self, key: tuple[str, int]) -> None:
        rows = self.pending.pop(key)
        indices = sorted(rows)
        runs = np.split(np.array(indices), np.flatnonzero(np.diff(indices) != 1) + 1)  # contiguous frame runs
        array = self.arrays[key[0]]
        for run in runs:
            array[run[0] : run[-1] + 1] = np.stack([rows[i] for i in run])
        self.written.append(key)

    def close(self) -> None:
        """Write chunks still buffered (only a block split between writers leaves any)."""
        for key in list(self.pending):
            self._write(key)


def check_chunk_owners(written: list[list[tuple[str, int]]]) -> None:
    """Raise if two writers wrote the same chunk (their read-modify-writes may have lost frames)."""
    owners = Counter(key for keys in written for key in set(keys))
    shared = sorted(key for key, count in owners.items() if count > 1)
    if shared:
        raise StoreError(f"map chunks {shared[:5]} were written by more than one actor; maps may be incomplete, rescore")


def trim_map_arrays(path: Path, frames: dict[str, int]) -> None:
    """Cut each input's map array to the frames actually decoded (headers may over-report)."""
    group = zarr.open_group(str(path / MAPS_GROUP), mode="r+", zarr_format=3)
    for input_id, count in frames.items():
        array = group[input_id]
        if array.shape[0] != count:
            array.resize((count, *array.shape[1:]))


def write_scores(path: Path, table: dict[str, list]) -> None:
    """The per-frame results as `scores.parquet` inside the map store."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(table), path / SCORES_FILE)


def open_maps(path: str | Path) -> zarr.Group:
    """The map group of an output of `padim-ray score`, checking its format version."""
    path = Path(path)
    if not (path / MAPS_GROUP / "zarr.json").is_file() or not (path / SCORES_FILE).is_file():
        raise StoreError(f"anomaly maps {path} not found (no {MAPS_GROUP} and {SCORES_FILE}); write them with `padim-ray score`")
    group = zarr.open_group(str(path / MAPS_GROUP), mode="r", zarr_format=3)
    version = group.attrs.get("format_version")
    if version != MAPS_FORMAT_VERSION or group.attrs.get("kind") != "anomaly-maps":
        raise StoreError(f"{path} is not an anomaly-map store of format {MAPS_FORMAT_VERSION} (found {version}); rescore with this version")
    return group
