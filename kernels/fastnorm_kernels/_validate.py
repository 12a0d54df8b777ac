"""Argument checks run before a compiled kernel is called: a clear error, never a Numba typing
traceback, and never an array of the wrong length handed to a kernel that trusts it."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ._bits import BFLOAT16, HALF_DTYPES

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def numpy_dense(a) -> bool:
    return type(a) is np.ndarray and a.flags.c_contiguous


def device_dense(a) -> bool:
    """A C-contiguous array a numba.cuda kernel can take: a device array (numba's, or anything with
    ``__cuda_array_interface__``) or a host NumPy array (numba copies it over and back)."""
    if type(a) is np.ndarray:
        return a.flags.c_contiguous
    if hasattr(a, "is_c_contiguous"):  # numba DeviceNDArray (and the simulator's)
        return a.is_c_contiguous()
    cai = getattr(a, "__cuda_array_interface__", None)
    if cai is None:
        return False
    strides, shape = cai.get("strides"), cai["shape"]
    if strides is None:
        return True
    expected, step = [], np.dtype(cai["typestr"]).itemsize
    for n in reversed(shape):
        expected.append(step)
        step *= n
    return all(n == 1 or s == e for n, s, e in zip(shape, strides, reversed(expected)))


def compute_dtype(dtype) -> np.dtype:
    """The dtype kernels compute and keep per-channel values in for storage ``dtype``: float32
    for the 16-bit ones (kernels/fastnorm_kernels/_bits.py), else the dtype itself."""
    dtype = np.dtype(dtype)
    return np.dtype(np.float32) if dtype in HALF_DTYPES else dtype


def check_arrays(x, y, per_channel, extra=(), *, backend: str = "numba", dense: Callable = numpy_dense,
                 dtypes: tuple = FLOAT_DTYPES) -> None:  # fmt: skip
    """x, y (and ``extra``): C-contiguous (N, C, S) arrays of one storage dtype among ``dtypes``;
    ``per_channel``: (C,) arrays of its compute dtype (:func:`compute_dtype`) or None. Cheap on
    the success path (it runs on every call)."""
    dtype = np.dtype(getattr(x, "dtype", None) or np.object_)
    if dtype not in dtypes:
        names = " or ".join("bfloat16 (uint16 bits)" if d == BFLOAT16 else str(d) for d in dtypes)
        raise TypeError(f"the {backend} backend computes in {names}, got {dtype}")
    shape = tuple(x.shape)
    if len(shape) != 3:
        raise ValueError(f"kernels take (N, C, S) arrays, got shape {shape}")
    for name, a in (("x", x), ("y", y), *(("out", e) for e in extra if e is not None)):
        if tuple(getattr(a, "shape", ())) != shape or a.dtype != dtype:
            raise ValueError(f"{name}: expected a {dtype} array of shape {shape}, got {_describe(a)}")
        if not dense(a):
            raise ValueError(f"{name}: the {backend} kernels need C-contiguous arrays")
    c = (shape[1],)
    compute = compute_dtype(dtype)
    for a in per_channel:
        if a is not None and (tuple(getattr(a, "shape", ())) != c or a.dtype != compute or not dense(a)):
            raise ValueError(f"per-channel arrays must be dense {compute} of shape {c}, got {_describe(a)}")


def check_float64_vectors(c: int, *arrays, dense: Callable = numpy_dense) -> None:
    """Statistics outputs: dense float64 arrays of shape (C,)."""
    for a in arrays:
        if tuple(getattr(a, "shape", ())) != (c,) or a.dtype != np.float64 or not dense(a):
            raise ValueError(f"mean and var must be dense float64 arrays of shape ({c},), got {_describe(a)}")


def _describe(a) -> str:
    if hasattr(a, "dtype") and hasattr(a, "shape"):
        return f"{a.dtype} array of shape {tuple(a.shape)}"
    return type(a).__name__
