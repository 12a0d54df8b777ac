"""Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms", Algorithm 2):
``fastnorm.optim.Lion`` against oracles of its own, torch having no Lion.

The update, per element (g negated first with ``maximize=True``; sign(0) = 0):

    c = beta1 * m + (1 - beta1) * g
    p = p * (1 - lr * weight_decay) - lr * sign(c)
    m = beta2 * m + (1 - beta2) * g

One state buffer per parameter, ``state["exp_avg"]`` (m), zeros at the parameter's first step; no
step counter, no bias correction. The oracles:

* :func:`_lion_reference`: the update above in plain torch ops in float64. Every CPU backend, in
  float64 and float32, follows it for 10 steps on odd sizes (float32 within its roundings).
* bitsandbytes' 32-bit Lion on the CPU (``bitsandbytes.optim.Lion(..., optim_bits=32)``), an
  independent implementation: see :func:`test_bitsandbytes_lion_step_by_step` for what it
  computes and how exactly it agrees with fastnorm's.
* :class:`TorchLion`: a ``torch.optim.Optimizer`` of the same update in torch ops in the
  parameter's dtype, the twin of the hypothesis machines (those of
  tests/test_differential_optim.py, tests/test_differential_master_weights.py and
  tests/test_differential_stochastic_rounding.py, made to drive Lion), and the float32 oracle of
  the 16-bit tests.

Sign flips: ``sign(c)`` turns a rounding difference in ``c`` into a step of ``lr`` or ``2 lr``
where ``c`` is within a few roundings of zero. No test here compares values where that can
happen without saying so: float64 against float64 (differences ~1e-16 of c's terms), float32
programs whose c never comes that close to zero, and where it does (the bitsandbytes tests; 16-bit
values, whose c cancels exactly in the reals often enough: :func:`_doubts`) those elements are
found before the step and checked apart (:func:`_settle`).
"""

from __future__ import annotations

import copy
import io
import json
import pickle
import subprocess
import sys

import pytest
import torch
from conftest import OPTIM_BACKENDS, assert_close
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import initialize, precondition, rule
from test_differential_master_weights import MasterWeightsTwins
from test_differential_optim import SHAPES as MACHINE_SHAPES
from test_differential_optim import OptimizerTwins, _outcome, _parameter
from test_differential_stochastic_rounding import StochasticRoundingTwins
from ulps import assert_a_neighbour, bfloat16_ulp

import fastnorm

# parameter shapes: odd sizes, a prime-ish 2-D weight, one past a power of two
SHAPES = [(7,), (5, 3), (33, 17), (1025,)]
STEPS = 10
HALF = [torch.bfloat16, torch.float16]
#: (rtol, atol) against the float64 formula after STEPS steps: float64 differs in the order of
#: operations only; float32 rounds p twice per step (the decay, the lr step: 20 half-ulps of |p|
#: ~ 1 after 10 steps) and m's relative error stays a few ulps of |m| + |g| ~ 1
TOLERANCE = {torch.float64: (1e-12, 1e-14), torch.float32: (4e-6, 2e-6)}
# option families: the defaults, decoupled weight decay, maximize with other betas, beta1 = 0
# (c = g: the sign of the gradient itself) with a strong decay
OPTIONS = [
    dict(lr=1e-2),
    dict(lr=3e-3, weight_decay=0.1),
    dict(lr=1e-2, betas=(0.8, 0.95), maximize=True),
    dict(lr=1e-3, betas=(0.0, 0.5), weight_decay=1.0),
]
EPS32 = torch.finfo(torch.float32).eps  # one float32 ulp of x is at most EPS32 * |x|


# -- the oracles ------------------------------------------------------------------------------------


def _lion_reference(params, grads, state, *, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, maximize=False):
    """One Lion step in float64 with plain torch ops, in place: ``params`` float64 tensors,
    ``grads`` their gradients (None: skipped, as the optimizer skips them), ``state`` the exp_avg
    of each (None before its first step: zeros are made). Returns ``state``."""
    beta1, beta2 = betas
    for i, (p, g) in enumerate(zip(params, grads)):
        if g is None:
            continue
        g = g.double()
        if maximize:
            g = -g
        m = torch.zeros_like(p) if state[i] is None else state[i]
        c = beta1 * m + (1 - beta1) * g
        p.mul_(1 - lr * weight_decay).sub_(lr * torch.sign(c))
        state[i] = beta2 * m + (1 - beta2) * g
    return state


