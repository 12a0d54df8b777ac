"""bfloat16 and float16 loads and stores for the Numba CPU loops (kernels/fastnorm_kernels/_bits.py explains).

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
from .._conversions import conversion_intrinsics

_ir = conversion_intrinsics(intrinsic, types)  # kernels/fastnorm_kernels/_conversions.py
_f32_from_bits, _bits_from_f32 = _ir.f32_from_bits, _ir.bits_from_f32
_f32_from_half, _half_from_f32 = _ir.f32_from_half, _ir.half_from_f32


def _jitted(fn, **names):
    """``fn`` of kernels/fastnorm_kernels/_bits.py compiled, its calls to other functions there bound to ``names``."""
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


# -- type-generic conversions for the BatchNorm passes ------------------------------------------
# There the element type of an array says its storage: uint16 bfloat16 bits, int16 float16 bits
# (the launchers view float16 arrays as int16), float32 and float64 themselves; one kernel
# source serves all four, compiled per element type.


widen = _ir.widen  # a stored element as a float: bfloat16/float16 bits to float32
narrow = _ir.narrow  # x rounded to the storage of out's elements, to nearest even


@intrinsic
def accumulator(typingctx, v):
    """Zero of the type sums of a stored element accumulate in within one plane: float32 for
    16-bit storage (an 8- or 11-bit significand summed over a plane in float32 keeps far more
    than the output's precision; the planes then merge in float64), float64 otherwise."""
    if v in (types.uint16, types.int16):
        return types.float32(v), lambda context, builder, signature, args: ir.Constant(ir.FloatType(), 0.0)
    if isinstance(v, types.Float):
        return types.float64(v), lambda context, builder, signature, args: ir.Constant(ir.DoubleType(), 0.0)
    return None


@intrinsic
def cast_like(typingctx, v, like):
    """``v`` converted to the type of ``like`` (a float)."""
    if not isinstance(like, types.Float):
        return None

    def codegen(context, builder, signature, args):
        return context.cast(builder, args[0], v, like)

    return like(v, like), codegen
