"""The registry's doors: listing, registering, plugins, `timm/<model>` and names with a weights tag."""

from __future__ import annotations

import re
import sys
import textwrap
import urllib.error

import pytest
import timm
import torch
import torchvision

import backbones.registry
import backbones.weights
from backbones import WeightsError, create_backbone, create_model, list_backbones, register_backbone
from backbones.fpn import FPN

INPUT_SIZE = 64
FAMILY = {
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "resnet50c",
    "resnet101c",
    "resnet50d",
    "resnet101d",
    "resnet152d",
    "resnext50_32x4d",
    "resnext101_32x8d",
    "resnext101_64x4d",
    "wide_resnet50_2",
    "wide_resnet101_2",
    "seresnet50",
    "seresnet101",
    "seresnext50_32x4d",
    "resnetv2_50",
    "resnetv2_101",
}


def _input() -> torch.Tensor:
    return torch.randn(1, 3, INPUT_SIZE, INPUT_SIZE, generator=torch.Generator().manual_seed(0))


@pytest.fixture
def restore_registry():
    """Removes whatever a test registers."""
    before = dict(backbones.registry._BUILDERS)
    yield
    for name in set(backbones.registry._BUILDERS) - set(before):
        del backbones.registry._BUILDERS[name]


# --- listing and registering ------------------------------------------------------------------------------------


def test_list_backbones_holds_the_family_sorted():
    names = list_backbones()
    assert set(names) >= FAMILY
    assert names == sorted(names)


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [
        ("resnet5*", ["resnet50", "resnet50c", "resnet50d"]),
        ("*resnext*", ["resnext101_32x8d", "resnext101_64x4d", "resnext50_32x4d", "seresnext50_32x4d"]),
        ("resnetv2_*", ["resnetv2_101", "resnetv2_50"]),
        ("wide_*", ["wide_resnet101_2", "wide_resnet50_2"]),
        ("nothing*", []),
    ],
)
def test_list_backbones_pattern(pattern, expected):
    assert [n for n in list_backbones(pattern) if n in FAMILY or not expected] == expected


def test_register_backbone_duplicate_raises(restore_registry):
    with pytest.raises(ValueError, match="resnet18"):

        @register_backbone("resnet18")
        def resnet18(**kwargs):  # pragma: no cover - never called
            raise AssertionError

    @register_backbone()
    def tiny_test_backbone(**kwargs):
        return backbones.registry._BUILDERS["resnet18"](**kwargs)

    assert "tiny_test_backbone" in list_backbones()
    with pytest.raises(ValueError, match="tiny_test_backbone"):
        register_backbone()(tiny_test_backbone)
    out = create_backbone("tiny_test_backbone").eval()(_input())
    assert list(out) == ["c2", "c3", "c4", "c5"]


@pytest.mark.parametrize("name", ["timm/resnet18", "my.resnet"])
def test_register_backbone_rejects_reserved_names(name, restore_registry):
    with pytest.raises(ValueError, match="may not"):
        register_backbone(name)(lambda **kwargs: None)


@pytest.mark.parametrize("door", [create_backbone, create_model])
def test_unknown_name_raises_key_error_with_close_names(door):
    with pytest.raises(KeyError) as error:
        door("resnet5")
    message = str(error.value)
    assert "'resnet5'" in message and "resnet50" in message


def test_unknown_name_without_close_match_lists_all():
    with pytest.raises(KeyError) as error:
        create_backbone("vgg16")
    assert "'vgg16'" in str(error.value) and "resnet18" in str(error.value)


# --- timm models ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("output_stride", [32, 16])
def test_timm_backbone_dict_and_shapes(output_stride):
    model = create_backbone("timm/convnext_atto", output_stride=output_stride).eval()
    assert [i.name for i in model.feature_info] == ["c2", "c3", "c4", "c5"]
    assert [i.stride for i in model.feature_info] == [min(s, output_stride) for s in (4, 8, 16, 32)]
    assert model.output_shape() == {i.name: i for i in model.feature_info}
    with torch.no_grad():
        out = model(_input())
    assert list(out) == ["c2", "c3", "c4", "c5"]
    for info in model.feature_info:
        size = INPUT_SIZE // info.stride
        assert tuple(out[info.name].shape) == (1, info.channels, size, size), info


def test_timm_backbone_out_indices_select_by_stride():
    model = create_backbone("timm/convnext_atto", out_indices=(3, 4)).eval()
    assert [(i.name, i.stride) for i in model.feature_info] == [("c4", 16), ("c5", 32)]
    with pytest.raises(ValueError, match=r"\[0\]"):  # convnext has no stride-2 output
        create_backbone("timm/convnext_atto", out_indices=(0, 1))


