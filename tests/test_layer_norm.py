"""LayerNorm and RMSNorm on fastnorm's backends against torch: values, gradients, dtypes, torch's
own module_db entries, bad input, gradcheck, and the tools (script, trace, fx, export, torch.func,
forward AD, opcheck)."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from conftest import TOLERANCES
from torch.testing._internal.common_modules import module_db

import fastnorm.functional as FF
import fastnorm.nn as fnn

BACKENDS = ["reference", "numba"]
#: (input shape, normalized_shape): odd sizes, one and several normalised dims, a 1-row input,
#: rows longer than a chunk
SHAPES = [((7, 13), (13,)), ((3, 5, 17), (17,)), ((2, 3, 5, 7), (5, 7)), ((1, 9), (9,)), ((4, 3, 2), (4, 3, 2)),
          ((37, 1031), (1031,))]  # fmt: skip
HALF = (torch.bfloat16, torch.float16)
TORCH_CLASS = {fnn.LayerNorm: torch.nn.LayerNorm, fnn.RMSNorm: torch.nn.RMSNorm}


def _call(op, backend, x, shape, w, b, eps):
    if op == "layer_norm":
        if backend == "torch":
            return F.layer_norm(x, shape, w, b, eps)
        return FF.layer_norm(x, shape, w, b, eps, backend=backend)
    if backend == "torch":
        return F.rms_norm(x, shape, w, eps)
    return FF.rms_norm(x, shape, w, eps, backend=backend)


def _run(op, backend, x, shape, w, b, eps, dy, wrt="all"):
    """y and the gradients of ``wrt`` ("all", "input", "parameters"): the other leaves do not
    require grad, so the kernels compute only the wanted gradients."""
    needs = {"all": (True, True), "input": (True, False), "parameters": (False, True)}[wrt]
    leaves = [
        t.detach().clone().requires_grad_(needs[i > 0]) if t is not None else None for i, t in enumerate((x, w, b))
    ]
    y = _call(op, backend, leaves[0], shape, leaves[1], leaves[2], eps)
    wanted = [t for t in leaves if t is not None and t.requires_grad]
    grads = torch.autograd.grad(y, wanted, dy)
    return y.detach(), grads


def _inputs(shape, normalized, dtype, affine, seed=0, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 2 + offset).to(dtype)
    w = torch.randn(normalized, generator=g, dtype=torch.float64) + 1
    w = w.to(dtype) if affine in ("both", "weight") else None
    b = torch.randn(normalized, generator=g, dtype=torch.float64).to(dtype) if affine == "both" else None
    dy = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    return x, w, b, dy


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
@pytest.mark.parametrize("shape,normalized", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("affine", ["both", "weight", "none"])
def test_matches_torch(backend, op, shape, normalized, dtype, affine):
    x, w, b, dy = _inputs(shape, normalized, dtype, affine, offset=3.0)
    if op == "rms_norm":
        b = None
    eps = 1e-5
    y, grads = _run(op, backend, x, normalized, w, b, eps, dy)
    y_t, grads_t = _run(op, "torch", x, normalized, w, b, eps, dy)
    rtol, atol = TOLERANCES[dtype]
    assert y.dtype == y_t.dtype and y.shape == y_t.shape and y.is_contiguous()
    torch.testing.assert_close(y, y_t, rtol=rtol, atol=atol)
    for got, want in zip(grads, grads_t):
        assert got.dtype == want.dtype and got.shape == want.shape
        # the parameter gradients sum over every row: their error grows with the row count
        torch.testing.assert_close(got, want, rtol=rtol * 10, atol=atol * 10)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
@pytest.mark.parametrize("shape,normalized", [((7, 13), (13,)), ((37, 1031), (1031,)), ((129, 3, 173), (3, 173))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("wrt", ["input", "parameters"])
def test_some_gradients_match_torch(backend, op, shape, normalized, dtype, wrt):
    """Only the input's gradient, or only the parameters' (the backward kernel's other two
    branches), serial and parallel sizes."""
    x, w, b, dy = _inputs(shape, normalized, dtype, "both", seed=1, offset=1.0)
    if op == "rms_norm":
        b = None
    y, grads = _run(op, backend, x, normalized, w, b, 1e-5, dy, wrt)
    y_t, grads_t = _run(op, "torch", x, normalized, w, b, 1e-5, dy, wrt)
    assert len(grads) == len(grads_t) == (1 if wrt == "input" else 2 if op == "layer_norm" else 1)
    rtol, atol = TOLERANCES[dtype]
    torch.testing.assert_close(y, y_t, rtol=rtol, atol=atol)
    for got, want in zip(grads, grads_t):
        torch.testing.assert_close(got, want, rtol=rtol * 10, atol=atol * 10)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls", [fnn.LayerNorm, fnn.RMSNorm])
@pytest.mark.parametrize("requires_grad", [True, False])
@pytest.mark.parametrize("edit", ["input", "weight"])
def test_in_place_edits_before_the_backward_as_torch(backend, cls, requires_grad, edit):
    """An in-place edit of the input or the weight between forward and backward: torch's
    LayerNorm refuses the backward; its RMSNorm (a composite) too, except when the input does not
    require grad: then the weight's gradient uses the forward's values. Ours the same."""
    outcomes = []
    for module in (cls(13, backend=backend, dtype=torch.float64), TORCH_CLASS[cls](13, dtype=torch.float64)):
        x = torch.randn(7, 13, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        x.requires_grad_(requires_grad)
        with torch.no_grad():
            module.weight.copy_(torch.linspace(0.5, 1.5, 13))
        y = module(x)
        with torch.no_grad():
            (x if edit == "input" else module.weight).add_(1.0)
        leaves = ([x] if requires_grad else []) + list(module.parameters())
        try:
            outcomes.append(torch.autograd.grad((y * y).sum(), leaves))
        except RuntimeError as exc:
            assert "modified by an inplace operation" in str(exc)
            outcomes.append(None)
    ours, theirs = outcomes
    assert (ours is None) == (theirs is None), f"ours {ours is None and 'raises'}, torch {theirs is None and 'raises'}"
    if theirs is not None:
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert theirs is not None or requires_grad or cls is fnn.LayerNorm, "the case torch's composite lets through"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("params", ["same", "float32"])
def test_16_bit_as_accurate_as_torch(backend, op, dtype, params):
    """16-bit input (with 16-bit or float32 parameters, torch's mixed case): torch's dtypes, and
    an error against the float64 truth no larger than torch's own (plus one rounding)."""
    shape, normalized = (37, 5, 67), (67,)
    x, w, b, dy = _inputs(shape, normalized, dtype, "both", seed=3, offset=1.0)
    if params == "float32":
        w, b = w.float(), b.float()
    if op == "rms_norm":
        b = None
    y, grads = _run(op, backend, x, normalized, w, b, 1e-5, dy)
    y_t, grads_t = _run(op, "torch", x, normalized, w, b, 1e-5, dy)
    wide = [None if t is None else t.double() for t in (x, w, b)]
    y64, grads64 = _run(op, "torch", wide[0], normalized, wide[1], wide[2], 1e-5, dy.double())
    ulp = torch.finfo(dtype).eps
    for got, want, truth in zip((y, *grads), (y_t, *grads_t), (y64, *grads64)):
        assert got.dtype == want.dtype and got.shape == want.shape
        ours = (got.double() - truth).abs().max().item()
        theirs = (want.double() - truth).abs().max().item()
        assert ours <= 2 * theirs + ulp * truth.abs().max().item(), (ours, theirs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_input_and_large_mean(backend):
    x = (torch.randn(9, 31, dtype=torch.float64) * 1e-3 + 1e4).float().t()  # (31, 9), strided; |mean| >> std
    w = torch.randn(9)
    for op in ("layer_norm", "rms_norm"):
        dy = torch.randn(31, 9)
        y, grads = _run(op, backend, x, (9,), w, None, 1e-5, dy)
        y64, grads64 = _run(op, "torch", x.double(), (9,), w.double(), None, 1e-5, dy.double())
        y_t, grads_t = _run(op, "torch", x, (9,), w, None, 1e-5, dy)
        for got, want, truth in zip((y, *grads), (y_t, *grads_t), (y64, *grads64)):
            ours = (got.double() - truth).abs().max().item()
            theirs = (want.double() - truth).abs().max().item()
            assert ours <= 2 * theirs + 1e-5 * truth.abs().max().item(), (ours, theirs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_and_inf_propagate_as_in_torch(backend):
    x = torch.randn(4, 6)
    x[1, 2] = float("nan")
    x[2, 0] = float("inf")
    for op in ("layer_norm", "rms_norm"):
        y = _call(op, backend, x, (6,), None, None, 1e-5)
        y_t = _call(op, "torch", x, (6,), None, None, 1e-5)
        torch.testing.assert_close(y, y_t, equal_nan=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("call", [
    lambda f, x: f.layer_norm(x, [5]),
    lambda f, x: f.layer_norm(x, []),
    lambda f, x: f.layer_norm(x, [6], torch.ones(5)),
    lambda f, x: f.layer_norm(x, [6], None, torch.ones(5)),
    lambda f, x: f.layer_norm(x, [6], torch.ones(6, dtype=torch.float64)),
    lambda f, x: f.layer_norm(x.long(), [6]),
    lambda f, x: f.rms_norm(x, [5]),
    lambda f, x: f.rms_norm(x, [6], torch.ones(5)),
    lambda f, x: f.rms_norm(x.long(), [6]),
    lambda f, x: f.layer_norm(x.bfloat16(), [6], torch.ones(6, dtype=torch.float16)),
])  # fmt: skip
def test_bad_input_raises_as_torch(backend, call):
    x = torch.randn(4, 6)

    class Ours:
        layer_norm = staticmethod(lambda *a: FF.layer_norm(*a, backend=backend))
        rms_norm = staticmethod(lambda *a: FF.rms_norm(*a, backend=backend))

    with pytest.raises(Exception) as theirs:
        call(F, x)
    with pytest.raises(type(theirs.value)) as ours:
        call(Ours, x)
    assert str(ours.value) == str(theirs.value)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unusual_but_valid_calls_give_torchs_values(backend):
    """What the kernels do not take runs torch's op: empty inputs, promoted parameter dtypes."""
    for x, args in [(torch.empty(0, 6), ([6], torch.ones(6))), (torch.empty(3, 0), ([0],)),
                    (torch.randn(3, 6), ([6], torch.randn(6, dtype=torch.float64)))]:  # fmt: skip
        y = FF.rms_norm(x, *args, backend=backend)
        y_t = F.rms_norm(x, *args)
        assert y.dtype == y_t.dtype and y.shape == y_t.shape
        torch.testing.assert_close(y, y_t)
    y = FF.layer_norm(torch.empty(0, 6), [6], torch.ones(6), backend=backend)
    assert y.shape == (0, 6)


def test_unknown_and_unavailable_backends_say_so():
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        fnn.LayerNorm(8, backend="fast")
    with pytest.raises(ValueError, match="'cuda'"):
        FF.rms_norm(torch.randn(2, 8), [8], backend="cuda")


# -- torch's own module tests ------------------------------------------------------------------

_MODULE_INFOS = [m for m in module_db if m.module_cls in TORCH_CLASS.values()]
_OURS = {torch_cls: ours for ours, torch_cls in TORCH_CLASS.items()}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("info", _MODULE_INFOS, ids=lambda m: m.module_cls.__name__)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_torch_module_db_entries(backend, info, dtype):
    """Every module_db entry of torch's LayerNorm / RMSNorm, built as fastnorm's class and as
    torch's from the same arguments: outputs, input and parameter gradients, state_dict keys."""
    rtol, atol = TOLERANCES[dtype]
    for sample in info.module_inputs_func(info, device="cpu", dtype=dtype, requires_grad=True, training=True):
        args, kwargs = sample.constructor_input.args, sample.constructor_input.kwargs
        torch.manual_seed(0)
        theirs = info.module_cls(*args, **kwargs, dtype=dtype)
        ours = _OURS[info.module_cls](*args, **kwargs, dtype=dtype, backend=backend)
        ours.load_state_dict(theirs.state_dict())
        with torch.no_grad():
            for p, q in zip(theirs.parameters(), ours.parameters()):
                p.normal_()
                q.copy_(p)
        assert list(ours.state_dict()) == list(theirs.state_dict())
        inputs = sample.forward_input.args
        x = inputs[0].detach()
        results = []
        for module in (ours, theirs):
            xi = x.clone().requires_grad_()
            y = module(xi)
            leaves = [xi, *module.parameters()]
            grads = torch.autograd.grad(y, leaves, torch.ones_like(y), allow_unused=True) if y.numel() else ()
            results.append((y.detach(), grads))
        torch.testing.assert_close(results[0][0], results[1][0], rtol=rtol, atol=atol, msg=sample.desc)
        for got, want in zip(results[0][1], results[1][1]):
            torch.testing.assert_close(got, want, rtol=rtol * 10, atol=atol * 10, msg=sample.desc)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls", [fnn.LayerNorm, fnn.RMSNorm])
@pytest.mark.parametrize("affine", [True, False])
def test_gradcheck_and_gradgradcheck(backend, cls, affine):
    m = cls([3, 5], elementwise_affine=affine, dtype=torch.float64, backend=backend)
    if affine:
        with torch.no_grad():
            for p in m.parameters():
                p.normal_()
    x = torch.randn(4, 3, 5, dtype=torch.float64, requires_grad=True)
    params = tuple(m.parameters())

    def f(x, *ps):
        return torch.func.functional_call(m, dict(zip([n for n, _ in m.named_parameters()], ps)), (x,))

    # torch.func.functional_call swaps parameters in; the kernels then see them as plain inputs
    assert torch.autograd.gradcheck(lambda x, *ps: m(x), (x, *params))
    assert torch.autograd.gradgradcheck(lambda x, *ps: m(x), (x, *params))
    assert torch.autograd.gradcheck(f, (x, *params), check_batched_grad=True)


# -- modules: state, copies, conversion -------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_modules_keep_torchs_state_and_survive_copies(backend):
    pairs = [
        (fnn.LayerNorm([2, 3], eps=1e-3, bias=False, backend=backend), torch.nn.LayerNorm([2, 3], 1e-3, bias=False)),
        (fnn.RMSNorm([2, 3], eps=1e-4, backend=backend), torch.nn.RMSNorm([2, 3], 1e-4)),
    ]
    for ours, theirs in pairs:
        assert isinstance(ours, type(theirs))
        assert list(ours.state_dict()) == list(theirs.state_dict())
        x = torch.randn(5, 2, 3)
        for clone in (copy.deepcopy(ours), pickle.loads(pickle.dumps(ours))):
            assert clone.backend == backend
            torch.testing.assert_close(clone(x), theirs(x))
        torch.testing.assert_close(ours.double()(x.double()), theirs.double()(x.double()))


def test_convert_and_revert_norm_modules():
    model = torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.LayerNorm(6, bias=False), torch.nn.RMSNorm(6),
                                torch.nn.LayerNorm(6, elementwise_affine=False)).eval()  # fmt: skip
    weights = [p for p in model.parameters()]
    x = torch.randn(3, 6)
    want = model(x)
    fnn.convert(model, backend="numba")
    assert [type(m) for m in model[1:]] == [fnn.LayerNorm, fnn.RMSNorm, fnn.LayerNorm]
    assert model[1].bias is None and model[3].weight is None and not model[3].training
    assert all(p is q for p, q in zip(model.parameters(), weights))
    torch.testing.assert_close(model(x), want)
    fnn.revert(model)
    assert [type(m) for m in model[1:]] == [torch.nn.LayerNorm, torch.nn.RMSNorm, torch.nn.LayerNorm]
    assert all(p is q for p, q in zip(model.parameters(), weights))


# -- torch's tools ------------------------------------------------------------------------------


def _block(backend):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 8), fnn.LayerNorm(8, backend=backend), torch.nn.GELU(),
                               fnn.RMSNorm(8, backend=backend))  # fmt: skip


@pytest.mark.parametrize("backend", ["numba", "reference"])
def test_jit_script_trace_fx_export(backend):
    model = _block(backend)
    x = torch.randn(5, 8)
    want = model(x)
    scripted = torch.jit.script(model)
    torch.testing.assert_close(scripted(x), want)
    traced = torch.jit.trace(model, x)
    torch.testing.assert_close(traced(x * 2), model(x * 2))
    graph = torch.fx.symbolic_trace(model)
    assert [n.op for n in graph.graph.nodes].count("call_module") == 4  # the norms stay leaves
    torch.testing.assert_close(graph(x), want)
    exported = torch.export.export(model, (x,))
    torch.testing.assert_close(exported.module()(x), want)
    if backend == "numba":
        assert "fastnorm::layer_norm" in str(getattr(scripted, "1")._scripted_forward.graph)
        assert "fastnorm::rms_norm" in str(getattr(scripted, "3")._scripted_forward.graph)
        assert "fastnorm" in str(traced.graph)
        assert "fastnorm" in str(exported.graph)


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_func_and_forward_ad_give_torchs_values(backend):
    model = _block(backend)
    reference = copy.deepcopy(model)
    fnn.revert(reference)
    x = torch.randn(6, 8)
    params = dict(model.named_parameters())

    def loss(p, m, xi):
        return torch.func.functional_call(m, p, (xi[None],)).square().sum()

    per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, None, 0))(params, model, x)
    want = torch.func.vmap(torch.func.grad(loss), in_dims=(None, None, 0))(params, reference, x)
    for name in params:
        torch.testing.assert_close(per_sample[name], want[name])
    t = torch.randn_like(x)
    _, tangent = torch.func.jvp(model, (x,), (t,))
    _, tangent_t = torch.func.jvp(reference, (x,), (t,))
    torch.testing.assert_close(tangent, tangent_t)
    import torch.autograd.forward_ad as fwad

    with fwad.dual_level():
        out = fwad.unpack_dual(model(fwad.make_dual(x, t))).tangent
    torch.testing.assert_close(out, tangent_t)


