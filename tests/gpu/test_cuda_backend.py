"""The cuda backend on a real GPU against torch (cuDNN/ATen BatchNorm, torch.optim), real sizes.

Collected only where torch sees a CUDA device; bench/gpu_check.sh runs it."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close
from ulps import assert_within_torchs_error

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


@pytest.mark.parametrize("mixed", [True, False], ids=["float32 parameters", "all 16-bit"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(64, 256), (1031, 67), (64, 64, 28, 28), (4, 3, 5, 7)], ids=str)
def test_16_bit_batchnorm_against_float64_truth(shape, dtype, mixed):
    """Every output within 2x cuDNN's / ATen's own error in the same dtype (or 2 ulps), against
    float64 truth on the same 16-bit values."""
    c = shape[1]
    pdt = torch.float32 if mixed else dtype
    x = (torch.randn(shape, device=DEV) * 3 + 1).to(dtype)
    dy = torch.randn(shape, device=DEV).to(dtype)
    w = (torch.rand(c, device=DEV) + 0.5).to(pdt)
    b = torch.randn(c, device=DEV).to(pdt)
    outs = []
    for fn, cast in ((F.batch_norm, torch.float64), (F.batch_norm, None),
                     (lambda *a, **k: fastnorm.functional.batch_norm(*a, **k, backend="cuda"), None)):  # fmt: skip

        def to(t, cast=cast):
            return t.to(cast) if cast is not None else t

        rm, rv = to(torch.zeros(c, device=DEV, dtype=pdt)), to(torch.ones(c, device=DEV, dtype=pdt))
        xi, wi, bi = to(x).clone().requires_grad_(), to(w).clone().requires_grad_(), to(b).clone().requires_grad_()
        y = fn(xi, rm, rv, wi, bi, training=True, momentum=0.1, eps=1e-5)
        gx, gw, gb = torch.autograd.grad(y, (xi, wi, bi), to(dy))
        outs.append((y, gx, gw, gb, rm, rv))
    for e, t, m, what in zip(*outs, ["y", "dx", "dw", "db", "running_mean", "running_var"]):
        assert m.dtype == t.dtype, what
        error = (m.double() - e).abs().max().item()
        ulp = torch.finfo(m.dtype).eps * max(e.abs().max().item(), 1e-30)
        assert error <= max(2 * (t.double() - e).abs().max().item(), 2 * ulp), f"{what}: error {error:.3e}"


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


def _run_optimizer(make, start, grads):
    """Parameters and state after the steps, from ``start`` values with the ``grads`` per step
    (None: that parameter has no gradient at that step)."""
    params = [p.clone() for p in start]
    opt = make(params)
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = None if g is None else g.to(p.dtype)
        opt.step()
    return params, [opt.state[p] for p in params]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("name,options", OPTIMIZERS, ids=[n for n, _ in OPTIMIZERS])
def test_optimizers_lockstep_with_torch(name, options, dtype):
    shapes = [(7,), (3, 5), (257, 33), (1,), (300_001,), (1024, 1024)]
    gen = torch.Generator(device=DEV).manual_seed(0)
    start = [torch.randn(s, dtype=dtype, device=DEV, generator=gen) for s in shapes]
    grads = [[None if (i + step) % 7 == 0 else torch.randn(s, dtype=dtype, device=DEV, generator=gen)
              for i, s in enumerate(shapes)] for step in range(30)]  # fmt: skip
    ref, ref_state = _run_optimizer(lambda ps: getattr(torch.optim, name)(ps, **options), start, grads)
    ours, our_state = _run_optimizer(lambda ps: getattr(fastnorm.optim, name)(ps, backend="cuda", **options),
                                     start, grads)  # fmt: skip
    for sa, sb in zip(ref_state, our_state):
        assert sorted(sa) == sorted(sb)
        for key, value in sa.items():
            assert sb[key].device == value.device, f"{key} on {sb[key].device}, torch's on {value.device}"
    if dtype == torch.float64:
        for a, b, sa, sb in zip(ref, ours, ref_state, our_state):
            assert_close(b, a, 1e-10, 1e-12, f"{name} param")
            for key, value in sa.items():
                assert_close(sb[key].cpu(), value.cpu(), 1e-10, 1e-12, f"{name} {key}")
        return
    # float32: the order of roundings differs (our kernels' fused multiply-adds, torch's foreach
    # kernels), and 30 steps of RMSprop's centered sqrt(v - g_avg^2) amplify it where the two
    # nearly cancel. The contract: as close to the float64 result of the same steps as torch's
    # float32 is (within 2x, plus a few float32 ulps).
    exact, _ = _run_optimizer(lambda ps: getattr(torch.optim, name)(ps, **options),
                              [p.double() for p in start], grads)  # fmt: skip
    for a, b, e in zip(ref, ours, exact):
        torch_error = (a.double() - e).abs().max().item()
        our_error = (b.double() - e).abs().max().item()
        ulps = 4 * torch.finfo(torch.float32).eps * max(1.0, e.abs().max().item())
        assert our_error <= 2 * torch_error + ulps, (
            f"{name} float32 parameter: max error vs float64 {our_error:.3g}, torch's {torch_error:.3g}"
        )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("name,options", [o for o in OPTIMIZERS if o[0] in ("SGD", "Adam", "AdamW")],  # fused on CUDA
                         ids=lambda o: str(o))  # fmt: skip
def test_16_bit_optimizers_follow_torch_fused(name, options, dtype):
    """16-bit parameters: torch fused's rule (float32 arithmetic, 16-bit state); within one ulp
    of torch's fused optimizer on the GPU in at least 99% of the values after 10 steps."""
    shapes = [(7,), (257, 33), (1,), (300_001,)]
    gen = torch.Generator(device=DEV).manual_seed(0)
    start = [torch.randn(s, device=DEV, generator=gen).to(dtype) for s in shapes]
    grads = [[torch.randn(s, device=DEV, generator=gen) for s in shapes] for _ in range(10)]
    ref, ref_state = _run_optimizer(lambda ps: getattr(torch.optim, name)(ps, fused=True, **options), start, grads)
    ours, our_state = _run_optimizer(lambda ps: getattr(fastnorm.optim, name)(ps, backend="cuda", **options),
                                     start, grads)  # fmt: skip
    pairs = list(zip(ours, ref))
    for sa, sb in zip(ref_state, our_state):
        pairs += [(sb[k], v) for k, v in sa.items() if k != "step"]
    distance = torch.cat([(a.view(torch.int16).int() - b.view(torch.int16).int()).abs().flatten() for a, b in pairs])
    assert (distance <= 1).double().mean().item() >= 0.99


