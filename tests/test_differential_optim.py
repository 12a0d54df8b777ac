"""Differential testing of the optimizers: torch is the oracle for any sequence of operations.

A hypothesis state machine drives the same random program against a fastnorm optimizer and its
``torch.optim`` twin (float64, or bfloat16 in a third of the programs) and compares after every
rule: parameters, every state tensor and the param groups, or the same exception type. Rules:
steps with random gradients (some None),
``zero_grad``, any group option changed mid-run (momentum 0 <-> nonzero, centered, amsgrad, ...),
``add_param_group``, ``state_dict`` / ``load_state_dict`` both ways, ``copy.deepcopy``,
``torch.save`` / ``torch.load``, ``p.data`` replaced (same and other shape), the model moved to
another dtype (float32, float64, bfloat16), non-contiguous parameters, and LR schedulers
(OneCycleLR cycles momentum/betas).

bfloat16 parameters: torch rounds every operation to bfloat16 where fastnorm computes in float32
and rounds once, so the two drift apart step after step; each step is compared on its own
instead, and the twins then continue from fastnorm's values. fastnorm's step must round torch's
float32 step taken from the same values and state (every value one of the two bfloat16
neighbours of that result, tests/ulps.py; checked where every parameter and state buffer is
bfloat16). torch's own bfloat16 values are not compared after a step: no bound holds where its
roundings cancel (RMSprop's momentum adds terms ~10, whose bfloat16 ulp is 1/16).

Where fastnorm is stricter than torch by design it is said in the rule: a failed step leaves
fastnorm's parameters and state untouched (torch may have updated the groups before the one that
failed), so after both raised the twins are re-synchronised from torch. The error is torch's
first one: when a group fails fastnorm's checks, torch's step is tried on copies of the groups
before it that torch's own step serves (state of another dtype than its parameters, after
``model.to``), whose error then comes first.

Deterministic in CI (the "ci" profile in conftest.py: derandomized, fixed example counts);
``pytest --hypothesis-profile=long`` explores more.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
from conftest import OPTIM_BACKENDS, assert_close
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from ulps import assert_a_neighbour

import fastnorm
import fastnorm_kernels.numba_cpu.optim as numba_optim
from fastnorm import _ops

#: parameter shapes, (shape, layout): odd sizes, a scalar-like tensor; contiguous, transposed (the
#: numba op is handed contiguous copies) or channels-last (updated in place: its gradient and
#: state take its layout)
SHAPES = [((7,), "contiguous"), ((3, 5), "contiguous"), ((1,), "contiguous"), ((4, 6), "transposed"),
          ((257, 3), "contiguous"), ((5, 3, 2, 3), "channels_last")]  # fmt: skip

# per optimizer: options to construct with, and options a rule may change mid-run (key -> values)
OPTIONS = {
    "SGD": (
        st.fixed_dictionaries(
            {"lr": st.sampled_from([0.01, 0.1])},
            optional={
                "momentum": st.sampled_from([0.0, 0.9]),
                "weight_decay": st.sampled_from([0.0, 0.1]),
                "maximize": st.booleans(),
            },
        ),  # fmt: skip
        {
            "lr": [0.05, 0.2],
            "momentum": [0.0, 0.5, 0.9],
            "dampening": [0.0, 0.3],
            "nesterov": [False, True],
            "weight_decay": [0.0, 0.05],
            "maximize": [False, True],
        },  # fmt: skip
    ),
    "Adagrad": (
        st.fixed_dictionaries(
            {"lr": st.sampled_from([0.01, 0.1])},
            optional={
                "lr_decay": st.sampled_from([0.0, 0.1]),
                "initial_accumulator_value": st.sampled_from([0.0, 0.5]),
                "weight_decay": st.sampled_from([0.0, 0.1]),
            },
        ),  # fmt: skip
        {
            "lr": [0.05],
            "lr_decay": [0.0, 0.05],
            "eps": [1e-10, 1e-3],
            "weight_decay": [0.0, 0.05],
            "maximize": [False, True],
        },
    ),
    "RMSprop": (
        st.fixed_dictionaries(
            {"lr": st.sampled_from([0.01])},
            optional={
                "momentum": st.sampled_from([0.0, 0.9]),
                "centered": st.booleans(),
                "alpha": st.sampled_from([0.99, 0.3]),
            },
        ),  # fmt: skip
        {
            "lr": [0.02],
            "alpha": [0.9, 0.3],
            "eps": [1e-8, 1e-3],
            "momentum": [0.0, 0.5],
            "centered": [False, True],
            "weight_decay": [0.0, 0.05],
            "maximize": [False, True],
        },  # fmt: skip
    ),
    "Adam": (
        st.fixed_dictionaries(
            {"lr": st.sampled_from([0.01])},
            optional={
                "amsgrad": st.booleans(),
                "weight_decay": st.sampled_from([0.0, 0.1]),
                "betas": st.sampled_from([(0.9, 0.999), (0.3, 0.9)]),
            },
        ),  # fmt: skip
        {
            "lr": [0.02],
            "betas": [(0.8, 0.99), (0.3, 0.9)],
            "eps": [1e-8, 1e-3],
            "weight_decay": [0.0, 0.05],
            "amsgrad": [False, True],
            "maximize": [False, True],
            "decoupled_weight_decay": [False, True],
        },  # fmt: skip
    ),
    "AdamW": (
        st.fixed_dictionaries({"lr": st.sampled_from([0.01])}, optional={"amsgrad": st.booleans()}),
        {
            "lr": [0.02],
            "betas": [(0.8, 0.99)],
            "weight_decay": [0.0, 0.01, 0.1],
            "amsgrad": [False, True],
            "maximize": [False, True],
        },  # fmt: skip
    ),
}
OPTIMIZERS = list(OPTIONS)
DTYPE = torch.float64


class _Model(torch.nn.Module):
    """A bag of parameters, so that ``model.to(dtype)`` moves them as users' models do."""

    def __init__(self, params) -> None:
        super().__init__()
        self.params = torch.nn.ParameterList(params)


