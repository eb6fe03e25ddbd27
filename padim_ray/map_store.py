"""The anomaly-map store that `score` writes: one (T, H, W) zarr array per input in maps.zarr, written a
whole chunk at a time by the scoring actors, each chunk's per-frame rows recorded beside it (the
progress that recovery and resuming read), then scores.parquet (and with a threshold, events.parquet)
and the map group's attributes, its last write (publish.commit_store). Layout: docs/design.md, "Map store".
"""

from __future__ import annotations

import io
import os
from dataclasses import asdict, dataclass

import numpy as np
import zarr

from padim_ray.config import MAPS_FORMAT_VERSION, ScoreConfig
from padim_ray.files import Location, replace_file, storage_errors
from padim_ray.publish import PendingStore, StoreKind, commit_store, is_committed
from padim_ray.store import ModelStore, StoreError, open_pending_array
from padim_ray.video import NOT_LAST

SCORES_FILE = "scores.parquet"  # per-frame results, beside the maps
EVENTS_FILE = "events.parquet"  # the events a scoring's threshold found (decisions.py)
MAPS_GROUP = "maps.zarr"  # anomaly-map sequences, one array per input
MAPS_KIND = "anomaly-maps"  # the map group's `kind` attribute
MAP_SOURCE = "source"  # the attribute of an input's map array that names the input
# maps: 3x faster to write than zarr's default zstd (63 vs 184 ms per 32 frames of 768x576 float16
# here), 2.0x smaller instead of 2.3x; scoring writes every frame, so speed wins
MAP_COMPRESSOR = zarr.codecs.BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle")
MAP_STORE = StoreKind("anomaly-map store", MAPS_GROUP, frozenset({MAPS_GROUP, SCORES_FILE, EVENTS_FILE}))


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
        replace_file(self.pending.progress / f"{rows[0][0]}-{key[1]}.npz", buffer.getvalue())

    def drop_incomplete(self) -> None:
        """Forget the chunks still buffered (a split cut short): their frames are redone."""
        self.buffered.clear()
        self.ends.clear()


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

    write_parquet(where / SCORES_FILE, pa.table(table))


def write_parquet(file: Location, table) -> None:
    """A pyarrow table as a Parquet file, local or on object storage, in one write."""
    import pyarrow.parquet as pq

    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    file.write_bytes(buffer.getvalue())


def read_parquet(file: Location):
    """A Parquet file (local or on object storage) as a pyarrow table."""
    import pyarrow.parquet as pq

    return pq.read_table(io.BytesIO(file.read_bytes()))


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
    return read_parquet(Location(path) / SCORES_FILE).to_pandas()
