"""The embedded default job end to end, and the quality it reaches on the default synthetic scene."""

from __future__ import annotations

import json

import av
import pytest

from padim_ray.demo import run_demo


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
