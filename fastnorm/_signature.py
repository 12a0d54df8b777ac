"""Give a drop-in class the installed torch class's exact constructor signature, plus backend=."""

from __future__ import annotations

import inspect
from collections.abc import Callable


def with_backend_signature(torch_cls: type) -> Callable:
    """Decorate ``__init__(self, *args, backend="auto", **kwargs)`` so that ``inspect.signature``
    shows ``torch_cls``'s parameters (names, defaults, kinds, annotations) followed by the
    keyword-only ``backend: str = "auto"``."""
    torch_sig = inspect.signature(torch_cls.__init__)
    backend = inspect.Parameter("backend", inspect.Parameter.KEYWORD_ONLY, default="auto", annotation=str)
    params = list(torch_sig.parameters.values())
    if params and params[-1].kind is inspect.Parameter.VAR_KEYWORD:
        params.insert(len(params) - 1, backend)
    else:
        params.append(backend)
    signature = torch_sig.replace(parameters=params)

    def decorate(init: Callable) -> Callable:
        init.__signature__ = signature
        return init

    return decorate