def test_timm_backbone_under_fpn():
    fpn = FPN(create_backbone("timm/convnext_atto"), out_channels=32).eval()
    with torch.no_grad():
        out = fpn(_input())
    assert list(out) == ["p2", "p3", "p4", "p5", "p6"]
    for info in fpn.feature_info:
        size = -(-INPUT_SIZE // info.stride)
        assert tuple(out[info.name].shape) == (1, 32, size, size), info


def test_timm_backbone_matches_timm_features():
    torch.manual_seed(0)
    ours = create_backbone("timm/resnet18").eval()
    reference = timm.create_model("resnet18", features_only=True, out_indices=(1, 2, 3, 4)).eval()
    reference.load_state_dict(ours.model.state_dict())
    with torch.no_grad():
        expected, actual = reference(_input()), ours(_input())
    for a, b in zip(actual.values(), expected, strict=True):
        torch.testing.assert_close(a, b)


def test_timm_backbone_loads_timm_resnet_checkpoint(tmp_path):
    torch.manual_seed(0)
    torch.save(timm.create_model("resnet18").state_dict(), tmp_path / "resnet18.pth")
    model = create_backbone("timm/resnet18", weights=str(tmp_path / "resnet18.pth"))
    assert torch.equal(model.model.conv1.weight, torch.load(tmp_path / "resnet18.pth")["conv1.weight"])


def test_timm_backbone_loads_timm_convnext_checkpoint(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "convnext_atto.pth"
    source = timm.create_model("convnext_atto")
    torch.save(source.state_dict(), path)
    model = create_backbone("timm/convnext_atto", weights=str(path))
    assert torch.equal(model.model.stem_0.weight, source.stem[0].weight)


# --- plugins ----------------------------------------------------------------------------------------------------


def test_entry_point_plugin_registers_a_builder(tmp_path, monkeypatch, restore_registry):
    dist_info = tmp_path / "fakeplug-0.1.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: fakeplug\nVersion: 0.1\n")
    (dist_info / "entry_points.txt").write_text("[resbone.backbones]\nfake_resnet = fakeplug_mod:build\n")
    (tmp_path / "fakeplug_mod.py").write_text(
        textwrap.dedent(
            """
            from backbones import ResNet
            from backbones.blocks import BasicBlock


            def build(**kwargs):
                return ResNet(block=BasicBlock, layers=(1, 1, 1, 1), **kwargs)
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "fakeplug_mod", raising=False)
    assert "fake_resnet" not in list_backbones()

    backbones.registry.load_plugins(reload=True)
    assert "fake_resnet" in list_backbones()
    model = create_backbone("fake_resnet", output_stride=16).eval()
    with torch.no_grad():
        out = model(_input())
    assert [(i.name, i.channels, i.stride) for i in model.feature_info] == [
        ("c2", 64, 4),
        ("c3", 128, 8),
        ("c4", 256, 16),
        ("c5", 512, 16),
    ]
    assert tuple(out["c5"].shape) == (1, 512, INPUT_SIZE // 16, INPUT_SIZE // 16)
    assert create_model("fake_resnet", num_classes=3)(_input()).shape == (1, 3)
    # a rescan does not register it twice
    backbones.registry.load_plugins(reload=True)
    sys.modules.pop("fakeplug_mod", None)


def test_broken_plugin_warns_and_leaves_the_registry_usable(tmp_path, monkeypatch, restore_registry):
    dist_info = tmp_path / "brokenplug-0.1.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: brokenplug\nVersion: 0.1\n")
    (dist_info / "entry_points.txt").write_text("[resbone.backbones]\nbroken_resnet = brokenplug_missing:build\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.warns(UserWarning, match="broken_resnet"):
        backbones.registry.load_plugins(reload=True)
    assert "broken_resnet" not in list_backbones()
    assert "resnet18" in list_backbones()


# --- names with a weights tag -----------------------------------------------------------------------------------


def test_name_with_tag_loads_the_cached_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    spec = backbones.weights.WEIGHTS["resnet18.tv_in1k"]
    torch.manual_seed(0)
    state = torchvision.models.resnet18().state_dict()
    cache = backbones.weights.cache_dir()
    assert tmp_path in cache.parents
    cache.mkdir(parents=True)
    torch.save(state, cache / spec.file_name)  # as if downloaded before; nothing is fetched

    model = create_backbone("resnet18.tv_in1k")
    assert [i.channels for i in model.feature_info] == [64, 128, 256, 512]  # the architecture of the tag
    assert torch.equal(model.layer4[1].conv2.weight, state["layer4.1.conv2.weight"])
    classifier = create_model("resnet18.tv_in1k")
    assert torch.equal(classifier.fc.weight, state["fc.weight"])


def test_name_with_tag_offline_names_file_and_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def no_network(url, dst, *args, **kwargs):
        raise urllib.error.URLError("no network in tests")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    with pytest.raises(WeightsError) as error:
        create_backbone("resnet18.tv_in1k")
    message = str(error.value)
    assert "resnet18-f37072fd.pth" in message
    assert str(backbones.weights.cache_dir()) in message and str(tmp_path) in message
    assert not any(tmp_path.rglob("*.pth"))


def test_name_with_tag_and_weights_is_ambiguous():
    with pytest.raises(ValueError, match=re.escape("resnet18.tv_in1k")):
        create_backbone("resnet18.tv_in1k", weights="resnet18.a1_in1k")


def test_unknown_tag_is_an_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises((WeightsError, FileNotFoundError), match=re.escape("resnet18.nope_in1k")):
        create_backbone("resnet18.nope_in1k")


def test_unknown_tag_lists_the_known_tags(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(WeightsError, match=re.escape("resnet18.tv_in1k")):
        create_backbone("resnet18.nope_in1k")
