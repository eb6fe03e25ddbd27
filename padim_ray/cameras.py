"""What `padim-ray watch` watches: cameras from its SOURCE arguments and from a camera list file.

A camera list file is TOML, one table per camera under `cameras`, named by its key:

    [cameras.gate]
    source = "rtsp://10.0.0.5:554/stream1"
    model = "models/gate"      # optional: else watch's MODEL argument
    threshold = "2/h"          # optional: else watch's --threshold (auto, a false-event budget or a raw score)

Python's own tomllib reads it (no dependency). Names are checked to be unique across the file and the
arguments, and every file source is checked as readers.camera_names checks the arguments', before any
cluster work.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

from padim_ray.errors import PadimError
from padim_ray.readers import camera_names, check_source

CAMERA_KEYS = {"source", "model", "threshold"}
NAME = re.compile(r"[A-Za-z0-9_.-]+")


class CameraListError(PadimError):
    """A camera list file that cannot be used."""


@dataclass(frozen=True)
class CameraSpec:
    """One camera to watch: its name (in events, snapshots and status lines), source, model, and threshold (None: watch's)."""

    name: str
    source: str
    model: str
    threshold: str | None = None


def watched_cameras(model: str | None, sources: list[str], cameras_file: str | Path | None = None) -> list[CameraSpec]:
    """The cameras of the SOURCE arguments (watched with `model`), then those of `cameras_file`; at least one."""
    if sources and model is None:
        raise CameraListError("watch needs a MODEL before its SOURCEs")
    cameras = [CameraSpec(name, source, model) for name, source in camera_names(list(sources))]
    if cameras_file is not None:
        cameras += read_camera_list(cameras_file, model)
    if not cameras:
        raise CameraListError("nothing to watch: pass MODEL SOURCE... or --cameras FILE")
    names = [camera.name for camera in cameras]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise CameraListError(f"camera {repeated[0]} is named twice ({cameras_file} and the arguments); rename one")
    return cameras


def read_camera_list(path: str | Path, default_model: str | None) -> list[CameraSpec]:
    """The cameras of a camera list file (see the module's docstring), each checked; CameraListError names the file and the fix."""
    path = Path(path)
    try:
        document = tomllib.loads(path.read_text())
    except OSError as err:
        raise CameraListError(f"camera list {path} cannot be read ({err.strerror or err}); pass an existing TOML file to --cameras") from err
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise CameraListError(f"camera list {path} is not TOML ({err}); see `padim-ray watch --help` for its layout") from err
    tables = document.get("cameras")
    if not isinstance(tables, dict) or not tables or set(document) != {"cameras"}:
        raise CameraListError(f"camera list {path} must hold [cameras.NAME] tables and nothing else, e.g. [cameras.gate] source = \"rtsp://...\"")
    return [_camera(path, name, table, default_model) for name, table in tables.items()]


def _camera(path: Path, name: str, table, default_model: str | None) -> CameraSpec:
    where = f"camera list {path}, camera {name}"
    if not isinstance(table, dict):
        raise CameraListError(f"{where}: expected a table with source = \"...\", got {table!r}")
    if not NAME.fullmatch(name):
        raise CameraListError(f"{where}: a name holds only letters, digits, '_', '.' and '-'")
    unknown = sorted(set(table) - CAMERA_KEYS)
    if unknown:
        raise CameraListError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(sorted(CAMERA_KEYS))})")
    values = {key: table.get(key) for key in CAMERA_KEYS}
    for key, value in values.items():
        if value is not None and not (isinstance(value, str) and value):
            raise CameraListError(f"{where}: {key} must be a non-empty string, got {value!r}")
    if values["source"] is None:
        raise CameraListError(f"{where}: no source (an rtsp://, http(s)://, udp:// URL or a video file)")
    model = values["model"] or default_model
    if model is None:
        raise CameraListError(f"{where}: no model; give it model = \"PATH\" or pass watch a MODEL argument")
    check_source(values["source"])
    return CameraSpec(name, values["source"], model, values["threshold"])
