"""Every CUDA kernel, run by Numba's simulator on the CPU, against the NumPy reference.

Small shapes (the simulator runs each GPU thread as a Python thread) that still cover odd sizes,
several blocks per channel, several channel tiles, and optimizer chunks that cross tensor
boundaries (CHUNK is shrunk to a few elements).
"""

from __future__ import annotations

import numpy as np
import pytest
from numba import cuda
from ulps import ulps16

import fastnorm_kernels.numba_cuda as kc
import fastnorm_kernels.reference as ref
from fastnorm_kernels.numba_cuda import optim as cuda_optim

assert kc.SIMULATOR and cuda.is_available()

# (N, C, S): what each exercises
BN_SHAPES = [
    ((2, 3, 1), "rows: smallest batch"),
    ((300, 37, 1), "rows: 2 channel tiles, 3 row blocks, odd channels"),
    ((3, 4, 37), "planes: odd spatial"),
    ((4, 3, 5), "short planes: grid-stride elementwise kernels"),
    ((5, 3, 300), "planes: several blocks per channel"),
]


def _bn(k, x, w, b, dy, training, eps=1e-5, momentum=0.1):
    """Forward (train or eval) and backward through backend module ``k``; host results."""
    on_device = k is kc
    dev = cuda.to_device if on_device else np.copy
    host = (lambda a: a.copy_to_host()) if on_device else (lambda a: a)
    n, c, s = x.shape
    X, Y = dev(x), dev(np.empty_like(x))
    W = None if w is None else dev(w)
    B = None if b is None else dev(b)
    RM, RV = dev(np.linspace(-1, 1, c).astype(x.dtype)), dev(np.linspace(0.5, 2, c).astype(x.dtype))
    if training:
        M, INV = dev(np.empty(c, x.dtype)), dev(np.empty(c, x.dtype))
        k.batch_norm_forward_train(X, W, B, RM, RV, momentum, eps, Y, M, INV)
    else:
        k.batch_norm_forward_eval(X, W, B, RM, RV, eps, Y)
        rm, rv = host(RM), host(RV)
        M, INV = dev(rm.copy()), dev((1 / np.sqrt(rv.astype(np.float64) + eps)).astype(x.dtype))
    DX, DW, DB = dev(np.empty_like(x)), dev(np.empty(c, x.dtype)), dev(np.empty(c, x.dtype))
    k.batch_norm_backward(dev(dy), X, M, INV, W, training, DX, DW, DB)
    return [host(a) for a in (Y, M, INV, RM, RV, DX, DW, DB)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape", [s for s, _ in BN_SHAPES], ids=str)
def test_batch_norm_kernels(shape, training, dtype):
    rng = np.random.default_rng(1)
    c = shape[1]
    x = (rng.standard_normal(shape) * 3 + 2).astype(dtype)
    w, b = (rng.random(c) + 0.5).astype(dtype), rng.standard_normal(c).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    ours, theirs = _bn(kc, x, w, b, dy, training), _bn(ref, x, w, b, dy, training)
    tol = 2e-4 if dtype == np.float32 else 1e-10
    names = ["y", "mean", "invstd", "running_mean", "running_var", "dx", "dweight", "dbias"]
    for a, e, what in zip(ours, theirs, names):
        np.testing.assert_allclose(a, e, rtol=tol, atol=tol * max(1.0, float(np.abs(e).max())), err_msg=what)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # NaN arithmetic in the simulated threads
def test_batch_norm_without_affine_and_with_nan():
    x = np.random.default_rng(2).standard_normal((6, 4, 5)).astype(np.float32)
    x[1, 2, 3] = np.nan
    x[0, 1, 0] = np.inf  # also the shift value of channel 1: falls back to 0
    dy = np.ones_like(x)
    ours, theirs = _bn(kc, x, None, None, dy, True), _bn(ref, x, None, None, dy, True)
    for a, e, what in zip(ours[:5], theirs[:5], ["y", "mean", "invstd", "running_mean", "running_var"]):
        np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-5, equal_nan=True, err_msg=what)
    assert np.isnan(ours[0][:, 2]).all() and np.isinf(ours[1][1])


def test_large_offset_statistics():
    x = (np.random.default_rng(3).standard_normal((400, 3, 1)) + 1e4).astype(np.float32)
    ours = _bn(kc, x, None, None, np.ones_like(x), True)
    theirs = _bn(ref, x, None, None, np.ones_like(x), True)
    np.testing.assert_allclose(ours[0], theirs[0], atol=1e-4)
    np.testing.assert_allclose(ours[4], theirs[4], rtol=1e-4)


# -- optimizers --------------------------------------------------------------------------------

SHAPES = [(5,), (3, 7), (70,), (1,)]


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(cuda_optim, "CHUNK", 16)  # 70 values = 5 chunks; chunks end at tensor ends


