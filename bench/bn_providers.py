"""BatchNorm providers without a Python module around them, shared by the bench suite
(bench/test_bench_batchnorm.py) and the byte profile (bench/bn_profile.py).

``prealloc_fn``: torch's own kernels (``aten::native_batch_norm`` and its backward, ``.out``
variants) into outputs allocated once, no autograd. ``kernels_fn``: fastnorm's numba kernels the
same way, called on the tensors' addresses (fastnorm_kernels.numba_cpu's address entry points). ``mode``:
forward_train, forward_eval, backward or forward_backward; each returns a function of no
arguments that runs one call (the forward has run once already, so the backward has statistics).
"""

from __future__ import annotations

import math

import numpy as np
import torch

import fastnorm_kernels.numba_cpu as kn


def _geometry(x: torch.Tensor, channels_last: bool) -> tuple[int, int, int]:
    """(N, C, S) as the kernels see x: (N*H*W, C, 1) for channels-last memory."""
    c = x.shape[1]
    if channels_last:
        return x.numel() // c, c, 1
    return x.shape[0], c, math.prod(x.shape[2:])


def prealloc_fn(mode: str, x: torch.Tensor, dy: torch.Tensor):
    """torch's BatchNorm kernels into outputs allocated once, no autograd."""
    c = x.shape[1]
    aten = torch.ops.aten
    w = torch.empty(c, device=x.device).uniform_(0.5, 1.5)
    b = torch.empty(c, device=x.device).uniform_(-0.5, 0.5)
    rm, rv = torch.zeros(c, device=x.device), torch.ones(c, device=x.device)
    y, dx = torch.empty_like(x), torch.empty_like(x)
    sm, si, dw, db = (torch.empty(c, device=x.device) for _ in range(4))
    training = mode != "forward_eval"

    def forward():
        aten.native_batch_norm.out(x, w, b, rm, rv, training, 0.1, 1e-5, out=y, save_mean=sm, save_invstd=si)

    def backward():
        aten.native_batch_norm_backward.out(dy, x, w, rm, rv, sm, si, True, 1e-5, [True, True, True],
                                            out0=dx, out1=dw, out2=db)  # fmt: skip

    return _for_mode(mode, forward, forward, backward)  # (forward reads ``training`` from the mode)


def kernels_fn(mode: str, x: torch.Tensor, dy: torch.Tensor, channels_last: bool):
    """fastnorm's numba kernels on the tensors' addresses into outputs allocated once, no autograd."""
    n, c, s = geometry = _geometry(x, channels_last)
    parallel, rows_per_chunk, block, backward_block = kn.plan(n, c, s, x.element_size())
    like = np.float32(0)
    w = torch.empty(c).uniform_(0.5, 1.5)
    b = torch.empty(c).uniform_(-0.5, 0.5)
    rm, rv = torch.zeros(c), torch.ones(c)
    y, dx = torch.empty_like(x), torch.empty_like(x)
    stats, dw, db = torch.empty(2, c), torch.empty(c), torch.empty(c)  # stats: the mean and invstd
    # every address is read from a tensor the closures hold, at each call (none outlives its tensor)

    def forward():
        kn.forward_train_at(like, like, x.data_ptr(), w.data_ptr(), b.data_ptr(), rm.data_ptr(), rv.data_ptr(),
                            y.data_ptr(), stats[0].data_ptr(), stats[1].data_ptr(), *geometry, 0.1, 1e-5,
                            parallel, rows_per_chunk, block)  # fmt: skip

    def forward_eval():
        kn.forward_eval_at(like, like, x.data_ptr(), w.data_ptr(), b.data_ptr(), rm.data_ptr(), rv.data_ptr(),
                           y.data_ptr(), *geometry, 1e-5, parallel, rows_per_chunk)  # fmt: skip

    def backward():
        kn.backward_at(like, like, dy.data_ptr(), x.data_ptr(), stats[0].data_ptr(), stats[1].data_ptr(),
                       w.data_ptr(), True, dx.data_ptr(), dw.data_ptr(), db.data_ptr(), *geometry, parallel,
                       rows_per_chunk, backward_block)  # fmt: skip

    return _for_mode(mode, forward, forward_eval, backward)


def _for_mode(mode: str, forward, forward_eval, backward):
    """The function of one call for ``mode``; the training forward runs once first, so that the
    backward has statistics to read."""
    forward()
    if mode == "forward_train":
        return forward
    if mode == "forward_eval":
        return forward_eval
    if mode == "backward":
        return backward

    def forward_backward():
        forward()
        backward()

    return forward_backward
