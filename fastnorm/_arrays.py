"""Tensors <-> the arrays kernels take, per device, zero-copy.

BatchNorm kernels take C-contiguous ``(N, C, S)`` arrays. A contiguous ``(N, C, *spatial)``
tensor is that with ``S = prod(spatial)``; a channels-last one is ``(N*H*W, C, 1)`` (its memory
is ``(N, H, W, C)``), which the kernels' row layout handles without a copy.

On CPU, NumPy does the view arithmetic (reshape/transpose on arrays cost ~0.5 µs; the same on
tensors ~2-3 µs, which matters at the MNIST MLP's sizes) and allocates the outputs from a
:class:`BufferPool` (large outputs) or ``np.empty``. On GPU, outputs come from torch's caching
allocator and the kernels see them through ``__cuda_array_interface__``.
"""

from __future__ import annotations

import math
import os
import threading
import weakref

import numpy as np
import torch

_NUMPY_DTYPES = {torch.float32: np.float32, torch.float64: np.float64}
#: the dtype kernels compute per-channel values in, per storage dtype (16-bit: float32)
_COMPUTE_DTYPES = {**_NUMPY_DTYPES, torch.bfloat16: np.float32, torch.float16: np.float32}
#: the NumPy dtype of each storage (bfloat16: its uint16 bits, kernels/fastnorm_kernels/_bits.py)
_STORAGE_DTYPES = {**_NUMPY_DTYPES, torch.bfloat16: np.uint16, torch.float16: np.float16}


