"""timm models as backbones: the norm policy and frozen stages on the built model, in the detectors and DeepLab."""

from __future__ import annotations

import re
import socket

import pytest
import timm
import torch
from timm.layers import BatchNormAct2d, FrozenBatchNormAct2d, GroupNormAct, SyncBatchNormAct
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import backbones.weights
from backbones import WeightsError, convert_sync_batchnorm, create_backbone, create_model
from backbones.layers import FrozenBatchNorm2d, replace_batch_norms

# The stem and the four stages of each model, as prefixes of its classifier's parameter names (written by hand
# from the models' code, not from the backbone's own stage search).
STAGES = {
    "resnet18": (("conv1.", "bn1."), ("layer1.",), ("layer2.",), ("layer3.",), ("layer4.",)),
    "convnext_atto": (("stem.",), ("stages.0.",), ("stages.1.",), ("stages.2.",), ("stages.3.",)),
    "efficientnet_b0": (
        ("conv_stem.", "bn1.", "blocks.0."),
        ("blocks.1.",),
        ("blocks.2.",),
        ("blocks.3.", "blocks.4."),
        ("blocks.5.", "blocks.6."),
    ),
    "regnetx_002": (("stem.",), ("s1.",), ("s2.",), ("s3.",), ("s4.",)),
}
NORMS = ("bn", "frozen_bn", "gn", "sync_bn")
# By default one combination per model, each norm and each frozen_stages once (a step costs seconds on a CPU);
# the other 44 of the 48 are `slow`. The fused norm + activation layers are also checked on their own below.
DEFAULT = {
    ("resnet18", "frozen_bn", 1), ("convnext_atto", "bn", -1),
    ("efficientnet_b0", "sync_bn", 1), ("regnetx_002", "gn", 0),
}  # fmt: skip
COMBOS = [
    pytest.param(name, norm, frozen, marks=() if (name, norm, frozen) in DEFAULT else pytest.mark.slow)
    for name in STAGES
    for norm in NORMS
    for frozen in (-1, 0, 1)
]
random_frozen = pytest.mark.filterwarnings("ignore:.*freeze randomly initialised:UserWarning")
no_batch_norm = pytest.mark.filterwarnings("ignore:timm model .* has no batch norm:UserWarning")


def expected_trainable(name: str, norm: str, frozen_stages: int) -> tuple[int, int]:
    """(trainable, total) parameters of the backbone by the policy, counted on timm's classifier."""
    with torch.device("meta"):
        reference = timm.create_model(name)
    batch_norm_params = {
        f"{module_name}.{param_name}"
        for module_name, module in reference.named_modules()
        if isinstance(module, _BatchNorm)
        for param_name, _ in module.named_parameters()
    }
    trainable = total = 0
    for stage, prefixes in enumerate(STAGES[name]):
        for param_name, param in reference.named_parameters():
            if param_name.startswith(prefixes):
                frozen_bn = norm == "frozen_bn" and param_name in batch_norm_params  # buffers, no parameters
                total += 0 if frozen_bn else param.numel()
                trainable += 0 if (frozen_bn or stage <= frozen_stages) else param.numel()
    return trainable, total


def check_norm_policy(body: nn.Module, name: str, norm: str, frozen_stages: int) -> None:
    params = list(body.parameters())
    counts = sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
    assert counts == expected_trainable(name, norm, frozen_stages)
    body.train()
    batch_norms = [m for m in body.modules() if isinstance(m, _BatchNorm)]
    for module in batch_norms:
        frozen = not module.weight.requires_grad
        assert module.training != frozen, module  # frozen batch norms keep their statistics in training
    if norm == "frozen_bn":
        frozen_norms = [m for m in body.modules() if isinstance(m, (FrozenBatchNorm2d, FrozenBatchNormAct2d))]
        assert not batch_norms and bool(frozen_norms) == (name != "convnext_atto")
    elif norm == "sync_bn":
        assert all(isinstance(m, nn.SyncBatchNorm) for m in batch_norms)
    elif norm == "gn":
        assert not batch_norms


def check_step(model: nn.Module, loss: torch.Tensor) -> None:
    loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not no_grad, no_grad[:10]
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


@random_frozen
@no_batch_norm
@pytest.mark.parametrize(("name", "norm", "frozen_stages"), COMBOS)
def test_timm_backbone_trains_in_faster_rcnn_and_deeplab(name, norm, frozen_stages):
    from detection import build_model as build_detector
    from segmentation import build_model as build_segmenter

    torch.manual_seed(0)
    images = torch.rand(2, 3, 64, 64)
    detector = build_detector(
        "faster_rcnn", num_classes=3, backbone=f"timm/{name}", norm=norm, frozen_stages=frozen_stages,
        fpn_channels=16, box_head_dim=32, min_size=64, max_size=64,
    )  # fmt: skip
    check_norm_policy(detector.backbone.body, name, norm, frozen_stages)
    targets = [{"boxes": torch.tensor([[4.0, 6.0, 40.0, 50.0]]), "labels": torch.tensor([1])} for _ in images]
    check_step(detector, sum(detector.train()(list(images), targets).values()))

    segmenter = build_segmenter(
        "deeplabv3plus", num_classes=3, backbone=f"timm/{name}", norm=norm, frozen_stages=frozen_stages,
        output_stride=16, aspp_channels=16, decoder_channels=16,
    )  # fmt: skip
    check_norm_policy(segmenter.backbone, name, norm, frozen_stages)
    logits = segmenter.train()(images)["out"]
    check_step(segmenter, nn.functional.cross_entropy(logits, torch.randint(0, 3, (2, 64, 64))))


