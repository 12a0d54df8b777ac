"""The ``fastnorm`` command line (also ``python -m fastnorm``)."""

from __future__ import annotations

import argparse
import sys
import time


def _demo(args: argparse.Namespace) -> int:
    """A side-by-side of every backend on one BatchNorm step and one Adam step."""
    import torch

    import fastnorm

    torch.manual_seed(0)
    x = torch.randn(64, 256) * 2 + 1
    dy = torch.randn(64, 256)
    shapes = [(256, 784), (256,), (128, 256), (128,), (10, 128), (10,)]  # the MNIST MLP
    params0 = [torch.randn(s) * 0.05 for s in shapes]
    grads = [torch.randn(s) for s in shapes]

    def bn_step(backend):
        bn = fastnorm.nn.BatchNorm1d(256, backend=backend)
        xi = x.clone().requires_grad_(True)
        bn(xi).backward(dy)
        return xi.grad

    def adam_step(backend):
        params = [p.clone() for p in params0]
        opt = fastnorm.optim.Adam(params, lr=1e-3, backend=backend)
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
        return torch.cat([p.flatten() for p in params])

    def timed(fn, backend, repeat):
        out = fn(backend)  # warm-up (and Numba compilation)
        start = time.perf_counter()
        for _ in range(repeat):
            fn(backend)
        return out, (time.perf_counter() - start) / repeat * 1e6

    print(f"fastnorm {fastnorm.__version__}: backends usable here: {', '.join(fastnorm.backends())}\n")
    print("| op | backend | time per call (µs) | max abs diff vs torch |")
    print("|---|---|---:|---:|")
    for name, fn in (("BatchNorm1d(256) fwd+bwd, batch 64", bn_step), ("Adam step, MLP (235,146 params)", adam_step)):
        truth, _ = timed(fn, "torch", 1)
        for backend in fastnorm.backends("batch_norm" if fn is bn_step else "adam"):
            if backend == "cuda":
                continue  # the demo tensors live on the CPU
            out, us = timed(fn, backend, args.repeat)
            print(f"| {name} | {backend} | {us:,.0f} | {(out - truth).abs().max().item():.2e} |")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastnorm", description=__doc__)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    demo = sub.add_parser("demo", help="compare the backends on one BatchNorm and one Adam step")
    demo.add_argument("--repeat", type=int, default=20, help="timed calls per backend (default 20)")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
