"""Step (a) of the GPU check (scripts/check_cuda.py) runs here on the CPU, as CI's rehearsal of it.

On the CPU its embeddings and scored maps compare the CPU with itself; its statistics, distances and
maps meet independent float64 references, and every row must pass.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "check_cuda.py"
QUANTITIES = ["embeddings float32", "embeddings bfloat16", "statistics mean", "statistics m2", "distances", "maps", "scored maps"]


def test_check_cuda_passes_on_the_cpu(tmp_path):
    report_file = tmp_path / "check.json"
    command = [sys.executable, str(SCRIPT), "--device", "cpu", "--image-size", "64", "--frames", "4", "--json", str(report_file)]
    run = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]
    report = json.loads(report_file.read_text())
    assert [row["quantity"] for row in report["rows"]] == QUANTITIES
    assert all(row["passed"] and row["elements"] > 0 for row in report["rows"])
    bfloat16 = report["rows"][1]
    assert bfloat16["max_error_over_scale"] > 1e-3  # bfloat16 was really used: it differs from float32
    assert report["rows"][3]["max_error_over_scale"] <= 1e-9  # float64 statistics over several slices, exact
