"""Optimizer step on the MNIST MLP's six parameters and on six 4096x4096 tensors; every provider
of a (config, size) timed side by side (conftest.compare): fastnorm's backends, and torch as users
run it: the default step (for-loop on CPU), ``foreach=True``, ``fused=True``, and the default
optimizer with its ``step`` under ``torch.compile`` (compilation in the first call, reported
apart).

Bytes moved by the minimal algorithm: every buffer read once and written once, the gradient
only read. float32: Adam 28 B/parameter (p rw, g r, m rw, v rw), SGD with momentum 20, plain 12.
"""

from __future__ import annotations

import pytest
import torch
from conftest import TORCH_OPTIM_VARIANTS, compare

import fastnorm

# (id, optimizer class name, options, bytes per float32 parameter); quick: in --bench-quick
CONFIGS = [
    ("sgd", "SGD", {"lr": 0.01}, 12, False),
    ("sgd_momentum", "SGD", {"lr": 0.01, "momentum": 0.9}, 20, True),
    ("sgd_nesterov", "SGD", {"lr": 0.01, "momentum": 0.9, "nesterov": True}, 20, False),
    ("adagrad", "Adagrad", {"lr": 0.01}, 20, False),
    ("rmsprop", "RMSprop", {"lr": 0.01}, 20, False),
    ("rmsprop_centered_momentum", "RMSprop", {"lr": 0.01, "centered": True, "momentum": 0.9}, 36, False),
    ("adam", "Adam", {"lr": 1e-3}, 28, True),
    ("adamw", "AdamW", {"lr": 1e-3, "weight_decay": 0.01}, 28, False),
    ("adam_amsgrad", "Adam", {"lr": 1e-3, "amsgrad": True}, 36, False),
]
MLP_SHAPES = [(256, 784), (256,), (128, 256), (128,), (10, 128), (10,)]  # 235,146 values
SIZES = {
    "mlp": (MLP_SHAPES, False),
    "100M": ([(4096, 4096)] * 6, False),  # 100,663,296 values
    "1B": ([(16384, 10240)] * 6, True),  # 1,006,632,960 values: GPU only
}
PROVIDERS = ["reference", "numba", "cuda", *TORCH_OPTIM_VARIANTS]


def _params():
    for size in SIZES:
        for cid, name, options, nbytes, quick in CONFIGS:
            marks = [pytest.mark.quick] if quick and size == "mlp" else []
            yield pytest.param(size, cid, name, options, nbytes, marks=marks, id=f"{cid}-{size}")


def make_optimizer(name: str, options: dict, params, provider: str):
    if provider in TORCH_OPTIM_VARIANTS:
        return getattr(torch.optim, name)(params, **options, **TORCH_OPTIM_VARIANTS[provider])
    return getattr(fastnorm.optim, name)(params, **options, backend=provider)


# every compiled optimizer is a recompilation of the same function (guarded on the optimizer):
# past dynamo's default limit (8) the rest would silently run eagerly
for _limit, _value in (("recompile_limit", 512), ("cache_size_limit", 512), ("accumulated_recompile_limit", 8192),
                       ("accumulated_cache_size_limit", 8192)):  # fmt: skip
    if hasattr(torch._dynamo.config, _limit):
        setattr(torch._dynamo.config, _limit, _value)


def step_fn(opt, provider: str):
    """The call a provider's training step makes: ``opt.step``, compiled for torch-compiled."""
    if provider != "torch-compiled":
        return opt.step

    @torch.compile
    def step():
        opt.step()

    return step


#: torch.compile per optimizer costs tens of seconds here: the smoke run (--benchmark-disable)
#: compiles these only, the timed run every configuration
COMPILED_IN_SMOKE = {("adam", "mlp")}


def compiled_skip(benchmark, provider: str, key: tuple) -> str | None:
    if provider == "torch-compiled" and benchmark.disabled and key not in COMPILED_IN_SMOKE:
        return "torch.compile of each optimizer takes tens of seconds: compiled in the timed run only"
    return None


def _providers(benchmark, runnable, name, options, shapes, dtype, device, key, skip_reference=None):
    gen = torch.Generator(device=device).manual_seed(0)
    params0 = [(torch.randn(s, device=device, generator=gen) * 0.05).to(dtype) for s in shapes]
    grads = [torch.randn(s, device=device, generator=gen).to(dtype) for s in shapes]
    providers = {}
    for provider in PROVIDERS:
        why = runnable(provider, name) or compiled_skip(benchmark, provider, key)
        if not why and provider == "reference" and skip_reference:
            why = skip_reference
        if not why and dtype != torch.float32 and provider not in TORCH_OPTIM_VARIANTS:
            if not fastnorm._dispatch.has_dtype(provider, name.lower(), dtype):
                why = f"backend {provider!r} has no {dtype} optimizer kernels"
        if why:
            providers[provider] = why
            continue
        params = [p.clone() for p in params0]
        for p, g in zip(params, grads):
            p.grad = g  # only read by every provider
        providers[provider] = step_fn(make_optimizer(name, options, params, provider), provider)
    return providers, sum(p.numel() for p in params0)


@pytest.mark.parametrize("size,cid,name,options,nbytes", list(_params()))
def test_optimizer_step(benchmark, request, runnable, device, budget, size, cid, name, options, nbytes):
    if SIZES[size][1] and device.type != "cuda":
        pytest.skip(f"{size} parameters: measured with --bench-device cuda")
    big = "the NumPy reference at 100M parameters: seconds per step, not a comparison" if size != "mlp" else None
    providers, numel = _providers(benchmark, runnable, name, options, SIZES[size][0], torch.float32, device,
                                  (cid, size), skip_reference=big)  # fmt: skip
    compare(benchmark, request, providers, device=device, budget=budget, op=f"optim_{cid}", case=size,
            bytes_moved=nbytes * numel, params=numel, dtype="float32")  # fmt: skip


# -- 16-bit parameters (issue #14): torch fused's semantics (float32 arithmetic, 16-bit state);
# Adam moves 14 B per parameter, SGD with momentum 10
HALF_CONFIGS = [("adam", "Adam", {"lr": 1e-3}, 14), ("sgd_momentum", "SGD", {"lr": 0.01, "momentum": 0.9}, 10)]
HALF_SIZES = {"mlp": MLP_SHAPES, "25M": [(5000, 5000)]}
HALF_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def _half_params():
    for size in HALF_SIZES:
        for cid, name, options, nbytes in HALF_CONFIGS:
            for dtype in HALF_DTYPES:
                quick = size == "mlp" and cid == "adam" and dtype == "bfloat16"
                marks = [pytest.mark.quick] if quick else []
                yield pytest.param(size, cid, name, options, nbytes, dtype, marks=marks, id=f"{cid}-{dtype}-{size}")


@pytest.mark.parametrize("size,cid,name,options,nbytes,dtype", list(_half_params()))
def test_optimizer_step_16bit(benchmark, request, runnable, device, budget, size, cid, name, options, nbytes,
                              dtype):  # fmt: skip
    big = "the NumPy reference at 25M parameters: seconds per step, not a comparison" if size != "mlp" else None
    providers, numel = _providers(benchmark, runnable, name, options, HALF_SIZES[size], HALF_DTYPES[dtype], device,
                                  (cid, size), skip_reference=big)  # fmt: skip
    compare(benchmark, request, providers, device=device, budget=budget, op=f"optim_{cid}_{dtype}", case=size,
            bytes_moved=nbytes * numel, params=numel, dtype=dtype)  # fmt: skip
