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
    ai, bi = (x.view(np.int16).astype(np.int32) for x in (a, b))  # bit patterns, sign-magnitude
    ai = np.where(ai < 0, -(ai & 0x7FFF), ai)
    bi = np.where(bi < 0, -(bi & 0x7FFF), bi)
    exponent, mantissa = _NAN_MASKS[a.dtype]

    def nan(x):
        return ((x & exponent) == exponent) & ((x & mantissa) != 0)

    bits_a, bits_b = (x.view(np.int16).astype(np.int32) for x in (a, b))
    return np.where(nan(bits_a) & nan(bits_b), 0, np.abs(ai - bi)).astype(np.int32)


def _bits(t: torch.Tensor) -> np.ndarray:
    """A 16-bit tensor's bit patterns as NumPy holds them (bfloat16: uint16, float16: float16)."""
    assert t.dtype in (torch.bfloat16, torch.float16), t.dtype
    bits = t.detach().cpu().contiguous().view(torch.int16).numpy()
    return bits.view(np.uint16 if t.dtype == torch.bfloat16 else np.float16)


#: float32 (rtol, atol) between two libraries computing the same float32 value in different orders
#: of operations: a few float32 ulps of the operands (absolute: of operands up to ~10, where the
#: result cancels them)
FLOAT32_ORDER = (1e-5, 1e-6)


def bfloat16_ulp(t: torch.Tensor) -> torch.Tensor:
    """The spacing of bfloat16 values at |t| (float32 t): 2^(exponent - 8) for t = m * 2^exponent,
    0.5 <= |m| < 1, and the smallest subnormal's 2^-133 at zero and below."""
    _, exponent = torch.frexp(t)
    ulp = torch.ldexp(torch.ones_like(t), (exponent - 8).clamp(min=-133))
    return torch.where(t == 0, torch.full_like(t, 2.0**-133), ulp)


def assert_a_neighbour(ours: torch.Tensor, exact: torch.Tensor, what: str, tolerance=FLOAT32_ORDER) -> None:
    """Every bfloat16 value of ``ours`` is within one bfloat16 ulp of the float32 ``exact``: one of
    its two bfloat16 neighbours (round to nearest or stochastic rounding of it), with ``tolerance``
    for the two computations of ``exact``; non-finite values equal."""
    assert ours.dtype == torch.bfloat16, f"{what}: {ours.dtype}"
    a, b = ours.detach().float(), exact.detach().float()
    finite = torch.isfinite(b)
    assert torch.equal(torch.isfinite(a), finite), f"{what}: non-finite values differ"
    assert torch.equal(a[~finite], b[~finite]), f"{what}: non-finite values differ"
    rtol, atol = tolerance
    bad = finite & ((a - b).abs() > bfloat16_ulp(b) + rtol * b.abs() + atol)
    assert not bad.any(), (
        f"{what}: {int(bad.sum())} values are not bfloat16 neighbours of the float32 result, e.g. "
        f"{a[bad][:3].tolist()} for {b[bad][:3].tolist()}"
    )


def assert_within_torchs_error(names, truth, theirs, ours):
    """16-bit results against float64 ``truth`` on the same values: each of ``ours`` has the dtype
    of ``theirs`` (torch's in the same dtype) and is within 2x torch's own error, or 2 ulps of its
    dtype at the truth's scale."""
    for name, e, t, m in zip(names, truth, theirs, ours):
        assert m.dtype == t.dtype, f"{name}: {m.dtype}, torch's {t.dtype}"
        error = (m.double() - e).abs().max().item()
        ulp = torch.finfo(m.dtype).eps * max(e.abs().max().item(), 1e-30)
        bound = max(2 * (t.double() - e).abs().max().item(), 2 * ulp)
        assert error <= bound, f"{name}: error {error:.3e} > {bound:.3e}"
