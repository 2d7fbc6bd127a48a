"""The door to the tasks: which task builds a model name, what a checkpoint is, and how to load it.

    entry = task_of("mask_rcnn_r18_fpn")  # the TaskEntry named "detection"
    task = load_task("last.ckpt")  # any task's checkpoint, built as trained, nothing downloaded
    task = load_task("last.ckpt", task="segmentation", tool="tools/infer_seg.py")  # another task's: one clear error

Each task package registers itself with `register_task` when it is imported: a `TaskEntry` of strings
("module:attribute"), resolved on use as the backbone registry resolves names, so reading this module
or an entry imports no Lightning. The task packages of this project (`BUILTIN_PACKAGES`) and those of
the entry-point group `resbone.tasks` are imported on the first look-up.
"""

from __future__ import annotations

import importlib
import os
import warnings
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from .registry import TIMM_PREFIX, UnknownNameError, closest_names
from .weights import WeightsError, load_checkpoint, load_task_checkpoint

__all__ = [
    "BUILTIN_PACKAGES",
    "ENTRY_POINT_GROUP",
    "TaskEntry",
    "get_task",
    "list_tasks",
    "load_task",
    "read_task_checkpoint",
    "register_task",
    "resolve",
    "task_hparams",
    "task_of",
]

ENTRY_POINT_GROUP = "resbone.tasks"
# The packages whose import registers this project's tasks (the library floor names them, imports them late).
BUILTIN_PACKAGES = ("backbones.classification", "detection", "segmentation")

_TASKS: dict[str, TaskEntry] = {}
_loaded = False


def resolve(target: str) -> Any:
    """The object a `"package.module:attribute"` string names, imported now."""
    module, _, attribute = target.partition(":")
    if not attribute:
        raise ValueError(f"{target!r}: give 'module:attribute'")
    return getattr(importlib.import_module(module), attribute)


@dataclass(frozen=True)
class TaskEntry:
    """A task as the tools see it; every field but `name` and the tools is a `"module:attribute"` string.

    Attributes:
        name: the task's name ("detection"), as in an export's metadata.
        task: its Lightning task class (imported only by `task_class()`).
        models: the collections of model names it builds (a dict, a tuple, or a callable returning one).
        export: its export adapter class (`backbones.export.TaskExport`).
        benchmark: its benchmark adapter class (`backbones.task_benchmark.TaskBenchmark`), if it has one.
        train_tool, infer_tool: the tools that train it and run its checkpoints, for messages.
        prefixes: name prefixes it builds too (classification: any `timm/<model>`).
    """

    name: str
    task: str
    models: tuple[str, ...]
    export: str
    train_tool: str
    infer_tool: str | None = None
    prefixes: tuple[str, ...] = ()
    benchmark: str | None = None

    def task_class(self) -> type:
        """The Lightning task class (imports Lightning)."""
        return resolve(self.task)

    def export_adapter(self) -> Any:
        """An instance of the task's export adapter."""
        return resolve(self.export)()

    def benchmark_adapter(self) -> Any:
        """An instance of the task's benchmark adapter, or None when it has none."""
        return resolve(self.benchmark)() if self.benchmark else None

    def model_names(self) -> list[str]:
        """The names this task builds (besides `prefixes`)."""
        names: list[str] = []
        for target in self.models:
            found = resolve(target)
            names += list(found() if callable(found) else found)
        return names

    def builds(self, model: str) -> bool:
        """Whether `model` (a preset, an architecture, either with a `.weights_tag`) is one of this task's."""
        return model.startswith(self.prefixes) or _untagged(model) in self.model_names()

    @property
    def tools(self) -> str:
        """Which tool takes a checkpoint of this task, for a message."""
        return self.infer_tool or f"{self.train_tool} (validate/test with --ckpt_path)"


def register_task(entry: TaskEntry) -> TaskEntry:
    """Adds `entry` to the registry; a second entry of the same name is an error.

    Example:
        >>> register_task(TaskEntry(name="keypoints", task="kp.task:KeypointTask", models=("kp.models:PRESETS",),
        ...                         export="kp.export:KeypointExport", train_tool="tools/train_kp.py"))
    """
    if entry.name in _TASKS and _TASKS[entry.name] != entry:
        raise ValueError(f"task {entry.name!r} is registered already (by {_TASKS[entry.name].task})")
    _TASKS[entry.name] = entry
    return entry


