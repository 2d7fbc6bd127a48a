"""The Lightning task for ImageNet-style classification: recipe, EMA, loss and top-k accuracy.

Optimizer, schedule, num_classes and the evaluation hooks are `backbones.training.TrainingTask`'s.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Literal

from timm.utils import ModelEmaV3
from torch import Tensor, nn
from torch.nn import functional as F
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from backbones.registry import create_model
from backbones.training import TrainingTask, check_finite_losses
from backbones.weights_table import CLASS_LAYERS, WEIGHTS, WeightsSpec

__all__ = ["CLASS_LAYERS", "ClassificationTask"]

TOP5_MIN_CLASSES = 5


class ClassificationTask(TrainingTask):
    """Trains and evaluates a classifier of `backbones.create_model`.

    The defaults are the ResNet paper's recipe: SGD with momentum 0.9, weight decay 1e-4, learning
    rate 0.1 per 256 images, divided by 10 at epochs 30, 60 and 80 of 90. The modern options
    (cosine schedule with warmup, label smoothing, no decay on norms and biases, zero-initialised last
    norm of each block, EMA of the weights) are off by default.

    Args:
        model: a registered name (`backbones.list_backbones()`) or `timm/<model>`.
        weights: initial weights (tag, file or URL). A tag (`backbones.WEIGHTS`) also gives the default
            `mean`/`std` and, unless `fresh_heads`, `num_classes` (1000 for ImageNet-1k), as torchvision's
            `resnet50(weights=...)`; a file of another number of classes leaves the class layer
            (`CLASS_LAYERS`) fresh, with a warning.
        fresh_heads: with a weights tag, train the class layer anew for the data's classes (fine-tuning
            ImageNet weights on another dataset); without it the tag's classes must be the data's.
        model_options: more `create_model` arguments (drop_path_rate, norm, in_chans ...).
        zero_init_last: zero the last norm of every residual block (Goyal et al.; "zero gamma").
        label_smoothing: of the training loss (validation loss is plain cross-entropy).
        ema_decay: keep an exponential moving average of the weights with this decay (e.g. 0.9999),
            evaluate with it and save it in the checkpoint (keys `ema.module.*`); None: no EMA.
        ema_warmup: ramp the EMA decay up over the first steps (timm's warmup).
        lr, lr_reference_batch_size: 0.1 per 256 images by default: the rate used is
            lr * global_batch / 256 (None: `lr` as it is).
        milestones, milestones_unit, warmup_unit: epochs by default.
        **kwargs: the other `TrainingTask` settings (num_classes, momentum, weight_decay,
            norm_bias_decay, schedule, gamma, warmup, warmup_factor, mean, std, channels_last ...).
    """

    progress_metric = "top1"
    # the labels are the data's class folders, which the checkpoint names one for one
    exact_num_classes = True
    weights_tables: ClassVar[dict[str, Mapping[str, WeightsSpec]]] = {"weights": WEIGHTS}

    def __init__(
        self,
        *,
        model: str = "resnet50",
        weights: str | None = None,
        fresh_heads: bool = False,
        model_options: dict[str, Any] | None = None,
        zero_init_last: bool = False,
        label_smoothing: float = 0.0,
        ema_decay: float | None = None,
        ema_warmup: bool = False,
        lr: float = 0.1,
        lr_reference_batch_size: int | None = 256,
        milestones: Sequence[int] = (30, 60, 80),
        milestones_unit: Literal["epoch", "step"] = "epoch",
        warmup_unit: Literal["step", "epoch"] = "epoch",
        **kwargs: Any,
    ):
        if ema_decay is not None and not 0.0 <= ema_decay <= 1.0:
            raise ValueError(f"ema_decay={ema_decay}; choose a value in [0, 1] (e.g. 0.9999) or None")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing={label_smoothing}; choose a value in [0, 1)")
        super().__init__(
            lr=lr, lr_reference_batch_size=lr_reference_batch_size, milestones=milestones,
            milestones_unit=milestones_unit, warmup_unit=warmup_unit, **kwargs,
        )  # fmt: skip
        self.ema: ModelEmaV3 | None = None
        if self.hparams.num_classes is not None:
            self.build_model(self.hparams.num_classes)

    def build_model(self, num_classes: int) -> None:
        hp = self.hparams
        options = dict(hp.model_options or {})
        if hp.zero_init_last:
            options["zero_init_last"] = True
        self.model = create_model(hp.model, num_classes=num_classes, weights=hp.weights, **options)
        if hp.ema_decay is not None:
            self.ema = ModelEmaV3(self.model, decay=hp.ema_decay, use_warmup=hp.ema_warmup)
            self.ema.requires_grad_(False)  # updated by hand; DDP must not expect gradients for it
            self.ema.train()  # follows the task's mode like any submodule; it only runs in evaluation (eval mode)

    @property
    def eval_model(self) -> nn.Module:
        """The network that validation, test and prediction use: the EMA when there is one."""
        return self.ema.module if self.ema is not None else self.model

    def forward(self, images: Tensor) -> Tensor:
        """(N, num_classes) logits of float images in [0, 1] (N, 3, H, W)."""
        return self.eval_model(self.normalize(images))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        images, labels = batch
        logits = self.model(self.normalize(images))
        loss = F.cross_entropy(logits, labels, label_smoothing=self.hparams.label_smoothing)
        check_finite_losses({"loss": loss}, self.global_step)
        self.log("train_loss", loss, prog_bar=True, batch_size=len(images))
        return loss

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        if self.ema is not None:  # once per optimizer step, so after every accumulated batch group
            self.ema.update(self.model, step=self.global_step + 1)

    def build_evaluator(self, stage: str) -> MetricCollection:
        # torchmetrics sums the counts over ranks in compute(); top-5 only where there are 5 classes to rank.
        num_classes = int(self.hparams.num_classes)
        top_k = [1, 5] if num_classes >= TOP5_MIN_CLASSES else [1]
        return MetricCollection({f"top{k}": MulticlassAccuracy(num_classes, top_k=k, average="micro") for k in top_k})

    def evaluation_step(self, batch: tuple[Tensor, Tensor], stage: str) -> None:
        images, labels = batch
        logits = self(images)
        self.log_eval_loss(stage, F.cross_entropy(logits, labels), len(images))
        self.evaluator(stage).update(logits, labels)

    def predict_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> dict[str, Tensor]:
        images, _ = batch
        probabilities = self(images).softmax(dim=1)
        scores, labels = probabilities.topk(min(5, probabilities.shape[1]), dim=1)
        return {"labels": labels, "scores": scores}  # (N, k) each, best first; names in hparams.class_names
