"""Weights: local file formats, strict loading with named errors, safe reading, download into the hub cache."""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import re
import shlex

import pytest
import torch
import torchvision

import backbones.weights
from backbones import WeightsError, create_backbone, create_model, load_state_dict, load_weights
from backbones.weights import WeightsSpec, read_state_dict


@pytest.fixture(scope="module")
def resnet18_state() -> dict[str, torch.Tensor]:
    """A torchvision ResNet-18 classifier's state dict, seeded random, BN statistics not the defaults."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_()
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_()
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """TORCH_HOME in tmp_path: the hub cache (`cache_dir()`) is empty and private to the test."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))
    cache = backbones.weights.cache_dir()
    assert (tmp_path / "hub") in cache.parents
    return cache


def _save(obj, path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(obj, path)
    return str(path)


def _hashed_file(state, directory, stem="resnet18", prefix=None):
    """Saves `state` as `<stem>-<sha256 prefix>.pth` (torch hub's convention); returns the path."""
    tmp = directory / "tmp.pth"
    _save(state, tmp)
    digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
    path = directory / f"{stem}-{prefix or digest[:8]}.pth"
    tmp.rename(path)
    return path


def _assert_backbone_has(model, state):
    own = model.state_dict()
    for key, value in state.items():
        if key.startswith("fc.") or key.endswith("num_batches_tracked"):
            continue
        assert torch.equal(own[key], value), key


# --- local formats ----------------------------------------------------------------------------------------------


def test_torchvision_state_dict_into_backbone_and_classifier(resnet18_state, tmp_path):
    path = _save(resnet18_state, tmp_path / "resnet18.pth")
    _assert_backbone_has(create_backbone("resnet18", weights=path), resnet18_state)
    model = create_model("resnet18", weights=path)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in resnet18_state.items())


@pytest.mark.parametrize("wrapper", [None, "model", "module"])
def test_classification_checkpoint_into_backbone_drops_fc(resnet18_state, tmp_path, wrapper):
    checkpoint = resnet18_state if wrapper is None else {wrapper: resnet18_state, "epoch": 3}
    path = _save(checkpoint, tmp_path / "checkpoint.pth")
    model = create_backbone("resnet18", weights=path)
    assert not any(k.startswith("fc.") for k in model.state_dict())
    _assert_backbone_has(model, resnet18_state)


def test_lightning_checkpoint(resnet18_state, tmp_path):
    checkpoint = {"state_dict": {"model." + k: v for k, v in resnet18_state.items()}, "epoch": 1}
    path = _save(checkpoint, tmp_path / "epoch=1.ckpt")
    _assert_backbone_has(create_backbone("resnet18", weights=path), resnet18_state)
    classifier = create_model("resnet18", weights=path)
    assert torch.equal(classifier.fc.weight, resnet18_state["fc.weight"])


def test_lightning_checkpoint_of_a_detector(resnet18_state, tmp_path):
    body = {k: v for k, v in resnet18_state.items() if not k.startswith("fc.")}
    checkpoint = {
        "state_dict": {
            **{"model.backbone.body." + k: v for k, v in body.items()},
            "model.backbone.fpn.inner_blocks.0.0.weight": torch.zeros(256, 64, 1, 1),
            "model.rpn.head.conv.0.0.weight": torch.zeros(256, 256, 3, 3),
        },
        "epoch": 1,
        "global_step": 10,
    }
    path = _save(checkpoint, tmp_path / "detector.ckpt")
    _assert_backbone_has(create_backbone("resnet18", weights=path), resnet18_state)


def test_pruned_backbone_takes_the_stages_it_has(resnet18_state, tmp_path):
    path = _save(resnet18_state, tmp_path / "resnet18.pth")
    model = create_backbone("resnet18", out_indices=(1, 2), weights=path)
    assert not hasattr(model, "layer3")
    _assert_backbone_has(model, {k: v for k, v in resnet18_state.items() if not k.startswith(("layer3", "layer4"))})


# --- what does not fit ------------------------------------------------------------------------------------------


