"""Fused multi-tensor optimizer updates on NVIDIA GPUs with ``numba.cuda.jit``.

Book: "Deep Learning from Scratch", section 6.1. The per-element math is kernels/formulas/optim.py
(shared with the CPU kernels); this module holds the launches. The design is the CPU one (read
kernels/numba_cpu/optim.py): a parameter group is one (5, T) table of data addresses and one
chunk table (tensor, start, stop); one launch updates every element of every tensor of the
group, blocks striding over chunks and threads over a chunk's elements (coalesced).

Step counters are device tensors (as torch keeps them with ``capturable=True``): a first tiny
launch (thread per tensor) advances them and computes each tensor's step-dependent scalars in
float64 into device scratch, which the update kernel reads. Nothing is read back to the host.
The address table is uploaded from host memory on every step (asynchronously, on the launch
stream), and scratch comes from the allocator each step: this is not yet a CUDA-graph-capturable
step.
"""

from __future__ import annotations

import functools

import numpy as np
from numba import cuda

from .. import OPTIMIZER_API, TABLE_API
from .._optimizer_api import OptimizerAPI
from ..formulas import compiled
from ..formulas import optim as formulas
from ._device import BLOCK, SIMULATOR, address, scratch, stream, upload, view

__all__ = [*OPTIMIZER_API, *TABLE_API]

CHUNK = 1 << 16  # elements per chunk
MAX_BLOCKS = 4096

_jit = cuda.jit if SIMULATOR else cuda.jit(cache=True)
_inline = cuda.jit(device=True) if SIMULATOR else cuda.jit(device=True, inline="always")
_FORMULAS = compiled(_inline, formulas)


@functools.lru_cache(maxsize=256)
def _chunk_table_host(numels: tuple[int, ...], chunk: int) -> np.ndarray:
    rows = [(t, lo, min(n, lo + chunk)) for t, n in enumerate(numels) for lo in range(0, n, chunk)]
    return np.array(rows, np.int64).reshape(-1, 3)


_DEVICE_TABLES: dict = {}


def _chunk_table(numels: tuple[int, ...]):
    """The (K, 3) int64 chunk table on the device, uploaded once per set of sizes."""
    key = (numels, CHUNK)
    table = _DEVICE_TABLES.get(key)
    if table is None:
        if len(_DEVICE_TABLES) > 64:
            _DEVICE_TABLES.clear()
        table = _DEVICE_TABLES[key] = cuda.to_device(_chunk_table_host(numels, CHUNK), stream=stream())
    return table


# -- the two loops every optimizer shares ------------------------------------------------------


@_inline
def _advance_steps(tensor_scalars, step_addrs, step_f64, host, scalars):
    """Thread t: step += 1 for tensor t (a float32/float64 device scalar), then its scalars."""
    t = cuda.grid(1)
    if t < scalars.shape[0]:
        if step_f64:
            s = view(step_addrs[t], 1, np.float64(0))
            s[0] += 1.0
            step = s[0]
        else:
            s32 = view(step_addrs[t], 1, np.float32(0))
            s32[0] += np.float32(1.0)
            step = np.float64(s32[0])
        scalars[t, 0], scalars[t, 1] = tensor_scalars(step, host)


@_inline
def _table_update(update, addrs, chunks, scalars, constants, flags, uses):
    """Blocks stride over chunks, threads over a chunk's elements; ``uses``: the buffer rows
    that exist (the others are neither read nor written)."""
    like = constants[0]
    use0, use1, use2 = uses
    k = cuda.blockIdx.x
    while k < chunks.shape[0]:
        t, lo, hi = chunks[k, 0], chunks[k, 1], chunks[k, 2]
        p = view(addrs[0, t], hi, like)
        g = view(addrs[1, t], hi, like)
        b0 = view(addrs[2, t], hi, like)
        b1 = view(addrs[3, t], hi, like)
        b2 = view(addrs[4, t], hi, like)
        s0, s1 = scalars[t, 0], scalars[t, 1]
        i = lo + cuda.threadIdx.x
        while i < hi:
            _FORMULAS.update_element(update, p, g, b0, b1, b2, i, constants, s0, s1, flags, use0, use1, use2)
            i += cuda.blockDim.x
        k += cuda.gridDim.x


@_jit
def _sgd(addrs, chunks, scalars, constants, flags, uses):
    _table_update(_FORMULAS.sgd, addrs, chunks, scalars, constants, flags, uses)


@_jit
def _adagrad(addrs, chunks, scalars, constants, flags, uses):
    _table_update(_FORMULAS.adagrad, addrs, chunks, scalars, constants, flags, uses)


@_jit
def _rmsprop(addrs, chunks, scalars, constants, flags, uses):
    _table_update(_FORMULAS.rmsprop, addrs, chunks, scalars, constants, flags, uses)


@_jit
def _adam(addrs, chunks, scalars, constants, flags, uses):
    _table_update(_FORMULAS.adam, addrs, chunks, scalars, constants, flags, uses)


@_jit
def _count_steps(step_addrs, step_f64, host, scalars):
    _advance_steps(_FORMULAS.no_tensor_scalars, step_addrs, step_f64, host, scalars)


@_jit
def _adagrad_steps(step_addrs, step_f64, host, scalars):
    _advance_steps(_FORMULAS.adagrad_tensor_scalars, step_addrs, step_f64, host, scalars)


@_jit
def _adam_steps(step_addrs, step_f64, host, scalars):
    _advance_steps(_FORMULAS.adam_tensor_scalars, step_addrs, step_f64, host, scalars)


# -- launching (the entry points themselves are kernels/_optimizer_api.py) -----------------------

_KERNELS = {"sgd": (_sgd, None), "adagrad": (_adagrad, _adagrad_steps), "rmsprop": (_rmsprop, _count_steps),
            "adam": (_adam, _adam_steps)}  # fmt: skip


def _launch(op, addrs, numels, dtype, step_addrs, step_f64, first_step, host, constants, flags, uses) -> None:
    kernel, steps_kernel = _KERNELS[op]
    st = stream()
    t = len(numels)
    if first_step is None:  # the step scalars: float64 math on the device, stored in dtype
        scalars = scratch((t, 2), dtype)
        steps_kernel[max(1, -(-t // BLOCK)), BLOCK, st](upload(step_addrs), step_f64, host, scalars)
    else:
        first = np.zeros((t, 2), dtype)
        first[:, 0] = np.asarray(first_step, bool)
        scalars = upload(first)
    chunks = _chunk_table(numels)
    constants = tuple(constants)  # by value, as kernel arguments
    kernel[max(1, min(chunks.shape[0], MAX_BLOCKS)), BLOCK, st](upload(addrs), chunks, scalars, constants, flags, uses)


_API = OptimizerAPI("cuda", (np.float32, np.float64), _launch, address, lambda a: True)
sgd_step, adagrad_step, rmsprop_step, adam_step = _API.sgd_step, _API.adagrad_step, _API.rmsprop_step, _API.adam_step
sgd_step_table, adagrad_step_table = _API.sgd_step_table, _API.adagrad_step_table
rmsprop_step_table, adam_step_table = _API.rmsprop_step_table, _API.adam_step_table
