"""The padim-ray command line: thin wrappers around library functions."""

from __future__ import annotations

import logging
import os
import sys
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from padim_ray.backbones import BACKBONES
from padim_ray.cli_errors import interrupted, one_line_errors
from padim_ray.cli_options import Address, CheckpointOptions, ClusterOptions, SkipBadInputs, option_groups
from padim_ray.config import BACKBONE_DTYPES, CALIBRATION_FRACTION, ClusterConfig, ModelConfig, ScoreConfig
from padim_ray.errors import PadimError
from padim_ray.map_segments import SegmentOptions
from padim_ray.thresholds import EventConfig
from padim_ray.synthetic import SyntheticSpec

if TYPE_CHECKING:
    from padim_ray.fit_stc import StcFit
    from padim_ray.video import InputPolicy

app = typer.Typer(no_args_is_help=True, help="PaDiM anomaly detection for surveillance video, on Ray.")

DEFAULT_STC_ROOT = os.environ.get("PADIM_RAY_STC_ROOT", "data/shanghaitech")
THRESHOLD_HELP = (
    "auto (at most 1 false event per hour of the model's calibration footage), a false-event budget like 1/h, 0.5/min or 3/day, "
    "or a raw frame score."
)
Backbone = Enum("Backbone", {name: name for name in BACKBONES}, type=str)
BackboneDtype = Enum("BackboneDtype", {name: name for name in BACKBONE_DTYPES}, type=str)


class Source(str, Enum):
    stc = "stc"
    videos = "videos"


@app.callback()
def main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log debug messages, show Ray workers' output and tracebacks.")] = False) -> None:
    from padim_ray.runtime import show_worker_logs
    from padim_ray.stop_signals import handle_stop_signals

    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not verbose:  # storage clients log every credential lookup at INFO
        for name in ("botocore", "aiobotocore", "s3fs", "gcsfs", "google.auth", "fsspec"):
            logging.getLogger(name).setLevel(logging.WARNING)
    show_worker_logs(verbose)
    handle_stop_signals()
    if not verbose:
        os.environ.setdefault("RAY_IGNORE_UNHANDLED_ERRORS", "1")  # failures are reported once, below


