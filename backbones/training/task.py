"""The Lightning task skeleton of the three tasks: optimizer, schedule, num_classes, evaluation hooks.

A task subclass gives the model (`build_model`), the training loss (`training_step`), the evaluator
(`build_evaluator`) and how a batch updates it (`evaluation_step`). Everything else is here, once:

- SGD with momentum and weight decay (norms and biases optionally exempt), the learning rate scaled
  by the global batch (`lr` for a batch of `lr_reference_batch_size`), and one schedule (linear warmup,
  then step, cosine, poly or constant) whose warmup and milestones are given in steps or epochs;
- `num_classes`: given, else the weights tag's (its class layer kept), else the data module's; checked
  against the data module's;
- input normalization: every data module gives float images in [0, 1]; the task's `mean` and `std`
  (given, else the weights tag's, else ImageNet's) normalize them (`normalize`; the detector passes
  them to torchvision's transform, which does it);
- the evaluator of each split is built once and `reset()` at the start of every epoch, updated by
  every batch and `compute()`d at the end (the protocol of detectron2's `DatasetEvaluator`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Literal, Protocol

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torchmetrics import MeanMetric

from backbones.weights import num_classes_of_weights
from backbones.weights_table import IMAGENET_MEAN, IMAGENET_STD, WeightsSpec

from .distributed import prepare_task_model
from .optim import batch_scaled_lr, param_groups
from .schedules import SCHEDULES, LRSchedule

__all__ = ["EVAL_STAGES", "Evaluator", "TrainingTask", "check_num_classes", "steps_per_epoch"]

EVAL_STAGES = ("val", "test")
UNITS = ("step", "epoch")


class Evaluator(Protocol):
    """What a task's evaluator does: forget, take a batch, give the metrics (the same on every rank)."""

    def reset(self) -> None: ...

    def update(self, *args: Any, **kwargs: Any) -> None: ...

    def compute(self) -> Mapping[str, float | Tensor]: ...


def check_num_classes(model_classes: int, data_classes: int, *, exact: bool = False) -> None:
    """The model must cover the data's classes (`exact`: have exactly as many); the error names both.

    A model with more outputs than the data has classes is allowed where nothing compares the outputs
    one-to-one with the data's classes (detection, whose labels may be category ids); `exact` is for tasks
    whose labels are the data's classes one for one (a segmentation confusion matrix, class folders).
    """
    if model_classes == data_classes or (not exact and model_classes > data_classes):
        return
    rule = "exactly" if exact else "at least"
    raise ValueError(
        f"model.num_classes={model_classes}, but the data module has {data_classes} classes; the model needs "
        f"{rule} {data_classes} (set model.num_classes: {data_classes}, or null to take it from the data)"
    )


def _same_values(given: Sequence[float], published: Sequence[float]) -> bool:
    return len(given) == len(published) and all(
        math.isclose(float(a), float(b), rel_tol=1e-6) for a, b in zip(given, published, strict=True)
    )


def steps_per_epoch(trainer: L.Trainer) -> int:
    """Optimizer steps per epoch on this device: ceil(training batches / accumulate_grad_batches).

    Known once the training data is loaded (`trainer.estimated_stepping_batches` loads it); it follows
    `limit_train_batches` and is right also when `max_steps` ends the run before `max_epochs`.
    """
    if trainer.train_dataloader is None:  # `max_steps` without `max_epochs`: Lightning has not loaded it yet
        state = trainer.state
        trainer.training = True
        trainer.fit_loop.setup_data()  # what `estimated_stepping_batches` does; the loader is kept for training
        trainer.state = state
    batches = trainer.num_training_batches
    if not (math.isfinite(batches) and batches > 0):
        raise ValueError(
            f"the training loader has {batches} batches per epoch; an epoch-based warmup or milestones need a "
            "sized training loader (give them in steps with warmup_unit/milestones_unit: step)"
        )
    return max(math.ceil(batches / trainer.accumulate_grad_batches), 1)


