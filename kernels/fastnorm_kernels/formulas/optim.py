"""Per-element optimizer updates and per-tensor step scalars ("Deep Learning from Scratch" 6.1).

Every update has one signature, so that one loop per backend drives them all:

    update(p, g, b0, b1, b2, k, s0, s1, flags, use0, use1, use2) -> (p, b0, b1, b2)

``p`` and ``g`` are one element of the parameter and its gradient, ``b0..b2`` the same element
of up to three state buffers, ``k`` a tuple of per-group constants in the compute dtype,
``s0, s1`` per-tensor scalars (see ``*_tensor_scalars``) and ``flags`` a tuple of per-group
booleans that only change arithmetic. ``use0..use2`` say which buffers exist (momentum on,
centered, amsgrad): the loops pass them as constants, one loop version per combination, so
that these branches are decided at compile time (a buffer branch left for LLVM, such as
amsgrad's NaN-propagating max, stopped the CPU loop from vectorising). An unused buffer is
neither read nor written: its row may alias another array. The formulas and their order of
operations are torch.optim's (kernels/fastnorm_kernels/reference/optim.py spells them out), including ATen's
two-sided ``lerp``.

``*_tensor_scalars(step, host) -> (s0, s1)``: the step-dependent scalars of one tensor,
computed in float64 from its step count after the increment (``host``: float64 group values).
``update_element`` is the loops' body: it reads, updates and writes one element.
"""

from __future__ import annotations

import math


def update_element(update, p, g, b0, b1, b2, i, k, s0, s1, flags, use0, use1, use2):
    """Element ``i`` of the (chunk) arrays p, g, b0..b2 read, updated by ``update``, written:
    the one function here that touches arrays, shared by the CPU and GPU loops. A buffer with
    ``use*`` false is neither read nor written (its row may alias another array)."""
    like = k[0]
    x0 = b0[i] if use0 else like
    x1 = b1[i] if use1 else like
    x2 = b2[i] if use2 else like
    p[i], v0, v1, v2 = update(p[i], g[i], x0, x1, x2, k, s0, s1, flags, use0, use1, use2)
    if use0:
        b0[i] = v0
    if use1:
        b1[i] = v1
    if use2:
        b2[i] = v2


def update_element_16(update, load, store, p, g, b0, b1, b2, i, k, s0, s1, flags, use0, use1, use2, keys, e):
    """:func:`update_element` for 16-bit storage (kernels/fastnorm_kernels/_bits.py): every value widened to
    float32 by ``load``, updated in float32 (``k``, ``s0``, ``s1`` are float32), each stored
    value rounded once by ``store(x, key, e)``. ``keys``: the stochastic rounding keys of rows
    param, b0, b1, b2; ``e``: the element's index in its tensor (uint32)."""
    like = k[0]
    x0 = load(b0[i]) if use0 else like
    x1 = load(b1[i]) if use1 else like
    x2 = load(b2[i]) if use2 else like
    q, v0, v1, v2 = update(load(p[i]), load(g[i]), x0, x1, x2, k, s0, s1, flags, use0, use1, use2)
    p[i] = store(q, keys[0], e)
    if use0:
        b0[i] = store(v0, keys[1], e)
    if use1:
        b1[i] = store(v1, keys[2], e)
    if use2:
        b2[i] = store(v2, keys[3], e)


def no_tensor_scalars(step, host):
    """For updates without step-dependent scalars."""
    return 0.0, 0.0


# -- SGD: momentum, Nesterov, dampening, weight decay --------------------------------------------
# k = (sign, lr, weight_decay, momentum, 1 - dampening); flags = (has_weight_decay, nesterov);
# b0 = momentum_buffer (use0: momentum != 0); s0 != 0 where the buffer is new this step (torch
# clones d into it).


def sgd(p, g, buf, unused1, unused2, k, fresh, unused_s1, flags, momentum_on, use1, use2):
    sign, lr, weight_decay, momentum, one_minus_dampening = k
    has_weight_decay, nesterov = flags
    d = g * sign
    if has_weight_decay:
        d = d + weight_decay * p
    if momentum_on:
        buf = d if fresh != 0 else buf * momentum + one_minus_dampening * d
        d = d + momentum * buf if nesterov else buf
    return p - lr * d, buf, unused1, unused2


