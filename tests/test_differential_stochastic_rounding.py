"""Differential testing of ``stochastic_rounding=True``: torch in float32 is the oracle of each step.

A bfloat16 model updated with stochastic rounding leaves the float32 trajectory by design (each
value is rounded up or down at random), so the oracle is one step at a time: before every step,
torch's optimizer in float32 is given fastnorm's current parameters and state (widened, exactly),
and takes the same step with the same gradients. Each bfloat16 value fastnorm then holds
(parameters and every state buffer) must be one of the two bfloat16 neighbours of torch's float32
result: within one bfloat16 ulp of it, with a few float32 ulps for the two libraries' orders of
operations (tests/ulps.py). A hypothesis state machine drives the programs: steps with random
gradients (some None), ``zero_grad``, group options changed mid-run (the same exception type
where torch refuses, e.g. amsgrad switched on), a checkpoint round trip, writes to the
parameters from outside (``p.copy_``, ``p.data = ...``), and a fork: a ``deepcopy`` stepped with
the same gradients must round every value as the original does (the rounding stream is the
optimizer's state: its launch count travels with deepcopy and pickle).

Deterministic in CI (the "ci" profile in conftest.py); ``--hypothesis-profile=long`` explores more.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import OPTIM_BACKENDS
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from test_differential_optim import OPTIONS, _outcome, float32_twin
from ulps import assert_a_neighbour

import fastnorm

# parameter shapes: odd sizes, a single value, one spanning several of the kernels' chunks
SHAPES = [(7,), (3, 5), (1,), (129, 3)]


def _running(machine) -> bool:
    return not machine.stopped


#: drawn when a machine is built, from the class's ``backends`` (tests/cudasim runs it with ["cuda"])
_BACKEND = st.just(None).flatmap(lambda _: st.sampled_from(StochasticRoundingTwins.backends))


class StochasticRoundingTwins(RuleBasedStateMachine):
    """fastnorm's optimizer on bfloat16 parameters with stochastic rounding; torch's float32 one
    rebuilt from fastnorm's state before every step."""

    backends = OPTIM_BACKENDS

    def __init__(self) -> None:
        super().__init__()
        self.generator = torch.Generator().manual_seed(0)
        self.stopped = False  # both raised the same exception: the program ends there

    @initialize(name=st.sampled_from(sorted(OPTIONS)), data=st.data(), backend=_BACKEND,
                shapes=st.lists(st.sampled_from(SHAPES), min_size=1, max_size=3))  # fmt: skip
    def build(self, name, data, backend, shapes):
        self.name, self.backend = name, backend
        self.options = data.draw(OPTIONS[name][0], label="options")
        self.params = [torch.nn.Parameter(self._values(s)) for s in shapes]
        self.ours = getattr(fastnorm.optim, name)(self.params, backend=backend, stochastic_rounding=True,
                                                  **self.options)  # fmt: skip

    def _values(self, shape) -> torch.Tensor:
        return torch.randn(shape, generator=self.generator).to(torch.bfloat16)

    def _gradients(self, mask) -> list[torch.Tensor | None]:
        """bfloat16 gradients of magnitude at least 1 (weight decay never cancels one to a few
        float32 ulps, whose sign would decide a whole normalised step: see the master-weights
        machine), or None."""
        grads = []
        for p, m in zip(self.params, mask):
            g = torch.randn(p.shape, generator=self.generator)
            grads.append((g.sign() * (1 + g.abs())).to(torch.bfloat16) if m else None)
        return grads

    # -- rules ------------------------------------------------------------------------------------

    @precondition(_running)
    @rule(mask=st.lists(st.booleans(), min_size=3, max_size=3))
    def step(self, mask):
        grads = self._gradients(mask)
        theirs, shadow = float32_twin(self.name, self.options, self.ours)
        for p, s, g in zip(self.params, shadow, grads):
            p.grad = g
            s.grad = None if g is None else g.float()  # the kernels widen the bfloat16 gradient exactly
        ours_error, their_error = _outcome(self.ours.step), _outcome(theirs.step)
        assert type(ours_error) is type(their_error), f"torch: {their_error!r}, fastnorm: {ours_error!r}"
        if their_error is not None:  # e.g. torch's KeyError for amsgrad or centered switched on mid-run
            self.stopped = True
            return
        for i, (p, s) in enumerate(zip(self.params, shadow)):
            assert_a_neighbour(p, s, f"parameter {i}")
            ours_state, their_state = self.ours.state.get(p, {}), theirs.state.get(s, {})
            assert sorted(ours_state) == sorted(their_state), f"parameter {i}: state keys"
            for key, value in their_state.items():
                if key == "step":
                    assert float(ours_state[key]) == float(value), "step"
                else:
                    assert_a_neighbour(ours_state[key], value, f"parameter {i}: {key}")

    @rule(set_to_none=st.booleans())  # always allowed: a stopped program still has a rule
    def zero_grad(self, set_to_none):
        self.ours.zero_grad(set_to_none=set_to_none)

    @precondition(_running)
    @rule(data=st.data())
    def change_option(self, data):
        choices = OPTIONS[self.name][1]
        key = data.draw(st.sampled_from(sorted(choices)), label="option")
        self.ours.param_groups[0][key] = data.draw(st.sampled_from(choices[key]), label="value")

    @precondition(_running)
    @rule()
    def checkpoint_round_trip(self):
        """A new optimizer resumes from the old one's checkpoint (state, group options, and the
        launch count seeding the rounding stream: it rounds as the old one would have)."""
        state = copy.deepcopy(self.ours.state_dict())
        calls = self.ours._rounding_calls
        self.ours = getattr(fastnorm.optim, self.name)(self.params, backend=self.backend, stochastic_rounding=True,
                                                       **self.options)  # fmt: skip
        self.ours.load_state_dict(state)
        assert self.ours._rounding_calls == calls, "the rounding stream restarted"

    @precondition(_running)
    @rule(index=st.integers(0, 2), how=st.sampled_from(["copy_", "data"]))
    def write_parameter(self, index, how):
        """The parameter changes outside the optimizer: the next step starts from the new value."""
        p = self.params[index % len(self.params)]
        new = self._values(p.shape)
        if how == "copy_":
            with torch.no_grad():
                p.copy_(new)
        else:
            p.data = new

    @precondition(_running)
    @rule(mask=st.lists(st.booleans(), min_size=3, max_size=3))
    def fork(self, mask):
        """A deep copy of the optimizer (and so of its parameters), stepped with the same
        gradients, rounds every value as the original does: same parameters, same state."""
        twin = copy.deepcopy(self.ours)
        twin_params = list(twin.param_groups[0]["params"])
        for p, q, g in zip(self.params, twin_params, self._gradients(mask)):
            p.grad = g
            q.grad = None if g is None else g.clone()
        ours_error, twin_error = _outcome(self.ours.step), _outcome(twin.step)
        assert type(ours_error) is type(twin_error), f"original: {ours_error!r}, copy: {twin_error!r}"
        if ours_error is not None:
            self.stopped = True
            return
        for p, q in zip(self.params, twin_params):
            assert torch.equal(p, q), "the copy rounded a parameter differently"
            for key, value in self.ours.state.get(p, {}).items():
                assert torch.equal(value, twin.state[q][key]), f"the copy rounded {key} differently"

    # -- what holds after every rule ----------------------------------------------------------------

    @invariant()
    def bfloat16_everywhere(self):
        if not hasattr(self, "ours"):
            return
        for p in self.params:
            assert p.dtype == torch.bfloat16
            for key, value in self.ours.state.get(p, {}).items():
                assert value.dtype == (torch.float32 if key == "step" else torch.bfloat16), key


TestStochasticRoundingTwins = pytest.mark.fuzz(StochasticRoundingTwins.TestCase)
TestStochasticRoundingTwins.settings = settings(max_examples=12, stateful_step_count=15)
