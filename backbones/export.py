"""Writing, checking and running exported models: `torch.export` programs (.pt2) and ONNX files.

Every exported model takes float images in [0, 1], (N, 3, H, W), and normalizes them itself. A JSON
file beside it (`model.onnx` -> `model.onnx.json`) tells a runtime what it needs: the task, the input
(range, the mean/std applied inside, which axes are dynamic), the categories, score threshold
defaults and the outputs (names, shapes, dtypes).

    metadata = write_exported(module, example, "model.onnx", metadata=..., dynamic_batch=True)
    model = load_exported("model.onnx")  # the eager model's eval outputs, from onnxruntime
    check_export(eager, model, images, task="classification")  # raises ExportMismatch

What differs between tasks (what is exported, how the outputs are read back and compared, where the
classes are counted) is each task's `TaskExport`, registered with its task (`backbones.tasks`):
`backbones.classification.export`, `detection.export`, `segmentation.export`. This module names no task.

`onnx`, `onnxscript` and `onnxruntime` (the `export` extra) are imported only when an ONNX file is
written or run; `import backbones` imports none of them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .data.files import write_atomically
from .task_export import (
    LOGITS_RTOL,
    ExportMismatch,
    ExportSource,
    NetworkWeights,
    TaskExport,
    backbone_weights,
    compare_logits,
    export_adapter,
    run_checked,
)
from .tasks import list_tasks

__all__ = [
    "FORMATS",
    "LOGITS_RTOL",
    "ExportMismatch",
    "ExportSource",
    "ExportedModel",
    "NetworkWeights",
    "NormalizedModel",
    "TaskExport",
    "backbone_weights",
    "base_metadata",
    "check_export",
    "check_images",
    "compare_logits",
    "export_adapter",
    "load_exported",
    "run_checked",
    "sidecar_path",
    "write_exported",
]

FORMATS = {"export": ".pt2", "onnx": ".onnx"}
EXPORTED_SUFFIXES = tuple(FORMATS.values())  # what `load_exported` reads
INPUT_NAME = "images"


class NormalizedModel(nn.Module):
    """`model((images - mean) / std)` for images in [0, 1]; with `output` set, only that entry of a dict."""

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float], output: str | None = None):
        super().__init__()
        self.model = model
        self.output = output
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, images: Tensor) -> Tensor:
        result = self.model((images - self.mean) / self.std)
        return result[self.output] if self.output is not None else result


def base_metadata(
    *,
    task: str,
    architecture: str,
    num_classes: int,
    class_names: Sequence[str] | None,
    mean: Sequence[float],
    std: Sequence[float],
    category_ids: dict[int, int] | None = None,
) -> dict[str, Any]:
    """The metadata every export carries: task, architecture, the normalization applied inside, the classes.

    Each category is `{"label": model output index, "name": ..., "id": dataset id (detection, when known)}`.
    """
    if task not in list_tasks():
        raise ValueError(f"task={task!r}; choose one of {', '.join(list_tasks())}")
    names = list(class_names) if class_names else [str(i) for i in range(num_classes)]
    if len(names) != num_classes:
        raise ValueError(f"{len(names)} category names for a model of {num_classes} classes")
    categories = []
    for label, name in enumerate(names):
        entry: dict[str, Any] = {"label": label, "name": name}
        if category_ids is not None and int(label) in {int(k) for k in category_ids}:
            entry["id"] = int({int(k): v for k, v in category_ids.items()}[label])
        categories.append(entry)
    return {
        "task": task,
        "architecture": architecture,
        "input": {"mean": [float(v) for v in mean], "std": [float(v) for v in std], "normalized_inside": True},
        "categories": categories,
    }


def sidecar_path(path: str | os.PathLike) -> Path:
    """The metadata JSON beside an exported model: `model.onnx` -> `model.onnx.json`."""
    path = Path(path)
    return path.with_name(path.name + ".json")


def _format_of(path: Path) -> str:
    for name, suffix in FORMATS.items():
        if path.suffix == suffix:
            return name
    raise ValueError(f"{str(path)!r}: an exported model ends in {' or '.join(FORMATS.values())}")


def _dynamic_shapes(dynamic_batch: bool, dynamic_size: bool) -> dict[str, dict[int, Any]]:
    axes = {}
    if dynamic_batch:
        axes[0] = torch.export.Dim("batch", min=1, max=1024)
    if dynamic_size:
        axes.update({2: torch.export.Dim.DYNAMIC, 3: torch.export.Dim.DYNAMIC})
    return {INPUT_NAME: axes}


def write_exported(
    module: nn.Module,
    example: Tensor,
    path: str | os.PathLike,
    *,
    metadata: dict[str, Any],
    output_names: Sequence[str],
    dynamic_batch: bool = False,
    dynamic_size: bool = True,
) -> dict[str, Any]:
    """Exports `module` (called as `module(images)`) to `path` (.pt2 or .onnx) and its metadata beside it.

    Args:
        module: in eval mode; returns a tensor or a tuple of tensors, in the order of `output_names`.
        example: an input batch (N, 3, H, W); its sizes are the fixed ones where an axis is not dynamic.
        metadata: what a runtime needs (`task`, `input`, `categories`, ...); `format`, `input.dynamic_axes`
            and `outputs` are filled in here.
        dynamic_batch, dynamic_size: which input axes may vary at run time.

    Returns:
        The metadata written.
    """
    path = Path(path)
    fmt = _format_of(path)
    dynamic_shapes = _dynamic_shapes(dynamic_batch, dynamic_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        outputs = module(example)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        if fmt == "export":
            program = torch.export.export(module, (example,), dynamic_shapes=dynamic_shapes, strict=False)
            write_atomically(path, lambda tmp: torch.export.save(program, tmp))
        else:
            _require_onnx("write an ONNX model")
            write_atomically(
                path,
                lambda tmp: torch.onnx.export(
                    module, (example,), tmp, dynamo=True, dynamic_shapes=dynamic_shapes, input_names=[INPUT_NAME],
                    output_names=list(output_names), external_data=False, verbose=False,
                ),
            )  # fmt: skip
    metadata = dict(metadata, format=fmt)
    metadata["input"] = dict(
        metadata.get("input", {}), name=INPUT_NAME, layout="NCHW", dtype="float32", channels="RGB", range=[0.0, 1.0],
        example_shape=list(example.shape),
        dynamic_axes=["batch"] * dynamic_batch + ["height", "width"] * dynamic_size,
    )  # fmt: skip
    metadata["outputs"] = [
        {
            "name": name,
            "shape": _symbolic_shape(name, out, dynamic_batch),
            "dtype": str(out.dtype).removeprefix("torch."),
        }
        for name, out in zip(output_names, outputs, strict=True)
    ]
    write_atomically(sidecar_path(path), json.dumps(metadata, indent=2) + "\n")
    return metadata


def _symbolic_shape(name: str, output: Tensor, dynamic_batch: bool) -> list[int | str]:
    shape: list[int | str] = list(output.shape)
    if dynamic_batch:
        shape[0] = "N"
    if name == "logits" and output.dim() == 4:  # dense logits: at the input size
        shape[2:] = ["H", "W"]
    return shape


def _require_onnx(what: str) -> None:
    missing = []
    for package in ("onnx", "onnxscript", "onnxruntime"):
        try:
            __import__(package)
        except ImportError:
            missing.append(package)
    if missing:
        raise ModuleNotFoundError(
            f"to {what} install {', '.join(missing)}: pip install 'resbone[export]'"
            f" (or pip install {' '.join(missing)})"
        )


class ExportedModel:
    """An exported model (.pt2 or .onnx) behind the eager model's eval interface.

    Called as the eager model is, with float images in [0, 1]; its task's `TaskExport.outputs` turns
    the exported tensors into the eager outputs (e.g. classification: logits (N, num_classes);
    segmentation: {"out": logits}; detection: one dict per image with the masks pasted).
    `metadata` holds the JSON written beside the model.
    """

    def __init__(self, path: str | os.PathLike, metadata: dict[str, Any]):
        self.path = Path(path)
        self.metadata = metadata
        self.task = metadata["task"]
        self.adapter = export_adapter(self.task)
        self.output_names = [o["name"] for o in metadata["outputs"]]
        self.device = torch.device("cpu")
        if metadata["format"] == "onnx":
            _require_onnx("run an ONNX model")
            import onnxruntime

            self._session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            self._run = self._run_onnx
        else:
            self._program = torch.export.load(str(path)).module()
            self._run = self._run_program

    @property
    def class_names(self) -> list[str]:
        """Name per output label (detection: index 0 is the background)."""
        return [c["name"] for c in self.metadata["categories"]]

    @property
    def label_to_category_id(self) -> dict[int, int] | None:
        """Detection: the dataset's category id per label, where the export recorded them."""
        ids = {c["label"]: c["id"] for c in self.metadata["categories"] if "id" in c}
        return ids or None

    @property
    def has_masks(self) -> bool:
        return "masks" in self.output_names

    def _run_onnx(self, images: Tensor) -> dict[str, Tensor]:
        outputs = self._session.run(self.output_names, {INPUT_NAME: images.detach().cpu().float().numpy()})
        return {name: torch.from_numpy(out) for name, out in zip(self.output_names, outputs, strict=True)}

    def _run_program(self, images: Tensor) -> dict[str, Tensor]:
        with torch.no_grad():
            outputs = self._program(images.detach().cpu().float())
        outputs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
        return dict(zip(self.output_names, outputs, strict=True))

    def __call__(self, images: Tensor | Sequence[Tensor]) -> Any:
        return self.adapter.outputs(self._run, images)


