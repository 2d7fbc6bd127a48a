"""Score a COCO results JSON from any detector against COCO ground truth.

The results are a list of ``{"image_id", "category_id", "bbox": [x, y, w, h], "score"[, "segmentation": RLE]}``,
the format of the COCO test server. Every image of the annotations is evaluated. The summary and a per-category
table go to stdout; ``--output`` writes the metrics as JSON (nan as null), atomically.

Example:
    python tools/eval_det.py --annotations instances_val2017.json --results detections.json \
        --iou-type bbox segm --output metrics.json
    python tools/eval_det.py --annotations instances_val2017.json --results detections.json --bootstrap 1000
    python tools/eval_det.py --annotations instances_val2017.json --results detections.json \
        --iou-type bbox segm --report report/ --images val2017/ --score-threshold 0.5

``--report DIR`` also writes ``DIR/report.html`` (offline: its figures are PNG files beside it) and
``DIR/metrics.json``: PR curves, a confusion matrix, TIDE's error breakdown, the COCO analyzer's curves and the
images that lose most (drawn when ``--images`` gives their folder); see ``detection.report``.

Exit status: 0 on success, 2 on bad input (a one-line message on stderr, and no output file).
"""

import argparse
import os
import sys

from backbones.cli_utils import positive_int, reports_errors
from backbones.data.files import write_json
from detection.bootstrap import bootstrap, match_once
from detection.evaluation import (
    BACKENDS,
    IOU_TYPES,
    evaluate_results,
    format_per_category_table,
    load_ground_truth,
    read_json,
    resolve_backend,
    validate_results,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(prog="eval_det", description=__doc__.split("\n\n")[0])
    parser.add_argument("--annotations", required=True, help="ground-truth COCO instances JSON")
    parser.add_argument("--results", required=True, help="COCO results JSON (a list of detections)")
    parser.add_argument("--iou-type", nargs="+", choices=IOU_TYPES, default=["bbox"], help="default: bbox")
    parser.add_argument("--backend", choices=BACKENDS, default="auto", help="default: auto (faster_coco_eval if any)")
    parser.add_argument("--output", help="write the metrics JSON here")
    parser.add_argument("--report", metavar="DIR", help="write report.html, its figures and metrics.json in DIR")
    parser.add_argument("--images", metavar="DIR", help="the images' folder, to draw the worst images in the report")
    parser.add_argument(
        "--score-threshold",
        type=float,
        default=0.5,
        help="the report's confusion matrix and PR operating points take the detections scoring >= this (default: 0.5)",
    )
    parser.add_argument(
        "--confusion-iou", type=float, default=0.5, help="the report's confusion matrix IoU: 0.5, 0.55, ... or 0.95"
    )
    parser.add_argument("--bootstrap", type=positive_int, metavar="N", help="95%% intervals from N image resamplings")
    parser.add_argument("--seed", type=int, default=0, help="seed of the resamplings (default: 0)")
    return parser.parse_args(argv)


@reports_errors("eval_det")
def main(argv: list[str] | None = None) -> int:
    """Run the evaluation; return the exit status."""
    args = parse_args(argv)
    iou_types = list(dict.fromkeys(args.iou_type))
    backend = resolve_backend(args.backend)
    _check_output_directory(args.output)
    if args.report:
        from detection.report import check_report_options

        check_report_options(
            images_dir=args.images, confusion_iou=args.confusion_iou, score_threshold=args.score_threshold
        )
    coco_gt = load_ground_truth(args.annotations, backend)
    results = read_json(args.results)
    validate_results(results, coco_gt, iou_types, source=args.results)

    metrics, per_category, intervals = {}, {}, {}
    for iou_type in iou_types:
        stats, per_category[iou_type] = evaluate_results(coco_gt, results, iou_type, backend)
        print(format_per_category_table(per_category[iou_type], iou_type))
        metrics.update(stats)
        if args.bootstrap and results:
            intervals[iou_type] = _intervals(coco_gt, results, iou_type, stats, per_category[iou_type], args)
    if args.output:
        report = {"annotations": args.annotations, "results": args.results, "backend": backend}
        if intervals:
            report["bootstrap"] = {"draws": args.bootstrap, "seed": args.seed, "confidence": 0.95,
                                   "intervals": intervals}  # fmt: skip
        write_json(args.output, {**report, "metrics": metrics, "per_category": per_category}, indent=2)
        print(f"metrics written to {args.output}")
    if args.report:
        from detection.report import write_detection_report

        write_detection_report(
            coco_gt,
            results,
            args.report,
            iou_types=iou_types,
            images_dir=args.images,
            score_threshold=args.score_threshold,
            confusion_iou=args.confusion_iou,
            sources={"annotations": args.annotations, "results": args.results},
        )
        print(f"report written to {os.path.join(args.report, 'report.html')}")
    return 0


def _intervals(coco_gt, results: list[dict], iou_type: str, stats: dict, per_category: dict, args) -> dict:
    """Print and return the 95% intervals of the 12 numbers and of the per-category AP."""
    result = bootstrap(match_once(coco_gt, results, iou_type), args.bootstrap, args.seed)
    names = list(stats)
    lines = [f"{iou_type} 95% intervals ({args.bootstrap} image resamplings, seed {args.seed}):"]
    lines += [f"{name:<12} {stats[name]:.3f}  [{low:.3f}, {high:.3f}]"
              for name, low, high in zip(names, *result.interval, strict=True)]  # fmt: skip
    print("\n".join(lines))
    return {"metrics": dict(zip(names, _bounds(result.interval), strict=True)),
            "per_category": dict(zip(per_category, _bounds(result.per_category_interval), strict=True))}  # fmt: skip


def _bounds(interval) -> list[list[float]]:
    """(2, n) lower and upper bounds as n [low, high] pairs."""
    return [[low, high] for low, high in zip(*interval.tolist(), strict=True)]


def _check_output_directory(output: str | None) -> None:
    # Fail before a long evaluation rather than after it.
    if output and not os.path.isdir(os.path.dirname(os.path.abspath(output))):
        raise FileNotFoundError(f"{output}: the output directory does not exist")


if __name__ == "__main__":
    sys.exit(main())
