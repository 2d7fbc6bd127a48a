"""Speed and memory of our models next to torchvision's, measured in one run with the same inputs and weights.

    python tools/benchmark.py --model resnet50 --batch-size 8 --image-size 224 --repeats 5 --json r50.json
    python tools/benchmark.py --model mask_rcnn_r50_fpn --batch-size 1 --image-size 800 --modes inference,train
    python tools/benchmark.py --model faster_rcnn_r50_fpn --modes eval --eval-images 5000

Modes:
  inference  images/s of ours on the fast path (BN folded into the convs, ReLU and residual add fused
             into them, channels-last, inference_mode)
             and of torchvision's model as built (inference_mode); the relative output difference.
             With --exported FILE also of that exported model (onnxruntime or the .pt2 program).
  train      images/s of one SGD step (forward, backward, update; train mode; synthetic targets), ours
             channels-last with --channels-last, torchvision's as built.
  data       images/s of one loader worker: decode + train transforms of the model's task's synthetic set
             (shapes: image folders, COCO JSON, label PNGs).
  eval       seconds of COCO evaluation (bbox, segm) of --eval-images synthetic images with each backend,
             and per image the cost of pasting and RLE-encoding 100 masks.
Both models get torchvision's random weights (our parameter names are torchvision's); nothing is
downloaded. Each task says which of its models have a torchvision counterpart and how a step of them
runs (`backbones.task_benchmark.TaskBenchmark`, registered with the task); this tool names none.
Ours and torchvision's repeats are interleaved, so drift on a shared machine hits both; the median is
reported. Peak memory is measured after the timings, one step per side: the peak of the tensors the
step creates (see `memory` in the JSON for how it is measured on the device).
"""

from __future__ import annotations

import argparse
import copy
import functools
import os
import statistics
import sys
import time
import weakref
from pathlib import Path

import torch
import torchvision
from benchmark_coco import eval_benchmark, eval_markdown  # tools/, beside this script
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from backbones.cli_utils import PRECISIONS, autocast, reports_errors
from backbones.data.files import write_json
from backbones.export import load_exported
from backbones.fusion import prepare_for_inference
from backbones.task_benchmark import TaskBenchmark, benchmark_adapter, benchmark_models

MODES = ("inference", "train", "data", "eval")
SIDES = ("ours", "torchvision")


def _to(tree, device: str):
    return pytree.tree_map(lambda x: x.to(device) if isinstance(x, torch.Tensor) else x, tree)


def _channels_last(x):
    return x.contiguous(memory_format=torch.channels_last) if isinstance(x, torch.Tensor) else x


FAST_PATH = "BN folded, ReLU and add fused, channels-last, inference_mode"


def inference_steps(adapter: TaskBenchmark, ours, theirs, batch, args) -> dict:
    """{side: (setup, step, model)}; a step returns the model's output."""
    fast = prepare_for_inference(copy.deepcopy(ours))
    if args.compile:
        fast = adapter.compile(fast)

    def step_of(model, inputs):
        def step():
            model.eval()  # torchvision's model is shared with the train mode
            with torch.inference_mode(), autocast(args.device, args.precision):
                return model(inputs)

        return step

    compiled = " + torch.compile" if args.compile else ""
    steps = {
        "ours": (f"{FAST_PATH}{compiled}", step_of(fast, _channels_last(batch[0])), fast),
        "torchvision": ("as built, inference_mode", step_of(theirs, batch[0]), theirs),
    }
    if args.exported:  # speed only: the exported file has its own weights (and takes images in [0, 1])
        exported = load_exported(args.exported)
        runtime = "onnxruntime CPU" if exported.metadata["format"] == "onnx" else "torch.export program"
        steps["exported"] = (f"{Path(args.exported).name}, {runtime}", lambda: exported(batch[0]), exported)
    return steps


