"""8-bit optimizer state (Adam8bit, AdamW8bit, Lion8bit) against its oracles.

- The format: quant8's maps equal bitsandbytes' ``create_dynamic_map`` bit for bit; the kernels'
  two-load table gives the nearest code (``bucketize`` on the float32 midpoints) for every
  midpoint, its float32 neighbours and random values; bitsandbytes' own CPU quantizer (a binary
  search) differs from the nearest code by one code for a fraction of values (stated below).
- bitsandbytes (CPU, dev extra) step by step: both optimizers start each step from the same state
  (bitsandbytes' checkpoint loaded into fastnorm's, which tests that loading too); after the step
  the parameters agree within float32 roundings and the codes are equal or one code apart, in a
  fraction :data:`BNB_CODE_FRACTION` at most (bitsandbytes' quantizer, and its multiply-add order
  for the moments: ``m*beta1 + (1-beta1)*g`` against torch's ``lerp``).
- fastnorm's backends: numba against the reference (the readable NumPy oracle), from the same
  state each step: parameters within float32 roundings (numba fuses multiply-adds), codes equal
  or one apart in at most :data:`BACKEND_CODE_FRACTION` of values; the hypothesis machine runs
  random programs (steps, zero_grad, checkpoints, option changes) on both.
- torch's 32-bit AdamW: within the quantization's error after several steps; tensors below
  ``min_8bit_size`` keep float32 state and follow torch's AdamW within float32 roundings.
- checkpoints (bit for bit, to and from bitsandbytes, from a 32-bit torch checkpoint), deepcopy,
  pickle, schedulers, 16-bit parameters, non-contiguous parameters, errors, convergence on MNIST
  and on a Llama-style transformers model, torch.compile.
"""

from __future__ import annotations

import copy
import io
import pickle

import numpy as np
import pytest
import torch
from conftest import assert_close
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastnorm
from fastnorm_kernels import quant8

bnb = pytest.importorskip("bitsandbytes")

CLASSES = ["Adam8bit", "AdamW8bit", "Lion8bit"]
BACKENDS = ["reference", "numba"]
#: sizes: 8-bit (odd, several blocks and a partial one) and one below min_8bit_size (float32 state)
SIZES = [(3 * 4096 + 77,), (65, 131), (100,)]
#: largest fraction of codes one apart from bitsandbytes' after one step from the same state
BNB_CODE_FRACTION = 0.02
#: values below this fraction of their block's absmax: see _code_gap
TINY = 1e-4
#: largest fraction of codes one apart between numba and the reference after one step
BACKEND_CODE_FRACTION = 1e-3


def _params(dtype=torch.float32, seed=0, sizes=SIZES):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).to(dtype) for s in sizes]


def _grads(values, step, scale=1.0):
    g = torch.Generator().manual_seed(1000 + step)
    return [(torch.randn(v.shape, generator=g) * scale).to(v.dtype) for v in values]


def _code_gap(a: torch.Tensor, b: torch.Tensor, signed: bool | None = None) -> tuple[float, int]:
    """(fraction of codes that differ, largest difference). With ``signed`` (the map), codes whose
    values are both below :data:`TINY` of the block's absmax are left out: there bitsandbytes'
    binary search lands up to 7 codes from the nearest (a value of 1e-6 of the absmax coded as
    1.5e-5: an error the absmax's float32 rounding already makes), and values that small do not
    move an Adam step."""
    d = (a.int() - b.int()).abs()
    if signed is not None:
        code = torch.from_numpy(quant8.dynamic_map(signed).copy())
        tiny = (code[a.long()].abs() < TINY) & (code[b.long()].abs() < TINY)
        d = torch.where(tiny, 0, d)
    return (d != 0).float().mean().item(), int(d.max().item())


# -- the format -----------------------------------------------------------------------------


@pytest.mark.parametrize("signed", [True, False])
def test_maps_equal_bitsandbytes_bit_for_bit(signed):
    ours = quant8.dynamic_map(signed)
    theirs = bnb.functional.create_dynamic_map(signed=signed).numpy()
    assert ours.dtype == np.float32 and ours.shape == (256,)
    assert np.array_equal(ours.view(np.uint32), theirs.view(np.uint32))


