"""fastnorm BatchNorm against torch's: outputs, every gradient and the running statistics."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import BN_BACKENDS, assert_close, pools_in_use, tol

import fastnorm

# Shape matrix: (input shape, what it exercises)
SHAPES = [
    ((2, 3), "smallest legal training batch"),
    ((64, 256), "the MNIST MLP's first BatchNorm"),
    ((64, 128), "the MNIST MLP's second BatchNorm"),
    ((17, 131), "odd batch, prime feature count"),
    ((5, 1), "a single channel"),
    ((8, 7, 9), "(N, C, L)"),
    ((4, 3, 5, 7), "(N, C, H, W), odd spatial sizes"),
    ((1, 6, 3, 3), "batch of one with spatial > 1: legal in training"),
    ((2, 4, 3, 5, 3), "(N, C, D, H, W)"),
    ((3, 1023, 2), "1023 channels"),
]
DTYPES = [torch.float32, torch.float64]
MODULES = {2: "BatchNorm1d", 3: "BatchNorm1d", 4: "BatchNorm2d", 5: "BatchNorm3d"}

# module options: (affine, bias, track_running_stats, momentum)
OPTIONS = [
    (True, True, True, 0.1),  # torch's defaults
    (False, True, True, 0.1),  # no affine parameters
    (True, False, True, 0.1),  # weight without bias (torch 2.14's bias=False)
    (True, True, False, 0.1),  # no running statistics: batch stats in eval too
    (True, True, True, None),  # cumulative moving average
    (True, True, True, 0.7),
]


def _pair(shape, dtype, affine, bias, track, momentum, backend):
    name = MODULES[len(shape)]
    kwargs = dict(momentum=momentum, affine=affine, track_running_stats=track, dtype=dtype, bias=bias)
    ref = getattr(torch.nn, name)(shape[1], **kwargs)
    ours = getattr(fastnorm.nn, name)(shape[1], backend=backend, **kwargs)
    if affine:  # non-trivial affine parameters
        with torch.no_grad():
            ref.weight.uniform_(0.5, 1.5)
            if ref.bias is not None:
                ref.bias.uniform_(-0.5, 0.5)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def _grads(module, x, dy):
    x = x.detach().clone().requires_grad_(True)
    y = module(x)
    y.backward(dy)
    grads = {"x": x.grad}
    for pname, p in module.named_parameters():
        grads[pname] = p.grad
    return y, grads


@pytest.mark.parametrize("backend", BN_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [s for s, _ in SHAPES], ids=str)
@pytest.mark.parametrize("affine,bias,track,momentum", OPTIONS)
def test_module_matches_torch(monkeypatch, backend, dtype, shape, affine, bias, track, momentum):
    rtol, atol = tol(dtype)
    ref, ours = _pair(shape, dtype, affine, bias, track, momentum, backend)
    for step in range(3):  # several steps: running statistics and num_batches_tracked evolve
        x = torch.randn(shape, dtype=dtype) * 3 + 1.5
        dy = torch.randn(shape, dtype=dtype)
        y_ref, g_ref = _grads(ref, x, dy)
        y_ours, g_ours = _grads(ours, x, dy)
        assert_close(y_ours, y_ref, rtol, atol, f"train output, step {step}")
        for k in g_ref:
            assert_close(g_ours[k], g_ref[k], rtol, atol, f"train grad {k}, step {step}")
        ref.zero_grad(), ours.zero_grad()
    for key, value in ref.state_dict().items():
        assert_close(ours.state_dict()[key], value, rtol, atol, f"buffer {key}")

    ref.eval(), ours.eval()
    x = torch.randn(shape, dtype=dtype)
    dy = torch.randn(shape, dtype=dtype)
    y_ref, g_ref = _grads(ref, x, dy)
    y_ours, g_ours = _grads(ours, x, dy)
    assert_close(y_ours, y_ref, rtol, atol, "eval output")
    for k in g_ref:
        assert_close(g_ours[k], g_ref[k], rtol, atol, f"eval grad {k}")


@pytest.mark.parametrize("backend", BN_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize(
    "make",
    [
        lambda dt: torch.randn(9, 6, dtype=dt).t(),  # (6, 9) transposed (N, C)
        lambda dt: torch.randn(5, 7, 4, 3, dtype=dt).permute(0, 3, 1, 2),  # permuted (N, C, H, W)
        lambda dt: torch.randn(4, 6, 5, 5, dtype=dt).to(memory_format=torch.channels_last),
        lambda dt: torch.randn(8, 10, dtype=dt)[::2, 1::3],  # strided slices
    ],
    ids=["transposed", "permuted", "channels_last", "sliced"],
)
def test_non_contiguous_inputs(monkeypatch, backend, dtype, training, make):
    rtol, atol = tol(dtype)
    x = make(dtype)
    assert not x.is_contiguous()
    c = x.shape[1]
    w, b = torch.rand(c, dtype=dtype) + 0.5, torch.randn(c, dtype=dtype)
    rm, rv = torch.randn(c, dtype=dtype), torch.rand(c, dtype=dtype) + 0.5
    rm2, rv2 = rm.clone(), rv.clone()
    xr = x.detach().clone().requires_grad_(True)
    xo = x.detach().clone().requires_grad_(True)
    y_ref = F.batch_norm(xr, rm, rv, w, b, training, 0.1, 1e-5)
    y_ours = fastnorm.functional.batch_norm(xo, rm2, rv2, w, b, training, 0.1, 1e-5, backend=backend)
    dy = torch.randn_like(y_ref)
    y_ref.backward(dy)
    y_ours.backward(dy)
    assert_close(y_ours, y_ref, rtol, atol, "output")
    assert_close(xo.grad, xr.grad, rtol, atol, "dx")
    assert_close(rm2, rm, rtol, atol, "running_mean")
    assert_close(rv2, rv, rtol, atol, "running_var")


@pytest.mark.parametrize("backend", BN_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
def test_outputs_from_the_buffer_pool(monkeypatch, pool_min_bytes, backend, dtype, channels_last):
    """Outputs of at least ``pool.min_bytes`` (1 MB) come from fastnorm's CPU buffer pools (the
    Python one, or the C++ node's): the same layouts as torch's, the same values as torch.empty's
    outputs (bit for bit), and each block back in the pool once its tensors are gone. The
    threshold is lowered here so that small tensors take that path (and raised first, so that
    the others do not)."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = (torch.randn(4, 6, 5, 3) * 2 + 1).to(dtype).contiguous(memory_format=fmt)
    dy = torch.randn(4, 6, 5, 3).to(dtype).contiguous(memory_format=fmt)
    params = torch.float32 if dtype == torch.bfloat16 else dtype  # bfloat16 input, float32 parameters
    ours = fastnorm.nn.BatchNorm2d(6, backend=backend, dtype=params)
    state = {k: v.clone() for k, v in ours.state_dict().items()}
    pool_min_bytes(1 << 62)
    y_plain, g_plain = _grads(ours, x, dy)  # outputs from torch.empty
    ours.zero_grad()
    ours.load_state_dict(state)
    pool_min_bytes(1)
    before = pools_in_use()
    y_pooled, g_pooled = _grads(ours, x, dy)
    assert pools_in_use() > before, "no output came from the pool"
    ref = torch.nn.BatchNorm2d(6, dtype=params)
    ref.load_state_dict(state)
    y_ref, g_ref = _grads(ref, x, dy)
    assert y_pooled.stride() == y_ref.stride() and g_pooled["x"].stride() == g_ref["x"].stride()
    assert torch.equal(y_pooled, y_plain)
    for k in g_plain:
        assert torch.equal(g_pooled[k], g_plain[k]), k
    if dtype != torch.bfloat16:  # (bfloat16 against torch: tests/test_mixed_precision.py)
        rtol, atol = tol(dtype)
        assert_close(y_pooled, y_ref, rtol, atol, "output")
        for k in g_ref:
            assert_close(g_pooled[k], g_ref[k], rtol, atol, f"grad {k}")
    del y_pooled, g_pooled
    assert pools_in_use() == before, "a block did not return to the pool"