def test_converted_model_trains_under_float16_autocast():
    """nn.convert(model, backend="cuda") under torch.autocast("cuda", float16) with a GradScaler:
    BatchNorm gets float16 activations with float32 parameters and follows torch's."""
    torch.manual_seed(0)
    theirs = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3), torch.nn.BatchNorm2d(16), torch.nn.ReLU(), torch.nn.Flatten(),
        torch.nn.Linear(16 * 30 * 30, 32), torch.nn.BatchNorm1d(32), torch.nn.ReLU(), torch.nn.Linear(32, 10),
    ).to(DEV)  # fmt: skip
    ours = fastnorm.nn.convert(copy.deepcopy(theirs), backend="cuda")
    runs = []
    for model, opt in ((ours, fastnorm.optim.Adam(ours.parameters(), lr=1e-3, backend="cuda")),
                       (theirs, torch.optim.Adam(theirs.parameters(), lr=1e-3))):  # fmt: skip
        scaler = torch.amp.GradScaler("cuda")
        gen = torch.Generator(device=DEV).manual_seed(1)
        losses = []
        for _ in range(5):
            x = torch.randn(32, 3, 32, 32, device=DEV, generator=gen)
            target = torch.randint(0, 10, (32,), device=DEV, generator=gen)
            opt.zero_grad()
            with torch.autocast("cuda", dtype=torch.float16):
                loss = F.cross_entropy(model(x).float(), target)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            losses.append(loss.item())
        runs.append(losses)
    for a, b in zip(*runs):
        assert abs(a - b) < 0.02 * max(1.0, abs(b)), runs


# LayerNorm / RMSNorm / GroupNorm with backend="cuda": (module, constructor arguments, input shape, layout)
NORM_CASES = [
    ("LayerNorm", (768,), (4096, 768), None),
    ("LayerNorm", ((3, 5),), (7, 3, 5), None),
    ("RMSNorm", (4096,), (512, 4096), None),
    ("GroupNorm", (32, 256), (8, 256, 28, 28), None),
    ("GroupNorm", (32, 256), (8, 256, 28, 28), torch.channels_last),
    ("GroupNorm", (3, 6), (5, 6), None),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name,args,shape,fmt", NORM_CASES, ids=lambda v: str(v))
def test_norm_family_against_float64_truth(name, args, shape, fmt, dtype):
    """Forward and backward: every output within 2x torch's own error in the same dtype (or 2
    ulps) against torch in float64 on the same values; the output keeps the input's layout."""
    torch.manual_seed(0)
    truth = getattr(torch.nn, name)(*args, device=DEV, dtype=torch.float64)
    with torch.no_grad():
        for p in truth.parameters():
            p.copy_(torch.rand_like(p) + 0.5)
    theirs = getattr(torch.nn, name)(*args, device=DEV)
    ours = getattr(fastnorm.nn, name)(*args, backend="cuda", device=DEV)
    theirs.load_state_dict(truth.state_dict())
    ours.load_state_dict(truth.state_dict())
    x = (torch.randn(shape, device=DEV) * 2 + 1).to(dtype)
    dy = torch.randn(shape, device=DEV).to(dtype)
    if fmt is not None:
        x, dy = x.to(memory_format=fmt), dy.to(memory_format=fmt)
    outs = []
    for module, xx, gg in ((truth, x.double(), dy.double()), (theirs, x, dy), (ours, x, dy)):
        xg = xx.clone().requires_grad_()
        y = module(xg)
        y.backward(gg)
        outs.append([y, xg.grad, *[p.grad for p in module.parameters()]])
    assert outs[2][0].is_contiguous(memory_format=fmt or torch.contiguous_format)
    assert_within_torchs_error(["y", "dx", "dweight", "dbias"], *outs)
