"""The public API: dispatch, drop-in signatures, state_dict round trips, optimizer plumbing."""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
import torchvision
from conftest import BN_BACKENDS, OPTIM_BACKENDS, assert_close
from torch.optim.optimizer import register_optimizer_step_post_hook

import fastnorm
from fastnorm._dispatch import resolve

OPTIMIZERS = ["SGD", "Adagrad", "RMSprop", "Adam", "AdamW"]
BATCHNORMS = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d"]


# -- dispatch -----------------------------------------------------------------------------------


def test_backends_lists_what_runs_here():
    names = fastnorm.backends()
    assert "reference" in names and "torch" in names
    assert set(names) <= set(fastnorm.BACKENDS)
    assert ("cuda" in names) == torch.cuda.is_available()


def test_auto_picks_a_fast_backend_for_cpu(monkeypatch):
    monkeypatch.delenv("FASTNORM_BACKEND", raising=False)
    cpu = torch.device("cpu")
    assert resolve("auto", "batch_norm", cpu).name == "numba"
    assert resolve("auto", "batch_norm", cpu, numel=64 * 3136 * 16, kind="batch_norm_planes").name == "numba"
    assert resolve("auto", "batch_norm", cpu, numel=64 * 256).name == "numba"  # the MLP's (C++ node)
    assert resolve("auto", "sgd", cpu, numel=10**9).name == "torch"  # plain SGD: never faster here
    assert resolve("auto", "adam", cpu).name == "numba"
    assert resolve("numba", "batch_norm", cpu, numel=64 * 256).name == "numba"  # explicit wins


# what "auto" runs on CPU, per op, layout and size (fastnorm/_dispatch.py: AUTO_CPU_MIN_NUMEL,
# measured by bench/auto_thresholds.py): (module, input shape, memory format, expected backend)
AUTO_BATCH_NORM_CASES = [
    (fastnorm.nn.BatchNorm1d, (64, 256), torch.contiguous_format, "numba"),  # the book's MLP
    (fastnorm.nn.BatchNorm1d, (2048, 1024), torch.contiguous_format, "numba"),  # 2.1M rows
    (fastnorm.nn.BatchNorm1d, (7, 64, 451), torch.contiguous_format, "numba"),  # 202K planes, odd sizes
    (fastnorm.nn.BatchNorm2d, (8, 16, 14, 14), torch.contiguous_format, "numba"),  # 25K planes
    (fastnorm.nn.BatchNorm2d, (4, 64, 28, 28), torch.contiguous_format, "numba"),  # 200K planes
    (fastnorm.nn.BatchNorm2d, (8, 64, 14, 14), torch.channels_last, "torch"),  # 100K channels-last
    (fastnorm.nn.BatchNorm2d, (16, 64, 28, 28), torch.channels_last, "numba"),  # 800K channels-last
]


@pytest.mark.parametrize("cls, shape, fmt, expected", AUTO_BATCH_NORM_CASES)
def test_auto_batch_norm_runs_the_faster_backend(monkeypatch, cls, shape, fmt, expected):
    monkeypatch.delenv("FASTNORM_BACKEND", raising=False)
    calls = []
    torch_batch_norm = torch.nn.functional.batch_norm
    monkeypatch.setattr(torch.nn.functional, "batch_norm", lambda *a, **k: calls.append(1) or torch_batch_norm(*a, **k))
    m = cls(shape[1])
    twin = (torch.nn.BatchNorm1d if cls is fastnorm.nn.BatchNorm1d else torch.nn.BatchNorm2d)(shape[1])
    x = torch.randn(shape).to(memory_format=fmt).requires_grad_()
    y = m(x)
    ran = "torch" if calls else "numba"
    assert ran == expected
    y.sum().backward()
    torch.testing.assert_close(y, twin(x))
    torch.testing.assert_close(m.running_var, twin.running_var)


