"""torch.compile: fastnorm's BatchNorm as registered ops (fastnorm/_compiled.py), no graph breaks,
the same values as eager torch; a compiled optimizer step runs eagerly and matches torch."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import BN_BACKENDS, assert_close

import fastnorm
from fastnorm import _compiled
from fastnorm.book.models import SimpleNN

# (shape, memory format): rows, planes with an odd spatial size, channels-last
OPCHECK_CASES = [((6, 5), None), ((4, 3, 5, 7), None), ((4, 3, 5, 7), torch.channels_last)]


@pytest.mark.parametrize("backend", BN_BACKENDS)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("shape,fmt", OPCHECK_CASES, ids=[f"{s}-{f}" for s, f in OPCHECK_CASES])
def test_registered_ops_pass_opcheck(backend, training, affine, shape, fmt):
    torch.manual_seed(0)
    c = shape[1]
    x = torch.randn(shape, dtype=torch.float64)
    if fmt is not None:
        x = x.to(memory_format=fmt)
    x.requires_grad_(True)
    weight = torch.rand(c, dtype=torch.float64, requires_grad=True) + 0.5 if affine else None
    bias = torch.randn(c, dtype=torch.float64, requires_grad=True) if affine else None
    rm, rv = torch.randn(c, dtype=torch.float64), torch.rand(c, dtype=torch.float64) + 0.5
    args = (x, weight, bias, None if training else rm, None if training else rv, training, 1e-5, backend)
    torch.library.opcheck(_compiled.batch_norm_op, args)
    y, mean, invstd, _, _ = _compiled.batch_norm_op(*args)
    dy = torch.randn(shape, dtype=torch.float64)
    w = None if weight is None else weight.detach()
    args = (dy, x.detach(), w, mean.detach(), invstd.detach(), training, backend, True, affine, affine)
    torch.library.opcheck(_compiled.batch_norm_backward_op, args)


def _mlp_twins(backend):
    torch.manual_seed(0)
    ours = SimpleNN(use_batch_norm=True, backend=backend).double()
    theirs = SimpleNN(use_batch_norm=True, backend="torch").double()
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


def _compare_models(ours, theirs, tol, what):
    for (name, a), b in zip(ours.named_parameters(), theirs.parameters()):
        assert_close(a.grad, b.grad, tol, tol, f"{what}: {name}.grad")
    for (name, a), b in zip(ours.named_buffers(), theirs.buffers()):
        assert_close(a.double(), b.double(), tol, tol, f"{what}: {name}")


@pytest.mark.parametrize("backend", BN_BACKENDS)
def test_book_mlp_compiles_without_graph_breaks(backend):
    ours, theirs = _mlp_twins(backend)
    x = torch.randn(64, 784, dtype=torch.float64)
    explained = torch._dynamo.explain(copy.deepcopy(ours))(x)
    assert explained.graph_break_count == 0, [str(b.reason) for b in explained.break_reasons]
    compiled = torch.compile(ours, fullgraph=True)
    for _ in range(2):  # training: the running statistics move
        compiled(x).sum().backward()
        theirs(x).sum().backward()
    _compare_models(ours, theirs, 1e-9, "compiled MLP, training")
    ours.eval()
    theirs.eval()
    assert_close(compiled(x), theirs(x), 1e-9, 1e-10, "compiled MLP, eval")


def test_changing_batch_sizes_recompile_with_dynamic_shapes():
    """A second batch size makes the compiler mark the batch dimension dynamic: the backend is
    still resolved at trace time (a guard on "auto"'s size threshold, not a constant size)."""
    ours, theirs = _mlp_twins("numba")
    compiled = torch.compile(ours, fullgraph=True)
    for n in (64, 32, 17):
        x = torch.randn(n, 784, dtype=torch.float64)
        assert_close(compiled(x), theirs(x), 1e-9, 1e-10, f"batch of {n}")
    for (name, a), b in zip(ours.named_buffers(), theirs.buffers()):
        assert_close(a.double(), b.double(), 1e-9, 1e-9, f"{name} after three batch sizes")


def test_converted_resnet18_compiles_fullgraph():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    theirs = torchvision.models.resnet18(num_classes=10).double()
    ours = fastnorm.nn.convert(copy.deepcopy(theirs), backend="numba")
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    y = torch.compile(ours, fullgraph=True)(x)
    expected = theirs(x)
    assert_close(y, expected, 1e-8, 1e-9, "resnet18 output")
    y.sum().backward()
    expected.sum().backward()
    _compare_models(ours, theirs, 1e-7, "compiled resnet18")


@pytest.mark.parametrize("name", ["SGD", "Adam"])
def test_compiled_optimizer_step_matches_torch(name):
    torch.manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(5, 3, dtype=torch.float64)) for _ in range(2)]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    opt = getattr(fastnorm.optim, name)(ours, lr=0.1, backend="numba")
    ref = getattr(torch.optim, name)(theirs, lr=0.1)
    step = torch.compile(opt.step)
    for _ in range(3):
        for p, q in zip(ours, theirs):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        step()
        ref.step()
    for p, q in zip(ours, theirs):
        assert_close(p, q, 1e-12, 1e-14, f"{name} parameter")


