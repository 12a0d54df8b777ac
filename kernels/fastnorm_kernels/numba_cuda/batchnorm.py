"""Batch Normalization on NVIDIA GPUs with ``numba.cuda.jit`` kernels.

Book: "Deep Learning from Scratch", section 6.3; conventions are PyTorch's (kernels/fastnorm_kernels/reference is
the readable version, kernels/fastnorm_kernels/numba_cpu the CPU one; the same contract and tests). The
per-channel math is kernels/fastnorm_kernels/formulas/batchnorm.py, shared with the CPU kernels.

Statistics (training forward), three launches on the caller's stream:
1. partial sums: a grid of (channel or channel tile, G) blocks, G splitting each channel's N*S
   values so that even a few channels fill the GPU; every thread accumulates, in float64, the
   shifted sums sum(x - K) and sum((x - K)^2) with K the channel's first value (the
   Welford-equivalent form whose merge is an addition: Chan's formula with a common shift,
   exact enough however large |mean| / std), then the block merges them: warp shuffles
   (``shfl_down_sync``) and shared memory across warps. Layouts: (N, C, S) planes, blocks
   taking tiles of UNROLL*BLOCK values of one plane, each thread UNROLL coalesced loads in
   flight (no division per element); and (N, C) rows (S = 1, channels-last), a 32 x 8 block
   with threads along C (coalesced) and rows merged in shared memory.
2. finalize, a thread per channel: merges the G partials, writes mean, invstd, the running
   statistics (unbiased variance, on the device: no host round trip) and the per-channel
   coefficients of step 3.
3. normalize: y = ((x - mean_hi) - mean_lo) * gamma*invstd + beta, a block row per (n, c)
   plane (the channel's coefficients read once) or, for short planes, grid-stride over all.
Backward: partial sums of dy and dy*(x - mean) (the same grids), a finalize giving dweight,
dbias and the coefficients, then dx = dy*k1 + (x - mean)*k2 + k3 (the same two layouts).

Every kernel takes its arrays as addresses (``_device.view``; see kernels/fastnorm_kernels/numba_cuda/_device.py
for why) and the launchers accept anything with ``__cuda_array_interface__``. Outputs are the
caller's arrays (allocated by torch in fastnorm); scratch comes from ``_device.scratch``
(torch's caching allocator in fastnorm): one float64 (2, C, G) array of partial sums and one
(4, C) array of coefficients per call.
"""

from __future__ import annotations

import math

import numpy as np
from numba import cuda

from .. import BATCH_NORM_API
from .._bits import FLOAT16, HALF_DTYPES
from .._validate import check_arrays, check_float64_vectors, compute_dtype, device_dense
from ..formulas import batchnorm as formulas
from ..formulas import compiled
from ._bits import narrow, widen
from ._device import BLOCK, SIMULATOR, WARP, as_view, launch, scratch, view

__all__ = [*BATCH_NORM_API, "BATCH_NORM_DTYPES"]

#: storage dtypes: float32, float64, float16 and bfloat16 (uint16 bits, kernels/fastnorm_kernels/_bits.py); the
#: 16-bit ones are computed in float32, with float32 per-channel arrays
BATCH_NORM_DTYPES = (np.dtype(np.float32), np.dtype(np.float64), *HALF_DTYPES)

ROW_TILE, ROW_LANES = 32, 8  # (N, C) layout: 32 channels x 8 rows per block
TARGET_BLOCKS = 1024  # aim for this many blocks in the partial-sum grid (~8 per SM on an H100)
UNROLL = 4  # loads in flight per thread in the partial sums
PLANE_MIN = 32  # planes at least this long use the plane-per-block-row elementwise kernels

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


@_device
def _pair_stats(u, v, i, k):
    """Statistics: the shifted value d = u[i] - k and d^2."""
    d = np.float64(widen(u[i])) - k
    return d, d * d


