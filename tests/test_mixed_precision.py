"""Mixed precision (issue #14): optimizers on bfloat16 and float16 parameters.

By default a 16-bit parameter is updated as torch's ``fused=True`` implementation does it:
float32 arithmetic, state in the parameter's dtype, one rounding per stored value. The oracle is
torch's fused optimizer in the same dtype (RMSprop, which torch has no fused version of: torch's
float32 update on widened copies, rounded once per step, the same rule). Then fastnorm's two
options: ``stochastic_rounding`` (bfloat16) and ``master_weights`` (float32 master copies).
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import OPTIM_BACKENDS, assert_close, tol
from hypothesis import given
from hypothesis import strategies as st
from ulps import ulps16

import fastnorm
import fastnorm.optim as fopt
import fastnorm_kernels.reference

HALF = [torch.bfloat16, torch.float16]

# parameter shapes of one group: odd sizes, a one-element tensor, a 2-D weight spanning several
# of the numba kernel's chunks when CHUNK is shrunk (see _small_chunks)
SHAPES = [(257, 31), (7,), (1,)]

# (optimizer, options): every option family of each optimizer
CONFIGS = [
    ("SGD", dict(lr=0.1)),
    ("SGD", dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01)),
    ("SGD", dict(lr=0.1, momentum=0.9, dampening=0.1, maximize=True)),
    ("Adagrad", dict(lr=0.1, lr_decay=0.01, weight_decay=0.01)),
    ("RMSprop", dict(lr=0.01)),
    ("RMSprop", dict(lr=0.01, momentum=0.9, centered=True, weight_decay=0.01)),
    ("Adam", dict(lr=1e-2)),
    ("Adam", dict(lr=1e-2, weight_decay=0.01, amsgrad=True, maximize=True)),
    ("AdamW", dict(lr=1e-2, weight_decay=0.1)),
]


@pytest.fixture(autouse=True)
def _small_chunks(monkeypatch):
    """Several chunks per tensor in the numba loop (its chunk-local element indices matter)."""
    import fastnorm_kernels.numba_cpu.optim as numba_optim
    from fastnorm import _ops

    monkeypatch.setattr(numba_optim, "CHUNK", 1000)
    _ops.sync_tunables()
    yield
    monkeypatch.undo()
    _ops.sync_tunables()


def _params(dtype, shapes=SHAPES):
    return [(torch.randn(s) * 2).to(dtype).requires_grad_() for s in shapes]


class _WidenedTwin:
    """torch's own (for-loop) update in float32 on widened copies, rounded once per step: the
    fused rule, for RMSprop, which torch has no fused implementation of."""

    def __init__(self, params, name, options):
        self.params = params
        self.shadow = [p.detach().float().requires_grad_() for p in params]
        self.opt = getattr(torch.optim, name)(self.shadow, **options)

    def step(self):
        for p, s in zip(self.params, self.shadow):
            s.data.copy_(p.detach().float())
            s.grad = p.grad.float()
            for key, t in self.opt.state.get(s, {}).items():
                if key != "step":
                    t.copy_(t.to(p.dtype).float())  # the 16-bit state, as stored
        self.opt.step()
        with torch.no_grad():
            for p, s in zip(self.params, self.shadow):
                p.copy_(s)

    def state_of(self, i):
        return {k: v.to(self.params[i].dtype) for k, v in self.opt.state[self.shadow[i]].items() if k != "step"}


def _twin(name, options, params):
    twins = [p.detach().clone().requires_grad_() for p in params]
    if name == "RMSprop":
        return twins, _WidenedTwin(twins, name, options)
    return twins, getattr(torch.optim, name)(twins, fused=True, **options)


def _state(opt, params, i):
    if isinstance(opt, _WidenedTwin):
        return opt.state_of(i)
    return {k: v for k, v in opt.state[params[i]].items() if k != "step"}


def _compare(ours, theirs, ours_opt, theirs_opt, what, min_fraction=0.99):
    """At least ``min_fraction`` of all parameter and state values within one ulp of torch's."""
    distances = []
    for i, (p, q) in enumerate(zip(ours, theirs)):
        distances.append(ulps16(p, q).flatten())
        mine = {k: v for k, v in ours_opt.state[p].items() if k != "step"}
        for key, expected in _state(theirs_opt, theirs, i).items():
            assert mine[key].dtype == p.dtype, f"{what}: state {key} is {mine[key].dtype}, not {p.dtype}"
            distances.append(ulps16(mine[key], expected).flatten())
    d = torch.cat(distances)
    fraction = (d <= 1).double().mean().item()
    assert fraction >= min_fraction, f"{what}: {fraction:.4%} of values within one ulp (max {d.max().item()} ulps)"


