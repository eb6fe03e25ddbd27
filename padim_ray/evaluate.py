"""Evaluation on the ShanghaiTech test set, per clip and pooled: pixel AUROC, frame AUROC (raw, the headline,
and smoothed with a sigma fixed in advance, metrics.SMOOTHING_SECONDS), PRO, and when the maps were scored
with a threshold, the decisions: event recall against the anomalous segments, false events per hour of
normal frames, and the threshold's frame-level operating point (TPR, FPR).

Masks are compared at the resolution the maps were written: when that differs from the masks'
(e.g. `--map-size model`), masks are resized with nearest-neighbour sampling, which keeps them 0/1.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from padim_ray.config import ClusterConfig, ScoreConfig
from padim_ray.errors import PadimError
from padim_ray.decisions import DecisionOptions, decided_alike, read_events, resolve_decision
from padim_ray.metrics import SMOOTHING_SECONDS, EventCounts, PixelHistograms, frame_auroc, operating_point, smoothed
from padim_ray.stc import load_masks, mask_paths, test_clips
from padim_ray.files import Location, make_parent_folders
from padim_ray.publish import is_committed
from padim_ray.map_store import open_maps, read_scores
from padim_ray.video import FOLDER_FPS

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScoringOptions:
    """How `evaluate --model` scores the test clips first: as `padim-ray score` would with these options."""

    cluster: ClusterConfig = ClusterConfig()
    score: ScoreConfig = ScoreConfig()
    overwrite: bool = False  # replace maps written before by another model or settings
    address: str | None = None  # the Ray cluster to join (see runtime.connect)
    decisions: DecisionOptions = DecisionOptions()  # the threshold and event settings (auto: the model's calibration)


@dataclass
class ClipResult:
    clip: str
    frames: int
    anomalous_frames: int
    pixel_auroc: float | None
    frame_auroc: float | None
    pro: float | None
    frame_auroc_smoothed: float | None = None  # Gaussian sigma metrics.SMOOTHING_SECONDS, centred: not causal
    events: dict | None = None  # EventCounts' fields, event_recall and false_events_per_hour (None: scored without a threshold)
    tpr: float | None = None  # the threshold's frame-level operating point
    fpr: float | None = None


@dataclass
class ClipDecisions:
    """What a threshold decided on one clip, against its labels."""

    counts: EventCounts
    flags: np.ndarray

    def summary(self, labels: np.ndarray) -> dict:
        tpr, fpr = operating_point(self.flags, labels)
        counts = self.counts
        return {"events": {**vars(counts), "event_recall": counts.recall, "false_events_per_hour": counts.false_per_hour}, "tpr": tpr, "fpr": fpr}


@dataclass
class SceneReport:
    scene: str
    maps: str
    clips: list[ClipResult]
    pooled: ClipResult
    pixel_roc: tuple[list[float], list[float]] | None  # pooled (FPR, TPR), thinned for plotting
    frame_scores: dict[str, list[float]]
    frame_labels: dict[str, list[int]]
    threshold: dict | None = None  # the decision the maps were scored with (decisions.Decision.to_json)
    events: dict[str, list[tuple[int, int]]] | None = None  # each clip's event spans, for plots

    def to_json(self) -> dict:
        data = asdict(self)
        data.pop("pixel_roc")
        data.pop("frame_scores")
        data.pop("frame_labels")
        data.pop("events")
        return data


def resize_masks(masks: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of 0/1 masks (T, H, W) to `size`."""
    if masks.shape[1:] == size:
        return np.asarray(masks)
    x = torch.from_numpy(np.ascontiguousarray(masks, dtype=np.uint8)).unsqueeze(1).float()
    return F.interpolate(x, size=size, mode="nearest").squeeze(1).to(torch.uint8).numpy()


