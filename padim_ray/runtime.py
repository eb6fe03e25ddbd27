"""Connecting to Ray and sizing actors from the cluster's resources: the one place Ray is configured."""

from __future__ import annotations

import asyncio
import atexit
import collections
import logging
import math
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import ray
from tqdm import tqdm

from padim_ray.accounting import Accounting
from padim_ray.config import BATCH_SIZES, ClusterConfig
from padim_ray.errors import PadimError
from padim_ray.video import BAD_UNIT

log = logging.getLogger(__name__)


class ClusterError(PadimError):
    """The cluster cannot run the requested actors and still decode frames."""


STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)  # what timeout, systemd, Kubernetes and `ray job stop` send
_WORKER_LOGS = {"show": True}
_STOP_SIGNALS = {"handle": False, "received": None}  # whether stop signals raise KeyboardInterrupt (the CLI), and the last one
LOCAL_TEMP_ROOT = "/tmp"  # as Ray's own default: a long $TMPDIR would push its Unix socket paths past 107 chars
_STARTED_HERE = {"local": False}  # whether connect() started a local Ray instance, which no autoscaler grows


def show_worker_logs(show: bool) -> None:
    """Whether Ray workers' output (and their tracebacks) is echoed to this driver's terminal."""
    _WORKER_LOGS["show"] = show


def handle_stop_signals() -> None:
    """From now on SIGTERM and SIGHUP raise KeyboardInterrupt in the main thread, as SIGINT does (see stop_signal).

    ray.init installs its own SIGTERM handlers (a driver's sys.exit, and a local head node's that kills
    its Ray processes under the running driver, which then aborts with a C++ stack dump); connect()
    puts ours back after it.
    """
    _STOP_SIGNALS["handle"] = True
    _install_stop_handlers()


def _install_stop_handlers() -> None:
    if _STOP_SIGNALS["handle"] and threading.current_thread() is threading.main_thread():
        for signum in STOP_SIGNALS:
            signal.signal(signum, _raise_stopped)


def _raise_stopped(signum, frame) -> None:
    _STOP_SIGNALS["received"] = signal.Signals(signum)  # Ray's blocking calls re-raise it as a plain KeyboardInterrupt
    raise KeyboardInterrupt(signal.Signals(signum).name)


def stop_signal() -> signal.Signals | None:
    """The stop signal (SIGTERM, SIGHUP) that interrupted this process, if one did."""
    return _STOP_SIGNALS["received"]


def connect(address: str | None = None) -> None:
    """Use Ray as already initialised, else the cluster at `address` or $RAY_ADDRESS, else a new private local one.

    A cluster is joined only when named: by --address, or by RAY_ADDRESS (which `ray job submit` sets
    for its entrypoint, so a job's command joins its cluster). Otherwise each command starts its own
    local instance (`address="local"` does too): never `address="auto"`, which joins any Ray on the
    machine, e.g. another command's, whose actors then hold the CPUs its decode tasks need.
    """
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or "local"
    if address == "local":
        _start_local()
    else:
        ray.init(address=address, log_to_driver=_WORKER_LOGS["show"])
    _install_stop_handlers()


def _start_local() -> None:
    """A local Ray instance in its own temp dir, removed at exit: `ray.init()` of another process
    finds it in no address file. Without the dashboard, whose agent sampling every process cost ~20%
    of a 2-core machine's fit throughput; for the dashboard, `ray start --head` and pass --address."""
    temp_dir = tempfile.mkdtemp(prefix="padim-ray-", dir=LOCAL_TEMP_ROOT if os.path.isdir(LOCAL_TEMP_ROOT) else None)
    atexit.register(_remove_local, temp_dir)  # also when ray.init fails (e.g. a node start timed out)
    ray.init(address="local", include_dashboard=False, log_to_driver=_WORKER_LOGS["show"], _temp_dir=temp_dir)
    _STARTED_HERE["local"] = True


def _remove_local(temp_dir: str) -> None:
    ray.shutdown()
    shutil.rmtree(temp_dir, ignore_errors=True)


@dataclass(frozen=True)
class ActorSpec:
    """What one actor reserves, how many torch threads it runs, and where it goes."""

    num_cpus: float
    num_gpus: float
    threads: int
    node_id: str | None = None  # pinned to this node (whole-node CPU actors); None: spread over nodes

    def options(self) -> dict:
        """Ray actor options: resources, scheduling strategy and the OpenMP thread count.

        Ray sets OMP_NUM_THREADS to the reserved CPUs (rounded); raising the count later with
        torch.set_num_threads made the forward pass 2.3x slower here, so the actor starts with it.
        """
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        strategy = NodeAffinitySchedulingStrategy(self.node_id, soft=False) if self.node_id else "SPREAD"
        return {
            "num_cpus": self.num_cpus,
            "num_gpus": self.num_gpus,
            "scheduling_strategy": strategy,
            "runtime_env": {"env_vars": {"OMP_NUM_THREADS": str(self.threads)}},
        }


