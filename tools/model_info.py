"""Parameters and multiply-adds of registered models.

python tools/model_info.py resnet18 resnet50 --stride-in-1x1
"""

from __future__ import annotations

import argparse
import sys

import torch
from torch.utils.flop_counter import FlopCounterMode

from backbones import create_model
from backbones.cli_utils import reports_errors


def count(name: str, *, image_size: int = 224, **kwargs) -> tuple[float, float]:
    """Returns (millions of parameters, billions of multiply-adds) of the classifier at `image_size`."""
    model = create_model(name, **kwargs).eval()
    params = sum(p.numel() for p in model.parameters()) / 1e6
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.zeros(1, 3, image_size, image_size))
    return params, counter.get_total_flops() / 2 / 1e9  # the counter counts a multiply-add as 2 flops


@reports_errors("model_info", errors=(KeyError, ValueError))  # KeyError: an unknown name
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="model_info", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("names", nargs="+", help="registered model names (see backbones.list_backbones())")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--stride-in-1x1", action="store_true", help="the paper's stride placement (bottlenecks)")
    args = parser.parse_args(argv)
    options = {"stride_in_1x1": True} if args.stride_in_1x1 else {}
    print(f"| model | params (M) | multiply-adds at {args.image_size} (G) |")
    print("|---|---:|---:|")
    for name in args.names:
        params, macs = count(name, image_size=args.image_size, **options)
        print(f"| {name} | {params:.2f} | {macs:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