@app.command()
@option_groups
def fit(
    source: Annotated[Source, typer.Argument(help="stc: a ShanghaiTech scene; videos: the PATHS given.")],
    paths: Annotated[Optional[list[str]], typer.Argument(help="Videos or folders of frames, paths or URIs (source videos).")] = None,
    scene: Annotated[Optional[str], typer.Option(help="STC scene id (01), a list (01,04) or all: one model per scene (source stc).")] = None,
    root: Annotated[str, typer.Option(help="STC dataset root, path or URI (env PADIM_RAY_STC_ROOT).")] = DEFAULT_STC_ROOT,
    out: Annotated[Optional[str], typer.Option(help="Model store to write, path or URI; may contain {scene} (stc: models/stc_{scene}_BACKBONE).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing model store.")] = False,
    backbone: Annotated[Backbone, typer.Option(help="Feature extractor.")] = Backbone.resnet18,
    dims: Annotated[Optional[int], typer.Option(help="Random channel subset d (backbone's default).")] = None,
    weights: Annotated[str, typer.Option(help="imagenet, none (seeded random init) or a weights file.")] = "imagenet",
    image_size: Annotated[int, typer.Option(help="Frames are resized to this square size.")] = ModelConfig.image_size,
    seed: Annotated[int, typer.Option(help="Seed of the channel subset (and of random init).")] = ModelConfig.seed,
    frame_stride: Annotated[int, typer.Option(help="Use every n-th frame.")] = ModelConfig.frame_stride,
    backbone_dtype: Annotated[
        BackboneDtype, typer.Option(help="Backbone arithmetic: float32 (strict, no TF32) or bfloat16 (autocast); recorded in the model.")
    ] = BackboneDtype.float32,
    cluster_options: ClusterOptions = ClusterOptions(),
    fan_in: Annotated[int, typer.Option(help="Partials merged per reduction task.")] = ClusterConfig.fan_in,
    checkpoints: CheckpointOptions = CheckpointOptions(),
    skip_bad_inputs: SkipBadInputs = False,
    calibration: Annotated[float, typer.Option(
        help="Share of the footage to calibrate on: scored by the model without it (exactly), recorded in the model; 0: none.",
    )] = CALIBRATION_FRACTION,
    address: Address = None,
) -> None:
    """Fit a PaDiM model: one Gaussian per patch position over all frames of the inputs.

    Rerunning an interrupted fit resumes it from its checkpoints.
    \f
    Over 50 lines only for typer's parameter list (one per option); the body stays thin.
    """
    from padim_ray.calibrate import check_fraction
    from padim_ray.fit import fit_model
    from padim_ray.fit_stc import StcFit, fit_stc_scene
    from padim_ray.video import InputPolicy

    with one_line_errors():
        calibration = check_fraction(calibration)
        model = ModelConfig(
            backbone=backbone.value, dims=dims, weights=weights, image_size=image_size, seed=seed, frame_stride=frame_stride,
            backbone_dtype=backbone_dtype.value,
        )
        cluster = cluster_options.config(fan_in=fan_in, checkpoint_every=checkpoints.checkpoint_every, max_retries=checkpoints.max_retries)
        input_policy = InputPolicy(skip_bad_inputs)
        if source is Source.stc:
            stc = StcFit.select(root, scene, paths, out, checkpoints.checkpoint_dir, backbone.value)
            if stc.many:
                return _fit_scenes(stc, model, cluster, overwrite, address, input_policy, calibration)
            result = fit_stc_scene(stc, model, cluster, overwrite, address, input_policy, calibration)
        elif not paths or out is None:
            raise PadimError("fit videos takes one or more PATHS and --out MODEL")
        else:
            result = fit_model(
                paths, out, model, cluster, overwrite=overwrite, address=address, checkpoint_dir=checkpoints.checkpoint_dir,
                input_policy=input_policy, calibration=calibration,
            )
    typer.echo("\n".join(result.summary()))


def _fit_scenes(
    stc: StcFit, model: ModelConfig, cluster: ClusterConfig, overwrite: bool, address: str | None, input_policy: InputPolicy, calibration: float,
) -> None:
    """`fit stc` over several scenes: one model each, one progress bar, a summary table."""
    import time

    from padim_ray.scenes import fit_scenes, format_scene_table, plan_scenes

    started = time.monotonic()
    fits = plan_scenes(stc.root, stc.scenes, stc.out, stc.checkpoint_dir, overwrite, model)
    typer.echo(f"fitting {len(fits)} scenes ({', '.join(stc.scenes)}) -> {stc.out}", err=True)
    try:
        fit_scenes(fits, model, cluster, overwrite=overwrite, address=address, input_policy=input_policy, calibration=calibration)
    except KeyboardInterrupt:
        _exit_interrupted_scenes()
    typer.echo(format_scene_table(fits, time.monotonic() - started))
    for fit in fits:
        for skipped in fit.result.skipped:
            typer.echo(f"scene {fit.scene} skipped {skipped['path']}: {skipped['reason']}")
        if fit.result.calibration_note:
            typer.echo(f"scene {fit.scene}: {fit.result.calibration_note}")


