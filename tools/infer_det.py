"""Run a detection checkpoint on an image or a folder: pictures with boxes, labels, scores and masks,
plus a COCO results JSON.

    python tools/infer_det.py runs/mask_rcnn_r18_fpn_shapes/checkpoints/last.ckpt IMAGE_OR_FOLDER \
        --output out/ [--score-threshold 0.5] [--annotations instances_val.json]
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

from detection.evaluation import to_coco_results
from detection.task import DetectionTask

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
    """An RGB uint8 (3, H, W) tensor, decoded with OpenCV."""
    bgr = cv2.imdecode(np.fromfile(path, dtype=np.uint8), cv2.IMREAD_COLOR)
    if bgr is None:
        raise ValueError(f"{path}: not a readable image")
    return torch.from_numpy(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)).permute(2, 0, 1).contiguous()


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
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=path.suffix)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def image_ids_for(images: list[Path], annotations: str | None) -> list[int]:
    if annotations is None:
        return list(range(1, len(images) + 1))
    with open(annotations) as f:
        by_name = {Path(im["file_name"]).name: im["id"] for im in json.load(f)["images"]}
    missing = [p.name for p in images if p.name not in by_name]
    if missing:
        raise ValueError(f"{annotations}: no image entry for {', '.join(missing[:5])}")
    return [by_name[p.name] for p in images]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a DetectionTask checkpoint (.ckpt)")
    parser.add_argument("source", help="an image or a folder of images")
    parser.add_argument("--output", default="predictions", help="folder for the pictures and results.json")
    parser.add_argument("--score-threshold", type=float, default=0.5, help="drawn boxes only; the JSON keeps all")
    parser.add_argument("--annotations", help="a COCO JSON whose image ids the results should use")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    try:
        images = list_images(Path(args.source))
        image_ids = image_ids_for(images, args.annotations)
        if not Path(args.checkpoint).is_file():
            raise FileNotFoundError(f"{args.checkpoint}: no such checkpoint")
        task = DetectionTask.load_from_checkpoint(args.checkpoint, map_location=args.device, weights_only=True)
    except (FileNotFoundError, ValueError, KeyError, RuntimeError) as error:
        print(f"infer_det: error: {error}", file=sys.stderr)
        return 2
    model = task.model.eval().to(args.device)
    names = task.hparams.category_names or []
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
    iou_types = ("bbox", "segm") if task.is_mask_model else ("bbox",)
    results = to_coco_results(predictions, image_ids, task.hparams.label_to_category_id, iou_types)
    write_atomically(output / "results.json", lambda tmp: Path(tmp).write_text(json.dumps(results)))
    print(f"wrote {len(images)} pictures and {len(results)} results to {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
