"""Object-store and per-process memory of the sharded tree reduction of a WR50-Rd550-sized model.

d = 550 at two reduced position counts (the model has 4096): `--partials` accumulators of random
embeddings are built in Ray tasks and returned as their position shards (reduce.shard_bounds,
`--shard-mib`), separate objects owned by the driver as the stats actors return them; reduce.reduce_tree
merges each shard's partials (`--fan-in`), then one task per shard finalizes it (covariance and its
inverse, as reduce.finalize_shard, without writing a model store). Each position count runs on a fresh
local Ray (a private temp dir, a `--store-gib` object store, every core).

Sampled every 50 ms at the lowest priority: the object-store bytes in use (the raylet's GetNodeStats)
and each process's RSS and anonymous memory (RSS less file and shared-memory pages: what the process
allocated itself, object-store pages excluded), by what it runs (Ray's process title: accumulate,
merge_partials, finalize_stats; raylet, driver, ...). Accumulate and finalize tasks get fresh workers
(max_calls=1) and also report their ru_maxrss when they return (before Ray stores their results),
which no sampling interval misses. The position counts give the extrapolation to 4096 positions and
A actors; the object store's peak depends on timing (a merged partial is freed some 0.5 s after its
merge ends), so it varies between runs.

    python scripts/bench_reduce.py [--positions 64 128] [--partials 3] [--fan-in 2] [--shard-mib 128]
                                   [--store-gib 4] [--json PATH]
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import threading
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import psutil
import ray
import torch
from ray._private.internal_api import node_stats

import runrecord
from benchlib import _version
from padim_ray.reduce import reduce_tree, shard_bounds
from padim_ray.gaussian import GaussianStats, StatsAccumulator, finalize

DIMS = 550  # WR50-Rd550
MODEL_POSITIONS = 4096  # its 64x64 grid
BATCHES = 4  # updates per accumulator
EPS = 0.01
INTERVAL = 0.05  # seconds between samples
MIB = 2**20
ROLES = ("driver", "raylet", "gcs_server", "accumulate", "merge_partials", "finalize_stats", "idle worker", "other Ray processes")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--positions", type=int, nargs="+", default=[64, 128], help="position counts, each run on a fresh Ray")
    parser.add_argument("--partials", type=int, default=3, help="accumulators (stats actors) to merge")
    parser.add_argument("--fan-in", type=int, default=2, help="partials per merge task")
    parser.add_argument("--batch", type=int, default=32, help="embeddings per update (ClusterConfig.batch_size)")
    parser.add_argument("--shard-mib", type=int, default=128, help="position shard size (ClusterConfig.shard_bytes)")
    parser.add_argument("--store-gib", type=float, default=4, help="object store of the local Ray")
    parser.add_argument("--json", type=Path, default=runrecord.default_path("reduce"), help="where to write the results")
    return parser.parse_args()


def max_rss() -> int:
    """This process's peak RSS in bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@ray.remote(max_calls=1)
def accumulate(positions: int, batch: int, seed: int, bounds: list[tuple[int, int]]) -> list:
    """One partial: its position shards (in place, as StatsActor.shards), then the worker's ru_maxrss."""
    generator = torch.Generator().manual_seed(seed)
    accumulator = StatsAccumulator(positions, DIMS)
    for _ in range(BATCHES):
        accumulator.update(torch.randn(batch, DIMS, positions, 1, generator=generator))
    return [*(accumulator.stats(start, stop, in_place=True) for start, stop in bounds), max_rss()]


@ray.remote(max_calls=1)
def finalize_stats(stats: GaussianStats) -> tuple[int, int]:
    """Covariance and precision of one shard (as reduce.finalize_shard, no store); its count and ru_maxrss."""
    finalize(stats, EPS)
    return stats.count, max_rss()


# --- sampling ---------------------------------------------------------------------------------------