@pytest.mark.parametrize("backend", OPTIM_BACKENDS)
@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("name, options", CONFIGS, ids=lambda c: str(c))
def test_matches_torch_fused_in_the_same_dtype(name, options, dtype, backend):
    params = _params(dtype)
    twins, ref = _twin(name, options, params)
    opt = getattr(fastnorm.optim, name)(params, backend=backend, **options)
    for _ in range(10):
        for p, q in zip(params, twins):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        opt.step()
        ref.step()
    for p in params:
        assert p.dtype == dtype
    _compare(params, twins, opt, ref, f"{name} {options} {dtype} {backend}")


@given(
    config=st.sampled_from(CONFIGS),
    dtype=st.sampled_from(HALF),
    plan=st.lists(st.sampled_from(["step", "step", "lr", "checkpoint", "zero_grad"]), min_size=1, max_size=8),
)
def test_differential_against_torch_fused(config, dtype, plan):
    """Random sequences: steps, the learning rate changed mid-run, a checkpoint round trip into
    a new optimizer, gradients set to None: fastnorm (numba) stays within one ulp of torch."""
    name, options = config
    torch.manual_seed(len(plan))
    params = _params(dtype, [(33, 5), (3,)])
    twins, ref = _twin(name, options, params)
    opt = getattr(fastnorm.optim, name)(params, backend="numba", **options)
    for action in plan:
        if action == "step":
            for p, q in zip(params, twins):
                p.grad = torch.randn_like(p)
                q.grad = p.grad.clone()
            opt.step()
            ref.step()
        elif action == "lr":
            for group in (*opt.param_groups, *getattr(ref, "opt", ref).param_groups):
                group["lr"] *= 0.5
        elif action == "checkpoint":
            state = copy.deepcopy(opt.state_dict())
            opt = getattr(fastnorm.optim, name)(params, backend="numba", **options)
            opt.load_state_dict(state)
        else:
            opt.zero_grad()
            getattr(ref, "opt", ref).zero_grad()
            for q in twins:
                q.grad = None
        if opt.state:
            _compare(params, twins, opt, ref, f"{name} {options} {dtype} after {action}")


# -- stochastic rounding ----------------------------------------------------------------------------


@pytest.mark.parametrize("backend", OPTIM_BACKENDS)
def test_stochastic_rounding_keeps_updates_below_one_ulp(backend):
    """The issue's worked example: bfloat16 parameters at 1.0, SGD lr=1e-4, gradient 1, 1000
    steps. One bfloat16 ulp below 1.0 is 2**-8 = 0.0039 > 1e-4: round-to-nearest never moves;
    stochastic rounding moves by 1e-4 per step on average, to 0.900."""
    p = torch.ones(4096, dtype=torch.bfloat16, requires_grad=True)
    q = torch.ones(4096, dtype=torch.bfloat16, requires_grad=True)
    sr = fastnorm.optim.SGD([p], lr=1e-4, backend=backend, stochastic_rounding=True)
    nearest = fastnorm.optim.SGD([q], lr=1e-4, backend=backend)
    for _ in range(1000):
        p.grad = torch.ones_like(p)
        q.grad = torch.ones_like(q)
        sr.step()
        nearest.step()
    assert torch.equal(q, torch.ones_like(q))
    assert abs(p.float().mean().item() - 0.900) < 0.01
    assert p.float().std().item() > 0  # rounded both ways


def _sr_run(backend, threads=None):
    torch.manual_seed(123)
    params = _params(torch.bfloat16, [(300, 7), (5,)])
    opt = fastnorm.optim.Adam(params, lr=1e-3, backend=backend, stochastic_rounding=True)
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        for _ in range(5):
            for p in params:
                p.grad = torch.randn_like(p)
            opt.step()
    finally:
        torch.set_num_threads(previous)
    return [p.detach().clone() for p in params] + [
        opt.state[p][k].clone() for p in params for k in ("exp_avg", "exp_avg_sq")
    ]


