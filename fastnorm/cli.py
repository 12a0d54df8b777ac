"""The ``fastnorm`` command line (also ``python -m fastnorm``)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path


def _demo_side_by_side(args: argparse.Namespace) -> int:
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
    "lion": "test_bench_lion.py",
    "optim8": "test_bench_optim8.py",
    "norms": "test_bench_norms.py",
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
    raw = json.loads(out.read_text())
    for record in raw.get("benchmarks", []):  # per-round timings: megabytes, and the stats keep them
        record.get("stats", {}).pop("data", None)
    out.write_text(json.dumps(raw, indent=1))
    spec = importlib.util.spec_from_file_location("fastnorm_bench_report", bench / "report.py")
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    md, png = report.write(out, args.title)
    print(f"report: {md}\nchart:  {png}\nraw:    {out}")
    return 0


def _split(value: str | None) -> list[str]:
    return [v.strip() for v in (value or "").split(",") if v.strip()]


class _Parser(argparse.ArgumentParser):
    """argparse, with bad arguments reported on one line."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _data(args):
    from .book.data import MNISTNotFound, load_mnist

    try:
        return load_mnist(args.data_dir)
    except MNISTNotFound as exc:
        raise SystemExit(f"fastnorm: {exc}") from None


def _train(args: argparse.Namespace) -> int:
    from .book.train import TrainConfig, train

    config = TrainConfig(optimizer=args.optimizer, lr=args.lr, epochs=args.epochs, batch_size=args.batch_size,
                         batch_norm=args.batch_norm, backend=args.backend, seed=args.seed,
                         train_limit=args.train_limit, test_limit=args.test_limit,
                         progress=not args.no_progress, dtype=args.dtype, amp=args.amp)  # fmt: skip
    out = Path(args.out)
    if args.nproc > 1:
        from .book.train import train_distributed

        _data(args)  # fail early and clearly if MNIST is missing (and fill the cache once)
        train_distributed(config, args.nproc, args.data_dir, out, args.resume)
        last = json.loads((out / "log.json").read_text())["epoch"][-1]
        print(f"{args.nproc} processes: epoch {last['epoch']}: test acc {100 * last['test_acc']:.2f}%; "
              f"logs and checkpoint in {out}")  # fmt: skip
        return 0
    _, history = train(config, _data(args), out_dir=out, resume=args.resume)
    last = history.epoch[-1]
    print(f"epoch {last['epoch']}: train loss {last['train_loss']:.4f}, train acc {100 * last['train_acc']:.2f}%, "
          f"test acc {100 * last['test_acc']:.2f}%; logs and checkpoint in {out}")  # fmt: skip
    return 0


def _compare(args: argparse.Namespace) -> int:
    from .book.experiments import compare_backends

    out = Path(args.out)
    runs = compare_backends(_data(args), out / "compare_backends.png", epochs=args.epochs,
                            names=_split(args.backends) or None, optimizer=args.optimizer, seed=args.seed,
                            train_limit=args.train_limit, progress=not args.no_progress, dtype=args.dtype,
                            amp=args.amp)  # fmt: skip
    table = _backend_table(runs)
    (out / "compare_backends.md").write_text(table + "\n")
    print(table)
    print(f"\nfigure: {runs['figure']}")
    return 0


