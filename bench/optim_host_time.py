"""Median step times (us) of fastnorm's numba optimizers and torch's fused Adam, in one process.

At the book's MLP size (235K parameters in six tensors) and on six 10-value tensors, where the
step is host time (the checks, the plan's revalidation, the op call). Run it once per tree to
compare two versions side by side, alternating (bench/results/optimizers.md):

    PYTHONPATH=/path/to/old:/path/to/old/kernels python bench/optim_host_time.py
    python bench/optim_host_time.py
"""

import json
import statistics
import time

import torch

import fastnorm

torch.set_num_threads(2)
MLP = [(256, 784), (256,), (128, 256), (128,), (10, 128), (10,)]
TINY = [(10,)] * 6


def med(opt, params, rounds=300, inner=5):
    for p in params:
        p.grad = torch.randn_like(p)
    for _ in range(30):
        opt.step()
    s = []
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(inner):
            opt.step()
        s.append((time.perf_counter() - t) / inner)
    return statistics.median(s) * 1e6


out = {}
for label, shapes in (("mlp", MLP), ("tiny", TINY)):
    for name, make in [
        ("torch_fused_adam", lambda ps: torch.optim.Adam(ps, lr=1e-3, fused=True)),
        ("adam", lambda ps: fastnorm.optim.Adam(ps, lr=1e-3, backend="numba")),
        ("adamw", lambda ps: fastnorm.optim.AdamW(ps, lr=1e-3, weight_decay=0.01, backend="numba")),
        ("sgd_momentum", lambda ps: fastnorm.optim.SGD(ps, lr=1e-2, momentum=0.9, backend="numba")),
        ("rmsprop", lambda ps: fastnorm.optim.RMSprop(ps, lr=1e-2, backend="numba")),
        ("adagrad", lambda ps: fastnorm.optim.Adagrad(ps, lr=1e-2, backend="numba")),
    ]:
        ps = [torch.randn(s, requires_grad=True) for s in shapes]
        out[f"{name}-{label}"] = med(make(ps), ps)
print("RESULT " + json.dumps(out))