class TorchLion(torch.optim.Optimizer):
    """Lion in torch ops in each parameter's dtype: the update above, its state ``exp_avg``, the
    argument checks of torch's optimizers. Like torch's own optimizers it refuses, with a
    RuntimeError and before any update, state that no longer matches its parameter (after
    ``model.to(dtype)`` or a ``p.data`` of another shape) and gradients that do not match theirs."""

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, *, maximize=False) -> None:
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        for i, beta in enumerate(betas):
            if not 0.0 <= beta < 1.0:
                raise ValueError(f"Invalid beta parameter at index {i}: {beta}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay, maximize=maximize))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:  # every check before any update
            for p in group["params"]:
                if p.grad is None:
                    continue
                g, m = p.grad, self.state.get(p, {}).get("exp_avg")
                if g.is_sparse:
                    raise RuntimeError("TorchLion does not support sparse gradients")
                if (g.dtype, g.shape, g.device) != (p.dtype, p.shape, p.device):
                    raise RuntimeError("TorchLion: a gradient must match its parameter")
                if m is not None and (m.dtype, m.shape, m.device) != (p.dtype, p.shape, p.device):
                    raise RuntimeError("TorchLion: exp_avg does not match its parameter")
        for group in self.param_groups:
            lr, (beta1, beta2), weight_decay = group["lr"], group["betas"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = -p.grad if group["maximize"] else p.grad
                state = self.state[p]
                if "exp_avg" not in state:
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                m = state["exp_avg"]
                c = m.mul(beta1).add_(g, alpha=1 - beta1)
                p.mul_(1 - lr * weight_decay).add_(c.sign_(), alpha=-lr)
                m.mul_(beta2).add_(g, alpha=1 - beta2)
        return loss


def _float32_twin(ours):
    """A TorchLion in float32 on widened copies of ``ours``' parameters and state (16-bit values
    widen exactly), with its groups' options: (the twin, its parameters in ``ours``' order)."""
    wide = {p: torch.nn.Parameter(p.detach().float()) for group in ours.param_groups for p in group["params"]}
    twin = TorchLion([{"params": [wide[p] for p in group["params"]]} for group in ours.param_groups])
    for mine, group in zip(ours.param_groups, twin.param_groups):
        group.update({k: v for k, v in mine.items() if k != "params"})
    for p, q in wide.items():
        if ours.state.get(p):
            twin.state[q] = {k: v.detach().float().clone() for k, v in ours.state[p].items() if k == "exp_avg"}
    return twin, list(wide.values())


def _sign_margin(m, g, beta1):
    """|c| / (|beta1 m| + |(1 - beta1) g|), in float64, elementwise: how far c is from zero in units
    of its terms. Below ~1e-6 a float32 rounding of c can flip (or zero) its sign."""
    m, g = m.double(), g.double()
    c = beta1 * m + (1 - beta1) * g
    scale = (beta1 * m).abs() + ((1 - beta1) * g).abs()
    return torch.where(scale > 0, c.abs() / scale, torch.full_like(c, float("inf")))


def _doubts(opt, grads):
    """Per parameter of ``opt`` (groups in order), before a step with ``grads``: the elements whose
    sign of c is in doubt (within float32 roundings of zero: a _sign_margin at most 1e-5), where
    two correct float32 computations may step either way or not at all. With 16-bit values this
    is not rare: bfloat16 m and g make c cancel exactly in the reals often enough (m = -g/9 with
    beta1 = 0.9), and whether float32 then gives 0 or a tiny value of either sign depends on
    which products it rounds (seen: one element in 80,000). None where the gradient is None."""
    doubts = []
    params = [(p, group) for group in opt.param_groups for p in group["params"]]
    for (p, group), g in zip(params, grads):
        if g is None:
            doubts.append(None)
            continue
        g = -g if group["maximize"] else g
        m = opt.state[p]["exp_avg"] if opt.state.get(p) else torch.zeros(p.shape)
        doubts.append(_sign_margin(m, g, group["betas"][0]) <= 1e-5)
    return doubts


def _settle(ours, exact, doubt, lr, what):
    """Where the sign of c is in doubt (``doubt``), any of the three steps is right: check that
    fastnorm's 16-bit ``ours`` is within 2 lr (and a bfloat16 ulp) of the float32 ``exact``, then
    put ours' value into ``exact`` there, so that the neighbour checks that follow see the rest."""
    if doubt is None or not doubt.any():
        return
    a = ours.detach().float()
    gap = (a - exact.detach()).abs()[doubt]
    assert (gap <= 2 * lr * (1 + 1e-5) + bfloat16_ulp(exact.detach())[doubt]).all(), f"{what}: more than a sign"
    with torch.no_grad():
        exact[doubt] = a[doubt]


def _ulp16(t, dtype):
    """The spacing of ``dtype`` (bfloat16, float16) values at |t| (float32 t), subnormals included."""
    digits, smallest = {torch.bfloat16: (8, -133), torch.float16: (11, -24)}[dtype]
    _, exponent = torch.frexp(t)
    return torch.ldexp(torch.ones_like(t), (exponent - digits).clamp(min=smallest))


# -- every CPU backend against the float64 formula ---------------------------------------------------


@pytest.mark.parametrize("options", OPTIONS, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("backend", OPTIM_BACKENDS)
def test_follows_the_float64_formula(backend, dtype, shape, options):
    p = torch.nn.Parameter(torch.randn(shape, dtype=torch.float64).to(dtype))
    truth, state = [p.detach().double().clone()], [None]
    opt = fastnorm.optim.Lion([p], backend=backend, **options)
    for _ in range(STEPS):
        g = torch.randn(shape, dtype=torch.float64).to(dtype)
        p.grad = g.clone()
        opt.step()
        _lion_reference(truth, [g], state, **options)
    assert p.dtype == dtype
    assert sorted(opt.state[p]) == ["exp_avg"], "one buffer, no step counter"
    assert opt.state[p]["exp_avg"].dtype == dtype
    assert_close(p, truth[0], *TOLERANCE[dtype], what="parameter")
    assert_close(opt.state[p]["exp_avg"], state[0], *TOLERANCE[dtype], what="exp_avg")


@pytest.mark.parametrize("backend", OPTIM_BACKENDS)
def test_groups_missing_gradients_mixed_dtypes_and_layouts(backend):
    """Two groups with their own lr (and weight decay, maximize); parameters without a gradient
    on some steps (untouched: no state change), one never given one (no state at all); a
    float64 parameter beside float32 ones (one kernel call per dtype); a transposed one."""
    values = [torch.randn(5, 3), torch.randn(9, dtype=torch.float64), torch.randn(6, 4).t(), torch.randn(33, 17),
              torch.randn(7, dtype=torch.float64), torch.randn(4)]  # fmt: skip
    params = [torch.nn.Parameter(v.clone() if v.is_contiguous() else v.clone().t().contiguous().t()) for v in values]
    assert not params[2].is_contiguous()
    groups = [dict(lr=1e-2), dict(lr=3e-3, weight_decay=0.2, betas=(0.8, 0.9), maximize=True)]
    opt = fastnorm.optim.Lion([{"params": params[:3], **groups[0]}, {"params": params[3:], **groups[1]}],
                              backend=backend)  # fmt: skip
    truth, state = [v.double().clone() for v in values], [None] * len(values)
    for step in range(STEPS):
        grads = []
        for i, p in enumerate(params):
            g = None if i == 5 or (i + step) % 3 == 0 else torch.randn_like(p)
            p.grad = g
            grads.append(g)
        opt.step()
        for index, options in ((range(3), groups[0]), (range(3, 6), groups[1])):
            sub = [state[i] for i in index]
            _lion_reference([truth[i] for i in index], [grads[i] for i in index], sub, **options)
            for i, m in zip(index, sub):
                state[i] = m
    assert params[5] not in opt.state or not opt.state[params[5]], "no state without a gradient"
    for i, p in enumerate(params[:5]):
        rtol, atol = TOLERANCE[p.dtype]
        assert_close(p, truth[i], rtol, atol, f"parameter {i}")
        assert opt.state[p]["exp_avg"].dtype == p.dtype
        assert_close(opt.state[p]["exp_avg"], state[i], rtol, atol, f"exp_avg {i}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", OPTIM_BACKENDS)
def test_the_sign_of_zero_is_zero(backend, dtype):
    """At the first step m = 0, so c = (1 - beta1) g: where g is 0 the parameter stays exactly,
    elsewhere it moves by exactly lr (one rounding of p - lr), and m = (1 - beta2) g."""
    g = torch.randn(101).to(dtype)
    g[::3] = 0.0
    p = torch.nn.Parameter(torch.randn(101).to(dtype))
    before = p.detach().clone()
    opt = fastnorm.optim.Lion([p], lr=1e-2, backend=backend)
    p.grad = g.clone()
    opt.step()
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    expected = (before.to(compute) - 1e-2 * torch.sign(g.to(compute))).to(dtype)
    assert torch.equal(p.detach()[::3], before[::3]), "sign(0) = 0: no step"
    assert torch.equal(p.detach(), expected), "p - lr * sign(g), rounded once"
    m = opt.state[p]["exp_avg"]
    assert torch.equal(m[::3], torch.zeros_like(m[::3]))
    assert_close(m, (0.01 * g.double()).to(dtype), 1e-2 if dtype == torch.bfloat16 else 1e-6, 0, "exp_avg")


# -- bitsandbytes' Lion: an independent implementation ----------------------------------------------
#
# bitsandbytes 0.50's CPU backend (bitsandbytes/backends/cpu/ops.py, _optimizer_update_32bit_cpu,
# "lion") runs the 32-bit Lion as torch ops on float32 tensors, per parameter:
#
#     p.mul_(1 - lr * weight_decay)                      # if weight_decay > 0
#     c = state1.mul(beta1).add(g, alpha=1 - beta1)
#     p.add_(c.sign(), alpha=-lr)
#     state1.mul_(beta2).add_(g, alpha=1 - beta2)
#
# its Python float scalars rounded to float32 by ATen (D = fl(1 - lr*wd), L = fl(lr), B = fl(beta),
# A = fl(1 - beta)), and ATen's CPU ``add(x, y, alpha=a)`` a fused multiply-add, fl(x + a*y) with
# one rounding, on the vectorised body and the tail alike (its results equal those ops, and an
# emulation with the fused product, bit for bit). fastnorm's backends compute the same
# expressions in the same order, with roundings of their own:
#
#                 p (wd != 0)               c and m = m*B + A*g
#   bitsandbytes  fl(fl(p*D) - L*s)         fl(fl(m*B) + A*g)          (A*g fused)
#   reference     fl(fl(p*D) - L*s)         fl(fl(m*B) + fl(A*g))      (NumPy: no fused multiply-add)
#   numba         fl(p*D - L*s)             fl(m*B + fl(A*g))          (m*B fused: its kernels are
#                                                                       compiled with fastmath={"contract"})
#
# (s = sign(c), L*s exact; with wd = 0, D = 1 and p*D is exact on all three.) So from the same p,
# m and g:
# * p: the reference's equals bitsandbytes' bit for bit, and numba's where wd = 0, wherever they
#   agree on s; numba's with wd != 0 is one rounding of what bitsandbytes rounds twice: within
#   one ulp of the result plus half an ulp of p*D. s can differ only where c is within a few
#   float32 roundings of zero (a _sign_margin below 1e-6); p then differs by L or 2L.
# * m (state1 / exp_avg): the exact sums differ by at most half an ulp of each product, so the
#   results are within one ulp of the result plus half an ulp of m*B and of A*g (equal in most
#   values). c differs alike, which is why s can differ only next to zero.
# Neither m nor s depends on p (the gradients are given): over a free run the exp_avgs stay within
# those per-step differences, each shrunk by beta2 at every later step, and numba's parameters
# (wd != 0) within theirs, each shrunk by D.

#: whether a backend's p update is one fused multiply-add (see above)
FUSED = {"numba": True, "reference": False}


def _bnb_lion(params, groups):
    bnb = pytest.importorskip("bitsandbytes")
    return bnb.optim.Lion([{"params": ps, **options} for ps, options in zip(params, groups)], optim_bits=32)


BNB_SHAPES = [(33, 17), (1025,), (7,), (5, 3)]
BNB_GROUPS = [dict(lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1), dict(lr=3e-3, betas=(0.95, 0.98), weight_decay=0.0)]


def _bnb_twins(backend):
    """fastnorm's Lion and bitsandbytes' on copies of the same float32 values, two groups (lr,
    betas, weight decay of their own); and each parameter's group options."""
    values = [torch.randn(s) for s in BNB_SHAPES]
    ours = [torch.nn.Parameter(v.clone()) for v in values]
    theirs = [torch.nn.Parameter(v.clone()) for v in values]
    split = [slice(0, 2), slice(2, 4)]
    ref = _bnb_lion([theirs[s] for s in split], BNB_GROUPS)
    opt = fastnorm.optim.Lion([{"params": ours[s], **o} for s, o in zip(split, BNB_GROUPS)], backend=backend)
    return ours, theirs, opt, ref, [BNB_GROUPS[0]] * 2 + [BNB_GROUPS[1]] * 2


def _exp_avg(opt, p):
    return opt.state[p]["exp_avg"] if p in opt.state else torch.zeros_like(p)


def _m_bound(m, state1, m_before, g, beta2):
    """Elementwise: one ulp of the result plus half an ulp of each product of m*B + A*g."""
    result = torch.maximum(m.abs(), state1.abs())
    return EPS32 * (result + 0.5 * ((beta2 * m_before).abs() + ((1 - beta2) * g).abs()))


@pytest.mark.parametrize("backend", OPTIM_BACKENDS)
def test_bitsandbytes_lion_step_by_step(backend):
    """Each step starts both from fastnorm's values (bitsandbytes' p and state1 overwritten with
    them); then, elementwise (see above): p bit for bit (numba with weight decay: within one
    rounding) wherever the sign of c is not in doubt, else within 2 lr; exp_avg within one ulp of
    the result plus half an ulp of each product."""
    ours, theirs, opt, ref, group_of = _bnb_twins(backend)
    doubtful = equal_m = total_m = 0
    for step in range(20):
        if step:  # bitsandbytes made its state1 at the first step, from the same zeros
            with torch.no_grad():
                for p, q in zip(ours, theirs):
                    q.copy_(p)
                    ref.state[q]["state1"].copy_(opt.state[p]["exp_avg"])
        grads = [torch.randn_like(p) for p in ours]
        before = [(p.detach().clone(), _exp_avg(opt, p).clone()) for p in ours]
        for p, q, g in zip(ours, theirs, grads):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
        for i, (p, q, g, (p_before, m_before), options) in enumerate(zip(ours, theirs, grads, before, group_of)):
            (beta1, beta2), lr, weight_decay = options["betas"], options["lr"], options["weight_decay"]
            what = f"step {step}, parameter {i}"
            sure = _sign_margin(m_before, g, beta1) > 1e-6
            doubtful += int((~sure).sum())
            mine, theirs_p = p.detach(), q.detach()
            if FUSED[backend] and weight_decay != 0:
                decayed = (p_before * (1 - lr * weight_decay)).abs()
                bound = EPS32 * (torch.maximum(mine.abs(), theirs_p.abs()) + 0.5 * decayed)
                excess = ((mine - theirs_p).abs() - bound)[sure]
                assert excess.max() <= 0, f"{what}: p beyond one rounding by {excess.max():.3g}"
            else:
                assert torch.equal(mine[sure], theirs_p[sure]), f"{what}: p differs"
            gap = (mine - theirs_p).abs()[~sure]
            assert (gap <= 2 * lr * (1 + 1e-6) + 1e-6).all(), f"{what}: more than a sign flip"
            m, state1 = opt.state[p]["exp_avg"], ref.state[q]["state1"]
            assert m.dtype == state1.dtype == torch.float32
            excess = ((m - state1).abs() - _m_bound(m, state1, m_before, g, beta2)).max().item()
            assert excess <= 0, f"{what}: exp_avg off by {excess:.3g} beyond the bound"
            equal_m += int((m == state1).sum())
            total_m += m.numel()
    assert doubtful < 10, f"{doubtful} elements had c within 1e-6 of its terms: the data are not generic"
    print(f"{backend}: exp_avg equal to bitsandbytes' state1 in {equal_m / total_m:.2%} of the values; "
          f"{doubtful} signs in doubt")  # fmt: skip


@pytest.mark.parametrize("backend", OPTIM_BACKENDS)
def test_bitsandbytes_lion_free_run(backend):
    """30 independent steps of both: exp_avg within the accumulated per-step differences (each
    shrunk by beta2 at every later step); parameters bit for bit (numba with weight decay: within
    its accumulated roundings, each shrunk by D), but for elements whose c came within 1e-5 of
    zero (in units of its terms) at some step: those within 2 lr per such step."""
    ours, theirs, opt, ref, group_of = _bnb_twins(backend)
    near_zero = [torch.zeros(p.shape, dtype=torch.int64) for p in ours]
    m_bounds = [0.0] * len(ours)
    p_bounds = [torch.zeros_like(p) for p in ours]
    for _ in range(30):
        before = []
        for i, (p, q, options) in enumerate(zip(ours, theirs, group_of)):
            g = torch.randn_like(p)
            p.grad, q.grad = g.clone(), g.clone()
            beta1, beta2 = options["betas"]
            m = _exp_avg(opt, p)
            near_zero[i] += (_sign_margin(m, g, beta1) <= 1e-5).long()
            # this step's difference (roundings of the products and the sum) on top of the
            # earlier ones, shrunk by beta2
            m_bounds[i] = beta2 * m_bounds[i] + 2 * EPS32 * ((beta2 * m).abs() + ((1 - beta2) * g).abs()).max().item()
            before.append(q.detach().clone())
        opt.step()
        ref.step()
        for i, (q, q_before, options) in enumerate(zip(theirs, before, group_of)):
            decay = 1 - options["lr"] * options["weight_decay"]
            if FUSED[backend] and options["weight_decay"] != 0:
                p_bounds[i] = decay * p_bounds[i] + EPS32 * (q.detach().abs() + 0.5 * (decay * q_before).abs())
                p_bounds[i] += 2 * EPS32 * p_bounds[i]  # (the bound's own size in the roundings)
    for i, (p, q, n, options) in enumerate(zip(ours, theirs, near_zero, group_of)):
        m, state1 = opt.state[p]["exp_avg"], ref.state[q]["state1"]
        assert (m - state1).abs().max().item() <= m_bounds[i], f"parameter {i}: exp_avg beyond {m_bounds[i]:.3g}"
        sure = n == 0
        gap = (p.detach() - q.detach()).abs()
        assert (gap - p_bounds[i])[sure].max() <= 0, f"parameter {i}: p differs beyond its roundings"
        flipped = 2 * options["lr"] * n * (1 + 1e-5) + p_bounds[i] + 1e-6
        assert (gap <= flipped)[~sure].all(), f"parameter {i}: more than sign flips"


# -- 16-bit parameters ---------------------------------------------------------------------------------


def _half_params(dtype, shapes=((257, 31), (7,), (1,))):
    return [torch.nn.Parameter((torch.randn(s) * 2).to(dtype)) for s in shapes]


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("backend", OPTIM_BACKENDS)
def test_16_bit_is_the_float32_update_rounded_once(backend, dtype):
    """Each step: the float32 update (TorchLion) of the widened 16-bit values and state, rounded
    once to the parameter's dtype, is what fastnorm stores (state in the parameter's dtype). Both
    round a float32 result computed in its own order, so a value may be one 16-bit ulp off, or a
    few more where the result cancels its terms (m*beta2 + (1 - beta2)*g near 0: the float32
    roundings of the terms, ~EPS32 of them, are then many ulps of the small result); 99.9% of
    the values are equal. Elements whose sign of c is in doubt may step either way (_settle)."""
    params = _half_params(dtype)
    lr, decay, (beta1, beta2) = 1e-2, 1 - 1e-2 * 0.1, (0.9, 0.99)
    opt = fastnorm.optim.Lion(params, lr=lr, betas=(beta1, beta2), weight_decay=0.1, backend=backend)
    equal = total = 0
    for _ in range(STEPS):
        twin, wide = _float32_twin(opt)
        before = [(p.detach().float(), opt.state[p]["exp_avg"].float() if opt.state.get(p) else None) for p in params]
        for p, q in zip(params, wide):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.float()
        doubts = _doubts(opt, [p.grad for p in params])
        opt.step()
        twin.step()
        for p, q, doubt, (p0, m0) in zip(params, wide, doubts, before):
            m = opt.state[p]["exp_avg"]
            assert p.dtype == m.dtype == dtype
            _settle(p, q, doubt, lr, "parameter")
            m0 = torch.zeros_like(p0) if m0 is None else m0
            terms = {"parameter": (p0 * decay).abs() + lr, "exp_avg": (beta2 * m0).abs() + ((1 - beta2) * q.grad).abs()}
            for what, mine, exact in (("parameter", p.detach(), q.detach()), ("exp_avg", m, twin.state[q]["exp_avg"])):
                rounded = exact.to(dtype)
                gap = (mine.float() - rounded.float()).abs()
                bound = (
                    _ulp16(torch.maximum(mine.float().abs(), rounded.float().abs()), dtype) + 2 * EPS32 * terms[what]
                )
                assert (gap <= bound).all(), f"{what}: {int((gap > bound).sum())} values beyond the bound"
                equal += int((mine == rounded).sum())
                total += mine.numel()
    assert equal >= 0.999 * total, f"{equal / total:.4%} of values exactly the rounded float32 update"


@pytest.mark.parametrize("backend", OPTIM_BACKENDS)
def test_stochastic_rounding_keeps_updates_below_one_ulp(backend):
    """Lion's step is exactly lr: bfloat16 parameters at 1.0, lr=1e-3, gradient 1 (c > 0 at every
    step), 100 steps. The bfloat16 spacing below 1.0 is 2**-8 = 0.0039, half of it 0.0020 > 1e-3:
    round-to-nearest never moves; stochastic rounding moves by 1e-3 per step on average, to 0.900."""
    p = torch.nn.Parameter(torch.ones(4096, dtype=torch.bfloat16))
    q = torch.nn.Parameter(torch.ones(4096, dtype=torch.bfloat16))
    sr = fastnorm.optim.Lion([p], lr=1e-3, backend=backend, stochastic_rounding=True)
    nearest = fastnorm.optim.Lion([q], lr=1e-3, backend=backend)
    for _ in range(100):
        p.grad = torch.ones_like(p)
        q.grad = torch.ones_like(q)
        sr.step()
        nearest.step()
    assert torch.equal(q.detach(), torch.ones_like(q))
    assert abs(p.float().mean().item() - 0.900) < 0.005
    assert p.float().std().item() > 0  # rounded both ways


@pytest.mark.parametrize("backend", OPTIM_BACKENDS)
def test_stochastic_rounding_gives_a_neighbour_of_the_float32_step(backend):
    """Each stored bfloat16 value (parameters and exp_avg) is one of the two bfloat16 neighbours
    of the float32 update of the same values (where the sign of c is in doubt: either step, see
    _settle)."""
    params = _half_params(torch.bfloat16)
    opt = fastnorm.optim.Lion(params, lr=1e-2, weight_decay=0.1, backend=backend, stochastic_rounding=True)
    for _ in range(5):
        twin, wide = _float32_twin(opt)
        for p, q in zip(params, wide):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.float()
        doubts = _doubts(opt, [p.grad for p in params])
        opt.step()
        twin.step()
        for p, q, doubt in zip(params, wide, doubts):
            _settle(p, q, doubt, 1e-2, "parameter")
            assert_a_neighbour(p, q, "parameter")
            assert opt.state[p]["exp_avg"].dtype == torch.bfloat16
            assert_a_neighbour(opt.state[p]["exp_avg"], twin.state[q]["exp_avg"], "exp_avg")


def _sr_run(backend, threads=None):
    torch.manual_seed(123)
    params = _half_params(torch.bfloat16, [(300, 7), (5,)])
    opt = fastnorm.optim.Lion(params, lr=1e-3, backend=backend, stochastic_rounding=True)
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
    return [p.detach().clone() for p in params] + [opt.state[p]["exp_avg"].clone() for p in params]


def test_stochastic_rounding_is_reproducible_and_the_same_on_every_backend():
    first, again, one_thread, reference = _sr_run("numba"), _sr_run("numba"), _sr_run("numba", 1), _sr_run("reference")
    for a, b, c, d in zip(first, again, one_thread, reference):
        assert torch.equal(a.view(torch.int16), b.view(torch.int16))  # same seed: same bits
        assert torch.equal(a.view(torch.int16), c.view(torch.int16))  # thread count: no effect
        assert torch.equal(a.view(torch.int16), d.view(torch.int16))  # one generator for every backend


def test_stochastic_rounding_is_unbiased_for_exp_avg():
    """exp_avg after one step is (1 - beta2) g = 0.003: its stochastic roundings average to it."""
    p = torch.nn.Parameter(torch.zeros(100_000, dtype=torch.bfloat16))
    opt = fastnorm.optim.Lion([p], lr=1e-3, backend="numba", stochastic_rounding=True)
    p.grad = torch.full_like(p, 0.3)
    opt.step()
    exact = 0.01 * torch.tensor(0.3, dtype=torch.bfloat16).item()
    m = opt.state[p]["exp_avg"]
    assert len(m.unique()) == 2  # the two neighbours of the exact value
    assert abs(m.float().mean().item() - exact) < 1e-3 * exact  # the ulp at 0.003 is 1.5e-5: far closer


@pytest.mark.parametrize("backend", OPTIM_BACKENDS)
def test_master_weights_follow_a_float32_run(backend):
    params = _half_params(torch.bfloat16)
    shadow = [torch.nn.Parameter(p.detach().float()) for p in params]
    options = dict(lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1)
    opt = fastnorm.optim.Lion(params, backend=backend, master_weights=True, **options)
    ref = TorchLion(shadow, **options)
    for _ in range(5):
        for p, s in zip(params, shadow):
            p.grad = torch.randn_like(p)
            s.grad = p.grad.float()
        opt.step()
        ref.step()
    for p, s in zip(params, shadow):
        state = opt.state[p]
        assert sorted(state) == ["exp_avg", "master_param"]
        assert state["master_param"].dtype == state["exp_avg"].dtype == torch.float32
        assert_close(state["master_param"], s, *TOLERANCE[torch.float32], what="master_param")
        assert torch.equal(p.detach(), state["master_param"].to(torch.bfloat16))  # rounded once, from the master
        assert_close(state["exp_avg"], ref.state[s]["exp_avg"], *TOLERANCE[torch.float32], what="exp_avg")


@pytest.mark.parametrize("how", ["copy_", "data"])
def test_master_weights_adopt_a_parameter_written_from_outside(how):
    """A write outside the optimizer is what the next step updates: 3.0 - lr * sign(c) = 2.5."""
    p = torch.nn.Parameter(torch.randn(64).bfloat16())
    opt = fastnorm.optim.Lion([p], lr=0.5, master_weights=True)
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


def test_precision_options_are_refused_where_they_do_not_apply():
    f32 = [torch.nn.Parameter(torch.zeros(3))]
    with pytest.raises(ValueError, match="master_weights=True applies to"):
        fastnorm.optim.Lion(f32, master_weights=True)
    with pytest.raises(ValueError, match="stochastic_rounding=True applies to torch.bfloat16"):
        fastnorm.optim.Lion([torch.nn.Parameter(torch.zeros(3, dtype=torch.float16))], stochastic_rounding=True)
    with pytest.raises(ValueError, match="alternatives"):
        fastnorm.optim.Lion([torch.nn.Parameter(torch.zeros(3, dtype=torch.bfloat16))], master_weights=True,
                            stochastic_rounding=True)  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("numel", [7, 300_000])
def test_auto_runs_numba_at_every_size(monkeypatch, numel, dtype):
    """On CPU, ``"auto"`` runs the numba kernels for Lion at any size and dtype (there is no torch
    implementation to prefer)."""
    from fastnorm.optim import _kernels

    monkeypatch.delenv("FASTNORM_BACKEND", raising=False)
    launches = []
    launch = _kernels._launch
    monkeypatch.setattr(_kernels, "_launch", lambda backend, *a: launches.append(backend.name) or launch(backend, *a))
    p = torch.nn.Parameter(torch.randn(numel).to(dtype))
    opt = fastnorm.optim.Lion([p], lr=1e-3)
    p.grad = torch.randn_like(p)
    opt.step()
    assert launches == ["numba"]


# -- checkpoints, copies, dtypes, schedulers -----------------------------------------------------------


def _run(opt, params, grads):
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = None if g is None else g.clone()
        opt.step()


@pytest.mark.parametrize("precision", ["float32", "bfloat16", "bfloat16-sr", "bfloat16-master"])
@pytest.mark.parametrize("backend", OPTIM_BACKENDS)
def test_state_dict_round_trip_bit_for_bit(backend, precision):
    """Saved after 3 steps, loaded into a new Lion and stepped 3 more times: the bits of the
    uninterrupted 6 steps (stochastic rounding: the checkpoint carries its launch count; master
    weights: its float32 masters)."""
    dtype = torch.float32 if precision == "float32" else torch.bfloat16
    extra = {"bfloat16-sr": dict(stochastic_rounding=True), "bfloat16-master": dict(master_weights=True)}
    extra = extra.get(precision, {})
    values = [torch.randn(s).to(dtype) for s in ((33, 17), (7,))]
    grads = [[torch.randn(s).to(dtype) for s in ((33, 17), (7,))] for _ in range(6)]
    grads[1][1] = None  # a parameter without a gradient at one step

    def groups(ps):
        return [{"params": ps[:1], "lr": 1e-2, "weight_decay": 0.1}, {"params": ps[1:], "lr": 3e-3}]

    params = [torch.nn.Parameter(v.clone()) for v in values]
    opt = fastnorm.optim.Lion(groups(params), backend=backend, **extra)
    _run(opt, params, grads[:3])
    checkpoint = copy.deepcopy(([p.detach().clone() for p in params], opt.state_dict()))
    state = checkpoint[1]
    assert set(state["state"]) == {0, 1}
    for entry in state["state"].values():
        assert sorted(entry) == (["exp_avg", "master_param"] if "master_weights" in extra else ["exp_avg"])
    assert {"lr", "betas", "weight_decay", "maximize", "params"} <= set(state["param_groups"][0])
    assert state["param_groups"][0]["lr"] == 1e-2 and state["param_groups"][1]["lr"] == 3e-3
    _run(opt, params, grads[3:])
    resumed = [torch.nn.Parameter(v.clone()) for v in checkpoint[0]]
    opt2 = fastnorm.optim.Lion(groups(resumed), backend=backend, **extra)
    opt2.load_state_dict(checkpoint[1])
    _run(opt2, resumed, grads[3:])
    for p, q in zip(params, resumed):
        assert torch.equal(p.detach().view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
                           q.detach().view(torch.int16 if dtype == torch.bfloat16 else torch.int32))  # fmt: skip
        for key, value in opt.state[p].items():
            assert torch.equal(value, opt2.state[q][key]), key


@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
@pytest.mark.parametrize("backend", OPTIM_BACKENDS)
def test_copies_step_as_the_original(backend, how):
    """A copy (with copies of the parameters) keeps the backend, the options and the state, and
    steps as the original does, bit for bit (bfloat16 with stochastic rounding: the rounding
    stream is part of what is copied)."""
    params = [torch.nn.Parameter(torch.randn(s).bfloat16()) for s in ((33, 17), (7,))]
    opt = fastnorm.optim.Lion(params, lr=1e-2, weight_decay=0.1, backend=backend, stochastic_rounding=True)
    _run(opt, params, [[torch.randn_like(p) for p in params] for _ in range(2)])
    if how == "deepcopy":
        twin = copy.deepcopy(opt)
    elif how == "pickle":
        twin = pickle.loads(pickle.dumps(opt))
    else:
        buffer = io.BytesIO()
        torch.save(opt, buffer)
        buffer.seek(0)
        twin = torch.load(buffer, weights_only=False)
    assert type(twin) is fastnorm.optim.Lion and twin.backend == backend and twin.stochastic_rounding
    copies = [p for g in twin.param_groups for p in g["params"]]
    grads = [[torch.randn_like(p) for p in params] for _ in range(3)]
    _run(opt, params, grads)
    _run(twin, copies, grads)
    for p, q in zip(params, copies):
        assert torch.equal(p.detach().view(torch.int16), q.detach().view(torch.int16))
        assert torch.equal(opt.state[p]["exp_avg"], twin.state[q]["exp_avg"])


def _after_model_to_float64(cls, backend):
    """(the exception of a step after ``model.to(float64)``, whether that step left the model
    and state untouched, the optimizer) for a float32 model stepped once."""
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 3)
    opt = cls(model.parameters(), lr=1e-2, weight_decay=0.1, backend=backend)
    model(torch.randn(4, 5)).sum().backward()
    opt.step()
    model.to(torch.float64)
    model.zero_grad()
    model(torch.randn(4, 5, dtype=torch.float64)).sum().backward()
    before = [p.detach().clone() for p in model.parameters()], copy.deepcopy(opt.state_dict())
    error = _outcome(opt.step)
    untouched = all(torch.equal(p, v) for p, v in zip(model.parameters(), before[0]))
    untouched = untouched and repr(opt.state_dict()) == repr(before[1])
    return error, untouched, opt, model


@pytest.mark.parametrize("backend", OPTIM_BACKENDS)
def test_model_to_float64_after_steps_behaves_as_adamw(backend):
    """The model moved to float64 after the first step leaves float32 state behind: a step then
    raises what fastnorm's AdamW raises (torch's RuntimeError for state of another dtype), and
    changes nothing; ``load_state_dict`` of its own state dict casts the state to float64 (torch's
    rule), after which Lion steps in float64 from the cast state, as the float64 formula does."""
    theirs, _, _, _ = _after_model_to_float64(fastnorm.optim.AdamW, backend)
    ours, untouched, opt, model = _after_model_to_float64(fastnorm.optim.Lion, backend)
    assert type(ours) is type(theirs), f"AdamW: {theirs!r}, Lion: {ours!r}"
    if ours is not None:
        assert untouched, "a failed step changed the model or the state"
    opt.load_state_dict(opt.state_dict())
    params = list(model.parameters())
    assert all(opt.state[p]["exp_avg"].dtype == torch.float64 for p in params)
    truth = [p.detach().clone() for p in params]
    state = [opt.state[p]["exp_avg"].clone() for p in params]
    grads = [p.grad.clone() for p in params]
    opt.step()
    _lion_reference(truth, grads, state, lr=1e-2, weight_decay=0.1)
    for p, t, m in zip(params, truth, state):
        assert p.dtype == torch.float64
        assert_close(p, t, *TOLERANCE[torch.float64], what="parameter")
        assert_close(opt.state[p]["exp_avg"], m, *TOLERANCE[torch.float64], what="exp_avg")


@pytest.mark.parametrize("backend", OPTIM_BACKENDS)
def test_lr_schedulers_set_the_step(backend):
    """Lion's step is exactly lr (sign(c) = +-1, no weight decay): under StepLR (gamma 0.5 each
    step) and then OneCycleLR (which also cycles beta1), each step moves every value by the
    group's lr of that step."""
    p = torch.nn.Parameter(torch.randn(33, 17, dtype=torch.float64))
    opt = fastnorm.optim.Lion([p], lr=0.1, backend=backend)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for _ in range(4):
        before, lr = p.detach().clone(), opt.param_groups[0]["lr"]
        p.grad = torch.randn_like(p)
        opt.step()
        scheduler.step()
        assert_close((p.detach() - before).abs(), torch.full_like(p, lr), 1e-12, 1e-15, f"lr {lr}")
    assert opt.param_groups[0]["lr"] == 0.1 / 16
    cycle = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=10)
    for _ in range(3):
        before, lr = p.detach().clone(), opt.param_groups[0]["lr"]
        p.grad = torch.randn_like(p)
        opt.step()
        cycle.step()
        assert_close((p.detach() - before).abs(), torch.full_like(p, lr), 1e-12, 1e-15, f"lr {lr}")
    assert opt.param_groups[0]["betas"][0] != 0.9, "OneCycleLR cycles beta1"


# -- what Lion refuses -----------------------------------------------------------------------------------


def test_backend_torch_is_refused():
    """torch has no Lion: backend="torch" is refused when the optimizer is made, as every backend
    that cannot run an op is (backend="cuda" without a GPU: ValueError at construction)."""
    with pytest.raises(ValueError, match="torch"):
        fastnorm.optim.Lion([torch.nn.Parameter(torch.zeros(3))], backend="torch")


def test_backends_of_lion_are_fastnorms():
    """``fastnorm.backends("lion")`` lists what runs Lion here: not torch."""
    assert fastnorm.backends("lion") == ["reference", "numba"]


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(lr=-1.0), "Invalid learning rate: -1.0"),
        (dict(betas=(1.0, 0.99)), "beta"),
        (dict(betas=(0.9, 1.0)), "beta"),
        (dict(betas=(-0.1, 0.99)), "beta"),
        (dict(betas=(0.9, -0.5)), "beta"),
        (dict(weight_decay=-0.1), "weight_decay"),
    ],
    ids=str,
)
def test_invalid_hyperparameters_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        fastnorm.optim.Lion([torch.nn.Parameter(torch.zeros(3))], **options)
    with pytest.raises(ValueError, match=message):  # the oracle's words are torch's
        TorchLion([torch.nn.Parameter(torch.zeros(3))], **options)


