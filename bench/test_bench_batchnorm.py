"""BatchNorm: forward (training), forward (eval), backward, forward+backward, per provider.

Bytes moved by the minimal algorithm (float32): forward reads x and writes y (8 B/element),
backward reads dy and x and writes dx (12 B/element), forward+backward 20 B/element.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import measure

import fastnorm

# (shape, what it is); quick: part of --bench-quick
SHAPES = [
    ((64, 256), "MNIST MLP, first BatchNorm", True),
    ((64, 128), "MNIST MLP, second BatchNorm", False),
    ((1024, 1024), "large 2-D", False),
    ((8192, 2048), "very large 2-D (16.8M values)", False),
    ((64, 64, 28, 28), "CNN feature map (3.2M values)", True),
    ((32, 256, 14, 14), "deeper CNN feature map (1.6M values)", False),
    ((256, 64, 56, 56), "GPU-size: ResNet stem feature map (51M values)", False),
    ((64, 256, 28, 28), "GPU-size: ResNet stage 2 (12.8M values)", False),
]
GPU_ONLY = {(256, 64, 56, 56), (64, 256, 28, 28)}
MODES = {"forward_train": 8, "forward_eval": 8, "backward": 12, "forward_backward": 20}
PROVIDERS = ["reference", "numba", "cuda", "torch"]
MODULES = {2: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d}


def _case(shape) -> str:
    return "x".join(map(str, shape))


def _params():
    for shape, _, quick in SHAPES:
        for mode in MODES:
            for provider in PROVIDERS:
                marks = [pytest.mark.quick] if quick and mode in ("forward_backward", "forward_eval") else []
                yield pytest.param(mode, shape, provider, marks=marks, id=f"{mode}-{_case(shape)}-{provider}")


def _module(shape, provider, device):
    cls = MODULES[len(shape)]
    if provider == "torch":
        bn = cls(shape[1], device=device)  # torch's native op (ATen on CPU, cuDNN/ATen on GPU)
    else:
        bn = getattr(fastnorm.nn, cls.__name__)(shape[1], device=device, backend=provider)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    return bn


@pytest.mark.parametrize("mode,shape,provider", list(_params()))
def test_batchnorm(benchmark, use_provider, device, budget, mode, shape, provider):
    use_provider(provider, "batch_norm")
    if tuple(shape) in GPU_ONLY and device.type != "cuda":
        pytest.skip("GPU-size shape: measured with --bench-device cuda")
    bn = _module(shape, provider, device)
    x = torch.randn(shape, device=device) * 2 + 0.5
    dy = torch.randn(shape, device=device)

    if mode == "forward_train":

        def fn():
            return bn(x)
    elif mode == "forward_eval":
        bn.eval()

        def fn():
            with torch.no_grad():
                return bn(x)
    elif mode == "backward":
        xg = x.clone().requires_grad_(True)
        y = bn(xg)
        inputs = [xg, bn.weight, bn.bias]

        def fn():
            return torch.autograd.grad(y, inputs, dy, retain_graph=True)
    else:  # forward_backward, through the autograd path as in training
        xg = x.clone().requires_grad_(True)

        def fn():
            xg.grad = bn.weight.grad = bn.bias.grad = None
            bn(xg).backward(dy)

    measure(benchmark, fn, device=device, budget=budget, op=f"batchnorm_{mode}", case=_case(shape),
            provider=provider, bytes_moved=MODES[mode] * math.prod(shape), dtype="float32")  # fmt: skip


# -- 16-bit inputs (issue #14): what torch.autocast hands a BatchNorm (16-bit activations,
# float32 weight, bias and running statistics); forward+backward moves 10 B per element
HALF_SHAPES = [((64, 256), True), ((64, 64, 28, 28), True), ((32, 256, 14, 14), False)]
HALF_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def _half_params():
    for shape, quick in HALF_SHAPES:
        for dtype in HALF_DTYPES:
            for provider in PROVIDERS:
                marks = [pytest.mark.quick] if quick and dtype == "bfloat16" else []
                yield pytest.param(shape, dtype, provider, marks=marks, id=f"{dtype}-{_case(shape)}-{provider}")


@pytest.mark.parametrize("shape,dtype,provider", list(_half_params()))
def test_batchnorm_16bit_forward_backward(benchmark, use_provider, device, budget, shape, dtype, provider):
    use_provider(provider, "batch_norm")
    if provider != "torch" and not fastnorm._dispatch.has_dtype(provider, "batch_norm", HALF_DTYPES[dtype]):
        pytest.skip(f"backend {provider!r} has no {dtype} BatchNorm kernels")
    bn = _module(shape, provider, device)
    x = (torch.randn(shape, device=device) * 2 + 0.5).to(HALF_DTYPES[dtype]).requires_grad_(True)
    dy = torch.randn(shape, device=device).to(HALF_DTYPES[dtype])

    def fn():
        x.grad = bn.weight.grad = bn.bias.grad = None
        bn(x).backward(dy)

    measure(benchmark, fn, device=device, budget=budget, op=f"batchnorm_forward_backward_{dtype}",
            case=_case(shape), provider=provider, bytes_moved=10 * math.prod(shape), dtype=dtype)  # fmt: skip
