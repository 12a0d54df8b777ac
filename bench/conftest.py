"""pytest-benchmark harness shared by the suites: providers, options, measurement, records.

Every benchmark goes through :func:`measure`, which
* times the first call apart (Numba compilation or cache load: "first call minus steady state"
  is reported as ``compile_s``), then warms up and sizes the number of rounds to a time budget;
* synchronises CUDA after every call, so GPU timings are wall times of finished work;
* stores in ``extra_info`` the op, case, provider, bytes moved by the minimal algorithm and
  the achieved GB/s (the report adds the percent of the in-place bandwidth roofline).

A provider that cannot run here is skipped with its reason, and the reasons are written into the
JSON's ``machine_info["fastnorm_skipped"]`` so the report lists them too.

Options: ``--bench-device cpu|cuda``, ``--bench-quick`` (fewer shapes and rounds),
``--bench-budget SECONDS`` (time per benchmark), ``--bench-providers a,b`` (filter).
"""

from __future__ import annotations

import datetime
import os
import platform
import time
from collections.abc import Callable

import pytest
import torch

import fastnorm

_SKIPPED: dict[str, str] = {}


def pytest_addoption(parser):
    group = parser.getgroup("fastnorm bench")
    group.addoption("--bench-device", default=os.environ.get("FASTNORM_BENCH_DEVICE", "cpu"),
                    choices=["cpu", "cuda"], help="device of the benchmarked tensors")  # fmt: skip
    group.addoption("--bench-quick", action="store_true", help="fewer shapes and rounds (~1 minute)")
    group.addoption("--bench-budget", type=float, default=None,
                    help="seconds of timed calls per benchmark (default 1.0, quick 0.15)")  # fmt: skip
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
def use_provider(request, device):
    """``use_provider(provider, op)``: skip (with the reason) unless it can run here."""
    wanted = [p for p in request.config.getoption("--bench-providers").split(",") if p]

    def check(provider: str, op: str) -> None:
        if wanted and provider not in wanted:
            pytest.skip(f"provider {provider!r} not selected (--bench-providers)")
        reason = provider_skip_reason(provider, op, device)
        if reason:
            pytest.skip(reason)

    return check


TORCH_OPTIM_VARIANTS = {"torch": {}, "torch-foreach": {"foreach": True}, "torch-fused": {"fused": True}}
#: torch.optim classes with a fused implementation in the installed torch
TORCH_FUSED = {"SGD", "Adagrad", "Adam", "AdamW"}


def provider_skip_reason(provider: str, op: str, device: torch.device) -> str | None:
    """None if ``provider`` runs ``op`` on ``device`` here, else why not."""
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


def measure(benchmark, fn: Callable[[], object], *, device: torch.device, budget: float,
            bytes_moved: int, op: str, case: str, provider: str, **info) -> None:  # fmt: skip
    """Benchmark ``fn`` with warm-up and a time budget; record bytes and GB/s in extra_info."""
    sync = _synchronizer(device)

    def call():
        fn()
        sync()

    benchmark.extra_info.update(op=op, case=case, provider=provider, bytes=int(bytes_moved),
                                device=str(device), **info)  # fmt: skip
    if benchmark.disabled:  # --benchmark-disable (CI): run once, so that nothing rots
        benchmark(call)
        return
    start = time.perf_counter()
    call()
    first = time.perf_counter() - start
    start = time.perf_counter()
    call()
    per_call = max(time.perf_counter() - start, 1e-7)
    if per_call * 5 > 3 * budget:  # slow provider (e.g. NumPy at 100M values): 3 rounds
        rounds, warmup = 3, 0
    else:
        rounds, warmup = int(min(max(budget / per_call, 5), 5000)), 2
    benchmark.pedantic(call, rounds=rounds, iterations=1, warmup_rounds=warmup)
    median = benchmark.stats.stats.median
    benchmark.extra_info.update(
        first_call_s=first,
        compile_s=max(first - median, 0.0),
        gbps=bytes_moved / median / 1e9,
    )
