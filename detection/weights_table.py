"""Published COCO detector weights (torchvision's), as data: tag -> URL with its SHA-256 prefix.

torchvision's COCO detectors have 91 outputs whose label is the COCO category id (ids without a
category are never trained): their label space is "category_id".
"""

from backbones.weights_table import WeightsSpec

__all__ = ["DETECTION_WEIGHTS", "LABEL_SPACES"]

LABEL_SPACES = ("contiguous", "category_id")

_TV = "https://download.pytorch.org/models/"

DETECTION_WEIGHTS: dict[str, WeightsSpec] = {
    "faster_rcnn_r50_fpn.tv_coco": WeightsSpec(
        _TV + "fasterrcnn_resnet50_fpn_coco-258fb6c6.pth",
        "torchvision COCO_V1, box AP 37.0",
        num_classes=91,
        label_space="category_id",
    ),
    "faster_rcnn_r50_fpn_v2.tv_coco": WeightsSpec(
        _TV + "fasterrcnn_resnet50_fpn_v2_coco-dd69338a.pth",
        "torchvision COCO_V1, box AP 46.7",
        num_classes=91,
        label_space="category_id",
    ),
    "mask_rcnn_r50_fpn.tv_coco": WeightsSpec(
        _TV + "maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth",
        "torchvision COCO_V1, box AP 37.9, mask AP 34.6",
        num_classes=91,
        label_space="category_id",
    ),
    "mask_rcnn_r50_fpn_v2.tv_coco": WeightsSpec(
        _TV + "maskrcnn_resnet50_fpn_v2_coco-73cbd019.pth",
        "torchvision COCO_V1, box AP 47.4, mask AP 41.8",
        num_classes=91,
        label_space="category_id",
    ),
}
