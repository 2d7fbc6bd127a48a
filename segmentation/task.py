"""The Lightning task for DeepLabV3/V3+: the model, its loss, mIoU evaluation and prediction.

Optimizer, schedule, num_classes and the evaluation hooks are `backbones.training.TrainingTask`'s.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

from backbones.training import TrainingTask, check_finite_losses
from backbones.training.figures import log_figures
from backbones.weights_table import WEIGHTS, WeightsSpec

from .evaluation import SegmentationEvaluator, format_per_class_table
from .inference import SegmentationInference
from .models import build_model, check_build_args
from .transforms import IGNORE_INDEX
from .weights_table import SEGMENTATION_WEIGHTS


class SegmentationTask(TrainingTask):
    """Trains and evaluates a model of `segmentation.build_model`.

    Batches are ``(images, masks)``: float images in [0, 1] (N, 3, H, W), which the task
    normalizes with `mean` and `std`, and int64 masks (N, H, W) with 255 for void. The model's
    classes must be the data's, one for one (the confusion matrix is over them).

    Args:
        model: a preset (`deeplabv3plus_r50`, ...) or "deeplabv3"/"deeplabv3plus".
        backbone: overrides the preset's backbone (any registered name or `timm/<model>`).
        weights, backbone_weights, output_stride, aux_loss: see `build_model`. A tag
            (`segmentation.weights_table`, `backbones.WEIGHTS`) also gives the default `mean`/`std`, and
            the `weights` tag `num_classes` (21 for the `*.tv_coco_voc` tags), unless `fresh_heads`.
        fresh_heads: with `weights` of another number of classes (fine-tuning), load all but the
            class-specific layers (`segmentation.models.CLASS_LAYERS`), which start fresh; without it
            such weights are an error that names the mismatched keys and shapes.
        model_options: more `build_model` arguments (norm, frozen_stages, multi_grid,
            atrous_rates, aspp_channels, decoder_channels, separable, ...).
        aux_weight: weight of the aux head's loss (0.4 as in PSPNet; torchvision's references use 0.5).
        report_dir: after each evaluation (validate, test, each validation epoch of fit), process 0 writes
            the evaluation report there (`segmentation.report`: report.html, its figures and metrics.json,
            with `report_bootstrap` resamplings for the intervals); the worst images are predicted again
            from the evaluation data to be drawn. None: no report (and no per-image statistics kept).
        report_bootstrap: image resamplings of the report's confidence intervals (0: none), seeded with
            `report_seed`.
        inference: how validate, test and predict run the model (`SegmentationInference`: mode whole or
            slide with crop_size and stride, scales, flip, window_batch_size); None: whole. In YAML
            `inference: {mode: slide, crop_size: [512, 1024], stride: [341, 683]}`.
        lr, schedule: as in `TrainingTask`; the defaults are DeepLab's (lr 0.01, poly decay).
        **kwargs: the other `TrainingTask` settings (num_classes, lr_reference_batch_size, power,
            milestones, warmup, warmup_unit, mean, std, channels_last ...).
    """

    progress_metric = "mIoU"
    run_settings = ("report_dir", "report_bootstrap", "report_seed")
    exact_num_classes = True
    weights_tables: ClassVar[dict[str, Mapping[str, WeightsSpec]]] = {
        "weights": SEGMENTATION_WEIGHTS,
        "backbone_weights": WEIGHTS,
    }

    def __init__(
        self,
        *,
        model: str = "deeplabv3plus_r18",
        backbone: str | None = None,
        weights: str | None = None,
        backbone_weights: str | None = None,
        fresh_heads: bool = False,
        output_stride: int = 16,
        aux_loss: bool = False,
        model_options: dict[str, Any] | None = None,
        aux_weight: float = 0.4,
        report_dir: str | None = None,
        report_bootstrap: int = 1000,
        report_seed: int = 0,
        inference: SegmentationInference | None = None,
        lr: float = 0.01,
        schedule: Literal["poly", "cosine", "step", "constant"] = "poly",
        **kwargs: Any,
    ):
        check_build_args(model, dict(model_options or {}, backbone=backbone))  # misspelt names fail now, not later
        if report_bootstrap < 0:
            raise ValueError(f"report_bootstrap={report_bootstrap}; give a number of resamplings >= 0")
        options = SegmentationInference.create(inference)  # bad options fail now, not at the first validation
        inference = options.as_dict()  # saved as plain values: checkpoints load with weights_only=True
        super().__init__(lr=lr, schedule=schedule, **kwargs)
        self.inference = options
        if self.hparams.num_classes is not None:
            self.build_model(self.hparams.num_classes)

    def build_model(self, num_classes: int) -> None:
        hp = self.hparams
        self.model = build_model(
            hp.model, num_classes=num_classes, weights=hp.weights, backbone_weights=hp.backbone_weights,
            output_stride=hp.output_stride, aux_loss=hp.aux_loss, backbone=hp.backbone, fresh_heads=hp.fresh_heads,
            **(hp.model_options or {}),
        )  # fmt: skip

    def setup(self, stage: str) -> None:
        self._check_label_space()
        super().setup(stage)

    def _check_label_space(self) -> None:
        """Published weights whose labels are known categories need the data in the same label order."""
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        spec = None if self.hparams.fresh_heads else SEGMENTATION_WEIGHTS.get(str(self.hparams.weights))
        if spec is None or spec.category_ids is None or not hasattr(datamodule, "category_ids"):
            return
        data_ids = tuple(datamodule.category_ids) if datamodule.category_ids is not None else None
        if data_ids != spec.category_ids:
            raise ValueError(
                f"the weights {self.hparams.weights!r} predict the categories {list(spec.category_ids)} (COCO ids, in "
                f"label order 1..{len(spec.category_ids)}), but the data module's category_ids are "
                f"{list(data_ids) if data_ids else 'all of the annotation file, in id order'}; set "
                "data.category_ids to the weights' (segmentation.VOC_CATEGORY_IDS), or fresh_heads: true"
            )

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        """Logits `out` (and `aux`) (N, num_classes, H, W) of images in [0, 1] (N, 3, H, W)."""
        return self.model(self.normalize(images))

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

    def build_evaluator(self, stage: str) -> SegmentationEvaluator:
        return SegmentationEvaluator(
            int(self.hparams.num_classes),
            ignore_index=IGNORE_INDEX,
            class_names=self.hparams.class_names,
            per_image=self.report_dir is not None,  # the report's bootstrap and worst images
        )

    def infer(self, images: Tensor, size: tuple[int, int] | None = None) -> Tensor:
        """Scores (N, num_classes, *size) of images in [0, 1] by the `inference` mode: logits, or with scales or
        flip averaged probabilities; their arg-max is the prediction. `size` defaults to the images'."""
        return self.inference(lambda x: self(x)["out"], images, size)

    def evaluation_step(self, batch: tuple[Tensor, Tensor], stage: str) -> None:
        images, masks = batch
        scores = self.infer(images, masks.shape[-2:])
        loss = _cross_entropy(scores, masks, probabilities=self.inference.averages_probabilities)
        self.log_eval_loss(stage, loss, len(images))
        self.evaluator(stage).update(scores.argmax(1), masks)

    def report_evaluation(self, stage: str, metrics: Mapping[str, float]) -> None:
        """Logs the IoU of each class; on process 0 (not in the sanity check) prints them, logs the
        row-normalised confusion matrix to loggers that take figures and writes the report to `report_dir`."""
        evaluator = self.evaluator(stage)
        per_class = evaluator.per_class()
        scalars = {f"{stage}_IoU_{name}": row["IoU"] for name, row in per_class.items() if not math.isnan(row["IoU"])}
        self.log_dict(scalars, sync_dist=False)  # the same on every rank
        if not self.trainer.is_global_zero or self.trainer.sanity_checking:
            return
        title = f"{stage} per-class metrics (fractions), step {self.global_step}"
        print(format_per_class_table(per_class, title, self.inference.describe()))
        print(f"{stage}_mIoU {metrics['mIoU']:.4f}  {stage}_pixel_acc {metrics['pixel_acc']:.4f}")
        log_figures(self.trainer, lambda: self._figures(stage, evaluator), self.global_step)
        if self.report_dir is not None:
            self._write_report(stage, evaluator)

    def _figures(self, stage: str, evaluator: SegmentationEvaluator) -> dict[str, Any]:
        from .report import confusion_matrix_figure  # matplotlib only when a logger takes figures

        title = f"{stage} pixel confusions, row-normalised, step {self.global_step}"
        figure = confusion_matrix_figure(evaluator.total_confusion, evaluator.class_names, title=title)
        return {f"{stage}_confusion_matrix": figure}

    def _write_report(self, stage: str, evaluator: SegmentationEvaluator) -> None:
        from .report import segmentation_metrics, write_segmentation_report

        loaders = self.trainer.val_dataloaders if stage == "val" else self.trainer.test_dataloaders
        dataset = getattr(loaders, "dataset", None)  # one loader: its dataset holds the evaluated images
        metrics = segmentation_metrics(
            evaluator.total_confusion, evaluator.per_image_statistics, evaluator.class_names,
            image_names=[_image_name(dataset, int(i)) for i in evaluator.image_indices],
            num_bootstrap=self.report_bootstrap,
            seed=self.report_seed,
        )  # fmt: skip
        write_segmentation_report(
            self.report_dir, metrics, load_image=None if dataset is None else self._image_loader(dataset),
            ignore_index=IGNORE_INDEX, sources={"stage": stage, "epoch": self.current_epoch, "step": self.global_step},
        )  # fmt: skip

    def _image_loader(self, dataset: Any):
        """Image `index` of `dataset` (as evaluated: after the evaluation transforms), its labels and the model's
        prediction, computed again under the evaluation's precision."""

        def load(index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            image, mask = dataset[index]
            image = torch.as_tensor(image)
            batch = (image.float() / 255 if image.dtype == torch.uint8 else image.float())[None].to(self.device)
            context = self.trainer.precision_plugin.val_step_context()
            with torch.no_grad(), context:
                prediction = self.infer(batch, tuple(mask.shape[-2:])).argmax(1)[0]
            picture = (batch[0].clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
            return picture, torch.as_tensor(mask).cpu().numpy(), prediction.cpu().numpy()

        return load

    def predict_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        """Class indices (N, H, W)."""
        images, _ = batch
        return self.infer(images).argmax(1)


def _image_name(dataset: Any, index: int) -> str:
    """The file name of image `index` of a folder dataset, the image id of a COCO one, else the index."""
    if hasattr(dataset, "pairs"):
        return dataset.pairs[index][0].name
    if hasattr(dataset, "ids"):
        return f"image_id {dataset.ids[index]}"
    return str(index)


def _cross_entropy(scores: Tensor, masks: Tensor, *, probabilities: bool = False) -> Tensor:
    """Mean cross-entropy over the labelled pixels of logits (or of averaged `probabilities`); 0 (not nan) when a
    batch has none."""
    if probabilities:  # the log of a probability that rounded to 0 is clamped: a finite, large loss
        log_probabilities = scores.clamp(min=torch.finfo(scores.dtype).tiny).log()
        total = F.nll_loss(log_probabilities, masks, ignore_index=IGNORE_INDEX, reduction="sum").float()
    else:
        total = F.cross_entropy(scores, masks, ignore_index=IGNORE_INDEX, reduction="sum")
    return total / (masks != IGNORE_INDEX).sum().clamp(min=1)
