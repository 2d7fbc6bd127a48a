"""The one LightningCLI set-up the training tools share."""

from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path
from typing import NoReturn

import lightning as L
import torch
from jsonargparse import ArgumentParser
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.exceptions import SIGTERMException

from backbones.cli_utils import EXIT_BAD_INPUT
from backbones.registry import UnknownNameError, closest_names
from backbones.tasks import get_task, list_tasks, read_task_checkpoint
from backbones.weights import WeightsError

__all__ = ["EXIT_STOPPED", "RunError", "checkpoint_folders", "find_last_checkpoint", "finished_run", "run_cli"]

EXIT_STOPPED = 1  # stopped by Ctrl-C or SIGTERM before the end, as Lightning exits after a KeyboardInterrupt


class RunError(ValueError):
    """A run that cannot start as asked (nothing to resume, or nothing left to train); printed as one line."""


class _CLI(LightningCLI):
    """LightningCLI whose `--ckpt_path last` is the newest checkpoint of the run folder, in any logger version.

    Lightning looks for `last.ckpt` in the checkpoint folder of the run being started, which a logger
    puts in a new `version_N` folder, so a restarted run would silently start from scratch. `fit`
    without any checkpoint starts from scratch (the first run of a resumable job); `validate`,
    `test` and `predict` without one are an error, as they would evaluate random weights. `fit` from
    the checkpoint of a finished run is an error saying so, instead of a run that trains nothing.
    """

    def _resolve_last(self) -> None:
        config = self.config_init[self.subcommand]
        if config.get("ckpt_path") == "last":
            found = find_last_checkpoint(self.trainer)
            if found is not None:
                config["ckpt_path"] = str(found)
            elif self.subcommand != "fit":
                searched = ", ".join(str(folder) for folder in checkpoint_folders(self.trainer))
                raise RunError(
                    f"{self.subcommand} --ckpt_path last: no checkpoint found (searched {searched}); give the "
                    "checkpoint file, or the trainer.default_root_dir of the run that wrote it"
                )
        if self.subcommand == "fit" and config.get("ckpt_path") not in (None, "last"):
            reason = finished_run(Path(config["ckpt_path"]), self.trainer)
            if reason is not None:
                raise RunError(reason)

    before_fit = before_validate = before_test = before_predict = _resolve_last

    def _parse_ckpt_path(self) -> None:
        """Before Lightning parses a checkpoint's hyper-parameters as this task's: one of another task is
        named as what it is, with the tool that takes it."""
        subcommand = self.config.get("subcommand")
        path = subcommand and self.config[subcommand].get("ckpt_path")
        if path and Path(path).is_file():
            try:
                entry, _ = read_task_checkpoint(path)
            except WeightsError:  # not a task checkpoint: Lightning's own load reports it
                entry = None
            ours = f"{self.model_class.__module__}:{self.model_class.__qualname__}"
            if entry is not None and entry.task != ours:
                task = next((e.name for e in map(get_task, list_tasks()) if e.task == ours), ours)
                message = f"{path!r} is a {entry.name} checkpoint, not a {task} one; give it to {entry.train_tool}"
                print(f"{Path(sys.argv[0]).stem}: error: {message}", file=sys.stderr)
                raise SystemExit(2)
        super()._parse_ckpt_path()


def find_last_checkpoint(trainer: L.Trainer) -> Path | None:
    """The checkpoint written last in a run folder: the newest `*.ckpt` (by modification time) of its
    checkpoint folders, under every logger version, whatever its name. None if there is none.

    Newest, not the newest named `last*`: of a finished run and a later one, `last` is the later one,
    whether it has written its `last.ckpt` or only another checkpoint.
    """
    found = [path for folder in checkpoint_folders(trainer) if folder.is_dir() for path in folder.glob("*.ckpt")]
    return max(found, key=lambda path: path.stat().st_mtime_ns, default=None)


def checkpoint_folders(trainer: L.Trainer) -> list[Path]:
    """Where `find_last_checkpoint` looks: each ModelCheckpoint's `dirpath`, `default_root_dir/checkpoints`
    (no logger) and `default_root_dir/<logger name>/version_*/checkpoints` (the default layout)."""
    root = Path(trainer.default_root_dir)
    folders = [root / "checkpoints", *sorted(root.glob("*/version_*/checkpoints"))]
    return folders + [Path(cb.dirpath) for cb in trainer.checkpoint_callbacks if getattr(cb, "dirpath", None)]


