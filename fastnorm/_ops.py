"""fastnorm's C++ op layer: ``torch.ops.fastnorm.*``, built on first use and loaded.

The ops (fastnorm/csrc: ``batch_norm``, ``batch_norm_forward``, ``batch_norm_backward``,
``batch_norm_stats``, ``layer_norm``, ``rms_norm``, ``row_norm_forward``, ``row_norm_backward``,
``group_norm``, ``group_norm_forward``, ``group_norm_backward``, ``sgd_``, ``adagrad_``,
``rmsprop_``, ``adam_``) are registered with torch's dispatcher by a C++ extension that :func:`load`
builds once per source version, torch and Python (fastnorm/_build.py: a C++ compiler and ninja are
needed; ~2 minutes on two cores, then kept under ``~/.cache/fastnorm/ops`` or
``$FASTNORM_OPS_CACHE`` for every process and environment that would build the same library)
and loads in every process that uses the numba backend. Their CPU kernels are the numba kernels' C entry points
(``fastnorm_kernels.numba_cpu.batchnorm.c_entry_point``, ``fastnorm_kernels.numba_cpu.optim.c_entry_point``), which
the extension asks for the first time each one runs (compiled then, or loaded from Numba's cache).

Where the extension cannot be built (no compiler), the numba backend is unavailable:
``fastnorm.backends()`` leaves it out, asking for it raises ``ValueError`` naming the build's
error, and ``"auto"`` runs torch (docs/architecture.md). What is compiled for the first time
says so in one line on stderr; ``fastnorm warmup`` compiles everything ahead.
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading
import time
from pathlib import Path
from types import ModuleType

import torch

from fastnorm_kernels.formulas.optim import OPTIMIZERS

_CSRC = Path(__file__).resolve().parent / "csrc"
SOURCES = [
    _CSRC / "runtime.cpp",
    _CSRC / "batch_norm.cpp",
    _CSRC / "batch_norm_cuda.cpp",
    _CSRC / "cuda_launch.cpp",
    _CSRC / "layer_norm.cpp",
    _CSRC / "row_norm_cuda.cpp",
    _CSRC / "group_norm.cpp",
    _CSRC / "optim.cpp",
    _CSRC / "optim_cuda.cpp",
]
NAME = "fastnorm_ops"
CFLAGS = ("-O2",)
_lock = threading.RLock()
_extension: ModuleType | None = None
_error: str | None = None

#: the C entry point families of the extension (fastnorm/csrc/runtime.cpp, kFamilies) -> kernels module
_BATCH_NORM_FAMILIES = ("forward_train", "forward_eval", "backward", "stats")
_OPTIMIZER_FAMILIES = tuple(OPTIMIZERS)
_ROW_NORM_FAMILIES = ("row_norm_forward", "row_norm_backward")  # LayerNorm and RMSNorm
_GROUP_NORM_FAMILIES = ("group_norm_forward", "group_norm_backward")
#: storage codes (fastnorm/csrc/fastnorm.h, Storage)
STORAGES = ("float32", "float64", "bfloat16", "float16", "bfloat16_sr")


def say(message: str) -> None:
    """One line on stderr about first-use compilation (what users see while they wait)."""
    print(f"fastnorm: {message}", file=sys.stderr, flush=True)


def load() -> ModuleType | None:
    """The configured extension (its ops registered as ``torch.ops.fastnorm.*``), or None when it
    cannot be built (:func:`error` says why)."""
    global _extension, _error
    if _extension is not None or _error is not None:
        return _extension
    with _lock:
        if _extension is None and _error is None:
            try:
                _extension = _build()
            except Exception as exc:  # no compiler, no headers, a numba without the hooks used
                text = str(exc).strip()
                _error = f"{type(exc).__name__}: {text.splitlines()[-1] if text else ''}"
    return _extension


@torch.compiler.assume_constant_result
def available() -> bool:
    """Whether the ops are registered (building and loading them on the first call). Under
    ``torch.compile`` this runs once while tracing, its result a constant of the graph."""
    return load() is not None


def error() -> str | None:
    """Why the extension could not be built, or None."""
    return _error


def _build() -> ModuleType:
    import numba
    from numba.np.ufunc import parallel

    from . import _build as builder
    from ._arrays import pool

    numba.get_num_threads()  # launches Numba's threading layer (its thread-count setter exists from then on)
    set_threads = ctypes.cast(parallel._set_num_threads, ctypes.c_void_p).value
    library, _ = builder.build(NAME, SOURCES, CFLAGS, say=say)
    module = builder.load_module(NAME, library)
    module.configure(_entry_point, set_threads, _tunables())
    module.cuda_configure(_cuda_ptx, _cuda_geometry)  # each asked when a cuda op first needs it
    for d in OPTIMIZERS.values():  # torch.ops.fastnorm.<name>_, from the descriptions
        module.define_optimizer(d.name, d.schema(), len(d.buffers), d.counts_steps,
                                -1 if d.clone_first is None else d.clone_first, len(d.options), len(d.constants),
                                d.n_flags, d.cuda_signature())  # fmt: skip
    module.pool_configure(pool.min_bytes, pool.max_bytes)  # the Python pool's limits (FASTNORM_CPU_POOL_MB)
    pool.also_clear.append(module.pool_clear)
    return module


def _cuda_ptx(module: str, function: str, signature: str, storage: int, major: int, minor: int) -> tuple[str, str]:
    """(PTX, entry) of a CUDA kernel for the C++ cuda ops (kernels/fastnorm_kernels/numba_cuda/ptx.py), called the
    first time each (kernel, storage) launches on a device."""
    from fastnorm_kernels.numba_cuda import ptx

    return ptx.kernel_ptx(module, function, signature, storage, major, minor)


def _cuda_geometry() -> dict[str, int]:
    """The launch geometry of the CUDA kernels as kernels/fastnorm_kernels/numba_cuda holds it (the simulator's
    blocks are smaller than a GPU's)."""
    from fastnorm_kernels.numba_cuda import batchnorm, layernorm, optim

    names = ("BLOCK", "ROW_TILE", "ROW_LANES", "TARGET_BLOCKS", "UNROLL", "PLANE_MIN")
    geometry = {name.lower(): int(getattr(batchnorm, name)) for name in names}
    rows = ("ROW_BLOCK", "COL_TILE", "COL_LANES", "MAX_ROW_BLOCKS", "ROWS_PER_SPLIT")
    geometry.update({name.lower(): int(getattr(layernorm, name)) for name in rows})
    return {**geometry, "optimizer_chunk": int(optim.CHUNK), "optimizer_max_blocks": int(optim.MAX_BLOCKS)}


def cuda_unusable() -> str | None:
    """Why the C++ ops cannot launch CUDA kernels here (not built, no CUDA driver, turned off with
    ``FASTNORM_CUDA_OPS=0``), or None."""
    if os.environ.get("FASTNORM_CUDA_OPS", "1") in ("", "0"):
        return "FASTNORM_CUDA_OPS=0 turns them off"
    module = load()
    if module is None:
        return f"fastnorm's C++ ops cannot be built here ({_error})"
    return module.cuda_unusable()


_cuda_available: bool | None = None


@torch.compiler.assume_constant_result
def cuda_available() -> bool:
    """Whether the C++ ops launch the CUDA kernels themselves (BatchNorm's: fastnorm/csrc/
    batch_norm_cuda.cpp): built, a CUDA driver here, not turned off. Decided once per process."""
    global _cuda_available
    if _cuda_available is None:
        _cuda_available = cuda_unusable() is None
    return _cuda_available


def _tunables() -> dict[str, int]:
    """The kernels' tunables as their modules hold them now (kernels/fastnorm_kernels/numba_cpu)."""
    import numba

    from fastnorm_kernels.numba_cpu import _jit
    from fastnorm_kernels.numba_cpu import batchnorm as bn_kernels
    from fastnorm_kernels.numba_cpu import optim as optim_kernels

    return {"parallel_min_elements": _jit.PARALLEL_MIN_ELEMENTS, "max_chunks": bn_kernels.MAX_CHUNKS,
            "chunk_elements": bn_kernels.CHUNK_ELEMENTS, "block_bytes": bn_kernels.BLOCK_BYTES,
            "optimizer_chunk": optim_kernels.CHUNK, "max_threads": numba.config.NUMBA_NUM_THREADS}  # fmt: skip


def sync_tunables() -> None:
    """Hand the kernels' tunables (``fastnorm_kernels.numba_cpu``'s PARALLEL_MIN_ELEMENTS, MAX_CHUNKS,
    CHUNK_ELEMENTS, BLOCK_BYTES, optim.CHUNK) to the ops again, after a change (tests shrink them
    to exercise chunked and blocked loops on small tensors). Not loaded yet: it reads them when it loads."""
    if _extension is not None:
        _extension.set_tunables(_tunables())


def _kernels_of(family: str) -> ModuleType:
    if family in _GROUP_NORM_FAMILIES:
        from fastnorm_kernels.numba_cpu import groupnorm

        return groupnorm
    if family in _ROW_NORM_FAMILIES:
        from fastnorm_kernels.numba_cpu import layernorm

        return layernorm
    if family in _BATCH_NORM_FAMILIES:
        from fastnorm_kernels.numba_cpu import batchnorm

        return batchnorm
    from fastnorm_kernels.numba_cpu import optim

    return optim


def _entry_point(family: str, storage: int) -> int:
    """The address of a kernel's C entry point (called by the extension, once per entry point and
    process), or of an optimizer's packer (``pack:<name>``) or CUDA step scalars (``scalars:<name>``)."""
    kind, _, name = family.rpartition(":")
    if kind:
        from fastnorm_kernels.numba_cpu import optim

        return (optim.c_pack if kind == "pack" else optim.c_scalars)(name).address
    return _compiled(family, STORAGES[storage]).address


def _compiled(family: str, storage: str):
    """The C entry point of (family, storage), saying so in one line when it compiles rather than
    loads from Numba's on-disk cache."""
    kernels = _kernels_of(family)
    label = f"batch_norm {family}" if family in _BATCH_NORM_FAMILIES else f"{family} step"
    if family in _ROW_NORM_FAMILIES:
        label = f"layer/rms norm {family.removeprefix('row_norm_')}"
    if family in _GROUP_NORM_FAMILIES:
        label = f"group norm {family.removeprefix('group_norm_')}"
    if kernels.c_entry_point_cached(family, storage) is False:
        say(f"compiling its {label} kernel for {storage} for first use (~10-60 s, cached for later runs)")
    return kernels.c_entry_point(family, storage)


def warmup(dtypes: tuple[str, ...] = ("float32", "float64", "bfloat16", "float16")) -> dict[str, float]:
    """Build the extension and compile (or load) every kernel entry point ahead of use; returns
    the seconds each took (``fastnorm warmup``)."""
    from fastnorm_kernels.numba_cpu import batchnorm as bn_kernels

    times = {}
    started = time.perf_counter()
    if load() is None:
        raise RuntimeError(f"fastnorm's C++ ops cannot be built here: {_error}")
    times["C++ ops"] = time.perf_counter() - started
    for family in _BATCH_NORM_FAMILIES:
        for dtype in dtypes:
            if dtype in bn_kernels.C_ENTRY_DTYPES[family]:
                started = time.perf_counter()
                _compiled(family, dtype)
                times[f"batch_norm {family} {dtype}"] = time.perf_counter() - started
    for family in (*_ROW_NORM_FAMILIES, *_GROUP_NORM_FAMILIES):
        for dtype in dtypes:
            started = time.perf_counter()
            _compiled(family, dtype)
            times[f"{family} {dtype}"] = time.perf_counter() - started
    for family in _OPTIMIZER_FAMILIES:
        for storage in (*dtypes, "bfloat16_sr") if "bfloat16" in dtypes else dtypes:
            started = time.perf_counter()
            _compiled(family, storage)
            times[f"{family} step {storage}"] = time.perf_counter() - started
    if torch.cuda.is_available() and cuda_available():
        times.update(warmup_cuda(dtypes, torch.cuda.get_device_capability(0)))
    return times


def warmup_cuda(dtypes: tuple[str, ...], cc: tuple[int, int]) -> dict[str, float]:
    """Compile (or find in the PTX cache, kernels/fastnorm_kernels/numba_cuda/ptx.py) every kernel the C++ cuda ops
    launch, for ``dtypes`` and compute capability ``cc``; returns the seconds each took. A
    process launching them later reads them from the cache (``fastnorm warmup`` on a GPU machine)."""
    from fastnorm_kernels.numba_cuda import ptx

    module = load()
    if module is None:
        raise RuntimeError(f"fastnorm's C++ ops cannot be built here: {_error}")
    storages = [STORAGES.index(d) for d in dtypes]
    if "bfloat16" in dtypes:
        storages.append(STORAGES.index("bfloat16_sr"))
    times = {}
    for name, function, signature in module.cuda_kernels():
        for storage in storages:
            if storage == STORAGES.index("bfloat16_sr") and "{storage}" not in function:
                continue  # stochastic rounding: the optimizers' kernels only
            started = time.perf_counter()
            ptx.kernel_ptx(name, function, signature, storage, *cc)
            times[f"cuda {name}.{ptx.function_name(function, storage)} {STORAGES[storage]}"] = (
                time.perf_counter() - started
            )
    return times


def pool_in_use() -> int:
    """Bytes of the extension's output pool handed out and still referenced (0 if not loaded)."""
    return 0 if _extension is None else _extension.pool_in_use()


def pool_clear() -> None:
    """Frees the extension's free output blocks (those in use come back when their tensors die)."""
    if _extension is not None:
        _extension.pool_clear()
