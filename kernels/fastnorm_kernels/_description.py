"""What an optimizer is, written once: the record every backend and fastnorm's PyTorch face read.

kernels/fastnorm_kernels/formulas/optim.py describes each optimizer with an :class:`Optimizer`:
its element update (a plain function on scalars whose parameters are named: the parameter ``p``,
the gradient ``g``, its state buffers by their ``state_dict`` keys, and the constants, flags and
per-tensor scalars below by their names), its state buffers and the rule for when each exists,
its options, and how options become the kernels' arguments. From that record follow

* the element adapter each compiled loop calls (:meth:`Optimizer.element_source`): the loops know
  a fixed positional form ``(p, g, b0, b1, b2, k, s0, s1, flags, use0, use1, use2)``, the
  adapter maps it onto the update's names, so no update has to take arguments it does not use;
* the kernels' arguments (:meth:`Optimizer.pack`): ``constants`` (in the compute dtype),
  ``flags``, which buffer rows exist (``uses``) and the float64 ``host`` values of the per-tensor
  scalars, in the order this record lists them and nowhere else;
* the C++ op's schema (:meth:`Optimizer.schema`) and the CUDA kernel's signature
  (:meth:`Optimizer.cuda_signature`); fastnorm/csrc/optim.cpp registers one op per record and
  packs its arguments with a compiled :meth:`pack` (kernels/fastnorm_kernels/numba_cpu/optim.py);
* the backends' ``<name>_step`` / ``<name>_step_table`` entry points
  (kernels/fastnorm_kernels/_optimizer_api.py), the ``"auto"`` thresholds and the Python class.

Derived values are functions of options named by their parameters (``lambda lr, weight_decay:
...``); a value given as ``None`` is the option of the same name.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field

MAX_BUFFERS = 3  # the tables' rows: param, grad and three state buffers
N_SCALARS = 2  # per-tensor scalars (s0, s1)


@dataclass(frozen=True)
class Option:
    """An option of the op (keyword argument, in schema order): a float, or a bool."""

    name: str
    kind: type = float
    default: float | bool | None = None  # None: required


@dataclass(frozen=True)
class Buffer:
    """A state buffer: ``key`` in the optimizer's state (and the update's parameter name),
    ``lists`` the op's argument holding one per parameter. ``when`` (a function of options):
    whether the buffer exists; None: always. ``clone_first``: on the step that creates it the
    buffer takes the update's value rather than starting from zeros (torch's SGD clones the
    gradient into a new momentum buffer): the kernels are told which tensors' buffers are new
    (per-tensor scalar 0, the op's ``first_step`` flags). ``initial``: the constructor default whose
    value fills a new buffer (torch's Adagrad: ``initial_accumulator_value``); None: zeros."""

    key: str
    lists: str
    when: Callable | None = None
    clone_first: bool = False
    initial: str | None = None  # a constructor default filling a new buffer (else zeros)
    nonnegative: bool = False  # never negative (a second moment): 8-bit state uses the unsigned map


@dataclass(frozen=True)
class EightBit:
    """A class of the optimizer with 8-bit blockwise state (kernels/fastnorm_kernels/quant8.py),
    bitsandbytes' twin of the same name: ``class_name``, ``bnb_name`` (bitsandbytes' optimizer
    name), the constructor's defaults (its options in order; ``betas`` stands for beta1 and
    beta2; ``eps`` may be absent from the update and is kept for bitsandbytes' param groups),
    ``fixed``: the description's options the class does not offer, with their values, and its
    docstring. Its first one or two buffers are quantized (signed map, or unsigned where the
    buffer is ``nonnegative``)."""

    class_name: str
    bnb_name: str
    defaults: dict
    fixed: dict = field(default_factory=dict)
    doc: str = ""


@functools.cache
def _arguments(fn: Callable) -> tuple[str, ...]:
    """A function's parameter names (cached: Optimizer.pack reads them on every step of the
    Python launchers, and inspect.signature costs ~10 µs a call)."""
    return tuple(inspect.signature(fn).parameters)


@dataclass(frozen=True)
class Optimizer:
    """One optimizer (see the module docstring).

    name: the op (``torch.ops.fastnorm.<name>_``) and kernel name; update: the element update;
    buffers: at most three, in table order; options: the op's keyword options; constants, flags:
    name -> function of options (None: the option itself), in the kernels' order; counts_steps:
    a ``step`` counter per tensor (``state["step"]``, advanced by the kernels); scalars: the names
    of the per-tensor scalars the update reads, computed by ``step_scalars(step, host)`` from the
    new step count and ``host`` (option names, float64); class_name, defaults, doc: for an
    optimizer torch lacks, the class fastnorm.optim derives (its constructor's options in order,
    with defaults; ``betas`` stands for beta1 and beta2) and its docstring;
    auto_cpu_min_numel / auto_cuda_min_numel: below these many elements a group, ``"auto"`` runs
    torch's update (``math.inf``: always torch's; an optimizer torch lacks takes 0);
    state_keys: the order a new state's keys are created in (torch's; default: step, then the
    buffers); eight_bit: its classes with 8-bit state (:class:`EightBit`).
    """

    name: str
    update: Callable
    buffers: tuple[Buffer, ...]
    options: tuple[Option, ...]
    constants: dict[str, Callable | None]
    flags: dict[str, Callable | None] = field(default_factory=dict)
    counts_steps: bool = True
    scalars: tuple[str, ...] = ()
    step_scalars: Callable | None = None
    host: tuple[str, ...] = ()
    class_name: str = ""
    defaults: dict = field(default_factory=dict)
    auto_cpu_min_numel: float = 0
    auto_cuda_min_numel: float = 100_000_000
    doc: str = ""
    state_keys: tuple[str, ...] = ()
    eight_bit: tuple[EightBit, ...] = ()
    clone_first: int | None = field(init=False, default=None)
    buffer_index: dict = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        # the index of the buffer cloned on its first step, or None (read every step: computed once)
        cloned = [i for i, b in enumerate(self.buffers) if b.clone_first]
        object.__setattr__(self, "clone_first", cloned[0] if cloned else None)
        object.__setattr__(self, "buffer_index", {b.key: i for i, b in enumerate(self.buffers)})
        if not self.state_keys:  # the order a new state's keys are made in: step, then the buffers
            keys = (*(("step",) if self.counts_steps else ()), *(b.key for b in self.buffers))
            object.__setattr__(self, "state_keys", keys)
        expected = {*(("step",) if self.counts_steps else ()), *(b.key for b in self.buffers)}
        if set(self.state_keys) != expected:
            raise ValueError(f"{self.name}: state_keys must be step (where it counts steps) and the buffers' keys")
        if not 1 <= len(self.buffers) <= MAX_BUFFERS:
            raise ValueError(f"{self.name}: 1 to {MAX_BUFFERS} state buffers, got {len(self.buffers)}")
        if len(self.scalars) > N_SCALARS or len(self.host) > 3:
            raise ValueError(f"{self.name}: at most {N_SCALARS} per-tensor scalars from 3 host values")
        if not self.constants:
            raise ValueError(f"{self.name}: at least one constant (it types the kernels' pointers)")
        if self.clone_first is not None and self.counts_steps:
            raise ValueError(f"{self.name}: a buffer cloned on its first step and step counters are alternatives")
        known = {o.name for o in self.options}
        for name, fn in (*self.constants.items(), *self.flags.items()):
            wanted = (name,) if fn is None else _arguments(fn)
            if set(wanted) - known:
                raise ValueError(f"{self.name}: {name} reads {sorted(set(wanted) - known)}, not options")
        for buffer in self.buffers:
            if buffer.when is not None and set(_arguments(buffer.when)) - known:
                raise ValueError(f"{self.name}: buffer {buffer.key}'s rule reads unknown options")
        unknown = set(self.update_arguments) - set(self._sources())
        if unknown:
            raise ValueError(f"{self.name}'s update takes {sorted(unknown)}, which its description does not define")

    # -- what the kernels take ------------------------------------------------------------------

    @property
    def n_flags(self) -> int:
        """The kernels' flag tuple's length: at least one (an unused False where there is none)."""
        return max(1, len(self.flags))

    @property
    def update_arguments(self) -> tuple[str, ...]:
        return _arguments(self.update)

    def pack(self, options: dict) -> tuple[tuple[float, ...], tuple[bool, ...], tuple[bool, ...], tuple[float, ...]]:
        """(constants, flags, uses, host) of the kernels for ``options`` (a dict of every option)."""

        def value(name, fn):
            return options[name] if fn is None else fn(*(options[a] for a in _arguments(fn)))

        constants = tuple(float(value(n, fn)) for n, fn in self.constants.items())
        flags = tuple(bool(value(n, fn)) for n, fn in self.flags.items()) or (False,)
        uses = tuple(b.when is None or bool(b.when(*(options[a] for a in _arguments(b.when)))) for b in self.buffers)
        uses += (False,) * (MAX_BUFFERS - len(uses))
        host = tuple(float(options[n]) for n in self.host)
        return constants, flags, uses, host

    @property
    def eight_bit_maps(self) -> tuple[bool, ...]:
        """Whether each quantized buffer of the 8-bit classes (the first one or two) takes the signed
        map: the unsigned one where the buffer is ``nonnegative``."""
        return tuple(not b.nonnegative for b in self.buffers[: 2 if len(self.buffers) > 1 else 1])

    def tensor_scalars(self, step: float, host) -> tuple[float, float]:
        """The per-tensor scalars from a tensor's new step count (float64; zeros without any)."""
        if self.step_scalars is None:
            return 0.0, 0.0
        return self.step_scalars(step, host)

    # -- generated text -------------------------------------------------------------------------

    def _sources(self) -> dict[str, str]:
        """update parameter name -> the adapter's expression for it."""
        sources = {"p": "p", "g": "g"}
        for i, b in enumerate(self.buffers):
            sources[b.key] = f"b{i}"
            sources[f"has_{b.key}"] = f"use{i}"
        sources.update({name: f"k[{i}]" for i, name in enumerate(self.constants)})
        sources.update({name: f"flags[{i}]" for i, name in enumerate(self.flags)})
        sources.update({name: f"s{i}" for i, name in enumerate(self.scalars)})
        return sources

    def element_source(self, function: str, update: str) -> str:
        """Source of ``function(p, g, b0, b1, b2, k, s0, s1, flags, use0, use1, use2) -> (p, b0,
        b1, b2)``: the loops' positional form of ``update`` (a name the text can call)."""
        sources = self._sources()
        call = ", ".join(sources[a] for a in self.update_arguments)
        outs = [f"b{i}" for i in range(len(self.buffers))]
        rest = [f"b{i}" for i in range(len(self.buffers), MAX_BUFFERS)]
        return (
            f"def {function}(p, g, b0, b1, b2, k, s0, s1, flags, use0, use1, use2):\n"
            f"    p, {', '.join(outs)}{',' if len(outs) == 1 else ''} = {update}({call})\n"
            f"    return p, {', '.join(outs + rest)}\n"
        )

    def schema(self) -> str:
        """The op's schema: ``<name>_(params, grads, <buffer lists>, [state_steps], *, <options>,
        [first_step], rounding_seed)``, every list the op writes annotated."""
        letters = iter("abcdefgh")
        lists = [f"Tensor({next(letters)}!)[] params", "Tensor[] grads"]
        lists += [f"Tensor({next(letters)}!)[] {b.lists}" for b in self.buffers]
        if self.counts_steps:
            lists.append(f"Tensor({next(letters)}!)[] state_steps")
        options = []
        for o in self.options:
            text = f"{'float' if o.kind is float else 'bool'} {o.name}"
            options.append(text if o.default is None else f"{text}={o.default}")
        if self.clone_first is not None:
            options.append("bool[] first_step")
        options.append("int? rounding_seed=None")
        return f"{self.name}_({', '.join(lists)}, *, {', '.join(options)}) -> ()"

    def cuda_signature(self) -> str:
        """The CUDA kernel's argument codes (fastnorm/csrc/cuda_launch.h): the tables and their
        sizes, the two scalars, the constants, the flags, the uses and the rounding seed."""
        return f"aiaikk({'k' * len(self.constants)})({'b' * self.n_flags})(bbb)u"


def sign(maximize: bool) -> float:
    """The gradient's sign: -1 with ``maximize``."""
    return -1.0 if maximize else 1.0
