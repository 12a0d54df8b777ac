"""Do fastnorm's kernels slow torch's ops down (or the other way round)? The #15 contention check.

torch and Numba each run an OpenMP pool (two libgomp runtimes: torch ships its own, Numba's
``omp`` layer links the system's) whose threads spin-wait after a parallel region. On a 2-core
machine a spinning pool steals the core the other one's next parallel region needs. This script
times, interleaved and over many rounds, the book's MLP-size pair of a torch matmul
(64x784 @ 784x256) and a fastnorm numba Adam step (the MLP's 235K parameters): each alone, and
the two alternating, and reports the alternating cost over the sum of the parts (1.0 = no
contention; the #15 target is <= 1.1).

Usage: python bench/thread_contention.py [--rounds 200] [--inner 20]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import fastnorm
from fastnorm.book.models import SimpleNN


def _timed(fn, inner: int) -> float:
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - t0) / inner * 1e6


def measure(rounds: int = 200, inner: int = 20, backend: str = "numba") -> dict[str, float]:
    """Medians (µs) of the matmul alone, the Adam step alone, the two alternating, and their ratio."""
    torch.manual_seed(0)
    a, b = torch.randn(64, 784), torch.randn(784, 256)
    model = SimpleNN()
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt = fastnorm.optim.Adam(model.parameters(), lr=1e-3, backend=backend)

    def matmul():
        torch.mm(a, b)

    def step():
        opt.step()

    def both():
        torch.mm(a, b)
        opt.step()

    cases = {"matmul": matmul, "adam step": step, "matmul + adam step": both}
    for fn in cases.values():  # warm-up: compile or cache load stays out
        for _ in range(50):
            fn()
    samples = {name: [] for name in cases}
    ratios = []
    for _ in range(rounds):
        row = {name: _timed(fn, inner) for name, fn in cases.items()}
        for name, us in row.items():
            samples[name].append(us)
        ratios.append(row["matmul + adam step"] / (row["matmul"] + row["adam step"]))
    out = {name: statistics.median(v) for name, v in samples.items()}
    q = statistics.quantiles(ratios, n=4)
    out.update(ratio=statistics.median(ratios), ratio_q1=q[0], ratio_q3=q[2])
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--inner", type=int, default=20)
    parser.add_argument("--backend", default="numba")
    args = parser.parse_args(argv)
    r = measure(args.rounds, args.inner, args.backend)
    print(f"torch {torch.__version__}, torch threads {torch.get_num_threads()}, backend {args.backend}")
    for name in ("matmul", "adam step", "matmul + adam step"):
        print(f"  {r[name]:8.1f} µs  {name}")
    print(f"  alternating / sum of parts: {r['ratio']:.3f} (IQR {r['ratio_q1']:.3f}-{r['ratio_q3']:.3f})")


if __name__ == "__main__":
    main()
