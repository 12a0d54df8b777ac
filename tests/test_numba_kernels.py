"""The numba BatchNorm kernels: thread counts, determinism, the kernels API's own checks."""

from __future__ import annotations

import numba
import numpy as np
import pytest
import torch
from conftest import assert_close, tol

import fastnorm
import fastnorm_kernels.numba_cpu as nb
import fastnorm_kernels.reference as ref
from fastnorm_kernels.numba_cpu.optim import chunk_table

# Large enough for the parallel kernels (>= 64K values): (shape, layout)
PARALLEL_SHAPES = [
    ((1031, 67), "rows, prime sizes, many row chunks"),
    ((16, 33, 15, 15), "planes, odd spatial"),
    ((8, 5, 40, 41), "planes: few channels"),
]
THREADS = sorted({1, 2, numba.config.NUMBA_NUM_THREADS})


def _train_step(shape, dtype, backend):
    """One training forward+backward from seed 1: (y, dx, dw, db, running_mean, running_var)."""
    torch.manual_seed(1)
    c = shape[1]
    x = (torch.randn(shape, dtype=dtype) * 3 + 2).requires_grad_(True)
    w = (torch.rand(c, dtype=dtype) + 0.5).requires_grad_(True)
    b = torch.randn(c, dtype=dtype).requires_grad_(True)
    rm, rv = torch.zeros(c, dtype=dtype), torch.ones(c, dtype=dtype)
    y = fastnorm.functional.batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5, backend=backend)
    y.backward(torch.randn(shape, dtype=dtype))
    return [t.detach().clone() for t in (y, x.grad, w.grad, b.grad, rm, rv)]


def _run(shape, dtype, threads):
    """_train_step with ``torch.set_num_threads(threads)``: the setting fastnorm's kernels follow."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _train_step(shape, dtype, "numba")
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape", [s for s, _ in PARALLEL_SHAPES], ids=str)
def test_results_do_not_depend_on_thread_count(shape, dtype):
    """Chunks depend on the shape only, so every thread count gives the same bits."""
    results = {t: _run(shape, dtype, t) for t in THREADS}
    first = results[THREADS[0]]
    for t, res in results.items():
        for a, b, what in zip(res, first, ["y", "dx", "dw", "db", "running_mean", "running_var"]):
            assert torch.equal(a, b), f"{what} differs between {THREADS[0]} and {t} threads"


@pytest.mark.parametrize("threads", THREADS)
@pytest.mark.parametrize("shape", [s for s, _ in PARALLEL_SHAPES], ids=str)
def test_parity_with_torch_at_each_thread_count(shape, threads):
    dtype = torch.float32
    ours = _run(shape, dtype, threads)
    rtol, atol = tol(dtype)
    for a, e, what in zip(ours, _train_step(shape, dtype, "torch"), ["y", "dx", "dw", "db", "rm", "rv"]):
        # sums over ~65K values: torch's own float32 rounding is ~1e-4 relative here
        assert_close(a, e, 5 * rtol, 20 * atol * (50 if what in ("dw", "db") else 1), what)


def test_torch_set_num_threads_governs_the_kernels():
    """torch.set_num_threads(n) sets the threads of fastnorm's numba kernels: after a fastnorm
    call Numba's setting on this thread is n, and a parallel Numba loop sees n threads."""

    @numba.njit(parallel=True)
    def used_threads(n):
        out = np.zeros(n, np.int64)
        for i in numba.prange(n):
            out[i] = numba.get_thread_id()
        return out

    shape = (1031, 67)  # parallel kernels (>= 64K values)
    expected = _train_step(shape, torch.float32, "torch")
    rtol, atol = tol(torch.float32)

    def step_matches_torch():
        ours = _train_step(shape, torch.float32, "numba")
        for a, e, what in zip(ours, expected, ["y", "dx", "dw", "db", "rm", "rv"]):
            assert_close(a, e, 5 * rtol, 20 * atol * (50 if what in ("dw", "db") else 1), what)

    before = torch.get_num_threads()
    try:
        for threads in THREADS:
            # something else set Numba's count first (set after torch's, it can change torch's too
            # where both pools share one libgomp)
            numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
            torch.set_num_threads(threads)
            step_matches_torch()
            assert numba.get_num_threads() == threads
            assert len(set(used_threads(100_000).tolist())) <= threads
        torch.set_num_threads(1)
        step_matches_torch()
        assert numba.get_num_threads() == 1
        assert set(used_threads(100_000).tolist()) == {0}
    finally:
        torch.set_num_threads(before)
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)


