#!/usr/bin/env python3
"""Carry to the lent GPU machine the Python packages padim-ray needs that its image lacks.

The GPU machine (one H200, x86-64, no network) runs Python 3.12 with torch, numpy, pyarrow, pandas,
scipy, timm ... (scripts/gpu_image_packages.txt, from the device's KINDS.md), but without ray, av or
zarr. At most 64 MiB travel per run (working tree plus carried paths), so the missing wheels (BUNDLE,
pinned to the project's venv) are unpacked here, stripped of what a local fit and score do not use
(STRIPPED: Java, the dashboard's web client, RLlib, Tune, Train, Serve, LLM, console scripts; the
symbols of the ELF files that are checked to load after) and packed with xz into one archive (~46 MiB).

    python3 scripts/gpu_bundle.py prepare [--python 3.12] [--out .gpu-bundle]    # here, with PyPI (~5 min)
    python3 scripts/gpu_bundle.py install .gpu-bundle /tmp/padim                 # there, no network (~15 s)
    . /tmp/padim/env.sh                 # then ray, av, zarr, padim_ray and `padim-ray` work

`install` unpacks the bundle and writes padim-ray from this tree next to it (package, metadata and
console script, as pip would, without building), then prints the versions found and whether CUDA is.

Rehearsal on a Python 3.11 machine: `image-env` links out of a venv the distributions the image has
(and what their versions there need) into a bare interpreter; the bundle built for 3.11 goes over it
with no network (RAY_TMPDIR keeps Ray away from /tmp/ray):

    python3 scripts/gpu_bundle.py prepare --python 3.11 --out /tmp/r/bundle
    python3 scripts/gpu_bundle.py image-env /tmp/r/image --venv /work/main/.venv
    unshare -n sh -c 'ip link set lo up && . /tmp/r/image/env.sh && export RAY_TMPDIR=/tmp/r/ray &&
        python3 scripts/gpu_bundle.py install /tmp/r/bundle /tmp/r/t && . /tmp/r/t/env.sh && padim-ray fit ...'

Only the standard library is imported; pip (prepare), strip (binutils) and git are run as commands.
"""

from __future__ import annotations

import argparse
import email
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
IMAGE_LIST = REPO / "scripts" / "gpu_image_packages.txt"
BUNDLE = {  # missing from the image; versions as in the project's venv
    "ray": "2.60.0",  # local ray.init(include_dashboard=False) and Ray Data; its other needs are in the image
    "jsonschema": "4.26.0",  # ray's, with the three below (attrs is in the image)
    "jsonschema-specifications": "2025.9.1",
    "referencing": "0.37.0",
    "rpds-py": "2026.9.1",
    "av": "18.1.0",  # padim_ray.video
    "zarr": "3.1.6",  # padim_ray.store, with the three below
    "numcodecs": "0.16.6",
    "donfig": "0.8.1.post1",
    "google-crc32c": "1.9.0",
}
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux2010_x86_64", "manylinux1_x86_64"]
STRIPPED = ["bin", "ray/jars", "ray/dashboard/client/build", "ray/rllib", "ray/tune", "ray/train", "ray/serve",
            "ray/llm"]
ARCHIVE = "padim-ray-gpu-py{python}.tar.xz"
MANIFEST = "bundle.json"
BUDGET = 60 * 2**20  # bundle plus working tree; the device takes 64 MiB a run
MiB = 2**20


def canonical(name: str) -> str:
    """A distribution name as PEP 503 compares them."""
    return re.sub(r"[-_.]+", "-", name).lower()


def image_packages() -> set[str]:
    """Canonical names of the distributions in the GPU image (the data file, comments skipped)."""
    lines = IMAGE_LIST.read_text().splitlines()
    return {canonical(line) for line in lines if line.strip() and not line.startswith("#")}


def run(*command, **kwargs) -> subprocess.CompletedProcess:
    """Run `command`, failing loudly."""
    return subprocess.run([str(part) for part in command], check=True, **kwargs)


def download(python: str, wheels: Path) -> None:
    """The pinned BUNDLE wheels for CPython `python` on x86-64 Linux, into `wheels` (kept between runs)."""
    run(sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", python,
        "--implementation", "cp", *[f"--platform={tag}" for tag in PLATFORMS], "-d", wheels,
        *[f"{name}=={version}" for name, version in BUNDLE.items()])


def pinned_wheels(wheels: Path) -> list[Path]:
    """The wheel of each BUNDLE pin in the folder `wheels` (which may hold other versions too)."""
    pinned = {canonical(name): version for name, version in BUNDLE.items()}
    chosen = [path for path in sorted(wheels.glob("*.whl"))
              if pinned.get(canonical(path.name.split("-")[0])) == path.name.split("-")[1]]
    if len(chosen) != len(BUNDLE):
        sys.exit(f"expected {len(BUNDLE)} wheels in {wheels}, found {[path.name for path in chosen]}")
    return chosen


