"""Export a trained model to a `torch.export` program (.pt2) or an ONNX file, with a JSON beside it, and check it.

    python tools/export_model.py runs/.../checkpoints/last.ckpt --format onnx --dynamic-size
    python tools/export_model.py deeplabv3plus_r18 --weights deeplab.pth --format export --dynamic-batch --dynamic-size
    python tools/export_model.py faster_rcnn_r50_fpn --weights frcnn.pth --format onnx --output frcnn.onnx

The source is a checkpoint of one of the three tasks (DetectionTask, SegmentationTask,
ClassificationTask; built as trained, nothing downloaded) or a preset name with a `--weights` file.
The exported model takes float RGB images in [0, 1], (N, 3, H, W), and normalizes (and for detectors
resizes) them itself. The JSON beside it (`model.onnx` -> `model.onnx.json`) holds the normalization, the
categories, the score thresholds and the output layout; `backbones.export.load_exported` runs either
format with the eager model's interface.

After writing, the tool runs the exported model (onnxruntime for ONNX, the program for .pt2) and the
eager model on three images (of three sizes with --dynamic-size) and compares them (see
`backbones.export.check_export`). Exit status: 0 when they agree, 1 when they differ (the message says
what), 2 for bad input (a missing or foreign checkpoint, a bad option).
"""

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from backbones.export import (
    FORMATS,
    ExportMismatch,
    NormalizedModel,
    base_metadata,
    check_export,
    check_images,
    load_exported,
    sidecar_path,
    write_exported,
)
from backbones.weights import WeightsError, load_checkpoint, load_task_checkpoint, read_state_dict
from backbones.weights_table import IMAGENET_MEAN, IMAGENET_STD

# An export example with a 1x1 map at stride 32 makes torch.export specialize the size (1 is special).
MIN_DYNAMIC_SIZE = 64
DEFAULT_SIZES = {"classification": (224, 224), "segmentation": (512, 512), "detection": (480, 640)}


@dataclass
class Source:
    """A model to export and what its metadata needs."""

    task: str
    architecture: str
    model: nn.Module
    num_classes: int
    class_names: list[str] | None = None
    label_to_category_id: dict[int, int] | None = None
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD


def task_of(architecture: str) -> str:
    """ "detection", "segmentation" or "classification" for a model name (a preset or an architecture)."""
    import detection.models
    import segmentation.models

    if architecture in detection.models.PRESETS or architecture in detection.models.ARCHITECTURES:
        return "detection"
    if architecture in segmentation.models.PRESETS or architecture in segmentation.models.ARCHITECTURES:
        return "segmentation"
    return "classification"


def from_checkpoint(path: Path) -> Source:
    """Reads a Lightning checkpoint of one of the three tasks (`weights_only`, nothing downloaded)."""
    checkpoint = load_checkpoint(path, "checkpoint")
    hparams = checkpoint.get("hyper_parameters") if isinstance(checkpoint, dict) else None
    if not isinstance(hparams, dict) or not isinstance(hparams.get("model"), str) or not hparams.get("num_classes"):
        raise WeightsError(
            f"{str(path)!r} has no task hyper-parameters (model, num_classes): not a checkpoint of "
            "tools/train_det.py, train_seg.py or train_cls.py"
        )
    task_name = task_of(hparams["model"])
    if task_name == "detection":
        from detection.task import DetectionTask

        task = load_task_checkpoint(DetectionTask, path, map_location="cpu").eval()
        return Source(
            "detection", hparams["model"], task.model, int(hparams["num_classes"]),
            class_names=task.hparams.class_names, label_to_category_id=task.hparams.label_to_category_id,
        )  # fmt: skip
    if task_name == "segmentation":
        from segmentation.task import SegmentationTask

        task = load_task_checkpoint(SegmentationTask, path, map_location="cpu").eval()
        hp = task.hparams
        return Source(
            "segmentation",
            hp.model,
            task.model,
            int(hp.num_classes),
            hp.class_names,
            None,
            tuple(hp.mean),
            tuple(hp.std),
        )
    from backbones.classification import ClassificationTask

    task = load_task_checkpoint(ClassificationTask, path, map_location="cpu").eval()
    mean, std = tuple(task.hparams.mean), tuple(task.hparams.std)  # the task normalizes its [0, 1] input
    return Source(
        "classification",
        hparams["model"],
        task.eval_model,
        int(hparams["num_classes"]),
        task.hparams.class_names,
        None,
        mean,
        std,
    )


