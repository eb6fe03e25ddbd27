"""The embedded default job end to end, the quality it reaches on the default synthetic scene, and its decisions:
every injected anomaly is an event, two at once are two events, and the normal clip has none."""

from __future__ import annotations

import json

import av
import numpy as np
import pytest
from scipy import ndimage

from padim_ray.decisions import read_events
from padim_ray.demo import run_demo
from padim_ray.metrics import segments


@pytest.mark.slow
def test_demo_runs_end_to_end_with_the_pretrained_backbone(ray_local, tmp_path, capsys):
    result = run_demo(tmp_path)
    pooled = result.report.pooled
    print(f"demo pooled: pixel AUROC {pooled.pixel_auroc:.4f}, frame AUROC {pooled.frame_auroc:.4f}, PRO {pooled.pro:.4f}")
    assert pooled.pixel_auroc >= 0.95
    assert pooled.frame_auroc >= 0.90
    metrics = json.loads((result.evaluation / "metrics.json").read_text())
    assert metrics[0]["pooled"]["pixel_auroc"] == pooled.pixel_auroc
    with av.open(str(result.video)) as container:
        assert sum(1 for _ in container.decode(video=0)) == 40
    printed = capsys.readouterr().out
    for artefact in (result.model, result.maps, result.video):
        assert str(artefact) in printed
    assert "event(s)" in printed and "threshold" in printed and "calibration footage" in printed
    check_decisions(result)


def check_decisions(result):
    """The demo's clips (synthetic.ANOMALIES in order): a vehicle, a thrown object, both at once, nothing."""
    events, decision = read_events(result.maps)
    assert "calibration footage" in decision["meaning"]  # auto: the model's calibration
    masks = {clip: np.load(result.data / "testing" / "test_pixel_mask" / f"{clip}.npy") for clip in ("01_0001", "01_0002", "01_0003", "01_0004")}
    for clip in ("01_0001", "01_0002", "01_0003"):
        [(first, last)] = segments(masks[clip].reshape(len(masks[clip]), -1).max(axis=1))
        found = events[events["input"] == clip]
        assert len(found) and ((found["start_frame"] <= last) & (found["end_frame"] >= first)).all(), (clip, found)
    assert not (events["input"] == "01_0004").any()  # the normal clip
    both = events[events["input"] == "01_0003"]
    assert len(both) == 2 and both["start_frame"].max() <= both["end_frame"].min()  # two events at once
    for event in both.itertuples():  # each box holds one of the two objects at its peak
        labels, count = ndimage.label(masks["01_0003"][event.peak_frame])
        inside = np.unique(labels[event.box_y0 : event.box_y1, event.box_x0 : event.box_x1])
        assert count == 2 and len(set(inside) - {0}) == 1
    pooled = result.report.pooled
    assert pooled.events["event_recall"] == 1.0 and pooled.events["segments"] == 3
    assert pooled.events["false_events_per_hour"] == 0.0 and pooled.fpr is not None and pooled.tpr > 0
    metrics = json.loads((result.evaluation / "metrics.json").read_text())
    assert metrics[0]["pooled"]["events"]["event_recall"] == 1.0