def evaluate_scene(root: str | Path | Location, scene: str, maps_path: str | Path | Location, chunk: int = 16) -> SceneReport:
    """Evaluate the maps of one scene's test clips against the STC masks."""
    maps_path = Location(maps_path)
    group = open_maps(maps_path)
    clips = [c.name for c in test_clips(root, scene)]
    table = read_scores(maps_path)
    missing = [c for c in clips if c not in group]
    if missing:
        raise PadimError(f"maps {maps_path} lack clips {missing[:3]}{'...' if len(missing) > 3 else ''}; score testing/frames/{missing[0]} first")
    upper = float(table[table["input"].isin(clips)]["score"].max()) * (1 + 1e-6) + 1e-12
    events, decision = read_events(maps_path) or (None, None)
    pooled = PixelHistograms(upper)
    results, scores, labels, decided, spans = [], {}, {}, {}, {}
    for clip in clips:
        maps = group[clip]
        frame_mask, pixel_mask = load_masks(root, clip, maps.shape[0])
        hist = _pixel_histograms(maps, pixel_mask, upper, chunk)
        rows = table[table["input"] == clip].sort_values("frame")
        scores[clip], labels[clip] = rows["score"].tolist(), frame_mask.astype(int).tolist()
        result = ClipResult(clip, maps.shape[0], int(frame_mask.sum()), hist.auroc(), frame_auroc(scores[clip], frame_mask), hist.pro(),
                            frame_auroc(smoothed(scores[clip], FOLDER_FPS), frame_mask))
        if events is not None:
            spans[clip] = [(int(e.start_frame), int(e.end_frame)) for e in events[events["input"] == clip].itertuples()]
            decided[clip] = ClipDecisions(EventCounts.of(spans[clip], frame_mask, FOLDER_FPS), rows["anomalous"].to_numpy())
            result = replace(result, **decided[clip].summary(frame_mask))
        results.append(result)
        pooled = pooled.merge(hist)
        log.info("evaluate %s: pixel AUROC %s", clip, result.pixel_auroc)
    summary = _pooled(clips, scores, labels, pooled, decided)
    roc = pooled.roc()
    thinned = None if roc is None else tuple(r[:: max(1, len(r) // 2000)].tolist() for r in roc)
    return SceneReport(scene, maps_path.uri, results, summary, thinned, scores, labels, decision, spans if events is not None else None)


def _pixel_histograms(maps, pixel_mask: np.ndarray, upper: float, chunk: int) -> PixelHistograms:
    """One clip's maps folded into pixel histograms against its masks, `chunk` frames at a time."""
    hist = PixelHistograms(upper)
    for start in range(0, maps.shape[0], chunk):
        block = maps[start : start + chunk].astype(np.float32)
        for anomaly_map, mask in zip(block, resize_masks(pixel_mask[start : start + chunk], block.shape[1:])):
            hist.add(anomaly_map, mask)
    return hist


def _pooled(clips: list[str], scores: dict, labels: dict, pooled: PixelHistograms, decided: dict[str, ClipDecisions]) -> ClipResult:
    """The scene's pooled figures: frames of every clip together (smoothing and events stay within a clip)."""
    all_scores = np.concatenate([scores[c] for c in clips])
    all_labels = np.concatenate([labels[c] for c in clips])
    all_smoothed = np.concatenate([smoothed(scores[c], FOLDER_FPS) for c in clips])
    summary = ClipResult("pooled", len(all_scores), int(all_labels.sum()), pooled.auroc(), frame_auroc(all_scores, all_labels), pooled.pro(),
                         frame_auroc(all_smoothed, all_labels))
    if not decided:
        return summary
    together = ClipDecisions(sum((d.counts for d in decided.values()), EventCounts()), np.concatenate([decided[c].flags for c in clips]))
    return replace(summary, **together.summary(all_labels))


def write_report(report: SceneReport, out: Location) -> list[Location]:
    """`metrics.json`, `roc.png` and `scores.png` under `out` (a folder or URI); returns their locations."""
    from padim_ray.viz import plot_frame_scores, plot_roc

    metrics = out / "metrics.json"
    metrics.write_bytes(json.dumps(report.to_json(), indent=2).encode())
    paths = [metrics]
    if report.pixel_roc is not None:
        paths.append(plot_roc(report, out / "roc.png"))
    paths.append(plot_frame_scores(report, out / "scores.png"))
    return paths


def format_table(reports: list[SceneReport]) -> str:
    """A plain-text table of every clip and each scene's pooled figures."""

    def cell(value: float | None) -> str:
        return "   -  " if value is None else f"{100 * value:6.1f}"

    def events(r: ClipResult) -> str:
        if r.events is None:
            return ""
        per_hour = r.events["false_events_per_hour"]
        return f"  {r.events['found']:>3}/{r.events['segments']:<3}  {r.events['events']:>6}  {'-' if per_hour is None else f'{per_hour:.1f}':>6}"

    decided = any(r.threshold for r in reports)
    header = f"{'clip':<12}{'frames':>7}{'anom.':>7}  {'pixAUC':>6}  {'frmAUC':>6}  {'smooth':>6}  {'PRO':>6}"
    lines = [header + ("  found  events  FE/h" if decided else "")]
    for report in reports:
        for r in [*report.clips, report.pooled]:
            name = f"{report.scene} pooled" if r is report.pooled else r.clip
            figures = f"{cell(r.pixel_auroc)}  {cell(r.frame_auroc)}  {cell(r.frame_auroc_smoothed)}  {cell(r.pro)}"
            lines.append(f"{name:<12}{r.frames:>7}{r.anomalous_frames:>7}  {figures}{events(r)}")
    notes = [f"smooth: frame AUROC of scores under a centred Gaussian of sigma {SMOOTHING_SECONDS} s (fixed in advance)"]
    for report in reports:
        if report.threshold:
            notes.append(f"scene {report.scene}: threshold {report.threshold['threshold']:.4g} ({report.threshold['meaning']}); "
                         "found: anomalous segments an event overlaps; FE/h: events overlapping none, per hour of normal frames")
    return "\n".join(lines + notes)


def evaluate_stc(
    root: str | Path | Location,
    scene: str,
    out: str | Path | Location,
    maps: str | None = None,
    model: str | None = None,
    scoring: ScoringOptions = ScoringOptions(),
) -> list[SceneReport]:
    """Evaluate one scene, a list (`"01,04"`), or every scene with a model (`"all"`), scoring first when `model` is given
    (scenes whose maps that model scored before are reused: a rerun after a stop resumes scene by scene).

    `maps` and `model` may contain `{scene}`, e.g. `models/stc_{scene}_resnet18`; `scoring` says how
    `model` scores. Writes one folder of metrics and plots per scene and a `metrics.json` of all scenes
    under `out`.
    """
    from padim_ray.stc import scene_path, select_scenes, test_scenes

    if maps is None and model is None:
        raise PadimError("evaluate needs --maps (scored maps) or --model (to score the test clips first)")
    out = Location(out)
    scenes = select_scenes(scene, test_scenes(root) if scene.strip() == "all" else [])
    if scene.strip() == "all" and model is not None:
        scenes = [s for s in scenes if is_committed(scene_path(model, s))]
        if not scenes:
            raise PadimError(f"no model matches {model} for any test scene of {root}; fit one with `padim-ray fit stc`")
    maps_paths = {s: Location(scene_path(maps, s)) if maps else out / f"maps_{s}" for s in scenes}
    for s in scenes:  # every clip's masks, then every output folder, before any scoring
        for clip in test_clips(root, s):
            mask_paths(root, clip.name)
    make_parent_folders(out / "metrics.json")
    if model is not None:
        for s in scenes:
            make_parent_folders(maps_paths[s], "--maps" if maps else "--out")
    reports = []
    for s in scenes:
        maps_path = maps_paths[s]
        if model is not None:
            _score_scene(scene_path(model, s), test_clips(root, s), maps_path, scoring)
        report = evaluate_scene(root, s, maps_path)
        write_report(report, out / f"scene_{s}")
        reports.append(report)
    (out / "metrics.json").write_bytes(json.dumps([r.to_json() for r in reports], indent=2).encode())
    return reports


def _score_scene(model: str, clips: list, maps_path: Location, scoring: ScoringOptions) -> None:
    """Score a scene's test clips into `maps_path`, unless `model` scored exactly these there before."""
    from padim_ray.score import score_inputs, scored_with
    from padim_ray.store import open_model

    if scored_with(maps_path, model, clips, scoring.score) and decided_alike(maps_path, resolve_decision(open_model(model).attributes, scoring.decisions)):
        log.info("evaluate: %s already holds these clips scored by %s: reusing them", maps_path, model)
        return
    score_inputs(
        model, clips, maps_path, score=scoring.score, cluster=scoring.cluster, overwrite=scoring.overwrite, address=scoring.address,
        decisions=scoring.decisions,
    )
