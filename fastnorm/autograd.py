"""``torch.autograd.Function`` wrappers that route tensors to a backend's kernels.

Tensors reach the kernels zero-copy (``Tensor.numpy()`` on CPU, ``__cuda_array_interface__``
on GPU); outputs are allocated here, by torch, and the kernels write into them.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from ._dispatch import Backend


def _arr(backend: Backend, t: torch.Tensor | None):
    return None if t is None else backend.as_array(t)


class BatchNormFunction(torch.autograd.Function):
    """Batch Normalization with a fastnorm backend's forward and backward kernels.

    Forward (training): ``y = (x - mean) * invstd * weight + bias`` with per-channel batch
    statistics over every axis but 1, and the running statistics updated in place.
    Forward (eval): the same with ``running_mean`` and ``1/sqrt(running_var + eps)``.
    Backward: ``dx``, ``dweight = sum(dy * xhat)``, ``dbias = sum(dy)``.

    Inputs are validated by :func:`fastnorm.functional.batch_norm`; call that, not this.
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
    ) -> torch.Tensor:
        n, c = input.shape[0], input.shape[1]
        x = input.contiguous().view(n, c, -1)  # (N, C, S)
        y = torch.empty(input.shape, dtype=input.dtype, device=input.device)
        y3 = y.view(x.shape)  # the kernels see (N, C, S); autograd sees y, not a view
        A = backend.as_array
        if training:
            mean = x.new_empty(c)
            invstd = x.new_empty(c)
            backend.kernels.batch_norm_forward_train(
                A(x), _arr(backend, weight), _arr(backend, bias),
                _arr(backend, running_mean), _arr(backend, running_var),
                float(momentum), float(eps), A(y3), A(mean), A(invstd),
            )  # fmt: skip
        else:
            backend.kernels.batch_norm_forward_eval(
                A(x), _arr(backend, weight), _arr(backend, bias),
                A(running_mean), A(running_var), float(eps), A(y3),
            )  # fmt: skip
            if any(ctx.needs_input_grad[:3]):
                # constants of the eval forward, frozen now (the buffers may change later)
                mean = running_mean.detach().clone()
                invstd = torch.rsqrt(running_var.detach() + eps)
            else:
                mean = invstd = None
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.training = training
        ctx.backend = backend
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: torch.Tensor):
        x, weight, mean, invstd = ctx.saved_tensors
        backend: Backend = ctx.backend
        need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
        dy = grad_output.contiguous().view(x.shape)
        c = x.shape[1]
        dx = torch.empty(grad_output.shape, dtype=x.dtype, device=x.device) if need_dx else None
        dweight = x.new_empty(c) if need_dw else None
        dbias = x.new_empty(c) if need_db else None
        backend.kernels.batch_norm_backward(
            backend.as_array(dy), backend.as_array(x), backend.as_array(mean),
            backend.as_array(invstd), _arr(backend, weight), ctx.training,
            None if dx is None else backend.as_array(dx.view(x.shape)),
            _arr(backend, dweight), _arr(backend, dbias),
        )  # fmt: skip
        return dx, dweight, dbias, None, None, None, None, None, None
