"""16-bit speed (issue #14's targets), paired: providers interleaved round by round in a shuffled order.

1. BatchNorm2d training forward+backward at (64, 64, 28, 28): numba on a bfloat16 input (float32
   parameters: what autocast hands it) against torch on the same input, and against numba on
   float32.
2. One Adam step on 25M parameters: numba on bfloat16 parameters against torch ``fused=True`` on
   bfloat16 and numba on float32.

Prints medians with interquartile ranges (ms) and the ratios of medians.

Usage: python bench/half_targets.py [--rounds 30]
"""

from __future__ import annotations

import argparse
import statistics

import torch
from paired import paired

import fastnorm


def _paired(fns: dict, rounds: int) -> dict[str, list[float]]:
    """ms per call of each function, interleaved in a shuffled order (bench/paired.py)."""
    return {k: [t * 1e3 for t in v] for k, v in paired(fns, rounds).items()}


def _report(title: str, samples: dict[str, list[float]], ratios: list[tuple[str, str]]) -> None:
    print(f"## {title}")
    med = {}
    for k, v in samples.items():
        q1, med[k], q3 = statistics.quantiles(v, n=4)
        print(f"  {k:28s} {med[k]:8.2f} ms  (IQR {q1:.2f}-{q3:.2f})")
    for a, b in ratios:
        print(f"  {a} vs {b}: {med[b] / med[a]:.2f}x")


def batch_norm(rounds: int) -> None:
    shape = (64, 64, 28, 28)
    fns = {}
    cases = [("numba bf16", "numba", torch.bfloat16), ("torch bf16", "torch", torch.bfloat16),
             ("numba f32", "numba", torch.float32), ("torch f32", "torch", torch.float32)]  # fmt: skip
    for label, backend, dtype in cases:
        bn = fastnorm.nn.BatchNorm2d(64, backend=backend)
        x = torch.randn(shape).to(dtype).requires_grad_()
        dy = torch.randn(shape).to(dtype)

        def step(bn=bn, x=x, dy=dy):
            x.grad = bn.weight.grad = bn.bias.grad = None  # as in training: no accumulation pass
            bn(x).backward(dy)

        fns[label] = step
    _report(f"BatchNorm2d fwd+bwd {shape}", _paired(fns, rounds),
            [("numba bf16", "torch bf16"), ("numba bf16", "numba f32")])  # fmt: skip


def adam(rounds: int) -> None:
    n = 25_000_000
    fns = {}
    cases = [("numba bf16", fastnorm.optim.Adam, torch.bfloat16, dict(backend="numba")),
             ("torch fused bf16", torch.optim.Adam, torch.bfloat16, dict(fused=True)),
             ("numba f32", fastnorm.optim.Adam, torch.float32, dict(backend="numba")),
             ("torch fused f32", torch.optim.Adam, torch.float32, dict(fused=True))]  # fmt: skip
    for label, cls, dtype, extra in cases:
        p = (torch.randn(n) * 0.05).to(dtype).requires_grad_()
        p.grad = torch.randn(n).to(dtype)
        fns[label] = cls([p], lr=1e-3, **extra).step
    _report("Adam step, 25M parameters", _paired(fns, rounds),
            [("numba bf16", "torch fused bf16"), ("numba bf16", "numba f32")])  # fmt: skip


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args(argv)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {args.rounds} rounds")
    batch_norm(args.rounds)
    adam(args.rounds)


if __name__ == "__main__":
    main()