def train_steps(adapter: TaskBenchmark, ours, theirs, batch, args) -> dict:
    """{side: (setup, step, model)}: forward, backward and an SGD step (momentum 0.9) in train mode."""

    def step_of(model, inputs):
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
        scaler = torch.amp.GradScaler(args.device, enabled=args.precision == "fp16")

        def step():
            model.train()
            with autocast(args.device, args.precision):
                loss = adapter.loss(model, inputs, batch[1])
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()

        return step

    inputs, setup = batch[0], []
    if args.channels_last:
        ours.to(memory_format=torch.channels_last)
        inputs, setup = _channels_last(inputs), ["channels-last"]
    if args.compile:
        ours = adapter.compile(ours)
        setup.append("torch.compile")
    return {
        "ours": (", ".join(setup) or "as built", step_of(ours, inputs), ours),
        "torchvision": ("as built", step_of(theirs, batch[0]), theirs),
    }


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_interleaved(steps: dict, args) -> tuple[dict, object]:
    """Seconds of each repeat per side, ours and torchvision's alternating (and alternating who goes first)."""
    outputs = {}
    for side, (_, step, _) in steps.items():
        for _ in range(args.warmup):
            outputs[side] = step()
    seconds = {side: [] for side in steps}
    sides = [side for side in SIDES if side in steps] + [side for side in steps if side not in SIDES]
    for repeat in range(args.repeats):
        for side in sides if repeat % 2 == 0 else sides[::-1]:
            _sync(args.device)
            start = time.perf_counter()
            out = steps[side][1]()
            _sync(args.device)
            seconds[side].append(time.perf_counter() - start)
            outputs.setdefault(side, out)
    return seconds, outputs


def _flat(output) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output.detach().double().flatten().cpu()
    values = output.values() if isinstance(output, dict) else output
    return torch.cat([_flat(v) for v in values]) if values else torch.zeros(0, dtype=torch.float64)


def relative_difference(ours, theirs) -> float | None:
    """|ours - theirs| / |theirs| over every output number; None when the shapes differ."""
    a, b = _flat(ours), _flat(theirs)
    return float((a - b).norm() / b.norm().clamp(min=1e-12)) if a.shape == b.shape else None


