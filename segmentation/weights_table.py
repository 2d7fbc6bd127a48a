"""Published DeepLab weights (torchvision's), as data: tag -> URL with its SHA-256 prefix and label space.

torchvision's COCO-trained DeepLabV3 weights segment the 20 Pascal VOC classes, in VOC order, from the
COCO images that contain them: label i (1..20) is the COCO category `VOC_CATEGORY_IDS[i - 1]`.
Evaluate or fine-tune them on COCO with `CocoSegmentationDataModule(category_ids=VOC_CATEGORY_IDS)`.
"""

from backbones.weights_table import WeightsSpec

__all__ = ["SEGMENTATION_WEIGHTS", "VOC_CATEGORY_IDS"]

# COCO ids of the VOC classes in VOC order: aeroplane, bicycle, bird, boat, bottle, bus, car, cat, chair, cow,
# dining table, dog, horse, motorbike, person, potted plant, sheep, sofa, train, tv monitor.
VOC_CATEGORY_IDS = (5, 2, 16, 9, 44, 6, 3, 17, 62, 21, 67, 18, 19, 4, 1, 64, 20, 63, 7, 72)

_TV = "https://download.pytorch.org/models/"

SEGMENTATION_WEIGHTS: dict[str, WeightsSpec] = {
    "deeplabv3_r50.tv_coco_voc": WeightsSpec(
        _TV + "deeplabv3_resnet50_coco-cd0a2569.pth",
        "torchvision COCO_WITH_VOC_LABELS_V1, mIoU 66.4",
        num_classes=21,
        category_ids=VOC_CATEGORY_IDS,
    ),
    "deeplabv3_r101.tv_coco_voc": WeightsSpec(
        _TV + "deeplabv3_resnet101_coco-586e9e4e.pth",
        "torchvision COCO_WITH_VOC_LABELS_V1, mIoU 67.4",
        num_classes=21,
        category_ids=VOC_CATEGORY_IDS,
    ),
}
