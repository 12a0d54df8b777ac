"""Differential testing of LayerNorm, RMSNorm and GroupNorm: torch is the oracle for any sequence of
operations.

A hypothesis state machine drives a fastnorm LayerNorm, RMSNorm or GroupNorm and its ``torch.nn`` twin
(float64) through the same random program and compares after every rule: outputs, input and
parameter gradients, or the same exception type. Rules: forward+backward on random batches
(several leading shapes, contiguous, strided or (GroupNorm) channels-last; in-place edits of the
weight or the input between forward and backward, which torch's backward refuses; double backward),
forwards without autograd, eps changed, parameters edited in place or replaced (``p.data = ...``),
``state_dict`` loaded both ways, ``copy.deepcopy`` of both modules, and invalid inputs (a wrong
trailing size or channel count, an integer dtype). Modules are built with and without their
affine parameters.

The numba kernels' row chunks are shrunk while the machine runs, so that the small tensors here
split into several chunks as the benchmark sizes do.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

import fastnorm
import fastnorm_kernels.numba_cpu.batchnorm as numba_bn
from fastnorm import _ops

TOL = dict(rtol=1e-9, atol=1e-10)
LEADING = [(2,), (7,), (3, 5), (1,), (4, 1, 3)]
SHAPES = [(5,), (3, 4)]
#: GroupNorm: (channels, *spatial) per sample, and its groups
GROUP_SHAPES = [((6, 4), 3), ((6, 2, 3), 2), ((4, 3, 2, 2), 4)]
SMALL_THRESHOLDS = [(numba_bn, "CHUNK_ELEMENTS", 8), (numba_bn, "MAX_CHUNKS", 3)]


def _outcome(fn):
    try:
        return fn(), None
    except Exception as exc:  # noqa: BLE001 - the exception type is the result compared
        return None, exc


#: drawn when a machine is built, from the class's ``backends`` read at every draw (a flatmap:
#: st.deferred would read it once per process, and tests/cudasim runs the machines with two lists)
_BACKEND = st.just(None).flatmap(lambda _: st.sampled_from(RowNormTwins.backends))


class RowNormTwins(RuleBasedStateMachine):
    backends = ["reference", "numba"]

    def __init__(self) -> None:
        super().__init__()
        self.ours = self.theirs = None

    @initialize(op=st.sampled_from(["LayerNorm", "RMSNorm", "GroupNorm"]),
                backend=_BACKEND, shape=st.sampled_from(SHAPES),
                group_shape=st.sampled_from(GROUP_SHAPES), affine=st.booleans(), bias=st.booleans(),
                eps=st.sampled_from([1e-5, 1e-3, None]))  # fmt: skip
    def build(self, op, backend, shape, group_shape, affine, bias, eps):
        self.op = op
        options = dict(elementwise_affine=affine, dtype=torch.float64)
        if op == "GroupNorm":
            shape, groups = group_shape
            options = dict(affine=affine, dtype=torch.float64, eps=1e-5 if eps is None else eps, bias=bias)
            self.theirs = torch.nn.GroupNorm(groups, shape[0], **options)
            self.ours = fastnorm.nn.GroupNorm(groups, shape[0], backend=backend, **options)
        elif op == "LayerNorm":
            options.update(bias=bias, eps=1e-5 if eps is None else eps)
        else:
            options.update(eps=eps)
        if op != "GroupNorm":
            self.theirs = getattr(torch.nn, op)(shape, **options)
            self.ours = getattr(fastnorm.nn, op)(shape, backend=backend, **options)
        with torch.no_grad():
            for p, q in zip(self.theirs.parameters(), self.ours.parameters()):
                p.normal_()
                q.copy_(p)
        self.shape = shape

    def _batch(self, leading, strided, seed):
        g = torch.Generator().manual_seed(seed)
        if self.op == "GroupNorm":
            leading = (math.prod(leading),)  # (N, C, *spatial)
        full = (*leading, *self.shape)
        if strided and self.op == "GroupNorm" and len(full) in (4, 5) and seed % 2:  # channels-last
            fmt = torch.channels_last if len(full) == 4 else torch.channels_last_3d
            return (torch.randn(full, generator=g, dtype=torch.float64) * 3 + 1).to(memory_format=fmt)
        if strided:  # the same values, laid out transposed in memory
            return torch.randn(tuple(reversed(full)), generator=g, dtype=torch.float64).permute(
                *reversed(range(len(full))))  # fmt: skip
        return torch.randn(full, generator=g, dtype=torch.float64) * 3 + 1

    def _compare(self, ours, theirs, what):
        (a, ea), (b, eb) = ours, theirs
        assert (ea is None) == (eb is None), f"{what}: ours {ea!r}, torch {eb!r}"
        if eb is not None:
            assert isinstance(ea, type(eb)), f"{what}: ours {type(ea).__name__}, torch {type(eb).__name__}"
            return
        for x, y in zip(a, b):
            if x is None or y is None:
                assert x is None and y is None, what
            else:
                torch.testing.assert_close(x, y, **TOL, msg=what)

    @rule(leading=st.sampled_from(LEADING), strided=st.booleans(), edit=st.sampled_from(["none", "none", "weight",
          "input"]), double=st.booleans(), seed=st.integers(0, 99),
          wrt=st.sampled_from(["all", "all", "input", "parameters"]))  # fmt: skip
    def forward_backward(self, leading, strided, edit, double, seed, wrt):
        """``wrt``: the gradients wanted (the others' tensors do not require grad, so the kernels
        compute only these: dx alone, the parameters' alone, or all)."""
        x = self._batch(leading, strided, seed)
        if wrt == "parameters" and not list(self.theirs.parameters()):
            wrt = "all"
        double = double and wrt != "parameters"
        results = []
        for module in (self.ours, self.theirs):

            def run(module=module):
                params = list(module.parameters())
                xi = x.detach().clone().requires_grad_(wrt != "parameters")
                try:
                    for p in params:
                        p.requires_grad_(wrt != "input")
                    y = module(xi)
                    if edit == "weight" and module.weight is not None:
                        with torch.no_grad():
                            module.weight.mul_(1.0)  # a version bump: the backward must refuse
                    if edit == "input":
                        with torch.no_grad():
                            xi.add_(0.0)
                    leaves = {"all": [xi, *params], "input": [xi], "parameters": params}[wrt]
                    grads = torch.autograd.grad((y * y).sum(), leaves, create_graph=double)
                    out = [y.detach(), *(g.detach() for g in grads)]
                    if double:
                        out.append(torch.autograd.grad(sum(g.square().sum() for g in grads), xi)[0])
                    return out
                finally:
                    for p in params:
                        p.requires_grad_(True)

            results.append(_outcome(run))
        self._compare(*results, f"forward_backward(edit={edit}, double={double}, wrt={wrt})")

    @rule(leading=st.sampled_from(LEADING), inference=st.booleans(), seed=st.integers(0, 99))
    def forward_without_autograd(self, leading, inference, seed):
        x = self._batch(leading, False, seed)
        context = torch.inference_mode if inference else torch.no_grad
        results = []
        for module in (self.ours, self.theirs):
            with context():
                results.append(_outcome(lambda module=module: [module(x)]))
        self._compare(*results, "forward without autograd")

    @rule(eps=st.sampled_from([1e-6, 1e-2, 0.0]))
    def change_eps(self, eps):
        self.ours.eps = self.theirs.eps = eps

    @rule(scale=st.floats(0.5, 2.0), replace=st.booleans())
    def update_parameters(self, scale, replace):
        for p, q in zip(self.ours.parameters(), self.theirs.parameters()):
            new = q.detach() * scale + 0.1
            if replace:
                p.data, q.data = new.clone(), new.clone()
            else:
                with torch.no_grad():
                    p.copy_(new)
                    q.copy_(new)

    @rule(direction=st.sampled_from(["torch->ours", "ours->torch"]))
    def load_state_dict(self, direction):
        if direction == "torch->ours":
            self.ours.load_state_dict(self.theirs.state_dict())
        else:
            self.theirs.load_state_dict(self.ours.state_dict())

    @rule()
    def deepcopy(self):
        self.ours, self.theirs = copy.deepcopy(self.ours), copy.deepcopy(self.theirs)
        assert isinstance(self.ours, fastnorm.nn.LayerNorm | fastnorm.nn.RMSNorm | fastnorm.nn.GroupNorm)

    @rule(kind=st.sampled_from(["trailing", "integer"]))
    def invalid_input(self, kind):
        x = torch.randn(3, *self.shape[:-1], self.shape[-1] + 1, dtype=torch.float64)
        if self.op == "GroupNorm":  # a channel count the groups do not divide, or not the module's
            x = torch.randn(3, self.shape[0] + 1, *self.shape[1:], dtype=torch.float64)
        if kind == "integer":
            x = torch.ones(3, *self.shape, dtype=torch.int64)
        results = [_outcome(lambda m=m: [m(x)]) for m in (self.ours, self.theirs)]
        self._compare(*results, f"invalid input ({kind})")

    @invariant()
    def same_state(self):
        if self.ours is None:
            return
        for (name, a), b in zip(self.ours.state_dict().items(), self.theirs.state_dict().values()):
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


@pytest.fixture
def small_thresholds(monkeypatch):
    for module, name, value in SMALL_THRESHOLDS:
        monkeypatch.setattr(module, name, value)
    _ops.sync_tunables()
    yield
    monkeypatch.undo()
    _ops.sync_tunables()


def test_layer_norm_and_rms_norm_twins(small_thresholds):
    RowNormTwins.TestCase.settings = settings(max_examples=settings().max_examples, stateful_step_count=20)
    RowNormTwins.TestCase("runTest").runTest()
