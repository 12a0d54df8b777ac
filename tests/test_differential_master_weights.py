"""Differential testing of ``master_weights=True``: torch in float32 is the oracle.

A 16-bit model trained with float32 master weights must follow a float32 model trained by
``torch.optim`` on the same gradients: the masters equal torch's float32 parameters, the state
buffers (float32) torch's, and every 16-bit parameter is its master rounded once. A hypothesis
state machine drives both through random programs: steps with random gradients (some None),
``zero_grad``, group options changed mid-run, fastnorm's own checkpoint round trip, ``deepcopy``,
and writes to the parameters from outside the optimizer (``p.copy_`` as ``load_state_dict`` does,
``p.data = ...``): torch's optimizers use whatever the parameters hold, so the master must restart
from the written values instead of overwriting them at the next step.

Deterministic in CI (the "ci" profile in conftest.py); ``--hypothesis-profile=long`` explores more.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import OPTIM_BACKENDS, assert_close
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from test_differential_optim import OPTIONS, _outcome

import fastnorm

# parameter shapes: odd sizes, a single value, one spanning several of the kernels' chunks
SHAPES = [(7,), (3, 5), (1,), (129, 3)]
HALF = [torch.bfloat16, torch.float16]
#: float32 (rtol, atol): tests/conftest.py's TOLERANCES[torch.float32], spelled out because the
#: simulator suite (tests/cudasim) runs this machine under its own conftest
F32 = (1e-4, 2e-5)


def _running(machine) -> bool:
    return not machine.stopped


#: drawn when a machine is built, from the class's ``backends`` (tests/cudasim runs it with ["cuda"])
_BACKEND = st.just(None).flatmap(lambda _: st.sampled_from(MasterWeightsTwins.backends))


class MasterWeightsTwins(RuleBasedStateMachine):
    """fastnorm's optimizer on 16-bit parameters with float32 masters, and torch's on float32."""

    backends = OPTIM_BACKENDS

    def __init__(self) -> None:
        super().__init__()
        self.generator = torch.Generator().manual_seed(0)
        self.stopped = False  # both raised the same exception: the program ends there

    @initialize(name=st.sampled_from(sorted(OPTIONS)), dtype=st.sampled_from(HALF), data=st.data(),
                backend=_BACKEND,
                shapes=st.lists(st.sampled_from(SHAPES), min_size=1, max_size=3))  # fmt: skip
    def build(self, name, dtype, data, backend, shapes):
        self.name, self.dtype = name, dtype
        options = self.options = data.draw(OPTIONS[name][0], label="options")
        values = [self._values(s) for s in shapes]
        self.params = [torch.nn.Parameter(v.clone()) for v in values]
        self.shadow = [torch.nn.Parameter(v.float()) for v in values]
        self.ours = getattr(fastnorm.optim, name)(self.params, backend=backend, master_weights=True, **options)
        self.theirs = getattr(torch.optim, name)(self.shadow, **options)

    def _values(self, shape) -> torch.Tensor:
        """16-bit values whose float32 widening is exact (what both twins start from)."""
        return torch.randn(shape, generator=self.generator).to(self.dtype)

    def _gradient(self, shape) -> torch.Tensor:
        """16-bit gradients of magnitude at least 1, so that weight decay (<= 0.1 of parameters
        that stay well below 10) never cancels one to a few float32 ulps: Adagrad, RMSprop and
        Adam turn such a remainder into a full normalised step whose sign depends on the order of
        float32 roundings (seen here: Adagrad, a bfloat16 gradient exactly 0.1 of its parameter)."""
        g = torch.randn(shape, generator=self.generator)
        return (g.sign() * (1 + g.abs())).to(self.dtype)

    # -- rules ------------------------------------------------------------------------------------

    @precondition(_running)
    @rule(mask=st.lists(st.booleans(), min_size=3, max_size=3))
    def step(self, mask):
        for p, s, m in zip(self.params, self.shadow, mask):
            g = self._gradient(p.shape) if m else None
            p.grad = g
            s.grad = None if g is None else g.float()  # the kernels widen the 16-bit gradient exactly
        ours, theirs = _outcome(self.ours.step), _outcome(self.theirs.step)
        assert type(ours) is type(theirs), f"torch: {theirs!r}, fastnorm: {ours!r}"
        if theirs is not None:  # e.g. torch's KeyError for amsgrad or centered switched on mid-run
            self.stopped = True  # (torch may have changed part of its state before raising)

    @rule(set_to_none=st.booleans())  # always allowed: a stopped program still has a rule
    def zero_grad(self, set_to_none):
        self.ours.zero_grad(set_to_none=set_to_none)
        self.theirs.zero_grad(set_to_none=set_to_none)

    @precondition(_running)
    @rule(data=st.data())
    def change_option(self, data):
        choices = OPTIONS[self.name][1]
        key = data.draw(st.sampled_from(sorted(choices)), label="option")
        value = data.draw(st.sampled_from(choices[key]), label="value")
        self.ours.param_groups[0][key] = value
        self.theirs.param_groups[0][key] = value

    @precondition(_running)
    @rule()
    def checkpoint_round_trip(self):
        """A new fastnorm optimizer resumes from the old one's checkpoint (masters and the
        group's options included)."""
        state = copy.deepcopy(self.ours.state_dict())
        self.ours = getattr(fastnorm.optim, self.name)(self.params, backend=self.ours.backend,
                                                       master_weights=True, **self.options)  # fmt: skip
        self.ours.load_state_dict(state)

    @precondition(_running)
    @rule()
    def deepcopy(self):
        """Continue with deep copies of both optimizers (which hold copies of the parameters)."""
        self.ours, self.theirs = copy.deepcopy(self.ours), copy.deepcopy(self.theirs)
        self.params = list(self.ours.param_groups[0]["params"])
        self.shadow = list(self.theirs.param_groups[0]["params"])

    @precondition(_running)
    @rule(index=st.integers(0, 2), how=st.sampled_from(["copy_", "data"]))
    def write_parameter(self, index, how):
        """The parameter changes outside the optimizer (a weight load, a re-initialisation)."""
        p, s = self.params[index % len(self.params)], self.shadow[index % len(self.shadow)]
        new = self._values(p.shape)
        if how == "copy_":
            with torch.no_grad():
                p.copy_(new)
        else:
            p.data = new.clone()
        with torch.no_grad():
            s.copy_(new.float())

    # -- the comparison after every rule ----------------------------------------------------------

    @invariant()
    def same_values(self):
        if not hasattr(self, "ours") or self.stopped:
            return
        for p, s in zip(self.params, self.shadow):
            assert p.dtype == self.dtype
            state = self.ours.state.get(p)
            if not state or "master_param" not in state:  # not stepped yet: the parameter itself
                assert torch.equal(p.detach().float(), s.detach())
                continue
            master = state["master_param"]
            assert master.dtype == torch.float32
            # the parameter is its master rounded once, unless written since the last step (then it
            # is the written value, which the next step adopts)
            if not torch.equal(p.detach(), master.to(self.dtype)):
                assert torch.equal(p.detach().float(), s.detach()), "a written parameter keeps its value"
                continue
            assert_close(master, s.detach(), *F32, what="master_param")
            for key, value in self.theirs.state[s].items():
                if key == "step":
                    assert float(state[key]) == float(value)
                    continue
                assert state[key].dtype == torch.float32, f"{key} dtype"
                assert_close(state[key], value, *F32, what=key)


TestMasterWeightsTwins = pytest.mark.fuzz(MasterWeightsTwins.TestCase)
TestMasterWeightsTwins.settings = settings(max_examples=12, stateful_step_count=15)