@pytest.mark.parametrize("signed", [True, False])
def test_table_gives_the_nearest_code(signed):
    """The kernels' table (base + (x > bound)) against bucketize on the midpoints, at every
    midpoint, its float32 neighbours, every code, signed zero, +-1 and random values of every scale."""
    code = quant8.dynamic_map(signed)
    mids = quant8.midpoints(code)
    rng = np.random.default_rng(0)
    x = np.concatenate([mids, np.nextafter(mids, 2), np.nextafter(mids, -2), code, -code, [0.0, -0.0, 1.0, -1.0],
                        rng.uniform(-1, 1, 200_000), rng.standard_normal(200_000) * 1e-3,
                        rng.standard_normal(200_000) * 1e-6, rng.standard_normal(1000) * 1e-9])  # fmt: skip
    x = np.clip(x, -1, 1).astype(np.float32)
    if not signed:
        x = np.abs(x)
    base, bound = quant8.lookup_table(signed)
    bits = x.view(np.uint32).astype(np.int64)
    index = (bits >> 31) * quant8.CELLS + quant8.cells(bits & 0x7FFFFFFF)
    got = (base[index].astype(np.int64) + (x > bound[index])) % 256
    expected = np.searchsorted(quant8.thresholds(signed), x, side="left")
    assert np.array_equal(got, expected)
    # nearest: no neighbour is closer (in float64, up to the rounding of the float32 midpoints)
    x64, code64 = x.astype(np.float64), code.astype(np.float64)
    slack = 2.0**-22 * np.abs(x64) + 1e-30
    floor = (x > 0) & (x < quant8.midpoints(code)[0]) & (not signed)  # the unsigned map's smallest code
    assert np.all(got[floor] == 1)
    for neighbour in (np.clip(got + 1, 0, 255), np.clip(got - 1, 0, 255)):
        closer = np.abs(code64[got] - x64) <= np.abs(code64[neighbour] - x64) + slack
        assert np.all(closer | floor)


@pytest.mark.parametrize("signed", [True, False])
def test_bitsandbytes_quantizer_is_the_nearest_code_within_one(signed):
    """bitsandbytes' CPU quantizer is a binary search that lands one code off the nearest for a
    fraction of values (measured here: 0.15% signed, 0.3% unsigned on normal values)."""
    x = torch.randn(256 * 400 + 33, generator=torch.Generator().manual_seed(3))
    x = x if signed else x.abs()
    code = quant8.dynamic_map(signed)
    ours, absmax = quant8.quantize(x.numpy(), code)
    theirs, their_absmax = torch.ops.bitsandbytes.quantize_blockwise(x, torch.from_numpy(code.copy()), 256)
    assert np.array_equal(absmax, their_absmax.numpy())
    fraction, largest = _code_gap(torch.from_numpy(ours), theirs, signed)
    assert largest <= 1 and fraction < 0.005


def test_quantize_edge_blocks():
    """A zero block: absmax 0, codes of 0.0, dequantized 0. A NaN: its block's absmax NaN. The
    round trip is within half the local code spacing times the absmax."""
    code = quant8.dynamic_map(True)
    x = np.zeros(3 * 256 + 5, np.float32)
    x[256:512] = np.linspace(-2, 3, 256)
    x[600] = np.nan
    q, absmax = quant8.quantize(x, code)
    assert absmax[0] == 0 and np.all(code[q[:256]] == 0) and np.all(quant8.dequantize(q, absmax, code)[:256] == 0)
    assert absmax[1] == 3 and np.isnan(absmax[2]) and absmax[3] == 0
    back = quant8.dequantize(q, absmax, code)[256:512]
    assert np.abs(back - x[256:512]).max() <= 3 * 0.0141 / 2 + 1e-6  # the top decade's spacing: 0.9/64


# -- against bitsandbytes, step by step -----------------------------------------------------