@_device
def _pair_grad(u, v, i, k):
    """Backward: dy = u[i] and dy * (x - mean) with x = v[i], k = mean."""
    w = np.float64(widen(u[i]))
    return w, w * (np.float64(widen(v[i])) - k)


@_device
def _plane_partials(pair, u, v, k, N, C, S, c):
    """This thread's share of channel c's two sums over (N, C, S) arrays: work item w (block
    row g, g + G, ...) is tile w % tiles of plane w // tiles; UNROLL loads per thread per tile."""
    tid = cuda.threadIdx.x
    bd = cuda.blockDim.x
    tile = bd * UNROLL
    tiles = (S + tile - 1) // tile
    a = 0.0
    b = 0.0
    w = cuda.blockIdx.y
    while w < N * tiles:
        n = w // tiles
        lo = (w - n * tiles) * tile
        base = (n * C + c) * S
        i = base + lo + tid
        if lo + tile <= S:  # a full tile: four independent loads
            p0, q0 = pair(u, v, i, k)
            p1, q1 = pair(u, v, i + bd, k)
            p2, q2 = pair(u, v, i + 2 * bd, k)
            p3, q3 = pair(u, v, i + 3 * bd, k)
            a += (p0 + p1) + (p2 + p3)
            b += (q0 + q1) + (q2 + q3)
        else:
            end = base + S
            while i < end:
                p0, q0 = pair(u, v, i, k)
                a += p0
                b += q0
                i += bd
        w += cuda.gridDim.y
    return a, b


@_device
def _store_block_partials(a, b, sh_a, sh_b, p, C, c):
    """Block (c, g)'s sums into p: float64 (2, C, G) flat."""
    a, b = _block_sum2(a, b, sh_a, sh_b)
    if cuda.threadIdx.x == 0:
        G = cuda.gridDim.y
        p[c * G + cuda.blockIdx.y] = a
        p[(C + c) * G + cuda.blockIdx.y] = b


@_jit
def _stats_planes(x_addr, like, N, C, S, p_addr):
    """Block (c, g) of a (C, G) grid: partial sums of x - shift[c] and its square."""
    sh_a = cuda.shared.array(BLOCK, np.float64)
    sh_b = cuda.shared.array(BLOCK, np.float64)
    c = cuda.blockIdx.x
    x = view(x_addr, N * C * S, like)
    k = _F.shift_of(np.float64(widen(x[c * S])))
    a, b = _plane_partials(_pair_stats, x, x, k, N, C, S, c)
    _store_block_partials(a, b, sh_a, sh_b, view(p_addr, 2 * C * cuda.gridDim.y, 0.0), C, c)


@_jit
def _grad_planes(dy_addr, x_addr, mean_addr, like, like_c, N, C, S, p_addr):
    """Block (c, g): partial sums of dy and dy * (x - mean[c]); like_c types the (C,) arrays."""
    sh_a = cuda.shared.array(BLOCK, np.float64)
    sh_b = cuda.shared.array(BLOCK, np.float64)
    c = cuda.blockIdx.x
    k = np.float64(view(mean_addr, C, like_c)[c])
    dy = view(dy_addr, N * C * S, like)
    x = view(x_addr, N * C * S, like)
    a, b = _plane_partials(_pair_grad, dy, x, k, N, C, S, c)
    _store_block_partials(a, b, sh_a, sh_b, view(p_addr, 2 * C * cuda.gridDim.y, 0.0), C, c)


