"""Launch context for the CUDA kernels: stream, scratch allocator, array views, raw pointers.

Nothing here imports torch. fastnorm registers two hooks when it loads this backend:
* the stream provider: every launch goes on torch's current stream
  (``numba.cuda.external_stream(torch.cuda.current_stream().cuda_stream)``), so kernels are
  ordered with torch's own work and nothing synchronises implicitly;
* the scratch allocator: partial sums and coefficient vectors come from torch's caching
  allocator, never from Numba's (a ``cudaMalloc`` per call).
Without hooks (kernels used on their own, or under the simulator) Numba's defaults apply.

Raw pointers: every kernel takes its arrays as int64 addresses (plus sizes) and views them
inside with ``view``: an intrinsic turns the address into a typed pointer and ``carray`` into an
array. Passing Numba device arrays instead cost, on an H200 machine's host, tens of microseconds
per array per launch (``as_cuda_array`` builds a DeviceNDArray; the launch packs its shape,
strides and meminfo), which made a BatchNorm forward+backward at small sizes 10x slower than
cuDNN's while its kernels were as fast. :class:`DeviceView` is what the launchers need of an
array (address, shape, dtype, an owner kept alive); :func:`as_view` makes one of anything with
``__cuda_array_interface__``. Under Numba's CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``, where
kernels run as Python on the CPU and "device" memory is host memory) the same helpers build
NumPy views with ctypes, and host NumPy arrays are accepted as device arrays.
"""

from __future__ import annotations

import ctypes
import math
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


