"""Optimizer step per provider, on the MNIST MLP's six parameters and on six 4096x4096 tensors.

Bytes moved by the minimal algorithm: every buffer read once and written once, the gradient
only read. float32: Adam 28 B/parameter (p rw, g r, m rw, v rw), SGD with momentum 20, plain 12.
"""

from __future__ import annotations

import pytest
import torch
from conftest import TORCH_OPTIM_VARIANTS, measure

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

_TENSORS: dict = {}


def _tensors(size: str, device: torch.device):
    """(params, grads) of a size, made once per session (grads are only read by every provider)."""
    key = (size, device)
    if key not in _TENSORS:
        _TENSORS.clear()  # keep one size in memory at a time
        gen = torch.Generator(device=device).manual_seed(0)
        shapes = SIZES[size][0]
        params = [torch.randn(s, device=device, generator=gen) * 0.05 for s in shapes]
        grads = [torch.randn(s, device=device, generator=gen) for s in shapes]
        _TENSORS[key] = (params, grads)
    return _TENSORS[key]


def _params():
    for size in SIZES:
        for cid, name, options, nbytes, quick in CONFIGS:
            for provider in PROVIDERS:
                marks = [pytest.mark.quick] if quick and size == "mlp" else []
                yield pytest.param(size, cid, name, options, nbytes, provider, marks=marks,
                                   id=f"{cid}-{size}-{provider}")  # fmt: skip


def make_optimizer(name: str, options: dict, params, provider: str):
    if provider in TORCH_OPTIM_VARIANTS:
        return getattr(torch.optim, name)(params, **options, **TORCH_OPTIM_VARIANTS[provider])
    return getattr(fastnorm.optim, name)(params, **options, backend=provider)


@pytest.mark.parametrize("size,cid,name,options,nbytes,provider", list(_params()))
def test_optimizer_step(benchmark, use_provider, device, budget, size, cid, name, options, nbytes, provider):
    use_provider(provider, name)
    if SIZES[size][1] and device.type != "cuda":
        pytest.skip(f"{size} parameters: measured with --bench-device cuda")
    params0, grads = _tensors(size, device)
    params = [p.clone() for p in params0]
    for p, g in zip(params, grads):
        p.grad = g
    opt = make_optimizer(name, options, params, provider)
    numel = sum(p.numel() for p in params)
    measure(benchmark, opt.step, device=device, budget=budget, op=f"optim_{cid}", case=size,
            provider=provider, bytes_moved=nbytes * numel, params=numel, dtype="float32")  # fmt: skip


# -- 16-bit parameters (issue #14): torch fused's semantics (float32 arithmetic, 16-bit state);
# Adam moves 14 B per parameter, SGD with momentum 10
HALF_CONFIGS = [("adam", "Adam", {"lr": 1e-3}, 14), ("sgd_momentum", "SGD", {"lr": 0.01, "momentum": 0.9}, 10)]
HALF_SIZES = {"mlp": MLP_SHAPES, "25M": [(5000, 5000)]}
HALF_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def _half_params():
    for size in HALF_SIZES:
        for cid, name, options, nbytes in HALF_CONFIGS:
            for dtype in HALF_DTYPES:
                for provider in PROVIDERS:
                    quick = size == "mlp" and cid == "adam" and dtype == "bfloat16"
                    marks = [pytest.mark.quick] if quick else []
                    yield pytest.param(size, cid, name, options, nbytes, dtype, provider, marks=marks,
                                       id=f"{cid}-{dtype}-{size}-{provider}")  # fmt: skip


@pytest.mark.parametrize("size,cid,name,options,nbytes,dtype,provider", list(_half_params()))
def test_optimizer_step_16bit(benchmark, use_provider, device, budget, size, cid, name, options, nbytes, dtype,
                              provider):  # fmt: skip
    use_provider(provider, name)
    torch_dtype = HALF_DTYPES[dtype]
    if provider not in TORCH_OPTIM_VARIANTS and not fastnorm._dispatch.has_dtype(provider, name.lower(), torch_dtype):
        pytest.skip(f"backend {provider!r} has no {dtype} optimizer kernels")
    if provider == "reference" and size != "mlp":
        pytest.skip("the NumPy reference at 25M parameters: seconds per step, not a comparison")
    gen = torch.Generator(device=device).manual_seed(0)
    params = [(torch.randn(s, device=device, generator=gen) * 0.05).to(torch_dtype) for s in HALF_SIZES[size]]
    for p in params:
        p.grad = torch.randn(p.shape, device=device, generator=gen).to(torch_dtype)
    opt = make_optimizer(name, options, params, provider)
    numel = sum(p.numel() for p in params)
    measure(benchmark, opt.step, device=device, budget=budget, op=f"optim_{cid}_{dtype}", case=size,
            provider=provider, bytes_moved=nbytes * numel, params=numel, dtype=dtype)  # fmt: skip
