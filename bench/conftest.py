"""pytest-benchmark harness shared by the suites: providers, options, measurement, records.

Every benchmark is a comparison: one test per (op, case) times all its providers side by side
with :func:`compare`, which
* times each provider's first call apart (Numba compilation or cache load, torch.compile:
  "first call minus steady state" is reported as ``compile_s``), then warms each up twice;
* runs rounds in which every provider is called once, in an order shuffled per round
  (bench/paired.py explains why), at least ``MIN_ROUNDS`` rounds and as many as the time budget
  allows: pytest-benchmark drives the rounds, so its own statistics are those of a whole round;
* synchronises CUDA after every call, so GPU timings are wall times of finished work;
* stores in ``extra_info["providers"]`` each provider's samples, median and interquartile range,
  its GB/s from the bytes moved by the minimal algorithm (the report adds the percent of the
  bandwidth roofline and bootstrap intervals of the speedups), and in ``extra_info["skipped"]``
  each provider that could not run here with its reason; it fails the test if a provider
  produced a time that is not positive.

Skip reasons are also written into the JSON's ``machine_info["fastnorm_skipped"]``.

Options: ``--bench-device cpu|cuda``, ``--bench-quick`` (fewer shapes and rounds),
``--bench-budget SECONDS`` (time per benchmark), ``--bench-providers a,b`` (filter).
"""

from __future__ import annotations

import datetime
import os
import platform
import random
import statistics
import time
from collections.abc import Callable

import pytest
import torch

import fastnorm

_SKIPPED: dict[str, str] = {}
#: every comparison runs at least this many rounds (each provider once per round), however slow
MIN_ROUNDS = 15
MAX_ROUNDS = 300


def pytest_addoption(parser):
    group = parser.getgroup("fastnorm bench")
    group.addoption("--bench-device", default=os.environ.get("FASTNORM_BENCH_DEVICE", "cpu"),
                    choices=["cpu", "cuda"], help="device of the benchmarked tensors")  # fmt: skip
    group.addoption("--bench-quick", action="store_true", help="fewer shapes and rounds (~1 minute)")
    group.addoption("--bench-budget", type=float, default=None,
                    help="seconds of timed calls per provider of a comparison (default 1.0, quick 0.15)")  # fmt: skip
    group.addoption("--bench-providers", default="",
                    help="comma-separated providers to run (default: all)")  # fmt: skip


def pytest_configure(config):
    config.addinivalue_line("markers", "quick: part of the --bench-quick selection")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--bench-quick"):
        selected = [it for it in items if it.get_closest_marker("quick")]
        config.hook.pytest_deselected(items=[it for it in items if it not in selected])
        items[:] = selected


def pytest_runtest_logreport(report):
    if report.skipped and report.when in ("setup", "call"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _SKIPPED[report.nodeid.split("::")[-1]] = reason.removeprefix("Skipped: ")


def pytest_benchmark_update_machine_info(config, machine_info):
    import numba
    import numpy

    machine_info["fastnorm"] = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "device": config.getoption("--bench-device"),
        "cpu_model": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "numba_threads": numba.config.NUMBA_NUM_THREADS,
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "numba": numba.__version__,
            "numpy": numpy.__version__,
            "fastnorm": fastnorm.__version__,
        },
        "backends": fastnorm.backends(),
        "quick": config.getoption("--bench-quick"),
    }
    machine_info["fastnorm_skipped"] = dict(sorted(_SKIPPED.items()))


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


@pytest.fixture(scope="session")
def device(request) -> torch.device:
    name = request.config.getoption("--bench-device")
    if name == "cuda" and not torch.cuda.is_available():
        pytest.exit("--bench-device cuda: no CUDA device here", returncode=2)
    return torch.device(name)


@pytest.fixture(scope="session")
def budget(request) -> float:
    value = request.config.getoption("--bench-budget")
    if value is None:
        value = 0.15 if request.config.getoption("--bench-quick") else 1.0
    return value


@pytest.fixture
def runnable(request, device):
    """``runnable(provider, op)``: None if the provider runs ``op`` here and was selected
    (``--bench-providers``), else the reason it does not."""
    wanted = [p for p in request.config.getoption("--bench-providers").split(",") if p]

    def check(provider: str, op: str) -> str | None:
        if wanted and provider not in wanted:
            return f"provider {provider!r} not selected (--bench-providers)"
        return provider_skip_reason(provider, op, device)

    return check


TORCH_OPTIM_VARIANTS = {"torch": {}, "torch-foreach": {"foreach": True}, "torch-fused": {"fused": True},
                        "torch-compiled": {}}  # fmt: skip
#: torch.optim classes with a fused implementation in the installed torch
TORCH_FUSED = {"SGD", "Adagrad", "Adam", "AdamW"}


#: providers that run a backend's kernels without its layer around them (bench/test_bench_batchnorm.py)
KERNEL_PROVIDERS = {"torch-prealloc": "torch", "numba-kernels": "numba"}


