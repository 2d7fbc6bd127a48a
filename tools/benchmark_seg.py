"""Seconds of segmentation inference in each mode (whole, slide, multi-scale + flip), against the pixels each runs.

    python tools/benchmark_seg.py                      # DeepLabV3 R-50-D8 on 1024x2048, crop 512x1024, stride 341x683
    python tools/benchmark_seg.py --image-size 512 1024 --crop-size 256 512 --stride 171 342 --repeats 3 --json r.json

A mode's cost should follow the pixels it runs through the network: sliding windows overlap (crop 512x1024,
stride 341x683 on 1024x2048: 9 windows, 2.25x the image's pixels) and multi-scale + flip runs 12 views
(scales 0.5-1.75, 17.4x). The report gives per mode the median seconds per image, the pixel ratio (pixels of
every forward pass / the image's, counted as the model is called), the time ratio (seconds / whole's) and
their quotient, the overhead: 1.0 when a mode costs exactly its pixels. The model has random weights
(nothing is downloaded) and runs on the inference tools' fast path (BN folded, channels-last) unless
`--no-fuse`. The modes' repeats are interleaved, so drift on a shared machine hits all of them.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

from backbones.cli_utils import PRECISIONS, autocast, reports_errors
from backbones.data.files import write_json
from backbones.fusion import prepare_for_inference
from segmentation.inference import SegmentationInference
from segmentation.models import PRESETS, build_model

MODES = ("whole", "slide", "msflip", "msflip-slide")
MS_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)


def inference_modes(args: argparse.Namespace) -> dict[str, SegmentationInference]:
    """The `SegmentationInference` of each mode asked for."""
    slide = dict(mode="slide", crop_size=args.crop_size, stride=args.stride, window_batch_size=args.window_batch_size)
    options = {
        "whole": {},
        "slide": slide,
        "msflip": dict(scales=args.scales, flip=True),
        "msflip-slide": dict(slide, scales=args.scales, flip=True),
    }
    return {mode: SegmentationInference(**options[mode]) for mode in args.modes}


class CountingForward:
    """The model's logits under autocast, counting the pixels of every input it is given."""

    def __init__(self, model: torch.nn.Module, device: str, precision: str):
        self.model, self.device, self.precision = model, device, precision
        self.pixels = 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.pixels += x.shape[0] * x.shape[-2] * x.shape[-1]
        with autocast(self.device, self.precision):
            return self.model(x)["out"].float()


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def run(args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    model = build_model(args.model, num_classes=args.num_classes, output_stride=args.output_stride)
    model = prepare_for_inference(model, fuse=args.fuse, channels_last=args.fuse).to(args.device)
    height, width = args.image_size
    images = torch.rand(args.batch_size, 3, height, width, generator=torch.Generator().manual_seed(0))
    images = images.to(args.device)
    if args.fuse:
        images = images.contiguous(memory_format=torch.channels_last)
    forward = CountingForward(model, args.device, args.precision)
    modes = inference_modes(args)
    seconds: dict[str, list[float]] = {mode: [] for mode in modes}
    pixels: dict[str, int] = {}
    with torch.inference_mode():
        for inference in modes.values():
            for _ in range(args.warmup):
                inference(forward, images)
        order = list(modes)
        for repeat in range(args.repeats):
            for mode in order if repeat % 2 == 0 else order[::-1]:
                forward.pixels = 0
                _sync(args.device)
                start = time.perf_counter()
                modes[mode](forward, images)
                _sync(args.device)
                seconds[mode].append((time.perf_counter() - start) / args.batch_size)
                pixels[mode] = forward.pixels
    image_pixels = args.batch_size * height * width
    base = statistics.median(seconds["whole"])
    rows = []
    for mode, inference in modes.items():
        median = statistics.median(seconds[mode])
        pixel_ratio, time_ratio = pixels[mode] / image_pixels, median / base
        rows.append({"mode": mode, "inference": inference.describe(), "seconds_per_image": median,
                     "seconds": seconds[mode], "pixel_ratio": pixel_ratio, "time_ratio": time_ratio,
                     "overhead": time_ratio / pixel_ratio})  # fmt: skip
    return {"results": rows}


def markdown(report: dict) -> str:
    c = report["config"]
    height, width = c["image_size"]
    lines = [f"## {c['model']} (output stride {c['output_stride']}, {c['num_classes']} classes), {height}x{width}, "
             f"batch {c['batch_size']}, {c['precision']}, {c['device']} ({c['device_name']}, {c['threads']} threads), "
             f"median of {c['repeats']}", "",
             "| mode | inference | s/image | pixel ratio | time ratio | time / pixel ratio |",
             "|---|---|---:|---:|---:|---:|"]  # fmt: skip
    for r in report["results"]:
        lines.append(f"| {r['mode']} | {r['inference']} | {r['seconds_per_image']:.3f} | {r['pixel_ratio']:.2f} | "
                     f"{r['time_ratio']:.2f} | {r['overhead']:.2f} |")  # fmt: skip
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="benchmark_seg", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=PRESETS, default="deeplabv3_r50")
    parser.add_argument("--output-stride", type=int, choices=(8, 16, 32), default=8)
    parser.add_argument("--num-classes", type=int, default=19, help="default: Cityscapes' 19")
    parser.add_argument("--image-size", type=int, nargs=2, metavar=("H", "W"), default=[1024, 2048])
    parser.add_argument("--batch-size", type=int, default=1, help="images per call")
    parser.add_argument("--crop-size", type=int, nargs=2, metavar=("H", "W"), default=[512, 1024])
    parser.add_argument("--stride", type=int, nargs=2, metavar=("H", "W"), default=[341, 683])
    parser.add_argument("--scales", type=float, nargs="+", default=list(MS_SCALES), help="multi-scale + flip")
    parser.add_argument("--window-batch-size", type=int, default=8, help="slide: windows per forward pass")
    parser.add_argument("--modes", default="whole,slide,msflip", help=f"comma-separated: {', '.join(MODES)}")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32", help="bf16/fp16: autocast")
    parser.add_argument("--no-fuse", dest="fuse", action="store_false", help="run the model as built")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs per mode")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per mode (median reported)")
    parser.add_argument("--json", help="write the report here")
    args = parser.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or set(modes) - set(MODES):
        parser.error(f"--modes={args.modes!r}; choose from {', '.join(MODES)}")
    args.modes = ["whole", *(m for m in MODES[1:] if m in modes)]  # whole is the reference of the ratios
    for name in ("num_classes", "batch_size", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}={getattr(args, name)}; give a positive number")
    if args.warmup < 0:
        parser.error(f"--warmup={args.warmup}; give 0 or more")
    if min(args.image_size) < 1:
        parser.error(f"--image-size={args.image_size}; give a positive height and width")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device=cuda, but torch sees no CUDA device")
    try:
        inference_modes(args)
    except ValueError as error:  # names the option and what it takes
        parser.error(str(error))
    return args


@reports_errors("benchmark_seg")
def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else (os.uname().machine + " CPU")
    config = {k: v for k, v in vars(args).items() if k != "json"}
    config.update(device_name=device_name, threads=torch.get_num_threads(), torch=torch.__version__)
    report = {"config": config, **run(args)}
    print(markdown(report))
    if args.json:
        write_json(args.json, report, indent=2)
    return report


if __name__ == "__main__":
    sys.exit(0 if isinstance(main(), dict) else 2)
