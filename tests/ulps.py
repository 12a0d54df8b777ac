"""Distances between 16-bit floats in units in the last place, for the tests that compare 16-bit
results: the mixed-precision tests (torch tensors) and the simulator's kernel tests (NumPy arrays
of bit patterns, the kernels' convention: uint16 for bfloat16, float16 or int16 for float16)."""

from __future__ import annotations

import numpy as np
import torch

# (exponent mask, mantissa mask) of each 16-bit format, by the NumPy dtype that holds its bits
_NAN_MASKS = {np.dtype(np.uint16): (0x7F80, 0x007F), np.dtype(np.float16): (0x7C00, 0x03FF),
              np.dtype(np.int16): (0x7C00, 0x03FF)}  # fmt: skip


def ulps16(a, b):
    """|a - b| in ulps, elementwise: two bfloat16 / float16 tensors (result: an int32 tensor) or
    two NumPy arrays of the same 16-bit kind (result: an int32 array). Signs and magnitudes are
    made one monotonic integer line (+0 and -0 are 0 apart); NaN against NaN counts 0."""
    if isinstance(a, torch.Tensor):
        return torch.from_numpy(ulps16(_bits(a), _bits(b)))
    a, b = np.asarray(a), np.asarray(b)
    assert a.dtype == b.dtype and a.dtype in _NAN_MASKS, f"16-bit arrays of one kind, not {a.dtype}, {b.dtype}"
    ai, bi = (x.view(np.int16).astype(np.int32) for x in (a, b))
    ai = np.where(ai < 0, -(ai & 0x7FFF), ai)
    bi = np.where(bi < 0, -(bi & 0x7FFF), bi)
    exponent, mantissa = _NAN_MASKS[a.dtype]

    def nan(x):
        return ((x & exponent) == exponent) & ((x & mantissa) != 0)

    raw_a, raw_b = (x.view(np.int16).astype(np.int32) for x in (a, b))
    return np.where(nan(raw_a) & nan(raw_b), 0, np.abs(ai - bi)).astype(np.int32)


def _bits(t: torch.Tensor) -> np.ndarray:
    """A 16-bit tensor's bit patterns as NumPy holds them (bfloat16: uint16, float16: float16)."""
    assert t.dtype in (torch.bfloat16, torch.float16), t.dtype
    bits = t.detach().cpu().contiguous().view(torch.int16).numpy()
    return bits.view(np.uint16 if t.dtype == torch.bfloat16 else np.float16)
