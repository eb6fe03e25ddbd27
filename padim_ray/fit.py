"""The distributed fit: frames -> stats actors -> tree reduction per position shard -> model store."""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import threading
import time
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Callable

import numpy as np
import ray
import torch

from padim_ray.accounting import Accounting, FrameAccountingError
from padim_ray.config import ClusterConfig, ModelConfig
from padim_ray.embedding import Embedder
from padim_ray.errors import PadimError, first_line
from padim_ray.gaussian import GaussianStats, StatsAccumulator, finalize, merge_stats
from padim_ray.checkpoint import CheckpointError, Checkpoints, checkpoint_shards, default_checkpoint_dir, lost_marker, save_checkpoint
from padim_ray.config import FORMAT_VERSION
from padim_ray.runtime import ActorSpec, connect, describe_plan, plan_actors, start_actors, user_errors
from padim_ray.streaming import Progress, SplitConsumer, raise_first_failure, stream_to_actors
from padim_ray.files import Location
from padim_ray.publish import PendingStore, staged_store
from padim_ray.store import MODEL_STORE, StoreError, create_model_store, open_model, publish_model, write_shard
from padim_ray.video import VideoError, WorkUnit, expand_inputs, frames_dataset, iter_unit_frames, make_units

log = logging.getLogger(__name__)

# (device) -> (frames batch) -> embeddings (B, d, h, w); picklable, built once inside each actor
EmbedderFactory = Callable[[torch.device], Callable[[np.ndarray], torch.Tensor]]


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
        parts = [self.accumulator.stats(start, stop, in_place=True) for start, stop in bounds]  # called once, at the end
        return parts if len(parts) > 1 else parts[0]  # Ray stores a single return value as is


class FitLostError(PadimError):
    """More stats actors were lost than --max-retries allows."""


def shard_bounds(positions: int, dims: int, shard_bytes: int) -> list[tuple[int, int]]:
    """Equal position ranges whose float64 M2 is at most `shard_bytes` each (at least one position)."""
    per_position = dims * dims * 8
    count = max(1, math.ceil(positions * per_position / shard_bytes))
    size = math.ceil(positions / count)
    return [(start, min(start + size, positions)) for start in range(0, positions, size)]


@ray.remote
def merge_partials(*partials: GaussianStats) -> GaussianStats:
    """One node of the reduction tree."""
    return functools.reduce(merge_stats, partials)


def reduce_tree(refs: list, fan_in: int):
    """Merge partials of one shard in a tree of Ray tasks; returns the root's ObjectRef."""
    while len(refs) > 1:
        groups = [refs[i : i + fan_in] for i in range(0, len(refs), fan_in)]
        refs = [merge_partials.remote(*group) if len(group) > 1 else group[0] for group in groups]  # a lone one waits
    return refs[0]


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


