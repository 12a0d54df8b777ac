"""The lean eager path of BatchNorm on CPU: kernels called on tensors' addresses.

At the MNIST MLP's sizes ((64, 256): 16K values) each kernel is a few microseconds of
arithmetic, and what surrounds it decides the speed (bench/eager_overhead.py): a NumPy view per
tensor (~1.5 µs), the kernels' own argument checks, Numba's typing of array arguments. A backend
whose kernels offer address-level entry points (``forward_train_at``, ``forward_eval_at``,
``backward_at`` and ``plan``: the numba backend) is called here with ``Tensor.data_ptr()``
integers instead, after :func:`fastnorm.functional.batch_norm` validated the tensors; outputs
are torch tensors (large ones from fastnorm's CPU buffer pool). The semantics are those of
:class:`fastnorm.autograd.BatchNormFunction`, which serves the other backends.

Training with a gradient goes through :func:`train_native`: the same kernels behind a C++
autograd node (fastnorm/_native.py), and forwards without one through :func:`forward_native`;
:class:`AddressBatchNormFunction` and :func:`forward` serve eval-mode forwards that need a
gradient, and everything where the C++ extension cannot be built.

Addresses are read from live tensors at each call and used within it; nothing keeps an address.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from . import _native
from ._arrays import CpuArrays, pool
from ._dispatch import Backend, follow_torch_threads
from .autograd import _CHANNELS_LAST, _as_saved, _differentiable_backward, _layout

# a scalar of the storage type (16-bit: their bits, kernels/numba_cpu/_bits.py) and one of the
# compute dtype of the per-channel arrays, per input dtype: they type the kernels' pointers
_LIKE = {torch.float32: np.float32(0), torch.float64: np.float64(0), torch.bfloat16: np.uint16(0),
         torch.float16: np.int16(0)}  # fmt: skip
_COMPUTE = {torch.float32: torch.float32, torch.float64: torch.float64, torch.bfloat16: torch.float32,
            torch.float16: torch.float32}  # fmt: skip
_LIKE_C = {torch.float32: np.float32(0), torch.float64: np.float64(0)}


def usable(backend: Backend) -> bool:
    """Whether this path serves a backend: its kernels have address-level entry points."""
    return hasattr(backend.kernels, "backward_at")


def _dense(t: torch.Tensor | None) -> torch.Tensor | None:
    """t, or a dense copy of it when strided (the kernels read (C,) vectors with unit stride)."""
    return t if t is None or t.is_contiguous() else t.contiguous()


def _address(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _geometry(x: torch.Tensor, channels_last: bool) -> tuple[int, int, int]:
    """(N, C, S) as the kernels see x: (N*H*W, C, 1) for channels-last memory."""
    shape = x.shape
    c = shape[1]
    if channels_last:
        return x.numel() // c, c, 1
    return shape[0], c, math.prod(shape[2:])


def _launch(x: torch.Tensor, channels_last: bool, backend: Backend) -> tuple[tuple[int, int, int], tuple]:
    """((N, C, S), plan) of a launch on x: Numba's thread count made torch's first, which the
    plan's parallel choice reads (kernels.numba_cpu.batchnorm.plan)."""
    threads = follow_torch_threads()
    geometry = _geometry(x, channels_last)
    return geometry, backend.kernels.plan(*geometry, x.element_size(), threads)


def _output(x: torch.Tensor, channels_last: bool, keep_strides: bool) -> torch.Tensor:
    """An uninitialised output shaped as x: from torch's allocator below the buffer pool's
    threshold, from the pool above it (warm pages: fastnorm/_arrays.py). Strides as torch's
    outputs have them: y the layout's own, dx x's (they differ only at size-1 dimensions)."""
    if x.numel() * x.element_size() < pool.min_bytes:
        if keep_strides:
            return torch.empty_like(x)  # x is dense: preserve_format gives x's very strides
        return torch.empty_like(x, memory_format=_CHANNELS_LAST[x.dim()] if channels_last else torch.contiguous_format)
    out = CpuArrays.empty_like(x, channels_last)[0]
    if keep_strides and out.stride() != x.stride():
        out = out.as_strided(x.shape, x.stride())
    return out


def forward(input, weight, bias, running_mean, running_var, training, momentum, eps, backend: Backend):
    """(y, x, stats, launch): x is the input as the kernels read it; stats a (2, C) tensor of the
    mean and invstd that normalised it in training (the backward's constants), None in eval;
    launch (channels_last, (N, C, S), plan) what the backward reuses.

    Few distinct torch calls: after a large kernel has flushed the caches, every distinct
    operation here costs tens of microseconds (its code and data come from DRAM; measured in
    bench/results/bn_profile.md as the module's "Python layer")."""
    kernels = backend.kernels
    x, channels_last = _layout(input)
    (n, c, s), plan = _launch(x, channels_last, backend)
    parallel, rows_per_chunk, block, _ = plan
    y = _output(x, channels_last, keep_strides=False)
    weight, bias, mean_in, var_in = _dense(weight), _dense(bias), _dense(running_mean), _dense(running_var)
    dtype = x.dtype
    compute = _COMPUTE[dtype]
    if training:
        stats = torch.empty(2, c, dtype=compute)
        mean = stats.data_ptr()
        kernels.forward_train_at(
            _LIKE[dtype], _LIKE_C[compute], x.data_ptr(), _address(weight), _address(bias), _address(mean_in),
            _address(var_in), y.data_ptr(), mean, mean + c * stats.element_size(), n, c, s, float(momentum),
            float(eps), parallel, rows_per_chunk, block,
        )  # fmt: skip
        # strided running statistics: updated through a copy, written back without a version bump
        # as the kernels' own writes (torch's BatchNorm does not bump them: a second forward
        # before the backward must not raise the in-place error for the first one's saved tensors)
        for buffer, dense in ((running_mean, mean_in), (running_var, var_in)):
            if dense is not buffer:
                with torch.autograd._unsafe_preserve_version_counter(buffer):
                    buffer.copy_(dense)
    else:
        kernels.forward_eval_at(
            _LIKE[dtype], _LIKE_C[compute], x.data_ptr(), _address(weight), _address(bias), mean_in.data_ptr(),
            var_in.data_ptr(), y.data_ptr(), n, c, s, float(eps), parallel, rows_per_chunk,
        )  # fmt: skip
        stats = None
    return y, x, stats, (channels_last, (n, c, s), plan)


