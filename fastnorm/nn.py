"""Drop-in ``nn`` modules: ``BatchNorm1d/2d/3d``, ``SyncBatchNorm``, ``LayerNorm``, ``RMSNorm``, ``GroupNorm`` and
:func:`convert` / :func:`revert`.

Each class subclasses its torch counterpart (so ``isinstance(m, torch.nn.BatchNorm2d)`` holds,
and parameters, buffers, ``state_dict`` keys, input checks and error messages are torch's own)
and adds one keyword, ``backend``, that chooses the kernels of the forward and backward pass.
"""

from __future__ import annotations

import inspect
import re
import sys
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from . import _dispatch, _ops, families, functional
from ._dispatch import AUTO, check_name, resolve
from ._signature import with_backend_signature
from .autograd import check_tensors
from .distributed import SyncBatchNormFunction

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm", "LayerNorm", "RMSNorm", "GroupNorm", "convert",
           "revert", "ConversionReport"]  # fmt: skip


#: what each module's input must look like: (allowed numbers of dimensions, or a minimum as
#: (n, None)) and torch's message (its ``_check_input_dim``'s, in torch's words)
_INPUT_DIMS = {
    "BatchNorm1d": ((2, 3), "expected 2D or 3D input (got {}D input)"),
    "BatchNorm2d": ((4,), "expected 4D input (got {}D input)"),
    "BatchNorm3d": ((5,), "expected 5D input (got {}D input)"),
    "SyncBatchNorm": ((2, None), "expected at least 2D input (got {}D input)"),
}


def _averaging_factor(momentum: float | None, counts: bool, tracked: torch.Tensor | None) -> float:
    """torch's ``exponential_average_factor`` of a call that counts a batch (``counts``) or not;
    ``momentum=None``: the cumulative moving average over the batches so far."""
    if momentum is None:
        return 1.0 / (float(tracked) + 1.0) if counts else 0.0
    return momentum


def batch_norm_module(input: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                      running_mean: torch.Tensor | None, running_var: torch.Tensor | None,
                      num_batches_tracked: torch.Tensor | None, training: bool, track_running_stats: bool,
                      momentum: float | None, eps: float, backend: str, kind: str) -> torch.Tensor:  # fmt: skip
    """The forward of torch's ``_BatchNorm`` on fastnorm's backends: the input checked as module
    ``kind`` (a key of ``_INPUT_DIMS``) checks it, the averaging factor, the batch counted, one
    :func:`fastnorm.functional.batch_norm_as` call. torch counts the batch before the call (so a
    call that fails still counts); fastnorm counts it after the call succeeded, with the same
    factor: a failed call changes nothing."""
    dims, message = _INPUT_DIMS[kind]
    bad = input.dim() < dims[0] if dims[-1] is None else input.dim() not in dims
    if bad:
        raise ValueError(message.format(input.dim()))
    counts = training and track_running_stats and num_batches_tracked is not None
    factor = _averaging_factor(momentum, counts, num_batches_tracked)
    # batch statistics in training, and in eval when no running statistics are kept
    use_batch_stats = training or (running_mean is None and running_var is None)
    if training and not track_running_stats:
        running_mean = running_var = None
    name = functional.backend_for(backend, input)
    y = functional.batch_norm_as(name, input, running_mean, running_var, weight, bias, use_batch_stats, factor, eps,
                                 cpp_cuda=_dispatch.cpp_cuda_allowed(backend))  # fmt: skip
    if counts:
        num_batches_tracked.add_(1)
    return y


