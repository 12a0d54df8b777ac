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
from conftest import compare

N = 50_000_000  # 200 MB per float32 array


@numba.njit(parallel=True, error_model="numpy", cache=True)
def _inplace_axpy(a, s, b):  # a, b: (N,) float32; s: float32
    for i in numba.prange(a.size):
        a[i] += s * b[i]


@pytest.mark.quick
def test_roofline(benchmark, request, device):
    """CPU: numpy, torch and numba in-place updates side by side; GPU: torch's copy and in-place."""
    providers = {}
    if device.type == "cpu":
        a, b = np.ones(N, np.float32), np.full(N, 0.5, np.float32)
        s = np.float32(1e-3)
        ta, tb = torch.ones(N), torch.full((N,), 0.5)
        providers["numpy"] = lambda: np.add(a, s * b, out=a)
        providers["numba"] = lambda: _inplace_axpy(a, s, b)
        providers["torch"] = lambda: ta.add_(tb, alpha=1e-3)
        case, nbytes = "inplace_axpy", 12 * N
    else:
        n = 4 * N
        src, dst = torch.ones(n, device=device), torch.empty(n, device=device)
        ta, tb = torch.ones(n, device=device), torch.full((n,), 0.5, device=device)
        providers["torch-cuda-copy"] = lambda: dst.copy_(src)  # 8 B per element
        providers["torch-cuda"] = lambda: ta.add_(tb, alpha=1e-3)  # 12 B per element
        case, nbytes = "device", 12 * n
    compare(benchmark, request, providers, device=device, budget=0.5, op="roofline", case=case, bytes_moved=nbytes,
            bytes_by_provider={"torch-cuda-copy": 8 * 4 * N}, roofline=True)  # fmt: skip
