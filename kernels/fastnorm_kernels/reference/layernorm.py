"""Layer Normalization and RMS Normalization in NumPy, written to be read.

Both normalise each row of an (M, D) array, where D is the product of the ``normalized_shape``
(the last dims of the input) and M the product of the dims before it:

LayerNorm (Ba et al. 2016; ``torch.nn.LayerNorm``):
    mean = sum(x) / D,  var = sum((x - mean)^2) / D (biased),  rstd = 1 / sqrt(var + eps),
    y = (x - mean) * rstd * weight + bias
RMSNorm (Zhang and Sennrich 2019; ``torch.nn.RMSNorm``):
    rstd = 1 / sqrt(sum(x^2) / D + eps),  y = x * rstd * weight

Backward, with xhat = (x - mean) * rstd (RMSNorm: x * rstd) and g = dy * weight:
    dx = rstd * (g - sum(g) / D - xhat * sum(g * xhat) / D)   (RMSNorm: without the sum(g) term)
    dweight = sum over rows of dy * xhat,  dbias = sum over rows of dy

Everything is computed in float64 and written into the caller's outputs (16-bit storage widened
exactly and rounded once, with float32 per-row statistics and parameters, as the BatchNorm
reference does). These functions are the oracle the compiled kernels are tested against.
"""

from __future__ import annotations

import numpy as np

from .. import LAYER_NORM_API
from .batchnorm import BATCH_NORM_DTYPES, _storage

__all__ = [*LAYER_NORM_API, "LAYER_NORM_DTYPES"]

#: storage dtypes (16-bit: float32 statistics and parameters, float64 inside)
LAYER_NORM_DTYPES = BATCH_NORM_DTYPES


def _quiet():
    """NaN and Inf propagate silently, as in torch."""
    return np.errstate(invalid="ignore", divide="ignore", over="ignore")


def _rows(a) -> np.ndarray:
    return np.asarray(a, dtype=np.float64)


@_storage(inputs=("x",), outputs=("y",))
def layer_norm_forward(x, weight, bias, eps, y, mean, rstd):
    """LayerNorm of each row.

    Args:
        x: (M, D) input; y: (M, D) output, x's dtype.
        weight, bias: (D,) affine parameters in the compute dtype (float32 for 16-bit x), or None.
        eps: added to the variance.
        mean, rstd: (M,) outputs in the compute dtype: each row's mean and 1/sqrt(var + eps).
    """
    with _quiet():
        x64 = _rows(x)
        mu = x64.mean(axis=1)
        xc = x64 - mu[:, None]
        var = (xc * xc).mean(axis=1)
        inv = 1.0 / np.sqrt(var + eps)
        out = xc * inv[:, None]
        if weight is not None:
            out = out * _rows(weight)
        if bias is not None:
            out = out + _rows(bias)
    y[...] = out
    mean[...] = mu
    rstd[...] = inv


@_storage(inputs=("x", "dy"), outputs=("dx",))
def layer_norm_backward(dy, x, mean, rstd, weight, dx, dweight, dbias):
    """Gradients of :func:`layer_norm_forward` (each of dx, dweight, dbias None when not wanted).

    Args:
        dy, x: (M, D); mean, rstd: (M,) the forward's; weight: (D,) or None.
        dx: (M, D) output; dweight, dbias: (D,) outputs in the compute dtype, or None.
    """
    with _quiet():
        x64, g64 = _rows(x), _rows(dy)
        inv = _rows(rstd)[:, None]
        xhat = (x64 - _rows(mean)[:, None]) * inv
        if dbias is not None:
            dbias[...] = g64.sum(axis=0)
        if dweight is not None:
            dweight[...] = (g64 * xhat).sum(axis=0)
        if dx is not None:
            g = g64 * _rows(weight) if weight is not None else g64
            dx[...] = inv * (g - g.mean(axis=1, keepdims=True) - xhat * (g * xhat).mean(axis=1, keepdims=True))


@_storage(inputs=("x",), outputs=("y",))
def rms_norm_forward(x, weight, eps, y, rstd):
    """RMSNorm of each row: y = x / sqrt(mean(x^2) + eps) * weight.

    Args:
        x: (M, D); y: (M, D) output; weight: (D,) in the compute dtype, or None.
        rstd: (M,) output in the compute dtype.
    """
    with _quiet():
        x64 = _rows(x)
        inv = 1.0 / np.sqrt((x64 * x64).mean(axis=1) + eps)
        out = x64 * inv[:, None]
        if weight is not None:
            out = out * _rows(weight)
    y[...] = out
    rstd[...] = inv


@_storage(inputs=("x", "dy"), outputs=("dx",))
def rms_norm_backward(dy, x, rstd, weight, dx, dweight):
    """Gradients of :func:`rms_norm_forward` (dx or dweight None when not wanted)."""
    with _quiet():
        x64, g64 = _rows(x), _rows(dy)
        inv = _rows(rstd)[:, None]
        xhat = x64 * inv
        if dweight is not None:
            dweight[...] = (g64 * xhat).sum(axis=0)
        if dx is not None:
            g = g64 * _rows(weight) if weight is not None else g64
            dx[...] = inv * (g - xhat * (g * xhat).mean(axis=1, keepdims=True))
