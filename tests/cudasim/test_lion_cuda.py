"""Lion on the cuda backend under the simulator (fastnorm's cuda path on CPU tensors: see
conftest.py): the reference backend's values in float32 and bfloat16 (round to nearest, and
stochastic rounding with the same bits as the CPU backends), and tests/test_lion.py's
differential machine with the cuda backend, fewer and shorter programs (the simulator runs
every GPU thread as a Python thread)."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close
from hypothesis import settings
from test_lion import LionTwins
from ulps import ulps16

import fastnorm

pytestmark = pytest.mark.usefixtures("cuda_backend_on_cpu")

# odd sizes, a single value, one longer than a block of the simulator's launches
SHAPES = [(7,), (3, 5), (1,), (2, 3, 4), (300,)]


def _lockstep(dtype, backends=("cuda", "reference"), steps=4, **precision):
    """The same program on each backend: two groups (their own lr, betas, weight decay,
    maximize), parameters that skip some steps. Returns [(parameters, optimizer)] per backend."""
    torch.manual_seed(1)
    values = [torch.randn(s).to(dtype) for s in SHAPES]
    grads = [[torch.randn(s).to(dtype) for s in SHAPES] for _ in range(steps)]
    runs = []
    for backend in backends:
        params = [torch.nn.Parameter(v.clone()) for v in values]
        opt = fastnorm.optim.Lion([{"params": params[:3], "lr": 1e-2, "weight_decay": 0.1},
                                   {"params": params[3:], "lr": 3e-3, "betas": (0.8, 0.95), "maximize": True}],
                                  backend=backend, **precision)  # fmt: skip
        for step in range(steps):
            for i, (p, g) in enumerate(zip(params, grads[step])):
                p.grad = None if (i + step) % 4 == 3 else g.clone()
            opt.step()
        runs.append((params, opt))
    return runs


def test_float32_follows_the_reference_backend():
    """float32: the reference backend's values within a few float32 roundings (the two compute
    the same expressions; c never comes within those roundings of zero in this program)."""
    (ours, opt), (theirs, ref) = _lockstep(torch.float32)
    for p, q in zip(ours, theirs):
        assert_close(p, q, 1e-6, 1e-7, "parameter")
        assert sorted(opt.state[p]) == ["exp_avg"] and opt.state[p]["exp_avg"].dtype == torch.float32
        assert_close(opt.state[p]["exp_avg"], ref.state[q]["exp_avg"], 1e-6, 1e-7, "exp_avg")


def test_bfloat16_follows_the_reference_backend():
    """bfloat16: float32 arithmetic rounded once on both: every value within one ulp of the
    reference backend's, 99% of them equal; state in bfloat16."""
    (ours, opt), (theirs, ref) = _lockstep(torch.bfloat16)
    pairs = [(p, q) for p, q in zip(ours, theirs)]
    pairs += [(opt.state[p]["exp_avg"], ref.state[q]["exp_avg"]) for p, q in zip(ours, theirs)]
    assert all(a.dtype == torch.bfloat16 for a, _ in pairs)
    distance = torch.cat([ulps16(a.detach(), b.detach()).flatten() for a, b in pairs])
    assert distance.max() <= 1 and (distance == 0).double().mean() >= 0.99


def test_stochastic_rounding_matches_the_cpu_backends():
    """One generator on every backend: the cuda kernels round stochastically as numba and the
    reference do, bit for bit."""
    runs = _lockstep(torch.bfloat16, backends=("cuda", "numba", "reference"), steps=3, stochastic_rounding=True)
    (cuda, _), *others = runs
    for params, _ in others:
        for p, q in zip(cuda, params):
            assert torch.equal(p.detach().view(torch.int16), q.detach().view(torch.int16))


def test_master_weights_follow_the_reference_backend():
    runs = _lockstep(torch.bfloat16, master_weights=True)
    (ours, opt), (theirs, ref) = runs
    for p, q in zip(ours, theirs):
        for key in ("master_param", "exp_avg"):
            assert opt.state[p][key].dtype == torch.float32
            assert_close(opt.state[p][key], ref.state[q][key], 1e-6, 1e-7, key)
        assert torch.equal(p.detach(), opt.state[p]["master_param"].to(torch.bfloat16))


# -- through the C++ op's CUDA launch (fastnorm/csrc/optim_cuda.cpp), as on a GPU ------------------


@pytest.fixture
def lion_through_the_cpp_op(cpp_cuda_launches, monkeypatch):
    """fastnorm.optim's cuda backend through ``torch.ops.fastnorm.lion_``'s CUDA kernel (the C++
    launch code, the kernels under the simulator) on CPU tensors, as tests/cudasim/test_cuda_ops.py
    runs the other optimizers. Yields the launches (kernel, grid, block)."""
    from fastnorm import optim

    cuda_keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)

    class Redispatch(dict):
        def __missing__(self, op):
            fn = getattr(torch.ops.fastnorm, f"{op}_").default
            self[op] = lambda *args, **kwargs: fn.redispatch(cuda_keys, *args, **kwargs)
            return self[op]

    monkeypatch.setattr(optim._kernels, "_cuda_op", lambda backend, tensors: backend.name == "cuda")
    monkeypatch.setattr(optim._kernels, "_OPS", Redispatch())
    return cpp_cuda_launches


@pytest.mark.parametrize("dtype, precision", [(torch.float64, {}), (torch.float32, {}), (torch.bfloat16, {}),
                                              (torch.bfloat16, {"stochastic_rounding": True})], ids=str)  # fmt: skip
def test_the_cpp_op_gives_the_python_launchers_bits(lion_through_the_cpp_op, monkeypatch, dtype, precision):
    from fastnorm import optim

    [(ours, opt)] = _lockstep(dtype, backends=("cuda",), steps=3, **precision)
    assert {function for function, _, _ in lion_through_the_cpp_op} == {"_lion{storage}"}, lion_through_the_cpp_op
    monkeypatch.setattr(optim._kernels, "_cuda_op", lambda backend, tensors: False)
    lion_through_the_cpp_op.clear()
    [(theirs, ref)] = _lockstep(dtype, backends=("cuda",), steps=3, **precision)
    assert not lion_through_the_cpp_op, "the Python launcher ran"
    for p, q in zip(ours, theirs):
        assert torch.equal(p, q), "the C++ and Python launches differ"
        assert torch.equal(opt.state[p]["exp_avg"], ref.state[q]["exp_avg"])


# -- tests/test_lion.py's differential machine ---------------------------------------------------------

LionTwins.backends = ["cuda"]
# a subclass of its own: the machine's TestCase is one class that tests/test_lion.py runs too
TestCudaLionTwins = type("CudaLionTwins", (LionTwins.TestCase,), {})
TestCudaLionTwins.settings = settings(max_examples=4, stateful_step_count=8)