# inputs whose strides differ from their layout's canonical ones only at size-1 dimensions
STRIDED_ALIKE = {
    "permuted, W = 1": lambda: torch.randn(2, 3, 3, 1).permute(0, 3, 1, 2),  # (2, 1, 3, 3), strides (9, 1, 3, 1)
    "channels-last, H = W = 1": lambda: torch.randn(4, 3, 1, 1).contiguous(memory_format=torch.channels_last),
    "channels-last": lambda: torch.randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last),
}


@pytest.mark.parametrize("backend", BN_BACKENDS)
@pytest.mark.parametrize("pooled", [False, True], ids=["torch.empty", "pool"])
@pytest.mark.parametrize("make", STRIDED_ALIKE.values(), ids=STRIDED_ALIKE.keys())
def test_output_and_gradient_strides_are_torchs(monkeypatch, pool_min_bytes, backend, pooled, make):
    """y has its layout's canonical strides and dx the input's, as torch's (they differ at size-1
    dimensions: seen by hooks, .grad and later views), from torch's allocator or a pool."""
    if pooled:
        pool_min_bytes(1)
    x = make()
    strides = []
    for module in (torch.nn.BatchNorm2d(x.shape[1]), fastnorm.nn.BatchNorm2d(x.shape[1], backend=backend)):
        xg = x.detach().requires_grad_(True)
        seen = []
        y = module(xg)
        xg.register_hook(lambda g, seen=seen: seen.append(g.stride()))
        y.backward(torch.ones_like(y))
        strides.append((y.stride(), seen[0], xg.grad.stride()))
    assert strides[1] == strides[0], f"(y, dx, x.grad) strides: fastnorm {strides[1]}, torch {strides[0]}"


