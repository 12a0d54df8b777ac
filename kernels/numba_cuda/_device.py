"""Launch context for the CUDA kernels: stream, scratch allocator, array views, raw pointers.

Nothing here imports torch. fastnorm registers two hooks when it loads this backend:
* the stream provider: every launch goes on torch's current stream
  (``numba.cuda.external_stream(torch.cuda.current_stream().cuda_stream)``), so kernels are
  ordered with torch's own work and nothing synchronises implicitly;
* the scratch allocator: partial sums and coefficient vectors come from torch's caching
  allocator, never from Numba's (a ``cudaMalloc`` per call).
Without hooks (kernels used on their own, or under the simulator) Numba's defaults apply.

Raw pointers: the optimizers' multi-tensor tables hold data addresses. On a GPU an intrinsic
turns an int64 address into a typed pointer and ``carray`` into an array; under Numba's CUDA
simulator (``NUMBA_ENABLE_CUDASIM=1``, where kernels run as Python on the CPU and "device"
memory is host memory) the same helpers build NumPy views with ctypes.
"""

from __future__ import annotations

import ctypes
import os

import numpy as np
from numba import cuda

from .._pointer import pointer_intrinsic

SIMULATOR = os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0")
#: threads per block of the elementwise and per-channel kernels (the simulator runs every thread
#: as a Python thread: keep its blocks small)
BLOCK = 64 if SIMULATOR else 256
WARP = 32

_stream_provider = None
_allocator = None


def set_stream_provider(provider) -> None:
    """``provider()`` returns the Numba stream to launch on (fastnorm: torch's current stream)."""
    global _stream_provider
    _stream_provider = provider


def set_allocator(allocator) -> None:
    """``allocator(shape, numpy_dtype)`` returns a device array (fastnorm: torch-backed)."""
    global _allocator
    _allocator = allocator


def stream():
    return _stream_provider() if _stream_provider is not None else cuda.default_stream()


def scratch(shape, dtype):
    """Work memory for one call, on the launch stream's allocator."""
    if _allocator is not None:
        return _allocator(shape, np.dtype(dtype))
    return cuda.device_array(shape, dtype=dtype, stream=stream())


def upload(host: np.ndarray, device=None):
    """Copy a small host array to the device, asynchronously on the launch stream."""
    if device is None:
        device = scratch(host.shape, host.dtype)
    device.copy_to_device(np.ascontiguousarray(host), stream=stream())
    return device


def as_device_array(obj):
    """A Numba view of anything with ``__cuda_array_interface__`` (no copy, no sync)."""
    return cuda.as_cuda_array(obj, sync=False)


def address(array) -> int:
    """Device address of a device array's first element."""
    if SIMULATOR:
        return array._ary.ctypes.data if hasattr(array, "_ary") else np.asarray(array).ctypes.data
    return array.__cuda_array_interface__["data"][0]


def is_usable() -> bool:
    try:
        return bool(cuda.is_available())
    except Exception:  # driver present but broken
        return False


if SIMULATOR:
    _CTYPES = {np.dtype(np.float32): ctypes.c_float, np.dtype(np.float64): ctypes.c_double}

    def view(addr, n, like):
        """The n elements at ``addr``, typed like the scalar ``like`` (a NumPy view)."""
        ctype = _CTYPES[np.dtype(type(like))]
        return np.ctypeslib.as_array((ctype * int(n)).from_address(int(addr)))

else:
    try:  # numba-cuda >= 0.20 has its own typing layer
        from numba.cuda import types
        from numba.cuda.extending import intrinsic
        from numba.cuda.np.numpy_support import carray
    except ImportError:  # older numba-cuda / numba.cuda
        from numba import carray, types
        from numba.extending import intrinsic

    _pointer = pointer_intrinsic(intrinsic, types)

    @cuda.jit(device=True, inline="always")
    def view(addr, n, like):
        return carray(_pointer(addr, like), n)
