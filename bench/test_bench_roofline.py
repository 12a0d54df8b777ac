"""The bandwidth roofline, measured in the same run as everything else.

CPU: an in-place update ``a += s*b`` over two float32 arrays of 200 MB each (12 bytes counted per
element: the read-modify-write pattern of the optimizers and BatchNorm); the report takes the best
of NumPy, torch and a Numba loop. A copy or a triad into a third array reads lower on CPUs because
of write-allocate traffic, which is why the in-place form is the reference.
GPU: a large device-to-device copy (8 bytes counted per float32 element), and the in-place update.
"""

from __future__ import annotations

import numba
import numpy as np
import pytest
import torch
from conftest import measure

N = 50_000_000  # 200 MB per float32 array


@numba.njit(parallel=True, error_model="numpy", cache=True)
def _inplace_axpy(a, s, b):  # a, b: (N,) float32; s: float32
    for i in numba.prange(a.size):
        a[i] += s * b[i]


@pytest.mark.quick
@pytest.mark.parametrize("provider", ["numpy", "torch", "numba", "torch-cuda-copy", "torch-cuda"])
def test_roofline(benchmark, device, budget, provider):
    if (provider in ("numpy", "numba")) and device.type != "cpu":
        pytest.skip(f"{provider} runs on the CPU; this run measures {device}")
    if provider.startswith("torch-cuda") and device.type != "cuda":
        pytest.skip("GPU roofline: measured with --bench-device cuda")
    if provider in ("numpy", "numba"):
        a, b = np.ones(N, np.float32), np.full(N, 0.5, np.float32)
        s = np.float32(1e-3)
        fn = (lambda: np.add(a, s * b, out=a)) if provider == "numpy" else (lambda: _inplace_axpy(a, s, b))
        nbytes, kind = 12 * N, "inplace_axpy"
    elif provider == "torch-cuda-copy":
        src, dst = torch.ones(4 * N, device=device), torch.empty(4 * N, device=device)
        fn, nbytes, kind = (lambda: dst.copy_(src)), 8 * 4 * N, "d2d_copy"
    else:  # torch in place on the run's device
        n = N if device.type == "cpu" else 4 * N
        a, b = torch.ones(n, device=device), torch.full((n,), 0.5, device=device)
        fn, nbytes, kind = (lambda: a.add_(b, alpha=1e-3)), 12 * n, "inplace_axpy"
    measure(benchmark, fn, device=device, budget=budget, op="roofline", case=kind, provider=provider,
            bytes_moved=nbytes, roofline=True)  # fmt: skip