def _exit_interrupted_scenes() -> None:
    """Ctrl-C (or a stop signal) during a many-scene job: its scene threads may be inside Ray calls
    that would keep the interpreter from exiting, so the process ends at once (exit 130, or 128 +
    the signal). A local Ray it started shares its fate; a cluster's job actors end with their driver."""
    message, code = interrupted()
    typer.echo("fit stopped: progress is kept in each scene's checkpoints; rerun the same command to resume", err=True)
    typer.echo(message, err=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


@app.command()
@option_groups
def calibrate(
    model: Annotated[str, typer.Argument(help="Model store written by `padim-ray fit` (path or URI); its calibration is replaced.")],
    inputs: Annotated[list[str], typer.Argument(help="Normal footage: videos or folders of frames (paths or URIs).")],
    cluster_options: ClusterOptions = ClusterOptions(),
    address: Address = None,
) -> None:
    """Record the frame scores of normal footage the model did not see, for thresholds with a meaning.

    Inputs the model was fitted on are removed from its statistics (exactly) before they are scored;
    the stored model keeps every frame: only its calibration is written.
    """
    from padim_ray.calibrate import calibrate_model, describe_calibration

    with one_line_errors():
        result = calibrate_model(model, inputs, cluster_options.config(), address)
    typer.echo(f"{describe_calibration(result.calibration)} -> {result.model} ({result.seconds:.1f} s)")


@app.command()
@option_groups
def update(
    model: Annotated[str, typer.Argument(help="Model store written by `padim-ray fit` (path or URI); replaced when done unless --out.")],
    inputs: Annotated[list[str], typer.Argument(help="New videos or folders of frames to merge in (paths or URIs).")],
    out: Annotated[Optional[str], typer.Option(help="Write the updated model here instead (required for a model on object storage).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --out.")] = False,
    force: Annotated[bool, typer.Option(help="Merge inputs the model already holds (their frames count twice).")] = False,
    cluster_options: ClusterOptions = ClusterOptions(),
    checkpoints: CheckpointOptions = CheckpointOptions(),
    skip_bad_inputs: SkipBadInputs = False,
    address: Address = None,
) -> None:
    """Merge new footage into a fitted model: equal to one fit on the old and new footage together."""
    from padim_ray.fit import update_model
    from padim_ray.video import InputPolicy

    with one_line_errors():
        cluster = cluster_options.config(checkpoint_every=checkpoints.checkpoint_every, max_retries=checkpoints.max_retries)
        result = update_model(
            model, inputs, cluster, force=force, address=address, checkpoint_dir=checkpoints.checkpoint_dir, input_policy=InputPolicy(skip_bad_inputs),
            out=out, overwrite=overwrite,
        )
    typer.echo("\n".join(result.summary()))


@app.command()
@option_groups
def score(
    model: Annotated[str, typer.Argument(help="Model store written by `padim-ray fit` (path or URI).")],
    inputs: Annotated[list[str], typer.Argument(help="Videos and folders of frames to score (paths or URIs).")],
    out: Annotated[str, typer.Option(help="Anomaly-map store to write, path or URI (zarr + scores.parquet).")],
    map_size: Annotated[str, typer.Option(help="native (each input's size), model, or HxW.")] = "native",
    map_dtype: Annotated[str, typer.Option(help="float16 or float32.")] = ScoreConfig.map_dtype,
    blur_at: Annotated[str, typer.Option(help="model: blur at the model's input size, as the paper (default); map: at the map size.")] = ScoreConfig.blur_at,
    threshold: Annotated[Optional[str], typer.Option(help=THRESHOLD_HELP, show_default="auto if the model is calibrated")] = None,
    min_event: Annotated[float, typer.Option(help="Seconds an event lasts at least (shorter ones are dropped).")] = EventConfig.min_event,
    event_gap: Annotated[float, typer.Option(help="Seconds below the off level that end an event (shorter gaps merge).")] = EventConfig.event_gap,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing map store.")] = False,
    cluster_options: ClusterOptions = ClusterOptions(),
    max_retries: Annotated[int, typer.Option(help="Scoring actors that may be lost before scoring stops (rerun to resume).")] = ClusterConfig.max_retries,
    address: Address = None,
) -> None:
    """Score videos into anomaly-map sequences and per-frame scores; with a threshold, flag frames and find events.

    Rerunning an interrupted score resumes it: the chunks it finished are kept.
    """
    from padim_ray.decisions import DecisionOptions, format_events
    from padim_ray.score import score_inputs

    with one_line_errors():
        score_config = ScoreConfig(map_dtype=map_dtype, blur_at=blur_at)
        decisions = DecisionOptions(threshold, EventConfig(min_event=min_event, event_gap=event_gap))
        result = score_inputs(
            model, inputs, out, map_size, score_config, cluster_options.config(max_retries=max_retries), overwrite, address, decisions,
        )
    resumed = f", {result.resumed_frames} kept from the stopped run" if result.resumed_frames else ""
    recovered = f", recovered from {result.lost_actors} lost actors" if result.lost_actors else ""
    typer.echo(f"maps: {result.out} ({sum(result.frames.values())} frames of {len(result.frames)} inputs, {result.seconds:.1f} s{resumed}{recovered})")
    if result.decision is not None:
        typer.echo(format_events(result.events, result.decision.to_json()))


@app.command()
def watch(
    model: Annotated[Optional[str], typer.Argument(help="Model store (path or URI) of the SOURCEs, and the camera list's default.")] = None,
    sources: Annotated[Optional[list[str]], typer.Argument(help="Cameras: URLs (rtsp, http(s), udp) or video files, each optionally NAME=SOURCE.")] = None,
    out: Annotated[str, typer.Option(help="Folder for events.jsonl, snapshots/ and maps/ (local).")] = ...,
    cameras: Annotated[Optional[str], typer.Option(help="A camera list (TOML): [cameras.NAME] tables with source, and optionally model and threshold.")] = None,
    fps: Annotated[float, typer.Option(help="Frames taken per second of each source.")] = 5.0,
    threshold: Annotated[Optional[str], typer.Option(help=THRESHOLD_HELP, show_default="auto (the model must be calibrated)")] = None,
    min_event: Annotated[float, typer.Option(help="Seconds an event lasts at least (shorter ones are dropped).")] = EventConfig.min_event,
    event_gap: Annotated[float, typer.Option(help="Seconds below the off level that end an event (shorter gaps merge).")] = EventConfig.event_gap,
    realtime: Annotated[bool, typer.Option(help="Replay video files at their own frame rate, as cameras (else as fast as they are scored).")] = False,
    scorers: Annotated[int, typer.Option(help="Scoring actors per model (0: one per GPU of the cluster, at least one).")] = 0,
    map_segments: Annotated[float, typer.Option(help="Keep downsampled maps in OUT/maps/CAMERA/, one file per this many seconds (0: none).")] = 0.0,
    map_side: Annotated[int, typer.Option(help="Side of the kept maps, in pixels.")] = SegmentOptions.side,
    map_retention: Annotated[str, typer.Option(help="How long kept maps stay before they are removed, e.g. 90min, 24h, 7d.")] = "24h",
    status_every: Annotated[float, typer.Option(help="Seconds between status lines (one per camera, on stderr).")] = 10.0,
    webhook: Annotated[Optional[str], typer.Option(help="An http(s) URL each notice is also POSTed to, as JSON.")] = None,
    address: Address = None,
) -> None:
    """Score live cameras until stopped (Ctrl-C, SIGTERM): events as JSON lines on stdout and in OUT/events.jsonl,
    a heatmap snapshot of each event's peak in OUT/snapshots/. With only video files it ends when they end."""
    from padim_ray.cameras import watched_cameras
    from padim_ray.decisions import DecisionOptions
    from padim_ray.map_segments import parse_duration
    from padim_ray.watch import WatchOptions, watch as watch_cameras

    with one_line_errors():
        segments = SegmentOptions(map_segments, map_side, parse_duration(map_retention, "--map-retention"))
        options = WatchOptions(
            fps=fps, realtime=realtime, status_every=status_every, scorers=scorers, webhook=webhook, segments=segments,
            decisions=DecisionOptions(threshold, EventConfig(min_event=min_event, event_gap=event_gap)),
        )
        result = watch_cameras(watched_cameras(model, sources or [], cameras), out, options, address)
    typer.echo(f"watched {len(result.cameras)} camera(s): {result.closed} event(s) -> {result.out / 'events.jsonl'}", err=True)


@app.command()
@option_groups
def evaluate(
    source: Annotated[Source, typer.Argument(help="stc: ShanghaiTech test clips and masks.")],
    scene: Annotated[str, typer.Option(help="Scene id (01), a list (01,04), or all (every scene with a model).")],
    root: Annotated[str, typer.Option(help="STC dataset root, path or URI (env PADIM_RAY_STC_ROOT).")] = DEFAULT_STC_ROOT,
    maps: Annotated[Optional[str], typer.Option(help="Scored maps; may contain {scene}.")] = None,
    model: Annotated[Optional[str], typer.Option(help="Score the test clips with this model first; may contain {scene}.")] = None,
    out: Annotated[str, typer.Option(help="Folder or URI for metrics.json, roc.png, scores.png (and maps).")] = "evaluation",
    threshold: Annotated[Optional[str], typer.Option(help=f"With --model: {THRESHOLD_HELP}", show_default="auto if calibrated")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace maps written before (with --model).")] = False,
    cluster_options: ClusterOptions = ClusterOptions(),
    address: Address = None,
) -> None:
    """Pixel AUROC, frame AUROC (raw and smoothed) and PRO (FPR <= 0.3), per clip and pooled, against the STC masks;
    for maps scored with a threshold, event recall, false events per hour and the threshold's TPR and FPR.

    With --model, the test clips are scored first, by scoring actors sized as `score`'s are.
    """
    from padim_ray.decisions import DecisionOptions
    from padim_ray.evaluate import ScoringOptions, evaluate_stc, format_table
    from padim_ray.files import Location

    with one_line_errors():
        if source is not Source.stc:
            raise PadimError("evaluate supports stc only: other footage has no ground truth layout")
        scoring = ScoringOptions(cluster_options.config(), overwrite=overwrite, address=address, decisions=DecisionOptions(threshold))
        reports = evaluate_stc(root, scene, out, maps, model, scoring)
    typer.echo(format_table(reports))
    typer.echo(f"report: {Location(out) / 'metrics.json'}")


@app.command()
def render(
    maps: Annotated[str, typer.Argument(help="Anomaly-map store written by `padim-ray score` (path or URI).")],
    input: Annotated[str, typer.Argument(help="The scored video or folder of frames (path or URI).")],
    out: Annotated[str, typer.Option(help="MP4 file to write, path or URI.")],
    fps: Annotated[int, typer.Option(help="Frames per second of the output.")] = 24,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --out file (never one of the inputs).")] = False,
) -> None:
    """Write the footage with its anomaly heatmap and a score timeline as an MP4."""
    from padim_ray.viz import render_input

    with one_line_errors():
        typer.echo(f"video: {render_input(maps, input, out, fps, overwrite)}")


@app.command("make-synthetic")
def make_synthetic_command(
    root: Annotated[Path, typer.Argument(help="Folder to write the STC-shaped dataset into.")],
    scenes: Annotated[list[str], typer.Option("--scene", help="Scene ids to generate.")] = ["01"],
    train_videos: Annotated[int, typer.Option(help="Training videos per scene.")] = SyntheticSpec.train_videos,
    train_frames: Annotated[int, typer.Option(help="Frames per training video.")] = SyntheticSpec.train_frames,
    test_clips: Annotated[int, typer.Option(help="Test clips per scene.")] = SyntheticSpec.test_clips,
    test_frames: Annotated[int, typer.Option(help="Frames per test clip.")] = SyntheticSpec.test_frames,
    width: Annotated[int, typer.Option(help="Frame width.")] = SyntheticSpec.width,
    height: Annotated[int, typer.Option(help="Frame height.")] = SyntheticSpec.height,
    seed: Annotated[int, typer.Option(help="Random seed.")] = SyntheticSpec.seed,
) -> None:
    """Write a synthetic STC-shaped dataset with exact anomaly masks."""
    from padim_ray.synthetic import make_synthetic

    spec = SyntheticSpec(
        scenes=tuple(scenes), train_videos=train_videos, train_frames=train_frames, test_clips=test_clips,
        test_frames=test_frames, width=width, height=height, seed=seed,
    )
    typer.echo(f"dataset: {make_synthetic(root, spec)}")


@app.command()
def demo(
    workdir: Annotated[Path, typer.Option(help="Where the demo writes its data and model.")] = Path("padim-demo"),
    address: Address = None,
) -> None:
    """Offline end to end: generate a synthetic scene, fit PaDiM with pretrained EfficientNet-Lite0."""
    from padim_ray.demo import run_demo

    with one_line_errors():
        run_demo(workdir, address=address)


if __name__ == "__main__":
    sys.exit(app())
