"""Argument checks run before a compiled kernel is called: a clear error, never a Numba typing traceback."""

from __future__ import annotations

import numpy as np

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def check_arrays(x, y, per_channel, extra=()) -> None:
    """x, y (and ``extra``): C-contiguous (N, C, S) arrays of one float dtype; ``per_channel``:
    (C,) arrays of that dtype or None. Cheap on the success path (it runs on every call)."""
    if type(x) is not np.ndarray or x.dtype not in FLOAT_DTYPES or x.ndim != 3:
        if not isinstance(x, np.ndarray) or x.dtype not in FLOAT_DTYPES:
            raise TypeError(
                f"the numba backend computes in float32 or float64, got {getattr(x, 'dtype', type(x).__name__)}"
            )
        raise ValueError(f"kernels take (N, C, S) arrays, got shape {x.shape}")
    shape, dtype = x.shape, x.dtype
    for name, a in (("x", x), ("y", y), *(("out", e) for e in extra if e is not None)):
        if type(a) is not np.ndarray or a.shape != shape or a.dtype != dtype:
            raise ValueError(f"{name}: expected a {dtype} array of shape {shape}, got {_describe(a)}")
        if not a.flags.c_contiguous:
            raise ValueError(f"{name}: the numba kernels need C-contiguous arrays")
    c = (shape[1],)
    for a in per_channel:
        if a is not None and (type(a) is not np.ndarray or a.shape != c or a.dtype != dtype):
            raise ValueError(f"per-channel arrays must be {dtype} of shape {c}, got {_describe(a)}")


def _describe(a) -> str:
    if isinstance(a, np.ndarray):
        return f"{a.dtype} array of shape {a.shape}"
    return type(a).__name__
