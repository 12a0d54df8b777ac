"""The 8-bit optimizers' CUDA kernel (kernels/fastnorm_kernels/numba_cuda/optim8.py) under the
simulator, on CPU tensors (conftest.py): one CUDA block per 256 values, the absmax reduced in
shared memory. Against the reference backend, which the simulator's NumPy arithmetic matches
bit for bit: parameters, codes and absmax equal after three steps, for 8-bit tensors (several
blocks and a partial one) and a tensor below min_8bit_size (float32 state), in float32 and the
16-bit storages."""

from __future__ import annotations

import pytest
import torch

import fastnorm

pytestmark = pytest.mark.usefixtures("cuda_backend_on_cpu")


# two states and one, every parameter storage (the simulator runs each GPU thread as a Python thread)
# (the last: bfloat16 rounded stochastically, the generator's bits the same on both backends)
CASES = [("AdamW8bit", torch.float32, False), ("Lion8bit", torch.float32, False),
         ("Adam8bit", torch.bfloat16, False), ("Lion8bit", torch.float16, False),
         ("AdamW8bit", torch.bfloat16, True)]  # fmt: skip


@pytest.mark.parametrize(("name", "dtype", "rounding"), CASES)
def test_cuda_kernel_equals_the_reference(name, dtype, rounding):
    torch.manual_seed(0)
    values = [torch.randn(2 * 256 + 5).to(dtype), torch.randn(7, 3).to(dtype)]
    grads = [[torch.randn(v.shape).to(dtype) for v in values] for _ in range(3)]
    runs = []
    for backend in ("cuda", "reference"):
        torch.manual_seed(7)  # the stochastic rounding seeds
        params = [torch.nn.Parameter(v.clone()) for v in values]
        opt = getattr(fastnorm.optim, name)(params, lr=1e-2, weight_decay=0.1, min_8bit_size=256, backend=backend,
                                            stochastic_rounding=rounding)  # fmt: skip
        for step in range(3):
            for p, g in zip(params, grads[step]):
                p.grad = g.clone()
            opt.step()
        runs.append((params, opt))
    (ours, opt), (theirs, ref) = runs
    for p, q in zip(ours, theirs):
        assert torch.equal(p, q)
        s, r = opt.state[p], ref.state[q]
        assert s.keys() == r.keys() and s["step"] == r["step"] == 3
        for k, v in s.items():
            if isinstance(v, torch.Tensor):
                assert torch.equal(v, r[k]), k
    assert "absmax1" in opt.state[ours[0]] and "absmax1" not in opt.state[ours[1]]