class _FastBatchNorm:
    """The forward of torch's ``_BatchNorm`` on fastnorm's backends (:func:`batch_norm_module`)."""

    def __init__(self, *args, backend: str = "auto", **kwargs) -> None:
        check_name(backend, "batch_norm")
        super().__init__(*args, **kwargs)
        self.backend = backend

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            return self._scripted_forward(input)
        return self._forward(input)

    @torch.jit.unused
    def _forward(self, input: torch.Tensor) -> torch.Tensor:
        if isinstance(input, torch.fx.Proxy):
            # torch.fx.symbolic_trace: a leaf of the graph, as torch's BatchNorm is (a call_module
            # node: the graph calls this module, whose mode .train()/.eval() then still switch)
            tracer = input.tracer
            return tracer.create_proxy("call_module", tracer.path_of_module(self), (input,), {})
        # the module's tensors read from its dicts (as Module.__getattr__ finds them, without its
        # cost: at the MLP's sizes every microsecond of the forward counts; fx finds them too)
        params, buffers = self._parameters, self._buffers
        return batch_norm_module(input, params.get("weight"), params.get("bias"), buffers.get("running_mean"),
                                 buffers.get("running_var"), buffers.get("num_batches_tracked"), self.training,
                                 self.track_running_stats, self.momentum, self.eps, self.backend,
                                 self._input_kind)  # fmt: skip

    def _scripted_forward(self, input: torch.Tensor) -> torch.Tensor:
        """The forward TorchScript compiles: torch's own ``_BatchNorm.forward`` (the batch counted
        first, as torch counts it), with fastnorm's op for the numba and auto backends on CPU
        tensors and torch's op otherwise (TorchScript cannot run the Python backends)."""
        self._check_input_dim(input)
        factor = 0.0
        if self.momentum is not None:
            factor = self.momentum
        if self.training and self.track_running_stats:
            tracked = self.num_batches_tracked
            if tracked is not None:
                tracked.add_(1)
                momentum = self.momentum
                if momentum is None:
                    factor = 1.0 / float(tracked)
                else:
                    factor = momentum
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        keep = not self.training or self.track_running_stats
        running_mean = self.running_mean if keep else None
        running_var = self.running_var if keep else None
        if (self.backend == "numba" or self.backend == "auto") and input.device.type == "cpu":
            return torch.ops.fastnorm.batch_norm(input, self.weight, self.bias, running_mean, running_var,
                                                 use_batch_stats, factor, self.eps)  # fmt: skip
        return F.batch_norm(input, running_mean, running_var, self.weight, self.bias, use_batch_stats, factor,
                            self.eps)  # fmt: skip

    def __prepare_scriptable__(self):
        """Before TorchScript compiles the module: its scripted forward calls fastnorm's op, which
        must be registered by then (the C++ extension loaded); where it cannot be built, the
        module scripts as torch's own class (:func:`revert`)."""
        if _ops.available():
            return self
        return revert(self)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, backend={self.backend!r}"


class BatchNorm1d(_FastBatchNorm, nn.BatchNorm1d):
    r"""Batch Normalization over ``(N, C)`` or ``(N, C, L)`` input, as :class:`torch.nn.BatchNorm1d`.

    .. math:: y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \cdot \gamma + \beta

    Args:
        num_features, eps, momentum, affine, track_running_stats, device, dtype, bias:
            exactly as :class:`torch.nn.BatchNorm1d` (momentum=None: cumulative average).
        backend: ``"auto"`` (default), ``"reference"``, ``"numba"``, ``"cuda"`` or ``"torch"``.

    Shape:
        Input ``(N, C)`` or ``(N, C, L)``; output the same.

    Example:
        >>> bn = BatchNorm1d(256, backend="reference")
        >>> y = bn(torch.randn(64, 256))
    """

    _input_kind = "BatchNorm1d"

    @with_backend_signature(nn.BatchNorm1d)
    def __init__(self, *args, backend: str = "auto", **kwargs) -> None:
        super().__init__(*args, backend=backend, **kwargs)


class BatchNorm2d(_FastBatchNorm, nn.BatchNorm2d):
    r"""Batch Normalization over ``(N, C, H, W)`` input, as :class:`torch.nn.BatchNorm2d`.

    Statistics are per channel, over N, H and W. Arguments as :class:`BatchNorm1d`.

    Example:
        >>> bn = BatchNorm2d(64, backend="reference")
        >>> y = bn(torch.randn(8, 64, 28, 28))
    """

    _input_kind = "BatchNorm2d"

    @with_backend_signature(nn.BatchNorm2d)
    def __init__(self, *args, backend: str = "auto", **kwargs) -> None:
        super().__init__(*args, backend=backend, **kwargs)


