"""The LayerNorm, RMSNorm and GroupNorm CUDA kernels, run by Numba's simulator on the CPU, against
the NumPy reference (float64 inside). Small shapes (every GPU thread is a Python thread here) that
still cover rows shorter and longer than a block, several row tiles and row splits in the
parameter sums, groups of one channel, and planes of one position."""

from __future__ import annotations

import numpy as np
import pytest
from numba import cuda
from ulps import ulps16

import fastnorm_kernels.numba_cuda as kc
import fastnorm_kernels.reference as ref

assert kc.SIMULATOR and cuda.is_available()

# (M, D): rows shorter than a block, longer (several passes per thread), many rows (row splits of
# the dweight sums: ROWS_PER_SPLIT is shrunk to 8), odd columns across two column tiles
ROW_SHAPES = [(3, 5), (2, 150), (24, 3), (9, 37)]
# (N, C, S, G)
GROUP_SHAPES = [(2, 6, 5, 3), (3, 4, 1, 2), (2, 8, 70, 4), (5, 3, 7, 3), (1, 4, 9, 1)]


@pytest.fixture(autouse=True)
def small_splits(monkeypatch):
    """Row splits of a few rows, so that small shapes have several (the simulator is slow)."""
    from fastnorm_kernels.numba_cuda import layernorm

    monkeypatch.setattr(layernorm, "ROWS_PER_SPLIT", 8)


def _run(k, fn, arrays, outputs, *scalars):
    """Call ``k.fn`` with device copies of ``arrays`` (name -> array or None), in order; returns
    the host values of the ``outputs`` names."""
    dev = cuda.to_device if k is kc else np.copy
    on = {name: None if a is None else dev(a) for name, a in arrays.items()}
    getattr(k, fn)(*[on[name] if isinstance(name, str) else name for name in scalars])
    return {name: (on[name].copy_to_host() if k is kc else on[name]) for name in outputs if on[name] is not None}


def _close(got, want, dtype, what):
    tol = 1e-5 if np.dtype(dtype) == np.float32 else 1e-12
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol, err_msg=what)


def _layer(k, center, x, w, b, dy, eps=1e-5, want=("dx", "dw", "db")):
    m, d = x.shape
    c = np.float64 if x.dtype == np.float64 else np.float32
    fwd = {"x": x, "w": w, "b": b, "y": np.empty_like(x), "mean": np.zeros(m, c), "rstd": np.zeros(m, c)}
    if center:
        out = _run(k, "layer_norm_forward", fwd, ("y", "mean", "rstd"), "x", "w", "b", eps, "y", "mean", "rstd")
    else:
        out = _run(k, "rms_norm_forward", fwd, ("y", "rstd"), "x", "w", eps, "y", "rstd")
        out["mean"] = np.zeros(m, c)
    bwd = {"dy": dy, "x": x, "mean": out["mean"], "rstd": out["rstd"], "w": w,
           "dx": np.empty_like(x) if "dx" in want else None,
           "dw": np.zeros(d, c) if "dw" in want else None,
           "db": np.zeros(d, c) if "db" in want and center else None}  # fmt: skip
    if center:
        out |= _run(k, "layer_norm_backward", bwd, ("dx", "dw", "db"), "dy", "x", "mean", "rstd", "w", "dx", "dw", "db")
    else:
        out |= _run(k, "rms_norm_backward", bwd, ("dx", "dw"), "dy", "x", "rstd", "w", "dx", "dw")
    return out


def _group(k, x, w, b, dy, groups, eps=1e-5):
    n, ch, s = x.shape
    c = np.float64 if x.dtype == np.float64 else np.float32
    fwd = {"x": x, "w": w, "b": b, "y": np.empty_like(x), "mean": np.zeros(n * groups, c),
           "rstd": np.zeros(n * groups, c)}  # fmt: skip
    out = _run(k, "group_norm_forward", fwd, ("y", "mean", "rstd"), "x", "w", "b", groups, eps, "y", "mean", "rstd")
    bwd = {"dy": dy, "x": x, "mean": out["mean"], "rstd": out["rstd"], "w": w, "dx": np.empty_like(x),
           "dw": np.zeros(ch, c), "db": np.zeros(ch, c)}  # fmt: skip
    out |= _run(k, "group_norm_backward", bwd, ("dx", "dw", "db"), "dy", "x", "mean", "rstd", "w", groups, "dx",
                "dw", "db")  # fmt: skip
    return out


def _data(shape, dtype, channels, seed=0):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * 2 + 3).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    w = (rng.random(channels) + 0.5).astype(dtype)
    b = rng.standard_normal(channels).astype(dtype)
    return x, dy, w, b


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("center", [True, False], ids=["layer", "rms"])
@pytest.mark.parametrize("shape", ROW_SHAPES, ids=str)
def test_row_norm_kernels(shape, center, dtype):
    x, dy, w, b = _data(shape, dtype, shape[1])
    got, want = _layer(kc, center, x, w, b, dy), _layer(ref, center, x, w, b, dy)
    assert set(got) == set(want)
    for name in want:
        _close(got[name], want[name], dtype, name)


