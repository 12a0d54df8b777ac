"""Batch Normalization on NVIDIA GPUs with ``numba.cuda.jit`` kernels.

Book: "Deep Learning from Scratch", section 6.3; conventions are PyTorch's (kernels/reference is
the readable version, kernels/numba_cpu the CPU one; the same contract and tests). The
per-channel math is kernels/formulas/batchnorm.py, shared with the CPU kernels.

Statistics (training forward), three launches on the caller's stream:
1. partial sums: a grid of (channel tile, G) blocks, G splitting each channel's N*S values so
   that even a few channels fill the GPU; every thread accumulates, in float64, the shifted sums
   sum(x - K) and sum((x - K)^2) with K the channel's first value (the Welford-equivalent form
   whose merge is an addition: Chan's formula with a common shift, exact enough however large
   |mean| / std), then the block merges them: warp shuffles (``shfl_down_sync``) and shared
   memory across warps. Layouts: (N, C, S) planes, with threads along S (coalesced), and
   (N, C) rows, a 32 x 8 block with threads along C (coalesced) and rows merged in shared memory.
2. finalize, a thread per channel: merges the G partials, writes mean, invstd, the running
   statistics (unbiased variance, on the device: no host round trip) and the per-channel
   coefficients of step 3.
3. normalize, grid-stride over all elements: y = ((x - mean_hi) - mean_lo) * gamma*invstd + beta.
Backward: partial sums of dy and dy*(x - mean) (the same grid), a finalize giving dweight,
dbias and the coefficients, then dx = dy*k1 + (x - mean)*k2 + k3 grid-stride.

Outputs are the caller's arrays (allocated by torch in fastnorm); scratch comes from
``_device.scratch`` (torch's caching allocator in fastnorm).
"""

from __future__ import annotations

import math

import numpy as np
from numba import cuda

from .. import BATCH_NORM_API
from ..formulas import batchnorm as formulas
from ..formulas import compiled
from ._device import BLOCK, SIMULATOR, WARP, scratch, stream

__all__ = [*BATCH_NORM_API]

ROW_TILE, ROW_LANES = 32, 8  # (N, C) layout: 32 channels x 8 rows per block
TARGET_BLOCKS = 1024  # aim for this many blocks in the partial-sum grid (~8 per SM on an H100)

_jit = cuda.jit if SIMULATOR else cuda.jit(cache=True)
_device = cuda.jit(device=True) if SIMULATOR else cuda.jit(device=True, inline="always")
_F = compiled(_device, formulas)


# -- block reductions ---------------------------------------------------------------------------

if SIMULATOR:  # the simulator has no warp shuffles: a shared-memory tree gives the same sums

    @_device
    def _block_sum2(a, b, sh_a, sh_b):
        """Sums of a and b over a 1-D block (valid in thread 0); sh_*: shared float64 (BLOCK,)."""
        tid = cuda.threadIdx.x
        sh_a[tid] = a
        sh_b[tid] = b
        cuda.syncthreads()
        width = cuda.blockDim.x // 2
        while width > 0:
            if tid < width:
                sh_a[tid] += sh_a[tid + width]
                sh_b[tid] += sh_b[tid + width]
            cuda.syncthreads()
            width //= 2
        return sh_a[0], sh_b[0]

else:

    @_device
    def _warp_sum(v):
        offset = WARP // 2
        while offset > 0:
            v += cuda.shfl_down_sync(0xFFFFFFFF, v, offset)
            offset //= 2
        return v

    @_device
    def _block_sum2(a, b, sh_a, sh_b):
        """Sums of a and b over a 1-D block (valid in thread 0): shuffles within each warp, then
        the warps' sums through shared memory and one more warp reduction."""
        tid = cuda.threadIdx.x
        lane = tid % WARP
        warp = tid // WARP
        a = _warp_sum(a)
        b = _warp_sum(b)
        if lane == 0:
            sh_a[warp] = a
            sh_b[warp] = b
        cuda.syncthreads()
        a = 0.0
        b = 0.0
        if warp == 0:
            if lane < (cuda.blockDim.x + WARP - 1) // WARP:
                a = sh_a[lane]
                b = sh_b[lane]
            a = _warp_sum(a)
            b = _warp_sum(b)
        return a, b


