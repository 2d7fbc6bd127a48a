"""Faster and Mask R-CNN in a form that `torch.export` and the dynamo ONNX exporter accept.

torchvision's eval forward holds data-dependent Python branches that both exporters refuse
(`GuardOnDataDependentSymNode`). `ExportableRCNN` wraps a built model, shares its modules and weights,
and reimplements only the parts after the backbone that branch on data or on symbolic sizes:

- `GeneralizedRCNNTransform`: the resize factor with `torch.sym_min`/`sym_max` instead of Python's
  `min`/`max` (which guard on the image's orientation), and the padding to `size_divisible` as one pad;
- RPN `_get_top_n_idx`: a top-k of fixed size per level, over the level padded with -inf entries
  whose empty boxes `remove_small_boxes` drops (torchvision's k, `min(pre_nms_top_n, anchors)`,
  branches on the image size);
- `batched_nms`: always the coordinate trick, without its `numel() == 0` branch and its size-based
  switch to a per-class loop (`4*u1 > 4000`); an empty input still works (the max includes a zero);
- `MultiScaleRoIAlign`: its scales come from the backbone's declared strides instead of being inferred
  from the first image (a float `log2` of sizes);
- RoI heads `postprocess_detections`: the same steps, with the `batched_nms` above;
- after each NMS: exactly k rows (`kept_rows`), zeros after the kept ones, and a count, instead of
  tensors of a data-dependent length; two sentinel boxes keep torchvision's fake `nms` (which
  declares at least 2 kept boxes) true for images with one detection or none;
- the outputs: fixed-size padded tensors and a count instead of a list of dicts of any length, and
  the masks as 28x28 probabilities: `paste_masks_in_image` loops over the detections in Python, so
  pasting happens outside the graph (`DetectionExport.outputs` pastes them when the export is run).

Eager results are unchanged: the wrapper's outputs equal the model's own (checked by
`backbones.export.check_export` on images of several sizes, with `DetectionExport.compare`).
`DetectionExport` is what the tools ask of a detector (registered with the task in `detection/__init__.py`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torchvision
from torch import Tensor, nn
from torch.nn import functional as F
from torchvision.models.detection.roi_heads import maskrcnn_inference
from torchvision.models.detection.rpn import concat_box_prediction_layers
from torchvision.models.detection.transform import paste_masks_in_image
from torchvision.ops import boxes as box_ops
from torchvision.ops import roi_align
from torchvision.ops.poolers import MultiScaleRoIAlign, _convert_to_roi_format, initLevelMapper

from backbones.export import (
    ExportMismatch,
    ExportSource,
    NetworkWeights,
    TaskExport,
    backbone_weights,
    base_metadata,
    run_checked,
)

from .models import CLASS_LAYERS, PRESETS, build_model

__all__ = [
    "OUTPUT_NAMES",
    "DetectionExport",
    "ExportableRCNN",
    "batched_nms",
    "compare_detections",
    "detection_metadata",
    "kept_rows",
    "roi_align_levels",
]

# The wrapper's outputs, in order; `masks` only for Mask R-CNN.
OUTPUT_NAMES = ("boxes", "scores", "labels", "num_detections", "masks")
# Parity tolerances of `compare_detections`: boxes relative to the largest coordinate, scores absolute.
BOX_RTOL = 1e-3
SCORE_ATOL = 1e-4
MASK_MIN_IOU = 0.99


def batched_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float) -> Tensor:
    """torchvision's `batched_nms` by the coordinate trick, without branches on the number of boxes."""
    max_coordinate = F.pad(boxes.reshape(-1), (0, 1)).max()  # 0 for no boxes
    offsets = idxs.to(boxes) * (max_coordinate + 1)
    return torchvision.ops.nms(boxes + offsets[:, None], scores, iou_threshold)


