"""Where the time of a small eager BatchNorm forward+backward goes (fastnorm's layer).

At the book's MLP sizes the numba kernels take ~10 µs per direction while a module
forward+backward takes several times that: this script times, side by side and interleaved (the
machines here are noisy), torch's BatchNorm1d, fastnorm's module on each backend, and the layers
of fastnorm's numba path one by one (the module's Python forward, the registered op called
directly with and without autograd, the backward op, the kernels alone), as medians of many rounds.

Usage: python bench/eager_overhead.py [--rounds 300] [--shapes 64x256,64x128]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import fastnorm
from fastnorm import functional
from fastnorm._dispatch import resolve


def _median_us(fn, rounds: int, inner: int = 20) -> float:
    for _ in range(inner * 3):  # warm up (Numba's compile or cache load stays out)
        fn()
    samples = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        samples.append((time.perf_counter() - t0) / inner)
    return statistics.median(samples) * 1e6


class _Identity(torch.autograd.Function):
    """The floor of any Python autograd.Function: a forward and backward that do nothing."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, dy):
        return dy


def stages(n: int, c: int, rounds: int) -> dict[str, float]:
    torch.manual_seed(0)
    x = torch.randn(n, c, requires_grad=True)
    dy = torch.randn(n, c)
    ref = torch.nn.BatchNorm1d(c)
    mods = {b: fastnorm.nn.BatchNorm1d(c, backend=b) for b in ("numba", "reference", "torch")}
    w, b = ref.weight, ref.bias
    rm, rv = ref.running_mean.clone(), ref.running_var.clone()
    ops = torch.ops.fastnorm
    _, mean, invstd = ops.batch_norm_forward(x.detach(), w.detach(), b.detach(), rm, rv, True, 0.1, 1e-5)
    k = resolve("numba", "batch_norm", x.device).kernels
    xa, dya = x.detach().numpy().reshape(n, c, 1), dy.numpy().reshape(n, c, 1)
    wa, ba = w.detach().numpy(), b.detach().numpy()
    y_arr, dx_arr, m_arr, i_arr, dw, db = xa.copy(), xa.copy(), wa.copy(), wa.copy(), wa.copy(), wa.copy()
    rma, rva = rm.numpy().copy(), rv.numpy().copy()

    def fwd_bwd(m):
        def run():
            m(x).backward(dy)

        return run

    cases = {
        "torch BatchNorm1d fwd+bwd": fwd_bwd(ref),
        "fastnorm numba fwd+bwd": fwd_bwd(mods["numba"]),
        "fastnorm torch-backend fwd+bwd": fwd_bwd(mods["torch"]),
        "fastnorm numba forward, no grad": lambda: mods["numba"](x.detach()),
        "op: fastnorm::batch_norm fwd+bwd": lambda: ops.batch_norm.default(x, w, b, rm, rv, True, 0.1, 1e-5).backward(
            dy
        ),
        "op: fastnorm::batch_norm, no grad": lambda: ops.batch_norm.default(
            x.detach(), None, None, rm, rv, True, 0.1, 1e-5
        ),
        "op: fastnorm::batch_norm_backward": lambda: ops.batch_norm_backward.default(
            dy, x.detach(), w.detach(), mean, invstd, True, [True, True, True]
        ),
        "stage: backend_for()": lambda: functional.backend_for("numba", x),
        "kernels: forward alone": lambda: k.batch_norm_forward_train(xa, wa, ba, rma, rva, 0.1, 1e-5, y_arr, m_arr,
                                                                     i_arr),
        "kernels: backward alone": lambda: k.batch_norm_backward(dya, xa, m_arr, i_arr, wa, True, dx_arr, dw, db),
        "baseline: empty autograd.Function fwd+bwd": lambda: _Identity.apply(x).backward(dy),
        "baseline: torch.empty_like": lambda: torch.empty_like(x),
    }  # fmt: skip
    # interleaved: every case measured in each of a few passes, the median of the passes kept
    passes = {name: [] for name in cases}
    for _ in range(3):
        for name, fn in cases.items():
            passes[name].append(_median_us(fn, max(rounds // 3, 10)))
    return {name: statistics.median(v) for name, v in passes.items()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--shapes", default="64x256,64x128")
    args = parser.parse_args(argv)
    print(f"torch {torch.__version__}, torch threads {torch.get_num_threads()}")
    for shape in args.shapes.split(","):
        n, c = map(int, shape.split("x"))
        print(f"\n## BatchNorm1d ({n}, {c}): median µs per call")
        for name, us in stages(n, c, args.rounds).items():
            print(f"  {us:8.1f}  {name}")


if __name__ == "__main__":
    main()
