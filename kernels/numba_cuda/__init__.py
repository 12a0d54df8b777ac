"""The Numba CUDA backend: ``numba.cuda.jit`` kernels on NVIDIA GPUs (numba-cuda package).

Same functions and arguments as kernels.reference, taking Numba device arrays (fastnorm passes
torch CUDA tensors through ``__cuda_array_interface__``, zero-copy). Every kernel launches on the
stream given by ``set_stream_provider`` and takes its scratch memory from ``set_allocator``
(fastnorm: torch's current stream and caching allocator). Under Numba's simulator
(``NUMBA_ENABLE_CUDASIM=1``) the same kernels run on the CPU, which is how CI tests them.
"""

from ._device import SIMULATOR, address, as_device_array, is_usable, set_allocator, set_stream_provider
from .batchnorm import batch_norm_backward, batch_norm_forward_eval, batch_norm_forward_train, batch_norm_stats
from .optim import (
    adagrad_step,
    adagrad_step_table,
    adam_step,
    adam_step_table,
    rmsprop_step,
    rmsprop_step_table,
    sgd_step,
    sgd_step_table,
)

__all__ = [
    "SIMULATOR",
    "address",
    "as_device_array",
    "is_usable",
    "set_allocator",
    "set_stream_provider",
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
]
