"""The one LightningCLI set-up the training tools share."""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
from lightning.pytorch.cli import LightningCLI

from backbones.registry import UnknownNameError
from backbones.tasks import get_task, list_tasks, read_task_checkpoint
from backbones.weights import WeightsError


class _CLI(LightningCLI):
    """LightningCLI whose `--ckpt_path last` also finds the last checkpoint of an earlier logger version.

    Lightning looks for `last.ckpt` in the checkpoint folder of the run being started, which a logger
    puts in a new `version_N` folder, so a restarted run would silently start from scratch. `fit`
    without any last checkpoint starts from scratch (the first run of a resumable job); `validate`,
    `test` and `predict` without one are an error, as they would evaluate random weights.
    """

    def _resolve_last(self) -> None:
        config = self.config_init[self.subcommand]
        if config.get("ckpt_path") != "last":
            return
        found = find_last_checkpoint(self.trainer)
        if found is not None:
            config["ckpt_path"] = str(found)
        elif self.subcommand != "fit":
            searched = ", ".join(str(folder) for folder in checkpoint_folders(self.trainer))
            raise FileNotFoundError(
                f"{self.subcommand} --ckpt_path last: no last*.ckpt found (searched {searched}); give the "
                "checkpoint file, or the trainer.default_root_dir of the run that wrote it"
            )

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
    """The newest `last*.ckpt` of a run folder: its checkpoint folders, under every logger version.

    Searched: each ModelCheckpoint's `dirpath`, `default_root_dir/checkpoints` (no logger) and
    `default_root_dir/<logger name>/version_*/checkpoints` (the default layout). None if there is none.
    """
    found = [path for folder in checkpoint_folders(trainer) if folder.is_dir() for path in folder.glob("last*.ckpt")]
    return max(found, key=lambda path: path.stat().st_mtime, default=None)


def checkpoint_folders(trainer: L.Trainer) -> list[Path]:
    """Where `find_last_checkpoint` looks (the folders under every logger version that exist now)."""
    root = Path(trainer.default_root_dir)
    folders = [root / "checkpoints", *sorted(root.glob("*/version_*/checkpoints"))]
    return folders + [Path(cb.dirpath) for cb in trainer.checkpoint_callbacks if getattr(cb, "dirpath", None)]


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

    A misspelt model, backbone or option name in the config ends the run with one line, `<tool>: error:
    <message naming the closest names>`, and exit status 2, as a command-line error would.
    """
    try:
        return _CLI(
            task,
            datamodule,
            subclass_mode_data=True,
            auto_configure_optimizers=False,
            seed_everything_default=0,
            save_config_kwargs={"overwrite": True},
            args=args,
            run=run,
        )
    except UnknownNameError as error:  # the user's typo: its message says all, a traceback would bury it
        print(f"{Path(sys.argv[0]).stem}: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
