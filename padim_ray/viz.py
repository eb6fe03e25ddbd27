"""Pictures people would rather look at than read: ROC curves and score timelines (matplotlib)."""

from __future__ import annotations

import io
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from padim_ray.config import MAX_FPS, between, require  # noqa: E402
from padim_ray.errors import PadimError  # noqa: E402
from padim_ray.files import Location, make_parent_folders  # noqa: E402


def _save(fig, path: Location, **options) -> Location:
    """Write a figure as PNG to a local path or URI (one write) and close it."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", **options)
    plt.close(fig)
    path.write_bytes(buffer.getvalue())
    return path


def plot_roc(report, path: Location) -> Location:
    """The scene's pooled pixel ROC curve with its AUROC."""
    fpr, tpr = report.pixel_roc
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot(fpr, tpr, label=f"pixel AUROC {100 * report.pooled.pixel_auroc:.1f}")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=f"scene {report.scene}", xlim=(0, 1), ylim=(0, 1))
    ax.legend(loc="lower right")
    return _save(fig, path, dpi=120, bbox_inches="tight")


def plot_frame_scores(report, path: Location) -> Location:
    """Per-frame scores of every clip, with the ground-truth anomalous frames shaded, events and the threshold; the pooled figures above."""
    clips = list(report.frame_scores)
    fig, axes = plt.subplots(len(clips), 1, figsize=(10, 1.8 * len(clips) + 0.6), squeeze=False)
    for ax, clip in zip(axes[:, 0], clips):
        scores, labels = np.asarray(report.frame_scores[clip]), np.asarray(report.frame_labels[clip])
        ax.fill_between(np.arange(len(labels)), 0, 1, where=labels > 0, color="tab:red", alpha=0.2,
                        transform=ax.get_xaxis_transform(), step="mid", label="anomaly (ground truth)")
        ax.plot(scores, color="tab:blue", linewidth=1, label="frame score")
        for i, (start, end) in enumerate((report.events or {}).get(clip, [])):
            ax.axvspan(start - 0.5, end + 0.5, color="tab:orange", alpha=0.35, label=None if i else "event")
        if report.threshold:
            ax.axhline(report.threshold["threshold"], color="tab:orange", linestyle="--", linewidth=1, label="threshold")
        ax.set_ylabel(clip)
        ax.set_xlim(0, max(1, len(scores) - 1))
    axes[0, 0].legend(loc="upper left", fontsize="small")
    axes[0, 0].set_title(_summary(report.pooled), fontsize="small")
    axes[-1, 0].set_xlabel("frame")
    fig.tight_layout()
    return _save(fig, path, dpi=110)


def _summary(pooled) -> str:
    """The scene's pooled frame-level figures in one line (percent)."""
    def pct(value):
        return "-" if value is None else f"{100 * value:.1f}"

    line = f"frame AUROC {pct(pooled.frame_auroc)} (smoothed {pct(pooled.frame_auroc_smoothed)})"
    if pooled.events is not None:
        per_hour = pooled.events["false_events_per_hour"]
        line += (f"; threshold: TPR {pct(pooled.tpr)}, FPR {pct(pooled.fpr)}; events found {pooled.events['found']}/{pooled.events['segments']}, "
                 f"false events/h {'-' if per_hour is None else f'{per_hour:.1f}'}")
    return line


@dataclass(frozen=True)
class Marks:
    """What a threshold decided on one input, drawn over its video: the threshold and its events (decisions.read_events' rows)."""

    threshold: float | None = None
    events: list = field(default_factory=list)  # rows with start_frame, end_frame and the box at the peak (map pixels)


def _timeline(scores: np.ndarray, labels: np.ndarray | None, width: int, height: int, marks: Marks = Marks()) -> np.ndarray:
    """An RGB strip (height, width, 3) with the whole score curve (ground truth shaded if known, events
    as orange spans, the threshold as a dashed line)."""
    fig = plt.figure(figsize=(width / 100, height / 100), dpi=100, facecolor="black")
    ax = fig.add_axes((0, 0, 1, 1))
    if labels is not None:
        ax.fill_between(np.arange(len(labels)), 0, 1, where=labels > 0, color="tab:red", alpha=0.3,
                        transform=ax.get_xaxis_transform(), step="mid")
    for event in marks.events:
        ax.axvspan(event.start_frame - 0.5, event.end_frame + 0.5, color="tab:orange", alpha=0.45)
    if marks.threshold is not None:
        ax.axhline(marks.threshold, color="tab:orange", linestyle="--", linewidth=1)
    ax.plot(scores, color="white", linewidth=1.5)
    ax.set_xlim(0, max(1, len(scores) - 1))
    ax.set_ylim(0, max(float(scores.max()), marks.threshold or 0) * 1.05 + 1e-9)
    ax.axis("off")
    fig.canvas.draw()
    strip = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    plt.close(fig)
    return strip


def overlay(frame: np.ndarray, anomaly_map: np.ndarray, upper: float) -> np.ndarray:
    """Blend a heatmap of `anomaly_map` (scaled to [0, upper], resized to the frame) onto `frame`."""
    import torch
    import torch.nn.functional as F

    height, width = frame.shape[:2]
    if anomaly_map.shape != (height, width):
        resized = F.interpolate(torch.from_numpy(anomaly_map.astype(np.float32))[None, None], size=(height, width), mode="bilinear")
        anomaly_map = resized[0, 0].numpy()
    level = np.clip(anomaly_map / upper, 0, 1)
    heat = matplotlib.colormaps["jet"](level)[..., :3] * 255  # (H, W, 3)
    alpha = (0.65 * level)[..., None]  # normal regions keep the footage as it is
    return (frame * (1 - alpha) + heat * alpha).astype(np.uint8)


