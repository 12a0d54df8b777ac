"""fastnorm optimizers in lockstep with torch.optim: parameters and every state buffer."""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import OPTIM_BACKENDS, assert_close

import fastnorm

# Odd-sized parameters: (shape, what it exercises)
PARAM_SHAPES = [
    ((7,), "odd vector"),
    ((3, 5), "small matrix"),
    ((13, 1, 3), "3-D with a unit axis"),
    ((1,), "a single value"),
    ((257, 33), "more than a SIMD width per row, prime-ish sizes"),
]
STEPS = 50  # the Numba issue asks 50 lockstep steps (the foundation 20)
LOCKSTEP_TOL = {torch.float64: (1e-10, 1e-12), torch.float32: (2e-5, 2e-6)}


def _grid(**axes):
    keys = list(axes)
    for values in itertools.product(*axes.values()):
        yield dict(zip(keys, values))


def _sgd_options():
    for o in _grid(momentum=[0, 0.9], dampening=[0, 0.3], nesterov=[False, True],
                   weight_decay=[0, 0.05], maximize=[False, True]):  # fmt: skip
        if o["nesterov"] and (o["momentum"] == 0 or o["dampening"] != 0):
            continue  # torch refuses nesterov without momentum or with dampening
        if o["momentum"] == 0 and o["dampening"] != 0:
            continue  # dampening only acts on the momentum buffer
        yield dict(lr=0.05, **o)


def _adagrad_options():
    for o in _grid(lr_decay=[0, 0.05], weight_decay=[0, 0.05],
                   initial_accumulator_value=[0, 0.3], maximize=[False, True]):  # fmt: skip
        yield dict(lr=0.1, **o)
    yield dict(lr=0.1, eps=1e-3)


def _rmsprop_options():
    for o in _grid(weight_decay=[0, 0.05], momentum=[0, 0.9], centered=[False, True],
                   maximize=[False, True]):  # fmt: skip
        yield dict(lr=0.01, **o)
    yield dict(lr=0.01, alpha=0.8, eps=1e-4)


def _adam_options():
    for o in _grid(weight_decay=[0, 0.05], amsgrad=[False, True], maximize=[False, True],
                   decoupled_weight_decay=[False, True]):  # fmt: skip
        yield dict(lr=0.01, **o)
    yield dict(lr=0.01, betas=(0.8, 0.99), eps=1e-6)


def _adamw_options():
    for o in _grid(weight_decay=[0.01, 0], amsgrad=[False, True], maximize=[False, True]):
        yield dict(lr=0.01, **o)


CASES = [
    (name, options)
    for name, gen in [
        ("SGD", _sgd_options),
        ("Adagrad", _adagrad_options),
        ("RMSprop", _rmsprop_options),
        ("Adam", _adam_options),
        ("AdamW", _adamw_options),
    ]  # fmt: skip
    for options in gen()
]


def _params(dtype):
    return [torch.randn(shape, dtype=dtype) for shape, _ in PARAM_SHAPES]


def run_lockstep(name, options, backend, dtype, steps=STEPS, grads=None):
    """Run torch.optim.<name> and fastnorm.optim.<name> side by side on the same gradients."""
    ref_params = _params(dtype)
    our_params = [p.clone() for p in ref_params]
    ref = getattr(torch.optim, name)(ref_params, **options)
    ours = getattr(fastnorm.optim, name)(our_params, backend=backend, **options)
    for _step in range(steps):
        for a, b in zip(ref_params, our_params):
            g = torch.randn_like(a)
            a.grad, b.grad = g.clone(), g.clone()
        ref.step()
        ours.step()
    return ref, ours, ref_params, our_params


def assert_same_state(ref, ours, ref_params, our_params, dtype, what=""):
    rtol, atol = LOCKSTEP_TOL[dtype]
    for i, (a, b) in enumerate(zip(ref_params, our_params)):
        assert_close(b, a, rtol, atol, f"{what} param {i}")
        ref_state, our_state = ref.state[a], ours.state[b]
        assert set(our_state) == set(ref_state), f"{what} state keys of param {i}"
        for key, value in ref_state.items():
            if isinstance(value, torch.Tensor):
                assert our_state[key].dtype == value.dtype, f"{what} {key} dtype"
                assert our_state[key].device == value.device, f"{what} {key} device"
                assert_close(our_state[key], value, rtol, atol, f"{what} state {key} of param {i}")
            else:
                assert our_state[key] == value


@pytest.mark.parametrize("backend", OPTIM_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("name,options", CASES, ids=[f"{n}-{o}" for n, o in CASES])
def test_lockstep_with_torch(backend, dtype, name, options):
    ref, ours, ref_params, our_params = run_lockstep(name, options, backend, dtype)
    assert_same_state(ref, ours, ref_params, our_params, dtype, f"{name}{options}")


@pytest.mark.parametrize("backend", OPTIM_BACKENDS)
@pytest.mark.parametrize("name", ["SGD", "Adagrad", "RMSprop", "Adam", "AdamW"])
def test_some_gradients_missing_mixed_dtypes_and_non_contiguous(backend, name):
    """Params without .grad on some steps, a float64 param beside float32 ones (one kernel call
    per dtype), and a transposed (non-contiguous) parameter (contiguous copies, written back)."""
    options = {"lr": 0.05, "momentum": 0.9} if name in ("SGD", "RMSprop") else {"lr": 0.05}
    base = [torch.randn(5, 7), torch.randn(9, dtype=torch.float64), torch.randn(6, 4).t(), torch.randn(3)]
    ref_params = [p.clone() if p.is_contiguous() else p.clone().t().contiguous().t() for p in base]
    our_params = [p.clone() if p.is_contiguous() else p.clone().t().contiguous().t() for p in base]
    assert not our_params[2].is_contiguous()
    ref = getattr(torch.optim, name)(ref_params, **options)
    ours = getattr(fastnorm.optim, name)(our_params, backend=backend, **options)
    for step in range(12):
        for i, (a, b) in enumerate(zip(ref_params, our_params)):
            if (i + step) % 3 == 0:
                a.grad = b.grad = None  # skipped this step: no state change, no step count
                continue
            g = torch.randn_like(a)
            a.grad, b.grad = g.clone(), g.clone()
        ref.step()
        ours.step()
    for dtype in (torch.float32, torch.float64):
        idx = [i for i, p in enumerate(ref_params) if p.dtype == dtype]
        assert_same_state(ref, ours, [ref_params[i] for i in idx], [our_params[i] for i in idx], dtype, name)


@pytest.mark.parametrize("backend", OPTIM_BACKENDS)
def test_float64_default_dtype_gives_float64_steps(backend):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        ref, ours, ref_params, our_params = run_lockstep("Adam", {"lr": 0.01}, backend, torch.float64, steps=5)
        assert ours.state[our_params[0]]["step"].dtype == torch.float64
        assert_same_state(ref, ours, ref_params, our_params, torch.float64, "Adam, float64 default")
    finally:
        torch.set_default_dtype(previous)