class DeviceView:
    """A C-contiguous array in device memory as the launchers use it: its address, shape and
    dtype, and ``owner``, the object that keeps the memory alive (a torch tensor, a Numba device
    array), held as long as the view. It has ``__cuda_array_interface__``, so Numba, CuPy and
    torch can read it too."""

    __slots__ = ("ptr", "shape", "dtype", "owner")

    def __init__(self, ptr: int, shape: tuple, dtype, owner=None) -> None:
        self.ptr, self.shape, self.dtype, self.owner = int(ptr), tuple(shape), np.dtype(dtype), owner

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def is_c_contiguous(self) -> bool:
        return True

    def reshape(self, *shape) -> DeviceView:
        shape = tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], tuple) else tuple(shape)
        if shape.count(-1) == 1:  # one size inferred, as NumPy's reshape
            known = math.prod(n for n in shape if n != -1)
            if known and self.size % known == 0:
                shape = tuple(self.size // known if n == -1 else n for n in shape)
        if math.prod(shape) != self.size or any(n < 0 for n in shape):
            raise ValueError(f"cannot reshape {self.shape} to {shape}")
        return DeviceView(self.ptr, shape, self.dtype, self.owner)

    @property
    def __cuda_array_interface__(self) -> dict:
        return {"data": (self.ptr, False), "shape": self.shape, "typestr": self.dtype.str, "strides": None,
                "version": 3}  # fmt: skip

    def __repr__(self) -> str:
        return f"DeviceView(0x{self.ptr:x}, shape={self.shape}, dtype={self.dtype})"


def _c_contiguous(shape, strides, itemsize: int) -> bool:
    if strides is None:
        return True
    step = itemsize
    for n, s in zip(reversed(shape), reversed(strides)):
        if n != 1 and s != step:
            return False
        step *= n
    return True


def as_view(a) -> DeviceView:
    """The :class:`DeviceView` of a device array (anything with ``__cuda_array_interface__``;
    under the simulator also a NumPy array or a simulated device array). Raises TypeError for
    host memory on a real GPU and ValueError for a non-contiguous array."""
    if type(a) is DeviceView:
        return a
    if SIMULATOR:
        host = getattr(a, "_ary", a)  # the simulator's device arrays wrap NumPy arrays
        if isinstance(host, np.ndarray):
            if not host.flags.c_contiguous:
                raise ValueError("the cuda kernels need C-contiguous arrays")
            return DeviceView(host.ctypes.data, host.shape, host.dtype, a)
    cai = getattr(a, "__cuda_array_interface__", None)
    if cai is None:
        raise TypeError(f"the cuda kernels take device arrays (__cuda_array_interface__), got {type(a).__name__}")
    dtype = np.dtype(cai["typestr"])
    shape = tuple(cai["shape"])
    if not _c_contiguous(shape, cai.get("strides"), dtype.itemsize):
        raise ValueError("the cuda kernels need C-contiguous arrays")
    return DeviceView(cai["data"][0], shape, dtype, a)


def stream():
    return _stream_provider() if _stream_provider is not None else cuda.default_stream()


#: FASTNORM_CUDA_FAST_LAUNCH=0 sends every launch through numba-cuda's dispatcher
FAST_LAUNCH = os.environ.get("FASTNORM_CUDA_FAST_LAUNCH", "1") not in ("", "0") and not SIMULATOR
_FAST: dict = {}
_CONFIGS: dict = {}


def launch(kernel, grid, block, *args) -> None:
    """``kernel[grid, block, stream()](*args)`` for kernels whose arguments are all scalars
    (addresses, sizes, flags, typed zeros), as every BatchNorm kernel's are.

    numba-cuda's dispatcher spends, per launch, a context lookup and a typed conversion of
    every argument (measured on an H200 machine's host: ~200 us for a 19-argument launch, 6x
    the kernel). The first launch of a kernel with given argument types on a device goes through
    the dispatcher (which compiles and checks it); later ones reuse that compiled kernel and
    build the ctypes arguments from the types it recorded, then call the same cuda.core launch
    the dispatcher calls. Only with a stream provider that names the device (fastnorm's); else,
    under the simulator, or with FASTNORM_CUDA_FAST_LAUNCH=0: the dispatcher every time."""
    st = stream()
    device = getattr(st, "device_index", None)
    if not FAST_LAUNCH or device is None:
        kernel[grid, block, st](*args)
        return
    key = (kernel, device, tuple(map(type, args)))
    fast = _FAST.get(key)
    if fast is None:
        kernel[grid, block, st](*args)  # compiles and checks the first time
        _FAST[key] = _fast_launcher(kernel, args)
        return
    if fast is False:
        kernel[grid, block, st](*args)
        return
    kern, ctors = fast
    config = _CONFIGS.get((grid, block))
    if config is None:
        from numba.cuda.dispatcher import LaunchConfig

        config = _CONFIGS[(grid, block)] = LaunchConfig(grid=grid, block=block, shmem_size=0)
    _core_launch(st, config, kern, *[make(value) for make, value in zip(ctors, args)])


def _fast_launcher(kernel, args):
    """(cuda.core kernel, ctypes constructor per argument) of the overload the dispatcher just
    launched with ``args``, or False where the fast path does not apply."""
    global _core_launch
    try:
        from numba.cuda import types as nt
        from numba.cuda.dispatcher import launch as core_launch
        from numba.cuda.typing.typeof import Purpose, typeof

        overload = kernel.overloads.get(tuple(typeof(a, Purpose.argument) for a in args))
        if overload is None or overload.debug or overload.cooperative or overload.extensions:
            return False
        ctors = []
        for ty in overload.argument_types:
            if isinstance(ty, nt.Integer):
                ctors.append(getattr(ctypes, f"c_{ty}"))
            elif ty == nt.float64:
                ctors.append(ctypes.c_double)
            elif ty == nt.float32:
                ctors.append(ctypes.c_float)
            elif ty == nt.boolean:
                ctors.append(bool)  # the dispatcher passes booleans as they are
            else:
                return False
        _core_launch = core_launch
        return overload._codelibrary.get_cufunc().kernel, ctors
    except Exception:  # another numba-cuda's internals: the dispatcher path still works
        return False


_core_launch = None


def scratch(shape, dtype) -> DeviceView:
    """Work memory for one call, on the launch stream's allocator (a :class:`DeviceView`)."""
    if _allocator is not None:
        return as_view(_allocator(shape, np.dtype(dtype)))
    return as_view(cuda.device_array(shape, dtype=dtype, stream=stream()))


def address(array) -> int:
    """Device address of a device array's first element."""
    return as_view(array).ptr


def host_address(array) -> int:
    """Address of a host NumPy array's first element (the step counters live in host memory)."""
    if not isinstance(array, np.ndarray):
        array = getattr(array, "_ary", None) if SIMULATOR else None
        if not isinstance(array, np.ndarray):
            raise TypeError("the cuda optimizers keep step counters in host memory, as torch does without "
                            "capturable=True: pass them as NumPy arrays")  # fmt: skip
    return array.ctypes.data


def is_usable() -> bool:
    try:
        return bool(cuda.is_available())
    except Exception:  # driver present but broken
        return False


if SIMULATOR:
    _CTYPES = {np.dtype(np.float32): ctypes.c_float, np.dtype(np.float64): ctypes.c_double,
               np.dtype(np.uint16): ctypes.c_uint16, np.dtype(np.int16): ctypes.c_int16,
               np.dtype(np.int64): ctypes.c_int64, np.dtype(np.uint8): ctypes.c_uint8}  # fmt: skip

    def view(addr, n, like):
        """The n elements at ``addr``, typed like the scalar ``like`` (a NumPy view)."""
        ctype = _CTYPES[np.dtype(type(like))]
        return np.ctypeslib.as_array((ctype * int(n)).from_address(int(addr)))

else:
    try:  # numba-cuda >= 0.20 has its own typing layer
        from numba.cuda import types
        from numba.cuda.extending import intrinsic
    except ImportError:  # older numba-cuda / numba.cuda
        from numba import types
        from numba.extending import intrinsic

    _pointer = pointer_intrinsic(intrinsic, types)

    @cuda.jit(device=True, inline="always")
    def view(addr, n, like):
        """A typed pointer, indexed like the array of the n elements at ``addr`` (indices are
        never negative here). Not ``carray(pointer, n)``: with numba-cuda 0.30 a store through
        such an array at an index LLVM cannot prove non-negative (``cuda.grid(1)``, ``n - 1``)
        was compiled to nothing, so kernels wrote nothing; found on an H200, and
        tests/test_cuda_ptx.py now checks that every kernel stores to global memory."""
        return _pointer(addr, like)
