"""Faster/Mask R-CNN on the registry: torchvision checkpoint parity, the general form, defaults, errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision.models import detection as tvd
from torchvision.ops import FrozenBatchNorm2d

from backbones import WeightsError
from backbones.layers import FrozenBatchNorm2d as OurFrozenBN
from detection.models import build_model, check_build_args, load_detector_weights

SMALL = dict(min_size=128, max_size=160)


def _randomize_norms(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)


def _freeze_bn(module: nn.Module) -> None:
    """What torchvision does to the ResNet body of its pretrained v1 detectors."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features)
            for key in ("weight", "bias", "running_mean", "running_var"):
                getattr(frozen, key).copy_(getattr(child, key).detach())
            setattr(module, name, frozen)
        else:
            _freeze_bn(child)


@pytest.mark.parametrize(
    "tv_name, preset, frozen_body",
    [
        ("fasterrcnn_resnet50_fpn", "faster_rcnn_r50_fpn", True),
        pytest.param("fasterrcnn_resnet50_fpn_v2", "faster_rcnn_r50_fpn_v2", False, marks=pytest.mark.slow),
        ("maskrcnn_resnet50_fpn", "mask_rcnn_r50_fpn", True),
        pytest.param("maskrcnn_resnet50_fpn_v2", "mask_rcnn_r50_fpn_v2", False, marks=pytest.mark.slow),
    ],
)
def test_torchvision_checkpoint_parity(tmp_path, tv_name, preset, frozen_body):
    torch.manual_seed(0)
    reference = getattr(tvd, tv_name)(weights=None, weights_backbone=None, num_classes=91, **SMALL).eval()
    _randomize_norms(reference)
    if frozen_body:
        _freeze_bn(reference.backbone.body)
    path = tmp_path / f"{tv_name}.pth"
    torch.save(reference.state_dict(), path)

    ours = build_model(preset, num_classes=91, weights=str(path), **SMALL).eval()
    images = [torch.rand(3, 128, 150), torch.rand(3, 140, 128)]
    with torch.no_grad():
        expected, actual = reference(images), ours(images)
    for exp, act in zip(expected, actual, strict=True):
        assert exp.keys() == act.keys()
        assert len(exp["boxes"]) > 0
        for key in exp:
            torch.testing.assert_close(act[key], exp[key], atol=1e-4, rtol=1e-4)
    # and the other way: our checkpoint loads strictly into torchvision's model
    reference.load_state_dict(ours.state_dict(), strict=True)


@pytest.mark.parametrize(
    "name, options",
    [
        ("faster_rcnn", dict(backbone="resnet18", neck="fpn", head="v2", norm="gn")),
        ("mask_rcnn", dict(backbone="resnet18", neck="dc5", head="v1")),
        ("faster_rcnn", dict(backbone="timm/resnet18", neck="fpn", head="v1")),
        ("mask_rcnn_r18_fpn", dict(anchor_sizes=(8, 16, 32, 64, 128))),
    ],
)
def test_general_form_trains_and_predicts(name, options):
    torch.manual_seed(0)
    model = build_model(name, num_classes=4, min_size=64, max_size=64, fpn_channels=32, box_head_dim=64, **options)
    images = [torch.rand(3, 64, 64), torch.rand(3, 64, 64)]
    targets = [
        {
            "boxes": torch.tensor([[4.0, 6.0, 30.0, 40.0]]),
            "labels": torch.tensor([1]),
            "masks": torch.zeros(1, 64, 64, dtype=torch.uint8).index_fill_(1, torch.arange(6, 40), 1),
        }
        for _ in images
    ]
    model.train()
    losses = model(images, targets)
    expected = {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    if "mask" in name:
        expected.add("loss_mask")
    assert set(losses) == expected
    sum(losses.values()).backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable)
    model.eval()
    with torch.no_grad():
        predictions = model(images)
    assert len(predictions) == 2 and {"boxes", "labels", "scores"} <= set(predictions[0])


