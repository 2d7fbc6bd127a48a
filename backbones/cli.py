"""The one LightningCLI set-up the training tools share."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.cli import LightningCLI


def run_cli(
    task: type[L.LightningModule], datamodule: type[L.LightningDataModule], args: list[str] | None = None, run: bool = True
) -> LightningCLI:
    """`fit/validate/test/predict` from a YAML config; the data module is chosen by `class_path`."""
    return LightningCLI(
        task,
        datamodule,
        subclass_mode_data=True,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )
