"""The Numba CPU backend: ``@njit(parallel=True, cache=True)`` kernels on CPU threads.

Threads: Numba's own pool, sized by ``NUMBA_NUM_THREADS`` and ``numba.set_num_threads``; small
problems run on the calling thread (see ``_jit.PARALLEL_MIN_ELEMENTS``).
"""

from .batchnorm import batch_norm_backward, batch_norm_forward_eval, batch_norm_forward_train

__all__ = ["batch_norm_forward_train", "batch_norm_forward_eval", "batch_norm_backward"]