@_device
def _row_partials(pair, u, v, k, N, C, c, sh_a, sh_b, p):
    """Channel c = tile * 32 + threadIdx.x of (N, C) arrays over rows threadIdx.y + 8 * (g +
    G * i), two rows in flight per thread; the 8 row lanes merged in shared memory."""
    tx = cuda.threadIdx.x
    ty = cuda.threadIdx.y
    a = 0.0
    b = 0.0
    if c < C:
        n = cuda.blockIdx.y * ROW_LANES + ty
        step = cuda.gridDim.y * ROW_LANES
        while n + step < N:
            p0, q0 = pair(u, v, n * C + c, k)
            p1, q1 = pair(u, v, (n + step) * C + c, k)
            a += p0 + p1
            b += q0 + q1
            n += 2 * step
        if n < N:
            p0, q0 = pair(u, v, n * C + c, k)
            a += p0
            b += q0
    sh_a[ty, tx] = a
    sh_b[ty, tx] = b
    cuda.syncthreads()
    if ty == 0 and c < C:
        for lane in range(1, ROW_LANES):
            a += sh_a[lane, tx]
            b += sh_b[lane, tx]
        G = cuda.gridDim.y
        p[c * G + cuda.blockIdx.y] = a
        p[(C + c) * G + cuda.blockIdx.y] = b


@_jit
def _stats_rows(x_addr, like, N, C, p_addr):
    sh_a = cuda.shared.array((ROW_LANES, ROW_TILE), np.float64)
    sh_b = cuda.shared.array((ROW_LANES, ROW_TILE), np.float64)
    c = cuda.blockIdx.x * ROW_TILE + cuda.threadIdx.x
    x = view(x_addr, N * C, like)
    k = _F.shift_of(np.float64(widen(x[c]))) if c < C else 0.0
    _row_partials(_pair_stats, x, x, k, N, C, c, sh_a, sh_b, view(p_addr, 2 * C * cuda.gridDim.y, 0.0))


@_jit
def _grad_rows(dy_addr, x_addr, mean_addr, like, like_c, N, C, p_addr):
    sh_a = cuda.shared.array((ROW_LANES, ROW_TILE), np.float64)
    sh_b = cuda.shared.array((ROW_LANES, ROW_TILE), np.float64)
    c = cuda.blockIdx.x * ROW_TILE + cuda.threadIdx.x
    k = np.float64(view(mean_addr, C, like_c)[c]) if c < C else 0.0
    dy = view(dy_addr, N * C, like)
    x = view(x_addr, N * C, like)
    _row_partials(_pair_grad, dy, x, k, N, C, c, sh_a, sh_b, view(p_addr, 2 * C * cuda.gridDim.y, 0.0))


# -- finalize (thread per channel) ---------------------------------------------------------------


@_device
def _merge(p, C, G, c):
    """Channel c's sums: its G partial sums in p, float64 (2, C, G) flat, added."""
    s1 = 0.0
    s2 = 0.0
    for g in range(G):
        s1 += p[c * G + g]
        s2 += p[(C + c) * G + g]
    return s1, s2


@_jit
def _finalize_train(x_addr, like, like_c, N, C, S, p_addr, G, eps, momentum, rm_addr, rv_addr, has_running,
                    w_addr, has_weight, b_addr, has_bias, mean_addr, invstd_addr, coef_addr):  # fmt: skip
    # coef rows (the compute dtype, like_c's): mean_hi, mean_lo, gamma * invstd, beta
    c = cuda.grid(1)
    if c >= C:
        return
    x = view(x_addr, C * S, like)  # plane 0: the shift the partial sums used
    s1, s2 = _merge(view(p_addr, 2 * C * G, 0.0), C, G, c)
    mean, var, invstd = _F.statistics(s1, s2, _F.shift_of(np.float64(widen(x[c * S]))), np.float64(N * S), eps)
    view(mean_addr, C, like_c)[c] = mean
    view(invstd_addr, C, like_c)[c] = invstd
    if has_running:
        running_mean = view(rm_addr, C, like_c)
        running_var = view(rv_addr, C, like_c)
        running_mean[c] = _F.running_update(running_mean[c], mean, momentum)
        running_var[c] = _F.running_update(running_var[c], _F.unbiased_var(var, np.float64(N * S)), momentum)
    coef = view(coef_addr, 4 * C, like_c)
    coef[c] = mean
    coef[C + c] = mean - np.float64(coef[c])
    coef[2 * C + c] = _F.scale_of(invstd, view(w_addr, C, like_c)[c] if has_weight else 1.0)
    coef[3 * C + c] = view(b_addr, C, like_c)[c] if has_bias else 0.0


