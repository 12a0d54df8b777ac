"""bfloat16 and float16 loads and stores for the CUDA kernels (kernels/fastnorm_kernels/_bits.py explains).

The same storage rule as the CPU kernels (kernels/fastnorm_kernels/numba_cpu/_bits.py): 16-bit values are read
through ``uint16`` pointers and widened to float32; every store rounds once, to nearest even
(a NaN as the canonical 0x7FC0), or for bfloat16 stochastically with the generator every backend
shares. On a GPU the conversions are LLVM ``bitcast`` / ``fpext`` / ``fptrunc`` (NVPTX lowers
the half ones to ``cvt``); under Numba's simulator, where device functions run as Python, they
are NumPy scalar operations with the same results.

``load(u)`` -> float32 and ``store(x, key, e)`` -> uint16 bits, as on the CPU.
"""

from __future__ import annotations

from types import FunctionType

import numpy as np
from numba import cuda

from .. import _bits
from ._device import SIMULATOR

if SIMULATOR:

    def _quiet(fn):
        def run(*args):
            with np.errstate(over="ignore"):
                return fn(*args)

        return run

    _random16 = _quiet(_bits.random16)
    row_key = _quiet(_bits.row_key)

    def load_bf16(u):
        return np.array([np.uint32(u) << np.uint32(16)], np.uint32).view(np.float32)[0]

    def _store(x, bits):
        out = np.empty(1, np.uint16)
        _bits.round_into(out, np.array([x], np.float32), _bits.BFLOAT16, bits)
        return out[0]

    def store_bf16(x, key, e):
        return _store(x, None)

    def store_bf16_stochastic(x, key, e):
        return _store(x, np.array([_random16(np.uint32(key), np.uint32(e))], np.uint32))

    def load_f16(u):
        return np.float32(np.array([u], np.uint16).view(np.float16)[0])

    def f32_bits(x):
        """The bit pattern of a float32 (uint32)."""
        return np.array([x], np.float32).view(np.uint32)[0]

    def f32_of_bits(u):
        """The float32 of a bit pattern."""
        return np.array([u], np.uint32).view(np.float32)[0]

    def store_f16(x, key, e):
        return np.array([np.float16(x)], np.float16).view(np.uint16)[0]

else:
    from .._conversions import conversion_intrinsics

    try:  # numba-cuda >= 0.20 has its own typing layer
        from numba.cuda import types
        from numba.cuda.extending import intrinsic
    except ImportError:  # older numba-cuda / numba.cuda
        from numba import types
        from numba.extending import intrinsic

    _device = cuda.jit(device=True, inline="always")

    _ir = conversion_intrinsics(intrinsic, types)  # kernels/fastnorm_kernels/_conversions.py, as on the CPU
    _f32_from_bits, _bits_from_f32 = _ir.f32_from_bits, _ir.bits_from_f32
    _f32_from_half, _half_from_f32 = _ir.f32_from_half, _ir.half_from_f32

    def _jitted(fn, **names):
        """``fn`` of fastnorm_kernels/_bits.py compiled, its calls to other functions there bound to ``names``."""
        return _device(FunctionType(fn.__code__, {**vars(_bits), **names}, fn.__name__))

    _mix32 = _jitted(_bits.mix32)
    _random16 = _jitted(_bits.random16, mix32=_mix32)
    row_key = _jitted(_bits.row_key, mix32=_mix32)

    @_device
    def load_bf16(u):
        return _f32_from_bits(np.uint32(u) << np.uint32(16))

    @_device
    def store_bf16(x, key, e):
        u = _bits_from_f32(x if x == x else np.float32(np.nan))
        return np.uint16((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16))

    @_device
    def store_bf16_stochastic(x, key, e):
        u = _bits_from_f32(x if x == x else np.float32(np.nan))
        return np.uint16((u + _random16(key, e)) >> np.uint32(16))

    @_device
    def load_f16(u):
        return _f32_from_half(u)

    @_device
    def f32_bits(x):
        return _bits_from_f32(x)

    @_device
    def f32_of_bits(u):
        return _f32_from_bits(u)

    @_device
    def store_f16(x, key, e):
        return _half_from_f32(x)


# -- type-generic conversions for the BatchNorm kernels (as kernels/fastnorm_kernels/numba_cpu/_bits.py): the
# element type of a view says its storage: uint16 bfloat16 bits, int16 float16 bits (the
# launchers view float16 data as int16), float32 and float64 themselves

if SIMULATOR:

    def widen(v):
        """A stored element as a float for arithmetic (bfloat16 / float16 bits to float32)."""
        if isinstance(v, np.uint16):
            return load_bf16(v)
        if isinstance(v, np.int16):
            return np.float32(np.array([v], np.int16).view(np.float16)[0])
        return v

    def narrow(x, out):
        """``x`` rounded to the storage of ``out``'s elements, to nearest even."""
        dtype = out.dtype
        if dtype == np.uint16:
            return store_bf16(np.float32(x), 0, 0)
        if dtype == np.int16:
            return np.array([np.float16(x)], np.float16).view(np.int16)[0]
        return dtype.type(x)

else:
    widen = _ir.widen  # a stored element as a float: bfloat16/float16 bits to float32
    narrow = _ir.narrow  # x rounded to the storage of out's elements (array or typed pointer)
