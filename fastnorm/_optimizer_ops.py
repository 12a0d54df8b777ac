"""The multi-tensor optimizer updates and BatchNorm's statistics as ``torch.library`` custom ops.

Namespace ``fastnorm``, each with a fake (meta) implementation, checked by
``torch.library.opcheck`` in tests/test_compile.py:

* ``fastnorm::sgd_step``, ``fastnorm::adagrad_step``, ``fastnorm::rmsprop_step``,
  ``fastnorm::adam_step``: one fused update of lists of parameters, gradients, state buffers and
  step counters, mutated in place (declared in ``mutates_args``), with torch.optim's options;
  ``backend`` names the kernels (``"numba"``, ``"reference"``, ``"cuda"``). These are the
  kernels' list API (kernels/_optimizer_api.py) on tensors: code that compiles its own update
  loop can call them as opaque graph nodes. ``fastnorm.optim``'s optimizers keep their eager
  per-group plan (cheaper per step) and run ``step`` eagerly under ``torch.compile``.
* ``fastnorm::batch_norm_stats``: per-channel mean and biased variance in float64, the local
  statistics SyncBatchNorm merges across processes.

Formulas (book section 6.1; torch.optim's order of operations), for each element:
SGD ``b = momentum*b + (1-dampening)*g; p -= lr*(g + momentum*b if nesterov else b)``;
Adagrad ``s += g*g; p -= clr*g/(sqrt(s)+eps)``; RMSprop ``v = alpha*v + (1-alpha)*g*g``;
Adam ``m = b1*m + (1-b1)*g, v = b2*v + (1-b2)*g*g, p -= lr/bc1 * m/(sqrt(v)/sqrt(bc2) + eps)``.

Example:
    >>> torch.ops.fastnorm.adam_step([p], [p.grad], [m], [v], [], [step], lr=1e-3, beta1=0.9,
    ...     beta2=0.999, eps=1e-8, weight_decay=0.0, decoupled_weight_decay=False, amsgrad=False,
    ...     maximize=False, backend="numba")
"""

from __future__ import annotations

import torch

from ._dispatch import resolve
from .autograd import _layout

Tensors = list[torch.Tensor]


def _kernels(backend: str, op: str, tensors: Tensors):
    chosen = resolve(backend, op, tensors[0].device)
    if chosen.is_torch:
        raise ValueError(f"fastnorm::{op}_step runs fastnorm's kernels: name one of its backends, not {backend!r}")
    for t in tensors:
        if not t.is_contiguous():
            raise ValueError(f"fastnorm::{op}_step takes dense (contiguous) tensors")
    return chosen


def _arrays(chosen, tensors: Tensors) -> list:
    return [chosen.as_array(t) for t in tensors]


@torch.library.custom_op(
    "fastnorm::sgd_step", mutates_args=("params", "momentum_buffers"), device_types=("cpu", "cuda")
)
def sgd_step(params: Tensors, grads: Tensors, momentum_buffers: Tensors, first_step: list[bool], lr: float,
             weight_decay: float, momentum: float, dampening: float, nesterov: bool, maximize: bool,
             backend: str) -> None:  # fmt: skip
    """SGD; ``momentum_buffers`` (one per parameter when momentum != 0, else empty) with
    ``first_step`` true where a buffer is new (it becomes the gradient, as torch clones it)."""
    if not params:
        return
    chosen = _kernels(backend, "sgd", [*params, *grads, *momentum_buffers])
    buffers = _arrays(chosen, momentum_buffers) if momentum != 0 else None
    with chosen.device_guard(params[0]):
        chosen.kernels.sgd_step(_arrays(chosen, params), _arrays(chosen, grads), buffers, list(first_step), lr=lr,
                                weight_decay=weight_decay, momentum=momentum, dampening=dampening,
                                nesterov=nesterov, maximize=maximize)  # fmt: skip


@torch.library.custom_op("fastnorm::adagrad_step", mutates_args=("params", "state_sums", "steps"),
                         device_types=("cpu", "cuda"))  # fmt: skip
def adagrad_step(params: Tensors, grads: Tensors, state_sums: Tensors, steps: Tensors, lr: float, lr_decay: float,
                 weight_decay: float, eps: float, maximize: bool, backend: str) -> None:  # fmt: skip
    """Adagrad; ``steps``: torch's scalar step tensors (advanced by the kernels, on the host)."""
    if not params:
        return
    chosen = _kernels(backend, "adagrad", [*params, *grads, *state_sums])
    with chosen.device_guard(params[0]):
        chosen.kernels.adagrad_step(_arrays(chosen, params), _arrays(chosen, grads), _arrays(chosen, state_sums),
                                    [chosen.as_array(s) for s in steps],
                                    lr=lr, lr_decay=lr_decay, weight_decay=weight_decay, eps=eps,
                                    maximize=maximize)  # fmt: skip