@pytest.mark.parametrize("name", CLASSES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_each_step_follows_bitsandbytes(name, backend):
    values = _params()
    ours = [torch.nn.Parameter(v.clone()) for v in values]
    theirs = [torch.nn.Parameter(v.clone()) for v in values]
    kw = dict(lr=1e-2, weight_decay=0.1) if name == "Lion8bit" else dict(lr=1e-2, weight_decay=0.05)
    opt = getattr(fastnorm.optim, name)(ours, backend=backend, **kw)
    ref = getattr(bnb.optim, name)(theirs, **kw)
    worst = 0.0
    for step in range(6):
        opt.load_state_dict(ref.state_dict())  # bitsandbytes' checkpoint, wrapped keys and all
        with torch.no_grad():
            for p, q in zip(ours, theirs):
                p.copy_(q)
        for p, q, g in zip(ours, theirs, _grads(values, step)):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
        for p, q in zip(ours, theirs):
            s, r = opt.state[p], ref.state[q]
            assert s["step"] == r["step"] == step + 1
            assert_close(p, q, 1e-5, 1e-6, f"{name} step {step + 1} parameter")
            for i in (1, 2):
                if f"state{i}" not in r:
                    continue
                if "absmax1" in r:
                    fraction, largest = _code_gap(s[f"state{i}"], r[f"state{i}"], signed=i == 1)
                    assert largest <= 1, f"state{i} codes {largest} apart"
                    worst = max(worst, fraction)
                    assert_close(s[f"absmax{i}"], r[f"absmax{i}"], 1e-5, 0, f"absmax{i}")
                else:
                    assert s[f"state{i}"].dtype == torch.float32
                    assert_close(s[f"state{i}"], r[f"state{i}"], 1e-5, 1e-7, f"state{i} (32-bit)")
    print(f"{name} {backend}: at most {worst:.2%} of codes one apart from bitsandbytes'")
    assert worst <= BNB_CODE_FRACTION, f"{worst:.2%} of codes one apart from bitsandbytes'"


@pytest.mark.parametrize("name", CLASSES)
def test_state_layout_is_bitsandbytes(name):
    values = _params()
    ours = [torch.nn.Parameter(v.clone()) for v in values]
    theirs = [torch.nn.Parameter(v.clone()) for v in values]
    opt, ref = getattr(fastnorm.optim, name)(ours), getattr(bnb.optim, name)(theirs)
    for p, q, g in zip(ours, theirs, _grads(values, 0)):
        p.grad, q.grad = g.clone(), g.clone()
    opt.step()
    ref.step()
    for p, q in zip(ours, theirs):
        s, r = opt.state[p], ref.state[q]
        assert list(s) == list(r)
        for k, v in r.items():
            if isinstance(v, torch.Tensor):
                assert (s[k].dtype, s[k].shape) == (v.dtype, v.shape), k
    assert opt.param_groups[0].keys() == ref.param_groups[0].keys()
    ours_sd, theirs_sd = opt.state_dict(), ref.state_dict()
    assert [sorted(v) for v in ours_sd["state"].values()] == [sorted(v) for v in theirs_sd["state"].values()]


@pytest.mark.parametrize("name", CLASSES)
def test_checkpoints_move_both_ways(name):
    """fastnorm's checkpoint loads into bitsandbytes' optimizer and the two continue together (as
    in the step-by-step test); bitsandbytes' loads into fastnorm's."""
    values = _params()
    ours = [torch.nn.Parameter(v.clone()) for v in values]
    opt = getattr(fastnorm.optim, name)(ours)
    for step in range(3):
        for p, g in zip(ours, _grads(values, step)):
            p.grad = g
        opt.step()
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    ref = getattr(bnb.optim, name)(theirs)
    ref.load_state_dict(opt.state_dict())
    for p, q in zip(ours, theirs):
        for k, v in opt.state[p].items():
            if k == "step":  # torch's scalar tensor here, bitsandbytes' int there
                assert v.item() == ref.state[q][k] == 3
            else:
                assert torch.equal(v, ref.state[q][k]), k
    for p, q, g in zip(ours, theirs, _grads(values, 3)):
        p.grad, q.grad = g.clone(), g.clone()
    opt.step()
    ref.step()
    for p, q in zip(ours, theirs):
        assert_close(p, q, 1e-5, 1e-6, "parameter after the loaded step")
        if "absmax1" in opt.state[p]:
            assert _code_gap(opt.state[p]["state1"], ref.state[q]["state1"], signed=True)[1] <= 1


# -- fastnorm's backends ---------------------------------------------------------------------


@pytest.mark.parametrize("name", CLASSES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_numba_follows_the_reference(name, dtype):
    values = _params(dtype)
    runs = {b: [torch.nn.Parameter(v.clone()) for v in values] for b in BACKENDS}
    opts = {b: getattr(fastnorm.optim, name)(runs[b], lr=1e-2, weight_decay=0.1, backend=b) for b in BACKENDS}
    worst = 0.0
    for step in range(5):
        opts["numba"].load_state_dict(opts["reference"].state_dict())
        with torch.no_grad():
            for p, q in zip(runs["numba"], runs["reference"]):
                p.copy_(q)
        for p, q, g in zip(runs["numba"], runs["reference"], _grads(values, step)):
            p.grad, q.grad = g.clone(), g.clone()
        for o in opts.values():
            o.step()
        for p, q in zip(runs["numba"], runs["reference"]):
            if dtype == torch.float32:
                assert_close(p, q, 1e-5, 1e-6, "parameter")
            else:  # rounded once from float32 values within roundings: one ulp of the 16-bit type
                ulp = 2.0**-7 if dtype == torch.bfloat16 else 2.0**-10
                assert ((p.float() - q.float()).abs() <= ulp * q.float().abs() + 1e-6).all()
            s, r = opts["numba"].state[p], opts["reference"].state[q]
            for i in (1, 2):
                if f"absmax{i}" in r:
                    fraction, largest = _code_gap(s[f"state{i}"], r[f"state{i}"])
                    assert largest <= 1
                    worst = max(worst, fraction)
                elif f"state{i}" in r:
                    assert_close(s[f"state{i}"], r[f"state{i}"], 1e-5, 1e-7, "32-bit state")
    print(f"{name} {dtype}: at most {worst:.3%} of codes one apart")
    assert worst <= BACKEND_CODE_FRACTION, f"{worst:.3%} of codes one apart"


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(CLASSES), program=st.lists(st.sampled_from(["step", "step", "zero", "save", "lr", "wd"]),
                                                       min_size=1, max_size=8), seed=st.integers(0, 2**16))  # fmt: skip
def test_differential_programs(name, program, seed):
    """Random programs on both backends: numba's run stays within the codes' rounding of the
    reference's (parameters within 1e-4 of each other after up to 8 steps)."""
    values = _params(seed=seed, sizes=[(4096 + 300,), (50,)])
    runs = {b: [torch.nn.Parameter(v.clone()) for v in values] for b in BACKENDS}
    opts = {b: getattr(fastnorm.optim, name)(runs[b], lr=1e-2, backend=b) for b in BACKENDS}
    for i, op in enumerate(program):
        for b, o in opts.items():
            if op == "step":
                for p, g in zip(runs[b], _grads(values, seed + i)):
                    p.grad = g
                o.step()
            elif op == "zero":
                o.zero_grad()
            elif op == "save":
                o.load_state_dict(copy.deepcopy(o.state_dict()))
            elif op == "lr":
                o.param_groups[0]["lr"] *= 0.5
            elif op == "wd":
                o.param_groups[0]["weight_decay"] = 0.05
    for p, q in zip(runs["numba"], runs["reference"]):
        assert_close(p, q, 1e-4, 1e-4, "parameter")


# -- against torch's 32-bit AdamW --------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_adamw8bit_within_the_quantization_error_of_torch(backend):
    """After 10 steps every parameter is within 10 * lr of torch's 32-bit AdamW (each step moves a
    weight by about lr), and on average within 2% of that; tensors with float32 state (below
    min_8bit_size) follow torch's AdamW within float32 roundings."""
    values = _params()
    ours = [torch.nn.Parameter(v.clone()) for v in values]
    theirs = [torch.nn.Parameter(v.clone()) for v in values]
    lr = 1e-3
    opt = fastnorm.optim.AdamW8bit(ours, lr=lr, backend=backend)
    ref = torch.optim.AdamW(theirs, lr=lr, weight_decay=1e-2)
    for step in range(10):
        for p, q, g in zip(ours, theirs, _grads(values, step)):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
    for p, q in zip(ours, theirs):
        gap = (p - q).abs()
        if "absmax1" in opt.state[p]:
            assert gap.max() <= 10 * lr and gap.mean() <= 0.02 * 10 * lr, (gap.max(), gap.mean())
        else:
            assert_close(p, q, 1e-5, 1e-7, "float32-state parameter")


# -- checkpoints, copies, schedulers, layouts, errors ---------------------------------------------


@pytest.mark.parametrize("name", CLASSES)
def test_state_dict_round_trips_bit_for_bit(name):
    values = _params()
    a = [torch.nn.Parameter(v.clone()) for v in values]
    opt = getattr(fastnorm.optim, name)(a)
    for step in range(2):
        for p, g in zip(a, _grads(values, step)):
            p.grad = g
        opt.step()
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    other = getattr(fastnorm.optim, name)(b)
    other.load_state_dict(torch.load(io.BytesIO(buffer.getvalue()), weights_only=False))
    clone = pickle.loads(pickle.dumps(opt))
    assert type(clone) is type(opt) and len(clone.state) == len(opt.state)
    for step in range(2, 4):
        for p, q, g in zip(a, b, _grads(values, step)):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        other.step()
    for p, q in zip(a, b):
        assert torch.equal(p, q)
        for k, v in opt.state[p].items():
            w = other.state[q][k]
            assert torch.equal(v, w) if isinstance(v, torch.Tensor) else v == w
            if isinstance(v, torch.Tensor):
                assert v.dtype == w.dtype


def test_a_32bit_torch_checkpoint_loads_quantized():
    values = _params()
    a = [torch.nn.Parameter(v.clone()) for v in values]
    torch_opt = torch.optim.AdamW(a, lr=1e-3)
    for p, g in zip(a, _grads(values, 0)):
        p.grad = g
    torch_opt.step()
    opt = fastnorm.optim.AdamW8bit(a)
    opt.load_state_dict(torch_opt.state_dict())
    for p in a:
        s, t = opt.state[p], torch_opt.state[p]
        assert s["step"] == 1
        if "absmax1" in s:
            m = quant8.dequantize(s["state1"].numpy(), s["absmax1"].numpy(), quant8.dynamic_map(True))
            v = quant8.dequantize(s["state2"].numpy(), s["absmax2"].numpy(), quant8.dynamic_map(False))
            assert np.abs(m - t["exp_avg"].numpy()).max() <= 0.01 * t["exp_avg"].abs().max().item()
            assert np.abs(v - t["exp_avg_sq"].numpy()).max() <= 0.01 * t["exp_avg_sq"].max().item()
        else:
            assert torch.equal(s["state1"], t["exp_avg"]) and torch.equal(s["state2"], t["exp_avg_sq"])
    opt.step()  # and it steps on


def test_deepcopy_steps_like_the_original():
    values = _params()
    a = [torch.nn.Parameter(v.clone()) for v in values]
    opt = fastnorm.optim.Adam8bit(a)
    for p, g in zip(a, _grads(values, 0)):
        p.grad = g
    opt.step()
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    twin = fastnorm.optim.Adam8bit(b)
    twin.load_state_dict(copy.deepcopy(opt).state_dict())
    for p, q, g in zip(a, b, _grads(values, 1)):
        p.grad, q.grad = g.clone(), g.clone()
    opt.step()
    twin.step()
    assert all(torch.equal(p, q) for p, q in zip(a, b))


def test_scheduler_and_param_groups():
    values = _params()
    a = [torch.nn.Parameter(v.clone()) for v in values]
    b = [torch.nn.Parameter(v.clone()) for v in values]
    opt = fastnorm.optim.AdamW8bit([{"params": a[:1], "lr": 1e-2}, {"params": a[1:]}], lr=1e-3)
    ref = fastnorm.optim.AdamW8bit([{"params": b[:1], "lr": 1e-2}, {"params": b[1:]}], lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5**s)
    for step in range(3):
        for p, q, g in zip(a, b, _grads(values, step)):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        sched.step()
        ref.step()
        for group, factor in zip(ref.param_groups, (1e-2, 1e-3)):
            group["lr"] = factor * 0.5 ** (step + 1)
    assert all(torch.equal(p, q) for p, q in zip(a, b))


def test_non_contiguous_parameters():
    base = torch.randn(80, 70)
    a = torch.nn.Parameter(base.t().clone().t())  # a transposed layout
    assert not a.t().is_contiguous() or not a.is_contiguous()
    b = torch.nn.Parameter(base.clone())
    opt, ref = fastnorm.optim.AdamW8bit([a], min_8bit_size=256), fastnorm.optim.AdamW8bit([b], min_8bit_size=256)
    for _ in range(2):
        g = torch.randn(80, 70)
        a.grad, b.grad = g.t().contiguous().t(), g.clone()
        opt.step()
        ref.step()
    assert torch.equal(a, b)


def test_errors_name_the_problem():
    p = torch.nn.Parameter(torch.randn(10))
    with pytest.raises(ValueError, match="amsgrad"):
        fastnorm.optim.Adam8bit([p], amsgrad=True)
    with pytest.raises(ValueError, match="optim_bits"):
        fastnorm.optim.Adam8bit([p], optim_bits=8)
    with pytest.raises(ValueError, match="Invalid learning rate"):
        fastnorm.optim.AdamW8bit([p], lr=-1)
    with pytest.raises(ValueError, match="Invalid beta parameter at index 1"):
        fastnorm.optim.Lion8bit([p], betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="backend"):
        fastnorm.optim.AdamW8bit([p], backend="torch")
    for bad, error, match in [(torch.randn(5, dtype=torch.float64), TypeError, "float64"),
                              (torch.randn(5, dtype=torch.complex64), TypeError, "complex")]:  # fmt: skip
        q = torch.nn.Parameter(bad)
        q.grad = torch.ones_like(q)
        with pytest.raises(error, match=match):
            fastnorm.optim.AdamW8bit([q]).step()
    p.grad = torch.ones(10)
    p.grad.data = torch.ones(11)  # torch's .grad setter refuses it; .data does not
    opt = fastnorm.optim.AdamW8bit([p])
    with pytest.raises(RuntimeError, match="gradient must match"):
        opt.step()
    assert len(opt.state) == 0  # nothing was touched
    p.grad = torch.ones(10).to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()


def test_state_is_two_bytes_a_parameter():
    p = torch.nn.Parameter(torch.randn(1 << 20))
    p.grad = torch.randn_like(p)
    opt = fastnorm.optim.AdamW8bit([p])
    opt.step()
    own = sum(v.numel() * v.element_size() for k, v in opt.state[p].items()
              if isinstance(v, torch.Tensor) and not k.startswith("qmap"))  # fmt: skip
    assert own / p.numel() <= 2.1  # 2 codes + 8 bytes of absmax per 256 values = 2.03


def test_nan_gradients_propagate_like_torch():
    """A NaN gradient makes its parameter NaN (as torch's AdamW) and its block's state NaN."""
    p = torch.nn.Parameter(torch.zeros(4096))
    g = torch.ones(4096)
    g[5] = float("nan")
    p.grad = g
    opt = fastnorm.optim.AdamW8bit([p], backend="numba")
    opt.step()
    assert torch.isnan(p[5]) and torch.isnan(opt.state[p]["absmax1"][0]) and not torch.isnan(p[300])


# -- torch.compile ---------------------------------------------------------------------------

COMPILE_SCRIPT = r"""
import json, torch, fastnorm
torch.manual_seed(0)
shapes = ((70, 80), (4096 + 5,), (33,))
ours = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
eager = [torch.nn.Parameter(p.detach().clone()) for p in ours]
opt = fastnorm.optim.AdamW8bit(ours, lr=1e-2, backend="numba")
ref = fastnorm.optim.AdamW8bit(eager, lr=1e-2, backend="numba")

@torch.compile(fullgraph=True)
def step():
    opt.step()

for _ in range(5):
    for p, q in zip(ours, eager):
        p.grad = torch.randn_like(p)
        q.grad = p.grad.clone()
    step()
    ref.step()
graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
same = all(torch.equal(p, q) for p, q in zip(ours, eager))
state = all(torch.equal(opt.state[p][k], ref.state[q][k]) for p, q in zip(ours, eager) for k in opt.state[p])
explained = torch._dynamo.explain(opt.step)()
nodes = [str(n.target) for g in explained.graphs for n in g.graph.nodes
         if n.op == "call_function" and "fastnorm" in str(n.target)]
print("RESULTS " + json.dumps(dict(params=same, state=state, graphs=graphs, breaks=explained.graph_break_count,
                                   nodes=nodes)))
"""


def test_a_compiled_step_is_one_op_and_the_eager_bits():
    """In a fresh interpreter (tests/test_compile.py says why): ``opt.step()`` compiles with
    ``fullgraph=True`` to one ``fastnorm.step_8bit_`` node, gives the eager step's bits over five
    steps, and compiles twice (the step that creates the state, then the steady one): the step
    counters are tensors, so a new count is not a new graph."""
    import json
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", COMPILE_SCRIPT], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    r = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("RESULTS "))[8:])
    assert r["params"] and r["state"] and r["breaks"] == 0 and r["nodes"] == ["fastnorm.step_8bit_"], r
    assert r["graphs"] <= 2, r


# -- stochastic rounding of bfloat16 parameters --------------------------------------------------


@pytest.mark.parametrize("name", ["AdamW8bit", "Lion8bit"])
def test_stochastic_rounding_follows_the_reference(name):
    """The same random bits on both backends (kernels/fastnorm_kernels/_bits.py's generator, row
    0 of each tensor, a seed per launch from torch.initial_seed()): parameters within one bfloat16
    ulp where the float32 values differ by a rounding, equal elsewhere."""
    values = _params(torch.bfloat16)
    runs = {}
    for backend in BACKENDS:
        torch.manual_seed(5)
        params = [torch.nn.Parameter(v.clone()) for v in values]
        opt = getattr(fastnorm.optim, name)(params, lr=1e-3, backend=backend, stochastic_rounding=True)
        for step in range(3):
            for p, g in zip(params, _grads(values, step)):
                p.grad = g
            opt.step()
        runs[backend] = params
    for p, q in zip(runs["numba"], runs["reference"]):
        gap = (p.float() - q.float()).abs()
        assert (gap <= 2.0**-7 * q.float().abs() + 1e-30).all()
        assert (gap == 0).float().mean() > 0.99


def test_stochastic_rounding_keeps_updates_below_an_ulp():
    """Lion moves each weight by lr a step: 1e-4 is 1/80 of a bfloat16 ulp at 1.0. Rounded to
    nearest the weights never move; rounded stochastically they move by lr a step on average."""
    start = torch.ones(8192, dtype=torch.bfloat16)
    moved = {}
    for rounding in (False, True):
        p = torch.nn.Parameter(start.clone())
        opt = fastnorm.optim.Lion8bit([p], lr=1e-4, stochastic_rounding=rounding)
        for _ in range(50):
            p.grad = torch.ones_like(p)
            opt.step()
        moved[rounding] = (1.0 - p.float()).mean().item()
    assert moved[False] == 0.0
    assert abs(moved[True] - 50 * 1e-4) < 0.1 * 50 * 1e-4, moved


def test_stochastic_rounding_needs_bfloat16():
    with pytest.raises(ValueError, match="bfloat16"):
        fastnorm.optim.AdamW8bit([torch.nn.Parameter(torch.zeros(3))], stochastic_rounding=True)


# -- float32 master weights of 16-bit parameters -------------------------------------------------


@pytest.mark.parametrize("name", ["AdamW8bit", "Lion8bit"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_master_weights_step_as_float32_parameters(name, dtype):
    """With master_weights=True a 16-bit model steps exactly as its float32 twin (same float32
    values, gradients widened from 16 bits) and each 16-bit parameter is its master rounded to
    nearest; the master is float32 in state_dict and loads back as float32."""
    values = _params(dtype)
    half = [torch.nn.Parameter(v.clone()) for v in values]
    full = [torch.nn.Parameter(v.float()) for v in values]
    opt = getattr(fastnorm.optim, name)(half, lr=1e-3, master_weights=True)
    ref = getattr(fastnorm.optim, name)(full, lr=1e-3)
    for step in range(3):
        for p, q, g in zip(half, full, _grads(values, step)):
            p.grad, q.grad = g.clone(), g.float()
        opt.step()
        ref.step()
    for p, q in zip(half, full):
        master = opt.state[p]["master_param"]
        assert master.dtype == torch.float32 and torch.equal(master, q)
        assert torch.equal(p, q.to(dtype))
    other = getattr(fastnorm.optim, name)([torch.nn.Parameter(p.detach().clone()) for p in half], master_weights=True)
    other.load_state_dict(opt.state_dict())
    assert all(s["master_param"].dtype == torch.float32 for s in other.state.values())


def test_master_weights_restart_from_an_outside_write():
    p = torch.nn.Parameter(torch.randn(5000).bfloat16())
    opt = fastnorm.optim.AdamW8bit([p], master_weights=True)
    p.grad = torch.randn_like(p)
    opt.step()
    with torch.no_grad():
        p.fill_(0.5)  # e.g. model.load_state_dict
    p.grad = torch.zeros_like(p)
    opt.step()
    assert torch.allclose(opt.state[p]["master_param"], torch.full((5000,), 0.5), atol=1e-2)


def test_pickle_and_deepcopy_keep_the_settings():
    p = torch.nn.Parameter(torch.randn(10).bfloat16())
    opt = fastnorm.optim.AdamW8bit([p], min_8bit_size=7, backend="reference", master_weights=True)
    for clone in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        assert (clone.backend, clone.min_8bit_size, clone.master_weights) == ("reference", 7, True)
