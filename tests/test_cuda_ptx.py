"""Every CUDA kernel compiles to PTX for an H100/H200 (sm_90), without a GPU.

Numba's simulator (tests/cudasim) runs the kernels' Python on the CPU and checks their results,
but it never types or lowers them: a kernel that the real compiler rejects (an unsupported
intrinsic, a typing error in a device function, a tuple it cannot pass) would pass there and
fail on the first GPU. Here numba-cuda's compiler and NVVM build each kernel for the argument
types fastnorm launches it with, float32 and float64, as the GPU would, and nothing runs.
It needs libNVVM (the CUDA toolkit); numba-cuda asks the driver for the compute capability,
which this test supplies (there is no driver without a GPU).
"""

from __future__ import annotations

import os
import types

import pytest

if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
    pytest.skip("compiles for a real GPU: runs outside the simulator", allow_module_level=True)

numba_cuda = pytest.importorskip("numba.cuda")
from numba import cuda  # noqa: E402
from numba import types as nt  # noqa: E402

CC = (9, 0)  # H100 / H200


def _nvvm_missing() -> str | None:
    try:
        from numba.cuda.cudadrv import nvvm

        nvvm.NVVM()
    except Exception as exc:  # no CUDA toolkit on this machine
        return f"libNVVM is not available here ({exc})"
    return None


@pytest.fixture(scope="module")
def compile_ptx():
    reason = _nvvm_missing()
    if reason:
        pytest.skip(reason)
    import numba.cuda.api as api
    import numba.cuda.dispatcher as dispatcher

    fake = types.SimpleNamespace(compute_capability=CC)
    saved = dispatcher.get_current_device, api.get_current_device
    dispatcher.get_current_device = api.get_current_device = lambda: fake
    try:
        yield lambda kernel, signature: cuda.compile_ptx(kernel.py_func, signature, cc=CC)[0]
    finally:
        dispatcher.get_current_device, api.get_current_device = saved


def _a(dtype, ndim=1):
    return nt.Array(dtype, ndim, "C")


F64, I64, B = nt.float64, nt.int64, nt.boolean
DTYPES = [nt.float32, nt.float64]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_optimizer_kernels_compile(compile_ptx, dtype):
    from kernels.numba_cuda import optim

    # (kernel, number of constants, number of flags): kernels/formulas/optim.py's k and flags
    for kernel, constants, flags in [(optim._sgd, 5, 2), (optim._adagrad, 3, 1), (optim._rmsprop, 7, 2),
                                     (optim._adam, 8, 2)]:  # fmt: skip
        signature = (_a(I64, 2), _a(I64, 2), _a(dtype, 2), nt.UniTuple(dtype, constants), nt.UniTuple(B, flags),
                     nt.UniTuple(B, 3))  # fmt: skip
        assert ".entry" in compile_ptx(kernel, signature)
    for kernel in (optim._count_steps, optim._adagrad_steps, optim._adam_steps):
        assert ".entry" in compile_ptx(kernel, (_a(I64), B, nt.UniTuple(F64, 3), _a(dtype, 2)))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_batch_norm_kernels_compile(compile_ptx, dtype):
    from kernels.numba_cuda import batchnorm as bn

    x3, x2, x1, p = _a(dtype, 3), _a(dtype, 2), _a(dtype), _a(F64, 2)
    signatures = {
        bn._sums_planes: (x3, x3, _a(F64), B, p, p),
        bn._sums_rows: (x2, x2, _a(F64), B, p, p),
        bn._shift: (x3, _a(F64)),
        bn._finalize_train: (p, p, _a(F64), F64, F64, F64, x1, x1, B, x1, B, x1, B, x1, x1, x2),
        bn._finalize_eval: (x1, x1, F64, x1, B, x1, B, x2),
        bn._finalize_backward: (p, p, F64, x1, x1, B, B, x1, B, x1, B, x2),
        bn._finalize_stats: (p, p, _a(F64), F64, _a(F64), _a(F64)),
        bn._normalize: (x1, x2, I64, x1),
        bn._input_grad: (x1, x1, x1, x2, I64, x1),
        bn._to_f64: (x1, _a(F64)),
        bn._fill_zero: (p,),
    }
    for kernel, signature in signatures.items():
        assert ".entry" in compile_ptx(kernel, signature), kernel.py_func.__name__