class BatchNorm3d(_FastBatchNorm, nn.BatchNorm3d):
    r"""Batch Normalization over ``(N, C, D, H, W)`` input, as :class:`torch.nn.BatchNorm3d`.

    Arguments as :class:`BatchNorm1d`.
    """

    _input_kind = "BatchNorm3d"

    @with_backend_signature(nn.BatchNorm3d)
    def __init__(self, *args, backend: str = "auto", **kwargs) -> None:
        super().__init__(*args, backend=backend, **kwargs)


class SyncBatchNorm(_FastBatchNorm, _BatchNorm):
    r"""Batch Normalization with statistics over every process of a ``torch.distributed`` group,
    as :class:`torch.nn.SyncBatchNorm`, on CPU (gloo) as well as GPU (NCCL).

    Local statistics come from the backend's kernels; counts, means and variances are merged
    across ranks (which may hold different batch sizes, or none) and the backward's two
    reductions are all-reduced (see :mod:`fastnorm.distributed`). In eval mode, and outside an
    initialised process group (or with one process), it is plain BatchNorm, as torch's is.
    ``backend="torch"`` runs torch's own SyncBatchNorm (GPU only when syncing).

    It is not a subclass of :class:`torch.nn.SyncBatchNorm`: DistributedDataParallel refuses
    modules holding that class on CPU, and this one exists to run there too.

    Args:
        num_features, eps, momentum, affine, track_running_stats, process_group, device, dtype,
            bias: exactly as :class:`torch.nn.SyncBatchNorm`.
        backend: ``"auto"``, ``"reference"``, ``"numba"``, ``"cuda"`` or ``"torch"``.

    Shape:
        Input ``(N, C, *)``, N may differ between ranks; output the same.

    Example:
        >>> model = fastnorm.nn.convert(model, backend="numba", sync=True)
        >>> model = torch.nn.parallel.DistributedDataParallel(model)
    """

    _input_kind = "SyncBatchNorm"

    @with_backend_signature(nn.SyncBatchNorm)
    def __init__(self, *args, backend: str = "auto", **kwargs) -> None:
        bound = _SYNC_SIGNATURE.bind(None, *args, **kwargs)
        bound.apply_defaults()
        options = {k: v for k, v in bound.arguments.items() if k != "self"}
        process_group = options.pop("process_group")
        super().__init__(**options, backend=backend)
        self.process_group = process_group

    _check_input_dim = nn.SyncBatchNorm._check_input_dim
    _check_non_zero_input_channels = nn.SyncBatchNorm._check_non_zero_input_channels

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if self.backend == "torch":
            return nn.SyncBatchNorm.forward(self, input)
        need_sync = self.training and torch.distributed.is_available() and torch.distributed.is_initialized()
        if need_sync:
            group = self.process_group or torch.distributed.group.WORLD
            world_size = torch.distributed.get_world_size(group)
            need_sync = world_size > 1
        if not need_sync:
            return super().forward(input)
        self._check_input_dim(input)
        self._check_non_zero_input_channels(input)
        chosen = resolve(self.backend, "batch_norm", input.device)
        if input.dtype in (torch.bfloat16, torch.float16):  # not in the synchronised kernels (yet)
            if self.backend != AUTO:
                raise ValueError(
                    f"fastnorm's SyncBatchNorm (backend {self.backend!r}) computes in float32 or float64, the input "
                    f"is {input.dtype}; use backend='auto' or 'torch' (torch's own SyncBatchNorm)"
                )
            chosen = resolve("torch", "batch_norm", input.device)
        if chosen.is_torch:  # "auto" where no fastnorm kernel runs: torch's own
            return nn.SyncBatchNorm.forward(self, input)
        check_tensors(input, self.weight, self.bias, self.running_mean, self.running_var, chosen.name)
        tracked = self.num_batches_tracked
        counts = self.track_running_stats and tracked is not None
        momentum = _averaging_factor(self.momentum, counts, tracked)
        track = self.track_running_stats
        y = SyncBatchNormFunction.apply(
            input, self.weight, self.bias, self.running_mean if track else None,
            self.running_var if track else None, self.eps, momentum, group, world_size, chosen,
        )  # fmt: skip
        if counts:
            tracked.add_(1)
        return y


