"""Synchronised BatchNorm over ``torch.distributed`` (gloo on CPU, NCCL on GPU).

When a batch is split across processes, each one computes its local statistics with the chosen
backend's kernels (count, mean and biased variance per channel); one ``all_gather`` brings every
rank's (count, mean, M2) to every rank, where they are merged exactly in float64 with Chan's
parallel formula (ranks may hold different batch sizes, or none). The backward all-reduces the
two per-channel sums the input gradient needs, sum(dy) and sum(dy * (x - mean)). Weight and bias
gradients stay local, as in torch's SyncBatchNorm: DistributedDataParallel averages them.
"""

from __future__ import annotations

import datetime
import os
import socket
import tempfile
import time
import traceback
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from fastnorm_kernels.formulas import batchnorm as formulas

from ._dispatch import Backend
from .autograd import _CHANNELS_LAST, _layout, channel_view


def _channel_shape(x: torch.Tensor) -> tuple[int, ...]:
    return (1, x.shape[1]) + (1,) * (x.dim() - 2)


class SyncBatchNormFunction(torch.autograd.Function):
    """Batch statistics over every rank of ``process_group``; see the module docstring."""

    @staticmethod
    def forward(ctx, input, weight, bias, running_mean, running_var, eps, momentum, process_group, world_size,
                backend: Backend):  # fmt: skip
        with backend.device_guard(input):
            return _sync_forward(ctx, input, weight, bias, running_mean, running_var, eps, momentum, process_group,
                                 world_size, backend)  # fmt: skip

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        with ctx.backend.device_guard(grad_output):
            return _sync_backward(ctx, grad_output)


def _sync_forward(ctx, input, weight, bias, running_mean, running_var, eps, momentum, process_group, world_size,
                  backend: Backend):  # fmt: skip
    x, cl = _layout(input)
    arrays = backend.arrays
    c = x.shape[1]
    count = x.numel() // c if c else 0
    f64 = dict(dtype=torch.float64, device=x.device)
    local = torch.zeros(1 + 2 * c, **f64)
    if count > 0:
        if backend.name == "numba":  # the C++ op (fastnorm/csrc/batch_norm.cpp)
            mean_l, var_l = torch.ops.fastnorm.batch_norm_stats.default(x)
        else:
            mean_l, var_l = torch.empty(c, **f64), torch.empty(c, **f64)
            mean_array, var_array = backend.as_array(mean_l), backend.as_array(var_l)
            backend.kernels.batch_norm_stats(arrays.kernel_array(x, cl), mean_array, var_array)
        local[0] = count
        local[1 : 1 + c] = mean_l
        local[1 + c :] = var_l * count  # M2
    gathered = [torch.empty_like(local) for _ in range(world_size)]
    dist.all_gather(gathered, local, group=process_group)
    stats = torch.stack(gathered)  # (world, 1 + 2C)
    counts, means, m2s = stats[:, :1], stats[:, 1 : 1 + c], stats[:, 1 + c :]
    total = counts.sum()
    total_n = int(total.item())
    if total_n <= 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size {input.size()} "
            f"on this rank and {total_n} value(s) per channel over the process group"
        )
    mean = (counts * means).sum(0) / total
    m2 = m2s.sum(0) + (counts * (means - mean) ** 2).sum(0)  # Chan: exact merge of groups
    var = m2 / total
    if running_mean is not None:  # kernels/fastnorm_kernels/formulas/batchnorm.py's arithmetic, on tensors
        running_mean.copy_(formulas.running_update(running_mean.double(), mean, momentum))
        unbiased = formulas.unbiased_var(var, total)
        running_var.copy_(formulas.running_update(running_var.double(), unbiased, momentum))
    mean_x, var_x = mean.to(x.dtype), var.to(x.dtype)
    if backend.name == "numba":  # the eval forward op normalises with the merged statistics
        y = torch.ops.fastnorm.batch_norm_forward.default(x, weight, bias, mean_x, var_x, False, 0.0, float(eps))[0]
    else:
        y, y_arr = arrays.empty_like(x, cl)
    if count > 0 and backend.name != "numba":
        backend.kernels.batch_norm_forward_eval(
            arrays.kernel_array(x, cl), channel_view(backend, weight), channel_view(backend, bias),
            backend.as_array(mean_x), backend.as_array(var_x), float(eps), y_arr,
        )  # fmt: skip
    invstd = torch.rsqrt(var + eps).to(x.dtype)
    ctx.save_for_backward(x, weight, mean_x, invstd)
    ctx.total = total_n
    ctx.channels_last = cl
    ctx.process_group = process_group
    ctx.backend = backend
    return y


