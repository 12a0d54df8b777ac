"""GroupNorm on fastnorm's backends against torch: values, gradients, layouts, dtypes, torch's own
module_db entries, bad input, gradcheck, and the tools (script, trace, fx, export, torch.func)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import TOLERANCES
from torch.testing._internal.common_modules import module_db

import fastnorm.functional as FF
import fastnorm.nn as fnn

BACKENDS = ["reference", "numba"]
#: (input shape, groups, layout): odd sizes, one group (LayerNorm-like), one channel per group
#: (InstanceNorm-like), 2-D, 3-D, 4-D and 5-D inputs, channels-last 4-D and 5-D
CASES = [((4, 6, 5, 3), 3, "contiguous"), ((4, 6, 5, 3), 3, "channels_last"), ((5, 12), 4, "contiguous"),
         ((2, 8, 7), 2, "contiguous"), ((3, 6, 5, 3), 1, "contiguous"), ((3, 6, 5, 3), 6, "channels_last"),
         ((2, 6, 3, 2, 3), 2, "channels_last"), ((1, 10, 9, 11), 5, "strided"),
         ((9, 64, 13, 13), 32, "channels_last")]  # fmt: skip
HALF = (torch.bfloat16, torch.float16)
_FORMATS = {4: torch.channels_last, 5: torch.channels_last_3d}


def _layout(x, layout):
    if layout == "channels_last":
        return x.to(memory_format=_FORMATS[x.dim()])
    if layout == "strided":
        return x.transpose(-1, -2).contiguous().transpose(-1, -2)
    return x


def _run(backend, x, groups, w, b, eps, dy):
    # clone() keeps the layout (torch.preserve_format)
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, w, b)]
    xi = leaves[0]
    if backend == "torch":
        y = F.group_norm(xi, groups, leaves[1], leaves[2], eps)
    else:
        y = FF.group_norm(xi, groups, leaves[1], leaves[2], eps, backend=backend)
    grads = torch.autograd.grad(y, [t for t in leaves if t is not None], dy)
    return y.detach(), grads


def _inputs(shape, layout, dtype, affine, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = _layout((torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 3).to(dtype), layout)
    c = shape[1]
    w = (torch.randn(c, generator=g, dtype=torch.float64) + 1).to(dtype) if affine in ("both", "weight") else None
    b = torch.randn(c, generator=g, dtype=torch.float64).to(dtype) if affine == "both" else None
    dy = _layout(torch.randn(shape, generator=g, dtype=torch.float64).to(dtype), layout)
    return x, w, b, dy


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape,groups,layout", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("affine", ["both", "weight", "none"])
def test_matches_torch(backend, shape, groups, layout, dtype, affine):
    x, w, b, dy = _inputs(shape, layout, dtype, affine)
    y, grads = _run(backend, x, groups, w, b, 1e-5, dy)
    y_t, grads_t = _run("torch", x, groups, w, b, 1e-5, dy)
    rtol, atol = TOLERANCES[dtype]
    assert y.dtype == y_t.dtype and y.shape == y_t.shape and y.stride() == y_t.stride()
    torch.testing.assert_close(y, y_t, rtol=rtol, atol=atol)
    for got, want in zip(grads, grads_t):
        assert got.dtype == want.dtype and got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=rtol * 10, atol=atol * 10)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("params", ["same", "float32"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_16_bit_as_accurate_as_torch(backend, dtype, params, layout):
    """16-bit input (16-bit or float32 parameters): torch's dtypes, and an error against the
    float64 truth no larger than torch's own (plus one rounding)."""
    x, w, b, dy = _inputs((6, 12, 7, 5), layout, dtype, "both", seed=2)
    if params == "float32":
        w, b = w.float(), b.float()
    y, grads = _run(backend, x, 4, w, b, 1e-5, dy)
    y_t, grads_t = _run("torch", x, 4, w, b, 1e-5, dy)
    y64, grads64 = _run("torch", x.double(), 4, w.double(), b.double(), 1e-5, dy.double())
    ulp = torch.finfo(dtype).eps
    for got, want, truth in zip((y, *grads), (y_t, *grads_t), (y64, *grads64)):
        assert got.dtype == want.dtype and got.shape == want.shape
        ours = (got.double() - truth).abs().max().item()
        theirs = (want.double() - truth).abs().max().item()
        assert ours <= 2 * theirs + ulp * truth.abs().max().item(), (ours, theirs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("call", [
    lambda f, x: f.group_norm(x, 4),
    lambda f, x: f.group_norm(x, 3, torch.ones(5)),
    lambda f, x: f.group_norm(x, 3, None, torch.ones(7)),
    lambda f, x: f.group_norm(x, 3, torch.ones(6, dtype=torch.float64)),
    lambda f, x: f.group_norm(x.long(), 3),
    lambda f, x: f.group_norm(x[0, 0, 0], 3),
    lambda f, x: f.group_norm(x[:1, :, :1, :1], 6),
    lambda f, x: f.group_norm(x, 0),
])  # fmt: skip
def test_bad_input_raises_as_torch(backend, call):
    x = torch.randn(2, 6, 3, 3)

    class Ours:
        group_norm = staticmethod(lambda *a: FF.group_norm(*a, backend=backend))

    with pytest.raises(Exception) as theirs:
        call(F, x)
    with pytest.raises(type(theirs.value)) as ours:
        call(Ours, x)
    assert str(ours.value) == str(theirs.value)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_and_nan_inputs_as_torch(backend):
    y = FF.group_norm(torch.empty(0, 6, 3), 3, torch.ones(6), torch.zeros(6), backend=backend)
    assert y.shape == F.group_norm(torch.empty(0, 6, 3), 3).shape
    with pytest.raises(RuntimeError, match="HxW"):  # torch's error for no spatial values
        FF.group_norm(torch.empty(2, 6, 0), 3, backend=backend)
    x = torch.randn(2, 6, 4)
    x[1, 4, 2] = float("nan")
    torch.testing.assert_close(FF.group_norm(x, 3, backend=backend), F.group_norm(x, 3), equal_nan=True)


_MODULE_INFOS = [m for m in module_db if m.module_cls is torch.nn.GroupNorm]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_torch_module_db_entries(backend, dtype):
    """Every module_db entry of torch's GroupNorm, as fastnorm's class and torch's from the same
    arguments: outputs, input and parameter gradients, state_dict keys."""
    rtol, atol = TOLERANCES[dtype]
    (info,) = _MODULE_INFOS
    for sample in info.module_inputs_func(info, device="cpu", dtype=dtype, requires_grad=True, training=True):
        args, kwargs = sample.constructor_input.args, sample.constructor_input.kwargs
        theirs = torch.nn.GroupNorm(*args, **kwargs, dtype=dtype)
        ours = fnn.GroupNorm(*args, **kwargs, dtype=dtype, backend=backend)
        with torch.no_grad():
            for p, q in zip(theirs.parameters(), ours.parameters()):
                p.normal_()
                q.copy_(p)
        assert list(ours.state_dict()) == list(theirs.state_dict())
        x = sample.forward_input.args[0].detach()
        results = []
        for module in (ours, theirs):
            xi = x.clone().requires_grad_()
            y = module(xi)
            grads = torch.autograd.grad(y, [xi, *module.parameters()], torch.ones_like(y))
            results.append((y.detach(), grads))
        torch.testing.assert_close(results[0][0], results[1][0], rtol=rtol, atol=atol, msg=sample.desc)
        for got, want in zip(results[0][1], results[1][1]):
            torch.testing.assert_close(got, want, rtol=rtol * 10, atol=atol * 10, msg=sample.desc)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_gradcheck_and_gradgradcheck(backend, affine, layout):
    m = fnn.GroupNorm(2, 4, affine=affine, dtype=torch.float64, backend=backend)
    if affine:
        with torch.no_grad():
            for p in m.parameters():
                p.normal_()
    x = _layout(torch.randn(3, 4, 3, 2, dtype=torch.float64), layout).requires_grad_()
    params = tuple(m.parameters())
    assert torch.autograd.gradcheck(lambda x, *ps: m(x), (x, *params), check_batched_grad=True)
    assert torch.autograd.gradgradcheck(lambda x, *ps: m(x), (x, *params))


def test_convert_revert_and_copies():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.GroupNorm(4, 8),
                                torch.nn.GroupNorm(2, 8, affine=False))  # fmt: skip
    weights = list(model.parameters())
    x = torch.randn(2, 3, 9, 9)
    want = model(x)
    fnn.convert(model, backend="numba")
    assert [type(m) for m in model[1:]] == [fnn.GroupNorm, fnn.GroupNorm]
    assert all(p is q for p, q in zip(model.parameters(), weights)) and model[2].weight is None
    torch.testing.assert_close(model(x), want)
    torch.testing.assert_close(copy.deepcopy(model)(x), want)
    fnn.revert(model)
    assert [type(m) for m in model[1:]] == [torch.nn.GroupNorm, torch.nn.GroupNorm]


