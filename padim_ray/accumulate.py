"""Accumulation: stats actors embed their splits of the frame stream into per-position statistics,
checkpoint them, and the frames of lost actors or undecodable inputs are redone until each is held once."""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import ray
import torch

from padim_ray.accounting import Accounting, FrameAccountingError
from padim_ray.checkpoint import CheckpointError, Checkpoints, checkpoint_shards, lost_marker, save_checkpoint
from padim_ray.config import ClusterConfig
from padim_ray.errors import PadimError, first_line
from padim_ray.gaussian import GaussianStats, StatsAccumulator
from padim_ray.reduce import per_shard, reduce_tree, shard_bounds, shard_refs
from padim_ray.files import Location
from padim_ray.runtime import ActorSpec, describe_plan, plan_actors, start_actors
from padim_ray.streaming import Progress, SplitConsumer, raise_first_failure, stream_to_actors
from padim_ray.video import WorkUnit

log = logging.getLogger(__name__)

# (device) -> (frames batch) -> embeddings (B, d, h, w); picklable, built once inside each actor
EmbedderFactory = Callable[[torch.device], Callable[[np.ndarray], torch.Tensor]]
# (todo, credits) -> the Ray Dataset of the units in `todo` (see accumulate)
FramesFor = Callable[[dict[int, np.ndarray], object], object]


def accumulate(
    frames_for: FramesFor,
    units: list[WorkUnit],
    make_embedder: EmbedderFactory,
    positions: int,
    dims: int,
    cluster: ClusterConfig,
    checkpoints: Checkpoints | None = None,
    *,
    starting: list[Partial] = (),
    expected_frames: int | None = None,
    shared: SharedJob | None = None,
) -> Accumulated:
    """Fold every frame of `units` into per-position statistics with stats actors, exactly once.

    `frames_for(todo, credits)` gives the Ray Dataset of the units in `todo` (unit id -> frame
    indices to leave out, empty for a whole unit), shaped like the decoder's output, its decoding
    held back by `credits` (see streaming.stream_to_actors). The `starting` statistics (an updated
    model's) and the files in `checkpoints` (an earlier run's) are merged in and their frames not
    redone. When actors are lost, the frames they held since their last checkpoint are redone on the
    others (or on a new set of actors if none is left), up to `cluster.max_retries` lost actors. A
    unit the decoder marks undecodable is left out: every accumulator that holds frames of it is
    discarded, with its checkpoint if that holds some too, and the frames it held are redone.
    Only the caller owns the returned refs; the driver never fetches statistics. With `shared`,
    progress counts into the job's bar and the actors wait for the job's actor slot.
    """
    bounds = shard_bounds(positions, dims, cluster.shard_bytes)
    partials = list(starting) + [Partial.from_checkpoint(file, bounds) for file in (checkpoints.files() if checkpoints else [])]
    pool = StatsPool(partials, bounds, Progress(expected_frames, "fit", shared.bar if shared else None), checkpoints)
    if pool.progress.held:
        log.info("fit: resuming with %d frames already held (%s)", pool.progress.held, checkpoints.path if checkpoints else "model")
    start = functools.partial(_start_actors, make_embedder, positions, dims, cluster, checkpoints)
    passes = Passes(pool, frames_for, units, start, cluster)
    with shared.actor_slot if shared else contextlib.nullcontext():  # one fit's actors on the cluster at a time
        try:
            passes.run()
            accounting, count = pool.frames_held()
            holders = pool.shards()
        finally:
            pool.close()
    roots = [reduce_tree([refs[s] for refs in holders], cluster.fan_in) for s in range(len(bounds))]
    return Accumulated(roots, bounds, accounting, count, passes.lost, passes.bad, pool.progress.warnings)


@dataclass(frozen=True)
class SharedJob:
    """What concurrent fits of one job share: one progress bar (tqdm), and the slot their stats
    actors take in turn. Two fits' actors at once could reserve the CPUs that decoding needs, and
    then neither stream moves; in turn, one fit's start and finish still overlap another's actors."""

    bar: object
    actor_slot: threading.Lock = field(default_factory=threading.Lock)


@dataclass
class Partial:
    """Statistics held outside the live actors (a lost actor's or an earlier run's checkpoint, a stored
    model): one ObjectRef of GaussianStats per position shard, the frames they hold and their count."""

    shards: list
    accounting: Accounting
    count: int
    file: Location | None = None  # the checkpoint it came from

    @classmethod
    def from_checkpoint(cls, file: Location, bounds: list[tuple[int, int]]) -> Partial:
        accounting, *shards = checkpoint_shards.options(num_returns=len(bounds) + 1).remote(file, bounds)
        accounting = ray.get(accounting)
        return cls(shards, accounting, accounting.count, file)


