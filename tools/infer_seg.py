"""Colour-overlay pictures of a segmentation checkpoint's predictions, for an image or a folder.

    python tools/infer_seg.py runs/deeplabv3plus_r18_os16_shapes/lightning_logs/version_0/checkpoints/last.ckpt image.jpg
    python tools/infer_seg.py last.ckpt images/ --output overlays/ --alpha 0.6 --size 512 --save-masks

The model runs on the inference fast path by default: batch norms folded into the convs, channels-last
memory and ``torch.inference_mode()``; ``--no-fuse`` runs it as trained, ``--compile`` compiles the backbone.
An exported model (``tools/export_model.py``: .pt2 or .onnx with its .json beside it) runs as exported.

Writes ``<stem>_overlay.png`` (and with ``--save-masks`` ``<stem>_mask.png``, the class indices)
per image into the output folder. Files are written to a temporary name and renamed, so an
interrupted run never leaves a half-written picture. Bad input (a missing, corrupt, truncated or foreign
checkpoint, one that would run code, an unreadable image) prints one line naming it and exits with status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import NoReturn

import cv2
import numpy as np
import torch
from torch.nn import functional as F

from backbones.export import load_exported
from backbones.fusion import prepare_for_inference
from backbones.data.images import ImageFileError, read_rgb_image
from backbones.weights import load_task_checkpoint
from segmentation.data import IMAGE_EXTENSIONS
from segmentation.task import SegmentationTask

EXPORTED_SUFFIXES = (".pt2", ".onnx")
BACKGROUND_NAMES = ("__background__", "background")


def palette(num_classes: int) -> np.ndarray:
    """Pascal VOC's colour map: (num_classes, 3) uint8 RGB, distinct colours from the bits of the index."""
    colours = np.zeros((num_classes, 3), np.uint8)
    for index in range(num_classes):
        value, r, g, b = index, 0, 0, 0
        for shift in range(7, -1, -1):
            r |= (value & 1) << shift
            g |= ((value >> 1) & 1) << shift
            b |= ((value >> 2) & 1) << shift
            value >>= 3
        colours[index] = (r, g, b)
    return colours


def overlay(image: np.ndarray, labels: np.ndarray, class_names: list[str], alpha: float = 0.5) -> np.ndarray:
    """Blends the class colours into an RGB image (H, W, 3); background classes stay uncoloured."""
    colours = palette(len(class_names))
    coloured = np.array([name not in BACKGROUND_NAMES for name in class_names])
    blend = coloured[labels][..., None]
    mixed = (1 - alpha) * image.astype(np.float32) + alpha * colours[labels].astype(np.float32)
    return np.where(blend, mixed, image).round().astype(np.uint8)


@torch.inference_mode()
def predict(task: SegmentationTask, image: np.ndarray, size: int | None = None) -> np.ndarray:
    """Class indices (H, W) of an RGB uint8 image, optionally run with its shorter side at ``size``."""
    height, width = image.shape[:2]
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float().div(255).to(task.device)  # (1, 3, H, W)
    if size is not None:
        scale = size / min(height, width)
        x = F.interpolate(x, size=(round(height * scale), round(width * scale)), mode="bilinear", antialias=True)
    logits = task(x)["out"]
    logits = F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False)
    return logits.argmax(1)[0].to(torch.uint8).cpu().numpy()


def write_png_atomic(path: Path, picture: np.ndarray) -> None:
    """Writes a PNG through a temporary file in the same folder and a rename."""
    ok, data = cv2.imencode(".png", picture)
    if not ok:
        raise OSError(f"could not encode {path}")
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as f:
            f.write(data.tobytes())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def list_images(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    images = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not images:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {path}")
    return images


def load_task(checkpoint: Path, device: str) -> SegmentationTask:
    task = load_task_checkpoint(SegmentationTask, checkpoint, map_location=device)  # downloads nothing
    return task.eval()


def load_model(args: argparse.Namespace) -> tuple:
    """(model, class names) of a checkpoint or an exported model (.pt2/.onnx with its JSON, CPU)."""
    if args.checkpoint.suffix in EXPORTED_SUFFIXES:  # tools/export_model.py's output: called like the task
        model = load_exported(args.checkpoint)
        return model, model.category_names
    task = load_task(args.checkpoint, args.device)
    prepare_for_inference(
        task.model, fuse=not args.no_fuse, channels_last=not args.no_fuse, compile_backbone=args.compile
    )
    return task, task.hparams.class_names or [str(i) for i in range(task.hparams.num_classes)]


def fail(error: Exception) -> NoReturn:
    """Bad input: one line on stderr naming the culprit, exit status 2 (as for bad arguments)."""
    print(f"infer_seg: error: {error}", file=sys.stderr)
    raise SystemExit(2)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "checkpoint", type=Path, help="a SegmentationTask checkpoint (.ckpt) or an exported model (.pt2, .onnx)"
    )
    parser.add_argument("input", type=Path, help="an image or a folder of images")
    parser.add_argument("--output", type=Path, default=Path("outputs/segmentation"), help="output folder")
    parser.add_argument("--alpha", type=float, default=0.5, help="colour weight in the overlay, 0..1")
    parser.add_argument("--size", type=int, default=None, help="run with the shorter side at this size")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--save-masks", action="store_true", help="also write the class indices as PNG")
    parser.add_argument("--no-fuse", action="store_true", help="keep the batch norms and the default memory layout")
    parser.add_argument("--compile", action="store_true", help="torch.compile the backbone")
    args = parser.parse_args(argv)
    for path, what in ((args.checkpoint, "checkpoint"), (args.input, "input")):
        if not path.exists():
            parser.error(f"{what} {str(path)!r} does not exist")
    if args.checkpoint.is_dir():
        parser.error(f"checkpoint {str(args.checkpoint)!r} is a folder; give the .ckpt file")
    if not 0 <= args.alpha <= 1:
        parser.error(f"--alpha={args.alpha}; choose a value in 0..1")
    if args.size is not None and args.size < 1:
        parser.error(f"--size={args.size}; give a positive shorter side in pixels")
    return args


def main(argv: list[str] | None = None) -> list[Path]:
    args = parse_args(argv)
    try:
        images = list_images(args.input)
        task, class_names = load_model(args)
        args.output.mkdir(parents=True, exist_ok=True)
    except (OSError, ValueError) as error:  # WeightsError is a ValueError
        fail(error)
    written = []
    for path in images:
        try:
            image = read_rgb_image(path)
        except (OSError, ImageFileError) as error:  # corrupt or truncated: the pictures so far are complete
            fail(error)
        labels = predict(task, image, args.size)
        target = args.output / f"{path.stem}_overlay.png"
        write_png_atomic(target, cv2.cvtColor(overlay(image, labels, class_names, args.alpha), cv2.COLOR_RGB2BGR))
        written.append(target)
        if args.save_masks:
            write_png_atomic(args.output / f"{path.stem}_mask.png", labels)
        print(f"{path} -> {target}")
    return written


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
