"""The Lightning task for DeepLabV3/V3+: loss, optimizer, poly schedule, logging and mIoU evaluation."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import lightning as L
import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torchmetrics import MeanMetric

from backbones.training import (
    LRSchedule,
    batch_scaled_lr,
    check_finite_losses,
    param_groups,
    prepare_task_model,
)
from backbones.weights_table import IMAGENET_MEAN, IMAGENET_STD

from .evaluation import SegmentationEvaluator, format_per_class_table
from .models import build_model, check_build_args
from .transforms import IGNORE_INDEX


class SegmentationTask(L.LightningModule):
    """Trains and evaluates a model of `segmentation.build_model`.

    Batches are ``(images, masks)``: float images in [0, 1] (N, 3, H, W), which the task
    normalizes with `mean` and `std`, and int64 masks (N, H, W) with 255 for void.

    Args:
        model: a preset (`deeplabv3plus_r50`, ...) or "deeplabv3"/"deeplabv3plus".
        num_classes: background included; None takes it from the data module.
        backbone: overrides the preset's backbone (any registered name or `timm/<model>`).
        weights, backbone_weights, output_stride, aux_loss: see `build_model`.
        fresh_heads: with `weights` of another number of classes (fine-tuning), load all but the
            class-specific layers, which start fresh; without it such weights are an error that
            names the mismatched keys and shapes.
        model_options: more `build_model` arguments (norm, frozen_stages, multi_grid,
            atrous_rates, aspp_channels, decoder_channels, separable, ...).
        aux_weight: weight of the aux head's loss (0.4 as in PSPNet; torchvision's references use 0.5).
        lr, momentum, weight_decay: SGD settings.
        schedule, power: the decay after warmup: "poly" ((1 - t)^power, DeepLab's) or another of
            `backbones.training.SCHEDULES`.
        warmup_steps, warmup_factor: linear warmup from `warmup_factor * lr`.
        mean, std: input normalization (the backbone weights' statistics).
        class_names: filled from the data module and saved with the checkpoint (for inference).
        lr_reference_batch_size: scale `lr` with the global batch: lr * global_batch / this, where
            global_batch = batch_size * devices * num_nodes * accumulate_grad_batches; None: no scaling.
        channels_last: run the model in channels-last memory (faster with bf16/fp16 on GPUs).
    """

    def __init__(
        self,
        *,
        model: str = "deeplabv3plus_r18",
        num_classes: int | None = None,
        backbone: str | None = None,
        weights: str | None = None,
        backbone_weights: str | None = None,
        fresh_heads: bool = False,
        output_stride: int = 16,
        aux_loss: bool = False,
        model_options: dict[str, Any] | None = None,
        aux_weight: float = 0.4,
        lr: float = 0.01,
        momentum: float = 0.9,
        weight_decay: float = 1e-4,
        schedule: Literal["poly", "cosine", "step", "constant"] = "poly",
        power: float = 0.9,
        warmup_steps: int = 0,
        warmup_factor: float = 0.001,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        class_names: list[str] | None = None,
        lr_reference_batch_size: int | None = None,
        channels_last: bool = False,
    ):
        super().__init__()
        check_build_args(model, dict(model_options or {}, backbone=backbone))  # misspelt names fail now, not later
        self.save_hyperparameters()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.model = self._build(num_classes) if num_classes is not None else None
        self.evaluator: SegmentationEvaluator | None = None
        # Weighted means summed over ranks: Lightning's own synced mean (self.log(sync_dist=True)) floors the
        # image count when ranks evaluate different numbers of images (Lightning issue 21859).
        self.losses = nn.ModuleDict({stage: MeanMetric() for stage in ("val", "test")})

    def _build(self, num_classes: int) -> torch.nn.Module:
        hp = self.hparams
        return build_model(
            hp.model, num_classes=num_classes, weights=hp.weights, backbone_weights=hp.backbone_weights,
            output_stride=hp.output_stride, aux_loss=hp.aux_loss, backbone=hp.backbone, fresh_heads=hp.fresh_heads,
            **(hp.model_options or {}),
        )  # fmt: skip

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None or not hasattr(datamodule, "num_classes"):
            if self.model is None:
                raise ValueError("num_classes is not set and there is no segmentation data module to take it from")
            return
        data_classes = datamodule.num_classes
        if self.model is None:
            self.hparams.num_classes = data_classes
            self.model = self._build(data_classes)
        elif self.hparams.num_classes != data_classes:
            raise ValueError(f"model.num_classes={self.hparams.num_classes}, but the data has {data_classes} classes")
        self.hparams.class_names = list(datamodule.class_names)

    def configure_model(self) -> None:
        prepare_task_model(self, channels_last=self.hparams.channels_last)

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        """Logits `out` (and `aux`) (N, num_classes, H, W) of images in [0, 1] (N, 3, H, W)."""
        return self.model((images - self.mean) / self.std)

    def _losses(self, outputs: dict[str, Tensor], masks: Tensor) -> dict[str, Tensor]:
        losses = {"loss_out": _cross_entropy(outputs["out"], masks)}
        if "aux" in outputs:
            losses["loss_aux"] = self.hparams.aux_weight * _cross_entropy(outputs["aux"], masks)
        return losses

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        images, masks = batch
        losses = self._losses(self(images), masks)
        check_finite_losses(losses, self.global_step)
        loss = sum(losses.values())
        self.log("train_loss", loss, prog_bar=True, batch_size=len(images))
        if len(losses) > 1:
            self.log_dict({f"train_{k}": v for k, v in losses.items()}, batch_size=len(images))
        return loss

    def _start_evaluation(self) -> None:
        self.evaluator = SegmentationEvaluator(
            int(self.hparams.num_classes), ignore_index=IGNORE_INDEX, class_names=self.hparams.class_names
        )

    def _evaluation_step(self, batch: tuple[Tensor, Tensor], stage: str) -> None:
        images, masks = batch
        logits = self(images)["out"]
        self.losses[stage].update(_cross_entropy(logits, masks), weight=len(images))
        self.log(f"{stage}_loss", self.losses[stage], batch_size=len(images))
        self.evaluator.update(logits.argmax(1), masks)

    def _finish_evaluation(self, stage: str) -> None:
        metrics = self.evaluator.compute()  # summed over every rank; the same values on each
        self.log_dict({f"{stage}_{k}": v for k, v in metrics.items()}, sync_dist=False)
        if self.trainer.is_global_zero and not self.trainer.sanity_checking:
            title = f"{stage} per-class metrics (%), step {self.global_step}"
            print(format_per_class_table(self.evaluator.per_class(), title))
            print(f"{stage}_mIoU {100 * metrics['mIoU']:.2f}  {stage}_pixel_acc {100 * metrics['pixel_acc']:.2f}")
        self.evaluator = None

    def on_validation_epoch_start(self) -> None:
        self._start_evaluation()

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluation_step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._finish_evaluation("val")

    def on_test_epoch_start(self) -> None:
        self._start_evaluation()

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluation_step(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._finish_evaluation("test")

    def predict_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        """Class indices (N, H, W)."""
        images, _ = batch
        return self(images)["out"].argmax(1)

    def configure_optimizers(self) -> dict:
        hp = self.hparams
        lr = batch_scaled_lr(hp.lr, hp.lr_reference_batch_size, self.trainer)
        optimizer = torch.optim.SGD(param_groups(self.model, hp.weight_decay), lr=lr, momentum=hp.momentum)
        schedule = LRSchedule(
            total_steps=int(self.trainer.estimated_stepping_batches), schedule=hp.schedule, power=hp.power,
            warmup_steps=hp.warmup_steps, warmup_factor=hp.warmup_factor,
        )  # fmt: skip
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def _cross_entropy(logits: Tensor, masks: Tensor) -> Tensor:
    """Mean cross-entropy over the labelled pixels; 0 (not nan) when a batch has none."""
    total = F.cross_entropy(logits, masks, ignore_index=IGNORE_INDEX, reduction="sum")
    return total / (masks != IGNORE_INDEX).sum().clamp(min=1)