@dataclass
class Accumulated:
    """What `accumulate` returns: one reduced ObjectRef per position shard, the shard bounds, the
    accounting of every frame in them, their count, the number of stats actors lost, the ids of
    units left out as undecodable and the number of warnings the actors reported."""

    roots: list
    bounds: list[tuple[int, int]]
    accounting: Accounting
    count: int
    lost_actors: int = 0
    bad_units: set = field(default_factory=set)
    warnings: int = 0  # failures the actors survived and reported (e.g. checkpoint saves)


class FitLostError(PadimError):
    """More stats actors were lost than --max-retries allows."""


class Passes:
    """The passes of `accumulate` over the frame stream: each streams the unfinished frames to the
    live actors (started when none is left), then leaves out units found undecodable and takes the
    lost actors' checkpoints over, until a clean pass leaves nothing to do."""

    def __init__(self, pool: StatsPool, frames_for: FramesFor, units: list[WorkUnit], start: Callable, cluster: ClusterConfig):
        self.pool, self.frames_for, self.units, self.start, self.cluster = pool, frames_for, units, start, cluster
        self.bad: set[int] = set()  # units left out as undecodable
        self.lost = 0  # stats actors lost so far
        self.lost_last_pass = False

    def run(self) -> None:
        while True:
            accounted = self.pool.accounting()
            if accounted.bad - self.bad:
                accounted = self.leave_out(accounted.bad)
            elif self.pool.outcomes and not self.lost_last_pass:
                return  # a clean pass: done, or frames are missing that the accounting check names
            todo = accounted.unfinished(self.good_units())
            if not todo:
                return
            self.stream(todo)

    def good_units(self) -> list[WorkUnit]:
        return [u for u in self.units if u.uid not in self.bad]

    def leave_out(self, bad: set[int]) -> Accounting:
        """Leave out the units in `bad`: drop the actors and partials holding frames of them; returns what is held then."""
        self.bad |= bad
        tainted = [i for i, (accounting, _) in enumerate(self.pool.outcomes) if accounting.touches(self.bad)]
        log.warning("fit: leaving out %d undecodable input(s); redoing the frames of %d actor(s) that used them", len(self.bad), len(tainted))
        self.pool.drop(tainted, self.bad)
        return self.pool.accounting()

    def stream(self, todo: dict[int, np.ndarray]) -> None:
        """One pass: stream the frames of `todo` to the actors; record their outcomes and take over the lost ones'."""
        pool = self.pool
        if not pool.actors:
            pool.actors, pool.files = self.start()
        dataset_for = functools.partial(self.frames_for, todo)
        outcomes = stream_to_actors(dataset_for, pool.actors, self.cluster, self.cluster.decode_batch, pool.progress)
        raise_first_failure([o for o in outcomes if not isinstance(o, ray.exceptions.RayActorError)])
        dead = [i for i, o in enumerate(outcomes) if isinstance(o, ray.exceptions.RayActorError)]
        pool.outcomes, self.lost_last_pass = outcomes, bool(dead)
        if dead:
            self.take_over(dead, first_line(outcomes[dead[0]]))

    def take_over(self, dead: list[int], cause: str) -> None:
        """Drop the lost actors (keeping their checkpoints); past `cluster.max_retries` losses, stop the fit."""
        self.lost += len(dead)
        log.warning("fit: lost %d stats actor(s) (%s); redoing the frames they held since their last checkpoint", len(dead), cause)
        self.pool.drop(dead, self.bad)
        if self.lost > self.cluster.max_retries:
            good = self.good_units()
            unfinished = len(self.pool.accounting().unfinished(good))
            checkpoints = self.pool.checkpoints
            where = f"progress is kept in {checkpoints.path}: rerun the same command to resume" if checkpoints else "no checkpoints were kept"
            raise FitLostError(
                f"{self.lost} stats actors were lost, more than --max-retries {self.cluster.max_retries} ({cause}); "
                f"{unfinished} of {len(good)} work units are unfinished; {where}"
            )


