"""The commands README.md and cluster/README.md show: every one parses, and the local tour runs in a fresh folder."""

from __future__ import annotations

import glob
import json
import logging
import re
import shlex
import shutil
from pathlib import Path

import click
import pytest
import typer

from padim_ray.cli import app
from padim_ray.store import open_model
from helpers import SMALL_CLUSTER_OPTIONS, SMALL_FIT, run

REPOSITORY = Path(__file__).parent.parent
DOCS = [REPOSITORY / "README.md", REPOSITORY / "cluster" / "README.md"]


def command_blocks(doc: Path) -> list[list[list[str]]]:
    """The indented code blocks of a markdown file, as their `padim-ray` commands (argument lists).

    Continued lines (`\\`) are joined, comments dropped, a `ray job submit ... --` prefix removed and
    an optional part written `[...]` left out.
    """
    blocks, lines = [], doc.read_text().splitlines()
    for start, line in enumerate(lines):
        if not line.startswith("    ") or (start and lines[start - 1].strip()):
            continue  # not the first line of an indented block
        text = "\n".join(x for x in _block_lines(lines, start)).replace("\\\n", " ")
        commands = []
        for command in text.splitlines():
            if "padim-ray" not in command:
                continue  # e.g. a command's output shown
            words = shlex.split(re.sub(r"\[.*?\]", "", command), comments=True)
            if "padim-ray" in words:
                commands.append(words[words.index("padim-ray") + 1:])
        blocks.append(commands)
    return blocks


def _block_lines(lines: list[str], start: int):
    for line in lines[start:]:
        if not line.startswith("    "):
            return
        yield line[4:]


def test_every_command_in_the_readmes_parses():
    """Option names, values and arguments as the CLI takes them (parsed, not run)."""
    group = typer.main.get_command(app)
    commands = [command for doc in DOCS for block in command_blocks(doc) for command in block]
    assert len(commands) >= 15
    for name, *rest in commands:
        command = group.get_command(click.Context(group), name)
        assert command is not None, f"padim-ray {name}: no such command"
        try:
            command.make_context(name, rest)
        except click.UsageError as err:
            pytest.fail(f"padim-ray {shlex.join([name, *rest])}: {err.format_message()}")


def local_tour() -> list[list[str]]:
    """README.md's blocks made only of local `padim-ray` commands, in order (Fitting, then Scoring)."""
    blocks = [block for block in command_blocks(DOCS[0]) if block and not any("://" in " ".join(c) for c in block)]
    return [command for block in blocks for command in block if command[0] in ("fit", "calibrate", "score", "evaluate", "render")]


@pytest.mark.slow
def test_the_local_tour_runs_as_written_in_a_fresh_folder(ray_local, stc_root, tmp_path, monkeypatch, caplog):
    """README's fitting and scoring commands in order, each on the outputs of those before it, in a folder
    without models/ or maps/: the STC root is the synthetic one, cam1/ holds copies of its footage, and
    the model is small (random weights)."""
    caplog.set_level(logging.INFO, logger="padim_ray.files")
    monkeypatch.chdir(tmp_path)
    videos = sorted((stc_root / "training" / "videos").glob("01_*.avi"))
    Path("cam1").mkdir()
    for name, video in (("day1.mp4", videos[0]), ("day2.mp4", videos[1]), ("day3.mp4", videos[1]), ("today.mp4", videos[0])):
        shutil.copy(video, Path("cam1") / name)
    shutil.copytree(stc_root / "testing" / "frames" / "01_0001", "cam1/frames")
    tour = local_tour()
    assert [c[0] for c in tour] == ["fit", "fit", "fit", "calibrate", "score", "evaluate", "evaluate", "score", "render", "score", "score"]
    outputs = []
    for command in tour:
        args = [word.replace("/data/shanghaitech", str(stc_root)) for word in command]
        args = [path for word in args for path in (sorted(glob.glob(word)) if "*" in word else [word])]  # as a shell expands
        result = run(*args, *{"fit": SMALL_FIT, "calibrate": SMALL_CLUSTER_OPTIONS, "score": SMALL_CLUSTER_OPTIONS}.get(args[0], []))
        assert result.exit_code == 0, f"padim-ray {shlex.join(command)}:\n{result.output}"
        outputs.append(result.stdout)
    assert f"model: {tmp_path / 'models' / 'stc_01'} (60 frames" in outputs[0] and " kept " in outputs[1]
    for folder in ("models", "maps", "evaluation"):
        assert f"created folder {tmp_path / folder} for --out" in caplog.messages
    assert open_model("models/stc_01").attrs["frames"] == 60 and open_model("models/cam1").attrs["frames"] == 72
    assert [r["scene"] for r in json.loads(Path("evaluation/metrics.json").read_text())] == ["01"]
    assert Path("evaluation/maps_01/scores.parquet").is_file() and Path("evaluation/scene_01/roc.png").is_file()
    assert Path("today.mp4").stat().st_size > 10_000
    assert open_model("models/cam1").attributes.calibration["frames"] == 30  # calibrated on cam1/day3.mp4 (a copy of a fitted video: other bytes, same frames)
    for maps in ("maps/today", "maps/strict", "maps/raw"):  # the calibrated model decides by default
        assert Path(maps, "events.parquet").is_file()
