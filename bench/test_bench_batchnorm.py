"""BatchNorm: forward (training), forward (eval), backward, forward+backward; every provider of a
(mode, shape, layout) timed side by side (conftest.compare). 4-D shapes run in both memory
layouts: contiguous (N, C, H, W) and ``torch.channels_last`` (what CPU convolutions produce).

Bytes moved by the minimal algorithm (float32): forward reads x and writes y (8 B/element),
backward reads dy and x and writes dx (12 B/element), forward+backward 20 B/element.
fastnorm's large outputs come from its CPU buffer pool (warm pages); torch's from its allocator,
which returns large blocks to the OS, so each call pays fresh page faults: the ``torch-prealloc``
provider shows torch's kernels without that cost, and ``numba-kernels`` is its fastnorm counterpart:
the numba kernels called on the tensors' addresses into outputs allocated once, no autograd and no
Python module around them. Compare ``numba`` with ``torch`` (the modules users call) and
``numba-kernels`` with ``torch-prealloc`` (the kernels alone).
"""

from __future__ import annotations

import math

import pytest
import torch
from bn_providers import kernels_fn, prealloc_fn
from conftest import compare

import fastnorm

# (shape, what it is, quick: part of --bench-quick)
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
#: torch: nn.BatchNorm as users run it (outputs from torch's allocator: on CPU, large ones are
#: fresh pages each call); torch-prealloc: torch's own kernels (aten::native_batch_norm and its
#: backward, .out variants) writing into outputs allocated once, no autograd: what torch would
#: cost with a warm output allocator, as fastnorm's CPU buffer pool gives its own outputs;
#: numba-kernels: fastnorm's numba kernels the same way (address entry points, outputs allocated
#: once, no autograd): the like-for-like partner of torch-prealloc
PROVIDERS = ["reference", "numba", "numba-kernels", "cuda", "torch", "torch-prealloc"]
MODULES = {2: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d}


def _case(shape, channels_last: bool = False) -> str:
    return "x".join(map(str, shape)) + ("-channels_last" if channels_last else "")


def _params():
    for shape, _, quick in SHAPES:
        for channels_last in (False, True) if len(shape) == 4 else (False,):
            for mode in MODES:
                marks = [pytest.mark.quick] if quick and mode in ("forward_backward", "forward_eval") else []
                yield pytest.param(mode, shape, channels_last, marks=marks, id=f"{mode}-{_case(shape, channels_last)}")


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


def _provider_fn(mode, shape, channels_last, provider, device, x, dy):
    if provider == "torch-prealloc":
        return prealloc_fn(mode, x, dy)
    if provider == "numba-kernels":
        return kernels_fn(mode, x, dy, channels_last)
    bn = _module(shape, provider, device)
    if mode == "forward_train":
        return lambda: bn(x)
    if mode == "forward_eval":
        bn.eval()

        def fn():
            with torch.no_grad():
                return bn(x)

        return fn
    xg = x.clone(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    xg.requires_grad_(True)
    if mode == "backward":
        y = bn(xg)
        inputs = [xg, bn.weight, bn.bias]
        return lambda: torch.autograd.grad(y, inputs, dy, retain_graph=True)

    def forward_backward():  # through the autograd path as in training
        xg.grad = bn.weight.grad = bn.bias.grad = None
        bn(xg).backward(dy)

    return forward_backward


@pytest.mark.parametrize("mode,shape,channels_last", list(_params()))
def test_batchnorm(benchmark, request, runnable, device, budget, mode, shape, channels_last):
    if tuple(shape) in GPU_ONLY and device.type != "cuda":
        pytest.skip("GPU-size shape: measured with --bench-device cuda")
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = (torch.randn(shape, device=device) * 2 + 0.5).contiguous(memory_format=fmt)
    dy = torch.randn(shape, device=device).contiguous(memory_format=fmt)
    providers = {}
    for provider in PROVIDERS:
        why = runnable(provider, "batch_norm")
        if provider == "reference" and math.prod(shape) > 4_000_000:
            why = why or "the NumPy reference above 4M values: seconds per call, not a comparison"
        providers[provider] = why or _provider_fn(mode, shape, channels_last, provider, device, x, dy)
    compare(benchmark, request, providers, device=device, budget=budget, op=f"batchnorm_{mode}",
            case=_case(shape, channels_last), bytes_moved=MODES[mode] * math.prod(shape), dtype="float32",
            layout="channels_last" if channels_last else "contiguous")  # fmt: skip


# -- 16-bit inputs (issue #14): what torch.autocast hands a BatchNorm (16-bit activations,
# float32 weight, bias and running statistics); forward+backward moves 10 B per element
HALF_SHAPES = [((64, 256), True), ((64, 64, 28, 28), True), ((32, 256, 14, 14), False)]
HALF_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def _half_params():
    for shape, quick in HALF_SHAPES:
        for dtype in HALF_DTYPES:
            marks = [pytest.mark.quick] if quick and dtype == "bfloat16" else []
            yield pytest.param(shape, dtype, marks=marks, id=f"{dtype}-{_case(shape)}")


@pytest.mark.parametrize("shape,dtype", list(_half_params()))
def test_batchnorm_16bit_forward_backward(benchmark, request, runnable, device, budget, shape, dtype):
    torch_dtype = HALF_DTYPES[dtype]
    providers = {}
    for provider in ["reference", "numba", "cuda", "torch"]:
        why = runnable(provider, "batch_norm")
        if not why and provider != "torch" and not fastnorm._dispatch.has_dtype(provider, "batch_norm", torch_dtype):
            why = f"backend {provider!r} has no {dtype} BatchNorm kernels"
        if why:
            providers[provider] = why
            continue
        bn = _module(shape, provider, device)
        x = (torch.randn(shape, device=device) * 2 + 0.5).to(torch_dtype).requires_grad_(True)
        dy = torch.randn(shape, device=device).to(torch_dtype)

        def fn(bn=bn, x=x, dy=dy):
            x.grad = bn.weight.grad = bn.bias.grad = None
            bn(x).backward(dy)

        providers[provider] = fn
    compare(benchmark, request, providers, device=device, budget=budget, op=f"batchnorm_forward_backward_{dtype}",
            case=_case(shape), bytes_moved=10 * math.prod(shape), dtype=dtype)  # fmt: skip
