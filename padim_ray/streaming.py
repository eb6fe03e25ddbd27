"""Streaming splits of decoded frames to consumer actors: the actors' base class, the bound on frames
in flight, the driver loop that waits for every split, and the progress bar it updates."""

from __future__ import annotations

import asyncio
import logging
import sys
import uuid
from typing import Callable

import ray
from tqdm import tqdm

from padim_ray.accounting import Accounting
from padim_ray.config import BATCH_SIZES, ClusterConfig
from padim_ray.devices import actor_device
from padim_ray.video import BAD_UNIT

log = logging.getLogger(__name__)


class SplitConsumer:
    """Base of actors that consume streaming splits of decoded frames (see stream_to_actors).

    Subclasses call `super().__init__(threads)` and implement `process(batch)` and `result()`; this
    class picks the actor's torch device and records every row it consumed (work unit, frame index)
    across all the splits it is handed.
    """

    def __init__(self, threads: int):
        import torch  # here, not at the top: FrameCredits actors import this module and need no torch

        torch.set_num_threads(threads)
        self.device = actor_device()
        self.accounting = Accounting()
        self.stopping = False
        self.stream = None  # which stream_to_actors call the split in hand belongs to
        self.warnings: list[str] = []  # not yet reported to the driver (see progress)

    def consume(self, split, batch_size: int | None, stream: str | None = None, credits=None):
        """Process every batch of `split` (until `stop(stream)`), giving its rows back to `credits`
        (a FrameCredits actor) once done; returns (accounting of every split so far, self.result()).
        A `batch_size` of None is the default for this actor's device (config.BATCH_SIZES)."""
        self.stopping, self.stream = False, stream
        batch_size = batch_size or BATCH_SIZES[self.device.type]
        for batch in split.iter_batches(batch_size=batch_size, batch_format="numpy", prefetch_batches=2):
            if self.stopping:
                break
            self.take_batch(batch)
            if credits is not None:
                credits.give.remote(len(batch["unit"]))
        return self.accounting, self.result()

    def take_batch(self, batch: dict) -> None:
        """Process and count one batch, leaving out (and recording) rows that mark undecodable units."""
        bad = batch["unit_total"] == BAD_UNIT
        if bad.any():
            self.accounting.add_bad(batch["unit"][bad])
            batch = {column: values[~bad] for column, values in batch.items()}
            if not len(batch["unit"]):
                return
        self.process(batch)
        self.accounting.add_batch(batch["unit"], batch["index"], batch["unit_total"])
        self.batch_done()

    def batch_done(self) -> None:
        """Called after each batch is processed and counted (e.g. to checkpoint)."""

    def warn(self, message: str) -> None:
        """A failure this actor survived (e.g. a checkpoint save), for the driver's terminal: worker logs
        reach it only with --verbose."""
        log.warning(message)
        self.warnings.append(message)

    def progress(self) -> tuple[int, list[str]]:
        """Frames processed so far and the warnings since the last call (answered while consume runs:
        actors need max_concurrency=2)."""
        warnings, self.warnings = self.warnings, []
        return self.accounting.count, warnings

    def stop(self, stream: str) -> None:
        """Make consume of `stream` return after the batch in hand (another actor of it was lost)."""
        if stream == self.stream:  # a late stop of an earlier stream must not cut this one short
            self.stopping = True


