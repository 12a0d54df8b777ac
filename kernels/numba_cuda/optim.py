"""Fused multi-tensor optimizer updates on NVIDIA GPUs with ``numba.cuda.jit``.

The same design as kernels/numba_cpu/optim.py (read its header): a parameter group is one table
of data addresses (buffers x tensors) and one chunk table (tensor, start, stop); one launch
updates every element of every tensor of the group, blocks striding over chunks and threads over
a chunk's elements (coalesced), each element's whole update in one pass in the parameters' dtype.

Per-step scalars never touch the host: the step counters are device tensors (as torch keeps them
with ``capturable=True``); a first tiny launch (thread per tensor) advances them and computes each
tensor's float64 scalars (Adam's lr / (1 - beta1^t), sqrt(1 - beta2^t); Adagrad's
lr / (1 + (t - 1) lr_decay)) into device scratch, which the update kernel reads. Nothing is read
back to the host, so a step can be captured in a CUDA graph once the host-side tables are
kept fixed (the tables are uploaded asynchronously each step, from pageable memory, which does
not synchronise the device).
"""

from __future__ import annotations

import functools
import math
import sys

import numpy as np
from numba import cuda

from .._list_api import ListAPI
from ._device import BLOCK, SIMULATOR, scratch, stream, upload, view

CHUNK = 1 << 16  # elements per chunk
MAX_BLOCKS = 4096

_jit = cuda.jit if SIMULATOR else cuda.jit(cache=True)


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


# -- per-tensor scalars (thread per tensor) ------------------------------------------------------


@_jit
def _advance(steps, step_f64, advance, out):
    """out[t] = the step count of tensor t after ``step += 1`` (when advance)."""
    t = cuda.grid(1)
    if t < out.shape[0]:
        if step_f64:
            s = view(steps[t], 1, np.float64(0))
            if advance:
                s[0] += 1.0
            out[t] = s[0]
        else:
            s32 = view(steps[t], 1, np.float32(0))
            if advance:
                s32[0] += np.float32(1.0)
            out[t] = s32[0]


@_jit
def _adam_scalars(step, lr, beta1, beta2, step_sizes, bc2_sqrts):
    t = cuda.grid(1)
    if t < step.shape[0]:
        step_sizes[t] = lr / (1.0 - beta1 ** step[t])
        bc2_sqrts[t] = math.sqrt(1.0 - beta2 ** step[t])


@_jit
def _adagrad_scalars(step, lr, lr_decay, clrs):
    t = cuda.grid(1)
    if t < step.shape[0]:
        clrs[t] = lr / (1.0 + (step[t] - 1.0) * lr_decay)


# -- updates (blocks over chunks, threads over elements) ----------------------------------------


@_jit
def _sgd(addrs, chunks, first_step, sign, lr, wd, mu, damp, has_wd, momentum_on, nesterov):
    k = cuda.blockIdx.x
    while k < chunks.shape[0]:
        t, lo, hi = chunks[k, 0], chunks[k, 1], chunks[k, 2]
        p = view(addrs[0, t], hi, sign)
        g = view(addrs[1, t], hi, sign)
        b = view(addrs[2, t], hi, sign)
        fresh = first_step[t] != 0
        i = lo + cuda.threadIdx.x
        while i < hi:
            d = g[i] * sign
            if has_wd:
                d = d + wd * p[i]
            if momentum_on:
                bi = d if fresh else b[i] * mu + damp * d
                b[i] = bi
                d = d + mu * bi if nesterov else bi
            p[i] = p[i] - lr * d
            i += cuda.blockDim.x
        k += cuda.gridDim.x


@_jit
def _adagrad(addrs, chunks, clrs, sign, wd, eps, has_wd):
    k = cuda.blockIdx.x
    while k < chunks.shape[0]:
        t, lo, hi = chunks[k, 0], chunks[k, 1], chunks[k, 2]
        p = view(addrs[0, t], hi, sign)
        g = view(addrs[1, t], hi, sign)
        s = view(addrs[2, t], hi, sign)
        clr = clrs[t]  # per-tensor scalars arrive in the parameters' dtype
        i = lo + cuda.threadIdx.x
        while i < hi:
            gi = g[i] * sign
            if has_wd:
                gi = gi + wd * p[i]
            si = s[i] + gi * gi
            s[i] = si
            p[i] = p[i] - clr * (gi / (math.sqrt(si) + eps))
            i += cuda.blockDim.x
        k += cuda.gridDim.x


