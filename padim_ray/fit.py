"""The fit and the update: inputs -> work units -> accumulate (stats actors) -> reduce -> model store."""

from __future__ import annotations

import functools
import logging
import math
import time
from dataclasses import dataclass, field, replace
from importlib.metadata import version
from pathlib import Path

import numpy as np
import ray

from padim_ray.accounting import Accounting, FrameAccountingError
from padim_ray.accumulate import Accumulated, Partial, SharedJob, accumulate
from padim_ray.calibrate import calibrate_fit, check_fraction, describe_calibration
from padim_ray.checkpoint import Checkpoints, default_checkpoint_dir
from padim_ray.config import FORMAT_VERSION, ClusterConfig, ModelConfig
from padim_ray.embedding import Embedder
from padim_ray.frames import frames_dataset
from padim_ray.reduce import finalize_shard, shard_bounds, shard_refs, stored_shards
from padim_ray.errors import first_line
from padim_ray.runtime import connect, unwrap_user_error, user_errors
from padim_ray.files import Location
from padim_ray.publish import PendingStore, staged_store
from padim_ray.store import MODEL_STORE, ModelAttributes, StoreError, create_model_store, open_model, publish_model
from padim_ray.video import InputPolicy, VideoError, WorkUnit, expand_inputs, iter_unit_frames, make_units

log = logging.getLogger(__name__)


def fit_model(
    inputs: list[str | Path | Location],
    out: str | Path | Location,
    model_config: ModelConfig = ModelConfig(),
    cluster: ClusterConfig = ClusterConfig(),
    overwrite: bool = False,
    address: str | None = None,
    checkpoint_dir: str | Path | Location | None = None,
    input_policy: InputPolicy = InputPolicy(),
    shared: SharedJob | None = None,
    calibration: float = 0.0,
) -> FitResult:
    """Fit one Gaussian per patch position on every frame of `inputs` and write the model store `out`.

    Progress is checkpointed in `checkpoint_dir` (default: next to `out`); rerunning the same fit
    after a crash resumes from there, and a finished fit removes it. An input that cannot be decoded
    stops the fit, or with `input_policy.skip_bad` is left out and listed in the model's
    `skipped_inputs`. `shared` is given by a job that runs several fits at once (see scenes.py).
    With `calibration` > 0, that share of the frames (calibrate.calibration_slice) is scored by the
    model without them and recorded as the model's calibration; the model still holds every frame.
    """
    job = FitJob(Location(out), cluster, overwrite, address, checkpoint_dir, input_policy, shared, check_fraction(calibration))
    embedder = Embedder(model_config)  # checks backbone, dims and weights here, before any cluster work
    return _fit_units(job, list(inputs), model_config, embedder)