# -- partial sums ---------------------------------------------------------------------------------


@_jit
def _sums_planes(u, v, center, grad, p1, p2):
    """Block (c, g) of a (C, G) grid: partial sums over channel c of (N, C, S) arrays.
    grad False: sums of d = u - center[c] and d*d (statistics); True: u and u*(v - center[c])."""
    sh_a = cuda.shared.array(BLOCK, np.float64)
    sh_b = cuda.shared.array(BLOCK, np.float64)
    c = cuda.blockIdx.x
    g = cuda.blockIdx.y
    n_blocks = cuda.gridDim.y
    N, C, S = u.shape
    k = center[c]
    a = 0.0
    b = 0.0
    total = N * S
    j = g * cuda.blockDim.x + cuda.threadIdx.x
    step = n_blocks * cuda.blockDim.x
    while j < total:
        n = j // S
        s = j - n * S
        if grad:
            w = np.float64(u[n, c, s])
            a += w
            b += w * (np.float64(v[n, c, s]) - k)
        else:
            d = np.float64(u[n, c, s]) - k
            a += d
            b += d * d
        j += step
    a, b = _block_sum2(a, b, sh_a, sh_b)
    if cuda.threadIdx.x == 0:
        p1[c, g] = a
        p2[c, g] = b


@_jit
def _sums_rows(u, v, center, grad, p1, p2):
    """Block (tile, g): channels tile*32 + threadIdx.x of (N, C) arrays, rows threadIdx.y + 8*g
    + 8*G*i; the 8 row lanes are merged in shared memory."""
    sh_a = cuda.shared.array((ROW_LANES, ROW_TILE), np.float64)
    sh_b = cuda.shared.array((ROW_LANES, ROW_TILE), np.float64)
    tx = cuda.threadIdx.x
    ty = cuda.threadIdx.y
    c = cuda.blockIdx.x * ROW_TILE + tx
    g = cuda.blockIdx.y
    N, C = u.shape
    a = 0.0
    b = 0.0
    if c < C:
        k = center[c]
        n = g * ROW_LANES + ty
        step = cuda.gridDim.y * ROW_LANES
        while n < N:
            if grad:
                w = np.float64(u[n, c])
                a += w
                b += w * (np.float64(v[n, c]) - k)
            else:
                d = np.float64(u[n, c]) - k
                a += d
                b += d * d
            n += step
    sh_a[ty, tx] = a
    sh_b[ty, tx] = b
    cuda.syncthreads()
    if ty == 0 and c < C:
        for lane in range(1, ROW_LANES):
            a += sh_a[lane, tx]
            b += sh_b[lane, tx]
        p1[c, g] = a
        p2[c, g] = b


@_jit
def _shift(x, shift):
    """shift[c] = x[0, c, 0] if finite else 0 (thread per channel)."""
    c = cuda.grid(1)
    if c < shift.shape[0]:
        shift[c] = _F.shift_of(np.float64(x[0, c, 0]))


# -- finalize (thread per channel) ---------------------------------------------------------------


@_device
def _merge(p1, p2, c):
    """Channel c's sums: the G partial sums of a (C, G) grid, added."""
    s1 = 0.0
    s2 = 0.0
    for g in range(p1.shape[1]):
        s1 += p1[c, g]
        s2 += p2[c, g]
    return s1, s2


@_jit
def _finalize_train(p1, p2, shift, count, eps, momentum, running_mean, running_var, has_running,
                    weight, has_weight, bias, has_bias, save_mean, save_invstd, coef):  # fmt: skip
    # coef rows (x's dtype): mean_hi, mean_lo, gamma * invstd, beta
    c = cuda.grid(1)
    if c >= p1.shape[0]:
        return
    s1, s2 = _merge(p1, p2, c)
    mean, var, invstd = _F.statistics(s1, s2, shift[c], count, eps)
    save_mean[c] = mean
    save_invstd[c] = invstd
    if has_running:
        running_mean[c] = _F.running_update(running_mean[c], mean, momentum)
        running_var[c] = _F.running_update(running_var[c], _F.unbiased_var(var, count), momentum)
    coef[0, c] = mean
    coef[1, c] = mean - np.float64(coef[0, c])
    coef[2, c] = _F.scale_of(invstd, weight[c] if has_weight else 1.0)
    coef[3, c] = bias[c] if has_bias else 0.0