def provider_skip_reason(provider: str, op: str, device: torch.device) -> str | None:
    """None if ``provider`` runs ``op`` on ``device`` here, else why not."""
    if provider in KERNEL_PROVIDERS:
        if provider == "numba-kernels" and device.type != "cpu":
            return "the numba kernels run on CPU tensors only"
        provider = KERNEL_PROVIDERS[provider]
    if provider in TORCH_OPTIM_VARIANTS or provider == "torch":
        if provider == "torch-fused" and op not in TORCH_FUSED:
            return f"torch {torch.__version__} has no fused {op}"
        if provider == "torch-fused" and op == "Adagrad" and device.type != "cpu":
            return "torch's fused Adagrad runs on CPU only"
        return None
    kernels_op = {"SGD": "sgd", "Adagrad": "adagrad", "RMSprop": "rmsprop", "Adam": "adam",
                  "AdamW": "adam"}.get(op, op)  # fmt: skip
    try:
        fastnorm._dispatch.resolve(provider, kernels_op, device)
    except ValueError as exc:
        return str(exc)
    return None


def _synchronizer(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return torch.cuda.synchronize
    return lambda: None


def _process_memory() -> dict[str, int]:
    """This process's resident set (VmRSS) and its peak (VmHWM), in bytes (Linux), else {}."""
    try:
        with open("/proc/self/status") as f:
            fields = dict(line.split(":", 1) for line in f if line.startswith(("VmRSS", "VmHWM")))
    except OSError:
        return {}
    return {k: int(v.split()[0]) * 1024 for k, v in fields.items()}


def _reset_peak_rss() -> bool:
    """Return freed heap memory to the OS (glibc ``malloc_trim``) and reset the peak resident set
    to the current one (``/proc/self/clear_refs``, Linux): whether both worked."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def peak_memory(call: Callable[[], object], device: torch.device) -> int | None:
    """Peak memory one ``call`` adds, in bytes: on CUDA the peak of torch's allocator above what
    was allocated before; on CPU the growth of the process's peak resident set (after freed heap
    memory went back to the OS, so that what a call allocates is counted again: buffers a
    library keeps between calls, fastnorm's output pools among them, were resident before and
    are not). None where it cannot be measured."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        call()
        return torch.cuda.max_memory_allocated() - before
    if not _reset_peak_rss():
        return None
    before = _process_memory().get("VmRSS")
    call()
    peak = _process_memory().get("VmHWM")
    return None if before is None or peak is None else max(peak - before, 0)


def compare(benchmark, request, providers: dict[str, Callable[[], object] | str], *, device: torch.device,
            budget: float, op: str, case: str, bytes_moved: int, bytes_by_provider: dict | None = None,
            memory: bool = False, **info) -> dict[str, list[float]]:  # fmt: skip
    """Time ``providers`` ({name: fn, or the reason it cannot run here}) side by side (see the
    module's text); returns each provider's samples in seconds. ``bytes_by_provider`` overrides
    ``bytes_moved`` for providers that move a different amount (the GPU roofline's copy).
    ``memory``: also record each provider's :func:`peak_memory` of one call after its warm-up
    (``peak_bytes``)."""
    test = request.node.name
    skipped = {name: why for name, why in providers.items() if isinstance(why, str)}
    assert all(why.strip() for why in skipped.values()), f"{test}: a provider skipped without a reason"
    for name, why in skipped.items():
        _SKIPPED[f"{test}:{name}"] = why
    sync = _synchronizer(device)
    calls = {}
    for name, fn in providers.items():
        if name not in skipped:

            def call(fn=fn):
                fn()
                sync()

            calls[name] = call
    benchmark.extra_info.update(op=op, case=case, bytes=int(bytes_moved), device=str(device), interleaved=True,
                                skipped=skipped, **info)  # fmt: skip
    if not calls:
        pytest.skip("no provider runs here: " + "; ".join(f"{k}: {v}" for k, v in skipped.items()))
    first = {}
    for name, call in calls.items():
        start = time.perf_counter()
        call()
        first[name] = time.perf_counter() - start
    samples: dict[str, list[float]] = {name: [] for name in calls}
    order, rng = list(calls), random.Random(0)

    def one_round():
        rng.shuffle(order)
        for name in order:
            start = time.perf_counter()
            calls[name]()
            samples[name].append(time.perf_counter() - start)

    if benchmark.disabled:  # --benchmark-disable (CI): one round, so that nothing rots
        benchmark(one_round)
    else:
        for _ in range(2):  # warm-up, not recorded
            one_round()
        per_round = sum(v[-1] for v in samples.values())
        for v in samples.values():
            v.clear()
        rounds = int(min(max(budget * len(calls) / max(per_round, 1e-7), MIN_ROUNDS), MAX_ROUNDS))
        benchmark.pedantic(one_round, rounds=rounds, iterations=1, warmup_rounds=0)
    assert set(samples) | set(skipped) == set(providers)
    peaks = {name: peak_memory(call, device) for name, call in calls.items()} if memory else {}
    results = {}
    for name, times in samples.items():
        assert times, f"{test}: provider {name} has no timed round"
        bad = [t for t in times if not t > 0]
        assert not bad, f"{test}: provider {name} produced non-positive times {bad[:3]}"
        q1, med, q3 = statistics.quantiles(times, n=4, method="inclusive") if len(times) > 1 else (times[0],) * 3
        results[name] = {"median": med, "q1": q1, "q3": q3, "rounds": len(times),
                         "samples": [float(f"{t:.4g}") for t in times], "first_call_s": first[name],
                         "compile_s": max(first[name] - med, 0.0),
                         "gbps": (bytes_by_provider or {}).get(name, bytes_moved) / med / 1e9}  # fmt: skip
        if memory:
            results[name]["peak_bytes"] = peaks[name]
    benchmark.extra_info["providers"] = results
    return samples
