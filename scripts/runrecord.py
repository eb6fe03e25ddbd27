"""Where benchmarks write their results, and what every result records besides its rows.

Each run writes one JSON file, `runs/bench/<benchmark>/<UTC time>-<commit>.json`, holding the
benchmark's name, the commit measured (`git rev-parse HEAD`, and whether the tree had uncommitted
changes), the date, the machine (cores, RAM, GPUs) and the rows. `runs/bench/` is committed:
`scripts/perf_tables.py` turns the latest file of each benchmark into the tables of
docs/performance.md, so a figure there always names the commit and machine it was measured on.
Standard library only: the GPU check runs these scripts where little is installed.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BENCH_DIR = REPO / "runs" / "bench"


def commit() -> dict:
    """The commit measured and whether the working tree differed from it (None outside a git checkout)."""
    def git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    head = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if head else None
    return {"commit": head, "dirty": bool(status) if status is not None else None}


def machine() -> dict:
    """Cores, RAM and GPUs of this machine."""
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else None
    try:
        query = ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"]
        gpus = [line.strip() for line in subprocess.run(query, capture_output=True, text=True, check=True, timeout=30).stdout.splitlines() if line.strip()]
    except (OSError, subprocess.SubprocessError):
        gpus = []
    return {"cpus": os.cpu_count(), "ram_bytes": ram, "gpus": gpus, "python": sys.version.split()[0]}


def default_path(benchmark: str) -> Path:
    """Where a run of `benchmark` writes its JSON unless told otherwise (--json)."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    head = commit()["commit"]
    return BENCH_DIR / benchmark / f"{stamp}-{(head or 'nogit')[:7]}.json"


def record(benchmark: str, rows: list, **extra) -> dict:
    """The JSON object of one run: what was measured, where, when, at which commit, and the rows."""
    return {
        "benchmark": benchmark,
        **commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        **extra,
        "rows": rows,
    }


def write(path: Path, result: dict) -> None:
    """Write one run's JSON (see `record`), creating the folders above it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