def _parameter(shape, layout, generator, dtype=DTYPE):
    transposed = layout == "transposed"
    data = torch.randn(shape[::-1] if transposed else shape, dtype=DTYPE, generator=generator).to(dtype)
    if layout == "channels_last":
        data = data.contiguous(memory_format=torch.channels_last)
    return torch.nn.Parameter(data.t() if transposed else data)  # transposed: non-contiguous


def _same_layout(t: torch.Tensor) -> torch.Tensor:
    """A copy of ``t`` with its very strides."""
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype).copy_(t)


def _tolerance(dtype: torch.dtype, was_float32: bool = False, key: str = "") -> tuple[float, float]:
    """(rtol, atol) of a twin's values: a few float64 roundings; in float32 (after ``model.to``)
    the reference backend rounds once from float64 where torch rounds every operation, and the
    cuda kernels fuse multiply-adds: a few float32 ulps, which stay when the model goes back to
    float64 (``was_float32``). A momentum buffer's atol is wider: RMSprop's adds terms
    g / sqrt(square_avg) ~ 10, which momentum cancels to tenths (seen 1e-6 apart)."""
    if dtype == torch.float64 and not was_float32:
        return (1e-9, 1e-12)
    return (2e-6, 1e-5 if key == "momentum_buffer" else 1e-7)


def _outcome(fn):
    try:
        fn()
        return None
    except Exception as exc:  # noqa: BLE001 - the exception type is the result compared
        return exc


def float32_twin(name: str, options: dict, ours):
    """torch's optimizer ``name`` in float32 on widened copies of the parameters and state of
    fastnorm's ``ours`` (16-bit values widen exactly), group by group, with ``ours``' group options
    (torch's own: the optimizers are drop-ins), set after constructing with ``options`` as a change
    mid-run is (torch's constructor refuses some combinations). Returns (the optimizer, its
    parameters in the order of ``ours``')."""
    wide = {p: torch.nn.Parameter(p.detach().float()) for group in ours.param_groups for p in group["params"]}
    groups = [{"params": [wide[p] for p in group["params"]]} for group in ours.param_groups]
    twin = getattr(torch.optim, name)(groups, **options)
    for mine, group in zip(ours.param_groups, twin.param_groups):
        group.update({k: v for k, v in mine.items() if k != "params"})
    for p, q in wide.items():
        if ours.state.get(p):
            twin.state[q] = {k: v.detach().float().clone() for k, v in ours.state[p].items()}
    return twin, list(wide.values())


#: drawn when a machine is built, from the class's ``backends`` read at every draw (a flatmap:
#: st.deferred would read it once per process, and tests/cudasim runs the machines with two lists)
_BACKEND = st.just(None).flatmap(lambda _: st.sampled_from(OptimizerTwins.backends))


