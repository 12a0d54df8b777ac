"""Batch Normalization in NumPy, written to be read.

Book: "Deep Learning from Scratch", section 6.3 (Batch Normalization). The book normalises a
(N, D) mini-batch per feature and derives the backward pass as a computational graph, stage by
stage (dbeta, dgamma, dxn, dxc, dstd, dvar, dmu). This module follows that derivation and
generalises it the way PyTorch does:

* statistics are per channel over every axis but the channel axis: inputs arrive as (N, C, S)
  arrays, where S is the product of the spatial sizes (S = 1 for (N, C) inputs);
* the batch variance that normalises is the biased one (divide by n = N*S);
* the running variance is updated with the unbiased one (divide by n - 1);
* running = (1 - momentum) * running + momentum * batch_stat, where the caller passes
  momentum = 1 / num_batches_tracked for PyTorch's cumulative average (momentum=None);
* eps is added to the variance inside the square root (PyTorch's default 1e-5, the book's 1e-6).

Everything is computed in float64 and written into the caller's float32/float64 outputs, so this
is both the slow backend and the yardstick the fast ones are tested against. 16-bit storage
(float16 arrays, or bfloat16 as uint16 bits: kernels/fastnorm_kernels/_bits.py) is widened exactly on the way in
and rounded once on the way out; its per-channel arrays are float32.

Every kernels backend exposes these four functions with these arguments; all of them write into
output arrays the caller allocated (so on a GPU the outputs come from torch's allocator).
"""

from __future__ import annotations

import functools
import inspect

import numpy as np

from .. import BATCH_NORM_API
from .._bits import HALF_DTYPES, round_float64_into, widen

__all__ = [*BATCH_NORM_API, "BATCH_NORM_DTYPES"]

#: storage dtypes (16-bit: float32 per-channel arrays, float64 inside)
BATCH_NORM_DTYPES = (np.dtype(np.float32), np.dtype(np.float64), *HALF_DTYPES)


def _storage(inputs: tuple[str, ...], outputs: tuple[str, ...]):
    """Run a function written for float arrays on 16-bit storage: the ``inputs`` (N, C, S)
    arrays widened (exactly), the ``outputs`` computed into float64 arrays and rounded once."""

    def decorate(fn):
        names = list(inspect.signature(fn).parameters)

        @functools.wraps(fn)
        def run(*args, **kwargs):
            bound = dict(zip(names, args), **kwargs)
            dtype = np.dtype(bound["x"].dtype)
            if dtype not in HALF_DTYPES:
                return fn(**bound)
            wide = dict(bound)
            for name in inputs:
                wide[name] = widen(bound[name], dtype)
            for name in outputs:
                if bound[name] is not None:
                    wide[name] = np.empty(bound[name].shape, np.float64)
            fn(**wide)
            for name in outputs:
                if bound[name] is not None:
                    round_float64_into(bound[name], wide[name], dtype)

        return run

    return decorate


# NaN and Inf propagate silently, as in torch
_quiet = np.errstate(invalid="ignore", divide="ignore", over="ignore")

_AXES = (0, 2)  # reduce over N and S, keep C


def _per_channel(v: np.ndarray) -> np.ndarray:
    """(C,) -> (1, C, 1), to broadcast against (N, C, S)."""
    return v.reshape(1, -1, 1)


@_storage(("x",), ("y",))
@_quiet
def batch_norm_forward_train(
    x: np.ndarray,  # (N, C, S) float32/float64
    weight: np.ndarray | None,  # (C,) gamma, or None for 1
    bias: np.ndarray | None,  # (C,) beta, or None for 0
    running_mean: np.ndarray | None,  # (C,) updated in place, or None
    running_var: np.ndarray | None,  # (C,) updated in place, or None
    momentum: float,
    eps: float,
    y: np.ndarray,  # (N, C, S) out: normalised, scaled and shifted x
    save_mean: np.ndarray,  # (C,) out: batch mean
    save_invstd: np.ndarray,  # (C,) out: 1 / sqrt(biased batch var + eps)
) -> None:
    """Training forward: normalise with batch statistics and update the running statistics."""
    x64 = x.astype(np.float64)
    n = x.shape[0] * x.shape[2]

    mu = x64.mean(axis=_AXES)  # (C,)
    xc = x64 - _per_channel(mu)  # centred input
    var = (xc**2).mean(axis=_AXES)  # biased variance: normalises this batch
    std = np.sqrt(var + eps)
    xn = xc / _per_channel(std)

    out = xn
    if weight is not None:
        out = out * _per_channel(weight.astype(np.float64))
    if bias is not None:
        out = out + _per_channel(bias.astype(np.float64))
    y[...] = out
    save_mean[...] = mu
    save_invstd[...] = 1.0 / std

    if running_mean is not None:
        running_mean[...] = (1.0 - momentum) * running_mean + momentum * mu
    if running_var is not None:
        unbiased = var * n / (n - 1)  # the caller guarantees n > 1 in training
        running_var[...] = (1.0 - momentum) * running_var + momentum * unbiased


