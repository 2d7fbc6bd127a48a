"""The Lightning task for Faster/Mask R-CNN: the model, its losses, COCO evaluation and prediction.

Optimizer, schedule, num_classes and the evaluation hooks are `backbones.training.TrainingTask`'s.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Literal

import torch
from lightning.pytorch.utilities import rank_zero_warn

from backbones.training import BACKGROUND, TrainingTask, check_finite_losses
from backbones.training.figures import log_figures
from backbones.weights_table import WEIGHTS, WeightsSpec

from .evaluation import COCOEvaluator
from .models import PRESETS, build_model, check_build_args
from .weights_table import DETECTION_WEIGHTS, LABEL_SPACES


class DetectionTask(TrainingTask):
    """Trains and evaluates a detector from `detection.build_model`.

    Args:
        model: a preset name or "faster_rcnn"/"mask_rcnn" (see `detection.models.PRESETS`).
        weights, backbone_weights: see `build_model`. A tag (`detection.weights_table`, `backbones.WEIGHTS`)
            also gives the default `mean`/`std`, and the `weights` tag `num_classes` (91 for the
            `*.tv_coco` tags), unless `fresh_heads`.
        fresh_heads: with `weights` of another number of classes (fine-tuning from COCO to a new
            dataset), load all but the class-specific layers (`detection.models.CLASS_LAYERS`), which
            start fresh; without it such weights are an error that names the mismatched keys and shapes.
        model_options: more `build_model` arguments (backbone, neck, head, norm, anchor_sizes,
            min_size, max_size, rpn_*/box_* settings ...). `min_size`/`max_size` are the evaluation
            scale; a training scale of the data module that does not reach it is warned about.
        label_space: what a label of the model means. "contiguous": labels 1..K stand for the data's
            categories in id order (the data module's mapping); "category_id": the label is the COCO
            category id, as in torchvision's published COCO detectors (91 outputs for ids up to 90),
            so the outputs must cover the largest category id. None: the weights tag's (see
            `detection.weights_table`; "category_id" for the `*.tv_coco` tags unless `fresh_heads`),
            else "contiguous". Saved with the checkpoint.
        eval_backend: "auto", "pycocotools" or "faster_coco_eval".
        report_dir: after each COCO evaluation (validate, test, each validation epoch of fit), process 0
            writes the evaluation report there (`detection.report`: report.html, its figures and
            metrics.json), the worst images drawn from the data module's images. None: no report.
        label_to_category_id: the COCO category id of each model label, filled from the data module
            and the label space and saved with the checkpoint, so inference writes the right ids
            (`class_names`, index 0 "__background__", names the labels).
        lr, schedule, milestones, warmup: as in `TrainingTask`; the defaults are the 1x schedule's
            (lr 0.02 for 16 images, decay at epochs 8 and 11 of 12, 500 steps of warmup).
        **kwargs: the other `TrainingTask` settings (num_classes, lr_reference_batch_size, momentum,
            weight_decay, milestones_unit, warmup_unit, mean, std, channels_last ...).
    """

    progress_metric = "bbox_AP"
    run_settings = ("report_dir",)
    weights_tables: ClassVar[dict[str, Mapping[str, WeightsSpec]]] = {
        "weights": DETECTION_WEIGHTS,
        "backbone_weights": WEIGHTS,
    }

    def __init__(
        self,
        *,
        model: str = "mask_rcnn_r18_fpn",
        weights: str | None = None,
        backbone_weights: str | None = None,
        fresh_heads: bool = False,
        model_options: dict[str, Any] | None = None,
        label_space: Literal["contiguous", "category_id"] | None = None,
        eval_backend: str = "auto",
        label_to_category_id: dict[int, int] | None = None,
        report_dir: str | None = None,
        lr: float = 0.02,
        schedule: Literal["step", "cosine", "poly", "constant"] = "step",
        milestones: Sequence[int] = (8, 11),
        warmup: float = 500,
        **kwargs: Any,
    ):
        check_build_args(model, model_options)  # a misspelt name fails now, not after the data is read
        super().__init__(lr=lr, schedule=schedule, milestones=milestones, warmup=warmup, **kwargs)
        self.hparams.label_space = resolve_label_space(label_space, weights, fresh_heads)
        self._data_labels: torch.Tensor | None = None  # data label -> model label, for the training targets
        self._eval_labels: torch.Tensor | None = None  # the model labels of the data's categories
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

    def data_num_classes(self, datamodule: Any) -> int:
        if self.hparams.label_space == "category_id":
            return max(datamodule.label_to_category_id.values(), default=0) + 1
        return int(datamodule.num_classes)

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None or not hasattr(datamodule, "label_to_category_id"):
            super().setup(stage)
            return
        if self.hparams.label_space == "category_id" and self.hparams.num_classes is not None:
            _check_covers_category_ids(int(self.hparams.num_classes), datamodule)
        super().setup(stage)
        data_mapping = dict(datamodule.label_to_category_id)
        if self.hparams.label_space == "category_id":
            # A label is a category id, whether or not this data has that category (as a published model's).
            self.hparams.label_to_category_id = {c: c for c in range(1, int(self.hparams.num_classes))}
            self._eval_labels = torch.tensor(sorted(data_mapping.values()))
            names = ["N/A"] * int(self.hparams.num_classes)  # torchvision's name for an id without a category
            names[0] = BACKGROUND
            for label, category_id in data_mapping.items():
                names[category_id] = datamodule.class_names[label]
            self.hparams.class_names = names
            self._data_labels = torch.tensor([0, *(data_mapping[label] for label in sorted(data_mapping))])
        else:
            self.hparams.label_to_category_id = data_mapping
            self._data_labels = self._eval_labels = None
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

    def to_model_labels(self, targets: list[dict]) -> list[dict]:
        """The data module's targets (contiguous labels) in the model's label space."""
        if self._data_labels is None:
            return targets
        lookup = self._data_labels.to(targets[0]["labels"].device) if targets else self._data_labels
        return [{**target, "labels": lookup[target["labels"]]} for target in targets]

    def training_step(self, batch: tuple[list, list], batch_idx: int) -> torch.Tensor:
        images, targets = batch
        losses = self.model(images, self.to_model_labels(targets))
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
            label_to_category_id=self.hparams.label_to_category_id,  # the model's labels, in its label space
            backend=self.hparams.eval_backend,
        )

    def report_evaluation(self, stage: str, metrics: Any) -> None:
        """Logs the per-category AP; on process 0 the PR curve and confusion matrix to loggers that take figures
        (TensorBoard's `add_figure`) and the report to `report_dir` (not during the sanity check)."""
        evaluator = self.evaluator(stage)
        for iou_type in evaluator.iou_types:
            per_category = evaluator.per_category_ap(iou_type)
            scalars = {f"{stage}_{iou_type}_AP_{name}": ap for name, ap in per_category.items() if not math.isnan(ap)}
            self.log_dict(scalars, sync_dist=False)  # the same on every rank
        if self.global_rank != 0 or self.trainer.sanity_checking:
            return
        report = self._write_report(stage, evaluator) if self.report_dir is not None else None
        self._log_figures(stage, evaluator, report)

    def _write_report(self, stage: str, evaluator: COCOEvaluator) -> dict | None:
        """Writes the report of this evaluation to `report_dir`; returns its metrics (None: no detections)."""
        if not evaluator.last_results:
            rank_zero_warn(f"no detections in the {stage} evaluation: no report written to {self.report_dir}")
            return None
        from .report import write_detection_report  # matplotlib only when a report is asked for

        split_paths = getattr(getattr(self.trainer, "datamodule", None), "split_paths", {})
        return write_detection_report(
            evaluator.coco_gt,
            evaluator.last_results,
            self.report_dir,
            iou_types=evaluator.iou_types,
            images_dir=split_paths.get(stage, (None,))[0],
            image_ids=evaluator.last_image_ids,
            sources={"stage": stage, "epoch": self.current_epoch, "annotations": self.evaluator_key(stage)},
        )

    def _log_figures(self, stage: str, evaluator: COCOEvaluator, report: dict | None) -> None:
        if not evaluator.last_results:
            return

        def figures() -> dict[str, Any]:  # drawn only for a logger that takes figures
            from .report import evaluation_figures, metrics_figures

            drawn = {}
            for iou_type in evaluator.iou_types:
                if report is not None:  # the report's numbers: no second pycocotools evaluation
                    made = metrics_figures(iou_type, report[iou_type])
                else:
                    made = evaluation_figures(
                        evaluator.coco_gt, evaluator.last_results, iou_type, image_ids=evaluator.last_image_ids
                    )
                drawn.update({f"{stage}_{iou_type}_{name}": figure for name, figure in made.items()})
            return drawn

        log_figures(self.trainer, figures, self.global_step)

    def evaluation_step(self, batch: tuple[list, list], stage: str) -> None:
        images, targets = batch
        predictions = self.model(images)
        if self._eval_labels is not None:
            # Detections of categories this data does not annotate are not scored (pycocotools ignores them too).
            predictions = [_only_labels(prediction, self._eval_labels) for prediction in predictions]
        self.evaluator(stage).update(predictions, [int(t["image_id"]) for t in targets])

    def predict_step(self, batch: tuple[list, list], batch_idx: int) -> list[dict]:
        images, targets = batch
        predictions = self.model(images)
        for prediction, target in zip(predictions, targets, strict=True):
            prediction["image_id"] = int(target["image_id"])
        return predictions


def resolve_label_space(label_space: str | None, weights: str | None, fresh_heads: bool) -> str:
    """The label space asked for, else the one of the weights tag (unless its heads start fresh), else contiguous.

    Raises:
        ValueError: an unknown label space, or one that contradicts the weights tag's.
    """
    if label_space is not None and label_space not in LABEL_SPACES:
        raise ValueError(f"label_space={label_space!r}; choose one of {', '.join(map(repr, LABEL_SPACES))}")
    spec = DETECTION_WEIGHTS.get(str(weights)) if weights is not None and not fresh_heads else None
    if spec is None:
        return label_space or "contiguous"
    if label_space is not None and label_space != spec.label_space:
        raise ValueError(
            f"label_space={label_space!r}, but the weights {weights!r} predict labels in the "
            f"{spec.label_space!r} label space ({spec.source}); drop label_space to use theirs, or set "
            "fresh_heads: true to train the class-specific layers anew"
        )
    return spec.label_space


def _check_covers_category_ids(num_classes: int, datamodule: Any) -> None:
    mapping = datamodule.label_to_category_id
    largest = max(mapping.values(), default=0)
    if num_classes <= largest:
        raise ValueError(
            f"model.num_classes={num_classes} gives labels 0..{num_classes - 1}, but with label_space "
            f"'category_id' every category id of the data must be a label, and the largest is {largest} "
            f"(of ids {sorted(mapping.values())}); set model.num_classes: {largest + 1} or more, or use "
            "label_space: contiguous"
        )


def _only_labels(prediction: dict[str, torch.Tensor], labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """The detections of `prediction` whose label is one of `labels`."""
    keep = torch.isin(prediction["labels"], labels.to(prediction["labels"].device))
    return {key: value[keep] if torch.is_tensor(value) and len(value) == len(keep) else value
            for key, value in prediction.items()}  # fmt: skip