@pytest.mark.parametrize("backend", [*OPTIM_BACKENDS, "auto"])
def test_bad_gradients_are_refused_before_any_update(backend):
    """Sparse gradients (RuntimeError) and complex parameters (TypeError), on every backend and
    "auto" (torch has no Lion to hand them to), with messages naming Lion and what is wrong, and
    not advising backend='torch'; parameters and state (stepped once already) untouched."""
    good = torch.nn.Parameter(torch.randn(4, 3))
    cases = {
        "sparse": (torch.nn.Parameter(torch.randn(4, 3)), lambda p: torch.eye(4, 3).to_sparse(), RuntimeError),
        "complex": (torch.nn.Parameter(torch.randn(3, dtype=torch.complex64)), torch.ones_like, TypeError),
    }
    for what, (bad, make_grad, exc) in cases.items():
        try:
            opt = fastnorm.optim.Lion([good, bad], lr=0.1, backend=backend)
        except TypeError as refused:  # a complex parameter may be refused when the optimizer is made
            assert what == "complex" and "Lion" in str(refused) and "complex" in str(refused), str(refused)
            continue
        good.grad = torch.ones_like(good)
        opt.step()  # some state exists already
        good.grad, bad.grad = torch.ones_like(good), make_grad(bad)
        values, state = [good.detach().clone(), bad.detach().clone()], copy.deepcopy(opt.state_dict())
        with pytest.raises(exc, match=what) as raised:
            opt.step()
        message = str(raised.value)
        assert "Lion" in message, message
        assert "backend='torch'" not in message, f"the message advises a backend Lion refuses: {message}"
        assert torch.equal(good, values[0]) and torch.equal(bad, values[1])
        assert repr(opt.state_dict()) == repr(state)
        bad.grad = None


