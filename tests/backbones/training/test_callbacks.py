"""`LastCheckpoint` and `--ckpt_path last`: a run stopped by Ctrl-C or SIGTERM saves where it stood and
continues from there; `last` is the newest checkpoint of the run folder; a finished run says so."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
import yaml

from backbones.classification import ClassificationTask, ShapesClassificationDataModule
from backbones.training.callbacks import LastCheckpoint
from backbones.training.cli import find_last_checkpoint, finished_run
from tests.tools.loader import load_tool

ROOT = Path(__file__).resolve().parents[3]


class SignalAtStep(L.Callback):
    """Sends this process `signum` when training step `step` starts, as a user's Ctrl-C or `kill` would."""

    def __init__(self, step: int, signum: int):
        self.step, self.signum = step, signum

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            signal.raise_signal(self.signum)


class RecordSteps(L.Callback):
    def __init__(self):
        self.steps: list[int] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.steps.append(trainer.global_step)


def _fit(root: Path, data_root: Path, callbacks: list, ckpt_path: str | None = None) -> L.Trainer:
    """2 epochs of 3 steps (6 images of 32 px, batches of 2) of a GroupNorm ResNet-18 on the CPU."""
    L.seed_everything(0, verbose=False)
    data = ShapesClassificationDataModule(root=str(data_root), train_per_class=1, val_per_class=1, image_size=32,
                                          batch_size=2, num_workers=0)  # fmt: skip
    task = ClassificationTask(model="resnet18", model_options={"norm": "gn"}, lr=0.01)
    trainer = L.Trainer(
        max_epochs=2, limit_val_batches=0, logger=False, enable_progress_bar=False, enable_model_summary=False,
        accelerator="cpu", default_root_dir=root, callbacks=callbacks,
    )  # fmt: skip
    trainer.fit(task, data, ckpt_path=ckpt_path)
    return trainer


@pytest.mark.parametrize("signum", [signal.SIGINT, pytest.param(signal.SIGTERM, marks=pytest.mark.slow)])
def test_a_signal_mid_epoch_saves_last_and_the_run_continues_from_there(signum, tmp_path):
    handler = signal.getsignal(signal.SIGINT)
    # saves every 100 steps: the only mid-epoch checkpoint is the one written on the signal
    with pytest.raises(SystemExit):  # Lightning's SIGTERMException: the run stopped after step 4
        _fit(tmp_path / "run", tmp_path / "data", [LastCheckpoint(every_n_train_steps=100), SignalAtStep(3, signum)])
    assert signal.getsignal(signal.SIGINT) is handler  # Ctrl-C is the test runner's again
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(last, map_location="cpu", weights_only=True)
    assert (checkpoint["epoch"], checkpoint["global_step"]) == (1, 4)  # step 4 finished, then stopped
    assert (checkpoint["ShapesClassificationDataModule"]["epoch"], checkpoint["ShapesClassificationDataModule"]
            ["batches_done"]) == (1, 1)  # fmt: skip

    steps = RecordSteps()
    resumed = _fit(tmp_path / "run", tmp_path / "data", [LastCheckpoint(every_n_train_steps=100), steps], str(last))
    assert steps.steps == [4, 5] and resumed.global_step == 6 and resumed.current_epoch == 2
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == 6  # saved at the end


def _checkpoint(path: Path, *, epochs: int, step: int, mtime: int, last_step_done: bool = False) -> Path:
    """A checkpoint as Lightning writes it: `epochs` ended; with `last_step_done`, the next one's last step too
    (saved before that epoch's end: at its last step, or stopped during its validation)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    epoch_progress = {"current": {"processed": epochs, "started": epochs + int(last_step_done)}}
    loops = {"fit_loop": {"epoch_progress": epoch_progress, "epoch_loop.batch_progress": {"is_last_batch": True}}}
    torch.save({"global_step": step, "loops": loops}, path)
    os.utime(path, (mtime, mtime))
    return path


def test_last_is_the_newest_checkpoint_of_any_name_in_any_version(tmp_path):
    trainer = SimpleNamespace(default_root_dir=str(tmp_path), checkpoint_callbacks=[])
    logs = tmp_path / "lightning_logs"
    _checkpoint(logs / "version_0" / "checkpoints" / "last.ckpt", epochs=1, step=8, mtime=1000)  # a finished run
    later = _checkpoint(logs / "version_1" / "checkpoints" / "epoch=0-step=3.ckpt", epochs=0, step=3, mtime=2000)
    _checkpoint(logs / "version_2" / "checkpoints" / "last.ckpt", epochs=0, step=1, mtime=1500)
    assert find_last_checkpoint(trainer) == later


def test_fit_from_a_finished_run_says_so_and_how_to_train_longer(tmp_path, capsys, monkeypatch):
    finished = _checkpoint(tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt", epochs=1, step=450,
                           mtime=1000)  # fmt: skip
    trainer = SimpleNamespace(max_steps=-1, fit_loop=SimpleNamespace(max_epochs=1))
    assert "max_epochs=1 reached" in finished_run(finished, trainer)
    assert finished_run(finished, SimpleNamespace(max_steps=-1, fit_loop=SimpleNamespace(max_epochs=2))) is None
    assert "max_steps=450 reached" in finished_run(finished, SimpleNamespace(max_steps=450, fit_loop=trainer.fit_loop))
    stopped_validating = _checkpoint(tmp_path / "v.ckpt", epochs=0, step=450, mtime=0, last_step_done=True)
    assert "(1 epochs, step 450): max_epochs=1 reached" in finished_run(stopped_validating, trainer)

    monkeypatch.setattr("sys.argv", ["train_cls.py"])
    with pytest.raises(SystemExit) as exit_:  # before any data or training
        load_tool("train_cls").main(["fit", f"--config={ROOT / 'configs/classification/resnet18_shapes.yaml'}",
                                     "--trainer.max_epochs=1", f"--trainer.default_root_dir={tmp_path}",
                                     f"--data.root={tmp_path / 'never_made'}", "--ckpt_path=last"])  # fmt: skip
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"train_cls: error: {finished} is the end of a finished run (1 epochs, step 450): max_epochs=1 reached, "
        "nothing to resume; to train longer, give a larger --trainer.max_epochs (e.g. 2); to start again, leave out "
        "--ckpt_path"
    )


@pytest.mark.parametrize("config", sorted((ROOT / "configs").glob("*/*.yaml")), ids=lambda path: path.stem)
def test_every_config_saves_last_ckpt_every_n_steps_and_on_a_signal(config):
    callbacks = yaml.safe_load(config.read_text())["trainer"]["callbacks"]
    last = [cb for cb in callbacks if cb["class_path"] == "backbones.training.callbacks.LastCheckpoint"]
    assert len(last) == 1 and last[0]["init_args"]["every_n_train_steps"] >= 1
    assert not any((cb.get("init_args") or {}).get("save_last") for cb in callbacks)  # one writer of last.ckpt