class _FastRowNorm:
    """The forward of torch's ``LayerNorm`` / ``RMSNorm`` on fastnorm's backends: one
    :func:`fastnorm.functional.layer_norm_as` / ``rms_norm_as`` call; an fx leaf, scriptable."""

    _op = "layer_norm"

    def __init__(self, *args, backend: str = "auto", **kwargs) -> None:
        check_name(backend, self._op)
        super().__init__(*args, **kwargs)
        self.backend = backend

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            return self._scripted_forward(input)
        return self._forward(input)

    @torch.jit.unused
    def _forward(self, input: torch.Tensor) -> torch.Tensor:
        if isinstance(input, torch.fx.Proxy):  # a leaf of fx graphs, as torch's modules are
            tracer = input.tracer
            return tracer.create_proxy("call_module", tracer.path_of_module(self), (input,), {})
        params = self._parameters
        name = functional._row_backend_for(self.backend, self._op, input)
        if self._op == "group_norm":
            return functional.group_norm_as(name, input, self.num_groups, params.get("weight"), params.get("bias"),
                                            self.eps)  # fmt: skip
        if self._op == "layer_norm":
            return functional.layer_norm_as(name, input, self.normalized_shape, params.get("weight"),
                                            params.get("bias"), self.eps)  # fmt: skip
        return functional.rms_norm_as(name, input, self.normalized_shape, params.get("weight"), self.eps)

    def __prepare_scriptable__(self):
        """Before TorchScript compiles the module: its scripted forward calls fastnorm's op, which
        must be registered by then; where it cannot be built, the module scripts as torch's class."""
        if _ops.available():
            return self
        return revert(self)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, backend={self.backend!r}"


class LayerNorm(_FastRowNorm, nn.LayerNorm):
    r"""Layer Normalization over the last dims, as :class:`torch.nn.LayerNorm`.

    .. math:: y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \cdot \gamma + \beta

    Args:
        normalized_shape, eps, elementwise_affine, bias, device, dtype: exactly as
            :class:`torch.nn.LayerNorm`.
        backend: ``"auto"`` (default), ``"reference"``, ``"numba"``, ``"cuda"`` or ``"torch"``.

    Shape:
        Input ``(*, *normalized_shape)``; output the same.

    Example:
        >>> ln = LayerNorm(768, backend="reference")
        >>> y = ln(torch.randn(8, 16, 768))
    """

    _op = "layer_norm"

    @with_backend_signature(nn.LayerNorm)
    def __init__(self, *args, backend: str = "auto", **kwargs) -> None:
        super().__init__(*args, backend=backend, **kwargs)

    def _scripted_forward(self, input: torch.Tensor) -> torch.Tensor:
        """The forward TorchScript compiles: fastnorm's op for the numba and auto backends on CPU
        tensors, torch's otherwise (TorchScript cannot run the Python backends)."""
        if (self.backend == "numba" or self.backend == "auto") and input.device.type == "cpu":
            return torch.ops.fastnorm.layer_norm(input, list(self.normalized_shape), self.weight, self.bias, self.eps)
        return F.layer_norm(input, list(self.normalized_shape), self.weight, self.bias, self.eps)