# GroupNorm: (input shape, groups, memory format, expected backend)
AUTO_GROUP_NORM_CASES = [
    ((16, 64, 14, 14), 8, torch.contiguous_format, "torch"),  # 200K: torch's is ahead
    ((16, 64, 14, 14), 8, torch.channels_last, "torch"),
    ((16, 64, 28, 28), 32, torch.contiguous_format, "numba"),  # 800K
    ((16, 64, 28, 28), 32, torch.channels_last, "numba"),
]


@pytest.mark.parametrize("shape, groups, fmt, expected", AUTO_GROUP_NORM_CASES)
def test_auto_group_norm_runs_the_faster_backend(monkeypatch, shape, groups, fmt, expected):
    monkeypatch.delenv("FASTNORM_BACKEND", raising=False)
    calls = []
    torch_group_norm = torch.nn.functional.group_norm
    monkeypatch.setattr(torch.nn.functional, "group_norm", lambda *a, **k: calls.append(1) or torch_group_norm(*a, **k))
    x = torch.randn(shape).to(memory_format=fmt).requires_grad_()
    y = fastnorm.nn.GroupNorm(groups, shape[1])(x)
    assert ("torch" if calls else "numba") == expected
    calls.clear()
    torch.testing.assert_close(y, torch.nn.GroupNorm(groups, shape[1])(x))
    assert y.is_contiguous(memory_format=fmt)


# (optimizer, options, number of parameters, expected backend)
AUTO_OPTIMIZER_CASES = [
    ("SGD", dict(lr=0.1), 235_146, "torch"),  # plain SGD: torch's add_ is as fast
    ("SGD", dict(lr=0.1, momentum=0.9), 10_000, "torch"),
    ("SGD", dict(lr=0.1, momentum=0.9), 235_146, "numba"),  # the book's MLP
    ("Adagrad", dict(lr=0.1), 1_001, "numba"),
    ("RMSprop", dict(lr=0.1), 1_001, "numba"),
    ("Adam", dict(lr=0.1), 1_001, "numba"),
    ("AdamW", dict(lr=0.1), 235_146, "numba"),
]


