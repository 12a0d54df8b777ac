"""``torch.autograd.Function`` wrappers that route tensors to a backend's kernels.

Tensors reach the kernels zero-copy (``Tensor.numpy()`` on CPU, ``__cuda_array_interface__``
on GPU); outputs are allocated here (see ``_arrays``) and the kernels write into them.

At the MNIST MLP's sizes (16K-32K values) a whole BatchNorm takes a few microseconds of
arithmetic, so the Python around it decides the speed: when no gradient is needed the kernels
are called without building an autograd node, and the views of per-channel parameters and
buffers are cached (a tensor -> NumPy view costs ~2 µs, a lookup ~0.5 µs).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch

from ._dispatch import Backend

_CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}


class _ViewCache:
    """Kernel-array views of small long-lived tensors (BatchNorm's weight, bias, running stats).

    An entry is reused while the tensor object, its data pointer, shape and dtype are unchanged
    (so ``param.data = ...``, ``resize_`` or a ``load_state_dict`` that swaps storage is seen). Entries hold a
    reference to their tensor; the cache is emptied when it reaches ``capacity`` entries.
    """

    def __init__(self, capacity: int = 512) -> None:
        self.capacity = capacity
        self._entries: dict[str, dict[int, tuple]] = {}

    def __call__(self, backend: Backend, t: torch.Tensor | None):
        if t is None:
            return None
        entries = self._entries.get(backend.name)
        if entries is None:
            entries = self._entries[backend.name] = {}
        entry = entries.get(id(t))
        key = (t.data_ptr(), t.shape, t.dtype)
        if entry is not None and entry[0] is t and entry[1] == key:
            return entry[2]
        if len(entries) >= self.capacity:
            entries.clear()
        view = backend.as_array(t)
        entries[id(t)] = (t, key, view)
        return view


channel_view = _ViewCache()


def _layout(input: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """The input made kernel-ready (copied only if neither contiguous nor channels-last)."""
    if input.is_contiguous():
        return input, False
    fmt = _CHANNELS_LAST.get(input.dim())
    if fmt is not None and input.is_contiguous(memory_format=fmt):
        return input, True
    return input.contiguous(), False


class SavedForBackward(NamedTuple):
    """What the forward leaves for the backward: the kernels' arrays (converting the tensors
    again in the backward costs more than the backward itself at the MLP's sizes)."""

    input: np.ndarray  # (N, C, S) view of the input the kernels read
    mean: np.ndarray  # (C,) the mean that normalised it (batch mean, or running mean in eval)
    invstd: np.ndarray  # (C,) 1 / sqrt(var + eps) used in the forward
    weight: np.ndarray | None  # (C,) gamma, or None
    channels_last: bool  # the input's memory format (the gradients get the same)
    keep_alive: tuple  # tensors the arrays above view (GPU)


def batch_norm_forward(input, weight, bias, running_mean, running_var, training, momentum, eps,
                       backend: Backend, need_backward: bool):  # fmt: skip
    """Run the forward kernels. Returns (y, x, saved): ``x`` is the input as the kernels read it
    (made dense if it was neither contiguous nor channels-last), ``saved`` what the backward
    needs, or None when ``need_backward`` is false in eval mode."""
    x, channels_last = _layout(input)
    arrays = backend.arrays
    y, y_array = arrays.empty_like(x, channels_last)
    x_array = arrays.kernel_array(x, channels_last)
    weight_array = channel_view(backend, weight)
    if training:
        c = x.shape[1]
        (mean, mean_array), (invstd, invstd_array) = arrays.scratch_vector(c, x), arrays.scratch_vector(c, x)
        keep_alive = (mean, invstd)
        backend.kernels.batch_norm_forward_train(
            x_array, weight_array, channel_view(backend, bias), channel_view(backend, running_mean),
            channel_view(backend, running_var), float(momentum), float(eps), y_array, mean_array, invstd_array,
        )  # fmt: skip
    else:
        backend.kernels.batch_norm_forward_eval(
            x_array, weight_array, channel_view(backend, bias), channel_view(backend, running_mean),
            channel_view(backend, running_var), float(eps), y_array,
        )  # fmt: skip
        if not need_backward:
            return y, x, None
        # constants of the eval forward, frozen now (the buffers may change later)
        keep_alive, mean_array, invstd_array = arrays.eval_constants(running_mean, running_var, eps)
    return y, x, SavedForBackward(x_array, mean_array, invstd_array, weight_array, channels_last, keep_alive)


class BatchNormFunction(torch.autograd.Function):
    """Batch Normalization with a fastnorm backend's forward and backward kernels.

    Forward (training): ``y = (x - mean) * invstd * weight + bias`` with per-channel batch
    statistics over every axis but 1, and the running statistics updated in place.
    Forward (eval): the same with ``running_mean`` and ``1/sqrt(running_var + eps)``.
    Backward: ``dx``, ``dweight = sum(dy * xhat)``, ``dbias = sum(dy)``.

    Inputs are validated by :func:`fastnorm.functional.batch_norm`; call that, not this.
    The kernels' arrays are kept on ``ctx`` (converting again in the backward costs more than
    the backward itself at the MLP's sizes). The tensors torch's own BatchNorm saves (input,
    weight, running statistics) are saved with ``save_for_backward`` too, so that an in-place
    change of any of them before the backward raises torch's error; ``source``, a strided input
    the caller made dense (where autograd records the copy) for ``input``, is saved for that
    alone (it gets no gradient here: the copy's node passes ``input``'s on). A backward with
    ``create_graph=True`` computes the gradients with differentiable torch operations from the
    same saved tensors, so that second derivatives are torch's (the kernels have no graph).
    """

    @staticmethod
    def forward(
        ctx,
        input: torch.Tensor,  # (N, C, *)
        weight: torch.Tensor | None,  # (C,)
        bias: torch.Tensor | None,  # (C,)
        running_mean: torch.Tensor | None,  # (C,)
        running_var: torch.Tensor | None,  # (C,)
        training: bool,
        momentum: float,
        eps: float,
        backend: Backend,
        source: torch.Tensor | None = None,  # the caller's strided input, of which input is a dense copy
    ) -> torch.Tensor:
        with backend.device_guard(input):
            y, x, saved = batch_norm_forward(
                input, weight, bias, running_mean, running_var, training, momentum, eps, backend, True
            )
        ctx.save_for_backward(x, weight, running_mean, running_var, source)
        ctx.dtype = x.dtype
        ctx.saved = saved
        ctx.training = training
        ctx.eps = eps
        ctx.backend = backend
        return y

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        # raises torch's error if the input, weight or running statistics changed in place
        x, weight, *_ = ctx.saved_tensors
        saved: SavedForBackward = ctx.saved
        need_dx, need_dweight, need_dbias = ctx.needs_input_grad[:3]
        if torch.is_grad_enabled():  # create_graph=True: a differentiable backward
            grads = _differentiable_backward(ctx.training, ctx.eps, grad_output, x, weight, saved.mean, saved.invstd)
            return (*(g if need else None for g, need in zip(grads, ctx.needs_input_grad)), *[None] * 7)
        backend: Backend = ctx.backend
        arrays = backend.arrays
        layout = _CHANNELS_LAST[x.dim()] if saved.channels_last else torch.contiguous_format
        compute = torch.float64 if ctx.dtype == torch.float64 else torch.float32
        x = _as_saved(x, weight, layout, ctx.dtype, math.prod(saved.input.shape), compute)
        if not grad_output.is_contiguous(memory_format=layout):
            grad_output = grad_output.contiguous(memory_format=layout)
        c = x.shape[1]
        dx, dx_array = arrays.empty_like(x, saved.channels_last) if need_dx else (None, None)
        if dx is not None and dx.stride() != x.stride() and x.is_contiguous(memory_format=layout):
            # torch's dx has x's strides; ours differ only at size-1 dimensions: the same memory
            # (x is the saved tensor: a saved-tensor hook may have given it another layout)
            dx = dx.as_strided(x.shape, x.stride())
        dweight, dweight_array = arrays.empty_vector(c, x) if need_dweight else (None, None)
        dbias, dbias_array = arrays.empty_vector(c, x) if need_dbias else (None, None)
        with backend.device_guard(x):
            backend.kernels.batch_norm_backward(
                arrays.kernel_array(grad_output, saved.channels_last), saved.input, saved.mean, saved.invstd,
                saved.weight, ctx.training, dx_array, dweight_array, dbias_array,
            )  # fmt: skip
        return dx, dweight, dbias, None, None, None, None, None, None, None


def _as_saved(x, weight, layout, dtype, numel, compute) -> torch.Tensor:
    """x as the forward saved it for the kernels: a saved-tensor hook (``save_on_cpu``,
    ``saved_tensors_hooks``) may give it back in another layout (made the forward's here), or
    another dtype or size than the kernels would read (refused, as the C++ node does)."""
    if not x.is_contiguous(memory_format=layout):
        x = x.contiguous(memory_format=layout)
    if x.dtype != dtype or x.numel() != numel or (weight is not None and weight.dtype != compute):
        raise RuntimeError(
            "fastnorm's BatchNorm backward: a saved tensor came back with another dtype or size than the "
            f"forward saved (a saved-tensor hook?): input {x.dtype} {tuple(x.shape)}, "
            f"weight {None if weight is None else weight.dtype}"
        )
    return x


def _differentiable_backward(training, eps, dy, x, weight, saved_mean, saved_invstd):
    """(dx, dweight, dbias) as differentiable functions of x, weight and dy (double backward).
    saved_mean, saved_invstd: (C,) arrays or tensors, the eval forward's constants."""
    dims = [0, *range(2, x.dim())]
    shape = [1, x.shape[1]] + [1] * (x.dim() - 2)
    storage = x.dtype
    if storage in (torch.bfloat16, torch.float16):  # computed in float32, as the kernels do
        x, dy = x.float(), dy.float()
    if training:  # the statistics are functions of x
        mean = x.mean(dims, keepdim=True)
        invstd = torch.rsqrt(x.var(dims, unbiased=False, keepdim=True) + eps)
    else:  # the eval forward's constants
        mean = torch.as_tensor(saved_mean, device=x.device).view(shape)
        invstd = torch.as_tensor(saved_invstd, device=x.device).view(shape)
    xhat = (x - mean) * invstd
    scale = invstd if weight is None else invstd * weight.view(shape)
    dbias = dy.sum(dims)
    dweight = (dy * xhat).sum(dims)
    if training:
        dx = scale * (dy - dy.mean(dims, keepdim=True) - xhat * (dy * xhat).mean(dims, keepdim=True))
    else:
        dx = scale * dy
    return dx.to(storage), dweight, dbias