@_jit
def _finalize_eval(running_mean, running_var, eps, weight, has_weight, bias, has_bias, coef):
    c = cuda.grid(1)
    if c >= running_mean.shape[0]:
        return
    invstd = 1.0 / math.sqrt(np.float64(running_var[c]) + eps)
    coef[0, c] = running_mean[c]
    coef[1, c] = 0.0
    coef[2, c] = _F.scale_of(invstd, weight[c] if has_weight else 1.0)
    coef[3, c] = bias[c] if has_bias else 0.0


@_jit
def _finalize_backward(p1, p2, count, invstd, weight, has_weight, training, dweight, has_dweight, dbias,
                       has_dbias, coef):  # fmt: skip
    # coef rows: k1 (dy), k2 (x - mean), k3 (constant)
    c = cuda.grid(1)
    if c >= invstd.shape[0]:
        return
    s_dy, s_dyx = _merge(p1, p2, c)
    coef[0, c], coef[1, c], coef[2, c], dw, db = _F.backward_coefficients(
        s_dy, s_dyx, count, np.float64(invstd[c]), np.float64(weight[c]) if has_weight else 1.0, training
    )
    if has_dbias:
        dbias[c] = db
    if has_dweight:
        dweight[c] = dw


@_jit
def _finalize_stats(p1, p2, shift, count, mean, var):
    c = cuda.grid(1)
    if c < p1.shape[0]:
        s1, s2 = _merge(p1, p2, c)
        mean[c], var[c], _ = _F.statistics(s1, s2, shift[c], count, 1.0)


# -- elementwise (grid-stride) ----------------------------------------------------------------------