def from_preset(name: str, weights: Path, num_classes: int | None) -> Source:
    """Builds preset `name` with `weights` (a state dict or checkpoint file); the classes from the weights."""
    task_name = task_of(name)
    num_classes = num_classes or _classes_in(weights, task_name)
    if task_name == "detection":
        import detection

        model = detection.build_model(name, num_classes=num_classes, weights=str(weights))
    elif task_name == "segmentation":
        import segmentation

        model = segmentation.build_model(name, num_classes=num_classes, weights=str(weights))
    else:
        from backbones import create_model

        model = create_model(name, num_classes=num_classes, weights=str(weights))
    return Source(task_name, name, model.eval(), num_classes)


_CLASS_KEYS = {
    "detection": ("roi_heads.box_predictor.cls_score.weight",),
    "segmentation": ("classifier.4.weight", "classifier.predictor.weight"),
    "classification": ("fc.weight", "head.fc.weight", "classifier.weight", "head.weight"),
}


def _classes_in(weights: Path, task: str) -> int:
    state = read_state_dict(weights)
    for key, value in state.items():
        if key.endswith(_CLASS_KEYS[task]):
            return int(value.shape[0])
    raise WeightsError(
        f"{str(weights)!r}: no class layer ({', '.join(_CLASS_KEYS[task])}) to count classes; pass --num-classes"
    )


def exportable(source: Source) -> tuple[nn.Module, tuple[str, ...], dict[str, Any]]:
    """The module to export (images in [0, 1] -> outputs), its output names and its metadata."""
    if source.task == "detection":
        from detection.export import ExportableRCNN, detection_metadata

        module = ExportableRCNN(source.model).eval()
        metadata = detection_metadata(
            module, architecture=source.architecture, class_names=source.class_names,
            label_to_category_id=source.label_to_category_id,
        )  # fmt: skip
        return module, module.output_names, metadata
    if source.task == "segmentation":
        from segmentation.export import OUTPUT_NAMES, exportable_segmenter, segmentation_metadata

        metadata = segmentation_metadata(
            architecture=source.architecture, num_classes=source.num_classes, class_names=source.class_names,
            mean=source.mean, std=source.std,
        )  # fmt: skip
        return exportable_segmenter(source.model, source.mean, source.std), OUTPUT_NAMES, metadata
    metadata = base_metadata(
        task="classification", architecture=source.architecture, num_classes=source.num_classes,
        class_names=source.class_names, mean=source.mean, std=source.std,
    )  # fmt: skip
    metadata["postprocess"] = "softmax over the logits gives the class probabilities"
    return NormalizedModel(source.model, source.mean, source.std).eval(), ("logits",), metadata