def train_native(x, channels_last, source, weight, bias, running_mean, running_var, momentum, eps,
                 backend: Backend) -> torch.Tensor:  # fmt: skip
    """A training forward with an autograd node through the C++ extension (fastnorm/_native.py):
    the same kernels as :func:`forward` and :class:`AddressBatchNormFunction`, the same
    semantics. x: dense (contiguous, or channels-last if ``channels_last``); source: the
    caller's strided input of which x is a copy, or None (saved for torch's in-place error)."""
    geometry, plan = _launch(x, channels_last, backend)
    return _native.batch_norm_train(x, weight, bias, running_mean, running_var, source, momentum, eps,
                                    channels_last, geometry, plan)  # fmt: skip


def forward_native(input, weight, bias, running_mean, running_var, training, momentum, eps,
                   backend: Backend) -> torch.Tensor:  # fmt: skip
    """y of :func:`forward` (no autograd node) through the C++ extension: one call, no Numba
    dispatcher typing its arguments."""
    x, channels_last = _layout(input)
    geometry, plan = _launch(x, channels_last, backend)
    return _native.batch_norm_forward(x, weight, bias, running_mean, running_var, training, momentum, eps,
                                      channels_last, geometry, plan)  # fmt: skip


def _eval_constants(running_mean, running_var, eps) -> torch.Tensor:
    """(2, C): the running mean and 1/sqrt(running_var + eps) as the eval forward used them
    (computed in float64, rounded once), copied now: the buffers may change before the backward."""
    invstd = 1.0 / torch.sqrt(running_var.detach().double() + eps)
    return torch.stack([running_mean.detach(), invstd.to(running_var.dtype)])


class AddressBatchNormFunction(torch.autograd.Function):
    """Batch Normalization through a backend's address-level kernels (see the module's text).

    Forward and backward as :class:`fastnorm.autograd.BatchNormFunction`: input, weight and
    running statistics saved with ``save_for_backward`` (torch's error on an in-place change
    before the backward), a differentiable backward under ``create_graph=True``.
    """

    @staticmethod
    def forward(ctx, input, weight, bias, running_mean, running_var, training, momentum, eps, backend, source=None):
        y, x, stats, launch = forward(input, weight, bias, running_mean, running_var, training, momentum, eps, backend)
        if stats is None:
            stats = _eval_constants(running_mean, running_var, eps)
        ctx.save_for_backward(x, weight, running_mean, running_var, source)
        ctx.lean = (stats, launch, training, eps, backend.kernels)
        ctx.dtype = x.dtype
        return y

    @staticmethod
    def backward(ctx, grad_output):
        x, weight, *_ = ctx.saved_tensors
        stats, (channels_last, (n, c, s), plan), training, eps, kernels = ctx.lean
        if torch.is_grad_enabled():  # create_graph=True: a differentiable backward
            grads = _differentiable_backward(training, eps, grad_output, x, weight, stats[0], stats[1])
            return (*(g if need else None for g, need in zip(grads, ctx.needs_input_grad)), *[None] * 7)
        need_dx, need_dweight, need_dbias = ctx.needs_input_grad[:3]
        layout = _CHANNELS_LAST[x.dim()] if channels_last else torch.contiguous_format
        compute = stats.dtype  # the per-channel arrays' (float32 for 16-bit input)
        x = _as_saved(x, weight, layout, ctx.dtype, n * c * s, compute)
        if not grad_output.is_contiguous(memory_format=layout):
            grad_output = grad_output.contiguous(memory_format=layout)
        dx = _output(x, channels_last, keep_strides=True) if need_dx else None
        dweight = torch.empty(c, dtype=compute) if need_dweight else None
        dbias = torch.empty(c, dtype=compute) if need_dbias else None
        parallel, rows_per_chunk, _, block = plan
        if parallel:
            follow_torch_threads()
        weight = _dense(weight)  # held while the kernel reads it
        mean = stats.data_ptr()
        kernels.backward_at(
            _LIKE[x.dtype], _LIKE_C[compute], grad_output.data_ptr(), x.data_ptr(), mean,
            mean + c * stats.element_size(), _address(weight), training, _address(dx), _address(dweight),
            _address(dbias), n, c, s, parallel, rows_per_chunk, block,
        )  # fmt: skip
        return dx, dweight, dbias, None, None, None, None, None, None, None