def _load_tasks() -> dict[str, TaskEntry]:
    global _loaded
    if not _loaded:
        _loaded = True
        for package in BUILTIN_PACKAGES:
            importlib.import_module(package)
        for plugin in entry_points(group=ENTRY_POINT_GROUP):
            try:
                plugin.load()  # a module whose import registers its task
            except Exception as error:  # a broken plugin must not break the tools
                warnings.warn(f"task plugin {plugin.name!r} ({plugin.value}) failed to load: {error}", stacklevel=2)
    return _TASKS


def list_tasks() -> list[str]:
    """The registered task names, e.g. `['classification', 'detection', 'segmentation']`."""
    return sorted(_load_tasks())


def get_task(name: str) -> TaskEntry:
    """The entry of task `name`; an unknown name is an `UnknownNameError` naming the registered ones."""
    tasks = _load_tasks()
    if name not in tasks:
        raise UnknownNameError(f"unknown task {name!r}{closest_names(name, tasks)}")
    return tasks[name]


def task_of(model: str) -> TaskEntry:
    """The task that builds `model` (a preset or an architecture name, e.g. `"deeplabv3plus_r18"`).

    Raises:
        UnknownNameError: no task builds it; the message names the closest names of every task.
    """
    entries = _load_tasks().values()
    for entry in entries:
        if entry.builds(model):
            return entry
    names = [name for entry in entries for name in entry.model_names()]
    raise UnknownNameError(f"unknown model {model!r}{closest_names(_untagged(model), names)} (no task builds it)")


def _untagged(model: str) -> str:
    # "mask_rcnn_r50_fpn.tv_coco" is the preset with a weights tag; timm's names keep their dots
    return model if model.startswith(TIMM_PREFIX) else model.split(".", 1)[0]


def task_hparams(checkpoint: object, path: str | os.PathLike) -> dict[str, Any]:
    """The one check that a loaded checkpoint is a task's: a Lightning `state_dict` and task
    hyper-parameters (`model`, `num_classes`); returns the hyper-parameters.

    Raises:
        WeightsError: it is not; the message names the file and the tools that write task checkpoints.
    """
    trainers = ", ".join(entry.train_tool for entry in _load_tasks().values())
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise WeightsError(
            f"{str(path)!r} is not a Lightning checkpoint (no 'state_dict') and has no task hyper-parameters: "
            f"not a checkpoint of {trainers}"
        )
    hparams = checkpoint.get("hyper_parameters")
    if not isinstance(hparams, dict) or not isinstance(hparams.get("model"), str) or not hparams.get("num_classes"):
        raise WeightsError(
            f"{str(path)!r} has no task hyper-parameters (model, num_classes): not a checkpoint of {trainers}"
        )
    return hparams


def read_task_checkpoint(path: str | os.PathLike) -> tuple[TaskEntry, dict[str, Any]]:
    """Reads a task checkpoint (`torch.load(weights_only=True)`) and finds its task.

    Returns:
        The task's entry and the checkpoint (`state_dict`, `hyper_parameters`, ...).

    Raises:
        FileNotFoundError: no such file.
        WeightsError: the file could run code, is corrupt, is no task's checkpoint, or names a model no task builds.
    """
    if not Path(path).is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    checkpoint = load_checkpoint(path, "checkpoint")
    model = task_hparams(checkpoint, path)["model"]
    try:
        return task_of(model), checkpoint
    except UnknownNameError as error:
        raise WeightsError(f"{str(path)!r}: {error}") from error


def load_task(path: str | os.PathLike, *, task: str | None = None, tool: str | None = None, **kwargs: Any) -> Any:
    """The Lightning task of a checkpoint, built as trained (its pretrained weights are not fetched).

    Args:
        path: a checkpoint of any registered task.
        task: the task the caller takes; a checkpoint of another is a `WeightsError` that says what it is
            and which tool takes it.
        tool: the caller, for that message (e.g. "tools/infer_seg.py").
        **kwargs: for `load_from_checkpoint`, e.g. `map_location`.
    """
    entry, _ = read_task_checkpoint(path)
    if task is not None and entry.name != task:
        get_task(task)  # a caller's typo is its own error
        raise WeightsError(wrong_task(path, entry, task, tool))
    return load_task_checkpoint(entry.task_class(), path, **kwargs)


def wrong_task(path: str | os.PathLike, entry: TaskEntry, task: str, tool: str | None) -> str:
    """`'x.ckpt' is a detection checkpoint, not a segmentation one (tools/infer_seg.py takes ...): ...`."""
    taker = f"{tool} takes a {task} checkpoint" if tool else f"a {task} checkpoint is needed"
    return f"{str(path)!r} is a {entry.name} checkpoint, not a {task} one ({taker}); give it to {entry.tools}"
