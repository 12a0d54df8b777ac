"""The Numba CUDA backend: ``numba.cuda.jit`` kernels on NVIDIA GPUs (numba-cuda package).

Same functions and arguments as fastnorm_kernels.reference, taking Numba device arrays (fastnorm passes
torch CUDA tensors through ``__cuda_array_interface__``, zero-copy). Every kernel launches on the
stream given by ``set_stream_provider`` and takes its scratch memory from ``set_allocator``
(fastnorm: torch's current stream and caching allocator). Under Numba's simulator
(``NUMBA_ENABLE_CUDASIM=1``) the same kernels run on the CPU, which is how CI tests them.
"""

import numpy as _np

from .._cache import drop_if_stale

# numba-cuda 0.30 registers an overload for np.row_stack when its array module first loads (at the
# first kernel compile); NumPy 2.5 removed that alias of np.vstack, and the import then fails
# ("module 'numpy' has no attribute 'row_stack'", seen on the H200 image: numba-cuda 0.30.4, NumPy 2.5.2).
if not hasattr(_np, "row_stack"):
    _np.row_stack = _np.vstack

drop_if_stale(__path__[0])  # before the kernels load their cached code

from ._device import (
    SIMULATOR,
    DeviceView,
    address,
    as_view,
    is_usable,
    set_allocator,
    set_stream_provider,
)
from .batchnorm import *
from .groupnorm import *
from .layernorm import *
from .optim import *
