"""Optimizer updates with 8-bit blockwise state on a GPU with Numba CUDA: one CUDA block per
quantization block.

The algorithm of the CPU kernel (kernels/fastnorm_kernels/numba_cpu/optim8.py) with a thread per
value: each of a block's 256 threads dequantizes its two codes, runs the description's element
update (``numba_cuda.optim._element_<op>``) and writes its parameter; the block reduces the new
absmax in shared memory (the largest bit pattern of |value|: a NaN wins), and each thread writes
its nearest code (kernels/fastnorm_kernels/quant8.py's table). Tensors with float32 state take
the plain element update in the same launch.

Tables (int64, on the device): ``addrs`` (6, T) rows param, grad, state 1, absmax 1, state 2,
absmax 2; ``blocks`` (K, 3) rows (tensor, start, stop) of at most 256 values; ``quantized`` (T,)
and the per-tensor step scalars (T, 2) float32.
"""

from __future__ import annotations

import functools

import numpy as np
from numba import cuda

from .. import quant8
from ..formulas.optim import OPTIMIZERS
from . import optim as _optim  # its element adapters (in the kernels' text) and device tables
from ._bits import f32_bits, f32_of_bits, load_bf16, load_f16, row_key, store_bf16, store_bf16_stochastic, store_f16  # noqa: F401
from ._device import SIMULATOR, address, stream, view

__all__ = ["step_8bit_table", "PARAM_DTYPES"]

PARAM_DTYPES = (np.dtype(np.float32), np.dtype(np.float16), np.dtype(np.uint16))
EIGHT_BIT_OPS = tuple(name for name, d in OPTIMIZERS.items() if d.eight_bit)
QBLOCK = quant8.BLOCK
MAX_BLOCKS = 65535

_jit = cuda.jit if SIMULATOR else cuda.jit(cache=True)
_inline = cuda.jit(device=True) if SIMULATOR else cuda.jit(device=True, inline="always")
_cell = _inline(quant8.cell)


@_inline
def _load32(x):
    return x


@_inline
def _store32(x, key, e):
    return x


@_inline
def _nearest(y, bases, bounds, m):
    u = np.int64(f32_bits(y))
    c = (u >> 31) * quant8.CELLS + _cell(u & 0x7FFFFFFF)
    return np.uint8((np.int64(bases[m * 2 * quant8.CELLS + c]) + (y > bounds[m * 2 * quant8.CELLS + c])) & 255)


@_inline
def _block_max(shared, tid):
    """shared[0] = max(shared[0:QBLOCK]) (uint32), every thread of the block calling."""
    s = QBLOCK // 2
    while s > 0:
        cuda.syncthreads()
        if tid < s and shared[tid + s] > shared[tid]:
            shared[tid] = shared[tid + s]
        s //= 2
    cuda.syncthreads()


@_inline
def _update8(element, load, store, like_p, addrs_addr, T, blocks_addr, K, scalars_addr, quantized_addr, constants,
             flags, use1, codes_addr, bases_addr, bounds_addr, seed):  # fmt: skip
    like = constants[0]
    f32, u8 = np.float32(0), np.uint8(0)
    addrs = view(addrs_addr, 6 * T, np.int64(0))
    blocks = view(blocks_addr, 3 * K, np.int64(0))
    scalars = view(scalars_addr, 2 * T, f32)
    quantized = view(quantized_addr, T, u8)
    codes = view(codes_addr, 2 * QBLOCK, f32)
    bases = view(bases_addr, 4 * quant8.CELLS, u8)
    bounds = view(bounds_addr, 4 * quant8.CELLS, f32)
    max0 = cuda.shared.array(QBLOCK, np.uint32)
    max1 = cuda.shared.array(QBLOCK, np.uint32)
    tid = cuda.threadIdx.x
    k = cuda.blockIdx.x
    while k < K:
        t, lo, hi = blocks[3 * k], blocks[3 * k + 1], blocks[3 * k + 2]
        s0, s1 = scalars[2 * t], scalars[2 * t + 1]
        i = lo + tid
        active = i < hi
        p = view(addrs[t], hi, like_p)
        g = view(addrs[T + t], hi, like_p)
        key = row_key(seed, np.uint32(t), np.uint32(0))
        e = np.uint32(i & 0xFFFFFFFF)
        if quantized[t] != 0:
            blk = lo // QBLOCK
            q0 = view(addrs[2 * T + t], hi, u8)
            a0 = view(addrs[3 * T + t], blk + 1, f32)
            q1 = view(addrs[4 * T + t], hi, u8)
            a1 = view(addrs[5 * T + t], blk + 1, f32)
            scale0 = a0[blk]
            scale1 = a1[blk] if use1 else f32
            v0, v1 = f32, f32
            if active:
                x0 = codes[np.int64(q0[i])] * scale0
                x1 = codes[QBLOCK + np.int64(q1[i])] * scale1 if use1 else like
                y, v0, v1, _ = element(load(p[i]), load(g[i]), x0, x1, like, constants, s0, s1, flags, True, use1,
                                       False)  # fmt: skip
                p[i] = store(y, key, e)
            max0[tid] = f32_bits(v0) & np.uint32(0x7FFFFFFF) if active else np.uint32(0)
            max1[tid] = f32_bits(v1) & np.uint32(0x7FFFFFFF) if active and use1 else np.uint32(0)
            _block_max(max0, tid)
            _block_max(max1, tid)
            amax0 = f32_of_bits(max0[0])
            amax1 = f32_of_bits(max1[0])
            cuda.syncthreads()  # every thread has read a0[blk], a1[blk] and the maxima
            if tid == 0:
                a0[blk] = amax0
                if use1:
                    a1[blk] = amax1
            if active:
                q0[i] = _nearest(v0 / (amax0 if amax0 != 0 else np.float32(1)), bases, bounds, 0)
                if use1:
                    q1[i] = _nearest(v1 / (amax1 if amax1 != 0 else np.float32(1)), bases, bounds, 1)
        elif active:
            b0 = view(addrs[2 * T + t], hi, f32)
            b1 = view(addrs[4 * T + t], hi, f32)
            x1 = b1[i] if use1 else like
            y, v0, v1, _ = element(load(p[i]), load(g[i]), b0[i], x1, like, constants, s0, s1, flags, True, use1,
                                   False)  # fmt: skip
            p[i] = store(y, key, e)
            b0[i] = v0
            if use1:
                b1[i] = v1
        cuda.syncthreads()
        k += cuda.gridDim.x


