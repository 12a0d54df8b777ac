"""Optimizer updates with 8-bit blockwise state in NumPy, written to be read: the oracle of the
compiled backends (kernels/fastnorm_kernels/numba_cpu/optim8.py).

Per tensor: dequantize each quantized state buffer (kernels/fastnorm_kernels/quant8.py), run the
32-bit update of this backend (reference/optim.py, float32, the parameter widened from 16 bits),
quantize the new state (a new absmax per block, the nearest code), round the parameter back once.
Tensors whose state is float32 (below ``min_8bit_size``) skip the (de)quantization.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .. import quant8
from .._bits import BFLOAT16, HALF_DTYPES, random16_array, round_into, widen
from ..formulas.optim import OPTIMIZERS
from . import optim as _optim

__all__ = ["step_8bit", "PARAM_DTYPES"]

#: parameter storages: float32, float16, bfloat16 (uint16 bits)
PARAM_DTYPES = (np.dtype(np.float32), np.dtype(np.float16), np.dtype(np.uint16))


def step_8bit(op: str, params: Sequence[np.ndarray], grads: Sequence[np.ndarray],
              states: Sequence[Sequence[np.ndarray]], absmaxes: Sequence[Sequence[np.ndarray | None]],
              steps: Sequence[int], options: dict, rounding_seed: int | None = None) -> None:  # fmt: skip
    """One update of optimizer ``op`` (a description with ``eight_bit`` classes), in place.

    states[b][t]: buffer ``b`` of tensor ``t`` (uint8 codes, or float32 state); absmaxes[b][t]:
    its float32 absmax per block, None where the state is float32; steps[t]: the tensor's step
    count after this step; options: every option of the description; rounding_seed: bfloat16
    parameters rounded stochastically (row 0 of tensor t: kernels/fastnorm_kernels/_bits.py)."""
    d = OPTIMIZERS[op]
    if rounding_seed is not None and any(np.dtype(p.dtype) != BFLOAT16 for p in params):
        raise ValueError("stochastic rounding (rounding_seed) applies to bfloat16 parameters")
    for p in params:
        if np.dtype(p.dtype) not in PARAM_DTYPES:
            raise TypeError(f"8-bit {op} updates float32, float16 or bfloat16 parameters, got {p.dtype}")
    update = getattr(_optim, f"{op}_step")
    maps = [quant8.dynamic_map(signed) for signed in d.eight_bit_maps[: len(states)]]
    for t, (p, g) in enumerate(zip(params, grads)):
        dtype = np.dtype(p.dtype)
        p32 = widen(p, dtype) if dtype in HALF_DTYPES else p
        g32 = widen(g, dtype) if dtype in HALF_DTYPES else g
        values = []
        for b, code in enumerate(maps):
            state, absmax = states[b][t], absmaxes[b][t]
            values.append(state if absmax is None else quant8.dequantize(state, absmax, code))
        lists = {buffer.lists: [v] for buffer, v in zip(d.buffers, values)}
        lists.update({buffer.lists: None for buffer in d.buffers[len(values) :]})
        if d.counts_steps:
            lists["steps"] = [np.array([steps[t] - 1], np.float32)]
        update([p32], [g32], **lists, **options)
        for b, code in enumerate(maps):
            if absmaxes[b][t] is not None:
                states[b][t][...], absmaxes[b][t][...] = quant8.quantize(values[b], code)
        if dtype in HALF_DTYPES:
            bits = None if rounding_seed is None else random16_array(rounding_seed, t, 0, p32.size)
            round_into(p, p32, dtype, bits)
