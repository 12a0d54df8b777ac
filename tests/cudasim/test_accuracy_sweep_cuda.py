"""tests/test_accuracy_sweep.py's rule for the cuda backend under the simulator: every norm op's
outputs and gradients within 2x torch's own error in the same dtype, or 2 ulps of their dtype,
against float64 truth. The CUDA kernels sum in float64 in every thread, block and split, so
length costs them no accuracy; the simulator runs each GPU thread in Python, so the lengths are
small: one value, rows and planes shorter and longer than a simulated block (16 threads), several
column tiles and row splits (ROWS_PER_SPLIT shrunk to 8)."""

from __future__ import annotations

import math

import pytest
import torch
from test_accuracy_sweep import _run, _shape
from ulps import assert_within_torchs_error

pytestmark = pytest.mark.usefixtures("cuda_backend_on_cpu")

LENGTHS = [1, 7, 40]
CASES = ["layer_norm", "rms_norm", "layer_norm_rows", "group_norm", "batch_norm", "batch_norm_rows"]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@pytest.fixture(autouse=True)
def small_splits(monkeypatch):
    from fastnorm_kernels.numba_cuda import layernorm

    monkeypatch.setattr(layernorm, "ROWS_PER_SPLIT", 8)


def _params():
    for case in CASES:
        for length in LENGTHS:
            for name, dtype in DTYPES.items():
                shape = _shape(case, length)
                yield pytest.param(case, shape, dtype, id=f"{case}-{'x'.join(map(str, shape))}-{name}")


@pytest.mark.parametrize("case,shape,dtype", list(_params()))
def test_error_within_torchs(case, shape, dtype):
    n = math.prod(shape)
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(shape, generator=gen).add_(3.0).to(dtype)
    dy = torch.randn(shape, generator=gen).add_(1.0).to(dtype)
    channels = shape[-1] if case.startswith("layer_norm") or case == "rms_norm" else shape[1]
    pdtype = torch.float32 if case.startswith("batch_norm") else dtype
    weight = torch.rand(channels, generator=gen).add_(0.5).to(pdtype)
    bias = None if case == "rms_norm" else torch.rand(channels, generator=gen).sub_(0.5).to(pdtype)
    running = [torch.zeros(channels, dtype=pdtype), torch.ones(channels, dtype=pdtype)] if "batch" in case else []

    wide = [None if t is None else t.double() for t in (x, dy, weight, bias)]
    truth = _run(case, "torch", *wide, [r.double() for r in running])
    theirs = _run(case, "torch", x, dy, weight, bias, running)
    ours = _run(case, "cuda", x, dy, weight, bias, running)
    names = ["y", "dx", "dweight", "dbias", "running_mean", "running_var"]
    if bias is None:
        names.remove("dbias")
    assert_within_torchs_error([f"{case} {shape} {dtype}: {name}" for name in names], truth, theirs, ours)
