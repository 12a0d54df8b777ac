r"""The RMSNorm families of model libraries (Hugging Face transformers), each described once.

transformers defines an RMSNorm class per model (hundreds), but only a few distinct forwards, which
differ in where they cast and in an offset on the weight. A family describes one forward by those
two choices; :func:`family_rms_norm` computes it with fastnorm's ``rms_norm`` (one pass) plus, where
the family's cast order requires it, torch ops for the cast and the weight product, so that the
values are the family's own (bit for bit in 16-bit wherever the normalised value rounds the same):

==========  ====================================================  ===============================
cast        forward (x normalised in float32: n = x * rsqrt(mean(x^2) + eps))   classes
==========  ====================================================  ===============================
``input``   ``weight * n.to(x.dtype)``                            Llama, Qwen2/3, Mistral, Phi-3, ...
``after``   ``((offset + weight.float()) * n).to(x.dtype)``        Gemma 1-3 (offset 1), OLMo 2
``weight``  ``weight * n.to(weight.dtype)`` (16-bit weight), else  T5
            ``weight * n`` (float32 out)
==========  ====================================================  ===============================

A class belongs to a family when it is one of the family's listed classes, or when its forward
(and the helper methods it defines) is the same code as a listed class's, statement for
statement (docstrings and annotations aside): transformers copies Llama's RMSNorm into most of
its models. Everything else is left as it is (:func:`fastnorm.nn.convert` reports it).
"""

from __future__ import annotations

import ast
import functools
import importlib
import inspect
import numbers
import textwrap
from dataclasses import dataclass

import torch
from torch import nn

from . import functional

__all__ = ["RMSNormFamily", "FAMILIES", "family_of", "family_rms_norm"]


@dataclass(frozen=True)
class RMSNormFamily:
    """One RMSNorm forward of a model library.

    Attributes:
        name: the family's name (its first model).
        cast: where the forward leaves float32: ``"input"`` (the normalised value is cast to the
            input's dtype, then multiplied by the weight), ``"after"`` (multiplied in float32,
            then cast) or ``"weight"`` (cast to a 16-bit weight's dtype, then multiplied).
        offset: the forward multiplies by ``offset + weight`` (Gemma: 1, its weight starts at 0).
        eps: the module attribute holding epsilon.
        classes: ``module.Class`` paths of the classes whose forward this describes.
    """

    name: str
    cast: str
    offset: float = 0.0
    eps: str = "variance_epsilon"
    classes: tuple[str, ...] = ()


def _hf(model: str, cls: str) -> str:
    return f"transformers.models.{model}.modeling_{model}.{cls}"


FAMILIES: tuple[RMSNormFamily, ...] = (
    RMSNormFamily("llama", "input", classes=(
        _hf("llama", "LlamaRMSNorm"), _hf("qwen2", "Qwen2RMSNorm"), _hf("qwen3", "Qwen3RMSNorm"),
        _hf("qwen3_moe", "Qwen3MoeRMSNorm"), _hf("mistral", "MistralRMSNorm"), _hf("mixtral", "MixtralRMSNorm"),
        _hf("phi3", "Phi3RMSNorm"), _hf("granite", "GraniteRMSNorm"), _hf("deepseek_v3", "DeepseekV3RMSNorm"),
    )),
    RMSNormFamily("olmo2", "after", classes=(_hf("olmo2", "Olmo2RMSNorm"),)),
    RMSNormFamily("gemma", "after", offset=1.0, eps="eps", classes=(
        _hf("gemma", "GemmaRMSNorm"), _hf("gemma2", "Gemma2RMSNorm"), _hf("gemma3", "Gemma3RMSNorm"),
    )),
    RMSNormFamily("t5", "weight", classes=(_hf("t5", "T5LayerNorm"),)),
)  # fmt: skip