# -- torch.compile ---------------------------------------------------------------------------------------

COMPILE_SCRIPT = r"""
import json, torch, fastnorm
torch.manual_seed(0)
shapes = ((5, 3), (7,), (1,), (33, 17))
ours = [torch.nn.Parameter(torch.randn(s, dtype=torch.float64)) for s in shapes]
eager = [torch.nn.Parameter(p.detach().clone()) for p in ours]

def groups(ps):
    return [{"params": ps[:2], "lr": 0.01, "weight_decay": 0.1},
            {"params": ps[2:], "lr": 0.003, "betas": (0.8, 0.95), "maximize": True}]

opt = fastnorm.optim.Lion(groups(ours), backend="numba")
ref = fastnorm.optim.Lion(groups(eager), backend="numba")

@torch.compile(fullgraph=True)
def step():
    opt.step()

for _ in range(3):
    for p, q in zip(ours, eager):
        p.grad = torch.randn_like(p)
        q.grad = p.grad.clone()
    step()
    ref.step()
out = dict(params=all(torch.equal(p, q) for p, q in zip(ours, eager)),
           state=all(torch.equal(opt.state[p]["exp_avg"], ref.state[q]["exp_avg"]) for p, q in zip(ours, eager)),
           keys=sorted(opt.state[ours[0]]))
explained = torch._dynamo.explain(opt.step)()  # (one more step, on the compiled side only)
nodes = [str(n.target) for g in explained.graphs for n in g.graph.nodes
         if n.op == "call_function" and "fastnorm" in str(n.target)]
out.update(breaks=explained.graph_break_count, nodes=nodes)
print("RESULTS " + json.dumps(out))
"""