def required(requirements: list[str]) -> set[str]:
    """Canonical names in Requires-Dist values, but those of extras (other markers are not evaluated)."""
    return {canonical(re.match(r"[A-Za-z0-9._-]+", requirement.strip()).group())
            for requirement in requirements if not re.search(r"\bextra\s*==", requirement)}


def unmet(wheels: list[Path]) -> set[str]:
    """What `wheels` require that neither the GPU image nor BUNDLE provides."""
    needs = set()
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as archive:
            name = next(name for name in archive.namelist() if name.endswith(".dist-info/METADATA"))
            needs |= required(email.message_from_bytes(archive.read(name)).get_all("Requires-Dist") or [])
    return needs - image_packages() - {canonical(name) for name in BUNDLE}


def unpack(python: str, wheels: list[Path], site: Path) -> None:
    """Install `wheels` into the folder `site` for CPython `python`."""
    shutil.rmtree(site, ignore_errors=True)
    run(sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--only-binary=:all:",
        "--python-version", python, "--implementation", "cp", *[f"--platform={tag}" for tag in PLATFORMS],
        "--target", site, *wheels)


def is_elf(path: Path) -> bool:
    """Whether `path` is a regular ELF file (shared library, extension module or executable)."""
    if path.is_symlink() or not path.is_file():
        return False
    with path.open("rb") as handle:
        return handle.read(4) == b"\x7fELF"


def du(root: Path) -> int:
    """Bytes of the regular files under `root`."""
    return sum(path.stat().st_size for path in root.rglob("*") if path.is_file() and not path.is_symlink())


def interpreter(python: str) -> str:
    """A working CPython `python` on this machine: this one, one on PATH or one under pyenv."""
    candidates = [sys.executable] if f"{sys.version_info[0]}.{sys.version_info[1]}" == python else []
    candidates += [shutil.which(f"python{python}")] + sorted(
        str(path) for path in (Path.home() / ".pyenv" / "versions").glob(f"{python}.*/bin/python{python}"))
    for candidate in filter(None, candidates):
        if subprocess.run([candidate, "-c", ""], capture_output=True).returncode == 0:
            return candidate
    sys.exit(f"no Python {python} here to check the stripped libraries with (pyenv install {python}, say)")


def broken_elves(python: str, paths: list[Path]) -> set[Path]:
    """Which of `paths` fail to load (libraries, each into a fresh CPython `python`) or to run `--version`."""
    load = [interpreter(python), "-c", "import ctypes, sys; ctypes.CDLL(sys.argv[1])"]
    commands = {path: [*load, path] if ".so" in path.name else [path, "--version"] for path in paths}
    return {path for path, command in commands.items() if subprocess.run(command, capture_output=True).returncode}


def strip(site: Path, python: str) -> list[Path]:
    """Delete STRIPPED and __pycache__ from `site`, and the symbols of each ELF file checked to work after.

    Only files that load (or run) on their own before are stripped (not jemalloc, which is preloaded), and kept stripped where they still do.
    Returns the ELF files left as they came."""
    for relative in STRIPPED:
        shutil.rmtree(site / relative, ignore_errors=True)
    for cache in list(site.rglob("__pycache__")):
        shutil.rmtree(cache)
    elves = {path for path in site.rglob("*") if is_elf(path)}
    checked = elves - broken_elves(python, sorted(elves))
    copies = {path: path.with_name(path.name + ".stripped") for path in sorted(checked)}
    for path, copy in copies.items():
        run("strip", "--strip-unneeded", "-o", copy, path)
        shutil.copymode(path, copy)
    broken = broken_elves(python, list(copies.values()))
    for path, copy in copies.items():
        if copy in broken:
            copy.unlink()
        else:
            copy.replace(path)
    if broken_elves(python, sorted(checked)):
        sys.exit("stripped libraries do not load next to each other")
    return sorted(elves - checked | {path for path, copy in copies.items() if copy in broken})


def pack(site: Path, archive: Path) -> None:
    """`site`'s contents as an xz (preset 9) tar at `archive`."""
    partial = archive.with_suffix(".partial")
    with tarfile.open(partial, "w:xz", preset=9) as tar:
        for entry in sorted(site.iterdir()):
            tar.add(entry, arcname=entry.name)
    partial.rename(archive)


def tree_bytes() -> int:
    """Bytes of the working tree that travels to the device: tracked and untracked-not-ignored files."""
    listed = run("git", "-C", REPO, "ls-files", "-z", "--cached", "--others", "--exclude-standard",
                 capture_output=True).stdout.decode().split("\0")
    return sum((REPO / name).stat().st_size for name in set(listed) if name and (REPO / name).is_file())