def test_stochastic_rounding_is_reproducible_and_the_same_on_every_backend():
    first, again = _sr_run("numba"), _sr_run("numba")
    one_thread = _sr_run("numba", threads=1)
    reference = _sr_run("reference")
    nearest = [p.detach() for p in _params(torch.bfloat16, [(300, 7), (5,)])]  # not the same values at all
    for a, b, c, d in zip(first, again, one_thread, reference):
        assert torch.equal(a.view(torch.int16), b.view(torch.int16))  # same seed: same bits
        assert torch.equal(a.view(torch.int16), c.view(torch.int16))  # thread count: no effect
        assert torch.equal(a.view(torch.int16), d.view(torch.int16))  # one generator for every backend
    assert not torch.equal(first[0], nearest[0])


@pytest.mark.parametrize("backend", OPTIM_BACKENDS)
def test_stochastic_rounding_resumes_from_a_checkpoint_bit_for_bit(backend):
    """A run resumed from ``state_dict()`` rounds as the uninterrupted run: the checkpoint
    carries the launch count the rounding stream is seeded by (it restarted from zero, so the
    resumed run drew the first steps' random bits again)."""
    torch.manual_seed(123)
    grads = [[torch.randn(300, 7).bfloat16(), torch.randn(5).bfloat16()] for _ in range(6)]

    def steps(opt, params, which):
        for i in which:
            for p, g in zip(params, grads[i]):
                p.grad = g.clone()
            opt.step()

    params = _params(torch.bfloat16, [(300, 7), (5,)])
    opt = fastnorm.optim.Adam(params, lr=1e-3, backend=backend, stochastic_rounding=True)
    steps(opt, params, range(3))
    checkpoint = copy.deepcopy(({"params": [p.detach().clone() for p in params]}, opt.state_dict()))
    steps(opt, params, range(3, 6))
    resumed = [torch.nn.Parameter(p.clone()) for p in checkpoint[0]["params"]]
    opt2 = fastnorm.optim.Adam(resumed, lr=1e-3, backend=backend, stochastic_rounding=True)
    opt2.load_state_dict(checkpoint[1])
    steps(opt2, resumed, range(3, 6))
    for a, b in zip(params, resumed):
        assert torch.equal(a.detach().view(torch.int16), b.detach().view(torch.int16))
    torch.optim.Adam([torch.nn.Parameter(p.clone()) for p in checkpoint[0]["params"]]).load_state_dict(checkpoint[1])


def test_stochastic_rounding_is_unbiased_for_every_state_buffer():
    """exp_avg after one Adam step is (1 - beta1) * g: its stochastic roundings average to it."""
    g = torch.full((100_000,), 0.3, dtype=torch.bfloat16)
    p = torch.zeros(100_000, dtype=torch.bfloat16, requires_grad=True)
    opt = fastnorm.optim.Adam([p], lr=1e-3, backend="numba", stochastic_rounding=True)
    p.grad = g.clone()
    opt.step()
    exact = 0.1 * g.float()[0].item()
    mean = opt.state[p]["exp_avg"].float().mean().item()
    assert abs(mean - exact) < 1e-4 * exact * 100  # the ulp at 0.03 is 1.2e-4; the mean is far closer
    assert len(opt.state[p]["exp_avg"].unique()) == 2  # the two neighbours of the exact value


# -- master weights ---------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", OPTIM_BACKENDS)
@pytest.mark.parametrize("name, options", [CONFIGS[1], CONFIGS[3], CONFIGS[5], CONFIGS[7]], ids=str)
def test_master_weights_follow_a_float32_run(name, options, backend):
    params = _params(torch.bfloat16)
    shadow = [p.detach().float().requires_grad_() for p in params]
    opt = getattr(fastnorm.optim, name)(params, backend=backend, master_weights=True, **options)
    ref = getattr(torch.optim, name)(shadow, **options)
    for _ in range(5):
        for p, s in zip(params, shadow):
            p.grad = torch.randn_like(p)
            s.grad = p.grad.float()
        opt.step()
        ref.step()
    for p, s in zip(params, shadow):
        state = opt.state[p]
        assert state["master_param"].dtype == torch.float32
        assert all(v.dtype == torch.float32 for k, v in state.items() if k != "step")
        assert_close(state["master_param"], s, *tol(torch.float32), what="master_param")
        assert torch.equal(p.detach(), state["master_param"].to(torch.bfloat16))  # rounded once, from the master
        for key, value in ref.state[s].items():
            if key != "step":
                assert_close(state[key], value, *tol(torch.float32), what=key)


