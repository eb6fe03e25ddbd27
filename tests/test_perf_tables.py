"""docs/performance.md's tables are generated from the benchmarks' JSON (scripts/perf_tables.py): no Ray, fast."""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPOSITORY = Path(__file__).parent.parent
sys.path.insert(0, str(REPOSITORY / "scripts"))

import perf_tables  # noqa: E402

MACHINE = {"cpus": 16, "ram_bytes": 128 * 2**30, "gpus": ["NVIDIA H200, 143771 MiB"], "python": "3.12.0"}


def fit_run(commit: str, date: str, fit_fps: float) -> dict:
    """A bench_fit result as scripts/benchlib.py's report writes it (scripts/runrecord.py's record)."""
    def row(name, rate, ratio, fixed, peaks):
        return {"name": name, "frames": [128, 1024], "seconds": [1.0, 2.0], "peak_bytes": [int(p * 2**30) for p in peaks],
                "fps": [1.0, 1.0], "marginal_fps": rate, "fixed_seconds": fixed, "ratio_to_bare": ratio}

    return {
        "benchmark": "fit", "commit": commit, "dirty": False, "date": date, "machine": MACHINE, "repeat": 3,
        "bare": "bare backbone (torchvision)",
        "rows": [row("bare backbone (torchvision)", 2000.0, 1.0, 3.5, [1.5, 2.25]), row("padim-ray fit", fit_fps, 0.5, 40.25, [3.0, 3.125])],
    }


def write_run(bench_dir: Path, run: dict, name: str) -> None:
    path = bench_dir / run["benchmark"] / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(run))


def test_the_latest_run_fills_its_block_with_commit_date_and_machine(tmp_path):
    bench = tmp_path / "bench"
    write_run(bench, fit_run("a" * 40, "2026-12-01T10:00:00+00:00", 1000.0), "old.json")
    write_run(bench, fit_run("b" * 40, "2026-12-02T10:00:00+00:00", 1234.5), "new.json")
    doc = tmp_path / "performance.md"
    doc.write_text("# perf\n\nprose stays\n<!-- bench_fit -->\nstale figures\n<!-- /bench_fit -->\nafter\n")
    assert perf_tables.main(["--doc", str(doc), "--bench-dir", str(bench), "--check"]) == 1
    assert perf_tables.main(["--doc", str(doc), "--bench-dir", str(bench)]) == 0
    text = doc.read_text()
    assert text.startswith("# perf\n\nprose stays\n<!-- bench_fit -->\n") and text.endswith("<!-- /bench_fit -->\nafter\n")
    assert "stale figures" not in text and "aaaaaaa" not in text
    assert "Measured at commit `bbbbbbb` on 2026-12-02, on 16 CPU cores, 128 GiB RAM, NVIDIA H200, 143771 MiB." in text
    assert "| run | marginal frames/s | ÷ bare | fixed s | peak GiB @128 / @1024 |" in text
    assert "| bare backbone (torchvision) | 2000.0 | 1.00 | 3.5 | 1.50 / 2.25 |" in text
    assert "| **padim-ray fit** | 1234.5 | 0.50 | 40.2 | 3.00 / 3.12 |" in text
    assert perf_tables.main(["--doc", str(doc), "--bench-dir", str(bench), "--check"]) == 0


def test_a_benchmark_never_run_says_how_to_run_it(tmp_path):
    doc = tmp_path / "performance.md"
    doc.write_text("<!-- bench_decode -->\n<!-- /bench_decode -->\n")
    perf_tables.main(["--doc", str(doc), "--bench-dir", str(tmp_path)])
    assert "Not measured yet: run `python scripts/bench_decode.py`" in doc.read_text()


def test_performance_md_is_what_the_committed_json_generates():
    """Rerun a benchmark, then `python scripts/perf_tables.py`, and commit both."""
    assert perf_tables.main(["--check"]) == 0


def test_every_committed_run_records_commit_date_and_machine():
    runs = sorted((REPOSITORY / "runs" / "bench").glob("*/*.json"))
    assert runs
    for path in runs:
        run = json.loads(path.read_text())
        assert path.parent.name == run["benchmark"]
        assert len(run["commit"]) == 40 and run["date"][:4].isdigit() and run["machine"]["cpus"], path
        assert run["rows"], path
