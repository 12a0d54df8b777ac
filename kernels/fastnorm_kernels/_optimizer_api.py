"""The optimizer entry points of the compiled backends, written once for every description.

kernels/fastnorm_kernels/numba_cpu and kernels/fastnorm_kernels/numba_cuda expose the same two APIs per optimizer
(kernels/fastnorm_kernels/formulas/optim.py, ``OPTIMIZERS``), installed by :meth:`OptimizerAPI.install`:

* ``<op>_step_table(addrs, numels, dtype, step_addrs, step_f64, *, options)`` (SGD:
  ``first_step`` instead of the steps; Lion: neither): the tensors of a group as an int64 (5, T) table of data
  addresses, rows param, grad and three state buffers (an unused row repeats the gradient row),
  plus the addresses of the step counters, which are advanced by one. fastnorm's optimizers call
  these, with addresses read straight from torch tensors.
* ``<op>_step(params, grads, buffers..., steps, *, options)``: lists of arrays, the API every
  backend shares (kernels/fastnorm_kernels/reference/optim.py documents it), built on the table one.

What they have in common is here: checking a table, turning a group's options into the
kernel's arguments (``Optimizer.pack``: ``constants`` in the tensors' dtype, ``flags``, the
float64 ``host`` values of the step scalars) and building tables from arrays. Each backend
supplies ``run(op, addrs, numels, dtype, step_addrs, step_f64, first_step, host, constants,
flags, uses)``, which launches its kernel for ``op`` (``constants``: an array in ``dtype``;
``first_step`` is None where the optimizer counts steps, else per tensor whether a buffer cloned
on its first step is new; ``step_addrs`` None where it counts none; ``uses``: which of the three
buffer rows exist), ``address(array)`` and ``is_dense(array)`` (and ``step_address(array)`` where
the step counters live elsewhere than the tensors: the cuda backend keeps them in host memory).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np

from ._bits import BFLOAT16, is_half
from .formulas.optim import OPTIMIZERS

ROWS = 5  # param, grad, three state buffers


def _name(dtype) -> str:
    return "bfloat16 (uint16 bits)" if np.dtype(dtype) == BFLOAT16 else str(np.dtype(dtype))


class OptimizerAPI:
    def __init__(self, backend: str, dtypes: tuple, run: Callable, address: Callable, is_dense: Callable,
                 step_address: Callable | None = None) -> None:  # fmt: skip
        self._backend, self._dtypes = backend, tuple(np.dtype(d) for d in dtypes)
        self._launch, self._address, self._is_dense = run, address, is_dense
        self._step_address = step_address or address

    def _run(self, op, addrs, numels, dtype, step_addrs, step_f64, first_step, host, constants, flags, uses,
             seed=None) -> None:  # fmt: skip
        """Check a table, then launch."""
        dtype = np.dtype(dtype)
        if dtype not in self._dtypes:
            names = " or ".join(_name(d) for d in self._dtypes)
            raise TypeError(f"the {self._backend} optimizers update {names} tensors, got {dtype}")
        if seed is not None and dtype != BFLOAT16:
            raise ValueError(f"stochastic rounding (rounding_seed) applies to bfloat16 storage, got {_name(dtype)}")
        numels = tuple(int(n) for n in numels)
        t = len(numels)
        if not isinstance(addrs, np.ndarray) or addrs.dtype != np.int64 or addrs.shape != (ROWS, t):
            raise ValueError(f"addrs must be an int64 ({ROWS}, {t}) table, got {getattr(addrs, 'shape', addrs)}")
        if first_step is None:
            step_addrs = np.asarray(step_addrs, np.int64)
            if step_addrs.shape != (t,):
                raise ValueError(f"step_addrs must hold {t} addresses, got shape {step_addrs.shape}")
        elif len(first_step) != t:
            raise ValueError(f"first_step must hold {t} flags, got {len(first_step)}")
        host = (*map(float, host), 0.0, 0.0, 0.0)[:3]
        compute = np.float32 if is_half(dtype) else dtype  # 16-bit storage computes in float32
        extra = () if seed is None else (int(seed) & 0xFFFFFFFF,)
        self._launch(op, addrs, numels, dtype, step_addrs, bool(step_f64), first_step, host,
                     np.array(constants, compute), tuple(map(bool, flags)), tuple(map(bool, uses)), *extra)  # fmt: skip

    def _table_of(self, rows, steps):
        """(addrs, numels, dtype, step addresses, step_f64) of lists of arrays."""
        first = rows[0]
        dtype = np.dtype(first[0].dtype)
        numels = tuple(int(np.prod(a.shape)) for a in first)
        for row in rows:
            for a, n in zip(row, numels):
                if np.dtype(a.dtype) != dtype or int(np.prod(a.shape)) != n or not self._is_dense(a):
                    raise ValueError(
                        "every array must be a dense (C-contiguous) array of its parameter's dtype and size"
                    )
        addrs = np.array([[self._address(a) for a in row] for row in rows], np.int64).reshape(len(rows), len(first))
        step_f64 = bool(steps) and np.dtype(steps[0].dtype) == np.float64
        for s in steps:
            if int(np.prod(s.shape)) != 1 or np.dtype(s.dtype) != (np.float64 if step_f64 else np.float32):
                raise ValueError("steps must be one-element float32 (or all float64) arrays, one per tensor")
        return addrs, numels, dtype, np.array([self._step_address(s) for s in steps], np.int64), step_f64

    # -- the entry points, per description ---------------------------------------------------

    def step_table(self, name, addrs, numels, dtype, *args, rounding_seed=None, **options):
        """Optimizer ``name``'s update of a table: ``args`` are ``(step_addrs, step_f64)`` where
        it counts steps, ``(first_step,)`` where a buffer is cloned on its first step (true where
        it is new this step), else nothing."""
        d = OPTIMIZERS[name]
        missing = [o.name for o in d.options if o.name not in options and o.default is None]
        if missing:
            raise TypeError(f"{name}_step_table() missing keyword arguments: {', '.join(missing)}")
        options = {o.name: options.get(o.name, o.default) for o in d.options}
        constants, flags, uses, host = d.pack(options)
        if d.counts_steps:
            step_addrs, step_f64 = args
            first_step = None
        else:
            step_addrs, step_f64 = None, False
            first_step = args[0] if d.clone_first is not None else [False] * len(tuple(numels))
        self._run(name, addrs, numels, dtype, step_addrs, step_f64, first_step, host, constants, flags, uses,
                  rounding_seed)  # fmt: skip

    @staticmethod
    def _rows(params, grads, *buffers):
        """The five table rows: an absent buffer (None) repeats the gradient row."""
        rows = [params, grads, *(grads if b is None else b for b in buffers)]
        return rows + [grads] * (ROWS - len(rows))

    def step(self, name, params, grads, *lists, **options):
        """Optimizer ``name``'s update of lists of arrays: ``lists`` are its buffer lists (None
        where a buffer does not exist), then the step counters where it counts steps, or the
        first-step flags where a buffer is cloned on its first step."""
        d = OPTIMIZERS[name]
        if not params:
            return
        n = len(d.buffers)
        buffers, extra = lists[:n], lists[n:]
        uses = d.pack({o.name: options.get(o.name, o.default) for o in d.options})[2]
        rows = self._rows(params, grads, *(b if use else None for b, use in zip(buffers, uses)))
        addrs, numels, dtype, step_addrs, step_f64 = self._table_of(rows, extra[0] if d.counts_steps else [])
        if d.counts_steps:
            args = (step_addrs, step_f64)
        elif d.clone_first is not None:
            args = ([bool(f) for f in extra[0]] if uses[d.clone_first] else [False] * len(params),)
        else:
            args = ()
        self.step_table(name, addrs, numels, dtype, *args, **options)

    def install(self, namespace: dict) -> None:
        """``<name>_step`` and ``<name>_step_table`` of every optimizer into a backend module."""
        for name in OPTIMIZERS:
            namespace[f"{name}_step"] = functools.partial(self.step, name)
            namespace[f"{name}_step_table"] = functools.partial(self.step_table, name)