def plan_actors(cluster: ClusterConfig) -> list[ActorSpec]:
    """One actor per GPU, or one per CPU node using every core; or what --actors/--cpus-per-actor say.

    A whole-node CPU actor reserves all but `decode_cpus(node)` of its node's CPUs, so decode tasks
    always have CPUs (with every CPU reserved, Ray Data's read tasks never run and streaming_split
    waits forever: docs/design.md, "Ray facts"), and runs torch on all the node's cores: decoding at the model's
    input size is a few percent of the forward pass. Each actor holds one full accumulator, so fewer,
    wider actors also bound memory. A plan that leaves decoding no CPU is an error here, not a hang.
    """
    resources = ray.cluster_resources()
    cpus, gpus = resources.get("CPU", 0.0), resources.get("GPU", 0.0)
    gpus_per_actor = cluster.gpus_per_actor if cluster.gpus_per_actor is not None else (1.0 if gpus else 0.0)
    if cluster.actors is None and cluster.cpus_per_actor is None and not gpus_per_actor:
        return _whole_node_actors(cluster)
    cpus_per_actor = cluster.cpus_per_actor if cluster.cpus_per_actor is not None else cluster.cpus_per_gpu_actor
    if cluster.actors is not None:
        actors = cluster.actors
    elif gpus_per_actor:
        actors = max(1, int(gpus // gpus_per_actor))
    else:
        actors = max(1, int((cpus - 1) // cpus_per_actor))
    if actors * gpus_per_actor > gpus and _STARTED_HERE["local"]:
        raise ClusterError(
            f"{actors} actors x {gpus_per_actor:g} GPUs need {actors * gpus_per_actor:g} GPUs; this machine has {gpus:g} "
            "and its local Ray no autoscaler to add more; lower --actors or --gpus-per-actor (0 runs actors on the CPU)"
        )
    if actors * gpus_per_actor > gpus:
        gpus = wait_for_gpus(actors * gpus_per_actor, cluster.gpu_wait)
    if actors * gpus_per_actor > gpus:
        raise ClusterError(
            f"{actors} actors x {gpus_per_actor:g} GPUs need {actors * gpus_per_actor:g} GPUs, the cluster has {gpus:g} GPUs "
            f"after waiting {cluster.gpu_wait:g} s for the autoscaler; lower --actors or --gpus-per-actor, or check its GPU node types"
        )
    if actors * cpus_per_actor > cpus - 1:
        raise ClusterError(
            f"{actors} actors x {cpus_per_actor:g} CPUs leave fewer than 1 of the cluster's {cpus:g} CPUs for decoding; "
            "lower --actors or --cpus-per-actor"
        )
    threads = max(1, int(round(cpus_per_actor)))
    return [ActorSpec(cpus_per_actor, gpus_per_actor, threads) for _ in range(actors)]


def wait_for_gpus(needed: float, timeout: float) -> float:
    """Ask the autoscaler for `needed` GPUs (a cluster whose GPU workers start from zero) and wait
    up to `timeout` seconds for them; returns the GPUs the cluster then has.

    The request is withdrawn once they are there (or not): the actors about to start keep the nodes
    busy, and idle nodes are released as usual afterwards.
    """
    from ray.autoscaler.sdk import request_resources

    request_resources(bundles=[{"GPU": 1}] * math.ceil(needed))
    deadline = time.monotonic() + timeout
    try:
        while (gpus := ray.cluster_resources().get("GPU", 0.0)) < needed and time.monotonic() < deadline:
            log.info("waiting for the autoscaler: %g of %g GPUs", gpus, needed)
            time.sleep(min(10.0, max(0.0, deadline - time.monotonic())))
    finally:
        request_resources(bundles=[])
    return ray.cluster_resources().get("GPU", 0.0)


def decode_cpus(cluster: ClusterConfig, node_cpus: float) -> float:
    """CPUs of a node left to decode tasks when a whole-node actor runs there."""
    return max(1.0, node_cpus * cluster.decode_share)


def _whole_node_actors(cluster: ClusterConfig) -> list[ActorSpec]:
    nodes = [n for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) >= 2]
    if not nodes:
        raise ClusterError(
            "no node has a GPU or the 2 CPUs a whole-node CPU actor needs (one to embed, one to decode); where the autoscaler "
            "adds GPU workers from zero pass --actors N --gpus-per-actor 1, else --actors and --cpus-per-actor"
        )
    specs = []
    for node in nodes:
        node_cpus = node["Resources"]["CPU"]
        specs.append(ActorSpec(node_cpus - decode_cpus(cluster, node_cpus), 0.0, int(node_cpus), node["NodeID"]))
    return specs


def start_actors(plan: list[ActorSpec], create: Callable[[int, ActorSpec], object], cluster: ClusterConfig, role: str) -> list:
    """`create(i, spec)` for each spec of `plan`, waiting until every actor has started (or failed to).

    On a joined cluster whose free resources cannot hold the actors (other jobs hold them), it says
    so at once, and after `cluster.resource_wait` seconds removes the actors and raises ClusterError
    instead of waiting forever.
    """
    needed = {"CPU": sum(s.num_cpus for s in plan), "GPU": sum(s.num_gpus for s in plan)}
    free = ray.available_resources()
    short = {name: amount for name, amount in needed.items() if amount > free.get(name, 0.0)}
    if short and not _STARTED_HERE["local"]:  # a private Ray's shortfall is an earlier actor still being removed
        log.warning("waiting for %s for %d %s actor(s); the cluster has %s free", _amounts(short), len(plan), role, _amounts(free, short))
    actors = [create(i, spec) for i, spec in enumerate(plan)]
    try:
        _, waiting = ray.wait([a.__ray_ready__.remote() for a in actors], num_returns=len(actors), timeout=cluster.resource_wait)
        if waiting:
            raise ClusterError(
                f"{len(waiting)} of {len(plan)} {role} actors found no room in {cluster.resource_wait:g} s (--resource-wait): "
                f"they need {_amounts(needed)}, the cluster has {_amounts(ray.available_resources(), needed)} free; "
                "wait for other jobs, or lower --actors, --cpus-per-actor or --gpus-per-actor"
            )
    except BaseException:
        for actor in actors:
            ray.kill(actor)
        raise
    return actors


def _amounts(resources: dict, names=None) -> str:
    """e.g. '2 CPUs, 1 GPUs' for the nonzero (or the `names`) CPU and GPU amounts of `resources`."""
    names = names or [name for name in ("CPU", "GPU") if resources.get(name)]
    return ", ".join(f"{resources.get(name, 0.0):g} {name}s" for name in names) or "nothing"


def describe_plan(plan: list[ActorSpec]) -> str:
    """e.g. '1 x (1 CPU, 0 GPU, 2 threads)', for logs."""
    kinds = collections.Counter(f"{s.num_cpus:g} CPU, {s.num_gpus:g} GPU, {s.threads} threads" for s in plan)
    return ", ".join(f"{count} x ({kind})" for kind, count in kinds.items())


def choose_device(gpu_ids: list, cuda_available: bool):
    """An actor's torch device: the first GPU it reserved (Ray makes it cuda:0 by setting
    CUDA_VISIBLE_DEVICES to the reserved ones), else the CPU, even where CUDA is visible."""
    import torch

    return torch.device("cuda", 0) if gpu_ids and cuda_available else torch.device("cpu")


def actor_device():
    """The device this actor's resources reserve (`choose_device` of Ray's GPU ids).

    Ray 2.60 no longer hides GPUs from actors that reserved none: deciding by
    torch.cuda.is_available() alone put a CPU actor on GPU 0, unreserved, beside another's work.
    """
    import torch

    gpu_ids, cuda_available = ray.get_gpu_ids(), torch.cuda.is_available()
    if gpu_ids and not cuda_available:
        log.warning("this actor reserved GPUs %s but torch sees no CUDA device: it runs on the CPU", gpu_ids)
    return choose_device(gpu_ids, cuda_available)


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


@contextmanager
def user_errors():
    """Re-raise a PadimError hidden inside a Ray failure as itself, so the CLI prints its one line."""
    try:
        yield
    except Exception as err:
        user_error = unwrap_user_error(err)
        if user_error is err:
            raise
        raise user_error from None


def unwrap_user_error(err: BaseException) -> BaseException:
    """The PadimError behind a Ray task or actor failure, so the user sees its one line, not a traceback."""
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, PadimError) and not isinstance(seen, ray.exceptions.RayError):
            return seen
        seen = getattr(seen, "cause", None) or seen.__cause__
    return err