@torch.library.custom_op("fastnorm::rmsprop_step",
                         mutates_args=("params", "square_avgs", "grad_avgs", "momentum_buffers", "steps"),
                         device_types=("cpu", "cuda"))  # fmt: skip
def rmsprop_step(params: Tensors, grads: Tensors, square_avgs: Tensors, grad_avgs: Tensors,
                 momentum_buffers: Tensors, steps: Tensors, lr: float, alpha: float, eps: float,
                 weight_decay: float, momentum: float, centered: bool, maximize: bool,
                 backend: str) -> None:  # fmt: skip
    """RMSprop; ``grad_avgs`` only when centered, ``momentum_buffers`` only when momentum > 0
    (empty lists otherwise)."""
    if not params:
        return
    chosen = _kernels(backend, "rmsprop", [*params, *grads, *square_avgs, *grad_avgs, *momentum_buffers])
    with chosen.device_guard(params[0]):
        chosen.kernels.rmsprop_step(
            _arrays(chosen, params), _arrays(chosen, grads), _arrays(chosen, square_avgs),
            _arrays(chosen, grad_avgs) if centered else None,
            _arrays(chosen, momentum_buffers) if momentum > 0 else None,
            [chosen.as_array(s) for s in steps], lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay,
            momentum=momentum, centered=centered, maximize=maximize,
        )  # fmt: skip


@torch.library.custom_op("fastnorm::adam_step",
                         mutates_args=("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "steps"),
                         device_types=("cpu", "cuda"))  # fmt: skip
def adam_step(params: Tensors, grads: Tensors, exp_avgs: Tensors, exp_avg_sqs: Tensors, max_exp_avg_sqs: Tensors,
              steps: Tensors, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
              decoupled_weight_decay: bool, amsgrad: bool, maximize: bool, backend: str) -> None:  # fmt: skip
    """Adam (``decoupled_weight_decay=True``: AdamW); ``max_exp_avg_sqs`` only with amsgrad."""
    if not params:
        return
    chosen = _kernels(backend, "adam", [*params, *grads, *exp_avgs, *exp_avg_sqs, *max_exp_avg_sqs])
    with chosen.device_guard(params[0]):
        chosen.kernels.adam_step(
            _arrays(chosen, params), _arrays(chosen, grads), _arrays(chosen, exp_avgs), _arrays(chosen, exp_avg_sqs),
            _arrays(chosen, max_exp_avg_sqs) if amsgrad else None, [chosen.as_array(s) for s in steps], lr=lr,
            beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
            decoupled_weight_decay=decoupled_weight_decay, amsgrad=amsgrad, maximize=maximize,
        )  # fmt: skip


# the updates return nothing: their fake implementations only have to exist
for _op in (sgd_step, adagrad_step, rmsprop_step, adam_step):
    _op.register_fake(lambda *args, **kwargs: None)


@torch.library.custom_op("fastnorm::batch_norm_stats", mutates_args=(), device_types=("cpu", "cuda"))
def batch_norm_stats(input: torch.Tensor, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, biased variance) per channel of ``(N, C, *)`` input, float64 (C,) tensors."""
    chosen = resolve(backend, "batch_norm", input.device)
    if chosen.is_torch:
        dims = [0, *range(2, input.dim())]
        x = input.double()
        return x.mean(dims), x.var(dims, unbiased=False)
    if input.dim() < 2 or input.dtype not in (torch.float32, torch.float64):
        raise ValueError(
            f"batch_norm_stats takes a float32 or float64 (N, C, *) input, got {input.dtype} {tuple(input.shape)}"
        )
    x, channels_last = _layout(input)
    c = x.shape[1]
    mean = torch.empty(c, dtype=torch.float64, device=x.device)
    var = torch.empty(c, dtype=torch.float64, device=x.device)
    with chosen.device_guard(x):
        chosen.kernels.batch_norm_stats(chosen.arrays.kernel_array(x, channels_last), chosen.as_array(mean),
                                        chosen.as_array(var))  # fmt: skip
    return mean, var


@batch_norm_stats.register_fake
def _(input, backend):
    c = input.shape[1]
    return input.new_empty(c, dtype=torch.float64), input.new_empty(c, dtype=torch.float64)
