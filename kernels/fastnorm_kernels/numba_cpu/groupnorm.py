"""Group Normalization on CPU threads with Numba: forward and backward, contiguous and channels-last.

The math is kernels/fastnorm_kernels/reference/groupnorm.py's (the readable version these kernels are tested
against); conventions are PyTorch's (``torch.nn.GroupNorm``). G groups of C/G consecutive
channels; each (sample n, group g) is normalised over its D = C/G * S values.

Algorithm
---------
planes (contiguous (N, C, S) storage): a (sample, group) is one contiguous block of D values.
    A parallel loop over the N*G blocks; per block (in L1/L2 after the first pass):
    forward  pass 1 mean (a sum of x - K, K the group's first value if finite, else 0),
             pass 2 var = sum((x - mean)^2) / D (two passes: no cancellation),
             pass 3 y = (x - mean) * (rstd * weight[c]) + bias[c];
    backward pass 1 per channel S_dy[c] = sum(dy), S_dyx[c] = sum(dy * (x - mean)), then
             sum(g) = sum_c weight[c] S_dy[c] and sum(g (x - mean)) = sum_c weight[c] S_dyx[c],
             pass 2 dx = dy * rstd weight[c] + (x - mean) * k2 + k3 with
             k2 = -rstd^3 sum(g (x - mean)) / D, k3 = -rstd sum(g) / D.
rows (channels-last (N, S, C) storage, what a channels-last convolution gives): a group is C/G
    columns of every row of its sample. A parallel loop over samples; per sample, C-wide
    accumulators along each row (unit stride, vectorised): forward pass 1 the channels' sums ->
    group means, pass 2 the sums of (x - mean_g)^2 -> group variances, pass 3 y; backward pass 1
    S_dy[c], S_dyx[c], pass 2 dx. The input keeps its layout (torch's CPU GroupNorm does too;
    pytorch#111824 is about the GPU losing it).
dweight[c] = sum_n rstd[n, g] S_dyx[n, c] and dbias[c] = sum_n S_dy[n, c]: per-sample partials
    reduced in float64 in sample order after the loop (the thread count never changes a result).

Sums: planes in blocks of SUM_BLOCK values, each a vectorised reduction in the compute dtype
(float32 for float32 and 16-bit storage), the blocks' sums added in float64 (per (sample, group)
and per (sample, channel)); rows: C-wide float64 accumulators; across samples float64. Means,
rstd and the backward's coefficients are computed in float64 and rounded once. A group of any
size keeps the compute dtype's accuracy (one float32 sum over an 18.9M-value group drifted by
5e-3; torch's cascade sum 8e-7), at one float64 add per block.
NaN and Inf propagate as in torch (no nnan/ninf fast-math flags).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange, types

from .. import GROUP_NORM_API
from .._bits import HALF_DTYPES
from .._validate import FLOAT_DTYPES, compute_dtype
from ._bits import cast_like, narrow, widen
from ._cfuncs import at, entry_points, vector_at
from ._jit import REASSOC, twins

__all__ = [*GROUP_NORM_API, "GROUP_NORM_DTYPES"]

#: storage dtypes: float32, float64, float16 and bfloat16 (uint16 bits); 16-bit ones computed in float32
GROUP_NORM_DTYPES = (*FLOAT_DTYPES, *HALF_DTYPES)


#: Values of a plane summed in the compute dtype before the sum joins its (sample, group)'s float64
#: total: a vectorised float32 reduction in cache (error ~1e-7 of the block's sum), blocks and
#: planes add in float64, so a group of any size keeps float32 accuracy (a float32 sum over an
#: 18.9M-value group drifted by 5e-3). Planes up to this long are one block.
SUM_BLOCK = 4096


@njit(inline="always")
def _block_sum(xb, mu, square, zero):
    """sum(x - mu), or sum((x - mu)^2) when ``square``, over xb in the compute dtype (``zero``'s)."""
    t = zero
    for j in range(xb.size):
        v = widen(xb[j]) - mu
        t += v * v if square else v
    return t


@njit(inline="always")
def _plane_sum(xp, mu, square, zero, blocked):
    """:func:`_block_sum` over a plane as float64: in one block, or (``blocked``, a constant at
    each call) in blocks of SUM_BLOCK values whose sums add in float64. Blocks are slices, loops
    over them from 0: a loop from an offset j0 does not vectorise (Numba cannot tell its indices
    are never negative)."""
    if not blocked:
        return np.float64(_block_sum(xp, mu, square, zero))
    t = 0.0
    for j0 in range(0, xp.size, SUM_BLOCK):
        t += np.float64(_block_sum(xp[j0 : j0 + SUM_BLOCK], mu, square, zero))
    return t


@njit(inline="always")
def _block_grad_sums(gb, xb, mu, zero):
    """sum(dy) and sum(dy * (x - mu)) over a plane or a block of one, in the compute dtype."""
    t1 = zero
    t2 = zero
    for j in range(xb.size):
        w = widen(gb[j])
        t1 += w
        t2 += w * (widen(xb[j]) - mu)
    return t1, t2


@njit(inline="always")
def _plane_grad_sums(gp, xp, mu, zero, blocked):
    """:func:`_block_grad_sums` over a plane as float64, blocked as :func:`_plane_sum`."""
    if not blocked:
        t1, t2 = _block_grad_sums(gp, xp, mu, zero)
        return np.float64(t1), np.float64(t2)
    a1 = 0.0
    a2 = 0.0
    for j0 in range(0, xp.size, SUM_BLOCK):
        t1, t2 = _block_grad_sums(gp[j0 : j0 + SUM_BLOCK], xp[j0 : j0 + SUM_BLOCK], mu, zero)
        a1 += np.float64(t1)
        a2 += np.float64(t2)
    return a1, a2


@njit(inline="always")
def _group_forward(x, weight, bias, has_weight, has_bias, groups, eps, y, mean, rstd, q, blocked):
    """Block q = (n, g) of the planes layout: its mean, rstd and y."""
    C, S = x.shape[1], x.shape[2]
    cg = C // groups
    zero = cast_like(0.0, eps)
    n = q // groups
    c0 = (q - n * groups) * cg
    shift = widen(x[n, c0, 0])  # the mean's sum is of x - shift: the group's first value if finite
    shift = shift if math.isfinite(shift) else zero
    s = 0.0  # float64: the planes' sums
    for c in range(c0, c0 + cg):
        s += _plane_sum(x[n, c], shift, False, zero, blocked)
    mu = cast_like(np.float64(shift) + s / (cg * S), eps)
    v = 0.0
    for c in range(c0, c0 + cg):
        v += _plane_sum(x[n, c], mu, True, zero, blocked)
    inv = cast_like(1.0 / math.sqrt(v / (cg * S) + np.float64(eps)), eps)
    mean[q] = mu
    rstd[q] = inv
    for c in range(c0, c0 + cg):
        a = inv * weight[c] if has_weight else inv
        b = bias[c] if has_bias else zero
        xp = x[n, c]
        yp = y[n, c]
        for j in range(S):
            yp[j] = narrow((widen(xp[j]) - mu) * a + b, y)


@njit(inline="always")
def _group_backward(dy, x, mean, rstd, weight, has_weight, groups, need_dx, dx, p_dy, p_dyx, q, blocked):
    """Block q = (n, g) of the planes layout: its channels' sums into p_dy, p_dyx (float64), and dx."""
    C, S = x.shape[1], x.shape[2]
    cg = C // groups
    zero = cast_like(0.0, rstd[q])
    n = q // groups
    c0 = (q - n * groups) * cg
    mu = mean[q]
    inv = rstd[q]
    sum_g = 0.0  # float64, as the planes' sums
    sum_gx = 0.0
    for c in range(c0, c0 + cg):
        a1, a2 = _plane_grad_sums(dy[n, c], x[n, c], mu, zero, blocked)
        p_dy[n, c] = a1
        p_dyx[n, c] = a2
        wc = np.float64(weight[c]) if has_weight else 1.0
        sum_g += wc * a1
        sum_gx += wc * a2
    if need_dx:
        inv64 = np.float64(inv)
        k2 = cast_like(-inv64 * inv64 * inv64 * sum_gx / (cg * S), inv)
        k3 = cast_like(-inv64 * sum_g / (cg * S), inv)
        for c in range(c0, c0 + cg):
            k1 = inv * weight[c] if has_weight else inv
            xp = x[n, c]
            gp = dy[n, c]
            op = dx[n, c]
            for j in range(S):
                op[j] = narrow(widen(gp[j]) * k1 + (widen(xp[j]) - mu) * k2 + k3, dx)


@twins(fastmath=REASSOC)
def _forward(x, weight, bias, has_weight, has_bias, groups, eps, channels_last, y, mean, rstd):
    # x, y: (N, C, S) (planes) or (N, S, C) (rows: channels_last); weight, bias: (C,) compute
    # dtype or empty; mean, rstd: (N*G,) compute dtype; eps: a compute-dtype scalar
    N = x.shape[0]
    zero = cast_like(0.0, eps)
    if not channels_last:
        # two loops, the choice outside them: a block loop inside the planes' loops, even of one
        # block, cost 6-11% at 196-value planes (measured)
        if x.shape[2] <= SUM_BLOCK:
            for q in prange(N * groups):
                _group_forward(x, weight, bias, has_weight, has_bias, groups, eps, y, mean, rstd, q, False)
        else:
            for q in prange(N * groups):
                _group_forward(x, weight, bias, has_weight, has_bias, groups, eps, y, mean, rstd, q, True)
    else:
        S, C = x.shape[1], x.shape[2]
        cg = C // groups
        for n in prange(N):
            xs = x[n]
            ys = y[n]
            s1 = np.zeros(C, np.float64)
            for j in range(S):
                row = xs[j]
                for c in range(C):
                    s1[c] += np.float64(widen(row[c]))
            m = np.empty(C, rstd.dtype)  # each channel's group mean, then its scale and shift
            for g in range(groups):
                t = 0.0
                for c in range(g * cg, (g + 1) * cg):
                    t += s1[c]
                mu = cast_like(t / np.float64(cg * S), eps)
                mean[n * groups + g] = mu
                for c in range(g * cg, (g + 1) * cg):
                    m[c] = mu
            s2 = np.zeros(C, np.float64)
            for j in range(S):
                row = xs[j]
                for c in range(C):
                    d = np.float64(widen(row[c]) - m[c])
                    s2[c] += d * d
            a = np.empty(C, rstd.dtype)
            b = np.empty(C, rstd.dtype)
            for g in range(groups):
                t = 0.0
                for c in range(g * cg, (g + 1) * cg):
                    t += s2[c]
                inv = cast_like(1.0 / math.sqrt(t / np.float64(cg * S) + np.float64(eps)), eps)
                rstd[n * groups + g] = inv
                for c in range(g * cg, (g + 1) * cg):
                    a[c] = inv * weight[c] if has_weight else inv
                    b[c] = bias[c] if has_bias else zero
            for j in range(S):
                row = xs[j]
                out = ys[j]
                for c in range(C):
                    out[c] = narrow((widen(row[c]) - m[c]) * a[c] + b[c], y)


@twins(fastmath=REASSOC)
def _backward(dy, x, mean, rstd, weight, has_weight, groups, channels_last, need_dx, need_params, dx, dweight,
              dbias):  # fmt: skip
    # dy, x, dx: (N, C, S) or (N, S, C) (channels_last); mean, rstd: (N*G,); weight: (C,) or
    # empty; dweight, dbias: (C,) compute dtype or empty
    N = x.shape[0]
    C = x.shape[2] if channels_last else x.shape[1]
    cg = C // groups
    p_dy = np.zeros((N, C), np.float64)  # per sample and channel: sum(dy), sum(dy * (x - mean))
    p_dyx = np.zeros((N, C), np.float64)
    if not channels_last:
        if x.shape[2] <= SUM_BLOCK:  # two loops, the choice outside them (as the forward's)
            for q in prange(N * groups):
                _group_backward(dy, x, mean, rstd, weight, has_weight, groups, need_dx, dx, p_dy, p_dyx, q, False)
        else:
            for q in prange(N * groups):
                _group_backward(dy, x, mean, rstd, weight, has_weight, groups, need_dx, dx, p_dy, p_dyx, q, True)
    else:
        S = x.shape[1]
        for n in prange(N):
            m = np.empty(C, rstd.dtype)
            for c in range(C):
                m[c] = mean[n * groups + c // cg]
            a1 = p_dy[n]
            a2 = p_dyx[n]
            xs = x[n]
            gs = dy[n]
            for j in range(S):
                row = xs[j]
                grow = gs[j]
                for c in range(C):
                    w = widen(grow[c])
                    a1[c] += np.float64(w)
                    a2[c] += np.float64(w * (widen(row[c]) - m[c]))
            if need_dx:
                k1 = np.empty(C, rstd.dtype)
                k2 = np.empty(C, rstd.dtype)
                k3 = np.empty(C, rstd.dtype)
                for g in range(groups):
                    inv = rstd[n * groups + g]
                    sum_g = 0.0
                    sum_gx = 0.0
                    for c in range(g * cg, (g + 1) * cg):
                        wc = np.float64(weight[c]) if has_weight else 1.0
                        sum_g += wc * a1[c]
                        sum_gx += wc * a2[c]
                    inv64 = np.float64(inv)
                    g2 = cast_like(-inv64 * inv64 * inv64 * sum_gx / (cg * S), inv)
                    g3 = cast_like(-inv64 * sum_g / (cg * S), inv)
                    for c in range(g * cg, (g + 1) * cg):
                        k1[c] = inv * weight[c] if has_weight else inv
                        k2[c] = g2
                        k3[c] = g3
                outs = dx[n]
                for j in range(S):
                    row = xs[j]
                    grow = gs[j]
                    out = outs[j]
                    for c in range(C):
                        out[c] = narrow(widen(grow[c]) * k1[c] + (widen(row[c]) - m[c]) * k2[c] + k3[c], dx)
    if need_params:
        for c in range(C):
            sw = 0.0
            sb = 0.0
            for n in range(N):
                sw += np.float64(rstd[n * groups + c // cg]) * p_dyx[n, c]
                sb += p_dy[n, c]
            if dweight.size:
                dweight[c] = sw
            if dbias.size:
                dbias[c] = sb


# -- array entry points: the kernels API (same names and arguments as fastnorm_kernels.reference) --------

_EMPTY = {np.dtype(np.float32): np.empty(0, np.float32), np.dtype(np.float64): np.empty(0, np.float64)}


def _or_empty(a, dtype):
    return _EMPTY[compute_dtype(dtype)] if a is None else a


def _bits(a):
    return a.view(np.int16) if a is not None and a.dtype == np.float16 else a


def _check(x, groups, outputs, per_group, per_channel):
    dtype = np.dtype(getattr(x, "dtype", None) or np.object_)
    if dtype not in GROUP_NORM_DTYPES:
        raise TypeError(f"the numba backend's group norm takes float32, float64, float16 or bfloat16, got {dtype}")
    if x.ndim != 3 or not x.flags.c_contiguous or x.shape[1] % groups:
        raise ValueError(f"kernels take C-contiguous (N, C, S) arrays with C divisible by {groups}, got {x.shape}")
    for a in outputs:
        if a is not None and (a.shape != x.shape or a.dtype != dtype or not a.flags.c_contiguous):
            raise ValueError(f"expected a C-contiguous {dtype} array of shape {x.shape}")
    compute = compute_dtype(dtype)
    for n, arrays in ((x.shape[0] * groups, per_group), (x.shape[1], per_channel)):
        for a in arrays:
            if a is not None and (a.shape != (n,) or a.dtype != compute or not a.flags.c_contiguous):
                raise ValueError(f"per-group and per-channel arrays must be dense {compute} of shape ({n},)")


def group_norm_forward(x, weight, bias, groups, eps, y, mean, rstd):
    """GroupNorm forward on (N, C, S) arrays; see fastnorm_kernels.reference.group_norm_forward."""
    _check(x, groups, [y], [mean, rstd], [weight, bias])
    c = compute_dtype(x.dtype).type
    _forward(x.size)(_bits(x), _or_empty(weight, x.dtype), _or_empty(bias, x.dtype), weight is not None,
                     bias is not None, groups, c(eps), False, _bits(y), mean, rstd)  # fmt: skip


def group_norm_backward(dy, x, mean, rstd, weight, groups, dx, dweight, dbias):
    """GroupNorm backward on (N, C, S) arrays; see fastnorm_kernels.reference.group_norm_backward."""
    _check(x, groups, [dy, dx], [mean, rstd], [weight, dweight, dbias])
    _backward(x.size)(_bits(dy), _bits(x), mean, rstd, _or_empty(weight, x.dtype), weight is not None, groups,
                      False, dx is not None, dweight is not None or dbias is not None,
                      _bits(dy if dx is None else dx), _or_empty(dweight, x.dtype),
                      _or_empty(dbias, x.dtype))  # fmt: skip


# -- address-level entry points and their C functions (fastnorm/csrc/group_norm.cpp) ----------
# As kernels/fastnorm_kernels/numba_cpu/batchnorm.py's. Geometry (n, c, s, groups); channels_last: x, y, dy, dx
# are (N, S, C) in memory. C signatures:
#   void forward(int64 x, weight, bias, y, mean, rstd, n, c, s, groups, double eps,
#                int64 channels_last, parallel)
#   void backward(int64 dy, x, mean, rstd, weight, dx, dweight, dbias, n, c, s, groups,
#                 channels_last, parallel)

_at, _vector_at = at, vector_at


_forward_serial, _forward_parallel = _forward.serial, _forward.parallel
_backward_serial, _backward_parallel = _backward.serial, _backward.parallel


@njit(cache=True, nogil=True)
def forward_at(like, like_c, x, weight, bias, y, mean, rstd, n, c, s, groups, eps, channels_last, parallel):
    shape = (n, s, c) if channels_last else (n, c, s)
    xa, ya = _at(x, like, shape), _at(y, like, shape)
    w, b = _vector_at(weight, like_c, c), _vector_at(bias, like_c, c)
    mu, inv = _at(mean, like_c, n * groups), _at(rstd, like_c, n * groups)
    eps_c = cast_like(eps, like_c)
    if parallel:
        _forward_parallel(xa, w, b, weight != 0, bias != 0, groups, eps_c, channels_last, ya, mu, inv)
    else:
        _forward_serial(xa, w, b, weight != 0, bias != 0, groups, eps_c, channels_last, ya, mu, inv)


@njit(cache=True, nogil=True)
def backward_at(like, like_c, dy, x, mean, rstd, weight, dx, dweight, dbias, n, c, s, groups, channels_last,
                parallel):  # fmt: skip
    shape = (n, s, c) if channels_last else (n, c, s)
    dya, xa = _at(dy, like, shape), _at(x, like, shape)
    mu, inv = _at(mean, like_c, n * groups), _at(rstd, like_c, n * groups)
    w = _vector_at(weight, like_c, c)
    dxa = _at(dx if dx != 0 else dy, like, shape)
    dw, db = _vector_at(dweight, like_c, c), _vector_at(dbias, like_c, c)
    need_params = dweight != 0 or dbias != 0
    if parallel:
        _backward_parallel(dya, xa, mu, inv, w, weight != 0, groups, channels_last, dx != 0, need_params, dxa, dw,
                           db)  # fmt: skip
    else:
        _backward_serial(dya, xa, mu, inv, w, weight != 0, groups, channels_last, dx != 0, need_params, dxa, dw,
                         db)  # fmt: skip


_I64, _F64 = types.int64, types.float64
_C_ENTRY_POINTS = {
    "group_norm_forward": (
        types.void(*[_I64] * 10, _F64, _I64, _I64),
        "x, weight, bias, y, mean, rstd, n, c, s, groups, eps, channels_last, parallel",
        "forward_at(L, LC, x, weight, bias, y, mean, rstd, n, c, s, groups, eps, channels_last != 0, parallel != 0)",
    ),
    "group_norm_backward": (
        types.void(*[_I64] * 14),
        "dy, x, mean, rstd, weight, dx, dweight, dbias, n, c, s, groups, channels_last, parallel",
        "backward_at(L, LC, dy, x, mean, rstd, weight, dx, dweight, dbias, n, c, s, groups, channels_last != 0, "
        "parallel != 0)",
    ),
}


_c_function, c_entry_point, c_entry_point_cached = entry_points(globals(), _C_ENTRY_POINTS)
