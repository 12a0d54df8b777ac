"""The one dispatch point: backend names -> kernels, per op and per device.

``backend=`` on every public entry point takes one of :data:`BACKENDS` or ``"auto"``.
``"auto"`` picks the fastest backend available for the tensors' device (``numba`` on CPU, but
``torch`` where :data:`AUTO_CPU_MIN_NUMEL` says torch is faster at that op, layout and size;
``cuda`` on NVIDIA GPUs where :data:`AUTO_CUDA_MIN_NUMEL` says it measured faster; ``torch``
where neither applies); the ``FASTNORM_BACKEND`` environment
variable, when set, replaces that choice. A backend asked for explicitly (by argument or by the
environment) that cannot run raises ``ValueError`` naming the backends that can.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
from dataclasses import dataclass
from types import ModuleType

import numpy as np
import torch

import fastnorm_kernels
from fastnorm_kernels._bits import BFLOAT16
from fastnorm_kernels.formulas.optim import OPTIMIZERS

from . import _ops
from ._arrays import CpuArrays, CudaArrays

#: Every backend name fastnorm knows, in order of preference for display.
BACKENDS: tuple[str, ...] = ("reference", "numba", "cuda", "torch")
AUTO = "auto"
ENV_VAR = "FASTNORM_BACKEND"

#: Device type each kernels backend runs on (``torch`` runs wherever torch does).
_DEVICE_TYPE = {"reference": "cpu", "numba": "cpu", "cuda": "cuda"}


@dataclass(frozen=True)
class Backend:
    """A resolved backend: its name, kernels package and tensor <-> array conversions."""

    name: str
    kernels: ModuleType | None  # None for "torch"
    arrays: CpuArrays | CudaArrays | None = None
    #: the cuda backend may launch through the C++ ops (:func:`cpp_cuda_allowed`)
    cpp_cuda: bool = True

    @property
    def is_torch(self) -> bool:
        return self.kernels is None

    @property
    def device_type(self) -> str | None:
        """The device type its kernels run on (None for torch: wherever torch does)."""
        return _DEVICE_TYPE.get(self.name)

    def as_array(self, t: torch.Tensor):
        """Zero-copy view of ``t`` for the kernels."""
        return self.arrays.view(t)

    def device_guard(self, t: torch.Tensor):
        """The context kernels on ``t`` run in: on a GPU, ``t``'s device is made current, so the
        launch stream and scratch memory are that device's (whatever device is current); on the
        numba backend, Numba's thread count follows ``torch.set_num_threads`` (:func:`follow_torch_threads`)."""
        if self.name == "cuda":
            return torch.cuda.device(t.device)
        if self.name == "numba":
            follow_torch_threads()
        return _NO_GUARD


_NO_GUARD = contextlib.nullcontext()


def follow_torch_threads() -> int:
    """Numba's thread count (per calling thread, as Numba's setting is) made torch's
    ``torch.get_num_threads()`` (capped by Numba's pool size), so that ``torch.set_num_threads``
    governs fastnorm's CPU kernels too; returns that count. Called before each numba launch.

    ``numba.get_num_threads()`` takes a multiprocessing lock and a threading lock on every call;
    once Numba's pool is up, its count is read from the pool directly (the function Numba's own
    ``get_num_threads`` calls after those locks; ~0.1 µs instead of ~0.5)."""
    n = max(1, min(torch.get_num_threads(), _numba_max_threads()))
    if _numba_threads() != n:
        import numba

        numba.set_num_threads(n)
    return n


@functools.cache
def _numba_max_threads() -> int:
    import numba

    return numba.config.NUMBA_NUM_THREADS


_pool_threads = None  # Numba's per-thread count getter, once its pool is up


def _numba_threads() -> int:
    """Numba's thread count for the calling thread (launching its pool on the first call)."""
    global _pool_threads
    if _pool_threads is None:
        import numba
        from numba.np.ufunc import parallel

        n = numba.get_num_threads()  # launches the pool: the getter exists from then on
        _pool_threads = getattr(parallel, "_get_num_threads", None) or numba.get_num_threads
        return n
    return _pool_threads()


