"""The address-level kernels as C functions (Numba cfuncs), for callers outside Python.

fastnorm's C++ ops (fastnorm/csrc) call the BatchNorm, LayerNorm/RMSNorm and GroupNorm kernels
through these: one C function per (entry point, storage dtype), compiled the first time it is
asked for (~10-60 s) or loaded from Numba's on-disk cache (~0.1 s). Each kernels module declares
its entry points as a table ``name -> (C signature, arguments, the call of its *_at function)``,
the call written with ``L`` and ``LC`` for the storage's and the compute dtype's like-scalars,
and gets its ``c_entry_point`` / ``c_entry_point_cached`` from :func:`entry_points`.

:func:`at` and :func:`vector_at` view raw addresses as arrays inside those ``*_at`` functions.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numba
from numba import njit, types
from numba.extending import intrinsic

from .._pointer import pointer_intrinsic
from . import _jit

#: storage dtype name -> (the storage's like-scalar, the compute dtype's), as source: bfloat16 as
#: uint16 bits, float16 as int16 bits (kernels/fastnorm_kernels/numba_cpu/_bits.py), both computed in float32
C_DTYPES = {"float32": ("np.float32(0)", "np.float32(0)"), "float64": ("np.float64(0)", "np.float64(0)"),
            "bfloat16": ("np.uint16(0)", "np.float32(0)"), "float16": ("np.int16(0)", "np.float32(0)")}  # fmt: skip

_pointer = pointer_intrinsic(intrinsic, types)


@njit(inline="always")
def at(addr, like, shape):
    """The array of ``shape`` at address ``addr``, of ``like``'s element type."""
    return numba.carray(_pointer(addr, like), shape)


@njit(inline="always")
def vector_at(addr, like, n):
    """The (n,) array at ``addr``, or an empty one for address 0 (an absent tensor)."""
    return numba.carray(_pointer(addr, like), n if addr != 0 else 0)


def entry_points(namespace: dict, table: dict, dtypes: dict[str, tuple[str, ...]] | None = None):
    """(c_function, c_entry_point, c_entry_point_cached) of a kernels module: ``namespace`` its
    ``globals()`` (the generated functions call its ``*_at`` functions, and are compiled as part of
    its file, so that Numba's cache keys them there), ``table`` its entry points, ``dtypes`` the
    storage dtypes of each where not all of :data:`C_DTYPES`."""
    module, filename = namespace["__name__"], namespace["__file__"]

    @functools.cache
    def c_function(name: str, dtype: str) -> Callable:
        """The Python source of entry point ``name`` for ``dtype``, with a name of its own
        (``_c_<name>_<dtype>``), so that Numba's on-disk cache keys each apart."""
        allowed = (dtypes or {}).get(name, tuple(C_DTYPES))
        if name not in table or dtype not in allowed:
            raise ValueError(f"no {name} C entry point for {dtype}: it has {', '.join(allowed)}")
        _, args, call = table[name]
        like, like_c = C_DTYPES[dtype]
        fn = f"_c_{name}_{dtype}"
        source = f"def {fn}({args}):\n    {call.replace('LC', like_c).replace('L,', like + ',')}\n"
        scope = dict(namespace)
        exec(compile(source, filename, "exec"), scope)  # noqa: S102 - fixed text, no input
        function = scope[fn]
        function.__module__ = module
        return function

    @functools.cache
    def c_entry_point(name: str, dtype: str):
        """The C function ``name`` for storage ``dtype``: a ``numba.cfunc``, whose ``.address``
        callers take, compiled on the first call or loaded from Numba's on-disk cache."""
        function = c_function(name, dtype)
        # a cached C function that runs parallel code needs Numba's threading layer loaded first
        # (else LLVM cannot resolve its scheduler's symbols: "Symbol not found: allocate_sched")
        numba.get_num_threads()
        return numba.cfunc(table[name][0], cache=True, nogil=True)(function)

    def c_entry_point_cached(name: str, dtype: str) -> bool | None:
        """Whether ``c_entry_point`` will load from Numba's cache rather than compile (None: unknown)."""
        return _jit.cached(c_function(name, dtype))

    return c_function, c_entry_point, c_entry_point_cached
