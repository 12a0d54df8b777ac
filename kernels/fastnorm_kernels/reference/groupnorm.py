"""Group Normalization in NumPy, written to be read (Wu and He 2018; ``torch.nn.GroupNorm``).

The C channels of each sample are split into G groups of C/G consecutive channels; each
(sample, group) is normalised over its channels and spatial positions, then every channel gets
its own affine parameters. Inputs arrive as (N, C, S) arrays (S: the product of the spatial
sizes); channels-last storage is the caller's business (it passes the values in this order).

    mean, var = mean and biased variance of x[n, group g]  (D = C/G * S values)
    rstd = 1 / sqrt(var + eps)
    y[n, c, s] = (x[n, c, s] - mean[n, g]) * rstd[n, g] * weight[c] + bias[c]

Backward, per (n, g), with xhat = (x - mean) * rstd and g = dy * weight[c]:
    dx = rstd * (g - sum(g) / D - xhat * sum(g * xhat) / D)    (sums over the group)
    dweight[c] = sum over n, s of dy * xhat,  dbias[c] = sum over n, s of dy

float64 inside, 16-bit storage widened exactly and rounded once (float32 statistics and
parameters), as the other references.
"""

from __future__ import annotations

import numpy as np

from .. import GROUP_NORM_API
from .batchnorm import BATCH_NORM_DTYPES, _storage

__all__ = [*GROUP_NORM_API, "GROUP_NORM_DTYPES"]

GROUP_NORM_DTYPES = BATCH_NORM_DTYPES


def _quiet():
    return np.errstate(invalid="ignore", divide="ignore", over="ignore")


def _grouped(a, groups: int) -> np.ndarray:
    """(N, C, S) -> (N, G, C/G, S) float64."""
    n, c, s = a.shape
    return np.asarray(a, dtype=np.float64).reshape(n, groups, c // groups, s)


def _per_channel(v, groups: int) -> np.ndarray:
    """(C,) -> (1, G, C/G, 1) float64."""
    return np.asarray(v, dtype=np.float64).reshape(1, groups, -1, 1)


@_storage(inputs=("x",), outputs=("y",))
def group_norm_forward(x, weight, bias, groups, eps, y, mean, rstd):
    """GroupNorm forward.

    Args:
        x: (N, C, S) input; y: (N, C, S) output, x's dtype.
        weight, bias: (C,) in the compute dtype (float32 for 16-bit x), or None.
        groups: G, which divides C.
        eps: added to the variance.
        mean, rstd: (N*G,) outputs in the compute dtype, (n, g) flattened.
    """
    with _quiet():
        xg = _grouped(x, groups)
        mu = xg.mean(axis=(2, 3), keepdims=True)
        xc = xg - mu
        inv = 1.0 / np.sqrt((xc * xc).mean(axis=(2, 3), keepdims=True) + eps)
        out = xc * inv
        if weight is not None:
            out = out * _per_channel(weight, groups)
        if bias is not None:
            out = out + _per_channel(bias, groups)
    y[...] = out.reshape(y.shape)
    mean[...] = mu.reshape(-1)
    rstd[...] = inv.reshape(-1)


@_storage(inputs=("x", "dy"), outputs=("dx",))
def group_norm_backward(dy, x, mean, rstd, weight, groups, dx, dweight, dbias):
    """GroupNorm backward (each of dx, dweight, dbias None when not wanted).

    Args:
        dy, x: (N, C, S); mean, rstd: (N*G,) the forward's; weight: (C,) or None.
        dx: (N, C, S) output; dweight, dbias: (C,) outputs in the compute dtype, or None.
    """
    with _quiet():
        n = x.shape[0]
        xg, gg = _grouped(x, groups), _grouped(dy, groups)
        inv = np.asarray(rstd, dtype=np.float64).reshape(n, groups, 1, 1)
        xhat = (xg - np.asarray(mean, dtype=np.float64).reshape(n, groups, 1, 1)) * inv
        if dbias is not None:
            dbias[...] = gg.sum(axis=(0, 3)).reshape(-1)
        if dweight is not None:
            dweight[...] = (gg * xhat).sum(axis=(0, 3)).reshape(-1)
        if dx is not None:
            g = gg * _per_channel(weight, groups) if weight is not None else gg
            out = inv * (g - g.mean(axis=(2, 3), keepdims=True) - xhat * (g * xhat).mean(axis=(2, 3), keepdims=True))
            dx[...] = out.reshape(dx.shape)