class TrainingTask(L.LightningModule):
    """The shared part of `DetectionTask`, `SegmentationTask` and `ClassificationTask`.

    Args:
        num_classes: None takes it from the weights tag whose class layer the model keeps (the
            first of `weights_tables`, unless `fresh_heads`), else from the data module
            (`datamodule.num_classes`). Given, it must equal the tag's (or set `fresh_heads`).
        class_names: filled from the data module and saved with the checkpoint (for inference).
        lr: base learning rate of SGD, for a global batch of `lr_reference_batch_size` images.
        lr_reference_batch_size: the rate used is lr * global_batch / this, where global_batch =
            batch_size * devices * num_nodes * accumulate_grad_batches; None: `lr` as it is.
        momentum, weight_decay: SGD settings.
        norm_bias_decay: False exempts norm weights and all biases from weight decay.
        schedule: after warmup, "step" (times `gamma` at each of `milestones`), "cosine", "poly"
            ((1 - t)^power) or "constant".
        milestones, milestones_unit: when "step" decays, in epochs or optimizer steps.
        min_lr: the rate "cosine" and "poly" decay to at the last step (0 by default; DeepLab's recipes: 1e-4).
        warmup, warmup_unit: linear warmup from `warmup_factor * lr` over this many steps or epochs.
        mean, std: input normalization of the [0, 1] images. None: the statistics of the weights tag the
            model starts from (`spec.mean`, `spec.std` of the first tag in `weights_tables`), else
            ImageNet's. Given, they must equal the tag's.
        channels_last: run the convolutions in channels-last memory (faster with bf16/fp16 on GPUs).
    """

    #: the metric shown in the progress bar, without its stage prefix
    progress_metric: str = ""
    #: the model's outputs must match the data's classes one-to-one (see `check_num_classes`)
    exact_num_classes: bool = False
    #: the task's weights arguments and the tables resolving their tags, the whole model's first: the first
    #: tag given sets the default mean/std; the first argument's tag sets num_classes unless `fresh_heads`
    weights_tables: ClassVar[dict[str, Mapping[str, WeightsSpec]]] = {}
    #: arguments that set up this run's evaluation, not the model (e.g. `report_dir`): attributes, kept out of
    #: the checkpoint's hyper-parameters, which LightningCLI would otherwise put over the command line's values
    #: when a run validates `--ckpt_path FILE`
    run_settings: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        *,
        num_classes: int | None = None,
        class_names: list[str] | None = None,
        lr: float = 0.02,
        lr_reference_batch_size: int | None = None,
        momentum: float = 0.9,
        weight_decay: float = 1e-4,
        norm_bias_decay: bool = True,
        schedule: Literal["step", "cosine", "poly", "constant"] = "step",
        milestones: Sequence[int] = (),
        milestones_unit: Literal["epoch", "step"] = "epoch",
        gamma: float = 0.1,
        power: float = 0.9,
        min_lr: float = 0.0,
        warmup: float = 0,
        warmup_unit: Literal["step", "epoch"] = "step",
        warmup_factor: float = 0.001,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule={schedule!r}; choose one of {', '.join(SCHEDULES)}")
        if schedule == "step" and not milestones:
            raise ValueError("schedule='step' needs milestones (e.g. milestones: [8, 11], milestones_unit: epoch)")
        for name, unit in (("milestones_unit", milestones_unit), ("warmup_unit", warmup_unit)):
            if unit not in UNITS:
                raise ValueError(f"{name}={unit!r}; choose 'step' or 'epoch'")
        if not 0 <= min_lr <= lr:
            raise ValueError(f"min_lr={min_lr}; give a rate from 0 to lr={lr}")
        if warmup < 0:
            raise ValueError(f"warmup={warmup}; give a number of steps or epochs >= 0")
        self.save_hyperparameters()  # also the subclass's arguments (Lightning collects every __init__ frame)
        for key in self.run_settings:
            setattr(self, key, self.hparams.pop(key))
        self._fill_from_weights()  # num_classes, mean and std of a weights tag, saved with the checkpoint
        mean, std = self.hparams.mean, self.hparams.std
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"mean={list(mean)}, std={list(std)}; give three values each, std positive")
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.model: nn.Module | None = None
        self._evaluators: dict[tuple[str, Any], Evaluator] = {}
        # Weighted means summed over ranks: Lightning's own synced mean (self.log(sync_dist=True)) floors the
        # image count when ranks evaluate different numbers of images (Lightning issue 21859).
        self.eval_losses = nn.ModuleDict({stage: MeanMetric() for stage in EVAL_STAGES})

    # ------------------------------------------------------------ what a task gives

    def build_model(self, num_classes: int) -> None:
        """Builds `self.model` (and anything sized by the classes) for `num_classes`."""
        raise NotImplementedError

    def build_evaluator(self, stage: str) -> Evaluator:
        """The evaluator of `stage` ("val" or "test"); built once per split and reset every epoch."""
        raise NotImplementedError

    def evaluator_key(self, stage: str) -> Any:
        """What the evaluator of `stage` depends on besides the stage (e.g. the annotation file)."""
        return None

    def evaluation_step(self, batch: Any, stage: str) -> None:
        """Updates `self.evaluator(stage)` (and `log_eval_loss`) with one batch."""
        raise NotImplementedError

    def report_evaluation(self, stage: str, metrics: Mapping[str, float]) -> None:
        """Called on every rank after the metrics of an epoch are logged (e.g. to print a table)."""

    # ------------------------------------------------------------ classes, model and input

    def weights_tags(self) -> list[tuple[str, str, WeightsSpec]]:
        """(argument, tag, spec) of each weights argument of `weights_tables` that holds a tag, in table order."""
        tags = []
        for argument, table in self.weights_tables.items():
            tag = self.hparams.get(argument)
            if tag is not None and str(tag) in table:
                tags.append((argument, str(tag), table[str(tag)]))
        return tags

    def class_layer_tag(self) -> tuple[str, str, WeightsSpec] | None:
        """The weights tag whose class layer the model keeps: the whole model's, unless `fresh_heads`."""
        tags = self.weights_tags()
        first = next(iter(self.weights_tables), None)
        if not tags or tags[0][0] != first or self.hparams.get("fresh_heads", False):
            return None
        return tags[0]

    def _fill_from_weights(self) -> None:
        """num_classes from the tag whose class layer is kept; mean and std from the first tag (else ImageNet's)."""
        hp = self.hparams
        kept = self.class_layer_tag()
        if kept is not None:
            argument, tag, _ = kept
            table = self.weights_tables[argument]
            hp.num_classes = num_classes_of_weights(hp.num_classes, tag, table, argument=argument)
        tags = self.weights_tags()
        for name, imagenet in (("mean", IMAGENET_MEAN), ("std", IMAGENET_STD)):
            given = hp[name]
            if not tags:
                hp[name] = tuple(imagenet) if given is None else tuple(float(v) for v in given)
                continue
            argument, tag, spec = tags[0]
            published = tuple(getattr(spec, name))
            if given is not None and not _same_values(given, published):
                raise ValueError(
                    f"{name}={list(given)}, but the {argument} {tag!r} ({spec.source}) were trained on inputs "
                    f"normalized with {name}={list(published)}; drop {name} to use theirs"
                )
            hp[name] = published

    def normalize(self, images: Tensor) -> Tensor:
        """(images - mean) / std of float images in [0, 1] (N, 3, H, W)."""
        return (images - self.mean) / self.std

    def data_num_classes(self, datamodule: Any) -> int:
        """The number of outputs the data module's classes need (background included)."""
        return int(datamodule.num_classes)

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is None or not hasattr(datamodule, "num_classes"):
            if self.model is None:
                raise ValueError(
                    f"num_classes is not set and there is no data module to take it from; give "
                    f"{type(self).__name__}(num_classes=...) or fit with a data module"
                )
            return
        data_classes = self.data_num_classes(datamodule)
        if self.model is None:
            self.hparams.num_classes = data_classes
            self.build_model(data_classes)
        else:
            try:
                check_num_classes(int(self.hparams.num_classes), data_classes, exact=self.exact_num_classes)
            except ValueError as error:
                kept = self.class_layer_tag()
                if kept is None:
                    raise
                argument, tag, _ = kept
                raise ValueError(
                    f"{error}. model.num_classes={self.hparams.num_classes} is that of the {argument} {tag!r}: set "
                    f"fresh_heads: true to train the class layers anew for the data's {data_classes} classes"
                ) from None
        self.hparams.class_names = list(datamodule.class_names)

    def configure_model(self) -> None:
        prepare_task_model(self, channels_last=self.hparams.channels_last)

    # ------------------------------------------------------------ evaluation

    def evaluator(self, stage: str) -> Evaluator:
        """The evaluator of `stage`, built on first use and kept for the next epochs."""
        key = (stage, self.evaluator_key(stage))
        if key not in self._evaluators:
            self._evaluators[key] = self.build_evaluator(stage)
        evaluator = self._evaluators[key]
        if isinstance(evaluator, nn.Module):  # torchmetrics: its states live on the task's device
            evaluator.to(self.device)
        return evaluator

    def log_eval_loss(self, stage: str, loss: Tensor, batch_size: int) -> None:
        """Logs `{stage}_loss`, the mean over every image of the epoch on every rank."""
        self.eval_losses[stage].update(loss, weight=batch_size)
        self.log(f"{stage}_loss", self.eval_losses[stage], batch_size=batch_size)

    def _start_evaluation(self, stage: str) -> None:
        self.evaluator(stage).reset()

    def _finish_evaluation(self, stage: str) -> None:
        metrics = {k: float(v) for k, v in self.evaluator(stage).compute().items()}  # the same on every rank
        self.log_dict({f"{stage}_{k}": v for k, v in metrics.items() if k != self.progress_metric}, sync_dist=False)
        if self.progress_metric in metrics:
            name = f"{stage}_{self.progress_metric}"
            self.log(name, metrics[self.progress_metric], prog_bar=True, sync_dist=False)
        self.report_evaluation(stage, metrics)

    def on_validation_epoch_start(self) -> None:
        self._start_evaluation("val")

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.evaluation_step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._finish_evaluation("val")

    def on_test_epoch_start(self) -> None:
        self._start_evaluation("test")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self.evaluation_step(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._finish_evaluation("test")

    # ------------------------------------------------------------ optimizer and schedule

    def optimizer_parameters(self) -> nn.Module:
        """The module whose parameters the optimizer trains."""
        return self.model

    def lr_schedule(self, *, total_steps: int, steps_per_epoch: int, lr: float | None = None) -> LRSchedule:
        """The per-step factor of the learning rate `lr` (default: `hparams.lr`), with warmup and milestones
        turned into steps and `min_lr` into the factor the decay ends at."""
        hp = self.hparams
        lr = hp.lr if lr is None else lr
        milestone_scale = steps_per_epoch if hp.milestones_unit == "epoch" else 1
        warmup_scale = steps_per_epoch if hp.warmup_unit == "epoch" else 1
        return LRSchedule(
            total_steps=total_steps,
            schedule=hp.schedule,
            milestones=[m * milestone_scale for m in hp.milestones],
            gamma=hp.gamma,
            power=hp.power,
            warmup_steps=round(hp.warmup * warmup_scale),
            warmup_factor=hp.warmup_factor,
            final_factor=min(hp.min_lr / lr, 1.0) if lr > 0 else 0.0,
        )

    def configure_optimizers(self) -> dict:
        hp = self.hparams
        lr = batch_scaled_lr(hp.lr, hp.lr_reference_batch_size, self.trainer)
        groups = param_groups(self.optimizer_parameters(), hp.weight_decay, norm_bias_decay=hp.norm_bias_decay)
        optimizer = torch.optim.SGD(groups, lr=lr, momentum=hp.momentum)
        total = int(self.trainer.estimated_stepping_batches)  # also loads the training data
        per_epoch = steps_per_epoch(self.trainer) if "epoch" in (hp.milestones_unit, hp.warmup_unit) else 1
        schedule = self.lr_schedule(total_steps=total, steps_per_epoch=per_epoch, lr=lr)
        rank_zero_info(
            f"{hp.schedule} schedule over {total} steps, warmup {schedule.warmup_steps} steps"
            + (f", milestones at steps {schedule.milestones}" if hp.schedule == "step" else "")
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
