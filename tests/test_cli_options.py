"""Option groups: typer shows a group's fields as options and the command gets them as one object."""

from __future__ import annotations

import typer
from typer.testing import CliRunner

from padim_ray.cli_options import CheckpointOptions, ClusterOptions, option_groups
from padim_ray.config import ClusterConfig

received = []
app = typer.Typer(add_completion=False)


@app.command()
@option_groups
def probe(name: str, cluster: ClusterOptions = ClusterOptions(), checkpoints: CheckpointOptions = CheckpointOptions(), last: int = 0) -> None:
    received.append((name, cluster, checkpoints, last))


def test_a_group_is_shown_as_its_fields_in_place_and_passed_whole():
    received.clear()
    result = CliRunner().invoke(app, ["x", "--actors", "2", "--gpu-wait", "5", "--checkpoint-every", "7", "--max-retries", "1", "--last", "3"])
    assert result.exit_code == 0, result.output
    assert received == [("x", ClusterOptions(actors=2, gpu_wait=5.0), CheckpointOptions(checkpoint_every=7.0, max_retries=1), 3)]
    shown = [param.name for param in typer.main.get_command(app).params]
    assert shown == [
        "name", "batch_size", "actors", "gpus_per_actor", "gpu_wait", "resource_wait", "cpus_per_actor",
        "checkpoint_dir", "checkpoint_every", "max_retries", "last",
    ]


def test_cluster_options_build_one_cluster_config_with_the_commands_own():
    assert ClusterOptions().config() == ClusterConfig()
    config = ClusterOptions(batch_size=4, cpus_per_actor=0.5).config(fan_in=3, max_retries=0)
    assert config == ClusterConfig(batch_size=4, cpus_per_actor=0.5, fan_in=3, max_retries=0)