def accumulate(
    frames_for: Callable[[dict[int, np.ndarray], object], object],
    units: list[WorkUnit],
    make_embedder: EmbedderFactory,
    positions: int,
    dims: int,
    cluster: ClusterConfig,
    checkpoints: Checkpoints | None = None,
    held: list[Partial] = (),
    expected_frames: int | None = None,
    shared: SharedJob | None = None,
) -> Accumulated:
    """Fold every frame of `units` into per-position statistics with stats actors, exactly once.

    `frames_for(todo, credits)` gives the Ray Dataset of the units in `todo` (unit id -> frame
    indices to leave out, empty for a whole unit), shaped like the decoder's output, its decoding
    held back by `credits` (see runtime.stream_to_actors). Statistics already `held`
    and the files in `checkpoints` (an earlier run's) are merged in and their frames not redone.
    When actors are lost, the frames they held since their last checkpoint are redone on the others
    (or on a new set of actors if none is left), up to `cluster.max_retries` lost actors. A unit the
    decoder marks undecodable is left out: every accumulator that holds frames of it is discarded,
    with its checkpoint if that holds some too, and the frames it held are redone.
    Only the caller owns the returned refs; the driver never fetches statistics. With `shared`,
    progress counts into the job's bar and the actors wait for the job's actor slot.
    """
    bounds = shard_bounds(positions, dims, cluster.shard_bytes)
    partials = list(held) + [Partial.from_checkpoint(file, bounds) for file in (checkpoints.files() if checkpoints else [])]
    pool = StatsPool(partials, bounds, Progress(expected_frames, "fit", shared.bar if shared else None), checkpoints)
    if pool.progress.held:
        log.info("fit: resuming with %d frames already held (%s)", pool.progress.held, checkpoints.path if checkpoints else "model")
    with shared.actor_slot if shared else contextlib.nullcontext():  # one fit's actors on the cluster at a time
        bad: set[int] = set()
        lost, lost_now = 0, False
        try:
            while True:
                held_now = pool.accounting()
                if held_now.bad - bad:
                    bad |= held_now.bad
                    tainted = [i for i, (accounting, _) in enumerate(pool.outcomes) if accounting.touches(bad)]
                    log.warning("fit: leaving out %d undecodable input(s); redoing the frames of %d actor(s) that used them", len(bad), len(tainted))
                    pool.drop(tainted, bad)
                    held_now = pool.accounting()
                elif pool.outcomes and not lost_now:
                    break  # a clean pass: done, or frames are missing that the accounting check names
                todo = held_now.unfinished([u for u in units if u.uid not in bad])
                if not todo:
                    break
                if not pool.actors:
                    pool.actors, pool.files = _start_actors(make_embedder, positions, dims, cluster, checkpoints)
                dataset_for = functools.partial(frames_for, todo)
                outcomes = stream_to_actors(dataset_for, pool.actors, cluster, cluster.decode_batch, pool.progress)
                raise_first_failure([o for o in outcomes if not isinstance(o, ray.exceptions.RayActorError)])
                dead = [i for i, o in enumerate(outcomes) if isinstance(o, ray.exceptions.RayActorError)]
                pool.outcomes, lost_now = outcomes, bool(dead)
                if dead:
                    lost += len(dead)
                    cause = first_line(outcomes[dead[0]])
                    log.warning("fit: lost %d stats actor(s) (%s); redoing the frames they held since their last checkpoint", len(dead), cause)
                    pool.drop(dead, bad)
                    if lost > cluster.max_retries:
                        good = [u for u in units if u.uid not in bad]
                        unfinished = len(pool.accounting().unfinished(good))
                        where = f"progress is kept in {checkpoints.path}: rerun the same command to resume" if checkpoints else "no checkpoints were kept"
                        raise FitLostError(
                            f"{lost} stats actors were lost, more than --max-retries {cluster.max_retries} ({cause}); "
                            f"{unfinished} of {len(good)} work units are unfinished; {where}"
                        )
            accounting = pool.accounting()
            count = sum(p.count for p in pool.partials) + sum(frames for _, frames in pool.outcomes)
            if count != accounting.count + sum(p.count - p.accounting.count for p in pool.partials):
                raise FrameAccountingError(f"statistics hold {count} frames, the actors counted {accounting.count}")
            per_actor = [actor.shards.options(num_returns=len(bounds)).remote(bounds) for actor in pool.actors]
            shard_refs = [refs if isinstance(refs, list) else [refs] for refs in per_actor] + [p.shards for p in pool.partials]
            ray.wait([ref for refs in shard_refs for ref in refs], num_returns=sum(map(len, shard_refs)), fetch_local=False)
        finally:
            pool.close()
    roots = [reduce_tree([refs[s] for refs in shard_refs], cluster.fan_in) for s in range(len(bounds))]
    return Accumulated(roots, bounds, accounting, count, lost, bad, pool.progress.warnings)


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


