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
    import fastnorm_kernels.numba_cuda as kc
    from fastnorm import _dispatch

    monkeypatch.setitem(_dispatch._DEVICE_TYPE, "cuda", "cpu")
    real_load = _dispatch._load
    monkeypatch.setattr(_dispatch, "_load", lambda name: (kc, None) if name == "cuda" else real_load(name))
    monkeypatch.setattr(_dispatch.Backend, "device_guard", lambda self, t: contextlib.nullcontext())
    _dispatch._RESOLVED.clear()
    yield
    _dispatch._RESOLVED.clear()


#: the ops whose CUDA kernels are fastnorm's C++ launches (fastnorm/csrc/*_cuda.cpp, layer_norm.cpp, group_norm.cpp)
CPP_CUDA_OPS = ("batch_norm_forward", "batch_norm_backward", "batch_norm_stats", "row_norm_forward",
                "row_norm_backward", "group_norm_forward", "group_norm_backward", "sgd_", "adagrad_", "rmsprop_",
                "adam_")  # fmt: skip


@pytest.fixture
def cpp_cuda_launches():
    """Every launch of the C++ cuda ops runs under the simulator, on host memory: yields the list
    of (function, grid, block) launched. The hook gets each kernel's module, function and
    signature from the C++ kernel table, and the arguments as the C++ code packed them."""
    import importlib

    from fastnorm import _ops
    from fastnorm_kernels.numba_cuda import ptx

    module = _ops.load()
    if module is None:
        pytest.skip(f"fastnorm's C++ ops cannot be built here: {_ops.error()}")
    ran = []

    def run(module_name, function, signature, storage, grid, block, args):
        ran.append((function, tuple(grid), tuple(block)))
        kernels = importlib.import_module(f"fastnorm_kernels.numba_cuda.{module_name}")
        kernel = getattr(kernels, ptx.function_name(function, storage))
        kernel[tuple(grid), tuple(block)](*ptx.typed_args(signature, storage, args))

    module.cuda_set_hook(run)
    try:
        yield ran
    finally:
        module.cuda_set_hook(None)


@pytest.fixture
def cpp_cuda_ops_on_cpu(cpp_cuda_launches):
    """fastnorm's C++ ops on CPU tensors run their CUDA kernels (the C++ launch code a GPU runs,
    the kernels under the simulator): their CPU kernels are overridden, for the test, by ones that
    redispatch to the CUDA key. Every layer above (the modules, the C++ autograd nodes, the
    optimizers, torch.compile's graphs) is the numba backend's, unchanged. Yields the launches."""
    import warnings

    import torch

    cuda_keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)
    library = torch.library.Library("fastnorm", "IMPL")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "overriding a previously registered kernel": for this test only
        for name in CPP_CUDA_OPS:
            handle = getattr(torch.ops.fastnorm, name).default
            library.impl(name, lambda *args, _h=handle, **kwargs: _h.redispatch(cuda_keys, *args, **kwargs), "CPU")
    try:
        yield cpp_cuda_launches
    finally:
        library._destroy()  # torch's dispatcher falls back to the CPU kernels registered before


# This file is the module "conftest" in this directory's tests: the suite's helpers, which tests
# import from tests/conftest.py, are re-exported here for the modules shared with it.
_spec = importlib.util.spec_from_file_location("_suite_conftest", Path(__file__).parents[1] / "conftest.py")
_suite = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_suite)
assert_close, BN_BACKENDS, OPTIM_BACKENDS = _suite.assert_close, _suite.BN_BACKENDS, _suite.OPTIM_BACKENDS
