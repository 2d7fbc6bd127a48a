"""For the tool tests: a script of `tools/` as a module or as a process (the tools are scripts, not a
package), and a checkpoint of a one-step fit to run the inference tools on."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import lightning as L
import pytest

ROOT = Path(__file__).resolve().parents[2]
TOOLS = ROOT / "tools"


def load_tool(name: str) -> ModuleType:
    """`tools/<name>.py` as a module, e.g. `load_tool("infer_det").main([...])`.

    The module is `sys.modules[name]` (as if imported, which dataclasses need), loaded once. While it
    loads, `tools/` is first on the path, as when the script runs (benchmark.py imports benchmark_coco.py).
    """
    path = TOOLS / f"{name}.py"
    loaded = sys.modules.get(name)
    if loaded is not None and Path(getattr(loaded, "__file__", "")) == path:
        return loaded
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.syspath_prepend(str(TOOLS))
            spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def run_tool(name: str, *args: object, timeout: float = 300) -> subprocess.CompletedProcess:
    """Runs `python tools/<name>.py ARGS` as a user would, with this checkout first on the path."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, str(TOOLS / f"{name}.py"), *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


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