def kept_rows(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float, k: int, *tensors: Tensor):
    """`batched_nms`, then the rows `keep[:k]` of each of `tensors` as exactly `k` rows (zeros after the
    kept ones), and how many were kept.

    torchvision's fake `nms` declares at least 2 kept boxes, so torch.export asserts that at run time:
    an image with one detection or none would fail. Two sentinel boxes, each in a class of its own
    and scored below every real box, make that true; they sort last and are cut here. The cut to `k`
    pads the index first (pointing at an extra zero row), so no data-dependent length is left.
    """
    n = boxes.shape[0]
    sentinels = boxes.new_tensor([[0.0, 0.0, 1.0, 1.0]] * 2)
    keep = batched_nms(
        torch.cat([boxes, sentinels]), torch.cat([scores, scores.new_tensor([-2.0, -3.0])]),
        torch.cat([idxs, idxs.new_tensor([-2, -1]) + (F.pad(idxs, (0, 1)).max() + 3)]), iou_threshold,
    )  # fmt: skip
    index = F.pad(keep, (0, k), value=-1)[:k]  # (k,): the kept indices, then sentinels or -1
    valid = (index >= 0) & (index < n)
    rows = []
    for tensor in tensors:
        padded = F.pad(tensor, [0, 0] * (tensor.dim() - 1) + [0, 1])  # row n: the zero row
        rows.append(padded[torch.where(valid, index, n)])
    return (*rows, valid.sum())


