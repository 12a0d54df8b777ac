"""End to end: one training step of the book's MNIST MLP with BatchNorm (batch 64, Adam).

forward, cross-entropy, backward, optimizer step; one provider per (BatchNorm provider,
optimizer provider) combination, all timed side by side (conftest.compare). Bytes are not
meaningful here (matmuls dominate): the report shows times and speedups only.
"""

from __future__ import annotations

import pytest
import torch
from conftest import TORCH_OPTIM_VARIANTS, compare
from test_bench_optim import compiled_skip, make_optimizer, step_fn

from fastnorm.book.models import SimpleNN

BN_PROVIDERS = ["reference", "numba", "cuda", "torch"]
OPT_PROVIDERS = ["reference", "numba", "cuda", *TORCH_OPTIM_VARIANTS]


def _step(bn_provider: str, opt_provider: str, device: torch.device):
    torch.manual_seed(0)
    model = SimpleNN(use_batch_norm=True, backend=bn_provider).to(device)
    opt = make_optimizer("Adam", {"lr": 1e-3}, model.parameters(), opt_provider)
    opt_step = step_fn(opt, opt_provider)
    x = torch.randn(64, 1, 28, 28, device=device)
    target = torch.randint(0, 10, (64,), device=device)
    loss_fn = torch.nn.CrossEntropyLoss()

    def step():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), target)
        loss.backward()
        opt_step()

    return step


@pytest.mark.quick
def test_mlp_training_step(benchmark, request, runnable, device, budget):
    providers = {}
    for bn in BN_PROVIDERS:
        for opt in OPT_PROVIDERS:
            why = runnable(bn, "batch_norm") or runnable(opt, "Adam") or compiled_skip(benchmark, opt, ("e2e",))
            providers[f"bn:{bn}+opt:{opt}"] = why or _step(bn, opt, device)
    compare(benchmark, request, providers, device=device, budget=budget, op="e2e_mlp_bn_adam_step", case="batch64",
            bytes_moved=0)  # fmt: skip
