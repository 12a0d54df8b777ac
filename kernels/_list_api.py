"""The list-of-arrays optimizer API, built on a backend's multi-tensor table entry points.

Every kernels backend exposes ``sgd_step``, ``adagrad_step``, ``rmsprop_step`` and ``adam_step``
taking lists of arrays (kernels/reference's signatures). The Numba backends implement them the
same way: gather the arrays' addresses into a (buffers x tensors) table, repeating a row for an
unused buffer, and call the ``*_step_table`` kernel with the per-tensor scalars given (no step
counters to advance). This class is that one implementation; each backend supplies how to read
an array's address and its ``*_step_table`` functions.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

_NO_STEPS = np.zeros(0, np.int64)


class ListAPI:
    def __init__(self, table_of: Callable, tables, scalars: Callable = lambda v: np.asarray(v, np.float64)):
        """``table_of(*rows) -> (addrs, numels, dtype)``; ``tables``: the module holding
        ``sgd_step_table`` etc.; ``scalars``: per-tensor scalars as a host float64 array."""
        self._table_of, self._tables, self._scalars = table_of, tables, scalars

    def sgd_step(self, params, grads, momentum_buffers, first_step, *, lr, weight_decay, momentum, dampening,
                 nesterov, maximize):  # fmt: skip
        if not params:
            return
        addrs, numels, dtype = self._table_of(params, grads, momentum_buffers if momentum != 0 else grads)
        flags = np.array([bool(f) for f in first_step] if momentum != 0 else [0] * len(params), np.int8)
        self._tables.sgd_step_table(addrs, numels, dtype, flags, lr=lr, weight_decay=weight_decay,
                                    momentum=momentum, dampening=dampening, nesterov=nesterov, maximize=maximize)  # fmt: skip

    def adagrad_step(self, params, grads, state_sums, clrs, *, weight_decay, eps, maximize):
        if not params:
            return
        addrs, numels, dtype = self._table_of(params, grads, state_sums)
        self._tables.adagrad_step_table(addrs, numels, dtype, _NO_STEPS, False, self._scalars(clrs), lr=0.0,
                                        lr_decay=0.0, weight_decay=weight_decay, eps=eps, maximize=maximize)  # fmt: skip

    def rmsprop_step(self, params, grads, square_avgs, grad_avgs, momentum_buffers, *, lr, alpha, eps,
                     weight_decay, momentum, centered, maximize):  # fmt: skip
        if not params:
            return
        addrs, numels, dtype = self._table_of(params, grads, square_avgs, grad_avgs if centered else square_avgs,
                                              momentum_buffers if momentum > 0 else square_avgs)  # fmt: skip
        self._tables.rmsprop_step_table(addrs, numels, dtype, _NO_STEPS, False, lr=lr, alpha=alpha, eps=eps,
                                        weight_decay=weight_decay, momentum=momentum, centered=centered,
                                        maximize=maximize)  # fmt: skip

    def adam_step(self, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, step_sizes, bias_correction2_sqrts,
                  *, lr, beta1, beta2, eps, weight_decay, decoupled_weight_decay, amsgrad, maximize):  # fmt: skip
        if not params:
            return
        addrs, numels, dtype = self._table_of(params, grads, exp_avgs, exp_avg_sqs,
                                              max_exp_avg_sqs if amsgrad else exp_avg_sqs)  # fmt: skip
        self._tables.adam_step_table(addrs, numels, dtype, _NO_STEPS, False, self._scalars(step_sizes),
                                     self._scalars(bias_correction2_sqrts), lr=lr, beta1=beta1, beta2=beta2,
                                     eps=eps, weight_decay=weight_decay,
                                     decoupled_weight_decay=decoupled_weight_decay, amsgrad=amsgrad,
                                     maximize=maximize)  # fmt: skip
