"""Per-element optimizer updates and their descriptions ("Deep Learning from Scratch" 6.1).

Each optimizer is here once: its element update, a plain function on scalars whose parameters are
named (``p``, ``g``, its state buffers by their ``state_dict`` keys, ``has_<buffer>`` where a
buffer may be absent, and the constants, flags and per-tensor scalars its description names), and
its :class:`~fastnorm_kernels._description.Optimizer` record in :data:`OPTIMIZERS`, from which the
kernel tables, the C++ op and the Python class follow (kernels/fastnorm_kernels/_description.py
says how). Constants arrive in the compute dtype (float32 for 16-bit storage); flags and the
``has_*`` values are decided per launch, so the loops compile one version per combination of
buffers. An absent buffer is neither read nor written. The formulas and their order of operations
are torch.optim's (kernels/fastnorm_kernels/reference/optim.py spells them out), including ATen's
two-sided ``lerp``.

``*_tensor_scalars(step, host) -> (s0, s1)``: the step-dependent scalars of one tensor, computed
in float64 from its step count after the increment (``host``: float64 option values).
``update_element`` is the loops' body: it reads, updates and writes one element through the
positional adapter of an update (``Optimizer.element_source``).

Adding an optimizer: its update and record here, its readable NumPy version in
kernels/fastnorm_kernels/reference/optim.py; every compiled backend, the C++ op and the class in
fastnorm/optim.py derive from the record.
"""

from __future__ import annotations

import math

from .._description import Buffer, EightBit, Option, sign
from .._description import Optimizer as _Optimizer


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


def sgd(p, g, momentum_buffer, has_momentum_buffer, sign, lr, weight_decay, momentum, one_minus_dampening,
        has_weight_decay, nesterov, fresh):  # fmt: skip
    """``fresh`` != 0 where the momentum buffer is new this step (torch clones d into it)."""
    d = g * sign
    if has_weight_decay:
        d = d + weight_decay * p
    if has_momentum_buffer:
        momentum_buffer = d if fresh != 0 else momentum_buffer * momentum + one_minus_dampening * d
        d = d + momentum * momentum_buffer if nesterov else momentum_buffer
    return p - lr * d, momentum_buffer


# -- AdaGrad ------------------------------------------------------------------------------------


def adagrad(p, g, sum, sign, weight_decay, eps, has_weight_decay, clr):  # noqa: A002 - torch's state key
    g = g * sign
    if has_weight_decay:
        g = g + weight_decay * p
    sum = sum + g * g  # noqa: A001
    return p - clr * (g / (math.sqrt(sum) + eps)), sum


def adagrad_tensor_scalars(step, host):
    """host = (lr, lr_decay): clr = lr / (1 + (step - 1) * lr_decay)."""
    lr, lr_decay = host[0], host[1]
    return lr / (1.0 + (step - 1.0) * lr_decay), 0.0


# -- RMSprop ------------------------------------------------------------------------------------


def rmsprop(p, g, square_avg, grad_avg, momentum_buffer, has_grad_avg, has_momentum_buffer, sign, weight_decay,
            alpha, one_minus_alpha, eps, lr, momentum, has_weight_decay, lerp_from_start):  # fmt: skip
    g = g * sign
    if has_weight_decay:
        g = g + weight_decay * p
    square_avg = square_avg * alpha + one_minus_alpha * g * g
    if has_grad_avg:  # centered
        # ATen's lerp(grad_avg, g, 1 - alpha): from the start if the weight < 0.5, else from the end
        if lerp_from_start:
            grad_avg = grad_avg + one_minus_alpha * (g - grad_avg)
        else:
            grad_avg = g - (g - grad_avg) * alpha
        avg = math.sqrt(square_avg - grad_avg * grad_avg) + eps
    else:
        avg = math.sqrt(square_avg) + eps
    if has_momentum_buffer:
        momentum_buffer = momentum_buffer * momentum + g / avg
        p = p - lr * momentum_buffer
    else:
        p = p - lr * (g / avg)
    return p, square_avg, grad_avg, momentum_buffer


# -- Adam and AdamW -----------------------------------------------------------------------------


