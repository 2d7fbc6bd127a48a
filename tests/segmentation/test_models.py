import re

import pytest
import torch
from torch import nn
from torchvision.models.segmentation import deeplabv3_resnet50, deeplabv3_resnet101

from backbones import WeightsError
from segmentation.heads import SeparableConv2d, atrous_rates_for
from segmentation.models import PRESETS, DeepLabV3Plus, build_model

NUM_CLASSES = 5


def randomize_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random BN statistics and affine parameters, so that a layout mix-up cannot hide behind 0/1 defaults."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            size = module.num_features
            module.running_mean.copy_(torch.rand(size, generator=generator) - 0.5)
            module.running_var.copy_(torch.rand(size, generator=generator) + 0.5)
            module.weight.data.copy_(torch.rand(size, generator=generator) + 0.5)
            module.bias.data.copy_(torch.rand(size, generator=generator) - 0.5)
    return model


def torchvision_checkpoints(builder, folder):
    """A torchvision model with aux head and random BN statistics, saved with and without its aux keys."""
    torch.manual_seed(0)
    reference = randomize_norms(builder(weights=None, weights_backbone=None, num_classes=NUM_CLASSES, aux_loss=True))
    state_dict = reference.state_dict()
    paths = {True: folder / "with_aux.pth", False: folder / "without_aux.pth"}
    torch.save(state_dict, paths[True])
    torch.save({k: v for k, v in state_dict.items() if not k.startswith("aux_classifier.")}, paths[False])
    return reference.eval(), {aux: str(path) for aux, path in paths.items()}


@pytest.fixture(scope="module")
def r50_reference(tmp_path_factory):
    return torchvision_checkpoints(deeplabv3_resnet50, tmp_path_factory.mktemp("r50"))


@pytest.fixture(scope="module")
def r101_reference(tmp_path_factory):
    return torchvision_checkpoints(deeplabv3_resnet101, tmp_path_factory.mktemp("r101"))


def assert_same_outputs(reference, ours, keys):
    x = torch.randn(1, 3, 65, 65, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, actual = reference(x), ours(x)
    assert list(actual) == keys
    for key in keys:
        assert actual[key].shape == (1, NUM_CLASSES, 65, 65)
        assert (actual[key] - expected[key]).abs().max() < 1e-4, key


@pytest.mark.parametrize("aux_loss", [False, True])
def test_deeplabv3_r50_matches_torchvision(r50_reference, aux_loss):
    reference, paths = r50_reference
    ours = build_model("deeplabv3_r50", num_classes=NUM_CLASSES, aux_loss=aux_loss, weights=paths[aux_loss]).eval()
    assert_same_outputs(reference, ours, ["out", "aux"] if aux_loss else ["out"])


def test_aux_checkpoint_loads_into_model_without_aux(r50_reference):
    reference, paths = r50_reference
    ours = build_model("deeplabv3_r50", num_classes=NUM_CLASSES, weights=paths[True]).eval()
    assert_same_outputs(reference, ours, ["out"])


@pytest.mark.parametrize("aux_loss", [False, True])
def test_deeplabv3_r101_matches_torchvision(r101_reference, aux_loss):
    reference, paths = r101_reference
    ours = build_model("deeplabv3_r101", num_classes=NUM_CLASSES, aux_loss=aux_loss, weights=paths[aux_loss]).eval()
    assert_same_outputs(reference, ours, ["out", "aux"] if aux_loss else ["out"])


def test_other_num_classes_fails_unless_fresh_heads(tmp_path):
    path = tmp_path / "five_classes.pth"
    torch.save(build_model("deeplabv3_r18", num_classes=NUM_CLASSES, aux_loss=True).state_dict(), path)
    with pytest.raises(WeightsError, match=re.escape("classifier.4.weight")):
        build_model("deeplabv3_r18", num_classes=3, aux_loss=True, weights=str(path))
    model = build_model("deeplabv3_r18", num_classes=3, aux_loss=True, weights=str(path), fresh_heads=True)
    assert model.classifier[4].out_channels == 3 and model.aux_classifier[4].out_channels == 3


@pytest.mark.parametrize("name", ["deeplabv3_r18", "deeplabv3plus_r18"])
@pytest.mark.parametrize("output_stride", [8, 16])
def test_output_shapes(name, output_stride):
    model = build_model(name, num_classes=3, output_stride=output_stride, aux_loss=True).eval()
    assert model.backbone.output_shape()["c5"].stride == output_stride
    with torch.no_grad():
        outputs = model(torch.randn(2, 3, 70, 50))
    assert {k: tuple(v.shape) for k, v in outputs.items()} == {"out": (2, 3, 70, 50), "aux": (2, 3, 70, 50)}


def test_default_atrous_rates_follow_output_stride():
    assert atrous_rates_for(8) == (12, 24, 36) and atrous_rates_for(16) == (6, 12, 18)
    model = build_model("deeplabv3plus_r18", num_classes=3, output_stride=16)
    assert [branch[0].dilation for branch in model.classifier.aspp.convs[1:-1]] == [(6, 6), (12, 12), (18, 18)]
    model = build_model("deeplabv3_r18", num_classes=3, atrous_rates=(2, 4))
    assert [branch[0].dilation for branch in model.classifier[0].convs[1:-1]] == [(2, 2), (4, 4)]


# The rates before they were read from the backbone: fixed by the output_stride argument.
RATES_OF_OUTPUT_STRIDE = {8: (12, 24, 36), 16: (6, 12, 18), 32: (3, 6, 9)}


@pytest.mark.parametrize("backbone", ["resnet18", "timm/resnet18"])
@pytest.mark.parametrize("output_stride", [8, 16, 32])
def test_atrous_rates_come_from_the_backbones_last_stride(backbone, output_stride):
    model = build_model("deeplabv3plus", backbone=backbone, num_classes=3, output_stride=output_stride,
                        aspp_channels=8, decoder_channels=8)  # fmt: skip
    assert model.backbone.feature_info[-1].stride == output_stride
    rates = tuple(branch[0].dilation[0] for branch in model.classifier.aspp.convs[1:-1])
    assert rates == RATES_OF_OUTPUT_STRIDE[output_stride]


def test_deepest_stride_without_default_rates_asks_for_them():
    with pytest.raises(ValueError, match=r"deepest features have stride 64; .* 8, 16, 32: give atrous_rates"):
        atrous_rates_for(64)
    assert atrous_rates_for(64, (1, 2)) == (1, 2)


def test_weights_tag_gives_num_classes():
    from backbones.weights import weights_from_checkpoint

    with weights_from_checkpoint():  # the architecture only: nothing is fetched
        model = build_model("deeplabv3_r18", weights="deeplabv3_r50.tv_coco_voc", aspp_channels=8)
    assert model.classifier[4].out_channels == 21
    with pytest.raises(ValueError, match=r"num_classes=4, but the weights 'deeplabv3_r50.tv_coco_voc' .*=21"):
        build_model("deeplabv3_r18", num_classes=4, weights="deeplabv3_r50.tv_coco_voc")
    with pytest.raises(ValueError, match=r"not given and weights=None is no tag of segmentation.weights_table"):
        build_model("deeplabv3_r18")


def test_multi_grid_reaches_the_last_stage():
    model = build_model("deeplabv3_r50", num_classes=3, output_stride=16, multi_grid=(1, 2, 4))
    dilations = [block.conv2.dilation[0] for block in model.backbone.layer4]
    assert dilations == [2, 4, 8]  # base dilation 2 at output stride 16, times (1, 2, 4)
    with pytest.raises(ValueError, match="multi_grid"):
        build_model("deeplabv3_r18", num_classes=3, multi_grid=(1, 2, 4))  # ResNet-18's last stage has 2 blocks


def test_deeplabv3plus_decoder_reads_c2_and_can_be_separable():
    model = build_model("deeplabv3plus_r18", num_classes=3, output_stride=16, separable=True, decoder_channels=32)
    assert isinstance(model, DeepLabV3Plus)
    assert model.classifier.project[0].in_channels == 64  # ResNet-18's c2
    assert isinstance(model.classifier.decoder[0], SeparableConv2d)
    assert isinstance(model.classifier.aspp.convs[1][0], SeparableConv2d)
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64))["out"].shape == (1, 3, 64, 64)


