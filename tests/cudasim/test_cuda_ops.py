"""The C++ cuda ops' launch plans (fastnorm/csrc/batch_norm_cuda.cpp) under the simulator.

The C++ ops launch the numba-cuda kernels themselves on a GPU (fastnorm/csrc/cuda_launch.cpp).
Here, without one, their CUDA dispatch key's kernels are called on CPU tensors
(``OpOverload.redispatch`` with the CUDA key) and every launch goes through a hook that runs the
kernel under Numba's simulator on those tensors' host memory: the grids, the argument lists,
the scratch sizes, the choice of kernels and the outputs are the C++ code's, as a GPU would get
them. Results must equal, bit for bit, those of the Python launchers (kernels/fastnorm_kernels/numba_cuda/
batchnorm.py, the same kernels and grids, through fastnorm's cuda backend), and torch's
values within precision. What this cannot see: the driver calls themselves (module loading,
cuLaunchKernel, streams), which tests/gpu checks on hardware.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import fastnorm
from fastnorm import _ops

CUDA = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)


class _Op:
    """An op of torch.ops.fastnorm called through its CUDA kernel (looked up once the ops are loaded)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def redispatch(self, keys, *args):
        return getattr(torch.ops.fastnorm, self.name).default.redispatch(keys, *args)


FORWARD, BACKWARD, STATS = _Op("batch_norm_forward"), _Op("batch_norm_backward"), _Op("batch_norm_stats")


@pytest.fixture
def launches(cpp_cuda_launches):
    """The C++ cuda ops' launches run by the simulator (conftest.py): (kernel, grid, block) each."""
    return cpp_cuda_launches


# (shape, memory format, the kernels the layout takes): rows (N, C); planes shorter than
# PLANE_MIN (flat elementwise kernels); long planes; channels-last (rows)
CASES = [
    ((37, 5), None, ("_stats_rows", "_normalize_flat")),
    ((4, 3, 5, 2), None, ("_stats_planes", "_normalize_flat")),
    ((3, 4, 40), None, ("_stats_planes", "_normalize_planes")),
    ((4, 3, 5, 7), torch.channels_last, ("_stats_rows", "_normalize_flat")),
]
DTYPES = [torch.float64, torch.float32]


def _inputs(shape, fmt, dtype, param_dtype=None):
    torch.manual_seed(0)
    c = shape[1]
    param_dtype = param_dtype or dtype
    x = (torch.randn(shape) * 2 + 3).to(dtype)
    if fmt is not None:
        x = x.to(memory_format=fmt)
    w = torch.linspace(0.5, 1.5, c).to(param_dtype)
    b = torch.linspace(-1, 1, c).to(param_dtype)
    rm, rv = torch.linspace(-0.5, 0.5, c).to(param_dtype), torch.linspace(0.5, 2, c).to(param_dtype)
    return x, w, b, rm, rv


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,fmt,kinds", CASES, ids=lambda v: str(v))
def test_training_forward_and_backward_as_torch_and_the_python_launchers(launches, cuda_backend_on_cpu, shape, fmt,
                                                                         kinds, dtype):  # fmt: skip
    x, w, b, rm, rv = _inputs(shape, fmt, dtype)
    dy = torch.randn(shape, dtype=dtype)
    if fmt is not None:
        dy = dy.to(memory_format=fmt)
    rm_ops, rv_ops = rm.clone(), rv.clone()
    y, mean, invstd = FORWARD.redispatch(CUDA, x, w, b, rm_ops, rv_ops, True, 0.1, 1e-5)
    dx, dw, db = BACKWARD.redispatch(CUDA, dy, x, w, mean, invstd, True, [True, True, True])
    ran = [name for name, _, _ in launches]
    assert ran[:3] == [kinds[0], "_finalize_train", kinds[1]], ran
    grads = [kinds[0].replace("stats", "grad"), "_finalize_backward", kinds[1].replace("normalize", "input_grad")]
    assert ran[3:] == grads, ran
    assert y.stride() == x.stride() and dx.stride() == x.stride(), "outputs in the input's layout"

    # torch's values (float64: to rounding; float32: to its precision)
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    rm_t, rv_t = rm.clone(), rv.clone()
    xt, wt, bt = x.clone().requires_grad_(), w.clone().requires_grad_(), b.clone().requires_grad_()
    yt = F.batch_norm(xt, rm_t, rv_t, wt, bt, True, 0.1, 1e-5)
    yt.backward(dy)
    for name, ours, theirs in [("y", y, yt), ("running_mean", rm_ops, rm_t), ("running_var", rv_ops, rv_t),
                               ("dx", dx, xt.grad), ("dweight", dw, wt.grad), ("dbias", db, bt.grad)]:  # fmt: skip
        torch.testing.assert_close(ours, theirs.detach(), rtol=tol, atol=tol, msg=lambda m, n=name: f"{n}: {m}")

    # the Python launchers: the same kernels and grids, so the same bits
    rm_py, rv_py = rm.clone(), rv.clone()
    xp, wp, bp = x.clone().requires_grad_(), w.clone().requires_grad_(), b.clone().requires_grad_()
    yp = fastnorm.functional.batch_norm(xp, rm_py, rv_py, wp, bp, True, 0.1, 1e-5, backend="cuda")
    yp.backward(dy)
    for name, ours, theirs in [("y", y, yp), ("running_mean", rm_ops, rm_py), ("running_var", rv_ops, rv_py),
                               ("dx", dx, xp.grad), ("dweight", dw, wp.grad), ("dbias", db, bp.grad)]:  # fmt: skip
        assert torch.equal(ours, theirs.detach()), f"{name}: the C++ and Python launch plans differ"


