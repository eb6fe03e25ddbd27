"""Connecting to Ray and sizing and starting actors from the cluster's resources: the one place Ray is configured."""

from __future__ import annotations

import atexit
import collections
import logging
import math
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import ray

from padim_ray.config import ClusterConfig
from padim_ray.errors import PadimError
from padim_ray.stop_signals import restore_stop_handlers

log = logging.getLogger(__name__)


class ClusterError(PadimError):
    """The cluster cannot run the requested actors and still decode frames."""


_WORKER_LOGS = {"show": True}
LOCAL_TEMP_ROOT = "/tmp"  # as Ray's own default: a long $TMPDIR would push its Unix socket paths past 107 chars
_STARTED_HERE = {"local": False}  # whether connect() started a local Ray instance, which no autoscaler grows


def show_worker_logs(show: bool) -> None:
    """Whether Ray workers' output (and their tracebacks) is echoed to this driver's terminal."""
    _WORKER_LOGS["show"] = show


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
    restore_stop_handlers()


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