@pytest.mark.parametrize("backend", BN_BACKENDS)
@pytest.mark.parametrize("shape", [(0, 3), (0, 3, 4), (2, 3, 0)], ids=str)
def test_empty_batch(backend, shape):
    """torch: empty output, zero weight/bias gradients, running statistics untouched."""
    results = []
    for fn in (
        lambda *a: F.batch_norm(*a, training=True),
        lambda *a: fastnorm.functional.batch_norm(*a, training=True, backend=backend),
    ):
        x = torch.empty(shape, requires_grad=True)
        w = torch.ones(3, requires_grad=True)
        b = torch.zeros(3, requires_grad=True)
        rm, rv = torch.full((3,), 0.5), torch.full((3,), 2.0)
        y = fn(x, rm, rv, w, b)
        y.sum().backward()
        results.append((y, x.grad, w.grad, b.grad, rm, rv))
    for ours, ref, what in zip(results[1], results[0], ["y", "dx", "dw", "db", "rm", "rv"]):
        assert_close(ours, ref, 0, 0, what)


@pytest.mark.parametrize("backend", BN_BACKENDS)
def test_nan_and_inf_propagate_like_torch(backend):
    x = torch.randn(6, 4)
    x[0, 0] = float("nan")  # channel 0: NaN everywhere
    x[1, 1] = float("inf")  # channel 1: mean inf, variance NaN
    x[2, 2], x[3, 2] = float("inf"), float("-inf")  # channel 2: NaN
    out = []
    for fn in (F.batch_norm, lambda *a, **k: fastnorm.functional.batch_norm(*a, **k, backend=backend)):
        rm, rv = torch.zeros(4), torch.ones(4)
        out.append((fn(x, rm, rv, training=True), rm, rv))
    for ours, ref, what in zip(out[1], out[0], ["y", "running_mean", "running_var"]):
        assert_close(ours, ref, 1e-5, 1e-6, what)


