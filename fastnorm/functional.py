"""Functional forms, with the signatures and semantics of ``torch.nn.functional``.

One dispatch per call (:func:`batch_norm_as`, :func:`layer_norm_as`, :func:`rms_norm_as`), by backend:

* ``numba``: ``torch.ops.fastnorm.batch_norm`` (``layer_norm``, ``rms_norm``), the C++ ops (fastnorm/csrc) that
  every layer of torch sees and calls: eager code, ``torch.compile``, TorchScript, ``jit.trace``,
  ``torch.export``, fx;
* ``cuda`` on CUDA tensors: the same C++ ops, whose CUDA kernels launch the numba-cuda kernels
  from C++ (fastnorm/csrc/batch_norm_cuda.cpp, row_norm_cuda.cpp; where the C++ ops cannot
  launch, as without a CUDA driver or with ``FASTNORM_CUDA_OPS=0``, the Python path below);
* ``reference`` and ``cuda``: their kernels behind a Python ``torch.autograd.Function``
  (fastnorm/autograd.py) in eager code;
* ``torch``: ``torch.nn.functional.batch_norm``.

torch's own op also serves, with the same semantics, where fastnorm's has no rule: under
``torch.func`` transforms (vmap, grad, jvp, ...) and for forward-mode AD dual tensors; and, for the
Python backends (reference, cuda), while ``torch.compile``, ``jit.trace`` or TorchScript trace a
model (NumPy and Numba-CUDA calls cannot be traced into a graph).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd import forward_ad

from . import _dispatch, _ops
from .autograd import GroupNormFunction, RowNormFunction, batch_norm_function

__all__ = ["batch_norm", "layer_norm", "rms_norm", "group_norm"]

_HALF = (torch.bfloat16, torch.float16)


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
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"batch_norm(): input must be a Tensor, not {type(input).__name__}")
    name = backend_for(backend, input)
    return batch_norm_as(name, input, running_mean, running_var, weight, bias, training, momentum, eps,
                         cpp_cuda=_dispatch.cpp_cuda_allowed(backend))  # fmt: skip


def layer_norm(
    input: torch.Tensor,
    normalized_shape: list[int],
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    r"""Layer Normalization over the last dims, as :func:`torch.nn.functional.layer_norm`.

    .. math::
        y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \cdot \gamma + \beta

    Mean and biased variance are those of each row: the input's last ``len(normalized_shape)``
    dims, which must equal ``normalized_shape``.

    Args:
        input: ``(*, *normalized_shape)``; float32, float64, bfloat16 or float16 for fastnorm's
            kernels (a 16-bit input takes 16-bit or float32 weight and bias, torch's mixed case);
            anything else runs torch's op (its values, its errors).
        normalized_shape: the sizes of the normalised trailing dims.
        weight, bias: ``normalized_shape`` affine parameters (gamma, beta), or None.
        eps: added to the variance.
        backend: ``"auto"``, ``"reference"``, ``"numba"``, ``"cuda"`` or ``"torch"`` (``"auto"`` on a
            GPU: torch's, until the cuda kernels are timed there).

    Shape:
        input and output: ``(*, *normalized_shape)`` (the output contiguous, as torch's).

    Example:
        >>> x = torch.randn(8, 16, 768)
        >>> y = layer_norm(x, [768], backend="reference")
    """
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"layer_norm(): input must be a Tensor, not {type(input).__name__}")
    name = _row_backend_for(backend, "layer_norm", input)
    return layer_norm_as(name, input, normalized_shape, weight, bias, eps)


def rms_norm(
    input: torch.Tensor,
    normalized_shape: list[int],
    weight: torch.Tensor | None = None,
    eps: float | None = None,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    r"""Root Mean Square Normalization over the last dims, as :func:`torch.nn.functional.rms_norm`.

    .. math:: y = \frac{x}{\sqrt{\mathrm{E}[x^2] + \epsilon}} \cdot \gamma

    Args:
        input: ``(*, *normalized_shape)``; dtypes as :func:`layer_norm`.
        normalized_shape: the sizes of the normalised trailing dims.
        weight: ``normalized_shape`` scale, or None.
        eps: added to the mean square; None: torch's default, the machine epsilon of the compute
            dtype (``torch.finfo(torch.float32).eps`` for 16-bit inputs).
        backend: ``"auto"``, ``"reference"``, ``"numba"``, ``"cuda"`` or ``"torch"`` (``"auto"`` on a
            GPU: torch's, until the cuda kernels are timed there).

    Shape:
        input and output: ``(*, *normalized_shape)``.

    Example:
        >>> y = rms_norm(torch.randn(8, 16, 768), [768], backend="reference")
    """
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"rms_norm(): input must be a Tensor, not {type(input).__name__}")
    name = _row_backend_for(backend, "rms_norm", input)
    return rms_norm_as(name, input, normalized_shape, weight, eps)


def _row_backend_for(backend: str, op: str, input: torch.Tensor) -> str:
    """The backend of a LayerNorm / RMSNorm / GroupNorm call (as :func:`backend_for`)."""
    if torch.compiler.is_compiling():
        if _dispatch.auto_prefers_torch(op, input.numel(), input.device.type):
            return _compiled_row_choice(backend, op, input.device, input.dtype, True)
        return _compiled_row_choice(backend, op, input.device, input.dtype, False)
    return _dispatch.resolve(backend, op, input.device, input.numel(), dtype=input.dtype).name


@torch.compiler.assume_constant_result
def _compiled_row_choice(backend: str, op: str, device: torch.device, dtype: torch.dtype, small: bool) -> str:
    return _dispatch._resolve(backend, op, device, small, dtype).name


def _kernels_take(input, normalized_shape, weight, bias, device_type: str = "cpu") -> bool:
    """Whether fastnorm's row-norm kernels take this call as it is (the C++ ops' ``kernels_take``):
    a shape torch accepts, an input on the kernels' ``device_type`` of a kernel dtype, parameters
    on its device of its dtype or float32 for a 16-bit input. Otherwise torch's op runs: its
    values and its errors."""
    shape = tuple(normalized_shape)
    dims = len(shape)
    if dims == 0 or input.dim() < dims or tuple(input.shape[input.dim() - dims :]) != shape:
        return False
    if input.device.type != device_type or input.dtype not in _ROW_DTYPES or input.numel() == 0:
        return False
    for t in (weight, bias):
        if t is None:
            continue
        if tuple(t.shape) != shape or t.device != input.device:
            return False
        if t.dtype != input.dtype and not (input.dtype in _HALF and t.dtype == torch.float32):
            return False
    return True


_ROW_DTYPES = (torch.float32, torch.float64, *_HALF)


def _wide(t: torch.Tensor | None) -> torch.Tensor | None:
    return t.float() if t is not None and t.dtype in _HALF else t


def _cuda_op(name: str, input: torch.Tensor, cpp_cuda: bool = True) -> bool:
    """Whether the cuda backend runs this call through the C++ ops (CUDA tensors, the C++ ops
    launch the cuda kernels here: fastnorm._ops.cuda_available, and ``cpp_cuda``: the caller's
    ``backend=`` allows them, fastnorm._dispatch.cpp_cuda_allowed)."""
    return name == "cuda" and cpp_cuda and input.is_cuda and _ops.cuda_available()


def layer_norm_as(name: str, input, normalized_shape, weight, bias, eps):
    """:func:`layer_norm` on the backend ``name`` (resolved: not "auto")."""
    if name == "numba" or _cuda_op(name, input):
        if torch.compiler.is_compiling() or not torch_semantics_only(input, weight, bias):
            return torch.ops.fastnorm.layer_norm.default(input, list(normalized_shape), weight, bias, float(eps))
    elif name != "torch" and not _tracing() and not torch_semantics_only(input, weight, bias):
        chosen = _dispatch.resolve(name, "layer_norm", input.device)
        if _kernels_take(input, normalized_shape, weight, bias, chosen.device_type):
            return RowNormFunction.apply(input, _wide(weight), _wide(bias), len(normalized_shape), float(eps), True,
                                         chosen)  # fmt: skip
    return F.layer_norm(input, normalized_shape, weight, bias, eps)


def rms_norm_as(name: str, input, normalized_shape, weight, eps):
    """:func:`rms_norm` on the backend ``name`` (resolved: not "auto")."""
    if name == "numba" or _cuda_op(name, input):
        if torch.compiler.is_compiling() or not torch_semantics_only(input, weight):
            return torch.ops.fastnorm.rms_norm.default(input, list(normalized_shape), weight,
                                                       None if eps is None else float(eps))  # fmt: skip
    elif name != "torch" and not _tracing() and not torch_semantics_only(input, weight):
        chosen = _dispatch.resolve(name, "rms_norm", input.device)
        if _kernels_take(input, normalized_shape, weight, None, chosen.device_type):
            if eps is None:  # torch's default: the compute dtype's machine epsilon
                eps = torch.finfo(torch.float64 if input.dtype == torch.float64 else torch.float32).eps
            return RowNormFunction.apply(input, _wide(weight), None, len(normalized_shape), float(eps), False, chosen)
    return F.rms_norm(input, normalized_shape, weight, eps)


def group_norm(
    input: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    r"""Group Normalization, as :func:`torch.nn.functional.group_norm`.

    .. math::
        y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \cdot \gamma_c + \beta_c

    The C channels are split into ``num_groups`` groups of consecutive channels; mean and biased
    variance are those of each (sample, group), over its channels and spatial positions.

    Args:
        input: ``(N, C, *)``, C divisible by ``num_groups``; contiguous or channels-last (the
            output keeps the layout); dtypes as :func:`layer_norm`.
        num_groups: the number of groups.
        weight, bias: ``(C,)`` per-channel affine parameters, or None.
        eps: added to the variance.
        backend: ``"auto"``, ``"reference"``, ``"numba"``, ``"cuda"`` or ``"torch"`` (``"auto"`` on a
            GPU: torch's, until the cuda kernels are timed there).

    Shape:
        input and output: ``(N, C, *)``.

    Example:
        >>> y = group_norm(torch.randn(8, 64, 28, 28), 32, backend="reference")
    """
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"group_norm(): input must be a Tensor, not {type(input).__name__}")
    name = _row_backend_for(backend, "group_norm", input)
    return group_norm_as(name, input, num_groups, weight, bias, eps)


def _group_kernels_take(input, num_groups, weight, bias, device_type: str = "cpu") -> bool:
    """Whether fastnorm's GroupNorm kernels take this call as it is (the C++ op's ``kernels_take``)."""
    if input.dim() < 2 or not isinstance(num_groups, int) or num_groups <= 0 or input.shape[1] % num_groups:
        return False
    if input.device.type != device_type or input.dtype not in _ROW_DTYPES or input.numel() == 0:
        return False
    for t in (weight, bias):
        if t is None:
            continue
        if t.dim() != 1 or t.numel() != input.shape[1] or t.device != input.device:
            return False
        if t.dtype != input.dtype and not (input.dtype in _HALF and t.dtype == torch.float32):
            return False
    return True


def group_norm_as(name: str, input, num_groups, weight, bias, eps):
    """:func:`group_norm` on the backend ``name`` (resolved: not "auto")."""
    if input.dim() < 2:  # F.group_norm's own checks, in its words, before any backend runs
        raise RuntimeError(f"Expected at least 2 dimensions for input tensor but received {input.dim()}")
    F._verify_batch_size([input.size(0) * input.size(1) // num_groups, num_groups] + list(input.size()[2:]))
    if name == "numba" or _cuda_op(name, input):
        if torch.compiler.is_compiling() or not torch_semantics_only(input, weight, bias):
            return torch.ops.fastnorm.group_norm.default(input, int(num_groups), weight, bias, float(eps))
    elif name != "torch" and not _tracing() and not torch_semantics_only(input, weight, bias):
        chosen = _dispatch.resolve(name, "group_norm", input.device)
        if _group_kernels_take(input, num_groups, weight, bias, chosen.device_type):
            return GroupNormFunction.apply(input, _wide(weight), _wide(bias), num_groups, float(eps), chosen)
    return F.group_norm(input, num_groups, weight, bias, eps)


def backend_for(backend: str, input: torch.Tensor) -> str:
    """The backend ``backend`` resolves to for ``input`` (its device, size, layout and dtype; see
    :func:`fastnorm._dispatch.resolve`). Under ``torch.compile`` the resolution runs while tracing,
    its result a constant of the graph (a size guard where ``"auto"``'s choice depends on the size)."""
    if torch.compiler.is_compiling():
        if _dispatch.auto_prefers_torch(_dispatch.batch_norm_kind(input), input.numel(), input.device.type):
            return _compiled_choice(backend, input.device, input.dtype, True)
        return _compiled_choice(backend, input.device, input.dtype, False)
    if backend == _dispatch.AUTO:
        return _dispatch.resolve(backend, "batch_norm", input.device, input.numel(), _dispatch.batch_norm_kind(input),
                                 input.dtype).name  # fmt: skip
    return _dispatch.resolve(backend, "batch_norm", input.device, dtype=input.dtype).name


@torch.compiler.assume_constant_result
def _compiled_choice(backend: str, device: torch.device, dtype: torch.dtype, small: bool) -> str:
    return _dispatch._resolve(backend, "batch_norm", device, small, dtype).name


def torch_semantics_only(*tensors: torch.Tensor | None) -> bool:
    """Whether torch's own op must serve: a ``torch.func`` transform is active (fastnorm's ops have
    no batching or forward-mode rules), or one of ``tensors`` is a forward-mode AD dual tensor
    (torch's op then gives the tangents, and its error for a dual running statistic)."""
    if torch._C._functorch.peek_interpreter_stack() is not None:
        return True
    if forward_ad._current_level < 0:
        return False
    return any(t is not None and forward_ad.unpack_dual(t).tangent is not None for t in tensors)


def _tracing() -> bool:
    """Whether torch.compile, jit.trace or TorchScript is turning this call into a graph."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing()


def batch_norm_as(name: str, input, running_mean, running_var, weight, bias, training, momentum, eps, cpp_cuda=True):
    """:func:`batch_norm` on the backend ``name`` (resolved: not "auto"; ``cpp_cuda``: see
    :func:`_cuda_op`)."""
    if name == "torch" or (
        not torch.compiler.is_compiling() and torch_semantics_only(input, running_mean, running_var, weight, bias)
    ):
        return F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
    if name == "numba" or _cuda_op(name, input, cpp_cuda):
        return torch.ops.fastnorm.batch_norm.default(input, weight, bias, running_mean, running_var, bool(training),
                                                     float(momentum), float(eps))  # fmt: skip
    if _tracing():  # the Python backends cannot be traced into a graph: torch's op, the same semantics
        return F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
    return batch_norm_function(_dispatch.resolve(name, "batch_norm", input.device), input, running_mean, running_var,
                               weight, bias, training, momentum, eps)  # fmt: skip


def ops_available() -> bool:
    """Whether fastnorm's C++ ops are registered here (see fastnorm/_ops.py)."""
    return _ops.available()
