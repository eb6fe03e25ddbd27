"""Fit checkpoints: each stats actor's accumulator and the frames it holds, saved as the fit goes.

A checkpoint folder (next to the output by default) holds `fit.json`, the identity of the fit that
owns it, and one `actor-*.npz` per stats actor: its float64 sums and its accounting (which frames
of which work unit they hold), replaced atomically at every save. A lost actor's file is its work
up to the last save; a killed driver's rerun merges every file and decodes only the frames none of
them holds. A folder of another fit's identity is refused, never mixed in.
"""

from __future__ import annotations

import fnmatch
import json
import os
import tempfile
import uuid
from dataclasses import dataclass, field

import numpy as np
import ray

from padim_ray.accounting import Accounting
from padim_ray.errors import PadimError
from padim_ray.gaussian import StatsAccumulator
from padim_ray.files import Location, StorageError, make_parent_folders
from padim_ray.leases import Lease

IDENTITY_FILE = "fit.json"
OWN_FILES = (IDENTITY_FILE, "actor-*.npz", "claimed-actor-*.npz", "actor-*.npz.lost", ".actor-*.tmp", f".{IDENTITY_FILE}.*.tmp")


class CheckpointError(PadimError):
    """A checkpoint folder that cannot be used for this fit."""


def default_checkpoint_dir(out: Location) -> Location:
    """Where a fit writing `out` keeps its checkpoints unless told otherwise: a hidden sibling."""
    return out.parent / f".{out.name}.checkpoint"


@dataclass(frozen=True)
class Checkpoints:
    """An opened checkpoint folder (local, or a prefix on object storage) of one fit configuration.

    `open` takes the folder's Lease: one run at a time writes, merges and removes its files.
    """

    path: Location
    lease: Lease | None = field(default=None, compare=False, repr=False)

    @classmethod
    def open(cls, path: Location | str | os.PathLike, identity: dict) -> Checkpoints:
        """Create `path` for a fit of `identity` (with missing folders above it), or reopen it if an
        earlier run of the same fit made it; a folder another live run holds is refused."""
        path = Location(path)
        make_parent_folders(path, "--checkpoint-dir")
        identity = json.loads(json.dumps(identity))  # as it reads back from disk (tuples become lists)
        file = path / IDENTITY_FILE
        _check_identity(file, identity)  # first: another fit's folder is refused whoever holds it
        lease = Lease(path, "--checkpoint-dir")
        try:
            if not file.is_file():
                _write_atomically(file, lambda f: f.write(json.dumps(identity, indent=1).encode()))
        except BaseException:
            lease.release()
            raise
        return cls(path, lease)

    def _listing(self) -> list[Location]:
        """This folder's files (none if it does not exist): one listing, filtered by `_matching`."""
        return self.path.iterdir() if self.path.exists() else []

    def files(self) -> list[Location]:
        """Every checkpoint: each actor's last one and those taken over from lost actors, of every run.

        An actor's file with a lost marker is left out: the actor was taken for lost and its file
        claimed, and a save it finished after that (possible on object storage, where the claim is a
        copy and a delete) holds frames that were redone elsewhere.
        """
        listing = self._listing()
        lost = {file.name for file in _matching(listing, "actor-*.npz.lost")}
        actors = [file for file in _matching(listing, "actor-*.npz") if f"{file.name}.lost" not in lost]
        return actors + _matching(listing, "claimed-actor-*.npz")

    def claim(self, file: Location) -> Location:
        """Take over a lost actor's checkpoint: mark it so the actor, if it is still running after
        all, saves no more (see StatsActor.batch_done), and move it out of its way."""
        lost_marker(file).write_bytes(b"")
        claimed = file.parent / f"claimed-{file.name}"
        if file.is_file():
            file.move_to(claimed)
        return claimed

    def new_file(self) -> Location:
        """A fresh checkpoint file for one actor."""
        return self.path / f"actor-{uuid.uuid4().hex[:12]}.npz"

    def remove_if_empty(self) -> None:
        """Remove the folder unless it holds progress worth resuming from (a failed fit's); release the lease."""
        if not self.files():
            self.remove()
        elif self.lease:
            self.lease.release()

    def remove(self) -> None:
        """Remove this fit's files (only those: the folder may be a user's), release the lease, and
        remove the folder if then empty."""
        listing = self._listing()
        for pattern in OWN_FILES:
            for file in _matching(listing, pattern):
                file.remove()
        if self.lease:
            self.lease.release()
        if not self.path.is_remote:
            try:
                os.rmdir(self.path.path)
            except OSError:
                pass  # holds files of the user's, or is gone


def _check_identity(file: Location, identity: dict) -> None:
    """Refuse a checkpoint folder whose identity file names another fit."""
    if not file.is_file():
        return
    saved = json.loads(file.read_bytes())
    differ = sorted(key for key in identity.keys() | saved.keys() if identity.get(key) != saved.get(key))
    if differ:
        raise CheckpointError(
            f"checkpoint {file.parent} belongs to a fit with other {', '.join(differ)}; rerun that fit to resume it, "
            "or remove the folder (or pass another --checkpoint-dir) to start over"
        )


def _matching(files: list[Location], pattern: str) -> list[Location]:
    """The files whose names match `pattern` (only names: a folder's own name is never a pattern)."""
    return [file for file in files if fnmatch.fnmatchcase(file.name, pattern)]


def lost_marker(file: Location) -> Location:
    """The file whose existence tells a stats actor that the driver took its checkpoint over."""
    return file.parent / f"{file.name}.lost"


def save_checkpoint(file: Location, accumulator: StatsAccumulator, accounting: Accounting) -> None:
    """Replace `file` with the accumulator and its accounting, atomically (a crash keeps the old one)."""
    _write_atomically(file, lambda f: np.savez(f, **accumulator.state(), **accounting.to_arrays()))


@ray.remote
def checkpoint_shards(file: Location, bounds: list[tuple[int, int]]) -> list:
    """A checkpoint's accounting, then its statistics split into position shards (as StatsActor.shards).

    Both come from one read of the file. Call with num_returns=len(bounds) + 1; the refs are owned by the caller.
    """
    with file.local_copy() as path, np.load(path) as arrays:
        accounting = Accounting.from_arrays(arrays)
        accumulator = StatsAccumulator.from_state(arrays)
    return [accounting] + [accumulator.stats(start, stop, in_place=True) for start, stop in bounds]


def _write_atomically(file: Location, write) -> None:
    """Write `file` through a temp file: renamed into place locally, uploaded in one (multipart)
    put on object storage, which makes it visible only when complete."""
    folder = file.parent.path if not file.is_remote else None
    try:
        if folder:
            os.makedirs(folder, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=f".{file.name}.", suffix=".tmp", dir=folder)
        try:
            with os.fdopen(handle, "wb") as out:
                write(out)
                out.flush()
                os.fsync(out.fileno())
            if folder:
                os.replace(temporary, file.path)
            else:
                file.upload(temporary)
        finally:
            if os.path.exists(temporary):
                os.unlink(temporary)
    except OSError as err:
        raise CheckpointError(
            f"cannot write checkpoint {file} ({err.strerror or err}); free space there or pass a writable --checkpoint-dir"
        ) from None
    except StorageError as err:
        raise CheckpointError(f"cannot write checkpoint: {err}; pass a writable --checkpoint-dir") from None