#: the dtypes the families run in fastnorm's kernels; others (float64) run the class's own forward
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def family_rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, family: RMSNormFamily, backend: str = "auto"
) -> torch.Tensor:
    r"""``family``'s RMSNorm forward over the last dim of ``x`` with fastnorm's ``rms_norm``.

    .. math:: n = \frac{x}{\sqrt{\mathrm{E}[x^2] + \epsilon}} \text{ (float32)},\quad
              y = \text{the family's cast and product of } n \text{ and } (\text{offset} + w)

    Args:
        x: ``(*, D)`` float32, bfloat16 or float16.
        weight: ``(D,)``.
        eps: epsilon.
        family: one of :data:`FAMILIES`.
        backend: fastnorm's backend of the normalisation.

    Shape:
        ``x`` and the output: ``(*, D)``; the output's dtype is the family's (``x``'s, or float32
        for T5 with a float32 weight and 16-bit ``x``, as transformers' type promotion gives).

    Example:
        >>> llama = FAMILIES[0]
        >>> y = family_rms_norm(torch.randn(2, 8, 64), torch.ones(64), 1e-6, llama)
    """
    shape = [x.shape[-1]]

    def norm(t: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor:
        return functional.rms_norm(t, shape, w, eps, backend=backend)

    if family.cast == "after":  # one rounding, at the end: the weight goes into the kernel in float32
        w = weight.float() + family.offset if family.offset else weight.float()
        return norm(x, w)
    if family.cast == "input":
        if weight.dtype == x.dtype == torch.float32:
            return norm(x, weight)
        return weight * norm(x)  # n rounded to x's dtype by the kernel, then torch's product
    # "weight": T5
    if weight.dtype in (torch.bfloat16, torch.float16):
        n = norm(x) if x.dtype == weight.dtype else norm(x.float()).to(weight.dtype)
        return weight * n
    return norm(x.float(), weight.float()) if weight.dtype == torch.float32 else weight * norm(x.float())


def _class_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


@functools.cache
def _forward_code(cls: type) -> tuple | None:
    """What ``cls`` computes, as code: each method it (or a base below nn.Module) defines, but
    ``__init__``/``extra_repr``, as its AST without docstrings or annotations; None if unreadable."""
    methods: dict[str, str] = {}
    for klass in cls.__mro__:
        if klass in (nn.Module, object):
            break
        for name, value in vars(klass).items():
            if not inspect.isfunction(value) or name in methods or name in ("__init__", "extra_repr"):
                continue
            try:
                tree = ast.parse(textwrap.dedent(inspect.getsource(value)))
            except (OSError, TypeError, SyntaxError):
                return None
            methods[name] = ast.dump(_bare(tree.body[0]), annotate_fields=False)
    return tuple(sorted(methods.items())) if "forward" in methods else None


def _bare(function: ast.FunctionDef) -> ast.FunctionDef:
    """``function`` without decorators, docstring, annotations or its own name."""
    body = function.body
    if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant):
        body = body[1:]
    for arg in ast.walk(function.args):
        if isinstance(arg, ast.arg):
            arg.annotation = None
    function.name, function.body, function.decorator_list, function.returns = "f", body, [], None
    return function


@functools.cache
def _listed() -> dict[str, RMSNormFamily]:
    return {path: family for family in FAMILIES for path in family.classes}


@functools.cache
def _listed_code() -> dict[tuple, RMSNormFamily]:
    """The forward code of every listed class that can be imported here -> its family."""
    found = {}
    for path, family in _listed().items():
        module, _, name = path.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):  # another transformers release
            continue
        code = _forward_code(cls)
        if code is not None:
            found.setdefault(code, family)
    return found


def family_of(cls: type) -> RMSNormFamily | None:
    """The family of a norm class: listed, or with a listed class's forward code; else None."""
    family = _listed().get(_class_path(cls))
    if family is not None:
        return family
    if not cls.__module__.startswith("transformers.") or not issubclass(cls, nn.Module):
        return None
    code = _forward_code(cls)
    return None if code is None else _listed_code().get(code)


def why_not(module: nn.Module, family: RMSNormFamily) -> str | None:
    """Why an instance of a family's class cannot run as the family (None: it can)."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, nn.Parameter) or weight.dim() != 1:
        return "its weight is not a 1-D Parameter"
    if not isinstance(getattr(module, family.eps, None), numbers.Real):
        return f"it has no float {family.eps!r}"
    return None
