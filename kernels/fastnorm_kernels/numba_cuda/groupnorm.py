"""Group Normalization on NVIDIA GPUs with ``numba.cuda.jit`` kernels (contiguous (N, C, S) arrays).

The math is kernels/fastnorm_kernels/reference/groupnorm.py's; conventions are PyTorch's (``torch.nn.GroupNorm``).
A (sample n, group g) block of contiguous (N, C, S) storage is one row of D = C/G * S values, so
the kernels are kernels/fastnorm_kernels/numba_cuda/layernorm.py's grouped-row kernels (see its docstring for the
algorithm): forward and dx a block per (n, g); dweight[c] and dbias[c] from partial sums over a
(channel, split) grid, threads along each (n, c) plane, added per channel in a fixed order.
Channels-last input is the caller's business: fastnorm passes its values in (N, C, S) order (a
contiguous copy) and gives the output the input's layout back.
"""

from __future__ import annotations

from .. import GROUP_NORM_API
from .._validate import device_dense
from .layernorm import LAYER_NORM_DTYPES, _check_dtype, _check_same, _check_vectors, _views, backward_rows, forward_rows

__all__ = [*GROUP_NORM_API, "GROUP_NORM_DTYPES"]

#: storage dtypes: float32, float64, float16 and bfloat16 (uint16 bits); 16-bit computed in float32
GROUP_NORM_DTYPES = LAYER_NORM_DTYPES


def _check(x, groups, outputs, per_group, per_channel):
    dtype = _check_dtype(x, "group norm")
    shape = tuple(x.shape)
    if not isinstance(groups, int) or groups <= 0:
        raise ValueError(f"groups must be a positive int, got {groups!r}")
    if len(shape) != 3 or not device_dense(x) or shape[1] % groups:
        raise ValueError(f"kernels take C-contiguous (N, C, S) arrays with C divisible by {groups}, got {shape}")
    _check_same(x, dtype, outputs)
    _check_vectors(dtype, ((shape[0] * groups, per_group), (shape[1], per_channel)), "per-group and per-channel")


def group_norm_forward(x, weight, bias, groups, eps, y, mean, rstd):
    """GroupNorm forward on (N, C, S) arrays; see fastnorm_kernels.reference.group_norm_forward."""
    x, weight, bias, y, mean, rstd = _views(x, weight, bias, y, mean, rstd)
    _check(x, groups, [y], [mean, rstd], [weight, bias])
    if mean is None or rstd is None:
        raise ValueError("mean, rstd: arrays are needed (the kernels write them)")
    n, c, s = x.shape
    cg = c // groups
    forward_rows(x, weight, bias, eps, y, mean, rstd, n * groups, cg * s, groups, cg, s, True)


def group_norm_backward(dy, x, mean, rstd, weight, groups, dx, dweight, dbias):
    """GroupNorm backward on (N, C, S) arrays; see fastnorm_kernels.reference.group_norm_backward."""
    dy, x, mean, rstd, weight, dx, dweight, dbias = _views(dy, x, mean, rstd, weight, dx, dweight, dbias)
    _check(x, groups, [dy, dx], [mean, rstd], [weight, dweight, dbias])
    if mean is None or rstd is None:
        raise ValueError("mean, rstd: arrays are needed (the kernels read them)")
    n, c, s = x.shape
    backward_rows(dy, x, mean, rstd, weight, dx, dweight, dbias, n, c, s, groups, True)