@pytest.mark.parametrize("name, options, numel, expected", AUTO_OPTIMIZER_CASES)
def test_auto_optimizer_runs_the_faster_backend(monkeypatch, name, options, numel, expected):
    monkeypatch.delenv("FASTNORM_BACKEND", raising=False)
    launches = []
    launch = fastnorm.optim._kernels._launch
    monkeypatch.setattr(
        fastnorm.optim._kernels, "_launch", lambda backend, *a: launches.append(backend.name) or launch(backend, *a)
    )
    params = [torch.randn(numel - numel // 3, requires_grad=True), torch.randn(numel // 3, requires_grad=True)]
    twins = [p.detach().clone().requires_grad_() for p in params]
    opt = getattr(fastnorm.optim, name)(params, **options)
    ref = getattr(torch.optim, name)(twins, **options)
    for _ in range(2):
        for p, q in zip(params, twins):
            p.grad = q.grad = torch.randn_like(p)
        opt.step()
        ref.step()
    assert (launches[-1] if launches else "torch") == expected
    for p, q in zip(params, twins):
        torch.testing.assert_close(p, q)
    # explicitly named, numba runs at any size
    explicit = getattr(fastnorm.optim, name)([torch.randn(3, requires_grad=True)], backend="numba", **options)
    explicit.param_groups[0]["params"][0].grad = torch.ones(3)
    explicit.step()
    assert launches[-1] == "numba"


def test_environment_overrides_auto(monkeypatch):
    monkeypatch.setenv("FASTNORM_BACKEND", "reference")
    assert resolve("auto", "adam", torch.device("cpu")).name == "reference"
    assert resolve("torch", "adam", torch.device("cpu")).name == "torch"  # explicit wins
    monkeypatch.setenv("FASTNORM_BACKEND", "bogus")
    with pytest.raises(ValueError, match="FASTNORM_BACKEND"):
        fastnorm.functional.batch_norm(torch.randn(4, 3), None, None, training=True)


@pytest.mark.parametrize("bad", ["bogus", "Numba", "", None])
def test_unknown_backend_names_the_available_ones(bad):
    for make in (
        lambda: fastnorm.nn.BatchNorm1d(3, backend=bad),
        lambda: fastnorm.optim.Adam([torch.zeros(2, requires_grad=True)], backend=bad),
        lambda: fastnorm.functional.batch_norm(torch.randn(4, 3), None, None, training=True, backend=bad),
    ):
        with pytest.raises(ValueError, match="available here: .*reference.*torch"):
            make()


def test_unavailable_backends_are_refused_clearly():
    missing = [b for b in fastnorm.BACKENDS if b not in fastnorm.backends()]
    for name in missing:
        with pytest.raises(ValueError, match=f"backend '{name}' is not available.*Available here"):
            fastnorm.nn.BatchNorm1d(3, backend=name)
        with pytest.raises(ValueError, match=f"backend '{name}' is not available"):
            fastnorm.optim.SGD([torch.zeros(2, requires_grad=True)], lr=0.1, backend=name)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            fastnorm.nn.BatchNorm2d(3, backend="cuda")


def test_backend_refuses_tensors_on_another_device():
    with pytest.raises(ValueError, match="runs on CPU tensors, but the tensors are on cuda:0"):
        resolve("reference", "batch_norm", torch.device("cuda:0"))
    x = torch.empty(4, 3, device="meta")
    with pytest.raises(ValueError, match="runs on CPU tensors, but the tensors are on meta"):
        fastnorm.functional.batch_norm(x, None, None, training=True, backend="reference")
    assert fastnorm.functional.batch_norm(x, None, None, training=True, backend="auto").device.type == "meta"


# -- drop-in signatures -------------------------------------------------------------------------


_OURS = {"backend": "auto", "master_weights": False, "stochastic_rounding": False}  # fastnorm's keywords


def _without_backend(cls, ours=("backend",)):
    sig = inspect.signature(cls)
    for name in ours:
        p = sig.parameters[name]
        assert p.kind is inspect.Parameter.KEYWORD_ONLY and p.default == _OURS[name]
    return [p for name, p in sig.parameters.items() if name not in ours]


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_optimizer_signature_is_torchs(name):
    ours, theirs = getattr(fastnorm.optim, name), getattr(torch.optim, name)
    assert _without_backend(ours, tuple(_OURS)) == list(inspect.signature(theirs).parameters.values())
    assert issubclass(ours, torch.optim.Optimizer) and issubclass(ours, theirs)


@pytest.mark.parametrize("name", BATCHNORMS)
def test_batchnorm_signature_is_torchs(name):
    ours, theirs = getattr(fastnorm.nn, name), getattr(torch.nn, name)
    assert _without_backend(ours) == list(inspect.signature(theirs).parameters.values())
    assert issubclass(ours, theirs)


def test_functional_signature_is_torchs():
    def described(params):
        return [(p.name, p.kind, p.default) for p in params if p.name != "backend"]

    ours = inspect.signature(fastnorm.functional.batch_norm).parameters.values()
    theirs = inspect.signature(torch.nn.functional.batch_norm).parameters.values()
    assert described(ours) == described(theirs)


# -- BatchNorm modules --------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BN_BACKENDS)
def test_state_dict_round_trip_batchnorm2d(backend):
    src = torch.nn.BatchNorm2d(5)
    src.train()
    for _ in range(3):
        src(torch.randn(4, 5, 3, 3) * 2 + 1)
    ours = fastnorm.nn.BatchNorm2d(5, backend=backend)
    ours.load_state_dict(src.state_dict())
    assert list(ours.state_dict()) == list(src.state_dict())
    for k, v in src.state_dict().items():
        assert torch.equal(ours.state_dict()[k], v), k
    ours(torch.randn(4, 5, 3, 3))  # one more training step here...
    back = torch.nn.BatchNorm2d(5)
    back.load_state_dict(ours.state_dict())  # ...and back into torch
    for k, v in ours.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    assert int(back.num_batches_tracked) == 4


@pytest.mark.parametrize("backend", BN_BACKENDS)
@pytest.mark.parametrize(
    "name,bad_shape", [("BatchNorm1d", (2, 3, 4, 4)), ("BatchNorm2d", (2, 3)), ("BatchNorm3d", (2, 3, 4, 4))]
)
def test_wrong_input_dimensions_same_message_as_torch(backend, name, bad_shape):
    with pytest.raises(ValueError) as theirs:
        getattr(torch.nn, name)(3)(torch.randn(bad_shape))
    with pytest.raises(ValueError) as ours:
        getattr(fastnorm.nn, name)(3, backend=backend)(torch.randn(bad_shape))
    assert str(ours.value) == str(theirs.value)


@pytest.mark.parametrize("backend", BN_BACKENDS)
@pytest.mark.parametrize("shape", [(1, 3), (1, 3, 1), (1, 3, 1, 1)], ids=str)
def test_batch_of_one_in_training_same_message_as_torch(backend, shape):
    cls = {2: "BatchNorm1d", 3: "BatchNorm1d", 4: "BatchNorm2d"}[len(shape)]
    with pytest.raises(ValueError) as theirs:
        getattr(torch.nn, cls)(3)(torch.randn(shape))
    ours_module = getattr(fastnorm.nn, cls)(3, backend=backend)
    with pytest.raises(ValueError) as ours:
        ours_module(torch.randn(shape))
    assert str(ours.value) == str(theirs.value)
    ours_module.eval()
    assert ours_module(torch.randn(shape)).shape == shape  # eval mode: fine


@pytest.mark.parametrize("backend", BN_BACKENDS)
def test_functional_bad_arguments(backend):
    bn = fastnorm.functional.batch_norm
    x = torch.randn(4, 3)
    rm, rv = torch.zeros(3), torch.ones(3)
    cases = [
        (
            lambda: bn(x, rm, rv, torch.ones(4), training=True, backend=backend),
            RuntimeError,
            "weight should contain 3 elements not 4",
        ),
        (
            lambda: bn(x, rm, rv, None, torch.ones(2), training=True, backend=backend),
            RuntimeError,
            "bias should contain 3 elements not 2",
        ),
        (
            lambda: bn(x, torch.zeros(5), rv, training=True, backend=backend),
            RuntimeError,
            "running_mean should contain 3 elements not 5",
        ),
        (
            lambda: bn(x, None, None, training=False, backend=backend),
            RuntimeError,
            "running_mean must be defined in evaluation mode",
        ),
        (lambda: bn(x, rm, None, training=True, backend=backend), ValueError, "both be None"),
        (lambda: bn(x, rm, rv, training=True, eps=0.0, backend=backend), ValueError, "eps must be positive"),
        (  # torch's mixed case takes float32 parameters with a 16-bit input, nothing else
            lambda: bn(x.half(), rm.double(), rv.double(), training=True, backend=backend),
            RuntimeError,
            r"mixed dtype \(CPU\): expect parameter to have scalar type of Float",
        ),
        (
            lambda: bn(torch.ones(4, 3, dtype=torch.long), None, None, training=True, backend=backend),
            NotImplementedError,  # torch's type ("batch_norm" not implemented for 'Long')
            "torch.int64",
        ),
        (lambda: bn(x.double(), rm, rv, training=True, backend=backend), RuntimeError, "mixed dtype"),
        (lambda: bn(torch.randn(5), rm, rv, training=True, backend=backend), ValueError, r"\(N, C\).*1-D input"),
    ]
    for call, exc, message in cases:
        rm_before, rv_before = rm.clone(), rv.clone()
        with pytest.raises(exc, match=message):
            call()
        assert torch.equal(rm, rm_before) and torch.equal(rv, rv_before), message


def test_convert_keeps_everything_and_switches_backends():
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
        torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 8), torch.nn.BatchNorm1d(8, affine=False),
        torch.nn.Sequential(torch.nn.BatchNorm1d(8, momentum=None, track_running_stats=False)),
    ).double()  # fmt: skip
    model.eval()
    before = copy.deepcopy(model.state_dict())
    weight = model[1].weight
    converted = fastnorm.nn.convert(model, backend="reference")
    assert converted is model
    kinds = [type(m) for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert kinds == [fastnorm.nn.BatchNorm2d, fastnorm.nn.BatchNorm1d, fastnorm.nn.BatchNorm1d]
    assert model[1].weight is weight  # the same Parameter: optimizers keep working
    assert all(not m.training for m in model.modules())
    assert model[6][0].momentum is None and model[6][0].running_mean is None
    assert list(model.state_dict()) == list(before)
    for k, v in before.items():
        assert torch.equal(model.state_dict()[k], v) and model.state_dict()[k].dtype == v.dtype
    fastnorm.nn.convert(model, backend="torch")
    assert model[1].backend == "torch"
    single = fastnorm.nn.convert(torch.nn.BatchNorm3d(2), backend="reference")
    assert isinstance(single, fastnorm.nn.BatchNorm3d)


def test_convert_resnet18_trains_like_torch_float64():
    """The foundation issue's acceptance check: 3 steps, losses equal to 1e-5."""
    torch.manual_seed(0)
    ref = torchvision.models.resnet18(num_classes=10).double()
    ours = fastnorm.nn.convert(copy.deepcopy(ref), backend="reference")
    assert sum(isinstance(m, fastnorm.nn.BatchNorm2d) for m in ours.modules()) == 20
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9)
    opt_ours = fastnorm.optim.SGD(ours.parameters(), lr=0.05, momentum=0.9, backend="reference")
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    target = torch.tensor([1, 7, 3, 0])
    for step in range(3):
        losses = []
        for model, opt in ((ref, opt_ref), (ours, opt_ours)):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x), target)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert abs(losses[0] - losses[1]) <= 1e-5, (step, losses)
    for (k, a), b in zip(ref.state_dict().items(), ours.state_dict().values()):
        assert_close(b, a, 1e-6, 1e-8, k)


