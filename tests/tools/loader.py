"""For the tool tests: a script of `tools/` as a module (the tools are scripts, not a package), and a
checkpoint of a one-step fit to run the inference tools on."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import lightning as L

TOOLS = Path(__file__).resolve().parents[2] / "tools"


def load_tool(name: str) -> ModuleType:
    """`tools/<name>.py` as a module, e.g. `load_tool("infer_det").main([...])`."""
    spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fit_one_step(task: L.LightningModule, datamodule: L.LightningDataModule, root: Path) -> Path:
    """Trains `task` one step on the CPU (no validation, no logs) and saves `root/model.ckpt`."""
    trainer = L.Trainer(
        max_steps=1, limit_val_batches=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, accelerator="cpu", default_root_dir=str(root),
    )  # fmt: skip
    trainer.fit(task, datamodule)
    path = root / "model.ckpt"
    trainer.save_checkpoint(path)
    return path