@pytest.mark.parametrize("backend", BN_BACKENDS)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("shape", [(6, 4), (3, 2, 5), (2, 3, 2, 3)], ids=str)
def test_gradcheck_float64(monkeypatch, backend, training, affine, shape):
    c = shape[1]
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    w = (torch.rand(c, dtype=torch.float64) + 0.5).requires_grad_(affine)
    b = torch.randn(c, dtype=torch.float64).requires_grad_(affine)
    rm, rv = torch.randn(c, dtype=torch.float64), torch.rand(c, dtype=torch.float64) + 0.5

    def fn(x, w, b):
        # running statistics are cloned: gradcheck calls fn many times
        return fastnorm.functional.batch_norm(x, rm.clone(), rv.clone(), w, b, training, 0.1, 1e-5, backend=backend)

    assert torch.autograd.gradcheck(fn, (x, w, b), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", BN_BACKENDS)
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("make", [lambda: torch.randn(6, 4), lambda: torch.randn(3, 3, 4, 3)[:, :, ::2].mT],
                         ids=["(6, 4)", "strided (3, 3, 3, 2)"])  # fmt: skip
def test_gradgradcheck_float64(monkeypatch, backend, affine, make):
    """Second derivatives in training (create_graph=True: torch operations on the saved tensors),
    also of an input that the forward copies to a dense one first."""
    x = make().double().requires_grad_(True)
    c = x.shape[1]
    w = (torch.rand(c, dtype=torch.float64) + 0.5).requires_grad_(affine)
    b = torch.randn(c, dtype=torch.float64).requires_grad_(affine)

    def fn(x, w, b):
        return fastnorm.functional.batch_norm(x, None, None, w, b, True, 0.1, 1e-5, backend=backend)

    assert torch.autograd.gradgradcheck(fn, (x, w, b), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BN_BACKENDS)
def test_functional_running_stats_none_in_training(backend):
    x = torch.randn(10, 5, dtype=torch.float64)
    y_ref = F.batch_norm(x, None, None, training=True)
    y = fastnorm.functional.batch_norm(x, None, None, training=True, backend=backend)
    assert_close(y, y_ref, *tol(torch.float64), "output")


@pytest.mark.parametrize("backend", BN_BACKENDS)
def test_large_offset_input_is_accurate(backend):
    """mean 1e4, std 1: E[x^2]-E[x]^2 in float32 would cancel catastrophically."""
    x = torch.randn(4096, 8, dtype=torch.float64) + 1e4
    x32 = x.float()  # rounded to float32: spacing 1e-3 at 1e4
    rm64, rv64 = torch.zeros(8, dtype=torch.float64), torch.ones(8, dtype=torch.float64)
    truth = F.batch_norm(x32.double(), rm64, rv64, training=True)  # float64 on the same values
    rm32, rv32 = torch.zeros(8), torch.ones(8)
    y = fastnorm.functional.batch_norm(x32, rm32, rv32, training=True, backend=backend)
    assert_close(y, truth, 0, 1e-5, "normalised output")  # torch float32: 7e-3
    assert_close(rm32, rm64, 1e-6, 0, "running_mean")
    assert_close(rv32, rv64, 1e-5, 0, "running_var")


#: saved-tensor hooks that give the saved tensors back in another layout or dtype
SAVED_TENSOR_HOOKS = {
    "save_on_cpu": lambda: torch.autograd.graph.save_on_cpu(pin_memory=True),
    "made contiguous": lambda: torch.autograd.graph.saved_tensors_hooks(lambda t: t.contiguous(), lambda t: t),
    "widened to float64": lambda: torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t.double()),
}


@pytest.mark.parametrize("backend", BN_BACKENDS)
@pytest.mark.parametrize("hooks", SAVED_TENSOR_HOOKS.values(), ids=SAVED_TENSOR_HOOKS.keys())
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
def test_saved_tensor_hooks(monkeypatch, backend, hooks, channels_last):
    """The backward reads the saved input as a hook gives it back: another layout is read as such
    (a channels-last input repacked contiguous gave dx off by 0.8), another dtype raises as
    torch's backward does (never a kernel reading float64 as float32)."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(4, 6, 5, 7).contiguous(memory_format=fmt)
    dy = torch.linspace(-1, 1, x.numel()).reshape(x.shape)
    results = []
    for fn in (F.batch_norm, lambda *a: fastnorm.functional.batch_norm(*a, backend=backend)):
        xg, w = x.clone().requires_grad_(True), torch.linspace(0.5, 1.5, 6).requires_grad_(True)
        with hooks():
            y = fn(xg, None, None, w, None, True)
        try:
            results.append((torch.autograd.grad(y, (xg, w), dy), None))
        except RuntimeError as error:
            results.append((None, error))
    (theirs, their_error), (ours, our_error) = results
    assert (their_error is None) == (our_error is None), f"torch: {their_error!r}, fastnorm: {our_error!r}"
    if theirs is not None:
        for a, b, what in zip(ours, theirs, ("dx", "dweight")):
            assert_close(a, b, 1e-4, 2e-5, what)


@pytest.mark.parametrize("backend", BN_BACKENDS)
def test_strided_running_statistics_two_forwards_then_backward(monkeypatch, backend):
    """Strided running statistics are updated through a dense copy and written back without a
    version bump, as torch's are: a second forward before the first one's backward does not make
    that backward raise the in-place error (it did, on every fastnorm path)."""
    grads = []
    for fn in (F.batch_norm, lambda *a: fastnorm.functional.batch_norm(*a, backend=backend)):
        stats = torch.stack([torch.zeros(5), torch.ones(5)], dim=1)  # (5, 2): columns of stride 2
        x = torch.randn(8, 5, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
        w = torch.linspace(0.5, 1.5, 5).requires_grad_(True)
        y1 = fn(x, stats[:, 0], stats[:, 1], w, None, True)
        fn(x * 2, stats[:, 0], stats[:, 1], w, None, True)
        grads.append((*torch.autograd.grad(y1, (x, w), torch.ones_like(y1)), stats))
    for a, b, what in zip(grads[1], grads[0], ("dx", "dweight", "running statistics")):
        assert_close(a, b, 1e-4, 2e-5, what)
