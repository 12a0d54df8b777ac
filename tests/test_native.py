"""The numba backend's C++ autograd node for training BatchNorm (fastnorm/_native.py): which calls
it serves, its fallback when it cannot be built, and threads. Its values are tested with every
other path's in tests/test_batchnorm_parity.py and tests/test_differential_batchnorm.py
(backend ids "numba" and "numba-python")."""

from __future__ import annotations

import threading
import warnings

import pytest
import torch
from conftest import assert_close

import fastnorm
from fastnorm import _native


def _node(y: torch.Tensor) -> str:
    return "none" if y.grad_fn is None else y.grad_fn.name()


def test_training_with_a_gradient_runs_through_the_node():
    assert _native.extension() is not None, "the C++ BatchNorm node was not built"
    m = fastnorm.nn.BatchNorm1d(6, backend="numba")
    x = torch.randn(5, 6, requires_grad=True)
    assert "fastnorm::BatchNormBackward" in _node(m(x))
    m.eval()  # eval with a gradient: the Python Function (the node serves training only)
    assert "AddressBatchNormFunction" in _node(m(x))
    m.train()
    with torch.no_grad():  # no gradient: no node at all
        assert _node(m(x)) == "none"


def test_a_failed_build_warns_once_and_serves_the_python_function(monkeypatch):
    """Without a compiler (here: a build that raises) fastnorm warns once, naming the cause, and
    runs the same kernels through the Python autograd Function, with torch's values."""

    def fail():
        raise RuntimeError("Error building extension 'fastnorm_batch_norm': c++: not found")

    monkeypatch.setattr(_native, "_extension", None)
    monkeypatch.setattr(_native, "_failed", False)
    monkeypatch.setattr(_native, "_build", fail)
    ours, theirs = fastnorm.nn.BatchNorm2d(3, backend="numba"), torch.nn.BatchNorm2d(3)
    x = torch.randn(4, 3, 5, 5, requires_grad=True)
    with pytest.warns(RuntimeWarning, match="could not be built.*c\\+\\+: not found"):
        y = ours(x)
    assert "AddressBatchNormFunction" in _node(y)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once: no second warning
        y = ours(x)
    dy = torch.randn_like(y)
    (g,) = torch.autograd.grad(y, x, dy)
    y_ref = theirs(x)
    theirs(x)  # the same two batches counted
    (g_ref,) = torch.autograd.grad(y_ref, x, dy)
    assert_close(y, y_ref, 1e-4, 2e-5, "output")
    assert_close(g, g_ref, 1e-4, 2e-5, "dx")
    assert_close(ours.running_var, theirs.running_var, 1e-5, 1e-6, "running_var")


def test_two_threads_training_through_the_node_equal_a_sequential_run():
    """Forward and backward from two threads at once (the node releases the GIL while its kernels
    run, and its output pool is shared): the values of a sequential run, bit for bit."""
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


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
@pytest.mark.parametrize("training", [True, False])
def test_forwards_without_a_gradient_run_through_the_extension(monkeypatch, mode, training):
    """torch.no_grad / inference_mode forwards: one call into C++ (no autograd node), torch's
    values and running statistics, and under inference_mode an inference tensor as torch's."""
    calls = []
    real = _native.batch_norm_forward
    monkeypatch.setattr(_native, "batch_norm_forward", lambda *a: calls.append(1) or real(*a))
    ours, theirs = fastnorm.nn.BatchNorm2d(5, backend="numba"), torch.nn.BatchNorm2d(5)
    ours.train(training), theirs.train(training)
    x = torch.randn(6, 5, 4, 3)
    context = torch.no_grad if mode == "no_grad" else torch.inference_mode
    with context():
        y, y_ref = ours(x), theirs(x)
    assert calls == [1]
    assert y.is_inference() == y_ref.is_inference()
    assert_close(y, y_ref, 1e-4, 2e-5, "output")
    assert_close(ours.running_var, theirs.running_var, 1e-5, 1e-6, "running_var")
