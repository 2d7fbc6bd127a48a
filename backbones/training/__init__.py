"""What the three tasks share to train: schedules, optimizer inputs, checks, distributed set-up, samplers, the CLI.

Imports Lightning, so `import backbones` does not import this package.
"""

from .checks import check_finite_losses
from .distributed import EvalDistributedSampler, eval_sampler, prepare_task_model
from .optim import batch_scaled_lr, global_batch_size, param_groups
from .schedules import SCHEDULES, LRSchedule, steps_per_epoch

__all__ = [
    "SCHEDULES",
    "EvalDistributedSampler",
    "LRSchedule",
    "batch_scaled_lr",
    "check_finite_losses",
    "eval_sampler",
    "global_batch_size",
    "param_groups",
    "prepare_task_model",
    "steps_per_epoch",
]
