"""Functional forms, with the signatures and semantics of ``torch.nn.functional``."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import _address_autograd, _native
from ._dispatch import Backend, batch_norm_kind, resolve
from .autograd import BatchNormFunction, _layout, batch_norm_forward

__all__ = ["batch_norm"]

_KERNEL_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_HALF = (torch.bfloat16, torch.float16)
_PER_CHANNEL = ("weight", "bias", "running_mean", "running_var")


def batch_norm(
    input: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    r"""Batch Normalization per channel, as :func:`torch.nn.functional.batch_norm`.

    .. math::
        y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \cdot \gamma + \beta

    In training the mean and the biased variance are those of the batch, over every axis but
    the channel axis 1, and the running statistics (when given) are updated in place:
    ``running = (1 - momentum) * running + momentum * stat``, with the unbiased variance for
    ``running_var``. In eval the running statistics normalise.

    Args:
        input: ``(N, C)`` or ``(N, C, *spatial)``, float32, float64, bfloat16 or float16 for
            fastnorm's kernels (any dtype torch supports with ``backend="torch"``). A 16-bit
            input takes float32 per-channel tensors (torch's mixed case, what autocast gives)
            or 16-bit ones; the output has the input's dtype.
        running_mean, running_var: ``(C,)`` buffers, or None (training only).
        weight, bias: ``(C,)`` affine parameters (gamma, beta), or None.
        training: use and return batch statistics, and update the running ones.
        momentum: factor of the running-statistics update (PyTorch's convention:
            weight of the new value).
        eps: added to the variance for numerical stability.
        backend: ``"auto"``, ``"reference"``, ``"numba"``, ``"cuda"`` or ``"torch"``.

    Shape:
        input and output: ``(N, C, *)``.

    Example:
        >>> x = torch.randn(64, 256)
        >>> rm, rv = torch.zeros(256), torch.ones(256)
        >>> y = batch_norm(x, rm, rv, training=True, backend="reference")
    """
    if torch.compiler.is_compiling():
        # torch.compile: the registered ops, opaque nodes to the compiler (fastnorm/_compiled.py)
        from . import _compiled

        name = _compiled.backend_name(backend, input)
        if name == "torch":
            return F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
        _check_arguments(input, running_mean, running_var, weight, bias, training, eps, name)
        return _compiled.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps, name)

    if backend == "auto":  # the size, layout and dtype decide (_dispatch.AUTO_CPU_MIN_NUMEL)
        chosen = resolve(backend, "batch_norm", input.device, input.numel(), batch_norm_kind(input), input.dtype)
    else:
        chosen = resolve(backend, "batch_norm", input.device, dtype=getattr(input, "dtype", None))
    return batch_norm_with(chosen, input, running_mean, running_var, weight, bias, training, momentum, eps)


def batch_norm_with(chosen: Backend, input, running_mean, running_var, weight, bias, training, momentum, eps):
    """:func:`batch_norm` on a resolved backend (eager: the modules resolve it themselves)."""
    if chosen.is_torch:
        return F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
    _check_arguments(input, running_mean, running_var, weight, bias, training, eps, chosen.name)
    if input.dtype in _HALF and any(t is not None and t.dtype == input.dtype for t in (weight, bias, running_mean)):
        return _with_float32_parameters(chosen, input, running_mean, running_var, weight, bias, training, momentum, eps)
    return _kernels_path(chosen, input, running_mean, running_var, weight, bias, training, momentum, eps)


def _with_float32_parameters(chosen, input, running_mean, running_var, weight, bias, training, momentum, eps):
    """A BatchNorm all in 16 bits (input, weight, bias, running statistics): the kernels keep
    per-channel values in float32, as torch's do. The parameters enter as float32 (``.float()``:
    their gradients come back in their dtype through autograd), the running statistics are
    updated in float32 copies and rounded once into the buffers."""

    def wide(t):
        return None if t is None else t.float()

    mean32, var32 = wide(running_mean), wide(running_var)
    y = _kernels_path(chosen, input, mean32, var32, wide(weight), wide(bias), training, momentum, eps)
    if training and running_mean is not None:
        with torch.no_grad():
            running_mean.copy_(mean32)
            running_var.copy_(var32)
    return y


def _kernels_path(chosen: Backend, input, running_mean, running_var, weight, bias, training, momentum, eps):
    if input.numel() == 0:
        # PyTorch: an empty batch gives an empty output (still connected to weight and bias,
        # whose gradients are zeros) and leaves the running statistics alone.
        out = input.clone()
        if weight is not None and weight.numel() > 0:
            out = out * weight[0]
        if bias is not None and bias.numel() > 0:
            out = out + bias[0]
        return out
    training = bool(training)
    lean = _address_autograd.usable(chosen)  # the lean CPU path (fastnorm/_address_autograd.py)
    if torch.is_grad_enabled() and (
        input.requires_grad
        or (weight is not None and weight.requires_grad)
        or (bias is not None and bias.requires_grad)
    ):
        # A strided input is made dense here, where autograd records the copy (second derivatives
        # differentiate the saved tensor, which must lead back to the input), and the input itself
        # is saved too: torch's error if it changes in place before the backward, as torch's own.
        x, channels_last = _layout(input)
        source = None if x is input else input
        if lean and training and _native.ENABLED and _native.extension() is not None:
            # the C++ autograd node (fastnorm/_native.py): no Python between module and kernels
            return _address_autograd.train_native(x, channels_last, source, weight, bias, running_mean, running_var,
                                                  momentum, eps, chosen)  # fmt: skip
        function = _address_autograd.AddressBatchNormFunction if lean else BatchNormFunction
        return function.apply(x, weight, bias, running_mean, running_var, training, momentum, eps, chosen, source)
    # no gradient wanted (inference, torch.no_grad): no autograd node to build
    if lean:
        if _native.ENABLED and _native.extension() is not None:  # one call into C++ (fastnorm/_native.py)
            return _address_autograd.forward_native(input, weight, bias, running_mean, running_var, training,
                                                    momentum, eps, chosen)  # fmt: skip
        return _address_autograd.forward(input, weight, bias, running_mean, running_var, training, momentum, eps,
                                         chosen)[0]  # fmt: skip
    return batch_norm_forward(input, weight, bias, running_mean, running_var, training, momentum, eps, chosen,
                              False)[0]  # fmt: skip


def _check_arguments(input, running_mean, running_var, weight, bias, training, eps, name) -> None:
    """PyTorch's checks, in PyTorch's order and words, plus the kernels' dtype limits."""
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"batch_norm(): input must be a Tensor, not {type(input).__name__}")
    if input.dim() < 2:
        raise ValueError(
            f"batch_norm expects an input of shape (N, C) or (N, C, *spatial), "
            f"got a {input.dim()}-D input of shape {tuple(input.shape)}"
        )
    if training:
        size = input.size()
        if math.prod(size[:1] + size[2:]) == 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {size}")
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


class UnsupportedDtypeError(TypeError, NotImplementedError):
    """A dtype fastnorm's kernels do not compute in. A TypeError, and a NotImplementedError as
    torch's own "batch_norm not implemented for 'Long'" is, so that code catching either works."""


def check_tensors(input, weight, bias, running_mean, running_var, name) -> None:
    """Sizes, dtypes and devices of the per-channel tensors against the input's (torch's words)."""
    channels = input.shape[1]
    dtype = input.dtype
    if dtype not in _KERNEL_DTYPES:
        raise UnsupportedDtypeError(
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