class OptimizerTwins(RuleBasedStateMachine):
    """fastnorm's optimizer and torch's, driven in lockstep."""

    #: the backends drawn (tests/cudasim runs this machine with ["cuda"])
    backends = OPTIM_BACKENDS
    #: the dtype of the parameters add_param_group adds
    new_dtype = DTYPE

    def __init__(self) -> None:
        super().__init__()
        self.generator = torch.Generator().manual_seed(0)
        self.schedulers = None
        self.was_float32 = False  # float32 roundings stay in the values after a trip to float32
        # chunks of 64 values: the 257x3 parameter spans several, with an uneven tail
        self.saved_chunk, numba_optim.CHUNK = numba_optim.CHUNK, 64
        _ops.sync_tunables()

    def teardown(self) -> None:
        numba_optim.CHUNK = self.saved_chunk
        _ops.sync_tunables()

    @initialize(name=st.sampled_from(OPTIMIZERS), data=st.data(), backend=_BACKEND,
                shapes=st.lists(st.sampled_from(SHAPES), min_size=1, max_size=4),
                dtype=st.sampled_from([DTYPE, DTYPE, torch.bfloat16]))  # fmt: skip
    def build(self, name, data, backend, shapes, dtype):
        self.name, self.backend = name, backend
        options = self.options = data.draw(OPTIONS[name][0], label="options")
        params = [_parameter(s, t, self.generator, dtype) for s, t in shapes]
        self.theirs = getattr(torch.optim, name)(self._model(params, "theirs"), **options)
        mine = [torch.nn.Parameter(p.detach().clone()) for p in params]
        for p, q in zip(params, mine):  # the same layout (non-contiguous where torch's is)
            q.data = torch.empty_strided(p.shape, p.stride(), dtype=p.dtype).copy_(p)
        self.ours = getattr(fastnorm.optim, name)(self._model(mine, "ours"), backend=backend, **options)

    def _model(self, params, which):
        setattr(self, f"model_{which}", _Model(params))
        return params

    def _params(self, opt):
        return [p for g in opt.param_groups for p in g["params"]]

    def _both(self, fn, resync=True):
        """Apply ``fn(opt, model)`` to both twins: the same outcome or the same exception type."""
        theirs = _outcome(lambda: fn(self.theirs, self.model_theirs))
        ours = _outcome(lambda: fn(self.ours, self.model_ours))
        assert type(ours) is type(theirs), f"torch: {theirs!r}, fastnorm: {ours!r}"
        if theirs is not None and resync:
            self._resync()
        return theirs

    def _resync(self):
        """After both raised: fastnorm left everything as it was, torch may have updated some
        groups; continue from torch's values."""
        with torch.no_grad():
            for p, q in zip(self._params(self.theirs), self._params(self.ours)):
                q.data = _same_layout(p.data)
        # both twins load torch's state: loading casts it to the parameters' dtype, for both alike
        state = self.theirs.state_dict()
        self.theirs.load_state_dict(copy.deepcopy(state))
        self.ours.load_state_dict(copy.deepcopy(state))

    # -- rules ------------------------------------------------------------------------------------

    @rule(mask=st.lists(st.booleans(), min_size=8, max_size=8))
    def step(self, mask):
        grads = [torch.randn(p.shape, dtype=p.dtype, generator=self.generator) if m else None
                 for p, m in zip(self._params(self.theirs), mask)]  # fmt: skip

        def step(opt, _):
            for p, g in zip(self._params(opt), grads):
                p.grad = None if g is None else g.clone()
            opt.step()

        half = any(p.dtype == torch.bfloat16 for p in self._params(self.ours))
        oracle = self._float32_step(grads) if half else None
        if self._both(step) is None and half:  # one step of bfloat16 parameters, compared on its own
            if oracle is not None:
                for p, g, (q, state) in zip(self._params(self.ours), grads, oracle):
                    assert_a_neighbour(p, q, "parameter")  # (unchanged where g is None)
                    if g is None:
                        continue
                    mine = self.ours.state.get(p, {})  # (not state[p]: a defaultdict would add an entry)
                    assert sorted(mine) == sorted(state), "state keys"
                    for key, value in state.items():
                        if key == "step":
                            assert float(mine[key]) == float(value)
                        else:
                            assert_a_neighbour(mine[key], value, f"state {key}")
            # torch's bfloat16 values: no bound holds where its roundings cancel (RMSprop's momentum
            # adds terms ~10 whose bfloat16 ulp is 1/16): structure, dtypes and the rest only
            self._compare(half_tolerance=None)
            self._continue_from_ours()

    def _float32_step(self, grads):
        """[(parameter, state)] after torch's step in float32 from fastnorm's bfloat16 parameters
        and state (widened: exact) with the same gradients; None unless every parameter and state
        buffer is bfloat16, or where torch's step raises."""
        params = self._params(self.ours)
        states = [self.ours.state.get(p, {}) for p in params]
        buffers = [v for state in states for k, v in state.items() if k != "step"]
        if any(t.dtype != torch.bfloat16 for t in params + buffers):
            return None
        opt, wide = float32_twin(self.name, self.options, self.ours)
        for q, g in zip(wide, grads):
            q.grad = None if g is None else g.float()
        if _outcome(opt.step) is not None:
            return None
        return [(q, opt.state.get(q, {})) for q in wide]

    def _continue_from_ours(self):
        """torch's twin takes fastnorm's values and state (fastnorm's keep their storage: its
        plans are reused at the next step)."""
        with torch.no_grad():
            for p, q in zip(self._params(self.theirs), self._params(self.ours)):
                p.data = _same_layout(q.data)
        state = self.ours.state_dict()
        self.theirs.load_state_dict(copy.deepcopy(state))  # casts the state to its parameters' dtypes
        if any(isinstance(v, torch.Tensor) and k != "step" and v.dtype != p.dtype
               for p in self._params(self.ours) for k, v in self.ours.state.get(p, {}).items()):  # fmt: skip
            self.ours.load_state_dict(copy.deepcopy(state))  # state left in another dtype by model.to: alike

    @rule(set_to_none=st.booleans())
    def zero_grad(self, set_to_none):
        self._both(lambda opt, _: opt.zero_grad(set_to_none=set_to_none))

    @rule(data=st.data())
    def change_option(self, data):
        choices = OPTIONS[self.name][1]
        key = data.draw(st.sampled_from(sorted(choices)), label="option")
        value = data.draw(st.sampled_from(choices[key]), label="value")
        index = data.draw(st.integers(0, len(self.theirs.param_groups) - 1), label="group")

        def change(opt, _):
            opt.param_groups[index][key] = value

        self._both(change)

    @precondition(lambda self: len(self.theirs.param_groups) < 3)
    @rule(shape=st.sampled_from(SHAPES), lr=st.sampled_from([0.003, 0.03]))
    def add_param_group(self, shape, lr):
        p = _parameter(*shape, self.generator, self.new_dtype)

        def add(opt, model):
            q = torch.nn.Parameter(p.detach().clone())
            q.data = torch.empty_strided(p.shape, p.stride(), dtype=p.dtype).copy_(p)
            opt.add_param_group({"params": [q], "lr": lr})
            model.params.append(q)

        self._both(add)

    @rule(source=st.sampled_from(["torch", "fastnorm"]))
    def load_checkpoint(self, source):
        """Both twins load the same checkpoint, torch's or fastnorm's (loading casts state to the
        parameters' dtype: both twins load, so that both are cast alike)."""
        checkpoint = (self.theirs if source == "torch" else self.ours).state_dict()
        self._both(lambda opt, _: opt.load_state_dict(copy.deepcopy(checkpoint)))

    @rule(how=st.sampled_from(["deepcopy", "torch.save"]))
    def copy_optimizers(self, how):
        """Continue with copies (deepcopy, or a trip through torch.save / torch.load): the copies
        hold copies of the parameters, which become the models'."""

        def duplicate(opt):
            if how == "deepcopy":
                return copy.deepcopy(opt)
            buffer = io.BytesIO()
            torch.save(opt, buffer)
            buffer.seek(0)
            return torch.load(buffer, weights_only=False)

        self.theirs, self.ours = duplicate(self.theirs), duplicate(self.ours)
        assert type(self.ours) is getattr(fastnorm.optim, self.name) and self.ours.backend == self.backend
        self._model(self._params(self.theirs), "theirs")
        self._model(self._params(self.ours), "ours")
        self.schedulers = None

    @rule(index=st.integers(0, 7), other_shape=st.booleans())
    def replace_data(self, index, other_shape):
        params = self._params(self.theirs)
        p = params[index % len(params)]
        shape = (p.numel() + 1,) if other_shape else p.shape
        new = torch.randn(shape, dtype=p.dtype, generator=self.generator)

        def replace(opt, _):
            q = self._params(opt)[index % len(params)]
            q.data = new.clone()
            if q.grad is not None and other_shape:
                q.grad = None  # torch refuses a gradient of another shape

        self._both(replace)

    @rule(dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]))
    def model_to(self, dtype):
        self._both(lambda _, model: model.to(dtype))
        self.was_float32 = self.was_float32 or dtype == torch.float32

    @rule(kind=st.sampled_from(["OneCycleLR", "StepLR"]))
    def attach_scheduler(self, kind):
        def make(opt):
            if kind == "StepLR":
                return torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
            return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=1000)

        made = {}

        def attach(opt, _):
            made[opt is self.ours] = make(opt)

        if self._both(attach, resync=False) is None:
            self.schedulers = (made[False], made[True])

    @precondition(lambda self: self.schedulers is not None)
    @rule()
    def scheduler_step(self):
        """Both schedulers step: the same outcome (OneCycleLR raises KeyError for a group added
        after it was made, on both twins)."""
        theirs, ours = (_outcome(scheduler.step) for scheduler in self.schedulers)
        assert type(ours) is type(theirs), f"torch: {theirs!r}, fastnorm: {ours!r}"

    # -- the comparison after every rule ------------------------------------------------------------

    @invariant()
    def same_values(self):
        if hasattr(self, "theirs"):
            self._compare()

    def _compare(self, half_tolerance=(0.0, 0.0)):
        """Parameters, state and groups of the twins; bfloat16 values within ``half_tolerance``
        (exact between steps: the twins continue from the same values after each step; None:
        bfloat16 values not compared)."""
        ours, theirs = self._params(self.ours), self._params(self.theirs)
        assert len(ours) == len(theirs)

        def tolerance(dtype, key=""):
            return half_tolerance if dtype == torch.bfloat16 else _tolerance(dtype, self.was_float32, key)

        def close(a, b, dtype, what, key=""):
            if dtype != torch.bfloat16 or half_tolerance is not None:
                assert_close(a, b, *tolerance(dtype, key), what)

        for p, q in zip(theirs, ours):
            assert q.dtype == p.dtype and q.shape == p.shape
            close(q, p, p.dtype, "parameter")
        a, b = self.theirs.state_dict(), self.ours.state_dict()
        assert a["param_groups"] == b["param_groups"]
        assert sorted(a["state"]) == sorted(b["state"]), "state entries exist where torch's do"
        for index, state in a["state"].items():
            assert sorted(state) == sorted(b["state"][index]), f"state keys of parameter {index}"
            for key, value in state.items():
                mine = b["state"][index][key]
                assert isinstance(mine, torch.Tensor) == isinstance(value, torch.Tensor)
                if isinstance(value, torch.Tensor):
                    assert mine.dtype == value.dtype, f"{key} dtype"
                    assert mine.device == value.device, f"{key} device"
                    close(mine, value, value.dtype, f"state {key}", key)


class BFloat16OptimizerTwins(OptimizerTwins):
    """The same machine, every program built in bfloat16, groups added in bfloat16 too (the main
    one draws bfloat16 in a third of its programs, too rarely for CI's few examples to step it)."""

    new_dtype = torch.bfloat16

    @initialize(name=st.sampled_from(OPTIMIZERS), data=st.data(), backend=_BACKEND,
                shapes=st.lists(st.sampled_from(SHAPES), min_size=1, max_size=4))  # fmt: skip
    def build(self, name, data, backend, shapes):
        super().build.__wrapped__(self, name, data, backend, shapes, torch.bfloat16)


TestOptimizerTwins = pytest.mark.fuzz(OptimizerTwins.TestCase)
# each example builds two optimizers and steps them up to 20 times: 15 examples keep this under a minute
TestOptimizerTwins.settings = settings(max_examples=15, stateful_step_count=20)
TestBFloat16OptimizerTwins = pytest.mark.fuzz(BFloat16OptimizerTwins.TestCase)
TestBFloat16OptimizerTwins.settings = settings(max_examples=10, stateful_step_count=15)
