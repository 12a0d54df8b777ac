"""Where does fastnorm's numba backend beat torch on this CPU? The measurements behind ``auto``.

``backend="auto"`` picks, per op and size, the backend that is faster here
(``fastnorm/_dispatch.py``: AUTO_CPU_BATCH_NORM_MIN_NUMEL, AUTO_CPU_OPTIMIZER_MIN_NUMEL). This
script measures the crossovers, paired and interleaved round by round in a shuffled order (the machines here are
noisy): BatchNorm1d/2d training forward+backward, numba against torch's module, and one
optimizer step of each optimizer at several sizes, numba against what ``auto`` would otherwise
run (torch's own step with the group's options: the for-loop implementation on CPU).

Usage: python bench/auto_thresholds.py [--rounds 60] [--ops batch_norm,optim,batch_norm_auto]
(``batch_norm_auto``: what ``auto`` gives, fastnorm's module against torch's, at the same shapes)
"""

from __future__ import annotations

import argparse
import statistics

import torch
from paired import paired

import fastnorm

# (shape, memory format): rows (N, C), planes (N, C, H, W) contiguous and channels-last
BATCH_NORM_SHAPES = [
    *[
        ((n, c), "rows")
        for n, c in [(64, 128), (64, 256), (256, 256), (256, 1024), (1024, 1024), (2048, 2048), (4096, 2048)]
    ],
    *[(s, "planes") for s in [(8, 16, 14, 14), (8, 64, 14, 14), (4, 64, 28, 28), (16, 64, 28, 28), (64, 64, 28, 28)]],
    *[(s, "channels_last") for s in [(8, 64, 14, 14), (16, 64, 28, 28), (64, 64, 28, 28)]],
]
OPTIM_SIZES = [1_000, 10_000, 50_000, 235_146, 1_000_000, 4_000_000]  # 235,146: the book's MLP 784-256-128-10
OPTIMIZERS = {
    "sgd": ("SGD", dict(lr=0.01)),
    "sgd momentum": ("SGD", dict(lr=0.01, momentum=0.9)),
    "adagrad": ("Adagrad", dict(lr=0.01)),
    "rmsprop": ("RMSprop", dict(lr=0.01)),
    "adam": ("Adam", dict(lr=1e-3)),
    "adamw": ("AdamW", dict(lr=1e-3)),
}


def _paired(fns: dict, rounds: int, inner: int) -> dict[str, float]:
    """Median µs per call of each function, interleaved in a shuffled order (bench/paired.py)."""
    return {k: statistics.median(v) * 1e6 for k, v in paired(fns, rounds, inner=inner, warmup=max(3, inner)).items()}


def batch_norm(rounds: int) -> None:
    print("## BatchNorm training fwd+bwd (µs): numba vs torch")
    for shape, layout in BATCH_NORM_SHAPES:
        fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
        x = torch.randn(shape).to(memory_format=fmt).requires_grad_()
        dy = torch.randn(shape).to(memory_format=fmt)
        cls = fastnorm.nn.BatchNorm1d if len(shape) == 2 else fastnorm.nn.BatchNorm2d
        mods = {b: cls(shape[1], backend=b) for b in ("numba", "torch")}
        inner = max(1, 200_000 // x.numel())
        t = _paired({b: (lambda m=m, x=x, dy=dy: m(x).backward(dy)) for b, m in mods.items()}, rounds, inner)
        print(f"  {str(shape):18s} {layout:13s} numel {x.numel():>9,}  numba {t['numba']:9.1f}  torch {t['torch']:9.1f}"
              f"  speedup {t['torch'] / t['numba']:.2f}x")  # fmt: skip


def batch_norm_auto(rounds: int) -> None:
    print("## BatchNorm training fwd+bwd (µs): fastnorm's module with backend='auto' vs torch's nn module")
    for shape, layout in BATCH_NORM_SHAPES:
        fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
        x = torch.randn(shape).to(memory_format=fmt).requires_grad_()
        dy = torch.randn(shape).to(memory_format=fmt)
        two_d = len(shape) == 2
        mods = {
            "auto": (fastnorm.nn.BatchNorm1d if two_d else fastnorm.nn.BatchNorm2d)(shape[1]),
            "torch": (torch.nn.BatchNorm1d if two_d else torch.nn.BatchNorm2d)(shape[1]),
        }
        inner = max(1, 200_000 // x.numel())
        t = _paired({b: (lambda m=m, x=x, dy=dy: m(x).backward(dy)) for b, m in mods.items()}, rounds, inner)
        print(f"  {str(shape):18s} {layout:13s} numel {x.numel():>9,}  auto {t['auto']:9.1f}  torch {t['torch']:9.1f}"
              f"  speedup {t['torch'] / t['auto']:.2f}x")  # fmt: skip


def optim(rounds: int) -> None:
    print("## optimizer step (µs): numba vs torch's step (auto's alternative)")
    for name, (cls_name, kwargs) in OPTIMIZERS.items():
        for numel in OPTIM_SIZES:
            fns = {}
            for b in ("numba", "torch"):
                p = torch.zeros(numel, requires_grad=True)
                p.grad = torch.randn(numel) * 1e-3
                opt = getattr(fastnorm.optim, cls_name)([p], backend=b, **kwargs)
                fns[b] = opt.step
            inner = max(1, 2_000_000 // numel)
            t = _paired(fns, rounds, inner)
            print(f"  {name:13s} {numel:>10,}  numba {t['numba']:9.1f}  torch {t['torch']:9.1f}"
                  f"  speedup {t['torch'] / t['numba']:.2f}x")  # fmt: skip


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--ops", default="batch_norm,optim")
    args = parser.parse_args(argv)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    ops = args.ops.split(",")
    if "batch_norm" in ops:
        batch_norm(args.rounds)
    if "batch_norm_auto" in ops:
        batch_norm_auto(args.rounds)
    if "optim" in ops:
        optim(args.rounds)


if __name__ == "__main__":
    main()
