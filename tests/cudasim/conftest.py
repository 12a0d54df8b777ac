"""The CUDA kernels under Numba's simulator: run as a separate pytest process with
NUMBA_ENABLE_CUDASIM=1 (set before numba is imported), as `make test` does."""

import contextlib
import importlib.util
import os
from pathlib import Path

import pytest

if os.environ.get("NUMBA_ENABLE_CUDASIM") != "1":
    pytest.exit("tests/cudasim needs NUMBA_ENABLE_CUDASIM=1 in the environment (see the Makefile)", returncode=4)


@pytest.fixture
def cuda_backend_on_cpu(monkeypatch):
    """fastnorm's cuda backend on CPU tensors: under the simulator "device" memory is host memory,
    so the dispatcher is told the cuda backend runs on the CPU (no stream or allocator hooks, no
    device guard); everything else is the code a GPU runs."""
    import kernels.numba_cuda as kc
    from fastnorm import _dispatch

    monkeypatch.setitem(_dispatch._DEVICE_TYPE, "cuda", "cpu")
    real_load = _dispatch._load
    monkeypatch.setattr(_dispatch, "_load", lambda name: (kc, None) if name == "cuda" else real_load(name))
    monkeypatch.setattr(_dispatch.Backend, "device_guard", lambda self, t: contextlib.nullcontext())
    _dispatch._RESOLVED.clear()
    yield
    _dispatch._RESOLVED.clear()


# This file is the module "conftest" in this directory's tests: the suite's helpers, which tests
# import from tests/conftest.py, are re-exported here for the modules shared with it.
_spec = importlib.util.spec_from_file_location("_suite_conftest", Path(__file__).parents[1] / "conftest.py")
_suite = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_suite)
assert_close, BN_BACKENDS, OPTIM_BACKENDS = _suite.assert_close, _suite.BN_BACKENDS, _suite.OPTIM_BACKENDS