def test_master_weights_checkpoints_round_trip_and_load_into_torch():
    params = _params(torch.bfloat16)
    opt = fastnorm.optim.Adam(params, lr=1e-2, master_weights=True)
    for _ in range(3):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    checkpoint = copy.deepcopy(opt.state_dict())
    values = [p.detach().clone() for p in params]
    grads = [torch.randn_like(p) for p in params]

    # uninterrupted
    for p, g in zip(params, grads):
        p.grad = g.clone()
    opt.step()
    uninterrupted = [p.detach().clone() for p in params] + [opt.state[p]["master_param"].clone() for p in params]

    # resumed from the checkpoint in a new fastnorm optimizer: the same bits
    with torch.no_grad():
        for p, v in zip(params, values):
            p.copy_(v)
    resumed = fastnorm.optim.Adam(params, lr=1e-2, master_weights=True)
    resumed.load_state_dict(checkpoint)
    assert resumed.state[params[0]]["master_param"].dtype == torch.float32
    for p, g in zip(params, grads):
        p.grad = g.clone()
    resumed.step()
    after = [p.detach().clone() for p in params] + [resumed.state[p]["master_param"] for p in params]
    for a, b in zip(uninterrupted, after):
        assert torch.equal(a, b)

    # torch's optimizer takes it as ordinary state (cast to the parameters' dtype) and steps
    with torch.no_grad():
        for p, v in zip(params, values):
            p.copy_(v)
    theirs = torch.optim.Adam(params, lr=1e-2)
    theirs.load_state_dict(checkpoint)
    assert theirs.state[params[0]]["exp_avg"].dtype == torch.bfloat16  # torch's own cast
    assert theirs.state[params[0]]["master_param"].dtype == torch.bfloat16  # kept, unused by torch
    for p, g in zip(params, grads):
        p.grad = g.clone()
    theirs.step()
    # torch continues in bfloat16 arithmetic from the rounded values: close to the master run
    for p, u in zip(params, uninterrupted):
        assert p.isfinite().all() and (ulps16(p, u) <= 4).double().mean() > 0.99


@pytest.mark.parametrize("how", ["copy_", "data"])
def test_master_weights_adopt_a_parameter_written_from_outside(how):
    """A write outside the optimizer (a weight load, ``p.data = ...``) is what the next step
    updates, as in torch."""
    p = torch.nn.Parameter(torch.randn(64).bfloat16())
    opt = fastnorm.optim.SGD([p], lr=0.5, master_weights=True)
    p.grad = torch.ones_like(p)
    opt.step()
    new = torch.full((64,), 3.0, dtype=torch.bfloat16)
    if how == "copy_":
        with torch.no_grad():
            p.copy_(new)
    else:
        p.data = new.clone()
    opt.step()
    assert torch.equal(p.detach(), torch.full((64,), 2.5, dtype=torch.bfloat16))
    assert torch.equal(opt.state[p]["master_param"], torch.full((64,), 2.5))


def test_master_weights_start_from_a_torch_checkpoint():
    params = _params(torch.bfloat16)
    twins = [p.detach().clone().requires_grad_() for p in params]
    theirs = torch.optim.AdamW(twins, lr=1e-2)
    for q in twins:
        q.grad = torch.randn_like(q)
    theirs.step()
    opt = fastnorm.optim.AdamW(params, lr=1e-2, master_weights=True)
    opt.load_state_dict(theirs.state_dict())
    with torch.no_grad():
        for p, q in zip(params, twins):
            p.copy_(q)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    for p in params:
        assert opt.state[p]["exp_avg"].dtype == torch.float32 and opt.state[p]["master_param"].dtype == torch.float32