def role(proc: psutil.Process) -> str:
    """One of ROLES: the driver, a Ray daemon, or what a worker runs now (Ray's process title)."""
    if proc.pid == os.getpid():
        return "driver"
    words = " ".join(proc.cmdline()).split()
    name = words[0].removeprefix("ray::") if words else ""
    if name == "IDLE":
        return "idle worker"
    name = Path(name).name
    return name if name in ROLES else "other Ray processes"


class Sampler:
    """Peak object-store use and per-role peak RSS / anonymous memory of the driver's process tree."""

    def __init__(self):
        node = ray.nodes()[0]
        self.raylet = node["NodeManagerAddress"], node["NodeManagerPort"]
        self.peaks: dict[str, dict[str, int]] = defaultdict(lambda: {"rss": 0, "anon": 0})
        self.store_peak = self.anon_total_peak = 0
        self.store_series: list[tuple[float, int]] = []  # (seconds, bytes in use) at each change
        self.started = time.monotonic()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.loop, daemon=True)

    def __enter__(self) -> Sampler:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.done.set()
        self.thread.join()
        self.sample()

    def loop(self) -> None:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        while not self.done.is_set():
            self.sample()
            time.sleep(INTERVAL)

    def store(self):
        return node_stats(*self.raylet, include_memory_info=False).store_stats

    def sample(self) -> None:
        used = self.store().object_store_bytes_used
        self.store_peak = max(self.store_peak, used)
        if not self.store_series or self.store_series[-1][1] != used:
            self.store_series.append((round(time.monotonic() - self.started, 3), used))
        driver = psutil.Process()
        anon_total = 0
        for proc in [driver, *driver.children(recursive=True)]:
            try:
                name, memory = role(proc), proc.memory_info()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            peak, anon = self.peaks[name], memory.rss - memory.shared
            peak["rss"], peak["anon"] = max(peak["rss"], memory.rss), max(peak["anon"], anon)
            anon_total += anon
        self.anon_total_peak = max(self.anon_total_peak, anon_total)


# --- one position count ------------------------------------------------------------------------------


@contextmanager
def local_ray(store_gib: float) -> Iterator[None]:
    """A fresh local Ray with its own temp dir (never another cluster on the machine)."""
    with tempfile.TemporaryDirectory(prefix="pbr", dir="/tmp") as tmp:  # short: socket paths < 107 chars
        ray.init(
            address="local", num_cpus=os.cpu_count(), object_store_memory=int(store_gib * 2**30),
            include_dashboard=False, log_to_driver=False, _temp_dir=tmp,
        )
        try:
            yield
        finally:
            ray.shutdown()


def reduce_once(positions: int, bounds: list[tuple[int, int]], args: argparse.Namespace, sampler: Sampler) -> dict:
    """Accumulate, reduce and finalize as the fit does: phase seconds, the object store once every
    partial is in it, and the tasks' ru_maxrss."""
    started = time.monotonic()
    task = accumulate.options(num_returns=len(bounds) + 1)
    outputs = [task.remote(positions, args.batch, seed, bounds) for seed in range(args.partials)]
    accumulate_rss = ray.get([refs[-1] for refs in outputs])
    ray.wait([ref for refs in outputs for ref in refs[:-1]], num_returns=len(bounds) * args.partials, fetch_local=False)
    accumulated, stored = time.monotonic(), sampler.store().object_store_bytes_used
    roots = [reduce_tree([refs[s] for refs in outputs], args.fan_in) for s in range(len(bounds))]
    del outputs  # the merges alone hold the partials now: each is freed once merged
    ray.wait(roots, num_returns=len(roots), fetch_local=False)
    reduced = time.monotonic()
    counts, finalize_rss = zip(*ray.get([finalize_stats.remote(root) for root in roots]))
    expected = args.partials * BATCHES * args.batch
    if set(counts) != {expected}:
        raise SystemExit(f"reduced shards hold {sorted(set(counts))} embeddings, not {expected}")
    return {
        "seconds": {"accumulate": accumulated - started, "reduce": reduced - accumulated, "finalize": time.monotonic() - reduced},
        "store_after_accumulate": stored,
        "ru_maxrss": {"accumulate": max(accumulate_rss), "finalize_stats": max(finalize_rss)},
    }


