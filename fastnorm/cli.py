"""The ``fastnorm`` command line (also ``python -m fastnorm``)."""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import time
from pathlib import Path


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


BENCH_FILES = {
    "batchnorm": "test_bench_batchnorm.py",
    "optim": "test_bench_optim.py",
    "e2e": "test_bench_e2e.py",
    "roofline": "test_bench_roofline.py",
}


def _bench_dir() -> Path:
    here = Path(__file__).resolve().parent.parent / "bench"
    if not (here / "conftest.py").exists():
        raise SystemExit(
            f"fastnorm bench: the benchmark suites are not next to this installation ({here}); "
            "run it from a source checkout (pip install -e .)"
        )
    return here


def _bench(args: argparse.Namespace) -> int:
    """Run the pytest-benchmark suites, then write the markdown report and the chart."""
    bench = _bench_dir()
    ops = _split(args.ops) or list(BENCH_FILES)
    unknown = [o for o in ops if o not in BENCH_FILES]
    if unknown:
        raise SystemExit(f"fastnorm bench: unknown op {unknown[0]!r}; choose from {', '.join(BENCH_FILES)}")
    if "roofline" not in ops:
        ops.append("roofline")  # every report shows its percent of the roofline
    out = Path(args.out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pytest", *[str(bench / BENCH_FILES[o]) for o in ops],
           "-q", "-p", "no:cacheprovider", f"--benchmark-json={out}", "--benchmark-sort=name",
           "--benchmark-columns=median,iqr,rounds", f"--bench-device={args.device}"]  # fmt: skip
    if args.quick:
        cmd.append("--bench-quick")
    if args.budget is not None:
        cmd.append(f"--bench-budget={args.budget}")
    if args.providers:
        cmd.append(f"--bench-providers={args.providers}")
    shapes = _split(args.shapes)
    if shapes:
        cmd += ["-k", " or ".join([*shapes, "roofline"])]
    print("running:", " ".join(cmd), flush=True)
    status = subprocess.run(cmd, cwd=bench).returncode
    if status not in (0, 5) or not out.exists():
        print(f"fastnorm bench: the benchmark run failed (pytest exit status {status})", file=sys.stderr)
        return status or 1
    spec = importlib.util.spec_from_file_location("fastnorm_bench_report", bench / "report.py")
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    md, png = report.write(out, args.title)
    print(f"report: {md}\nchart:  {png}\nraw:    {out}")
    return 0


def _split(value: str | None) -> list[str]:
    return [v.strip() for v in (value or "").split(",") if v.strip()]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastnorm", description=__doc__)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    demo = sub.add_parser("demo", help="compare the backends on one BatchNorm and one Adam step")
    demo.add_argument("--repeat", type=int, default=20, help="timed calls per backend (default 20)")
    demo.set_defaults(func=_demo)

    bench = sub.add_parser("bench", help="run the benchmark suites and write the speed report")
    bench.add_argument("--ops", help=f"comma-separated subset of {', '.join(BENCH_FILES)} (default: all)")
    bench.add_argument("--shapes", help="comma-separated cases, e.g. 64x256,8192x2048,mlp,100M (default: all)")
    bench.add_argument("--providers", help="comma-separated providers, e.g. numba,torch,torch-fused (default: all)")
    bench.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="device of the tensors (default cpu)")
    bench.add_argument("--quick", action="store_true", help="small selection and short budgets: about a minute")
    bench.add_argument("--budget", type=float, help="seconds of timed calls per benchmark (default 1, quick 0.15)")
    bench.add_argument("--out", default="bench/results/latest.json", help="JSON output; .md and .png beside it")
    bench.add_argument("--title", help="report title")
    bench.set_defaults(func=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
