"""Optimizer updates in NumPy, in place, written to be read.

Book: "Deep Learning from Scratch", section 6.1 (SGD, Momentum, AdaGrad, Adam; RMSprop is
mentioned beside AdaGrad). The book's classes hold the state in dictionaries; here the state
arrays are passed in, and every formula is PyTorch's (torch.optim's single-tensor path), in the
same order of operations, so that a fastnorm optimizer and a torch one stay in lockstep:

* SGD:      g += wd*p;  b = g on the first step, else b = momentum*b + (1-dampening)*g;
            nesterov: g = g + momentum*b, else g = b;  p -= lr*g
* Adagrad:  g += wd*p;  s += g*g;  p -= clr * g / (sqrt(s) + eps),  clr = lr / (1 + (t-1)*lr_decay)
* RMSprop:  g += wd*p;  v = alpha*v + (1-alpha)*g*g;  centered: a = lerp(a, g, 1-alpha),
            d = sqrt(v - a*a) + eps, else d = sqrt(v) + eps;
            momentum: b = momentum*b + g/d, p -= lr*b; else p -= lr*g/d
* Adam(W):  AdamW: p *= 1 - lr*wd (decoupled, before the moments); Adam: g += wd*p;
            m = lerp(m, g, 1-beta1);  v = beta2*v + (1-beta2)*g*g;  amsgrad: vmax = max(vmax, v);
            p -= step_size * m / (sqrt(v or vmax) / sqrt(bc2) + eps),
            step_size = lr / (1 - beta1**t),  bc2 = 1 - beta2**t   (eps added after the division:
            the book folds the bias correction into lr and adds eps to sqrt(v) instead)
* Lion:     c = beta1*m + (1-beta1)*g;  p *= 1 - lr*wd;  p -= lr*sign(c);  m = beta2*m + (1-beta2)*g
            (Chen et al. 2023; torch.optim has none: bitsandbytes' order of operations)
* maximize negates the gradient first.

Adagrad, RMSprop and Adam count steps per tensor, as torch does: ``steps`` holds each tensor's
counter (a one-element float32 or float64 array, torch's ``state["step"]``), which the function
advances by one; the step-dependent scalars (clr, step_size, sqrt(bc2)) are then computed from the
new count in float64 on the host, once per tensor. The elementwise arithmetic runs in the
parameters' dtype (NumPy keeps float32 arrays float32 against Python floats), as torch's does.

Arguments are lists with one array per parameter tensor (any shape; all arrays of a tensor share
its shape and dtype). Every kernels backend exposes these four functions with these arguments.

16-bit storage (float16 arrays, or bfloat16 as uint16 bit patterns: kernels/fastnorm_kernels/_bits.py): every
array is widened to float32, the same float32 code runs, and each stored array (parameters and
state) is rounded once at the end: to nearest even, or, for bfloat16 with ``rounding_seed``,
stochastically with the generator every backend shares (the same bits as the numba kernels).
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Sequence

import numpy as np

from .. import OPTIMIZER_API
from .._bits import BFLOAT16, HALF_DTYPES, random16_array, round_into, widen

__all__ = [*OPTIMIZER_API, "OPTIMIZER_DTYPES"]

#: the storage dtypes these optimizers update (16-bit ones in float32, rounded once per store)
OPTIMIZER_DTYPES = (np.dtype(np.float32), np.dtype(np.float64), *HALF_DTYPES)

# NaN and Inf propagate silently, as in torch
_quiet = np.errstate(invalid="ignore", divide="ignore", over="ignore")

Arrays = Sequence[np.ndarray]


def _advance(step: np.ndarray) -> float:
    """step += 1 in place (a one-element array); returns the new count as a Python float."""
    step += 1
    return float(step.reshape(-1)[0])


def _lerp_(start: np.ndarray, end: np.ndarray, weight: float) -> None:
    """start <- start + weight*(end - start), with ATen's two-sided formula for accuracy."""
    if weight < 0.5:
        start += weight * (end - start)
    else:
        start[...] = end - (end - start) * (1.0 - weight)


def _storage(*stored: str):
    """Run an update written for float32/float64 arrays on 16-bit storage: the list arguments
    widened to float32 copies, the named ``stored`` lists (parameters first, then the state
    buffers in table row order) rounded back once. ``rounding_seed`` (bfloat16 only): round
    stochastically, row r of tensor t drawing ``random16_array(seed, t, r, n)``."""

    def decorate(fn):
        names = list(inspect.signature(fn).parameters)

        @functools.wraps(fn)
        def run(*args, rounding_seed: int | None = None, **kwargs):
            bound = dict(zip(names, args), **kwargs)
            params = bound[names[0]]
            dtype = np.dtype(params[0].dtype) if len(params) else np.dtype(np.float32)
            if dtype not in HALF_DTYPES:
                if rounding_seed is not None:
                    raise ValueError(f"stochastic rounding (rounding_seed) applies to bfloat16 storage, got {dtype}")
                return fn(**bound)
            if rounding_seed is not None and dtype != BFLOAT16:
                raise ValueError("stochastic rounding (rounding_seed) applies to bfloat16 storage, got float16")
            wide = dict(bound)
            for name in names:
                value = bound[name]
                if name != "steps" and name != "first_step" and isinstance(value, (list, tuple)):
                    wide[name] = [widen(a, dtype) for a in value]
            fn(**wide)
            for row, name in enumerate(stored):
                if bound[name] is None:
                    continue
                for t, (out, x) in enumerate(zip(bound[name], wide[name])):
                    bits = None if rounding_seed is None else random16_array(rounding_seed, t, row, x.size)
                    round_into(out, x, dtype, bits)

        return run

    return decorate