def run_case(positions: int, args: argparse.Namespace) -> dict:
    """One position count on a fresh Ray: sizes, phase seconds and memory peaks."""
    bounds = shard_bounds(positions, DIMS, args.shard_mib * MIB)
    with local_ray(args.store_gib), Sampler() as sampler:
        measured = reduce_once(positions, bounds, args, sampler)
        spilled = sampler.store().spilled_bytes_total
    print(f"  {positions} positions: {len(bounds)} shards, {sum(measured['seconds'].values()):.1f} s", flush=True)
    return {
        "positions": positions,
        "shards": len(bounds),
        "shard_bytes": max(stop - start for start, stop in bounds) * DIMS * DIMS * 8,
        "partials_bytes": args.partials * positions * DIMS * DIMS * 8,  # every shard of every partial
        "accumulator_bytes": positions * DIMS * (DIMS + 2) * 8,
        **measured,
        "store_peak": sampler.store_peak,
        "spilled_bytes": spilled,
        "anon_total_peak": sampler.anon_total_peak,
        "roles": dict(sampler.peaks),
        "store_series": sampler.store_series,
    }


# --- extrapolation and report -----------------------------------------------------------------------


def _in_flight(case: dict) -> float:
    """Object-store peak beyond every partial's shards, in shards."""
    return (case["store_peak"] - case["partials_bytes"]) / case["shard_bytes"]


def line(x: list[float], y: list[float]) -> tuple[float, float]:
    """Intercept and slope of the line through the first and last points."""
    slope = (y[-1] - y[0]) / (x[-1] - x[0])
    return y[0] - slope * x[0], slope


def extrapolate(cases: list[dict], args: argparse.Namespace) -> dict:
    """The formulas' coefficients from the measured cases, and the model's shard size.

    Object store: peak = A*P*d^2*8 (every partial's shards, all stored before the first merge)
    + k * shard_bytes (merge outputs in flight), k the largest measured. Accumulate worker:
    anon = base + P*d*(d+2)*8 (the accumulator) + k * P*B*d (an update's temporaries).
    Merge and finalize workers: anon = base + k * shard_bytes.
    """
    fits = {"store": {"k": max(map(_in_flight, cases))}}
    base, slope = line([c["positions"] for c in cases], [c["roles"]["accumulate"]["anon"] for c in cases])
    fits["accumulate"] = {"base": base, "k": (slope - DIMS * (DIMS + 2) * 8) / (args.batch * DIMS)}
    for name in ("merge_partials", "finalize_stats"):
        base, slope = line([c["shard_bytes"] for c in cases], [c["roles"][name]["anon"] for c in cases])
        fits[name] = {"base": base, "k": slope}
    bounds = shard_bounds(MODEL_POSITIONS, DIMS, args.shard_mib * MIB)
    return {"positions": MODEL_POSITIONS, "shard_bytes": max(b - a for a, b in bounds) * DIMS * DIMS * 8, "fits": fits}


