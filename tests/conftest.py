"""Shared fixtures and helpers for the correctness suite."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, settings

#: fastnorm's CPU kernel backends under test, per op family; each is compared with torch ("torch"
#: itself is the yardstick). Listed explicitly so a backend that fails to load fails the suite.
BN_BACKENDS = ["reference", "numba"]
OPTIM_BACKENDS = ["reference", "numba"]


@pytest.fixture
def pool_min_bytes(monkeypatch):
    """A setter of the smallest output both CPU buffer pools hand out (the Python one, which the
    reference backend's outputs come from, and the C++ ops'); the thresholds are restored afterwards."""
    from fastnorm import _ops
    from fastnorm._arrays import pool

    extension = _ops.load()
    saved = pool.min_bytes

    def set_min_bytes(n: int) -> None:
        monkeypatch.setattr(pool, "min_bytes", n)
        if extension is not None:
            extension.pool_configure(n, pool.max_bytes)

    yield set_min_bytes
    if extension is not None:
        extension.pool_configure(saved, pool.max_bytes)


def pools_in_use() -> int:
    """Bytes handed out by both CPU buffer pools and still referenced."""
    from fastnorm import _ops
    from fastnorm._arrays import pool

    return pool.in_use() + _ops.pool_in_use()


# Differential tests (hypothesis): deterministic in CI, longer on demand
# (``pytest --hypothesis-profile=long``).
_FUZZ = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("ci", derandomize=True, max_examples=40, stateful_step_count=25, **_FUZZ)
settings.register_profile("long", max_examples=1000, stateful_step_count=60, **_FUZZ)
settings.load_profile("ci")

#: (dtype, rtol, atol) for outputs and gradients compared with torch in the same dtype.
TOLERANCES = {
    torch.float64: (1e-9, 1e-10),
    torch.float32: (1e-4, 2e-5),
}


# The simulator suite runs in its own process (NUMBA_ENABLE_CUDASIM=1 must precede numba's import).
collect_ignore = [] if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1" else ["cudasim"]
# The GPU suite needs a CUDA device: bench/gpu_check.sh runs it on one.
if not torch.cuda.is_available():
    collect_ignore.append("gpu")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float, atol: float, what: str = ""):
    """allclose that says where and by how much it failed (NaN matches NaN, inf matches inf)."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a = actual.detach().to(torch.float64).cpu()
    e = expected.detach().to(torch.float64).cpu()
    same_nonfinite = (a.isnan() & e.isnan()) | (a == e)
    bad = ~(same_nonfinite | ((a - e).abs() <= atol + rtol * e.abs()))
    if bad.any():
        idx = tuple(int(i) for i in bad.nonzero()[0])
        worst = ((a - e).abs() - rtol * e.abs()).nan_to_num(float("inf")).max().item()
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {a.numel()} values differ; first at {idx}: "
            f"{a[idx].item()!r} vs {e[idx].item()!r}; worst excess over rtol {worst:.3e} (atol {atol})"
        )


def tol(dtype: torch.dtype) -> tuple[float, float]:
    return TOLERANCES[dtype]


#: The offline MNIST copy (read-only) that tests and the demo use.
SHARED_MNIST = (
    __import__("pathlib").Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "mnist"
).resolve()


@pytest.fixture(scope="session")
def mnist_cache(tmp_path_factory):
    """A writable cache for the decompressed IDX files, private to this test session."""
    import os

    path = tmp_path_factory.mktemp("fastnorm-cache")
    old = os.environ.get("FASTNORM_CACHE")
    os.environ["FASTNORM_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("FASTNORM_CACHE", None)
    else:
        os.environ["FASTNORM_CACHE"] = old


@pytest.fixture(scope="session")
def mnist(mnist_cache):
    from fastnorm.book.data import load_mnist

    return load_mnist(SHARED_MNIST, download=False)
