"""The one LightningCLI set-up the training tools share."""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
from lightning.pytorch.cli import LightningCLI

from backbones.registry import UnknownNameError


class _CLI(LightningCLI):
    """LightningCLI whose `--ckpt_path last` also finds the last checkpoint of an earlier logger version.

    Lightning looks for `last.ckpt` in the checkpoint folder of the run being started, which a logger
    puts in a new `version_N` folder, so a restarted run would silently start from scratch.
    """

    def _resolve_last(self) -> None:
        config = self.config_init[self.subcommand]
        if config.get("ckpt_path") == "last" and (found := find_last_checkpoint(self.trainer)) is not None:
            config["ckpt_path"] = str(found)

    before_fit = before_validate = before_test = before_predict = _resolve_last


def find_last_checkpoint(trainer: L.Trainer) -> Path | None:
    """The newest `last*.ckpt` of a run folder: its checkpoint folders, under every logger version.

    Searched: each ModelCheckpoint's `dirpath`, `default_root_dir/checkpoints` (no logger) and
    `default_root_dir/<logger name>/version_*/checkpoints` (the default layout). None if there is none.
    """
    root = Path(trainer.default_root_dir)
    folders = [root / "checkpoints", *root.glob("*/version_*/checkpoints")]
    folders += [Path(cb.dirpath) for cb in trainer.checkpoint_callbacks if getattr(cb, "dirpath", None)]
    found = [path for folder in folders if folder.is_dir() for path in folder.glob("last*.ckpt")]
    return max(found, key=lambda path: path.stat().st_mtime, default=None)


def run_cli(
    task: type[L.LightningModule], datamodule: type[L.LightningDataModule], args: list[str] | None = None, run: bool = True
) -> LightningCLI:
    """`fit/validate/test/predict` from a YAML config; the data module is chosen by `class_path`.

    A misspelt model, backbone or option name in the config ends the run with one line, `<tool>: error:
    <message naming the closest names>`, and exit status 2, as a command-line error would.
    """
    try:
        return _CLI(
            task,
            datamodule,
            subclass_mode_data=True,
            seed_everything_default=0,
            save_config_kwargs={"overwrite": True},
            args=args,
            run=run,
        )
    except UnknownNameError as error:  # the user's typo: its message says all, a traceback would bury it
        print(f"{Path(sys.argv[0]).stem}: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
