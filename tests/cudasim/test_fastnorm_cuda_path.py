"""fastnorm's cuda path end to end under the simulator: modules, autograd and optimizers with
backend="cuda" on CPU tensors, against torch.

Under Numba's simulator "device" memory is host memory, so the cuda kernels can run on CPU
tensors' addresses. Here the dispatcher is told to treat the cuda backend as a CPU one (no
stream or allocator hooks, no device guard); everything else is the code a GPU runs: the
DeviceView conversions, the launchers and their arguments, the step counters in host memory.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from ulps import assert_within_torchs_error

import fastnorm

pytestmark = pytest.mark.usefixtures("cuda_backend_on_cpu")


def _close(actual, expected, tol, what):
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol, msg=lambda m: f"{what}: {m}")


# (shape, memory format): rows (N, C), short planes, long planes, channels-last rows
CASES = [((16, 5), None), ((4, 3, 5, 2), None), ((3, 4, 9, 11), None), ((4, 3, 5, 7), torch.channels_last)]


# float64 for every case, float32 for the long planes (the simulator runs each GPU thread in Python)
DTYPE_CASES = [(shape, fmt, torch.float64) for shape, fmt in CASES] + [((3, 4, 9, 11), None, torch.float32)]


@pytest.mark.parametrize("shape,fmt,dtype", DTYPE_CASES, ids=[f"{s}-{d}" for s, _, d in DTYPE_CASES])
def test_batchnorm_module_train_eval_backward(shape, fmt, dtype):
    torch.manual_seed(0)
    c = shape[1]
    cls = {2: "BatchNorm1d", 4: "BatchNorm2d"}[len(shape)]
    ours = getattr(fastnorm.nn, cls)(c, backend="cuda", dtype=dtype)
    theirs = getattr(torch.nn, cls)(c, dtype=dtype)
    with torch.no_grad():
        for m in (ours, theirs):
            m.weight.copy_(torch.linspace(0.5, 1.5, c, dtype=dtype))
            m.bias.copy_(torch.linspace(-1, 1, c, dtype=dtype))
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    for training in (True, True, False):
        ours.train(training)
        theirs.train(training)
        x = torch.randn(shape, dtype=dtype) * 2 + 3
        if fmt is not None:
            x = x.to(memory_format=fmt)
        dy = torch.randn(shape, dtype=dtype)
        xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        ya, yb = ours(xa), theirs(xb)
        ya.backward(dy)
        yb.backward(dy)
        _close(ya, yb, tol, "y")
        _close(xa.grad, xb.grad, tol, "dx")
        _close(ours.running_mean, theirs.running_mean, tol, "running_mean")
        _close(ours.running_var, theirs.running_var, tol, "running_var")
    _close(ours.weight.grad, theirs.weight.grad, tol * 10, "dweight")
    _close(ours.bias.grad, theirs.bias.grad, tol * 10, "dbias")


def test_functional_without_affine_or_running_stats():
    x = torch.randn(6, 4, 3, 8, dtype=torch.float64, requires_grad=True)
    y = fastnorm.functional.batch_norm(x, None, None, training=True, backend="cuda")
    _close(y, F.batch_norm(x, None, None, training=True), 1e-10, "y")
    (g,) = torch.autograd.grad(y.sum(), x)
    (e,) = torch.autograd.grad(F.batch_norm(x, None, None, training=True).sum(), x)
    _close(g, e, 1e-9, "dx")


OPTIMIZERS = [
    ("SGD", {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01}),
    ("Adagrad", {"lr": 0.05, "lr_decay": 0.01}),
    ("RMSprop", {"lr": 0.01, "momentum": 0.9}),
    ("Adam", {"lr": 0.01, "amsgrad": True}),
    ("AdamW", {"lr": 0.01}),
]


@pytest.mark.parametrize("name,options", OPTIMIZERS, ids=[n for n, _ in OPTIMIZERS])
def test_optimizers_lockstep_with_torch(name, options):
    torch.manual_seed(1)
    shapes = [(7,), (3, 5), (1,)]
    ref_params = [torch.randn(s, dtype=torch.float64) for s in shapes]
    our_params = [p.clone() for p in ref_params]
    ref = getattr(torch.optim, name)(ref_params, **options)
    ours = getattr(fastnorm.optim, name)(our_params, backend="cuda", **options)
    for step in range(5):
        for i, (a, b) in enumerate(zip(ref_params, our_params)):
            if (i + step) % 4 == 3:  # a parameter without a gradient falls behind: steps differ
                a.grad = b.grad = None
                continue
            g = torch.randn_like(a)
            a.grad, b.grad = g.clone(), g.clone()
        ref.step()
        ours.step()
    for a, b in zip(ref_params, our_params):
        _close(b, a, 1e-10, f"{name} parameter")
        for key, value in ref.state[a].items():
            mine = ours.state[b][key]
            assert mine.device == value.device, f"{key} lives on {mine.device}, torch's on {value.device}"
            _close(mine, value, 1e-10, f"{name} {key}")


def test_device_view_of_a_tensor_is_what_the_kernels_see():
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    view = fastnorm._arrays.CudaArrays.view(t)
    assert (view.ptr, view.shape, view.dtype) == (t.data_ptr(), (3, 4), np.dtype(np.float32))
    assert view.owner is t
    with pytest.raises(ValueError, match="C-contiguous"):
        fastnorm._arrays.CudaArrays.view(t.t())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("name,options", [OPTIMIZERS[0], OPTIMIZERS[3]], ids=["SGD", "Adam"])
def test_16_bit_optimizers_follow_torch_fused(name, options, dtype):
    """16-bit parameters on the cuda backend: torch fused's rule (float32 arithmetic, 16-bit
    state), within one ulp of torch's fused optimizer in at least 99% of the values."""
    torch.manual_seed(2)
    ref_params = [torch.randn(s).to(dtype) for s in [(7,), (3, 5), (1,)]]
    our_params = [p.clone() for p in ref_params]
    ref = getattr(torch.optim, name)(ref_params, fused=True, **options)
    ours = getattr(fastnorm.optim, name)(our_params, backend="cuda", **options)
    for _ in range(4):
        for a, b in zip(ref_params, our_params):
            a.grad = torch.randn_like(a)
            b.grad = a.grad.clone()
        ref.step()
        ours.step()
    pairs = [(b, a) for a, b in zip(ref_params, our_params)]
    pairs += [
        (ours.state[b][k], v) for a, b in zip(ref_params, our_params) for k, v in ref.state[a].items() if k != "step"
    ]
    distance = torch.cat([(m.view(torch.int16).int() - t.view(torch.int16).int()).abs().flatten() for m, t in pairs])
    assert all(m.dtype == dtype for m, _ in pairs)
    assert (distance <= 1).double().mean() >= 0.99