def _arrays(shape, dtype):
    rng = np.random.default_rng(0)
    n, c = shape[:2]
    x = rng.standard_normal(shape).astype(dtype).reshape(n, c, -1)
    w, b = rng.random(c).astype(dtype) + 0.5, rng.standard_normal(c).astype(dtype)
    return x, w, b


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(2, 3), (64, 256), (7, 5, 9), (300, 300), (4, 70, 17, 17)], ids=str)
def test_kernels_api_matches_reference(shape, dtype):
    """fastnorm_kernels.numba_cpu against fastnorm_kernels.reference, array in / array out (no torch)."""
    x, w, b = _arrays(shape, dtype)
    c = x.shape[1]
    outs = []
    for k in (ref, nb):
        y, m, inv = np.empty_like(x), np.empty(c, dtype), np.empty(c, dtype)
        rm, rv = np.zeros(c, dtype), np.ones(c, dtype)
        k.batch_norm_forward_train(x, w, b, rm, rv, 0.1, 1e-5, y, m, inv)
        dy = np.cos(x * 3).astype(dtype)
        dx, dw, db = np.empty_like(x), np.empty(c, dtype), np.empty(c, dtype)
        k.batch_norm_backward(dy, x, m, inv, w, True, dx, dw, db)
        ye = np.empty_like(x)
        k.batch_norm_forward_eval(x, None, b, rm, rv, 1e-5, ye)
        dxe = np.empty_like(x)
        k.batch_norm_backward(dy, x, rm, 1 / np.sqrt(rv + 1e-5), None, False, dxe, None, None)
        outs.append([y, m, inv, rm, rv, dx, dw, db, ye, dxe])
    rtol, atol = (1e-4, 1e-4) if dtype == np.float32 else (1e-10, 1e-10)
    names = ["y", "mean", "invstd", "running_mean", "running_var", "dx", "dw", "db", "eval y", "eval dx"]
    for a, e, what in zip(outs[1], outs[0], names):
        np.testing.assert_allclose(a, e, rtol=rtol, atol=atol * max(1, np.abs(e).max()), err_msg=what)


def test_kernels_api_refuses_bad_arrays_clearly():
    x, w, b = _arrays((4, 3), np.float32)
    y, m, inv = np.empty_like(x), np.empty(3, np.float32), np.empty(3, np.float32)
    with pytest.raises(TypeError, match="float32 or float64 or float16 or bfloat16 .uint16 bits., got int32"):
        nb.batch_norm_forward_train(x.astype(np.int32), None, None, None, None, 0.1, 1e-5, y, m, inv)
    with pytest.raises(ValueError, match="y: expected a float16 array"):  # 16-bit input, float32 output
        nb.batch_norm_forward_train(x.astype(np.float16), None, None, None, None, 0.1, 1e-5, y, m, inv)
    with pytest.raises(ValueError, match="per-channel arrays must be dense float32"):  # 16-bit: float32 ones
        h = x.astype(np.float16)
        nb.batch_norm_forward_train(h, w.astype(np.float16), None, None, None, 0.1, 1e-5, np.empty_like(h), m, inv)
    with pytest.raises(ValueError, match=r"\(N, C, S\)"):
        nb.batch_norm_forward_train(x[:, :, 0], None, None, None, None, 0.1, 1e-5, y, m, inv)
    with pytest.raises(ValueError, match="per-channel"):
        nb.batch_norm_forward_train(x, w.astype(np.float64), None, None, None, 0.1, 1e-5, y, m, inv)
    with pytest.raises(ValueError, match="C-contiguous"):
        xt = np.asfortranarray(x)
        nb.batch_norm_forward_eval(xt, None, None, m, inv, 1e-5, y)


def test_optimizer_chunk_table_indexes_beyond_int32():
    """Chunks of a tensor larger than 2**31 elements carry int64 starts and stops (the kernels
    address elements as base + start * itemsize in int64); checked on the table, without
    allocating 8 GB per buffer."""
    huge = 2**31 + 5
    table = chunk_table((3, huge), 1 << 20)
    assert table.dtype == np.int64
    tensor, start, stop = table.T
    assert start[-1] == (huge - 1) // (1 << 20) * (1 << 20) and stop[-1] == huge
    assert stop[-1] > np.iinfo(np.int32).max
    assert int((stop - start)[tensor == 1].sum()) == huge


@pytest.mark.parametrize("shape", [(9, 4, 1), (3, 5, 17), (2000, 40, 1)], ids=str)
def test_batch_norm_stats_matches_reference(shape):
    x = (np.random.default_rng(6).standard_normal(shape) * 2 + 5).astype(np.float32)
    outs = []
    for k in (ref, nb):
        mean, var = np.empty(shape[1]), np.empty(shape[1])
        k.batch_norm_stats(x, mean, var)
        outs.append((mean, var))
    np.testing.assert_allclose(outs[1][0], outs[0][0], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(outs[1][1], outs[0][1], rtol=1e-10, atol=1e-12)