@_jit
def _finalize_eval(rm_addr, rv_addr, like, C, eps, w_addr, has_weight, b_addr, has_bias, coef_addr):
    c = cuda.grid(1)
    if c >= C:
        return
    invstd = 1.0 / math.sqrt(np.float64(view(rv_addr, C, like)[c]) + eps)
    coef = view(coef_addr, 4 * C, like)
    coef[c] = view(rm_addr, C, like)[c]
    coef[C + c] = 0.0
    coef[2 * C + c] = _F.scale_of(invstd, view(w_addr, C, like)[c] if has_weight else 1.0)
    coef[3 * C + c] = view(b_addr, C, like)[c] if has_bias else 0.0


@_jit
def _finalize_backward(p_addr, G, like, C, count, mean_addr, invstd_addr, w_addr, has_weight, training, dw_addr,
                       has_dweight, db_addr, has_dbias, coef_addr):  # fmt: skip
    # coef rows: k1 (dy), k2 (x - mean), k3 (constant), mean; G = 0: no sums needed (zeros)
    c = cuda.grid(1)
    if c >= C:
        return
    s_dy, s_dyx = _merge(view(p_addr, 2 * C * G, 0.0), C, G, c)
    weight = np.float64(view(w_addr, C, like)[c]) if has_weight else 1.0
    k1, k2, k3, dw, db = _F.backward_coefficients(
        s_dy, s_dyx, count, np.float64(view(invstd_addr, C, like)[c]), weight, training
    )
    coef = view(coef_addr, 4 * C, like)
    coef[c] = k1
    coef[C + c] = k2
    coef[2 * C + c] = k3
    coef[3 * C + c] = view(mean_addr, C, like)[c]
    if has_dbias:
        view(db_addr, C, like)[c] = db
    if has_dweight:
        view(dw_addr, C, like)[c] = dw


@_jit
def _finalize_stats(x_addr, like, N, C, S, p_addr, G, mean_addr, var_addr):
    c = cuda.grid(1)
    if c < C:
        x = view(x_addr, C * S, like)
        s1, s2 = _merge(view(p_addr, 2 * C * G, 0.0), C, G, c)
        mean, var, _ = _F.statistics(s1, s2, _F.shift_of(np.float64(widen(x[c * S]))), np.float64(N * S), 1.0)
        view(mean_addr, C, 0.0)[c] = mean
        view(var_addr, C, 0.0)[c] = var


# -- elementwise ------------------------------------------------------------------------------------


@_jit
def _normalize_planes(x_addr, y_addr, coef_addr, like, like_c, planes, C, S):
    """y = ((x - m_hi) - m_lo) * a + b: block row p (and p + gridDim.y, ...) is plane p of the
    (N*C, S) arrays, channel p % C; each thread loads UNROLL (= 4) values before it stores.
    16-bit storage: values widened on load, rounded once on store (_bits.widen / narrow)."""
    x = view(x_addr, planes * S, like)
    y = view(y_addr, planes * S, like)
    coef = view(coef_addr, 4 * C, like_c)
    bd = cuda.blockDim.x
    start = cuda.blockIdx.x * bd * UNROLL + cuda.threadIdx.x
    stride = cuda.gridDim.x * bd * UNROLL
    p = cuda.blockIdx.y
    while p < planes:
        c = p % C
        m_hi, m_lo, a, b = coef[c], coef[C + c], coef[2 * C + c], coef[3 * C + c]
        base = p * S
        i = start
        while i < S:
            i0 = base + i
            if i + 3 * bd < S:  # four loads in flight (y may alias x: loads first, then stores)
                x0, x1 = widen(x[i0]), widen(x[i0 + bd])
                x2, x3 = widen(x[i0 + 2 * bd]), widen(x[i0 + 3 * bd])
                y[i0] = narrow(((x0 - m_hi) - m_lo) * a + b, y)
                y[i0 + bd] = narrow(((x1 - m_hi) - m_lo) * a + b, y)
                y[i0 + 2 * bd] = narrow(((x2 - m_hi) - m_lo) * a + b, y)
                y[i0 + 3 * bd] = narrow(((x3 - m_hi) - m_lo) * a + b, y)
            else:
                j = i
                while j < S:
                    y[base + j] = narrow(((widen(x[base + j]) - m_hi) - m_lo) * a + b, y)
                    j += bd
            i += stride
        p += cuda.gridDim.y