def test_stochastic_rounding_on_the_cuda_backend_matches_numba():
    """One generator on every backend: the cuda kernels round stochastically like the CPU ones."""
    results = []
    for backend in ("cuda", "numba"):
        torch.manual_seed(3)
        p = torch.ones(300, dtype=torch.bfloat16)
        opt = fastnorm.optim.SGD([p], lr=1e-3, backend=backend, stochastic_rounding=True)
        for _ in range(3):
            p.grad = torch.full_like(p, 0.7)
            opt.step()
        results.append(p.clone())
    assert torch.equal(results[0].view(torch.int16), results[1].view(torch.int16))
    assert len(results[0].unique()) > 1  # rounded both ways


# 16-bit BatchNorm on the cuda backend: (shape, memory format), rows, short and long planes
HALF_BN_CASES = [((16, 5), None), ((4, 3, 5, 2), None), ((3, 4, 9, 11), None), ((4, 3, 5, 7), torch.channels_last)]


# bfloat16 with float32 and with bfloat16 parameters on every case; float16 on two (the simulator is slow)
HALF_BN_MATRIX = [(s, f, torch.bfloat16, m) for s, f in HALF_BN_CASES for m in (True, False)]
HALF_BN_MATRIX += [(*HALF_BN_CASES[0], torch.float16, True), (*HALF_BN_CASES[2], torch.float16, False)]


@pytest.mark.parametrize("shape,fmt,dtype,mixed", HALF_BN_MATRIX, ids=lambda v: str(v))
def test_16_bit_batchnorm_against_float64_truth(shape, fmt, dtype, mixed):
    """Training forward, backward and eval: every output within 2x torch's own error in the same
    dtype (or 2 ulps), against float64 truth on the same 16-bit values; torch's dtypes."""
    torch.manual_seed(0)
    c = shape[1]
    cls = {2: "BatchNorm1d", 4: "BatchNorm2d"}[len(shape)]
    pdt = torch.float32 if mixed else dtype
    truth = getattr(torch.nn, cls)(c, dtype=torch.float64)
    with torch.no_grad():
        truth.weight.copy_(torch.linspace(0.5, 1.5, c).to(pdt))
        truth.bias.copy_(torch.linspace(-1, 1, c).to(pdt))
    theirs = getattr(torch.nn, cls)(c).to(pdt)
    ours = getattr(fastnorm.nn, cls)(c, backend="cuda").to(pdt)
    theirs.load_state_dict(truth.state_dict())
    ours.load_state_dict(truth.state_dict())
    x = (torch.randn(shape) * 2 + 3).to(dtype)
    dy = torch.randn(shape).to(dtype)
    if fmt is not None:
        x, dy = x.to(memory_format=fmt), dy.to(memory_format=fmt)
    outs = []
    for module, xx, gg in ((truth, x.double(), dy.double()), (theirs, x, dy), (ours, x, dy)):
        xg = xx.clone().requires_grad_()
        y = module(xg)
        y.backward(gg)
        module.eval()
        outs.append([y, xg.grad, module.weight.grad, module.bias.grad, module.running_mean, module(xx)])
    assert_within_torchs_error(["y", "dx", "dweight", "dbias", "running_mean", "eval y"], *outs)