class Progress:
    """One progress bar over every pass of a run: frames held before it plus what live actors report.

    With `shared`, the frames are counted into that bar instead (one display for many concurrent
    runs, e.g. the scenes of `fit stc --scene all`), whose total grows by `total`.
    """

    def __init__(self, total: int | None, desc: str, shared: tqdm | None = None):
        self.own = shared is None
        self.bar = tqdm(total=total, unit="frame", desc=desc, file=sys.stderr, mininterval=2) if self.own else shared
        if not self.own and total:
            self.bar.total = (self.bar.total or 0) + total
        self.held = 0  # frames outside the live actors: checkpoints of lost actors, earlier runs, a stored model
        self.shown = 0  # what this run has added to the bar
        self.warnings = 0  # actors' warnings logged here, as they came

    def poll(self, actors: list) -> None:
        """Update from the actors that answer within a second (a lost one may never answer), and log
        the warnings they report, one line each."""
        refs = [actor.progress.remote() for actor in actors]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=1.0)
        counts = []
        for ref in ready:
            try:
                count, warnings = ray.get(ref)
            except ray.exceptions.RayError:
                continue
            counts.append(count)
            for message in warnings:
                log.warning(message)
            self.warnings += len(warnings)
        now = self.held + sum(counts)
        self.bar.update(now - self.shown)
        self.shown = now

    def close(self) -> None:
        if self.own:
            self.bar.close()


@ray.remote(num_cpus=0)
class FrameCredits:
    """A bound on decoded frames in flight: decode tasks take credit for each block before emitting
    it, consumers give it back once they have processed the rows.

    Ray Data's own bound on queued blocks (ExecutionOptions.resource_limits) holds the queue, but
    its scheduling loop then polls without pause while a block waits to be read: 0.9 of a CPU here,
    a third of the fit's speed on 2 cores. A decode task that waits here leaves it idle.
    """

    def __init__(self, frames: int):
        self.free = frames
        self.changed = asyncio.Condition()

    async def take(self, frames: int) -> None:
        """Wait until some credit is free, then take `frames` (a block never waits for more than exists)."""
        async with self.changed:
            await self.changed.wait_for(lambda: self.free > 0)
            self.free -= frames

    async def give(self, frames: int) -> None:
        async with self.changed:
            self.free += frames
            self.changed.notify_all()


def stream_to_actors(dataset_for: Callable, actors: list, cluster: ClusterConfig, block_rows: int, progress: Progress) -> list:
    """Hand one streaming split of `dataset_for(credits)` to each SplitConsumer actor and wait for all of them.

    `dataset_for` builds the frames dataset with `credits`, a FrameCredits actor that holds the
    decoded frames waiting to `cluster.frames_queued` per actor (never fewer than it takes to fill
    two batches: an actor waits for a whole batch). Only actors that started get a split (the
    splits wait for each other to start). When one fails, the others are stopped after their
    current batch: the rest of the stream would keep feeding the dead one's split, so the caller
    redoes what is unfinished in a new pass.

    Returns:
        Per actor, in order: its (accounting, result), or the Ray exception that ended it.
    """
    outcomes: list = [None] * len(actors)
    for index, actor in enumerate(actors):
        try:
            ray.get(actor.__ray_ready__.remote())
        except ray.exceptions.RayError as err:
            outcomes[index] = err
    started = [i for i, outcome in enumerate(outcomes) if outcome is None]
    if not started:
        return outcomes
    queued = max(cluster.frames_queued, 2 * ((cluster.batch_size or max(BATCH_SIZES.values())) + block_rows))
    credits = FrameCredits.remote(queued * len(started))
    splits = dataset_for(credits).streaming_split(len(started), equal=False)  # equal=True would drop rows
    stream = uuid.uuid4().hex
    pending = {actors[i].consume.remote(split, cluster.batch_size, stream, credits): i for i, split in zip(started, splits)}
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=2.0)
        for ref in ready:
            index = pending.pop(ref)
            try:
                outcomes[index] = ray.get(ref)
            except ray.exceptions.RayError as err:
                outcomes[index] = err
                for other in pending.values():
                    actors[other].stop.remote(stream)
        progress.poll([actor for actor, outcome in zip(actors, outcomes) if not isinstance(outcome, BaseException)])
    return outcomes


def raise_first_failure(outcomes: list) -> list:
    """The outcomes of stream_to_actors, or the first actor's failure raised."""
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            raise outcome
    return outcomes