@pytest.mark.parametrize("backend", BACKENDS)
def test_tools(backend):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), fnn.GroupNorm(4, 8, backend=backend), torch.nn.SiLU())
    reference = fnn.revert(copy.deepcopy(model))
    x = torch.randn(2, 3, 9, 9)
    want = reference(x)
    scripted = torch.jit.script(model)
    torch.testing.assert_close(scripted(x), want)
    torch.testing.assert_close(torch.jit.trace(model, x)(x * 2), reference(x * 2))
    graph = torch.fx.symbolic_trace(model)
    assert [n.op for n in graph.graph.nodes].count("call_module") == 3
    torch.testing.assert_close(graph(x), want)
    exported = torch.export.export(model, (x,))
    torch.testing.assert_close(exported.module()(x), want)
    if backend == "numba":
        assert "fastnorm::group_norm" in str(getattr(scripted, "1")._scripted_forward.graph)
        assert "fastnorm" in str(exported.graph)
    params = dict(model.named_parameters())

    def loss(p, m, xi):
        return torch.func.functional_call(m, p, (xi[None],)).square().sum()

    ours = torch.func.vmap(torch.func.grad(loss), in_dims=(None, None, 0))(params, model, x)
    theirs = torch.func.vmap(torch.func.grad(loss), in_dims=(None, None, 0))(params, reference, x)
    for name in params:
        torch.testing.assert_close(ours[name], theirs[name])
    t = torch.randn_like(x)
    torch.testing.assert_close(torch.func.jvp(model, (x,), (t,))[1], torch.func.jvp(reference, (x,), (t,))[1])


