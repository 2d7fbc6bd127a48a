"""The Lightning task for Faster/Mask R-CNN: optimizer, schedule, logging and COCO evaluation."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Literal

import lightning as L
import torch

from backbones.training import (
    LRSchedule,
    batch_scaled_lr,
    check_finite_losses,
    param_groups,
    prepare_task_model,
    steps_per_epoch,
)

from .evaluation import COCOEvaluator
from .models import PRESETS, build_model, check_build_args

log = logging.getLogger(__name__)


class DetectionTask(L.LightningModule):
    """Trains and evaluates a detector from `detection.build_model`.

    Args:
        model: a preset name or "faster_rcnn"/"mask_rcnn" (see `detection.models.PRESETS`).
        num_classes: including background; None takes it from the data module's categories.
        weights, backbone_weights: see `build_model`.
        fresh_heads: with `weights` of another number of classes (fine-tuning from COCO to a new
            dataset), load all but the class-specific layers, which start fresh; without it such
            weights are an error that names the mismatched keys and shapes.
        model_options: more `build_model` arguments (backbone, neck, head, norm, anchor_sizes,
            min_size, max_size, rpn_*/box_* settings ...).
        lr: base learning rate of SGD (momentum `momentum`, weight decay `weight_decay`).
        schedule: "step" (decay by `gamma` at `milestones`), "cosine", "poly" or "constant", after a
            linear warmup of `warmup_steps` steps from `warmup_factor * lr`.
        milestones, milestones_unit: when "step" decays: in epochs (the 1x schedule: 8 and 11 of 12)
            or in optimizer steps.
        eval_backend: "auto", "pycocotools" or "faster_coco_eval".
        category_names, label_to_category_id: filled from the data module and saved with the
            checkpoint, so inference can name classes and write COCO category ids.
        lr_reference_batch_size: scale `lr` with the global batch: lr * global_batch / this, where
            global_batch = batch_size * devices * num_nodes * accumulate_grad_batches; None: no scaling.
        channels_last: run the convolutions in channels-last memory (faster with bf16/fp16 on GPUs).
    """

    def __init__(
        self,
        *,
        model: str = "mask_rcnn_r18_fpn",
        num_classes: int | None = None,
        weights: str | None = None,
        backbone_weights: str | None = None,
        fresh_heads: bool = False,
        model_options: dict[str, Any] | None = None,
        lr: float = 0.02,
        momentum: float = 0.9,
        weight_decay: float = 1e-4,
        schedule: Literal["step", "cosine", "poly", "constant"] = "step",
        milestones: Sequence[int] = (8, 11),
        milestones_unit: Literal["epoch", "step"] = "epoch",
        gamma: float = 0.1,
        warmup_steps: int = 500,
        warmup_factor: float = 0.001,
        eval_backend: str = "auto",
        category_names: list[str] | None = None,
        label_to_category_id: dict[int, int] | None = None,
        lr_reference_batch_size: int | None = None,
        channels_last: bool = False,
    ):
        super().__init__()
        check_build_args(model, model_options)  # a misspelt name fails now, not after the data is read
        self.save_hyperparameters()
        self.model = self._build(num_classes) if num_classes is not None else None
        self.evaluator: COCOEvaluator | None = None

    def _build(self, num_classes: int) -> torch.nn.Module:
        options = dict(self.hparams.model_options or {})
        options.setdefault("resize_in_training", False)  # our data modules resize (multi-scale) already
        return build_model(
            self.hparams.model,
            num_classes=num_classes,
            weights=self.hparams.weights,
            backbone_weights=self.hparams.backbone_weights,
            fresh_heads=self.hparams.fresh_heads,
            **options,
        )

    @property
    def is_mask_model(self) -> bool:
        name = self.hparams.model
        return PRESETS.get(name, {}).get("architecture", name) == "mask_rcnn"

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None or not hasattr(datamodule, "num_classes"):
            if self.model is None:
                raise ValueError("num_classes is not set and there is no detection data module to take it from")
            return
        data_classes = datamodule.num_classes
        if self.model is None:
            self.hparams.num_classes = data_classes
            self.model = self._build(data_classes)
        elif self.hparams.num_classes < data_classes:
            raise ValueError(
                f"model.num_classes={self.hparams.num_classes}, but the annotations have {data_classes - 1} "
                f"categories ({data_classes} classes with background)"
            )
        self.hparams.category_names = list(datamodule.category_names)
        self.hparams.label_to_category_id = dict(datamodule.label_to_category_id)

    def configure_model(self) -> None:
        prepare_task_model(self, channels_last=self.hparams.channels_last)

    def forward(self, images: list[torch.Tensor], targets: list[dict] | None = None) -> Any:
        return self.model(images, targets)

    def training_step(self, batch: tuple[list, list], batch_idx: int) -> torch.Tensor:
        images, targets = batch
        losses = self.model(images, targets)
        check_finite_losses(losses, self.global_step)
        loss = sum(losses.values())
        batch_size = len(images)
        self.log("train_loss", loss, prog_bar=True, batch_size=batch_size)
        self.log_dict({f"train_{k}": v for k, v in losses.items()}, batch_size=batch_size)
        return loss

    def _start_evaluation(self, stage: str) -> None:
        datamodule = self.trainer.datamodule
        annotations = datamodule.val_annotations if stage == "val" else datamodule.test_annotations
        self.evaluator = COCOEvaluator(
            annotations=annotations,
            iou_types=("bbox", "segm") if self.is_mask_model else ("bbox",),
            label_to_category_id=datamodule.label_to_category_id,
            backend=self.hparams.eval_backend,
        )

    def _evaluation_step(self, batch: tuple[list, list]) -> None:
        images, targets = batch
        predictions = self.model(images)
        self.evaluator.update(predictions, [int(t["image_id"]) for t in targets])

    def _finish_evaluation(self, stage: str) -> None:
        metrics = self.evaluator.compute()  # gathered from every rank; the same values on each
        self.log_dict({f"{stage}_{k}": v for k, v in metrics.items()}, sync_dist=False)
        self.evaluator = None

    def on_validation_epoch_start(self) -> None:
        self._start_evaluation("val")

    def validation_step(self, batch: tuple[list, list], batch_idx: int) -> None:
        self._evaluation_step(batch)

    def on_validation_epoch_end(self) -> None:
        self._finish_evaluation("val")

    def on_test_epoch_start(self) -> None:
        self._start_evaluation("test")

    def test_step(self, batch: tuple[list, list], batch_idx: int) -> None:
        self._evaluation_step(batch)

    def on_test_epoch_end(self) -> None:
        self._finish_evaluation("test")

    def predict_step(self, batch: tuple[list, list], batch_idx: int) -> list[dict]:
        images, targets = batch
        predictions = self.model(images)
        for prediction, target in zip(predictions, targets):
            prediction["image_id"] = int(target["image_id"])
        return predictions

    def configure_optimizers(self) -> dict:
        hp = self.hparams
        lr = batch_scaled_lr(hp.lr, hp.lr_reference_batch_size, self.trainer)
        optimizer = torch.optim.SGD(param_groups(self.model, hp.weight_decay), lr=lr, momentum=hp.momentum)
        total = int(self.trainer.estimated_stepping_batches)
        milestones = list(hp.milestones)
        if hp.milestones_unit == "epoch":
            per_epoch = steps_per_epoch(total, self.trainer.max_epochs)
            milestones = [m * per_epoch for m in milestones]
        schedule = LRSchedule(
            total_steps=total,
            schedule=hp.schedule,
            milestones=milestones,
            gamma=hp.gamma,
            warmup_steps=hp.warmup_steps,
            warmup_factor=hp.warmup_factor,
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