def prepare(args: argparse.Namespace) -> None:
    """Download, unpack, strip, verify and pack the bundle for CPython `args.python` into `args.out`."""
    overlap = {canonical(name) for name in BUNDLE} & image_packages()
    if overlap:
        sys.exit(f"already in the GPU image, drop from BUNDLE: {sorted(overlap)}")
    work = REPO / "build" / f"gpu-bundle-py{args.python}"
    download(args.python, work / "wheels")
    wheels = pinned_wheels(work / "wheels")
    if unmet(wheels):
        sys.exit(f"required by the bundle, in neither the image nor BUNDLE: {sorted(unmet(wheels))}")
    unpack(args.python, wheels, work / "site")
    unpacked = du(work / "site")
    kept = strip(work / "site", args.python)
    print(f"unpacked {unpacked / MiB:.0f} MiB, stripped to {du(work / 'site') / MiB:.0f} MiB; symbols kept "
          f"(they do not load alone, or no longer once stripped): {[path.name for path in kept]}")
    args.out.mkdir(parents=True, exist_ok=True)
    for old in [*args.out.glob("*.tar.xz"), args.out / MANIFEST]:
        old.unlink(missing_ok=True)
    archive = args.out / ARCHIVE.format(python=args.python)
    pack(work / "site", archive)
    manifest = {"python": args.python, "archives": [archive.name], "packages": BUNDLE, "stripped": STRIPPED}
    (args.out / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    bundle, tree = archive.stat().st_size, tree_bytes()
    print(f"bundle {archive}: {bundle / MiB:.1f} MiB; working tree {tree / MiB:.1f} MiB; "
          f"sum {(bundle + tree) / MiB:.1f} MiB (budget {BUDGET / MiB:.0f} MiB)")
    print("\n".join(f"  {name}=={version}" for name, version in BUNDLE.items()))
    if bundle + tree > BUDGET:
        sys.exit("over budget")


REPORT = """
import importlib.metadata as m, torch
print("python", ".".join(map(str, __import__("sys").version_info[:3])), "torch", torch.__version__,
      *[f"{name} {m.version(name)}" for name in ("ray", "av", "zarr", "padim-ray")])
import ray, ray.data, av, zarr, padim_ray.fit, padim_ray.score, padim_ray.video, padim_ray.store
print("CUDA", torch.cuda.get_device_name() if torch.cuda.is_available() else "not visible")
"""


def install_tree(own: Path) -> None:
    """padim-ray from this tree into the folder `own` as pip lays it out: package, metadata, console scripts.

    Written directly rather than built: pyproject.toml's SPDX license needs setuptools >= 77, and the
    image's setuptools version is not known."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    shutil.copytree(REPO / "padim_ray", own / "padim_ray", ignore=shutil.ignore_patterns("__pycache__"))
    info = own / f"padim_ray-{project['version']}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n"
                                   + "".join(f"Requires-Dist: {line}\n" for line in project["dependencies"]))
    (info / "entry_points.txt").write_text(
        "[console_scripts]\n" + "".join(f"{name} = {target}\n" for name, target in project["scripts"].items()))
    (own / "bin").mkdir()
    for name, target in project["scripts"].items():
        module, function = target.split(":")
        script = own / "bin" / name
        script.write_text(f"#!{sys.executable}\nimport sys\nfrom {module} import {function}\nsys.exit({function}())\n")
        script.chmod(0o755)


def install(args: argparse.Namespace) -> None:
    """Unpack the bundle into `args.target`, install padim-ray from this tree next to it, write env.sh."""
    manifest = json.loads((args.bundle / MANIFEST).read_text())
    python = f"{sys.version_info[0]}.{sys.version_info[1]}"
    if manifest["python"] != python:
        sys.exit(f"{args.bundle} was prepared for Python {manifest['python']}, this is {python}")
    site, own = args.target / "site", args.target / "padim-ray"
    for folder in (site, own):
        shutil.rmtree(folder, ignore_errors=True)
    for name in manifest["archives"]:
        with tarfile.open(args.bundle / name) as tar:
            tar.extractall(site, filter="data")
    install_tree(own)
    lines = [f'export PYTHONPATH="{own}:{site}${{PYTHONPATH:+:$PYTHONPATH}}"', f'export PATH="{own / "bin"}:$PATH"']
    (args.target / "env.sh").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), f"# or: . {args.target / 'env.sh'}", sep="\n")
    env = dict(os.environ, PATH=f"{own / 'bin'}:{os.environ.get('PATH', '')}",
               PYTHONPATH=os.pathsep.join(filter(None, [str(own), str(site), os.environ.get("PYTHONPATH")])))
    run(sys.executable, "-c", REPORT, env=env)
    run(shutil.which("padim-ray", path=env["PATH"]) or "padim-ray", "--help", env=env, stdout=subprocess.DEVNULL)
    print("padim-ray console command works")


def site_packages(venv: Path) -> Path:
    """The purelib folder of the venv at `venv`."""
    return Path(run(venv / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_path('purelib'))",
                    capture_output=True, text=True).stdout.strip())


def link_units(site: Path, image: set[str]) -> tuple[set[tuple[str, ...]], set[str], set[str]]:
    """Which paths of `site` to link so that the distributions in `image`, and no others but theirs, appear.

    A venv's version of an image distribution may need more than the image's (its typer, pydantic), so
    what the linked distributions require (transitively, extras left out) is linked too. Each file a
    linked distribution's RECORD lists is reached through its shallowest folder (or itself) that no other
    distribution in `site` has files in, so shared namespaces (nvidia/, google/) are split.
    Returns the paths (as parts), the image's distributions found and the requirements added."""
    dists = {canonical(dist.metadata["Name"]): dist for dist in importlib.metadata.distributions(path=[str(site)])}
    found = image & dists.keys()
    linked, pending = set(found), list(found)
    while pending:
        for name in required(dists[pending.pop()].requires or []) & dists.keys() - linked:
            linked.add(name)
            pending.append(name)
    owners: dict[tuple[str, ...], set[str]] = {}
    files = {name: [path.parts for path in dist.files or [] if path.parts[0] != ".."] for name, dist in dists.items()}
    for name, paths in files.items():
        for parts in paths:
            for depth in range(1, len(parts) + 1):
                owners.setdefault(parts[:depth], set()).add(name)
    units = set()
    for name in linked:
        for parts in files[name]:
            depth = next(depth for depth in range(1, len(parts) + 1) if owners[parts[:depth]] == {name})
            units.add(parts[:depth])
    return units, found, linked - found


PROBE = """
import importlib
for name in ("torch", "torchvision", "timm", "numpy", "pyarrow", "pandas", "scipy", "typer", "pip", "setuptools"):
    importlib.import_module(name)
for name in ("ray", "av", "zarr", "padim_ray"):
    try:
        importlib.import_module(name)
    except ImportError:
        continue
    raise SystemExit(f"{name} imports in the image environment: it is not isolated")
print("image environment: torch, numpy, pyarrow ... import; ray, av, zarr, padim_ray do not")
"""


def image_env(args: argparse.Namespace) -> None:
    """In `args.dir`, a bare interpreter of `args.venv`'s Python and links to the image's distributions in it."""
    source = site_packages(args.venv)
    shutil.rmtree(args.dir, ignore_errors=True)
    run(args.venv / "bin" / "python", "-m", "venv", "--without-pip", args.dir / "python")
    units, found, added = link_units(source, image_packages())
    for parts in sorted(units):
        if (source.joinpath(*parts)).exists():
            link = args.dir.joinpath("site", *parts)
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(source.joinpath(*parts))
    missing = sorted(image_packages() - found)
    print(f"linked {len(found)} of the image's distributions from {source} ({len(missing)} are not there), "
          f"and what their versions there need besides: {sorted(added)}")
    env = {"PATH": f"{args.dir / 'python' / 'bin'}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
           "PYTHONPATH": str(args.dir / "site"), "PYTHONNOUSERSITE": "1"}
    script = "".join(f'export {key}="{value}"\n' for key, value in env.items()) + "unset VIRTUAL_ENV PYTHONHOME\n"
    (args.dir / "env.sh").write_text(script)
    run(args.dir / "python" / "bin" / "python3", "-c", PROBE, env=dict(env, HOME=str(Path.home())), cwd=args.dir)
    print(f". {args.dir / 'env.sh'}")


def main() -> None:
    """Parse the command line and run a subcommand."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    step = commands.add_parser("prepare", help="download, strip and pack the bundle (needs PyPI)")
    step.add_argument("--python", default="3.12", help="CPython version of the target (default 3.12, the GPU's)")
    step.add_argument("--out", type=Path, default=REPO / ".gpu-bundle", help="folder for the bundle (replaced)")
    step.set_defaults(run=prepare)
    step = commands.add_parser("install", help="unpack a bundle and install padim-ray from this tree, offline")
    step.add_argument("bundle", type=Path, help="folder that prepare wrote")
    step.add_argument("target", type=Path, help="new folder for the environment (e.g. /tmp/padim)")
    step.set_defaults(run=install)
    step = commands.add_parser("image-env", help="rehearsal: only the GPU image's distributions, from a venv")
    step.add_argument("dir", type=Path, help="folder to (re)create")
    step.add_argument("--venv", type=Path, default=Path(sys.prefix), help="venv to link from (default: this one)")
    step.set_defaults(run=image_env)
    args = parser.parse_args()
    args.run(args)


if __name__ == "__main__":
    main()