def test_missing_key_is_named(resnet18_state, tmp_path):
    state = {k: v for k, v in resnet18_state.items() if k != "layer2.1.bn1.running_var"}
    path = _save(state, tmp_path / "missing.pth")
    with pytest.raises(WeightsError, match=r"missing keys \(1\): layer2\.1\.bn1\.running_var"):
        create_backbone("resnet18", weights=path)


def test_unexpected_key_is_named(resnet18_state, tmp_path):
    state = {**resnet18_state, "layer3.0.extra.weight": torch.zeros(3)}
    path = _save(state, tmp_path / "unexpected.pth")
    with pytest.raises(WeightsError, match=r"unexpected keys \(1\): layer3\.0\.extra\.weight"):
        create_backbone("resnet18", weights=path)


def test_shape_mismatch_names_key_and_both_shapes(resnet18_state, tmp_path):
    state = {**resnet18_state, "layer2.0.conv1.weight": torch.zeros(128, 64, 1, 1)}
    path = _save(state, tmp_path / "mismatch.pth")
    with pytest.raises(WeightsError) as error:
        create_backbone("resnet18", weights=path)
    message = str(error.value)
    assert "layer2.0.conv1.weight" in message
    assert "(128, 64, 1, 1)" in message and "(128, 64, 3, 3)" in message


def test_other_architecture_does_not_fit(resnet18_state, tmp_path):
    path = _save(resnet18_state, tmp_path / "resnet18.pth")
    with pytest.raises(WeightsError, match=re.escape("layer1.0.conv3.weight")):
        create_backbone("resnet50", weights=path)


def test_load_state_dict_is_strict_without_files(resnet18_state):
    model = create_backbone("resnet18")
    load_state_dict(model, resnet18_state)
    _assert_backbone_has(model, resnet18_state)
    with pytest.raises(WeightsError, match=re.escape("conv1.weight")):
        load_state_dict(model, {k: v for k, v in resnet18_state.items() if k != "conv1.weight"})


def test_fewer_classes_keep_a_fresh_fc_with_a_warning(resnet18_state, tmp_path, caplog):
    path = _save(resnet18_state, tmp_path / "resnet18.pth")
    with caplog.at_level(logging.WARNING, logger="backbones.weights"):
        model = create_model("resnet18", num_classes=10, weights=path)
    assert model.fc.weight.shape == (10, 512)
    assert "fc.weight" in caplog.text and "fc.bias" in caplog.text
    own = model.state_dict()
    for key, value in resnet18_state.items():
        if not key.startswith("fc."):
            assert torch.equal(own[key], value), key


# --- reading safely ---------------------------------------------------------------------------------------------