def test_mixed_dtype_groups_update_each_part_by_its_rule():
    """A model with bfloat16 weights and float32 parameters: the float32 ones are updated as
    always (no master copy), the bfloat16 ones through their float32 masters."""
    w = torch.randn(10, 3).bfloat16().requires_grad_()
    b = torch.randn(3).requires_grad_()
    b_ref = b.detach().clone().requires_grad_()
    opt = fastnorm.optim.SGD([w, b], lr=0.1, momentum=0.9, master_weights=True, backend="numba")
    ref = torch.optim.SGD([b_ref], lr=0.1, momentum=0.9)
    for _ in range(3):
        w.grad = torch.randn_like(w)
        b.grad = torch.randn_like(b)
        b_ref.grad = b.grad.clone()
        opt.step()
        ref.step()
    assert "master_param" in opt.state[w] and "master_param" not in opt.state[b]
    torch.testing.assert_close(b, b_ref)


# -- refusals: where the options do not apply --------------------------------------------------------


def test_options_are_refused_where_they_do_not_apply():
    f32 = [torch.zeros(3, requires_grad=True)]
    with pytest.raises(ValueError, match="master_weights=True applies to torch.bfloat16 and torch.float16"):
        fastnorm.optim.Adam(f32, master_weights=True)
    with pytest.raises(ValueError, match="stochastic_rounding=True applies to torch.bfloat16"):
        fastnorm.optim.Adam([torch.zeros(3, dtype=torch.float16, requires_grad=True)], stochastic_rounding=True)
    bf16 = [torch.zeros(3, dtype=torch.bfloat16, requires_grad=True)]
    with pytest.raises(ValueError, match="alternatives"):
        fastnorm.optim.Adam(bf16, master_weights=True, stochastic_rounding=True)
    with pytest.raises(ValueError, match="backend='torch'"):
        fastnorm.optim.Adam(bf16, master_weights=True, backend="torch")
    with pytest.raises(ValueError, match="does not do fused=True"):
        opt = fastnorm.optim.Adam(bf16, master_weights=True, fused=True)
        bf16[0].grad = torch.ones(3, dtype=torch.bfloat16)
        opt.step()
    # a float16 parameter in a stochastic-rounding group: refused at the step, nothing changed
    half = torch.ones(3, dtype=torch.float16, requires_grad=True)
    opt = fastnorm.optim.SGD([bf16[0], half], lr=0.1, stochastic_rounding=True)
    bf16[0].grad, half.grad = torch.ones(3, dtype=torch.bfloat16), torch.ones(3, dtype=torch.float16)
    before = [bf16[0].clone(), half.clone()]
    with pytest.raises(ValueError, match="float16"):
        opt.step()
    assert torch.equal(bf16[0], before[0]) and torch.equal(half, before[1])


def test_options_survive_deepcopy_and_pickling():
    p = torch.zeros(3, dtype=torch.bfloat16, requires_grad=True)
    opt = fastnorm.optim.Adam([p], stochastic_rounding=True, backend="reference")
    for clone in (copy.deepcopy(opt), __import__("pickle").loads(__import__("pickle").dumps(opt))):
        assert clone.stochastic_rounding and not clone.master_weights and clone.backend == "reference"


# -- auto never refuses a dtype torch supports ----------------------------------------------------------


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_auto_runs_numba_on_16_bit_parameters(monkeypatch, dtype):
    monkeypatch.delenv("FASTNORM_BACKEND", raising=False)
    launches = []
    launch = fopt._kernels._launch
    monkeypatch.setattr(
        fopt._kernels, "_launch", lambda backend, *a: launches.append(backend.name) or launch(backend, *a)
    )
    p = torch.randn(5000).to(dtype).requires_grad_()
    opt = fastnorm.optim.Adam([p], lr=1e-3)
    p.grad = torch.randn_like(p)
    opt.step()
    assert launches == ["numba"]


