"""Run a detection checkpoint on an image or a folder: pictures with boxes, labels, scores and masks,
plus a COCO results JSON.

    python tools/infer_det.py runs/mask_rcnn_r18_fpn_shapes/lightning_logs/version_0/checkpoints/last.ckpt \\
        IMAGE_OR_FOLDER --output out/ [--recursive] [--batch-size 8] [--precision bf16] [--score-threshold 0.5] \\
        [--annotations instances_val.json] [--device cuda] [--no-fuse] [--compile]

Writes `<stem>.jpg` per image (under `--recursive`, in the image's subfolder of the output folder) and
`results.json`. Each image's masks are encoded (RLE) as soon as it is done, so memory does not grow
with the number of images. The model runs on the inference fast path by default: batch norms folded
into the convs, channels-last memory and `torch.inference_mode()` (the same detections to float
rounding); `--no-fuse` runs it as trained. `--precision bf16|fp16` autocasts the network; the
detections come out in fp32.

Files are written to a temporary name and renamed; results.json only once every image is done (a bad
image stops the run after the pictures of the images before it). Bad input (a missing, corrupt,
truncated or foreign checkpoint, one that would run code, an unreadable image, a malformed
--annotations JSON) prints one line naming it and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from torch import Tensor, nn

from backbones.cli_utils import add_inference_arguments, autocast, for_each_batch, output_paths, reports_errors
from backbones.data.files import list_images, write_image, write_json
from backbones.data.images import read_rgb_image
from backbones.export import EXPORTED_SUFFIXES, load_exported
from backbones.fusion import prepare_for_inference
from backbones.tasks import load_task
from detection.drawing import draw_detections
from detection.evaluation import to_coco_results

MASK_THRESHOLD = 0.5  # as COCOEvaluator's
IOU_TYPES = {False: ("bbox",), True: ("bbox", "segm")}  # without, with masks


@dataclass
class Detector:
    """A detector ready to run, with what its outputs need: class names and COCO category ids."""

    model: nn.Module  # torchvision's convention: a list of (3, H, W) float images in [0, 1] -> a dict per image
    class_names: list[str]
    label_to_category_id: dict[int, int] | None
    iou_types: tuple[str, ...]


def load_model(
    checkpoint: Path, device: torch.device, *, fuse: bool = True, compile_backbone: bool = False
) -> Detector:
    """The detector of a `DetectionTask` checkpoint, on `device`, prepared for inference (fused unless `fuse=False`),
    or an exported one (`tools/export_model.py`: .pt2 or .onnx with its JSON beside it), run as exported on the CPU."""
    if Path(checkpoint).suffix in EXPORTED_SUFFIXES:
        model = load_exported(checkpoint)
        return Detector(model, model.class_names, model.label_to_category_id, IOU_TYPES[model.has_masks])
    task = load_task(checkpoint, task="detection", tool="tools/infer_det.py", map_location=device)
    model = prepare_for_inference(
        task.model.to(device), fuse=fuse, channels_last=fuse, compile_backbone=compile_backbone
    )
    return Detector(
        model, list(task.hparams.class_names or []), task.hparams.label_to_category_id, IOU_TYPES[task.is_mask_model]
    )


def read_image(path: Path) -> Tensor:
    """An RGB uint8 (3, H, W) tensor, decoded with OpenCV; a corrupt or truncated file is an `ImageFileError`."""
    return torch.from_numpy(read_rgb_image(path)).permute(2, 0, 1).contiguous()


def predict(model: nn.Module, images: list[Tensor], device: torch.device, precision: str = "fp32") -> list[dict]:
    """Detections of uint8 (3, H, W) images, on the CPU: `boxes`, `scores` in fp32, `labels` and, for
    Mask R-CNN, `masks` (N, H, W) bool (thresholded on the device: a quarter of the float masks' bytes)."""
    with torch.inference_mode():
        inputs = [image.to(device).float().div(255) for image in images]
        with autocast(device, precision):
            outputs = model(inputs)
        return [{key: _finish(key, value) for key, value in output.items()} for output in outputs]


def _finish(key: str, value: Tensor) -> Tensor:
    if key == "masks":
        value = value[:, 0] > MASK_THRESHOLD
    elif value.is_floating_point():
        value = value.float()  # under autocast a detector may return half-precision outputs
    return value.cpu()


def draw(image: Tensor, prediction: dict, names: list[str], threshold: float) -> np.ndarray:
    """The image (RGB, (H, W, 3) uint8) with the detections scored `threshold` or more drawn on it
    (`detection.drawing.draw_detections`: masks in a bright class colour, labels inside the image)."""
    keep = prediction["scores"] >= threshold
    labels = [
        f"{names[int(label)] if int(label) < len(names) else int(label)} {score:.2f}"
        for label, score in zip(prediction["labels"][keep], prediction["scores"][keep], strict=True)
    ]
    masks = prediction["masks"][keep] if "masks" in prediction else None
    return draw_detections(image, prediction["boxes"][keep], prediction["labels"][keep], labels, masks)


def detect_batch(
    detector: Detector, batch: list[tuple[int, Tensor]], pictures: list[Path], image_ids: list[int], args
) -> list[dict]:
    """Detects, draws and encodes a batch of `(index, image)` pairs (the picture and COCO id of image `index`
    are `pictures[index]`, `image_ids[index]`); returns its COCO results. Its dense masks end with it."""
    indices, images = zip(*batch, strict=True)
    results = []
    predictions = predict(detector.model, list(images), args.device, args.precision)
    for index, image, prediction in zip(indices, images, predictions, strict=True):
        write_image(pictures[index], draw(image, prediction, detector.class_names, args.score_threshold))
        results += to_coco_results([prediction], [image_ids[index]], detector.label_to_category_id, detector.iou_types)
    return results


def image_ids_for(images: list[Path], annotations: str | None, root: Path | None = None) -> list[int]:
    """1, 2, ... in the order of `images`, or the ids the COCO file `annotations` gives their file names.

    An image is found by its path relative to `root` (the source folder), as a COCO `file_name` is
    written (`a/0001.jpg`); a file name without a folder matches by base name, which must then be unique
    among the images (`a/0001.jpg` and `b/0001.jpg` would share one id).
    """
    if annotations is None:
        return list(range(1, len(images) + 1))
    try:
        entries = json.loads(Path(annotations).read_text())["images"]
        by_path = {PurePosixPath(im["file_name"]).as_posix(): im["id"] for im in entries}
    except json.JSONDecodeError as error:
        where = f"line {error.lineno}, column {error.colno}"
        raise ValueError(f"{annotations}: invalid JSON at {where}: {error.msg}") from error
    except (KeyError, TypeError) as error:
        raise ValueError(f"{annotations}: not a COCO file with 'images' entries of 'id' and 'file_name'") from error
    relative = [_relative(image, root) for image in images]
    ids, missing = [], []
    for image, path in zip(images, relative, strict=True):
        if path in by_path:
            ids.append(by_path[path])
        elif image.name in by_path:  # the JSON names base names only: they must be unique among the images
            clashes = [other for other, p in zip(images, relative, strict=True) if other.name == image.name]
            if len(clashes) > 1:
                raise ValueError(
                    f"{annotations}: file_name {image.name!r} (a base name) matches {len(clashes)} images: "
                    f"{', '.join(map(str, clashes[:3]))}; give file names relative to the image folder"
                )
            ids.append(by_path[image.name])
        else:
            missing.append(path)
    if missing:
        raise ValueError(f"{annotations}: no image entry for {', '.join(missing[:5])}")
    return ids


def _relative(image: Path, root: Path | None) -> str:
    if root is None or not root.is_dir():
        return image.name
    return image.relative_to(root).as_posix()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="infer_det", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "checkpoint", type=Path, help="a DetectionTask checkpoint (.ckpt) or an exported model (.pt2, .onnx)"
    )
    add_inference_arguments(parser, default_output="predictions")
    parser.add_argument("--score-threshold", type=float, default=0.5, help="drawn boxes only; the JSON keeps all")
    parser.add_argument("--annotations", help="a COCO JSON whose image ids the results should use")
    args = parser.parse_args(argv)
    if not 0 <= args.score_threshold <= 1:
        parser.error(f"--score-threshold={args.score_threshold}; choose a value in 0..1")
    return args


@reports_errors("infer_det")
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    images = list_images(args.source, recursive=args.recursive, exclude=args.output)
    pictures = output_paths(images, args.source, args.output, ".jpg")
    image_ids = image_ids_for(images, args.annotations, args.source)
    detector = load_model(args.checkpoint, args.device, fuse=not args.no_fuse, compile_backbone=args.compile)
    results = []
    rate = for_each_batch(
        images, read_image, args.batch_size,
        lambda batch: results.extend(detect_batch(detector, batch, pictures, image_ids, args)), description="infer_det",
    )  # fmt: skip
    write_json(args.output / "results.json", results)
    print(f"wrote {len(images)} pictures and {len(results)} results to {args.output} ({rate:.2f} images/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