def _sync_backward(ctx, grad_output):
    x, weight, mean, invstd = ctx.saved_tensors
    backend: Backend = ctx.backend
    arrays = backend.arrays
    cl = ctx.channels_last
    fmt = _CHANNELS_LAST[x.dim()] if cl else torch.contiguous_format
    dy = grad_output.contiguous(memory_format=fmt)
    c = x.shape[1]
    sum_dy = torch.zeros(c, dtype=x.dtype, device=x.device)
    sum_dy_xhat = torch.zeros(c, dtype=x.dtype, device=x.device)
    if x.numel() > 0 and backend.name == "numba":  # eval-mode sums of the backward op: sum(dy * xhat), sum(dy)
        _, sum_dy_xhat, sum_dy = torch.ops.fastnorm.batch_norm_backward.default(dy, x, None, mean, invstd, False,
                                                                                [False, True, True])  # fmt: skip
    elif x.numel() > 0:
        backend.kernels.batch_norm_backward(
            arrays.kernel_array(dy, cl), arrays.kernel_array(x, cl), backend.as_array(mean),
            backend.as_array(invstd), None, False, None, backend.as_array(sum_dy_xhat), backend.as_array(sum_dy),
        )  # fmt: skip
    # the input gradient needs the sums over every rank
    sums = torch.cat([sum_dy, sum_dy_xhat / invstd]).double()
    dist.all_reduce(sums, group=ctx.process_group)
    need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
    dx = None
    if need_dx:
        shape = _channel_shape(x)
        g_dy = (sums[:c] / ctx.total).to(x.dtype).view(shape)
        g_dyx = (sums[c:] / ctx.total).to(x.dtype).view(shape)
        inv = invstd.view(shape)
        scale = inv if weight is None else inv * weight.view(shape)
        dx = (dy - g_dy - (x - mean.view(shape)) * inv * inv * g_dyx) * scale
    return (dx, sum_dy_xhat if need_dw else None, sum_dy if need_db else None,
            None, None, None, None, None, None, None)  # fmt: skip


# -- running a function on N local processes (CPU: gloo on 127.0.0.1) -------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(
    rank: int, world_size: int, port: int, timeout_s: float, backend: str, fn: Callable, args: tuple, errors: str
) -> None:
    # share the cores between the processes: torch's and Numba's threads alike
    threads = max(1, (os.cpu_count() or 1) // world_size)
    torch.set_num_threads(threads)
    try:
        import numba

        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    except ImportError:
        pass
    try:
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout_s))  # fmt: skip
        try:
            fn(rank, world_size, *args)
        finally:
            dist.destroy_process_group()
    except BaseException:
        # when this rank fails, the time it failed: spawn() reports the first failure (the
        # cause), not the peers' "connection closed" that follows it
        with open(os.path.join(errors, f"rank{rank}.txt"), "w") as f:
            f.write(f"{time.time_ns()}\n{traceback.format_exc()}")
        raise


class RankFailed(RuntimeError):
    """A process of :func:`spawn` failed; the message is the first failing rank's traceback."""


def spawn(fn: Callable, nprocs: int, *args, timeout_s: float = 120.0, backend: str = "gloo") -> None:
    """Run ``fn(rank, world_size, *args)`` in ``nprocs`` processes joined in a process group.

    A collective that waits longer than ``timeout_s`` (e.g. for a rank that died) raises, so a
    failure on one rank ends the whole run with that rank's error instead of hanging: the error
    raised here (:class:`RankFailed`) names the rank that failed first and carries its traceback
    (the other ranks' errors, e.g. a closed connection, are consequences).
    ``fn`` must be importable (defined at a module's top level).
    """
    with tempfile.TemporaryDirectory(prefix="fastnorm-spawn-") as errors:
        try:
            torch.multiprocessing.spawn(_worker, args=(nprocs, free_port(), timeout_s, backend, fn, args, errors),
                                        nprocs=nprocs, join=True)  # fmt: skip
        except Exception as exc:
            first = _first_failure(errors)
            if first is None:
                raise
            rank, trace = first
            raise RankFailed(f"rank {rank} of {nprocs} failed first:\n{trace}") from exc


def _first_failure(errors: str) -> tuple[int, str] | None:
    failures = []
    for name in os.listdir(errors):
        with open(os.path.join(errors, name)) as f:
            stamp, _, trace = f.read().partition("\n")
        failures.append((int(stamp), int(name[4:-4]), trace))
    if not failures:
        return None
    _, rank, trace = min(failures)
    return rank, trace