def test_a_function_calling_step_compiles_fullgraph():
    """In a fresh interpreter (tests/test_compile.py says why): a function calling ``opt.step()``
    compiles with ``fullgraph=True`` to one ``torch.ops.fastnorm.lion_`` node per group, and gives
    the eager step's bits."""
    done = subprocess.run([sys.executable, "-c", COMPILE_SCRIPT], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    r = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("RESULTS "))[8:])
    assert r["breaks"] == 0 and r["nodes"] == ["fastnorm.lion_.default"] * 2, r
    assert r["params"] and r["state"] and r["keys"] == ["exp_avg"], r


# -- the hypothesis machines, made to drive Lion ---------------------------------------------------------

#: options to construct with, and options a rule may change mid-run (key -> values)
MACHINE_OPTIONS = (
    st.fixed_dictionaries(
        {"lr": st.sampled_from([0.01, 0.1])},
        optional={
            "betas": st.sampled_from([(0.9, 0.99), (0.5, 0.9), (0.0, 0.99)]),
            "weight_decay": st.sampled_from([0.0, 0.1]),
            "maximize": st.booleans(),
        },
    ),
    {
        "lr": [0.02, 0.2],
        "betas": [(0.8, 0.9), (0.95, 0.98)],
        "weight_decay": [0.0, 0.01, 0.5],
        "maximize": [False, True],
    },
)