def test_opcheck_group_norm_ops():
    from torch.library import opcheck

    for layout in ("contiguous", "channels_last"):
        for dtype in (torch.float32, torch.float64, torch.bfloat16):
            x = _layout(torch.randn(3, 6, 4, 5, dtype=dtype), layout).requires_grad_()
            compute = torch.float64 if dtype == torch.float64 else torch.float32
            w = torch.randn(6, dtype=compute, requires_grad=True)
            b = torch.randn(6, dtype=compute, requires_grad=True)
            opcheck(torch.ops.fastnorm.group_norm_forward.default, (x, 3, w, b, 1e-5))
            y, mean, rstd = torch.ops.fastnorm.group_norm_forward(x.detach(), 3, w.detach(), None, 1e-5)
            args = (torch.randn_like(y), x.detach(), 3, mean, rstd, w.detach(), [True, True, True])
            opcheck(torch.ops.fastnorm.group_norm_backward.default, args)
    opcheck(torch.ops.fastnorm.group_norm.default, (torch.randn(2, 6, 3, requires_grad=True), 3, None, None, 1e-5))


def test_results_do_not_depend_on_the_thread_count():
    for layout in ("contiguous", "channels_last"):
        x = _layout(torch.randn(16, 64, 20, 20), layout)
        w = torch.randn(64, requires_grad=True)
        results = []
        threads = torch.get_num_threads()
        try:
            for n in (1, threads):
                torch.set_num_threads(n)
                y = FF.group_norm(x, 8, w, backend="numba")
                results.append((y, torch.autograd.grad(y.square().sum(), w)[0]))
        finally:
            torch.set_num_threads(threads)
        assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