@functools.cache
def _load(name: str) -> tuple[ModuleType | None, str | None]:
    """(kernels package, None) if ``name`` can run on this machine, else (None, why not)."""
    if name == "torch":
        return None, None
    if name == "cuda" and not torch.cuda.is_available():
        return None, "no CUDA GPU is usable here (torch.cuda.is_available() is False)"
    try:
        module = fastnorm_kernels.load(name)
    except ModuleNotFoundError as exc:
        if exc.name == fastnorm_kernels.PACKAGES[name]:
            return None, "it is not implemented yet in this version of fastnorm"
        return None, f"it failed to import ({exc})"
    except ImportError as exc:
        return None, f"it failed to import ({exc})"
    if name == "cuda":
        if not module.is_usable():
            return None, "Numba cannot use the GPU (numba.cuda.is_available() is False)"
        _connect_cuda(module)
    if name == "numba" and not _ops.available():
        return None, f"its C++ ops (torch.ops.fastnorm) could not be built or loaded here: {_ops.error()}"
    return module, None


def _connect_cuda(module: ModuleType) -> None:
    """Launch the CUDA kernels on torch's current stream, with scratch from torch's allocator."""
    from numba import cuda

    streams: dict[tuple[int, int], object] = {}

    def current_stream():
        current = torch.cuda.current_stream()
        key = (current.device_index, current.cuda_stream)  # the default stream's handle is 0 on every device
        stream = streams.get(key)
        if stream is None:
            stream = streams[key] = cuda.external_stream(key[1])
            stream.device_index = key[0]  # lets the kernels' fast launch path pick the device's compiled kernel
        return stream

    def allocate(shape, dtype):
        t = torch.empty(shape, dtype=_TORCH_DTYPES[dtype], device="cuda")
        return module.DeviceView(t.data_ptr(), shape, dtype, t)  # the view keeps the tensor (its memory) alive

    module.set_stream_provider(current_stream)
    module.set_allocator(allocate)


_TORCH_DTYPES = {
    np.dtype(np.float32): torch.float32,
    np.dtype(np.float64): torch.float64,
    np.dtype(np.int64): torch.int64,
    np.dtype(np.int8): torch.int8,
}


#: the optimizers torch.optim lacks (those whose description derives a class): no torch backend
TORCH_LACKS = frozenset(d.name for d in OPTIMIZERS.values() if d.class_name)


def _implements(name: str, op: str) -> bool:
    module, why = _load(name)
    if module is None and why is None:  # torch
        return op not in TORCH_LACKS
    return why is None and fastnorm_kernels.implements(module, op)


def backends(op: str | None = None) -> list[str]:
    """The backends usable on this machine now (for ``op`` if given: a key of ``fastnorm_kernels.OPS``)."""
    ops = [op] if op is not None else list(fastnorm_kernels.OPS)
    return [b for b in BACKENDS if any(_implements(b, o) for o in ops)]


def _unavailable(name: str, op: str, source: str) -> ValueError:
    _, why = _load(name)
    if why is None:
        why = f"torch has no {op}" if name == "torch" else f"it has no {op} kernels yet"
    return ValueError(
        f"backend {name!r}{source} is not available for {op}: {why}. Available here: {', '.join(backends(op))}."
    )


def _unknown(backend: object, source: str, op: str | None) -> ValueError:
    return ValueError(
        f"unknown backend {backend!r}{source}: choose 'auto' or one of "
        f"{', '.join(map(repr, BACKENDS))} (available here: {', '.join(backends(op))})"
    )


def check_name(backend: str, op: str) -> str:
    """Validate a ``backend=`` argument at construction time (unknown or unusable: ValueError)."""
    if not isinstance(backend, str) or backend not in BACKENDS + (AUTO,):
        raise _unknown(backend, "", op)
    if backend != AUTO and not _implements(backend, op):
        raise _unavailable(backend, op, "")
    return backend


_RESOLVED: dict = {}
_ENV_KEY = os.environ.encodekey(ENV_VAR) if hasattr(os.environ, "encodekey") else ENV_VAR


def _environment() -> str | None:
    """``$FASTNORM_BACKEND``, read on every call (os.environ.get costs ~2 µs; its dict ~0.1 µs)."""
    data = getattr(os.environ, "_data", None)
    if data is None:
        return os.environ.get(ENV_VAR)
    value = data.get(_ENV_KEY)
    return value.decode() if isinstance(value, bytes) else value