@_storage("params", "momentum_buffers")
@_quiet
def sgd_step(
    params: Arrays,
    grads: Arrays,
    momentum_buffers: Arrays | None,  # one per param when momentum != 0, else None
    first_step: Sequence[bool] | None,  # per param: its momentum buffer is new this step
    *,
    lr: float,
    weight_decay: float,
    momentum: float,
    dampening: float,
    nesterov: bool,
    maximize: bool,
) -> None:
    for i, (p, g) in enumerate(zip(params, grads)):
        d_p = -g if maximize else g.copy()
        if weight_decay != 0:
            d_p = d_p + weight_decay * p
        if momentum != 0:
            buf = momentum_buffers[i]
            if first_step[i]:
                buf[...] = d_p
            else:
                buf *= momentum
                buf += (1 - dampening) * d_p
            d_p = d_p + momentum * buf if nesterov else buf
        p += -lr * d_p


@_storage("params", "state_sums")
@_quiet
def adagrad_step(
    params: Arrays,
    grads: Arrays,
    state_sums: Arrays,
    steps: Arrays,  # per tensor: its step counter, advanced here
    *,
    lr: float,
    lr_decay: float,
    weight_decay: float,
    eps: float,
    maximize: bool,
) -> None:
    for p, g, s, step in zip(params, grads, state_sums, steps):
        clr = lr / (1 + (_advance(step) - 1) * lr_decay)
        g = -g if maximize else g
        if weight_decay != 0:
            g = g + weight_decay * p
        s += g * g
        std = np.sqrt(s) + eps
        p += -float(clr) * (g / std)


@_storage("params", "square_avgs", "grad_avgs", "momentum_buffers")
@_quiet
def rmsprop_step(
    params: Arrays,
    grads: Arrays,
    square_avgs: Arrays,
    grad_avgs: Arrays | None,  # when centered
    momentum_buffers: Arrays | None,  # when momentum > 0
    steps: Arrays,  # per tensor: its step counter, advanced here (RMSprop only counts)
    *,
    lr: float,
    alpha: float,
    eps: float,
    weight_decay: float,
    momentum: float,
    centered: bool,
    maximize: bool,
) -> None:
    for i, (p, g, v) in enumerate(zip(params, grads, square_avgs)):
        _advance(steps[i])
        g = -g if maximize else g
        if weight_decay != 0:
            g = g + weight_decay * p
        v *= alpha
        v += (1 - alpha) * g * g
        if centered:
            a = grad_avgs[i]
            _lerp_(a, g, 1 - alpha)
            avg = np.sqrt(v - a * a)
        else:
            avg = np.sqrt(v)
        avg += eps
        if momentum > 0:
            buf = momentum_buffers[i]
            buf *= momentum
            buf += g / avg
            p += -lr * buf
        else:
            p += -lr * (g / avg)


@_storage("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs")
@_quiet
def adam_step(
    params: Arrays,
    grads: Arrays,
    exp_avgs: Arrays,
    exp_avg_sqs: Arrays,
    max_exp_avg_sqs: Arrays | None,  # when amsgrad
    steps: Arrays,  # per tensor: its step counter, advanced here
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decoupled_weight_decay: bool,  # True for AdamW
    amsgrad: bool,
    maximize: bool,
) -> None:
    for i, (p, g, m, v) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs)):
        step = _advance(steps[i])
        step_size = lr / (1 - beta1**step)
        bias_correction2_sqrt = math.sqrt(1 - beta2**step)
        g = -g if maximize else g
        if weight_decay != 0:
            if decoupled_weight_decay:
                p *= 1 - lr * weight_decay
            else:
                g = g + weight_decay * p
        _lerp_(m, g, 1 - beta1)
        v *= beta2
        v += (1 - beta2) * g * g
        if amsgrad:
            vmax = max_exp_avg_sqs[i]
            np.maximum(vmax, v, out=vmax)
            denom = np.sqrt(vmax) / bias_correction2_sqrt + eps
        else:
            denom = np.sqrt(v) / bias_correction2_sqrt + eps
        p += -step_size * (m / denom)


@_storage("params", "exp_avgs")
@_quiet
def lion_step(
    params: Arrays,
    grads: Arrays,
    exp_avgs: Arrays,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    weight_decay: float,
    maximize: bool,
) -> None:
    for p, g, m in zip(params, grads, exp_avgs):
        g = -g if maximize else g
        p *= 1 - lr * weight_decay  # decoupled, before the signed step (the paper's, bitsandbytes')
        c = beta1 * m + (1 - beta1) * g
        p -= lr * np.sign(c)
        m *= beta2
        m += (1 - beta2) * g
