"""Differential testing of BatchNorm: torch is the oracle for any sequence of operations.

A hypothesis state machine drives a fastnorm BatchNorm module and its ``torch.nn`` twin (float64)
through the same random program and compares after every rule: outputs, input and parameter
gradients, running statistics and ``num_batches_tracked``, or the same exception type. Rules:
forward+backward on random batches (contiguous, channels-last or strided, several sizes; the output's
gradient in the input's layout, the other one, or strided), forwards without autograd
(``torch.no_grad``, ``torch.inference_mode``), train/eval toggles, momentum changed (``None`` =
cumulative average), in-place edits of the weight, bias or input between forward and backward
(torch raises for what its backward reads), invalid inputs (batch of one in training, wrong
channel count, integer dtype), double backward (``create_graph=True``), ``state_dict`` /
``load_state_dict`` both ways, and ``copy.deepcopy`` of both modules. Modules are built with and
without ``affine`` and ``track_running_stats``.

A second machine (HalfBatchNormTwins) runs the same rules on 16-bit input with float32
parameters, torch's mixed case, against torch in float64 on the same 16-bit values: outputs and
input gradients within one 16-bit ulp of the truth rounded, per-channel values within float32
rounding (torch's own 16-bit CPU BatchNorm is less exact than that, so it is not the oracle).

The numba kernels' size thresholds (row chunks, channel blocks) are shrunk while the machine
runs, so that the small tensors here take every code path the benchmark sizes take.

Where fastnorm is stricter than torch by design, the rule says so: a call that fails validation
leaves fastnorm's module untouched, where torch has already counted the batch.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import BN_BACKENDS, assert_close
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import fastnorm
import fastnorm_kernels.numba_cpu.batchnorm as numba_bn
from fastnorm import _ops

DTYPE = torch.float64
TOL = (1e-9, 1e-10)
# (N, spatial) batch shapes per module dimensionality; N = 1 appears as an invalid training batch
BATCHES = {1: [(2, ()), (7, ()), (33, ())], 2: [(2, (3, 4)), (5, (1, 1)), (3, (7, 5))]}
#: the thresholds shrunk while the machine runs: (module, name, small value)
#: input memory layouts drawn (tests/test_differential_batchnorm.py's _batch)
LAYOUTS = ["contiguous", "channels_last", "strided"]
#: what a forward_backward changes in place between forward and backward ("none" twice: more plain steps)
EDITS = ["none", "none", "weight", "bias", "input"]
SMALL_THRESHOLDS = [(numba_bn, "CHUNK_ELEMENTS", 8), (numba_bn, "MAX_CHUNKS", 3), (numba_bn, "BLOCK_BYTES", 96)]


def _outcome(fn):
    try:
        return fn(), None
    except Exception as exc:  # noqa: BLE001 - the exception type is the result compared
        return None, exc


def _same_kind(ours, theirs) -> bool:
    """Both succeeded, or fastnorm's exception is catchable as torch's (an instance of its type)."""
    return (ours is None) == (theirs is None) and (theirs is None or isinstance(ours, type(theirs)))


#: drawn when a machine is built, from the class's ``backends`` read at every draw (a flatmap:
#: st.deferred would read it once per process, and tests/cudasim runs the machines with two lists)
_BACKEND = st.just(None).flatmap(lambda _: st.sampled_from(BatchNormTwins.backends))


class BatchNormTwins(RuleBasedStateMachine):
    #: the backends drawn (tests/cudasim runs this machine with ["cuda"])
    backends = BN_BACKENDS
    #: the input's dtype, and (rtol, atol) of input-shaped values ("data") and per-channel ones
    input_dtype = DTYPE
    tolerance = {"data": TOL, "per channel": TOL}
    #: fastnorm's buffer and parameter dtype for each of torch's (where the twins differ)
    stored_dtype = {}

    def __init__(self) -> None:
        super().__init__()
        self.generator = torch.Generator().manual_seed(0)
        self.saved = [(m, name, getattr(m, name)) for m, name, _ in SMALL_THRESHOLDS]
        for m, name, value in SMALL_THRESHOLDS:
            setattr(m, name, value)
        _ops.sync_tunables()

    def teardown(self) -> None:
        for m, name, value in self.saved:
            setattr(m, name, value)
        _ops.sync_tunables()

    @initialize(dims=st.sampled_from([1, 2]), channels=st.sampled_from([1, 3, 5]), backend=_BACKEND,
                affine=st.booleans(), track=st.booleans(), momentum=st.sampled_from([0.1, None]))  # fmt: skip
    def build(self, dims, channels, backend, affine, track, momentum):
        self.dims, self.channels = dims, channels
        name = f"BatchNorm{dims}d"
        options = dict(momentum=momentum, affine=affine, track_running_stats=track, dtype=DTYPE)
        self.theirs = getattr(torch.nn, name)(channels, **options)
        self.ours = getattr(fastnorm.nn, name)(channels, backend=backend, **options)
        if affine:
            with torch.no_grad():
                for m in (self.theirs, self.ours):
                    m.weight.copy_(torch.linspace(0.5, 1.5, channels, dtype=DTYPE))
                    m.bias.copy_(torch.linspace(-1, 1, channels, dtype=DTYPE))

    # -- helpers ------------------------------------------------------------------------------------

    def _batch(self, index, layout, n=None):
        """A batch in ``layout``: "contiguous", "channels_last" (4-D; else contiguous) or "strided"
        (every other element of a wider tensor, which the kernels read through a dense copy)."""
        size, spatial = BATCHES[self.dims][index % len(BATCHES[self.dims])]
        shape = (n or size, self.channels, *spatial)
        x = (torch.randn(shape, dtype=DTYPE, generator=self.generator) * 2 + 1).to(self.input_dtype)
        if layout == "channels_last" and len(shape) == 4:
            x = x.to(memory_format=torch.channels_last)
        return self._strided(x) if layout == "strided" else x

    @staticmethod
    def _strided(x):
        """x's values as every other element of a wider tensor (along the last dimension)."""
        wide = torch.zeros(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype)
        view = wide[..., ::2]
        view.copy_(x)
        return view

    def _leaves(self, x):
        """Two leaves requiring grad with x's values and strides (one per twin)."""
        if x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last):
            return x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        return self._strided(x).requires_grad_(True), self._strided(x).requires_grad_(True)

    def _both(self, fn):
        """``fn(module)`` on both twins: (ours, theirs) results, or the same exception type."""
        theirs, their_error = _outcome(lambda: fn(self.theirs))
        ours, our_error = _outcome(lambda: fn(self.ours))
        assert _same_kind(our_error, their_error), f"torch: {their_error!r}, fastnorm: {our_error!r}"
        return (ours, theirs), their_error

    def _compare_grads(self, xa, xb):
        if xb.grad is not None or xa.grad is not None:
            assert_close(xa.grad, xb.grad, *self.tolerance["data"], "input grad")
        if self.theirs.affine:
            for name in ("weight", "bias"):
                a, b = getattr(self.ours, name).grad, getattr(self.theirs, name).grad
                assert (a is None) == (b is None), f"{name}.grad"
                if b is not None:
                    assert_close(a, b, *self.tolerance["per channel"], f"{name}.grad")

    # -- rules --------------------------------------------------------------------------------------

    def _output_grad(self, x, kind):
        """A gradient for an output shaped as x: contiguous, in the other layout than x's
        (channels-last for 4-D), or strided (every other element of a wider tensor)."""
        if kind == "strided":
            wide = torch.randn(*x.shape[:-1], 2 * x.shape[-1], dtype=DTYPE, generator=self.generator).to(x.dtype)
            return wide[..., ::2]
        dy = torch.randn(x.shape, dtype=DTYPE, generator=self.generator).to(x.dtype)
        if kind == "other_layout" and x.dim() == 4:
            channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
            return dy.contiguous(memory_format=torch.contiguous_format if channels_last else torch.channels_last)
        return dy

    @rule(index=st.integers(0, 2), layout=st.sampled_from(LAYOUTS), edit=st.sampled_from(EDITS),
          dy_kind=st.sampled_from(["contiguous", "contiguous", "other_layout", "strided"]))  # fmt: skip
    def forward_backward(self, index, layout, edit, dy_kind):
        """Forward, then (``edit``) a tensor changed in place, then backward: torch raises where its
        backward reads the changed tensor (weight, input) and computes as saved otherwise."""
        x = self._batch(index, layout)
        dy = self._output_grad(x, dy_kind)
        xa, xb = self._leaves(x)
        (ya, yb), error = self._both(lambda m: m(xa if m is self.ours else xb))
        if error is not None:
            return
        assert_close(ya, yb, *self.tolerance["data"], "output")
        assert ya.is_contiguous(memory_format=torch.channels_last) == yb.is_contiguous(
            memory_format=torch.channels_last
        ), "output memory format"
        with torch.no_grad():
            if edit == "input":
                xa.add_(1.0)
                xb.add_(1.0)
            elif edit != "none" and self.theirs.affine:
                getattr(self.ours, edit).mul_(1.5)
                getattr(self.theirs, edit).mul_(1.5)
        for m in (self.ours, self.theirs):
            m.zero_grad(set_to_none=True)
        _, error_b = _outcome(lambda: yb.backward(dy))
        _, error_a = _outcome(lambda: ya.backward(dy))
        assert _same_kind(error_a, error_b), f"torch: {error_b!r}, fastnorm: {error_a!r}"
        if error_b is None:
            self._compare_grads(xa, xb)

    @rule(index=st.integers(0, 2), layout=st.sampled_from(LAYOUTS), mode=st.sampled_from(["no_grad", "inference_mode"]))
    def forward_without_grad(self, index, layout, mode):
        """A forward that builds no graph (evaluation loops): the output, and in training the
        running statistics (compared by the invariant)."""
        x = self._batch(index, layout)
        context = torch.no_grad if mode == "no_grad" else torch.inference_mode

        def forward(m):
            with context():
                return m(x.clone())

        (ya, yb), error = self._both(forward)
        if error is None:
            assert_close(ya, yb, *self.tolerance["data"], "output")
            assert ya.stride() == yb.stride(), "output strides"

    @rule()
    def deepcopy_both(self):
        """Both modules replaced by deep copies (parameters, buffers, options, backend)."""
        self.ours, self.theirs = copy.deepcopy(self.ours), copy.deepcopy(self.theirs)

    @rule(training=st.booleans())
    def train_or_eval(self, training):
        self._both(lambda m: m.train(training))

    @rule(momentum=st.sampled_from([None, 0.0, 0.3, 1.0]))
    def change_momentum(self, momentum):
        def change(m):
            m.momentum = momentum

        self._both(change)

    @rule(kind=st.sampled_from(["batch_of_one", "channels", "integer"]))
    def invalid_input(self, kind):
        """torch raises (batch of one only in training); fastnorm raises the same type and leaves
        its module untouched, where torch has counted the batch already: the twins are re-synced
        on that counter."""
        if kind == "batch_of_one":
            x = self._batch(0, "contiguous", n=1)
            if self.dims == 2:
                x = x[..., :1, :1].contiguous()
        elif kind == "channels":
            x = torch.randn(4, self.channels + 1, *([3, 3] if self.dims == 2 else [])).to(self.input_dtype)
        else:
            x = torch.ones(4, self.channels, *([3, 3] if self.dims == 2 else []), dtype=torch.int64)
        before = {k: v.clone() for k, v in self.ours.state_dict().items()}
        _, error = self._both(lambda m: m(x))
        if error is not None:
            after = self.ours.state_dict()
            for k, v in before.items():
                assert torch.equal(after[k], v), f"a failed call changed {k}"
            if self.theirs.num_batches_tracked is not None:
                self.theirs.num_batches_tracked.copy_(self.ours.num_batches_tracked)

    @precondition(lambda self: self.input_dtype == DTYPE)
    @rule(index=st.integers(0, 2), layout=st.sampled_from(LAYOUTS))
    def double_backward(self, index, layout):
        """Second derivatives (create_graph=True) equal torch's (float64 input only: fastnorm's
        differentiable backward of a 16-bit input computes in float32, a graph of its own)."""
        x = self._batch(index, layout)
        dy = torch.randn(x.shape, dtype=DTYPE, generator=self.generator)
        xa, xb = self._leaves(x)

        def second(m):
            inp = xa if m is self.ours else xb
            y = m(inp)
            (g,) = torch.autograd.grad(y, inp, dy, create_graph=True)
            (h,) = torch.autograd.grad((g * g).sum(), inp)
            return g, h

        results, error = self._both(second)
        if error is None:
            (ga, ha), (gb, hb) = results
            assert_close(ga, gb, *TOL, "first derivative")
            assert_close(ha, hb, 1e-8, 1e-9, "second derivative")

    @rule(source=st.sampled_from(["torch", "fastnorm"]))
    def load_state(self, source):
        state = (self.theirs if source == "torch" else self.ours).state_dict()
        self._both(lambda m: m.load_state_dict({k: v.clone() for k, v in state.items()}))

    # -- the comparison after every rule ----------------------------------------------------------

    @invariant()
    def same_state(self):
        if not hasattr(self, "theirs"):
            return
        a, b = self.ours.state_dict(), self.theirs.state_dict()
        assert sorted(a) == sorted(b)
        for key, value in b.items():
            assert a[key].dtype == self.stored_dtype.get(value.dtype, value.dtype), key
            assert_close(a[key], value, *self.tolerance["per channel"], key)
        assert self.ours.training == self.theirs.training and self.ours.momentum == self.theirs.momentum


