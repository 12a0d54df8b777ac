"""The CUDA kernels as PTX, for launchers outside Numba (fastnorm's C++ ops: fastnorm/csrc/cuda_launch.cpp).

A launcher names a kernel by its module here and its function (``"batchnorm"``,
``"_stats_planes"``) and types it with a signature string, one code per argument:

====  ======================================================================
a     an address (int64)
i     an int64
f     a float64
b     a boolean
u     a uint32
D     the data's typed zero: float32, float64, or 16-bit storage as bits (bfloat16 uint16, float16 int16)
K     the compute dtype's typed zero: float64 for float64 data, else float32
k     a value in the compute dtype
(..)  a tuple of the codes inside, all the same (Numba's UniTuple: its elements are
      consecutive kernel parameters)
====  ======================================================================

A function name may hold ``{storage}``, replaced by the storage's suffix (the optimizers' 16-bit
kernels are one function per storage: ``_adam{storage}`` is ``_adam`` for float32 and float64,
``_adam_bf16``, ``_adam_f16``, ``_adam_bf16_sr``). :func:`kernel_ptx` compiles the kernel's
Python function with numba-cuda for that signature and a storage code (0 float32, 1 float64,
2 bfloat16, 3 float16, 4 bfloat16 with stochastic rounding: fastnorm/csrc/fastnorm.h's Storage)
and a compute capability, and returns the PTX and its entry's name; the PTX is kept in
an on-disk cache keyed by the kernels' sources, numba-cuda's version, the signature and the
target (``$FASTNORM_PTX_CACHE``, default ``~/.cache/fastnorm/ptx``), so a process compiles a
kernel only the first time it is ever used on a machine. The entry's parameters are checked
against the signature (count and sizes), so a launcher and a kernel cannot drift apart silently.

:func:`typed_args` gives the launch arguments as Numba's dispatcher takes them (the typed zeros
made), which is how tests run a C++ launch plan under Numba's simulator.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import os
import re
import sys
from pathlib import Path

import numpy as np

#: storage code -> (storage dtype of the typed zero D, compute dtype of K)
STORAGES = {
    0: (np.float32, np.float32),
    1: (np.float64, np.float64),
    2: (np.uint16, np.float32),  # bfloat16 bits
    3: (np.int16, np.float32),  # float16 bits
    4: (np.uint16, np.float32),  # bfloat16 bits, stochastic rounding
}
STORAGE_NAMES = ("float32", "float64", "bfloat16", "float16", "bfloat16_sr")
_SUFFIXES = ("", "", "_bf16", "_f16", "_bf16_sr")
#: PTX parameter type of each code (D, K and k: per storage)
_PARAM = {"a": "u64", "i": "u64", "f": "f64", "b": "u8", "u": "u32"}
_PTX_TYPE = {np.float32: "f32", np.float64: "f64", np.uint16: "u16", np.int16: "u16"}

_KERNELS_DIR = Path(__file__).resolve().parent.parent


def cache_dir() -> Path:
    """Where compiled PTX is kept (``$FASTNORM_PTX_CACHE``, default ``~/.cache/fastnorm/ptx``)."""
    configured = os.environ.get("FASTNORM_PTX_CACHE")
    return Path(configured) if configured else Path.home() / ".cache" / "fastnorm" / "ptx"


@functools.cache
def _sources_digest() -> str:
    """A digest of every kernels/ source file and numba-cuda's version: a change to any invalidates the cache."""
    digest = hashlib.sha256()
    for path in sorted(_KERNELS_DIR.rglob("*.py")):
        digest.update(str(path.relative_to(_KERNELS_DIR)).encode())
        digest.update(path.read_bytes())
    try:
        from importlib.metadata import version

        digest.update(version("numba-cuda").encode())
    except Exception:  # not installed as a distribution: the sources alone
        pass
    return digest.hexdigest()[:24]


def tokens(signature: str) -> list[tuple[str, int | None]]:
    """(code, tuple length or None for a lone argument) per kernel argument of a signature."""
    out, i = [], 0
    while i < len(signature):
        if signature[i] == "(":
            end = signature.index(")", i)
            inner = signature[i + 1 : end]
            if not inner or len(set(inner)) != 1:
                raise ValueError(f"a tuple of one repeated code, got ({inner}) in {signature!r}")
            out.append((inner[0], len(inner)))
            i = end + 1
        else:
            out.append((signature[i], None))
            i += 1
    if any(code not in "aifbuDKk" for code, _ in out):
        raise ValueError(f"bad signature {signature!r}")
    return out


def flat_codes(signature: str) -> str:
    """One code per kernel parameter (tuples flattened)."""
    return signature.replace("(", "").replace(")", "")


