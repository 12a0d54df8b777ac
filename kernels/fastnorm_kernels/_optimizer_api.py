"""The optimizer entry points of the compiled backends, written once.

kernels/fastnorm_kernels/numba_cpu and kernels/fastnorm_kernels/numba_cuda expose the same two APIs per optimizer:

* ``<op>_step_table(addrs, numels, dtype, step_addrs, step_f64, *, options)`` (SGD:
  ``first_step`` instead of the steps): the tensors of a group as an int64 (5, T) table of data
  addresses, rows param, grad and three state buffers (an unused row repeats the gradient row),
  plus the addresses of the step counters, which are advanced by one. fastnorm's optimizers call
  these, with addresses read straight from torch tensors.
* ``<op>_step(params, grads, buffers..., steps, *, options)``: lists of arrays, the API every
  backend shares (kernels/fastnorm_kernels/reference/optim.py documents it), built on the table one.

What they have in common is here: checking a table, turning a group's options into the
kernel's arguments (``constants`` in the tensors' dtype, ``flags``, the float64 ``host`` values
of the step scalars; their meaning is in kernels/fastnorm_kernels/formulas/optim.py) and building tables from
arrays. Each backend supplies ``run(op, addrs, numels, dtype, step_addrs, step_f64, first_step,
host, constants, flags, uses)``, which launches its kernel for ``op`` (``constants``: an array in
``dtype``; ``first_step`` is None except for SGD, ``step_addrs`` None for SGD; ``uses``: which
of the three buffer rows exist), ``address(array)`` and ``is_dense(array)`` (and ``step_address(array)`` where the step
counters live elsewhere than the tensors: the cuda backend keeps them in host memory).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ._bits import BFLOAT16, is_half

ROWS = 5  # param, grad, three state buffers


def _name(dtype) -> str:
    return "bfloat16 (uint16 bits)" if np.dtype(dtype) == BFLOAT16 else str(np.dtype(dtype))


def _sign(maximize: bool) -> float:
    return -1.0 if maximize else 1.0


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

    # -- tables ---------------------------------------------------------------------------------

    def sgd_step_table(self, addrs, numels, dtype, first_step, *, lr, weight_decay, momentum, dampening, nesterov,
                       maximize, rounding_seed=None):  # fmt: skip
        """SGD; buffer row 0: momentum_buffer (momentum != 0). ``first_step``: (T,) flags, true
        where a momentum buffer is new this step (it becomes the gradient, as torch clones it)."""
        self._run("sgd", addrs, numels, dtype, None, False, first_step, (),
                  (_sign(maximize), lr, weight_decay, momentum, 1.0 - dampening),
                  (weight_decay != 0, nesterov), (momentum != 0, False, False), rounding_seed)  # fmt: skip

    def adagrad_step_table(self, addrs, numels, dtype, step_addrs, step_f64, *, lr, lr_decay, weight_decay, eps,
                           maximize, rounding_seed=None):  # fmt: skip
        """Adagrad; buffer row 0: sum. clr = lr / (1 + (step - 1) * lr_decay) from each new step."""
        self._run("adagrad", addrs, numels, dtype, step_addrs, step_f64, None, (lr, lr_decay),
                  (_sign(maximize), weight_decay, eps), (weight_decay != 0,), (True, False, False),
                  rounding_seed)  # fmt: skip

    def rmsprop_step_table(self, addrs, numels, dtype, step_addrs, step_f64, *, lr, alpha, eps, weight_decay,
                           momentum, centered, maximize, rounding_seed=None):  # fmt: skip
        """RMSprop; buffer rows: square_avg, grad_avg (centered), momentum_buffer (momentum > 0)."""
        self._run("rmsprop", addrs, numels, dtype, step_addrs, step_f64, None, (),
                  (_sign(maximize), weight_decay, alpha, 1.0 - alpha, eps, lr, momentum),
                  (weight_decay != 0, 1.0 - alpha < 0.5), (True, centered, momentum > 0), rounding_seed)  # fmt: skip

    def adam_step_table(self, addrs, numels, dtype, step_addrs, step_f64, *, lr, beta1, beta2, eps, weight_decay,
                        decoupled_weight_decay, amsgrad, maximize, rounding_seed=None):  # fmt: skip
        """Adam/AdamW; buffer rows: exp_avg, exp_avg_sq, max_exp_avg_sq (amsgrad); the bias
        corrections come from each new step, in float64."""
        decay = 1.0 - lr * weight_decay if decoupled_weight_decay else 1.0
        self._run("adam", addrs, numels, dtype, step_addrs, step_f64, None, (lr, beta1, beta2),
                  (_sign(maximize), decay, weight_decay, 1.0 - beta1, beta1, beta2, 1.0 - beta2, eps),
                  (weight_decay != 0 and not decoupled_weight_decay, 1.0 - beta1 < 0.5),
                  (True, True, amsgrad), rounding_seed)  # fmt: skip

    # -- lists of arrays ------------------------------------------------------------------------

    @staticmethod
    def _rows(params, grads, *buffers):
        """The five table rows: an absent buffer (None) repeats the gradient row."""
        return [params, grads, *(grads if b is None else b for b in buffers)]

    def sgd_step(self, params, grads, momentum_buffers, first_step, *, lr, weight_decay, momentum, dampening,
                 nesterov, maximize, rounding_seed=None):  # fmt: skip
        if not params:
            return
        rows = self._rows(params, grads, momentum_buffers if momentum != 0 else None, None, None)
        addrs, numels, dtype, _, _ = self._table_of(rows, [])
        flags = [bool(f) for f in first_step] if momentum != 0 else [False] * len(params)
        self.sgd_step_table(addrs, numels, dtype, flags, lr=lr, weight_decay=weight_decay, momentum=momentum,
                            dampening=dampening, nesterov=nesterov, maximize=maximize,
                            rounding_seed=rounding_seed)  # fmt: skip

    def adagrad_step(self, params, grads, state_sums, steps, **options):
        if params:
            self.adagrad_step_table(
                *self._table_of(self._rows(params, grads, state_sums, None, None), steps), **options
            )

    def rmsprop_step(self, params, grads, square_avgs, grad_avgs, momentum_buffers, steps, **options):
        if params:
            rows = self._rows(params, grads, square_avgs, grad_avgs if options["centered"] else None,
                              momentum_buffers if options["momentum"] > 0 else None)  # fmt: skip
            self.rmsprop_step_table(*self._table_of(rows, steps), **options)

    def adam_step(self, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, **options):
        if params:
            rows = self._rows(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs if options["amsgrad"] else None)
            self.adam_step_table(*self._table_of(rows, steps), **options)