_ARGS = (
    "addrs_addr, T, blocks_addr, K, scalars_addr, quantized_addr, constants, flags, use1, codes, bases, bounds, seed"
)
_STORAGES = {np.dtype(np.float32): ("f32", "_load32", "_store32", "np.float32(0)"),
             np.dtype(np.uint16): ("bf16", "load_bf16", "store_bf16", "np.uint16(0)"),
             "bfloat16_sr": ("bf16_sr", "load_bf16", "store_bf16_stochastic", "np.uint16(0)"),
             np.dtype(np.float16): ("f16", "load_f16", "store_f16", "np.uint16(0)")}  # fmt: skip


def _define() -> dict:
    kernels = {}
    for op in EIGHT_BIT_OPS:
        for dtype, (suffix, load, store, like) in _STORAGES.items():
            name = f"_q8_{op}_{suffix}"
            source = (f"def {name}({_ARGS}):\n"
                      f"    _update8(_optim._element_{op}, {load}, {store}, {like}, {_ARGS})\n")  # fmt: skip
            exec(compile(source, __file__, "exec"), globals())  # noqa: S102 - generated from the descriptions
            kernels[(op, dtype)] = globals()[name] = _jit(globals()[name])
    return kernels


_KERNELS = _define()


@functools.cache
def _tables(op: str) -> list:
    """quant8.kernel_tables of the optimizer's quantized buffers, on the device (uploaded once)."""
    codes, bases, bounds = quant8.kernel_tables(OPTIMIZERS[op].eight_bit_maps)
    st = stream()
    out = [cuda.to_device(np.ascontiguousarray(t).reshape(-1), stream=st) for t in (codes, bases, bounds)]
    st.synchronize()
    return out


def step_8bit_table(op: str, addrs: np.ndarray, numels: tuple[int, ...], dtype, quantized: np.ndarray,
                    scalars: np.ndarray, constants: tuple, flags: tuple, uses: tuple,
                    rounding_seed: int | None = None) -> None:  # fmt: skip
    """As the CPU's (kernels/fastnorm_kernels/numba_cpu/optim8.py); addresses are device memory."""
    if rounding_seed is not None and np.dtype(dtype) != np.dtype(np.uint16):
        raise ValueError(f"stochastic rounding (rounding_seed) applies to bfloat16 parameters, got {np.dtype(dtype)}")
    kernel = _KERNELS.get((op, "bfloat16_sr" if rounding_seed is not None else np.dtype(dtype)))
    if kernel is None:
        raise TypeError(f"8-bit {op} updates float32, float16 or bfloat16 parameters, got {np.dtype(dtype)}")
    st = stream()
    # the tables by content, each uploaded once (numba_cuda/optim.py): no copy or sync per step
    # once the step counts repeat a scalar row (and the addresses are the same)
    blocks = _optim._chunk_table_host(tuple(numels), QBLOCK)
    host = (addrs.astype(np.int64), blocks, scalars.astype(np.float32), quantized.astype(np.uint8))
    device = [_optim._device_table(np.ascontiguousarray(a)) for a in host]
    codes, bases, bounds = _tables(op)
    k = blocks.shape[0]
    kernel[max(1, min(k, MAX_BLOCKS)), QBLOCK, st](
        address(device[0]), len(numels), address(device[1]), k, address(device[2]), address(device[3]),
        tuple(np.float32(c) for c in constants), tuple(flags), bool(uses[1]), address(codes), address(bases),
        address(bounds), np.uint32((rounding_seed or 0) & 0xFFFFFFFF),
    )  # fmt: skip
