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

Stores may be local folders or object-storage URIs. Both are built with publish.begin_store and
published with commit_store: the root metadata (the model group's, or a map store's maps.zarr's)
is the last write, so nothing opens as a store before it is complete.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import asdict, dataclass, field

import numpy as np
import zarr

from padim_ray.config import FORMAT_VERSION, MAPS_FORMAT_VERSION, ModelConfig, ScoreConfig
from padim_ray.errors import PadimError
from padim_ray.video import NOT_LAST
from padim_ray.files import Location, storage_errors
from padim_ray.leases import WRITING_MARKER
from padim_ray.publish import ROOT_METADATA, PendingStore, StoreKind, commit_store, is_committed

SCORES_FILE = "scores.parquet"  # per-frame results, beside the maps
EVENTS_FILE = "events.parquet"  # the events a scoring's threshold found (decisions.py)
MAPS_GROUP = "maps.zarr"  # anomaly-map sequences, one array per input
MAPS_KIND = "anomaly-maps"  # the map group's `kind` attribute
MAP_SOURCE = "source"  # the attribute of an input's map array that names the input
# maps: 3x faster to write than zarr's default zstd (63 vs 184 ms per 32 frames of 768x576 float16
# here), 2.0x smaller instead of 2.3x; scoring writes every frame, so speed wins
MAP_COMPRESSOR = zarr.codecs.BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle")
ARRAYS = {"mean": "float64", "covariance": "float64", "precision": "float32", "m2": "float64"}
MODEL_STORE = StoreKind("model", "", frozenset({ROOT_METADATA, *ARRAYS}))
MAP_STORE = StoreKind("anomaly-map store", MAPS_GROUP, frozenset({MAPS_GROUP, SCORES_FILE, EVENTS_FILE}))


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
    _replace_file(root, json.dumps(metadata, indent=2).encode())


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


@dataclass(frozen=True)
class MapTarget:
    """Where the maps of one work unit go: the input's array in maps.zarr, at this (H, W)."""

    input_id: str
    size: tuple[int, int]


def create_map_arrays(pending: PendingStore, dtype: str, chunk_frames: int, arrays: dict[str, tuple[tuple, str]]) -> None:
    """Create one (T, H, W) array per input id in the pending `maps.zarr`, chunked by `chunk_frames`
    frames, from its (shape, source): the input's path, recorded as the array's one attribute.

    T is what the input's header declares; trim_map_arrays cuts each array to the frames decoded.
    """
    with storage_errors(pending.target):
        for input_id, (shape, source) in arrays.items():
            zarr.create_array(
                pending.array_store(input_id), shape=shape, chunks=(chunk_frames, *shape[1:]), dtype=dtype, fill_value=0,
                compressors=[MAP_COMPRESSOR], attributes={MAP_SOURCE: source}, zarr_format=3,
                overwrite=True,  # one a run stopped before recording any chunk left (see score_inputs)
            )


def map_source(array: zarr.Array) -> str | None:
    """The input (path or URI) whose maps `array` holds (None if not recorded)."""
    return array.attrs.get(MAP_SOURCE)


@dataclass(frozen=True)
class MapAttributes:
    """What a map store's maps.zarr records: the model and blur that made its maps (names and values as
    on disk, with `format_version` and `kind` first). Two map stores of equal MapAttributes were scored
    alike; a rerun of the same scoring resumes on them (score._identity)."""

    model: str  # the model store's URI
    model_facts: dict  # the model's backbone, weights_identity, dims, image_size and frames
    blur_sigma: float
    blur_truncate: float
    blur_at: str

    @classmethod
    def of(cls, store: ModelStore, score: ScoreConfig) -> MapAttributes:
        """The attributes of maps scored by the model `store` as it is now, with `score`'s blur."""
        facts = store.attributes
        return cls(
            model=store.path.uri,
            model_facts={
                "backbone": facts.backbone, "weights_identity": facts.weights_identity, "dims": facts.dims,
                "image_size": facts.image_size, "frames": facts.frames,
            },
            blur_sigma=score.blur_sigma, blur_truncate=score.blur_truncate, blur_at=score.blur_at,
        )

    def to_attributes(self) -> dict:
        return {"format_version": MAPS_FORMAT_VERSION, "kind": MAPS_KIND, **asdict(self)}

    @classmethod
    def from_attributes(cls, attributes) -> MapAttributes:
        """The schema of stored `attributes` (of this MAPS_FORMAT_VERSION, which open_maps checks); None for a missing field."""
        return cls(**{name: attributes.get(name) for name in cls.__dataclass_fields__})


def publish_maps(pending: PendingStore, attributes: MapAttributes) -> None:
    """Write the map group's attributes last, making the map store visible at its target."""
    commit_store(pending, attributes.to_attributes())


ROW_COLUMNS = {"unit": np.int64, "index": np.int64, "unit_total": np.int64, "score": np.float32, "max_y": np.int64, "max_x": np.int64}


class MapChunkWriter:
    """Writes anomaly maps into the arrays of a map store, one whole chunk per write, then the chunk's
    per-frame rows (ROW_COLUMNS) as one file in the store's progress folder: the record of finished
    work that a redo after a lost actor, or a rerun after a stopped one, keeps.

    Many writers share a store; zarr read-modify-writes chunks, so each chunk must have one writer:
    decode blocks hold whole chunks, and a chunk is written once all its frames are in (up to its
    unit's last frame, in whatever order they came). A chunk still incomplete when a split ends (the
    actor was stopped, or Ray Data cut a block between actors) is dropped, and redone. A chunk's rows
    file has one name whoever writes it: a chunk is never recorded twice.
    """

    def __init__(self, pending: PendingStore, chunk_frames: int):
        self.pending = pending
        self.chunk_frames = chunk_frames
        self.arrays: dict[str, zarr.Array] = {}
        self.buffered: dict[tuple[str, int], dict[int, tuple[np.ndarray, tuple]]] = {}
        self.ends: dict[tuple[str, int], int] = {}  # chunk -> the index of its unit's last frame, in the chunk

    def add(self, input_id: str, row: tuple, anomaly_map: np.ndarray) -> None:
        """Buffer one frame's map (in the store's dtype) and its row (values of ROW_COLUMNS)."""
        index = row[1]
        if input_id not in self.arrays:  # every chunk gets written: skip zarr's all-fill-value scan (~15 ms each)
            with storage_errors(self.pending.root):
                self.arrays[input_id] = open_pending_array(self.pending.root, input_id).with_config({"write_empty_chunks": True})
        if index >= self.arrays[input_id].shape[0]:
            source = map_source(self.arrays[input_id])
            raise StoreError(f"{source} decoded to more frames than its header declares ({index + 1} > "
                             f"{self.arrays[input_id].shape[0]}); re-encode it (e.g. ffmpeg -i IN -c:v libx264 OUT.mp4)")
        key = (input_id, index // self.chunk_frames)
        frames = self.buffered.setdefault(key, {})
        frames[index] = (anomaly_map, row)
        if row[2] != NOT_LAST:  # the unit's last frame: its chunk ends here
            self.ends[key] = index
        if len(frames) == self._frames_in(key):  # complete (its frames may arrive in any order: blocks do)
            self._write(key)

    def _frames_in(self, key: tuple[str, int]) -> int:
        """Frames of chunk `key`: a full chunk, or those up to its unit's last frame."""
        end = self.ends.get(key)
        return self.chunk_frames if end is None else end - key[1] * self.chunk_frames + 1

    def _write(self, key: tuple[str, int]) -> None:
        frames = self.buffered.pop(key)
        self.ends.pop(key, None)
        indices = sorted(frames)
        with storage_errors(self.pending.root):
            self.arrays[key[0]][indices[0] : indices[-1] + 1] = np.stack([frames[i][0] for i in indices])
        rows = [frames[i][1] for i in indices]
        columns = {name: np.array([row[c] for row in rows], dtype=dtype) for c, (name, dtype) in enumerate(ROW_COLUMNS.items())}
        buffer = io.BytesIO()
        np.savez(buffer, **columns)
        _replace_file(self.pending.progress / f"{rows[0][0]}-{key[1]}.npz", buffer.getvalue())

    def drop_incomplete(self) -> None:
        """Forget the chunks still buffered (a split cut short): their frames are redone."""
        self.buffered.clear()
        self.ends.clear()


def _replace_file(file: Location, data: bytes) -> None:
    """Write `file` in one step: a rename locally (a killed writer leaves no half file), one upload on object storage."""
    if file.is_remote:
        file.write_bytes(data)
        return
    temporary = file.parent / f".{file.name}.{os.getpid()}.tmp"
    temporary.write_bytes(data)
    temporary.move_to(file)


def read_progress(pending: PendingStore) -> dict[str, np.ndarray]:
    """Every row the MapChunkWriters recorded in `pending`'s progress folder (ROW_COLUMNS; none if empty)."""
    folder = pending.progress
    files = [f.path for f in folder.iterdir() if f.name.endswith(".npz")] if folder.is_dir() else []
    with storage_errors(folder):
        contents = folder.fs.cat(files) if files else {}  # concurrent reads on object storage
    parts = [np.load(io.BytesIO(data)) for data in contents.values()]
    return {name: np.concatenate([p[name] for p in parts]) if parts else np.zeros(0, dtype) for name, dtype in ROW_COLUMNS.items()}


def trim_map_arrays(root: Location, frames: dict[str, int]) -> None:
    """Cut each input's map array (in the pending maps.zarr `root`) to the frames actually decoded."""
    with storage_errors(root):
        for input_id, count in frames.items():
            array = open_pending_array(root, input_id)
            if array.shape[0] != count:
                array.resize((count, *array.shape[1:]))


def write_scores(where: Location, table: dict[str, list]) -> None:
    """The per-frame results as `scores.parquet` in the map store folder `where` (one write)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    buffer = io.BytesIO()
    pq.write_table(pa.table(table), buffer)
    (where / SCORES_FILE).write_bytes(buffer.getvalue())


def open_maps(path: Location | str | os.PathLike) -> zarr.Group:
    """The map group of an output of `padim-ray score`, checking its format version."""
    path = Location(path)
    if not is_committed(path, MAPS_GROUP) or not (path / SCORES_FILE).is_file():
        raise StoreError(f"anomaly maps {path} not found (no {MAPS_GROUP} and {SCORES_FILE}); write them with `padim-ray score`")
    with storage_errors(path):
        group = zarr.open_group((path / MAPS_GROUP).zarr_store(read_only=True), mode="r", zarr_format=3)
    version = group.attrs.get("format_version")
    if version != MAPS_FORMAT_VERSION or group.attrs.get("kind") != MAPS_KIND:
        raise StoreError(f"{path} is not an anomaly-map store of format {MAPS_FORMAT_VERSION} (found {version}); rescore with this version")
    return group


def read_scores(path: Location | str | os.PathLike):
    """The per-frame table (pandas) of a map store."""
    import pyarrow.parquet as pq

    return pq.read_table(io.BytesIO((Location(path) / SCORES_FILE).read_bytes())).to_pandas()