_LION_BACKEND = st.just(None).flatmap(lambda _: st.sampled_from(LionTwins.backends))


def _change_option(data, optimizers):
    choices = MACHINE_OPTIONS[1]
    key = data.draw(st.sampled_from(sorted(choices)), label="option")
    value = data.draw(st.sampled_from(choices[key]), label="value")
    for opt in optimizers:
        opt.param_groups[0][key] = value


class LionTwins(OptimizerTwins):
    """tests/test_differential_optim.py's machine with fastnorm's Lion and TorchLion as twins
    (float64, bfloat16 in a third of the programs): every rule of it (steps, zero_grad, options
    changed, groups added, checkpoints both ways, deepcopy and torch.save, ``p.data`` replaced,
    ``model.to``, LR schedulers), the same comparisons and tolerances."""

    backends = OPTIM_BACKENDS

    @initialize(data=st.data(), backend=_LION_BACKEND,
                shapes=st.lists(st.sampled_from(MACHINE_SHAPES), min_size=1, max_size=4),
                dtype=st.sampled_from([torch.float64, torch.float64, torch.bfloat16]))  # fmt: skip
    def build(self, data, backend, shapes, dtype):
        self.name, self.backend = "Lion", backend
        options = self.options = data.draw(MACHINE_OPTIONS[0], label="options")
        params = [_parameter(s, t, self.generator, dtype) for s, t in shapes]
        self.theirs = TorchLion(self._model(params, "theirs"), **options)
        mine = [torch.nn.Parameter(p.detach().clone()) for p in params]
        for p, q in zip(params, mine):  # the same layout (non-contiguous where the twin's is)
            q.data = torch.empty_strided(p.shape, p.stride(), dtype=p.dtype).copy_(p)
        self.ours = fastnorm.optim.Lion(self._model(mine, "ours"), backend=backend, **options)

    @rule(data=st.data())
    def change_option(self, data):
        choices = MACHINE_OPTIONS[1]
        key = data.draw(st.sampled_from(sorted(choices)), label="option")
        value = data.draw(st.sampled_from(choices[key]), label="value")
        index = data.draw(st.integers(0, len(self.theirs.param_groups) - 1), label="group")

        def change(opt, _):
            opt.param_groups[index][key] = value

        self._both(change)

    def _float32_step(self, grads):
        """[(parameter, state)] after TorchLion's float32 step from fastnorm's bfloat16 values and
        state, or None unless every parameter and state buffer is bfloat16 or where it raises.
        The elements whose sign of c is in doubt are kept for :meth:`_both` (see _settle)."""
        self._pending = None
        params = self._params(self.ours)
        buffers = [v for p in params for v in self.ours.state.get(p, {}).values()]
        if any(t.dtype != torch.bfloat16 for t in params + buffers):
            return None
        opt, wide = _float32_twin(self.ours)
        for q, g in zip(wide, grads):
            q.grad = None if g is None else g.float()
        if _outcome(opt.step) is not None:
            return None
        lrs = [group["lr"] for group in self.ours.param_groups for _ in group["params"]]
        self._pending = (wide, _doubts(self.ours, grads), lrs)
        return [(q, opt.state.get(q, {})) for q in wide]

    def _both(self, fn, resync=True):
        """The base machine's, and after a step that :meth:`_float32_step` prepared: its float32
        result takes fastnorm's values where the sign of c was in doubt (after checking them),
        before the base step compares every value with it."""
        pending, self._pending = getattr(self, "_pending", None), None
        outcome = super()._both(fn, resync)
        if outcome is None and pending is not None:
            for p, q, doubt, lr in zip(self._params(self.ours), *pending):
                _settle(p, q, doubt, lr, "parameter")
        return outcome

    def _continue_from_ours(self):
        """The base machine's; torch's ``load_state_dict`` (which the twin just ran) adds
        ``differentiable=False`` to an optimizer's defaults, and so to the groups it adds later:
        fastnorm's Lion, which loaded nothing here, is given the same default (torch's
        optimizers have it from the start; TorchLion and fastnorm's Lion gain it by loading)."""
        super()._continue_from_ours()
        self.ours.defaults.setdefault("differentiable", False)