def test_a_backend_without_the_dtype_is_refused_by_name_and_skipped_by_auto(monkeypatch):
    """(The rule for any backend whose kernels lack a dtype: the reference made to lack bfloat16.)"""
    monkeypatch.setattr(fastnorm_kernels.reference, "OPTIMIZER_DTYPES", fastnorm_kernels.reference.OPTIMIZER_DTYPES[:2])
    assert "reference" not in fopt._kernels._dtype_backends(torch.bfloat16, "adam")
    assert fopt._kernels._dtype_backends(torch.bfloat16, "adam")[-1] == "torch"
    p = torch.ones(3, dtype=torch.bfloat16, requires_grad=True)
    p.grad = torch.ones_like(p)
    with pytest.raises(ValueError, match=r"does not update torch.bfloat16 parameters.*backends that do: numba, torch"):
        fastnorm.optim.Adam([p], backend="reference").step()
    monkeypatch.setenv("FASTNORM_BACKEND", "reference")  # "auto" resolving to it: torch's update instead
    q = p.detach().clone().requires_grad_()
    twin = torch.optim.Adam([q], lr=1e-3)
    opt = fastnorm.optim.Adam([p], lr=1e-3)
    q.grad = p.grad.clone()
    opt.step()
    twin.step()
    assert torch.equal(p, q)


# -- BatchNorm ------------------------------------------------------------------------------------

# (module, shape, memory format): rows, planes, channels-last, a 3-D odd shape
BN_CASES = [
    (torch.nn.BatchNorm1d, (64, 13), torch.contiguous_format),
    (torch.nn.BatchNorm1d, (3, 4, 11), torch.contiguous_format),
    (torch.nn.BatchNorm2d, (6, 5, 7, 7), torch.contiguous_format),
    (torch.nn.BatchNorm2d, (6, 5, 7, 7), torch.channels_last),
]
_FASTNORM_BN = {torch.nn.BatchNorm1d: fastnorm.nn.BatchNorm1d, torch.nn.BatchNorm2d: fastnorm.nn.BatchNorm2d}


def _bn_run(module, x, dy):
    """(y, dx, dweight, dbias, running_mean, running_var, eval y) of a module on 16-bit x."""
    xa = x.clone().requires_grad_()
    y = module(xa)
    y.backward(dy)
    module.eval()
    y_eval = module(x)
    module.train()
    return [y, xa.grad, module.weight.grad, module.bias.grad, module.running_mean, module.running_var, y_eval]


def _ulp(t: torch.Tensor, dtype: torch.dtype) -> float:
    """One ulp of ``dtype`` at the largest magnitude in ``t``."""
    return torch.finfo(dtype).eps * max(t.abs().max().item(), torch.finfo(dtype).tiny)


@pytest.mark.parametrize("backend", OPTIM_BACKENDS)
@pytest.mark.parametrize("param_dtype", ["float32", "same"])
@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("cls, shape, fmt", BN_CASES, ids=str)
def test_batch_norm_accuracy_against_float64_truth(cls, shape, fmt, dtype, param_dtype, backend):
    """Every output within 2x torch's own error in the same dtype (or 2 ulps where torch's is
    smaller), against float64 truth computed on the same 16-bit values; dtypes as torch's:
    output and dx in the input's dtype, the rest in the parameters'."""
    _check_batch_norm(cls, shape, fmt, dtype, torch.float32 if param_dtype == "float32" else dtype, backend)


@given(
    shape=st.tuples(st.integers(2, 9), st.integers(1, 6), st.integers(1, 13)),
    spatial=st.booleans(),
    channels_last=st.booleans(),
    dtype=st.sampled_from(HALF),
    mixed=st.booleans(),
    scale=st.sampled_from([1e-3, 1.0, 50.0]),
    seed=st.integers(0, 2**32 - 1),
)
def test_batch_norm_differential_16_bit(shape, spatial, channels_last, dtype, mixed, scale, seed):
    """Random shapes, layouts, dtypes and scales: the same accuracy contract on numba. The data
    come from a drawn seed, so that a failing example replays."""
    torch.manual_seed(seed)
    n, c, s = shape
    if spatial:
        cls, full, fmt = torch.nn.BatchNorm2d, (n, c, s, 2), torch.channels_last if channels_last else None
    else:
        cls, full, fmt = torch.nn.BatchNorm1d, (n, c), None
    _check_batch_norm(cls, full, fmt or torch.contiguous_format, dtype, torch.float32 if mixed else dtype, "numba",
                      scale=scale)  # fmt: skip


