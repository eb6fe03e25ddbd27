"""Many ShanghaiTech scenes in one job: `padim-ray fit stc --scene all` (or `--scene 01,04`).

Each scene gets its own model, fitted exactly as `fit stc --scene S` would. Up to `in_flight`
scenes run at once on the one cluster, their stats actors in turn (SharedJob.actor_slot): while a
scene embeds, the next one lists and probes its videos and reads its checkpoints; its actors start
the moment the running scene releases its own, and that scene's reduction and model write (CPU
and storage work) overlap the next scene's embedding. So the accelerators do not wait for a
model to be written, and memory stays that of `in_flight` single-scene fits instead of one
accumulator per scene in every actor.
"""

from __future__ import annotations

import logging
import sys
import threading
from dataclasses import dataclass

from tqdm import tqdm

from padim_ray.accumulate import SharedJob
from padim_ray.config import SCENES_IN_FLIGHT, ClusterConfig, ModelConfig
from padim_ray.checkpoint import default_checkpoint_dir
from padim_ray.embedding import Embedder
from padim_ray.errors import PadimError
from padim_ray.fit import FitResult, fit_model
from padim_ray.runtime import connect
from padim_ray.stc import scene_path, scene_videos
from padim_ray.files import Location, StorageError, make_parent_folders
from padim_ray.leases import WRITING_MARKER
from padim_ray.publish import is_committed
from padim_ray.store import open_model
from padim_ray.video import InputPolicy

log = logging.getLogger(__name__)


class ScenesError(PadimError):
    """A scene of a many-scene job failed; the message says which were fitted and how to go on."""


@dataclass
class SceneFit:
    """One scene of the job: its inputs and output, then its result or the error that ended it.

    `kept` marks a scene whose model an earlier run of the same job already published.
    """

    scene: str
    videos: list[Location]
    out: Location
    checkpoint_dir: Location | None
    result: FitResult | None = None
    error: BaseException | None = None
    kept: bool = False


def plan_scenes(root, scenes: list[str], out: str, checkpoint_dir: str | None, overwrite: bool, model_config: ModelConfig) -> list[SceneFit]:
    """Every scene's videos and output, checked before any work: layout, backbone and weights, distinct
    outputs, no clobbering, output and checkpoint folders (missing ones created).

    A scene whose model a run of the same job (same settings, same videos) has published is kept,
    so rerunning an interrupted job resumes it; `overwrite` refits it instead.
    """
    for option, value in (("--out", out), ("--checkpoint-dir", checkpoint_dir)):
        if len(scenes) > 1 and value is not None and "{scene}" not in value:
            raise PadimError(f"{option} {value} must contain {{scene}} when fitting several scenes, e.g. models/stc_{{scene}}")
    fits = [
        SceneFit(
            scene, scene_videos(root, scene), Location(scene_path(out, scene)),
            Location(scene_path(checkpoint_dir, scene)) if checkpoint_dir else None,
        )
        for scene in scenes
    ]
    for fit in fits:
        if not overwrite:
            _keep_or_refuse(fit, model_config)
    Embedder(model_config)  # backbone, dims and weights, as fit_model checks them
    for fit in fits:  # last: folders are made once the checks above have passed
        make_parent_folders(fit.out)
        make_parent_folders(fit.checkpoint_dir or default_checkpoint_dir(fit.out), "--checkpoint-dir")
    return fits


def _keep_or_refuse(fit: SceneFit, model_config: ModelConfig) -> None:
    """Mark `fit` kept if its output is this job's published model; refuse any other existing output."""
    if is_committed(fit.out):
        published = open_model(fit.out).attributes
        ours = {k: v for k, v in model_config.to_dict().items() if k != "dims" or v is not None}
        stored = {k: published.config.get(k) for k in ours}
        inputs = {Location(s["path"]).uri for s in published.sources + published.skipped_inputs}
        if stored != ours or inputs != {video.uri for video in fit.videos}:
            raise StorageError(
                f"output {fit.out} holds a model of other settings or footage; pass --overwrite to refit it, or choose another --out"
            )
        fit.kept = True
        fit.result = FitResult(out=fit.out, frames=published.frames, seconds=0.0)
        log.info("scene %s: kept the model an earlier run published at %s", fit.scene, fit.out)
    elif fit.out.exists() and not (fit.out.is_remote and (fit.out / WRITING_MARKER).exists()):
        raise StorageError(f"output {fit.out} already exists and is not a model; pass --overwrite or choose another --out")


