"""Optimizer updates with 8-bit blockwise state on CPU threads with Numba: one pass per block.

Dettmers et al. 2022; the format is kernels/fastnorm_kernels/quant8.py's (bitsandbytes'). The
element update is the 32-bit optimizers' own (kernels/fastnorm_kernels/formulas/optim.py, through
the adapter ``numba_cpu.optim._element_<op>``); what this module adds is the loop around it.

Algorithm, per block of 256 values (a parallel loop over chunks of 64 blocks)::

    for i in block:                       # one pass over p, g and the codes
        m, v = map1[q1[i]] * absmax1, map2[q2[i]] * absmax2      # dequantize (L1 gathers)
        p[i], m, v = update(p[i], g[i], m, v)                    # the description's formula
        scratch[i] = m, v;  new absmax = max |m|, max |v|        # (per-thread, L1)
    for i in block:                       # the block's codes, from L1
        q1[i] = nearest(map1, m / absmax1);  q2[i] = nearest(map2, v / absmax2)

so each parameter reads p, g and two codes and writes p and two codes (14 bytes in float32 plus
8 bytes of absmax per 256 values), against 28 for a 32-bit Adam step. ``nearest`` is two table
loads (quant8.lookup_table). Tensors below ``min_8bit_size`` keep float32 state (bitsandbytes'
rule): the same call updates them with the plain element loop.

The table: ``addrs`` int64 (6, T) rows param, grad, state 1 (uint8 codes or float32), absmax 1,
state 2, absmax 2 (rows of absent buffers repeat the gradient's and are never touched);
``chunks`` (K, 3) rows (tensor, start, stop), starts multiples of the block; ``quantized`` (T,)
bool; ``scalars`` (T, 2) float32, the per-tensor step scalars (the caller advances the steps).
Parameters are float32, or bfloat16 / float16 bit patterns computed in float32 and rounded once.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange, types
from numba.extending import intrinsic
from numba.np.unsafe.ndarray import to_fixed_tuple

from .. import quant8
from .._pointer import pointer_intrinsic
from ..formulas.optim import OPTIMIZERS
from . import optim as _optim  # the generated kernels call its element adapters
from ._bits import (  # noqa: F401 - in the kernels' text
    _bits_from_f32,
    _f32_from_bits,
    load_bf16,
    load_f16,
    row_key,
    store_bf16,
    store_bf16_stochastic,
    store_f16,
)

__all__ = ["step_8bit_table", "EIGHT_BIT_OPS", "PARAM_DTYPES"]

#: the optimizers with an 8-bit form (descriptions with ``eight_bit`` classes)
EIGHT_BIT_OPS = tuple(name for name, d in OPTIMIZERS.items() if d.eight_bit)
#: parameter storages: float32, float16, bfloat16 (uint16 bits)
PARAM_DTYPES = (np.dtype(np.float32), np.dtype(np.float16), np.dtype(np.uint16))
BLOCK = quant8.BLOCK
CHUNK = 256 * BLOCK  # elements per chunk of the parallel loop (its scratch tables: ~16 KB)
ROWS = 6

_pointer = pointer_intrinsic(intrinsic, types)
_cell = njit(inline="always")(quant8.cell)


@njit(inline="always")
def _elements(addr, lo, hi, like):
    return numba.carray(_pointer(addr, like), hi)[lo:hi]


@njit(inline="always")
def _load32(x):
    return x


@njit(inline="always")
def _store32(x, key, e):
    return x


# Scratch per chunk (L1): ``work`` float32 [x0 | x1 | map 0 | map 1] (BLOCK each) and ``qwork``
# uint8 [codes out 0 | codes out 1 | base table 0 | base table 1]. The code tables sit in the arrays the lookup
# loops write, on purpose: a lookup then may alias the loop's stores, so LLVM keeps those loops
# scalar. Vectorised, they become AVX-512 gathers, which this CPU's microcode makes ~3x slower than
# scalar loads (measured: bench/results/optimizers.md). The update loop between them vectorises.
_X0, _X1, _MAP0, _MAP1 = 0, BLOCK, 2 * BLOCK, 3 * BLOCK
_OUT1, _BASE0, _BASE1 = BLOCK, 2 * BLOCK, 2 * BLOCK + 2 * quant8.CELLS


@njit(inline="always")
def _dequantize(q0, q1, work, scale0, scale1, m, use1):
    """work[x0], work[x1] = the blocks' values: table loads from ``work`` itself (kept scalar)."""
    for i in range(m):
        work[_X0 + i] = work[_MAP0 + q0[i]] * scale0
        if use1:
            work[_X1 + i] = work[_MAP1 + q1[i]] * scale1


