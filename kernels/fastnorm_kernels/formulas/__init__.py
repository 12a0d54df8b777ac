"""The math of every kernel, once: plain Python functions on scalars.

Each backend compiles the same text: ``numba.njit(inline="always")`` for the CPU loops
(kernels/fastnorm_kernels/numba_cpu) and ``numba.cuda.jit(device=True, inline="always")`` for the GPU kernels
(kernels/fastnorm_kernels/numba_cuda). The backends keep only what differs between them: loops, chunking,
reductions, launches. The NumPy reference (kernels/fastnorm_kernels/reference) is written separately, on purpose:
it is the independent, readable oracle the compiled kernels are tested against.

Rules for code in this package (so that both compilers accept it and loops stay vectorised):
* scalars in, scalars out (tuples for several results); no arrays, no allocation;
* no numeric literal next to a float32 value (it would widen the arithmetic to float64): the
  constants come in as arguments, already in the storage's compute dtype;
* only ``math`` functions both targets have (``sqrt``, ``isfinite``).

Modules: :mod:`.optim` (per-element optimizer updates, per-tensor step scalars) and
:mod:`.batchnorm` (per-channel statistics, running statistics, backward coefficients).
"""

from types import ModuleType


def compiled(jit, module: ModuleType) -> ModuleType:
    """A module holding every function of ``module`` compiled with ``jit`` (a decorator such as
    ``numba.njit(inline="always")``), for kernels to call as ``formulas.adam(...)``."""
    out = ModuleType(f"{module.__name__}[{getattr(jit, '__name__', 'compiled')}]")
    for name, fn in vars(module).items():
        if callable(fn) and getattr(fn, "__module__", None) == module.__name__ and not name.startswith("_"):
            setattr(out, name, jit(fn))
    return out