class BFloat16LionTwins(LionTwins):
    """Every program in bfloat16, groups added in bfloat16 too."""

    new_dtype = torch.bfloat16

    @initialize(data=st.data(), backend=_LION_BACKEND,
                shapes=st.lists(st.sampled_from(MACHINE_SHAPES), min_size=1, max_size=4))  # fmt: skip
    def build(self, data, backend, shapes):
        super().build.__wrapped__(self, data, backend, shapes, torch.bfloat16)


class LionMasterWeightsTwins(MasterWeightsTwins):
    """tests/test_differential_master_weights.py's machine: 16-bit Lion with float32 masters
    against TorchLion on float32 parameters."""

    backends = OPTIM_BACKENDS

    @initialize(dtype=st.sampled_from(HALF), data=st.data(),
                backend=st.just(None).flatmap(lambda _: st.sampled_from(LionMasterWeightsTwins.backends)),
                shapes=st.lists(st.sampled_from([(7,), (3, 5), (1,), (129, 3)]), min_size=1, max_size=3))  # fmt: skip
    def build(self, dtype, data, backend, shapes):
        self.name, self.dtype = "Lion", dtype
        options = self.options = data.draw(MACHINE_OPTIONS[0], label="options")
        values = [self._values(s) for s in shapes]
        self.params = [torch.nn.Parameter(v.clone()) for v in values]
        self.shadow = [torch.nn.Parameter(v.float()) for v in values]
        self.ours = fastnorm.optim.Lion(self.params, backend=backend, master_weights=True, **options)
        self.theirs = TorchLion(self.shadow, **options)

    @precondition(lambda self: not self.stopped)
    @rule(data=st.data())
    def change_option(self, data):
        _change_option(data, (self.ours, self.theirs))


