"""Run a detection checkpoint on an image or a folder: pictures with boxes, labels, scores and masks,
plus a COCO results JSON.

    python tools/infer_det.py runs/mask_rcnn_r18_fpn_shapes/lightning_logs/version_0/checkpoints/last.ckpt IMAGE_OR_FOLDER \
        --output out/ [--score-threshold 0.5] [--annotations instances_val.json] [--no-fuse] [--compile]

The model runs on the inference fast path by default: batch norms folded into the convs, channels-last
memory and `torch.inference_mode()` (the same detections to float rounding); `--no-fuse` runs it as trained.
An exported model (`tools/export_model.py`: .pt2 or .onnx with its .json beside it) runs as exported.

Files are written to a temporary name and renamed; results.json only once every image is done. Bad input
(a missing, corrupt, truncated or foreign checkpoint, one that would run code, an unreadable image, a
malformed --annotations JSON) prints one line naming it and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np
import torch
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

from backbones.export import load_exported
from backbones.fusion import prepare_for_inference
from backbones.weights import load_task_checkpoint
from detection.data import read_rgb_image
from detection.evaluation import to_coco_results
from detection.task import DetectionTask

EXPORTED_SUFFIXES = (".pt2", ".onnx")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}


def list_images(source: Path) -> list[Path]:
    if source.is_file():
        return [source]
    if source.is_dir():
        images = sorted(p for p in source.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not images:
            raise FileNotFoundError(f"{source}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in this folder")
        return images
    raise FileNotFoundError(f"{source}: no such image or folder")


def read_image(path: Path) -> torch.Tensor:
    """An RGB uint8 (3, H, W) tensor, decoded with OpenCV; a corrupt or truncated file is an `ImageFileError`."""
    return torch.from_numpy(read_rgb_image(path)).permute(2, 0, 1).contiguous()


def draw(image: torch.Tensor, prediction: dict, names: list[str], threshold: float) -> np.ndarray:
    keep = prediction["scores"] >= threshold
    labels = [
        f"{names[int(label)] if int(label) < len(names) else int(label)} {score:.2f}"
        for label, score in zip(prediction["labels"][keep], prediction["scores"][keep])
    ]
    canvas = image
    if "masks" in prediction and keep.any():
        canvas = draw_segmentation_masks(canvas, prediction["masks"][keep, 0] > 0.5, alpha=0.45)
    canvas = draw_bounding_boxes(canvas, prediction["boxes"][keep], labels=labels, width=2)
    return cv2.cvtColor(canvas.permute(1, 2, 0).numpy(), cv2.COLOR_RGB2BGR)


def write_atomically(path: Path, write) -> None:
    """Calls `write(temporary_path)`, then renames the file to `path`: never a half-written file at `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=path.suffix)
    os.close(fd)
    try:
        if write(tmp) is False:  # cv2.imwrite reports failure by its result
            raise OSError(f"could not write {path}")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def image_ids_for(images: list[Path], annotations: str | None) -> list[int]:
    if annotations is None:
        return list(range(1, len(images) + 1))
    try:
        entries = json.loads(Path(annotations).read_text())["images"]
        by_name = {Path(im["file_name"]).name: im["id"] for im in entries}
    except json.JSONDecodeError as error:
        where = f"line {error.lineno}, column {error.colno}"
        raise ValueError(f"{annotations}: invalid JSON at {where}: {error.msg}") from error
    except (KeyError, TypeError) as error:
        raise ValueError(f"{annotations}: not a COCO file with 'images' entries of 'id' and 'file_name'") from error
    missing = [p.name for p in images if p.name not in by_name]
    if missing:
        raise ValueError(f"{annotations}: no image entry for {', '.join(missing[:5])}")
    return [by_name[p.name] for p in images]


def load_model(args: argparse.Namespace) -> tuple:
    """(model, category names, label -> category id, has masks) of a checkpoint or an exported model."""
    if Path(args.checkpoint).suffix in EXPORTED_SUFFIXES:  # tools/export_model.py's output, with its JSON
        model = load_exported(args.checkpoint)
        return model, model.category_names, model.label_to_category_id, model.has_masks
    task = load_task_checkpoint(DetectionTask, args.checkpoint, map_location=args.device)
    model = prepare_for_inference(
        task.model.to(args.device), fuse=not args.no_fuse, channels_last=not args.no_fuse, compile_backbone=args.compile
    )
    return model, task.hparams.category_names or [], task.hparams.label_to_category_id, task.is_mask_model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a DetectionTask checkpoint (.ckpt) or an exported model (.pt2, .onnx)")
    parser.add_argument("source", help="an image or a folder of images")
    parser.add_argument("--output", default="predictions", help="folder for the pictures and results.json")
    parser.add_argument("--score-threshold", type=float, default=0.5, help="drawn boxes only; the JSON keeps all")
    parser.add_argument("--annotations", help="a COCO JSON whose image ids the results should use")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-fuse", action="store_true", help="keep the batch norms and the default memory layout")
    parser.add_argument("--compile", action="store_true", help="torch.compile the backbone and FPN")
    args = parser.parse_args(argv)
    try:
        images = list_images(Path(args.source))
        image_ids = image_ids_for(images, args.annotations)
        model, names, label_to_category_id, is_mask_model = load_model(args)
        Path(args.output).mkdir(parents=True, exist_ok=True)
    except (OSError, ValueError) as error:  # WeightsError, ImageFileError are ValueErrors
        print(f"infer_det: error: {error}", file=sys.stderr)
        return 2
    output = Path(args.output)
    predictions = []
    with torch.inference_mode():
        for path in images:
            try:
                image = read_image(path)
            except ValueError as error:
                print(f"infer_det: error: {error}", file=sys.stderr)
                return 2
            prediction = {k: v.cpu() for k, v in model([image.float().div(255).to(args.device)])[0].items()}
            predictions.append(prediction)
            picture = draw(image, prediction, names, args.score_threshold)
            write_atomically(output / f"{path.stem}.jpg", lambda tmp: cv2.imwrite(tmp, picture))
    iou_types = ("bbox", "segm") if is_mask_model else ("bbox",)
    results = to_coco_results(predictions, image_ids, label_to_category_id, iou_types)
    write_atomically(output / "results.json", lambda tmp: Path(tmp).write_text(json.dumps(results)))
    print(f"wrote {len(images)} pictures and {len(results)} results to {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