@_jit
def _normalize(x, coef, S, y):
    """y = ((x - m_hi) - m_lo) * a + b over flat (N*C*S,) views; channel (i // S) % C."""
    C = coef.shape[1]
    i = cuda.grid(1)
    step = cuda.gridsize(1)
    while i < x.shape[0]:
        c = (i // S) % C
        y[i] = ((x[i] - coef[0, c]) - coef[1, c]) * coef[2, c] + coef[3, c]
        i += step


@_jit
def _input_grad(dy, x, mean, coef, S, dx):
    """dx = dy * k1 + (x - mean) * k2 + k3 over flat views."""
    C = coef.shape[1]
    i = cuda.grid(1)
    step = cuda.gridsize(1)
    while i < x.shape[0]:
        c = (i // S) % C
        dx[i] = dy[i] * coef[0, c] + (x[i] - mean[c]) * coef[1, c] + coef[2, c]
        i += step


# -- launchers: the kernels API (same names and arguments as kernels.reference) -----------------


def _grid_stride(total: int) -> int:
    return max(1, min(-(-total // BLOCK), 32 * TARGET_BLOCKS))


def _per_channel(c: int) -> int:
    return max(1, -(-c // BLOCK))


def _channel_sums(u, v, center, grad: bool):
    """(C, G) float64 partial sums over each channel of (N, C, S) device arrays."""
    n, c, s = u.shape
    st = stream()
    if s == 1:
        tiles = -(-c // ROW_TILE)
        g = max(1, min(-(-n // (ROW_LANES * 16)), -(-TARGET_BLOCKS // tiles)))
        p1, p2 = scratch((c, g), np.float64), scratch((c, g), np.float64)
        u2 = u.reshape(n, c)
        v2 = u2 if v is None else v.reshape(n, c)
        _sums_rows[(tiles, g), (ROW_TILE, ROW_LANES), st](u2, v2, center, grad, p1, p2)
    else:
        g = max(1, min(-(-(n * s) // (BLOCK * 4)), -(-TARGET_BLOCKS // c), 65535))
        p1, p2 = scratch((c, g), np.float64), scratch((c, g), np.float64)
        _sums_planes[(c, g), BLOCK, st](u, u if v is None else v, center, grad, p1, p2)
    return p1, p2


_EMPTY: dict = {}


def _or_empty(a, dtype):
    if a is not None:
        return a
    key = np.dtype(dtype)
    if key not in _EMPTY:
        _EMPTY[key] = cuda.device_array(1, dtype=key)
    return _EMPTY[key]


def _check(x, *arrays):
    if x.dtype not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise TypeError(f"the cuda backend computes in float32 or float64, got {x.dtype}")
    if len(x.shape) != 3:
        raise ValueError(f"kernels take (N, C, S) arrays, got shape {x.shape}")
    for a in arrays:
        if a is not None and a.dtype != x.dtype:
            raise ValueError(f"every array must be {x.dtype}, got {a.dtype}")


def batch_norm_forward_train(x, weight, bias, running_mean, running_var, momentum, eps, y, save_mean, save_invstd):
    """Training forward; see kernels.reference.batch_norm_forward_train for the contract."""
    _check(x, y, weight, bias, running_mean, running_var, save_mean, save_invstd)
    n, c, s = x.shape
    st = stream()
    shift = scratch((c,), np.float64)
    _shift[_per_channel(c), BLOCK, st](x, shift)
    p1, p2 = _channel_sums(x, None, shift, False)
    coef = scratch((4, c), x.dtype)
    dt = x.dtype
    _finalize_train[_per_channel(c), BLOCK, st](
        p1, p2, shift, float(n * s), float(eps), float(momentum), _or_empty(running_mean, dt),
        _or_empty(running_var, dt), running_mean is not None, _or_empty(weight, dt), weight is not None,
        _or_empty(bias, dt), bias is not None, save_mean, save_invstd, coef,
    )  # fmt: skip
    total = n * c * s
    _normalize[_grid_stride(total), BLOCK, st](x.reshape(total), coef, s, y.reshape(total))


def batch_norm_forward_eval(x, weight, bias, running_mean, running_var, eps, y):
    """Eval forward; see kernels.reference.batch_norm_forward_eval."""
    _check(x, y, weight, bias, running_mean, running_var)
    n, c, s = x.shape
    st = stream()
    coef = scratch((4, c), x.dtype)
    dt = x.dtype
    _finalize_eval[_per_channel(c), BLOCK, st](
        running_mean, running_var, float(eps), _or_empty(weight, dt), weight is not None, _or_empty(bias, dt),
        bias is not None, coef,
    )  # fmt: skip
    total = n * c * s
    _normalize[_grid_stride(total), BLOCK, st](x.reshape(total), coef, s, y.reshape(total))


def batch_norm_backward(dy, x, mean, invstd, weight, training, dx, dweight, dbias):
    """Backward; see kernels.reference.batch_norm_backward."""
    _check(x, dy, mean, invstd, weight, dx, dweight, dbias)
    n, c, s = x.shape
    st = stream()
    dt = x.dtype
    need_sums = (dx is not None and training) or dweight is not None or dbias is not None
    center = scratch((c,), np.float64)
    _to_f64[_per_channel(c), BLOCK, st](mean, center)
    if need_sums:
        p1, p2 = _channel_sums(dy, x, center, True)
    else:
        p1 = p2 = scratch((c, 1), np.float64)
        _fill_zero[_per_channel(c), BLOCK, st](p1)
    coef = scratch((3, c), dt)
    _finalize_backward[_per_channel(c), BLOCK, st](
        p1, p2, float(n * s), invstd, _or_empty(weight, dt), weight is not None, bool(training),
        _or_empty(dweight, dt), dweight is not None, _or_empty(dbias, dt), dbias is not None, coef,
    )  # fmt: skip
    if dx is not None:
        total = n * c * s
        _input_grad[_grid_stride(total), BLOCK, st](dy.reshape(total), x.reshape(total), mean, coef, s,
                                                    dx.reshape(total))  # fmt: skip


def batch_norm_stats(x, mean, var):
    """Per-channel mean and biased variance (float64 device outputs); see kernels.reference."""
    _check(x)
    n, c, s = x.shape
    st = stream()
    shift = scratch((c,), np.float64)
    _shift[_per_channel(c), BLOCK, st](x, shift)
    p1, p2 = _channel_sums(x, None, shift, False)
    _finalize_stats[_per_channel(c), BLOCK, st](p1, p2, shift, float(n * s), mean, var)


@_jit
def _to_f64(src, dst):
    c = cuda.grid(1)
    if c < dst.shape[0]:
        dst[c] = src[c]


@_jit
def _fill_zero(a):
    c = cuda.grid(1)
    if c < a.shape[0]:
        a[c, 0] = 0.0
