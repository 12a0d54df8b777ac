"""BatchNorm of the Python backends (``reference``, ``cuda``): a ``torch.autograd.Function``.

The numba backend is a C++ op (fastnorm/csrc/batch_norm.cpp); the backends whose kernels are
Python code (the NumPy reference, the oracle; numba-cuda) run behind :class:`BatchNormFunction`,
after :func:`batch_norm_function` checked the arguments as torch does, in torch's words.
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
        if torch.is_grad_enabled() or _batched(grad_output):
            # create_graph=True, or a vmap over the backward (gradcheck's batched gradients,
            # torch.func): differentiable torch operations, which the transforms understand
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


def _batched(t: torch.Tensor) -> bool:
    """Whether ``t`` is a vmap-batched tensor (torch.func's, or autograd's is_grads_batched)."""
    functorch = torch._C._functorch
    return functorch.peek_interpreter_stack() is not None or functorch.is_legacy_batchedtensor(t)


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


# -- the entry point of the Python backends: torch's checks, then the Function ---------------------

_KERNEL_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_HALF = (torch.bfloat16, torch.float16)
_PER_CHANNEL = ("weight", "bias", "running_mean", "running_var")


def batch_norm_function(chosen: Backend, input, running_mean, running_var, weight, bias, training, momentum, eps):
    """:func:`fastnorm.functional.batch_norm` on a Python backend: torch's checks, an empty batch
    and 16-bit parameters as torch has them, then :class:`BatchNormFunction` (or its forward
    alone where no gradient is wanted)."""
    if training:
        size = input.size()
        if input.dim() >= 2 and math.prod(size[:1] + size[2:]) == 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {size}")
    if input.dim() >= 2 and input.numel() == 0:
        # torch: an empty batch gives an empty output (still connected to weight and bias, whose
        # gradients are zeros) and leaves the running statistics alone, whatever the dtypes
        return torch.batch_norm(input, weight, bias, running_mean, running_var, training, momentum, eps, False)
    check_arguments(input, running_mean, running_var, weight, bias, training, eps, chosen.name)
    if input.dtype in _HALF and any(t is not None and t.dtype == input.dtype for t in (weight, bias, running_mean)):
        return _with_float32_parameters(chosen, input, running_mean, running_var, weight, bias, training, momentum,
                                        eps)  # fmt: skip
    return _run(chosen, input, running_mean, running_var, weight, bias, training, momentum, eps)


def _with_float32_parameters(chosen, input, running_mean, running_var, weight, bias, training, momentum, eps):
    """A BatchNorm all in 16 bits (input, weight, bias, running statistics): the kernels keep
    per-channel values in float32, as torch's do. The parameters enter as float32 (``.float()``:
    their gradients come back in their dtype through autograd), the running statistics are
    updated in float32 copies and rounded once into the buffers."""

    def wide(t):
        return None if t is None else t.float()

    mean32, var32 = wide(running_mean), wide(running_var)
    y = _run(chosen, input, mean32, var32, wide(weight), wide(bias), training, momentum, eps)
    if training and running_mean is not None:
        with torch.no_grad():
            running_mean.copy_(mean32)
            running_var.copy_(var32)
    return y


def _run(chosen: Backend, input, running_mean, running_var, weight, bias, training, momentum, eps):
    training = bool(training)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (input, weight, bias)):
        # A strided input is made dense here, where autograd records the copy (second derivatives
        # differentiate the saved tensor, which must lead back to the input), and the input itself
        # is saved too: torch's error if it changes in place before the backward, as torch's own.
        x, _ = _layout(input)
        source = None if x is input else input
        return BatchNormFunction.apply(x, weight, bias, running_mean, running_var, training, momentum, eps, chosen,
                                       source)  # fmt: skip
    # no gradient wanted (inference, torch.no_grad): no autograd node to build
    with chosen.device_guard(input):
        return batch_norm_forward(input, weight, bias, running_mean, running_var, training, momentum, eps, chosen,
                                  False)[0]  # fmt: skip


def check_arguments(input, running_mean, running_var, weight, bias, training, eps, name) -> None:
    """PyTorch's checks, in PyTorch's order and words, plus the kernels' dtype limits (the C++
    op's ``check_arguments``, fastnorm/csrc/batch_norm.cpp, for the Python backends)."""
    if input.dim() < 2:
        raise ValueError(
            f"batch_norm expects an input of shape (N, C) or (N, C, *spatial), "
            f"got a {input.dim()}-D input of shape {tuple(input.shape)}"
        )
    if training and eps <= 0.0:
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    if eps < 0.0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")
    if not training:
        if running_mean is None:
            raise RuntimeError("running_mean must be defined in evaluation mode")
        if running_var is None:
            raise RuntimeError("running_var must be defined in evaluation mode")
    elif (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must either both be None or neither be None")
    check_tensors(input, weight, bias, running_mean, running_var, name)


def check_tensors(input, weight, bias, running_mean, running_var, name) -> None:
    """Sizes, dtypes and devices of the per-channel tensors against the input's (torch's words)."""
    channels = input.shape[1]
    dtype = input.dtype
    if dtype not in _KERNEL_DTYPES:
        raise NotImplementedError(
            f"fastnorm's {name!r} backend computes batch_norm in float32, float64, bfloat16 or float16, but "
            f"the input is {dtype}; convert it, or use backend='torch' for other dtypes"
        )
    # torch's mixed case: a 16-bit input with float32 weight, bias and running statistics
    mixed = dtype in _HALF and any(
        t is not None and t.dtype != dtype for t in (weight, bias, running_mean, running_var)
    )
    device = input.device
    for what, t in zip(_PER_CHANNEL, (weight, bias, running_mean, running_var)):
        if t is None:
            continue
        if t.numel() != channels:
            raise RuntimeError(f"{what} should contain {channels} elements not {t.numel()}")
        if mixed:
            if t.dtype != torch.float32:
                raise RuntimeError("mixed dtype (CPU): expect parameter to have scalar type of Float")
        elif t.dtype != dtype:
            raise RuntimeError(
                f"mixed dtype: all inputs must share same datatype, but input is {dtype} and {what} is {t.dtype}"
            )
        if t.device != device:
            raise RuntimeError(
                "Expected all tensors to be on the same device, but found at least two devices, "
                f"{device} (input) and {t.device} ({what})!"
            )


# -- LayerNorm and RMSNorm on the Python backends ----------------------------------------------
# The numba backend is a C++ op (fastnorm/csrc/layer_norm.cpp); the reference kernels run behind
# RowNormFunction, after fastnorm.functional checked that they take the call (else torch's op).


def _row_view(backend: Backend, t: torch.Tensor, d: int) -> np.ndarray:
    """A contiguous tensor as the kernels' (M, D) array."""
    return backend.as_array(t).reshape(-1, d)


def _differentiable_row_backward(dims, center, eps, dy, x, weight):
    """(dx, dweight, dbias) as differentiable torch functions of dy, x and weight (double
    backward), the statistics recomputed from x in the compute dtype (as the C++ node does)."""
    inner = tuple(range(x.dim() - dims, x.dim()))
    outer = tuple(range(x.dim() - dims))
    storage = x.dtype
    if storage in (torch.bfloat16, torch.float16):
        x, dy = x.float(), dy.float()
    xc = x - x.mean(inner, keepdim=True) if center else x
    rstd = torch.rsqrt((xc * xc).mean(inner, keepdim=True) + eps)
    xhat = xc * rstd
    g = dy * weight if weight is not None else dy
    dx = g - xhat * (g * xhat).mean(inner, keepdim=True)
    if center:
        dx = dx - g.mean(inner, keepdim=True)
    dx = rstd * dx
    dweight = (dy * xhat).sum(outer) if outer else dy * xhat
    dbias = dy.sum(outer) if outer else dy
    return dx.to(storage), dweight, dbias


class RowNormFunction(torch.autograd.Function):
    """LayerNorm (``center``) or RMSNorm over the last ``dims`` dims, on a Python backend's
    kernels; weight and bias in the compute dtype (float32 for a 16-bit input), of the
    normalized shape. Returns y (contiguous, the input's dtype)."""

    @staticmethod
    def forward(ctx, input, weight, bias, dims, eps, center, backend):
        x = input.contiguous()
        d = math.prod(x.shape[x.dim() - dims :])
        m = x.numel() // d
        compute = torch.float64 if x.dtype == torch.float64 else torch.float32
        y = torch.empty_like(x, memory_format=torch.contiguous_format)
        rstd = torch.empty(m, dtype=compute, device=x.device)
        as_array = backend.as_array
        w = None if weight is None else as_array(weight.contiguous()).reshape(d)
        with backend.device_guard(x):
            if center:
                mean = torch.empty(m, dtype=compute, device=x.device)
                b = None if bias is None else as_array(bias.contiguous()).reshape(d)
                backend.kernels.layer_norm_forward(_row_view(backend, x, d), w, b, float(eps), _row_view(backend, y, d),
                                                   as_array(mean), as_array(rstd))  # fmt: skip
            else:
                mean = torch.empty(0, dtype=compute, device=x.device)
                backend.kernels.rms_norm_forward(_row_view(backend, x, d), w, float(eps), _row_view(backend, y, d),
                                                 as_array(rstd))  # fmt: skip
        if not center and not ctx.needs_input_grad[0]:
            # torch's RMSNorm (a composite) saves only the normalized input when the input does not
            # require grad: in-place edits of input or weight are no error, the forward's values count
            ctx.save_for_backward(input.clone(), None, mean, rstd)
        else:
            ctx.save_for_backward(input, weight, mean, rstd)  # input itself: torch's in-place check sees edits
        ctx.meta = (dims, eps, center, backend, x.dtype, x.numel())
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, mean, rstd = ctx.saved_tensors
        dims, eps, center, backend, dtype, numel = ctx.meta
        if x.dtype != dtype or x.numel() != numel:
            raise RuntimeError(
                "fastnorm's LayerNorm/RMSNorm backward: a saved tensor came back with another dtype or size than "
                f"the forward saved (a saved-tensor hook?): input {x.dtype} {tuple(x.shape)}"
            )
        need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
        if torch.is_grad_enabled() or _batched(dy):  # create_graph=True, or vmap over the backward
            dx, dw, db = _differentiable_row_backward(dims, center, eps, dy, x, weight)
            return (dx if need_dx else None, dw if need_dw else None, db if need_db else None, None, None, None, None)
        x = x.contiguous()
        dy = dy.contiguous()
        d = math.prod(x.shape[x.dim() - dims :])
        compute = rstd.dtype
        normalized = x.shape[x.dim() - dims :]
        dx = torch.empty_like(x, memory_format=torch.contiguous_format) if need_dx else None
        dw = torch.empty(normalized, dtype=compute, device=x.device) if need_dw else None
        db = torch.empty(normalized, dtype=compute, device=x.device) if need_db and center else None
        as_array = backend.as_array
        w = None if weight is None else as_array(weight.contiguous()).reshape(d)
        dx_a = None if dx is None else _row_view(backend, dx, d)
        dw_a = None if dw is None else as_array(dw).reshape(d)
        with backend.device_guard(x):
            if center:
                db_a = None if db is None else as_array(db).reshape(d)
                backend.kernels.layer_norm_backward(_row_view(backend, dy, d), _row_view(backend, x, d),
                                                    as_array(mean), as_array(rstd), w, dx_a, dw_a, db_a)  # fmt: skip
            else:
                backend.kernels.rms_norm_backward(_row_view(backend, dy, d), _row_view(backend, x, d),
                                                  as_array(rstd), w, dx_a, dw_a)  # fmt: skip
        return dx, dw, db, None, None, None, None


# -- GroupNorm on the Python backends ----------------------------------------------------------


def _differentiable_group_backward(groups, eps, dy, x, weight):
    """(dx, dweight, dbias) as differentiable torch functions of dy, x and weight (double backward)."""
    storage = x.dtype
    if storage in (torch.bfloat16, torch.float16):
        x, dy = x.float(), dy.float()
    grouped = (x.shape[0], groups, -1)
    xg = x.reshape(grouped)
    xc = xg - xg.mean(2, keepdim=True)
    rstd = torch.rsqrt((xc * xc).mean(2, keepdim=True) + eps)
    xhat = (xc * rstd).reshape(x.shape)
    channel = (1, x.shape[1]) + (1,) * (x.dim() - 2)
    g = dy * weight.reshape(channel) if weight is not None else dy
    gr, xr = g.reshape(grouped), xhat.reshape(grouped)
    dx = (rstd * (gr - gr.mean(2, keepdim=True) - xr * (gr * xr).mean(2, keepdim=True))).reshape(x.shape)
    dims = (0, *range(2, x.dim()))
    return dx.to(storage), (dy * xhat).sum(dims), dy.sum(dims)


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    fmt = _CHANNELS_LAST.get(x.dim())
    if fmt is not None and not x.is_contiguous() and x.is_contiguous(memory_format=fmt):
        return fmt
    return torch.contiguous_format


class GroupNormFunction(torch.autograd.Function):
    """GroupNorm of an (N, C, *) input on a Python backend's kernels (weight and bias (C,) in the
    compute dtype); the output keeps the input's memory format (contiguous or channels-last)."""

    @staticmethod
    def forward(ctx, input, weight, bias, groups, eps, backend):
        fmt = _memory_format(input)
        x = input.contiguous()
        n, c = x.shape[:2]
        compute = torch.float64 if x.dtype == torch.float64 else torch.float32
        y = torch.empty_like(x, memory_format=torch.contiguous_format)
        mean = torch.empty(n * groups, dtype=compute, device=x.device)
        rstd = torch.empty(n * groups, dtype=compute, device=x.device)
        as_array = backend.as_array
        with backend.device_guard(x):
            backend.kernels.group_norm_forward(
                as_array(x).reshape(n, c, -1), None if weight is None else as_array(weight.contiguous()),
                None if bias is None else as_array(bias.contiguous()), groups, float(eps),
                as_array(y).reshape(n, c, -1), as_array(mean), as_array(rstd),
            )  # fmt: skip
        ctx.save_for_backward(input, weight, mean, rstd)
        ctx.meta = (groups, eps, backend, x.dtype, x.numel())
        return y.contiguous(memory_format=fmt)

    @staticmethod
    def backward(ctx, dy):
        x, weight, mean, rstd = ctx.saved_tensors
        groups, eps, backend, dtype, numel = ctx.meta
        if x.dtype != dtype or x.numel() != numel:
            raise RuntimeError(
                "fastnorm's GroupNorm backward: a saved tensor came back with another dtype or size than the "
                f"forward saved (a saved-tensor hook?): input {x.dtype} {tuple(x.shape)}"
            )
        need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
        if torch.is_grad_enabled() or _batched(dy):
            dx, dw, db = _differentiable_group_backward(groups, eps, dy, x, weight)
            return dx if need_dx else None, dw if need_dw else None, db if need_db else None, None, None, None
        fmt = _memory_format(x)
        x, dy = x.contiguous(), dy.contiguous()
        n, c = x.shape[:2]
        dx = torch.empty_like(x, memory_format=torch.contiguous_format) if need_dx else None
        dw = torch.empty(c, dtype=rstd.dtype, device=x.device) if need_dw else None
        db = torch.empty(c, dtype=rstd.dtype, device=x.device) if need_db else None
        as_array = backend.as_array
        with backend.device_guard(x):
            backend.kernels.group_norm_backward(
                as_array(dy).reshape(n, c, -1), as_array(x).reshape(n, c, -1), as_array(mean), as_array(rstd),
                None if weight is None else as_array(weight.contiguous()), groups,
                None if dx is None else as_array(dx).reshape(n, c, -1), None if dw is None else as_array(dw),
                None if db is None else as_array(db),
            )  # fmt: skip
        return None if dx is None else dx.contiguous(memory_format=fmt), dw, db, None, None, None