@_jit
def _normalize_flat(x_addr, y_addr, coef_addr, like, like_c, total, C, S):
    """The same, grid-stride over all elements (short planes, rows): channel (i // S) % C."""
    x = view(x_addr, total, like)
    y = view(y_addr, total, like)
    coef = view(coef_addr, 4 * C, like_c)
    i = cuda.grid(1)
    step = cuda.gridsize(1)
    while i < total:
        c = (i // S) % C
        y[i] = narrow(((widen(x[i]) - coef[c]) - coef[C + c]) * coef[2 * C + c] + coef[3 * C + c], y)
        i += step


@_jit
def _input_grad_planes(dy_addr, x_addr, coef_addr, like, like_c, planes, C, S, dx_addr):
    """dx = dy * k1 + (x - mean) * k2 + k3, plane per block row, UNROLL values per thread."""
    dy = view(dy_addr, planes * S, like)
    x = view(x_addr, planes * S, like)
    dx = view(dx_addr, planes * S, like)
    coef = view(coef_addr, 4 * C, like_c)
    bd = cuda.blockDim.x
    start = cuda.blockIdx.x * bd * UNROLL + cuda.threadIdx.x
    stride = cuda.gridDim.x * bd * UNROLL
    p = cuda.blockIdx.y
    while p < planes:
        c = p % C
        k1, k2, k3, mean = coef[c], coef[C + c], coef[2 * C + c], coef[3 * C + c]
        base = p * S
        i = start
        while i < S:
            i0 = base + i
            if i + 3 * bd < S:
                g0, g1 = widen(dy[i0]), widen(dy[i0 + bd])
                g2, g3 = widen(dy[i0 + 2 * bd]), widen(dy[i0 + 3 * bd])
                x0, x1 = widen(x[i0]), widen(x[i0 + bd])
                x2, x3 = widen(x[i0 + 2 * bd]), widen(x[i0 + 3 * bd])
                dx[i0] = narrow(g0 * k1 + (x0 - mean) * k2 + k3, dx)
                dx[i0 + bd] = narrow(g1 * k1 + (x1 - mean) * k2 + k3, dx)
                dx[i0 + 2 * bd] = narrow(g2 * k1 + (x2 - mean) * k2 + k3, dx)
                dx[i0 + 3 * bd] = narrow(g3 * k1 + (x3 - mean) * k2 + k3, dx)
            else:
                j = i
                while j < S:
                    dx[base + j] = narrow(widen(dy[base + j]) * k1 + (widen(x[base + j]) - mean) * k2 + k3, dx)
                    j += bd
            i += stride
        p += cuda.gridDim.y


@_jit
def _input_grad_flat(dy_addr, x_addr, coef_addr, like, like_c, total, C, S, dx_addr):
    dy = view(dy_addr, total, like)
    x = view(x_addr, total, like)
    dx = view(dx_addr, total, like)
    coef = view(coef_addr, 4 * C, like_c)
    i = cuda.grid(1)
    step = cuda.gridsize(1)
    while i < total:
        c = (i // S) % C
        dx[i] = narrow(widen(dy[i]) * coef[c] + (widen(x[i]) - coef[3 * C + c]) * coef[C + c] + coef[2 * C + c], dx)
        i += step


# -- launchers: the kernels API (same names and arguments as fastnorm_kernels.reference) -----------------


def _grid_stride(total: int) -> int:
    return max(1, min(-(-total // BLOCK), 32 * TARGET_BLOCKS))


def _per_channel(c: int) -> int:
    return max(1, -(-c // BLOCK))


def _plane_grid(n: int, c: int, s: int) -> tuple[int, int]:
    """(x, y) blocks of the plane kernels: x across a plane (UNROLL * BLOCK values each), y
    over planes, about 8192 blocks in all (block rows loop over further planes)."""
    x = min(-(-s // (BLOCK * UNROLL)), 64)
    return x, min(n * c, max(1, 8192 // x), 65535)


def _likes(x) -> tuple:
    """(storage like, compute like): typed zeros that type the kernels' views of the data and of
    the per-channel arrays (16-bit data as bits: float16 as int16, bfloat16 as uint16)."""
    dtype = np.dtype(x.dtype)
    storage = np.int16(0) if dtype == FLOAT16 else dtype.type(0)
    return storage, compute_dtype(dtype).type(0)


def _partials(x, dy, mean, n: int, c: int, s: int):
    """Launch the partial sums (statistics of x when dy is None, else the backward's sums of dy
    and dy * (x - mean)); returns the float64 (2, C, G) scratch and G."""
    like, like_c = _likes(x)
    if s == 1:
        tiles = -(-c // ROW_TILE)
        g = max(1, min(-(-n // (ROW_LANES * 16)), -(-TARGET_BLOCKS // tiles)))
        p = scratch((2 * c * g,), np.float64)
        grid, block = (tiles, g), (ROW_TILE, ROW_LANES)
        if dy is None:
            launch(_stats_rows, grid, block, x.ptr, like, n, c, p.ptr)
        else:
            launch(_grad_rows, grid, block, dy.ptr, x.ptr, mean.ptr, like, like_c, n, c, p.ptr)
    else:
        tiles = -(-s // (BLOCK * UNROLL))
        g = max(1, min(n * tiles, -(-TARGET_BLOCKS // c), 65535))
        p = scratch((2 * c * g,), np.float64)
        if dy is None:
            launch(_stats_planes, (c, g), BLOCK, x.ptr, like, n, c, s, p.ptr)
        else:
            launch(_grad_planes, (c, g), BLOCK, dy.ptr, x.ptr, mean.ptr, like, like_c, n, c, s, p.ptr)
    return p, g


def _normalize(x, y, coef, n: int, c: int, s: int) -> None:
    like, like_c = _likes(x)
    if s >= PLANE_MIN:
        launch(_normalize_planes, _plane_grid(n, c, s), BLOCK, x.ptr, y.ptr, coef.ptr, like, like_c, n * c, c, s)
    else:
        launch(_normalize_flat, _grid_stride(n * c * s), BLOCK, x.ptr, y.ptr, coef.ptr, like, like_c, n * c * s,
               c, s)  # fmt: skip


def _input_grad(dy, x, coef, dx, n: int, c: int, s: int) -> None:
    like, like_c = _likes(x)
    if s >= PLANE_MIN:
        launch(_input_grad_planes, _plane_grid(n, c, s), BLOCK, dy.ptr, x.ptr, coef.ptr, like, like_c, n * c, c,
               s, dx.ptr)  # fmt: skip
    else:
        launch(_input_grad_flat, _grid_stride(n * c * s), BLOCK, dy.ptr, x.ptr, coef.ptr, like, like_c,
               n * c * s, c, s, dx.ptr)  # fmt: skip


def _views(*arrays):
    return [None if a is None else as_view(a) for a in arrays]


def _ptr(a, fallback) -> int:
    """The address of an optional array (a valid one that is never read when it is absent)."""
    return fallback.ptr if a is None else a.ptr


def _check(x, y, per_channel, extra=(), required=()):
    check_arrays(x, y, per_channel, extra, backend="cuda", dense=device_dense, dtypes=BATCH_NORM_DTYPES)
    for name, a in required:
        if a is None:
            raise ValueError(f"{name}: an array is needed (the kernels write or read it)")


def batch_norm_forward_train(x, weight, bias, running_mean, running_var, momentum, eps, y, save_mean, save_invstd):
    """Training forward; see fastnorm_kernels.reference.batch_norm_forward_train for the contract."""
    x, weight, bias, running_mean, running_var, y, save_mean, save_invstd = _views(
        x, weight, bias, running_mean, running_var, y, save_mean, save_invstd
    )
    _check(x, y, [weight, bias, running_mean, running_var, save_mean, save_invstd],
           required=[("save_mean", save_mean), ("save_invstd", save_invstd)])  # fmt: skip
    n, c, s = x.shape
    p, g = _partials(x, None, None, n, c, s)
    like, like_c = _likes(x)
    coef = scratch((4 * c,), compute_dtype(x.dtype))
    launch(_finalize_train, _per_channel(c), BLOCK,
        x.ptr, like, like_c, n, c, s, p.ptr, g, float(eps), float(momentum), _ptr(running_mean, coef),
        _ptr(running_var, coef), running_mean is not None, _ptr(weight, coef), weight is not None,
        _ptr(bias, coef), bias is not None, save_mean.ptr, save_invstd.ptr, coef.ptr,
    )  # fmt: skip
    _normalize(x, y, coef, n, c, s)


def batch_norm_forward_eval(x, weight, bias, running_mean, running_var, eps, y):
    """Eval forward; see fastnorm_kernels.reference.batch_norm_forward_eval."""
    x, weight, bias, running_mean, running_var, y = _views(x, weight, bias, running_mean, running_var, y)
    _check(x, y, [weight, bias, running_mean, running_var],
           required=[("running_mean", running_mean), ("running_var", running_var)])  # fmt: skip
    n, c, s = x.shape
    coef = scratch((4 * c,), compute_dtype(x.dtype))
    launch(_finalize_eval, _per_channel(c), BLOCK,
        running_mean.ptr, running_var.ptr, _likes(x)[1], c, float(eps), _ptr(weight, coef), weight is not None,
        _ptr(bias, coef), bias is not None, coef.ptr,
    )  # fmt: skip
    _normalize(x, y, coef, n, c, s)


def batch_norm_backward(dy, x, mean, invstd, weight, training, dx, dweight, dbias):
    """Backward; see fastnorm_kernels.reference.batch_norm_backward."""
    dy, x, mean, invstd, weight, dx, dweight, dbias = _views(dy, x, mean, invstd, weight, dx, dweight, dbias)
    _check(x, dy, [mean, invstd, weight, dweight, dbias], [dx], required=[("mean", mean), ("invstd", invstd)])
    n, c, s = x.shape
    need_sums = (dx is not None and training) or dweight is not None or dbias is not None
    coef = scratch((4 * c,), compute_dtype(x.dtype))
    p, g = _partials(x, dy, mean, n, c, s) if need_sums else (coef, 0)
    launch(_finalize_backward, _per_channel(c), BLOCK,
        p.ptr, g, _likes(x)[1], c, float(n * s), mean.ptr, invstd.ptr, _ptr(weight, coef), weight is not None,
        bool(training), _ptr(dweight, coef), dweight is not None, _ptr(dbias, coef), dbias is not None, coef.ptr,
    )  # fmt: skip
    if dx is not None:
        _input_grad(dy, x, coef, dx, n, c, s)


def batch_norm_stats(x, mean, var):
    """Per-channel mean and biased variance (float64 device outputs); see fastnorm_kernels.reference."""
    x, mean, var = _views(x, mean, var)
    _check(x, x, [])
    n, c, s = x.shape
    check_float64_vectors(c, mean, var, dense=device_dense)
    p, g = _partials(x, None, None, n, c, s)
    launch(_finalize_stats, _per_channel(c), BLOCK, x.ptr, _likes(x)[0], n, c, s, p.ptr, g, mean.ptr, var.ptr)