def _backend_table(runs: dict) -> str:
    names = [k for k in runs if k != "figure"]
    base = "torch" if "torch" in names else names[0]
    lines = [f"| backend | seconds per epoch | final train loss | test accuracy | steps within 1e-5 of {base} "
             f"| max loss difference vs {base} |", "|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for name in names:
        h = runs[name]
        diffs = [abs(a - b) for a, b in zip(h.step_loss, runs[base].step_loss)]
        agree = next((i for i, d in enumerate(diffs) if d > 1e-5), len(diffs))
        secs = sum(e["seconds"] for e in h.epoch) / len(h.epoch)
        lines.append(f"| {name} | {secs:.2f} | {h.epoch[-1]['train_loss']:.4f} | {100 * h.epoch[-1]['test_acc']:.2f}% "
                     f"| {agree} of {len(diffs)} | {max(diffs):.2e} |")  # fmt: skip
    return "\n".join(lines)


def _bn_table(runs: dict) -> str:
    lines = ["| model | test accuracy after epoch 1 | final test accuracy | final train loss |", "|---|---:|---:|---:|"]
    for label in ("with BatchNorm", "without BatchNorm"):
        h = runs[label]
        lines.append(f"| {label} | {100 * h.epoch[0]['test_acc']:.2f}% | {100 * h.epoch[-1]['test_acc']:.2f}% | "
                     f"{h.epoch[-1]['train_loss']:.4f} |")  # fmt: skip
    return "\n".join(lines)


def _report(summary: list[str], title: str, table: str, figure: Path) -> None:
    """A section of summary.md (title, table, figure), and the table and figure path printed."""
    summary += [f"## {title}", "", table, "", f"![{figure.stem}]({figure.name})", ""]
    print(table)
    print(f"figure: {figure}")


def _figures(args: argparse.Namespace, summary: list[str] | None = None) -> int:
    from .book import experiments as ex

    out = Path(args.out)
    only = _split(args.only) or ["paths", "init", "bn", "sweep"]
    unknown = [o for o in only if o not in ("paths", "init", "bn", "sweep")]
    if unknown:
        raise SystemExit(f"fastnorm figures: unknown figure {unknown[0]!r}; choose from paths, init, bn, sweep")
    summary = [] if summary is None else summary
    if "paths" in only:
        # the reference backend: the point of this figure is the readable math, on two parameters
        path = ex.optimizer_paths(out / "optimizer_paths.png", backend="reference")
        summary += ["## Optimizer paths (backend reference)", "", f"![optimizer paths]({path.name})", ""]
        print(f"figure: {path}")
    if "init" in only:
        paths = ex.weight_init_histograms(out)
        summary += ["## Weight initialisation", ""] + [f"![{p.stem}]({p.name})" for p in paths] + [""]
        print("figures: " + ", ".join(map(str, paths)))
    data = _data(args) if ("bn" in only or "sweep" in only) else None
    if "bn" in only:
        runs = ex.batchnorm_mnist(data, out / "batchnorm_mnist.png", epochs=args.epochs, backend=args.backend,
                                  optimizer=args.optimizer, seed=args.seed, train_limit=args.train_limit,
                                  progress=not args.no_progress)  # fmt: skip
        _report(summary, f"BatchNorm on MNIST ({args.epochs} epochs, {args.optimizer}, backend {args.backend})",
                _bn_table(runs), runs["figure"])  # fmt: skip
    if "sweep" in only:
        sweep = ex.weight_scale_sweep(data, out / "weight_scale_sweep.png", samples=args.sweep_samples,
                                      epochs=args.sweep_epochs, backend=args.backend, seed=args.seed)  # fmt: skip
        summary += [f"## Weight-scale sweep (backend {args.backend})", "", f"![sweep]({sweep['figure'].name})", ""]
        print(f"figure: {sweep['figure']}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    """Experiments 1 and 2, a short BatchNorm-vs-none MNIST run and the backend comparison."""
    import fastnorm

    from .book.experiments import compare_backends

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    summary = ["# fastnorm demo", "", f"backends usable here: {', '.join(fastnorm.backends())}", ""]
    args.only = "paths,init,bn"
    _figures(args, summary)
    runs = compare_backends(_data(args), out / "compare_backends.png", epochs=args.compare_epochs,
                            optimizer=args.optimizer, seed=args.seed, train_limit=args.train_limit,
                            progress=not args.no_progress)  # fmt: skip
    _report(summary, f"Backends side by side ({args.compare_epochs} epoch, {args.optimizer} + BatchNorm)",
            _backend_table(runs), runs["figure"])  # fmt: skip
    (out / "summary.md").write_text("\n".join(summary))
    print(f"\ndone in {time.perf_counter() - start:.0f} s: figures and summary.md in {out.resolve()}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from ._dispatch import BACKENDS
    from .book.train import OPTIMIZERS

    parser = _Parser(prog="fastnorm", description="fastnorm: BatchNorm and optimizer kernels as PyTorch drop-ins, "
                     "and the experiments of 'Deep Learning from Scratch', chapter 6.")  # fmt: skip
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_Parser)

    def common(p, epochs, optimizer="momentum", backend="auto"):
        p.add_argument("--data-dir", default=None, help="folder with the MNIST IDX files (default: $FASTNORM_DATA)")
        p.add_argument("--out", default="results", help="output folder (default: results)")
        p.add_argument(
            "--backend", default=backend, choices=["auto", *BACKENDS], help=f"fastnorm backend (default: {backend})"
        )
        p.add_argument(
            "--optimizer", default=optimizer, choices=list(OPTIMIZERS), help=f"optimizer (default: {optimizer})"
        )
        p.add_argument("--epochs", type=_positive_int, default=epochs, help=f"epochs (default: {epochs})")
        p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
        p.add_argument("--train-limit", type=_positive_int, default=None, help="use the first N training images only")
        p.add_argument("--no-progress", action="store_true", help="no progress bars")
        p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                       help="the parameters' dtype, or with --amp autocast's (default: float32)")  # fmt: skip
        p.add_argument("--amp", action="store_true",
                       help="mixed precision: float32 parameters, forward under torch.autocast(--dtype)")  # fmt: skip

    train = sub.add_parser("train", help="train the MNIST MLP (logs, checkpoints, --resume)")
    common(train, 10)
    train.add_argument("--lr", type=float, default=None, help="learning rate (default: the optimizer's)")
    train.add_argument("--batch-size", type=_positive_int, default=64, help="batch size (default: 64)")
    train.add_argument(
        "--batch-norm", action=argparse.BooleanOptionalAction, default=True, help="use BatchNorm (default: yes)"
    )
    train.add_argument("--test-limit", type=_positive_int, default=None, help="use the first N test images only")
    train.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    train.add_argument("--nproc", type=_positive_int, default=1,
                       help="data-parallel processes here (gloo, SyncBatchNorm, DDP; default 1)")  # fmt: skip
    train.set_defaults(func=_train)

    compare = sub.add_parser("compare", help="the same training with each backend (experiment 4)")
    common(compare, 1)
    compare.add_argument("--backends", default=None, help="comma-separated backends (default: all usable on CPU)")
    compare.set_defaults(func=_compare)

    figures = sub.add_parser("figures", help="experiments 1-3: optimizer paths, weight init, BatchNorm on MNIST")
    common(figures, 10, backend="numba")  # fastnorm's own kernels, explicitly
    figures.add_argument("--only", default=None, help="comma-separated subset of paths, init, bn, sweep")
    figures.add_argument("--sweep-samples", type=_positive_int, default=1000, help="images in the weight-scale sweep")
    figures.add_argument("--sweep-epochs", type=_positive_int, default=20, help="epochs of the weight-scale sweep")
    figures.set_defaults(func=_figures)

    demo = sub.add_parser("demo", help="the main job: experiments 1-2, a 2-epoch BatchNorm run, the backend comparison")
    common(demo, 2, backend="numba")
    demo.add_argument("--compare-epochs", type=_positive_int, default=1, help="epochs of the backend comparison")
    demo.set_defaults(func=_demo)

    side = sub.add_parser("side-by-side", help="every backend on one BatchNorm and one Adam step")
    side.add_argument("--repeat", type=_positive_int, default=20, help="timed calls per backend (default 20)")
    side.set_defaults(func=_demo_side_by_side)

    warmup_help = "build fastnorm's C++ ops and compile every numba kernel (on a GPU also the cuda kernels) ahead"
    warm = sub.add_parser("warmup", help=warmup_help)
    warm.add_argument("--dtypes", default="float32,float64,bfloat16,float16",
                      help="comma-separated storage dtypes to compile (default: all four)")  # fmt: skip
    warm.set_defaults(func=_warmup)

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


def _warmup(args: argparse.Namespace) -> int:
    """Build the C++ ops and compile (or load from Numba's cache) every kernel entry point."""
    from . import _ops

    dtypes = tuple(d.strip() for d in args.dtypes.split(",") if d.strip())
    unknown = [d for d in dtypes if d not in _ops.STORAGES[:4]]
    if unknown:
        raise SystemExit(f"fastnorm warmup: unknown dtype {unknown[0]!r}; choose from {', '.join(_ops.STORAGES[:4])}")
    for what, seconds in _ops.warmup(dtypes).items():
        print(f"{what:40s} {seconds:6.1f} s")
    return 0


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "amp", False) and args.dtype == "float32":
        parser.error("--amp (autocast) needs a 16-bit --dtype: bfloat16 or float16")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
