"""Seconds of COCO evaluation with each backend, and the per-image cost of Mask R-CNN's mask post-processing.

The `eval` mode of tools/benchmark.py; also runs alone:

    python tools/benchmark_coco.py --images 5000 [--json eval.json]
    python tools/benchmark_coco.py --images 5000 --bootstrap 1000 [--detections-per-image 100]

The synthetic set is COCO-like: 480x640 images, 7 objects each (80 categories), 42 results per image
(5 jittered copies of each object and 7 false positives; `--detections-per-image` adds false positives),
rectangles as polygons (ground truth) and compressed RLEs (results). Both backends score the same results
through `detection.evaluation`. Wall and process CPU seconds are both reported: on a shared machine the CPU
seconds are the steadier measure. `--bootstrap N` instead times `detection.bootstrap` (bbox): pycocotools'
matching once, then N resamplings of the images, and checks the unweighted result against pycocotools.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import math
import statistics
import sys
import time

import numpy as np
import torch
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torchvision.models.detection.roi_heads import paste_masks_in_image

from backbones.cli_utils import reports_errors
from backbones.data.files import write_json
from detection.bootstrap import WeightedAccumulator, bootstrap, match_once
from detection.evaluation import binarize_masks, encode_masks, evaluate_results, load_ground_truth, resolve_backend

EVAL_IMAGE_SIZE = (480, 640)  # (H, W), COCO-like


def _rectangles(rng, count: int, low: float, high: float) -> np.ndarray:
    """(count, 4) XYWH boxes inside the eval image."""
    height, width = EVAL_IMAGE_SIZE
    wh = rng.uniform(low, high, (count, 2))
    return np.concatenate([rng.uniform(0, 1, (count, 2)) * ([width, height] - wh), wh], 1)


def synthetic_coco(
    num_images: int, seed: int = 0, detections_per_image: int = 42, masks: bool = True
) -> tuple[dict, list[dict]]:
    """Ground truth (7 boxes per image, 80 categories) and results (5 jittered copies of each and
    ``detections_per_image - 35`` false positives), each with a rectangle as polygon (ground truth) or RLE
    (results; boxes only without ``masks``)."""
    if detections_per_image < 36:
        raise ValueError(f"detections_per_image={detections_per_image}; give at least 36 (35 copies + 1 false)")
    rng, (height, width) = np.random.default_rng(seed), EVAL_IMAGE_SIZE
    false_positives = detections_per_image - 35
    images, annotations, results = [], [], []
    for image_id in range(1, num_images + 1):
        images.append({"id": image_id, "height": height, "width": width, "file_name": f"{image_id:06d}.jpg"})
        boxes, categories = _rectangles(rng, 7, 8, 200), rng.integers(1, 81, 7)
        jitter = rng.normal(0, 0.08, (35, 4)) * np.repeat(boxes[:, 2:], 5, 0).repeat(2, 1)
        detections = np.concatenate([np.repeat(boxes, 5, 0) + jitter, _rectangles(rng, false_positives, 8, 100)])
        detections[:, :2] = detections[:, :2].clip(0, [width - 2, height - 2])
        detections[:, 2:] = detections[:, 2:].clip(1, [width, height] - detections[:, :2])
        polygons = [[x, y, x + w, y, x + w, y + h, x, y + h] for x, y, w, h in np.concatenate([boxes, detections])]
        for (x, y, w, h), category, polygon in zip(boxes.tolist(), categories.tolist(), polygons[:7], strict=True):
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": category, "bbox": [x, y, w, h],
                "area": w * h, "segmentation": [polygon], "iscrowd": 0,
            })  # fmt: skip
        rles = mask_util.frPyObjects(polygons[7:], height, width) if masks else [None] * detections_per_image
        labels = np.concatenate([np.repeat(categories, 5), rng.integers(1, 81, false_positives)]).tolist()
        for box, category, score, rle in zip(
            detections.tolist(), labels, rng.uniform(0, 1, detections_per_image).tolist(), rles, strict=True
        ):
            results.append({"image_id": image_id, "category_id": category, "bbox": box, "score": score})
            if masks:
                results[-1]["segmentation"] = {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
    categories = [{"id": i, "name": f"class{i}"} for i in range(1, 81)]
    return {"images": images, "annotations": annotations, "categories": categories}, results


def mask_postprocess_seconds(num_masks: int = 100, repeats: int = 3) -> dict:
    """Per image: torchvision's paste of 28x28 mask logits into the image (inside Mask R-CNN) and our
    threshold + RLE encoding (one pycocotools call for all masks)."""
    g, (height, width) = torch.Generator().manual_seed(0), EVAL_IMAGE_SIZE
    masks = torch.rand(num_masks, 1, 28, 28, generator=g)
    xy = torch.rand(num_masks, 2, generator=g) * torch.tensor([width * 0.7, height * 0.7])
    boxes = torch.cat([xy, xy + 10 + 190 * torch.rand(num_masks, 2, generator=g)], 1)
    paste, encode = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        pasted = paste_masks_in_image(masks, boxes, (height, width))
        middle = time.perf_counter()
        encode_masks(binarize_masks(pasted))
        paste.append(middle - start)
        encode.append(time.perf_counter() - middle)
    return {"masks": num_masks, "paste_s": statistics.median(paste), "encode_s": statistics.median(encode)}


def eval_benchmark(num_images: int, detections_per_image: int = 42) -> dict:
    """Seconds of `detection.evaluation.evaluate_results` (loadRes, evaluate, accumulate, summarize) per backend."""
    dataset, results = synthetic_coco(num_images, detections_per_image=detections_per_image)
    backends = ["pycocotools"] + ["faster_coco_eval"] * (resolve_backend("auto") == "faster_coco_eval")
    report = {"images": num_images, "image_size": list(EVAL_IMAGE_SIZE), "ground_truth": len(dataset["annotations"]),
              "detections": len(results), "seconds": {}, "cpu_seconds": {}, "stats": {}}  # fmt: skip
    for backend in backends:
        coco_gt = load_ground_truth(_as_coco(dataset), backend)
        for iou_type in ("bbox", "segm"):
            start, cpu = time.perf_counter(), time.process_time()
            stats, _ = evaluate_results(coco_gt, results, iou_type, backend, verbose=False)
            report["seconds"].setdefault(backend, {})[iou_type] = time.perf_counter() - start
            report["cpu_seconds"].setdefault(backend, {})[iou_type] = time.process_time() - cpu
            report["stats"].setdefault(backend, {}).update(stats)
    if len(backends) == 2:
        a, b = (report["stats"][name] for name in backends)
        both = [k for k in a if not (math.isnan(a[k]) and math.isnan(b[k]))]
        report["stats_max_abs_difference"] = max(abs(a[k] - b[k]) for k in both)
    report["per_image"] = mask_postprocess_seconds()
    return report


def eval_markdown(report: dict) -> list[str]:
    counts = f"{report['ground_truth']} objects, {report['detections']} detections"
    lines = [f"COCO evaluation of {report['images']} images ({counts}):", ""]
    lines += ["| backend | bbox s | segm s | bbox CPU s | segm CPU s |", "|---|---:|---:|---:|---:|"]
    for name, wall in report["seconds"].items():
        cpu = report["cpu_seconds"][name]
        lines.append(f"| {name} | {wall['bbox']:.2f} | {wall['segm']:.2f} | {cpu['bbox']:.2f} | {cpu['segm']:.2f} |")
    if "faster_coco_eval" in report["seconds"]:
        ratios = [
            f"{iou_type} {report[key]['pycocotools'][iou_type] / report[key]['faster_coco_eval'][iou_type]:.1f}x"
            for key in ("cpu_seconds", "seconds")
            for iou_type in ("bbox", "segm")
        ]
        lines.append(f"- faster_coco_eval over pycocotools: CPU {', '.join(ratios[:2])}; wall {', '.join(ratios[2:])}")
    if "stats_max_abs_difference" in report:
        lines.append(f"- backends agree to {report['stats_max_abs_difference']:.1e} (24 summary numbers)")
    p = report["per_image"]
    height, width = report["image_size"]
    lines.append(f"- per image, {p['masks']} masks at {height}x{width}: paste into the image "
                 f"{1000 * p['paste_s']:.0f} ms, threshold + RLE encode {1000 * p['encode_s']:.0f} ms")  # fmt: skip
    return lines


def bootstrap_benchmark(num_images: int, num_draws: int, detections_per_image: int = 100) -> dict:
    """Seconds of `detection.bootstrap` on boxes: the matching once, then `num_draws` resamplings; and the largest
    difference of the unweighted numbers from pycocotools' (a COCOeval run, whose time is what each draw would
    cost without the bootstrap's reweighting)."""
    dataset, results = synthetic_coco(num_images, detections_per_image=detections_per_image, masks=False)
    report = {"images": num_images, "ground_truth": len(dataset["annotations"]), "detections": len(results),
              "draws": num_draws, "seconds": {}, "cpu_seconds": {}}  # fmt: skip

    def timed(name, function, *args):
        start, cpu = time.perf_counter(), time.process_time()
        value = function(*args)
        report["seconds"][name], report["cpu_seconds"][name] = time.perf_counter() - start, time.process_time() - cpu
        return value

    matches = timed("match_once", match_once, _as_coco(dataset), results, "bbox")
    accumulator = timed("prepare", WeightedAccumulator, matches)
    result = timed("draws", bootstrap, accumulator, num_draws, 0)
    print(f"bootstrap: {report['cpu_seconds']} CPU s; now one pycocotools run for the check", flush=True)
    reference = timed("pycocotools", _pycocotools_stats, _as_coco(dataset), results)
    report["point_max_abs_difference"] = float(np.nanmax(np.abs(result.stats - reference)))
    report["AP"] = [float(result.stats[0]), *result.interval[:, 0].tolist()]
    report["AP_draws_mean"] = float(np.nanmean(result.draws[:, 0]))
    return report


