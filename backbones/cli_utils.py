"""What the command-line tools share: the one-line error and its exit status, the device and precision
choice, and the image loop of the inference tools (batches, output paths, progress).

Imports neither Lightning nor OpenCV, so a tool that only scores or converts files (`tools/eval_det.py`)
starts without the training machinery. The atomic writers and the image suffixes are in
`backbones.data.files`.

Every tool reports bad input as one line, `<tool>: error: <message>`, and exit status 2, as argparse
does for bad arguments; the message names the bad file or value.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TypeVar

import torch
from tqdm import tqdm

__all__ = [
    "EXIT_BAD_INPUT",
    "PRECISIONS",
    "add_inference_arguments",
    "autocast",
    "default_device",
    "for_each_batch",
    "output_paths",
    "parse_device",
    "positive_int",
    "progress",
    "read_batches",
    "reports_errors",
]

EXIT_BAD_INPUT = 2
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}

Item = TypeVar("Item")


def reports_errors(prog: str, errors: tuple[type[BaseException], ...] = (OSError, ValueError)):
    """Decorates a tool's `main(argv) -> int`: an exception of `errors` becomes the line
    `prog: error: message` on stderr and the exit status `EXIT_BAD_INPUT` (2).

    Example:
        >>> @reports_errors("infer_det")
        ... def main(argv=None) -> int: ...
    """

    def decorator(main: Callable[..., int | None]) -> Callable[..., int]:
        @functools.wraps(main)
        def wrapped(*args, **kwargs) -> int:
            try:
                return main(*args, **kwargs) or 0
            except errors as error:
                # a KeyError's str() is its repr: quoted, escaped; its argument is the message
                message = error.args[0] if isinstance(error, KeyError) and error.args else error
                print(f"{prog}: error: {message}", file=sys.stderr)
                return EXIT_BAD_INPUT

        return wrapped

    return decorator


def default_device() -> str:
    """The GPU when there is one, else the CPU."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def parse_device(text: str) -> torch.device:
    """`--device` for argparse: a torch device string that this machine has (`cpu`, `cuda`, `cuda:1`)."""
    try:
        device = torch.device(text)
    except RuntimeError as error:
        raise argparse.ArgumentTypeError(f"{text!r} is not a device; choose cpu, cuda or cuda:<index>") from error
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text!r}: torch sees no CUDA device here; use cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text!r}: there are {torch.cuda.device_count()} CUDA devices")
    elif device.type != "cpu":
        raise argparse.ArgumentTypeError(f"{text!r}: choose cpu, cuda or cuda:<index>")
    return device


def autocast(device: torch.device | str, precision: str) -> contextlib.AbstractContextManager:
    """`torch.autocast` to the dtype of `precision` ("bf16", "fp16") on `device`; nothing for "fp32"."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}; choose one of {', '.join(PRECISIONS)}")
    dtype = PRECISIONS[precision]
    return contextlib.nullcontext() if dtype is None else torch.autocast(torch.device(device).type, dtype=dtype)


def add_inference_arguments(parser: argparse.ArgumentParser, *, default_output: str) -> None:
    """The options both inference tools take, with the same names, defaults and checks."""
    parser.add_argument("source", type=Path, help="an image or a folder of images")
    parser.add_argument("--output", type=Path, default=Path(default_output), help="output folder")
    parser.add_argument("--recursive", action="store_true", help="also read the subfolders; the output mirrors them")
    parser.add_argument("--batch-size", type=positive_int, default=1, help="images per forward pass")
    parser.add_argument("--device", type=parse_device, default=default_device(), help="default: cuda if any, else cpu")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32", help="bf16/fp16: autocast the network")
    parser.add_argument("--no-fuse", action="store_true", help="keep the batch norms and the default memory layout")
    parser.add_argument("--compile", action="store_true", help="torch.compile the backbone")


def positive_int(text: str) -> int:
    """An argparse `type`: a whole number of at least 1, else a usage error naming the text."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}; give a positive number")
    return value


def output_paths(images: Sequence[Path], source: Path, output: Path, suffix: str) -> list[Path]:
    """Per image, `output/<its folder relative to source>/<stem><suffix>`.

    Raises:
        ValueError: an output would overwrite its own input image (`--output` is the source folder).
    """
    root = source if source.is_dir() else source.parent
    paths = [output / image.relative_to(root).parent / f"{image.stem}{suffix}" for image in images]
    for image, path in zip(images, paths, strict=True):
        if path.resolve() == image.resolve():
            raise ValueError(f"{path}: writing it would overwrite the input image; choose another --output")
    return paths


def read_batches(
    items: Iterable[Item],
    read: Callable[[Item], object],
    batch_size: int,
    *,
    key: Callable[[object], object] | None = None,
) -> Iterator[list[tuple[Item, object]]]:
    """Yields lists of up to `batch_size` `(item, read(item))` pairs, in order.

    With `key`, a batch holds only images of equal `key(image)` (e.g. their size): a new one starts
    when it changes. If `read` fails, the batch read so far is yielded first, then the error is raised,
    so that every image before a bad one is processed.
    """
    batch: list[tuple[Item, object]] = []
    for item in items:
        try:
            image = read(item)
        except Exception:
            if batch:
                yield batch
            raise
        if batch and (len(batch) == batch_size or (key is not None and key(batch[0][1]) != key(image))):
            yield batch
            batch = []
        batch.append((item, image))
    if batch:
        yield batch


def progress(total: int, description: str) -> tqdm:
    """A progress bar on stderr in images and images per second (shown on a terminal only)."""
    return tqdm(total=total, desc=description, unit="img", file=sys.stderr, disable=None, dynamic_ncols=True)


def for_each_batch(
    images: Sequence[Path],
    read: Callable[[Path], object],
    batch_size: int,
    process: Callable[[list[tuple[int, object]]], None],
    *,
    key: Callable[[object], object] | None = None,
    description: str = "",
) -> float:
    """The loop of an inference tool: reads `images` in batches (`read_batches`), calls `process` with
    each batch's `(index in images, image)` pairs, under a progress bar; returns the images per second.
    """
    start = time.perf_counter()
    with progress(len(images), description) as bar:
        for batch in read_batches(range(len(images)), lambda index: read(images[index]), batch_size, key=key):
            process(batch)
            bar.update(len(batch))
    return len(images) / (time.perf_counter() - start)
