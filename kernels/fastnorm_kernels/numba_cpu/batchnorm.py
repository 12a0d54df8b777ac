"""Batch Normalization on CPU threads with Numba: fused forward and backward kernels.

Book: "Deep Learning from Scratch", section 6.3; conventions are PyTorch's (see
kernels/fastnorm_kernels/reference/batchnorm.py, the readable version these kernels are tested against). The
per-channel math (statistics, running statistics, backward coefficients) is
kernels/fastnorm_kernels/formulas/batchnorm.py, shared with the CUDA kernels; this module holds the CPU passes.

Algorithm
---------
Inputs arrive as C-contiguous (N, C, S) arrays (S = product of the spatial sizes) and are seen
as one of two 2-D layouts, each read with unit stride:

* rows   (S == 1): x is (N, C) with C contiguous. The batch is cut into at most 64 chunks of
  rows, a parallel loop gives each chunk C-wide float64 partial sums, accumulated eight rows per
  visit of the partials where that pays (ROW_GROUP; the inner loop runs along C and vectorises);
  the partials are then added chunk by chunk.
  Channels-last 4-D input is this layout too, with N*H*W rows.
* planes (S > 1):  x is (N*C, S), one contiguous plane per (n, c); a parallel loop over planes
  gives each plane's sums (a vectorised reduction), then the planes of a channel are added.

Channel blocks: channels are processed in blocks whose data fits in L3 (BLOCK_BYTES), so the
second pass over a block (normalise in the forward, dx in the backward) finds it in cache and
DRAM sees only the minimal traffic: read x, write y; read dy and x, write dx.

Statistics: one read of x computes the shifted sums sum(x - K) and sum((x - K)^2) in float64
(16-bit planes: float32 per block of PLANE_SUM_BLOCK values, the blocks added in float64), with
K the mean of the channel's first 16 values (0 if that is not finite). Shifting makes the sums
exact enough however large |mean| / std is (the float32 E[x^2] - E[x]^2 cancels
catastrophically); partial sums from chunks or planes share K, so merging them is an addition
(Chan's formula with a common shift). The chunking depends on the shape only, never on the
number of threads, so results are identical whatever the thread count.

Forward:  mean = K + S1/n,  var = S2/n - (S1/n)^2 (biased, normalises),  invstd = 1/sqrt(var+eps);
          the running statistics are updated in the same call (unbiased var * n/(n-1));
          then y = (x - mean) * a + beta with a = gamma * invstd folded per channel (one more
          read of x, one write of y). Subtracting the mean first (as a float32 pair mean_hi +
          mean_lo) keeps y accurate to float32 rounding when |mean| >> std, at no cost in a
          bandwidth-bound loop (torch's folded x*a + b loses ~1e-2 at mean 1e4, std 1).
Backward: one pass reads dy and x for  S_dy = sum(dy)  and  S_dyx = sum(dy * (x - mean)),
          which are dbias and dweight / invstd; a second pass writes
          dx = gamma*invstd * (dy - S_dy/n - (x - mean) * invstd^2 * S_dyx/n)
          (eval mode: mean and invstd are constants, dx = gamma*invstd*dy).

NaN and Inf propagate as in PyTorch (no nnan/ninf fast-math flags): a NaN makes its channel's
statistics and outputs NaN; an Inf gives mean Inf and variance NaN.
"""

from __future__ import annotations

import math

import numba
import numpy as np
from numba import njit, prange, types

from .. import BATCH_NORM_API
from .._bits import HALF_DTYPES
from .._validate import FLOAT_DTYPES, check_arrays, check_float64_vectors, compute_dtype
from ..formulas import batchnorm as formulas
from ..formulas import compiled
from . import _jit
from ._bits import accumulator, cast_like, narrow, widen
from ._cfuncs import C_DTYPES, at, entry_points, vector_at
from ._jit import REASSOC, twins
from ._prefetch import prefetch

__all__ = [*BATCH_NORM_API, "forward_train_at", "forward_eval_at", "backward_at", "stats_at", "plan",
           "c_entry_point", "C_DTYPES", "C_ENTRY_DTYPES", "BATCH_NORM_DTYPES"]  # fmt: skip

_F = compiled(njit(inline="always"), formulas)

