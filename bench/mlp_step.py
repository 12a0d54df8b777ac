"""The book's MNIST MLP (784-256-128-10 with BatchNorm, batch 64): fastnorm against torch, paired.

Two measurements, each with providers interleaved round by round in a shuffled order (these
machines are noisy; a provider always run after the same other one inherits its cold caches):

1. One optimizer step on the MLP's six parameter tensors (235,146 values): fastnorm's numba
   kernels against torch's ``fused=True`` and default (for-loop on CPU) implementations, for
   Adam, AdamW, SGD with momentum and Adagrad.
2. One whole training step (forward, cross-entropy, backward, Adam step): fastnorm with
   ``backend="auto"`` for BatchNorm and Adam, against torch's BatchNorm with ``fused=True`` Adam
   and with default Adam; and fastnorm with ``backend="numba"`` for both.

Prints medians with their interquartile range, in µs, and the ratios of medians.

Usage: python bench/mlp_step.py [--rounds 200] [--inner 5]
"""

from __future__ import annotations

import argparse
import statistics

import torch
from paired import paired

import fastnorm
from fastnorm.book.models import SimpleNN

OPTIMIZERS = {
    "Adam": dict(lr=1e-3),
    "AdamW": dict(lr=1e-3),
    "SGD momentum": dict(lr=0.01, momentum=0.9),
    "Adagrad": dict(lr=0.01),
}


def _paired(fns: dict, rounds: int, inner: int) -> dict[str, list[float]]:
    """Per-call times (µs) of each function, interleaved round by round in a shuffled order
    (bench/paired.py)."""
    return {k: [t * 1e6 for t in v] for k, v in paired(fns, rounds, inner=inner, warmup=20).items()}


def _summary(samples: dict[str, list[float]], baseline: str) -> None:
    base = statistics.median(samples[baseline])
    for k, v in samples.items():
        q1, med, q3 = statistics.quantiles(v, n=4)
        print(f"  {k:28s} {med:8.1f} µs  (IQR {q1:7.1f}-{q3:7.1f})  {baseline} / this: {base / med:5.2f}x")


def _mlp_params() -> list[torch.Tensor]:
    return [p.detach().clone().requires_grad_() for p in SimpleNN(use_batch_norm=True).parameters()]


def optimizers(rounds: int, inner: int) -> None:
    for name, options in OPTIMIZERS.items():
        cls_name = "SGD" if name.startswith("SGD") else name
        variants = {
            "fastnorm numba": (getattr(fastnorm.optim, cls_name), dict(backend="numba")),
            "fastnorm auto": (getattr(fastnorm.optim, cls_name), {}),
            "torch fused=True": (getattr(torch.optim, cls_name), dict(fused=True)),
            "torch default": (getattr(torch.optim, cls_name), {}),
        }
        fns = {}
        for label, (cls, extra) in variants.items():
            params = _mlp_params()
            for p in params:
                p.grad = torch.randn_like(p) * 1e-3
            fns[label] = cls(params, **options, **extra).step
        print(f"## {name} step on the MLP's parameters ({sum(p.numel() for p in _mlp_params()):,} values)")
        _summary(_paired(fns, rounds, inner), "torch fused=True")


def training_step(rounds: int, inner: int) -> None:
    x = torch.randn(64, 1, 28, 28)
    target = torch.randint(0, 10, (64,))
    loss_fn = torch.nn.CrossEntropyLoss()
    variants = {
        "fastnorm auto BN + auto Adam": ("auto", lambda ps: fastnorm.optim.Adam(ps, lr=1e-3)),
        "fastnorm numba BN + numba Adam": ("numba", lambda ps: fastnorm.optim.Adam(ps, lr=1e-3, backend="numba")),
        "torch BN + fused Adam": ("torch", lambda ps: torch.optim.Adam(ps, lr=1e-3, fused=True)),
        "torch BN + default Adam": ("torch", lambda ps: torch.optim.Adam(ps, lr=1e-3)),
    }
    fns = {}
    for label, (bn, make_opt) in variants.items():
        torch.manual_seed(0)
        model = SimpleNN(use_batch_norm=True, backend=bn)
        opt = make_opt(model.parameters())

        def step(model=model, opt=opt):
            opt.zero_grad(set_to_none=True)
            loss_fn(model(x), target).backward()
            opt.step()

        fns[label] = step
    print("## the MLP's training step (BatchNorm + Adam, batch 64)")
    _summary(_paired(fns, rounds, inner), "torch BN + fused Adam")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--inner", type=int, default=5)
    parser.add_argument("--parts", default="optimizers,training_step")
    args = parser.parse_args(argv)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {args.rounds} rounds x {args.inner} calls")
    parts = args.parts.split(",")
    if "optimizers" in parts:
        optimizers(args.rounds, args.inner)
    if "training_step" in parts:
        training_step(args.rounds, args.inner)


if __name__ == "__main__":
    main()