def update_model(
    model_path: str | Path | Location,
    inputs: list[str | Path | Location],
    cluster: ClusterConfig = ClusterConfig(),
    force: bool = False,
    address: str | None = None,
    checkpoint_dir: str | Path | Location | None = None,
    input_policy: InputPolicy = InputPolicy(),
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
    stored = store.attributes
    model_config = stored.model_config
    embedder = Embedder(model_config)
    store.check_reproduced(embedder, "it cannot be updated: fit a new model on all the footage")
    known = {_source_key(source) for source in stored.sources}
    repeated = [str(path) for path in expand_inputs(list(inputs)) if _source_key({"path": path}) in known]
    if repeated and not force:
        raise StoreError(f"input {repeated[0]} is already in model {model_path} ({len(repeated)} such inputs); pass --force to add it again")
    if stored.calibration:
        log.warning("update: the updated model is uncalibrated (the calibration scored the model before the update); rerun `padim-ray calibrate`")
    starting = StartingModel(model_path, stored.frames, stored.sources, stored.skipped_inputs)
    job = FitJob(target, cluster, overwrite or target == model_path, address, checkpoint_dir, input_policy)
    return _fit_units(job, list(inputs), model_config, embedder, starting)


@dataclass
class FitResult:
    out: Location
    frames: int
    seconds: float
    lost_actors: int = 0
    skipped: list[dict] = field(default_factory=list)  # inputs left out: {"path", "reason"}
    warnings: int = 0  # failures survived on the way (each logged as it happened), e.g. checkpoint saves
    calibration: dict | None = None  # the model's calibration record (fit --calibration)
    calibration_note: str | None = None  # why a calibration asked for is missing

    def summary(self) -> list[str]:
        """What `fit` and `update` print when done."""
        recovered = f", recovered from {self.lost_actors} lost actors" if self.lost_actors else ""
        warned = f", {self.warnings} warnings (logged above)" if self.warnings else ""
        lines = [f"model: {self.out} ({self.frames} frames, {self.seconds:.1f} s{recovered}{warned})"]
        if self.skipped:
            lines.append(f"skipped {len(self.skipped)} input(s) that cannot be decoded (listed in the model's skipped_inputs):")
            lines += [f"  {skipped['path']}: {skipped['reason']}" for skipped in self.skipped]
        if self.calibration:
            lines.append(describe_calibration(self.calibration))
        if self.calibration_note:
            lines.append(self.calibration_note)
        return lines


@dataclass(frozen=True)
class FitJob:
    """Where a fit writes and how it runs (what does not change the model)."""

    out: Location
    cluster: ClusterConfig
    overwrite: bool
    address: str | None
    checkpoint_dir: str | Path | Location | None
    input_policy: InputPolicy
    shared: SharedJob | None = None
    calibration: float = 0.0  # share of the frames to calibrate on (0: none; see calibrate.calibration_slice)


@dataclass(frozen=True)
class StartingModel:
    """A stored model that an update merges new frames into."""

    path: Location
    frames: int
    sources: list[dict]
    skipped: list[dict]


def _fit_units(job: FitJob, inputs: list, model_config: ModelConfig, embedder: Embedder, starting: StartingModel | None = None) -> FitResult:
    """Fit (or, from `starting`, update) the model `job.out` on `inputs`: checkpoints, accumulate, write, publish."""
    started = time.monotonic()
    units, estimate, bad_inputs = _decodable_units(inputs, job.input_policy)
    identity = {**_identity(model_config, embedder, units), "skip_bad_inputs": job.input_policy.skip_bad}
    if starting:
        identity["base_model"] = {"path": starting.path.uri, "frames": starting.frames}
    starting_frames = starting.frames if starting else 0
    checkpoint_dir = Location(job.checkpoint_dir or default_checkpoint_dir(job.out))  # absolute, as actors need
    with staged_store(job.out, job.overwrite, MODEL_STORE) as pending, user_errors():
        checkpoints = Checkpoints.open(checkpoint_dir, identity)
        try:
            if not job.shared:  # a many-scene job connected once, on its main thread (scenes.fit_scenes)
                connect(job.address)
            partials = [_starting_partial(starting, embedder, job.cluster)] if starting else []
            expected = math.ceil(estimate / model_config.frame_stride) + starting_frames
            accumulated = _accumulate_units(units, model_config, embedder, job, checkpoints, partials, expected)
            good = [u for u in units if u.uid not in accumulated.bad_units]
            frames = _write_model(pending, accumulated, good, model_config, embedder, starting_frames)
            bad_decodes = _bad_unit_reasons(units, accumulated.bad_units, model_config)
            skipped = [{"path": path, "reason": reason} for path, reason in bad_inputs + bad_decodes]
            sources = (starting.sources if starting else []) + [
                {"path": u.path, "start": u.start, "stop": u.stop, "frames": accumulated.accounting.totals[u.uid]} for u in good
            ]
            skipped_inputs = (starting.skipped if starting else []) + skipped
            calibrate = job.calibration and functools.partial(
                calibrate_fit, good, accumulated.accounting.totals, accumulated.roots, job.calibration, embedder, model_config, job.cluster, job.shared
            )
            attributes = _model_attributes(model_config, embedder, sources, frames, skipped_inputs)
            calibration, note = _publish_calibrated(pending, attributes, calibrate, checkpoints)
        except BaseException:
            checkpoints.remove_if_empty()
            if checkpoints.path.exists():
                log.error("fit stopped: progress is kept in %s; rerun the same command to resume", checkpoints.path)
            raise
        checkpoints.remove()
    seconds = time.monotonic() - started
    log.info("fit: %d frames in %.1f s -> %s", frames, seconds, job.out)
    return FitResult(
        out=job.out, frames=frames, seconds=seconds, lost_actors=accumulated.lost_actors, skipped=skipped, warnings=accumulated.warnings,
        calibration=calibration, calibration_note=note,
    )


def _publish_calibrated(pending: PendingStore, attributes: ModelAttributes, calibrate, checkpoints: Checkpoints) -> tuple[dict | None, str | None]:
    """Publish the model with the calibration `calibrate()` returns (no `calibrate`: none), and return
    it with a note saying why it is missing if it failed. A failed or stopped calibration costs the fit
    nothing: the model is published uncalibrated (stopped: checkpoints removed, the stop re-raised)."""
    calibration = note = None
    try:
        calibration = calibrate() if calibrate else None
    except Exception as err:
        note = f"calibration failed ({first_line(unwrap_user_error(err))}); the model is uncalibrated: run `padim-ray calibrate {pending.target} VIDEOS`"
        log.warning("fit: %s", note)
    except BaseException:
        publish_model(pending, attributes)
        checkpoints.remove()
        log.error("fit: calibration stopped; model %s is published uncalibrated: run `padim-ray calibrate` on normal footage", pending.target)
        raise
    publish_model(pending, replace(attributes, calibration=calibration))
    return calibration, note


def _decodable_units(inputs: list, input_policy: InputPolicy) -> tuple[list[WorkUnit], int, list[tuple[str, str]]]:
    """The work units of `inputs`, their estimated frames, and the inputs left out as (path, reason)
    (with `input_policy.skip_bad`; otherwise the first that cannot be opened raises)."""
    bad_inputs: list[tuple[str, str]] | None = [] if input_policy.skip_bad else None
    units, estimate = make_units(expand_inputs(inputs), bad=bad_inputs)
    for path, reason in bad_inputs or []:
        log.warning("fit: skipping %s: %s", path, reason)
    if not units:
        raise VideoError(f"none of the inputs can be decoded ({bad_inputs[0][1] if bad_inputs else 'no inputs'})")
    return units, estimate, bad_inputs or []


def _starting_partial(starting: StartingModel, embedder: Embedder, cluster: ClusterConfig) -> Partial:
    """The statistics of the model an update starts from, as a partial of the fit (frames counted, not accounted)."""
    bounds = shard_bounds(embedder.positions, embedder.dims, cluster.shard_bytes)
    refs = stored_shards.options(num_returns=len(bounds)).remote(starting.path, bounds)
    return Partial(shard_refs(refs), Accounting(), starting.frames)


def _accumulate_units(units, model_config: ModelConfig, embedder, job: FitJob, checkpoints, starting: list[Partial], expected) -> Accumulated:
    """accumulate() over decoded video frames."""
    ray.data.DataContext.get_current().enable_progress_bars = False  # ours counts frames

    def frames_for(todo: dict[int, np.ndarray], credits):
        todo_units = [u for u in units if u.uid in todo]
        skip = {uid: used for uid, used in todo.items() if len(used)}
        return frames_dataset(
            todo_units, model_config.image_size, model_config.frame_stride, job.cluster.decode_batch, skip, job.input_policy, credits
        )

    make_embedder = functools.partial(Embedder, model_config)
    return accumulate(
        frames_for, units, make_embedder, embedder.positions, embedder.dims, job.cluster, checkpoints,
        starting=starting, expected_frames=expected, shared=job.shared,
    )


def _write_model(pending: PendingStore, accumulated: Accumulated, units, model_config: ModelConfig, embedder: Embedder, starting_frames: int) -> int:
    """Check the accounting, finalize every shard into the staging store; returns the model's frames."""
    frames = accumulated.accounting.check(units) + starting_frames
    bounds = accumulated.bounds
    create_model_store(pending, embedder.positions, embedder.dims, bounds[0][1] - bounds[0][0])
    counts = ray.get([finalize_shard.remote(root, pending.root, start, model_config.eps) for root, (start, _) in zip(accumulated.roots, bounds)])
    if set(counts) != {frames}:
        raise FrameAccountingError(f"reduced shards hold {sorted(set(counts))} frames, the inputs decoded to {frames}")
    return frames


@ray.remote
def bad_unit_reason(unit: WorkUnit, size: int, stride: int) -> str:
    """Why a unit the decoder marked bad cannot be decoded (decoding it again)."""
    try:
        for _ in iter_unit_frames(unit, stride, size):
            pass
    except VideoError as err:
        return str(err)
    return f"decoding {unit.path} failed once and succeeded when retried; check the file and the node that read it"


def _bad_unit_reasons(units: list[WorkUnit], bad: set[int], model_config: ModelConfig) -> list[tuple[str, str]]:
    bad_units = [u for u in units if u.uid in bad]
    reasons = ray.get([bad_unit_reason.remote(u, model_config.image_size, model_config.frame_stride) for u in bad_units])
    return [(u.path, reason) for u, reason in zip(bad_units, reasons)]


def _source_key(source: dict) -> str:
    return Location(source["path"]).uri


def _identity(model_config: ModelConfig, embedder: Embedder, units: list[WorkUnit]) -> dict:
    """What makes two fits the same fit: their checkpoints may be merged."""
    return {
        "format_version": FORMAT_VERSION,
        "config": {**model_config.to_dict(), "dims": embedder.dims},
        "weights_identity": embedder.weights_identity,
        "channel_indices": embedder.channel_indices.tolist(),
        "inputs": [[Location(u.path).uri, u.start, u.stop, u.frames] for u in units],
    }


def _model_attributes(model_config: ModelConfig, embedder: Embedder, sources: list[dict], frames: int, skipped: list[dict]) -> ModelAttributes:
    spec = embedder.spec
    return ModelAttributes(
        package_version=version("padim-ray"),
        config={**model_config.to_dict(), "dims": embedder.dims},
        backbone=spec.name,
        weights_identity=embedder.weights_identity,
        stages=list(spec.stages),
        stage_channels=list(spec.channels),
        normalization={"mean": list(spec.mean), "std": list(spec.std)},
        image_size=model_config.image_size,
        grid=list(embedder.grid),
        dims=embedder.dims,
        channel_indices=embedder.channel_indices.tolist(),
        eps=model_config.eps,
        frames=frames,
        sources=sources,
        skipped_inputs=skipped,
    )