#: ``"auto"`` on CPU: below this many elements (the BatchNorm input's, or a parameter group's
#: total) torch's kernels run, from it on numba's. Measured with ``python bench/auto_thresholds.py``
#: (training forward+backward / one step, numba against the torch code "auto" would otherwise run,
#: paired and interleaved, torch 2.15, 2 cores), speedup of numba:
#:
#: - BatchNorm, with its training autograd node in C++ (3 runs of 30-60 rounds, 2026-11-29):
#:   ``batch_norm`` (an (N, C) input): (64, 128) 1.08-1.60x, (64, 256) 1.03-1.53x, (256, 256)
#:   0.92-0.94x (the one size where torch is ahead: numba's first parallel size, and its serial
#:   kernels tie there), (256, 1024) 1.04-1.91x, (1024, 1024) 1.09-1.96x, (4096, 2048) 2.3-4.0x.
#:   ``batch_norm_planes`` ((N, C, *) contiguous): 1.17-1.42x at (8, 16, 14, 14), 1.45-2.8x above.
#:   ``batch_norm_channels_last`` (4-D channels-last): 0.97-1.00x at (8, 64, 14, 14) (100K),
#:   1.04-1.09x at (16, 64, 28, 28) (800K), 1.03-1.66x at (64, 64, 28, 28).
#: - ``sgd`` without momentum: 0.55-0.97x from 1K to 4M elements (torch's step is one ``add_``
#:   per parameter): torch's at every size (2026-11-29, earlier session, as the rest).
#: - ``sgd_momentum``: 0.93x at 1K and 10K, 1.05x at 50K, 1.20x at 235K (the book's MLP).
#: - ``adagrad``, ``rmsprop``, ``adam`` (Adam and AdamW): 1.48-7.4x from 1K elements on: numba.
#:
#: - LayerNorm, RMSNorm fwd+bwd (bench/results/cpu.md, 2026-12-02, Intel Xeon): LayerNorm (64, 256)
#:   0.99x float32, 0.89x bfloat16, 1.13x and above from (4096, 768) on: torch's below 64K values
#:   (where numba's kernels run serial, the sizes between unmeasured); RMSNorm 1.8x at (64, 256)
#:   and 4-23x above: numba's everywhere.
#: - GroupNorm fwd+bwd (paired, interleaved exploratory script, 2026-12-03, 40 rounds; the bench
#:   suite agrees at its sizes): float32 contiguous / channels-last 0.94x / 0.91x at (8, 32, 14, 14)
#:   (50K), 0.95x / 0.86x at (16, 64, 14, 14) (200K; bfloat16 contiguous 0.88x), 1.20x / 3.21x at
#:   (16, 64, 28, 28) (800K), 1.53x / 1.65x at (32, 128, 28, 28): torch's below 400K values (the
#:   sizes between 200K and 800K unmeasured).
#:
#: Other dtypes than float32 and other devices use the same values (GPUs: no threshold).
AUTO_CPU_MIN_NUMEL: dict[str, float] = {
    "batch_norm": 0,
    "batch_norm_planes": 0,
    "batch_norm_channels_last": 500_000,
    "layer_norm": 65_536,
    "rms_norm": 0,
    "group_norm": 400_000,
    **{d.name: d.auto_cpu_min_numel for d in OPTIMIZERS.values()},  # their descriptions'
    "sgd_momentum": 50_000,
}


#: Whether ``bench/gpu_check.sh`` has run the C++ ops' CUDA launches (fastnorm/csrc/*_cuda.cpp) on
#: a GPU and they passed. Until then ``"auto"`` runs only code that has run on a GPU: where it
#: picks the cuda backend (:data:`AUTO_CUDA_MIN_NUMEL`, measured with them), its Python launchers
#: (kernels/fastnorm_kernels/numba_cuda), never the C++ ops; ``backend="cuda"`` asked for by name
#: (argument or FASTNORM_BACKEND) launches through the C++ ops.
CPP_CUDA_VALIDATED = False


def cpp_cuda_allowed(backend: str) -> bool:
    """Whether a call with ``backend=`` (as the caller passed it) may launch the cuda backend
    through the C++ ops: asked for by name, or chosen by ``"auto"`` once validated."""
    if backend != AUTO or CPP_CUDA_VALIDATED:
        return True
    env = (_environment() or "").strip()
    return bool(env) and env != AUTO