class RMSNorm(_FastRowNorm, nn.RMSNorm):
    r"""Root Mean Square Normalization over the last dims, as :class:`torch.nn.RMSNorm`.

    .. math:: y = \frac{x}{\sqrt{\mathrm{E}[x^2] + \epsilon}} \cdot \gamma

    Args:
        normalized_shape, eps, elementwise_affine, device, dtype: exactly as
            :class:`torch.nn.RMSNorm` (eps=None: the compute dtype's machine epsilon).
        backend: ``"auto"`` (default), ``"reference"``, ``"numba"``, ``"cuda"`` or ``"torch"``.

    Shape:
        Input ``(*, *normalized_shape)``; output the same.

    Example:
        >>> norm = RMSNorm(768, backend="reference")
        >>> y = norm(torch.randn(8, 16, 768))
    """

    _op = "rms_norm"

    @with_backend_signature(nn.RMSNorm)
    def __init__(self, *args, backend: str = "auto", **kwargs) -> None:
        super().__init__(*args, backend=backend, **kwargs)

    def _scripted_forward(self, input: torch.Tensor) -> torch.Tensor:
        """As :meth:`LayerNorm._scripted_forward`."""
        if (self.backend == "numba" or self.backend == "auto") and input.device.type == "cpu":
            return torch.ops.fastnorm.rms_norm(input, list(self.normalized_shape), self.weight, self.eps)
        return F.rms_norm(input, list(self.normalized_shape), self.weight, self.eps)


class GroupNorm(_FastRowNorm, nn.GroupNorm):
    r"""Group Normalization over ``(N, C, *)`` input, as :class:`torch.nn.GroupNorm`.

    .. math:: y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \cdot \gamma_c + \beta_c

    Statistics per (sample, group of C / num_groups consecutive channels); contiguous and
    channels-last inputs (the output keeps the layout).

    Args:
        num_groups, num_channels, eps, affine, device, dtype, bias: exactly as
            :class:`torch.nn.GroupNorm`.
        backend: ``"auto"`` (default), ``"reference"``, ``"numba"``, ``"cuda"`` or ``"torch"``.

    Shape:
        Input ``(N, C, *)``; output the same.

    Example:
        >>> gn = GroupNorm(32, 256, backend="reference")
        >>> y = gn(torch.randn(8, 256, 14, 14))
    """

    _op = "group_norm"

    @with_backend_signature(nn.GroupNorm)
    def __init__(self, *args, backend: str = "auto", **kwargs) -> None:
        super().__init__(*args, backend=backend, **kwargs)

    def _scripted_forward(self, input: torch.Tensor) -> torch.Tensor:
        """As :meth:`LayerNorm._scripted_forward`."""
        if (self.backend == "numba" or self.backend == "auto") and input.device.type == "cpu":
            return torch.ops.fastnorm.group_norm(input, self.num_groups, self.weight, self.bias, self.eps)
        return F.group_norm(input, self.num_groups, self.weight, self.bias, self.eps)


_ROW_DROP_IN = {nn.LayerNorm: LayerNorm, nn.RMSNorm: RMSNorm, nn.GroupNorm: GroupNorm}
_ROW_TORCH_CLASS = {LayerNorm: nn.LayerNorm, RMSNorm: nn.RMSNorm, GroupNorm: nn.GroupNorm}


def _row_module(cls: type, old: nn.Module, **options) -> nn.Module:
    """A ``cls`` (LayerNorm or RMSNorm, fastnorm's or torch's) with ``old``'s configuration and its
    very Parameter objects, mode and quantization config."""
    if cls in (nn.GroupNorm, GroupNorm):
        if _GROUP_BIAS_OPTION:
            options["bias"] = old.bias is not None or not old.affine
        new = cls(old.num_groups, old.num_channels, old.eps, old.affine, device="meta", **options)
        return _share_state(old, new)
    affine = old.elementwise_affine
    if cls in (nn.LayerNorm, LayerNorm):
        options["bias"] = getattr(old, "bias", None) is not None
    new = cls(old.normalized_shape, old.eps, affine, device="meta", **options)
    return _share_state(old, new)