class _Float64Truth:
    """torch's BatchNorm in float64 fed a 16-bit input widened (exactly), its output and input
    gradient rounded back to the input's dtype once: the exact result of the 16-bit values."""

    def forward(self, input):
        if input.dtype in (torch.bfloat16, torch.float16):
            # x ** 1 (exact) saves x for the backward, as torch's 16-bit BatchNorm does: an
            # in-place change of the input before the backward raises here too
            return super().forward(input.pow(1).double()).to(input.dtype)
        return super().forward(input)


TRUTH = {1: type("Float64BatchNorm1d", (_Float64Truth, torch.nn.BatchNorm1d), {}),
         2: type("Float64BatchNorm2d", (_Float64Truth, torch.nn.BatchNorm2d), {})}  # fmt: skip
#: (rtol, atol) of a 16-bit value against the rounded float64 truth: fastnorm computes in float32
#: from the exact 16-bit values and rounds once, so it is the truth's rounding or a neighbour
#: where float32 noise straddles a rounding boundary (one ulp: 2^-7 relative in bfloat16, 2^-10
#: in float16), plus float32 noise where a value cancels to near zero
HALF_DATA = {torch.bfloat16: (2.0**-7, 1e-4), torch.float16: (2.0**-10, 1e-4)}


class HalfBatchNormTwins(BatchNormTwins):
    """The same machine on torch's mixed case (what autocast gives): a bfloat16 or float16 input
    with float32 weight, bias and running statistics. The oracle is torch in float64 on the same
    16-bit values (torch's own 16-bit CPU BatchNorm is no tight oracle: seen 1.039 for an exact
    1.0 with a batch of two, its statistics of 16-bit inputs being less exact): fastnorm's outputs
    and input gradients within one 16-bit ulp of the truth rounded, its float32 per-channel values
    (running statistics, weight and bias gradients) within float32 rounding of the truth's."""

    stored_dtype = {DTYPE: torch.float32}

    @initialize(dims=st.sampled_from([1, 2]), channels=st.sampled_from([1, 3, 5]), backend=_BACKEND,
                affine=st.booleans(), track=st.booleans(), momentum=st.sampled_from([0.1, None]),
                input_dtype=st.sampled_from([torch.bfloat16, torch.float16]))  # fmt: skip
    def build(self, dims, channels, backend, affine, track, momentum, input_dtype):
        self.input_dtype = input_dtype
        self.tolerance = {"data": HALF_DATA[input_dtype], "per channel": (1e-5, 1e-6)}
        self.dims, self.channels = dims, channels
        options = dict(momentum=momentum, affine=affine, track_running_stats=track)
        self.ours = getattr(fastnorm.nn, f"BatchNorm{dims}d")(channels, backend=backend, **options)
        self.theirs = TRUTH[dims](channels, dtype=DTYPE, **options)
        if affine:
            with torch.no_grad():
                self.ours.weight.copy_(torch.linspace(0.5, 1.5, channels))
                self.ours.bias.copy_(torch.linspace(-1, 1, channels))
        self.theirs.load_state_dict(self.ours.state_dict())  # the float32 values, widened


TestBatchNormTwins = pytest.mark.fuzz(BatchNormTwins.TestCase)
TestBatchNormTwins.settings = settings(max_examples=30, stateful_step_count=20)
TestHalfBatchNormTwins = pytest.mark.fuzz(HalfBatchNormTwins.TestCase)
TestHalfBatchNormTwins.settings = settings(max_examples=20, stateful_step_count=15)
