"""detection.export: the export wrapper gives the eager model's detections; torch.export and ONNX keep them."""

from __future__ import annotations

import pytest
import torch
from torchvision.ops import boxes as box_ops

from backbones.export import ExportMismatch, check_export, check_images, load_exported, write_exported
from detection.export import ExportableRCNN, batched_nms, detection_metadata
from detection.models import build_model

# Small enough to export quickly, large enough (128 px after the resize) that no pyramid level is 1x1.
TINY = dict(
    backbone="resnet18", num_classes=4, min_size=128, max_size=160, fpn_channels=32, box_head_dim=64,
    rpn_pre_nms_top_n_test=100, rpn_post_nms_top_n_test=50, box_score_thresh=0.0, box_detections_per_img=20,
)  # fmt: skip


def tiny(architecture: str, **changes) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(architecture, **dict(TINY, **changes)).eval()


def _eager_equal(model, wrapper, image):
    with torch.no_grad():
        expected = model([image])[0]
        outputs = dict(zip(wrapper.output_names, wrapper(image[None]), strict=True))
    count = int(outputs["num_detections"][0])
    assert count == len(expected["boxes"])
    torch.testing.assert_close(outputs["boxes"][0, :count], expected["boxes"], rtol=0, atol=1e-4)
    torch.testing.assert_close(outputs["scores"][0, :count], expected["scores"], rtol=0, atol=1e-6)
    assert torch.equal(outputs["labels"][0, :count], expected["labels"])
    assert (outputs["boxes"][0, count:] == 0).all() and (outputs["scores"][0, count:] == 0).all()
    return outputs, expected


@pytest.mark.parametrize("architecture", ["faster_rcnn", "mask_rcnn"])
def test_wrapper_gives_the_eager_detections_at_any_size(architecture):
    model = tiny(architecture)
    wrapper = ExportableRCNN(model)
    for image in check_images([(96, 128), (131, 77), (200, 150)], seed=1):
        outputs, _expected = _eager_equal(model, wrapper, image)
        assert outputs["boxes"].shape == (1, 20, 4) and outputs["labels"].dtype == torch.int64
        if architecture == "mask_rcnn":
            assert outputs["masks"].shape == (1, 20, 1, 28, 28)


def test_wrapper_pads_an_image_without_detections():
    model = tiny("faster_rcnn", box_score_thresh=1.0)  # nothing passes
    outputs, expected = _eager_equal(model, ExportableRCNN(model), check_images([(96, 128)])[0])
    assert len(expected["boxes"]) == 0 and int(outputs["num_detections"][0]) == 0


def test_batched_nms_keeps_what_torchvision_keeps():
    torch.manual_seed(0)
    for count in (0, 7, 2000):  # 2000 boxes: torchvision switches to its per-class loop (over 4000 numbers)
        xy = torch.rand(count, 2) * 100
        boxes = torch.cat([xy, xy + 5 + torch.rand(count, 2) * 30], 1)
        scores, classes = torch.rand(count), torch.randint(0, 5, (count,))
        assert torch.equal(batched_nms(boxes, scores, classes, 0.5), box_ops.batched_nms(boxes, scores, classes, 0.5))


def test_metadata_names_the_categories_and_thresholds():
    wrapper = ExportableRCNN(tiny("faster_rcnn"))
    names = ["__background__", "circle", "square", "triangle"]
    metadata = detection_metadata(
        wrapper, architecture="faster_rcnn", class_names=names, label_to_category_id={1: 11, 2: 12, 3: 13}
    )
    assert metadata["categories"][1] == {"label": 1, "name": "circle", "id": 11}
    assert "id" not in metadata["categories"][0]
    assert metadata["input"]["resize"] == {"min_size": 128, "max_size": 160, "size_divisible": 32, "inside": True}
    assert metadata["score_threshold"]["applied"] == 0.0 and metadata["max_detections"] == 20