def bootstrap_markdown(report: dict) -> list[str]:
    wall, cpu, draws = report["seconds"], report["cpu_seconds"], report["draws"]
    lines = [f"Bootstrap of bbox AP on {report['images']} images ({report['ground_truth']} objects, "
             f"{report['detections']} detections), {draws} draws:", "",
             "| step | wall s | CPU s |", "|---|---:|---:|"]  # fmt: skip
    names = {
        "match_once": "match_once (COCOeval matching, once)",
        "prepare": "sort and compress the matches",
        "draws": f"{draws} resamplings",
        "pycocotools": "pycocotools evaluate + accumulate + summarize (once, for the check)",
    }
    lines += [f"| {label} | {wall[key]:.2f} | {cpu[key]:.2f} |" for key, label in names.items()]
    ap, low, high = report["AP"]
    difference = report["point_max_abs_difference"]
    lines.append(f"- {1000 * cpu['draws'] / draws:.1f} ms CPU per draw; AP {ap:.4f}, 95% interval [{low:.4f}, "
                 f"{high:.4f}], mean of the draws {report['AP_draws_mean']:.4f}; the unweighted 12 numbers differ "
                 f"from pycocotools' by {difference:.1e}")  # fmt: skip
    return lines


def _pycocotools_stats(coco_gt, results: list[dict]) -> np.ndarray:
    """COCOeval's 12 box numbers (nan for -1), run as pycocotools' README does."""
    with contextlib.redirect_stdout(io.StringIO()):
        coco_eval = COCOeval(coco_gt, coco_gt.loadRes(copy.deepcopy(results)), "bbox")
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    return np.where(coco_eval.stats < 0, np.nan, coco_eval.stats)


