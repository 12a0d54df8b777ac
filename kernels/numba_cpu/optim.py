"""Fused multi-tensor optimizer updates on CPU threads with Numba.

Book: "Deep Learning from Scratch", section 6.1; the formulas are torch.optim's, exactly as in
kernels/reference/optim.py (the readable version these kernels are tested against).

Design: a chunk table over separate tensors
-------------------------------------------
A parameter group's tensors stay where they are (``model.parameters()`` remain ordinary tensors,
``zero_grad(set_to_none=True)`` keeps working, checkpoints keep torch's layout). One compiled
call per group and step receives

* ``addrs``: an int64 table (buffers x tensors) of data addresses: parameter, gradient and each
  state buffer of every tensor (all of one dtype, each dense with the parameter's layout);
* a chunk table: (tensor, start, stop) rows cutting every tensor into pieces of CHUNK elements,
  so that one parallel loop over chunks balances threads across tensors of any sizes (the MLP's
  10-value bias and its 200,704-value weight alike); starts and stops are int64, so tensors
  beyond 2**31 elements index correctly;
* per-tensor step pointers: the step counters (torch's ``state["step"]`` scalar tensors) are
  incremented in a serial prologue of the same call, which then computes each tensor's
  step-dependent scalars (Adam's lr / (1 - beta1^t) and sqrt(1 - beta2^t), Adagrad's
  lr / (1 + (t-1) lr_decay)) once per tensor in float64, as torch does on the host.

Inside a chunk every element's whole update (weight decay, moments, bias-corrected step) is one
pass that reads each buffer once and writes it once, in the parameter's dtype with constants of
that dtype (an integer literal or a float64 constant would widen float32 vectors, see
../shared/NUMBA-NOTES.md), under ``error_model="numpy"`` so the divisions vectorise. Option flags
are loop-invariant branches that LLVM unswitches out of the vectorised loops.

The list-of-arrays functions (``adam_step`` etc., the API every backend shares) build the same
table from the arrays' addresses; fastnorm's optimizers call the ``*_table`` entry points with
addresses taken from torch tensors directly, which keeps a step's host work to a few microseconds.
"""

from __future__ import annotations

import functools
import math
import sys

import numba
import numpy as np
from numba import njit, prange, types
from numba.extending import intrinsic

from .._list_api import ListAPI
from ._validate import FLOAT_DTYPES

CHUNK = 1 << 15  # elements per chunk of the parallel loop (the MLP's weight: 7 chunks)


@intrinsic
def _pointer(typingctx, addr, like):
    """int64 address -> typed pointer to elements of ``like``'s type (a float32/float64 scalar)."""
    ptr_type = types.CPointer(like)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(ptr_type))

    return ptr_type(types.int64, like), codegen


@njit(inline="always")
def _chunk(addr, lo, hi, zero):
    """The elements lo..hi-1 of the tensor at ``addr`` as a 1-D array."""
    return numba.carray(_pointer(addr, zero), hi)[lo:hi]


@njit(inline="always")
def _read_step(addr, is_f64):
    if is_f64:
        return numba.carray(_pointer(addr, np.float64(0)), 1)[0]
    return np.float64(numba.carray(_pointer(addr, np.float32(0)), 1)[0])


@njit(inline="always")
def _advance_step(addr, is_f64):
    """step += 1 in the tensor at ``addr`` (float32 or float64 scalar); returns the new value."""
    if is_f64:
        s = numba.carray(_pointer(addr, np.float64(0)), 1)
        s[0] += 1.0
        return s[0]
    s32 = numba.carray(_pointer(addr, np.float32(0)), 1)
    s32[0] += np.float32(1.0)
    return np.float64(s32[0])


