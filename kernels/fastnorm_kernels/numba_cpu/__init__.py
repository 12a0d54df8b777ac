"""The Numba CPU backend: ``@njit(parallel=True, cache=True)`` kernels on CPU threads.

Threads: Numba's own pool, sized by ``NUMBA_NUM_THREADS`` and ``numba.set_num_threads``; small
problems run on the calling thread (see ``_jit.PARALLEL_MIN_ELEMENTS``). Kernels are called
one after another from torch's training loop, never from inside a torch parallel region, so the
two thread pools do not oversubscribe the cores.
"""

from .._cache import drop_if_stale

drop_if_stale(__path__[0])  # before the kernels load their cached code

from .batchnorm import *
from .groupnorm import *
from .layernorm import *
from .optim import *