CASES = [
    ("sgd", dict(lr=0.1, weight_decay=0.01, momentum=0.9, dampening=0.0, nesterov=True, maximize=False)),
    ("sgd", dict(lr=0.1, weight_decay=0.0, momentum=0.0, dampening=0.0, nesterov=False, maximize=True)),
    ("sgd", dict(lr=0.1, weight_decay=0.0, momentum=0.5, dampening=0.3, nesterov=False, maximize=False)),
    ("adagrad", dict(lr=0.1, lr_decay=0.01, weight_decay=0.05, eps=1e-10, maximize=True)),
    ("rmsprop", dict(lr=0.01, alpha=0.99, eps=1e-8, weight_decay=0.02, momentum=0.9, centered=True, maximize=False)),
    ("rmsprop", dict(lr=0.01, alpha=0.3, eps=1e-8, weight_decay=0.0, momentum=0.0, centered=True, maximize=True)),
    ("adam", dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, decoupled_weight_decay=True,
                  amsgrad=True, maximize=False)),
    ("adam", dict(lr=1e-2, beta1=0.3, beta2=0.9, eps=1e-6, weight_decay=0.05, decoupled_weight_decay=False,
                  amsgrad=False, maximize=True)),
]  # fmt: skip


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name,options", CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CASES)])
def test_optimizer_kernels_match_reference(small_chunks, name, options, dtype):
    rng = np.random.default_rng(4)
    start = [rng.standard_normal(s).astype(dtype) for s in SHAPES]
    grads = [[rng.standard_normal(s).astype(dtype) for s in SHAPES] for _ in range(4)]
    results = []
    for k in (ref, kc):
        dev = cuda.to_device if k is kc else np.copy
        params = [dev(p.copy()) for p in start]
        states = [[dev(np.zeros_like(p)) for p in start] for _ in range(3)]
        steps = [np.zeros(1, np.float32) for _ in start]  # host memory on every backend
        for step, gs in enumerate(grads, 1):
            g = [dev(x) for x in gs]
            if name == "sgd":
                k.sgd_step(params, g, states[0], [step == 1] * len(params), **options)
            elif name == "adagrad":
                k.adagrad_step(params, g, states[0], steps, **options)
            elif name == "rmsprop":
                k.rmsprop_step(params, g, states[0], states[1], states[2], steps, **options)
            else:
                k.adam_step(params, g, states[0], states[1], states[2], steps, **options)
        host = (lambda a: a.copy_to_host()) if k is kc else (lambda a: a)
        results.append([host(a) for a in params + sum(states, [])] + steps)
    tol = 1e-5 if dtype == np.float32 else 1e-12
    for a, e in zip(*results):
        np.testing.assert_allclose(a, e, rtol=tol, atol=tol)


# 16-bit storage: bfloat16 as uint16 bits, float16; seed: stochastic rounding (bfloat16 only).
# bfloat16 on every case; stochastic rounding and float16 on a few (the simulator is slow)
HALF = {"bfloat16": (np.uint16, None), "bfloat16-sr": (np.uint16, 1234), "float16": (np.float16, None)}
HALF_CASES = [("bfloat16", i) for i in range(len(CASES))] + [("bfloat16-sr", 0), ("bfloat16-sr", 6),
                                                              ("float16", 4), ("float16", 7)]  # fmt: skip


@pytest.mark.parametrize("storage,case", HALF_CASES, ids=[f"{s}-{CASES[i][0]}-{i}" for s, i in HALF_CASES])
def test_16_bit_optimizer_kernels_match_reference(small_chunks, storage, case):
    """float32 arithmetic, one rounding per stored value, the same stochastic rounding bits:
    within one ulp of the NumPy reference in at least 99% of the values after 4 steps."""
    from fastnorm_kernels import _bits

    name, options = CASES[case]
    dtype, seed = HALF[storage]
    rng = np.random.default_rng(6)

    def to16(x):
        out = np.empty(x.shape, dtype)
        _bits.round_into(out, x.astype(np.float32), np.dtype(dtype))
        return out

    start = [to16(rng.standard_normal(s)) for s in SHAPES]
    grads = [[to16(rng.standard_normal(s)) for s in SHAPES] for _ in range(4)]
    results = []
    for k in (ref, kc):
        dev = cuda.to_device if k is kc else np.copy
        params = [dev(p.copy()) for p in start]
        states = [[dev(np.zeros_like(p)) for p in start] for _ in range(3)]
        steps = [np.zeros(1, np.float32) for _ in start]
        for step, gs in enumerate(grads, 1):
            g = [dev(x) for x in gs]
            extra = {} if seed is None else {"rounding_seed": seed + step}
            if name == "sgd":
                k.sgd_step(params, g, states[0], [step == 1] * len(params), **options, **extra)
            elif name == "adagrad":
                k.adagrad_step(params, g, states[0], steps, **options, **extra)
            elif name == "rmsprop":
                k.rmsprop_step(params, g, states[0], states[1], states[2], steps, **options, **extra)
            else:
                k.adam_step(params, g, states[0], states[1], states[2], steps, **options, **extra)
        host = (lambda a: a.copy_to_host()) if k is kc else (lambda a: a)
        results.append([host(a) for a in params + sum(states, [])])
    distance = np.concatenate([ulps16(a, e).ravel() for a, e in zip(*results)])
    assert (distance <= 1).mean() >= 0.99, f"max {distance.max()} ulps"


