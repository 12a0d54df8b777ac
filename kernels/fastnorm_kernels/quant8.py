"""Blockwise 8-bit quantization of optimizer state: bitsandbytes' dynamic maps, nearest code.

Dettmers et al. 2022, "8-bit Optimizers via Block-wise Quantization". A state tensor (an Adam
moment) is cut into blocks of :data:`BLOCK` consecutive values; each block keeps one float32
``absmax`` (its largest magnitude) and one uint8 code per value, an index into a 256-entry
**dynamic map** of values in [-1, 1]: a sign, a run of zero bits giving a decimal exponent
(10^-6 .. 10^0) and linear fractions in the remaining bits, so that small values keep their
relative precision. The first moment uses the signed map, the second (never negative) the
unsigned one, which spends the sign bit on twice the fractions::

    dequantize:  x = map[code] * absmax[block]
    quantize:    absmax = max |x| over the block;  code = nearest(map, x / absmax)

``nearest`` is ``bucketize(x, midpoints)`` with ``midpoints = (map[:-1] + map[1:]) / 2`` in float32
(a value on a midpoint takes the lower code): the readable definition, which the reference
backend runs; one exception, in the unsigned map a positive value is never coded 0 (it takes
the smallest positive code: :func:`thresholds` says why). The kernels find the same code in two
loads: the sign and the float32 bits of ``|x|`` (its exponent and top :data:`MANTISSA_BITS`
mantissa bits) index a cell of a table built here, and every cell holds at most one threshold,
so ``code = base[cell] + (x > bound[cell])``.
bitsandbytes' own CPU quantizer (a binary search) agrees with the nearest code for 99.85% of
normal values (signed map) and 99.7% (unsigned); it differs by one code, near midpoints.

A block whose values are all zero has absmax 0 and codes of 0.0 (dequantized: 0); a NaN in a
block makes its absmax NaN (every value of the block dequantizes to NaN, as torch's 32-bit state
would carry the NaN on).

The maps equal ``bitsandbytes.functional.create_dynamic_map(signed)`` bit for bit (the float32
steps of torch.linspace are repeated here), so that checkpoints move between the two libraries.
"""

from __future__ import annotations

import functools

import numpy as np

#: values per block (bitsandbytes' optimizers use 256)
BLOCK = 256
#: the mantissa bits of |x| that, with its exponent, pick a table cell
MANTISSA_BITS = 7
#: the smallest binade the table resolves: 2**-24 (every map's smallest positive midpoint is above)
_LOW_EXPONENT = 127 - 24
_ROWS = 127 - _LOW_EXPONENT + 2  # row 0: below 2**-24; rows 1..: binades 2**-24 .. 2**0
#: cells per sign of the nearest-code table
CELLS = _ROWS << MANTISSA_BITS