@_jit
def _rmsprop(addrs, chunks, sign, wd, alpha, w, eps, lr, mu, has_wd, low, centered, momentum_on):
    k = cuda.blockIdx.x
    while k < chunks.shape[0]:
        t, lo, hi = chunks[k, 0], chunks[k, 1], chunks[k, 2]
        p = view(addrs[0, t], hi, sign)
        g = view(addrs[1, t], hi, sign)
        v = view(addrs[2, t], hi, sign)
        ga = view(addrs[3, t], hi, sign)
        b = view(addrs[4, t], hi, sign)
        i = lo + cuda.threadIdx.x
        while i < hi:
            gi = g[i] * sign
            if has_wd:
                gi = gi + wd * p[i]
            vi = v[i] * alpha + w * gi * gi
            v[i] = vi
            if centered:
                ai = ga[i] + w * (gi - ga[i]) if low else gi - (gi - ga[i]) * alpha
                ga[i] = ai
                avg = math.sqrt(vi - ai * ai) + eps
            else:
                avg = math.sqrt(vi) + eps
            if momentum_on:
                bi = b[i] * mu + gi / avg
                b[i] = bi
                p[i] = p[i] - lr * bi
            else:
                p[i] = p[i] - lr * (gi / avg)
            i += cuda.blockDim.x
        k += cuda.gridDim.x


@_jit
def _adam(addrs, chunks, step_sizes, bc2_sqrts, sign, decay, wd, w1, b1, b2, w2, eps, coupled, low, amsgrad):
    k = cuda.blockIdx.x
    while k < chunks.shape[0]:
        t, lo, hi = chunks[k, 0], chunks[k, 1], chunks[k, 2]
        p = view(addrs[0, t], hi, sign)
        g = view(addrs[1, t], hi, sign)
        m = view(addrs[2, t], hi, sign)
        v = view(addrs[3, t], hi, sign)
        vmax = view(addrs[4, t], hi, sign)
        ss = step_sizes[t]  # per-tensor scalars arrive in the parameters' dtype
        bc = bc2_sqrts[t]
        i = lo + cuda.threadIdx.x
        while i < hi:
            pi = p[i] * decay
            gi = g[i] * sign
            if coupled:
                gi = gi + wd * pi
            mi = m[i] + w1 * (gi - m[i]) if low else gi - (gi - m[i]) * b1
            vi = v[i] * b2 + w2 * gi * gi
            m[i] = mi
            v[i] = vi
            if amsgrad:
                if vi > vmax[i] or vi != vi:  # torch.maximum propagates NaN
                    vmax[i] = vi
                vi = vmax[i]
            p[i] = pi - ss * (mi / (math.sqrt(vi) / bc + eps))
            i += cuda.blockDim.x
        k += cuda.gridDim.x


# -- table entry points (fastnorm's optimizers call these) -----------------------------------------


def _prepare(addrs, numels, dtype, rows: int, *constants):
    dtype = np.dtype(dtype)
    if dtype not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise TypeError(f"the cuda optimizers update float32 or float64 tensors, got {dtype}")
    numels = tuple(int(n) for n in numels)
    if addrs.dtype != np.int64 or addrs.shape != (rows, len(numels)):
        raise ValueError(f"addrs must be an int64 ({rows}, {len(numels)}) table, got {addrs.dtype} {addrs.shape}")
    chunks = _chunk_table(numels)
    grid = max(1, min(chunks.shape[0], MAX_BLOCKS))
    return upload(addrs), chunks, grid, [dtype.type(c) for c in constants]