MAX_CHUNKS = 64  # row chunks of the (N, C) layout: bounds the partial-sum buffers
CHUNK_ELEMENTS = 1 << 14  # aim for at least this many elements per chunk
#: Channels are processed in blocks whose data (x; dy and x in the backward) fits in this many
#: bytes, so the second pass over a block (normalise; dx) reads it from L3, not from DRAM:
#: DRAM then sees the minimal traffic, one read of x and one write of y (forward).
#: Only the planes layout is blocked: a band of columns of the rows layout reads a few cache
#: lines per row and then jumps to the next page, which defeats the hardware prefetcher (measured
#: 4x slower at (8192, 2048) than streaming whole rows twice).
BLOCK_BYTES = 6 << 20
#: 16-bit planes: values summed in float32 (a vectorised reduction in cache, error ~1e-7 of the
#: block's sum) before the block's sums join the plane's float64 ones, so a plane of any length
#: keeps float32 accuracy (float32 sums over a 4.7M-value bfloat16 plane gave dweight 16x torch's
#: error). float32 and float64 planes sum in float64 throughout.
PLANE_SUM_BLOCK = 4096


def _rows_per_chunk(n: int, c: int) -> int:
    chunks = max(1, min(MAX_CHUNKS, (n * c) // CHUNK_ELEMENTS, n))
    return -(-n // chunks)


def _channel_block(n: int, c: int, s: int, itemsize: int, arrays: int) -> int:
    """Channels per block such that ``arrays`` arrays of the block fit in BLOCK_BYTES."""
    if s == 1:
        return c
    per_channel = n * s * itemsize * arrays
    return min(c, max(1, BLOCK_BYTES // max(per_channel, 1)))


# -- building blocks, inlined into the kernels below (prange becomes part of the caller's loop) --
# Each works on (N, C, S) arrays in the rows layout (S == 1: all channels, c0 = 0, c1 = C) or
# the planes layout (S > 1: the block of channels c0 <= c < c1).


@njit(inline="always")
def _shift(x):  # x: (N, C, S) -> (C,) float64: the mean of each channel's first values, 0 if not finite
    """The shift K of the statistics: the mean of the channel's first SHIFT_SAMPLE values (in
    (n, s) order). The shifted sums lose a factor 1 + (mean - K)^2 / var of their precision to
    the final subtraction; K a single value can sit several std from the mean (x 6 on 16-bit
    planes, which sum in float32), a mean of 16 values is expected within std / 4 (x 1.06)."""
    N, C, S = x.shape
    m = min(N * S, SHIFT_SAMPLE)
    shift = np.zeros(C, np.float64)
    for f in range(m):  # channels innermost: rows of the (N, C) layout are read along
        n, j = f // S, f % S
        for c in range(C):
            shift[c] += np.float64(widen(x[n, c, j]))
    acc = accumulator(x[0, 0, 0])  # K in the planes' sums' dtype (float32 for 16-bit storage): the
    for c in range(C):  # sums are of x - K and the mean is K + S1/n, with the same K
        shift[c] = np.float64(cast_like(_F.shift_of(shift[c] / m), acc))
    return shift


#: values of a channel averaged into the statistics' shift K (_shift)
SHIFT_SAMPLE = 16


#: rows of the (N, C) layout added per visit of the C-wide float64 accumulators: each visit loads
#: and stores the accumulators once for eight rows (a tree of eight values in float64, in a fixed
#: order), where one row per visit made those loads and stores, not x, the sums' cost. Measured
#: here (stats pass): 2-2.6x faster in cache; from DRAM by itself only when rows are long
#: (ROW_GROUP_MIN_BYTES): eight short rows read side by side are eight short streams that the
#: hardware prefetcher does not follow (fwd+bwd from DRAM: (8192, 2048) 1.19x, (1024, 1024) 1.09x,
#: but channels-last (50176, 64) 0.91x and (6272, 256) 0.83x). Short rows are grouped with a
#: software prefetch (PREFETCH_MAX_ROW_BYTES); rows in between keep one row per visit.
ROW_GROUP = 8
ROW_GROUP_MIN_BYTES = 4096
#: Short rows (at most this many bytes: channels-last with C <= 128 float32) are grouped too, with
#: the group two groups ahead prefetched in software (_prefetch.py), which the hardware prefetcher
#: does not do for them. Stats pass at (50176, 64): 383 -> 211 µs in cache, 482 -> 362 µs from
#: DRAM; rows of 1-4 KB gained in cache but lost from DRAM even with the prefetch (0.8x at
#: (6272, 256)) and stay one row per visit.
PREFETCH_MAX_ROW_BYTES = 512
PREFETCH_GROUPS = 2
LINE_BYTES = 64


@njit(inline="always")
def _stat_rows8(x, i, center, a1, a2):
    """Rows i..i+7 of x (N, C) into a1 += sum(x - center), a2 += sum((x - center)^2) (float64)."""
    x0, x1, x2, x3, x4, x5, x6, x7 = x[i], x[i + 1], x[i + 2], x[i + 3], x[i + 4], x[i + 5], x[i + 6], x[i + 7]
    for c in range(x.shape[1]):
        k = center[c]
        d0, d1 = np.float64(widen(x0[c])) - k, np.float64(widen(x1[c])) - k
        d2, d3 = np.float64(widen(x2[c])) - k, np.float64(widen(x3[c])) - k
        d4, d5 = np.float64(widen(x4[c])) - k, np.float64(widen(x5[c])) - k
        d6, d7 = np.float64(widen(x6[c])) - k, np.float64(widen(x7[c])) - k
        a1[c] += ((d0 + d1) + (d2 + d3)) + ((d4 + d5) + (d6 + d7))
        a2[c] += ((d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3)) + ((d4 * d4 + d5 * d5) + (d6 * d6 + d7 * d7))


@njit(inline="always")
def _grad_rows8(g, x, i, center, a1, a2):
    """Rows i..i+7 of dy (g) and x, (N, C): a1 += sum(dy), a2 += sum(dy * (x - center)) (float64)."""
    g0, g1, g2, g3, g4, g5, g6, g7 = g[i], g[i + 1], g[i + 2], g[i + 3], g[i + 4], g[i + 5], g[i + 6], g[i + 7]
    x0, x1, x2, x3, x4, x5, x6, x7 = x[i], x[i + 1], x[i + 2], x[i + 3], x[i + 4], x[i + 5], x[i + 6], x[i + 7]
    for c in range(x.shape[1]):
        k = center[c]
        w0, w1 = np.float64(widen(g0[c])), np.float64(widen(g1[c]))
        w2, w3 = np.float64(widen(g2[c])), np.float64(widen(g3[c]))
        w4, w5 = np.float64(widen(g4[c])), np.float64(widen(g5[c]))
        w6, w7 = np.float64(widen(g6[c])), np.float64(widen(g7[c]))
        a1[c] += ((w0 + w1) + (w2 + w3)) + ((w4 + w5) + (w6 + w7))
        p0, p1 = w0 * (np.float64(widen(x0[c])) - k), w1 * (np.float64(widen(x1[c])) - k)
        p2, p3 = w2 * (np.float64(widen(x2[c])) - k), w3 * (np.float64(widen(x3[c])) - k)
        p4, p5 = w4 * (np.float64(widen(x4[c])) - k), w5 * (np.float64(widen(x5[c])) - k)
        p6, p7 = w6 * (np.float64(widen(x6[c])) - k), w7 * (np.float64(widen(x7[c])) - k)
        a2[c] += ((p0 + p1) + (p2 + p3)) + ((p4 + p5) + (p6 + p7))


@njit(inline="always")
def _plane_sums(up, vp, center, grad):
    """Sums over a plane (or a block of one) of d = u - center and d * d (statistics), or of u and
    u * (v - center) (backward: ``grad``), in _bits.accumulator's dtype."""
    a1 = accumulator(up[0])
    a2 = accumulator(up[0])
    k = cast_like(center, a1)
    for j in range(up.size):
        if grad:
            w = cast_like(widen(up[j]), a1)
            a1 += w
            a2 += w * (cast_like(widen(vp[j]), a1) - k)
        else:
            d = cast_like(widen(up[j]), a1) - k
            a1 += d
            a2 += d * d
    return a1, a2


@njit(inline="always")
def _channel_sums(u, v, center, grad, c0, c1, rows_per_chunk):
    """float64 sums over N and S for channels c0..c1-1 of (N, C, S) arrays: of d = u - center
    and d * d (statistics: ``grad`` False), or of u and u * (v - center) (backward: ``grad``)."""
    N, C, S = u.shape
    nc = c1 - c0
    s1 = np.zeros(nc, np.float64)
    s2 = np.zeros(nc, np.float64)
    if S == 1:  # rows: C-wide partial sums per chunk of rows
        u2 = u.reshape(N, C)
        v2 = v.reshape(N, C)
        chunks = (N + rows_per_chunk - 1) // rows_per_chunk
        long_rows = C * u2.itemsize >= ROW_GROUP_MIN_BYTES
        short_rows = C * u2.itemsize <= PREFETCH_MAX_ROW_BYTES
        u_flat = u.reshape(N * C)
        v_flat = v.reshape(N * C)
        p1 = np.zeros((chunks, nc), np.float64)
        p2 = np.zeros((chunks, nc), np.float64)
        for k in prange(chunks):
            a1 = p1[k]
            a2 = p2[k]
            start = k * rows_per_chunk
            end = min(start + rows_per_chunk, N)
            grouped = start + (end - start) // ROW_GROUP * ROW_GROUP if long_rows or short_rows else start
            for i in range(start, grouped, ROW_GROUP):  # eight rows per visit of the accumulators
                if short_rows:  # the group PREFETCH_GROUPS ahead (short rows: see ROW_GROUP)
                    ahead = (i + PREFETCH_GROUPS * ROW_GROUP) * C
                    for q in range(ahead, min(ahead + ROW_GROUP * C, N * C), LINE_BYTES // u2.itemsize):
                        prefetch(u_flat, q)
                        if grad:
                            prefetch(v_flat, q)
                if grad:
                    _grad_rows8(u2, v2, i, center, a1, a2)
                else:
                    _stat_rows8(u2, i, center, a1, a2)
            for i in range(grouped, end):  # the chunk's last rows, one by one
                ui = u2[i]
                vi = v2[i]
                for c in range(C):
                    if grad:
                        w = np.float64(widen(ui[c]))
                        a1[c] += w
                        a2[c] += w * (np.float64(widen(vi[c])) - center[c])
                    else:
                        d = np.float64(widen(ui[c])) - center[c]
                        a1[c] += d
                        a2[c] += d * d
        for k in range(chunks):
            for c in range(nc):
                s1[c] += p1[k, c]
                s2[c] += p2[k, c]
    else:  # planes: one reduction per (n, c) plane
        u2 = u.reshape(N * C, S)
        v2 = v.reshape(N * C, S)
        p1 = np.empty(N * nc, np.float64)
        p2 = np.empty(N * nc, np.float64)
        # a plane's sums: float64, or float32 for 16-bit storage (_bits.accumulator); 16-bit planes
        # longer than PLANE_SUM_BLOCK in blocks of it, the blocks' sums added in float64. Two loops,
        # the choice outside them: a block loop inside the plane loop, even of one block, cost
        # 5-10% at 196-value planes (measured)
        if u2.itemsize > 2 or S <= PLANE_SUM_BLOCK:
            for q in prange(N * nc):
                n = q // nc
                c = c0 + q - n * nc
                p1[q], p2[q] = _plane_sums(u2[n * C + c], v2[n * C + c], center[c], grad)
        else:
            for q in prange(N * nc):
                n = q // nc
                c = c0 + q - n * nc
                up = u2[n * C + c]
                vp = v2[n * C + c]
                t1 = 0.0
                t2 = 0.0
                for j0 in range(0, S, PLANE_SUM_BLOCK):
                    j1 = j0 + PLANE_SUM_BLOCK  # slices: loops from 0 vectorise, from j0 do not
                    a1, a2 = _plane_sums(up[j0:j1], vp[j0:j1], center[c], grad)
                    t1 += np.float64(a1)
                    t2 += np.float64(a2)
                p1[q] = t1
                p2[q] = t2
        for q in range(N * nc):
            s1[q % nc] += p1[q]
            s2[q % nc] += p2[q]
    return s1, s2


@njit(inline="always")
def _affine_pass(x, dy, backward, m, m_lo, a, b, k1, out, c0, c1, rows_per_chunk):
    """out = ((x - m) - m_lo) * a + b, plus dy * k1 when ``backward`` (a literal at each call
    site), for channels c0..c1-1; the per-channel (C,) arrays are in the compute dtype (x's, or
    float32 for 16-bit storage: elements widened on load, rounded once on store).
    Forward: y (dy unused); backward: dx with m_lo zeros, a = k2, b = k3.

    The mean is split into m + m_lo (its rounding error): x - m is exact when x is near m, so
    y keeps float32 accuracy even when |mean| >> std."""
    N, C, S = x.shape
    nc = c1 - c0
    if S == 1:
        x2 = x.reshape(N, C)
        g2 = dy.reshape(N, C)
        o2 = out.reshape(N, C)
        chunks = (N + rows_per_chunk - 1) // rows_per_chunk
        for k in prange(chunks):
            for i in range(k * rows_per_chunk, min((k + 1) * rows_per_chunk, N)):
                xi = x2[i]
                gi = g2[i]
                oi = o2[i]
                for c in range(C):
                    if backward:
                        oi[c] = narrow(widen(gi[c]) * k1[c] + (widen(xi[c]) - m[c]) * a[c] + b[c], o2)
                    else:
                        oi[c] = narrow(((widen(xi[c]) - m[c]) - m_lo[c]) * a[c] + b[c], o2)
    else:
        x2 = x.reshape(N * C, S)
        g2 = dy.reshape(N * C, S)
        o2 = out.reshape(N * C, S)
        for q in prange(N * nc):
            n = q // nc
            c = c0 + q - n * nc
            mc, lc, ac, bc, kc = m[c], m_lo[c], a[c], b[c], k1[c]
            xp = x2[n * C + c]
            gp = g2[n * C + c]
            op = o2[n * C + c]
            for j in range(S):
                if backward:
                    op[j] = narrow(widen(gp[j]) * kc + (widen(xp[j]) - mc) * ac + bc, o2)
                else:
                    op[j] = narrow(((widen(xp[j]) - mc) - lc) * ac + bc, o2)


# -- kernels ---------------------------------------------------------------------------------


@twins(fastmath=REASSOC)
def _forward_train(x, weight, bias, has_weight, has_bias, running_mean, running_var, has_running,
                   momentum, eps, y, save_mean, save_invstd, rows_per_chunk, block):  # fmt: skip
    # x, y: (N, C, S); weight, bias, running_*: (C,) or empty; save_*: (C,)
    N, C, S = x.shape
    n = np.float64(N * S)
    shift = _shift(x)
    m = np.empty_like(save_mean)  # the compute dtype: x's, float32 for 16-bit storage
    m_lo = np.empty_like(save_mean)
    scale = np.empty_like(save_mean)
    beta = np.empty_like(save_mean)
    for c0 in range(0, C, block):
        c1 = min(C, c0 + block)
        s1, s2 = _channel_sums(x, x, shift, False, c0, c1, rows_per_chunk)
        for c in range(c0, c1):
            mean, var, invstd = _F.statistics(s1[c - c0], s2[c - c0], shift[c], n, eps)
            save_mean[c] = mean
            save_invstd[c] = invstd
            if has_running:
                running_mean[c] = _F.running_update(running_mean[c], mean, momentum)
                running_var[c] = _F.running_update(running_var[c], _F.unbiased_var(var, n), momentum)
            m[c] = mean
            m_lo[c] = mean - np.float64(m[c])
            scale[c] = _F.scale_of(invstd, weight[c] if has_weight else 1.0)
            beta[c] = bias[c] if has_bias else 0.0
        _affine_pass(x, x, False, m, m_lo, scale, beta, scale, y, c0, c1, rows_per_chunk)


@twins()
def _forward_eval(x, weight, bias, has_weight, has_bias, running_mean, running_var, eps, y,
                  rows_per_chunk):  # fmt: skip
    C = x.shape[1]
    m_lo = np.zeros_like(running_mean)  # running_mean is exact in the compute dtype
    scale = np.empty_like(running_mean)
    beta = np.empty_like(running_mean)
    for c in range(C):
        invstd = 1.0 / math.sqrt(np.float64(running_var[c]) + eps)
        scale[c] = _F.scale_of(invstd, weight[c] if has_weight else 1.0)
        beta[c] = bias[c] if has_bias else 0.0
    _affine_pass(x, x, False, running_mean, m_lo, scale, beta, scale, y, 0, C, rows_per_chunk)


@twins(fastmath=REASSOC)
def _backward(dy, x, mean, invstd, weight, has_weight, training, need_sums, need_dx,
              dx, dweight, dbias, rows_per_chunk, block):  # fmt: skip
    # dy, x, dx: (N, C, S); mean, invstd, weight: (C,); dweight, dbias: (C,) or empty
    N, C, S = x.shape
    n = np.float64(N * S)
    center = np.empty(C, np.float64)
    for c in range(C):
        center[c] = mean[c]
    k1 = np.empty_like(invstd)  # dx = dy * k1 + (x - mean) * k2 + k3, in the compute dtype
    k2 = np.empty_like(invstd)
    k3 = np.empty_like(invstd)
    zeros = np.zeros_like(invstd)
    for c0 in range(0, C, block):
        c1 = min(C, c0 + block)
        if need_sums:
            s_dy, s_dyx = _channel_sums(dy, x, center, True, c0, c1, rows_per_chunk)
        else:
            s_dy = np.zeros(c1 - c0, np.float64)
            s_dyx = np.zeros(c1 - c0, np.float64)
        for c in range(c0, c1):
            k1[c], k2[c], k3[c], dw, db = _F.backward_coefficients(
                s_dy[c - c0], s_dyx[c - c0], n, np.float64(invstd[c]),
                np.float64(weight[c]) if has_weight else 1.0, training,
            )  # fmt: skip
            if dbias.size:
                dbias[c] = db
            if dweight.size:
                dweight[c] = dw
        if need_dx:
            _affine_pass(x, dy, True, mean, zeros, k2, k3, k1, dx, c0, c1, rows_per_chunk)


@twins(fastmath=REASSOC)
def _stats(x, mean, var, rows_per_chunk, block):
    # x: (N, C, S); mean, var: (C,) float64 out
    N, C, S = x.shape
    n = np.float64(N * S)
    shift = _shift(x)
    for c0 in range(0, C, block):
        c1 = min(C, c0 + block)
        s1, s2 = _channel_sums(x, x, shift, False, c0, c1, rows_per_chunk)
        for c in range(c0, c1):
            mean[c], var[c], _ = _F.statistics(s1[c - c0], s2[c - c0], shift[c], n, 1.0)


# -- launchers: the kernels API (same names and arguments as fastnorm_kernels.reference) -----------------

_EMPTY = {np.dtype(np.float32): np.empty(0, np.float32), np.dtype(np.float64): np.empty(0, np.float64)}

#: storage dtypes: float32, float64, float16 and bfloat16 (uint16 bits, kernels/fastnorm_kernels/_bits.py); the
#: 16-bit ones are computed in float32, with float32 per-channel arrays
BATCH_NORM_DTYPES = (*FLOAT_DTYPES, *HALF_DTYPES)


def _or_empty(a, dtype):
    return _EMPTY[compute_dtype(dtype)] if a is None else a


def _bits(a):
    """float16 arrays as int16 bits: the kernels' element type says the storage (_bits.widen)."""
    return a.view(np.int16) if a is not None and a.dtype == np.float16 else a


def _check(x, y, per_channel, extra=()):
    check_arrays(x, y, per_channel, extra, dtypes=BATCH_NORM_DTYPES)


def batch_norm_forward_train(x, weight, bias, running_mean, running_var, momentum, eps, y, save_mean, save_invstd):
    """Training forward; see fastnorm_kernels.reference.batch_norm_forward_train for the contract."""
    _check(x, y, [weight, bias, running_mean, running_var, save_mean, save_invstd])
    n, c, s = x.shape
    kernel = _forward_train(x.size)
    kernel(_bits(x), _or_empty(weight, x.dtype), _or_empty(bias, x.dtype), weight is not None, bias is not None,
           _or_empty(running_mean, x.dtype), _or_empty(running_var, x.dtype), running_mean is not None,
           float(momentum), float(eps), _bits(y), save_mean, save_invstd, _rows_per_chunk(n, c),
           _channel_block(n, c, s, x.itemsize, 1))  # fmt: skip


def batch_norm_forward_eval(x, weight, bias, running_mean, running_var, eps, y):
    """Eval forward; see fastnorm_kernels.reference.batch_norm_forward_eval."""
    _check(x, y, [weight, bias, running_mean, running_var])
    n, c, s = x.shape
    _forward_eval(x.size)(_bits(x), _or_empty(weight, x.dtype), _or_empty(bias, x.dtype), weight is not None,
                          bias is not None, running_mean, running_var, float(eps), _bits(y),
                          _rows_per_chunk(n, c))  # fmt: skip


def batch_norm_backward(dy, x, mean, invstd, weight, training, dx, dweight, dbias):
    """Backward; see fastnorm_kernels.reference.batch_norm_backward."""
    _check(x, dy, [mean, invstd, weight, dweight, dbias], extra=[dx])
    n, c, s = x.shape
    need_dx = dx is not None
    need_sums = (need_dx and training) or dweight is not None or dbias is not None
    _backward(x.size)(_bits(dy), _bits(x), mean, invstd, _or_empty(weight, x.dtype), weight is not None,
                      bool(training), need_sums, need_dx, _bits(dy if dx is None else dx),
                      _or_empty(dweight, x.dtype), _or_empty(dbias, x.dtype), _rows_per_chunk(n, c),
                      _channel_block(n, c, s, x.itemsize, 2))  # fmt: skip


def batch_norm_stats(x, mean, var):
    """Per-channel mean and biased variance (float64 outputs); see fastnorm_kernels.reference."""
    _check(x, x, [])
    n, c, s = x.shape
    check_float64_vectors(c, mean, var)
    _stats(x.size)(_bits(x), mean, var, _rows_per_chunk(n, c), _channel_block(n, c, s, x.itemsize, 1))


# -- address-level entry points: the same kernels on raw addresses, unchecked --------------------
# For a caller that has validated its tensors (fastnorm's eager path): at the MNIST MLP's sizes a
# NumPy view per tensor (~1.5 µs), the entry points' checks and Numba's typing of array arguments
# cost as much as the kernels themselves. Arguments: ``like`` a scalar of the data's storage type
# (uint16 for bfloat16 bits, int16 for float16 bits) and ``like_c`` one of the compute dtype (it
# types the pointers), then int64 addresses (0 for an absent per-channel array), then the
# (N, C, S) geometry as the array entry points see it; ``plan`` is :func:`plan` of the shape.

_at, _vector_at = at, vector_at


_forward_train_serial, _forward_train_parallel = _forward_train.serial, _forward_train.parallel
_forward_eval_serial, _forward_eval_parallel = _forward_eval.serial, _forward_eval.parallel
_backward_serial, _backward_parallel = _backward.serial, _backward.parallel
_stats_serial, _stats_parallel = _stats.serial, _stats.parallel


@njit(cache=True, nogil=True)
def forward_train_at(like, like_c, x, weight, bias, running_mean, running_var, y, save_mean, save_invstd,
                     n, c, s, momentum, eps, parallel, rows_per_chunk, block):  # fmt: skip
    xa, ya = _at(x, like, (n, c, s)), _at(y, like, (n, c, s))
    w, b = _vector_at(weight, like_c, c), _vector_at(bias, like_c, c)
    rm, rv = _vector_at(running_mean, like_c, c), _vector_at(running_var, like_c, c)
    sm, si = _at(save_mean, like_c, c), _at(save_invstd, like_c, c)
    if parallel:
        _forward_train_parallel(xa, w, b, weight != 0, bias != 0, rm, rv, running_mean != 0, momentum, eps,
                                ya, sm, si, rows_per_chunk, block)  # fmt: skip
    else:
        _forward_train_serial(xa, w, b, weight != 0, bias != 0, rm, rv, running_mean != 0, momentum, eps,
                              ya, sm, si, rows_per_chunk, block)  # fmt: skip


@njit(cache=True, nogil=True)
def forward_eval_at(like, like_c, x, weight, bias, running_mean, running_var, y, n, c, s, eps, parallel,
                    rows_per_chunk):  # fmt: skip
    xa, ya = _at(x, like, (n, c, s)), _at(y, like, (n, c, s))
    w, b = _vector_at(weight, like_c, c), _vector_at(bias, like_c, c)
    rm, rv = _at(running_mean, like_c, c), _at(running_var, like_c, c)
    if parallel:
        _forward_eval_parallel(xa, w, b, weight != 0, bias != 0, rm, rv, eps, ya, rows_per_chunk)
    else:
        _forward_eval_serial(xa, w, b, weight != 0, bias != 0, rm, rv, eps, ya, rows_per_chunk)


@njit(cache=True, nogil=True)
def backward_at(like, like_c, dy, x, mean, invstd, weight, training, dx, dweight, dbias, n, c, s, parallel,
                rows_per_chunk, block):  # fmt: skip
    """dx, dweight, dbias: addresses, 0 for a gradient not wanted."""
    dya, xa = _at(dy, like, (n, c, s)), _at(x, like, (n, c, s))
    m, inv, w = _at(mean, like_c, c), _at(invstd, like_c, c), _vector_at(weight, like_c, c)
    dxa = _at(dx if dx != 0 else dy, like, (n, c, s))  # unused when dx is not wanted
    dw, db = _vector_at(dweight, like_c, c), _vector_at(dbias, like_c, c)
    need_dx = dx != 0
    need_sums = (need_dx and training) or dweight != 0 or dbias != 0
    if parallel:
        _backward_parallel(dya, xa, m, inv, w, weight != 0, training, need_sums, need_dx, dxa, dw, db,
                           rows_per_chunk, block)  # fmt: skip
    else:
        _backward_serial(dya, xa, m, inv, w, weight != 0, training, need_sums, need_dx, dxa, dw, db,
                         rows_per_chunk, block)  # fmt: skip


def plan(n: int, c: int, s: int, itemsize: int, threads: int | None = None) -> tuple[bool, int, int, int]:
    """(parallel, rows_per_chunk, forward block, backward block) of an (N, C, S) problem: what the
    array entry points compute per call, for the address-level ones (a caller may keep it for a
    shape; it reads the module's tunables now, and the thread count: ``threads``, Numba's count
    for the calling thread when the caller has just read it, else ``numba.get_num_threads()``)."""
    if threads is None:
        threads = numba.get_num_threads()
    parallel = n * c * s >= _jit.PARALLEL_MIN_ELEMENTS and threads > 1
    return (parallel, _rows_per_chunk(n, c), _channel_block(n, c, s, itemsize, 1),
            _channel_block(n, c, s, itemsize, 2))  # fmt: skip


@njit(cache=True, nogil=True)
def stats_at(like, x, mean, var, n, c, s, parallel, rows_per_chunk, block):
    """Per-channel mean and biased variance of (N, C, S) x into float64 (C,) mean and var."""
    xa = _at(x, like, (n, c, s))
    m, v = _at(mean, np.float64(0), c), _at(var, np.float64(0), c)
    if parallel:
        _stats_parallel(xa, m, v, rows_per_chunk, block)
    else:
        _stats_serial(xa, m, v, rows_per_chunk, block)


# -- C entry points: the address-level kernels as C functions, for callers outside Python --------
# fastnorm's C++ ops (fastnorm/csrc/batch_norm.cpp) call these through their addresses, so that
# a BatchNorm runs no Python between the op and the kernels. One C function per (entry point,
# storage dtype), compiled (or loaded from Numba's cache) the first time it is asked for: all
# addresses and sizes are int64, flags int64 0/1, momentum and eps doubles. Signatures (argument
# order as the *_at functions above):
#   void forward_train(int64 x, weight, bias, running_mean, running_var, y, save_mean,
#                      save_invstd, n, c, s, double momentum, double eps,
#                      int64 parallel, rows_per_chunk, block)
#   void forward_eval(int64 x, weight, bias, running_mean, running_var, y, n, c, s,
#                     double eps, int64 parallel, rows_per_chunk)
#   void backward(int64 dy, x, mean, invstd, weight, training, dx, dweight, dbias,
#                 n, c, s, parallel, rows_per_chunk, block)
#   void stats(int64 x, mean, var, n, c, s, parallel, rows_per_chunk, block)   (float32, float64)

_I64, _F64 = types.int64, types.float64
#: entry point -> (C signature, arguments, the call of its *_at function with like-scalars L, LC)
_C_ENTRY_POINTS = {
    "forward_train": (
        types.void(*[_I64] * 11, _F64, _F64, *[_I64] * 3),
        "x, weight, bias, running_mean, running_var, y, save_mean, save_invstd, n, c, s, momentum, eps, parallel, "
        "rows_per_chunk, block",
        "forward_train_at(L, LC, x, weight, bias, running_mean, running_var, y, save_mean, save_invstd, n, c, s, "
        "momentum, eps, parallel != 0, rows_per_chunk, block)",
    ),
    "forward_eval": (
        types.void(*[_I64] * 9, _F64, _I64, _I64),
        "x, weight, bias, running_mean, running_var, y, n, c, s, eps, parallel, rows_per_chunk",
        "forward_eval_at(L, LC, x, weight, bias, running_mean, running_var, y, n, c, s, eps, parallel != 0, "
        "rows_per_chunk)",
    ),
    "backward": (
        types.void(*[_I64] * 15),
        "dy, x, mean, invstd, weight, training, dx, dweight, dbias, n, c, s, parallel, rows_per_chunk, block",
        "backward_at(L, LC, dy, x, mean, invstd, weight, training != 0, dx, dweight, dbias, n, c, s, parallel != 0, "
        "rows_per_chunk, block)",
    ),
    "stats": (
        types.void(*[_I64] * 9),
        "x, mean, var, n, c, s, parallel, rows_per_chunk, block",
        "stats_at(L, x, mean, var, n, c, s, parallel != 0, rows_per_chunk, block)",
    ),
}
#: the storage dtypes each entry point has (the statistics SyncBatchNorm merges: float32, float64)
C_ENTRY_DTYPES = {"forward_train": tuple(C_DTYPES), "forward_eval": tuple(C_DTYPES), "backward": tuple(C_DTYPES),
                  "stats": ("float32", "float64")}  # fmt: skip


_c_function, c_entry_point, c_entry_point_cached = entry_points(globals(), _C_ENTRY_POINTS, C_ENTRY_DTYPES)
