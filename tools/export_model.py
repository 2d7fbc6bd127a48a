"""Export a trained model to a `torch.export` program (.pt2) or an ONNX file, with a JSON beside it, and check it.

    python tools/export_model.py runs/.../checkpoints/last.ckpt --format onnx --dynamic-size
    python tools/export_model.py deeplabv3plus_r18 --weights deeplab.pth --format export --dynamic-batch --dynamic-size
    python tools/export_model.py faster_rcnn_r50_fpn --weights frcnn.pth --format onnx --output frcnn.onnx

The source is a checkpoint of any task (`backbones.tasks`; built as trained, nothing downloaded) or a
preset name with a `--weights` file; the task's `TaskExport` says what is exported and how it is checked.
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
from pathlib import Path
from typing import Any

from backbones.export import (
    FORMATS,
    ExportMismatch,
    ExportSource,
    TaskExport,
    check_export,
    check_images,
    load_exported,
    sidecar_path,
    write_exported,
)
from backbones.tasks import load_task, task_of
from backbones.weights import read_state_dict

# An export example with a 1x1 map at stride 32 makes torch.export specialize the size (1 is special).
MIN_DYNAMIC_SIZE = 64


def from_checkpoint(path: Path) -> ExportSource:
    """Reads a checkpoint of any registered task (`weights_only`, nothing downloaded)."""
    task = load_task(path, map_location="cpu").eval()
    return adapter_of(task.hparams.model).source(task)


def from_preset(name: str, weights: Path, num_classes: int | None) -> ExportSource:
    """Builds preset `name` with `weights` (a state dict or checkpoint file); the classes from the weights."""
    adapter = adapter_of(name)
    if num_classes is None:
        try:
            num_classes = adapter.count_classes(read_state_dict(weights), repr(str(weights)))
        except ValueError as error:
            raise ValueError(f"{error}; pass --num-classes") from error
    model = adapter.build(name, num_classes=num_classes, weights=str(weights))
    return ExportSource(adapter.task, name, model.eval(), num_classes)


def adapter_of(model: str) -> TaskExport:
    """The export adapter of the task that builds `model`."""
    return task_of(model).export_adapter()


def check_sizes(height: int, width: int, dynamic_size: bool) -> list[tuple[int, int]]:
    """Three image sizes for the parity check: the export size, and with a dynamic size two others."""
    if not dynamic_size:
        return [(height, width)] * 3
    return [(height, width), (width, height), (max(height * 3 // 4 + 5, 32), max(width + width // 5 + 3, 32))]


def export_model(
    source: ExportSource,
    output: Path,
    *,
    fmt: str,
    dynamic_batch: bool,
    dynamic_size: bool,
    image_size: tuple[int, int],
    check: bool = True,
) -> dict[str, Any]:
    """Exports `source` to `output`, writes its JSON, and (with `check`) compares it with the eager model."""
    adapter = adapter_of(source.architecture)
    if dynamic_batch and adapter.batch_error:
        raise ValueError(f"--dynamic-batch: {adapter.batch_error}")
    import torch

    module, output_names, metadata = adapter.exportable(source)
    sizes = check_sizes(*image_size, dynamic_size)
    images = check_images(sizes, seed=0)
    example = torch.stack([images[0]] * (2 if dynamic_batch else 1))
    metadata = write_exported(
        module, example, output, metadata=metadata, output_names=output_names, dynamic_batch=dynamic_batch,
        dynamic_size=dynamic_size,
    )  # fmt: skip
    if check:
        reference = adapter.reference(source, module)
        check_export(reference, load_exported(output), images, task=source.task, batch=dynamic_batch)
    return metadata


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="a task checkpoint (.ckpt) or a preset name (with --weights)")
    parser.add_argument("--format", choices=tuple(FORMATS), required=True, help="export: .pt2 program; onnx: .onnx")
    parser.add_argument("--dynamic-batch", action="store_true", help="any batch size (not detectors)")
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
        image_size = tuple(args.image_size or adapter_of(source.architecture).default_size)
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