class LionStochasticRoundingTwins(StochasticRoundingTwins):
    """tests/test_differential_stochastic_rounding.py's machine: bfloat16 Lion with stochastic
    rounding, each step against TorchLion's float32 step from fastnorm's values and state."""

    backends = OPTIM_BACKENDS

    @initialize(data=st.data(),
                backend=st.just(None).flatmap(lambda _: st.sampled_from(LionStochasticRoundingTwins.backends)),
                shapes=st.lists(st.sampled_from([(7,), (3, 5), (1,), (129, 3)]), min_size=1, max_size=3))  # fmt: skip
    def build(self, data, backend, shapes):
        self.name, self.backend = "Lion", backend
        self.options = data.draw(MACHINE_OPTIONS[0], label="options")
        self.params = [torch.nn.Parameter(self._values(s)) for s in shapes]
        self.ours = fastnorm.optim.Lion(self.params, backend=backend, stochastic_rounding=True, **self.options)

    @precondition(lambda self: not self.stopped)
    @rule(mask=st.lists(st.booleans(), min_size=3, max_size=3))
    def step(self, mask):
        grads = self._gradients(mask)
        theirs, shadow = _float32_twin(self.ours)
        for p, s, g in zip(self.params, shadow, grads):
            p.grad = g
            s.grad = None if g is None else g.float()
        doubts = _doubts(self.ours, [p.grad for group in self.ours.param_groups for p in group["params"]])
        ours_error, their_error = _outcome(self.ours.step), _outcome(theirs.step)
        assert type(ours_error) is type(their_error), f"TorchLion: {their_error!r}, fastnorm: {ours_error!r}"
        if their_error is not None:
            self.stopped = True
            return
        for i, (p, s, doubt) in enumerate(zip(self.params, shadow, doubts)):
            _settle(p, s, doubt, self.ours.param_groups[0]["lr"], f"parameter {i}")
            assert_a_neighbour(p, s, f"parameter {i}")
            ours_state, their_state = self.ours.state.get(p, {}), theirs.state.get(s, {})
            assert sorted(ours_state) == sorted(their_state), f"parameter {i}: state keys"
            for key, value in their_state.items():
                assert_a_neighbour(ours_state[key], value, f"parameter {i}: {key}")

    @precondition(lambda self: not self.stopped)
    @rule(data=st.data())
    def change_option(self, data):
        _change_option(data, (self.ours,))


# as many programs as the machines they come from run for five optimizers (CI's derandomized
# examples are short: fewer would step the bfloat16 and stochastic rounding programs once or twice)
TestLionTwins = pytest.mark.fuzz(LionTwins.TestCase)
TestLionTwins.settings = settings(max_examples=40, stateful_step_count=20)
TestBFloat16LionTwins = pytest.mark.fuzz(BFloat16LionTwins.TestCase)
TestBFloat16LionTwins.settings = settings(max_examples=40, stateful_step_count=15)
TestLionMasterWeightsTwins = pytest.mark.fuzz(LionMasterWeightsTwins.TestCase)
TestLionMasterWeightsTwins.settings = settings(max_examples=25, stateful_step_count=15)
TestLionStochasticRoundingTwins = pytest.mark.fuzz(LionStochasticRoundingTwins.TestCase)
TestLionStochasticRoundingTwins.settings = settings(max_examples=40, stateful_step_count=15)
