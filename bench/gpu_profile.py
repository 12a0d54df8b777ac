"""Where the GPU time goes: torch.profiler kernel tables for the cuda backend next to torch.

Run by bench/gpu_check.sh after the benchmarks (about 30 s). First the host overhead at small
sizes (wall time per call and cProfile's top functions), then BatchNorm training forward+backward at
the two ResNet-like shapes the GPU issue sets targets for, and one Adam / SGD-momentum step at 100M
parameters. For each, the kernels each provider launches with their device time per call, so a
missed target can be traced to a kernel (a reduction, a finalize, an elementwise pass) without
another lease. Usage: python bench/gpu_profile.py > profile.txt
"""

from __future__ import annotations

import cProfile
import io
import pstats
import time

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

import fastnorm

DEV = torch.device("cuda")
REPEAT = 10


def kernel_table(fn, label: str) -> None:
    for _ in range(3):  # compile and warm up outside the profile
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(REPEAT):
            fn()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_time_total > 0]
    events.sort(key=lambda e: -e.device_time_total)
    total = sum(e.device_time_total for e in events) / REPEAT
    print(f"\n## {label}: {total:.1f} us of kernels per call")
    for e in events[:10]:
        name = e.key if len(e.key) < 90 else e.key[:87] + "..."
        print(f"  {e.device_time_total / REPEAT:9.1f} us  x{e.count / REPEAT:4.1f}  {name}")


def batchnorm(shape) -> None:
    c = shape[1]
    x = torch.randn(shape, device=DEV, requires_grad=True)
    dy = torch.randn(shape, device=DEV)
    for provider in ("cuda", "torch"):
        bn = torch.nn.BatchNorm2d(c).to(DEV) if provider == "torch" else fastnorm.nn.BatchNorm2d(c, backend="cuda")
        bn.to(DEV)

        def step(bn=bn, x=x, dy=dy):
            y = bn(x)
            y.backward(dy)

        kernel_table(step, f"BatchNorm2d fwd+bwd {tuple(shape)} {provider}")


def optimizer(name: str, options: dict) -> None:
    shapes = [(4096, 4096)] * 6
    for provider, extra in (("cuda", None), ("torch-foreach", {"foreach": True}), ("torch-fused", {"fused": True})):
        params = [torch.randn(s, device=DEV) for s in shapes]
        for p in params:
            p.grad = torch.randn_like(p)
        if extra is None:
            opt = getattr(fastnorm.optim, name)(params, backend="cuda", **options)
        else:
            opt = getattr(torch.optim, name)(params, **options, **extra)
        kernel_table(opt.step, f"{name} {options} step, 100M parameters, {provider}")
        del opt, params
        torch.cuda.empty_cache()


def host_overhead() -> None:
    """Small sizes, where the GPU waits for the host: wall time per call (synchronised, median of
    50) for both providers, then cProfile's top functions of the cuda provider's calls."""
    x = torch.randn(64, 256, device=DEV, requires_grad=True)
    dy = torch.randn(64, 256, device=DEV)
    mlp = [(256, 784), (256,), (128, 256), (128,), (10, 128), (10,)]
    cases = {}
    for provider in ("cuda", "torch"):
        bn = fastnorm.nn.BatchNorm1d(256, backend="cuda").to(DEV) if provider == "cuda" else torch.nn.BatchNorm1d(256)
        bn.to(DEV)
        cases[f"BatchNorm1d fwd+bwd (64, 256) {provider}"] = lambda bn=bn: bn(x).backward(dy)
        params = [torch.randn(s, device=DEV) for s in mlp]
        for q in params:
            q.grad = torch.randn_like(q)
        if provider == "cuda":
            opt = fastnorm.optim.Adam(params, lr=1e-3, backend="cuda")
        else:
            opt = torch.optim.Adam(params, lr=1e-3, fused=True)
        cases[f"Adam step, MLP parameters, {provider}{'' if provider == 'cuda' else ' fused'}"] = opt.step
    from fastnorm_kernels.numba_cuda import _device

    def dispatcher_path(fn):
        def run():
            _device.FAST_LAUNCH = False
            try:
                fn()
            finally:
                _device.FAST_LAUNCH = fast

        return run

    fast = _device.FAST_LAUNCH
    bn_case = "BatchNorm1d fwd+bwd (64, 256) cuda"
    cases[bn_case + ", every launch by numba-cuda's dispatcher"] = dispatcher_path(cases[bn_case])
    print(f"\n## host overhead: wall time per call, synchronised (median of 50); fast launch {fast}")
    for label, fn in cases.items():
        for _ in range(5):
            fn()
        times = []
        for _ in range(50):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        print(f"  {sorted(times)[25] * 1e6:9.1f} us  {label}")
    for label, fn in cases.items():
        if not label.endswith("cuda"):
            continue
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(50):
            fn()
        torch.cuda.synchronize()
        profiler.disable()
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(14)
        lines = [line for line in out.getvalue().splitlines() if line.strip()]
        print(f"\n## cProfile, 50 calls: {label}")
        print("\n".join(lines[-16:]))


def main() -> None:
    print("gpu:", torch.cuda.get_device_name(), "torch", torch.__version__)
    host_overhead()
    for shape in [(256, 64, 56, 56), (64, 256, 28, 28)]:
        batchnorm(shape)
    optimizer("Adam", {"lr": 1e-3})
    optimizer("SGD", {"lr": 1e-2, "momentum": 0.9})
    # the functional path with a side check that the profile measured what the benchmarks did
    x = torch.randn(64, 256, 28, 28, device=DEV)
    y = fastnorm.functional.batch_norm(x, None, None, training=True, backend="cuda")
    err = (y - F.batch_norm(x, None, None, training=True)).abs().max().item()
    print(f"\nfunctional check (64, 256, 28, 28): max |cuda - torch| = {err:.2e}")


if __name__ == "__main__":
    main()
