"""What the three tasks share to train: the task skeleton, schedules, optimizer inputs, checks, distributed set-up,
samplers, the CLI.

Imports Lightning, so `import backbones` does not import this package.
"""

from .checks import check_finite_losses
from .datamodule import BACKGROUND, TaskDataModule
from .distributed import EvalDistributedSampler, eval_sampler, prepare_task_model
from .optim import batch_scaled_lr, global_batch_size, param_groups
from .schedules import SCHEDULES, LRSchedule
from .task import Evaluator, TrainingTask, check_num_classes, steps_per_epoch

__all__ = [
    "BACKGROUND",
    "SCHEDULES",
    "EvalDistributedSampler",
    "Evaluator",
    "LRSchedule",
    "TaskDataModule",
    "TrainingTask",
    "batch_scaled_lr",
    "check_finite_losses",
    "check_num_classes",
    "eval_sampler",
    "global_batch_size",
    "param_groups",
    "prepare_task_model",
    "steps_per_epoch",
]
