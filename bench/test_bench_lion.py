"""Lion step (Chen et al. 2023) on the MNIST MLP's six parameters and on six 4096x4096 tensors:
fastnorm's backends side by side (conftest.compare) with the same update written in torch's
multi-tensor ops (``torch-foreach``), torch having no Lion of its own.

    c = beta1 * m + (1 - beta1) * g;  p = p * (1 - lr * wd) - lr * sign(c);  m = beta2 * m + (1 - beta2) * g

Bytes moved by the minimal algorithm: p read and written, g read, m read and written: 20 B per
float32 parameter (bench/test_bench_optim.py's SGD with momentum moves as much), so GB/s and the
percent of the in-place roofline measured in the same run (bench/test_bench_roofline.py; the
report divides every row's GB/s by it) compare with the other optimizers' rows. ``torch-foreach``
moves more than that: ``c`` is a temporary written and read back.
"""

from __future__ import annotations

import pytest
import torch
from conftest import compare

import fastnorm

MLP_SHAPES = [(256, 784), (256,), (128, 256), (128,), (10, 128), (10,)]  # 235,146 values (test_bench_optim.py's)
SIZES = {"mlp": MLP_SHAPES, "100M": [(4096, 4096)] * 6}  # 100M: 100,663,296 values
OPTIONS = dict(lr=1e-4, betas=(0.9, 0.99), weight_decay=0.1)
BYTES_PER_PARAM = 20  # float32: p rw, g r, m rw
PROVIDERS = ["reference", "numba", "cuda", "torch-foreach"]


def foreach_lion(params, grads, exp_avgs, *, lr, betas, weight_decay):
    """One Lion step of a group in torch's multi-tensor (``torch._foreach_*``) ops: how a torch
    user writes it (lucidrains' lion-pytorch and torch's own foreach optimizers do the same)."""
    beta1, beta2 = betas
    c = torch._foreach_mul(exp_avgs, beta1)
    torch._foreach_add_(c, grads, alpha=1 - beta1)  # c = beta1 m + (1 - beta1) g
    torch._foreach_sign_(c)
    if weight_decay != 0:
        torch._foreach_mul_(params, 1 - lr * weight_decay)
    torch._foreach_add_(params, c, alpha=-lr)
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta2)  # m = beta2 m + (1 - beta2) g


def _providers(runnable, shapes, device, skip_reference=None):
    gen = torch.Generator(device=device).manual_seed(0)
    params0 = [torch.randn(s, device=device, generator=gen) * 0.05 for s in shapes]
    grads = [torch.randn(s, device=device, generator=gen) for s in shapes]
    providers = {}
    for provider in PROVIDERS:
        why = runnable(provider, "lion")
        if not why and provider == "reference" and skip_reference:
            why = skip_reference
        if why:
            providers[provider] = why
            continue
        params = [p.clone() for p in params0]
        if provider == "torch-foreach":
            exp_avgs = [torch.zeros_like(p) for p in params]

            def step(params=params, exp_avgs=exp_avgs):
                with torch.no_grad():
                    foreach_lion(params, grads, exp_avgs, **OPTIONS)

            providers[provider] = step
            continue
        for p, g in zip(params, grads):
            p.grad = g  # only read by every provider
        providers[provider] = fastnorm.optim.Lion(params, backend=provider, **OPTIONS).step
    return providers, sum(p.numel() for p in params0)


@pytest.mark.parametrize("size", [pytest.param("mlp", marks=pytest.mark.quick), "100M"])
def test_lion_step(benchmark, request, runnable, device, budget, size):
    if size != "mlp" and benchmark.disabled:
        pytest.skip("100M parameters (2 GB of tensors, seconds per round): in the timed run only, not the smoke run")
    big = "the NumPy reference at 100M parameters: seconds per step, not a comparison" if size != "mlp" else None
    providers, numel = _providers(runnable, SIZES[size], device, skip_reference=big)
    compare(benchmark, request, providers, device=device, budget=budget, op="optim_lion", case=size,
            bytes_moved=BYTES_PER_PARAM * numel, params=numel, dtype="float32")  # fmt: skip


def test_foreach_lion_is_lion():
    """The torch-foreach provider computes Lion: one step from a nonzero state against the
    formula in float64 (float32 within its roundings)."""
    torch.manual_seed(0)
    params = [torch.randn(33, 17), torch.randn(7)]
    grads = [torch.randn_like(p) for p in params]
    exp_avgs = [torch.randn_like(p) * 0.1 for p in params]
    expected = []
    for p, g, m in zip(params, grads, exp_avgs):
        p, g, m = p.double(), g.double(), m.double()
        c = 0.9 * m + 0.1 * g
        expected.append((p * (1 - 1e-4 * 0.1) - 1e-4 * torch.sign(c), 0.99 * m + 0.01 * g))
    foreach_lion(params, grads, exp_avgs, **OPTIONS)
    for p, m, (p64, m64) in zip(params, exp_avgs, expected):
        torch.testing.assert_close(p.double(), p64, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(m.double(), m64, rtol=1e-6, atol=1e-7)
