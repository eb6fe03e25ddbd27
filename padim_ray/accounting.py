"""Exactly-once frame accounting: which frames of which work unit a consumer used, and proof that a
run used every frame of every unit once.

A frame is identified by (work unit id, frame index within its input), both stable across runs, so
accountings from different actors, checkpoints and runs can be merged and checked for overlap; the
frames a run still has to do are what the merged accounting lacks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from padim_ray.errors import PadimError
from padim_ray.video import NOT_LAST, WorkUnit


class FrameAccountingError(PadimError):
    """The frames accumulated differ from the frames decoded."""


@dataclass
class Accounting:
    """What one consumer (or, merged, a whole run) used: frame indices per work unit, units' totals."""

    used: dict = field(default_factory=dict)  # unit id -> list of int64 arrays of frame indices used
    totals: dict = field(default_factory=dict)  # unit id -> frames the decoder produced for it
    count: int = 0  # frames used: folded into statistics, or scored
    bad: set = field(default_factory=set)  # unit ids the decoder marked as undecodable (BAD_UNIT rows)

    def add_batch(self, units: np.ndarray, indices: np.ndarray, unit_totals: np.ndarray) -> None:
        """Count a batch's frame rows (columns `unit`, `index` and `unit_total` of the decoder's output)."""
        for uid in np.unique(units).tolist():
            self.used.setdefault(uid, []).append(indices[units == uid].astype(np.int64))
        last = unit_totals != NOT_LAST
        self.totals.update(zip(units[last].tolist(), unit_totals[last].tolist()))
        self.count += len(units)

    def add_bad(self, units: np.ndarray) -> None:
        """Record units marked undecodable (rows whose `unit_total` is BAD_UNIT)."""
        self.bad.update(units.tolist())

    def touches(self, units: set[int]) -> bool:
        """Whether any frame of `units` was used."""
        return not units.isdisjoint(self.used)

    def indices(self, uid: int) -> np.ndarray:
        """Sorted frame indices of unit `uid` used (empty if none)."""
        parts = self.used.get(uid, [])
        return np.sort(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.int64)

    def rows(self, uid: int) -> int:
        return sum(len(part) for part in self.used.get(uid, []))

    def merge(self, other: Accounting) -> Accounting:
        """Both accountings together; a frame used by both, or two totals for one unit, is an error."""
        for uid in self.used.keys() & other.used.keys():
            twice = np.intersect1d(self.indices(uid), other.indices(uid))
            if len(twice):
                raise FrameAccountingError(f"frames {twice[:5].tolist()} of work unit {uid} were used twice")
        for uid in self.totals.keys() & other.totals.keys():
            if self.totals[uid] != other.totals[uid]:
                raise FrameAccountingError(
                    f"work unit {uid} decoded to {self.totals[uid]} frames once and {other.totals[uid]} another time; "
                    "its decoding is not deterministic: re-encode it"
                )
        used = {uid: self.used.get(uid, []) + other.used.get(uid, []) for uid in self.used.keys() | other.used.keys()}
        return Accounting(used, {**self.totals, **other.totals}, self.count + other.count, self.bad | other.bad)

    def unfinished(self, units: list[WorkUnit]) -> dict[int, np.ndarray]:
        """Units some frames of which are still to do: unit id -> the indices already used (to skip)."""
        return {
            u.uid: self.indices(u.uid) for u in units if u.uid not in self.totals or self.rows(u.uid) != self.totals[u.uid]
        }

    def check(self, units: list[WorkUnit]) -> int:
        """Raise unless every unit was decoded to its end and each of its frames used exactly once."""
        for unit in units:
            if unit.uid not in self.totals:
                raise FrameAccountingError(f"input {unit.path} was never fully decoded; the run is incomplete")
            indices = self.indices(unit.uid)
            if len(indices) != self.totals[unit.uid] or len(np.unique(indices)) != len(indices):
                raise FrameAccountingError(
                    f"input {unit.path}: decoded {self.totals[unit.uid]} frames but used {len(indices)} "
                    f"({len(indices) - len(np.unique(indices))} twice)"
                )
        frames = sum(self.totals[u.uid] for u in units)
        if frames != self.count:
            raise FrameAccountingError(f"{self.count} frames were used, the inputs decoded to {frames}")
        return frames

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Flat arrays for a checkpoint file (see from_arrays)."""
        uids = sorted(self.used)
        return {
            "used_units": np.concatenate([np.full(self.rows(u), u, dtype=np.int64) for u in uids]) if uids else np.zeros(0, np.int64),
            "used_indices": np.concatenate([self.indices(u) for u in uids]) if uids else np.zeros(0, np.int64),
            "total_units": np.array(list(self.totals), dtype=np.int64),
            "total_frames": np.array(list(self.totals.values()), dtype=np.int64),
            "bad_units": np.array(sorted(self.bad), dtype=np.int64),
        }

    @classmethod
    def from_arrays(cls, arrays) -> Accounting:
        accounting = cls()
        units, indices = arrays["used_units"], arrays["used_indices"]
        for uid in np.unique(units).tolist():
            accounting.used[uid] = [indices[units == uid]]
        accounting.totals = dict(zip(arrays["total_units"].tolist(), arrays["total_frames"].tolist()))
        accounting.count = len(units)
        accounting.bad = set(arrays["bad_units"].tolist())
        return accounting
