"""Layer Normalization and RMS Normalization on CPU threads with Numba: one kernel per direction
for both (``center``: LayerNorm subtracts the row mean, RMSNorm does not).

The math is kernels/fastnorm_kernels/reference/layernorm.py's (the readable version these kernels are tested
against); conventions are PyTorch's (``torch.nn.LayerNorm``, ``torch.nn.RMSNorm``).

Algorithm
---------
Inputs arrive as C-contiguous (M, D) arrays: M rows (every dim before ``normalized_shape``), each
normalised over its D contiguous values (the ``normalized_shape``). The rows are cut into at most
MAX_CHUNKS chunks (a function of the shape only, never of the thread count, so results do not
depend on it); a parallel loop runs over chunks, each chunk over its rows one by one.

Forward, per row (three passes over a row that stays in L1/L2 after the first, one DRAM read of x
and one write of y):
    pass 1 (LayerNorm): mean = K + sum(x - K) / D, K the row's first value (0 if not finite): a
            sum of deviations, not of values, loses nothing to a large |mean| (a float32 sum of
            x ~ N(3, 1) put y 3 ulps off at D = 15)
    pass 2: var = sum((x - mean)^2) / D (RMSNorm: mean = 0, the mean of x^2): two passes, not
            E[x^2] - E[x]^2, so no cancellation when |mean| >> std
    pass 3: y = (x - mean) * rstd * weight + bias,  rstd = 1 / sqrt(var + eps)
Sums are blocked: each SUM_BLOCK values of a row are one vectorised reduction in the compute
dtype (float32 for float32 and 16-bit storage, float64 for float64; several vector accumulators
of a few dozen values each), and a longer row's blocks' sums add in float64. So a row of any
length keeps the compute dtype's accuracy, where one float32 sum along the row drifts (9.4M
values: 2e-4 off, torch's cascade sum 1e-6), at the cost of a horizontal add and a float64 add
per block of a long row; rows of at most one block are summed all in the compute dtype
(bench/results/accuracy.md). The kernels hold two row loops, for rows of one block and of
several, chosen outside them.

Backward, per row, with xhat = (x - mean) * rstd and g = dy * weight:
    pass 1: S_g = sum(g), S_gx = sum(g * xhat) (blocked as the forward's)
    pass 2: dx = rstd * (g - S_g / D - xhat * S_gx / D)  (RMSNorm: no S_g term), and the row's
            dy * xhat and dy added to its unit's (D,) partial sums of dweight and dbias (the
            compute dtype; a unit: a chunk, or a part of it: PARAM_SUM_ROWS and PARAM_UNITS)
then the units' partials are added in float64, in order.

NaN and Inf propagate as in torch (no nnan/ninf fast-math flags).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange, types

from .. import LAYER_NORM_API
from .._bits import HALF_DTYPES
from .._validate import FLOAT_DTYPES, compute_dtype
from . import batchnorm as _bn
from ._bits import cast_like, narrow, widen
from ._cfuncs import at, entry_points, vector_at
from ._jit import REASSOC, twins

# the package re-exports these; the address-level entry points and C functions stay in this module
# (fastnorm_kernels.numba_cpu.layernorm.c_entry_point): their names are batchnorm's too
__all__ = [*LAYER_NORM_API, "LAYER_NORM_DTYPES"]

#: storage dtypes: float32, float64, float16 and bfloat16 (uint16 bits); 16-bit ones computed in float32
LAYER_NORM_DTYPES = (*FLOAT_DTYPES, *HALF_DTYPES)


#: Values of a row summed in the compute dtype before the sum joins the row's float64 total: each
#: block is a vectorised reduction in cache (several vector accumulators of a few dozen values
#: each: error ~1e-7 of the block's sum in float32), the blocks add in float64, so a row of any
#: length keeps float32 accuracy (one float32 sum along a 9.4M-value row drifted by 2e-4). Rows of
#: at most one block are summed all in the compute dtype (float64 between the passes of a row cost
#: ~20% of its statistics at 64x256 bfloat16, measured).
SUM_BLOCK = 4096
#: Rows whose dweight / dbias contributions add up in the compute dtype (vectorised along D)
#: before the float64 sum over such units: the backward's parallel loop runs over units (a chunk,
#: or a part of one) of at most PARAM_SUM_ROWS rows and 2 * sqrt(M) rows, and at least
#: PARAM_UNITS units. Against torch's error, a float32 run's grows like its rows / sqrt(M): runs of
#: 250 rows at M = 1000 were 2.8x torch's error (torch sums these accurately), runs of 256 rows at
#: M = 65535 within it. Shorter units than needed cost: 64-row units instead of 128-row chunks made
#: the 8192x4096 bfloat16 backward ~5% slower on 2 threads (their float32 partials are large
#: beside bfloat16 rows).
PARAM_SUM_ROWS = 256
PARAM_UNITS = 4


def rows_per_chunk(m: int, d: int) -> int:
    """Rows per chunk of an (M, D) problem (the shape alone decides: thread-count independent):
    at most batchnorm.MAX_CHUNKS chunks of at least batchnorm.CHUNK_ELEMENTS elements, the
    BatchNorm kernels' tunables (one set for the ops); the backward cuts them further into units
    (PARAM_SUM_ROWS, PARAM_UNITS)."""
    chunks = max(1, min(_bn.MAX_CHUNKS, (m * d) // _bn.CHUNK_ELEMENTS, m))
    return -(-m // chunks)


@njit(inline="always")
def _block_sum(xb, mu, square, zero):
    """sum(x - mu), or sum((x - mu)^2) when ``square``, over xb (a row or a block of one), in the
    compute dtype (``zero``'s)."""
    t = zero
    for j in range(xb.size):
        v = widen(xb[j]) - mu
        t += v * v if square else v
    return t


@njit(inline="always")
def _row_mean(xi, shift, zero, inv_d, blocked):
    """The mean of a row, in the compute dtype: shift + sum(x - shift) / D, the sum in one block
    (times inv_d, 1/D in the compute dtype) or (``blocked``, a constant at each call) in blocks of
    SUM_BLOCK values added in float64. The blocks are slices, looped over from 0: a loop from an
    offset j0 does not vectorise (Numba cannot tell its indices are never negative)."""
    if blocked:
        s = 0.0
        for j0 in range(0, xi.size, SUM_BLOCK):
            s += np.float64(_block_sum(xi[j0 : j0 + SUM_BLOCK], shift, False, zero))
        mu = cast_like(np.float64(shift) + s / xi.size, zero)
    else:
        mu = shift + _block_sum(xi, shift, False, zero) * inv_d
    return mu


@njit(inline="always")
def _row_var(xi, mu, zero, inv_d, blocked):
    """sum((x - mu)^2) / D over a row, in the compute dtype, blocked as :func:`_row_mean`."""
    if blocked:
        q = 0.0
        for j0 in range(0, xi.size, SUM_BLOCK):
            q += np.float64(_block_sum(xi[j0 : j0 + SUM_BLOCK], mu, True, zero))
        var = cast_like(q / xi.size, zero)
    else:
        var = _block_sum(xi, mu, True, zero) * inv_d
    return var


@njit(inline="always")
def _block_grad_sums(gb, xb, wb, has_weight, mu, inv, zero, one):
    """sum(g) and sum(g * xhat) over a row or a block of one, in the compute dtype:
    g = dy * weight, xhat = (x - mu) * inv (wb empty without weight)."""
    t_g = zero
    t_gx = zero
    for j in range(xb.size):
        g = widen(gb[j]) * (wb[j] if has_weight else one)
        t_g += g
        t_gx += g * ((widen(xb[j]) - mu) * inv)
    return t_g, t_gx


@njit(inline="always")
def _row_grad_means(gi, xi, weight, has_weight, mu, inv, zero, one, inv_d, blocked):
    """sum(g) / D and sum(g * xhat) / D over a row, in the compute dtype, blocked as :func:`_row_mean`."""
    if blocked:
        s_g = 0.0
        s_gx = 0.0
        for j0 in range(0, xi.size, SUM_BLOCK):
            j1 = j0 + SUM_BLOCK
            t_g, t_gx = _block_grad_sums(gi[j0:j1], xi[j0:j1], weight[j0:j1], has_weight, mu, inv, zero, one)
            s_g += np.float64(t_g)
            s_gx += np.float64(t_gx)
        a = cast_like(s_g / xi.size, zero)
        b = cast_like(s_gx / xi.size, zero)
    else:
        t_g, t_gx = _block_grad_sums(gi, xi, weight, has_weight, mu, inv, zero, one)
        a = t_g * inv_d
        b = t_gx * inv_d
    return a, b


@njit(inline="always")
def _forward_rows(x, weight, bias, has_weight, has_bias, eps, inv_d, center, y, mean, rstd, start, end, blocked):
    """Rows start..end-1: their statistics and y. (Rows, not one row, per call: an inlined call
    per row with these array arguments cost ~30% at 64x256, measured.)"""
    D = x.shape[1]
    zero = cast_like(0.0, eps)
    one = cast_like(1.0, eps)
    for i in range(start, end):
        xi = x[i]
        yi = y[i]
        mu = zero
        if center:  # the mean's sum is of x - shift, the row's first value (if finite)
            shift = widen(xi[0])
            mu = _row_mean(xi, shift if math.isfinite(shift) else zero, zero, inv_d, blocked)
            mean[i] = mu
        inv = one / math.sqrt(_row_var(xi, mu, zero, inv_d, blocked) + eps)
        rstd[i] = inv
        if has_weight and has_bias:
            for j in range(D):
                yi[j] = narrow((widen(xi[j]) - mu) * inv * weight[j] + bias[j], y)
        elif has_weight:
            for j in range(D):
                yi[j] = narrow((widen(xi[j]) - mu) * inv * weight[j], y)
        elif has_bias:
            for j in range(D):
                yi[j] = narrow((widen(xi[j]) - mu) * inv + bias[j], y)
        else:
            for j in range(D):
                yi[j] = narrow((widen(xi[j]) - mu) * inv, y)


@twins(fastmath=REASSOC)
def _forward(x, weight, bias, has_weight, has_bias, eps, inv_d, center, y, mean, rstd, rows):
    # x, y: (M, D) storage; weight, bias: (D,) compute dtype or empty; mean, rstd: (M,) compute
    # dtype (mean empty for RMSNorm); eps, inv_d (1/D): compute-dtype scalars; rows: per chunk.
    # Two loops, the choice of rows of one block or of several outside them: that branch inside
    # the row loop cost up to 13% (the backward's dx loop, 64x256 bfloat16, measured)
    M, D = x.shape
    chunks = (M + rows - 1) // rows
    if D <= SUM_BLOCK:
        for k in prange(chunks):
            _forward_rows(x, weight, bias, has_weight, has_bias, eps, inv_d, center, y, mean, rstd, k * rows,
                          min((k + 1) * rows, M), False)  # fmt: skip
    else:
        for k in prange(chunks):
            _forward_rows(x, weight, bias, has_weight, has_bias, eps, inv_d, center, y, mean, rstd, k * rows,
                          min((k + 1) * rows, M), True)  # fmt: skip


#: columns of the (units, D) dweight / dbias partials merged per task of the merge's parallel loop
MERGE_COLUMNS = 512


@njit(inline="always")
def _merge_units(pw, pb, dweight, dbias):
    """dweight / dbias (or empty) = the float64 sums over units (rows of pw, pb), in unit order."""
    n = pw.shape[1]
    sw = np.zeros(n, np.float64)
    sb = np.zeros(n, np.float64)
    for k in range(pw.shape[0]):
        aw = pw[k]
        ab = pb[k]
        for j in range(n):
            sw[j] += np.float64(aw[j])
            sb[j] += np.float64(ab[j])
    for j in range(dweight.size):
        dweight[j] = sw[j]
    for j in range(dbias.size):
        dbias[j] = sb[j]


@twins(fastmath=REASSOC)
def _backward(dy, x, mean, rstd, weight, has_weight, center, inv_d, need_dx, need_params, dx, dweight, dbias,
              rows):  # fmt: skip
    # dy, x, dx: (M, D) storage; mean, rstd: (M,) (mean empty for RMSNorm); weight: (D,) or
    # empty; dweight, dbias: (D,) compute dtype or empty; inv_d: 1/D in the compute dtype
    M, D = x.shape
    # units (a chunk's rows, or a part of them: PARAM_SUM_ROWS): each sums its rows' dweight /
    # dbias contributions in the compute dtype, the units' sums then add in float64
    rows = min(rows, PARAM_SUM_ROWS, max(1, 2 * int(math.sqrt(M))), max(1, -(-M // PARAM_UNITS)))
    units = (M + rows - 1) // rows
    width = D if need_params else 0
    pw = np.zeros((units, width), dtype=rstd.dtype)  # per unit: sum of dy * xhat, of dy
    pb = np.zeros((units, width), dtype=rstd.dtype)
    zero = cast_like(0.0, inv_d)
    one = cast_like(1.0, inv_d)
    # Two loops, the choice outside them (as the forward's), the row loop written out in both: as an
    # inlined helper called per unit, its array arguments' reference counts (atomics on the same
    # arrays from every thread) cost 3-5% of the 4096x768 bfloat16 backward on 2 threads (measured)
    if D <= SUM_BLOCK:
        for k in prange(units):
            aw = pw[k]
            ab = pb[k]
            for i in range(k * rows, min((k + 1) * rows, M)):
                xi = x[i]
                gi = dy[i]
                inv = rstd[i]
                mu = mean[i] if center else zero
                if need_dx:
                    dxi = dx[i]
                    a, b = _row_grad_means(gi, xi, weight, has_weight, mu, inv, zero, one, inv_d, False)
                    if not center:
                        a = zero
                    # the branch outside the loops: inside it, the loop ran ~1.8x slower (8192x4096 float32)
                    if need_params:
                        for j in range(D):
                            xh = (widen(xi[j]) - mu) * inv
                            gy = widen(gi[j])
                            g = gy * (weight[j] if has_weight else one)
                            dxi[j] = narrow(inv * (g - a - xh * b), dx)
                            aw[j] += gy * xh
                            ab[j] += gy
                    else:
                        for j in range(D):
                            xh = (widen(xi[j]) - mu) * inv
                            g = widen(gi[j]) * (weight[j] if has_weight else one)
                            dxi[j] = narrow(inv * (g - a - xh * b), dx)
                elif need_params:
                    for j in range(D):
                        gy = widen(gi[j])
                        aw[j] += gy * ((widen(xi[j]) - mu) * inv)
                        ab[j] += gy
    else:
        for k in prange(units):
            aw = pw[k]
            ab = pb[k]
            for i in range(k * rows, min((k + 1) * rows, M)):
                xi = x[i]
                gi = dy[i]
                inv = rstd[i]
                mu = mean[i] if center else zero
                if need_dx:
                    dxi = dx[i]
                    a, b = _row_grad_means(gi, xi, weight, has_weight, mu, inv, zero, one, inv_d, True)
                    if not center:
                        a = zero
                    if need_params:
                        for j in range(D):
                            xh = (widen(xi[j]) - mu) * inv
                            gy = widen(gi[j])
                            g = gy * (weight[j] if has_weight else one)
                            dxi[j] = narrow(inv * (g - a - xh * b), dx)
                            aw[j] += gy * xh
                            ab[j] += gy
                    else:
                        for j in range(D):
                            xh = (widen(xi[j]) - mu) * inv
                            g = widen(gi[j]) * (weight[j] if has_weight else one)
                            dxi[j] = narrow(inv * (g - a - xh * b), dx)
                elif need_params:
                    for j in range(D):
                        gy = widen(gi[j])
                        aw[j] += gy * ((widen(xi[j]) - mu) * inv)
                        ab[j] += gy
    if need_params:  # the units' sums in float64, in unit order, in parallel over blocks of columns
        blocks = (D + MERGE_COLUMNS - 1) // MERGE_COLUMNS
        for q in prange(blocks):
            j0 = q * MERGE_COLUMNS
            _merge_units(pw[:, j0 : j0 + MERGE_COLUMNS], pb[:, j0 : j0 + MERGE_COLUMNS],
                         dweight[j0 : j0 + MERGE_COLUMNS], dbias[j0 : j0 + MERGE_COLUMNS])  # fmt: skip


# -- array entry points: the kernels API (same names and arguments as fastnorm_kernels.reference) --------

_EMPTY = {np.dtype(np.float32): np.empty(0, np.float32), np.dtype(np.float64): np.empty(0, np.float64)}


def _or_empty(a, dtype):
    return _EMPTY[compute_dtype(dtype)] if a is None else a


def _bits(a):
    """float16 arrays as int16 bits: the kernels' element type says the storage (_bits.widen)."""
    return a.view(np.int16) if a is not None and a.dtype == np.float16 else a


def _check(x, outputs, rows, columns):
    dtype = np.dtype(getattr(x, "dtype", None) or np.object_)
    if dtype not in LAYER_NORM_DTYPES:
        raise TypeError(f"the numba backend's layer/rms norm takes float32, float64, float16 or bfloat16, got {dtype}")
    if x.ndim != 2 or not x.flags.c_contiguous:
        raise ValueError(f"kernels take C-contiguous (M, D) arrays, got shape {x.shape}")
    for a in outputs:
        if a is not None and (a.shape != x.shape or a.dtype != dtype or not a.flags.c_contiguous):
            raise ValueError(f"expected a C-contiguous {dtype} array of shape {x.shape}")
    compute = compute_dtype(dtype)
    for n, arrays in ((x.shape[0], rows), (x.shape[1], columns)):
        for a in arrays:
            if a is not None and (a.shape != (n,) or a.dtype != compute or not a.flags.c_contiguous):
                raise ValueError(f"per-row and per-column arrays must be dense {compute} of shape ({n},)")


def _scalars(x, eps):
    c = compute_dtype(x.dtype).type
    return c(eps), c(1.0 / x.shape[1])


def layer_norm_forward(x, weight, bias, eps, y, mean, rstd):
    """LayerNorm forward; see fastnorm_kernels.reference.layer_norm_forward for the contract."""
    _check(x, [y], [mean, rstd], [weight, bias])
    m, d = x.shape
    eps_c, inv_d = _scalars(x, eps)
    _forward(x.size)(_bits(x), _or_empty(weight, x.dtype), _or_empty(bias, x.dtype), weight is not None,
                     bias is not None, eps_c, inv_d, True, _bits(y), mean, rstd, rows_per_chunk(m, d))  # fmt: skip


def layer_norm_backward(dy, x, mean, rstd, weight, dx, dweight, dbias):
    """LayerNorm backward; see fastnorm_kernels.reference.layer_norm_backward."""
    _check(x, [dy, dx], [mean, rstd], [weight, dweight, dbias])
    _run_backward(dy, x, mean, rstd, weight, True, dx, dweight, dbias)


def rms_norm_forward(x, weight, eps, y, rstd):
    """RMSNorm forward; see fastnorm_kernels.reference.rms_norm_forward."""
    _check(x, [y], [rstd], [weight])
    m, d = x.shape
    eps_c, inv_d = _scalars(x, eps)
    _forward(x.size)(_bits(x), _or_empty(weight, x.dtype), _or_empty(None, x.dtype), weight is not None, False,
                     eps_c, inv_d, False, _bits(y), _or_empty(None, x.dtype), rstd, rows_per_chunk(m, d))  # fmt: skip


def rms_norm_backward(dy, x, rstd, weight, dx, dweight):
    """RMSNorm backward; see fastnorm_kernels.reference.rms_norm_backward."""
    _check(x, [dy, dx], [rstd], [weight, dweight])
    _run_backward(dy, x, None, rstd, weight, False, dx, dweight, None)


def _run_backward(dy, x, mean, rstd, weight, center, dx, dweight, dbias):
    m, d = x.shape
    _, inv_d = _scalars(x, 0.0)
    need_params = dweight is not None or dbias is not None
    _backward(x.size)(_bits(dy), _bits(x), _or_empty(mean, x.dtype), rstd, _or_empty(weight, x.dtype),
                      weight is not None, center, inv_d, dx is not None, need_params,
                      _bits(dy if dx is None else dx), _or_empty(dweight, x.dtype), _or_empty(dbias, x.dtype),
                      rows_per_chunk(m, d))  # fmt: skip


# -- address-level entry points and their C functions (fastnorm/csrc/layer_norm.cpp) ----------
# As kernels/fastnorm_kernels/numba_cpu/batchnorm.py's: ``like`` a scalar of the storage type, ``like_c`` one of
# the compute dtype, then int64 addresses (0: absent), then the (M, D) geometry. C signatures:
#   void forward(int64 x, weight, bias, y, mean, rstd, m, d, double eps, int64 center, parallel, rows)
#   void backward(int64 dy, x, mean, rstd, weight, center, dx, dweight, dbias, m, d, parallel, rows)

_at, _vector_at = at, vector_at


_forward_serial, _forward_parallel = _forward.serial, _forward.parallel
_backward_serial, _backward_parallel = _backward.serial, _backward.parallel


@njit(cache=True, nogil=True)
def forward_at(like, like_c, x, weight, bias, y, mean, rstd, m, d, eps, center, parallel, rows):
    xa, ya = _at(x, like, (m, d)), _at(y, like, (m, d))
    w, b = _vector_at(weight, like_c, d), _vector_at(bias, like_c, d)
    mu, inv = _vector_at(mean, like_c, m), _at(rstd, like_c, m)
    eps_c, inv_d = cast_like(eps, like_c), cast_like(1.0 / d, like_c)
    if parallel:
        _forward_parallel(xa, w, b, weight != 0, bias != 0, eps_c, inv_d, center, ya, mu, inv, rows)
    else:
        _forward_serial(xa, w, b, weight != 0, bias != 0, eps_c, inv_d, center, ya, mu, inv, rows)


@njit(cache=True, nogil=True)
def backward_at(like, like_c, dy, x, mean, rstd, weight, center, dx, dweight, dbias, m, d, parallel, rows):
    """dx, dweight, dbias: addresses, 0 for a gradient not wanted."""
    dya, xa = _at(dy, like, (m, d)), _at(x, like, (m, d))
    mu, inv, w = _vector_at(mean, like_c, m), _at(rstd, like_c, m), _vector_at(weight, like_c, d)
    dxa = _at(dx if dx != 0 else dy, like, (m, d))  # unused when dx is not wanted
    dw, db = _vector_at(dweight, like_c, d), _vector_at(dbias, like_c, d)
    inv_d = cast_like(1.0 / d, like_c)
    need_params = dweight != 0 or dbias != 0
    if parallel:
        _backward_parallel(dya, xa, mu, inv, w, weight != 0, center, inv_d, dx != 0, need_params, dxa, dw, db, rows)
    else:
        _backward_serial(dya, xa, mu, inv, w, weight != 0, center, inv_d, dx != 0, need_params, dxa, dw, db, rows)


#: storage dtype name -> (the storage's like-scalar, the compute dtype's), as source
_I64, _F64 = types.int64, types.float64
_C_ENTRY_POINTS = {
    "row_norm_forward": (
        types.void(*[_I64] * 8, _F64, *[_I64] * 3),
        "x, weight, bias, y, mean, rstd, m, d, eps, center, parallel, rows",
        "forward_at(L, LC, x, weight, bias, y, mean, rstd, m, d, eps, center != 0, parallel != 0, rows)",
    ),
    "row_norm_backward": (
        types.void(*[_I64] * 13),
        "dy, x, mean, rstd, weight, center, dx, dweight, dbias, m, d, parallel, rows",
        "backward_at(L, LC, dy, x, mean, rstd, weight, center != 0, dx, dweight, dbias, m, d, parallel != 0, rows)",
    ),
}


_c_function, c_entry_point, c_entry_point_cached = entry_points(globals(), _C_ENTRY_POINTS)
