"""Drop-in optimizers: ``SGD``, ``Adagrad``, ``RMSprop``, ``Adam``, ``AdamW``, and those torch lacks
(``Lion``), each described once in kernels/fastnorm_kernels/formulas/optim.py; and bitsandbytes'
8-bit-state classes ``Adam8bit``, ``AdamW8bit``, ``Lion8bit`` derived from the same descriptions
(``_eightbit.py``).

Each class subclasses its ``torch.optim`` counterpart, so the constructor (signature, defaults,
argument checks), ``param_groups``, ``state_dict`` keys, ``zero_grad``, hooks, LR schedulers and
``add_param_group`` are torch's own; only ``step`` changes. State is created by torch's own
``_init_group`` (so it exists exactly where torch creates it, and an option toggled mid-run that
needs state torch never made raises torch's error); the per-step scalars are computed in float64
and one kernel call updates each group (and dtype). With ``backend="torch"``, and with ``"auto"``
for any group a fastnorm kernel cannot take (sparse or complex gradients, a dtype the kernels
lack, torch-only options) or that torch updates faster (on CPU: plain SGD, SGD with momentum under
50K elements; ``fastnorm._dispatch.AUTO_CPU_MIN_NUMEL``), torch's own ``step`` runs.

An optimizer torch lacks (``Lion``) is a class derived from its description: its constructor
takes the description's defaults (checked as torch checks them), its state is created by fastnorm
(each buffer that exists under the group's options, zeros of the parameter's dtype and layout, a
``step`` tensor where it counts steps), and where the others would hand a group to torch (sparse
or complex gradients, ``backend="torch"``) it raises a clear error instead.

Modules: ``_base`` (``_KernelOptimizer``: the step), ``_plan`` (state gathering, the plan and its
checks), ``_kernels`` (the backend choice and the kernel call), ``_precision`` (master weights,
stochastic rounding), ``_compat`` (hooks, pickling, ``state_dict`` extras, torch's own step, the
step ``torch.compile`` traces).

One update path: a per-group plan
---------------------------------
At the MNIST MLP's size an update is ~100 µs of arithmetic, so gathering a group's state through
``self.state[p]`` and ``_init_group`` on every step would cost as much again. A group's plan
keeps what stays the same from step to step: the parameters with gradients, their state dicts
and state tensors in table order, and the options that decide which buffers exist. Each step a
cheap fingerprint revalidates it: the same parameter objects, the same state dict and state
tensor objects, the same options; then every tensor's data pointer and size (and the parameters'
and gradients' dtype, layout, device) are read afresh. A plan never trusts an address it did
not just read, nor a size it did not just check: ``p.data = ...``, ``model.double()``,
``load_state_dict``, an option toggled or a state entry replaced all rebuild the plan, which
raises torch's error where torch raises.

torch's ``foreach``, ``fused``, ``capturable`` and ``differentiable`` select torch
implementations: with an explicit fastnorm backend a non-default value is refused (ValueError);
with ``"auto"`` it selects torch's implementation, as asked.
"""

from __future__ import annotations

import inspect

import torch

from fastnorm_kernels.formulas.optim import OPTIMIZERS

from .._dispatch import AUTO
from .._signature import with_backend_signature
from ._base import _KernelOptimizer, _scalar

__all__ = ["SGD", "Adagrad", "RMSprop", "Adam", "AdamW"]


class SGD(_KernelOptimizer, torch.optim.SGD):
    r"""Stochastic gradient descent with momentum, Nesterov, dampening and weight decay.

    .. math::
        g \leftarrow \nabla + \lambda\theta;\quad
        b \leftarrow \mu b + (1-\tau) g;\quad
        \theta \leftarrow \theta - \gamma\,(g + \mu b \text{ if nesterov else } b)

    Args: exactly :class:`torch.optim.SGD`'s, plus ``backend``.

    Example:
        >>> opt = SGD(model.parameters(), lr=0.1, momentum=0.9, backend="reference")
    """

    _op = "sgd"
    _torch_cls = torch.optim.SGD

    @with_backend_signature(torch.optim.SGD, precision_options=True)
    def __init__(self, *args, backend: str = "auto", **kwargs) -> None:
        super().__init__(*args, backend=backend, **kwargs)


class Adagrad(_KernelOptimizer, torch.optim.Adagrad):
    r"""AdaGrad: per-element learning rates shrinking with the sum of squared gradients.

    .. math::
        s \leftarrow s + g^2;\quad \theta \leftarrow \theta - \frac{\gamma_t\, g}{\sqrt{s} + \epsilon},
        \quad \gamma_t = \frac{\gamma}{1 + (t-1)\eta}

    Args: exactly :class:`torch.optim.Adagrad`'s, plus ``backend``.

    Example:
        >>> opt = Adagrad(model.parameters(), lr=0.01, backend="reference")
    """

    _op = "adagrad"
    _torch_cls = torch.optim.Adagrad

    @with_backend_signature(torch.optim.Adagrad, precision_options=True)
    def __init__(self, *args, backend: str = "auto", **kwargs) -> None:
        super().__init__(*args, backend=backend, **kwargs)


