"""What each task tells the export (`backbones.export`): a `TaskExport` per task, and the checks it shares.

A task subclasses `TaskExport` beside its model (`detection.export.DetectionExport`) and names the
class in its `backbones.tasks.TaskEntry`; `export_adapter(task)` gives an instance. The base class is
a model that returns logits, the classifier's case; `compare_logits` and `run_checked` are the parity
checks' parts that the tasks share. Everything here is re-exported by `backbones.export`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .tasks import get_task
from .weights import count_classes
from .weights_table import IMAGENET_MEAN, IMAGENET_STD

__all__ = [
    "LOGITS_RTOL",
    "ExportMismatch",
    "ExportSource",
    "NetworkWeights",
    "TaskExport",
    "backbone_weights",
    "compare_logits",
    "export_adapter",
    "run_checked",
]

# Parity tolerance of `compare_logits`, relative to the largest reference logit.
LOGITS_RTOL = 1e-4


class ExportMismatch(RuntimeError):
    """The exported model's outputs differ from the eager model's."""


@dataclass
class ExportSource:
    """A model to export and what its metadata needs."""

    task: str
    architecture: str
    model: nn.Module
    num_classes: int
    class_names: list[str] | None = None
    label_to_category_id: dict[int, int] | None = None
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD


@dataclass(frozen=True)
class NetworkWeights:
    """Where a task checkpoint keeps the network that `tools/export_backbone.py` writes, and how to rebuild it.

    Attributes:
        prefixes: the state-dict key prefixes of the network, tried in order (the first one present is taken).
        build: builds the network the weights must fit strictly.
        fits: what they fit, for messages (e.g. `"'resnet18'"`).
        load_call: how a user loads the written file; `{weights}` stands for its path.
        what: "weights" or "backbone weights", for messages.
    """

    prefixes: tuple[str, ...]
    build: Callable[[], nn.Module]
    fits: str
    load_call: str
    what: str = "weights"


def backbone_weights(hparams: dict[str, Any], presets: dict[str, dict], prefixes: tuple[str, ...]) -> NetworkWeights:
    """The backbone of a detector's or DeepLab's checkpoint, kept under `prefixes`, as `create_backbone` builds it.

    Its name is the task's `backbone` hyper-parameter, else `model_options["backbone"]`, else the preset's
    (`presets[model]["backbone"]`), else resnet50 (what a bare architecture name builds). Batch norm,
    frozen or not, has the same weights as plain batch norm; group norm has other ones.
    """
    from .registry import create_backbone

    options = dict(hparams.get("model_options") or {})
    name = hparams.get("backbone") or options.get("backbone")
    name = name or presets.get(hparams["model"], {}).get("backbone", "resnet50")
    norm = {"norm": "gn"} if options.get("norm") == "gn" else {}
    extra = "".join(f", {key}={value!r}" for key, value in norm.items())
    return NetworkWeights(
        prefixes, lambda: create_backbone(name, **norm), f"create_backbone({name!r}{extra}, weights=...)",
        f"create_backbone({name!r}{extra}, weights={{weights}})", "backbone weights",
    )  # fmt: skip


class TaskExport:
    """How one task's models export: the base is a model that returns logits, the classifier's case.

    A task subclasses it beside its model (`detection.export.DetectionExport`) and names the class in
    its `backbones.tasks.TaskEntry`; `export_adapter(task)` gives an instance.
    """

    task: str = ""
    #: the parity check's default image size (H, W)
    default_size: tuple[int, int] = (224, 224)
    #: the state-dict key endings of the class layer (its rows count the classes)
    class_layers: tuple[str, ...] = ()  # the layers whose rows are the classes, the class-count one first
    #: why a dynamic batch cannot be exported, if it cannot
    batch_error: str | None = None
    #: whether its checkpoints may hold EMA weights (`ema.module.*`)
    has_ema: bool = False

    def source(self, task: nn.Module) -> ExportSource:
        """What to export of a loaded Lightning task of this kind."""
        raise NotImplementedError

    def build(self, name: str, *, num_classes: int, weights: str) -> nn.Module:
        """Preset `name` with `num_classes` and the weights file `weights`."""
        raise NotImplementedError

    def network(self, hparams: dict[str, Any], *, ema: bool = False) -> NetworkWeights:
        """Which network of a checkpoint (of these hyper-parameters) `tools/export_backbone.py` writes
        (with `ema`, the moving average where `has_ema`)."""
        raise NotImplementedError

    def exportable(self, source: ExportSource) -> tuple[nn.Module, tuple[str, ...], dict[str, Any]]:
        """The module to export (images in [0, 1] -> outputs), its output names and its metadata."""
        raise NotImplementedError

    def reference(self, source: ExportSource, module: nn.Module) -> Callable:
        """The eager model called as the export is (by default the exported module itself)."""
        return module

    def outputs(self, run: Callable[[Tensor], dict[str, Tensor]], images: Tensor) -> Any:
        """The eager model's outputs from the exported one (`run(images)` gives its outputs by name)."""
        return run(images)["logits"]

    def compare(self, reference: Callable, exported: Callable, images: Sequence[Tensor], *, batch: bool) -> None:
        """Compares both models' logits on each image, and with `batch` on all of them (resized) as one batch."""
        for index, image in enumerate(images):
            where = f"image {index} ({image.shape[-2]}x{image.shape[-1]})"
            expected = _logits(run_checked(reference, image[None]))
            compare_logits(expected, _logits(run_checked(exported, image[None], where)), where)
        if batch and len(images) > 1:
            stacked = torch.stack([nn.functional.interpolate(i[None], size=images[0].shape[-2:])[0] for i in images])
            where = f"a batch of {len(images)}"
            expected = _logits(run_checked(reference, stacked))
            compare_logits(expected, _logits(run_checked(exported, stacked, where)), where)

    def count_classes(self, state: dict[str, Tensor], where: str) -> int:
        """The number of classes of a state dict: the rows of its class layer (`class_layers`)."""
        num_classes = count_classes(state, self.class_layers)
        if num_classes is None:
            raise ValueError(f"{where}: no class layer ({', '.join(self.class_layers)}) to count classes")
        return num_classes


def export_adapter(task: str) -> TaskExport:
    """The `TaskExport` of task `task` (see `backbones.tasks`)."""
    return get_task(task).export_adapter()


def run_checked(model: Callable, inputs: Any, where: str | None = None) -> Any:
    """`model(inputs)` without gradients; a failure of the exported model (`where` given) is a mismatch."""
    with torch.no_grad():
        if where is None:
            return model(inputs)
        try:
            return model(inputs)
        except Exception as error:  # a guard of the program, an onnxruntime error: the export does not run here
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
            raise ExportMismatch(f"{where}: the exported model failed: {type(error).__name__}: {first_line}") from error


def _logits(output: Any) -> Tensor:
    return output["out"] if isinstance(output, dict) else output


def compare_logits(expected: Tensor, actual: Tensor, where: str) -> None:
    """Raises `ExportMismatch` unless the logits agree within `LOGITS_RTOL` of the largest reference logit."""
    if expected.shape != actual.shape:
        raise ExportMismatch(
            f"{where}: logits of shape {tuple(actual.shape)}, the eager model's {tuple(expected.shape)}"
        )
    difference = (expected - actual).abs().max().item()
    scale = expected.abs().max().item()
    if difference > LOGITS_RTOL * max(scale, 1e-12):
        raise ExportMismatch(
            f"{where}: logits differ by {difference:.3g}, over {LOGITS_RTOL:g} of their largest magnitude {scale:.3g}"
        )
