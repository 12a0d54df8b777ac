"""bfloat16 and float16 loads and stores for the Numba CPU loops (kernels/_bits.py explains).

Numba has no bfloat16 type and no CPU float16 arithmetic: 16-bit storage is read through
``uint16`` pointers and converted with LLVM ``bitcast`` / ``fpext`` / ``fptrunc``, emitted by
the intrinsics below (../shared/NUMBA-NOTES.md, "16-bit floats"). Every store rounds once, to
nearest even (or stochastically for bfloat16). The NaN case is a select, not a branch: an early
return inside the element loop stopped it from vectorising (20x slower, measured here).

``load(u)`` -> float32 and ``store(x, key, e)`` -> uint16 bits have one signature for every
storage so that the loops take them as arguments (``key``, ``e``: the stochastic rounding
generator's row key and element index, unused by the round-to-nearest stores).
"""

from __future__ import annotations

from types import FunctionType

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from .. import _bits


@intrinsic
def _f32_from_bits(typingctx, u):
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.uint32), codegen


@intrinsic
def _bits_from_f32(typingctx, x):
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.uint32(types.float32), codegen


@intrinsic
def _f32_from_half(typingctx, u):
    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return types.float32(types.uint16), codegen


@intrinsic
def _half_from_f32(typingctx, x):
    def codegen(context, builder, signature, args):  # fptrunc rounds to nearest even
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))

    return types.uint16(types.float32), codegen


def _jitted(fn, **names):
    """``fn`` of kernels/_bits.py compiled, its calls to other functions there bound to ``names``."""
    return njit(inline="always")(FunctionType(fn.__code__, {**vars(_bits), **names}, fn.__name__))


_mix32 = _jitted(_bits.mix32)
_random16 = _jitted(_bits.random16, mix32=_mix32)
row_key = _jitted(_bits.row_key, mix32=_mix32)


@njit(inline="always")
def load_bf16(u):
    return _f32_from_bits(np.uint32(u) << np.uint32(16))


@njit(inline="always")
def store_bf16(x, key, e):
    u = _bits_from_f32(x if x == x else np.float32(np.nan))  # NaN: the canonical quiet NaN 0x7FC0
    return np.uint16((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16))


@njit(inline="always")
def store_bf16_stochastic(x, key, e):
    u = _bits_from_f32(x if x == x else np.float32(np.nan))
    return np.uint16((u + _random16(key, e)) >> np.uint32(16))


@njit(inline="always")
def load_f16(u):
    return _f32_from_half(u)


@njit(inline="always")
def store_f16(x, key, e):
    return _half_from_f32(x)
