"""Every CUDA kernel compiles to PTX for an H100/H200 (sm_90), without a GPU.

Numba's simulator (tests/cudasim) runs the kernels' Python on the CPU and checks their results,
but it never types or lowers them: a kernel that the real compiler rejects (an unsupported
intrinsic, a typing error in a device function, a tuple it cannot pass) would pass there and
fail on the first GPU. Here numba-cuda's compiler and NVVM build each kernel for the argument
types fastnorm launches it with, float32 and float64, as the GPU would, and nothing runs.
Each kernel must also store to global memory: once, stores through an array view were
compiled away, which the simulator cannot see. It needs libNVVM (the CUDA toolkit);
numba-cuda asks the driver for the compute capability, which this test supplies (there is no
driver without a GPU).
"""

from __future__ import annotations

import os
import re
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
    from fastnorm_kernels.numba_cuda import optim

    # (kernel, number of constants, number of flags): kernels/fastnorm_kernels/formulas/optim.py's k and flags;
    # arguments: the address table's address and T, the chunk table's and K, the two step
    # scalars, constants, flags, uses, the (unused) rounding seed
    for kernel, constants, flags in [(optim._sgd, 5, 2), (optim._adagrad, 3, 1), (optim._rmsprop, 7, 2),
                                     (optim._adam, 8, 2)]:  # fmt: skip
        signature = (I64, I64, I64, I64, dtype, dtype, nt.UniTuple(dtype, constants), nt.UniTuple(B, flags),
                     nt.UniTuple(B, 3), nt.uint32)  # fmt: skip
        ptx = compile_ptx(kernel, signature)
        assert ".entry" in ptx and "st.global" in ptx, f"{kernel.py_func.__name__} stores nothing"


@pytest.mark.parametrize("storage", ["bf16", "bf16_sr", "f16"])
def test_16_bit_optimizer_kernels_compile(compile_ptx, storage):
    """bfloat16 / float16 storage (uint16 bits; kernels/fastnorm_kernels/numba_cuda/_bits.py): float32 scalars and
    constants, the stochastic rounding seed; every kernel stores 16-bit values to global memory."""
    from fastnorm_kernels.numba_cuda import optim

    f32 = nt.float32
    for op, constants, flags in [("sgd", 5, 2), ("adam", 8, 2)]:
        signature = (I64, I64, I64, I64, f32, f32, nt.UniTuple(f32, constants), nt.UniTuple(B, flags),
                     nt.UniTuple(B, 3), nt.uint32)  # fmt: skip
        ptx = compile_ptx(optim._KERNELS[(op, storage)], signature)
        assert ".entry" in ptx and re.search(r"st\.global\.[ub]16", ptx), f"{op} {storage} stores no 16-bit value"
        if storage == "f16":
            assert "cvt.f32.f16" in ptx and "cvt.rn.f16.f32" in ptx, "float16 conversions"


# (storage, compute): the data's typed zero (16-bit data as bits: bfloat16 uint16, float16 int16)
# and the per-channel arrays'
BN_TYPES = [(nt.float32, nt.float32), (nt.float64, nt.float64), (nt.uint16, nt.float32), (nt.int16, nt.float32)]


@pytest.mark.parametrize("dtype,compute", BN_TYPES, ids=lambda t: str(t))
def test_batch_norm_kernels_compile(compile_ptx, dtype, compute):
    from fastnorm_kernels.numba_cuda import batchnorm as bn

    # every array is an int64 address (A); `dtype` / `compute` the typed zeros the kernels view them with
    A, D, K = I64, dtype, compute
    signatures = {
        bn._stats_planes: (A, D, I64, I64, I64, A),
        bn._grad_planes: (A, A, A, D, K, I64, I64, I64, A),
        bn._stats_rows: (A, D, I64, I64, A),
        bn._grad_rows: (A, A, A, D, K, I64, I64, A),
        bn._finalize_train: (A, D, K, I64, I64, I64, A, I64, F64, F64, A, A, B, A, B, A, B, A, A, A),
        bn._finalize_eval: (A, A, K, I64, F64, A, B, A, B, A),
        bn._finalize_backward: (A, I64, K, I64, F64, A, A, A, B, B, A, B, A, B, A),
        bn._finalize_stats: (A, D, I64, I64, I64, A, I64, A, A),
        bn._normalize_planes: (A, A, A, D, K, I64, I64, I64),
        bn._normalize_flat: (A, A, A, D, K, I64, I64, I64),
        bn._input_grad_planes: (A, A, A, D, K, I64, I64, I64, A),
        bn._input_grad_flat: (A, A, A, D, K, I64, I64, I64, A),
    }
    for kernel, signature in signatures.items():
        ptx = compile_ptx(kernel, signature)
        assert ".entry" in ptx, kernel.py_func.__name__
        # every kernel writes its results to global memory: a store the compiler dropped (as it
        # did for stores through numba's carray at indices it could not prove non-negative)
        # would pass the simulator and write nothing on a GPU
        assert "st.global" in ptx, f"{kernel.py_func.__name__}: no store to global memory in the PTX"
        assert ".local" not in ptx, f"{kernel.py_func.__name__}: local-memory arrays (spills or stack) in the PTX"