@pytest.mark.parametrize("shape,fmt,kinds", CASES[:2], ids=lambda v: str(v))
def test_eval_forward_and_its_backward(launches, shape, fmt, kinds):
    x, w, b, rm, rv = _inputs(shape, fmt, torch.float64)
    y, mean, invstd = FORWARD.redispatch(CUDA, x, w, b, rm, rv, False, 0.1, 1e-5)
    assert [name for name, _, _ in launches] == ["_finalize_eval", kinds[1]]
    torch.testing.assert_close(y, F.batch_norm(x, rm, rv, w, b, False, 0.1, 1e-5), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(mean, rm)
    torch.testing.assert_close(invstd, (rv + 1e-5).rsqrt())
    dy = torch.randn(shape, dtype=torch.float64)
    launches.clear()
    dx, dw, db = BACKWARD.redispatch(CUDA, dy, x, w, mean, invstd, False, [True, False, False])
    assert dw is None and db is None
    assert [name for name, _, _ in launches] == ["_finalize_backward", kinds[1].replace("normalize", "input_grad")], (
        "eval dx alone needs no sums"
    )
    xt = x.clone().requires_grad_()
    F.batch_norm(xt, rm, rv, w, b, False, 0.1, 1e-5).backward(dy)
    torch.testing.assert_close(dx, xt.grad, rtol=1e-12, atol=1e-12)


def test_without_affine_or_running_statistics_and_some_gradients(launches):
    x = torch.randn(9, 4, 3, dtype=torch.float64) * 3 - 1
    y, mean, invstd = FORWARD.redispatch(CUDA, x, None, None, None, None, True, 0.1, 1e-5)
    torch.testing.assert_close(y, F.batch_norm(x, None, None, None, None, True, 0.1, 1e-5), rtol=1e-12, atol=1e-12)
    dy = torch.randn_like(x)
    dx, dw, db = BACKWARD.redispatch(CUDA, dy, x, None, mean, invstd, True, [False, True, True])
    assert dx is None
    xt = x.clone().requires_grad_()
    wt = torch.ones(4, dtype=torch.float64, requires_grad=True)
    bt = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    F.batch_norm(xt, None, None, wt, bt, True, 0.1, 1e-5).backward(dy)
    torch.testing.assert_close(dw, wt.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(db, bt.grad, rtol=1e-12, atol=1e-12)
    assert "_input_grad_flat" not in [name for name, _, _ in launches], "no dx asked: no dx kernel"


def test_strided_inputs_and_running_statistics(launches):
    """A strided input is read through a dense copy; strided running statistics are updated in place."""
    base = torch.randn(6, 10, dtype=torch.float64)
    x = base[:, ::2]  # (6, 5), not contiguous
    store = torch.zeros(5, 2, dtype=torch.float64)
    rm, rv = store[:, 0], store[:, 1].fill_(1.0)
    rm_t, rv_t = rm.clone(), rv.clone()
    y, _, _ = FORWARD.redispatch(CUDA, x, None, None, rm, rv, True, 0.3, 1e-5)
    torch.testing.assert_close(y, F.batch_norm(x, rm_t, rv_t, None, None, True, 0.3, 1e-5), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(store[:, 0], rm_t, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(store[:, 1], rv_t, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_16_bit_storage_as_the_python_launchers(launches, cuda_backend_on_cpu, dtype):
    """16-bit input, float32 per-channel tensors (torch's mixed case): the kernels' 16-bit
    variants, through both launch plans, give the same bits."""
    x, w, b, rm, rv = _inputs((4, 3, 5, 2), None, dtype, torch.float32)
    dy = torch.randn(x.shape).to(dtype)
    rm_ops, rv_ops = rm.clone(), rv.clone()
    y, mean, invstd = FORWARD.redispatch(CUDA, x, w, b, rm_ops, rv_ops, True, 0.1, 1e-5)
    dx, dw, db = BACKWARD.redispatch(CUDA, dy, x, w, mean, invstd, True, [True, True, True])
    assert y.dtype == dtype and dx.dtype == dtype and mean.dtype == torch.float32
    xp, wp, bp = x.clone().requires_grad_(), w.clone().requires_grad_(), b.clone().requires_grad_()
    rm_py, rv_py = rm.clone(), rv.clone()
    yp = fastnorm.functional.batch_norm(xp, rm_py, rv_py, wp, bp, True, 0.1, 1e-5, backend="cuda")
    yp.backward(dy)
    yp = yp.detach()
    for name, ours, theirs in [("y", y, yp), ("running_mean", rm_ops, rm_py), ("dx", dx, xp.grad),
                               ("dweight", dw, wp.grad), ("dbias", db, bp.grad)]:  # fmt: skip
        assert torch.equal(ours, theirs), f"{name}: the C++ and Python launch plans differ"


@pytest.mark.parametrize("shape,fmt,kinds", [CASES[0], CASES[2]], ids=lambda v: str(v))
def test_stats(launches, shape, fmt, kinds):
    x = _inputs(shape, fmt, torch.float32)[0]
    mean, var = STATS.redispatch(CUDA, x)
    assert [name for name, _, _ in launches] == [kinds[0], "_finalize_stats"]
    dims = [0, *range(2, x.dim())]
    torch.testing.assert_close(mean, x.double().mean(dims), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(var, x.double().var(dims, unbiased=False), rtol=1e-10, atol=1e-10)


def test_empty_batch_and_bad_input_raise_torchs_errors(launches):
    y, mean, invstd = FORWARD.redispatch(CUDA, torch.randn(0, 3), None, None, None, None, True, 0.1, 1e-5)
    assert y.shape == (0, 3) and not launches
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        FORWARD.redispatch(CUDA, torch.randn(1, 3), None, None, None, None, True, 0.1, 1e-5)
    with pytest.raises(NotImplementedError, match="float32, float64, bfloat16 or float16"):
        FORWARD.redispatch(CUDA, torch.randn(4, 3).to(torch.int32), None, None, None, None, True, 0.1, 1e-5)
    with pytest.raises(RuntimeError, match="weight should contain 3 elements not 4"):
        FORWARD.redispatch(CUDA, torch.randn(4, 3), torch.ones(4), None, None, None, True, 0.1, 1e-5)
    assert not launches, "nothing launched for a bad call"


def test_the_launch_geometry_is_the_simulators():
    """The C++ ops launch with kernels/fastnorm_kernels/numba_cuda's geometry (the simulator's smaller blocks here)."""
    from fastnorm_kernels.numba_cuda import batchnorm

    geometry = _ops._cuda_geometry()
    assert geometry["block"] == batchnorm.BLOCK == 64
    assert geometry["plane_min"] == batchnorm.PLANE_MIN


# -- the optimizer ops (fastnorm/csrc/optim_cuda.cpp) -----------------------------------------------

OPTIMIZERS = [
    ("SGD", {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01}),
    ("SGD", {"lr": 0.05, "momentum": 0.5, "dampening": 0.1, "maximize": True}),
    ("SGD", {"lr": 0.05}),
    ("Adagrad", {"lr": 0.05, "lr_decay": 0.01, "weight_decay": 0.1}),
    ("RMSprop", {"lr": 0.01, "centered": True, "momentum": 0.9}),
    ("RMSprop", {"lr": 0.01, "alpha": 0.3}),
    ("Adam", {"lr": 0.01, "amsgrad": True, "weight_decay": 0.01}),
    ("AdamW", {"lr": 0.01, "maximize": True}),
]


@pytest.fixture
def optimizer_ops(launches, monkeypatch):
    """fastnorm.optim's cuda backend through the C++ ops' CUDA kernels (as on a GPU), on CPU
    tensors: its updates call torch.ops.fastnorm.<op>_ with the CUDA dispatch key."""
    from fastnorm import optim

    class Redispatch(dict):
        def __missing__(self, op):
            fn = getattr(torch.ops.fastnorm, f"{op}_").default
            self[op] = lambda *args, **kwargs: fn.redispatch(CUDA, *args, **kwargs)
            return self[op]

    monkeypatch.setattr(optim._kernels, "_cuda_op", lambda backend, tensors: backend.name == "cuda")
    monkeypatch.setattr(optim._kernels, "_OPS", Redispatch())
    return launches


def _lockstep(name, options, dtype, backend_ops, steps=4):
    """Runs torch's optimizer and fastnorm's (cuda backend) in lockstep; some parameters skip
    some steps (their step counters fall behind: launches per set of step scalars)."""
    torch.manual_seed(1)
    shapes = [(7,), (3, 5), (1,), (2, 3, 4)]
    ref_params = [torch.randn(s, dtype=torch.float64) for s in shapes]
    our_params = [p.clone().to(dtype) for p in ref_params]
    ref = getattr(torch.optim, name)(ref_params, **{k: v for k, v in options.items() if k != "stochastic_rounding"})
    ours = getattr(fastnorm.optim, name)(our_params, backend="cuda", **options)
    for step in range(steps):
        for i, (a, b) in enumerate(zip(ref_params, our_params)):
            if (i + step) % 4 == 3:
                a.grad = b.grad = None
                continue
            g = torch.randn_like(a)
            a.grad, b.grad = g.clone(), g.to(dtype)
        ref.step()
        ours.step()
    return ref, ref_params, ours, our_params


@pytest.mark.parametrize("name,options", OPTIMIZERS, ids=[f"{n}-{o}" for n, o in OPTIMIZERS])
def test_optimizers_through_the_cpp_ops_follow_torch_and_the_python_launcher(optimizer_ops, cuda_backend_on_cpu,
                                                                             monkeypatch, name, options):  # fmt: skip
    ref, ref_params, ours, our_params = _lockstep(name, options, torch.float64, optimizer_ops)
    ran = {function for function, _, _ in optimizer_ops}
    assert ran == {"_" + name.lower().removesuffix("w") + "{storage}"}, ran
    for a, b in zip(ref_params, our_params):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-10)
        for key, value in ref.state[a].items():
            torch.testing.assert_close(ours.state[b][key], value, rtol=1e-10, atol=1e-10, msg=key)
            assert ours.state[b][key].device == value.device
    # the Python launcher (kernels/fastnorm_kernels/numba_cuda/optim.py): the same kernels and tables, the same bits
    from fastnorm import optim

    monkeypatch.setattr(optim._kernels, "_cuda_op", lambda backend, tensors: False)
    optimizer_ops.clear()
    _, _, theirs, their_params = _lockstep(name, options, torch.float64, None)
    assert not optimizer_ops, "the Python launcher ran"
    for b, c in zip(our_params, their_params):
        assert torch.equal(b, c), f"{name}: the C++ and Python launches differ"


@pytest.mark.parametrize("name,options", [("Adam", {"lr": 0.01, "weight_decay": 0.01}),
                                          ("SGD", {"lr": 0.05, "momentum": 0.9, "stochastic_rounding": True}),
                                          ("AdamW", {"lr": 0.01, "stochastic_rounding": True})], ids=str)  # fmt: skip
def test_16_bit_optimizers_through_the_cpp_ops_as_the_python_launcher(optimizer_ops, cuda_backend_on_cpu,
                                                                      monkeypatch, name, options):  # fmt: skip
    """bfloat16 parameters and state (round to nearest, or stochastic rounding, its seeds drawn
    the same way by both runs): the C++ launches give the Python launcher's bits."""
    from fastnorm import optim

    _, _, ours, our_params = _lockstep(name, options, torch.bfloat16, optimizer_ops, steps=3)
    assert optimizer_ops, "the C++ ops launched"
    monkeypatch.setattr(optim._kernels, "_cuda_op", lambda backend, tensors: False)
    _, _, theirs, their_params = _lockstep(name, options, torch.bfloat16, None, steps=3)
    for b, c in zip(our_params, their_params):
        assert torch.equal(b, c), f"{name}: the C++ and Python launches differ"


def test_forgotten_address_tables_are_uploaded_again(optimizer_ops, cuda_backend_on_cpu):
    """After 1024 distinct address tables (parameters that keep moving) the C++ ops forget those
    no CUDA graph holds: a step whose tables were forgotten uploads them again, and every step
    still follows torch's."""
    torch.manual_seed(0)
    p = torch.randn(5, dtype=torch.float64)
    r = p.clone()
    ours = fastnorm.optim.SGD([p], lr=0.1, momentum=0.9, backend="cuda")
    ref = torch.optim.SGD([r], lr=0.1, momentum=0.9)

    def step():
        g = torch.randn(5, dtype=torch.float64)
        p.grad, r.grad = g.clone(), g
        ours.step()
        ref.step()

    step()
    others = [torch.zeros(1 + i % 3, dtype=torch.float64) for i in range(1030)]  # alive: distinct addresses
    for q in others:
        q.grad = torch.ones_like(q)
        fastnorm.optim.SGD([q], lr=0.1, backend="cuda").step()
    step()
    step()
    assert len(optimizer_ops) == 1033, "every step launched through the C++ ops"
    torch.testing.assert_close(p, r, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours.state[p]["momentum_buffer"], ref.state[r]["momentum_buffer"])
    assert all(torch.equal(q, torch.full_like(q, -0.1)) for q in others)


# -- LayerNorm, RMSNorm, GroupNorm (fastnorm/csrc/row_norm_cuda.cpp) -------------------------------

ROW_FORWARD, ROW_BACKWARD = _Op("row_norm_forward"), _Op("row_norm_backward")
GROUP_FORWARD, GROUP_BACKWARD = _Op("group_norm_forward"), _Op("group_norm_backward")

# (op, normalized dims or groups, input shape, memory format)
NORM_CASES = [
    ("layer_norm", 1, (5, 37), None),
    ("layer_norm", 2, (3, 4, 6), None),
    ("rms_norm", 1, (7, 19), None),
    ("group_norm", 2, (3, 6, 5), None),  # planes (S > 1)
    ("group_norm", 3, (4, 6), None),  # columns (S = 1)
    ("group_norm", 3, (2, 6, 3, 2), torch.channels_last),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("op,arg,shape,fmt", NORM_CASES, ids=lambda v: str(v))
def test_norms_through_the_cpp_ops_give_the_python_launchers_bits(launches, cuda_backend_on_cpu, op, arg, shape,
                                                                  fmt, dtype):  # fmt: skip
    torch.manual_seed(0)
    x = (torch.randn(shape) * 2 + 1).to(dtype)
    dy = torch.randn(shape).to(dtype)
    if fmt is not None:
        x, dy = x.to(memory_format=fmt), dy.to(memory_format=fmt)
    pdt = torch.float64 if dtype == torch.float64 else torch.float32
    pshape = (shape[1],) if op == "group_norm" else shape[len(shape) - arg :]
    w = torch.linspace(0.5, 1.5, math.prod(pshape)).reshape(pshape).to(pdt)
    b = torch.linspace(-1, 1, math.prod(pshape)).reshape(pshape).to(pdt)
    eps = 1e-5
    if op == "group_norm":
        y, mean, rstd = GROUP_FORWARD.redispatch(CUDA, x, arg, w, b, eps)
        grads = GROUP_BACKWARD.redispatch(CUDA, dy, x, arg, mean, rstd, w, [True, True, True])
    else:
        center = op == "layer_norm"
        y, mean, rstd = ROW_FORWARD.redispatch(CUDA, x, arg, w, b if center else None, eps, center)
        grads = ROW_BACKWARD.redispatch(CUDA, dy, x, arg, mean, rstd, w, center, [True, True, center])
    assert y.stride() == x.stride() and grads[0].stride() == x.stride(), "outputs in the input's layout"
    ran = {name for name, _, _ in launches}
    assert {"_forward_rows", "_input_grad_rows", "_param_finalize"} <= ran, ran
    # the Python launchers (kernels/fastnorm_kernels/numba_cuda/layernorm.py through fastnorm.functional): same bits
    xp, wp, bp = x.clone().requires_grad_(), w.clone().requires_grad_(), b.clone().requires_grad_()
    if op == "group_norm":
        yp = fastnorm.functional.group_norm(xp, arg, wp, bp, eps, backend="cuda")
    elif op == "layer_norm":
        yp = fastnorm.functional.layer_norm(xp, list(pshape), wp, bp, eps, backend="cuda")
    else:
        yp = fastnorm.functional.rms_norm(xp, list(pshape), wp, eps, backend="cuda")
    yp.backward(dy)
    expected = [("y", yp.detach()), ("dx", xp.grad), ("dweight", wp.grad)]
    if op != "rms_norm":
        expected.append(("dbias", bp.grad))
    for (name, theirs), ours in zip(expected, [y, *grads]):
        assert torch.equal(ours, theirs), f"{op} {name}: the C++ and Python launch plans differ"
    # and torch's values (float64)
    if dtype == torch.float64:
        if op == "group_norm":
            yt = F.group_norm(x, arg, w, b, eps)
        elif op == "layer_norm":
            yt = F.layer_norm(x, list(pshape), w, b, eps)
        else:
            yt = F.rms_norm(x, list(pshape), w, eps)
        torch.testing.assert_close(y, yt, rtol=1e-10, atol=1e-10)