class PeakTensorMemory(TorchDispatchMode):
    """The peak of the bytes held by the tensors that ops create while this mode is active.

    Every op's output whose storage is new (not an input's: in-place ops and views allocate nothing)
    counts from that op until the storage is freed. On any device this is what
    `torch.cuda.max_memory_allocated` minus the memory allocated before measures: activations, saved
    tensors, temporaries and new gradients, but not the weights or an optimizer's existing state.
    oneDNN's reordered weights (opaque tensors) and its scratch space are not counted.
    """

    def __init__(self):
        super().__init__()
        self.current = self.peak = 0
        self._live: dict[int, weakref.ref] = {}

    def _freed(self, key: int, nbytes: int, _ref) -> None:
        if self._live.pop(key, None) is not None:
            self.current -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {_storage_key(t) for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for tensor in pytree.tree_leaves(out):
            key = _storage_key(tensor) if isinstance(tensor, torch.Tensor) else None
            if key is None or key in inputs or key in self._live:
                continue
            storage = tensor.untyped_storage()
            nbytes = storage.nbytes()
            self._live[key] = weakref.ref(storage, functools.partial(self._freed, key, nbytes))
            self.current += nbytes
            self.peak = max(self.peak, self.current)
        return out


def _storage_key(tensor: torch.Tensor) -> int | None:
    if tensor.layout != torch.strided or tensor.is_mkldnn:
        return None  # sparse or opaque (oneDNN) tensors have no storage to follow
    return tensor.untyped_storage()._cdata


MEMORY_METHODS = {
    "cuda": "torch.cuda.max_memory_allocated during one step minus what was allocated before it",
    "cpu": "peak bytes of the tensors one step creates (a TorchDispatchMode follows each new storage until freed)",
}
MEMORY_NOTE = ": activations, saved tensors, temporaries and new gradients, not the weights or the optimizer state"


def peak_memory_mb(step, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return max(torch.cuda.max_memory_allocated() - base, 0) / 2**20
    tracker = PeakTensorMemory()
    with tracker:
        step()
    return tracker.peak / 2**20


def data_throughput(args) -> dict:
    """Images per second of one worker: read + decode (OpenCV) + train transforms of the task's synthetic set."""
    dataset, what = benchmark_adapter(args.model).dataset(args.model, args.data_root, args.data_images, args.image_size)
    dataset[0]  # warm the caches of the first call
    start = time.perf_counter()
    for index in range(args.data_images):
        dataset[index]
    seconds = time.perf_counter() - start
    return {"images": args.data_images, "image_size": args.image_size, "dataset": what,
            "seconds": seconds, "images_per_s_per_worker": args.data_images / seconds}  # fmt: skip


def run_models(args, modes) -> tuple[list[dict], dict, dict]:
    adapter = benchmark_adapter(args.model)
    ours, theirs = (model.to(args.device) for model in adapter.build_pair(args.model, args.image_size))
    batch = _to(adapter.batch(args.model, args.batch_size, args.image_size), args.device)
    weights_mb = sum(t.numel() * t.element_size() for t in theirs.state_dict().values()) / 2**20
    rows, all_steps, extra = [], {}, {}
    for mode in modes:
        steps = (inference_steps if mode == "inference" else train_steps)(adapter, ours, theirs, batch, args)
        seconds, outputs = time_interleaved(steps, args)
        if mode == "inference":
            extra["output_compared"] = adapter.output_compared
            pair = [adapter.compared(steps[side][2], batch[0], outputs[side]) for side in SIDES]
            extra["output_relative_difference"] = relative_difference(*pair)
        for side, (setup, _, _) in steps.items():
            median = statistics.median(seconds[side])
            rows.append({"mode": mode, "side": side, "setup": setup, "seconds_median": median,
                         "seconds": seconds[side], "images_per_s": args.batch_size / median})  # fmt: skip
        all_steps[mode] = steps
    extra["weights_mb"] = weights_mb
    return rows, extra, all_steps


def measure_memory(rows: list[dict], all_steps: dict, device: str, enabled: bool = True) -> str | None:
    """Adds `peak_memory_mb` to each row (one more step per row; None if not measured); returns what it is."""
    for row in rows:
        measurable = enabled and row["side"] in SIDES  # onnxruntime's memory is not torch's tensors
        row["peak_memory_mb"] = peak_memory_mb(all_steps[row["mode"]][row["side"]][1], device) if measurable else None
    return MEMORY_METHODS[device] + MEMORY_NOTE if enabled else None


def ratios(rows: list[dict]) -> dict:
    """ours / torchvision per mode: throughput (> 1: ours faster) and peak memory (< 1: ours smaller)."""
    by_key = {(r["mode"], r["side"]): r for r in rows}
    result = {}
    for mode in dict.fromkeys(r["mode"] for r in rows):
        ours, theirs = by_key[mode, "ours"], by_key[mode, "torchvision"]
        memory = None
        if ours["peak_memory_mb"] is not None and theirs["peak_memory_mb"]:
            memory = ours["peak_memory_mb"] / theirs["peak_memory_mb"]
        result[mode] = {"throughput": ours["images_per_s"] / theirs["images_per_s"], "peak_memory": memory}
        if (mode, "exported") in by_key:
            result[mode]["exported_throughput"] = by_key[mode, "exported"]["images_per_s"] / theirs["images_per_s"]
    return result


def markdown(report: dict) -> str:
    c = report["config"]
    lines = [f"## {c['model']}: batch {c['batch_size']}, {c['image_size']} px, {c['precision']}, {c['device']} "
             f"({c['device_name']}, {c['threads']} threads), median of {c['repeats']}", ""]  # fmt: skip
    if report["results"]:
        lines += ["| mode | model | setup | images/s | ms/batch | peak MB |", "|---|---|---|---:|---:|---:|"]
        for r in report["results"]:
            memory = "n/a" if r["peak_memory_mb"] is None else f"{r['peak_memory_mb']:.0f}"
            lines.append(f"| {r['mode']} | {r['side']} | {r['setup']} | {r['images_per_s']:.2f} | "
                         f"{1000 * r['seconds_median']:.1f} | {memory} |")  # fmt: skip
        lines.append("")
        for mode, ratio in report["ratios"].items():
            memory = "n/a" if ratio["peak_memory"] is None else f"{ratio['peak_memory']:.2f}x"
            lines.append(f"- {mode}, ours/torchvision: throughput {ratio['throughput']:.2f}x, peak memory {memory}")
            if "exported_throughput" in ratio:
                lines.append(f"- {mode}, exported/torchvision: throughput {ratio['exported_throughput']:.2f}x")
        if report.get("output_relative_difference") is not None:
            lines.append(f"- inference {report['output_compared']}, ours vs torchvision: relative difference "
                         f"{report['output_relative_difference']:.1e}")  # fmt: skip
        lines.append(f"- peak memory: {report.get('memory') or 'not measured'}")
    if "data" in report:
        d = report["data"]
        lines.append(f"- data: {d['images_per_s_per_worker']:.1f} images/s per worker (decode + train transforms, "
                     f"{d['dataset']}, {d['image_size']} px)")  # fmt: skip
    if "eval" in report:
        lines += ["", *eval_markdown(report["eval"])]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="benchmark", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    models = benchmark_models()  # every task's models that have a torchvision counterpart
    parser.add_argument("--model", choices=models, default="resnet50", help="ours, beside torchvision's")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=224, help="square inputs (detectors: min = max size)")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32", help="bf16/fp16: autocast")
    parser.add_argument("--channels-last", action="store_true", help="ours trains channels-last")
    parser.add_argument("--compile", action="store_true", help="torch.compile ours (or its backbone)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per side and mode")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per side and mode (median reported)")
    parser.add_argument("--modes", default="inference,train", help=f"comma-separated: {', '.join(MODES)}")
    parser.add_argument("--no-memory", dest="memory", action="store_false", help="skip the peak-memory steps")
    parser.add_argument("--data-images", type=int, default=64, help="data mode: images decoded")
    parser.add_argument("--data-root", help=argparse.SUPPRESS)  # default: the shapes cache folder
    parser.add_argument("--eval-images", type=int, default=5000, help="eval mode: synthetic COCO images")
    parser.add_argument("--json", help="write the report here")
    parser.add_argument("--exported", help="inference mode: also time this exported model (.onnx/.pt2 + its JSON)")
    args = parser.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or set(modes) - set(MODES):
        parser.error(f"--modes={args.modes!r}; choose from {', '.join(MODES)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device=cuda, but torch sees no CUDA device")
    for name in ("batch_size", "image_size", "repeats", "data_images", "eval_images"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}={getattr(args, name)}; give a positive number")
    problem = benchmark_adapter(args.model).check(args.model, args.batch_size, modes)
    if problem:
        parser.error(problem)
    if args.exported and "inference" not in modes:
        parser.error("--exported is timed in the inference mode; add it to --modes")
    if args.exported and not Path(args.exported).is_file():
        parser.error(f"--exported {args.exported!r} does not exist")
    if args.warmup < 0:
        parser.error(f"--warmup={args.warmup}; give 0 or more")
    args.mode_list = [m for m in MODES if m in modes]  # inference before train: the train steps change weights
    return args


@reports_errors("benchmark")
def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else (os.uname().machine + " CPU")
    config = {k: v for k, v in vars(args).items() if k not in ("mode_list", "json", "data_root")}
    config.update(device_name=device_name, threads=torch.get_num_threads(), torch=torch.__version__,
                  torchvision=torchvision.__version__, modes=args.mode_list)  # fmt: skip
    report = {"config": config, "results": [], "ratios": {}}
    model_modes = [m for m in args.mode_list if m in ("inference", "train")]
    rows, extra, all_steps = run_models(args, model_modes) if model_modes else ([], {}, {})
    if "data" in args.mode_list:
        report["data"] = data_throughput(args)
    if "eval" in args.mode_list:
        report["eval"] = eval_benchmark(args.eval_images)
    if rows:  # last: one more step per row, outside the timings
        extra["memory"] = measure_memory(rows, all_steps, args.device, args.memory)
        report.update(results=rows, ratios=ratios(rows), **extra)
    print(markdown(report))
    if args.json:
        write_json(args.json, report, indent=2)
    return report


if __name__ == "__main__":
    sys.exit(0 if isinstance(main(), dict) else 2)
