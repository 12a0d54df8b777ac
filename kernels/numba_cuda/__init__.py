"""The Numba CUDA backend: ``numba.cuda.jit`` kernels on NVIDIA GPUs (numba-cuda package).

Same functions and arguments as kernels.reference, taking Numba device arrays (fastnorm passes
torch CUDA tensors through ``__cuda_array_interface__``, zero-copy). Every kernel launches on the
stream given by ``set_stream_provider`` and takes its scratch memory from ``set_allocator``
(fastnorm: torch's current stream and caching allocator). Under Numba's simulator
(``NUMBA_ENABLE_CUDASIM=1``) the same kernels run on the CPU, which is how CI tests them.
"""

from .._cache import drop_if_stale

drop_if_stale(__path__[0])  # before the kernels load their cached code

from ._device import SIMULATOR, address, as_device_array, is_usable, set_allocator, set_stream_provider
from .batchnorm import *
from .optim import *
