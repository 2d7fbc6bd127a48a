"""The checkpoint that makes a run resumable close to where it stopped, whether it ended, was interrupted or killed.

Lightning's `ModelCheckpoint` saves every N training steps *or* every N epochs (the two are mutually
exclusive) and saves nothing when a run is interrupted. What Lightning 2.6 does on a signal:

- SIGTERM (`kill`, a scheduler's preemption): it sets `trainer.received_sigterm`; the loops finish
  the current batch, then raise `SIGTERMException` (a `SystemExit`), and the callbacks' `on_exception`
  run. Nothing is saved unless a callback does it.
- SIGINT (Ctrl-C): Python raises `KeyboardInterrupt` wherever the process is, also halfway through
  an optimizer step whose parameter groups are then partly updated; `on_exception` runs, then exit 1.

`LastCheckpoint` turns the first Ctrl-C into Lightning's SIGTERM stop, so both signals stop at the
end of a step, from where the checkpoint resumes exactly (the data modules' samplers skip the batches
already trained on, see `backbones.training.samplers`). A second Ctrl-C stops at once, as usual.
A Ctrl-C during the validation of an epoch stops after it: Lightning 2.6 cannot resume a validation
it stopped halfway (it goes on with the next epoch, or ends, without that epoch's metrics).
"""

from __future__ import annotations

import signal
import threading
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info

__all__ = ["LastCheckpoint"]


class LastCheckpoint(ModelCheckpoint):
    """`last.ckpt`, written every `every_n_train_steps` training steps, at the end of every training epoch
    and when the run is stopped by Ctrl-C or SIGTERM, so that `fit --ckpt_path last` continues from there.

    It keeps no other checkpoint (`save_top_k=0`); a plain `ModelCheckpoint` beside it keeps the epoch's
    or the best one. A killed run (SIGKILL, a crash) loses at most the steps since the last save. An error
    in training (a non-finite loss) saves nothing, so that `last.ckpt` stays the last good state.

    Args:
        dirpath: the folder; by default that of the logger's version, `<root>/<name>/version_N/checkpoints`.
        every_n_train_steps: the steps between two saves (each save writes the weights and optimizer state).

    Example (YAML, under `trainer.callbacks`):
        - class_path: backbones.training.callbacks.LastCheckpoint
          init_args:
            every_n_train_steps: 50
    """

    def __init__(self, dirpath: str | None = None, every_n_train_steps: int = 100) -> None:
        if every_n_train_steps < 1:
            raise ValueError(f"every_n_train_steps={every_n_train_steps}; give the steps between saves (>= 1)")
        super().__init__(dirpath=dirpath, save_top_k=0, save_last=True, every_n_train_steps=every_n_train_steps)
        self._sigint_handler: Any = None  # the handler ours replaced while fitting, None when ours is not set
        self._trainer: L.Trainer | None = None
        self._stop_after_validation = False

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            self._trainer, self._stop_after_validation = trainer, False
            self._sigint_handler = signal.signal(signal.SIGINT, self._on_ctrl_c)

    def _on_ctrl_c(self, signum: int, frame: Any) -> None:
        validating = self._trainer is not None and self._trainer.validating
        self._restore_sigint()  # a second Ctrl-C stops at once
        if validating:
            rank_zero_info("\nCtrl-C: stopping after this validation (press Ctrl-C again to stop at once)")
            self._stop_after_validation = True
        else:
            rank_zero_info("\nCtrl-C: stopping after this step, saving last.ckpt (press Ctrl-C again to stop at once)")
            signal.raise_signal(signal.SIGTERM)  # Lightning's handler: stop at the end of the current batch

    def _restore_sigint(self) -> None:
        self._trainer = None
        if self._sigint_handler is not None:
            signal.signal(signal.SIGINT, self._sigint_handler)
            self._sigint_handler = None

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._save_last(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # nothing to save (a validation changes no weights; the epoch's end saves)
        if self._stop_after_validation:
            self._stop_after_validation = False
            signal.raise_signal(signal.SIGTERM)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore_sigint()
        self._save_last(trainer)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore_sigint()
        if isinstance(exception, SIGTERMException):  # raised at the end of a batch: a state to resume from
            self._save_last(trainer)
            rank_zero_info(
                f"Stopped at step {trainer.global_step} (epoch {trainer.current_epoch}); {self.last_model_path} "
                "holds it: the same command with `--ckpt_path last` continues from there"
            )

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._restore_sigint()

    def _save_last(self, trainer: L.Trainer) -> None:
        if not self._should_skip_saving_checkpoint(trainer):  # not while validating alone, not twice a step
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