class StatsPool:
    """The live stats actors (with their checkpoint files and last outcomes) and the partials outside them."""

    def __init__(self, partials: list[Partial], bounds: list[tuple[int, int]], progress: Progress, checkpoints: Checkpoints | None):
        self.partials, self.bounds, self.progress, self.checkpoints = partials, bounds, progress, checkpoints
        self.actors: list = []
        self.files: list = []
        self.outcomes: list = []  # per live actor: (accounting, frames in its statistics)
        self.progress.held = sum(p.count for p in partials)

    def accounting(self) -> Accounting:
        """Every frame held, in partials and live actors."""
        parts = [p.accounting for p in self.partials] + [accounting for accounting, _ in self.outcomes]
        return functools.reduce(Accounting.merge, parts, Accounting())

    def frames_held(self) -> tuple[Accounting, int]:
        """The accounting of every frame held and the frames the statistics hold, checked to agree
        (a starting model's frames are counted, not accounted)."""
        accounting = self.accounting()
        count = sum(p.count for p in self.partials) + sum(frames for _, frames in self.outcomes)
        if count != accounting.count + sum(p.count - p.accounting.count for p in self.partials):
            raise FrameAccountingError(f"statistics hold {count} frames, the actors counted {accounting.count}")
        return accounting, count

    def shards(self) -> list[list]:
        """Per live actor and partial, one ObjectRef per position shard; returns once all exist (unfetched)."""
        per_actor = [shard_refs(actor.shards.options(num_returns=len(self.bounds)).remote(self.bounds)) for actor in self.actors]
        holders = per_actor + [p.shards for p in self.partials]
        ray.wait([ref for refs in holders for ref in refs], num_returns=sum(map(len, holders)), fetch_local=False)
        return holders

    def drop(self, indices: list[int], bad: set[int]) -> None:
        """Kill these actors; keep each one's last checkpoint as a partial unless it holds frames of `bad` units."""
        for i in indices:
            ray.kill(self.actors[i])
            if self.files[i]:
                claimed = self.checkpoints.claim(self.files[i])  # one only unreachable, not dead, saves no more
                if claimed.is_file():
                    self.partials.append(Partial.from_checkpoint(claimed, self.bounds))
        self.actors, self.files, self.outcomes = (
            [x for i, x in enumerate(seq) if i not in indices] for seq in (self.actors, self.files, self.outcomes)
        )
        self.drop_partials_of(bad)

    def drop_partials_of(self, bad: set[int]) -> None:
        """Discard partials holding frames of `bad` units (their checkpoint files too)."""
        for partial in [p for p in self.partials if p.accounting.touches(bad)]:
            self.partials.remove(partial)
            if partial.file:
                partial.file.remove()
        self.progress.held = sum(p.count for p in self.partials)

    def close(self) -> None:
        self.progress.close()
        for actor in self.actors:  # the shards live on in the object store, owned by the driver
            ray.kill(actor)


@ray.remote(max_concurrency=2)  # one thread consumes, one answers progress()
class StatsActor(SplitConsumer):
    """Embeds its splits of the frame stream and accumulates per-position statistics locally.

    With a checkpoint file, it saves its accumulator and the frames it holds there every
    `checkpoint_every` seconds, so that losing it loses at most that much work.
    """

    def __init__(self, make_embedder: EmbedderFactory, positions: int, dims: int, threads: int,
                 checkpoint_file: str | None = None, checkpoint_every: float = 0.0):
        super().__init__(threads)
        self.embed = make_embedder(self.device)
        self.accumulator = StatsAccumulator(positions, dims, self.device)
        self.checkpoint_file, self.checkpoint_every = checkpoint_file, checkpoint_every
        self.saved_at = time.monotonic()

    def process(self, batch: dict) -> None:
        self.accumulator.update(self.embed(batch["frame"]))

    def batch_done(self) -> None:
        if self.checkpoint_file and time.monotonic() - self.saved_at >= self.checkpoint_every:
            if lost_marker(self.checkpoint_file).exists():  # the driver took this actor for lost
                self.checkpoint_file, self.stopping = None, True
                return
            try:
                save_checkpoint(self.checkpoint_file, self.accumulator, self.accounting)
            except CheckpointError as err:  # e.g. storage briefly unavailable: the statistics are intact, try again later
                self.warn(f"stats actor: {err}; retrying in {self.checkpoint_every:g} s")
            self.saved_at = time.monotonic()

    def result(self) -> int:
        return self.accumulator.count  # what the statistics hold, checked against the decoder

    def shards(self, bounds: list[tuple[int, int]]) -> list[GaussianStats] | GaussianStats:
        return per_shard([self.accumulator.stats(start, stop, in_place=True) for start, stop in bounds])  # called once, at the end


def actor_name(checkpoint_file: Location | str | None) -> str | None:
    """A stats actor's Ray name, from its checkpoint file (e.g. for `ray.get_actor` while debugging)."""
    return f"padim-ray-stats-{Location(checkpoint_file).name.removesuffix('.npz')}" if checkpoint_file else None


def _start_actors(make_embedder, positions: int, dims: int, cluster: ClusterConfig, checkpoints: Checkpoints | None):
    """Stats actors for the cluster as it is now, each with its own checkpoint file."""
    plan = plan_actors(cluster)
    files = [checkpoints.new_file() if checkpoints else None for _ in plan]

    def create(i: int, spec: ActorSpec):
        options = {**spec.options(), "name": actor_name(files[i])}
        return StatsActor.options(**options).remote(make_embedder, positions, dims, spec.threads, files[i], cluster.checkpoint_every)

    actors = start_actors(plan, create, cluster, "stats")
    log.info("fit: %d actors (%s)", len(plan), describe_plan(plan))
    return actors, files
