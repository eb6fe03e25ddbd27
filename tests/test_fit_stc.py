"""`fit stc`'s arguments: one scene or many, and the default --out."""

from __future__ import annotations

import os

import pytest

from padim_ray.errors import PadimError
from padim_ray.fit_stc import StcFit


def test_one_scene_gets_the_default_out_of_its_backbone(stc_root):
    stc = StcFit.select(stc_root, "01", None, None, None, "resnet18")
    assert stc == StcFit(stc_root, ["01"], os.path.join("models", "stc_{scene}_resnet18"), None, many=False)


@pytest.mark.parametrize("scene", ["all", "01,"])
def test_a_list_or_all_is_a_many_scene_job(stc_root, scene):
    stc = StcFit.select(stc_root, scene, None, "m/{scene}", "c/{scene}", "resnet18")
    assert stc.many and stc.scenes == ["01"] and (stc.out, stc.checkpoint_dir) == ("m/{scene}", "c/{scene}")


@pytest.mark.parametrize("scene, paths", [(None, None), ("01", ["a.avi"])])
def test_fit_stc_takes_a_scene_and_no_paths(stc_root, scene, paths):
    with pytest.raises(PadimError, match=r"fit stc takes --scene \(e.g. --scene 01, 01,04 or all\) and no PATHS"):
        StcFit.select(stc_root, scene, paths, None, None, "resnet18")