@pytest.mark.parametrize("center", [True, False], ids=["layer", "rms"])
def test_row_norm_without_affine_or_some_gradients(center):
    x, dy, _, _ = _data((7, 40), np.float64, 40)
    for want in (("dx",), ("dw",), ("dw", "db")):
        got = _layer(kc, center, x, None, None, dy, want=want)
        expected = _layer(ref, center, x, None, None, dy, want=want)
        assert set(got) == set(expected), (want, set(got))
        for name in expected:
            _close(got[name], expected[name], np.float64, f"{want}: {name}")


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("shape", GROUP_SHAPES, ids=str)
def test_group_norm_kernels(shape, dtype):
    n, c, s, groups = shape
    x, dy, w, b = _data((n, c, s), dtype, c)
    got, want = _group(kc, x, w, b, dy, groups), _group(ref, x, w, b, dy, groups)
    for name in want:
        _close(got[name], want[name], dtype, name)


def test_group_norm_without_affine_and_nan_propagates():
    x, dy, _, _ = _data((2, 4, 6), np.float64, 4)
    x[1, 2, 3] = np.nan
    got, want = _group(kc, x, None, None, dy, 2), _group(ref, x, None, None, dy, 2)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-12, atol=1e-12, equal_nan=True, err_msg=name)
    assert np.isnan(got["y"][1, 2:]).all() and not np.isnan(got["y"][1, :2]).any()


def _to16(a, storage):
    if storage == np.float16:
        return a.astype(np.float16)
    bits = a.astype(np.float32).view(np.uint32)  # bfloat16 bits, rounded to nearest even
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


@pytest.mark.parametrize("storage", [np.uint16, np.float16], ids=["bfloat16", "float16"])
@pytest.mark.parametrize("op", ["layer", "rms", "group"])
def test_16_bit_kernels_round_once(op, storage):
    """16-bit storage, float32 parameters and statistics: outputs within an ulp of the reference's
    (both round a wide result once; the statistics may differ in float32's last bits)."""
    shape = (6, 4, 9) if op == "group" else (5, 36)
    x, dy, w, b = _data(shape, np.float32, shape[1])
    x16, dy16 = _to16(x, storage), _to16(dy, storage)
    if op == "group":
        got, want = _group(kc, x16, w, b, dy16, 2), _group(ref, x16, w, b, dy16, 2)
    else:
        got, want = _layer(kc, op == "layer", x16, w, b, dy16), _layer(ref, op == "layer", x16, w, b, dy16)
    for name in ("y", "dx"):
        assert got[name].dtype == np.dtype(storage)
        assert ulps16(got[name], want[name]).max() <= 1, name
    for name in set(want) - {"y", "dx"}:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-5, err_msg=name)


def test_bad_arrays_get_clear_errors():
    x = cuda.to_device(np.zeros((4, 6), np.float32))
    y = cuda.to_device(np.zeros((4, 6), np.float32))
    m, r = cuda.to_device(np.zeros(4, np.float32)), cuda.to_device(np.zeros(4, np.float32))
    with pytest.raises(TypeError, match="float32, float64, float16 or bfloat16, got int32"):
        kc.layer_norm_forward(cuda.to_device(np.zeros((4, 6), np.int32)), None, None, 1e-5, y, m, r)
    with pytest.raises(ValueError, match=r"\(M, D\) arrays"):
        kc.rms_norm_forward(cuda.to_device(np.zeros(6, np.float32)), None, 1e-5, y, r)
    with pytest.raises(ValueError, match="shape \\(4, 6\\)"):
        kc.layer_norm_forward(x, None, None, 1e-5, cuda.to_device(np.zeros((4, 5), np.float32)), m, r)
    with pytest.raises(ValueError, match="per-row and per-column arrays must be dense float32 of shape \\(6,\\)"):
        kc.layer_norm_forward(x, cuda.to_device(np.zeros(5, np.float32)), None, 1e-5, y, m, r)
    with pytest.raises(ValueError, match="per-row and per-column arrays must be dense float32 of shape \\(4,\\)"):
        kc.layer_norm_forward(x, None, None, 1e-5, y, cuda.to_device(np.zeros(4, np.float64)), r)
    with pytest.raises(ValueError, match="C divisible by 4"):
        kc.group_norm_forward(x.reshape(4, 6, 1), None, None, 4, 1e-5, y.reshape(4, 6, 1), m, r)
    with pytest.raises(ValueError, match="per-group and per-channel arrays"):
        kc.group_norm_forward(x.reshape(4, 6, 1), None, None, 2, 1e-5, y.reshape(4, 6, 1), m, r)
