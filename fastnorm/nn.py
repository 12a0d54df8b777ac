"""Drop-in ``nn`` modules: ``BatchNorm1d/2d/3d`` and :func:`convert`.

Each class subclasses its torch counterpart (so ``isinstance(m, torch.nn.BatchNorm2d)`` holds,
and parameters, buffers, ``state_dict`` keys, input checks and error messages are torch's own)
and adds one keyword, ``backend``, that chooses the kernels of the forward and backward pass.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from . import functional
from ._dispatch import AUTO, batch_norm_kind, check_name, resolve
from ._signature import with_backend_signature
from .distributed import SyncBatchNormFunction

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm", "convert"]


class _FastBatchNorm:
    """The forward of torch's ``_BatchNorm``, routed through :func:`fastnorm.functional.batch_norm`."""

    backend: str

    def __init__(self, *args, backend: str = "auto", **kwargs) -> None:
        check_name(backend, "batch_norm")
        super().__init__(*args, **kwargs)
        self.backend = backend

    def _averaging_factor(self, tracked: torch.Tensor | None) -> tuple[float, bool]:
        """(torch's exponential_average_factor, whether this call counts a batch). torch counts
        the batch before the call (so a call that fails still counts); fastnorm counts it after
        the call succeeded (``tracked.add_(1)`` in :meth:`forward`), with the same factor: a
        failed call changes nothing. ``tracked``: the num_batches_tracked buffer (or None)."""
        momentum = self.momentum
        counts = self.training and self.track_running_stats and tracked is not None
        if momentum is None:  # cumulative moving average over the batches so far
            momentum = 1.0 / (float(tracked) + 1.0) if counts else 0.0
        return momentum, counts

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        compiling = torch.compiler.is_compiling()
        if not compiling:
            if self.backend == AUTO:  # size, layout and dtype decide (_dispatch.AUTO_CPU_MIN_NUMEL)
                chosen = resolve(AUTO, "batch_norm", input.device, input.numel(), batch_norm_kind(input), input.dtype)
            else:
                chosen = resolve(self.backend, "batch_norm", input.device, dtype=input.dtype)
            if chosen.is_torch:
                # torch's kernels chosen (backend="torch", or "auto" at a size where torch is
                # faster): torch's own forward, with nothing of fastnorm's around it
                return super().forward(input)
        self._check_input_dim(input)
        # the module's tensors read from its dicts (as Module.__getattr__ finds them, without
        # its cost: at the MLP's sizes every microsecond of the forward counts)
        params, buffers = self._parameters, self._buffers
        tracked = buffers.get("num_batches_tracked")
        momentum, counts = self._averaging_factor(tracked)
        running_mean, running_var = buffers.get("running_mean"), buffers.get("running_var")
        # batch statistics in training, and in eval when no running statistics are kept
        use_batch_stats = self.training or (running_mean is None and running_var is None)
        if self.training and not self.track_running_stats:
            running_mean = running_var = None
        args = (input, running_mean, running_var, params.get("weight"), params.get("bias"), use_batch_stats,
                momentum, self.eps)  # fmt: skip
        if compiling:
            y = functional.batch_norm(*args, backend=self.backend)
        else:
            y = functional.batch_norm_with(chosen, *args)
        if counts:
            tracked.add_(1)
        return y

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

    @with_backend_signature(nn.BatchNorm2d)
    def __init__(self, *args, backend: str = "auto", **kwargs) -> None:
        super().__init__(*args, backend=backend, **kwargs)


class BatchNorm3d(_FastBatchNorm, nn.BatchNorm3d):
    r"""Batch Normalization over ``(N, C, D, H, W)`` input, as :class:`torch.nn.BatchNorm3d`.

    Arguments as :class:`BatchNorm1d`.
    """

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
        functional.check_tensors(input, self.weight, self.bias, self.running_mean, self.running_var, chosen.name)
        tracked = self.num_batches_tracked
        momentum, counts = self._averaging_factor(tracked)
        track = self.track_running_stats
        y = SyncBatchNormFunction.apply(
            input, self.weight, self.bias, self.running_mean if track else None,
            self.running_var if track else None, self.eps, momentum, group, world_size, chosen,
        )  # fmt: skip
        if counts:
            tracked.add_(1)
        return y


_SYNC_SIGNATURE = inspect.signature(nn.SyncBatchNorm.__init__)
#: recent torch lets BatchNorm go without a bias (``bias=False``; 2.14 has it, 2.11 does not)
_BIAS_OPTION = "bias" in inspect.signature(nn.BatchNorm2d.__init__).parameters
_DROP_IN = {nn.BatchNorm1d: BatchNorm1d, nn.BatchNorm2d: BatchNorm2d, nn.BatchNorm3d: BatchNorm3d}


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
    # share the very Parameter and buffer objects: an optimizer built before the conversion
    # keeps updating the same tensors
    for name, p in bn.named_parameters(recurse=False):
        setattr(new, name, p)
    for name, b in bn.named_buffers(recurse=False):
        setattr(new, name, b)
    for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
        if getattr(bn, name, None) is None:
            setattr(new, name, None)
    new.train(bn.training)
    if hasattr(bn, "qconfig"):
        new.qconfig = bn.qconfig
    return new


def convert(module: nn.Module, backend: str = "auto", sync: bool = False, process_group=None) -> nn.Module:
    """Replace every ``torch.nn.BatchNorm1d/2d/3d`` inside ``module`` by fastnorm's.

    Weights, buffers (the same tensor objects, so device and dtype are kept), train/eval mode
    and ``state_dict`` keys are preserved. fastnorm modules already present get ``backend``.
    Other subclasses of torch's BatchNorm (lazy modules, user subclasses) are left as they are.

    Args:
        module: a model, or a single BatchNorm module.
        backend: the backend of the converted modules.
        sync: convert to :class:`SyncBatchNorm` instead (BatchNorm1d/2d/3d, fastnorm's and
            torch's SyncBatchNorm alike), as ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``.
        process_group: the group that SyncBatchNorm synchronises over (default: the whole world).

    Returns:
        The converted module (the same object unless ``module`` itself is a BatchNorm).

    Example:
        >>> import torchvision
        >>> model = convert(torchvision.models.resnet18(num_classes=10), backend="reference")
    """
    check_name(backend, "batch_norm")
    convertible = type(module) in _DROP_IN or isinstance(module, _FastBatchNorm)
    if sync:
        convertible = convertible or type(module) is nn.SyncBatchNorm
    if convertible:
        return _converted(module, backend, sync, process_group)
    for name, child in module.named_children():
        new = convert(child, backend, sync, process_group)
        if new is not child:
            setattr(module, name, new)
    return module