# -- optimizers: plumbing -----------------------------------------------------------------------


def _model(dtype=torch.float32):
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3)).to(dtype)


def _loss(model, x):
    return model(x).pow(2).mean()


def _train(pairs, x, steps: int = 3) -> None:
    """``steps`` training steps of every (model, optimizer) pair on the same batch."""
    for _ in range(steps):
        for model, opt in pairs:
            opt.zero_grad()
            _loss(model, x).backward()
            opt.step()


def _same_state(ours, theirs, params_ours, params_theirs) -> None:
    """Per parameter (paired by position): the same state keys and values."""
    for p, q in zip(params_ours, params_theirs):
        s1, s2 = ours.state.get(p, {}), theirs.state.get(q, {})
        assert set(s1) == set(s2)
        for key in s1:
            assert_close(torch.as_tensor(s1[key]), torch.as_tensor(s2[key]), 1e-5, 1e-6, f"state {key}")


@pytest.mark.parametrize("backend", OPTIM_BACKENDS)
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_checkpoints_move_between_torch_and_fastnorm(backend, name):
    """torch trains and saves, fastnorm resumes; fastnorm saves, torch resumes: each pair of
    runs stays in lockstep, parameters and state."""
    kwargs = {"lr": 0.05} if name != "SGD" else {"lr": 0.05, "momentum": 0.9}
    x = torch.randn(16, 5)
    a, b = _model(), _model()
    b.load_state_dict(a.state_dict())
    torch_opt = getattr(torch.optim, name)(a.parameters(), **kwargs)
    _train([(a, torch_opt)], x)
    b.load_state_dict(a.state_dict())
    ours = getattr(fastnorm.optim, name)(b.parameters(), backend=backend, **kwargs)
    ours.load_state_dict(copy.deepcopy(torch_opt.state_dict()))  # as if saved and loaded
    _train([(a, torch_opt), (b, ours)], x)
    for p, q in zip(a.parameters(), b.parameters()):
        assert_close(q, p, 1e-5, 1e-6, "params after fastnorm resumed torch's checkpoint")
    _same_state(ours, torch_opt, b.parameters(), a.parameters())
    c = _model()
    c.load_state_dict(b.state_dict())
    back = getattr(torch.optim, name)(c.parameters(), **kwargs)
    back.load_state_dict(copy.deepcopy(ours.state_dict()))  # and torch resumes fastnorm's
    loaded = back.state_dict()
    saved = ours.state_dict()
    assert set(loaded["state"]) == set(saved["state"]) == set(range(len(list(c.parameters()))))
    for index, state in saved["state"].items():  # the checkpoint's content, entry by entry
        assert set(loaded["state"][index]) == set(state), index
        for key, value in state.items():
            assert_close(torch.as_tensor(loaded["state"][index][key]), torch.as_tensor(value), 0, 0, f"{index}.{key}")
    start = [p.detach().clone() for p in c.parameters()]
    _train([(b, ours), (c, back)], x)  # torch steps from fastnorm's checkpoint
    for p, q in zip(b.parameters(), c.parameters()):
        assert_close(q, p, 1e-5, 1e-6, "params after torch resumed fastnorm's checkpoint")
    assert all(not torch.equal(p, q) for p, q in zip(c.parameters(), start))  # torch's optimizer did step
    _same_state(ours, back, b.parameters(), c.parameters())
    assert ours.state_dict()["param_groups"] == back.state_dict()["param_groups"]