@ray.remote
def finalize_shard(stats: GaussianStats, root: Location, start: int, eps: float) -> int:
    """Finalize one shard (eq. 1) and write its chunks of the model store; returns its frame count."""
    gaussians = finalize(stats, eps)
    arrays = {
        "mean": gaussians.mean,
        "covariance": gaussians.covariance,
        "precision": gaussians.precision,
        "m2": stats.m2,
    }
    write_shard(root, start, {name: tensor.numpy() for name, tensor in arrays.items()})
    return stats.count


@dataclass
class FitResult:
    out: Location
    frames: int
    seconds: float
    lost_actors: int = 0
    skipped: list[dict] = field(default_factory=list)  # inputs left out: {"path", "reason"}
    warnings: int = 0  # failures survived on the way (each logged as it happened), e.g. checkpoint saves


def fit_model(
    inputs: list[str | Path | Location],
    out: str | Path | Location,
    model: ModelConfig = ModelConfig(),
    cluster: ClusterConfig = ClusterConfig(),
    overwrite: bool = False,
    address: str | None = None,
    checkpoint_dir: str | Path | Location | None = None,
    skip_bad_inputs: bool = False,
    shared: SharedJob | None = None,
) -> FitResult:
    """Fit one Gaussian per patch position on every frame of `inputs` and write the model store `out`.

    Progress is checkpointed in `checkpoint_dir` (default: next to `out`); rerunning the same fit
    after a crash resumes from there, and a finished fit removes it. An input that cannot be decoded
    stops the fit, or with `skip_bad_inputs` is left out and listed in the model's `skipped_inputs`.
    `shared` is given by a job that runs several fits at once (see scenes.py).
    """
    job = FitJob(Location(out), cluster, overwrite, address, checkpoint_dir, skip_bad_inputs, shared)
    embedder = Embedder(model)  # checks backbone, dims and weights here, before any cluster work
    return _fit_units(job, list(inputs), model, embedder)


def update_model(
    model_path: str | Path | Location,
    inputs: list[str | Path | Location],
    cluster: ClusterConfig = ClusterConfig(),
    force: bool = False,
    address: str | None = None,
    checkpoint_dir: str | Path | Location | None = None,
    skip_bad_inputs: bool = False,
    out: str | Path | Location | None = None,
    overwrite: bool = False,
) -> FitResult:
    """Merge the frames of `inputs` into the stored model at `model_path` (equal to one fit on all of them).

    The model's stored statistics (frames, mean, m2) are merged exactly with the new frames'. The
    updated model goes to `out`, or replaces the old one in one rename (local models only: object
    storage has no rename, so a model there is updated into a new `out`); an existing `out` is
    replaced only with `overwrite`.
    """
    model_path = Location(model_path)
    target = Location(out) if out is not None else model_path
    if target.is_remote and target == model_path:
        raise StoreError(f"model {model_path} is on object storage, where it cannot be replaced atomically; pass --out NEW_URI for the updated model")
    store = open_model(model_path)
    model = ModelConfig(**store.attrs["config"])
    embedder = Embedder(model)
    store.check_reproduced(embedder, "it cannot be updated: fit a new model on all the footage")
    known = {_source_key(source) for source in store.attrs["sources"]}
    repeated = [str(path) for path in expand_inputs(list(inputs)) if _source_key({"path": path}) in known]
    if repeated and not force:
        raise StoreError(f"input {repeated[0]} is already in model {model_path} ({len(repeated)} such inputs); pass --force to add it again")
    base = BaseModel(model_path, store.attrs["frames"], store.attrs["sources"], store.attrs.get("skipped_inputs", []))
    job = FitJob(target, cluster, overwrite or target == model_path, address, checkpoint_dir, skip_bad_inputs)
    return _fit_units(job, list(inputs), model, embedder, base)