class _RunsCode:
    """Unpickling this would run a shell command that creates `marker`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(self.marker)}",))


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_pickle_that_would_run_code_is_refused(tmp_path, writer):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    payload = {"evil": _RunsCode(marker), "conv1.weight": torch.zeros(1)}
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        with open(path, "wb") as file:
            pickle.dump({"evil": _RunsCode(marker)}, file, protocol=2)
    with pytest.raises(WeightsError, match="refused"):
        load_weights(create_backbone("resnet18"), str(path))
    assert not marker.exists()


def test_the_refused_pickle_really_runs_code(tmp_path):
    """The control for the test above: unpickled without `weights_only`, the payload does run."""
    marker = tmp_path / "pwned"
    torch.save({"evil": _RunsCode(marker)}, tmp_path / "evil.pth")
    torch.load(tmp_path / "evil.pth", weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("keep", [0.5, 0.0])
def test_truncated_file_is_a_clear_error(resnet18_state, tmp_path, keep):
    path = tmp_path / "truncated.pth"
    torch.save(resnet18_state, path)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(WeightsError, match=re.escape("truncated.pth")):
        create_backbone("resnet18", weights=str(path))


def test_file_without_state_dict_is_refused(tmp_path):
    path = _save({"epoch": 3, "lr": 0.1}, tmp_path / "not_weights.pth")
    with pytest.raises(WeightsError, match="no state dict"):
        read_state_dict(path)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape("nowhere.pth")):
        create_backbone("resnet18", weights=str(tmp_path / "nowhere.pth"))


# --- URLs and tags ----------------------------------------------------------------------------------------------


def test_file_url_downloads_into_the_hub_cache(resnet18_state, tmp_path, hub):
    source = _hashed_file(resnet18_state, tmp_path / "src")
    model = load_weights(create_backbone("resnet18"), source.as_uri())
    _assert_backbone_has(model, resnet18_state)
    cached = hub / source.name
    assert cached.is_file() and cached.read_bytes() == source.read_bytes()
    # the second time it comes from the cache, even with the source gone
    source.unlink()
    _assert_backbone_has(load_weights(create_backbone("resnet18"), source.as_uri()), resnet18_state)


def test_wrong_hash_is_rejected_and_leaves_no_file(resnet18_state, tmp_path, hub):
    source = _hashed_file(resnet18_state, tmp_path / "src", prefix="0badc0de")
    with pytest.raises(WeightsError, match="0badc0de"):
        load_weights(create_backbone("resnet18"), source.as_uri())
    assert not hub.exists() or not any(hub.iterdir())


def test_url_without_hash_is_refused(resnet18_state, tmp_path, hub):
    source = tmp_path / "src" / "resnet18.pth"
    _save(resnet18_state, source)
    with pytest.raises(WeightsError, match="SHA-256"):
        load_weights(create_backbone("resnet18"), source.as_uri())
    assert not hub.exists() or not any(hub.iterdir())


def test_registered_tag_downloads_and_loads(resnet18_state, tmp_path, hub, monkeypatch):
    source = _hashed_file(resnet18_state, tmp_path / "src")
    monkeypatch.setitem(backbones.weights.WEIGHTS, "resnet18.test_in1k", WeightsSpec(source.as_uri(), "test"))
    model = create_backbone("resnet18.test_in1k")
    _assert_backbone_has(model, resnet18_state)
    assert (hub / source.name).is_file()
    model = create_model("resnet18", weights="resnet18.test_in1k")
    assert torch.equal(model.fc.weight, resnet18_state["fc.weight"])


def test_unreachable_tag_says_what_to_fetch_and_where(hub, monkeypatch):
    url = "http://127.0.0.1:9/weights/resnet18-0123abcd.pth"  # port 9 (discard) is closed
    monkeypatch.setitem(backbones.weights.WEIGHTS, "resnet18.offline_in1k", WeightsSpec(url, "test"))
    with pytest.raises(WeightsError) as error:
        create_backbone("resnet18.offline_in1k")
    message = str(error.value)
    assert "resnet18.offline_in1k" in message and url in message
    assert str(hub / "resnet18-0123abcd.pth") in message
    assert not hub.exists() or not any(hub.iterdir())


def test_class_layers_count_the_classes_of_every_task():
    import detection.models
    import segmentation.models
    from backbones.weights import count_classes
    from backbones.weights_table import CLASS_LAYERS

    zeros = torch.zeros
    assert count_classes({"model.fc.weight": zeros(6, 8)}, CLASS_LAYERS) == 6  # a Lightning checkpoint's key
    assert count_classes({"head.norm.weight": zeros(8), "head.fc.weight": zeros(5, 8)}, CLASS_LAYERS) == 5  # timm's
    detector = {"roi_heads.box_predictor.bbox_pred.weight": zeros(364, 8),
                "roi_heads.box_predictor.cls_score.weight": zeros(91, 8)}  # fmt: skip
    assert count_classes(detector, detection.models.CLASS_LAYERS) == 91  # the class scores, not the 4 box rows each
    deeplab = {"aux_classifier.4.weight": zeros(21, 8, 1, 1), "classifier.predictor.weight": zeros(21, 8, 1, 1)}
    assert count_classes(deeplab, segmentation.models.CLASS_LAYERS) == 21
    assert count_classes({"backbone.aux_classifier.4.weight": zeros(3, 8)}, ("classifier.4",)) is None  # not a suffix
    assert segmentation.models.HEAD_PREFIXES == ("classifier.4.", "classifier.predictor.", "aux_classifier.4.")