def _tensor(a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """The tensor of dtype ``dtype`` sharing ``a``'s memory (bfloat16: reinterpreted bits)."""
    t = torch.from_numpy(a)
    return t.view(torch.bfloat16) if dtype == torch.bfloat16 else t


class BufferPool:
    """Recycles large NumPy buffers for kernel outputs: a caching allocator for the CPU.

    torch's CPU allocator hands large blocks back to the OS, so every fresh output of tens of MB
    is paid again in page faults (here: allocating and filling 67 MB took 34 ms against 5 ms
    for refilling a warm buffer; glibc's heap keeps blocks below 32 MB in a simple loop, but not
    when other allocations interleave: fastnorm's BatchNorm2d at (64, 64, 28, 28) interleaved with
    torch's took 1250 page faults per forward+backward with ``torch.empty`` outputs, none with
    the pool). The pool keeps such blocks: :meth:`empty` hands out a fresh
    NumPy view of a free block, and the block is free again when that view dies, which is when
    the last tensor (or view) made from it by ``torch.from_numpy`` dies: torch's storage holds
    the view, and a weak reference to the view gives the block back from its callback (a bare
    ``weakref.ref``, kept with its block until then: ``weakref.finalize`` costs several times
    more Python work per call, which counts on the eager path). Thread-safe: blocks are taken and
    given back under a lock.

    Buffers of at least ``min_bytes`` are pooled, up to ``max_bytes`` in all
    (``FASTNORM_CPU_POOL_MB``, default 1024; 0 disables the pool). Benchmarks that compare with
    torch should say so: fastnorm's large outputs reuse warm pages where torch's take page faults.
    fastnorm's C++ ops (fastnorm/_ops.py) keep their outputs in a pool of their own with the same
    limits (so up to twice ``max_bytes`` in a process that uses both); :meth:`clear` empties both.
    """

    def __init__(self, min_bytes: int = 1 << 20, max_bytes: int | None = None) -> None:
        if max_bytes is None:
            max_bytes = int(os.environ.get("FASTNORM_CPU_POOL_MB", "1024")) << 20
        self.min_bytes, self.max_bytes = min_bytes, max_bytes
        self._free: dict[tuple, list[np.ndarray]] = {}
        self._out: dict[int, tuple] = {}  # id(weak reference) -> (it, key, block): blocks handed out
        self._bytes = 0  # owned by the pool: free and handed out
        self._lock = threading.RLock()  # reentrant: a finalizer may run inside empty()

    def empty(self, shape: tuple, dtype) -> np.ndarray:
        dtype = np.dtype(dtype)
        count = math.prod(shape)
        nbytes = count * dtype.itemsize
        if nbytes < self.min_bytes or self.max_bytes <= 0:
            return np.empty(shape, dtype)
        key = (count, dtype)
        with self._lock:
            free = self._free.get(key)
            block = free.pop() if free else None
            if block is None:
                if self._bytes + nbytes > self.max_bytes:
                    return np.empty(shape, dtype)  # over budget: not pooled
                self._bytes += nbytes
                block = np.empty(count, dtype)
            view = block.reshape(shape)  # a new view object, which lives as long as its tensors
            ref = weakref.ref(view, self._give_back)
            self._out[id(ref)] = (ref, key, block)
        return view

    def _give_back(self, ref: weakref.ref) -> None:
        with self._lock:
            _, key, block = self._out.pop(id(ref))
            self._free.setdefault(key, []).append(block)

    def in_use(self) -> int:
        """Bytes handed out and still referenced."""
        with self._lock:
            free = sum(b.nbytes for blocks in self._free.values() for b in blocks)
            return self._bytes - free

    #: what else :meth:`clear` empties: the C++ ops' pool, once they are loaded (fastnorm/_ops.py)
    also_clear: list = []

    def clear(self) -> None:
        """Forget the free blocks (blocks in use return to the pool when their views die), here
        and in the C++ ops' pool."""
        with self._lock:
            freed = sum(b.nbytes for blocks in self._free.values() for b in blocks)
            self._free.clear()
            self._bytes -= freed
        for clear in self.also_clear:
            clear()


pool = BufferPool()


class CpuArrays:
    """NumPy views of CPU tensors."""

    @staticmethod
    def view(t: torch.Tensor) -> np.ndarray:
        """Zero-copy; bfloat16 as its uint16 bit patterns (NumPy has no bfloat16, kernels/fastnorm_kernels/_bits.py)."""
        if t.requires_grad:
            t = t.detach()
        if t.dtype == torch.bfloat16:
            return t.view(torch.int16).numpy().view(np.uint16)
        return t.numpy()

    def kernel_array(self, t: torch.Tensor, channels_last: bool) -> np.ndarray:
        a = self.view(t)
        if channels_last:
            a = np.moveaxis(a, 1, -1)  # (N, *spatial, C): contiguous for a channels-last tensor
            return a.reshape(-1, a.shape[-1], 1)
        return a.reshape(a.shape[0], a.shape[1], math.prod(a.shape[2:]))

    @staticmethod
    def empty_like(like: torch.Tensor, channels_last: bool) -> tuple[torch.Tensor, np.ndarray]:
        """An uninitialised tensor shaped like ``like`` (same memory format) and its (N, C, S) array."""
        dtype = _STORAGE_DTYPES[like.dtype]
        shape = like.shape
        if channels_last:
            a = pool.empty((shape[0], *shape[2:], shape[1]), dtype)
            return _tensor(a, like.dtype).movedim(-1, 1), a.reshape(-1, shape[1], 1)
        a = pool.empty(tuple(shape), dtype)
        return _tensor(a, like.dtype), a.reshape(shape[0], shape[1], math.prod(shape[2:]))

    @staticmethod
    def empty_vector(n: int, like: torch.Tensor) -> tuple[torch.Tensor, np.ndarray]:
        a = np.empty(n, _COMPUTE_DTYPES[like.dtype])
        return torch.from_numpy(a), a

    @staticmethod
    def scratch_vector(n: int, like: torch.Tensor) -> tuple[None, np.ndarray]:
        """A work array the kernels fill and only fastnorm reads (no tensor needed on CPU)."""
        return None, np.empty(n, _COMPUTE_DTYPES[like.dtype])

    def eval_constants(self, running_mean: torch.Tensor, running_var: torch.Tensor, eps: float):
        """(keep_alive, mean, invstd) as the eval forward used them, copied now."""
        mean = self.view(running_mean).copy()
        var = self.view(running_var)
        return (), mean, (1.0 / np.sqrt(var.astype(np.float64) + eps)).astype(var.dtype)


class CudaArrays:
    """Views of CUDA tensors as the cuda kernels take them: ``fastnorm_kernels.numba_cuda.DeviceView``
    (address, shape, dtype, and the tensor, kept alive), built from the tensor's own fields in a
    microsecond where Numba's ``as_cuda_array`` took tens on a GPU machine's host."""

    @staticmethod
    def view(t: torch.Tensor):
        from fastnorm_kernels.numba_cuda import DeviceView, as_view

        dtype = _STORAGE_DTYPES.get(t.dtype)
        if dtype is None:
            return as_view(t.detach())  # the kernels' checks name the dtype
        if not t.is_contiguous():
            raise ValueError("the cuda kernels need C-contiguous arrays")
        return DeviceView(t.data_ptr(), tuple(t.shape), dtype, t)

    def kernel_array(self, t: torch.Tensor, channels_last: bool):
        if channels_last:
            t = t.movedim(1, -1).reshape(-1, t.shape[1], 1)
        else:
            t = t.view(t.shape[0], t.shape[1], math.prod(t.shape[2:]))
        return self.view(t)

    def empty_like(self, like: torch.Tensor, channels_last: bool):
        fmt = (
            {4: torch.channels_last, 5: torch.channels_last_3d}[like.dim()]
            if channels_last
            else torch.contiguous_format
        )
        t = torch.empty_like(like, memory_format=fmt)
        return t, self.kernel_array(t, channels_last)

    def empty_vector(self, n: int, like: torch.Tensor):
        """A (n,) tensor of ``like``'s compute dtype (float32 for 16-bit storage) and its view."""
        dtype = torch.float32 if like.dtype in (torch.bfloat16, torch.float16) else like.dtype
        t = torch.empty(n, dtype=dtype, device=like.device)
        return t, self.view(t)

    scratch_vector = empty_vector

    def eval_constants(self, running_mean: torch.Tensor, running_var: torch.Tensor, eps: float):
        mean = running_mean.detach().clone()
        invstd = torch.rsqrt(running_var.detach().double() + eps).to(running_var.dtype)
        return (mean, invstd), self.view(mean), self.view(invstd)