def draw_boxes(picture: np.ndarray, t: int, marks: Marks, scale: tuple[float, float]) -> None:
    """Outline (in place) the peak box of every event under way at frame `t`, boxes scaled from map to frame pixels."""
    height, width = picture.shape[:2]
    for event in marks.events:
        if event.start_frame <= t <= event.end_frame:
            y0, y1 = (min(height - 1, int(v * scale[0])) for v in (event.box_y0, event.box_y1 - 1))
            x0, x1 = (min(width - 1, int(v * scale[1])) for v in (event.box_x0, event.box_x1 - 1))
            color = (255, 140, 0)
            picture[y0 : y1 + 1, [x0, x1]] = color
            picture[[y0, y1], x0 : x1 + 1] = color


def render_video(frames, maps, scores: np.ndarray, out: Path, fps: int = 24, labels: np.ndarray | None = None, marks: Marks = Marks()) -> Path:
    """Write an MP4: each frame with its anomaly heatmap (and the boxes of events under way), above a score timeline with a cursor.

    Args:
        frames: iterable of (H, W, 3) uint8 frames, in order.
        maps: indexable (T, h, w) anomaly maps of the same frames.
        scores: (T,) frame scores.
    """
    import av

    upper = float(np.percentile(scores, 99)) or 1.0
    strip_height, block_frames = 60, 16
    container = None
    try:
        for t, frame in enumerate(frames):
            if t % block_frames == 0:  # read maps a zarr chunk at a time, not frame by frame
                block = np.asarray(maps[t : t + block_frames], dtype=np.float32)
            if container is None:
                height, width = frame.shape[:2]
                width, height = width - width % 2, height - height % 2  # yuv420p wants even sizes
                strip = _timeline(scores, labels, width, strip_height, marks)
                scale = (frame.shape[0] / maps.shape[1], frame.shape[1] / maps.shape[2])
                container = av.open(str(out), "w")
                stream = container.add_stream("libx264", rate=fps, options={"crf": "23"})  # plays in browsers
                stream.width, stream.height, stream.pix_fmt = width, height + strip_height, "yuv420p"
            picture = np.concatenate([overlay(frame[:height, :width], block[t % block_frames], upper), strip], axis=0)
            draw_boxes(picture[:height], t, marks, scale)
            cursor = int(round(t / max(1, len(scores) - 1) * (width - 1)))
            picture[height:, max(0, cursor - 1) : cursor + 2] = (255, 220, 0)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(picture, format="rgb24")))
        if container is not None:
            container.mux(stream.encode())
    finally:
        if container is not None:
            container.close()
    return out


def render_input(
    maps_path: str | Path | Location, input_path: str | Path | Location, out: str | Path | Location, fps: int = 24, overwrite: bool = False,
) -> Location:
    """Render the footage of one scored input with its maps (found by source path or input id) to `out`
    (a path, or a URI: rendered to a temp file, then uploaded). An existing `out` is replaced only
    with `overwrite`, and never when it is one of the inputs."""
    from padim_ray.map_store import map_source, open_maps, read_scores
    from padim_ray.video import WorkUnit, iter_unit_frames

    require({"fps": fps}, {"fps": between(1, MAX_FPS)})
    out, source = Location(out), Location(input_path)
    check_render_out(out, [Location(maps_path), source], overwrite)
    group = open_maps(maps_path)
    table = read_scores(maps_path)
    inputs = table["input"].unique().tolist()  # ids may be path suffixes (a/x), which zarr lists as no array
    matches = [name for name in inputs if Location(map_source(group[name]) or "/") == source]
    name = matches[0] if matches else (os.path.splitext(source.name)[0] if "." in source.name else source.name)
    if name not in inputs:
        raise PadimError(f"maps {Location(maps_path)} hold no maps of {source}; score it with `padim-ray score`")
    scores = table[table["input"] == name].sort_values("frame")["score"].to_numpy()
    frames = (frame for _, frame in iter_unit_frames(WorkUnit(0, source.uri)))
    marks = _marks(maps_path, name)
    make_parent_folders(out)
    if not out.is_remote:
        render_video(frames, group[name], scores, Path(out), fps, marks=marks)
        return out
    with tempfile.TemporaryDirectory(prefix="padim-render-") as tmp:
        out.upload(str(render_video(frames, group[name], scores, Path(tmp) / out.name, fps, marks=marks)))
    return out


def _marks(maps_path, name: str) -> Marks:
    """The threshold and events the scoring of `maps_path` found in input `name` (none if it used no threshold)."""
    from padim_ray.decisions import read_events

    decided = read_events(maps_path)
    if decided is None:
        return Marks()
    events, decision = decided
    return Marks(decision["threshold"], list(events[events["input"] == name].itertuples()))


def check_render_out(out: Location, inputs: list[Location], overwrite: bool) -> None:
    """Refuse an `out` that is one of `inputs` or inside one, or that exists, unless `overwrite` and it is a file."""
    for given in inputs:
        if out.resolved == given.resolved or out.resolved.startswith(given.resolved.rstrip("/") + "/"):
            raise PadimError(f"--out {out} would overwrite the input {given}; choose another --out")
    if out.exists():
        if not overwrite:
            raise PadimError(f"output {out} already exists; pass --overwrite or choose another --out")
        if not out.is_file():
            raise PadimError(f"output {out} is a folder, not a video; choose another --out")
