"""Mixed precision runs the network in bf16, never the box arithmetic: boxes and AP match float32's."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from detection.models import build_model

BF16 = dict(device_type="cpu", dtype=torch.bfloat16)


def on_bf16_grid(values: torch.Tensor) -> bool:
    return bool((values == values.bfloat16().float()).all())


def test_detections_are_float32_under_bf16_autocast():
    torch.manual_seed(0)
    model = build_model("mask_rcnn_r18_fpn", num_classes=3, min_size=128, max_size=128, fpn_channels=32).eval()
    with torch.no_grad(), torch.autocast(**BF16):
        (prediction,) = model([torch.rand(3, 128, 128)])
    assert len(prediction["boxes"]) > 0
    for key in ("boxes", "scores", "masks"):
        assert prediction[key].dtype == torch.float32, key
    assert not on_bf16_grid(prediction["boxes"])


def grid_of_boxes(generator: torch.Generator) -> torch.Tensor:
    """(25, 4) xyxy boxes of 12-30 px with fractional corners, apart from each other, at 256-512 px."""
    corners = torch.stack(torch.meshgrid(torch.arange(5), torch.arange(5), indexing="ij"), -1).reshape(-1, 2)
    top_left = 260.0 + 48.0 * corners.float() + torch.rand(25, 2, generator=generator) * 8
    size = 12.0 + torch.rand(25, 2, generator=generator) * 18
    return torch.cat([top_left, top_left + size], dim=1)


def coco_ap(boxes: torch.Tensor, labels: torch.Tensor, detections: dict) -> float:
    xywh = lambda b: [b[0], b[1], b[2] - b[0], b[3] - b[1]]  # noqa: E731
    ground_truth = COCO()
    ground_truth.dataset = {
        "images": [{"id": 1, "height": 1024, "width": 1024}],
        "annotations": [
            {
                "id": i + 1,
                "image_id": 1,
                "category_id": int(c),
                "bbox": xywh(b),
                "area": (b[2] - b[0]) * (b[3] - b[1]),
                "iscrowd": 0,
            }
            for i, (b, c) in enumerate(zip(boxes.tolist(), labels.tolist(), strict=True))
        ],
        "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
    }
    results = [
        {"image_id": 1, "category_id": int(c), "bbox": xywh(b), "score": float(s)}
        for b, c, s in zip(
            detections["boxes"].tolist(), detections["labels"].tolist(), detections["scores"].tolist(), strict=True
        )
    ]
    with contextlib.redirect_stdout(io.StringIO()):
        ground_truth.createIndex()
        evaluation = COCOeval(ground_truth, ground_truth.loadRes(results), "bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return float(evaluation.stats[0])


def test_perfect_detections_through_the_bf16_path_score_ap_1():
    """The RoI heads' regression points exactly at the objects; under bf16 autocast the AP stays 1.0."""
    generator = torch.Generator().manual_seed(0)
    model = build_model("faster_rcnn_r18_fpn", num_classes=3, fpn_channels=32).eval()
    objects = grid_of_boxes(generator)  # in the 512 x 512 network input
    labels = torch.randint(1, 3, (len(objects),), generator=generator)
    proposals = objects + (torch.rand(objects.shape, generator=generator) - 0.5) * 6
    deltas = torch.zeros(len(objects), 3, 4)
    deltas[torch.arange(len(objects)), labels] = model.roi_heads.box_coder.encode_single(objects, proposals)
    logits = torch.full((len(objects), 3), -10.0)
    logits[torch.arange(len(objects)), labels] = 10.0
    with torch.no_grad(), torch.autocast(**BF16):  # what a bf16 network hands to the heads
        boxes, scores, classes = model.roi_heads.postprocess_detections(
            logits.bfloat16(), deltas.reshape(len(objects), -1).bfloat16(), [proposals], [(512, 512)]
        )
        result = [{"boxes": boxes[0], "scores": scores[0], "labels": classes[0]}]
        (detections,) = model.transform.postprocess(result, [(512, 512)], [(1024, 1024)])
    assert len(detections["boxes"]) == len(objects)
    assert coco_ap(objects * 2, labels, detections) == 1.0
    np.testing.assert_allclose(detections["boxes"].float().numpy(), objects.numpy() * 2, atol=0.5)


def test_float32_results_are_bit_identical_to_torchvisions_parts():
    from torchvision.models.detection._utils import BoxCoder
    from torchvision.models.detection.transform import GeneralizedRCNNTransform

    torch.manual_seed(0)
    model = build_model("mask_rcnn_r18_fpn", num_classes=3, min_size=128, max_size=128, fpn_channels=32).eval()
    images = [torch.rand(3, 128, 100), torch.rand(3, 96, 128)]
    with torch.no_grad():
        ours = model(images)
        for part in (model.rpn, model.roi_heads):
            part.box_coder = BoxCoder(part.box_coder.weights, part.box_coder.bbox_xform_clip)
        model.transform.__class__ = GeneralizedRCNNTransform
        theirs = model(images)
    assert len(ours[0]["boxes"]) > 0
    for mine, reference in zip(ours, theirs, strict=True):
        for key in reference:
            assert torch.equal(mine[key], reference[key]), key
