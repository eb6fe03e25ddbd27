"""Exactly-once frame accounting: every work unit decoded to its end, each frame used once."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from padim_ray.errors import PadimError
from padim_ray.video import NOT_LAST, WorkUnit


class FrameAccountingError(PadimError):
    """The frames accumulated differ from the frames decoded."""


@dataclass
class Accounting:
    """What one consumer (or, merged, a whole run) used: rows per work unit and units' totals."""

    rows: Counter = field(default_factory=Counter)  # unit id -> rows used
    totals: dict = field(default_factory=dict)  # unit id -> frames the decoder produced for it
    count: int = 0  # frames used: folded into statistics, or scored

    def add_batch(self, units: np.ndarray, unit_totals: np.ndarray) -> None:
        """Count a batch's rows (columns `unit` and `unit_total` of the decoder's output)."""
        ids, counts = np.unique(units, return_counts=True)
        self.rows.update(dict(zip(ids.tolist(), counts.tolist())))
        last = unit_totals != NOT_LAST
        self.totals.update(zip(units[last].tolist(), unit_totals[last].tolist()))
        self.count += len(units)

    def merge(self, other: Accounting) -> Accounting:
        twice = self.totals.keys() & other.totals.keys()
        if twice:
            raise FrameAccountingError(f"work units {sorted(twice)} were finished twice")
        return Accounting(self.rows + other.rows, {**self.totals, **other.totals}, self.count + other.count)

    def check(self, units: list[WorkUnit]) -> int:
        """Raise unless every unit was decoded to its end and each of its frames used exactly once."""
        paths = {u.uid: u.path for u in units}
        for uid, path in paths.items():
            if uid not in self.totals:
                raise FrameAccountingError(f"input {path} was never fully decoded; the run is incomplete")
            if self.rows[uid] != self.totals[uid]:
                raise FrameAccountingError(
                    f"input {path}: decoded {self.totals[uid]} frames but used {self.rows[uid]}"
                )
        frames = sum(self.totals.values())
        if frames != self.count:
            raise FrameAccountingError(f"{self.count} frames were used, the inputs decoded to {frames}")
        return frames