def load_exported(path: str | os.PathLike) -> ExportedModel:
    """Loads an exported model and its JSON; the result is called like the eager model (`ExportedModel`).

    Raises:
        FileNotFoundError: the model or its JSON is missing.
        ValueError: the JSON is not one that `write_exported` wrote.
    """
    path = Path(path)
    fmt = _format_of(path)
    meta_path = sidecar_path(path)
    for needed in (path, meta_path):
        if not needed.is_file():
            raise FileNotFoundError(f"{str(needed)!r} does not exist (an exported model needs its .json beside it)")
    try:
        metadata = json.loads(meta_path.read_text())
        task, outputs = metadata["task"], metadata["outputs"]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise ValueError(
            f"{str(meta_path)!r} is not an export's metadata JSON ({type(error).__name__}: {error})"
        ) from error
    if task not in list_tasks() or metadata.get("format") != fmt or not outputs:
        raise ValueError(
            f"{str(meta_path)!r}: task={task!r}, format={metadata.get('format')!r} do not describe {path.name}"
        )
    return ExportedModel(path, metadata)


def check_images(sizes: Sequence[tuple[int, int]], *, seed: int = 0) -> list[Tensor]:
    """Smooth random RGB images in [0, 1], (3, H, W) each: inputs for `check_export`."""
    generator = torch.Generator().manual_seed(seed)
    images = []
    for height, width in sizes:
        coarse = torch.rand(1, 3, max(height // 8, 2), max(width // 8, 2), generator=generator)
        images.append(nn.functional.interpolate(coarse, size=(height, width), mode="bilinear")[0])
    return images


def check_export(
    reference: Callable, exported: Callable, images: Sequence[Tensor], *, task: str, batch: bool = False
) -> None:
    """Runs both models on each image (or, with `batch`, also on all images of one size as a batch) and compares
    them as task `task`'s `TaskExport.compare` does (logits: within `LOGITS_RTOL` of the largest reference logit).

    Raises:
        ExportMismatch: names the image (its size) and what differed, by how much.
    """
    export_adapter(task).compare(reference, exported, images, batch=batch)
