"""The Lightning task for Faster/Mask R-CNN: the model, its losses, COCO evaluation and prediction.

Optimizer, schedule, num_classes and the evaluation hooks are `backbones.training.TrainingTask`'s.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from lightning.pytorch.utilities import rank_zero_warn

from backbones.training import TrainingTask, check_finite_losses

from .evaluation import COCOEvaluator
from .models import PRESETS, build_model


class DetectionTask(TrainingTask):
    """Trains and evaluates a detector from `detection.build_model`.

    Args:
        model: a preset name or "faster_rcnn"/"mask_rcnn" (see `detection.models.PRESETS`).
        weights, backbone_weights: see `build_model`.
        fresh_heads: with `weights` of another number of classes (fine-tuning from COCO to a new
            dataset), load all but the class-specific layers, which start fresh; without it such
            weights are an error that names the mismatched keys and shapes.
        model_options: more `build_model` arguments (backbone, neck, head, norm, anchor_sizes,
            min_size, max_size, rpn_*/box_* settings ...). `min_size`/`max_size` are the evaluation
            scale; a training scale of the data module that does not reach it is warned about.
        eval_backend: "auto", "pycocotools" or "faster_coco_eval".
        label_to_category_id: filled from the data module and saved with the checkpoint, so inference
            can write COCO category ids (`class_names`, index 0 "__background__", names the labels).
        lr, schedule, milestones, warmup: as in `TrainingTask`; the defaults are the 1x schedule's
            (lr 0.02 for 16 images, decay at epochs 8 and 11 of 12, 500 steps of warmup).
        **kwargs: the other `TrainingTask` settings (num_classes, lr_reference_batch_size, momentum,
            weight_decay, milestones_unit, warmup_unit, mean, std, channels_last ...).
    """

    progress_metric = "bbox_AP"

    def __init__(
        self,
        *,
        model: str = "mask_rcnn_r18_fpn",
        weights: str | None = None,
        backbone_weights: str | None = None,
        fresh_heads: bool = False,
        model_options: dict[str, Any] | None = None,
        eval_backend: str = "auto",
        label_to_category_id: dict[int, int] | None = None,
        lr: float = 0.02,
        schedule: Literal["step", "cosine", "poly", "constant"] = "step",
        milestones: Sequence[int] = (8, 11),
        warmup: float = 500,
        **kwargs: Any,
    ):
        super().__init__(lr=lr, schedule=schedule, milestones=milestones, warmup=warmup, **kwargs)
        if self.hparams.num_classes is not None:
            self.build_model(self.hparams.num_classes)

    def build_model(self, num_classes: int) -> None:
        options = dict(self.hparams.model_options or {})
        options.setdefault("resize_in_training", False)  # our data modules resize (multi-scale) already
        if {"image_mean", "image_std"} & options.keys():
            raise ValueError("model_options.image_mean/image_std: set the task's mean and std instead (one setting)")
        # torchvision's transform normalizes the [0, 1] images inside the model, with the task's statistics
        options.update(image_mean=list(self.hparams.mean), image_std=list(self.hparams.std))
        self.model = build_model(
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
        super().setup(stage)
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None or not hasattr(datamodule, "label_to_category_id"):
            return
        self.hparams.label_to_category_id = dict(datamodule.label_to_category_id)
        self._check_data_settings(datamodule)

    def _check_data_settings(self, datamodule: Any) -> None:
        """The data module's masks and training scale must fit the model (both are set in two objects)."""
        with_masks = getattr(datamodule, "with_masks", None)
        if with_masks is not None and with_masks != self.is_mask_model:
            need = "needs instance masks" if self.is_mask_model else "does not use instance masks"
            raise ValueError(
                f"model={self.hparams.model!r} {need}, but the data module has with_masks={with_masks}; "
                f"set data.with_masks: {str(self.is_mask_model).lower()}"
            )
        train_sizes, max_size = getattr(datamodule, "train_sizes", None), getattr(datamodule, "max_size", None)
        transform = getattr(self.model, "transform", None)
        if not train_sizes or transform is None:
            return
        eval_min = max(transform.min_size)
        if not min(train_sizes) <= eval_min <= max(train_sizes) or max_size != transform.max_size:
            rank_zero_warn(
                f"the training scale (data.train_sizes={list(train_sizes)}, data.max_size={max_size}) does not "
                f"match the evaluation scale of the model (model_options.min_size={eval_min}, "
                f"model_options.max_size={transform.max_size}); set them to agree, or the model is evaluated at "
                "a scale it was not trained on"
            )

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

    def evaluator_key(self, stage: str) -> str | None:
        datamodule = self.trainer.datamodule
        return datamodule.val_annotations if stage == "val" else datamodule.test_annotations

    def build_evaluator(self, stage: str) -> COCOEvaluator:
        # Built once per split: reading and indexing a large ground-truth JSON is slow.
        return COCOEvaluator(
            annotations=self.evaluator_key(stage),
            iou_types=("bbox", "segm") if self.is_mask_model else ("bbox",),
            label_to_category_id=self.trainer.datamodule.label_to_category_id,
            backend=self.hparams.eval_backend,
        )

    def evaluation_step(self, batch: tuple[list, list], stage: str) -> None:
        images, targets = batch
        predictions = self.model(images)
        self.evaluator(stage).update(predictions, [int(t["image_id"]) for t in targets])

    def predict_step(self, batch: tuple[list, list], batch_idx: int) -> list[dict]:
        images, targets = batch
        predictions = self.model(images)
        for prediction, target in zip(predictions, targets):
            prediction["image_id"] = int(target["image_id"])
        return predictions
