"""Compilation helpers shared by the Numba CPU kernels.

Flags, and why:
* ``error_model="numpy"``: a float division must not carry Python's ZeroDivisionError check,
  which stops the loop from vectorising (../shared/NUMBA-NOTES.md); x/0 gives inf/nan as in torch.
* no ``fastmath`` by default: NaN and Inf must propagate exactly as in torch. Reductions whose
  order may change take ``fastmath={"reassoc", "contract"}`` (never ``nnan``/``ninf``).
* ``cache=True``: compiled code is kept on disk next to the sources; a warm first call loads it.

Each kernel is compiled twice from the same source: a ``parallel=True`` version (``prange``
becomes an OpenMP/workqueue parallel loop) and a serial one for small problems, where the
~5 µs cost of starting a parallel region exceeds the work. Numba's on-disk cache keys files by
qualified name but not by flags, so the serial twin is compiled from a renamed copy.
"""

from __future__ import annotations

import types
from collections.abc import Callable

import numba

#: Below this many elements a kernel runs on the calling thread (measured: a parallel region
#: costs ~5 µs here; 64K float32 elements take ~5-10 µs per pass on one core).
PARALLEL_MIN_ELEMENTS = 1 << 16

REASSOC = {"reassoc", "contract"}


def _renamed(fn: Callable, suffix: str) -> Callable:
    twin = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__ + suffix, fn.__defaults__, fn.__closure__)
    twin.__qualname__ = fn.__qualname__ + suffix
    twin.__module__ = fn.__module__
    twin.__doc__ = fn.__doc__
    return twin


class Twins:
    """A kernel compiled serial and parallel; ``twins(n)`` picks by problem size."""

    def __init__(self, fn: Callable, **flags) -> None:
        options = dict(cache=True, error_model="numpy", nogil=True, **flags)
        self.parallel = numba.njit(parallel=True, **options)(fn)
        self.serial = numba.njit(**options)(_renamed(fn, "_serial"))
        self.__name__ = fn.__name__
        self.__doc__ = fn.__doc__

    def __call__(self, elements: int):
        return self.parallel if elements >= PARALLEL_MIN_ELEMENTS and numba.get_num_threads() > 1 else self.serial


def twins(**flags) -> Callable[[Callable], Twins]:
    def decorate(fn: Callable) -> Twins:
        return Twins(fn, **flags)

    return decorate


def cached(py_func: Callable) -> bool | None:
    """Whether Numba's on-disk cache holds compiled code for ``py_func``'s current source (so that
    compiling it is a load), None where that cannot be told (Numba's cache internals moved)."""
    try:
        from numba.core.caching import FunctionCache

        return bool(FunctionCache(py_func)._cache_file._load_index())
    except Exception:  # noqa: BLE001 - a private API: any failure means "cannot tell"
        return None