#: GroupNorm without a bias (``bias=False``) exists in recent torch only
_GROUP_BIAS_OPTION = "bias" in inspect.signature(nn.GroupNorm.__init__).parameters


_SYNC_SIGNATURE = inspect.signature(nn.SyncBatchNorm.__init__)
#: recent torch lets BatchNorm go without a bias (``bias=False``; 2.14 has it, 2.11 does not)
_BIAS_OPTION = "bias" in inspect.signature(nn.BatchNorm2d.__init__).parameters
_DROP_IN = {nn.BatchNorm1d: BatchNorm1d, nn.BatchNorm2d: BatchNorm2d, nn.BatchNorm3d: BatchNorm3d}


def _share_state(old: nn.Module, new: nn.Module) -> nn.Module:
    """``new`` holding ``old``'s very Parameter and buffer objects (an optimizer built before keeps
    updating the same tensors), its mode and quantization config."""
    for name, p in old.named_parameters(recurse=False):
        setattr(new, name, p)
    for name, b in old.named_buffers(recurse=False):
        setattr(new, name, b)
    for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
        if getattr(old, name, None) is None and hasattr(new, name):
            setattr(new, name, None)
    new.train(old.training)
    if hasattr(old, "qconfig"):
        new.qconfig = old.qconfig
    return new


def _converted(bn: nn.Module, backend: str, sync: bool, process_group) -> nn.Module:
    if isinstance(bn, _FastBatchNorm) and (not sync or isinstance(bn, SyncBatchNorm)):
        bn.backend = backend  # already fastnorm's (a SyncBatchNorm stays one)
        return bn
    options = dict(device="meta", backend=backend)
    if _BIAS_OPTION:
        options["bias"] = bn.bias is not None or not bn.affine
    if sync:
        cls = SyncBatchNorm
        options["process_group"] = process_group if process_group is not None else getattr(bn, "process_group", None)
    else:
        cls = _DROP_IN[type(bn)]
    new = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats, **options)
    return _share_state(bn, new)


class _FamilyNorm:
    """Put before a model library's RMSNorm class by :func:`convert` (the instance keeps its class
    as a base: ``isinstance`` checks, attributes, parameters and ``state_dict`` keys are its own):
    its family's forward (:mod:`fastnorm.families`) on fastnorm's backends; dtypes the kernels do not
    take (float64) run the class's own forward."""

    _fastnorm_family: families.RMSNormFamily
    _fastnorm_original: type

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if hidden_states.dtype not in families.KERNEL_DTYPES:
            return self._fastnorm_original.forward(self, hidden_states)
        family = self._fastnorm_family
        return families.family_rms_norm(hidden_states, self.weight, getattr(self, family.eps), family, self.backend)

    def __reduce_ex__(self, protocol):  # pickle and deepcopy: rebuilt from the library's class
        return _family_instance, (self._fastnorm_original,), self.__getstate__()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, backend={self.backend!r}".removeprefix(", ")


_FAMILY_CLASSES: dict[type, type] = {}


def _family_class(original: type) -> type:
    """The converted twin of a family's class (one per class)."""
    if original not in _FAMILY_CLASSES:
        attributes = {"_fastnorm_family": families.family_of(original), "_fastnorm_original": original,
                      "__module__": __name__, "__qualname__": f"_FamilyNorm[{original.__qualname__}]"}  # fmt: skip
        _FAMILY_CLASSES[original] = type(original.__name__, (_FamilyNorm, original), attributes)
    return _FAMILY_CLASSES[original]


def _family_instance(original: type) -> nn.Module:
    cls = _family_class(original)
    return cls.__new__(cls)


