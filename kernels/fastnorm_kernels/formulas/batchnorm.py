"""Per-channel Batch Normalization math ("Deep Learning from Scratch" 6.3), PyTorch's conventions.

The backends reduce each channel's values to two float64 sums; these functions turn the sums
into what the elementwise passes and the caller need. Statistics use a shift ``K`` per channel
(its first value; the numba CPU kernels: the mean of its first 16 values): the sums are
of ``x - K`` and ``(x - K)^2``, exact enough in float64 however large |mean| / std is, and
partial sums over chunks merge by addition (Chan's formula with a common shift).

Forward:  mean = K + S1/n,  var = S2/n - (S1/n)^2 (biased: normalises),  invstd = 1/sqrt(var+eps),
          running = (1 - momentum) * running + momentum * batch  (running_var: unbiased var),
          y = (x - mean) * scale + beta  with  scale = gamma * invstd.
Backward: with S_dy = sum(dy) and S_dyx = sum(dy * (x - mean)):
          dbias = S_dy,  dweight = S_dyx * invstd,
          dx = dy * k1 + (x - mean) * k2 + k3,  k1 = gamma * invstd,
          k2 = -k1 * invstd^2 * S_dyx / n,  k3 = -k1 * S_dy / n  (training; 0 in eval).
"""

from __future__ import annotations

import math


def shift_of(first):
    """The channel's shift K: ``first`` (a value of the channel, or the mean of its first values)
    as float64, or 0 if that is not finite."""
    return first if math.isfinite(first) else 0.0


def statistics(sum_shifted, sum_sq_shifted, shift, count, eps):
    """(mean, biased var, invstd) from the shifted sums of ``count`` values."""
    d = sum_shifted / count
    var = sum_sq_shifted / count - d * d
    if var < 0.0:  # rounding; NaN stays NaN
        var = 0.0
    return shift + d, var, 1.0 / math.sqrt(var + eps)


def running_update(running, batch_value, momentum):
    """PyTorch's exponential average: the new value weighs ``momentum``. Works on tensors too."""
    return (1.0 - momentum) * running + momentum * batch_value


def unbiased_var(var, count):
    """The biased variance of ``count`` values made unbiased (what ``running_var`` tracks)."""
    return var * count / (count - 1.0)


def scale_of(invstd, weight):
    """The scale of y = (x - mean) * scale + beta (``weight`` 1.0 without affine weight)."""
    return invstd * weight


def backward_coefficients(sum_dy, sum_dy_xmu, count, invstd, weight, training):
    """(k1, k2, k3, dweight, dbias) of dx = dy * k1 + (x - mean) * k2 + k3, all float64
    (``weight`` 1.0 without affine weight)."""
    k1 = invstd * weight
    if training:
        k2 = -k1 * invstd * invstd * (sum_dy_xmu / count)
        k3 = -k1 * (sum_dy / count)
    else:
        k2 = 0.0
        k3 = 0.0
    return k1, k2, k3, sum_dy_xmu * invstd, sum_dy
