"""Colour-overlay pictures of a segmentation checkpoint's predictions, for an image or a folder.

    python tools/infer_seg.py runs/deeplabv3plus_r18_os16_shapes/lightning_logs/version_0/checkpoints/last.ckpt \\
        image.jpg
    python tools/infer_seg.py last.ckpt images/ --output overlays/ --alpha 0.6 --size 512 --save-masks \\
        [--recursive] [--batch-size 8] [--precision bf16] [--device cuda] [--no-fuse] [--compile]
    python tools/infer_seg.py last.ckpt images/ --mode slide --crop-size 512 1024 --stride 341 683 \\
        [--scales 0.5 0.75 1.0 1.25 1.5 1.75] [--flip] [--window-batch-size 8]

Writes `<stem>_overlay.png` (and with `--save-masks` `<stem>_mask.png`, the class indices) per image
into the output folder (under `--recursive`, into the image's subfolder of it). A batch holds images of
one size. The model runs on the inference fast path by default: batch norms folded into the convs,
channels-last memory and `torch.inference_mode()`; `--no-fuse` runs it as trained, `--compile`
compiles the backbone. `--precision bf16|fp16` autocasts the network; the logits are upsampled in fp32.
`--mode`, `--crop-size`, `--stride`, `--scales`, `--flip` and `--window-batch-size` choose the inference mode
(`segmentation.inference.SegmentationInference`, the task's `inference` option): whole image (the default),
sliding window, and multi-scale + flip (scales relative to the image, or to `--size` when given).

`--format cityscapes` (a model of Cityscapes' 19 train-id classes) writes only `<stem>.png` of
Cityscapes label ids instead, the files cityscapesScripts' evaluation reads (one per
`{city}_{seq}_{frame}`, at the image's size):

    python tools/infer_seg.py last.ckpt data/cityscapes/leftImg8bit/val --recursive --format cityscapes \\
        --output results/

Files are written to a temporary name and renamed, so an interrupted run never leaves a half-written
picture (a bad image stops the run after the pictures of the images before it). Bad input (a missing,
corrupt, truncated or foreign checkpoint, one that would run code, an unreadable image) prints one
line naming it and exits with status 2.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from backbones.cli_utils import add_inference_arguments, autocast, for_each_batch, output_paths, reports_errors
from backbones.data.files import list_images, write_image
from backbones.data.images import read_rgb_image
from backbones.export import EXPORTED_SUFFIXES, load_exported
from backbones.fusion import prepare_for_inference
from backbones.tasks import load_task
from segmentation.benchmark_datasets import train_ids_to_label_ids
from segmentation.inference import INFERENCE_MODES, SegmentationInference
from segmentation.label_tables import CITYSCAPES_CLASSES, class_palette
from segmentation.label_tables import voc_palette as palette  # noqa: F401 (the tool's colour map, kept by name)

BACKGROUND_NAMES = ("__background__", "background")


@dataclass
class Segmenter:
    """A segmentation model ready to run, and the names of its classes."""

    model: nn.Module  # (N, 3, H, W) float images in [0, 1] -> {"out": (N, num_classes, H, W) logits}
    class_names: list[str]


def load_model(
    checkpoint: Path, device: torch.device, *, fuse: bool = True, compile_backbone: bool = False
) -> Segmenter:
    """The model of a `SegmentationTask` checkpoint (which normalizes its input itself), on `device`,
    prepared for inference (fused unless `fuse=False`), or an exported one (`tools/export_model.py`: .pt2 or
    .onnx with its JSON beside it), run as exported on the CPU."""
    if Path(checkpoint).suffix in EXPORTED_SUFFIXES:
        model = load_exported(checkpoint)
        return Segmenter(model, model.class_names)
    task = load_task(checkpoint, task="segmentation", tool="tools/infer_seg.py", map_location=device)  # no download
    prepare_for_inference(task.model, fuse=fuse, channels_last=fuse, compile_backbone=compile_backbone)
    names = task.hparams.class_names or [str(i) for i in range(task.hparams.num_classes)]
    return Segmenter(task.to(device).eval(), list(names))


def overlay(image: np.ndarray, labels: np.ndarray, class_names: list[str], alpha: float = 0.5) -> np.ndarray:
    """Blends the class colours into an RGB image (H, W, 3); background classes stay uncoloured."""
    colours = class_palette(class_names)  # a benchmark's own colours for its classes
    coloured = np.array([name not in BACKGROUND_NAMES for name in class_names])
    blend = coloured[labels][..., None]
    mixed = (1 - alpha) * image.astype(np.float32) + alpha * colours[labels].astype(np.float32)
    return np.where(blend, mixed, image).round().astype(np.uint8)


@torch.inference_mode()
def predict(
    model: nn.Module,
    images: list[np.ndarray],
    device: torch.device,
    precision: str = "fp32",
    size: int | None = None,
    inference: SegmentationInference | None = None,
) -> Tensor:
    """Scores (N, num_classes, H, W), on `device`, of RGB uint8 images of one size (H, W, 3), optionally run with
    their shorter side at `size` and upsampled back: fp32 logits, or with `inference` scales or flip float64
    averaged probabilities (`SegmentationInference`; None: whole image)."""
    x = torch.from_numpy(np.stack(images)).to(device).permute(0, 3, 1, 2).float().div(255)  # (N, 3, H, W)
    height, width = x.shape[-2:]
    if size is not None:
        scale = size / min(height, width)
        x = F.interpolate(x, size=(round(height * scale), round(width * scale)), mode="bilinear", antialias=True)

    def forward(batch: Tensor) -> Tensor:
        with autocast(device, precision):
            return model(batch)["out"].float()

    return (inference or SegmentationInference())(forward, x, (height, width))


def segment_batch(
    segmenter: Segmenter, batch: list[tuple[int, np.ndarray]], overlays: list[Path], masks: list[Path], args
) -> None:
    """Segments a batch of `(index, image)` pairs of one size and writes `overlays[index]` (and with
    `--save-masks` `masks[index]`) of each."""
    indices, images = zip(*batch, strict=True)
    labels = predict(segmenter.model, list(images), args.device, args.precision, args.size, args.inference).argmax(1)
    for index, image, classes in zip(indices, images, labels.to(torch.uint8).cpu().numpy(), strict=True):
        if args.format == "cityscapes":
            write_image(masks[index], train_ids_to_label_ids(classes))
            continue
        write_image(overlays[index], overlay(image, classes, segmenter.class_names, args.alpha))
        if args.save_masks:
            write_image(masks[index], classes)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="infer_seg", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "checkpoint", type=Path, help="a SegmentationTask checkpoint (.ckpt) or an exported model (.pt2, .onnx)"
    )
    add_inference_arguments(parser, default_output="outputs/segmentation")
    parser.add_argument("--alpha", type=float, default=0.5, help="colour weight in the overlay, 0..1")
    parser.add_argument("--size", type=int, default=None, help="run with the shorter side at this size")
    parser.add_argument("--save-masks", action="store_true", help="also write the class indices as PNG")
    parser.add_argument(
        "--format", choices=("overlay", "cityscapes"), default="overlay",
        help="overlay: colour overlays (and --save-masks); cityscapes: only <stem>.png of Cityscapes label ids",
    )  # fmt: skip
    mode = parser.add_argument_group("inference mode (as the task's `inference` option)")
    mode.add_argument("--mode", choices=INFERENCE_MODES, default="whole", help="whole image or sliding window")
    mode.add_argument("--crop-size", type=int, nargs=2, metavar=("H", "W"), help="slide: window size")
    mode.add_argument("--stride", type=int, nargs=2, metavar=("H", "W"), help="slide: step, at most the crop")
    mode.add_argument("--scales", type=float, nargs="+", help="multi-scale: sizes relative to the image")
    mode.add_argument("--flip", action="store_true", help="also infer each view mirrored left-right")
    mode.add_argument("--window-batch-size", type=int, default=8, help="slide: windows per forward pass")
    args = parser.parse_args(argv)
    if args.format == "cityscapes" and args.save_masks:
        parser.error("--save-masks writes train ids beside the label ids: the evaluation would find two files a frame")
    if not 0 <= args.alpha <= 1:
        parser.error(f"--alpha={args.alpha}; choose a value in 0..1")
    if args.size is not None and args.size < 1:
        parser.error(f"--size={args.size}; give a positive shorter side in pixels")
    try:
        args.inference = SegmentationInference(
            mode=args.mode, crop_size=args.crop_size, stride=args.stride, scales=args.scales, flip=args.flip,
            window_batch_size=args.window_batch_size,
        )  # fmt: skip
    except ValueError as error:  # its message names the option and what it takes
        parser.error(str(error))
    return args


@reports_errors("infer_seg")
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    images = list_images(args.source, recursive=args.recursive, exclude=args.output)
    overlays = output_paths(images, args.source, args.output, "_overlay.png")
    masks = output_paths(images, args.source, args.output, ".png" if args.format == "cityscapes" else "_mask.png")
    segmenter = load_model(args.checkpoint, args.device, fuse=not args.no_fuse, compile_backbone=args.compile)
    if args.format == "cityscapes" and segmenter.class_names != list(CITYSCAPES_CLASSES):
        raise ValueError(
            f"--format cityscapes needs a model of Cityscapes' 19 train-id classes ({', '.join(CITYSCAPES_CLASSES)}); "
            f"{args.checkpoint} has {segmenter.class_names}"
        )
    rate = for_each_batch(
        images, read_rgb_image, args.batch_size, lambda batch: segment_batch(segmenter, batch, overlays, masks, args),
        key=lambda image: image.shape, description="infer_seg",  # a batch is one tensor: its images have one size
    )  # fmt: skip
    written = {"cityscapes": "Cityscapes label-id PNGs", "overlay": "overlays"}[args.format]
    written += " and masks" if args.save_masks else ""
    print(f"wrote {len(images)} {written} to {args.output} ({rate:.2f} images/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