def adam(p, g, exp_avg, exp_avg_sq, max_exp_avg_sq, has_max_exp_avg_sq, sign, decay, weight_decay, one_minus_beta1,
         beta1, beta2, one_minus_beta2, eps, coupled_weight_decay, lerp_from_start, step_size,
         bias_correction2_sqrt):  # fmt: skip
    """decay = 1 - lr*wd for AdamW (decoupled), 1 for Adam (whose weight decay is coupled)."""
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
    if has_max_exp_avg_sq:  # amsgrad
        if exp_avg_sq > max_exp_avg_sq or exp_avg_sq != exp_avg_sq:  # torch.maximum propagates NaN
            max_exp_avg_sq = exp_avg_sq
        second = max_exp_avg_sq
    p = p - step_size * (exp_avg / (math.sqrt(second) / bias_correction2_sqrt + eps))
    return p, exp_avg, exp_avg_sq, max_exp_avg_sq


def adam_tensor_scalars(step, host):
    """host = (lr, beta1, beta2): step_size = lr / (1 - beta1^t), sqrt(1 - beta2^t)."""
    lr, beta1, beta2 = host[0], host[1], host[2]
    return lr / (1.0 - beta1**step), math.sqrt(1.0 - beta2**step)


# -- Lion ---------------------------------------------------------------------------------------


def lion(p, g, exp_avg, sign, decay, lr, beta1, one_minus_beta1, beta2, one_minus_beta2):
    """Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms"): the sign of an
    interpolation of momentum and gradient, decoupled weight decay (decay = 1 - lr*weight_decay)."""
    g = g * sign
    c = exp_avg * beta1 + one_minus_beta1 * g
    if c > 0:
        step = lr
    elif c < 0:
        step = -lr
    else:  # torch.sign: 0 at 0, NaN at NaN
        step = c * lr
    p = p * decay - step
    exp_avg = exp_avg * beta2 + one_minus_beta2 * g
    return p, exp_avg


# -- the descriptions ---------------------------------------------------------------------------

_MAXIMIZE = Option("maximize", bool)

# bitsandbytes' 8-bit Adam decays weights decoupled (as AdamW) in both classes; no amsgrad
_ADAM8_FIXED = dict(amsgrad=False, maximize=False, decoupled_weight_decay=True)
_ADAM8_DOC = r"""Adam with 8-bit blockwise state (Dettmers et al. 2022), bitsandbytes' ``{name}``.

    The moments are stored as one uint8 code per value and one float32 absmax per block of 256
    (kernels/fastnorm_kernels/quant8.py: bitsandbytes' dynamic maps, signed for ``m``, unsigned
    for ``v``, nearest code); each step dequantizes, runs AdamW's update and quantizes again in
    one pass per block:

    .. math::
        \theta \leftarrow \theta(1 - \gamma\lambda);\quad
        m \leftarrow \beta_1 m + (1-\beta_1) g;\quad v \leftarrow \beta_2 v + (1-\beta_2) g^2;\quad
        \theta \leftarrow \theta - \frac{{\gamma}}{{1-\beta_1^t}}\,
        \frac{{m}}{{\sqrt{{v}}/\sqrt{{1-\beta_2^t}} + \epsilon}}

    State: 2 bytes per parameter plus 8 per block (torch's Adam: 8). Weight decay is decoupled
    in Adam8bit too, as in bitsandbytes. Tensors with fewer than ``min_8bit_size`` values keep
    float32 state. ``state_dict()`` is bitsandbytes' format (``state1``/``state2`` codes,
    ``absmax1``/``absmax2``, ``qmap1``/``qmap2``, an integer ``step``): checkpoints load in
    either library; a 32-bit torch Adam/AdamW checkpoint loads too (its moments quantized).

    Args:
        params: parameters or parameter groups.
        lr: learning rate (default 1e-3).
        betas: (beta1, beta2) (default (0.9, 0.999)).
        eps: added to the denominator (default 1e-8).
        weight_decay: decoupled weight decay (default {wd}).
        min_8bit_size: tensors with fewer values keep float32 state (default 4096).
        backend: ``"auto"`` (numba on CPU, cuda on GPU), ``"numba"``, ``"cuda"``, ``"reference"``.
        stochastic_rounding, master_weights: for 16-bit parameters, as fastnorm's other optimizers
            (bfloat16 rounded stochastically; a float32 master in ``state["master_param"]``).
        amsgrad, optim_bits, args, is_paged: bitsandbytes' arguments, accepted at their defaults.

    Shape: any parameter shapes (float32, bfloat16 or float16); per tensor of ``n`` values the
    state is two uint8 tensors of its shape and two float32 tensors of ``ceil(n / 256)``.

    Example:
        >>> opt = {name}(model.parameters(), lr=1e-3)  # was bnb.optim.{name}
"""
_LION8_DOC = r"""Lion with 8-bit blockwise state, bitsandbytes' ``Lion8bit``.

    .. math::
        c = \beta_1 m + (1-\beta_1) g;\quad
        \theta \leftarrow \theta(1-\gamma\lambda) - \gamma\operatorname{sign}(c);\quad
        m \leftarrow \beta_2 m + (1-\beta_2) g

    The momentum is stored as uint8 codes of the signed dynamic map and one float32 absmax per
    block of 256 (kernels/fastnorm_kernels/quant8.py), updated in one pass per block: 1 byte of
    state per parameter (32-bit Lion: 4). ``state_dict()`` is bitsandbytes' format.

    Args:
        params: parameters or parameter groups.
        lr: learning rate (default 1e-4).
        betas: (beta1, beta2) (default (0.9, 0.99)).
        weight_decay: decoupled weight decay (default 0).
        min_8bit_size: tensors with fewer values keep float32 state (default 4096).
        backend: ``"auto"``, ``"numba"``, ``"cuda"``, ``"reference"``.
        stochastic_rounding, master_weights: for 16-bit parameters, as fastnorm's other optimizers.
        optim_bits, args, is_paged: bitsandbytes' arguments, accepted at their defaults.

    Shape: any parameter shapes (float32, bfloat16 or float16).

    Example:
        >>> opt = Lion8bit(model.parameters(), lr=1e-4, weight_decay=0.1)
"""


