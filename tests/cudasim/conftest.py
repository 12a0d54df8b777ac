"""The CUDA kernels under Numba's simulator: run as a separate pytest process with
NUMBA_ENABLE_CUDASIM=1 (set before numba is imported), as `make test` does."""

import contextlib
import importlib.util
import os
import sys
from pathlib import Path

import pytest

if os.environ.get("NUMBA_ENABLE_CUDASIM") != "1":
    pytest.exit("tests/cudasim needs NUMBA_ENABLE_CUDASIM=1 in the environment (see the Makefile)", returncode=4)

# The simulator runs each GPU thread of a block as a Python thread, and every cuda.syncthreads()
# waits until all of them have run: with CPython's default switch interval (5 ms) a barrier costs
# milliseconds of idle waiting. 10 us makes the kernels with block reductions (the LayerNorm,
# RMSNorm and GroupNorm rows) ~7x faster here; results are the same (the kernels do not race).
sys.setswitchinterval(1e-5)


def _thread_safe_shared_arrays() -> None:
    """The simulator's ``cuda.shared.array`` gives the threads of a block one array per source
    line, found or made by a check-then-insert on a dict that no lock guards: two threads that
    interleave there each make their own array, and their block reduction sums the wrong values
    (a BatchNorm dx off by 7e-2, seen about once in 60 runs of a test; a simulator race, not a
    kernel one: on a GPU one shared array per block is the hardware's). Same lookup, under a lock."""
    import threading

    import numpy as np
    from numba.cuda.simulator import kernelapi

    original = kernelapi.FakeCUDAShared.array
    lock = threading.Lock()

    def array(self, shape, dtype, alignment=None):
        if alignment is not None or shape == 0:  # errors and dynamic shared memory: no lookup
            return original(self, shape, dtype, alignment)
        if isinstance(dtype, kernelapi.types.Type):
            dtype = kernelapi.numpy_support.as_dtype(dtype)
        frame = sys._getframe(1)
        caller = (frame.f_code.co_filename, frame.f_lineno)  # the simulator's key: the calling line
        with lock:
            res = self._allocations.get(caller)
            if res is None:
                res = self._allocations[caller] = np.empty(shape, dtype)
        return res

    kernelapi.FakeCUDAShared.array = array


_thread_safe_shared_arrays()


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