def check_sizes(height: int, width: int, dynamic_size: bool) -> list[tuple[int, int]]:
    """Three image sizes for the parity check: the export size, and with a dynamic size two others."""
    if not dynamic_size:
        return [(height, width)] * 3
    return [(height, width), (width, height), (max(height * 3 // 4 + 5, 32), max(width + width // 5 + 3, 32))]


def reference_of(source: Source, module: nn.Module):
    """The eager model as the export is called: torchvision's detector itself, else the wrapped module."""
    return source.model if source.task == "detection" else module


def export_model(
    source: Source,
    output: Path,
    *,
    fmt: str,
    dynamic_batch: bool,
    dynamic_size: bool,
    image_size: tuple[int, int],
    check: bool = True,
) -> dict[str, Any]:
    """Exports `source` to `output`, writes its JSON, and (with `check`) compares it with the eager model."""
    if dynamic_batch and source.task == "detection":
        raise ValueError(
            "--dynamic-batch: detectors export with a batch of 1 (their per-image proposals and NMS run in a "
            "Python loop over the batch); run images one at a time"
        )
    import torch

    module, output_names, metadata = exportable(source)
    sizes = check_sizes(*image_size, dynamic_size)
    images = check_images(sizes, seed=0)
    example = torch.stack([images[0]] * (2 if dynamic_batch else 1))
    metadata = write_exported(
        module, example, output, metadata=metadata, output_names=output_names, dynamic_batch=dynamic_batch,
        dynamic_size=dynamic_size,
    )  # fmt: skip
    if check:
        check_export(reference_of(source, module), load_exported(output), images, task=source.task, batch=dynamic_batch)
    return metadata


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="a task checkpoint (.ckpt) or a preset name (with --weights)")
    parser.add_argument("--format", choices=tuple(FORMATS), required=True, help="export: .pt2 program; onnx: .onnx")
    parser.add_argument("--dynamic-batch", action="store_true", help="any batch size (classifiers and DeepLab)")
    parser.add_argument("--dynamic-size", action="store_true", help="any image height and width")
    parser.add_argument("--output", type=Path, help="the model file (default: beside the source, or the preset's name)")
    parser.add_argument("--weights", type=Path, help="with a preset: its weights (state dict or checkpoint file)")
    parser.add_argument(
        "--num-classes", type=int, help="with a preset: the number of classes (default: from --weights)"
    )
    parser.add_argument("--image-size", type=int, nargs=2, metavar=("H", "W"), help="export and check size")
    parser.add_argument("--no-check", dest="check", action="store_false", help="skip the parity check")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    suffix = FORMATS[args.format]
    source_path = Path(args.source)
    try:
        if source_path.suffix == ".ckpt" or source_path.is_file():
            if args.weights is not None:
                raise ValueError("--weights goes with a preset name; a checkpoint holds its weights")
            source = from_checkpoint(source_path) if source_path.is_file() else _missing(source_path)
            output = args.output or source_path.with_suffix(suffix)
        else:
            if args.weights is None:
                raise ValueError(f"{args.source!r} is no checkpoint file; for a preset give its --weights FILE")
            source = from_preset(args.source, args.weights, args.num_classes)
            output = args.output or Path(args.source + suffix)
        if output.suffix != suffix:
            raise ValueError(f"--output {str(output)!r}: --format {args.format} writes a {suffix} file")
        image_size = tuple(args.image_size or DEFAULT_SIZES[source.task])
        smallest = MIN_DYNAMIC_SIZE if args.dynamic_size else 32
        if min(image_size) < smallest:
            raise ValueError(
                f"--image-size {' '.join(map(str, image_size))}; give at least {smallest} pixels per side"
                + (
                    " with --dynamic-size (smaller maps at stride 32 fix the size in the graph)"
                    if args.dynamic_size
                    else ""
                )
            )
        metadata = export_model(
            source, output, fmt=args.format, dynamic_batch=args.dynamic_batch, dynamic_size=args.dynamic_size,
            image_size=image_size, check=args.check,
        )  # fmt: skip
    except ExportMismatch as error:
        print(f"export_model: the export differs from the eager model: {error}", file=sys.stderr)
        return 1
    except (OSError, ValueError, KeyError, ImportError) as error:  # WeightsError is a ValueError
        print(f"export_model: error: {error}", file=sys.stderr)
        return 2
    checked = "checked against the eager model" if args.check else "not checked"
    axes = ", ".join(metadata["input"]["dynamic_axes"]) or "none"
    print(f"wrote {output} and {sidecar_path(output)} ({source.task}, dynamic axes: {axes}; {checked})")
    return 0


def _missing(path: Path):
    raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")


if __name__ == "__main__":
    sys.exit(main())