def _as_coco(dataset: dict):
    """A pycocotools COCO of a fresh copy of `dataset` (`load_ground_truth` converts it for the backend)."""
    coco = COCO()
    coco.dataset = copy.deepcopy(dataset)
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


@reports_errors("benchmark_coco")
def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        prog="benchmark_coco", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=5000, help="synthetic images to evaluate")
    parser.add_argument("--bootstrap", type=int, metavar="N", help="time N bootstrap draws instead (bbox)")
    parser.add_argument("--detections-per-image", type=int, help="default: 42, or 100 with --bootstrap")
    parser.add_argument("--json", help="write the report here")
    args = parser.parse_args(argv)
    if args.images < 1:
        parser.error(f"--images={args.images}; give a positive number")
    if args.bootstrap is not None and args.bootstrap < 1:
        parser.error(f"--bootstrap={args.bootstrap}; give a positive number of draws")
    if args.detections_per_image is not None and args.detections_per_image < 36:
        parser.error(f"--detections-per-image={args.detections_per_image}; give at least 36")
    if args.bootstrap:
        report = bootstrap_benchmark(args.images, args.bootstrap, args.detections_per_image or 100)
        print("\n".join(bootstrap_markdown(report)))
    else:
        report = eval_benchmark(args.images, args.detections_per_image or 42)
        print("\n".join(eval_markdown(report)))
    if args.json:
        write_json(args.json, report, indent=2)
    return report


if __name__ == "__main__":
    sys.exit(0 if isinstance(main(), dict) else 2)