class ExportableRCNN(nn.Module):
    """A Faster/Mask R-CNN's eval forward with fixed-size outputs.

    Args:
        model: a torchvision `FasterRCNN` or `MaskRCNN` (e.g. `detection.build_model`); its modules
            and weights are shared, not copied.
        max_detections: K, the padded length of the outputs (default: the model's `detections_per_img`).

    Input: images (N, 3, H, W), float in [0, 1], the same size each (the model normalizes and resizes).
    Outputs (`OUTPUT_NAMES`): boxes (N, K, 4) float (x1, y1, x2, y2) in input pixels, scores (N, K),
    labels (N, K) int64, num_detections (N,) int64, and for Mask R-CNN masks (N, K, 1, 28, 28)
    probabilities in each box (torchvision's `paste_masks_in_image` puts them in the image). Rows past
    `num_detections` are zero.

    Example:
        >>> wrapper = ExportableRCNN(build_model("mask_rcnn_r18_fpn", num_classes=4).eval())
        >>> boxes, scores, labels, count, masks = wrapper(torch.rand(1, 3, 96, 128))
        >>> boxes.shape, masks.shape
        (torch.Size([1, 100, 4]), torch.Size([1, 100, 1, 28, 28]))
    """

    def __init__(self, model: nn.Module, *, max_detections: int | None = None):
        super().__init__()
        transform = model.transform
        if transform.fixed_size is not None:
            raise ValueError(f"transform.fixed_size={transform.fixed_size}: only min_size/max_size resizing exports")
        self.model = model
        self.max_detections = int(max_detections or model.roi_heads.detections_per_img)
        self.register_buffer("mean", torch.tensor(transform.image_mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(transform.image_std).view(1, -1, 1, 1), persistent=False)
        self.min_size = int(transform.min_size[-1])  # the eval size, as GeneralizedRCNNTransform.resize
        self.max_size = int(transform.max_size)
        self.size_divisible = int(transform.size_divisible)
        self.has_masks = model.roi_heads.has_mask()
        strides = {info.name: info.stride for info in model.backbone.feature_info}
        for pooler in (model.roi_heads.box_roi_pool, model.roi_heads.mask_roi_pool):
            if isinstance(pooler, MultiScaleRoIAlign):
                _set_pooler_scales(pooler, [strides[name] for name in strides if name in pooler.featmap_names])

    @property
    def output_names(self) -> tuple[str, ...]:
        return OUTPUT_NAMES if self.has_masks else OUTPUT_NAMES[:-1]

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        height, width = images.shape[-2:]
        x = self._resize((images - self.mean) / self.std)
        resized = x.shape[-2:]
        x = self._pad(x)
        image_sizes = [(resized[0], resized[1])] * images.shape[0]
        features = self.model.backbone(x)
        proposals = self._proposals(x, features, image_sizes)
        heads = self.model.roi_heads
        box_features = heads.box_head(roi_align_levels(heads.box_roi_pool, features, proposals))
        class_logits, box_regression = heads.box_predictor(box_features)
        boxes, scores, labels, counts = self._detections(class_logits, box_regression, proposals, image_sizes)
        ratio = torch.tensor([width / resized[1], height / resized[0]] * 2, device=images.device)
        outputs = [
            torch.stack([b * ratio.to(b.dtype) for b in boxes]),
            torch.stack(scores),
            torch.stack(labels),
            counts,
        ]
        if self.has_masks:  # (K, 1, 28, 28) per image, from the boxes in resized pixels as torchvision
            mask_features = heads.mask_head(roi_align_levels(heads.mask_roi_pool, features, boxes))
            masks = torch.stack(maskrcnn_inference(heads.mask_predictor(mask_features), labels))
            valid = torch.arange(self.max_detections, device=masks.device) < counts[:, None]
            outputs.append(masks * valid[:, :, None, None, None])
        return tuple(outputs)

    def _resize(self, x: Tensor) -> Tensor:
        height, width = x.shape[-2:]
        scale = torch.sym_min(
            self.min_size / torch.sym_min(height, width), self.max_size / torch.sym_max(height, width)
        )
        return F.interpolate(x, scale_factor=scale, mode="bilinear", recompute_scale_factor=True, align_corners=False)

    def _pad(self, x: Tensor) -> Tensor:
        height, width = x.shape[-2:]
        stride = self.size_divisible
        return F.pad(
            x,
            (0, (width + stride - 1) // stride * stride - width, 0, (height + stride - 1) // stride * stride - height),
        )

    def _proposals(self, x: Tensor, features: dict[str, Tensor], image_sizes: list) -> list[Tensor]:
        rpn = self.model.rpn
        levels = list(features.values())
        objectness, deltas = rpn.head(levels)
        anchors = rpn.anchor_generator(torchvision.models.detection.image_list.ImageList(x, image_sizes), levels)
        anchors_per_level = [o.shape[1] * o.shape[2] * o.shape[3] for o in objectness]
        objectness, deltas = concat_box_prediction_layers(objectness, deltas)
        proposals = rpn.box_coder.decode(deltas.detach(), anchors).view(x.shape[0], -1, 4)
        objectness = objectness.reshape(x.shape[0], -1)
        result = []
        for boxes, scores, image_size in zip(proposals, objectness, image_sizes, strict=True):
            result.append(self._filter_proposals(boxes, scores, image_size, anchors_per_level))
        return result

    def _filter_proposals(self, boxes: Tensor, logits: Tensor, image_size, anchors_per_level: list) -> Tensor:
        """torchvision's `RegionProposalNetwork.filter_proposals` for one image, with a fixed-size top-k.

        Each level's logits get `pre_nms_top_n` padding entries of -inf with empty boxes, so the top-k
        is always `pre_nms_top_n` long (torchvision takes `min(pre_nms_top_n, anchors in the level)`, a
        size that branches on the image size). The padding ranks last and its empty boxes are dropped
        by `remove_small_boxes`, so the proposals are torchvision's.
        """
        rpn = self.model.rpn
        k = rpn.pre_nms_top_n()
        top_boxes, top_logits, top_levels = [], [], []
        for level, (level_boxes, level_logits) in enumerate(
            zip(boxes.split(anchors_per_level), logits.split(anchors_per_level), strict=True)
        ):
            level_logits = torch.cat([level_logits, level_logits.new_full((k,), float("-inf"))])
            level_boxes = torch.cat([level_boxes, level_boxes.new_zeros((k, 4))])
            index = level_logits.topk(k).indices
            top_boxes.append(level_boxes[index])
            top_logits.append(level_logits[index])
            top_levels.append(torch.full((k,), level, dtype=torch.int64, device=boxes.device))
        boxes, scores, levels = torch.cat(top_boxes), torch.cat(top_logits).sigmoid(), torch.cat(top_levels)
        boxes = box_ops.clip_boxes_to_image(boxes, image_size)
        keep = box_ops.remove_small_boxes(boxes, rpn.min_size)
        boxes, scores, levels = boxes[keep], scores[keep], levels[keep]
        keep = torch.where(scores >= rpn.score_thresh)[0]
        boxes, scores, levels = boxes[keep], scores[keep], levels[keep]
        # a fixed number of proposals: the padding ones are empty, so every box decoded from them is
        # empty too and the RoI heads' `remove_small_boxes` drops it
        boxes, _ = kept_rows(boxes, scores, levels, rpn.nms_thresh, rpn.post_nms_top_n(), boxes)
        return boxes

    def _detections(self, class_logits: Tensor, box_regression: Tensor, proposals: list, image_sizes: list):
        """torchvision's `RoIHeads.postprocess_detections` with the branch-free `batched_nms`."""
        heads = self.model.roi_heads
        num_classes = class_logits.shape[-1]
        pred_boxes = heads.box_coder.decode(box_regression, proposals)
        pred_scores = F.softmax(class_logits, -1)
        per_image = [p.shape[0] for p in proposals]
        all_boxes, all_scores, all_labels, counts = [], [], [], []
        for boxes, scores, image_size in zip(
            pred_boxes.split(per_image), pred_scores.split(per_image), image_sizes, strict=True
        ):
            boxes = box_ops.clip_boxes_to_image(boxes, image_size)
            labels = torch.arange(num_classes, device=boxes.device).view(1, -1).expand_as(scores)
            boxes, scores, labels = boxes[:, 1:].reshape(-1, 4), scores[:, 1:].reshape(-1), labels[:, 1:].reshape(-1)
            keep = torch.where(scores > heads.score_thresh)[0]
            boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
            keep = box_ops.remove_small_boxes(boxes, min_size=1e-2)
            boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
            boxes, scores, labels, count = kept_rows(
                boxes, scores, labels, heads.nms_thresh, self.max_detections, boxes, scores, labels
            )
            all_boxes.append(boxes)
            all_scores.append(scores)
            all_labels.append(labels)
            counts.append(count)
        return all_boxes, all_scores, all_labels, torch.stack(counts)


def roi_align_levels(pooler: MultiScaleRoIAlign, features: dict[str, Tensor], boxes: list[Tensor]) -> Tensor:
    """`MultiScaleRoIAlign.forward` without `len(rois)` (a Python int of a data-dependent size)."""
    levels = [v for k, v in features.items() if k in pooler.featmap_names]
    rois = _convert_to_roi_format(boxes)  # (R, 5): image index, x1, y1, x2, y2
    if len(levels) == 1:
        return roi_align(levels[0], rois, pooler.output_size, pooler.scales[0], pooler.sampling_ratio)
    level_of_roi = pooler.map_levels(boxes)
    result = rois.new_zeros((rois.shape[0], levels[0].shape[1], *pooler.output_size))
    for level, (feature, scale) in enumerate(zip(levels, pooler.scales, strict=True)):
        index = torch.where(level_of_roi == level)[0]
        pooled = roi_align(feature, rois[index], pooler.output_size, scale, pooler.sampling_ratio)
        result = result.index_put((index,), pooled.to(result.dtype))
    return result


def _set_pooler_scales(pooler: MultiScaleRoIAlign, strides: list[int]) -> None:
    """What `MultiScaleRoIAlign` infers on its first call, from the declared strides instead."""
    pooler.scales = [1.0 / s for s in strides]
    pooler.map_levels = initLevelMapper(
        int(math.log2(strides[0])), int(math.log2(strides[-1])),
        canonical_scale=pooler.canonical_scale, canonical_level=pooler.canonical_level,
    )  # fmt: skip


def detection_metadata(
    wrapper: ExportableRCNN,
    *,
    architecture: str,
    class_names: Sequence[str] | None,
    label_to_category_id: dict[int, int] | None,
) -> dict[str, Any]:
    """What a runtime needs beside the model: normalization and resizing (both inside), the categories,
    the thresholds applied and the display default, and how to read the padded outputs."""
    model = wrapper.model
    transform, heads = model.transform, model.roi_heads
    metadata = base_metadata(
        task="detection", architecture=architecture, num_classes=heads.box_predictor.cls_score.out_features,
        class_names=class_names, mean=transform.image_mean, std=transform.image_std,
        category_ids=label_to_category_id,
    )  # fmt: skip
    metadata["input"]["resize"] = {
        "min_size": wrapper.min_size, "max_size": wrapper.max_size, "size_divisible": wrapper.size_divisible,
        "inside": True,
    }  # fmt: skip
    metadata["score_threshold"] = {"applied": float(heads.score_thresh), "display": 0.5}
    metadata["nms_threshold"] = float(heads.nms_thresh)
    metadata["max_detections"] = wrapper.max_detections
    metadata["postprocess"] = (
        "rows past num_detections are padding; boxes are x1, y1, x2, y2 in input pixels; masks are 28x28 "
        "probabilities inside each box: paste them with torchvision.models.detection.transform.paste_masks_in_image "
        "and threshold at 0.5"
    )
    return metadata


class DetectionExport(TaskExport):
    """`ExportableRCNN` with a batch of one; run back as torchvision's detectors are: a list of images in,
    one dict per image out (`boxes`, `labels`, `scores`, and `masks` (n, 1, H, W) pasted at the image size)."""

    task = "detection"
    default_size = (480, 640)
    class_layers = CLASS_LAYERS  # the box predictor's class scores first
    batch_error = (
        "detectors export with a batch of 1 (their per-image proposals and NMS run in a Python loop over the "
        "batch); run images one at a time"
    )

    def source(self, task: nn.Module) -> ExportSource:
        hp = task.hparams
        return ExportSource(
            self.task, hp.model, task.model, int(hp.num_classes), class_names=hp.class_names,
            label_to_category_id=hp.label_to_category_id,
        )  # fmt: skip

    def build(self, name: str, *, num_classes: int, weights: str) -> nn.Module:
        return build_model(name, num_classes=num_classes, weights=weights)

    def network(self, hparams: dict[str, Any], *, ema: bool = False) -> NetworkWeights:
        # an FPN wraps the backbone as `body`; DC5 holds it as is
        return backbone_weights(hparams, PRESETS, ("model.backbone.body.", "model.backbone."))

    def exportable(self, source: ExportSource) -> tuple[nn.Module, tuple[str, ...], dict[str, Any]]:
        module = ExportableRCNN(source.model).eval()
        metadata = detection_metadata(
            module, architecture=source.architecture, class_names=source.class_names,
            label_to_category_id=source.label_to_category_id,
        )  # fmt: skip
        return module, module.output_names, metadata

    def reference(self, source: ExportSource, module: nn.Module) -> Callable:
        return source.model  # torchvision's detector itself, called on a list of images

    def outputs(self, run: Callable[[Tensor], dict[str, Tensor]], images: Sequence[Tensor]) -> list[dict]:
        return [self._detect(run, image) for image in images]

    @staticmethod
    def _detect(run: Callable[[Tensor], dict[str, Tensor]], image: Tensor) -> dict[str, Tensor]:
        """One image (3, H, W): the padded outputs cut to `num_detections`, the masks pasted."""
        outputs = run(image[None])
        count = int(outputs["num_detections"][0])
        result = {name: outputs[name][0, :count] for name in ("boxes", "labels", "scores")}
        if "masks" in outputs:
            result["masks"] = paste_masks_in_image(
                outputs["masks"][0, :count], result["boxes"], tuple(image.shape[-2:])
            )
        return result

    def compare(self, reference: Callable, exported: Callable, images: Sequence[Tensor], *, batch: bool) -> None:
        """`compare_detections` on each image (run one at a time: a detector exports with a batch of one)."""
        for index, image in enumerate(images):
            where = f"image {index} ({image.shape[-2]}x{image.shape[-1]})"
            compare_detections(run_checked(reference, [image])[0], run_checked(exported, [image], where)[0], where)


def compare_detections(expected: dict[str, Tensor], actual: dict[str, Tensor], where: str) -> None:
    """Raises `ExportMismatch` unless two detection results are the same set, in any order.

    Detections are matched within each label, closest boxes first (tied scores order a set arbitrarily),
    then each pair must agree: boxes within `BOX_RTOL` of the largest coordinate, scores within
    `SCORE_ATOL`, masks (at 0.5) of IoU >= `MASK_MIN_IOU`.
    """
    n, m = len(expected["boxes"]), len(actual["boxes"])
    if n != m:
        raise ExportMismatch(f"{where}: {m} detections, the eager model has {n}")
    if n == 0:
        return
    if sorted(expected["labels"].tolist()) != sorted(actual["labels"].tolist()):
        raise ExportMismatch(
            f"{where}: labels {actual['labels'].tolist()}, the eager model's {expected['labels'].tolist()}"
        )
    order = _match(expected["boxes"].float(), actual["boxes"].float(), expected["labels"], actual["labels"])
    box_difference = (expected["boxes"] - actual["boxes"][order]).abs().max().item()
    scale = max(expected["boxes"].abs().max().item(), 1.0)
    if box_difference > BOX_RTOL * scale:
        raise ExportMismatch(f"{where}: boxes differ by {box_difference:.3g} px, over {BOX_RTOL:g} of {scale:.4g}")
    score_difference = (expected["scores"] - actual["scores"][order]).abs().max().item()
    if score_difference > SCORE_ATOL:
        raise ExportMismatch(f"{where}: scores differ by {score_difference:.3g}, over {SCORE_ATOL:g}")
    if "masks" in expected:
        if "masks" not in actual:
            raise ExportMismatch(f"{where}: the exported model returns no masks")
        a, b = expected["masks"].flatten(1) > 0.5, actual["masks"][order].flatten(1) > 0.5
        union = (a | b).sum(1)
        iou = torch.where(union > 0, (a & b).sum(1) / union.clamp(min=1), torch.ones_like(union, dtype=torch.float))
        worst = iou.min().item()
        if worst < MASK_MIN_IOU:
            raise ExportMismatch(
                f"{where}: mask IoU {worst:.4f} for detection {int(iou.argmin())}, under {MASK_MIN_IOU}"
            )


def _match(expected: Tensor, actual: Tensor, expected_labels: Tensor, actual_labels: Tensor) -> Tensor:
    """For each expected box, the index of its actual box: pairs of one label, the closest (largest coordinate
    difference) first. The label multisets are equal, so every expected box gets one."""
    cost = (expected[:, None, :] - actual[None, :, :]).abs().amax(-1)  # (n, n)
    cost[expected_labels[:, None] != actual_labels[None, :]] = float("inf")
    order, taken, left = [-1] * len(expected), [False] * len(actual), len(expected)
    for flat in cost.flatten().argsort(stable=True).tolist():  # inf (another label) sorts last
        i, j = divmod(flat, len(actual))
        if order[i] < 0 and not taken[j]:
            order[i], taken[j], left = j, True, left - 1
            if not left:
                break
    return torch.tensor(order)