def _num_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_dc5_is_detectron2s_dc5():
    """Base-RCNN-DilatedC5.yaml: res5 dilated in every block, 2 fc of 1024, mask convs of 256, 12000/6000 proposals."""
    model = build_model("mask_rcnn_r50_dc5", num_classes=81)
    assert [(f.name, f.channels, f.stride) for f in model.backbone.feature_info] == [("c5", 2048, 16)]
    assert model.roi_heads.box_roi_pool.featmap_names == ["c5"]
    assert [block.conv2.dilation for block in model.backbone.layer4] == [(2, 2)] * 3  # the first block too
    assert [block.conv2.dilation for block in model.backbone.layer3] == [(1, 1)] * 6
    heads = model.roi_heads
    assert _num_parameters(heads.box_head) == (2048 * 7 * 7 * 1024 + 1024) + (1024 * 1024 + 1024)
    # 4 3x3 convs of 256 (the first reads C5's 2048 channels), then the 2x2 deconv of 256: about 6.75 M
    assert _num_parameters(heads.mask_head) == (2048 * 9 * 256 + 256) + 3 * (256 * 9 * 256 + 256)
    assert _num_parameters(heads.mask_predictor) == (256 * 4 * 256 + 256) + (256 * 81 + 81)
    assert heads.mask_roi_pool.output_size == (14, 14) and heads.box_roi_pool.output_size == (7, 7)
    model.rpn.train()
    assert (model.rpn.pre_nms_top_n(), model.rpn.post_nms_top_n()) == (12000, 2000)
    model.rpn.eval()
    assert (model.rpn.pre_nms_top_n(), model.rpn.post_nms_top_n()) == (6000, 1000)


def test_anchor_sizes_follow_the_pyramid_strides(backbone="resnet18"):
    tiny = dict(num_classes=3, fpn_channels=8, box_head_dim=8)
    fpn = build_model("faster_rcnn", backbone=backbone, neck="fpn", **tiny)
    assert [info.stride for info in fpn.backbone.feature_info] == [4, 8, 16, 32, 64]
    assert fpn.rpn.anchor_generator.sizes == ((32,), (64,), (128,), (256,), (512,))  # torchvision's, 8x each stride
    dc5 = build_model("faster_rcnn", backbone=backbone, neck="dc5", **tiny)
    assert dc5.rpn.anchor_generator.sizes == ((32, 64, 128, 256, 512),)  # detectron2's DC5: all on the one map
    given = build_model("faster_rcnn", backbone=backbone, neck="fpn", anchor_sizes=[8, 16, 32, 64, 128], **tiny)
    assert given.rpn.anchor_generator.sizes == ((8,), (16,), (32,), (64,), (128,))


def test_weights_tag_gives_num_classes_as_torchvisions_weights():
    from backbones.weights import weights_from_checkpoint

    tiny = dict(fpn_channels=8, box_head_dim=8)
    with weights_from_checkpoint():  # the architecture only: nothing is fetched
        model = build_model("faster_rcnn_r18_fpn", weights="faster_rcnn_r50_fpn.tv_coco", **tiny)
    assert model.roi_heads.box_predictor.cls_score.out_features == 91
    with pytest.raises(ValueError, match=r"num_classes=5, but the weights 'faster_rcnn_r50_fpn.tv_coco' .*=91"):
        build_model("faster_rcnn_r18_fpn", num_classes=5, weights="faster_rcnn_r50_fpn.tv_coco", **tiny)
    with pytest.raises(ValueError, match=r"not given and weights=None is no tag of detection.weights_table"):
        build_model("faster_rcnn_r18_fpn", **tiny)
    with pytest.raises(ValueError, match="not given and fresh_heads trains the class layers anew"):
        build_model("faster_rcnn_r18_fpn", weights="faster_rcnn_r50_fpn.tv_coco", fresh_heads=True, **tiny)


def test_dc5_proposal_counts_yield_to_the_users():
    model = build_model("faster_rcnn", backbone="resnet18", neck="dc5", num_classes=3, rpn_pre_nms_top_n_test=300)
    model.eval()
    assert (model.rpn.pre_nms_top_n(), model.rpn.post_nms_top_n()) == (300, 1000)
    fpn = build_model("faster_rcnn_r18_fpn", num_classes=3).eval()  # the FPN keeps torchvision's per-level counts
    assert (fpn.rpn.pre_nms_top_n(), fpn.rpn.post_nms_top_n()) == (1000, 1000)


