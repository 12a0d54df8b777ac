"""fastnorm's C++ op layer (fastnorm/csrc, fastnorm/_ops.py): the registered ops, their schemas,
torch.library.opcheck on every one, which op each path of a module runs, the numba backend where
the extension cannot be built, threads, and what first use prints. Their values against torch
are also in tests/test_batchnorm_parity.py, tests/test_optim_parity.py and the differential
machines."""

from __future__ import annotations

import subprocess
import sys
import threading

import pytest
import torch
from conftest import assert_close

import fastnorm
from fastnorm import _build, _dispatch, _ops

OPS = ["batch_norm", "batch_norm_forward", "batch_norm_backward", "batch_norm_stats", "sgd_", "adagrad_", "rmsprop_",
       "adam_"]  # fmt: skip


def _node(y: torch.Tensor) -> str:
    return "none" if y.grad_fn is None else y.grad_fn.name()


def test_the_ops_are_registered_from_cpp_with_their_mutations_annotated():
    assert _ops.load() is not None, _ops.error()
    for name in OPS:
        schema = getattr(torch.ops.fastnorm, name).default._schema
        assert schema.name == f"fastnorm::{name}"
    forward = torch.ops.fastnorm.batch_norm_forward.default._schema
    mutated = [a.name for a in forward.arguments if a.alias_info is not None and a.alias_info.is_write]
    assert mutated == ["running_mean", "running_var"]
    adam = torch.ops.fastnorm.adam_.default._schema
    mutated = {a.name for a in adam.arguments if a.alias_info is not None and a.alias_info.is_write}
    assert mutated == {"params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "state_steps"}
    for key in ("CPU", "Meta"):  # C++ kernels of their own, not Python ones
        for name in OPS[1:]:
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fastnorm::{name}", key), (name, key)
    assert torch._C._dispatch_has_kernel_for_dispatch_key("fastnorm::batch_norm_forward", "Autograd")
    assert torch._C._dispatch_has_kernel_for_dispatch_key("fastnorm::batch_norm", "CompositeImplicitAutograd")


# (shape, memory format): rows, planes with odd sizes, channels-last, a strided input
OPCHECK_CASES = [((6, 5), None), ((4, 3, 5, 7), None), ((4, 3, 5, 7), torch.channels_last), ((4, 3, 5, 7), "strided")]


def _input(shape, fmt, dtype=torch.float64):
    x = torch.randn(shape, dtype=dtype)
    if fmt == "strided":
        return torch.randn(shape[0], shape[1], shape[2], 2 * shape[3], dtype=dtype)[..., ::2]
    return x if fmt is None else x.to(memory_format=fmt)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("shape,fmt", OPCHECK_CASES, ids=[f"{s}-{f}" for s, f in OPCHECK_CASES])
def test_batch_norm_ops_pass_opcheck(training, affine, shape, fmt):
    torch.manual_seed(0)
    c = shape[1]
    x = _input(shape, fmt).requires_grad_(True)
    weight = (torch.rand(c, dtype=torch.float64) + 0.5).requires_grad_(True) if affine else None
    bias = torch.randn(c, dtype=torch.float64, requires_grad=True) if affine else None
    rm, rv = torch.randn(c, dtype=torch.float64), torch.rand(c, dtype=torch.float64) + 0.5
    args = (x, weight, bias, rm, rv, training, 0.1, 1e-5)
    torch.library.opcheck(torch.ops.fastnorm.batch_norm_forward.default, args)
    torch.library.opcheck(torch.ops.fastnorm.batch_norm.default, args)
    y, mean, invstd = torch.ops.fastnorm.batch_norm_forward(*args)
    dy = torch.randn(shape, dtype=torch.float64)
    w = None if weight is None else weight.detach()
    bwd = (dy, x.detach(), w, mean, invstd, training, [True, affine, affine])
    torch.library.opcheck(torch.ops.fastnorm.batch_norm_backward.default, bwd)
    torch.library.opcheck(torch.ops.fastnorm.batch_norm_stats.default, (x.detach(),))


@pytest.mark.parametrize("shape", [(6, 5), (4, 3, 5, 5)], ids=str)  # rows; planes (odd sizes)
def test_batch_norm_stats_op(shape):
    x = torch.randn(shape, dtype=torch.float64) * 3 + 1
    mean, var = torch.ops.fastnorm.batch_norm_stats(x)
    dims = [0, *range(2, x.dim())]
    assert_close(mean, x.mean(dims), 1e-12, 1e-12, "mean")
    assert_close(var, x.var(dims, unbiased=False), 1e-12, 1e-12, "var")


# -- the optimizer ops: opcheck, and one step against torch's from the same state ---------------
SIZES = [(7,), (1,), (3, 5)]  # odd, one element; three tensors make the lists real lists


def _lists(dtype, n_buffers, seed=0):
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=g, dtype=dtype) for s in SIZES]
    grads = [torch.randn(s, generator=g, dtype=dtype) for s in SIZES]
    buffers = [[torch.rand(s, generator=g, dtype=dtype) for s in SIZES] for _ in range(n_buffers)]
    steps = [torch.tensor(3.0) for _ in SIZES]
    return params, grads, buffers, steps