@pytest.mark.parametrize("dtype,compute", BN_TYPES, ids=lambda t: str(t))
def test_norm_family_kernels_compile(compile_ptx, dtype, compute):
    """LayerNorm / RMSNorm / GroupNorm (kernels/fastnorm_kernels/numba_cuda/layernorm.py's grouped-row kernels, which
    groupnorm.py launches too), with the argument types their launchers pass."""
    from fastnorm_kernels.numba_cuda import layernorm as ln

    A, D, K = I64, dtype, compute
    signatures = {
        ln._forward_rows: (A, A, A, B, A, B, D, K, I64, I64, I64, I64, I64, F64, B, A, A),
        ln._input_grad_rows: (A, A, A, A, A, B, D, K, I64, I64, I64, I64, I64, B, A),
        ln._param_partials_columns: (A, A, A, A, D, K, I64, I64, I64, I64, B, A),
        ln._param_partials_planes: (A, A, A, A, D, K, I64, I64, I64, I64, I64, B, A),
        ln._param_finalize: (A, I64, K, I64, A, B, A, B),
    }
    for kernel, signature in signatures.items():
        ptx = compile_ptx(kernel, signature)
        assert ".entry" in ptx, kernel.py_func.__name__
        assert "st.global" in ptx, f"{kernel.py_func.__name__}: no store to global memory in the PTX"
        assert ".local" not in ptx, f"{kernel.py_func.__name__}: local-memory arrays (spills or stack) in the PTX"


def test_the_cpp_cuda_ops_kernels_compile_with_their_launch_signatures(compile_ptx, tmp_path, monkeypatch):
    """Every kernel the C++ cuda ops launch (fastnorm/csrc/cuda_launch.cpp's table: module,
    function, signature string) compiles through kernels/fastnorm_kernels/numba_cuda/ptx.py for each storage into
    PTX that needs no linking, and the PTX entry's parameters are those the C++ launch packs
    (ptx.check_entry: count and sizes); the second ask is read from the on-disk cache, unchanged."""
    from fastnorm import _ops
    from fastnorm_kernels.numba_cuda import ptx

    module = _ops.load()
    if module is None:
        pytest.skip(f"fastnorm's C++ ops cannot be built here: {_ops.error()}")
    monkeypatch.setenv("FASTNORM_PTX_CACHE", str(tmp_path))
    specs = module.cuda_kernels()
    names = {function for _, function, _ in specs}
    assert names >= {"_stats_planes", "_finalize_train", "_input_grad_flat", "_adam{storage}"}
    compiled = 0
    for module_name, function, signature in specs:
        # storages 0-3 (float32, float64, bfloat16, float16); the optimizers' also 4 (bfloat16, stochastic rounding)
        for storage in range(5 if module_name == "optim" else 4):
            text, entry = ptx.kernel_ptx(module_name, function, signature, storage, *CC)
            assert entry in text and "st.global" in text, f"{function} {storage}"
            # cuModuleLoadData links nothing: a call to a function defined elsewhere (numba-cuda's
            # C++ shims, say) would fail to load on the GPU
            assert ".extern" not in text, f"{function} {storage}: calls a function the PTX does not hold"
            compiled += 1
    cached = sorted(tmp_path.iterdir())
    assert len(cached) == compiled
    module_name, function, signature = specs[0]
    assert ptx.kernel_ptx(module_name, function, signature, 2, *CC)[0] == next(
        p.read_text() for p in cached if f"{function}.bfloat16." in p.name
    )
    with pytest.raises(RuntimeError, match="do not match the signature"):
        ptx.check_entry(text, signature[:-1], storage)  # a launcher that packs one argument fewer
    with pytest.raises(RuntimeError, match="do not match the signature"):
        ptx.check_entry(text, signature[:-1] + "f", storage)  # or one of another size


def test_the_cpp_cuda_ops_are_registered_and_say_why_they_cannot_launch_here():
    """The CUDA dispatch key has fastnorm's BatchNorm kernels (built on a machine without a GPU
    or CUDA toolkit); without a driver they say so, and fastnorm keeps to its Python launch path."""
    import torch

    from fastnorm import _ops

    if _ops.load() is None:
        pytest.skip(f"fastnorm's C++ ops cannot be built here: {_ops.error()}")
    for op in ("batch_norm_forward", "batch_norm_backward", "batch_norm_stats"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fastnorm::{op}", "CUDA"), op
    if not torch.cuda.is_available():
        assert _ops.cuda_unusable() is not None
        assert _ops.cuda_available() is False


def test_warmup_compiles_every_cpp_cuda_kernel_into_the_cache(compile_ptx, tmp_path, monkeypatch):
    """``fastnorm warmup`` on a GPU machine compiles the C++ cuda ops' kernels ahead
    (_ops.warmup_cuda, here for sm_90 and float32 / bfloat16): one entry per kernel and storage,
    stochastic rounding for the optimizers only, each in the on-disk cache a later process reads."""
    from fastnorm import _ops

    if _ops.load() is None:
        pytest.skip(f"fastnorm's C++ ops cannot be built here: {_ops.error()}")
    monkeypatch.setenv("FASTNORM_PTX_CACHE", str(tmp_path))
    times = _ops.warmup_cuda(("float32", "bfloat16"), CC)
    kernels = _ops.load().cuda_kernels()
    optimizers = sum("{storage}" in function for _, function, _ in kernels)
    assert len(times) == 2 * len(kernels) + optimizers
    assert "cuda optim._adam_bf16_sr bfloat16_sr" in times and "cuda batchnorm._stats_planes float32" in times
    assert len(list(tmp_path.iterdir())) == len(times)
