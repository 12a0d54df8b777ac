"""Data-parallel training time on this machine: 1 process against N (the README's "Scaling out").

The book's MLP (784-256-128-10 with BatchNorm, batch 64, SGD with momentum) trains ``--steps``
steps on random MNIST-shaped batches: one process on the whole batch, or ``--nproc`` processes
(``fastnorm.distributed.spawn``: gloo over loopback, each process a shard of every batch,
``fastnorm.nn.SyncBatchNorm``, DistributedDataParallel), the cores shared between the processes
as ``spawn`` shares them. Times are measured inside the processes, after ``--warmup`` steps,
between two barriers (process start-up and Numba compilation excluded); the world sizes are run
alternately, ``--rounds`` times each, and reported as medians with their range.

Usage: python bench/ddp_timing.py [--nproc 2] [--steps 200] [--rounds 5] [--backend numba]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch


def _worker(rank: int, world: int, steps: int, warmup: int, backend: str, out: str) -> None:
    import torch.distributed as dist

    import fastnorm
    from fastnorm.book.models import SimpleNN

    torch.manual_seed(0)
    model = SimpleNN(use_batch_norm=True, backend=backend)
    net = model
    if world > 1:
        model = fastnorm.nn.convert(model, backend=backend, sync=True)
        net = torch.nn.parallel.DistributedDataParallel(model)
    opt = fastnorm.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, backend=backend)
    loss_fn = torch.nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.rand(64, 1, 28, 28, generator=gen), torch.randint(0, 10, (64,), generator=gen))
               for _ in range(16)]  # fmt: skip
    shard = 64 // world

    def step(i: int) -> None:
        x, y = batches[i % len(batches)]
        x, y = x[rank * shard : (rank + 1) * shard], y[rank * shard : (rank + 1) * shard]
        opt.zero_grad(set_to_none=True)
        loss_fn(net(x), y).backward()
        opt.step()

    for i in range(warmup):
        step(i)
    if world > 1:
        dist.barrier()
    start = time.perf_counter()
    for i in range(steps):
        step(i)
    if world > 1:
        dist.barrier()
    if rank == 0:
        Path(out).write_text(f"{time.perf_counter() - start}\n")


def run(world: int, steps: int, warmup: int, backend: str) -> float:
    """Seconds for ``steps`` training steps on ``world`` processes (1: this process, all cores)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "seconds.txt")
        if world == 1:
            _worker(0, 1, steps, warmup, backend, out)
        else:
            from fastnorm.distributed import spawn

            spawn(_worker, world, steps, warmup, backend, out, timeout_s=600)
        return float(Path(out).read_text())


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--backend", default="numba")
    args = ap.parse_args(argv)
    samples: dict[int, list[float]] = {1: [], args.nproc: []}
    for _ in range(args.rounds):
        for world in samples:
            samples[world].append(run(world, args.steps, args.warmup, args.backend))
    print(f"# {args.steps} training steps of the MNIST MLP (batch 64, BatchNorm, SGD momentum), backend "
          f"{args.backend}, torch {torch.__version__}, {torch.get_num_threads()} threads in all; "
          f"{args.rounds} rounds, alternating")  # fmt: skip
    print("| processes | seconds (median) | range | ms per step |")
    print("|---:|---:|---:|---:|")
    for world, times in samples.items():
        med = statistics.median(times)
        print(f"| {world} | {med:.2f} | {min(times):.2f}-{max(times):.2f} | {1e3 * med / args.steps:.2f} |")
    one, many = statistics.median(samples[1]), statistics.median(samples[args.nproc])
    print(f"\n{args.nproc} processes take {many / one:.2f}x the time of one")


if __name__ == "__main__":
    main()