def test_pretrained_backbone_defaults_to_frozen_bn_and_stem(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "resnet18.pth"
    torch.save(__import__("torchvision").models.resnet18().state_dict(), path)
    model = build_model("faster_rcnn_r18_fpn", num_classes=3, backbone_weights=str(path))
    body = model.backbone.body
    assert isinstance(body.bn1, OurFrozenBN)
    assert not any(p.requires_grad for p in body.conv1.parameters())
    assert not any(p.requires_grad for p in body.layer1.parameters())
    assert all(p.requires_grad for p in body.layer2.parameters())

    scratch = build_model("faster_rcnn_r18_fpn", num_classes=3)
    assert isinstance(scratch.backbone.body.bn1, nn.BatchNorm2d)
    assert all(p.requires_grad for p in scratch.parameters())


def test_resize_in_training_switch():
    assert build_model("faster_rcnn_r18_fpn", num_classes=3).transform._skip_resize is False
    assert build_model("faster_rcnn_r18_fpn", num_classes=3, resize_in_training=False).transform._skip_resize


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(name="retina_net"), "retina_net"),
        (dict(name="faster_rcnn", neck="bifpn"), "bifpn"),
        (dict(name="faster_rcnn", head="v3"), "v3"),
        (dict(name="faster_rcnn", backbone="resnet5"), "resnet50"),
        (dict(name="faster_rcnn_r18_fpn", anchor_sizes=(8, 16)), "anchor_sizes"),
    ],
)
def test_bad_settings_name_the_value(kwargs, message):
    with pytest.raises((ValueError, KeyError), match=message):
        build_model(num_classes=3, **kwargs)


def test_checkpoint_with_other_classes(tmp_path):
    torch.manual_seed(0)
    source = build_model("mask_rcnn_r18_fpn", num_classes=91)
    path = tmp_path / "coco.pth"
    torch.save({"state_dict": {f"model.{k}": v for k, v in source.state_dict().items()}}, path)
    target = build_model("mask_rcnn_r18_fpn", num_classes=4)
    with pytest.raises(WeightsError, match=r"roi_heads\.box_predictor\.cls_score\.weight.*\(91, 1024\).*\(4, 1024\)"):
        load_detector_weights(target, str(path))
    load_detector_weights(target, str(path), fresh_heads=True)  # fine-tuning: everything but the heads
    torch.testing.assert_close(target.backbone.body.conv1.weight, source.backbone.body.conv1.weight)
    torch.testing.assert_close(target.rpn.head.cls_logits.weight, source.rpn.head.cls_logits.weight)


@pytest.mark.parametrize(
    "options, key, closest, where",
    [
        (dict(min_sise=128), "'min_sise'", "min_size", "TORCHVISION_OPTIONS"),  # torchvision would swallow it
        (dict(fpn_chanels=64), "'fpn_chanels'", "fpn_channels", "TORCHVISION_OPTIONS"),
        (dict(backbone_kwargs=dict(drop_path_rat=0.1)), "'drop_path_rat'", "drop_path_rate", "backbone_options"),
    ],
)
def test_unknown_options_name_the_closest(options, key, closest, where):
    with pytest.raises(ValueError) as error:
        build_model("mask_rcnn_r18_fpn", num_classes=3, **options)
    assert f"unknown option {key}; closest: {closest}" in str(error.value) and where in str(error.value)
    check_build_args("mask_rcnn_r18_fpn", dict(min_size=128, backbone_kwargs=dict(drop_path_rate=0.1)))  # valid


def test_misspelt_preset_gives_one_line_with_the_closest():
    with pytest.raises(ValueError) as error:
        build_model("mask_rcnn_r18_fnp", num_classes=3)
    message = str(error.value)
    assert message.startswith("unknown detection model 'mask_rcnn_r18_fnp'; closest: mask_rcnn_r18_fpn")
    assert "\n" not in message and "detection.PRESETS" in message
