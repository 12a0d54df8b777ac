"""LayerNorm, RMSNorm and GroupNorm, forward+backward (training), fastnorm's modules against
torch's, every provider of a (shape, dtype[, layout]) timed side by side (conftest.compare).

Bytes moved by the minimal algorithm: the forward reads x and writes y, the backward reads dy
and x and writes dx: 5 accesses per element (20 B float32, 10 B bfloat16); the per-row statistics
and the parameters are negligible. The report gives % of the in-place roofline measured in the
same run.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import compare, provider_skip_reason

import fastnorm

#: (shape, what it is, quick): rows normalised over the last dim
SHAPES = [
    ((64, 256), "small: an MLP's hidden layer", False),
    ((32, 128, 768), "a BERT-base block's activations (4096 rows)", True),
    ((4096, 768), "4096 rows of 768", False),
    ((8192, 4096), "8192 rows of 4096 (33.6M values)", False),
]
PROVIDERS = ["numba", "torch"]
OPS = {"layer_norm": (torch.nn.LayerNorm, fastnorm.nn.LayerNorm), "rms_norm": (torch.nn.RMSNorm, fastnorm.nn.RMSNorm)}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _params():
    for shape, _, quick in SHAPES:
        for op in OPS:
            for dtype in DTYPES:
                marks = [pytest.mark.quick] if quick and dtype == "float32" else []
                yield pytest.param(op, shape, dtype, marks=marks, id=f"{op}-{'x'.join(map(str, shape))}-{dtype}")


def _fn(op, provider, shape, dtype, device):
    theirs, ours = OPS[op]
    module = theirs(shape[-1], device=device, dtype=dtype) if provider == "torch" else ours(
        shape[-1], device=device, dtype=dtype, backend=provider)  # fmt: skip
    with torch.no_grad():
        module.weight.uniform_(0.5, 1.5)
        if getattr(module, "bias", None) is not None:
            module.bias.uniform_(-0.5, 0.5)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen).to(device, dtype).requires_grad_()
    dy = torch.randn(shape, generator=gen).to(device, dtype)

    def step():
        module(x).backward(dy)
        x.grad = None
        module.zero_grad(set_to_none=True)

    return step


@pytest.mark.parametrize("op,shape,dtype", list(_params()))
def test_norm_forward_backward(benchmark, request, device, budget, op, shape, dtype):
    providers = {}
    for provider in PROVIDERS:
        why = provider_skip_reason(provider, op, device) if provider != "torch" else None
        providers[provider] = why or _fn(op, provider, shape, DTYPES[dtype], device)
    suffix = "" if dtype == "float32" else f"_{dtype}"
    name = op.replace("_", "")
    nbytes = 5 * math.prod(shape) * DTYPES[dtype].itemsize
    compare(benchmark, request, providers, device=device, budget=budget, op=f"{name}_forward_backward{suffix}",
            case="x".join(map(str, shape)), bytes_moved=nbytes)  # fmt: skip


#: GroupNorm: (shape, groups, quick): 32 groups, a diffusion U-Net's / detection head's sizes
GROUP_SHAPES = [((32, 256, 28, 28), 32, True), ((8, 128, 64, 64), 32, False), ((16, 64, 14, 14), 8, False)]


def _group_params():
    for shape, groups, quick in GROUP_SHAPES:
        for layout in ("contiguous", "channels_last"):
            for dtype in DTYPES:
                marks = [pytest.mark.quick] if quick and dtype == "float32" and layout == "contiguous" else []
                case = "x".join(map(str, shape)) + f"-g{groups}" + ("-channels_last" if layout != "contiguous" else "")
                yield pytest.param(shape, groups, layout, dtype, marks=marks, id=f"{case}-{dtype}")


def _group_fn(provider, shape, groups, layout, dtype, device):
    if provider == "torch":
        module = torch.nn.GroupNorm(groups, shape[1], device=device, dtype=dtype)
    else:
        module = fastnorm.nn.GroupNorm(groups, shape[1], device=device, dtype=dtype, backend=provider)
    with torch.no_grad():
        module.weight.uniform_(0.5, 1.5)
        module.bias.uniform_(-0.5, 0.5)
    gen = torch.Generator().manual_seed(0)
    x, dy = torch.randn(shape, generator=gen).to(device, dtype), torch.randn(shape, generator=gen).to(device, dtype)
    if layout == "channels_last":
        x, dy = x.to(memory_format=torch.channels_last), dy.to(memory_format=torch.channels_last)
    x.requires_grad_()

    def step():
        module(x).backward(dy)
        x.grad = None
        module.zero_grad(set_to_none=True)

    return step


@pytest.mark.parametrize("shape,groups,layout,dtype", list(_group_params()))
def test_group_norm_forward_backward(benchmark, request, device, budget, shape, groups, layout, dtype):
    providers = {}
    for provider in PROVIDERS:
        why = provider_skip_reason(provider, "group_norm", device) if provider != "torch" else None
        providers[provider] = why or _group_fn(provider, shape, groups, layout, DTYPES[dtype], device)
    suffix = "" if dtype == "float32" else f"_{dtype}"
    case = "x".join(map(str, shape)) + f"-g{groups}" + ("-channels_last" if layout != "contiguous" else "")
    nbytes = 5 * math.prod(shape) * DTYPES[dtype].itemsize
    compare(benchmark, request, providers, device=device, budget=budget, op=f"groupnorm_forward_backward{suffix}",
            case=case, bytes_moved=nbytes)  # fmt: skip
