"""Give a drop-in class the installed torch class's exact constructor signature, plus backend=."""

from __future__ import annotations

import inspect
from collections.abc import Callable


def with_backend_signature(torch_cls: type, precision_options: bool = False) -> Callable:
    """Decorate ``__init__(self, *args, backend="auto", **kwargs)`` so that ``inspect.signature``
    shows ``torch_cls``'s parameters (names, defaults, kinds, annotations) followed by the
    keyword-only ``backend: str = "auto"`` (and, for the optimizers, ``master_weights: bool =
    False`` and ``stochastic_rounding: bool = False``)."""
    torch_sig = inspect.signature(torch_cls.__init__)
    kw = inspect.Parameter.KEYWORD_ONLY
    ours = [inspect.Parameter("backend", kw, default="auto", annotation=str)]
    if precision_options:
        ours += [inspect.Parameter(name, kw, default=False, annotation=bool)
                 for name in ("master_weights", "stochastic_rounding")]  # fmt: skip
    params = list(torch_sig.parameters.values())
    if params and params[-1].kind is inspect.Parameter.VAR_KEYWORD:
        params[len(params) - 1 : len(params) - 1] = ours
    else:
        params += ours
    signature = torch_sig.replace(parameters=params)

    def decorate(init: Callable) -> Callable:
        init.__signature__ = signature
        return init

    return decorate