def _has_weight_decay(weight_decay):
    return weight_decay != 0


OPTIMIZERS = {
    d.name: d
    for d in (
        _Optimizer(
            name="sgd",
            update=sgd,
            buffers=(
                Buffer("momentum_buffer", "momentum_buffers", when=lambda momentum: momentum != 0, clone_first=True),
            ),  # fmt: skip
            options=(
                Option("lr"),
                Option("weight_decay"),
                Option("momentum"),
                Option("dampening"),
                Option("nesterov", bool),
                _MAXIMIZE,
            ),  # fmt: skip
            constants=dict(
                sign=sign,
                lr=None,
                weight_decay=None,
                momentum=None,
                one_minus_dampening=lambda dampening: 1.0 - dampening,
            ),  # fmt: skip
            flags=dict(has_weight_decay=_has_weight_decay, nesterov=None),
            counts_steps=False,
            scalars=("fresh",),
            # torch's single add_ per parameter is ahead at every size without momentum
            # (fastnorm/_dispatch.py has the measurements, and the threshold with momentum)
            auto_cpu_min_numel=math.inf,
            auto_cuda_min_numel=math.inf,
        ),
        _Optimizer(
            name="adagrad",
            update=adagrad,
            buffers=(Buffer("sum", "state_sums", initial="initial_accumulator_value", nonnegative=True),),
            options=(Option("lr"), Option("lr_decay"), Option("weight_decay"), Option("eps"), _MAXIMIZE),
            constants=dict(sign=sign, weight_decay=None, eps=None),
            flags=dict(has_weight_decay=_has_weight_decay),
            scalars=("clr",),
            step_scalars=adagrad_tensor_scalars,
            host=("lr", "lr_decay"),
        ),
        _Optimizer(
            name="rmsprop",
            update=rmsprop,
            buffers=(
                Buffer("square_avg", "square_avgs", nonnegative=True),
                Buffer("grad_avg", "grad_avgs", when=lambda centered: centered),
                Buffer("momentum_buffer", "momentum_buffers", when=lambda momentum: momentum > 0),
            ),  # fmt: skip
            options=(
                Option("lr"),
                Option("alpha"),
                Option("eps"),
                Option("weight_decay"),
                Option("momentum"),
                Option("centered", bool),
                _MAXIMIZE,
            ),  # fmt: skip
            constants=dict(
                sign=sign,
                weight_decay=None,
                alpha=None,
                one_minus_alpha=lambda alpha: 1.0 - alpha,
                eps=None,
                lr=None,
                momentum=None,
            ),  # fmt: skip
            flags=dict(has_weight_decay=_has_weight_decay, lerp_from_start=lambda alpha: 1.0 - alpha < 0.5),
            state_keys=("step", "square_avg", "momentum_buffer", "grad_avg"),  # torch's order
        ),
        _Optimizer(
            name="adam",
            update=adam,
            buffers=(
                Buffer("exp_avg", "exp_avgs"),
                Buffer("exp_avg_sq", "exp_avg_sqs", nonnegative=True),
                Buffer("max_exp_avg_sq", "max_exp_avg_sqs", when=lambda amsgrad: amsgrad, nonnegative=True),
            ),  # fmt: skip
            options=(
                Option("lr"),
                Option("beta1"),
                Option("beta2"),
                Option("weight_decay"),
                Option("eps"),
                Option("amsgrad", bool),
                _MAXIMIZE,
                Option("decoupled_weight_decay", bool, False),
            ),  # fmt: skip
            constants=dict(
                sign=sign,
                decay=lambda lr, weight_decay, decoupled_weight_decay: (
                    1.0 - lr * weight_decay if decoupled_weight_decay else 1.0
                ),
                weight_decay=None,
                one_minus_beta1=lambda beta1: 1.0 - beta1,
                beta1=None,
                beta2=None,
                one_minus_beta2=lambda beta2: 1.0 - beta2,
                eps=None,
            ),
            flags=dict(
                coupled_weight_decay=lambda weight_decay, decoupled_weight_decay: (
                    weight_decay != 0 and not decoupled_weight_decay
                ),
                lerp_from_start=lambda beta1: 1.0 - beta1 < 0.5,
            ),
            scalars=("step_size", "bias_correction2_sqrt"),
            step_scalars=adam_tensor_scalars,
            host=("lr", "beta1", "beta2"),
            eight_bit=(
                EightBit(
                    "Adam8bit",
                    "adam",
                    dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0),
                    _ADAM8_FIXED,
                    doc=_ADAM8_DOC.format(name="Adam8bit", wd=0),
                ),
                EightBit(
                    "AdamW8bit",
                    "adam",
                    dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2),
                    _ADAM8_FIXED,
                    doc=_ADAM8_DOC.format(name="AdamW8bit", wd=0.01),
                ),
            ),  # fmt: skip
        ),
        _Optimizer(
            name="lion",
            update=lion,
            buffers=(Buffer("exp_avg", "exp_avgs"),),
            options=(Option("lr"), Option("beta1"), Option("beta2"), Option("weight_decay"), _MAXIMIZE),
            constants=dict(
                sign=sign,
                decay=lambda lr, weight_decay: 1.0 - lr * weight_decay,
                lr=None,
                beta1=None,
                one_minus_beta1=lambda beta1: 1.0 - beta1,
                beta2=None,
                one_minus_beta2=lambda beta2: 1.0 - beta2,
            ),  # fmt: skip
            counts_steps=False,
            class_name="Lion",
            defaults=dict(lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, maximize=False),
            auto_cuda_min_numel=0,
            eight_bit=(
                EightBit(
                    "Lion8bit",
                    "lion",
                    dict(lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0),
                    dict(maximize=False),
                    doc=_LION8_DOC,
                ),
            ),  # fmt: skip
            doc=r"""Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms"): signed updates.

    .. math::
        c = \beta_1 m + (1-\beta_1) g;\quad
        \theta \leftarrow \theta - \gamma\,(\operatorname{sign}(c) + \lambda\theta);\quad
        m \leftarrow \beta_2 m + (1-\beta_2) g

    torch.optim has no Lion: its state (``exp_avg`` per parameter, no step counter) is fastnorm's,
    and bitsandbytes' 32-bit ``Lion`` is the oracle its tests compare with. Every update moves
    each weight by exactly ``lr`` (plus decay), so Lion wants a learning rate 3-10x smaller than
    AdamW's and a weight decay 3-10x larger.

    Args:
        params: parameters or parameter groups.
        lr: learning rate (default 1e-4).
        betas: (beta1, beta2): the interpolation for the sign and the momentum's decay
            (default (0.9, 0.99)).
        weight_decay: decoupled weight decay, ``theta *= 1 - lr*weight_decay`` (default 0).
        maximize: maximize the objective (default False).
        backend: ``"auto"`` (numba on CPU, cuda on GPU), ``"numba"``, ``"cuda"``, ``"reference"``.
        master_weights, stochastic_rounding: as fastnorm's other optimizers (16-bit parameters).

    Shape: any parameter shapes; the state is one buffer of the parameter's shape.

    Example:
        >>> opt = Lion(model.parameters(), lr=3e-4, weight_decay=0.1)
""",
        ),
    )
}