@functools.lru_cache(maxsize=256)
def chunk_table(numels: tuple[int, ...], chunk: int = CHUNK) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tensor index, start, stop) of every chunk, int64. Depends on the sizes only."""
    tensor, start, stop = [], [], []
    for t, n in enumerate(numels):
        for lo in range(0, n, chunk):
            tensor.append(t)
            start.append(lo)
            stop.append(min(n, lo + chunk))
    as64 = functools.partial(np.array, dtype=np.int64)
    return as64(tensor), as64(start), as64(stop)


# -- kernels ----------------------------------------------------------------------------------
# ``k``: the per-group constants, already in the parameters' dtype (host-computed, so no float64
# constant widens a float32 loop); ``k[0]`` also types the pointers.

# "contract": fused multiply-adds, as ATen's vectorised add(alpha=...) uses (vec::fmadd); with it
# the numba SGD stays bit-identical to torch's default through 400 MNIST training steps.
_FLAGS = dict(parallel=True, cache=True, error_model="numpy", nogil=True, fastmath={"contract"})


@njit(**_FLAGS)
def _sgd(addrs, ct, cs, ce, first_step, k, has_wd, momentum_on, nesterov):
    # addrs rows: param, grad, momentum_buffer (when momentum != 0)
    # k: sign, lr, weight_decay, momentum, 1 - dampening
    sign, lr, wd, mu, damp = k[0], k[1], k[2], k[3], k[4]
    for c in prange(ct.size):
        t, lo, hi = ct[c], cs[c], ce[c]
        p = _chunk(addrs[0, t], lo, hi, sign)
        g = _chunk(addrs[1, t], lo, hi, sign)
        if not momentum_on:
            for i in range(hi - lo):
                d = g[i] * sign
                if has_wd:
                    d = d + wd * p[i]
                p[i] = p[i] - lr * d
        else:
            b = _chunk(addrs[2, t], lo, hi, sign)
            fresh = first_step[t] != 0
            for i in range(hi - lo):
                d = g[i] * sign
                if has_wd:
                    d = d + wd * p[i]
                bi = d if fresh else b[i] * mu + damp * d
                b[i] = bi
                if nesterov:
                    d = d + mu * bi
                else:
                    d = bi
                p[i] = p[i] - lr * d


@njit(**_FLAGS)
def _adagrad(addrs, ct, cs, ce, steps, step_f64, clrs, advance, lr, lr_decay, k, has_wd):
    # addrs rows: param, grad, sum; k: sign, weight_decay, eps
    sign, wd, eps = k[0], k[1], k[2]
    clr = np.empty(clrs.size, k.dtype)
    for t in range(clrs.size):
        if advance:
            step = _advance_step(steps[t], step_f64)
            clrs[t] = lr / (1.0 + (step - 1.0) * lr_decay)
        clr[t] = clrs[t]
    for c in prange(ct.size):
        t, lo, hi = ct[c], cs[c], ce[c]
        p = _chunk(addrs[0, t], lo, hi, sign)
        g = _chunk(addrs[1, t], lo, hi, sign)
        s = _chunk(addrs[2, t], lo, hi, sign)
        lr_t = clr[t]
        for i in range(hi - lo):
            gi = g[i] * sign
            if has_wd:
                gi = gi + wd * p[i]
            si = s[i] + gi * gi
            s[i] = si
            p[i] = p[i] - lr_t * (gi / (np.sqrt(si) + eps))


@njit(**_FLAGS)
def _rmsprop(addrs, ct, cs, ce, steps, step_f64, k, has_wd, low, centered, momentum_on):
    # addrs rows: param, grad, square_avg, grad_avg (centered), momentum_buffer (momentum > 0)
    # k: sign, weight_decay, alpha, 1 - alpha, eps, lr, momentum
    for t in range(steps.size):
        _advance_step(steps[t], step_f64)
    sign, wd, a_, w, eps, lr, mu = k[0], k[1], k[2], k[3], k[4], k[5], k[6]
    for c in prange(ct.size):
        t, lo, hi = ct[c], cs[c], ce[c]
        p = _chunk(addrs[0, t], lo, hi, sign)
        g = _chunk(addrs[1, t], lo, hi, sign)
        v = _chunk(addrs[2, t], lo, hi, sign)
        ga = _chunk(addrs[3, t], lo, hi, sign)
        b = _chunk(addrs[4, t], lo, hi, sign)
        for i in range(hi - lo):
            gi = g[i] * sign
            if has_wd:
                gi = gi + wd * p[i]
            vi = v[i] * a_ + w * gi * gi
            v[i] = vi
            if centered:
                # ATen's lerp: start + w*(end-start) if w < 0.5, else end - (end-start)*(1-w)
                ai = ga[i] + w * (gi - ga[i]) if low else gi - (gi - ga[i]) * a_
                ga[i] = ai
                avg = np.sqrt(vi - ai * ai) + eps
            else:
                avg = np.sqrt(vi) + eps
            if momentum_on:
                bi = b[i] * mu + gi / avg
                b[i] = bi
                p[i] = p[i] - lr * bi
            else:
                p[i] = p[i] - lr * (gi / avg)


@njit(**_FLAGS)
def _adam(addrs, ct, cs, ce, steps, step_f64, step_sizes, bc2_sqrts, advance, lr, beta1, beta2, k,
          coupled, low, amsgrad):  # fmt: skip
    # addrs rows: param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq (amsgrad)
    # k: sign, decoupled decay factor (1 - lr*wd, or 1), weight_decay, 1 - beta1, beta1, beta2, 1 - beta2, eps
    sign, decay, wd, w1, b1, b2, w2, eps = k[0], k[1], k[2], k[3], k[4], k[5], k[6], k[7]
    ss = np.empty(step_sizes.size, k.dtype)
    bc = np.empty(step_sizes.size, k.dtype)
    for t in range(step_sizes.size):
        if advance:
            step = _advance_step(steps[t], step_f64)
            step_sizes[t] = lr / (1.0 - beta1**step)
            bc2_sqrts[t] = math.sqrt(1.0 - beta2**step)
        ss[t] = step_sizes[t]
        bc[t] = bc2_sqrts[t]
    for c in prange(ct.size):
        t, lo, hi = ct[c], cs[c], ce[c]
        p = _chunk(addrs[0, t], lo, hi, sign)
        g = _chunk(addrs[1, t], lo, hi, sign)
        m = _chunk(addrs[2, t], lo, hi, sign)
        v = _chunk(addrs[3, t], lo, hi, sign)
        vmax = _chunk(addrs[4, t], lo, hi, sign)
        ss_t, bc_t = ss[t], bc[t]
        for i in range(hi - lo):
            pi = p[i] * decay
            gi = g[i] * sign
            if coupled:
                gi = gi + wd * pi
            mi = m[i] + w1 * (gi - m[i]) if low else gi - (gi - m[i]) * b1
            vi = v[i] * b2 + w2 * gi * gi
            m[i] = mi
            v[i] = vi
            if amsgrad:
                if vi > vmax[i] or vi != vi:  # torch.maximum propagates NaN
                    vmax[i] = vi
                vi = vmax[i]
            p[i] = pi - ss_t * (mi / (np.sqrt(vi) / bc_t + eps))


# -- table entry points (fastnorm's optimizers call these) --------------------------------------

def _prepare(addrs, numels, dtype, rows: int, *constants):
    """Validate a table; returns (constants in dtype, chunk table)."""
    dtype = np.dtype(dtype)
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"the numba optimizers update float32 or float64 tensors, got {dtype}")
    numels = tuple(int(n) for n in numels)
    if addrs.dtype != np.int64 or addrs.shape != (rows, len(numels)):
        raise ValueError(f"addrs must be an int64 ({rows}, {len(numels)}) table, got {addrs.dtype} {addrs.shape}")
    return np.array(constants, dtype), chunk_table(numels)


def _sign(maximize: bool) -> float:
    return -1.0 if maximize else 1.0


def sgd_step_table(addrs, numels, dtype, first_step, *, lr, weight_decay, momentum, dampening, nesterov, maximize):
    """SGD over a table of tensors: addrs rows param, grad, momentum_buffer (repeat the grad row
    when momentum == 0); first_step: int8 (T,), 1 where a momentum buffer is new."""
    k, (ct, cs, ce) = _prepare(addrs, numels, dtype, 3, _sign(maximize), lr, weight_decay, momentum, 1.0 - dampening)
    _sgd(addrs, ct, cs, ce, first_step, k, weight_decay != 0, momentum != 0, bool(nesterov))


def adagrad_step_table(addrs, numels, dtype, steps, step_f64, clrs=None, *, lr, lr_decay, weight_decay, eps, maximize):
    """Adagrad over a table: rows param, grad, sum. ``steps``: int64 (T,) addresses of the step
    counters, advanced here and turned into clr = lr / (1 + (step-1) lr_decay); or ``clrs`` given."""
    k, (ct, cs, ce) = _prepare(addrs, numels, dtype, 3, _sign(maximize), weight_decay, eps)
    advance = clrs is None
    clrs = np.empty(len(numels)) if advance else np.ascontiguousarray(clrs, np.float64)
    _adagrad(addrs, ct, cs, ce, steps, bool(step_f64), clrs, advance, float(lr), float(lr_decay), k, weight_decay != 0)


def rmsprop_step_table(addrs, numels, dtype, steps, step_f64, *, lr, alpha, eps, weight_decay, momentum, centered, maximize):
    """RMSprop over a table: rows param, grad, square_avg, grad_avg, momentum_buffer (unused rows
    may repeat square_avg); the step counters at ``steps`` are advanced."""
    k, (ct, cs, ce) = _prepare(addrs, numels, dtype, 5, _sign(maximize), weight_decay, alpha, 1.0 - alpha, eps, lr, momentum)
    _rmsprop(addrs, ct, cs, ce, steps, bool(step_f64), k, weight_decay != 0, 1.0 - alpha < 0.5, bool(centered), momentum > 0)


def adam_step_table(addrs, numels, dtype, steps, step_f64, step_sizes=None, bias_correction2_sqrts=None, *,
                    lr, beta1, beta2, eps, weight_decay, decoupled_weight_decay, amsgrad, maximize):  # fmt: skip
    """Adam/AdamW over a table: rows param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq (repeat
    exp_avg_sq without amsgrad). The step counters at ``steps`` are advanced here and the bias
    corrections computed from them in float64; or ``step_sizes`` and ``bias_correction2_sqrts`` given."""
    decay = 1.0 - lr * weight_decay if decoupled_weight_decay else 1.0
    k, (ct, cs, ce) = _prepare(addrs, numels, dtype, 5, _sign(maximize), decay, weight_decay, 1.0 - beta1,
                               beta1, beta2, 1.0 - beta2, eps)  # fmt: skip
    advance = step_sizes is None
    t = len(numels)
    step_sizes = np.empty(t) if advance else np.ascontiguousarray(step_sizes, np.float64)
    bc2 = np.empty(t) if advance else np.ascontiguousarray(bias_correction2_sqrts, np.float64)
    _adam(addrs, ct, cs, ce, steps, bool(step_f64), step_sizes, bc2, advance, float(lr), float(beta1),
          float(beta2), k, weight_decay != 0 and not decoupled_weight_decay, 1.0 - beta1 < 0.5, bool(amsgrad))  # fmt: skip


# -- the list-of-arrays API shared by every backend ----------------------------------------------


def _table(*rows):
    """int64 address table of lists of arrays (all C-contiguous, one dtype, matching sizes)."""
    first = rows[0]
    dtype = first[0].dtype if first else np.dtype(np.float32)
    numels = tuple(a.size for a in first)
    for row in rows:
        for a, n in zip(row, numels):
            if not isinstance(a, np.ndarray) or a.dtype != dtype or a.size != n or not a.flags.c_contiguous:
                raise ValueError("every array must be a C-contiguous array of its parameter's dtype and size")
    return np.array([[a.ctypes.data for a in row] for row in rows], np.int64).reshape(len(rows), len(first)), numels, dtype


_API = ListAPI(_table, sys.modules[__name__])
sgd_step, adagrad_step, rmsprop_step, adam_step = _API.sgd_step, _API.adagrad_step, _API.rmsprop_step, _API.adam_step
