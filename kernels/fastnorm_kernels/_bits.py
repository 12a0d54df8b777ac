"""16-bit floats for kernels that compute in float32: bfloat16 and float16 storage, rounding.

NumPy has float16 but no bfloat16, and Numba has neither as arithmetic on the CPU. Every
backend therefore passes 16-bit tensors as ``uint16`` bit patterns, tagged by a dtype:

* :data:`FLOAT16` (``np.float16``): IEEE half. NumPy arrays of it are used as they are.
* :data:`BFLOAT16` (``np.uint16``): bfloat16 bit patterns (the upper half of a float32). A
  ``uint16`` array handed to an optimizer or BatchNorm kernel *is* bfloat16: these kernels take
  no integer data.

Values are widened to float32 for all arithmetic and rounded once when stored: round to nearest
even (what torch does), or for bfloat16 optionally **stochastic rounding**: add 16 uniform random
bits to the float32 bit pattern before truncating, so that the expected stored value equals the
float32 value (updates smaller than one bfloat16 ulp survive on average). A NaN is stored as the
canonical quiet NaN (bfloat16 0x7FC0).

The random bits come from a counter-based generator, the same on every backend, so results are
reproducible and independent of thread count and chunking: for the element ``e`` of tensor ``t``
in stored row ``row`` (0 the parameter, 1..3 the state buffers) of a launch with 32-bit
``seed``::

    key = mix32(seed ^ mix32((4*t + row + 0x9E3779B9) mod 2**32))
    bits = mix32(key ^ (e * 0x9E3779B1 mod 2**32)) >> 16

``mix32`` is murmur3's 32-bit finaliser (a bijection with full avalanche). The scalar functions
here are plain integer arithmetic, compiled for the CPU and GPU loops like kernels/fastnorm_kernels/formulas; the
``*_array`` functions are their NumPy versions for the reference backend.
"""

from __future__ import annotations

import numpy as np

FLOAT16 = np.dtype(np.float16)
BFLOAT16 = np.dtype(np.uint16)
HALF_DTYPES = (FLOAT16, BFLOAT16)

_GOLDEN_KEY = 0x9E3779B9
_GOLDEN_INDEX = 0x9E3779B1


def is_half(dtype) -> bool:
    """Whether ``dtype`` is one of the 16-bit storage dtypes."""
    return np.dtype(dtype) in HALF_DTYPES


# -- scalar versions (compiled into the Numba loops) ---------------------------------------------


# Numba widens uint32 arithmetic to 64 bits: every product and sum is cast back to uint32 (the
# wrap-around the generator is defined with).


def mix32(h):
    """murmur3 fmix32 of a uint32 (uint32 arithmetic throughout)."""
    h = np.uint32(h ^ (h >> np.uint32(16)))
    h = np.uint32(h * np.uint32(0x85EBCA6B))
    h = np.uint32(h ^ (h >> np.uint32(13)))
    h = np.uint32(h * np.uint32(0xC2B2AE35))
    return np.uint32(h ^ (h >> np.uint32(16)))


def row_key(seed, t, row):
    """The generator key of stored row ``row`` of tensor ``t`` (uint32s)."""
    return mix32(np.uint32(seed ^ mix32(np.uint32(t * np.uint32(4) + row + np.uint32(_GOLDEN_KEY)))))


def random16(key, e):
    """16 uniform random bits (as a uint32) for element ``e`` (uint32) under ``key``."""
    return mix32(np.uint32(key ^ np.uint32(e * np.uint32(_GOLDEN_INDEX)))) >> np.uint32(16)


# -- NumPy versions (the reference backend) ------------------------------------------------------


def _mix32_array(h: np.ndarray) -> np.ndarray:
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> np.uint32(13))
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> np.uint32(16))


def random16_array(seed: int, t: int, row: int, n: int) -> np.ndarray:
    """The random bits of elements 0..n-1 of tensor ``t``'s row ``row`` (uint32 array)."""
    with np.errstate(over="ignore"):
        key = _mix32_array(np.uint32(seed) ^ _mix32_array(np.uint32((4 * t + row + _GOLDEN_KEY) % 2**32)))
        e = np.arange(n, dtype=np.uint64).astype(np.uint32)
        return _mix32_array(key ^ (e * np.uint32(_GOLDEN_INDEX))) >> np.uint32(16)


def widen(a: np.ndarray, dtype) -> np.ndarray:
    """A float32 copy of a 16-bit array of storage ``dtype``."""
    if np.dtype(dtype) == BFLOAT16:
        return (a.astype(np.uint32) << np.uint32(16)).view(np.float32)
    return a.astype(np.float32)


def round_into(out: np.ndarray, x: np.ndarray, dtype, random_bits: np.ndarray | None = None) -> None:
    """``out[...] = x`` (float32) rounded to storage ``dtype``: to nearest even, or for
    bfloat16 stochastically with ``random_bits`` (uint32 values below 2**16, one per element)."""
    if np.dtype(dtype) == FLOAT16:
        out[...] = x.astype(np.float16)
        return
    x = np.where(np.isnan(x), np.float32(np.nan), np.asarray(x, np.float32))  # NaN: canonical 0x7FC0
    u = np.ascontiguousarray(x, np.float32).view(np.uint32)
    with np.errstate(over="ignore"):
        if random_bits is None:
            rounded = (u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
        else:
            rounded = (u + random_bits.reshape(u.shape)) >> np.uint32(16)
    out[...] = rounded.astype(np.uint16).reshape(out.shape)


def round_float64_into(out: np.ndarray, x: np.ndarray, dtype) -> None:
    """``out[...] = x`` (float64) rounded once to storage ``dtype`` (to nearest even): float16
    directly (NumPy's conversion is correctly rounded); bfloat16 through float32 rounded to odd,
    which makes the second rounding exact (no double-rounding error)."""
    x = np.asarray(x, np.float64)
    if np.dtype(dtype) == FLOAT16:
        out[...] = x.astype(np.float16)
        return
    with np.errstate(over="ignore", invalid="ignore"):
        r = x.astype(np.float32)
        wide = r.astype(np.float64)
        inexact = (wide != x) & ~np.isnan(x)
        r = np.where(inexact & (np.abs(wide) > np.abs(x)), np.nextafter(r, np.float32(0)), r)  # toward zero
        odd = (np.ascontiguousarray(r, np.float32).view(np.uint32) | inexact.astype(np.uint32)).view(np.float32)
    round_into(out, odd, BFLOAT16)
