"""Rewrite the generated tables of docs/performance.md from the latest JSON of each benchmark.

Benchmarks write one JSON file per run under runs/bench/<benchmark>/ (scripts/runrecord.py); the
latest of each (by its recorded date) fills the block between `<!-- NAME -->` and `<!-- /NAME -->`
in the doc, headed by the commit, date and machine it was measured on. Hand-timed measurements
(`runs/bench/findings.json`) fill the `findings:SECTION` blocks. No figure in those blocks is typed
by hand: rerun a benchmark, then this script.

    python scripts/perf_tables.py            # rewrite docs/performance.md
    python scripts/perf_tables.py --check    # exit 1, naming the blocks, if the doc is not up to date
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "performance.md"
BENCH_DIR = REPO / "runs" / "bench"
FINDINGS = "findings.json"
BLOCK = re.compile(r"<!-- (?P<name>[\w:]+) -->\n.*?<!-- /(?P=name) -->", re.S)
GiB = 2**30
# STC training videos per scene (docs/design.md, "ShanghaiTech Campus layout"), for the projected fit time
STC_VIDEOS = {"01": 83, "02": 15, "03": 6, "04": 20, "05 + 07": 74, "06": 30, "08": 49, "09": 10, "10": 11, "11": 10, "12": 15, "13": 7}
STC_FRAMES = 274_515


def latest(bench_dir: Path, benchmark: str, having: str | None = None) -> dict | None:
    """The most recent run of `benchmark` (by the date it records) that records `having` (if given), or None."""
    runs = [json.loads(path.read_text()) for path in sorted((bench_dir / benchmark).glob("*.json"))]
    runs = [run for run in runs if having is None or run.get(having)]
    return max(runs, key=lambda run: run["date"]) if runs else None


def num(value, spec: str = ".1f") -> str:
    return "n/a" if value is None else format(value, spec)


def gib(value) -> str:
    return "n/a" if value is None else f"{value / GiB:.2f}"


def header(run: dict) -> str:
    """The line that dates a table: commit, date, machine, where the figures come from, and conditions."""
    machine = run["machine"]
    ram = f", {machine['ram_bytes'] / GiB:.0f} GiB RAM" if machine.get("ram_bytes") else ""
    gpus = ", ".join(machine.get("gpus") or []) or "no GPU"
    where = machine.get("description") or f"{machine['cpus']} CPU cores{ram}, {gpus}"
    dirty = " (with uncommitted changes)" if run.get("dirty") else ""
    parts = [f"Measured at commit `{(run['commit'] or 'unknown')[:7]}`{dirty} on {run['date'][:10]}, on {where}"]
    if run.get("source"):
        parts.append(run["source"])
    text = "; ".join(parts) + "."
    if run.get("conditions"):
        text += f" {run['conditions'][0].upper()}{run['conditions'][1:]}."
    return text


def against_bare(run: dict) -> list[str]:
    """bench_fit, bench_score, bench_peer: marginal rates against the bare backbone, fixed costs, peaks."""
    n1, n2 = run["rows"][0]["frames"]
    rounds = run.get("repeat")
    lines = [f"Frames {n1} / {n2}" + (f", {rounds} round(s), medians." if rounds else "."), "",
             f"| run | marginal frames/s | ÷ bare | fixed s | peak GiB @{n1} / @{n2} |", "|---|---|---|---|---|"]
    for row in run["rows"]:
        rate = num(row["marginal_fps"])
        if row["marginal_fps"] is None and row.get("seconds") and None not in row["seconds"]:
            rate += " ({} / {} s: start-up noise exceeds the work)".format(*(f"{s:.1f}" for s in row["seconds"]))
        name = f"**{row['name']}**" if row["name"].startswith("padim-ray fit") or row["name"].startswith("padim-ray score") else row["name"]
        peaks = " / ".join(gib(p) for p in row["peak_bytes"])
        lines.append(f"| {name} | {rate} | {num(row['ratio_to_bare'], '.2f')} | {num(row['fixed_seconds'])} | {peaks} |")
    return lines


def peer(run: dict) -> list[str]:
    lines = against_bare(run)
    lines += ["", f"`padim-ray fit` / anomalib {run.get('anomalib', '')}'s PaDiM: **{num(run.get('fit_over_anomalib'), '.2f')}x** "
              "marginal frames/s."]
    g = run.get("gaussians")
    if g:
        dated = f" (measured at commit `{g['commit'][:7]}` on {g['date'][:10]})" if g.get("commit") else ""
        lines += ["", f"Gaussians on identical embeddings ({g['frames']} frames), largest relative difference per position{dated}: "
                  f"mean {g['mean']:.1e}; inverse covariance {g['inverse_covariance_same_eps']:.1e} against ours with anomalib's extra "
                  f"1e-5 I, {g['inverse_covariance']:.1e} without it (anomalib inverts in float32)."]
    return lines


def memory(run: dict) -> list[str]:
    lines = ["| frames | seconds | peak GiB (process tree) | largest processes at the peak, GiB |", "|---|---|---|---|"]
    for row in run["rows"]:
        parts = ", ".join(f"{name} {gib(pss)}" for name, pss in row["processes"].items())
        lines.append(f"| {row['frames']:,} | {num(row['seconds'])} | {gib(row['peak_bytes'])} | {parts} |")
    return lines


def reduce(run: dict) -> list[str]:
    cases, d = run["rows"], run["dims"]
    title = f"d = {d}, {run['partials']} partials, fan-in {run['fan_in']}, {run['shard_bytes'] // 2**20} MiB shards"
    roles = [("accumulate task, anonymous memory", "accumulate"), ("merge task, anonymous memory", "merge_partials"),
             ("finalize task, anonymous memory", "finalize_stats"), ("driver, anonymous memory", "driver")]
    rows = [
        ("accumulator per partial", [gib(c["accumulator_bytes"]) for c in cases]),
        ("object store after accumulating (all shards of all partials)", [gib(c["store_after_accumulate"]) for c in cases]),
        ("object store peak", [gib(c["store_peak"]) for c in cases]),
        *((label, [gib(c["roles"].get(role, {}).get("anon")) for c in cases]) for label, role in roles),
    ]
    lines = [f"| {title} | " + " | ".join(f"P = {c['positions']}" for c in cases) + " |", "|---|" + "---|" * len(cases)]
    lines += [f"| {label} (GiB) | " + " | ".join(cells) + " |" for label, cells in rows]
    model = run.get("extrapolation")
    if model:
        fits, p, shard, batch = model["fits"], model["positions"], model["shard_bytes"], run["batch"]
        about = "about " if model.get("approximate") else ""
        lines += ["", f"Extrapolated to P = {p}, d = {d}, A actors, shards of S = {shard / GiB:.3f} GiB:", "",
                  f"- per actor: the accumulator, plus temporaries of an update at batch B of "
                  f"{about}{fits['accumulate']['k']:g}·P·B·d bytes = {gib(fits['accumulate']['k'] * p * batch * d)} GiB at B = {batch}",
                  f"- object store peak {about}A·P·d²·8 + k·S = {gib(p * d * d * 8)} GiB × A + {fits['store']['k']:g} × "
                  f"{shard / GiB:.3f} GiB (k: merge outputs alive at once in this run)"]
        for label, name in (("merge task", "merge_partials"), ("finalize task", "finalize_stats")):
            fit = fits[name]
            lines.append(f"- {label} {about}{fit['k']:g}·S + {gib(fit['base'])} GiB")
    return lines + [f"- Note: {note}." for note in run.get("notes", [])]


def scenes(run: dict) -> list[str]:
    label = {"sequential": "one fit per scene, in turn", "all": "`fit stc --scene all`, one job"}
    seconds = {row["mode"]: row["seconds"] for row in run["rows"]}
    lines = [f"{run['scenes']} scenes × {run['frames_per_scene']} frames.", "", "| run | seconds | peak GiB |", "|---|---|---|"]
    lines += [f"| {label[row['mode']]} | {num(row['seconds'])} | {gib(row['peak_bytes'])} |" for row in run["rows"]]
    return lines + ["", f"The job takes {seconds['all'] / seconds['sequential']:.2f}x the time of fitting the scenes in turn."]


def profile_actor(run: dict) -> list[str]:
    lines = [f"{run['backbone']}, {run.get('torch_threads', 'n/a')} torch threads.", "",
             "| device | dtype | batch | update slice MiB | embed ms | float64 update ms | update share | frames/s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in run["rows"]:
        share = "n/a" if r["update_share"] is None else f"{r['update_share']:.1%}"
        lines.append(f"| {r['device']} | {r['backbone_dtype']} | {r['batch_size']} | {r['update_mib']:g} | {num(r['embed_ms'])} | "
                     f"{num(r['update_ms'])} | {share} | {num(r['frames_per_s'])} |")
    return lines


def watch(run: dict) -> list[str]:
    lines = [f"Each camera: {run['clip_seconds']} s of {run['source']} replayed `--realtime`, taken at {run['rows'][0]['fps']:g} frames/s.", "",
             "| cameras | frames read | scored | dropped | latency median ms (worst camera) | p99 ms (worst camera) | peak GiB | sustained |",
             "|---|---|---|---|---|---|---|---|"]
    for r in run["rows"]:
        lines.append(f"| {r['cameras']} | {r['read']} | {r['scored']} | {r['dropped']} | {r['latency_ms_median_worst']} | "
                     f"{r['latency_ms_p99_worst']} | {r['peak_gib']:.2f} | {'yes' if r['sustained'] else 'no'} |")
    return lines


def watch_memory(run: dict) -> list[str]:
    memory = run["memory"]
    samples = memory["samples"]
    return [f"Memory over a {memory['minutes']:g}-minute watch of {memory['cameras']} cameras (PSS of the command's process tree, "
            f"every {samples[1]['seconds'] - samples[0]['seconds']} s):", "",
            "| minute | " + " | ".join(f"{s['seconds'] / 60:.1f}" for s in samples) + " |", "|---|" + "---|" * len(samples),
            "| GiB | " + " | ".join(gib(s["pss_bytes"]) for s in samples) + " |"]


def decode(run: dict) -> list[str]:
    lines = ["| processes | marginal frames/s | per process | fixed s |", "|---|---|---|---|"]
    for r in run["rows"]:
        lines.append(f"| {r['processes']} | {num(r['marginal_fps'], '.0f')} | {num(r['per_process_fps'], '.0f')} | {num(r['fixed_seconds'], '.2f')} |")
    return lines


def stc_time(run: dict) -> list[str]:
    """Minutes per STC scene on one node at the latest measured `padim-ray fit` rate (bench_fit)."""
    fit = next(row for row in run["rows"] if row["name"] == "padim-ray fit")
    rate, fixed = fit["marginal_fps"], fit["fixed_seconds"]
    per_video = STC_FRAMES / sum(STC_VIDEOS.values())
    lines = ["A scene of F frames takes about fixed + F / r seconds on one such node, r and fixed being the marginal rate and "
             "fixed seconds of the `padim-ray fit` row of the fit's table (from the same run):", "", "| scene | minutes |", "|---|---|"]
    lines += [f"| {scene} | {(fixed + videos * per_video / rate) / 60:.0f} |" for scene, videos in STC_VIDEOS.items()]
    total = sum(fixed + videos * per_video / rate for videos in STC_VIDEOS.values())
    return lines + [f"| all, in turn | {total / 60:.0f} ({total / 3600:.1f} h) |"]


def findings(entries: list[dict], section: str) -> list[str]:
    lines = ["| what | measured | kept | commit |", "|---|---|---|---|"]
    for f in (entry for entry in entries if entry["section"] == section):
        lines.append(f"| {f['what']} | {f['measured']} | {f.get('kept') or ''} | `{f['commit'][:7]}` ({f['date'][:10]}) |")
    sources = sorted({f["source"].split(" (")[0] for f in entries if f["section"] == section})
    return lines + ["", f"Machine: the 2-core development machine; {'; '.join(sources)}."]


RENDERERS = {
    "bench_fit": ("fit", against_bare), "bench_score": ("score", against_bare), "bench_peer": ("peer", peer),
    "bench_memory": ("memory", memory), "bench_reduce": ("reduce", reduce), "bench_scenes": ("scenes", scenes),
    "bench_decode": ("decode", decode), "bench_watch": ("watch", watch), "bench_watch_memory": ("watch", watch_memory),
    "profile_actor": ("profile_actor", profile_actor), "stc_time": ("fit", stc_time),
}
HAVING = {"bench_watch_memory": "memory"}  # blocks drawn from the latest run that measured this, not the latest run


def block(name: str, bench_dir: Path) -> list[str]:
    """The generated lines of block `name`."""
    if name.startswith("findings:"):
        path = bench_dir / FINDINGS
        entries = json.loads(path.read_text())["findings"] if path.is_file() else []
        return findings(entries, name.split(":", 1)[1])
    if name not in RENDERERS:
        raise SystemExit(f"docs block <!-- {name} -->: no such table; known: {', '.join(sorted(RENDERERS))}, findings:SECTION")
    benchmark, render = RENDERERS[name]
    run = latest(bench_dir, benchmark, HAVING.get(name))
    if run is None:
        return [f"Not measured yet: run `python scripts/{benchmark if benchmark == 'profile_actor' else 'bench_' + benchmark}.py`, "
                "then `python scripts/perf_tables.py`."]
    return ([] if name == "stc_time" else [header(run), ""]) + render(run)


def generate(text: str, bench_dir: Path) -> str:
    """`text` with every generated block rewritten from the JSON under `bench_dir`."""
    def replace(match: re.Match) -> str:
        name = match["name"]
        return "\n".join([f"<!-- {name} -->", *block(name, bench_dir), f"<!-- /{name} -->"])

    return BLOCK.sub(replace, text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--doc", type=Path, default=DOC)
    parser.add_argument("--bench-dir", type=Path, default=BENCH_DIR)
    parser.add_argument("--check", action="store_true", help="only check that the doc is up to date")
    args = parser.parse_args(argv)
    text = args.doc.read_text()
    new = generate(text, args.bench_dir)
    if args.check:
        if new != text:
            stale = [m["name"] for m in BLOCK.finditer(text) if m[0] not in new]
            print(f"{args.doc} is not up to date ({', '.join(stale)}): run python scripts/perf_tables.py", file=sys.stderr)
            return 1
        return 0
    args.doc.write_text(new)
    print(f"written {args.doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