def test_opcheck_row_norm_ops():
    from torch.library import opcheck

    for center in (True, False):
        for dtype in (torch.float32, torch.float64, torch.bfloat16):
            x = torch.randn(5, 3, 7, dtype=dtype, requires_grad=True)
            w = torch.randn(7, dtype=torch.float64 if dtype == torch.float64 else torch.float32, requires_grad=True)
            b = torch.randn_like(w, requires_grad=True) if center else None
            opcheck(torch.ops.fastnorm.row_norm_forward.default, (x, 1, w, b, 1e-5, center))
            y, mean, rstd = torch.ops.fastnorm.row_norm_forward(x.detach(), 1, w.detach(), None, 1e-5, center)
            args = (torch.randn_like(y), x.detach(), 1, mean, rstd, w.detach(), center, [True, True, center])
            opcheck(torch.ops.fastnorm.row_norm_backward.default, args)
    x = torch.randn(4, 6, requires_grad=True)
    opcheck(torch.ops.fastnorm.layer_norm.default, (x, [6], torch.randn(6), torch.randn(6), 1e-5))
    opcheck(torch.ops.fastnorm.rms_norm.default, (x, [6], torch.randn(6), None))


def test_results_do_not_depend_on_the_thread_count():
    x = torch.randn(300, 2049)
    w = torch.randn(2049, requires_grad=True)
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, threads):
            torch.set_num_threads(n)
            y = FF.layer_norm(x, [2049], w, backend="numba")
            results.append((y, torch.autograd.grad(y.square().sum(), w)[0]))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


def test_kernel_packages_export_each_name_once():
    """Each backend package re-exports its modules' ``__all__``: a name in two of them would be
    the last one's (layernorm's ``backward_at`` once shadowed batchnorm's in fastnorm_kernels.numba_cpu)."""
    import importlib

    for package in ("fastnorm_kernels.reference", "fastnorm_kernels.numba_cpu"):
        seen = {}
        for module in ("batchnorm", "layernorm", "groupnorm", "optim"):
            for name in importlib.import_module(f"{package}.{module}").__all__:
                assert name not in seen, f"{package}: {name} in both {seen[name]} and {module}"
                seen[name] = module