#: the ops ``"auto"`` runs on the cuda backend on a GPU; LayerNorm, RMSNorm and GroupNorm have
#: cuda kernels (tested under the simulator, compiled to PTX) that no GPU has timed yet: ``"auto"``
#: leaves them to torch there until a measurement says otherwise (``backend="cuda"`` runs them)
AUTO_CUDA_OPS = frozenset({"batch_norm", *OPTIMIZERS})

#: ``"auto"`` on a GPU: below this many elements torch's kernels run, from it on the cuda
#: backend's: the smallest size where the cuda backend measured faster than the torch code "auto"
#: would otherwise run (cuDNN's BatchNorm; torch's default optimizers, foreach on a GPU), sizes
#: between that and the largest measured slower being unmeasured. From bench/results/gpu.md (H200,
#: 2026-11-28, every launch from Python then; the C++ ops that launch BatchNorm and the
#: optimizers now have not been timed on a GPU: bench/gpu_check.sh measures them):
#:
#: - BatchNorm fwd+bwd ((N, C, *) planes): 0.30x at (64, 256, 28, 28) (12.8M; the kernels alone
#:   228 us vs cuDNN's 196), 1.57x at (256, 64, 56, 56) (51.4M): from 50M. (N, C) rows: 0.23x
#:   at (64, 256), 0.26x at (8192, 2048) (16.8M), never measured faster: torch's. Channels-last:
#:   never measured: torch's.
#: - Adam / AdamW, Adagrad, RMSprop: 0.27-0.79x on the book's MLP (235K), 1.85-2.42x at 100M
#:   and 1B parameters: from 100M. SGD with momentum: 0.40x at 235K, 1.08x at 100M, 1.50x at 1B:
#:   from 100M. SGD without momentum: 0.29x, 0.66x, 0.90x: torch's at every size.
AUTO_CUDA_MIN_NUMEL: dict[str, float] = {
    "batch_norm": math.inf,
    "batch_norm_planes": 50_000_000,
    "batch_norm_channels_last": math.inf,
    "layer_norm": 0,
    "rms_norm": 0,
    "group_norm": 0,
    **{d.name: d.auto_cuda_min_numel for d in OPTIMIZERS.values()},  # their descriptions'
    "sgd_momentum": 100_000_000,
}


def batch_norm_kind(input: torch.Tensor) -> str:
    """The key of :data:`AUTO_CPU_MIN_NUMEL` for a BatchNorm input: its layout."""
    if input.dim() == 2:
        return "batch_norm"
    if input.dim() == 4 and not input.is_contiguous() and input.is_contiguous(memory_format=torch.channels_last):
        return "batch_norm_channels_last"
    return "batch_norm_planes"


def auto_prefers_torch(kind: str, numel: int, device_type: str = "cpu") -> bool:
    """Whether ``"auto"`` leaves a ``kind`` of work (a key of :data:`AUTO_CPU_MIN_NUMEL`) of
    ``numel`` elements on a ``device_type`` device to torch (GPUs: :data:`AUTO_CUDA_MIN_NUMEL`)."""
    table = AUTO_CUDA_MIN_NUMEL if device_type == "cuda" else AUTO_CPU_MIN_NUMEL
    return numel < table.get(kind, 0)


#: torch dtype -> the kernels' storage dtype (bfloat16 as uint16 bits: kernels/fastnorm_kernels/_bits.py)
KERNEL_DTYPES = {torch.float32: np.dtype(np.float32), torch.float64: np.dtype(np.float64),
                 torch.float16: np.dtype(np.float16), torch.bfloat16: BFLOAT16}  # fmt: skip
#: each op's kernels' dtype list (the optimizers': OPTIMIZER_DTYPES)
_DTYPES_ATTRIBUTE = {"batch_norm": "BATCH_NORM_DTYPES", "layer_norm": "LAYER_NORM_DTYPES",
                     "rms_norm": "LAYER_NORM_DTYPES", "group_norm": "GROUP_NORM_DTYPES"}  # fmt: skip