@njit(inline="always")
def _quantize(work, cells, qwork, bounds, q0, q1, amax0, amax1, m, use1):
    """q0, q1 [0:m] = nearest codes of work[x0], work[x1] over their absmax (quant8.lookup_table;
    an absmax of 0: all zeros): the scaled values and their cells in a vectorised pass, the table
    loads in a scalar one."""
    scale0 = amax0 if amax0 != 0 else np.float32(1)
    scale1 = amax1 if amax1 != 0 else np.float32(1)
    for i in range(m):
        y0 = work[_X0 + i] / scale0
        u0 = np.int64(_bits_from_f32(y0))
        work[_X0 + i] = y0
        cells[i] = np.int32((u0 >> 31) * quant8.CELLS + _cell(u0 & 0x7FFFFFFF))
        if use1:
            y1 = work[_X1 + i] / scale1
            u1 = np.int64(_bits_from_f32(y1))
            work[_X1 + i] = y1
            cells[BLOCK + i] = np.int32((u1 >> 31) * quant8.CELLS + _cell(u1 & 0x7FFFFFFF))
    b0, b1 = bounds[0], bounds[1]
    for i in range(m):
        c0 = cells[i]
        qwork[i] = np.uint8(qwork[_BASE0 + c0] + (work[_X0 + i] > b0[c0]))
        if use1:
            c1 = cells[BLOCK + i]
            qwork[_OUT1 + i] = np.uint8(qwork[_BASE1 + c1] + (work[_X1 + i] > b1[c1]))
    for i in range(m):
        q0[i] = qwork[i]
        if use1:
            q1[i] = qwork[_OUT1 + i]


@njit(inline="always")
def _block(element, load, store, p, g, q0, a0, q1, a1, blk, m, k, s0, s1, flags, use1, work, cells, qwork, bounds,
           key, e0):  # fmt: skip
    """One block of m values (p, g, q0, q1 start at it, element e0 of its tensor): dequantize,
    update, absmax, quantize; ``key``: the parameter row's stochastic rounding key."""
    like = k[0]
    _dequantize(q0, q1, work, a0[blk], a1[blk] if use1 else np.float32(0), m, use1)
    # the absmax as the largest bit pattern of |value| (an integer maximum, which vectorises;
    # a NaN's pattern is above infinity's, so a NaN makes the absmax NaN)
    amax0, amax1 = np.uint32(0), np.uint32(0)
    for i in range(m):
        x1 = work[_X1 + i] if use1 else like
        y, v0, v1, _ = element(load(p[i]), load(g[i]), work[_X0 + i], x1, like, k, s0, s1, flags, True, use1, False)
        p[i] = store(y, key, e0 + np.uint32(i))
        work[_X0 + i] = v0
        amax0 = max(amax0, _bits_from_f32(v0) & np.uint32(0x7FFFFFFF))
        if use1:
            work[_X1 + i] = v1
            amax1 = max(amax1, _bits_from_f32(v1) & np.uint32(0x7FFFFFFF))
    a0[blk] = _f32_from_bits(amax0)
    if use1:
        a1[blk] = _f32_from_bits(amax1)
    _quantize(work, cells, qwork, bounds, q0, q1, a0[blk], a1[blk] if use1 else np.float32(0), m, use1)


@njit(inline="always")
def _blocks(element, load, store, p, g, q0, a0, q1, a1, lo, n, k, s0, s1, flags, use1, work, qwork, bounds, key):
    """The chunk's blocks with 8-bit state; full blocks with a constant trip count."""
    cells = np.empty(2 * BLOCK, np.int32)
    full = n - n % BLOCK
    for b in range(0, full, BLOCK):
        _block(element, load, store, p[b:], g[b:], q0[b:], a0, q1[b:], a1, (lo + b) // BLOCK, BLOCK, k, s0, s1, flags,
               use1, work, cells, qwork, bounds, key, np.uint32((lo + b) & 0xFFFFFFFF))  # fmt: skip
    if full < n:
        _block(element, load, store, p[full:], g[full:], q0[full:], a0, q1[full:], a1, (lo + full) // BLOCK,
               n - full, k, s0, s1, flags, use1, work, cells, qwork, bounds, key,
               np.uint32((lo + full) & 0xFFFFFFFF))  # fmt: skip


@njit(inline="always")
def _plain(element, load, store, p, g, b0, b1, n, k, s0, s1, flags, use1, key, lo):
    """Elements with float32 state (tensors below min_8bit_size)."""
    like = k[0]
    base = np.uint32(lo & 0xFFFFFFFF)
    for e in range(n):
        x1 = b1[e] if use1 else like
        y, v0, v1, _ = element(load(p[e]), load(g[e]), b0[e], x1, like, k, s0, s1, flags, True, use1, False)
        p[e] = store(y, key, base + np.uint32(e))
        b0[e] = v0
        if use1:
            b1[e] = v1


