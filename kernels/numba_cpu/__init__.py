"""The Numba CPU backend: ``@njit(parallel=True, cache=True)`` kernels on CPU threads.

Threads: Numba's own pool, sized by ``NUMBA_NUM_THREADS`` and ``numba.set_num_threads``; small
problems run on the calling thread (see ``_jit.PARALLEL_MIN_ELEMENTS``). Kernels are called
one after another from torch's training loop, never from inside a torch parallel region, so the
two thread pools do not oversubscribe the cores.
"""

from .batchnorm import batch_norm_backward, batch_norm_forward_eval, batch_norm_forward_train, batch_norm_stats
from .optim import (
    adagrad_step,
    adagrad_step_table,
    adam_step,
    adam_step_table,
    chunk_table,
    rmsprop_step,
    rmsprop_step_table,
    sgd_step,
    sgd_step_table,
)

__all__ = [
    "batch_norm_forward_train",
    "batch_norm_forward_eval",
    "batch_norm_backward",
    "batch_norm_stats",
    "sgd_step",
    "adagrad_step",
    "rmsprop_step",
    "adam_step",
    "sgd_step_table",
    "adagrad_step_table",
    "rmsprop_step_table",
    "adam_step_table",
    "chunk_table",
]