@pytest.mark.parametrize("name", ["efficientnet_b0", "regnetx_002"])
def test_sync_batchnorm_keeps_timm_norm_act_layers(name):
    torch.manual_seed(0)
    backbone = create_backbone(f"timm/{name}").eval()
    with torch.no_grad():  # non-trivial statistics, so that a lost activation shows
        for module in backbone.modules():
            if isinstance(module, _BatchNorm):
                module.running_mean.uniform_(-1, 1)
                module.running_var.uniform_(0.5, 2)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        before = backbone(x)
        norm_acts = sum(isinstance(m, BatchNormAct2d) for m in backbone.modules())
        converted = convert_sync_batchnorm(backbone).eval()
        after = converted(x)
    assert sum(isinstance(m, SyncBatchNormAct) for m in converted.modules()) == norm_acts > 0
    for key in before:
        torch.testing.assert_close(after[key], before[key])


@no_batch_norm
def test_norm_policy_keeps_activations_of_fused_layers():
    torch.manual_seed(0)
    model = timm.create_model("regnetx_002", features_only=True).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
        frozen = replace_batch_norms(model, "frozen_bn")  # timm's converter, same statistics: same outputs
        for a, b in zip(frozen(x), expected, strict=True):
            torch.testing.assert_close(a, b)
    model = timm.create_model("regnetx_002", features_only=True)
    activations = [type(m.act) for m in model.modules() if isinstance(m, BatchNormAct2d)]
    group_norms = [m for m in replace_batch_norms(model, "gn").modules() if isinstance(m, GroupNormAct)]
    assert [type(m.act) for m in group_norms] == activations and nn.ReLU in activations


@random_frozen
@pytest.mark.parametrize("name", ["resnet18", "convnext_atto"])  # stride 2 first, or stride 4 first
@pytest.mark.parametrize("output_stride", [8, 16, 32])
def test_strides_are_timms_own_reductions(name, output_stride):
    backbone = create_backbone(f"timm/{name}", out_indices=(1, 2, 3, 4), output_stride=output_stride)
    assert [info.stride for info in backbone.feature_info] == backbone.model.feature_info.reduction()
    assert [info.stride for info in backbone.feature_info] == [min(s, output_stride) for s in (4, 8, 16, 32)]
    with torch.no_grad():  # and they are the strides of what it returns
        features = backbone.eval()(torch.randn(1, 3, 64, 64))
    assert [64 // f.shape[-1] for f in features.values()] == [info.stride for info in backbone.feature_info]


def test_frozen_stages_out_of_range_is_an_error():
    with pytest.raises(ValueError, match=r"frozen_stages=5; choose -1 \(none\), 0 \(stem\) up to 4"):
        create_backbone("timm/resnet18", frozen_stages=5)


@random_frozen
def test_unknown_stage_modules_are_an_error_not_a_silent_freeze(monkeypatch):
    import backbones.timm_backbone as timm_backbone

    monkeypatch.setattr(timm_backbone, "_stage_modules", lambda name: {i: (i, f"nowhere{i}") for i in range(5)})
    with pytest.raises(ValueError, match=r"cannot find the stages of timm model 'resnet18'.*'nowhere1'"):
        create_backbone("timm/resnet18", frozen_stages=1)


def test_mistyped_timm_name_suggests_the_closest():
    with pytest.raises(KeyError, match=r"unknown timm model 'resnet5O'; closest: timm/resnet50"):
        create_backbone("timm/resnet5O")
    with pytest.raises(KeyError, match="closest: timm/convnext_atto"):
        create_model("timm/convnext_atoo")


def test_timm_weights_offline_is_one_line_saying_what_to_fetch(monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("network is disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", offline)
    monkeypatch.setattr(socket, "getaddrinfo", offline)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no retries: the hub library reads its cache only
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", "/nonexistent-hub-cache")
    with pytest.raises(WeightsError) as error:
        create_backbone("timm/resnet18", weights="timm")
    message = str(error.value)
    assert "\n" not in message and "resnet18" in message
    assert "https://huggingface.co/timm/resnet18.a1_in1k/resolve/main/model.safetensors" in message
    assert "weights='/path/to/model.safetensors'" in message


def test_safetensors_file_as_backbone_weights(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    source = timm.create_model("resnet18")
    save_file(source.state_dict(), tmp_path / "model.safetensors")
    backbone = create_backbone("timm/resnet18", weights=str(tmp_path / "model.safetensors"))
    assert torch.equal(backbone.model.layer3[0].conv1.weight, source.layer3[0].conv1.weight)
    (tmp_path / "broken.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(WeightsError, match=re.escape("broken.safetensors")):
        backbones.weights.read_state_dict(tmp_path / "broken.safetensors")


def test_saved_timm_state_dict_as_detector_backbone_weights(tmp_path):
    from detection import build_model as build_detector

    torch.manual_seed(0)
    source = timm.create_model("resnet18")
    torch.save(source.state_dict(), tmp_path / "resnet18.pth")
    detector = build_detector(
        "faster_rcnn", num_classes=3, backbone="timm/resnet18", backbone_weights=str(tmp_path / "resnet18.pth")
    )
    body = detector.backbone.body.model
    assert torch.equal(body.layer2[1].conv2.weight, source.layer2[1].conv2.weight)
    # the detectors' default with pretrained weights: frozen BN statistics and a frozen stem and first stage
    assert isinstance(body.bn1, FrozenBatchNorm2d) and torch.equal(body.bn1.running_var, source.bn1.running_var)
    assert not body.layer1[0].conv1.weight.requires_grad and body.layer2[0].conv1.weight.requires_grad
    params = list(detector.backbone.body.parameters())
    assert sum(p.numel() for p in params if p.requires_grad) == expected_trainable("resnet18", "frozen_bn", 1)[0]