def function_name(function: str, storage: int) -> str:
    """The kernel function of a storage (``{storage}`` replaced by its suffix)."""
    return function.replace("{storage}", _SUFFIXES[storage])


def numba_signature(signature: str, storage: int) -> tuple:
    """The Numba argument types of a signature string for a storage code."""
    from numba import types as nt

    data, compute = STORAGES[storage]
    scalar = {np.float32: nt.float32, np.float64: nt.float64, np.uint16: nt.uint16, np.int16: nt.int16}
    codes = {"a": nt.int64, "i": nt.int64, "f": nt.float64, "b": nt.boolean, "u": nt.uint32, "D": scalar[data],
             "K": scalar[compute], "k": scalar[compute]}  # fmt: skip
    return tuple(codes[c] if n is None else nt.UniTuple(codes[c], n) for c, n in tokens(signature))


def typed_args(signature: str, storage: int, args) -> list:
    """Launch arguments as Numba's dispatcher takes them, from one value per kernel parameter:
    D / K (given as None) become the storage's typed zeros, k values the compute dtype's, u
    values uint32, tuples regrouped."""
    data, compute = STORAGES[storage]
    make = {"D": lambda v: data(0), "K": lambda v: compute(0), "k": compute, "u": np.uint32, "b": bool}
    values = iter(args)
    out = []
    for code, n in tokens(signature):
        convert = make.get(code, lambda v: v)
        out.append(convert(next(values)) if n is None else tuple(convert(next(values)) for _ in range(n)))
    if next(values, None) is not None:
        raise ValueError(f"more arguments than the signature {signature!r} has")
    return out


def target(major: int, minor: int) -> tuple[int, int]:
    """The compute capability to compile for: the device's, or the closest one the toolkit supports below it."""
    try:
        from numba.cuda.cudadrv.nvrtc import find_closest_arch

        return tuple(find_closest_arch((int(major), int(minor))))
    except ImportError:
        return int(major), int(minor)


def kernel_ptx(module: str, function: str, signature: str, storage: int, major: int, minor: int) -> tuple[str, str]:
    """(PTX, entry name) of ``fastnorm_kernels.numba_cuda.<module>.<function>`` for ``signature`` and
    ``storage``, compiled for compute capability (major, minor) (or read from the cache)."""
    if storage not in STORAGES:
        raise ValueError(f"no kernel storage {storage}")
    tokens(signature)  # raises for a bad signature
    function = function_name(function, storage)
    cc = target(major, minor)
    key = hashlib.sha256(f"{_sources_digest()} {module} {function} {signature} {storage} {cc}".encode()).hexdigest()
    path = cache_dir() / f"{module}.{function}.{STORAGE_NAMES[storage]}.sm{cc[0]}{cc[1]}.{key[:16]}.ptx"
    try:
        ptx = path.read_text()
    except OSError:
        ptx = None
    if ptx is None:
        ptx = _compile(module, function, signature, storage, cc)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_suffix(f".{os.getpid()}.tmp")
            partial.write_text(ptx)
            partial.replace(path)  # atomic: another process never reads a half-written file
        except OSError:  # a read-only home: compiled again next time
            pass
    return ptx, check_entry(ptx, signature, storage)


def _compile(module: str, function: str, signature: str, storage: int, cc: tuple[int, int]) -> str:
    from numba import cuda

    kernel = getattr(importlib.import_module(f"{__package__}.{module}"), function)
    print(f"fastnorm: compiling its cuda kernel {module}.{function} for {STORAGE_NAMES[storage]}, sm_{cc[0]}{cc[1]} "
          "(first use on this machine; cached for later runs)", file=sys.stderr, flush=True)  # fmt: skip
    ptx, _ = cuda.compile_ptx(kernel.py_func, numba_signature(signature, storage), cc=cc)
    return ptx


def check_entry(ptx: str, signature: str, storage: int) -> str:
    """The name of the PTX's kernel entry, after checking its parameters against the signature."""
    found = re.search(r"\.entry\s+(\S+)\s*\(([^)]*)\)", ptx)
    if found is None:
        raise RuntimeError("the PTX has no kernel entry")
    name, params = found.group(1), re.findall(r"\.param\s+\.(\w+)", found.group(2))
    data, compute = STORAGES[storage]
    expected = [_PARAM.get(c) or _PTX_TYPE[data if c == "D" else compute] for c in flat_codes(signature)]
    if params != expected:
        raise RuntimeError(f"kernel {name}: PTX parameters {params} do not match the signature {signature!r} "
                           f"({expected})")  # fmt: skip
    return name
