"""Compare two COCO results files on the same ground truth: B - A per metric and per category, with paired
bootstrap intervals.

Each of the N draws resamples the images with replacement, the same draws for A and B (the PASCAL VOC
retrospective's paired bootstrap); a difference whose 95% interval excludes 0 is more than the noise of the test
set. ``P(B>A)`` is the share of the draws where B scores higher. COCOeval's matching runs once per file
(``detection.bootstrap``); the point estimates are pycocotools' numbers.

Example:
    python tools/compare_det.py --annotations instances_val2017.json baseline.json candidate.json \
        --iou-type bbox segm --bootstrap 1000 --output comparison.json

Exit status: 0 on success, 2 on bad input (a one-line message on stderr, and no output file).
"""

import argparse
import math
import os
import sys

from backbones.cli_utils import positive_int, reports_errors
from backbones.data.files import write_json
from detection.bootstrap import match_once, paired_bootstrap
from detection.evaluation import (
    IOU_TYPES,
    STAT_NAMES,
    category_names,
    load_ground_truth,
    read_json,
    validate_results,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(prog="compare_det", description=__doc__.split("\n\n")[0])
    parser.add_argument("--annotations", required=True, help="ground-truth COCO instances JSON")
    parser.add_argument("results", nargs=2, metavar=("A", "B"), help="two COCO results JSON files; B - A is shown")
    parser.add_argument("--iou-type", nargs="+", choices=IOU_TYPES, default=["bbox"], help="default: bbox")
    parser.add_argument("--bootstrap", type=positive_int, default=1000, metavar="N", help="draws (default: 1000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the draws (default: 0)")
    parser.add_argument("--output", help="write the comparison JSON here")
    return parser.parse_args(argv)


@reports_errors("compare_det")
def main(argv: list[str] | None = None) -> int:
    """Run the comparison; return the exit status."""
    args = parse_args(argv)
    iou_types = list(dict.fromkeys(args.iou_type))
    if args.output and not os.path.isdir(os.path.dirname(os.path.abspath(args.output))):
        raise FileNotFoundError(f"{args.output}: the output directory does not exist")
    coco_gt = load_ground_truth(args.annotations, "pycocotools")
    runs = []
    for path in args.results:
        results = read_json(path)
        validate_results(results, coco_gt, iou_types, source=path)
        if not results:
            raise ValueError(f"{path}: no detections to compare")
        runs.append(results)
    categories = category_names(coco_gt.loadCats(sorted(coco_gt.getCatIds())))
    report = {"annotations": args.annotations, "a": args.results[0], "b": args.results[1],
              "draws": args.bootstrap, "seed": args.seed, "confidence": 0.95}  # fmt: skip
    for iou_type in iou_types:
        a, b = (match_once(coco_gt, results, iou_type) for results in runs)
        paired = paired_bootstrap(a, b, args.bootstrap, args.seed)
        metrics = [f"{iou_type}_{name}" for name in STAT_NAMES]
        rows = {"metrics": _rows(metrics, paired.a.stats, paired.b.stats, paired.interval, paired.b_better),
                "per_category": _rows(categories, paired.a.per_category, paired.b.per_category,
                                      paired.per_category_interval, paired.per_category_b_better)}  # fmt: skip
        print(f"{iou_type}: B - A, 95% paired intervals ({args.bootstrap} image resamplings, seed {args.seed})")
        print(format_table(rows["metrics"], "metric"))
        print(format_table(rows["per_category"], "category (AP)"))
        report[iou_type] = rows
    if args.output:
        write_json(args.output, report, indent=2)
        print(f"comparison written to {args.output}")
    return 0


def _rows(names, a, b, interval, b_better) -> dict[str, dict]:
    """Per name: A, B, B - A, its interval and P(B > A), nan as None."""
    return {
        name: {
            "a": _clean(va),
            "b": _clean(vb),
            "difference": _clean(vb - va),
            "interval": [_clean(lo), _clean(hi)],
            "b_better": _clean(share),
        }
        for name, va, vb, lo, hi, share in zip(names, a, b, *interval, b_better, strict=True)
    }


def _clean(value: float) -> float | None:
    return None if math.isnan(value) else float(value)


def _show(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "n/a"
    return f"{value:+.3f}" if signed else f"{value:.3f}"


def format_table(rows: dict[str, dict], title: str) -> str:
    """An aligned text table of :func:`_rows`' output."""
    width = max([len(title), *map(len, rows)])
    lines = [f"{title:<{width}}  {'A':>6} {'B':>6} {'B - A':>7}  {'95% interval':>17}  P(B>A)"]
    for name, row in rows.items():
        low, high = row["interval"]
        interval = f"[{_show(low, True)}, {_show(high, True)}]"
        values = f"{_show(row['a']):>6} {_show(row['b']):>6} {_show(row['difference'], True):>7}"
        lines.append(f"{name:<{width}}  {values}  {interval:>17}  {_show(row['b_better']):>6}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
