"""Scoring actors shared by watched cameras: one pool per model, each actor a GPU when the cluster has them.

The driver submits a batch mixed from the pool's cameras to each idle actor and takes results back in
the order it submitted them, so every camera's frames reach its event tracker in order while all the
pool's actors work at once. A lost actor is replaced (up to `max_restarts` in all): the batch it held
is counted as dropped by its cameras, which go on.
"""

from __future__ import annotations

import collections
import itertools
import logging
import os
from dataclasses import dataclass

import numpy as np
import ray

from padim_ray.config import ClusterConfig, ScoreConfig
from padim_ray.devices import actor_device
from padim_ray.errors import first_line
from padim_ray.runtime import ActorSpec, start_actors
from padim_ray.score import Scorer

log = logging.getLogger(__name__)
ACTOR_PREFIX = "padim-ray-watch-scorer"  # named actors (one run's names end in its driver's pid and a count)
_names = itertools.count()


@ray.remote
class LiveScorer:
    """A model's Scorer in an actor: (B, S, S, 3) uint8 frames in, (B, S, S) float32 maps at the model's input size out."""

    def __init__(self, model: str):
        self.scorer = Scorer(model, ScoreConfig(), actor_device())
        self.size = (self.scorer.embedder.image_size,) * 2

    def maps(self, frames: np.ndarray) -> np.ndarray:
        return self.scorer.maps(frames, self.size).float().cpu().numpy()


@dataclass
class Scoring:
    """An actor and what it reserves; while it scores, the ObjectRef of its maps and the batch they belong to."""

    actor: object
    spec: ActorSpec
    ref: object = None
    batch: list | None = None  # what the caller submitted with the frames, given back with the maps


class Restarts:
    """Lost scoring actors that may still be replaced, shared by every pool of a watch."""

    def __init__(self, most: int):
        self.most, self.left = most, most

    @property
    def lost(self) -> int:
        return self.most - self.left


def actor_plans(models: int, per_model: int) -> list[list[ActorSpec]]:
    """The scoring actors of each of `models` pools: `per_model` each (0: one per GPU of the cluster, at
    least one). Each takes 1 CPU and, on a cluster with GPUs, an equal share of them (at most one);
    without GPUs they share the driver machine's cores but one (the readers decode there) as threads."""
    gpus = ray.cluster_resources().get("GPU", 0)
    per_model = per_model or max(1, int(gpus) // models)
    actors = per_model * models
    share = min(1.0, gpus / actors) if gpus else 0.0
    threads = 1 if share else max(1, ((os.cpu_count() or 2) - 1) // actors)
    return [[ActorSpec(1.0, share, threads) for _ in range(per_model)] for _ in range(models)]


class ScorerPool:
    """The scoring actors of one model (see the module's docstring)."""

    def __init__(self, model: str, plan: list[ActorSpec], restarts: Restarts):
        self.model, self.restarts = model, restarts
        self.idle = collections.deque(self._start(spec) for spec in plan)
        self.submitted: collections.deque[Scoring] = collections.deque()

    def _start(self, spec: ActorSpec) -> Scoring:
        name = f"{ACTOR_PREFIX}-{os.getpid()}-{next(_names)}"
        make = lambda _, s: LiveScorer.options(**s.options(), name=name).remote(self.model)  # noqa: E731
        return Scoring(start_actors([spec], make, ClusterConfig(), "scoring")[0], spec)

    @property
    def has_idle(self) -> bool:
        return bool(self.idle)

    @property
    def busy(self) -> bool:
        return bool(self.submitted)

    def submit(self, frames: np.ndarray, batch: list) -> None:
        """Score `frames` on an idle actor (has_idle must hold); `batch` comes back with their maps."""
        scoring = self.idle.popleft()
        scoring.ref, scoring.batch = scoring.actor.maps.remote(frames), batch
        self.submitted.append(scoring)

    def done(self) -> list[tuple[list, np.ndarray | None]]:
        """The finished batches at the front of the submission order, with their maps (None: the actor was lost and replaced)."""
        finished = []
        while self.submitted and ray.wait([self.submitted[0].ref], timeout=0)[0]:
            scoring = self.submitted.popleft()
            batch, scoring.batch = scoring.batch, None
            try:
                maps = ray.get(scoring.ref)
            except ray.exceptions.RayActorError as err:
                maps = None
                self.idle.append(self._replacement(scoring, err))
            else:
                self.idle.append(scoring)
            finished.append((batch, maps))
        return finished

    def wait(self, timeout: float) -> None:
        """Until the oldest submitted batch is done, or `timeout` seconds."""
        if self.submitted:
            ray.wait([self.submitted[0].ref], timeout=timeout)

    def _replacement(self, lost: Scoring, err: Exception) -> Scoring:
        if self.restarts.left <= 0:
            raise err
        self.restarts.left -= 1
        log.warning("watch: a scoring actor of %s was lost (%s); starting another", self.model, first_line(err)[:200])
        return self._start(lost.spec)

    def close(self) -> None:
        for scoring in list(self.idle) + list(self.submitted):
            ray.kill(scoring.actor)
