"""Score predicted label PNGs against label PNGs: mIoU, pixel accuracy, mean accuracy, IoU and accuracy per class.

A prediction and a label are a pair when their paths relative to their folders are the same once the
suffixes are taken off: `tools/infer_seg.py --save-masks` writes `<stem>_mask.png` (the default
`--pred-suffix`) beside `<stem>_overlay.png` (not a prediction: ignored), and a label is `<stem>.png` (the
default `--label-suffix`). Every prediction needs its label and every label its prediction: a file without
its pair is an error that names it. The confusion matrix is `segmentation.evaluation.SegmentationEvaluator`'s
(the one `train_seg.py validate` computes), summed image by image.

Example:
    python tools/infer_seg.py last.ckpt data/shapes/val/images --output predictions/ --save-masks
    python tools/eval_seg.py --predictions predictions/ --labels data/shapes/val/masks \\
        --class-names __background__ circle square triangle --report report/ --images data/shapes/val/images \\
        --bootstrap 1000 --seed 0 --output metrics.json
    # Cityscapes (train-id labels, images and predictions named after the frame)
    python tools/eval_seg.py --predictions predictions/ --labels gtFine/val --num-classes 19 \\
        --pred-suffix _leftImg8bit_mask.png --label-suffix _gtFine_labelTrainIds.png

`--reduce-zero-label` reads label 0 as ignored and label k as class k - 1 (ADE20K's annotations, as
MMSegmentation's `reduce_zero_label`). `--report DIR` writes `DIR/report.html` (offline: its figures are PNG
files beside it) and `DIR/metrics.json`: the confusion matrix, IoU and accuracy bars, the images with the lowest
mIoU (drawn over the images when `--images` gives their folder) and, with `--bootstrap N`, 95% intervals from N
seeded resamplings of the images; see `segmentation.report`. `--output` writes the same metrics as JSON.

Exit status: 0 on success, 2 on bad input (a one-line message on stderr, and no output file).
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from backbones.cli_utils import reports_errors
from backbones.data.files import IMAGE_SUFFIXES, is_image, write_json
from backbones.data.images import read_rgb_image
from segmentation.datasets import read_label_mask
from segmentation.evaluation import SegmentationEvaluator, format_per_class_table
from segmentation.report import segmentation_metrics, write_segmentation_report

MAX_NAMES = 5  # files named in an error


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(prog="eval_seg", description=__doc__.split("\n\n")[0])
    parser.add_argument("--predictions", required=True, help="folder of predicted label PNGs (searched recursively)")
    parser.add_argument("--labels", required=True, help="folder of ground-truth label PNGs (searched recursively)")
    classes = parser.add_mutually_exclusive_group(required=True)
    classes.add_argument("--num-classes", type=int, help="classes 0..K-1 (named by their number)")
    classes.add_argument("--class-names", nargs="+", help="a name per class, in label order")
    parser.add_argument("--ignore-index", type=int, default=255, help="label not counted (default: 255)")
    parser.add_argument("--reduce-zero-label", action="store_true", help="label 0 is ignored, label k is class k-1")
    parser.add_argument("--pred-suffix", default="_mask.png", help="predictions end so (default: _mask.png)")
    parser.add_argument("--label-suffix", default=".png", help="labels end so (default: .png)")
    parser.add_argument("--output", help="write the metrics JSON here")
    parser.add_argument("--report", metavar="DIR", help="write report.html, its figures and metrics.json in DIR")
    parser.add_argument("--images", metavar="DIR", help="the images' folder, to draw the worst images in the report")
    parser.add_argument("--image-suffix", help="images end so (default: any image extension after the stem)")
    parser.add_argument("--bootstrap", type=int, default=0, metavar="N", help="resamplings for the intervals")
    parser.add_argument("--seed", type=int, default=0, help="seed of the resamplings (default: 0)")
    parser.add_argument("--confidence", type=float, default=0.95, help="level of the intervals (default: 0.95)")
    parser.add_argument("--num-worst", type=int, default=8, help="the lowest-mIoU images to list (default: 8)")
    args = parser.parse_args(argv)
    if args.num_classes is not None and not 1 <= args.num_classes <= 256:
        parser.error(f"--num-classes={args.num_classes}; give 1 to 256 (labels are 8-bit)")
    if not 0 <= args.ignore_index <= 255:
        parser.error(f"--ignore-index={args.ignore_index}; give a label value 0..255")
    if args.bootstrap < 0 or args.num_worst < 0:
        parser.error(f"--bootstrap={args.bootstrap}, --num-worst={args.num_worst}; give numbers >= 0")
    if not 0 < args.confidence < 1:
        parser.error(f"--confidence={args.confidence}; choose a value in (0, 1)")
    if args.images is None and args.image_suffix is not None:
        parser.error("--image-suffix needs --images")
    return args


def pair_files(predictions: Path, labels: Path, pred_suffix: str, label_suffix: str) -> list[tuple[str, Path, Path]]:
    """``(key, prediction, label)`` for every pair, sorted by key (the relative path without its suffix).

    Raises:
        FileNotFoundError: a folder is missing or holds no file of its suffix, or a file has no pair.
    """
    found = {}
    for role, folder, suffix in (("prediction", predictions, pred_suffix), ("label", labels, label_suffix)):
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: the {role}s folder does not exist")
        found[role] = _files_by_key(folder, suffix)
        if not found[role]:
            raise FileNotFoundError(f"{folder}: no {role} files ending in {suffix!r} (in it or its subfolders)")
    for role, other, folder, suffix in (
        ("prediction", "label", labels, label_suffix),
        ("label", "prediction", predictions, pred_suffix),
    ):
        unpaired = sorted(found[role].keys() - found[other].keys())
        if unpaired:
            names = ", ".join(str(found[role][key]) for key in unpaired[:MAX_NAMES])
            more = f" and {len(unpaired) - MAX_NAMES} more" if len(unpaired) > MAX_NAMES else ""
            raise FileNotFoundError(
                f"{len(unpaired)} {role} file(s) without a {other} ({folder}/<same path>{suffix}): {names}{more}"
            )
    return [(key, found["prediction"][key], found["label"][key]) for key in sorted(found["label"])]


def _files_by_key(folder: Path, suffix: str) -> dict[str, Path]:
    files = {}
    for path in folder.rglob(f"*{suffix}"):
        relative = path.relative_to(folder).as_posix()
        if path.is_file() and not any(part.startswith(".") for part in Path(relative).parts):
            files[relative[: -len(suffix)]] = path
    return files


def read_pair(prediction_path: Path, label_path: Path, args: argparse.Namespace, num_classes: int):
    """The prediction and label of one pair as (H, W) uint8, checked: same size, values that are classes."""
    prediction, label = read_label_mask(prediction_path), read_label_mask(label_path)
    if prediction.shape != label.shape:
        raise ValueError(
            f"{prediction_path} is {prediction.shape[1]}x{prediction.shape[0]} but its label {label_path} is "
            f"{label.shape[1]}x{label.shape[0]} (width x height); predict at the label's size"
        )
    if args.reduce_zero_label:  # MMSegmentation's: 0 -> ignored, k -> k - 1, the ignore value stays
        ignored = (label == 0) | (label == args.ignore_index)
        label = np.where(ignored, args.ignore_index, label.astype(np.int64) - 1).astype(np.uint8)
    for path, values, allowed in ((label_path, label, args.ignore_index), (prediction_path, prediction, None)):
        present = np.unique(values)
        bad = present[(present >= num_classes) & (present != allowed)]
        if bad.size:
            extra = f" and are not the ignore index {allowed}" if allowed is not None else ""
            raise ValueError(f"{path}: values {bad.tolist()} are outside the classes 0..{num_classes - 1}{extra}")
    return prediction, label


def find_image(images: Path, key: str, suffix: str | None) -> Path:
    """The image of a pair: ``images/<key><suffix>``, or without a suffix ``images/<key>.<an image extension>``."""
    if suffix:
        candidates = [images / f"{key}{suffix}"]
    else:
        stem = images / key
        candidates = sorted(path for path in stem.parent.glob(f"{glob.escape(stem.name)}.*") if is_image(path))
    for path in candidates:
        if path.is_file():
            return path
    expected = images / f"{key}{suffix or '.<' + '|'.join(ext[1:] for ext in IMAGE_SUFFIXES) + '>'}"
    raise FileNotFoundError(f"no image for {key!r} in --images: {expected} does not exist")


@reports_errors("eval_seg")
def main(argv: list[str] | None = None) -> int:
    """Run the evaluation; return the exit status."""
    args = parse_args(argv)
    names: Sequence[str] = args.class_names or [str(k) for k in range(args.num_classes)]
    if args.output and not os.path.isdir(os.path.dirname(os.path.abspath(args.output))):
        raise FileNotFoundError(f"{args.output}: the output directory does not exist")  # before the long part
    if args.images and not os.path.isdir(args.images):
        raise FileNotFoundError(f"{args.images}: the images folder does not exist")
    pairs = pair_files(Path(args.predictions), Path(args.labels), args.pred_suffix, args.label_suffix)
    evaluator = SegmentationEvaluator(len(names), ignore_index=args.ignore_index, class_names=names, per_image=True)
    for _, prediction_path, label_path in pairs:
        prediction, label = read_pair(prediction_path, label_path, args, len(names))
        evaluator.update(torch.from_numpy(prediction)[None], torch.from_numpy(label)[None])
    evaluator.compute()
    metrics = segmentation_metrics(
        evaluator.total_confusion,
        evaluator.per_image_statistics,
        names,
        image_names=[key for key, _, _ in pairs],
        num_bootstrap=args.bootstrap,
        seed=args.seed,
        confidence=args.confidence,
        num_worst=args.num_worst,
    )
    print(format_per_class_table(evaluator.per_class(), f"{len(pairs)} images: per-class metrics (fractions)"))
    print("  ".join(f"{key} {value:.4f}" for key, value in metrics["summary"].items()))
    if args.bootstrap:
        for key, (low, high) in metrics["bootstrap"]["summary"].items():
            print(f"{key} {args.confidence:.0%} interval [{low:.4f}, {high:.4f}] ({args.bootstrap} resamplings)")
    sources = {"predictions": args.predictions, "labels": args.labels, "images": args.images}
    if args.output:
        write_json(args.output, {"sources": sources, **metrics}, indent=1)
        print(f"metrics written to {args.output}")
    if args.report:

        def load_image(index: int):
            key, prediction_path, label_path = pairs[index]
            prediction, label = read_pair(prediction_path, label_path, args, len(names))
            image = read_rgb_image(find_image(Path(args.images), key, args.image_suffix))
            return image, label, prediction

        page = write_segmentation_report(
            args.report,
            metrics,
            load_image=load_image if args.images else None,
            ignore_index=args.ignore_index,
            sources=sources,
        )
        print(f"report written to {page}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