def _steps(steps, step_f64, advance: bool, t: int):
    """Device float64 (T,) step counts, after advancing the counters at ``steps`` if asked."""
    out = scratch((t,), np.float64)
    _advance[max(1, -(-t // BLOCK)), BLOCK, stream()](upload(np.asarray(steps, np.int64)), bool(step_f64), advance, out)
    return out


def _sign(maximize: bool) -> float:
    return -1.0 if maximize else 1.0


def sgd_step_table(addrs, numels, dtype, first_step, *, lr, weight_decay, momentum, dampening, nesterov, maximize):
    """SGD over a table of device tensors (rows param, grad, momentum_buffer); see numba_cpu."""
    a, chunks, grid, k = _prepare(addrs, numels, dtype, 3, _sign(maximize), lr, weight_decay, momentum,
                                  1.0 - dampening)  # fmt: skip
    flags = upload(np.asarray(first_step, np.int8))
    _sgd[grid, BLOCK, stream()](a, chunks, flags, *k, weight_decay != 0, momentum != 0, bool(nesterov))


def adagrad_step_table(addrs, numels, dtype, steps, step_f64, clrs=None, *, lr, lr_decay, weight_decay, eps, maximize):
    """Adagrad over a table (rows param, grad, sum); device step counters at ``steps`` advanced
    on the device, or ``clrs`` (host float64 per tensor) given."""
    a, chunks, grid, k = _prepare(addrs, numels, dtype, 3, _sign(maximize), weight_decay, eps)
    t = len(numels)
    if clrs is None:
        clr_dev = scratch((t,), dtype)  # computed in float64, stored in the parameters' dtype
        _adagrad_scalars[max(1, -(-t // BLOCK)), BLOCK, stream()](_steps(steps, step_f64, True, t), float(lr),
                                                                  float(lr_decay), clr_dev)  # fmt: skip
    else:
        clr_dev = upload(np.asarray(clrs, np.float64).astype(dtype))
    _adagrad[grid, BLOCK, stream()](a, chunks, clr_dev, *k, weight_decay != 0)


def rmsprop_step_table(addrs, numels, dtype, steps, step_f64, *, lr, alpha, eps, weight_decay, momentum, centered, maximize):
    """RMSprop over a table (rows param, grad, square_avg, grad_avg, momentum_buffer)."""
    a, chunks, grid, k = _prepare(addrs, numels, dtype, 5, _sign(maximize), weight_decay, alpha, 1.0 - alpha,
                                  eps, lr, momentum)  # fmt: skip
    if len(steps):
        _steps(steps, step_f64, True, len(numels))
    _rmsprop[grid, BLOCK, stream()](a, chunks, *k, weight_decay != 0, 1.0 - alpha < 0.5, bool(centered), momentum > 0)


def adam_step_table(addrs, numels, dtype, steps, step_f64, step_sizes=None, bias_correction2_sqrts=None, *,
                    lr, beta1, beta2, eps, weight_decay, decoupled_weight_decay, amsgrad, maximize):  # fmt: skip
    """Adam/AdamW over a table (rows param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq); the step
    counters at ``steps`` advanced and the bias corrections computed on the device, or given."""
    decay = 1.0 - lr * weight_decay if decoupled_weight_decay else 1.0
    a, chunks, grid, k = _prepare(addrs, numels, dtype, 5, _sign(maximize), decay, weight_decay, 1.0 - beta1,
                                  beta1, beta2, 1.0 - beta2, eps)  # fmt: skip
    t = len(numels)
    if step_sizes is None:
        ss, bc2 = scratch((t,), dtype), scratch((t,), dtype)  # float64 math, stored in dtype
        _adam_scalars[max(1, -(-t // BLOCK)), BLOCK, stream()](_steps(steps, step_f64, True, t), float(lr),
                                                               float(beta1), float(beta2), ss, bc2)  # fmt: skip
    else:
        ss = upload(np.asarray(step_sizes, np.float64).astype(dtype))
        bc2 = upload(np.asarray(bias_correction2_sqrts, np.float64).astype(dtype))
    coupled = weight_decay != 0 and not decoupled_weight_decay
    _adam[grid, BLOCK, stream()](a, chunks, ss, bc2, *k, coupled, 1.0 - beta1 < 0.5, bool(amsgrad))


# -- the list-of-arrays API shared by every backend (device arrays in) ----------------------------


def _table(*rows):
    from ._device import address

    first = rows[0]
    dtype = np.dtype(first[0].dtype)
    numels = tuple(int(np.prod(a.shape)) for a in first)
    for row in rows:
        for a, n in zip(row, numels):
            if np.dtype(a.dtype) != dtype or int(np.prod(a.shape)) != n:
                raise ValueError("every array must have its parameter's dtype and size")
    return np.array([[address(a) for a in row] for row in rows], np.int64).reshape(len(rows), len(first)), numels, dtype


def _host(values):
    """Per-tensor scalars given as a host sequence or a device array."""
    return values.copy_to_host() if hasattr(values, "copy_to_host") else np.asarray(values, np.float64)


_API = ListAPI(_table, sys.modules[__name__], _host)
sgd_step, adagrad_step, rmsprop_step, adam_step = _API.sgd_step, _API.adagrad_step, _API.rmsprop_step, _API.adam_step