@_storage(("x",), ("y",))
@_quiet
def batch_norm_forward_eval(
    x: np.ndarray,  # (N, C, S)
    weight: np.ndarray | None,  # (C,)
    bias: np.ndarray | None,  # (C,)
    running_mean: np.ndarray,  # (C,)
    running_var: np.ndarray,  # (C,)
    eps: float,
    y: np.ndarray,  # (N, C, S) out
) -> None:
    """Inference forward: the running statistics are constants."""
    std = np.sqrt(running_var.astype(np.float64) + eps)
    out = (x.astype(np.float64) - _per_channel(running_mean.astype(np.float64))) / _per_channel(std)
    if weight is not None:
        out = out * _per_channel(weight.astype(np.float64))
    if bias is not None:
        out = out + _per_channel(bias.astype(np.float64))
    y[...] = out


@_storage(("dy", "x"), ("dx",))
@_quiet
def batch_norm_backward(
    dy: np.ndarray,  # (N, C, S) upstream gradient
    x: np.ndarray,  # (N, C, S) the forward input
    mean: np.ndarray,  # (C,) the mean that normalised x (batch mean, or running mean in eval)
    invstd: np.ndarray,  # (C,) 1 / std used in the forward
    weight: np.ndarray | None,  # (C,) or None for 1
    training: bool,  # True: mean/invstd are functions of x (batch stats); False: constants
    dx: np.ndarray | None,  # (N, C, S) out, or None when not needed
    dweight: np.ndarray | None,  # (C,) out, or None
    dbias: np.ndarray | None,  # (C,) out, or None
) -> None:
    """Backward pass, staged as in the book's computational graph (section 6.3.1)."""
    dout = dy.astype(np.float64)
    n = x.shape[0] * x.shape[2]
    std = 1.0 / invstd.astype(np.float64)
    gamma = np.ones_like(std) if weight is None else weight.astype(np.float64)

    xc = x.astype(np.float64) - _per_channel(mean.astype(np.float64))
    xn = xc / _per_channel(std)

    dbeta = dout.sum(axis=_AXES)
    dgamma = (xn * dout).sum(axis=_AXES)
    if dbias is not None:
        dbias[...] = dbeta
    if dweight is not None:
        dweight[...] = dgamma
    if dx is None:
        return

    dxn = _per_channel(gamma) * dout
    dxc = dxn / _per_channel(std)
    if training:
        # the batch statistics depend on x: propagate through std and mu as well
        dstd = -(dxn * xc / _per_channel(std * std)).sum(axis=_AXES)
        dvar = 0.5 * dstd / std
        dxc = dxc + (2.0 / n) * xc * _per_channel(dvar)
        dmu = dxc.sum(axis=_AXES)
        dxc = dxc - _per_channel(dmu) / n
    dx[...] = dxc


@_storage(("x",), ())
@_quiet
def batch_norm_stats(
    x: np.ndarray,  # (N, C, S)
    mean: np.ndarray,  # (C,) float64 out: per-channel mean
    var: np.ndarray,  # (C,) float64 out: per-channel biased variance
) -> None:
    """Per-channel statistics only (SyncBatchNorm merges them across processes)."""
    x64 = x.astype(np.float64)
    mu = x64.mean(axis=_AXES)
    mean[...] = mu
    var[...] = ((x64 - _per_channel(mu)) ** 2).mean(axis=_AXES)