@dataclass(frozen=True)
class SharedJob:
    """What concurrent fits of one job share: one progress bar (tqdm), and the slot their stats
    actors take in turn. Two fits' actors at once could reserve the CPUs that decoding needs, and
    then neither stream moves; in turn, one fit's start and finish still overlap another's actors."""

    bar: object
    actor_slot: threading.Lock = field(default_factory=threading.Lock)


@dataclass(frozen=True)
class FitJob:
    """Where a fit writes and how it runs (what does not change the model)."""

    out: Location
    cluster: ClusterConfig
    overwrite: bool
    address: str | None
    checkpoint_dir: str | Path | Location | None
    skip_bad_inputs: bool
    shared: SharedJob | None = None


@dataclass(frozen=True)
class BaseModel:
    """A stored model that new frames are merged into."""

    path: Location
    frames: int
    sources: list[dict]
    skipped: list[dict]


@ray.remote
def stored_shards(path: Location, bounds: list[tuple[int, int]]) -> list[GaussianStats] | GaussianStats:
    """A stored model's statistics (frames, mean, m2) split into position shards."""
    store = open_model(path)
    parts = [
        GaussianStats(store.attrs["frames"], torch.from_numpy(store.read("mean", start, stop)), torch.from_numpy(store.read("m2", start, stop)))
        for start, stop in bounds
    ]
    return parts if len(parts) > 1 else parts[0]


def _source_key(source: dict) -> str:
    return Location(source["path"]).uri


def _fit_units(job: FitJob, inputs: list, model: ModelConfig, embedder: Embedder, base: BaseModel | None = None) -> FitResult:
    """Fit (or, with `base`, update) the model `job.out` on `inputs`: checkpoints, accumulate, write, publish."""
    started = time.monotonic()
    bad_inputs: list[tuple[str, str]] | None = [] if job.skip_bad_inputs else None
    units, estimate = make_units(expand_inputs(inputs), bad=bad_inputs)
    for path, reason in bad_inputs or []:
        log.warning("fit: skipping %s: %s", path, reason)
    if not units:
        raise VideoError(f"none of the inputs can be decoded ({bad_inputs[0][1] if bad_inputs else 'no inputs'})")
    identity = {**_identity(model, embedder, units), "skip_bad_inputs": job.skip_bad_inputs}
    if base:
        identity["base_model"] = {"path": base.path.uri, "frames": base.frames}
    checkpoint_dir = Location(job.checkpoint_dir or default_checkpoint_dir(job.out))  # absolute, as actors need
    with staged_store(job.out, job.overwrite, MODEL_STORE) as pending, user_errors():
        checkpoints = Checkpoints.open(checkpoint_dir, identity)
        try:
            connect(job.address)
            held = []
            if base:
                bounds = shard_bounds(embedder.positions, embedder.dims, job.cluster.shard_bytes)
                refs = stored_shards.options(num_returns=len(bounds)).remote(base.path, bounds)
                held.append(Partial(refs if isinstance(refs, list) else [refs], Accounting(), base.frames))
            expected = math.ceil(estimate / model.frame_stride) + (base.frames if base else 0)
            accumulated = _accumulate_units(units, model, embedder, job, checkpoints, held, expected)
            good = [u for u in units if u.uid not in accumulated.bad_units]
            frames = _write_model(pending, accumulated, good, model, embedder, base.frames if base else 0)
            bad_decodes = _bad_unit_reasons(units, accumulated.bad_units, model)
            skipped = [{"path": path, "reason": reason} for path, reason in (bad_inputs or []) + bad_decodes]
            sources = (base.sources if base else []) + [
                {"path": u.path, "start": u.start, "stop": u.stop, "frames": accumulated.accounting.totals[u.uid]} for u in good
            ]
            publish_model(pending, _attributes(model, embedder, sources, frames, (base.skipped if base else []) + skipped))
        except BaseException:
            checkpoints.remove_if_empty()
            if checkpoints.path.exists():
                log.error("fit stopped: progress is kept in %s; rerun the same command to resume", checkpoints.path)
            raise
        checkpoints.remove()
    seconds = time.monotonic() - started
    log.info("fit: %d frames in %.1f s -> %s", frames, seconds, job.out)
    return FitResult(out=job.out, frames=frames, seconds=seconds, lost_actors=accumulated.lost_actors, skipped=skipped, warnings=accumulated.warnings)