def has_dtype(name: str, op: str, dtype: torch.dtype) -> bool:
    """Whether backend ``name``'s ``op`` kernels take ``dtype`` (torch: always)."""
    module, why = _load(name)
    if why is not None:
        return False
    if module is None:
        return True
    wanted = KERNEL_DTYPES.get(dtype)
    return wanted is not None and wanted in getattr(module, _DTYPES_ATTRIBUTE.get(op, "OPTIMIZER_DTYPES"), ())


def dtype_backends(op: str, dtype: torch.dtype) -> list[str]:
    """The backends usable here whose ``op`` kernels take ``dtype`` (torch always among them)."""
    return [name for name in BACKENDS if _implements(name, op) and has_dtype(name, op, dtype)]


def resolve(
    backend: str,
    op: str,
    device: torch.device,
    numel: int | None = None,
    kind: str | None = None,
    dtype: torch.dtype | None = None,
) -> Backend:
    """Choose the backend that runs ``op`` on tensors of ``device``.

    Args:
        backend: ``"auto"`` or a name in :data:`BACKENDS`.
        op: a key of ``fastnorm_kernels.OPS`` ("batch_norm", "sgd", "adagrad", "rmsprop", "adam").
        device: the device of the input tensor / parameters.
        numel: the size of the work (the BatchNorm input's, the parameter group's total), when it
            matters to ``"auto"``; None: large.
        kind: the key of :data:`AUTO_CPU_MIN_NUMEL` for this work (default ``op``): the input's
            layout (:func:`batch_norm_kind`), ``"sgd_momentum"``.
        dtype: the data's floating dtype, when known: ``"auto"`` skips a backend whose kernels
            lack it (in the end: torch); a backend named explicitly that lacks it raises
            ValueError naming the backends that have it.
    """
    small = numel is not None and auto_prefers_torch(kind or op, numel, device.type)
    key = (backend, op, device.type, _environment() if backend == AUTO else None, small, dtype)
    chosen = _RESOLVED.get(key)
    if chosen is None:
        chosen = _resolve(backend, op, device, small, dtype)
        _RESOLVED[key] = chosen
    return chosen


def _resolve(
    backend: str, op: str, device: torch.device, small: bool = False, dtype: torch.dtype | None = None
) -> Backend:
    source, requested = "", backend
    if backend == AUTO:
        env = (_environment() or "").strip()
        if env and env != AUTO:
            backend, source = env, f" (from {ENV_VAR})"
    if not isinstance(backend, str) or backend not in BACKENDS + (AUTO,):
        raise _unknown(backend, source, op)
    if backend == AUTO:
        on_gpu = "cuda" if op in AUTO_CUDA_OPS else None
        preferred = {"cpu": None if small else "numba", "cuda": None if small else on_gpu}.get(device.type)
        usable = preferred and _implements(preferred, op)
        if usable and dtype in KERNEL_DTYPES and not has_dtype(preferred, op, dtype):
            usable = False  # "auto" never refuses a dtype torch supports
        backend = preferred if usable else "torch"
        if backend == "torch" and op in TORCH_LACKS:  # no torch to fall back on: fastnorm's slower backends
            ours = [b for b in ("numba", "reference") if device.type == "cpu" and _implements(b, op)]
            if not ours:
                raise ValueError(f"{op}: torch has none, and no fastnorm backend runs it on {device.type} here")
            backend = ours[0]
    elif not _implements(backend, op):
        raise _unavailable(backend, op, source)
    elif dtype in KERNEL_DTYPES and not has_dtype(backend, op, dtype):
        raise ValueError(
            f"backend {backend!r}{source} has no {dtype} {op} kernels; backends that have them here: "
            f"{', '.join(dtype_backends(op, dtype))}"
        )

    wanted = _DEVICE_TYPE.get(backend)
    if wanted is not None and device.type != wanted:
        suggestion = "'cuda' or 'torch'" if device.type == "cuda" else "'torch'"
        if device.type == "cpu":
            suggestion = "'numba', 'reference' or 'torch'"
        raise ValueError(
            f"backend {backend!r}{source} runs on {wanted.upper()} tensors, but the tensors are on "
            f"{device}; use backend={suggestion} or move the tensors"
        )
    module, _ = _load(backend)
    if module is None:
        return Backend(backend, None)
    if backend == "cuda":
        return Backend(backend, module, CudaArrays(), cpp_cuda=cpp_cuda_allowed(requested))
    return Backend(backend, module, CpuArrays())
