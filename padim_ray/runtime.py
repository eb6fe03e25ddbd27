"""Connecting to Ray and sizing actors from the cluster's resources: the one place Ray is configured."""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass

import ray

from padim_ray.config import ClusterConfig
from padim_ray.errors import PadimError

log = logging.getLogger(__name__)


class ClusterError(PadimError):
    """The cluster cannot run the requested actors and still decode frames."""


def connect(address: str | None = None) -> None:
    """Use Ray as already initialised, else `address`, else a running cluster, else a new local one."""
    if ray.is_initialized():
        return
    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address)
        return
    try:
        ray.init(address="auto")
    except ConnectionError:
        log.info("no running Ray cluster found: starting a local one")
        ray.init()


@dataclass(frozen=True)
class ActorPlan:
    """How many actors to start and what each reserves."""

    actors: int
    num_cpus: float
    num_gpus: float

    @property
    def torch_threads(self) -> int:
        return max(1, int(round(self.num_cpus)))


def plan_actors(cluster: ClusterConfig) -> ActorPlan:
    """Size the actor pool so that at least one CPU is always left for decode tasks.

    With every CPU reserved by actors, Ray Data's read tasks never run and streaming_split waits
    forever (DESIGN.md sec. 4), so that case is an error here rather than a hang.
    """
    resources = ray.cluster_resources()
    cpus, gpus = resources.get("CPU", 0.0), resources.get("GPU", 0.0)
    gpus_per_actor = cluster.gpus_per_actor if cluster.gpus_per_actor is not None else (1.0 if gpus else 0.0)
    cpus_per_actor = cluster.cpus_per_actor
    if cluster.actors is not None:
        actors = cluster.actors
    elif gpus_per_actor:
        actors = max(1, int(gpus // gpus_per_actor))
    else:
        actors = max(1, int((cpus - 1) // cpus_per_actor))
    if actors < 1:
        raise ClusterError(f"--actors must be at least 1, got {actors}")
    if actors * gpus_per_actor > gpus:
        raise ClusterError(
            f"{actors} actors x {gpus_per_actor:g} GPUs need {actors * gpus_per_actor:g} GPUs, the cluster has {gpus:g} GPUs; "
            "lower --actors or --gpus-per-actor"
        )
    if actors * cpus_per_actor > cpus - 1:
        raise ClusterError(
            f"{actors} actors x {cpus_per_actor:g} CPUs leave fewer than 1 of the cluster's {cpus:g} CPUs for decoding; "
            "lower --actors or --cpus-per-actor"
        )
    return ActorPlan(actors=actors, num_cpus=cpus_per_actor, num_gpus=gpus_per_actor)


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
