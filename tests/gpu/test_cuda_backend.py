"""The cuda backend on a real GPU against torch (cuDNN/ATen BatchNorm, torch.optim), real sizes.

Collected only where torch sees a CUDA device; bench/gpu_check.sh runs it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close

import fastnorm

DEV = torch.device("cuda")

BN_SHAPES = [(2, 3), (64, 256), (1031, 67), (8192, 2048), (4, 3, 5, 7), (64, 64, 28, 28), (7, 33, 9, 11, 3)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape", BN_SHAPES, ids=str)
@pytest.mark.parametrize("training", [True, False])
def test_batchnorm_matches_torch(shape, dtype, training):
    c = shape[1]
    x = (torch.randn(shape, dtype=dtype, device=DEV) * 3 + 1).requires_grad_(True)
    w = (torch.rand(c, dtype=dtype, device=DEV) + 0.5).requires_grad_(True)
    b = torch.randn(c, dtype=dtype, device=DEV).requires_grad_(True)
    dy = torch.randn(shape, dtype=dtype, device=DEV)
    outs = []
    for fn in (F.batch_norm, lambda *a, **k: fastnorm.functional.batch_norm(*a, **k, backend="cuda")):
        rm = torch.linspace(-1, 1, c, dtype=dtype, device=DEV)
        rv = torch.linspace(0.5, 2, c, dtype=dtype, device=DEV)
        xi = x.detach().clone().requires_grad_(True)
        y = fn(xi, rm, rv, w, b, training=training, momentum=0.1, eps=1e-5)
        gx, gw, gb = torch.autograd.grad(y, (xi, w, b), dy)
        outs.append((y, gx, gw, gb, rm, rv))
    tol = 1e-4 if dtype == torch.float32 else 1e-9
    for a, e, what in zip(outs[1], outs[0], ["y", "dx", "dw", "db", "running_mean", "running_var"]):
        scale = max(1.0, e.abs().max().item())
        assert_close(a, e, tol * (20 if what in ("dw", "db") else 1), tol * scale, what)


def test_modules_convert_and_channels_last():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8)).to(DEV)
    ref = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8)).to(DEV)
    ref.load_state_dict(model.state_dict())
    fastnorm.nn.convert(model, backend="cuda")
    x = torch.randn(16, 3, 20, 20, device=DEV).to(memory_format=torch.channels_last)
    assert_close(model(x), ref(x), 1e-4, 1e-4, "channels-last conv + BN")
    assert_close(model[1].running_var, ref[1].running_var, 1e-5, 1e-6, "running_var")


def test_launches_follow_torch_stream():
    bn = fastnorm.nn.BatchNorm1d(512, backend="cuda").to(DEV)
    x = torch.randn(4096, 512, device=DEV)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        y = bn(x * 2)  # the multiply and our kernels queue on `side`, in order
    torch.cuda.current_stream().wait_stream(side)
    expected = F.batch_norm(x * 2, None, None, training=True)
    assert_close(y, expected, 1e-4, 1e-4, "output on a side stream")


OPTIMIZERS = [
    ("SGD", {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01}),
    ("SGD", {"lr": 0.05}),
    ("Adagrad", {"lr": 0.05, "lr_decay": 0.01}),
    ("RMSprop", {"lr": 0.01, "centered": True, "momentum": 0.9}),
    ("Adam", {"lr": 0.01, "amsgrad": True, "weight_decay": 0.01}),
    ("AdamW", {"lr": 0.01, "maximize": True}),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("name,options", OPTIMIZERS, ids=[n for n, _ in OPTIMIZERS])
def test_optimizers_lockstep_with_torch(name, options, dtype):
    shapes = [(7,), (3, 5), (257, 33), (1,), (300_001,), (1024, 1024)]
    ref_params = [torch.randn(s, dtype=dtype, device=DEV) for s in shapes]
    our_params = [p.clone() for p in ref_params]
    ref = getattr(torch.optim, name)(ref_params, **options)
    ours = getattr(fastnorm.optim, name)(our_params, backend="cuda", **options)
    for step in range(30):
        for i, (a, b) in enumerate(zip(ref_params, our_params)):
            if (i + step) % 7 == 0:
                a.grad = b.grad = None
                continue
            g = torch.randn_like(a)
            a.grad, b.grad = g.clone(), g.clone()
        ref.step()
        ours.step()
    tol = (2e-5, 2e-6) if dtype == torch.float32 else (1e-10, 1e-12)
    for a, b in zip(ref_params, our_params):
        assert_close(b, a, *tol, f"{name} param")
        for key, value in ref.state[a].items():
            assert_close(ours.state[b][key].cpu(), value.cpu(), *tol, f"{name} {key}")
