"""`padim-ray fit stc`: one model per ShanghaiTech scene, for one scene or many in one job (scenes.py)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from padim_ray.config import ClusterConfig, ModelConfig
from padim_ray.errors import PadimError
from padim_ray.files import Location
from padim_ray.fit import FitResult, fit_model
from padim_ray.stc import scene_path, scene_videos, select_scenes, training_scenes
from padim_ray.video import InputPolicy

DEFAULT_OUT = os.path.join("models", "stc_{scene}_{backbone}")  # --out of `fit stc` when none is given


@dataclass(frozen=True)
class StcFit:
    """The scenes `fit stc --scene TEXT` fits and where their models go."""

    root: str | Path | Location
    scenes: list[str]
    out: str  # may contain {scene}, replaced by each scene's id
    checkpoint_dir: str | None  # may contain {scene}; None: beside each model
    many: bool  # a list (01,04) or all: one job over the scenes with a summary table (scenes.py)

    @classmethod
    def select(
        cls, root: str | Path | Location, scene: str | None, paths: list[str] | None, out: str | None, checkpoint_dir: str | None, backbone: str,
    ) -> StcFit:
        """Check `fit stc`'s arguments (a --scene, no PATHS), default --out, and list the scenes of `scene`."""
        if not scene or paths:
            raise PadimError("fit stc takes --scene (e.g. --scene 01, 01,04 or all) and no PATHS")
        if out is None:
            out = DEFAULT_OUT.replace("{backbone}", backbone)
        if scene == "all" or "," in scene:
            scenes = select_scenes(scene, training_scenes(root) if scene.strip() == "all" else [])
            return cls(root, scenes, out, checkpoint_dir, many=True)
        return cls(root, [scene], out, checkpoint_dir, many=False)


def fit_stc_scene(
    stc: StcFit,
    model: ModelConfig = ModelConfig(),
    cluster: ClusterConfig = ClusterConfig(),
    overwrite: bool = False,
    address: str | None = None,
    input_policy: InputPolicy = InputPolicy(),
    calibration: float = 0.0,
) -> FitResult:
    """Fit the one scene of `stc` (not `many`) on its training videos, as `fit_model` fits any inputs."""
    [scene] = stc.scenes
    inputs = scene_videos(stc.root, scene)
    checkpoint_dir = stc.checkpoint_dir and scene_path(stc.checkpoint_dir, scene)
    return fit_model(
        inputs, scene_path(stc.out, scene), model, cluster, overwrite=overwrite, address=address, checkpoint_dir=checkpoint_dir,
        input_policy=input_policy, calibration=calibration,
    )
