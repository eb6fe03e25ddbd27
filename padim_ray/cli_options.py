"""Options that several commands share, and a command's cluster options taken as one object."""

from __future__ import annotations

import functools
import inspect
from dataclasses import asdict, dataclass, fields
from typing import Annotated, Callable, Optional, get_type_hints

import typer

from padim_ray.config import ClusterConfig

BatchSize = Annotated[Optional[int], typer.Option(help="Frames per forward pass (16 on CPU, 32 on a GPU).")]
Actors = Annotated[Optional[int], typer.Option(help="Actors (one per GPU, else one per node using all its cores).")]
GpusPerActor = Annotated[Optional[float], typer.Option(help="GPUs per actor (1 if the cluster has GPUs).")]
GpuWait = Annotated[float, typer.Option(help="Seconds to wait for the autoscaler to add the GPUs the actors need.")]
ResourceWait = Annotated[float, typer.Option(
    help="Seconds actors may wait for room on a joined cluster whose free CPUs/GPUs other jobs hold, before the command fails."
)]
CpusPerActor = Annotated[Optional[float], typer.Option(help="CPUs reserved per actor, also its torch threads (whole node less decoding; 1 with GPUs).")]
Address = Annotated[Optional[str], typer.Option(
    help="Ray cluster to join (auto: any on this machine); default $RAY_ADDRESS (set inside a Ray job), else a new local Ray of this command's own."
)]
CheckpointDir = Annotated[Optional[str], typer.Option(help="Where progress is checkpointed, folder or URI (default: .OUT.checkpoint next to the output).")]
CheckpointEvery = Annotated[float, typer.Option(help="Seconds between checkpoints of each stats actor.")]
MaxRetries = Annotated[int, typer.Option(help="Stats actors that may be lost before the fit stops (rerun to resume).")]
SkipBadInputs = Annotated[bool, typer.Option(help="Leave out inputs that cannot be decoded (listed in the model) instead of stopping.")]


@dataclass(frozen=True)
class ClusterOptions:
    """The cluster options of every command that runs on Ray, in their --help order."""

    batch_size: BatchSize = ClusterConfig.batch_size
    actors: Actors = None
    gpus_per_actor: GpusPerActor = None
    gpu_wait: GpuWait = ClusterConfig.gpu_wait
    resource_wait: ResourceWait = ClusterConfig.resource_wait
    cpus_per_actor: CpusPerActor = ClusterConfig.cpus_per_actor

    def config(
        self,
        fan_in: int = ClusterConfig.fan_in,
        checkpoint_every: float = ClusterConfig.checkpoint_every,
        max_retries: int = ClusterConfig.max_retries,
    ) -> ClusterConfig:
        """The ClusterConfig of these options and of the command's own (fit's --fan-in, --checkpoint-every,
        --max-retries); one that a command lacks keeps its default."""
        return ClusterConfig(**asdict(self), fan_in=fan_in, checkpoint_every=checkpoint_every, max_retries=max_retries)


@dataclass(frozen=True)
class CheckpointOptions:
    """Where and how often a fit or update checkpoints, and how many lost stats actors it survives."""

    checkpoint_dir: CheckpointDir = None
    checkpoint_every: CheckpointEvery = ClusterConfig.checkpoint_every
    max_retries: MaxRetries = ClusterConfig.max_retries


OPTION_GROUPS = (ClusterOptions, CheckpointOptions)


def option_groups(command: Callable) -> Callable:
    """Let typer show the fields of an option group (OPTION_GROUPS) as options where `command` declares a
    parameter of that type, and call `command` with the group as one object: declared once, built once."""
    signature = inspect.signature(command, eval_str=True)
    groups = {p.name: p.annotation for p in signature.parameters.values() if p.annotation in OPTION_GROUPS}
    shown = [option for p in signature.parameters.values() for option in (_as_options(groups[p.name]) if p.name in groups else [p])]

    @functools.wraps(command)
    def wrapper(**options):
        built = {name: group(**{f.name: options.pop(f.name) for f in fields(group)}) for name, group in groups.items()}
        return command(**built, **options)

    wrapper.__signature__ = signature.replace(parameters=shown)
    wrapper.__annotations__ = {p.name: p.annotation for p in shown}
    return wrapper


def _as_options(group: type) -> list[inspect.Parameter]:
    """The fields of an option group as the parameters typer turns into options."""
    hints = get_type_hints(group, include_extras=True)
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    return [inspect.Parameter(f.name, kind, default=f.default, annotation=hints[f.name]) for f in fields(group)]