@dataclass
class ConversionReport:
    """What :func:`convert` converted and what it left, by module name.

    Attributes:
        converted: module name -> what it became (e.g. ``"LlamaRMSNorm -> llama family, backend auto"``).
        left: module name -> why a norm module was left as it is.
    """

    converted: dict[str, str] = field(default_factory=dict)
    left: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"fastnorm.nn.convert: {len(self.converted)} converted, {len(self.left)} left"]
        lines += [f"  converted {name or '(the module)'}: {what}" for name, what in self.converted.items()]
        lines += [f"  left      {name or '(the module)'}: {why}" for name, why in self.left.items()]
        return "\n".join(lines)


#: a class name that says "norm layer" (BatchNorm2d, LlamaRMSNorm, T5LayerNorm, RMSNormGated, ...)
_NORM_NAME = re.compile(r"Norm(\d[dD])?([A-Z][a-z]+)?$")
_NO_KERNEL = (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, nn.LocalResponseNorm, nn.CrossMapLRN2d)


def _why_left(module: nn.Module) -> str | None:
    """Why a norm module that :func:`convert` met stays as it is (None: not a norm module)."""
    cls = type(module)
    if isinstance(module, _NO_KERNEL):
        return f"fastnorm has no kernel for {cls.__name__}"
    if isinstance(module, (_BatchNorm, nn.LayerNorm, nn.RMSNorm, nn.GroupNorm)):
        return f"a subclass of torch's {next(c for c in cls.__mro__ if c.__module__.startswith('torch.')).__name__}"
    if not _NORM_NAME.search(cls.__name__):
        return None
    family = families.family_of(cls)
    if family is not None:
        return f"{cls.__name__} is of the {family.name} family, but {families.why_not(module, family)}"
    return f"{cls.__module__}.{cls.__name__}: its forward is none of fastnorm.families' (no family)"


def convert(
    module: nn.Module, backend: str = "auto", sync: bool = False, process_group=None, report: bool = False
) -> nn.Module:
    """Replace every ``torch.nn.BatchNorm1d/2d/3d``, ``LayerNorm``, ``RMSNorm`` and ``GroupNorm``
    inside ``module`` by fastnorm's, and run the RMSNorms of Hugging Face transformers models
    whose family :mod:`fastnorm.families` knows (Llama, Qwen, Mistral, Phi-3, Gemma, OLMo 2, T5 and
    the classes that copy them) on fastnorm's kernels with their own semantics.

    Weights, buffers (the same tensor objects, so device and dtype are kept), train/eval mode
    and ``state_dict`` keys are preserved. fastnorm modules already present get ``backend``.
    A transformers norm keeps its class as a base (``isinstance`` holds) and its attributes.
    Other subclasses of torch's BatchNorm (lazy modules, user subclasses), norms of no known
    family and norms fastnorm has no kernel for are left as they are.

    Args:
        module: a model, or a single norm module.
        backend: the backend of the converted modules.
        sync: convert to :class:`SyncBatchNorm` instead (BatchNorm1d/2d/3d, fastnorm's and
            torch's SyncBatchNorm alike), as ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``.
        process_group: the group that SyncBatchNorm synchronises over (default: the whole world).
        report: print what was converted and what was left and why (a :class:`ConversionReport`,
            to stdout).

    Returns:
        The converted module (the same object unless ``module`` itself is a torch norm).

    Example:
        >>> import torchvision
        >>> model = convert(torchvision.models.resnet18(num_classes=10), backend="reference")
    """
    check_name(backend, "batch_norm")
    found = ConversionReport()
    module = _convert(module, "", backend, sync, process_group, found)
    if report:
        print(found, file=sys.stdout, flush=True)
    return module


