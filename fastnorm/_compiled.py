"""BatchNorm as ``torch.library`` custom ops, for code that ``torch.compile`` traces.

The compiler cannot trace into the kernels (NumPy arrays, Numba dispatchers): registered ops are
single opaque nodes to it, with fake (meta) implementations for shapes and a registered autograd
formula. Eagerly, dispatching through a registered op costs ~60 µs more per forward+backward
than fastnorm's autograd.Function (../shared/NUMBA-NOTES.md), so :func:`fastnorm.functional.batch_norm`
routes here only while compiling (``torch.compiler.is_compiling()``).

``fastnorm::batch_norm`` is functional (a mutating op cannot take ``register_autograd``): it
returns the output, the mean and 1/sqrt(var + eps) the output was normalised with (saved for the
backward) and, in training, the batch mean and unbiased variance, with which the caller updates
the running statistics by torch ops the compiler sees. ``fastnorm::batch_norm_backward`` is the
backward kernel. Both run the same kernels as the eager path.
"""

import torch
import torch.nn.functional as F

from . import _dispatch
from ._dispatch import resolve
from .autograd import _CHANNELS_LAST, _differentiable_backward, batch_norm_forward


def _compute(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the per-channel values for input ``dtype``: float32 for 16-bit inputs."""
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


def _channels_last(x: torch.Tensor) -> bool:
    fmt = _CHANNELS_LAST.get(x.dim())
    return fmt is not None and not x.is_contiguous() and x.is_contiguous(memory_format=fmt)


def _like(x: torch.Tensor) -> torch.Tensor:
    fmt = _CHANNELS_LAST[x.dim()] if _channels_last(x) else torch.contiguous_format
    return torch.empty_like(x, memory_format=fmt)


def _as_tensor(array, like: torch.Tensor) -> torch.Tensor:
    """A (C,) tensor of a kernel output (a NumPy array on CPU, a DeviceView on GPU)."""
    if isinstance(array, torch.Tensor):
        return array
    if like.device.type == "cpu":
        return torch.from_numpy(array)
    return torch.as_tensor(array, device=like.device)


@torch.library.custom_op("fastnorm::batch_norm", mutates_args=())
def batch_norm_op(
    input: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    training: bool,
    eps: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, mean, invstd, batch_mean, batch_var_unbiased); the running statistics are only read."""
    chosen = resolve(backend, "batch_norm", input.device)
    c = input.shape[1]
    if training:
        # the kernel's running-statistics update with zeros and momentum 1 writes the batch mean
        # and unbiased variance themselves, computed as the eager path computes them
        batch_mean = torch.zeros(c, dtype=_compute(input.dtype), device=input.device)
        batch_var = torch.zeros(c, dtype=_compute(input.dtype), device=input.device)
        with chosen.device_guard(input):
            y, _, saved = batch_norm_forward(input, weight, bias, batch_mean, batch_var, True, 1.0, eps, chosen, True)
    else:
        with chosen.device_guard(input):
            y, _, saved = batch_norm_forward(
                input, weight, bias, running_mean, running_var, False, 0.0, eps, chosen, True
            )
        batch_mean = torch.empty(0, dtype=_compute(input.dtype), device=input.device)
        batch_var = torch.empty(0, dtype=_compute(input.dtype), device=input.device)
    mean, invstd = _as_tensor(saved.mean, input).clone(), _as_tensor(saved.invstd, input).clone()
    return y, mean, invstd, batch_mean, batch_var


@batch_norm_op.register_fake
def _(input, weight, bias, running_mean, running_var, training, eps, backend):
    c, compute = input.shape[1], _compute(input.dtype)
    stat = input.new_empty(c, dtype=compute)
    batch = input.new_empty(c if training else 0, dtype=compute)
    return (
        _like(input),
        stat,
        input.new_empty(c, dtype=compute),
        batch,
        input.new_empty(c if training else 0, dtype=compute),
    )


@torch.library.custom_op("fastnorm::batch_norm_backward", mutates_args=())
def batch_norm_backward_op(
    grad_output: torch.Tensor,
    input: torch.Tensor,
    weight: torch.Tensor | None,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    training: bool,
    backend: str,
    need_input_grad: bool,
    need_weight_grad: bool,
    need_bias_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dweight, dbias); an empty tensor where not needed."""
    chosen = resolve(backend, "batch_norm", input.device)
    arrays = chosen.arrays
    channels_last = _channels_last(input)
    layout = _CHANNELS_LAST[input.dim()] if channels_last else torch.contiguous_format
    x = input if input.is_contiguous(memory_format=layout) else input.contiguous(memory_format=layout)
    dy = grad_output.contiguous(memory_format=layout)
    c = x.shape[1]
    dx, dx_array = arrays.empty_like(x, channels_last) if need_input_grad else (x.new_empty(0), None)
    dw, dw_array = arrays.empty_vector(c, x) if need_weight_grad else (x.new_empty(0), None)  # outputs never alias
    db, db_array = arrays.empty_vector(c, x) if need_bias_grad else (x.new_empty(0), None)
    w = None if weight is None else arrays.view(weight.contiguous())
    with chosen.device_guard(x):
        chosen.kernels.batch_norm_backward(
            arrays.kernel_array(dy, channels_last), arrays.kernel_array(x, channels_last), arrays.view(mean),
            arrays.view(invstd), w, training, dx_array, dw_array, db_array,
        )  # fmt: skip
    return dx, dw.clone() if dw.numel() else dw, db.clone() if db.numel() else db


@batch_norm_backward_op.register_fake
def _(grad_output, input, weight, mean, invstd, training, backend, need_input_grad, need_weight_grad, need_bias_grad):
    c, compute = input.shape[1], _compute(input.dtype)
    return (
        _like(input) if need_input_grad else input.new_empty(0),
        input.new_empty(c, dtype=compute) if need_weight_grad else input.new_empty(0),
        input.new_empty(c, dtype=compute) if need_bias_grad else input.new_empty(0),
    )


def _setup_context(ctx, inputs, output):
    input, weight, bias, _, _, training, eps, backend = inputs
    _, mean, invstd, batch_mean, batch_var = output
    ctx.mark_non_differentiable(mean, invstd, batch_mean, batch_var)
    ctx.save_for_backward(input, weight, mean, invstd)
    ctx.training, ctx.eps, ctx.backend = training, eps, backend
    ctx.has_bias = bias is not None


def _backward(ctx, grad_y, _grad_mean, _grad_invstd, _grad_batch_mean, _grad_batch_var):
    input, weight, mean, invstd = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    if torch.is_grad_enabled():  # create_graph=True: differentiable torch ops, torch's second derivatives
        dx, dw, db = _differentiable_backward(ctx.training, ctx.eps, grad_y, input, weight, mean, invstd)
        return (dx if need_x else None, dw if need_w else None, db if need_b else None, *[None] * 5)
    dx, dw, db = batch_norm_backward_op(
        grad_y, input, weight, mean, invstd, ctx.training, ctx.backend, need_x, need_w and weight is not None,
        need_b and ctx.has_bias,
    )  # fmt: skip
    return (dx if need_x else None, dw if need_w else None, db if need_b else None, None, None, None, None, None)


torch.library.register_autograd("fastnorm::batch_norm", _backward, setup_context=_setup_context)


@torch.compiler.assume_constant_result
def _backend_for_small(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    return _dispatch._resolve(backend, "batch_norm", device, True, dtype).name


@torch.compiler.assume_constant_result
def _backend_for_large(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    return _dispatch._resolve(backend, "batch_norm", device, False, dtype).name


def backend_name(backend: str, input: torch.Tensor) -> str:
    """The backend ``backend`` resolves to for ``input``, a constant of the traced graph: the
    compiler calls the resolution (which may import a kernels package, which it cannot trace)
    instead of tracing it. Under dynamic shapes the size enters only as a guard on "auto"'s
    threshold (the branch taken)."""
    if _dispatch.auto_prefers_torch(_dispatch.batch_norm_kind(input), input.numel()):
        return _backend_for_small(backend, input.device, input.dtype)
    return _backend_for_large(backend, input.device, input.dtype)


def batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps, backend: str):
    """The compiled path of :func:`fastnorm.functional.batch_norm` (arguments already checked)."""
    if input.numel() == 0:
        return F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
    half = input.dtype in (torch.bfloat16, torch.float16)
    if half and any(t is not None and t.dtype == input.dtype for t in (weight, bias, running_mean)):
        # all in 16 bits: float32 per-channel values, as in the eager path (functional.py)
        weight = None if weight is None else weight.float()
        bias = None if bias is None else bias.float()
        if not training:
            running_mean, running_var = running_mean.float(), running_var.float()
    y, _, _, batch_mean, batch_var = batch_norm_op(
        input, weight, bias, running_mean if not training else None, running_var if not training else None,
        bool(training), float(eps), backend,
    )  # fmt: skip
    if training and running_mean is not None:
        with torch.no_grad():
            if running_mean.dtype == batch_mean.dtype:
                running_mean.mul_(1.0 - momentum).add_(batch_mean, alpha=momentum)
                running_var.mul_(1.0 - momentum).add_(batch_var, alpha=momentum)
            else:  # 16-bit buffers: updated in float32, rounded once
                running_mean.copy_(running_mean.float() * (1.0 - momentum) + batch_mean * momentum)
                running_var.copy_(running_var.float() * (1.0 - momentum) + batch_var * momentum)
    return y
