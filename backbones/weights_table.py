"""Published ImageNet weights: a tag maps to a URL (whose file name carries its SHA-256 prefix) and metadata.

Data only. Tags read `<architecture>.<source>_<dataset>`, as timm names them.
"""

from __future__ import annotations

from dataclasses import dataclass

#: the name of label 0 of detection and segmentation models (torchvision's weights call it so), saved in checkpoints
BACKGROUND = "__background__"
#: the class layers of a classifier (module names; ours and torchvision's `fc`, timm's `head.fc`, `classifier`,
#: `head`): weights of another number of classes leave them as initialised, and their rows count the classes
CLASS_LAYERS = ("fc", "head.fc", "classifier", "head")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_TV = "https://download.pytorch.org/models/"
_TIMM = "https://github.com/huggingface/pytorch-image-models/releases/download/"
_TIMM_OLD = "https://github.com/rwightman/pytorch-image-models/releases/download/"
_GLUON = "https://github.com/rwightman/pytorch-pretrained-gluonresnet/releases/download/v0.1/"


@dataclass(frozen=True)
class WeightsSpec:
    url: str
    source: str  # who published them, and which recipe
    top1: float | None = None  # ImageNet-1k top-1 as published
    num_classes: int = 1000
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    input_size: int = 224
    # What a label of the model's outputs means: "contiguous" (1..K, K = num_classes - 1, in the order of
    # `category_ids` when given, else of the data's category ids) or "category_id" (the label is the COCO
    # category id, as torchvision's COCO detectors with their 91 outputs).
    label_space: str = "contiguous"
    category_ids: tuple[int, ...] | None = None  # the dataset category ids of labels 1..K, where published

    @property
    def file_name(self) -> str:
        return self.url.rsplit("/", 1)[-1]


WEIGHTS: dict[str, WeightsSpec] = {
    "resnet18.tv_in1k": WeightsSpec(_TV + "resnet18-f37072fd.pth", "torchvision IMAGENET1K_V1", 69.758),
    "resnet34.tv_in1k": WeightsSpec(_TV + "resnet34-b627a593.pth", "torchvision IMAGENET1K_V1", 73.314),
    "resnet50.tv_in1k": WeightsSpec(_TV + "resnet50-0676ba61.pth", "torchvision IMAGENET1K_V1", 76.130),
    "resnet50.tv2_in1k": WeightsSpec(_TV + "resnet50-11ad3fa6.pth", "torchvision IMAGENET1K_V2", 80.858),
    "resnet101.tv_in1k": WeightsSpec(_TV + "resnet101-63fe2227.pth", "torchvision IMAGENET1K_V1", 77.374),
    "resnet101.tv2_in1k": WeightsSpec(_TV + "resnet101-cd907fc2.pth", "torchvision IMAGENET1K_V2", 81.886),
    "resnet152.tv_in1k": WeightsSpec(_TV + "resnet152-394f9c45.pth", "torchvision IMAGENET1K_V1", 78.312),
    "resnet152.tv2_in1k": WeightsSpec(_TV + "resnet152-f82ba261.pth", "torchvision IMAGENET1K_V2", 82.284),
    "resnext50_32x4d.tv_in1k": WeightsSpec(_TV + "resnext50_32x4d-7cdf4587.pth", "torchvision IMAGENET1K_V1", 77.618),
    "resnext50_32x4d.tv2_in1k": WeightsSpec(_TV + "resnext50_32x4d-1a0047aa.pth", "torchvision IMAGENET1K_V2", 81.198),
    "resnext101_32x8d.tv_in1k": WeightsSpec(_TV + "resnext101_32x8d-8ba56ff5.pth", "torchvision IMAGENET1K_V1", 79.312),
    "resnext101_32x8d.tv2_in1k": WeightsSpec(
        _TV + "resnext101_32x8d-110c445d.pth", "torchvision IMAGENET1K_V2", 82.834
    ),
    "resnext101_64x4d.tv_in1k": WeightsSpec(_TV + "resnext101_64x4d-173b62eb.pth", "torchvision IMAGENET1K_V1", 83.246),
    "wide_resnet50_2.tv_in1k": WeightsSpec(_TV + "wide_resnet50_2-95faca4d.pth", "torchvision IMAGENET1K_V1", 78.468),
    "wide_resnet50_2.tv2_in1k": WeightsSpec(_TV + "wide_resnet50_2-9ba9bcbe.pth", "torchvision IMAGENET1K_V2", 81.602),
    "wide_resnet101_2.tv_in1k": WeightsSpec(_TV + "wide_resnet101_2-32ee1156.pth", "torchvision IMAGENET1K_V1", 78.848),
    "wide_resnet101_2.tv2_in1k": WeightsSpec(
        _TV + "wide_resnet101_2-d733dc28.pth", "torchvision IMAGENET1K_V2", 82.510
    ),
    "resnet18.a1_in1k": WeightsSpec(_TIMM + "v0.1-rsb-weights/resnet18_a1_0-d63eafa0.pth", "timm RSB A1"),
    "resnet50.a1_in1k": WeightsSpec(_TIMM_OLD + "v0.1-rsb-weights/resnet50_a1_0-14fe96d1.pth", "timm RSB A1"),
    "resnet101.a1h_in1k": WeightsSpec(_TIMM_OLD + "v0.1-rsb-weights/resnet101_a1h-36d3f2aa.pth", "timm RSB A1h"),
    "resnet50c.gluon_in1k": WeightsSpec(_GLUON + "gluon_resnet50_v1c-48092f55.pth", "GluonCV via timm"),
    "resnet101c.gluon_in1k": WeightsSpec(_GLUON + "gluon_resnet101_v1c-1f26822a.pth", "GluonCV via timm"),
    "resnet50d.ra2_in1k": WeightsSpec(_TIMM_OLD + "v0.1-weights/resnet50d_ra2-464e36ba.pth", "timm RA2"),
    "resnet101d.ra2_in1k": WeightsSpec(
        _TIMM_OLD + "v0.1-weights/resnet101d_ra2-2803ffab.pth", "timm RA2", None, 1000, IMAGENET_MEAN, IMAGENET_STD, 256
    ),
    "resnet152d.ra2_in1k": WeightsSpec(
        _TIMM_OLD + "v0.1-weights/resnet152d_ra2-5cac0439.pth", "timm RA2", None, 1000, IMAGENET_MEAN, IMAGENET_STD, 256
    ),
    "seresnet50.a1_in1k": WeightsSpec(_TIMM + "v0.1-rsb-weights/seresnet50_a1_0-ffa00869.pth", "timm RSB A1"),
    "seresnext50_32x4d.racm_in1k": WeightsSpec(
        _TIMM_OLD + "v0.1-weights/seresnext50_32x4d_racm-a304a460.pth", "timm RA + CutMix"
    ),
}