def _linspace32(start: float, end: float, steps: int) -> np.ndarray:
    """torch.linspace(start, end, steps, dtype=torch.float32): a float32 step, the first half
    counted from ``start``, the second from ``end``, each value one fused multiply-add (here in
    float64, where the product of a float32 and a small integer is exact)."""
    start32, end32 = np.float64(np.float32(start)), np.float64(np.float32(end))
    step = np.float64((np.float32(end) - np.float32(start)) / np.float32(steps - 1))
    idx = np.arange(steps)
    out = np.where(idx < steps // 2, start32 + step * idx, end32 - step * (steps - idx - 1))
    return out.astype(np.float32)


@functools.cache
def dynamic_map(signed: bool) -> np.ndarray:
    """bitsandbytes' dynamic quantization map (256 sorted float32 values; read-only).

    signed: 127 negative values, 0 and 128 positive ones up to 1.0 (first moments); unsigned:
    0 and 255 positive values up to 1.0 (second moments). Decade ``i`` (10^(i-6) .. 10^(i-5))
    holds 2^i (signed) or 2^(i+1) (unsigned) linear steps."""
    max_exponent_bits, non_sign_bits = 7, 7
    data: list[float] = []
    for i in range(max_exponent_bits):
        items = 2 ** (i + non_sign_bits - max_exponent_bits) + 1 if signed else 2 ** (i + 1) + 1
        bounds = _linspace32(0.1, 1.0, items)
        means = (bounds[:-1] + bounds[1:]) / np.float32(2.0)
        scaled = np.float32(10 ** (-(max_exponent_bits - 1) + i)) * means  # float32, as torch's
        data += scaled.tolist()
        if signed:
            data += (-scaled).tolist()
    data += [0.0, 1.0]
    data += [0.0] * (256 - len(data))
    out = np.array(sorted(data), np.float32)
    out.flags.writeable = False
    return out


def midpoints(code: np.ndarray) -> np.ndarray:
    """The 255 float32 midpoints between consecutive codes (bucketize's boundaries)."""
    return ((code[:-1] + code[1:]) / np.float32(2.0)).astype(np.float32)


@functools.cache
def thresholds(signed: bool) -> np.ndarray:
    """The boundaries between the codes of a map: its midpoints, except that for the unsigned map
    (second moments) the one between 0 and the smallest positive code is 0 itself, so that a
    positive value is never coded as 0. Coded as nearest, a second moment below 1.6e-7 of its
    block's absmax would become exactly 0 while its first moment (signed map: 2.7e-7 of a larger
    absmax) does not, and Adam's step m / (sqrt(v) + eps) would be m / eps: steps of thousands of
    learning rates on weights whose gradients are tiny next to their block's largest (a BatchNorm
    MLP's background pixels). With the smallest code instead, sqrt(v) stays within a factor of the
    true one."""
    bounds = midpoints(dynamic_map(signed))
    if not signed:
        bounds = bounds.copy()
        bounds[0] = 0.0
    bounds.flags.writeable = False
    return bounds


def nearest(code: np.ndarray, x: np.ndarray) -> np.ndarray:
    """uint8 index of the code nearest each float32 value of ``x`` (ties: the lower code), a
    positive value never 0 in the unsigned map (:func:`thresholds`)."""
    signed = bool(code[0] < 0)
    return np.searchsorted(thresholds(signed), x, side="left").astype(np.uint8)


@functools.cache
def lookup_table(signed: bool) -> tuple[np.ndarray, np.ndarray]:
    """The kernels' nearest-code table of a map: ``base`` uint8 and ``bound`` float32, both of
    2 * CELLS entries, index ``sign * CELLS + cell(|x|)`` (sign 1 for a negative x); then

        code = (base[index] + (x > bound[index])) mod 256

    equals :func:`nearest` for every float32 x in [-1, 1]. For x >= 0 a cell's bound is the one
    midpoint inside it (+inf where there is none); for x < 0 it is that midpoint negated with
    ``base`` one lower (-inf where there is none), which turns "|x| at or beyond the midpoint:
    one code lower" into the same comparison."""
    bounds = thresholds(signed).astype(np.float64)
    base = np.zeros(2 * CELLS, np.int64)
    bound = np.zeros(2 * CELLS, np.float32)
    for c in range(CELLS):
        row, frac = divmod(c, 1 << MANTISSA_BITS)
        if row == 0:
            lo, hi = 0.0, 2.0**-24
        else:
            lo = 2.0 ** (row - 25) * (1 + frac / (1 << MANTISSA_BITS))
            hi = 2.0 ** (row - 25) * (1 + (frac + 1) / (1 << MANTISSA_BITS))
        # x in [lo, hi): code = count(bounds < x), one more past a midpoint in [lo, hi)
        inside = bounds[(bounds >= lo) & (bounds < hi)]
        if len(inside) > 1:
            raise AssertionError(f"cell {c} holds {len(inside)} midpoints: more mantissa bits needed")
        base[c] = np.count_nonzero(bounds < lo)
        bound[c] = inside[0] if len(inside) else np.inf
        # x in (-hi, -lo]: code = count(bounds < x), one less once x <= a midpoint in (-hi, -lo)
        inside = bounds[(bounds > -hi) & (bounds < -lo)]
        if len(inside) > 1:
            raise AssertionError(f"cell {c} holds {len(inside)} negative midpoints")
        top = np.count_nonzero(bounds < -lo) if lo > 0 else np.count_nonzero(bounds < 0)
        if len(inside):
            base[CELLS + c], bound[CELLS + c] = top - 1, inside[0]
        else:
            base[CELLS + c], bound[CELLS + c] = top - 1, -np.inf
    base = (base % 256).astype(np.uint8)
    for t in (base, bound):
        t.flags.writeable = False
    return base, bound


@functools.cache
def kernel_tables(signed: tuple[bool, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """What the compiled kernels read for two quantized buffers of the given maps (a second map
    repeats the first where an optimizer has one buffer): codes (2, 256) float32, bases
    (2 * 2 * CELLS,) uint8 and bounds (2, 2 * CELLS) float32 (:func:`lookup_table`)."""
    signed = (*signed, *signed[:1])[:2]
    codes = np.stack([dynamic_map(s) for s in signed])
    bases = np.concatenate([lookup_table(s)[0] for s in signed])
    bounds = np.stack([lookup_table(s)[1] for s in signed])
    return codes, bases, bounds


def cell(bits):
    """The table cell of a float32's bit pattern (an int64, sign bit cleared): row = binade from
    2**-24 (0 below, capped at 1.0's), then the top MANTISSA_BITS mantissa bits. Scalar: the
    kernels compile it as it is."""
    row = min(max((bits >> 23) - (_LOW_EXPONENT - 1), 0), _ROWS - 1)
    frac = (bits >> (23 - MANTISSA_BITS)) & ((1 << MANTISSA_BITS) - 1)
    return (row << MANTISSA_BITS) + frac * (row > 0)


def cells(bits: np.ndarray) -> np.ndarray:
    """:func:`cell` of an int64 array."""
    row = np.clip((bits >> 23) - (_LOW_EXPONENT - 1), 0, _ROWS - 1)
    frac = (bits >> (23 - MANTISSA_BITS)) & ((1 << MANTISSA_BITS) - 1)
    return (row << MANTISSA_BITS) + frac * (row > 0)


def blocks(n: int) -> int:
    """Number of blocks of a tensor of ``n`` values."""
    return -(-n // BLOCK)


def quantize(x: np.ndarray, code: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(codes uint8 of x's shape, absmax float32 (blocks,)) of a float32 array: readable."""
    flat = np.ascontiguousarray(x, np.float32).reshape(-1)
    n = flat.size
    padded = np.zeros(blocks(n) * BLOCK, np.float32)
    padded[:n] = flat
    rows = padded.reshape(-1, BLOCK)
    with np.errstate(invalid="ignore"):
        absmax = np.abs(rows).max(axis=1)  # NaN where the block holds one
        safe = np.where(absmax == 0, np.float32(1), absmax).astype(np.float32)
        scaled = (rows / safe[:, None]).reshape(-1)[:n]
    return nearest(code, scaled).reshape(x.shape), absmax.astype(np.float32)


def dequantize(q: np.ndarray, absmax: np.ndarray, code: np.ndarray) -> np.ndarray:
    """float32 values of codes ``q`` (any shape) with their blocks' ``absmax``."""
    flat = q.reshape(-1)
    scale = np.repeat(absmax.astype(np.float32), BLOCK)[: flat.size]
    return (code[flat] * scale).reshape(q.shape)