def test_adam_table_advances_host_steps(small_chunks):
    """The table entry point advances the float32 step counters in host memory (torch's layout
    without capturable=True) and computes the bias corrections there; tensors resumed at
    different steps get their own scalars (one launch per distinct step)."""
    rng = np.random.default_rng(5)
    params = [rng.standard_normal(s).astype(np.float32) for s in SHAPES]
    grads = [rng.standard_normal(s).astype(np.float32) for s in SHAPES]
    dev_p = [cuda.to_device(p.copy()) for p in params]
    dev_g = [cuda.to_device(g) for g in grads]
    m = [cuda.to_device(np.zeros_like(p)) for p in params]
    v = [cuda.to_device(np.zeros_like(p)) for p in params]
    start = [3.0 if i % 2 else 7.0 for i in range(len(params))]  # resumed at steps 3 and 7
    steps = [np.array([s], np.float32) for s in start]
    addrs = np.array([[kc.address(a) for a in row] for row in (dev_p, dev_g, m, v, dev_g)], np.int64)
    step_addrs = np.array([s.ctypes.data for s in steps], np.int64)
    options = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, decoupled_weight_decay=False,
                   amsgrad=False, maximize=False)  # fmt: skip
    kc.adam_step_table(addrs, [p.size for p in params], np.float32, step_addrs, False, **options)
    assert [s[0] for s in steps] == [x + 1 for x in start]
    ref_m, ref_v = [np.zeros_like(p) for p in params], [np.zeros_like(p) for p in params]
    ref_steps = [np.array([s], np.float32) for s in start]
    ref.adam_step(params, grads, ref_m, ref_v, None, ref_steps, **options)
    for a, e in zip(dev_p, params):
        np.testing.assert_allclose(a.copy_to_host(), e, rtol=1e-6, atol=1e-7)


def test_list_api_wants_host_step_counters():
    """On a real GPU a device step counter would be read as a host address: refused by type."""
    from fastnorm_kernels.numba_cuda import _device

    assert _device.host_address(np.zeros(1, np.float32)) > 0
    with pytest.raises(TypeError, match="host memory"):
        _device.host_address([0.0])


def test_adagrad_table_steps_and_sgd_flags(small_chunks):
    p = [cuda.to_device(np.ones(40, np.float64))]
    g = [cuda.to_device(np.full(40, 2.0))]
    s = [cuda.to_device(np.zeros(40))]
    steps = [np.array([0.0])]
    addrs = np.array([[kc.address(a[0])] for a in (p, g, s, g, g)], np.int64)
    kc.adagrad_step_table(addrs, [40], np.float64, np.array([steps[0].ctypes.data]), True, lr=0.5, lr_decay=0.1,
                          weight_decay=0.0, eps=0.0, maximize=False)  # fmt: skip
    assert steps[0][0] == 1.0
    np.testing.assert_allclose(p[0].copy_to_host(), 1 - 0.5 * 2 / 2)  # clr = 0.5 at step 1
    with pytest.raises(
        TypeError, match=r"float32 or float64 or float16 or bfloat16 \(uint16 bits\) tensors, got int32"
    ):
        kc.sgd_step_table(addrs, [40], np.int32, [1], lr=0.1, weight_decay=0.0, momentum=0.9, dampening=0.0,
                          nesterov=False, maximize=False)  # fmt: skip


@pytest.mark.parametrize("shape", [(9, 4, 1), (3, 5, 17)], ids=str)
def test_batch_norm_stats(shape):
    x = (np.random.default_rng(6).standard_normal(shape) * 2 + 5).astype(np.float32)
    mean, var = np.empty(shape[1]), np.empty(shape[1])
    ref.batch_norm_stats(x, mean, var)
    dm, dv = cuda.to_device(np.empty(shape[1])), cuda.to_device(np.empty(shape[1]))
    kc.batch_norm_stats(cuda.to_device(x), dm, dv)
    np.testing.assert_allclose(dm.copy_to_host(), mean, rtol=1e-12)
    np.testing.assert_allclose(dv.copy_to_host(), var, rtol=1e-10)
