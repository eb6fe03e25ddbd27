"""A scoring's decisions: per-frame flags and events from a threshold, what score prints and writes, and its bad thresholds."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from padim_ray.decisions import read_events
from padim_ray.events import map_events
from padim_ray.thresholds import EventConfig
from padim_ray.map_store import open_maps, read_scores
from padim_ray.viz import Marks, draw_boxes
from helpers import SMALL_CLUSTER_OPTIONS, assert_clean_failure, run, start_local_ray

SCORE = ["--map-dtype", "float32", *SMALL_CLUSTER_OPTIONS, "--batch-size", "5"]


@pytest.fixture(scope="module")
def clip(stc_root):
    return stc_root / "testing" / "frames" / "01_0001"


@pytest.fixture(scope="module")
def undecided(small_model, clip, tmp_path_factory):
    """The clip scored by the small (uncalibrated) model without a threshold: maps and scores only."""
    start_local_ray()
    out = tmp_path_factory.mktemp("undecided") / "maps"
    result = run("score", small_model, clip, "--out", out, *SCORE)
    assert result.exit_code == 0, result.output
    return out


def test_without_calibration_or_threshold_score_writes_no_decisions(undecided):
    assert read_events(undecided) is None
    assert list(read_scores(undecided).columns) == ["input", "frame", "score", "max_y", "max_x"]


def test_a_raw_threshold_flags_frames_and_finds_the_events_of_the_maps(small_model, clip, undecided, tmp_path):
    scores = read_scores(undecided)["score"].to_numpy()
    threshold = float(np.sort(scores)[len(scores) // 2])  # the median: some frames over, some under
    out = tmp_path / "maps"
    result = run("score", small_model, clip, "--out", out, "--threshold", repr(threshold), "--min-event", "0", *SCORE)
    assert result.exit_code == 0, result.output
    assert f"threshold {threshold:.4g} (raw" in result.stdout
    table = read_scores(out)
    assert np.array_equal(table["anomalous"], table["score"] >= threshold)
    assert np.allclose(table["over"], table["score"] / threshold, rtol=1e-6) and table["quantile"].isna().all()
    events, decision = read_events(out)
    assert decision["threshold"] == threshold and decision["events"]["min_event"] == 0
    maps = open_maps(out)["01_0001"][:]
    expected = map_events(enumerate(maps), 24.0, threshold, EventConfig(min_event=0))  # STC folders are taken at 24 fps
    assert len(expected) >= 1 and len(events) == len(expected)
    for row, event in zip(events.itertuples(), expected):
        assert (row.start_frame, row.end_frame, row.peak_frame, row.box_y0, row.box_x1) == (
            event.start_frame, event.end_frame, event.peak_frame, event.box_y0, event.box_x1)
        assert f"{event.start_s:.2f}" in result.stdout
    assert pq.read_schema(out / "events.parquet").metadata[b"padim_ray"]


@pytest.mark.parametrize("threshold, fragment", [
    ("abc", "--threshold"), ("-3", "--threshold"), ("2/week", "--threshold"), ("1/h", "not calibrated"), ("auto", "not calibrated"),
])
def test_bad_or_unusable_thresholds_fail_in_one_line_before_scoring(small_model, clip, tmp_path, threshold, fragment):
    out = tmp_path / "maps"
    assert_clean_failure(run("score", small_model, clip, "--out", out, "--threshold", threshold, *SCORE), fragment, out=out)


def test_event_boxes_are_outlined_while_the_event_lasts():
    event = type("Row", (), dict(start_frame=2, end_frame=4, box_y0=2, box_x0=3, box_y1=6, box_x1=9))  # map pixels, half-open
    marks = Marks(1.0, [event])
    picture = np.zeros((20, 40, 3), dtype=np.uint8)
    draw_boxes(picture, 3, marks, scale=(2.0, 2.0))  # the frame is twice the map's size
    drawn = picture.any(axis=2)
    assert drawn[4, 6:17].all() and drawn[10, 6:17].all() and drawn[4:11, 6].all() and drawn[4:11, 16].all()
    assert drawn.sum() == 2 * 11 + 2 * 5  # the outline only
    untouched = np.zeros_like(picture)
    draw_boxes(untouched, 5, marks, scale=(2.0, 2.0))
    assert not untouched.any()


def test_evaluate_reports_the_decisions_of_maps_scored_with_a_threshold(small_model, stc_root, clip, undecided, tmp_path):
    scores = read_scores(undecided)["score"].to_numpy()
    threshold = float(np.sort(scores)[len(scores) // 2])
    maps = tmp_path / "maps"
    assert run("score", small_model, clip, "--out", maps, "--threshold", repr(threshold), "--min-event", "0", *SCORE).exit_code == 0
    result = run("evaluate", "stc", "--scene", "01", "--root", stc_root, "--maps", maps, "--out", tmp_path / "eval")
    assert result.exit_code == 0, result.output
    assert "FE/h" in result.stdout and f"threshold {threshold:.4g}" in result.stdout
    [report] = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    labels = np.load(stc_root / "testing" / "test_frame_mask" / "01_0001.npy")
    events = read_events(maps)[0]
    spans = list(zip(events["start_frame"], events["end_frame"]))
    anomalous = [t for t in range(len(labels)) if labels[t]]  # one segment: the anomaly runs to the clip's end
    assert anomalous == list(range(anomalous[0], len(labels)))
    hit = any(start <= len(labels) - 1 and end >= anomalous[0] for start, end in spans)
    false = sum(end < anomalous[0] for start, end in spans)
    pooled = report["pooled"]
    assert pooled["events"]["event_recall"] == float(hit) and pooled["events"]["false_events"] == false
    assert pooled["events"]["false_events_per_hour"] == pytest.approx(3600 * false / ((labels == 0).sum() / 24.0))
    flags = read_scores(maps)["score"].to_numpy() >= threshold
    assert pooled["tpr"] == pytest.approx(flags[labels > 0].mean()) and pooled["fpr"] == pytest.approx(flags[labels == 0].mean())
    assert pooled["frame_auroc_smoothed"] is not None