# -- LayerNorm, RMSNorm and GroupNorm on the cuda backend -------------------------------------------

# (module, constructor arguments, input shape, memory format)
NORM_CASES = [
    ("LayerNorm", (7,), (3, 4, 7), None),
    ("LayerNorm", ((3, 5),), (2, 3, 5), None),
    ("RMSNorm", (9,), (5, 9), None),
    ("RMSNorm", ((2, 6),), (3, 2, 6), None),
    ("GroupNorm", (2, 6), (3, 6, 5), None),
    ("GroupNorm", (3, 6), (2, 6, 3, 2), torch.channels_last),
    ("GroupNorm", (4, 4), (5, 4), None),
]


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts the cuda kernels' launcher calls: the modules must run them, not fall back to torch."""
    import fastnorm_kernels.numba_cuda as kc

    calls = []
    for fn in ("layer_norm_forward", "layer_norm_backward", "rms_norm_forward", "rms_norm_backward",
               "group_norm_forward", "group_norm_backward"):  # fmt: skip
        real = getattr(kc, fn)
        monkeypatch.setattr(kc, fn, lambda *a, _real=real, _fn=fn: (calls.append(_fn), _real(*a))[1])
    return calls


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("name,args,shape,fmt", NORM_CASES, ids=lambda v: str(v))
def test_norm_modules_on_the_cuda_backend(name, args, shape, fmt, dtype, kernel_calls):
    """Against torch in float64 on the same values (the kernels sum in float64: at groups of one
    value, y = bias exactly, where torch's float32 x * scale + shift is 2e-5 off)."""
    torch.manual_seed(0)
    theirs = getattr(torch.nn, name)(*args, dtype=torch.float64)
    with torch.no_grad():
        for p in theirs.parameters():
            p.copy_((torch.rand_like(p) + 0.5).to(dtype))
    ours = getattr(fastnorm.nn, name)(*args, backend="cuda", dtype=dtype)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(shape, dtype=dtype) * 2 + 1
    dy = torch.randn(shape, dtype=dtype)
    if fmt is not None:
        x, dy = x.to(memory_format=fmt), dy.to(memory_format=fmt)
    xa, xb = x.clone().requires_grad_(), x.double().requires_grad_()
    ya, yb = ours(xa), theirs(xb)
    ya.backward(dy)
    yb.backward(dy.double())
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    assert ya.dtype == dtype and ya.is_contiguous(memory_format=fmt or torch.contiguous_format)
    _close(ya.double(), yb, tol, "y")
    _close(xa.grad.double(), xb.grad, tol, "dx")
    for (pname, p), q in zip(ours.named_parameters(), theirs.parameters()):
        assert p.grad.dtype == dtype
        _close(p.grad.double(), q.grad, tol * 10, f"d{pname}")
    op = {"LayerNorm": "layer_norm", "RMSNorm": "rms_norm", "GroupNorm": "group_norm"}[name]
    assert kernel_calls == [f"{op}_forward", f"{op}_backward"]


