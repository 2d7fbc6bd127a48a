"""The Lightning task for ImageNet-style classification: recipe, schedule, EMA, logging and top-k accuracy."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any, Literal

import lightning as L
import torch
from timm.utils import ModelEmaV3
from torch import Tensor, nn
from torch.nn import functional as F
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from backbones.registry import create_model
from backbones.training import (
    LRSchedule,
    batch_scaled_lr,
    check_finite_losses,
    param_groups,
    prepare_task_model,
    steps_per_epoch,
)

log = logging.getLogger(__name__)

TOP5_MIN_CLASSES = 5


class ClassificationTask(L.LightningModule):
    """Trains and evaluates a classifier of `backbones.create_model`.

    The defaults are the ResNet paper's recipe: SGD with momentum 0.9, weight decay 1e-4, learning
    rate 0.1 per 256 images, divided by 10 at epochs 30, 60 and 80 of 90. The modern options
    (cosine schedule with warmup, label smoothing, no decay on norms and biases, zero-initialised last
    norm of each block, EMA of the weights) are off by default.

    Args:
        model: a registered name (`backbones.list_backbones()`) or `timm/<model>`.
        num_classes: None takes it from the data module's class folders.
        weights: initial weights (tag, file or URL); a classifier of another size keeps a fresh fc.
        model_options: more `create_model` arguments (drop_path_rate, norm, in_chans ...).
        zero_init_last: zero the last norm of every residual block (Goyal et al.; "zero gamma").
        lr_per_256: learning rate per 256 images; the rate used is `lr_per_256 * global_batch / 256`
            with global_batch = batch_size * world_size * accumulate_grad_batches.
        lr: a fixed learning rate instead (no scaling).
        momentum, weight_decay: SGD settings (Nesterov off, as in the paper).
        norm_bias_decay: False exempts norm weights and all biases from weight decay.
        schedule: "step" (times `gamma` at each of `milestones`, in epochs), "cosine", "poly" or
            "constant", after `warmup_epochs` of linear warmup from `warmup_factor * lr`.
        label_smoothing: of the training loss (validation loss is plain cross-entropy).
        ema_decay: keep an exponential moving average of the weights with this decay (e.g. 0.9999),
            evaluate with it and save it in the checkpoint (keys `ema.module.*`); None: no EMA.
        ema_warmup: ramp the EMA decay up over the first steps (timm's warmup).
        class_names: filled from the data module and saved with the checkpoint (for inference).
        channels_last: run the model in channels-last memory (faster with bf16/fp16 on GPUs).
    """

    def __init__(
        self,
        *,
        model: str = "resnet50",
        num_classes: int | None = None,
        weights: str | None = None,
        model_options: dict[str, Any] | None = None,
        zero_init_last: bool = False,
        lr_per_256: float = 0.1,
        lr: float | None = None,
        momentum: float = 0.9,
        weight_decay: float = 1e-4,
        norm_bias_decay: bool = True,
        schedule: Literal["step", "cosine", "poly", "constant"] = "step",
        milestones: Sequence[int] = (30, 60, 80),
        gamma: float = 0.1,
        warmup_epochs: float = 0.0,
        warmup_factor: float = 0.001,
        label_smoothing: float = 0.0,
        ema_decay: float | None = None,
        ema_warmup: bool = False,
        class_names: list[str] | None = None,
        channels_last: bool = False,
    ):
        super().__init__()
        if ema_decay is not None and not 0.0 <= ema_decay <= 1.0:
            raise ValueError(f"ema_decay={ema_decay}; choose a value in [0, 1] (e.g. 0.9999) or None")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing={label_smoothing}; choose a value in [0, 1)")
        self.save_hyperparameters()
        self.model: nn.Module | None = None
        self.ema: ModelEmaV3 | None = None
        if num_classes is not None:
            self._build(num_classes)

    def _build(self, num_classes: int) -> None:
        hp = self.hparams
        options = dict(hp.model_options or {})
        if hp.zero_init_last:
            options["zero_init_last"] = True
        self.model = create_model(hp.model, num_classes=num_classes, weights=hp.weights, **options)
        if hp.ema_decay is not None:
            self.ema = ModelEmaV3(self.model, decay=hp.ema_decay, use_warmup=hp.ema_warmup)
            self.ema.requires_grad_(False)  # updated by hand; DDP must not expect gradients for it
            self.ema.train()  # follows the task's mode like any submodule; it only runs in evaluation (eval mode)
        top_k = [1, 5] if num_classes >= TOP5_MIN_CLASSES else [1]
        # The loss as a weighted mean summed over ranks: Lightning's own synced mean (self.log(sync_dist=True))
        # floors the image count when ranks evaluate different numbers of images (Lightning issue 21859).
        self.metrics = nn.ModuleDict(
            {
                stage: nn.ModuleDict(
                    {
                        "loss": MeanMetric(),
                        **{f"top{k}": MulticlassAccuracy(num_classes, top_k=k, average="micro") for k in top_k},
                    }
                )
                for stage in ("val", "test")
            }
        )

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is None or not hasattr(datamodule, "num_classes"):
            if self.model is None:
                raise ValueError("num_classes is not set and there is no classification data module to take it from")
            return
        data_classes = datamodule.num_classes
        if self.model is None:
            self.hparams.num_classes = data_classes
            self._build(data_classes)
        elif self.hparams.num_classes < data_classes:
            raise ValueError(f"model.num_classes={self.hparams.num_classes}, but the data has {data_classes} classes")
        self.hparams.class_names = list(datamodule.class_names)

    def configure_model(self) -> None:
        prepare_task_model(self, channels_last=self.hparams.channels_last)

    @property
    def eval_model(self) -> nn.Module:
        """The network that validation, test and prediction use: the EMA when there is one."""
        return self.ema.module if self.ema is not None else self.model

    def forward(self, images: Tensor) -> Tensor:
        return self.eval_model(images)  # (N, num_classes) logits

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        images, labels = batch
        loss = F.cross_entropy(self.model(images), labels, label_smoothing=self.hparams.label_smoothing)
        check_finite_losses({"loss": loss}, self.global_step)
        self.log("train_loss", loss, prog_bar=True, batch_size=len(images))
        return loss

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        if self.ema is not None:  # once per optimizer step, so after every accumulated batch group
            self.ema.update(self.model, step=self.global_step + 1)

    def _evaluation_step(self, batch: tuple[Tensor, Tensor], stage: str) -> None:
        images, labels = batch
        logits = self.eval_model(images)
        for name, metric in self.metrics[stage].items():
            if name == "loss":
                metric.update(F.cross_entropy(logits, labels), weight=len(images))
            else:
                metric.update(logits, labels)
            self.log(f"{stage}_{name}", metric, prog_bar=name == "top1", batch_size=len(images))

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluation_step(batch, "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluation_step(batch, "test")

    def predict_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> dict[str, Tensor]:
        images, _ = batch
        probabilities = self.eval_model(images).softmax(dim=1)
        scores, labels = probabilities.topk(min(5, probabilities.shape[1]), dim=1)
        return {"labels": labels, "scores": scores}  # (N, k) each, best first; names in hparams.class_names

    def learning_rate(self) -> float:
        """The base learning rate: `lr`, or `lr_per_256` scaled by the global batch."""
        hp = self.hparams
        if hp.lr is not None:
            return batch_scaled_lr(hp.lr, None, self.trainer)
        return batch_scaled_lr(hp.lr_per_256, 256, self.trainer, name="lr_per_256")

    def lr_schedule(self, *, total_steps: int, steps_per_epoch: int) -> LRSchedule:
        """The per-step factor of the learning rate, with milestones and warmup given in epochs."""
        hp = self.hparams
        return LRSchedule(
            total_steps=total_steps,
            schedule=hp.schedule,
            milestones=[m * steps_per_epoch for m in hp.milestones],
            gamma=hp.gamma,
            warmup_steps=round(hp.warmup_epochs * steps_per_epoch),
            warmup_factor=hp.warmup_factor,
        )

    def configure_optimizers(self) -> dict:
        hp = self.hparams
        lr = self.learning_rate()
        groups = param_groups(self.model, hp.weight_decay, norm_bias_decay=hp.norm_bias_decay)
        optimizer = torch.optim.SGD(groups, lr=lr, momentum=hp.momentum)
        total = int(self.trainer.estimated_stepping_batches)  # also loads the training data
        schedule = self.lr_schedule(total_steps=total, steps_per_epoch=self._steps_per_epoch(total))
        log.info("learning rate %.4g, %s schedule over %d steps", lr, hp.schedule, total)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _steps_per_epoch(self, total_steps: int) -> int:
        batches = self.trainer.num_training_batches  # per device, known once the training data is loaded
        if math.isfinite(batches) and batches > 0:
            return max(math.ceil(batches / self.trainer.accumulate_grad_batches), 1)
        return steps_per_epoch(total_steps, self.trainer.max_epochs)
