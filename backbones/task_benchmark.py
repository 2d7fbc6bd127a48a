"""What each task tells `tools/benchmark.py`: torchvision's counterpart of its models, inputs, a loss.

A task subclasses `TaskBenchmark` beside its model (`detection.speed.DetectionBenchmark`) and names
the class in its `backbones.tasks.TaskEntry` (`benchmark=`); `benchmark_adapter(model)` gives the
instance of the task that builds `model`. The tool itself names no task, model or label space.
"""

from __future__ import annotations

from collections.abc import Sized
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .registry import UnknownNameError, closest_names
from .tasks import get_task, list_tasks, task_of

__all__ = ["TaskBenchmark", "benchmark_adapter", "benchmark_models"]


class TaskBenchmark:
    """One task's side of the benchmark: models that have a torchvision counterpart, built with the
    same random weights, and the inputs, targets and loss of a training step.

    The base has the parts that classifiers and dense heads share: torchvision's counterpart built by
    `torchvision_builder(name)`, our model by `build_ours`, one output compared as it is, a cross-entropy loss.
    """

    task: str = ""
    #: our model name -> torchvision's builder (`torchvision.models...` attribute) of the same network
    counterparts: ClassVar[dict[str, str]] = {}
    #: the label space both sides are built with (torchvision's: ImageNet 1000, COCO 91, VOC 21)
    num_classes: int = 0
    #: what the inference parity compares (`compared` gives it)
    output_compared: str = "outputs"

    def torchvision_builder(self, name: str) -> Any:
        """torchvision's builder of the counterpart of `name`."""
        raise NotImplementedError

    def build_ours(self, name: str, image_size: int) -> nn.Module:
        """Our model `name`, built as its counterpart is (from scratch, `num_classes`)."""
        raise NotImplementedError

    def build_theirs(self, name: str, image_size: int) -> nn.Module:
        """torchvision's counterpart of `name`, from scratch."""
        return self.torchvision_builder(name)(weights=None, num_classes=self.num_classes)

    def build_pair(self, name: str, image_size: int) -> tuple[nn.Module, nn.Module]:
        """(ours, torchvision's) with the same random weights (seeded): our parameter names are torchvision's."""
        torch.manual_seed(0)
        theirs = self.build_theirs(name, image_size)
        ours = self.build_ours(name, image_size)
        ours.load_state_dict(theirs.state_dict())
        return ours, theirs

    def batch(self, name: str, batch_size: int, image_size: int) -> tuple[Any, Any]:
        """(inputs, targets) of one step on the CPU: random images and random labels (seeded)."""
        g = torch.Generator().manual_seed(0)
        images = torch.randn(batch_size, 3, image_size, image_size, generator=g)
        return images, torch.randint(self.num_classes, self.target_shape(batch_size, image_size), generator=g)

    def target_shape(self, batch_size: int, image_size: int) -> tuple[int, ...]:
        """The shape of the class targets of a batch (one label per image, or per pixel)."""
        return (batch_size,)

    def loss(self, model: nn.Module, inputs: Any, targets: Any) -> Tensor:
        """The training loss of one step (train mode)."""
        return F.cross_entropy(_out(model(inputs)), targets)

    def compile(self, model: nn.Module) -> nn.Module:
        """`torch.compile` where it pays: the whole network of a classifier, a dense model's backbone."""
        if not hasattr(model, "backbone"):
            return torch.compile(model)
        model.backbone = torch.compile(model.backbone)  # body (+ FPN); the heads' control flow stays eager
        return model

    def compared(self, model: nn.Module, inputs: Any, output: Any) -> Any:
        """What the inference parity compares of `model`'s `output` on `inputs` (by default the output)."""
        return output

    def check(self, name: str, batch_size: int, modes: list[str]) -> str | None:
        """Why these settings cannot run, for the tool's one-line error; None when they can."""
        return None

    def dataset(self, name: str, root: str | None, num_images: int, image_size: int) -> tuple[Sized, str]:
        """(a dataset of at least `num_images` train images with their train transforms, what it is):
        the task's built-in synthetic set, generated under `root` (None: the cache)."""
        raise NotImplementedError(f"the {self.task} task has no built-in dataset to time")


def _out(output: Any) -> Tensor:
    return output["out"] if isinstance(output, dict) else output


def benchmark_adapter(model: str) -> TaskBenchmark:
    """The `TaskBenchmark` of the task that builds `model`; no counterpart is an `UnknownNameError`
    naming the models that have one."""
    entry = task_of(model)
    adapter = entry.benchmark_adapter()
    if adapter is None or model not in adapter.counterparts:
        raise UnknownNameError(
            f"{model!r} has no torchvision counterpart to benchmark against{closest_names(model, benchmark_models())}"
        )
    return adapter


def benchmark_models() -> list[str]:
    """Every model with a torchvision counterpart, task by task (e.g. `['resnet18', ..., 'deeplabv3_r50']`)."""
    names: list[str] = []
    for task in list_tasks():
        adapter = get_task(task).benchmark_adapter()
        names += list(adapter.counterparts) if adapter is not None else []
    return names