@pytest.mark.parametrize("name,args,shape,fmt", [NORM_CASES[0], NORM_CASES[2], NORM_CASES[5]], ids=lambda v: str(v))
def test_16_bit_norms_on_the_cuda_backend_against_float64_truth(name, args, shape, fmt, kernel_calls):
    """bfloat16 input, float32 parameters (torch's mixed rule): y and dx within 2x torch's own
    error (or 2 ulps) against float64 truth on the same values; the parameters' gradients float32."""
    torch.manual_seed(1)
    truth = getattr(torch.nn, name)(*args, dtype=torch.float64)
    theirs, ours = getattr(torch.nn, name)(*args), getattr(fastnorm.nn, name)(*args, backend="cuda")
    theirs.load_state_dict(truth.state_dict())
    ours.load_state_dict(truth.state_dict())
    x = (torch.randn(shape) * 2 + 1).to(torch.bfloat16)
    dy = torch.randn(shape).to(torch.bfloat16)
    if fmt is not None:
        x, dy = x.to(memory_format=fmt), dy.to(memory_format=fmt)
    outs = []
    for module, xx, gg in ((truth, x.double(), dy.double()), (theirs, x, dy), (ours, x, dy)):
        xg = xx.clone().requires_grad_()
        y = module(xg)
        y.backward(gg)
        outs.append([y, xg.grad, *[p.grad for p in module.parameters()]])
    assert_within_torchs_error(["y", "dx", "dweight", "dbias"], *outs)
    assert len(kernel_calls) == 2


def test_functional_norms_on_the_cuda_backend():
    x = torch.randn(4, 6, 3, dtype=torch.float64, requires_grad=True)
    w = torch.rand(3, dtype=torch.float64, requires_grad=True)
    for ours, theirs in [
        (fastnorm.functional.layer_norm(x, (3,), w, None, backend="cuda"), F.layer_norm(x, (3,), w, None)),
        (fastnorm.functional.rms_norm(x, (3,), w, backend="cuda"), F.rms_norm(x, (3,), w)),
        (fastnorm.functional.group_norm(x, 3, backend="cuda"), F.group_norm(x, 3)),
    ]:
        _close(ours, theirs, 1e-10, "y")
        for a, b in zip(torch.autograd.grad(ours.square().sum(), (x, w), allow_unused=True),
                        torch.autograd.grad(theirs.square().sum(), (x, w), allow_unused=True)):  # fmt: skip
            if b is None:
                assert a is None
            else:
                _close(a, b, 1e-9, "gradient")


def test_auto_leaves_the_norm_family_to_torch_on_a_gpu():
    """The cuda kernels of LayerNorm / RMSNorm / GroupNorm have not been timed on a GPU: "auto"
    keeps torch's there (BatchNorm and the optimizers keep the cuda backend where it measured faster)."""
    from fastnorm import _dispatch

    gpu = torch.device("cuda")
    for op in ("layer_norm", "rms_norm", "group_norm"):
        assert _dispatch._implements("cuda", op)
        assert _dispatch._resolve("auto", op, gpu).name == "torch"
    assert "batch_norm" in _dispatch.AUTO_CUDA_OPS and "adam" in _dispatch.AUTO_CUDA_OPS


# (op, kind, elements, what "auto" runs on a GPU): _dispatch.AUTO_CUDA_MIN_NUMEL, from the H200
# measurements (bench/results/gpu.md): the cuda backend only from where it measured faster
AUTO_ON_GPU = [
    ("batch_norm", "batch_norm_planes", 64 * 256 * 28 * 28, "torch"),  # 0.30x measured
    ("batch_norm", "batch_norm_planes", 256 * 64 * 56 * 56, "cuda"),  # 1.57x measured
    ("batch_norm", "batch_norm", 8192 * 2048, "torch"),  # (N, C) rows: never measured faster
    ("batch_norm", "batch_norm_channels_last", 10**9, "torch"),  # never measured
    ("adam", "adam", 235_146, "torch"),  # the book's MLP: 0.79x
    ("adam", "adam", 100_000_000, "cuda"),  # 2.10x
    ("sgd", "sgd_momentum", 10**9, "cuda"),  # 1.50x
    ("sgd", "sgd", 10**9, "torch"),  # 0.90x at 1B
]


@pytest.mark.parametrize("op,kind,numel,expected", AUTO_ON_GPU, ids=lambda v: str(v))
def test_auto_on_a_gpu_runs_the_cuda_backend_only_where_it_measured_faster(monkeypatch, op, kind, numel, expected):
    from fastnorm import _dispatch

    monkeypatch.setitem(_dispatch._DEVICE_TYPE, "cuda", "cuda")  # a GPU's tensors, as the dispatcher sees them
    _dispatch._RESOLVED.clear()
    assert _dispatch.resolve("auto", op, torch.device("cuda"), numel, kind).name == expected
    assert _dispatch.resolve("cuda", op, torch.device("cuda"), numel, kind).name == "cuda", "asked for: always"
    # the CPU's thresholds are their own
    cpu = _dispatch.resolve("auto", op, torch.device("cpu"), numel, kind).name
    assert cpu == ("torch" if _dispatch.auto_prefers_torch(kind, numel, "cpu") else "numba")
