"""Stats actors held after their first checkpoint (scoring actors after their first chunk) until the test releases them.

A test that kills an actor or stops the driver once a checkpoint appears must act before the fit
ends; on a fast small fit the remaining batches, the model write and the checkpoints' removal took
0.5 s after the first save. Held, an actor embeds one batch, saves its checkpoint, then waits before
its second batch until a release file exists: the checkpoint is on disk and the fit cannot end
until the test has acted and released it. Nothing here is a timing to win.

Run as a script, this is `padim-ray` whose real embedder and scorer hold so (the file named by
$PADIM_TEST_RELEASE), for tests that stop the command itself.
"""

from __future__ import annotations

import glob
import os
import sys
import time
from pathlib import Path

from ray import cloudpickle

from padim_ray.embedding import Embedder
from padim_ray.score import Scorer

RELEASE_ENV = "PADIM_TEST_RELEASE"
HOLD_AFTER_ENV = "PADIM_TEST_HOLD_AFTER"  # a glob: scorers hold only once a file matches it (a written map chunk)
HOLD_LIMIT = 300  # seconds: a test that never releases fails on its own assertions, it does not hang

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers cannot import tests/: ship this code


def hold(batches_done: int, release: str) -> None:
    """Before an actor's second batch (its first checkpoint saved), wait until `release` exists;
    `held_marker(release)` exists from then on, for tests that wait for an actor to be held."""
    deadline = time.monotonic() + HOLD_LIMIT
    if batches_done >= 1 and not os.path.exists(release):
        Path(held_marker(release)).touch()
    while batches_done >= 1 and not os.path.exists(release) and time.monotonic() < deadline:
        time.sleep(0.01)


def held_marker(release: str | Path) -> str:
    """The file an actor creates when it starts holding for `release`."""
    return f"{release}.held"


def held_identity_embedder(release: Path):
    """test_fit's identity embedder (frames are the embeddings), held after the first batch (see `hold`)."""
    release = str(release)

    def make(device):
        import torch

        batches = [0]

        def embed(frames):
            hold(batches[0], release)
            batches[0] += 1
            return torch.as_tensor(frames, device=device)

        return embed

    return make


class HeldEmbedder(Embedder):
    """The real embedder, held after its first batch until the file `release` names exists."""

    release = ""  # set from $PADIM_TEST_RELEASE by the script below; pickled with the class, so actors on any Ray see it

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.batches = 0

    def forward(self, frames):
        hold(self.batches, self.release)
        self.batches += 1
        return super().forward(frames)


class HeldScorer(Scorer):
    """The real scorer, held after its first batch until `release` (default: the class's, from $PADIM_TEST_RELEASE) exists.

    With `hold_after` ($PADIM_TEST_HOLD_AFTER), it holds only once a file matches that glob, e.g. a map
    chunk's rows: a batch need not complete a chunk (Ray Data may cut a decode block between batches),
    so a test that needs a written chunk names it rather than counting on the first batch.
    """

    release, hold_after = "", ""  # set by the script below, as HeldEmbedder.release

    def __init__(self, *args, release: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.release, self.batches = release or self.release, 0

    def maps(self, frames, size):
        after = self.hold_after
        hold(self.batches if not after or glob.glob(after) else 0, self.release)
        self.batches += 1
        return super().maps(frames, size)


if __name__ == "__main__":
    import faulthandler
    import signal

    import padim_ray.fit
    import padim_ray.score
    from padim_ray.cli import app

    HeldEmbedder.release = HeldScorer.release = os.environ[RELEASE_ENV]
    HeldScorer.hold_after = os.environ.get(HOLD_AFTER_ENV, "")
    padim_ray.fit.Embedder = HeldEmbedder
    padim_ray.score.Scorer = HeldScorer
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # a test whose command hangs shows where
    app()