# -- AdaGrad ------------------------------------------------------------------------------------
# k = (sign, weight_decay, eps); flags = (has_weight_decay,); b0 = sum; s0 = clr.


def adagrad(p, g, state_sum, unused1, unused2, k, clr, unused_s1, flags, use0, use1, use2):
    sign, weight_decay, eps = k
    (has_weight_decay,) = flags
    g = g * sign
    if has_weight_decay:
        g = g + weight_decay * p
    state_sum = state_sum + g * g
    return p - clr * (g / (math.sqrt(state_sum) + eps)), state_sum, unused1, unused2


def adagrad_tensor_scalars(step, host):
    """host = (lr, lr_decay): clr = lr / (1 + (step - 1) * lr_decay)."""
    lr, lr_decay = host[0], host[1]
    return lr / (1.0 + (step - 1.0) * lr_decay), 0.0


# -- RMSprop ------------------------------------------------------------------------------------
# k = (sign, weight_decay, alpha, 1 - alpha, eps, lr, momentum); flags = (has_weight_decay,
# lerp_from_start); b0 = square_avg, b1 = grad_avg (use1: centered), b2 = momentum_buffer (use2:
# momentum > 0).


def rmsprop(p, g, square_avg, grad_avg, buf, k, unused_s0, unused_s1, flags, use0, centered, momentum_on):
    sign, weight_decay, alpha, one_minus_alpha, eps, lr, momentum = k
    has_weight_decay, lerp_from_start = flags
    g = g * sign
    if has_weight_decay:
        g = g + weight_decay * p
    square_avg = square_avg * alpha + one_minus_alpha * g * g
    if centered:
        # ATen's lerp(grad_avg, g, 1 - alpha): from the start if the weight < 0.5, else from the end
        if lerp_from_start:
            grad_avg = grad_avg + one_minus_alpha * (g - grad_avg)
        else:
            grad_avg = g - (g - grad_avg) * alpha
        avg = math.sqrt(square_avg - grad_avg * grad_avg) + eps
    else:
        avg = math.sqrt(square_avg) + eps
    if momentum_on:
        buf = buf * momentum + g / avg
        p = p - lr * buf
    else:
        p = p - lr * (g / avg)
    return p, square_avg, grad_avg, buf


# -- Adam and AdamW -----------------------------------------------------------------------------
# k = (sign, decay, weight_decay, 1 - beta1, beta1, beta2, 1 - beta2, eps), decay = 1 - lr*wd for
# AdamW (decoupled) and 1 for Adam; flags = (coupled_weight_decay, lerp_from_start); b0 = exp_avg,
# b1 = exp_avg_sq, b2 = max_exp_avg_sq (use2: amsgrad); s0 = step_size, s1 = sqrt(bias_correction2).


def adam(p, g, exp_avg, exp_avg_sq, max_exp_avg_sq, k, step_size, bias_correction2_sqrt, flags, use0, use1, amsgrad):
    sign, decay, weight_decay, one_minus_beta1, beta1, beta2, one_minus_beta2, eps = k
    coupled_weight_decay, lerp_from_start = flags
    p = p * decay
    g = g * sign
    if coupled_weight_decay:
        g = g + weight_decay * p
    if lerp_from_start:  # ATen's lerp(exp_avg, g, 1 - beta1)
        exp_avg = exp_avg + one_minus_beta1 * (g - exp_avg)
    else:
        exp_avg = g - (g - exp_avg) * beta1
    exp_avg_sq = exp_avg_sq * beta2 + one_minus_beta2 * g * g
    second = exp_avg_sq
    if amsgrad:
        if exp_avg_sq > max_exp_avg_sq or exp_avg_sq != exp_avg_sq:  # torch.maximum propagates NaN
            max_exp_avg_sq = exp_avg_sq
        second = max_exp_avg_sq
    p = p - step_size * (exp_avg / (math.sqrt(second) / bias_correction2_sqrt + eps))
    return p, exp_avg, exp_avg_sq, max_exp_avg_sq


def adam_tensor_scalars(step, host):
    """host = (lr, beta1, beta2): step_size = lr / (1 - beta1^t), sqrt(1 - beta2^t)."""
    lr, beta1, beta2 = host[0], host[1], host[2]
    return lr / (1.0 - beta1**step), math.sqrt(1.0 - beta2**step)
