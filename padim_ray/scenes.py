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

from padim_ray.config import ClusterConfig, ModelConfig
from padim_ray.errors import PadimError, first_line
from padim_ray.fit import FitResult, SharedJob, fit_model
from padim_ray.runtime import connect
from padim_ray.stc import scene_videos
from padim_ray.storage import Location, StorageError

log = logging.getLogger(__name__)

SCENES_IN_FLIGHT = 2  # one embedding, one preparing or writing its model


class ScenesError(PadimError):
    """A scene of a many-scene job failed; the message says which were fitted and how to go on."""


@dataclass
class SceneFit:
    """One scene of the job: its inputs and output, then its result or the error that ended it."""

    scene: str
    videos: list[Location]
    out: Location
    checkpoint_dir: Location | None
    result: FitResult | None = None
    error: BaseException | None = None


def plan_scenes(root, scenes: list[str], out: str, checkpoint_dir: str | None, overwrite: bool) -> list[SceneFit]:
    """Every scene's videos and output, checked before any work: layout, distinct outputs, no clobbering."""
    if len(scenes) > 1 and "{scene}" not in out:
        raise PadimError(f"--out {out} must contain {{scene}} when fitting several scenes, e.g. models/stc_{{scene}}")
    fits = [
        SceneFit(scene, scene_videos(root, scene), Location(out.format(scene=scene)), _checkpoint_dir(checkpoint_dir, scene))
        for scene in scenes
    ]
    existing = [fit for fit in fits if fit.out.exists()]
    if existing and not overwrite:
        rest = ",".join(fit.scene for fit in fits if fit not in existing)
        hint = f"; fit the others with --scene {rest}" if rest else ""
        raise StorageError(f"output {existing[0].out} already exists ({len(existing)} of {len(fits)} scenes); pass --overwrite{hint}")
    return fits


def _checkpoint_dir(template: str | None, scene: str) -> Location | None:
    if template is None:
        return None  # each model's default, next to it
    return Location(template.format(scene=scene)) if "{scene}" in template else Location(template) / f"scene_{scene}"


def fit_scenes(
    fits: list[SceneFit],
    model: ModelConfig = ModelConfig(),
    cluster: ClusterConfig = ClusterConfig(),
    overwrite: bool = False,
    address: str | None = None,
    skip_bad_inputs: bool = False,
    in_flight: int = SCENES_IN_FLIGHT,
) -> list[SceneFit]:
    """Fit every planned scene (see plan_scenes), `in_flight` at a time, with one progress bar.

    A failing scene stops new scenes from starting; the ones running finish. Raises ScenesError
    naming the failed scene, the fitted ones and the `--scene` list that would finish the job.
    """
    connect(address)
    shared = SharedJob(tqdm(total=0, unit="frame", desc=f"fit {len(fits)} scenes", file=sys.stderr, mininterval=2))
    try:
        _run(fits, in_flight, lambda fit: fit_model(
            fit.videos, fit.out, model, cluster, overwrite=overwrite, address=address,
            checkpoint_dir=fit.checkpoint_dir, skip_bad_inputs=skip_bad_inputs, shared=shared,
        ))
    finally:
        shared.bar.close()
    failed = [fit for fit in fits if fit.error is not None]
    if failed:
        done = [fit.scene for fit in fits if fit.result is not None]
        rest = ",".join(fit.scene for fit in fits if fit.result is None)
        error = failed[0].error
        if not isinstance(error, PadimError):
            log.error("scene %s failed; fitted: %s; fit the rest with --scene %s", failed[0].scene, ", ".join(done) or "none", rest)
            raise error
        raise ScenesError(
            f"scene {failed[0].scene}: {first_line(error)} (fitted: {', '.join(done) or 'none'}; "
            f"fit the rest with --scene {rest})"
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
    """scene, videos, frames, seconds and model URI of every fitted scene; the job's wall time last."""
    lines = [f"{'scene':<6}{'videos':>7}{'frames':>9}{'seconds':>9}  model"]
    for fit in fits:
        result = fit.result
        lines.append(f"{fit.scene:<6}{len(fit.videos):>7}{result.frames:>9}{result.seconds:>9.1f}  {result.out}")
    total = sum(fit.result.frames for fit in fits)
    lines.append(f"{'all':<6}{sum(len(f.videos) for f in fits):>7}{total:>9}{seconds:>9.1f}")
    return "\n".join(lines)