@pytest.mark.parametrize("backend", OPTIM_BACKENDS)
def test_scheduler_closure_zero_grad_and_param_groups(backend):
    models = [_model(torch.float64) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    extra = [torch.randn(4, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    extra[1].data.copy_(extra[0].data)
    frozen = [torch.zeros(3, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    opts = [
        torch.optim.Adam(list(models[0].parameters()) + [frozen[0]], lr=0.1),
        fastnorm.optim.Adam(list(models[1].parameters()) + [frozen[1]], lr=0.1, backend=backend),
    ]
    scheds = [torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5) for o in opts]
    x = torch.randn(8, 5, dtype=torch.float64)
    for step in range(6):
        if step == 3:  # a group added mid-training, with its own lr
            for o, e in zip(opts, extra):
                o.add_param_group({"params": [e], "lr": 0.02})
        losses = []
        for m, o, e, s in zip(models, opts, extra, scheds):

            def closure(m=m, o=o, e=e, step=step):
                o.zero_grad(set_to_none=step % 2 == 0)
                loss = _loss(m, x) + e.pow(2).sum()
                loss.backward()
                return loss

            losses.append(o.step(closure).item())
            s.step()
        assert losses[0] == pytest.approx(losses[1], rel=1e-12)
    for p, q in zip(list(models[0].parameters()) + extra[:1], list(models[1].parameters()) + extra[1:]):
        assert_close(q, p, 1e-10, 1e-12, "params")
    assert opts[1].param_groups[0]["lr"] == opts[0].param_groups[0]["lr"] == 0.1 * 0.5**3
    assert len(opts[1].state[frozen[1]]) == 0 and torch.equal(frozen[1], torch.zeros(3, dtype=torch.float64))
    opts[1].zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in models[1].parameters())


@pytest.mark.parametrize("backend", OPTIM_BACKENDS)
def test_tensor_lr_and_named_parameters(backend):
    model = _model(torch.float64)
    ref_model = copy.deepcopy(model)
    ours = fastnorm.optim.AdamW(model.named_parameters(), lr=torch.tensor(0.01), backend=backend)
    ref = torch.optim.AdamW(ref_model.named_parameters(), lr=torch.tensor(0.01))
    x = torch.randn(8, 5, dtype=torch.float64)
    _train([(model, ours), (ref_model, ref)], x)
    for p, q in zip(ref_model.parameters(), model.parameters()):
        # torch keeps a tensor lr as a float32 tensor and computes lr/bias_correction1 in
        # float32; fastnorm computes the per-step scalars in float64: rounding-level differences
        assert_close(q, p, 1e-6, 1e-9, "params")
    assert ours.state_dict()["param_groups"][0]["param_names"] == ["0.weight", "0.bias", "2.weight", "2.bias"]


@pytest.mark.parametrize("backend", OPTIM_BACKENDS)
def test_hooks_run_once_per_step(backend):
    torch.optim.Adam([torch.zeros(1, requires_grad=True)])  # torch patches its own step too
    p = torch.zeros(3, requires_grad=True)
    opt = fastnorm.optim.Adam([p], backend=backend)
    calls = []
    opt.register_step_pre_hook(lambda *a: calls.append("pre"))
    opt.register_step_post_hook(lambda *a: calls.append("post"))
    p.grad = torch.ones(3)
    opt.step()
    assert calls == ["pre", "post"]
    torch_backed = fastnorm.optim.Adam([p], backend="torch")
    torch_backed.register_step_pre_hook(lambda *a: calls.append("torch-pre"))
    torch_backed.step()
    assert calls == ["pre", "post", "torch-pre"]
    handle = register_optimizer_step_post_hook(lambda *a: calls.append("global-post"))
    try:
        opt.step()
    finally:
        handle.remove()
    assert calls[-3:] == ["pre", "post", "global-post"]


@pytest.mark.parametrize("backend", OPTIM_BACKENDS)
def test_the_profiler_sees_the_step(backend):
    """The step is recorded as torch records its optimizers' (only while a profiler runs)."""
    p = torch.zeros(3, requires_grad=True)
    p.grad = torch.ones(3)
    opt = fastnorm.optim.Adam([p], backend=backend)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        opt.step()
    assert "Optimizer.step#Adam.step" in {e.name for e in prof.events()}


# -- optimizers: bad input leaves everything untouched --------------------------------------------


def _snapshot(params, opt):
    return [p.detach().clone() for p in params], copy.deepcopy(opt.state_dict())


def _assert_untouched(params, opt, snap):
    values, state = snap
    for p, v in zip(params, values):
        assert torch.equal(p, v)
    assert repr(opt.state_dict()) == repr(state)


@pytest.mark.parametrize("backend", OPTIM_BACKENDS)
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_bad_gradients_are_refused_before_any_update(backend, name):
    good = torch.randn(4, 3, requires_grad=True)
    cases = {
        "sparse": (torch.randn(4, 3, requires_grad=True),
                   lambda p: torch.eye(4, 3).to_sparse(), RuntimeError, "sparse"),
        "complex": (torch.randn(3, dtype=torch.complex64, requires_grad=True),
                    lambda p: torch.ones_like(p), TypeError, "complex"),
        "grad dtype": (torch.randn(3, requires_grad=True),  # torch 2.14 allows it on request
                       lambda p: setattr(p, "grad_dtype", None) or torch.ones(3, dtype=torch.float64),
                       RuntimeError, "must match"),
    }  # fmt: skip
    for _what, (bad, make_grad, exc, message) in cases.items():
        params = [good, bad]
        opt = getattr(fastnorm.optim, name)(params, lr=0.1, backend=backend)
        good.grad = torch.ones_like(good)
        opt.step()  # some state exists already
        good.grad = torch.ones_like(good)
        bad.grad = make_grad(bad)
        snap = _snapshot(params, opt)
        with pytest.raises(exc, match=message):
            opt.step()
        _assert_untouched(params, opt, snap)
        bad.grad = None


@pytest.mark.parametrize("backend", OPTIM_BACKENDS)
@pytest.mark.parametrize("option", ["foreach", "fused", "differentiable"])
def test_torch_only_options(backend, option):
    p = torch.zeros(3, requires_grad=True)
    with pytest.raises(ValueError, match=f"does not do {option}=True"):
        fastnorm.optim.Adam([p], backend=backend, **{option: True})
    opt = fastnorm.optim.Adam([p], backend=backend)
    with pytest.raises(ValueError, match=f"does not do {option}=True"):
        opt.add_param_group({"params": [torch.zeros(2, requires_grad=True)], option: True})
    if option != "differentiable":  # "auto" with a torch-only option runs torch's implementation
        auto = fastnorm.optim.Adam([p], lr=0.1, **{option: True})
        ref_p = torch.zeros(3, requires_grad=True)
        ref = torch.optim.Adam([ref_p], lr=0.1, **{option: True})
        p.grad, ref_p.grad = torch.ones(3), torch.ones(3)
        auto.step(), ref.step()
        assert torch.equal(p, ref_p)


def test_auto_on_a_gpu_never_launches_through_the_unvalidated_cpp_cuda_path(monkeypatch):
    """Until bench/gpu_check.sh has run the C++ ops' CUDA launches on a GPU (CPP_CUDA_VALIDATED),
    "auto" runs only what has: where it picks the cuda backend, its Python launchers. The cuda
    backend asked for by name (argument or FASTNORM_BACKEND) launches through the C++ ops."""
    from types import SimpleNamespace

    from fastnorm import _dispatch, _ops, functional, optim

    monkeypatch.setitem(_dispatch._DEVICE_TYPE, "cuda", "cuda")
    monkeypatch.setattr(_dispatch, "_load", lambda name: (SimpleNamespace(), None) if name == "cuda" else (None, None))
    monkeypatch.setattr(_dispatch, "_implements", lambda name, op: True)
    monkeypatch.setattr(_dispatch, "has_dtype", lambda name, op, dtype: True)
    monkeypatch.setattr(_ops, "cuda_available", lambda: True)
    monkeypatch.delenv("FASTNORM_BACKEND", raising=False)
    gpu, big = torch.device("cuda"), 10**9
    on_gpu = SimpleNamespace(is_cuda=True)

    def launches(backend: str) -> tuple[bool, bool]:
        _dispatch._RESOLVED.clear()
        chosen = _dispatch.resolve(backend, "adam", gpu, big)
        assert chosen.name == "cuda"
        allowed = _dispatch.cpp_cuda_allowed(backend)
        return optim._kernels._cuda_op(chosen, [[on_gpu]]), functional._cuda_op("cuda", on_gpu, allowed)

    assert _dispatch.CPP_CUDA_VALIDATED is False
    assert launches("auto") == (False, False)  # the Python launchers gpu.md measured
    assert launches("cuda") == (True, True)
    monkeypatch.setenv("FASTNORM_BACKEND", "cuda")
    assert launches("auto") == (True, True)  # the environment names it
    monkeypatch.delenv("FASTNORM_BACKEND")
    monkeypatch.setattr(_dispatch, "CPP_CUDA_VALIDATED", True)
    assert launches("auto") == (True, True)
    _dispatch._RESOLVED.clear()


def test_batch_norm_callers_pass_whether_the_cpp_cuda_path_is_allowed(monkeypatch):
    """fastnorm.functional.batch_norm and the BatchNorm modules hand their backend's permission
    (fastnorm._dispatch.cpp_cuda_allowed) to the one BatchNorm dispatch."""
    from fastnorm import functional

    seen = []
    real = functional.batch_norm_as

    def spy(*args, cpp_cuda=True):
        seen.append(cpp_cuda)
        return real(*args, cpp_cuda=cpp_cuda)

    monkeypatch.setattr(functional, "batch_norm_as", spy)
    x = torch.randn(4, 3)
    functional.batch_norm(x, None, None, training=True, backend="auto")
    functional.batch_norm(x, None, None, training=True, backend="reference")
    fastnorm.nn.BatchNorm1d(3, backend="auto")(x)
    assert seen == [False, True, False]