def _export_and_check(architecture: str, fmt: str, tmp_path, *, dynamic_size: bool):
    if fmt == "onnx":
        pytest.importorskip("onnxruntime", reason="the export extra (onnx, onnxscript, onnxruntime) is not installed")
        pytest.importorskip("onnxscript", reason="the export extra is not installed")
    model = tiny(architecture)
    wrapper = ExportableRCNN(model)
    sizes = [(96, 128), (131, 77), (200, 150)] if dynamic_size else [(96, 128)] * 3
    images = check_images(sizes, seed=2)
    path = tmp_path / f"{architecture}.{'pt2' if fmt == 'export' else 'onnx'}"
    metadata = detection_metadata(wrapper, architecture=architecture, class_names=None, label_to_category_id=None)
    write_exported(
        wrapper, images[0][None], path, metadata=metadata, output_names=wrapper.output_names, dynamic_size=dynamic_size
    )
    exported = load_exported(path)
    check_export(model, exported, images, task="detection")  # raises ExportMismatch
    with torch.no_grad():
        assert len(exported([images[0]])[0]["boxes"]) == 20  # score threshold 0: every slot filled


@pytest.mark.slow  # tens of seconds to export on 2 cores; the export machinery runs by default on classifiers
def test_faster_rcnn_through_torch_export_at_a_fixed_size(tmp_path):
    _export_and_check("faster_rcnn", "export", tmp_path, dynamic_size=False)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["export", "onnx"])
@pytest.mark.parametrize("architecture", ["faster_rcnn", "mask_rcnn"])
def test_detectors_through_each_format_at_a_fixed_size(architecture, fmt, tmp_path):
    _export_and_check(architecture, fmt, tmp_path, dynamic_size=False)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["export", "onnx"])
def test_mask_rcnn_with_a_dynamic_image_size(fmt, tmp_path):
    _export_and_check("mask_rcnn", fmt, tmp_path, dynamic_size=True)


@pytest.mark.slow
def test_an_image_without_detections_runs_through_the_export(tmp_path):
    """torchvision's fake nms declares 2 or more kept boxes; the sentinels keep that true for an empty result."""
    model = tiny("faster_rcnn", box_score_thresh=0.99)
    wrapper = ExportableRCNN(model)
    images = check_images([(96, 128)] * 2, seed=3)
    path = tmp_path / "empty.pt2"
    write_exported(
        wrapper,
        images[0][None],
        path,
        metadata={"task": "detection"},
        output_names=wrapper.output_names,
        dynamic_size=False,
    )
    with torch.no_grad():
        assert [len(p["boxes"]) for p in model(images)] == [0, 0]
        assert [len(p["boxes"]) for p in load_exported(path)(images)] == [0, 0]


def _detections(boxes, labels, scores, masks=None):
    result = {"boxes": torch.tensor(boxes), "labels": torch.tensor(labels), "scores": torch.tensor(scores)}
    if masks is not None:
        result["masks"] = masks
    return result


def test_check_export_matches_detections_in_any_order_with_tied_scores():
    # a saturated model: tied scores, so the eager model and the export may list the same set in another order
    boxes = [[0.0, 0.0, 10.0, 10.0], [200.0, 100.0, 300.0, 240.0], [50.0, 60.0, 90.0, 99.0], [1.0, 1.0, 11.0, 9.0]]
    labels, scores = [1, 2, 1, 1], [1.0, 1.0, 1.0, 1.0]
    masks = torch.zeros(4, 1, 256, 320)
    for mask, (x1, y1, x2, y2) in zip(masks, boxes, strict=True):
        mask[:, int(y1) : int(y2), int(x1) : int(x2)] = 0.9
    expected = _detections(boxes, labels, scores, masks)
    order = [2, 0, 3, 1]
    shuffled = {key: value[order] for key, value in expected.items()}
    image = torch.rand(3, 256, 320)
    check_export(lambda _: [expected], lambda _: [shuffled], [image], task="detection")  # the same set: no error

    moved = {key: value.clone() for key, value in shuffled.items()}
    moved["boxes"][1, 0] += 5.0  # one box of the same set moved by 5 px
    with pytest.raises(ExportMismatch, match=r"boxes differ by 5 px"):
        check_export(lambda _: [expected], lambda _: [moved], [image], task="detection")
    relabelled = dict(shuffled, labels=torch.tensor([1, 1, 1, 1]))
    with pytest.raises(ExportMismatch, match=r"labels \[1, 1, 1, 1\], the eager model's \[1, 2, 1, 1\]"):
        check_export(lambda _: [expected], lambda _: [relabelled], [image], task="detection")
    rescored = dict(shuffled, scores=torch.tensor([1.0, 1.0, 0.5, 1.0]))
    with pytest.raises(ExportMismatch, match=r"scores differ by 0\.5"):
        check_export(lambda _: [expected], lambda _: [rescored], [image], task="detection")
