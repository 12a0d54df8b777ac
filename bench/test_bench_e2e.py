"""End to end: one training step of the book's MNIST MLP with BatchNorm (batch 64, Adam).

forward, cross-entropy, backward, optimizer step; one record per (BatchNorm provider,
optimizer provider) combination. Bytes are not meaningful here (matmuls dominate): the
report shows times and speedups only.
"""

from __future__ import annotations

import pytest
import torch
from conftest import TORCH_OPTIM_VARIANTS, measure
from test_bench_optim import make_optimizer

from fastnorm.book.models import SimpleNN

BN_PROVIDERS = ["reference", "numba", "cuda", "torch"]
OPT_PROVIDERS = ["reference", "numba", "cuda", *TORCH_OPTIM_VARIANTS]


def _params():
    for bn in BN_PROVIDERS:
        for opt in OPT_PROVIDERS:
            quick = bn == opt or (bn == "torch" and opt.startswith("torch"))
            yield pytest.param(bn, opt, marks=[pytest.mark.quick] if quick else [], id=f"bn_{bn}-opt_{opt}")


@pytest.mark.parametrize("bn_provider,opt_provider", list(_params()))
def test_mlp_training_step(benchmark, use_provider, device, budget, bn_provider, opt_provider):
    use_provider(bn_provider, "batch_norm")
    use_provider(opt_provider, "Adam")
    torch.manual_seed(0)
    model = SimpleNN(use_batch_norm=True, backend=bn_provider).to(device)
    opt = make_optimizer("Adam", {"lr": 1e-3}, model.parameters(), opt_provider)
    x = torch.randn(64, 1, 28, 28, device=device)
    target = torch.randint(0, 10, (64,), device=device)
    loss_fn = torch.nn.CrossEntropyLoss()

    def step():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), target)
        loss.backward()
        opt.step()

    measure(benchmark, step, device=device, budget=budget, op="e2e_mlp_bn_adam_step", case="batch64",
            provider=f"bn:{bn_provider}+opt:{opt_provider}", bytes_moved=0, bn=bn_provider,
            optimizer=opt_provider)  # fmt: skip