def merge_tasks(partials: int, fan_in: int) -> int:
    """Merge tasks reduce_tree runs per shard (a lone partial at a level is copied by a task too)."""
    tasks = 0
    while partials > 1:
        partials = -(-partials // fan_in)
        tasks += partials
    return tasks


def gib(size: float) -> str:
    return f"{size / 2**30:.2f}"


def table(cases: list[dict], args: argparse.Namespace) -> list[str]:
    """The markdown table: one column per position count."""
    rows = [
        ("shards x GiB", [f"{c['shards']} x {gib(c['shard_bytes'])}" for c in cases]),
        ("accumulator per partial GiB", [gib(c["accumulator_bytes"]) for c in cases]),
        ("all partials' shards (A*P*d^2*8) GiB", [gib(c["partials_bytes"]) for c in cases]),
        ("seconds accumulate / reduce / finalize", ["{accumulate:.1f} / {reduce:.1f} / {finalize:.1f}".format(**c["seconds"])
                                                    for c in cases]),
        ("object store after accumulate GiB", [gib(c["store_after_accumulate"]) for c in cases]),
        ("object store peak GiB", [gib(c["store_peak"]) for c in cases]),
        ("object store peak - all partials, in shards", [f"{_in_flight(c):.1f}" for c in cases]),
        ("object store spilled GiB", [gib(c["spilled_bytes"]) for c in cases]),
        ("anon of all processes, peak GiB", [gib(c["anon_total_peak"]) for c in cases]),
        *((f"{name}: peak RSS / anon GiB", [_role_cell(c, name) for c in cases]) for name in ROLES),
        *((f"{name}: ru_maxrss GiB", [gib(c["ru_maxrss"][name]) for c in cases]) for name in ("accumulate", "finalize_stats")),
    ]
    title = f"d={DIMS}, {args.partials} partials, fan-in {args.fan_in}, batch {args.batch}, {args.shard_mib} MiB shards"
    return [
        f"| {title} | " + " | ".join(f"P={c['positions']}" for c in cases) + " |",
        "|---|" + "---|" * len(cases),
        *(f"| {name} | " + " | ".join(cells) + " |" for name, cells in rows),
    ]


def _role_cell(case: dict, name: str) -> str:
    peak = case["roles"].get(name)
    return "-" if peak is None else f"{gib(peak['rss'])} / {gib(peak['anon'])}"


def formulas(model: dict, args: argparse.Namespace) -> list[str]:
    """The extrapolation to the model's positions, as formulas and GiB."""
    fits, shard, p, d = model["fits"], model["shard_bytes"], model["positions"], DIMS
    partial, accumulator = p * d * d * 8, p * d * (d + 2) * 8
    acc = fits["accumulate"]
    lines = [
        f"Extrapolated to P = {p} positions, d = {d}, A actors, {args.shard_mib} MiB shards (shard_bytes {gib(shard)} GiB):",
        f"  accumulator per actor = P*d*(d+2)*8 = {gib(accumulator)} GiB",
        f"  object store peak ~ A*P*d^2*8 + {fits['store']['k']:.1f} * shard_bytes"
        f" = {gib(partial)} GiB * A + {gib(fits['store']['k'] * shard)} GiB",
        f"    (k on {os.cpu_count()} CPUs: merges end faster than Ray frees their inputs, so k grows with the merges"
        f" running at once; at most (A + M)*P*d^2*8, M = merge tasks per shard = {merge_tasks(args.partials, args.fan_in)}"
        f" for A = {args.partials}, fan-in {args.fan_in})",
        f"  accumulate worker anon ~ P*d*(d+2)*8 + {acc['k']:.0f} * P*B*d + {gib(acc['base'])} GiB"
        f" = {gib(accumulator + acc['k'] * p * args.batch * d + acc['base'])} GiB at B = {args.batch}",
    ]
    for name in ("merge_partials", "finalize_stats"):
        fit = fits[name]
        total = fit["k"] * shard + fit["base"]
        lines.append(f"  {name} worker anon ~ {fit['k']:.1f} * shard_bytes + {gib(fit['base'])} GiB = {gib(total)} GiB")
    return lines


def report(cases: list[dict], model: dict, args: argparse.Namespace) -> None:
    """Print the table and the formulas, and write everything as JSON."""
    print("", *table(cases, args), "", *formulas(model, args), sep="\n")
    result = runrecord.record(
        "reduce", cases, versions={"torch": _version("torch"), "ray": _version("ray")},
        dims=DIMS, partials=args.partials, fan_in=args.fan_in, batch=args.batch, shard_bytes=args.shard_mib * MIB, extrapolation=model,
    )
    runrecord.write(args.json, result)
    print(f"written {args.json}")


def main() -> None:
    args = parse_args()
    if len(set(args.positions)) < 2:
        raise SystemExit("--positions needs at least two different counts to extrapolate")
    cases = [run_case(positions, args) for positions in args.positions]
    report(cases, extrapolate(cases, args), args)


if __name__ == "__main__":
    main()