class RMSprop(_KernelOptimizer, torch.optim.RMSprop):
    r"""RMSprop: gradients divided by a running root mean square, optionally centred, with momentum.

    .. math::
        v \leftarrow \alpha v + (1-\alpha) g^2;\quad
        \theta \leftarrow \theta - \gamma \frac{g}{\sqrt{v - \bar g^2 \text{ (centered)}} + \epsilon}

    Args: exactly :class:`torch.optim.RMSprop`'s, plus ``backend``.

    Example:
        >>> opt = RMSprop(model.parameters(), lr=0.01, centered=True, backend="reference")
    """

    _op = "rmsprop"
    _torch_cls = torch.optim.RMSprop

    @with_backend_signature(torch.optim.RMSprop, precision_options=True)
    def __init__(self, *args, backend: str = "auto", **kwargs) -> None:
        super().__init__(*args, backend=backend, **kwargs)


class _AdamUpdate:
    """What Adam and AdamW share (AdamW: ``decoupled_weight_decay``)."""

    _op = "adam"


class Adam(_AdamUpdate, _KernelOptimizer, torch.optim.Adam):
    r"""Adam: bias-corrected first and second moment estimates.

    .. math::
        m \leftarrow \beta_1 m + (1-\beta_1) g;\quad v \leftarrow \beta_2 v + (1-\beta_2) g^2;\quad
        \theta \leftarrow \theta - \frac{\gamma}{1-\beta_1^t}\,
            \frac{m}{\sqrt{v}/\sqrt{1-\beta_2^t} + \epsilon}

    Args: exactly :class:`torch.optim.Adam`'s (``decoupled_weight_decay=True`` is AdamW),
        plus ``backend``.

    Example:
        >>> opt = Adam(model.parameters(), lr=1e-3, backend="reference")
    """

    _torch_cls = torch.optim.Adam

    @with_backend_signature(torch.optim.Adam, precision_options=True)
    def __init__(self, *args, backend: str = "auto", **kwargs) -> None:
        super().__init__(*args, backend=backend, **kwargs)


class AdamW(_AdamUpdate, _KernelOptimizer, torch.optim.AdamW):
    r"""AdamW: Adam with decoupled weight decay, ``θ ← θ (1 - γλ)`` before the moment update.

    Args: exactly :class:`torch.optim.AdamW`'s, plus ``backend``.

    Example:
        >>> opt = AdamW(model.parameters(), lr=1e-3, weight_decay=1e-2, backend="reference")
    """

    _torch_cls = torch.optim.AdamW
    _option_defaults = {"decoupled_weight_decay": True}

    @with_backend_signature(torch.optim.AdamW, precision_options=True)
    def __init__(self, *args, backend: str = "auto", **kwargs) -> None:
        super().__init__(*args, backend=backend, **kwargs)


# -- optimizers torch lacks: a class derived from each description -----------------------------------


def _check_option(name: str, value) -> None:
    """torch.optim's checks and messages for the options every optimizer shares."""
    if name == "betas":
        for i, beta in enumerate(value):
            if not 0.0 <= float(beta) < 1.0:
                raise ValueError(f"Invalid beta parameter at index {i}: {beta}")
        return
    label = {"lr": "learning rate", "eps": "epsilon value", "weight_decay": "weight_decay value"}.get(name)
    if label is not None and not 0.0 <= _scalar(value):
        raise ValueError(f"Invalid {label}: {value}")


def _derived_class(d) -> type:
    """The ``torch.optim.Optimizer`` of description ``d`` (an optimizer torch lacks): its
    constructor takes ``d.defaults`` in order (the first positional after ``params``, the
    booleans keyword-only), checked as torch checks them, plus ``backend``, ``master_weights``
    and ``stochastic_rounding``; its state is created as the others' (``Planner._gather``)."""
    kw, positional = inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD
    parameters = [inspect.Parameter("self", positional), inspect.Parameter("params", positional)]
    for name, default in d.defaults.items():
        parameters.append(inspect.Parameter(name, kw if isinstance(default, bool) else positional, default=default))
    parameters += [inspect.Parameter("backend", kw, default=AUTO, annotation=str)]
    for flag in ("master_weights", "stochastic_rounding"):
        parameters.append(inspect.Parameter(flag, kw, default=False, annotation=bool))
    signature = inspect.Signature(parameters)

    def __init__(self, params, *args, **kwargs) -> None:
        bound = signature.bind(self, params, *args, **kwargs)
        bound.apply_defaults()
        options = dict(bound.arguments)
        del options["self"], options["params"]
        precision = {k: options.pop(k) for k in ("backend", "master_weights", "stochastic_rounding")}
        for name, value in options.items():
            _check_option(name, value)
        _KernelOptimizer.__init__(self, params, options, **precision)

    __init__.__signature__ = signature
    return type(d.class_name, (_KernelOptimizer, torch.optim.Optimizer), {
        "__init__": __init__, "__doc__": d.doc, "__module__": __name__, "__qualname__": d.class_name, "_op": d.name,
    })  # fmt: skip


for _d in OPTIMIZERS.values():
    if _d.class_name and _d.class_name not in __all__:
        globals()[_d.class_name] = _derived_class(_d)
        __all__.append(_d.class_name)

# -- 8-bit state: bitsandbytes' classes, derived from the descriptions' EightBit entries ---------------
from ._eightbit import CLASSES as _EIGHT_BIT  # noqa: E402

globals().update(_EIGHT_BIT)
__all__ += list(_EIGHT_BIT)