def fit_scenes(
    fits: list[SceneFit],
    model_config: ModelConfig = ModelConfig(),
    cluster: ClusterConfig = ClusterConfig(),
    overwrite: bool = False,
    address: str | None = None,
    input_policy: InputPolicy = InputPolicy(),
    in_flight: int = SCENES_IN_FLIGHT,
    calibration: float = 0.0,
) -> list[SceneFit]:
    """Fit every planned scene (see plan_scenes), `in_flight` at a time, with one progress bar.

    A failing scene stops new scenes from starting; the ones running finish. Raises ScenesError
    naming the failed scene and the fitted ones; rerunning the job keeps those (see plan_scenes).
    """
    todo = [fit for fit in fits if not fit.kept]
    if not todo:
        return fits  # every model was published by an earlier run: no cluster needed
    connect(address)
    shared = SharedJob(tqdm(total=0, unit="frame", desc=f"fit {len(fits)} scenes", file=sys.stderr, mininterval=2))
    try:
        _run(todo, in_flight, lambda fit: fit_model(
            fit.videos, fit.out, model_config, cluster, overwrite=overwrite, address=address,
            checkpoint_dir=fit.checkpoint_dir, input_policy=input_policy, shared=shared, calibration=calibration,
        ))
    finally:
        shared.bar.close()
    failed = [fit for fit in fits if fit.error is not None]
    if failed:
        done = [fit.scene for fit in fits if fit.result is not None]
        error = failed[0].error
        if not isinstance(error, PadimError):
            log.error("scene %s failed; fitted: %s; rerun the same command to fit the rest", failed[0].scene, ", ".join(done) or "none")
            raise error
        raise ScenesError(
            f"scene {failed[0].scene}: {str(error).splitlines()[0]} (fitted: {', '.join(done) or 'none'}; "
            "rerun the same command to fit the rest: fitted scenes are kept)"
        ) from error
    return fits


def _run(fits: list[SceneFit], in_flight: int, fit_one) -> None:
    """Run `fit_one` over `fits` on `in_flight` threads, in order; after a failure, start no more.

    Daemon threads: an interrupted job exits at once (its checkpoints keep the progress).
    """
    queue, lock, failed = list(fits), threading.Lock(), threading.Event()

    def worker() -> None:
        while not failed.is_set():
            with lock:
                if not queue:
                    return
                fit = queue.pop(0)
            try:
                fit.result = fit_one(fit)
            except BaseException as err:  # reported by fit_scenes, in the main thread
                fit.error = err
                failed.set()

    threads = [threading.Thread(target=worker, daemon=True, name=f"scene-{i}") for i in range(min(in_flight, len(fits)))]
    for thread in threads:
        thread.start()
    for thread in threads:
        while thread.is_alive():
            thread.join(0.5)  # short joins, so Ctrl-C reaches the main thread


def format_scene_table(fits: list[SceneFit], seconds: float) -> str:
    """scene, videos, frames, seconds (or kept) and model URI of every scene; the job's wall time last."""
    lines = [f"{'scene':<6}{'videos':>7}{'frames':>9}{'seconds':>9}  model"]
    for fit in fits:
        result = fit.result
        took = "kept" if fit.kept else f"{result.seconds:.1f}"
        lines.append(f"{fit.scene:<6}{len(fit.videos):>7}{result.frames:>9}{took:>9}  {result.out}")
    total = sum(fit.result.frames for fit in fits)
    lines.append(f"{'all':<6}{sum(len(f.videos) for f in fits):>7}{total:>9}{seconds:>9.1f}")
    return "\n".join(lines)