@njit(inline="always")
def _table_update8(element, n_constants, load, store, like_p, addrs, chunks, quantized, scalars, constant_array,
                   flags, uses, codes, bases, bounds, seed):  # fmt: skip
    k = to_fixed_tuple(constant_array, n_constants)
    use1 = uses[1]
    f32, u8 = np.float32(0), np.uint8(0)
    for c in prange(chunks.shape[0]):
        t, lo, hi = chunks[c, 0], chunks[c, 1], chunks[c, 2]
        n, s0, s1 = hi - lo, scalars[t, 0], scalars[t, 1]
        p = _elements(addrs[0, t], lo, hi, like_p)
        g = _elements(addrs[1, t], lo, hi, like_p)
        key = row_key(seed, np.uint32(t), np.uint32(0))
        if quantized[t]:
            work = np.empty(4 * BLOCK, np.float32)
            work[_MAP0 : _MAP0 + BLOCK] = codes[0]
            work[_MAP1 : _MAP1 + BLOCK] = codes[1]
            qwork = np.empty(2 * BLOCK + 4 * quant8.CELLS, np.uint8)
            qwork[2 * BLOCK :] = bases
            nb = (hi + BLOCK - 1) // BLOCK
            q0 = _elements(addrs[2, t], lo, hi, u8)
            a0 = _elements(addrs[3, t], 0, nb, f32)
            q1 = _elements(addrs[4, t], lo, hi, u8)
            a1 = _elements(addrs[5, t], 0, nb, f32)
            if use1:
                _blocks(element, load, store, p, g, q0, a0, q1, a1, lo, n, k, s0, s1, flags, True, work, qwork, bounds,
                        key)  # fmt: skip
            else:
                _blocks(element, load, store, p, g, q0, a0, q1, a1, lo, n, k, s0, s1, flags, False, work, qwork,
                        bounds, key)  # fmt: skip
        else:
            b0 = _elements(addrs[2, t], lo, hi, f32)
            b1 = _elements(addrs[4, t], lo, hi, f32)
            if use1:
                _plain(element, load, store, p, g, b0, b1, n, k, s0, s1, flags, True, key, lo)
            else:
                _plain(element, load, store, p, g, b0, b1, n, k, s0, s1, flags, False, key, lo)


_FLAGS = dict(parallel=True, cache=True, error_model="numpy", nogil=True, fastmath={"contract"})
_ARGS = "addrs, chunks, quantized, scalars, constants, flags, uses, codes, bases, bounds, seed"
#: parameter storage (a dtype, or "bfloat16_sr": bfloat16 rounded stochastically) -> (kernel
#: suffix, load, store, a value of the storage's element type)
_STORAGES = {np.dtype(np.float32): ("f32", "_load32", "_store32", "np.float32(0)"),
             np.dtype(np.uint16): ("bf16", "load_bf16", "store_bf16", "np.uint16(0)"),
             "bfloat16_sr": ("bf16_sr", "load_bf16", "store_bf16_stochastic", "np.uint16(0)"),
             np.dtype(np.float16): ("f16", "load_f16", "store_f16", "np.uint16(0)")}  # fmt: skip


def _define() -> dict:
    """One kernel per (optimizer, parameter storage), written out with its own name for Numba's
    on-disk cache (as numba_cpu/optim.py's)."""
    kernels = {}
    for op in EIGHT_BIT_OPS:
        d = OPTIMIZERS[op]
        for dtype, (suffix, load, store, like) in _STORAGES.items():
            name = f"_q8_{op}_{suffix}"
            call = f"_table_update8(_optim._element_{op}, {len(d.constants)}, {load}, {store}, {like}, {_ARGS})"
            source = f"def {name}({_ARGS}):\n    {call}\n"
            namespace = globals()
            exec(compile(source, __file__, "exec"), namespace)  # noqa: S102 - generated from the descriptions
            kernels[(op, dtype)] = namespace[name] = njit(**_FLAGS)(namespace[name])
    return kernels


_KERNELS = _define()


def step_8bit_table(op: str, addrs: np.ndarray, numels: tuple[int, ...], dtype, quantized: np.ndarray,
                    scalars: np.ndarray, constants: tuple, flags: tuple, uses: tuple,
                    rounding_seed: int | None = None) -> None:  # fmt: skip
    """One update of a group's tensors (see the module docstring); ``constants``, ``flags`` and
    ``uses`` as ``Optimizer.pack`` returns them, ``scalars`` (T, 2) float32; ``rounding_seed``:
    bfloat16 parameters rounded stochastically (kernels/fastnorm_kernels/_bits.py's generator,
    row 0 of each tensor)."""
    if rounding_seed is not None and np.dtype(dtype) != np.dtype(np.uint16):
        raise ValueError(f"stochastic rounding (rounding_seed) applies to bfloat16 parameters, got {np.dtype(dtype)}")
    kernel = _KERNELS.get((op, "bfloat16_sr" if rounding_seed is not None else np.dtype(dtype)))
    if kernel is None:
        raise TypeError(f"8-bit {op} updates float32, float16 or bfloat16 parameters, got {np.dtype(dtype)}")
    codes, bases, bounds = quant8.kernel_tables(OPTIMIZERS[op].eight_bit_maps)
    seed = np.uint32((rounding_seed or 0) & 0xFFFFFFFF)
    kernel(addrs, _optim.chunk_table(tuple(numels), CHUNK), quantized, scalars, np.array(constants, np.float32),
           tuple(flags), tuple(uses[:2]), codes, bases, bounds, seed)  # fmt: skip