# -- the optimizer updates and batch_norm_stats as registered ops ---------------------------------
# parameter sizes: odd, one element, and one beyond a numba chunk boundary is not needed here
# (the kernels' own tests cover chunking); three tensors make the lists real lists
SIZES = [(7,), (1,), (3, 5)]


def _lists(dtype, n_buffers, seed=0):
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=g, dtype=dtype) for s in SIZES]
    grads = [torch.randn(s, generator=g, dtype=dtype) for s in SIZES]
    buffers = [[torch.rand(s, generator=g, dtype=dtype) for s in SIZES] for _ in range(n_buffers)]
    steps = [torch.tensor(3.0) for _ in SIZES]
    return params, grads, buffers, steps


UPDATES = {  # op: (torch optimizer, its options, the op's options, buffer state keys)
    "adam": (torch.optim.Adam, dict(lr=0.01, betas=(0.8, 0.9), eps=1e-6, weight_decay=0.1, amsgrad=True),
             dict(lr=0.01, beta1=0.8, beta2=0.9, eps=1e-6, weight_decay=0.1, decoupled_weight_decay=False,
                  amsgrad=True, maximize=False), ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")),
    "adamw": (torch.optim.AdamW, dict(lr=0.01, weight_decay=0.1, maximize=True),
              dict(lr=0.01, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, decoupled_weight_decay=True,
                   amsgrad=False, maximize=True), ("exp_avg", "exp_avg_sq")),
    "adagrad": (torch.optim.Adagrad, dict(lr=0.1, lr_decay=0.01, weight_decay=0.1, eps=1e-8),
                dict(lr=0.1, lr_decay=0.01, weight_decay=0.1, eps=1e-8, maximize=False), ("sum",)),
    "rmsprop": (torch.optim.RMSprop, dict(lr=0.01, alpha=0.9, momentum=0.5, centered=True),
                dict(lr=0.01, alpha=0.9, eps=1e-8, weight_decay=0.0, momentum=0.5, centered=True, maximize=False),
                ("square_avg", "grad_avg", "momentum_buffer")),
    "sgd": (torch.optim.SGD, dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01),
            dict(lr=0.1, weight_decay=0.01, momentum=0.9, dampening=0.0, nesterov=True, maximize=False),
            ("momentum_buffer",)),
}  # fmt: skip


def _call(name, params, grads, buffers, steps, options, backend):
    op = "adam" if name == "adamw" else name
    if op == "adam":
        if not options["amsgrad"]:
            buffers = [*buffers, []]
        return (
            torch.ops.fastnorm.adam_step,
            (params, grads, *buffers, steps),
            dict(options, backend=backend),
        )
    if op == "sgd":
        return (
            torch.ops.fastnorm.sgd_step,
            (params, grads, buffers[0], [False] * len(params)),
            dict(options, backend=backend),
        )
    return getattr(torch.ops.fastnorm, f"{op}_step"), (params, grads, *buffers, steps), dict(options, backend=backend)


@pytest.mark.parametrize("backend", BN_BACKENDS)
@pytest.mark.parametrize("name", list(UPDATES))
def test_optimizer_ops_pass_opcheck_and_match_torch(name, backend):
    torch_cls, torch_options, options, keys = UPDATES[name]
    params, grads, buffers, steps = _lists(torch.float64, len(keys))
    op, args, kwargs = _call(name, params, grads, buffers, steps, options, backend)
    torch.library.opcheck(op, args, kwargs)  # (runs the op on copies of its arguments)

    # one step from the same state: torch's optimizer and the registered op
    theirs = [p.clone().requires_grad_(True) for p in params]
    for t, g in zip(theirs, grads):
        t.grad = g.clone()
    opt = torch_cls(theirs, **torch_options)
    for i, t in enumerate(theirs):
        opt.state[t] = {"step": steps[i].clone(), **{k: buffers[j][i].clone() for j, k in enumerate(keys)}}
    opt.step()
    op(*args, **kwargs)
    for i, t in enumerate(theirs):
        assert_close(params[i], t.detach(), 1e-12, 1e-12, f"{name} param {i}")
        for j, k in enumerate(keys):
            assert_close(buffers[j][i], opt.state[t][k], 1e-12, 1e-12, f"{name} {k} {i}")
        if name != "sgd":
            assert float(steps[i]) == float(opt.state[t]["step"]) == 4.0


@pytest.mark.parametrize("backend", BN_BACKENDS)
@pytest.mark.parametrize("shape", [(6, 5), (4, 3, 5, 5)], ids=str)  # rows; planes (odd sizes)
def test_batch_norm_stats_op(backend, shape):
    x = torch.randn(shape, dtype=torch.float64) * 3 + 1
    torch.library.opcheck(torch.ops.fastnorm.batch_norm_stats, (x, backend))
    mean, var = torch.ops.fastnorm.batch_norm_stats(x, backend)
    dims = [0, *range(2, x.dim())]
    assert_close(mean, x.mean(dims), 1e-12, 1e-12, "mean")
    assert_close(var, x.var(dims, unbiased=False), 1e-12, 1e-12, "var")
