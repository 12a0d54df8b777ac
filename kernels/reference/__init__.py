"""The NumPy reference backend: readable, float64 inside, the yardstick of the fast backends."""

from .batchnorm import batch_norm_backward, batch_norm_forward_eval, batch_norm_forward_train, batch_norm_stats
from .optim import adagrad_step, adam_step, rmsprop_step, sgd_step

__all__ = [
    "batch_norm_forward_train",
    "batch_norm_forward_eval",
    "batch_norm_backward",
    "batch_norm_stats",
    "sgd_step",
    "adagrad_step",
    "rmsprop_step",
    "adam_step",
]