def _check_batch_norm(cls, shape, fmt, dtype, pdt, backend, scale=3.0):
    truth_module = cls(shape[1]).double()
    with torch.no_grad():
        truth_module.weight.uniform_(0.5, 1.5)
        truth_module.bias.uniform_(-1, 1)
    theirs = copy.deepcopy(truth_module).to(pdt)
    ours = _FASTNORM_BN[cls](shape[1], backend=backend).to(pdt)
    ours.load_state_dict(theirs.state_dict())
    truth_module.load_state_dict(theirs.state_dict())  # the same (rounded) parameters
    x = (torch.randn(shape) * scale + 2 * scale).to(dtype).to(memory_format=fmt)
    dy = torch.randn(shape).to(dtype).to(memory_format=fmt)
    truth = _bn_run(truth_module, x.double(), dy.double())
    mine, torch_out = _bn_run(ours, x, dy), _bn_run(theirs, x, dy)
    names = ["y", "dx", "dweight", "dbias", "running_mean", "running_var", "eval y"]
    for name, m, t, e in zip(names, mine, torch_out, truth):
        assert m.dtype == t.dtype, f"{name}: {m.dtype}, torch gives {t.dtype}"
        if name in ("y", "dx"):
            assert m.is_contiguous(memory_format=fmt), name
        error = (m.double() - e).abs().max().item()
        bound = max(2 * (t.double() - e).abs().max().item(), 2 * _ulp(e, m.dtype))
        if name in ("dx", "dweight") and error > bound:  # torch's roundings cancelled: float32's own bound
            assert _within_float32_rounding(name, m, e, x, dy, truth_module.weight), (
                f"{name}: error {error:.3e} beyond float32 rounding of its terms"
            )
            continue
        assert error <= bound, f"{name}: error {error:.3e} > {bound:.3e} (torch's {(t.double() - e).abs().max():.3e})"


def _within_float32_rounding(name: str, got: torch.Tensor, truth: torch.Tensor, x, dy, weight) -> bool:
    """dx and dweight are sums of terms computed in float32 for 16-bit inputs (torch's opmath and
    ours): dweight = sum(dy * xhat), dx = k * (dy - mean(dy) - xhat * mean(dy * xhat)). Their error
    scales with eps32 times the terms' magnitudes, not with the ulp of the result, which is far
    smaller when the terms cancel (a batch of two: dx is 0; a small scale: |sum(dy)| >> |dweight|).
    True where every element is within one ulp of its dtype plus 4 eps32 times its terms' sum of
    magnitudes (ours measured <= 2.7 over 3,200 draws for dweight)."""
    dims = [0, *range(2, x.dim())]
    x64, dy64 = x.double(), dy.double()
    invstd = (x64.var(dims, unbiased=False, keepdim=True) + 1e-5).rsqrt()
    xhat = (x64 - x64.mean(dims, keepdim=True)) * invstd
    if name == "dweight":
        terms = (dy64 * xhat).abs().sum(dims)
    else:
        k = weight.double().view(invstd.shape) * invstd
        mean_dy = dy64.mean(dims, keepdim=True).abs()
        mean_dyx = (dy64 * xhat).abs().mean(dims, keepdim=True)
        terms = k.abs() * (dy64.abs() + mean_dy + xhat.abs() * mean_dyx)
    bound = torch.finfo(got.dtype).eps * truth.abs() + 4 * torch.finfo(torch.float32).eps * terms
    return bool(((got.double() - truth).abs() <= bound).all())


def test_batch_norm_stays_accurate_for_a_large_mean():
    """mean 1e2 / std 1 in bfloat16 (ulp 0.5 at 100): the shifted float64 statistics keep the
    output accurate to the input's own rounding."""
    x = (torch.randn(256, 8) + 100).bfloat16()
    y = fastnorm.nn.BatchNorm1d(8, backend="numba")(x)
    x64 = x.double()
    truth = (x64 - x64.mean(0)) / torch.sqrt(x64.var(0, unbiased=False) + 1e-5)
    assert (y.double() - truth).abs().max().item() <= 2 * _ulp(truth, torch.bfloat16)


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_auto_runs_numba_batch_norm_in_16_bits(monkeypatch, dtype):
    monkeypatch.delenv("FASTNORM_BACKEND", raising=False)
    calls = []
    torch_batch_norm = torch.nn.functional.batch_norm
    monkeypatch.setattr(torch.nn.functional, "batch_norm", lambda *a, **k: calls.append(1) or torch_batch_norm(*a, **k))
    x = torch.randn(4, 64, 28, 28).to(dtype)  # 200K values: numba's under auto
    y = fastnorm.nn.BatchNorm2d(64)(x)
    assert not calls and y.dtype == dtype