def finished_run(checkpoint: Path, trainer: L.Trainer) -> str | None:
    """Why `fit` from `checkpoint` would train nothing with this trainer's limits, or None if it would train.

    Read as Lightning decides when fitting stops: the epochs whose training ended, `max_epochs`, and the
    global step, `max_steps`. An epoch whose last step is done counts as ended although the checkpoint
    was written before the epoch's end hooks (at its last step, or stopped during its validation): Lightning
    resumes after it. The checkpoint is memory-mapped: its tensors are not read.
    """
    state = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)
    step = state.get("global_step", 0)
    try:
        fit_loop = state["loops"]["fit_loop"]
        epochs, started = (fit_loop["epoch_progress"]["current"][key] for key in ("processed", "started"))
    except (KeyError, TypeError):
        return None  # not saved by a fit (e.g. weights only): Lightning reports what it cannot restore
    epochs += int(started > epochs and fit_loop.get("epoch_loop.batch_progress", {}).get("is_last_batch", False))
    end = f"{checkpoint} is the end of a finished run ({epochs} epochs, step {step})"
    if trainer.max_steps != -1 and step >= trainer.max_steps:
        return f"{end}: max_steps={trainer.max_steps} reached; to train longer, give a larger --trainer.max_steps"
    max_epochs = trainer.fit_loop.max_epochs
    if max_epochs is not None and max_epochs != -1 and epochs >= max_epochs:
        return (
            f"{end}: max_epochs={max_epochs} reached, nothing to resume; to train longer, give a larger "
            f"--trainer.max_epochs (e.g. {epochs + 1}); to start again, leave out --ckpt_path"
        )
    return None


class _Parser(LightningArgumentParser):
    """Reports a misspelt option (on the command line or in a YAML, of the trainer, the model or the data
    module) as one line naming the closest valid names, as the model registry does for a model name."""

    _checkpoint_hparams = False  # while LightningCLI parses the hyper-parameters of `--ckpt_path`

    def parse_object(self, *args, **kwargs):
        # LightningCLI's only use: a checkpoint's hyper-parameters, whose unknown keys are no typo of the
        # user's but a checkpoint of another task; that error is left as it is
        self._checkpoint_hparams = True
        try:
            return super().parse_object(*args, **kwargs)
        finally:
            self._checkpoint_hparams = False

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        line = unknown_option_message(getattr(ex, "subcommand_parser", None) or self, message)
        if line is None or self._checkpoint_hparams or not self.exit_on_error:
            super().error(message, ex)
        print(f"{Path(sys.argv[0]).stem}: error: {line}", file=sys.stderr)
        self.exit(EXIT_BAD_INPUT)


_UNKNOWN_KEY = [
    re.compile(r"unrecognized arguments: -*([^\s=]+)"),  # the command line
    re.compile(r"does not accept option '([^']+)'"),  # a YAML key
]
_UNKNOWN_INIT_ARG = re.compile(
    r'Parser key "(?P<key>[^"]+)":.*?Problem with given class_path \'(?P<class_path>[^\']+)\':\s*'
    r"Option '(?P<name>[^']+)' is not accepted",
    re.DOTALL,
)  # an init argument of a class chosen by class_path (the data module)


def unknown_option_message(parser: ArgumentParser, message: str) -> str | None:
    """`unknown option 'data.batch_sise'; closest: data.batch_size` for jsonargparse's message about an
    unknown option, None for any other message."""
    if match := _UNKNOWN_INIT_ARG.search(message):
        key, name = match["key"], match["name"]
        allowed = [f"{key}.{arg}" for arg in _init_args(match["class_path"])]
        return f"unknown option '{key}.{name}' of {match['class_path']}{closest_names(f'{key}.{name}', allowed)}"
    for pattern in _UNKNOWN_KEY:
        if match := pattern.search(message):
            allowed = [action.dest for action in parser._actions if action.dest not in ("help", "config")]
            return f"unknown option '{match[1]}'{closest_names(match[1], allowed)}"
    return None


def _init_args(class_path: str) -> list[str]:
    module, _, name = class_path.rpartition(".")
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(getattr(importlib.import_module(module), name))
    return [action.dest for action in parser._actions if action.dest != "help"]


def run_cli(
    task: type[L.LightningModule],
    datamodule: type[L.LightningDataModule],
    args: list[str] | None = None,
    run: bool = True,
) -> LightningCLI:
    """`fit/validate/test/predict` from a YAML config; the data module is chosen by `class_path`.

    The tasks configure their own optimizer and schedule (`TrainingTask`: SGD, warmup, batch-scaled
    lr), so LightningCLI's `--optimizer`/`--lr_scheduler` options are not offered: they would be
    silently ignored or build an optimizer before the model exists.

    A misspelt model, backbone or option name (of the model, the data module or the trainer, on the
    command line or in the config) ends the run with one line, `<tool>: error: <message naming the
    closest names>`, and exit status 2, as a command-line error would; so does `fit --ckpt_path` of a
    finished run. A run stopped by Ctrl-C or SIGTERM (see `backbones.training.callbacks.LastCheckpoint`)
    exits with status 1.
    """
    try:
        return _CLI(
            task,
            datamodule,
            subclass_mode_data=True,
            auto_configure_optimizers=False,
            seed_everything_default=0,
            save_config_kwargs={"overwrite": True},
            parser_class=_Parser,
            args=args,
            run=run,
        )
    except (UnknownNameError, RunError) as error:  # the user's typo: its message says all, a traceback would bury it
        print(f"{Path(sys.argv[0]).stem}: error: {error}", file=sys.stderr)
        raise SystemExit(EXIT_BAD_INPUT) from None
    except SIGTERMException:  # a SystemExit with status 0, as if the run had finished
        raise SystemExit(EXIT_STOPPED) from None