@ray.remote
def bad_unit_reason(unit: WorkUnit, size: int, stride: int) -> str:
    """Why a unit the decoder marked bad cannot be decoded (decoding it again)."""
    try:
        for _ in iter_unit_frames(unit, stride, size):
            pass
    except VideoError as err:
        return str(err)
    return f"decoding {unit.path} failed once and succeeded when retried; check the file and the node that read it"


def _bad_unit_reasons(units: list[WorkUnit], bad: set[int], model: ModelConfig) -> list[tuple[str, str]]:
    bad_units = [u for u in units if u.uid in bad]
    reasons = ray.get([bad_unit_reason.remote(u, model.image_size, model.frame_stride) for u in bad_units])
    return [(u.path, reason) for u, reason in zip(bad_units, reasons)]


def _accumulate_units(units, model, embedder, job: FitJob, checkpoints, held, expected) -> Accumulated:
    """accumulate() over decoded video frames."""
    ray.data.DataContext.get_current().enable_progress_bars = False  # ours counts frames

    def frames_for(todo: dict[int, np.ndarray], credits):
        todo_units = [u for u in units if u.uid in todo]
        skip = {uid: used for uid, used in todo.items() if len(used)}
        return frames_dataset(
            todo_units, model.image_size, model.frame_stride, job.cluster.decode_batch, skip, job.skip_bad_inputs, credits
        )

    make_embedder = functools.partial(Embedder, model)
    return accumulate(
        frames_for, units, make_embedder, embedder.positions, embedder.dims, job.cluster, checkpoints, held, expected, job.shared
    )


def _write_model(pending: PendingStore, accumulated: Accumulated, units, model: ModelConfig, embedder: Embedder, held_frames: int) -> int:
    """Check the accounting, finalize every shard into the staging store; returns the model's frames."""
    frames = accumulated.accounting.check(units) + held_frames
    bounds = accumulated.bounds
    create_model_store(pending, embedder.positions, embedder.dims, bounds[0][1] - bounds[0][0])
    counts = ray.get([finalize_shard.remote(root, pending.root, start, model.eps) for root, (start, _) in zip(accumulated.roots, bounds)])
    if set(counts) != {frames}:
        raise FrameAccountingError(f"reduced shards hold {sorted(set(counts))} frames, the inputs decoded to {frames}")
    return frames


def _identity(model: ModelConfig, embedder: Embedder, units: list[WorkUnit]) -> dict:
    """What makes two fits the same fit: their checkpoints may be merged."""
    return {
        "format_version": FORMAT_VERSION,
        "config": {**model.to_dict(), "dims": embedder.dims},
        "weights_identity": embedder.weights_identity,
        "channel_indices": embedder.channel_indices.tolist(),
        "inputs": [[Location(u.path).uri, u.start, u.stop, u.frames] for u in units],
    }


def _attributes(model: ModelConfig, embedder: Embedder, sources: list[dict], frames: int, skipped: list[dict]) -> dict:
    spec = embedder.spec
    return {
        "package_version": version("padim-ray"),
        "config": {**model.to_dict(), "dims": embedder.dims},
        "backbone": spec.name,
        "weights_identity": embedder.weights_identity,
        "stages": list(spec.stages),
        "stage_channels": list(spec.channels),
        "normalization": {"mean": list(spec.mean), "std": list(spec.std)},
        "image_size": model.image_size,
        "grid": list(embedder.grid),
        "dims": embedder.dims,
        "channel_indices": embedder.channel_indices.tolist(),
        "eps": model.eps,
        "frames": frames,
        "sources": sources,
        "skipped_inputs": skipped,
    }