def test_a_batch_norm_backend_without_the_dtype(monkeypatch):
    """auto skips it (torch runs); named explicitly it is refused, naming the backends that have it."""
    import fastnorm_kernels.numba_cpu

    monkeypatch.delenv("FASTNORM_BACKEND", raising=False)
    monkeypatch.setattr(
        fastnorm_kernels.numba_cpu, "BATCH_NORM_DTYPES", fastnorm_kernels.numba_cpu.BATCH_NORM_DTYPES[:2]
    )
    fastnorm._dispatch._RESOLVED.clear()
    try:
        x = torch.randn(4, 64, 28, 28).bfloat16()
        torch.testing.assert_close(fastnorm.nn.BatchNorm2d(64)(x), torch.nn.BatchNorm2d(64)(x))
        with pytest.raises(
            ValueError, match=r"backend 'numba' has no torch.bfloat16 batch_norm kernels.*reference, torch"
        ):
            fastnorm.nn.BatchNorm2d(64, backend="numba")(x)
    finally:
        fastnorm._dispatch._RESOLVED.clear()


# -- autocast ---------------------------------------------------------------------------------------


def test_a_converted_model_trains_under_autocast():
    """nn.convert(model, backend="numba") under torch.autocast("cpu", bfloat16): BatchNorm gets
    the 16-bit activations with float32 parameters (torch's mixed case) and follows torch."""
    torch.manual_seed(0)

    def net():
        return torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(), torch.nn.Flatten(),
            torch.nn.Linear(8 * 6 * 6, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(), torch.nn.Linear(16, 4),
        )  # fmt: skip

    theirs = net()
    ours = fastnorm.nn.convert(copy.deepcopy(theirs), backend="numba")
    opt = fastnorm.optim.Adam(ours.parameters(), lr=1e-2, backend="numba")
    ref = torch.optim.Adam(theirs.parameters(), lr=1e-2)
    for _ in range(3):
        x, target = torch.randn(16, 3, 8, 8), torch.randint(0, 4, (16,))
        losses = []
        for model, o in ((ours, opt), (theirs, ref)):
            o.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = model(x)
                loss = torch.nn.functional.cross_entropy(out.float(), target)
            loss.backward()
            o.step()
            losses.append(loss.item())
        assert abs(losses[0] - losses[1]) < 0.05
    for (name, a), b in zip(ours.state_dict().items(), theirs.state_dict().values()):
        if a.is_floating_point():
            assert_close(a, b, 0.05, 0.02, what=name)  # bfloat16 activations: a few bf16 ulps


def test_mnist_mlp_under_bf16_autocast_matches_float32(mnist):
    """The issue's test: the book's MLP, one epoch of MNIST, numba BatchNorm and Adam, under
    bfloat16 autocast: test accuracy within 0.5 points of the float32 run's.

    Averaged over three seeds: one epoch's accuracy moves by tenths of a point with the rounding
    (measured on an Intel Xeon, 2026-12-02, seeds 0-4: the bf16 - float32 gap of single runs was
    -0.55 to +0.13 points with numba, -0.26 to +0.06 with torch's own BatchNorm and Adam)."""
    from fastnorm.book.train import TrainConfig, train

    accuracy = {}
    for amp in (False, True):
        runs = []
        for seed in range(3):
            config = TrainConfig(optimizer="adam", epochs=1, backend="numba", progress=False, seed=seed,
                                 dtype="bfloat16" if amp else "float32", amp=amp)  # fmt: skip
            _, history = train(config, mnist)
            runs.append(history.epoch[-1]["test_acc"])
        accuracy[amp] = sum(runs) / len(runs)
    assert accuracy[False] > 0.95
    assert abs(accuracy[True] - accuracy[False]) <= 0.005, accuracy