UPDATES = {  # name: (torch optimizer, its options, the op's options, buffer state keys)
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


def _call(name, params, grads, buffers, steps, options):
    op = "adam" if name == "adamw" else name
    if op == "adam" and not options["amsgrad"]:
        buffers = [*buffers, []]
    if op == "sgd":
        return torch.ops.fastnorm.sgd_.default, (params, grads, buffers[0]), dict(options, first_step=[False] * 3)
    return getattr(torch.ops.fastnorm, f"{op}_").default, (params, grads, *buffers, steps), options


@pytest.mark.parametrize("name", list(UPDATES))
def test_optimizer_ops_pass_opcheck_and_match_torch(name):
    torch_cls, torch_options, options, keys = UPDATES[name]
    params, grads, buffers, steps = _lists(torch.float64, len(keys))
    op, args, kwargs = _call(name, params, grads, buffers, steps, options)
    torch.library.opcheck(op, args, kwargs)  # (runs the op on copies of its arguments)

    # one step from the same state: torch's optimizer and the registered op
    theirs = [p.clone().requires_grad_(True) for p in params]
    for t, g in zip(theirs, grads):
        t.grad = g.clone()
    opt = torch_cls(theirs, **torch_options)
    for i, t in enumerate(theirs):
        opt.state[t] = {"step": steps[i].clone(), **{k: buffers[j][i].clone() for j, k in enumerate(keys)}}
    versions = [p._version for p in params]
    opt.step()
    op(*args, **kwargs)
    for i, t in enumerate(theirs):
        assert_close(params[i], t.detach(), 1e-12, 1e-12, f"{name} param {i}")
        for j, k in enumerate(keys):
            assert_close(buffers[j][i], opt.state[t][k], 1e-12, 1e-12, f"{name} {k} {i}")
        if name != "sgd":
            assert float(steps[i]) == float(opt.state[t]["step"]) == 4.0
    # the version counters move, as torch's fused updates move them
    assert all(p._version > v for p, v in zip(params, versions))


def test_optimizer_ops_refuse_bad_lists_with_clear_errors():
    params, grads, (m, v), steps = _lists(torch.float32, 2)
    options = dict(lr=0.01, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.0, amsgrad=False, maximize=False)
    adam = torch.ops.fastnorm.adam_.default
    before = [p.clone() for p in params]
    cases = [
        ((params, grads[:2], m, v, [], steps), RuntimeError, "3 params but 2 grads"),
        ((params, grads, m, v, [], steps[:1]), RuntimeError, "3 params but 1 state_steps"),
        ((params, [g.double() for g in grads], m, v, [], steps), RuntimeError, "dense .contiguous. CPU tensor"),
        ((params, grads, [t.t() if t.dim() == 2 else t for t in m], v, [], steps), RuntimeError, "contiguous"),
        (([p.long() for p in params], grads, m, v, [], steps), NotImplementedError, "Long"),
    ]
    for args, exc, message in cases:
        with pytest.raises(exc, match=message):
            adam(*args, **options)
        assert all(torch.equal(p, q) for p, q in zip(params, before)), message
    with pytest.raises(ValueError, match="stochastic rounding .* bfloat16"):
        adam(params, grads, m, v, [], steps, **options, rounding_seed=1)


# -- which op each path of a module runs ------------------------------------------------------------


def test_every_path_of_the_numba_module_runs_the_op():
    m = fastnorm.nn.BatchNorm1d(6, backend="numba")
    x = torch.randn(5, 6, requires_grad=True)
    assert _node(m(x)) == "fastnorm::BatchNormBackward"  # training with a gradient
    m.eval()
    assert _node(m(x)) == "fastnorm::BatchNormBackward"  # eval with a gradient: the same op
    m.train()
    with torch.no_grad():  # no gradient: no node at all
        assert _node(m(x)) == "none"


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
@pytest.mark.parametrize("training", [True, False])
def test_forwards_without_a_gradient_give_torchs_values(mode, training):
    """torch.no_grad / inference_mode forwards: torch's values and running statistics, and under
    inference_mode an inference tensor as torch's."""
    ours, theirs = fastnorm.nn.BatchNorm2d(5, backend="numba"), torch.nn.BatchNorm2d(5)
    ours.train(training), theirs.train(training)
    x = torch.randn(6, 5, 4, 3)
    context = torch.no_grad if mode == "no_grad" else torch.inference_mode
    with context():
        y, y_ref = ours(x), theirs(x)
    assert y.is_inference() == y_ref.is_inference()
    assert_close(y, y_ref, 1e-4, 2e-5, "output")
    assert_close(ours.running_var, theirs.running_var, 1e-5, 1e-6, "running_var")


def test_forward_mode_ad_through_the_op_raises_a_clear_error_and_the_module_gives_tangents():
    """Called directly, the op has no forward-mode formula and says so (no silent missing
    tangent); the module and the functional run torch's op for dual tensors, tangents included."""
    import torch.autograd.forward_ad as fwAD

    x, t = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    ours, theirs = fastnorm.nn.BatchNorm1d(3, backend="numba").double(), torch.nn.BatchNorm1d(3).double()
    with fwAD.dual_level():
        dual = fwAD.make_dual(x, t)
        with pytest.raises(RuntimeError, match="no forward-mode AD formula"):
            torch.ops.fastnorm.batch_norm(dual, None, None, None, None, True, 0.1, 1e-5)
        ya, yb = fwAD.unpack_dual(ours(dual)), fwAD.unpack_dual(theirs(dual))
    assert ya.tangent is not None
    assert_close(ya.tangent, yb.tangent, 1e-10, 1e-12, "tangent")
    assert_close(ya.primal, yb.primal, 1e-10, 1e-12, "primal")


# -- where the extension cannot be built ---------------------------------------------------------------


def test_without_the_extension_numba_is_unavailable_and_auto_runs_torch(monkeypatch):
    """A build that fails (here: one that raises, as a machine without a compiler does): numba is
    left out of fastnorm.backends(), asking for it raises ValueError naming the build's error, and
    "auto" runs torch's BatchNorm and optimizers, with torch's values."""

    def fail():
        raise _build.BuildError("no C++ compiler: 'c++' is not on PATH (install g++, or set CXX)")

    monkeypatch.setattr(_ops, "_extension", None)
    monkeypatch.setattr(_ops, "_error", None)
    monkeypatch.setattr(_ops, "_build", fail)
    _dispatch._load.cache_clear()
    monkeypatch.setattr(_dispatch, "_RESOLVED", {})
    try:
        assert "numba" not in fastnorm.backends()
        with pytest.raises(ValueError, match=r"backend 'numba' is not available.*no C\+\+ compiler: 'c\+\+' is not on"):
            fastnorm.nn.BatchNorm1d(4, backend="numba")
        ours, theirs = fastnorm.nn.BatchNorm1d(4), torch.nn.BatchNorm1d(4)
        x = torch.randn(8, 4, requires_grad=True)
        y = ours(x)
        assert _node(y) == _node(theirs(x))  # torch's own node
        assert_close(y, theirs(x), 1e-6, 1e-7, "output")
        p = torch.nn.Parameter(torch.randn(3))
        p.grad = torch.ones(3)
        fastnorm.optim.Adam([p], lr=0.1).step()  # auto: torch's Adam
    finally:
        _dispatch._load.cache_clear()


def test_two_threads_running_the_op_equal_a_sequential_run():
    """Forward and backward from two threads at once (the ops release the GIL while their kernels
    run, and the output pool is shared): the values of a sequential run, bit for bit."""
    torch.manual_seed(0)
    inputs = [torch.randn(16, 8, 12, 12, dtype=torch.float64) for _ in range(2)]
    dys = [torch.randn_like(x) for x in inputs]

    def step(i):
        x = inputs[i].clone().requires_grad_(True)
        weight = torch.linspace(0.5, 1.5, 8, dtype=torch.float64, requires_grad=True)
        y = fastnorm.functional.batch_norm(x, None, None, weight, None, True, backend="numba")
        y.backward(dys[i])
        return y.detach(), x.grad, weight.grad

    expected = [step(i) for i in range(2)]
    results, errors = [None, None], []

    def run(i):
        try:
            for _ in range(20):
                results[i] = step(i)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for got, want in zip(results, expected):
        for a, b in zip(got, want):
            assert torch.equal(a, b)


# -- first use says what it compiles -----------------------------------------------------------------


def test_first_use_says_what_it_compiles(monkeypatch, capsys):
    """A kernel that is not in Numba's cache says so in one line on stderr before the wait (checked
    with the cache's answer forced; the extension's build says so too: tests/test_build.py)."""
    from fastnorm_kernels.numba_cpu import optim as optim_kernels

    monkeypatch.setattr(optim_kernels, "c_entry_point_cached", lambda op, storage: False)
    _ops._compiled("adam", "float32")
    err = capsys.readouterr().err
    assert "fastnorm: compiling its adam step kernel for float32 for first use" in err


def test_warmup_command_compiles_every_kernel_ahead():
    done = subprocess.run([sys.executable, "-m", "fastnorm", "warmup", "--dtypes", "float32"], capture_output=True,
                          text=True, timeout=1200)  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    for name in ("C++ ops", "batch_norm forward_train float32", "batch_norm backward float32", "adam step float32",
                 "sgd step float32"):  # fmt: skip
        assert name in done.stdout, done.stdout
