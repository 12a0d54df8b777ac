"""8-bit optimizer state: AdamW8bit steps side by side with the 32-bit and 8-bit alternatives.

Providers (conftest.compare: interleaved rounds, medians, bootstrap intervals):

- ``numba`` / ``reference``: fastnorm's ``AdamW8bit`` (one pass per block of 256; the NumPy oracle
  at the MLP size only);
- ``torch-fused``: torch's 32-bit ``AdamW(fused=True)``, the yardstick;
- ``bnb-8bit``: bitsandbytes' ``AdamW8bit`` on the CPU (dequantize, torch ops, quantize);
- ``torchao-8bit``: torchao's ``AdamW8bit`` (each parameter's step under ``torch.compile``; its first
  call, the compilation, is reported apart).

Bytes moved per float32 parameter, the least each design needs: 8-bit state 16.06 (p read and
written, g read, two codes read and written, 2 x 8 bytes of absmax per 256 values); 32-bit 28.
``state_bytes_per_param`` is what the optimizer keeps (codes, absmax, float32 state of small
tensors; the shared maps not counted): fastnorm and bitsandbytes 2.03, torch 8.

``test_llama_step_8bit``: the whole training step of bench/test_bench_e2e.py's Llama-style
transformers model with AdamW8bit against the same step with torch's fused AdamW.
"""

from __future__ import annotations

import pytest
import torch
from conftest import compare

import fastnorm

MLP_SHAPES = [(256, 784), (256,), (128, 256), (128,), (10, 128), (10,)]  # 235,146 values
SIZES = {"mlp": MLP_SHAPES, "25M": [(2500, 2500)] * 4, "100M": [(4096, 4096)] * 6}
OPTIONS = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)
BYTES_8BIT, BYTES_32BIT = 16.0625, 28
PROVIDERS = ["reference", "numba", "torch-fused", "bnb-8bit", "torchao-8bit"]


def _optimizer(provider: str, params):
    if provider == "torch-fused":
        return torch.optim.AdamW(params, fused=True, **OPTIONS)
    if provider == "bnb-8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, **OPTIONS)
    if provider == "torchao-8bit":
        from torchao.optim import AdamW8bit

        return AdamW8bit(params, **OPTIONS)
    return fastnorm.optim.AdamW8bit(params, backend=provider, **OPTIONS)


def _why_not(provider: str, device: torch.device, size: str) -> str | None:
    if provider == "reference" and size != "mlp":
        return "the NumPy reference beyond the MLP's size: seconds per step, not a comparison"
    if provider in ("numba", "reference") and device.type != "cpu":
        return f"fastnorm's {provider} backend runs on CPU tensors"
    for module, name in (("bitsandbytes", "bnb-8bit"), ("torchao", "torchao-8bit")):
        if provider == name:
            try:
                __import__(module)
            except ImportError:
                return f"{module} is not installed (pip install -e .[dev])"
    return None


def _state_bytes(opt, params) -> float:
    total = 0
    for p in params:
        for key, v in opt.state[p].items():
            if isinstance(v, torch.Tensor) and key != "step" and not key.startswith("qmap"):
                total += v.numel() * v.element_size()
    return total / sum(p.numel() for p in params)


@pytest.mark.parametrize("size", [pytest.param("mlp", marks=pytest.mark.quick), "25M", "100M"])
def test_adamw8bit_step(benchmark, request, device, budget, size):
    if size != "mlp" and benchmark.disabled:
        pytest.skip("25M and 100M parameters: seconds per round, in the timed run only")
    gen = torch.Generator(device=device).manual_seed(0)
    shapes = SIZES[size]
    params0 = [torch.randn(s, device=device, generator=gen) * 0.05 for s in shapes]
    grads = [torch.randn(s, device=device, generator=gen) for s in shapes]
    numel = sum(p.numel() for p in params0)
    providers, state_bytes, moved = {}, {}, {}
    for provider in PROVIDERS:
        why = _why_not(provider, device, size)
        if why:
            providers[provider] = why
            continue
        params = [p.clone() for p in params0]
        for p, g in zip(params, grads):
            p.grad = g
        opt = _optimizer(provider, params)
        opt.step()  # state made (and torchao's compilation) before the timed rounds
        state_bytes[provider] = round(_state_bytes(opt, params), 3)
        moved[provider] = int((BYTES_32BIT if provider == "torch-fused" else BYTES_8BIT) * numel)
        providers[provider] = opt.step
    compare(benchmark, request, providers, device=device, budget=budget, op="optim_adamw8bit", case=size,
            bytes_moved=BYTES_8BIT * numel, bytes_by_provider=moved, params=numel, dtype="float32",
            state_bytes_per_param=state_bytes)  # fmt: skip


@pytest.mark.parametrize("autocast", [False])
def test_llama_step_8bit(benchmark, request, device, budget, autocast):
    """One training step of the Llama-style model (bench/test_bench_e2e.py's build_llama) with
    fastnorm's AdamW8bit and with torch's fused AdamW, side by side."""
    pytest.importorskip("transformers")
    if benchmark.disabled:
        pytest.skip("the Llama-style model's step: seconds per round, in the timed run only")
    from test_bench_e2e import build_llama

    providers = {}
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 8192, (8, 256), generator=gen).to(device)
    for provider in ("fastnorm-8bit", "torch-fused"):
        model = build_llama().to(device)
        if provider == "fastnorm-8bit" and device.type != "cpu":
            providers[provider] = "fastnorm's numba AdamW8bit runs on CPU tensors"
            continue
        opt = _optimizer("numba" if provider == "fastnorm-8bit" else "torch-fused", model.parameters())

        def step(model=model, opt=opt):
            opt.zero_grad(set_to_none=True)
            model(input_ids=tokens, labels=tokens).loss.backward()
            opt.step()

        providers[provider] = step
    compare(benchmark, request, providers, device=device, budget=budget, op="e2e_llama_adamw8bit",
            case="llama-h512-l4-b8x256", bytes_moved=0)  # fmt: skip
