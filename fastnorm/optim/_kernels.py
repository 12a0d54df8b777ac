"""The kernel call of a plan's part, and the choice of backend that runs it."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from fastnorm_kernels._bits import BFLOAT16

from .. import _dispatch, _ops
from .._dispatch import AUTO, BACKENDS, Backend, _load, resolve
from ._precision import _mark

if TYPE_CHECKING:
    from ._plan import _Part

#: parameter dtype -> the kernels' storage dtype (bfloat16 as uint16 bits: kernels/fastnorm_kernels/_bits.py)
KERNEL_DTYPES = {torch.float32: np.dtype(np.float32), torch.float64: np.dtype(np.float64),
                 torch.float16: np.dtype(np.float16), torch.bfloat16: BFLOAT16}  # fmt: skip
TORCH = Backend("torch", None)
_TORCH_ONLY_OPTIONS = ("foreach", "fused", "capturable", "differentiable")


def _torch_only_options(group: dict) -> list[str]:
    return [f"{k}={group[k]!r}" for k in _TORCH_ONLY_OPTIONS if group.get(k) not in (None, False)]


def resolve_backend(self, group: dict, params: list[torch.Tensor]) -> Backend:
    precision = self.master_weights or self.stochastic_rounding
    name = type(self).__name__
    if _torch_only_options(group):
        self._refuse_torch_only_options(group)
        if precision:
            raise ValueError(f"{name}: master_weights / stochastic_rounding are fastnorm's own update, which "
                             f"does not do {', '.join(_torch_only_options(group))}")  # fmt: skip
        return TORCH  # "auto" with torch-only options: torch's implementation, as asked
    if self.backend == AUTO and not precision:  # size and kind decide (_dispatch.AUTO_CPU_MIN_NUMEL)
        kind = "sgd_momentum" if self._op == "sgd" and group.get("momentum", 0) != 0 else self._op
        chosen = resolve(AUTO, self._op, params[0].device, sum(p.numel() for p in params), kind)
    else:
        chosen = resolve(self.backend, self._op, params[0].device)
    if chosen.is_torch and self._torch_cls is None:
        ours = [b for b in _dtype_backends(params[0].dtype, self._op) if b != "torch"]
        raise ValueError(
            f"{name}: torch.optim has no {name}, so backend {chosen.name!r} cannot run here; use one of "
            f"fastnorm's backends: {', '.join(ours)}"
        )
    if chosen.is_torch and not precision:
        return chosen
    unsupported = _unsupported(params, chosen, self._op, torch_has=self._torch_cls is not None)
    if unsupported:
        if self.backend == AUTO and not precision and self._torch_cls is not None:
            return TORCH  # "auto" never refuses what torch supports
        if precision and chosen.is_torch:
            raise ValueError(f"{name}: master_weights / stochastic_rounding need fastnorm's kernels, and none "
                             f"here updates these parameters: {unsupported[1]}")  # fmt: skip
        raise unsupported[0](f"{name} (fastnorm backend {chosen.name!r}) {unsupported[1]}")
    devices = {p.device for p in params}
    if len(devices) > 1:
        raise ValueError(
            f"backend {chosen.name!r} updates a parameter group on one device, but this "
            f"group has parameters on {sorted(map(str, devices))}"
        )
    return chosen


def check_gradients(self, params: list[torch.Tensor], backend: Backend) -> None:
    for p in params:
        g = p.grad
        if g.dtype != p.dtype or g.shape != p.shape or g.device != p.device:
            raise RuntimeError(
                f"{type(self).__name__}: a gradient must match its parameter's dtype, shape and "
                f"device; got grad {g.dtype} {tuple(g.shape)} on {g.device} for param {p.dtype} "
                f"{tuple(p.shape)} on {p.device}"
            )


def _unsupported(params: list[torch.Tensor], chosen: Backend, op: str, torch_has: bool = True):
    """(exception type, why) if ``chosen``'s kernels cannot update these parameters, else None
    (``torch_has``: torch.optim has this optimizer, a way out to suggest)."""
    for p in params:
        g = p.grad
        if g.is_sparse or p.is_sparse:
            way_out = " or backend='torch'" if torch_has else " (no backend updates sparse gradients)"
            return RuntimeError, f"does not support sparse gradients; use dense gradients{way_out}"
        if p.is_complex():
            way_out = "; use backend='torch'" if torch_has else "; view it as real (torch.view_as_real) first"
            return TypeError, f"does not support complex parameters ({p.dtype}){way_out}"
        dtype = KERNEL_DTYPES.get(p.dtype)
        if chosen.is_torch or dtype is None or dtype not in chosen.kernels.OPTIMIZER_DTYPES:
            return ValueError, (
                f"does not update {p.dtype} parameters on {p.device}; backends that do: "
                f"{', '.join(_dtype_backends(p.dtype, op))}"
            )
    return None


def _dtype_backends(dtype: torch.dtype, op: str) -> list[str]:
    """The backends usable here whose ``op`` kernels update parameters of ``dtype`` (and torch)."""
    names = []
    for name in BACKENDS:
        module, why = _load(name)
        if why is None and (module is None or KERNEL_DTYPES.get(dtype) in getattr(module, "OPTIMIZER_DTYPES", ())):
            names.append(name)
    return names


def _launch(backend: Backend, d, part: _Part, tensors: list[list[torch.Tensor]], addrs: np.ndarray | None,
            options: dict) -> None:  # fmt: skip
    """One kernel call of optimizer ``d`` (its description) for a part: the address table for the
    compiled backends (``addrs``, or built here), arrays for the reference. A non-contiguous
    tensor is updated through a contiguous copy, written back after."""
    staged = []
    through_op = backend.name == "numba" or _cuda_op(backend, tensors)
    if addrs is None:
        candidates = (*tensors[0], *tensors[1])
        if not part.dense_buffers:
            candidates = {id(t): t for row in tensors for t in row}.values()
        if not all(t.is_contiguous() for t in candidates):
            if through_op:  # the op takes any one dense layout per tensor (channels-last weights)
                keep = _same_dense_layout(tensors)
                candidates = [t for i, column in enumerate(zip(*tensors)) if not keep[i] for t in column]
            staged = [(t, t.contiguous()) for t in {id(t): t for t in candidates}.values() if not t.is_contiguous()]
        if staged:
            copies = {id(t): c for t, c in staged}
            tensors = [[copies.get(id(t), t) for t in row] for row in tensors]
    n = len(d.buffers)
    if through_op:  # the C++ op (fastnorm/csrc/optim.cpp; on a GPU, optim_cuda.cpp launches)
        buffers = [[] if row is None else tensors[2 + i] for i, row in enumerate(part.buffers[:n])]
        if d.counts_steps:
            _OPS[d.name](tensors[0], tensors[1], *buffers, part.steps, **options)
        elif d.clone_first is not None:
            cloned = part.buffers[d.clone_first] is not None
            _OPS[d.name](tensors[0], tensors[1], *buffers, **options, first_step=part.first_step if cloned else [])
        else:
            _OPS[d.name](tensors[0], tensors[1], *buffers, **options)
    elif (table := getattr(backend.kernels, f"{d.name}_step_table", None)) is not None:
        if addrs is None:
            addrs = np.array([[t.data_ptr() for t in row] for row in tensors], np.int64)
        if d.counts_steps:
            args = (part.step_ptrs, part.steps[0].dtype == torch.float64)
        else:
            args = (part.first_step,) if d.clone_first is not None else ()
        table(addrs, part.numels, part.kernel_dtype, *args, **options)
    else:
        arrays = [[backend.as_array(t) for t in row] for row in tensors]
        buffers = [None if row is None else arrays[2 + i] for i, row in enumerate(part.buffers[:n])]
        if d.counts_steps:
            extra = ([backend.as_array(s) for s in part.steps],)
        else:
            extra = (part.first_step,) if d.clone_first is not None else ()
        getattr(backend.kernels, f"{d.name}_step")(arrays[0], arrays[1], *buffers, *extra, **options)
    if not staged and part.masters is None:
        return
    with torch.no_grad():  # parameters are leaves that require grad (torch's step runs under no_grad too)
        for original, copy in staged:
            original.copy_(copy)
        if part.masters is not None:  # the 16-bit parameter: its float32 master, rounded once
            for p, master in zip(part.params, part.masters):
                p.copy_(master)
            part.master_seen = [_mark(p) for p in part.params]


def _cuda_op(backend: Backend, tensors: list[list[torch.Tensor]]) -> bool:
    """Whether the cuda backend's update of these tensors runs through the C++ op (CUDA tensors,
    the C++ ops can launch here: fastnorm._ops.cuda_available, and the backend allows them:
    fastnorm._dispatch.cpp_cuda_allowed); else its Python launcher."""
    return (
        backend.name == "cuda"
        and backend.cpp_cuda
        and bool(tensors[0])
        and tensors[0][0].is_cuda
        and (_ops.cuda_available())
    )


_DENSE_FORMATS = {4: torch.channels_last, 5: torch.channels_last_3d}


def _same_dense_layout(rows: list[list[torch.Tensor]]) -> list[bool]:
    """Per tensor index, whether the parameter is dense (contiguous or channels-last) and its
    gradient and state buffers have its very strides: an elementwise update then runs over their
    memory as it lies (the op's own check, fastnorm/csrc/optim.cpp), without staging copies."""
    keep = []
    for column in zip(*rows):
        p = column[0]
        fmt = _DENSE_FORMATS.get(p.dim())
        dense = p.is_contiguous() or (fmt is not None and p.is_contiguous(memory_format=fmt))
        strides = p.stride()
        keep.append(dense and all(t.stride() == strides for t in column))
    return keep


class _Ops(dict):
    """op name -> ``torch.ops.fastnorm.<op>_.default`` (looked up once the ops are registered)."""

    def __missing__(self, op: str):
        _ops.load()
        fn = self[op] = getattr(torch.ops.fastnorm, f"{op}_").default
        return fn


_OPS = _Ops()


@torch.compiler.assume_constant_result
def _traced_backend(backend: str, op: str, device_type: str, kind: str, numel: int) -> str:
    """The backend a group's update resolves to, while torch.compile traces (a constant of the graph)."""
    small = _dispatch.auto_prefers_torch(kind, numel, device_type)
    try:
        return _dispatch._resolve(backend, op, torch.device(device_type), small).name
    except ValueError:
        return "torch"
