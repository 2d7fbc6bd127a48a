"""fuse_for_inference: the same outputs with the batch norms folded into the convs before them."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torchvision.models import resnet18 as tv_resnet18
from torchvision.ops import FrozenBatchNorm2d

import detection
import segmentation.models
from backbones import create_backbone, create_model, fuse_for_inference
from backbones.fusion import fold_batch_norms

NORM_TYPES = (nn.BatchNorm2d, nn.SyncBatchNorm, FrozenBatchNorm2d)
TINY_DETECTOR = dict(min_size=128, max_size=128, rpn_post_nms_top_n_test=200, box_detections_per_img=20)
RTOL = 1e-4  # of the whole tensor's norm: single elements near zero carry the rounding of a deep net


pytestmark = pytest.mark.filterwarnings("ignore:.*freeze randomly initialised weights")


def randomize_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random statistics and affine parameters, so that folding is not the identity."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, NORM_TYPES):
                size = module.running_mean.numel()
                module.running_mean.copy_(torch.rand(size, generator=generator) - 0.5)
                module.running_var.copy_(torch.rand(size, generator=generator) + 0.5)
                module.weight.copy_(torch.rand(size, generator=generator) + 0.5)
                module.bias.copy_(torch.rand(size, generator=generator) - 0.5)
    return model


def fused_pair(model: nn.Module, **kwargs) -> tuple[nn.Module, nn.Module]:
    reference = randomize_norms(model).eval()
    return reference, fuse_for_inference(copy.deepcopy(reference), **kwargs)


def norms_left(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, NORM_TYPES)]


def assert_close(actual, expected):
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    actual, expected = actual.double(), expected.double()
    error = (actual - expected).norm() / expected.norm().clamp(min=1e-12)
    assert error < RTOL, f"relative error {error:.2e} >= {RTOL}"


@pytest.mark.parametrize(
    "name, norm",
    [("resnet18", "bn"), ("resnet50", "frozen_bn"), ("resnet50d", "bn"), ("resnetv2_50", "bn")],
    ids=["r18-bn", "r50-frozen_bn", "r50d-deep_stem", "r50v2-preact"],
)
def test_backbone_features_match(name, norm):
    torch.manual_seed(0)
    reference, fused = fused_pair(create_backbone(name, norm=norm, output_stride=16))
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        expected, actual = reference(x), fused(x)
    assert list(actual) == list(expected)
    for key in expected:
        assert actual[key].is_contiguous(memory_format=torch.channels_last)
        assert_close(actual[key], expected[key])


def test_no_norm_left_after_a_conv():
    torch.manual_seed(0)
    assert norms_left(fuse_for_inference(create_backbone("resnet50d").eval())) == []
    # Pre-activation blocks: bn1 reads the block input and `norm` the last sum; bn2 and bn3 follow convs.
    left = norms_left(fuse_for_inference(create_backbone("resnetv2_50").eval()))
    assert left and all(name.endswith(".bn1") or name == "norm" for name in left)
    assert not any(name.endswith((".bn2", ".bn3")) for name in left)


def test_classifiers_ours_and_torchvisions():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 64)
    for model in (create_model("resnet18", num_classes=10), tv_resnet18(num_classes=10)):
        reference, fused = fused_pair(model, channels_last=False)
        assert norms_left(fused) == []
        with torch.inference_mode():
            assert_close(fused(x), reference(x))


def test_training_mode_norms_are_refused_and_frozen_ones_folded():
    model = create_backbone("resnet18")  # a fresh model is in training mode
    message = r"batch norm\(s\) are in training mode \(bn1, layer1\.0\.bn1.*model\.eval\(\)"
    with pytest.raises(ValueError, match=message):
        fuse_for_inference(model)
    assert norms_left(model) and model.training  # refused before changing anything
    frozen = randomize_norms(create_backbone("resnet18", frozen_stages=4)).train()  # frozen BN stays in eval
    reference = copy.deepcopy(frozen).eval()
    assert len(fold_batch_norms(frozen)) == len(norms_left(reference)) == 20
    with torch.inference_mode():
        x = torch.randn(1, 3, 32, 32)
        assert_close(frozen.eval()(x)["c5"], reference(x)["c5"])


def test_norm_without_running_stats_is_left_alone():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False)).eval()
    assert fold_batch_norms(model) == [] and isinstance(model[1], nn.BatchNorm2d)


def test_timm_norm_act_keeps_its_activation_and_unknown_norm_subclasses_stay():
    from timm.layers import BatchNormAct2d, FrozenBatchNormAct2d

    class ScaledNorm(nn.BatchNorm2d):  # a subclass whose forward does more than the affine map
        def forward(self, x):
            return 2 * super().forward(x)

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), BatchNormAct2d(8),  # BN then ReLU
        nn.Conv2d(8, 8, 3, padding=1), FrozenBatchNormAct2d(8, act_layer=nn.GELU),
        nn.Conv2d(8, 8, 1), ScaledNorm(8),
    )  # fmt: skip
    with torch.no_grad():  # randomize_norms knows torchvision's frozen norm, not timm's
        (
            model[3].running_mean.uniform_(-0.5, 0.5),
            model[3].running_var.uniform_(0.5, 1.5),
            model[3].weight.uniform_(0.5, 1.5),
        )
    reference, fused = fused_pair(model)
    assert isinstance(fused[1], nn.Identity) and fused[0].activation == "relu"  # the ReLU went into the conv
    assert isinstance(fused[3], nn.GELU) and isinstance(fused[5], ScaledNorm)
    x = torch.randn(2, 3, 16, 16)
    with torch.inference_mode():
        assert_close(fused(x), reference(x))


def _detections(model, images):
    with torch.inference_mode():
        return model([image.clone() for image in images])


@pytest.mark.parametrize(
    "name, head", [("faster_rcnn_r18_fpn", "v1"), ("mask_rcnn_r18_fpn", "v1"), ("mask_rcnn_r18_fpn", "v2")]
)
def test_detectors_match(name, head):
    torch.manual_seed(0)
    model = detection.build_model(name, num_classes=4, head=head, **TINY_DETECTOR)
    reference, fused = fused_pair(model)
    assert norms_left(fused) == []  # v2: the FPN's and the heads' BN too
    generator = torch.Generator().manual_seed(1)
    images = [torch.rand(3, 128, 128, generator=generator), torch.rand(3, 96, 128, generator=generator)]
    expected, actual = _detections(reference, images), _detections(fused, images)
    assert sum(len(e["boxes"]) for e in expected) > 0  # something to compare
    for e, a in zip(expected, actual, strict=True):
        assert e.keys() == a.keys()
        for key in e:
            assert_close(a[key], e[key])


@pytest.mark.parametrize(
    "name, options", [("deeplabv3_r18", {"aux_loss": True}), ("deeplabv3plus_r18", {"separable": True})]
)
def test_deeplab_matches(name, options):
    torch.manual_seed(0)
    model = segmentation.models.build_model(name, num_classes=4, output_stride=16, **options)
    reference, fused = fused_pair(model)
    assert norms_left(fused) == []  # ASPP branches, image pooling, projection, decoder, FCN head
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        expected, actual = reference(x), fused(x)
    for key in expected:
        assert_close(actual[key], expected[key])


@pytest.mark.slow  # inductor compiles C++ kernels: tens of seconds on 2 cores
def test_compiled_backbone_and_fpn_match_eager():
    from backbones.fusion import prepare_for_inference

    torch.manual_seed(0)
    model = detection.build_model("faster_rcnn_r18_fpn", num_classes=4, **TINY_DETECTOR)
    reference = randomize_norms(model).eval()
    compiled = prepare_for_inference(copy.deepcopy(reference), compile_backbone=True)
    assert isinstance(compiled.backbone, torch._dynamo.eval_frame.OptimizedModule)
    x = torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected, actual = reference.backbone(x), compiled.backbone(x.contiguous(memory_format=torch.channels_last))
    assert list(actual) == list(expected)  # p2..p6, the body and FPN both compiled
    for name in expected:
        assert_close(actual[name].contiguous(), expected[name])
    images = [x[0], x[1, :, :96]]  # the whole detector runs with the compiled backbone, heads eager
    for e, a in zip(_detections(reference, images), _detections(compiled, images), strict=True):
        assert e.keys() == a.keys()
        for key in e:
            assert_close(a[key], e[key])