def _convert(module: nn.Module, name: str, backend: str, sync: bool, process_group, found: ConversionReport):
    if type(module) in _ROW_DROP_IN or isinstance(module, _FastRowNorm):
        found.converted[name] = f"{type(module).__name__} -> fastnorm.nn's, backend {backend}"
        if isinstance(module, _FastRowNorm):
            module.backend = backend
            return module
        return _row_module(_ROW_DROP_IN[type(module)], module, backend=backend)
    convertible = type(module) in _DROP_IN or isinstance(module, _FastBatchNorm)
    if sync:
        convertible = convertible or type(module) is nn.SyncBatchNorm
    if convertible:
        new = _converted(module, backend, sync, process_group)
        found.converted[name] = f"{type(module).__name__} -> fastnorm.nn.{type(new).__name__}, backend {backend}"
        return new
    family = families.family_of(type(module)) if not isinstance(module, _FamilyNorm) else module._fastnorm_family
    if family is not None and families.why_not(module, family) is None:
        if not isinstance(module, _FamilyNorm):
            module.__class__ = _family_class(type(module))
        module.backend = backend
        found.converted[name] = f"{module._fastnorm_original.__name__} -> {family.name} family, backend {backend}"
        return module
    why = _why_left(module)
    if why is not None:
        found.left[name] = why
    for child_name, child in module.named_children():
        new = _convert(child, f"{name}.{child_name}" if name else child_name, backend, sync, process_group, found)
        if new is not child:
            setattr(module, child_name, new)
    return module


_TORCH_CLASS = {BatchNorm1d: nn.BatchNorm1d, BatchNorm2d: nn.BatchNorm2d, BatchNorm3d: nn.BatchNorm3d,
                SyncBatchNorm: nn.SyncBatchNorm}  # fmt: skip


def _reverted(bn: _FastBatchNorm) -> nn.Module:
    cls = next(torch_cls for ours, torch_cls in _TORCH_CLASS.items() if isinstance(bn, ours))
    options = dict(device="meta")
    if _BIAS_OPTION:
        options["bias"] = bn.bias is not None or not bn.affine
    if cls is nn.SyncBatchNorm:
        options["process_group"] = bn.process_group
    new = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats, **options)
    return _share_state(bn, new)


def revert(module: nn.Module) -> nn.Module:
    """Replace every fastnorm BatchNorm, LayerNorm, RMSNorm and GroupNorm inside ``module`` by
    torch's class, and give converted transformers norms their own class back: :func:`convert`'s
    inverse (the same Parameter and buffer objects, mode and ``state_dict`` keys), for tools that
    look torch's classes up exactly.

    Returns:
        The reverted module (the same object unless ``module`` itself is a fastnorm BatchNorm).

    Example:
        >>> model = revert(convert(torchvision.models.resnet18(), backend="numba"))
    """
    if isinstance(module, _FastBatchNorm):
        return _reverted(module)
    if isinstance(module, _FastRowNorm):
        return _row_module(next(t for ours, t in _ROW_TORCH_CLASS.items() if isinstance(module, ours)), module)
    if isinstance(module, _FamilyNorm):
        module.__class__ = module._fastnorm_original
        del module.backend
        return module
    for name, child in module.named_children():
        new = revert(child)
        if new is not child:
            setattr(module, name, new)
    return module


def _register_quantization_fusion() -> None:
    """``torch.ao.quantization.fuse_modules`` looks the module types of each pattern up exactly
    (``(nn.Conv2d, nn.BatchNorm2d, nn.ReLU)``): every pattern with one of torch's BatchNorms gets
    its twin with fastnorm's, whose fuser reverts fastnorm's module to torch's first (the fused
    modules check torch's classes too), so that fusion gives torch's fused modules and values."""
    try:
        from torch.ao.quantization import fuser_method_mappings as mappings
    except ImportError:  # a torch without torch.ao.quantization
        return
    table = getattr(mappings, "_DEFAULT_OP_LIST_TO_FUSER_METHOD", None)
    if not isinstance(table, dict):
        return
    ours = {torch_cls: fast for fast, torch_cls in _TORCH_CLASS.items() if fast is not SyncBatchNorm}

    def reverting(method):
        def fuse(is_qat, *modules):
            return method(is_qat, *(revert(m) for m in modules))

        return fuse

    for pattern, method in list(table.items()):
        if any(t in ours for t in pattern) and callable(method):
            table.setdefault(tuple(ours.get(t, t) for t in pattern), reverting(method))


_register_quantization_fusion()
