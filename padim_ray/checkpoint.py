"""Fit checkpoints: each stats actor's accumulator and the frames it holds, saved as the fit goes.

A checkpoint folder (next to the output by default) holds `fit.json`, the identity of the fit that
owns it, and one `actor-*.npz` per stats actor: its float64 sums and its accounting (which frames
of which work unit they hold), replaced atomically at every save. A lost actor's file is its work
up to the last save; a killed driver's rerun merges every file and decodes only the frames none of
them holds. A folder of another fit's identity is refused, never mixed in.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import ray

from padim_ray.accounting import Accounting
from padim_ray.errors import PadimError
from padim_ray.gaussian import StatsAccumulator

IDENTITY_FILE = "fit.json"


class CheckpointError(PadimError):
    """A checkpoint folder that cannot be used for this fit."""


def default_checkpoint_dir(out: Path) -> Path:
    """Where a fit writing `out` keeps its checkpoints unless told otherwise: a hidden sibling."""
    return out.parent / f".{out.name}.checkpoint"


@dataclass(frozen=True)
class Checkpoints:
    """An opened checkpoint folder of one fit configuration."""

    path: Path

    @classmethod
    def open(cls, path: Path, identity: dict) -> Checkpoints:
        """Create `path` for a fit of `identity`, or reopen it if an earlier run of the same fit made it."""
        identity = json.loads(json.dumps(identity))  # as it reads back from disk (tuples become lists)
        file = path / IDENTITY_FILE
        if file.is_file():
            saved = json.loads(file.read_text())
            differ = sorted(key for key in identity.keys() | saved.keys() if identity.get(key) != saved.get(key))
            if differ:
                raise CheckpointError(
                    f"checkpoint {path} belongs to a fit with other {', '.join(differ)}; rerun that fit to resume it, "
                    "or remove the folder (or pass another --checkpoint-dir) to start over"
                )
        else:
            try:
                path.mkdir(parents=True, exist_ok=True)
                _write_atomically(file, lambda f: f.write(json.dumps(identity, indent=1).encode()))
            except OSError as err:
                raise CheckpointError(f"cannot write checkpoints to {path} ({err.strerror}); pass a writable --checkpoint-dir") from None
        return cls(path)

    def files(self) -> list[Path]:
        """Every checkpoint: each actor's last one and those taken over from lost actors, of every run."""
        return sorted(self.path.glob("actor-*.npz")) + self.claimed_files()

    def claim(self, file: str) -> Path:
        """Take over a lost actor's checkpoint: mark it so the actor, if it is still running after
        all, saves no more (see StatsActor.batch_done), and rename it out of its way."""
        Path(lost_marker(file)).touch()
        claimed = Path(file).with_name(f"claimed-{Path(file).name}")
        if Path(file).is_file():
            os.replace(file, claimed)
        return claimed

    def claimed_files(self) -> list[Path]:
        return sorted(self.path.glob("claimed-actor-*.npz"))

    def new_file(self) -> str:
        """A fresh checkpoint file name for one actor."""
        return str(self.path / f"actor-{uuid.uuid4().hex[:12]}.npz")

    def remove_if_empty(self) -> None:
        """Remove the folder unless it holds progress worth resuming from (a failed fit's)."""
        if not self.files() and not self.claimed_files():
            self.remove()

    def remove(self) -> None:
        """Remove this fit's files (only those: the folder may be a user's), and the folder if then empty."""
        for pattern in (IDENTITY_FILE, "actor-*.npz", "claimed-actor-*.npz", "actor-*.npz.lost", ".actor-*.tmp", f".{IDENTITY_FILE}.*.tmp"):
            for file in self.path.glob(pattern):
                file.unlink(missing_ok=True)
        try:
            self.path.rmdir()
        except OSError:
            pass  # holds files of the user's


def lost_marker(file: str) -> str:
    """The file whose existence tells a stats actor that the driver took its checkpoint over."""
    return f"{file}.lost"


def save_checkpoint(file: str, accumulator: StatsAccumulator, accounting: Accounting) -> None:
    """Replace `file` with the accumulator and its accounting, atomically (a crash keeps the old one)."""
    try:
        _write_atomically(Path(file), lambda f: np.savez(f, **accumulator.state(), **accounting.to_arrays()))
    except OSError as err:
        raise CheckpointError(f"cannot write checkpoint {file} ({err.strerror}); free space there or pass another --checkpoint-dir") from None


@ray.remote
def checkpoint_shards(file: str, bounds: list[tuple[int, int]]) -> list:
    """A checkpoint's accounting, then its statistics split into position shards (as StatsActor.shards).

    Both come from one read of the file. Call with num_returns=len(bounds) + 1; the refs are owned by the caller.
    """
    with np.load(file) as arrays:
        accounting = Accounting.from_arrays(arrays)
        accumulator = StatsAccumulator.from_state(arrays)
    return [accounting] + [accumulator.stats(start, stop, in_place=True) for start, stop in bounds]


def _write_atomically(file: Path, write) -> None:
    temporary = file.with_name(f".{file.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(temporary, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, file)
    finally:
        temporary.unlink(missing_ok=True)