def test_every_trainable_parameter_gets_a_gradient():
    model = build_model("deeplabv3plus_r18", num_classes=3, output_stride=16, aux_loss=True, decoder_channels=32)
    outputs = model(torch.randn(2, 3, 48, 48))
    (outputs["out"].sum() + outputs["aux"].sum()).backward()
    assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == []


def test_general_form_takes_any_backbone():
    model = build_model("deeplabv3plus", num_classes=2, backbone="resnet34", output_stride=16).eval()
    assert model.backbone.output_shape()["c5"].channels == 512
    timm_model = build_model("deeplabv3", num_classes=2, backbone="timm/resnet18", output_stride=16).eval()
    with torch.no_grad():
        assert timm_model(torch.randn(1, 3, 40, 40))["out"].shape == (1, 2, 40, 40)


def test_unknown_name_lists_the_choices():
    with pytest.raises(ValueError, match="unknown segmentation model 'deeplab_v3'; closest: deeplabv3"):
        build_model("deeplab_v3", num_classes=2)
    assert {"deeplabv3_r50", "deeplabv3_r101", "deeplabv3plus_r50", "deeplabv3plus_r101"} <= set(PRESETS)


def test_logits_are_float32_under_bf16_autocast():
    """The network may run in bf16; the logits are upsampled (and later arg-maxed) in float32."""
    torch.manual_seed(0)
    model = build_model("deeplabv3plus_r18", num_classes=NUM_CLASSES, output_stride=16, aux_loss=True).eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        output = model(torch.randn(1, 3, 64, 64))
    for key in ("out", "aux"):
        assert output[key].dtype == torch.float32, key
        assert (output[key] != output[key].bfloat16().float()).any(), key  # upsampled in float32, not on bf16's grid


@pytest.mark.parametrize(
    "options, key, closest",
    [(dict(min_sise=128), "'min_sise'", "num_classes"), (dict(aspp_chanels=64), "'aspp_chanels'", "aspp_channels"),
     (dict(drop_path_rat=0.1), "'drop_path_rat'", "drop_path_rate")],
)  # fmt: skip
def test_unknown_options_name_the_closest(options, key, closest):
    with pytest.raises(ValueError) as error:
        build_model("deeplabv3_r18", num_classes=3, **options)
    assert f"unknown option {key}; closest: {closest}" in str(error.value)
    assert "backbone_options('resnet18')" in str(error.value)


def test_misspelt_preset_gives_one_line_with_the_closest():
    with pytest.raises(ValueError) as error:
        build_model("deeplabv3plus_r105", num_classes=3)
    assert str(error.value).startswith("unknown segmentation model 'deeplabv3plus_r105'; closest: deeplabv3plus_r101")
