"""BatchNorm's training forward and backward as a C++ autograd node (fastnorm/csrc/batch_norm.cpp).

The numba backend's eager CPU path in training: the kernels are the same (their C entry points,
:func:`kernels.numba_cpu.batchnorm.c_entry_points`), but the autograd node and the output
allocation are C++, so no Python runs between the module's forward and the kernels' launch, nor
in the backward. Measured here: after a large kernel has flushed the caches, every distinct
Python operation costs tens of microseconds, and the Python ``torch.autograd.Function`` with the
engine's calls into it was ~0.3 ms of a training step's BatchNorm (bench/results/bn_profile.md).

The extension is compiled on first use with :func:`torch.utils.cpp_extension.load` (a C++
compiler and ninja are needed; ~20 s once, cached by torch under ``TORCH_EXTENSIONS_DIR``).
When it cannot be built, or with ``FASTNORM_NATIVE=0``, fastnorm warns once (build failure only) and
serves the same kernels through :class:`fastnorm._address_autograd.AddressBatchNormFunction`,
whose semantics this node has. Eval-mode forwards that need a gradient stay on that path;
forwards that need none (``torch.no_grad``, inference) run through :func:`batch_norm_forward`.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import shutil
import threading
import time
import warnings
from pathlib import Path
from types import ModuleType

import torch

_SOURCE = Path(__file__).resolve().parent / "csrc" / "batch_norm.cpp"
_lock = threading.Lock()
_log = logging.getLogger(__name__)
_extension: ModuleType | None = None
_failed = False


#: whether the numba backend's eager BatchNorm runs through the C++ extension where it can be
#: built (``FASTNORM_NATIVE=0`` at import turns it off; tests and benchmarks set it to run the
#: Python path instead)
ENABLED = os.environ.get("FASTNORM_NATIVE", "1") != "0"


def extension() -> ModuleType | None:
    """The built and configured extension, or None when it cannot be built (warned once)."""
    global _extension, _failed
    if _extension is not None or _failed:
        return _extension
    with _lock:
        if _extension is None and not _failed:
            try:
                _extension = _build()
            except Exception as error:  # no compiler, no headers, a numba without the hooks used
                _failed = True
                warnings.warn(
                    f"fastnorm: the C++ BatchNorm node could not be built ({type(error).__name__}: "
                    f"{str(error).strip().splitlines()[-1] if str(error).strip() else ''}); BatchNorm "
                    "runs the same kernels through a Python autograd Function (slower by ~0.1-0.3 ms a call). "
                    "Set FASTNORM_NATIVE=0 to skip the attempt.",
                    RuntimeWarning,
                    stacklevel=3,
                )
    return _extension


def _build() -> ModuleType:
    import numba
    from numba.np.ufunc import parallel

    from kernels.numba_cpu.batchnorm import c_entry_points

    from ._arrays import pool
    from ._dispatch import _numba_max_threads
    from .autograd import _differentiable_backward

    forward_train, forward_eval, backward = c_entry_points()  # also launches Numba's threading layer
    numba.get_num_threads()
    set_threads = ctypes.cast(parallel._set_num_threads, ctypes.c_void_p).value
    _log.info("fastnorm: building its C++ BatchNorm node (once; cached by torch.utils.cpp_extension)")
    logger = logging.getLogger("torch.utils.cpp_extension")
    level, path = logger.level, os.environ.get("PATH", "")
    logger.setLevel(logging.ERROR)  # "No CUDA runtime is found": irrelevant to a CPU extension
    if shutil.which("ninja") is None:  # the ninja wheel's binary, off PATH when the venv is not activated
        import ninja

        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + path  # for the build only
    try:
        from torch.utils import cpp_extension

        with _build_lock(cpp_extension):
            module = cpp_extension.load("fastnorm_batch_norm", [str(_SOURCE)], extra_cflags=["-O2"], verbose=False)
    finally:
        logger.setLevel(level)
        os.environ["PATH"] = path
    module.configure(forward_train, forward_eval, backward, set_threads, _numba_max_threads(),
                     _differentiable_backward)  # fmt: skip
    module.pool_configure(pool.min_bytes, pool.max_bytes)  # the Python pool's limits (FASTNORM_CPU_POOL_MB)
    return module


def batch_norm_train(x: torch.Tensor, weight, bias, running_mean, running_var, source, momentum: float,
                     eps: float, channels_last: bool, geometry: tuple, plan: tuple) -> torch.Tensor:  # fmt: skip
    """y of a training forward with an autograd node; arguments as
    :func:`fastnorm._address_autograd.train_native` has them (x dense, the plan of its shape)."""
    n, c, s = geometry
    parallel, rows_per_chunk, forward_block, backward_block = plan
    return _extension.batch_norm_train(x, weight, bias, running_mean, running_var, source, float(momentum),
                                       float(eps), channels_last, n, c, s, parallel, rows_per_chunk, forward_block,
                                       backward_block)  # fmt: skip


#: how long a process waits for another one's build of the extension before it gives up (and
#: serves the Python autograd Function): a build takes ~20 s here
BUILD_WAIT_SECONDS = 600


@contextlib.contextmanager
def _build_lock(cpp_extension: ModuleType):
    """An OS lock (released when its process dies, however) around torch's build: older torch
    releases wait without a timeout on a lock file that a killed build leaves behind, so with this
    one held a leftover ``lock`` file is stale and removed; a build held by another live process
    for BUILD_WAIT_SECONDS raises TimeoutError (the caller falls back to the Python Function).
    Where there is no ``fcntl`` (Windows) or torch does not say its build directory, torch's own
    locking alone."""
    try:
        import fcntl

        directory = Path(cpp_extension._get_build_directory("fastnorm_batch_norm", verbose=False))
    except (ImportError, AttributeError, TypeError):
        yield
        return
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / "fastnorm.flock", "w") as handle:
        deadline = time.monotonic() + BUILD_WAIT_SECONDS
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    message = f"another process has been building {directory} for {BUILD_WAIT_SECONDS} s"
                    raise TimeoutError(message) from None
                time.sleep(0.5)
        try:
            (directory / "lock").unlink(missing_ok=True)  # torch's, left by a killed build
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def batch_norm_forward(x: torch.Tensor, weight, bias, running_mean, running_var, training: bool, momentum: float,
                       eps: float, channels_last: bool, geometry: tuple, plan: tuple) -> torch.Tensor:  # fmt: skip
    """y of a forward without an autograd node (training: the running statistics updated)."""
    n, c, s = geometry
    parallel, rows_per_chunk, forward_block, _ = plan
    return _extension.batch_norm_forward(x, weight, bias, running_mean, running_var, training, float(momentum),
                                         float(eps), channels_last, n, c, s, parallel, rows_per_chunk,
                                         forward_block)  # fmt: skip


def pool_in_use() -> int:
    """Bytes of the C++ node's output pool handed out and still referenced (0 if not built)."""
    return 0 if _extension is None else _extension.pool_in_use()


def pool_clear() -> None:
    """Frees the C++ node's free output blocks (those in use come back when their tensors die)."""
    if _extension is not None:
        _extension.pool_clear()
