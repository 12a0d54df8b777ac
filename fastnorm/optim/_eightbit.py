"""Optimizers with 8-bit blockwise state: ``Adam8bit``, ``AdamW8bit``, ``Lion8bit``.

Each is derived from an ``EightBit`` entry of its optimizer's description
(kernels/fastnorm_kernels/formulas/optim.py): bitsandbytes' class name, constructor and defaults,
the description's update with the options bitsandbytes fixes (Adam8bit's weight decay is
decoupled). The state is bitsandbytes' format (kernels/fastnorm_kernels/quant8.py), so that
replacing ``bnb.optim.AdamW8bit`` by ``fastnorm.optim.AdamW8bit`` is a one-word change and a
checkpoint moves between the two:

* per parameter ``step`` (a CPU float32 tensor, as torch's optimizers keep it, so that a compiled
  step does not specialise on it; an int in ``state_dict()``, as bitsandbytes'), ``state1`` /
  ``state2`` (uint8 codes of the parameter's shape),
  ``absmax1`` / ``absmax2`` (float32, one per block of 256) and ``qmap1`` / ``qmap2`` (the
  signed and unsigned dynamic maps); a parameter with fewer than ``min_8bit_size`` values keeps
  ``state1`` / ``state2`` in float32 and no maps;
* ``state_dict()`` wraps the quantization tensors under bitsandbytes' key (its FSDP guard), and
  ``load_state_dict`` takes that, the unwrapped form, or a 32-bit torch Adam/AdamW/fastnorm Lion
  checkpoint (``exp_avg`` / ``exp_avg_sq``, quantized on load).

One kernel call per parameter group and dtype updates every tensor (numba: one pass per block;
kernels/fastnorm_kernels/numba_cpu/optim8.py); ``backend="reference"`` runs the NumPy oracle.
"""

from __future__ import annotations

import copy
import ctypes
import inspect
import warnings
from itertools import chain

import numpy as np
import torch

from fastnorm_kernels import quant8
from fastnorm_kernels.formulas.optim import OPTIMIZERS

from .. import _dispatch
from .._arrays import CpuArrays
from .._dispatch import AUTO
from ._precision import Precision, _mark, _same_mark

_WRAPPED = "__bnb_optimizer_quant_state__"  # bitsandbytes' key for the wrapped quantization state
_QUANT_KEYS = ("state1", "state2", "qmap1", "qmap2", "absmax1", "absmax2")
_BACKENDS = (AUTO, "numba", "cuda", "reference")
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_STORAGE = {torch.float32: np.dtype(np.float32), torch.bfloat16: np.dtype(np.uint16),
            torch.float16: np.dtype(np.float16)}  # fmt: skip


def _map(signed: bool, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(quant8.dynamic_map(signed).copy()).to(device)


class Optimizer8bit(torch.optim.Optimizer):
    """The step, state and checkpoints every 8-bit class shares (see the module docstring)."""

    _op: str
    _spec = None

    def __init__(self, params, options: dict, *, min_8bit_size: int, backend: str, is_paged: bool,
                 stochastic_rounding: bool = False, master_weights: bool = False) -> None:  # fmt: skip
        if backend not in _BACKENDS:
            raise ValueError(f"{type(self).__name__}: backend must be one of {', '.join(_BACKENDS)}, got {backend!r}")
        if is_paged:
            warnings.warn(f"{type(self).__name__}: paged state is bitsandbytes' CUDA feature; the state is "
                          "ordinary memory here", stacklevel=3)  # fmt: skip
        self.backend = backend
        self.min_8bit_size = int(min_8bit_size)
        self.stochastic_rounding = bool(stochastic_rounding)
        self.master_weights = bool(master_weights)
        self._rounding_calls = 0
        self._maps: dict = {}
        self._marks: dict = {}
        super().__init__(params, options)
        name, dtypes = type(self).__name__, {p.dtype for g in self.param_groups for p in g["params"]}
        if self.stochastic_rounding and self.master_weights:
            raise ValueError(f"{name}: master_weights=True and stochastic_rounding=True are alternatives "
                             "(a float32 master keeps updates below a bfloat16 ulp already); choose one")  # fmt: skip
        if self.stochastic_rounding and torch.bfloat16 not in dtypes:
            raise ValueError(f"{name}: stochastic_rounding=True applies to bfloat16 parameters; convert the model "
                             "first (model.bfloat16()) or leave it off")  # fmt: skip
        if self.master_weights and not dtypes & {torch.bfloat16, torch.float16}:
            raise ValueError(f"{name}: master_weights=True applies to bfloat16 and float16 parameters; convert the "
                             "model first (model.bfloat16()) or leave it off")  # fmt: skip
        for group in self.param_groups:  # made here, not while torch.compile traces a first step
            for p in group["params"]:
                self._maps_on(p.device)

    # -- options -------------------------------------------------------------------------------

    def _kernel_options(self, group: dict) -> dict:
        """The description's options of a group (betas split, the fixed ones filled in)."""
        d = OPTIMIZERS[self._op]
        out = {}
        for o in d.options:
            if o.name in ("beta1", "beta2"):
                out[o.name] = float(group["betas"][0 if o.name == "beta1" else 1])
            elif o.name in self._spec.fixed:
                out[o.name] = self._spec.fixed[o.name]
            else:
                out[o.name] = float(group[o.name])
        return out

    # -- state ---------------------------------------------------------------------------------

    def _maps_on(self, device: torch.device) -> list[torch.Tensor]:
        if device not in self._maps:
            self._maps[device] = [_map(signed, device) for signed in OPTIMIZERS[self._op].eight_bit_maps]
        return self._maps[device]

    @property
    def _n_state(self) -> int:
        return len(OPTIMIZERS[self._op].eight_bit_maps)

    def _init_state(self, p: torch.Tensor) -> dict:
        state = self.state[p]
        state["step"] = torch.tensor(0.0)  # as torch's (a CPU float32 tensor); an int in state_dict()
        quantized = p.numel() >= self.min_8bit_size
        maps = self._maps_on(p.device) if quantized else None
        for i in range(1, self._n_state + 1):
            if quantized:
                state[f"state{i}"] = torch.zeros_like(p, dtype=torch.uint8, memory_format=torch.contiguous_format)
                state[f"qmap{i}"] = maps[i - 1]
            else:
                state[f"state{i}"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.contiguous_format)
        if quantized:
            for i in range(1, self._n_state + 1):
                state[f"absmax{i}"] = torch.zeros(quant8.blocks(p.numel()), dtype=torch.float32, device=p.device)
        return state

    def _state_of(self, p: torch.Tensor) -> dict:
        state = self.state[p]
        if len(state) == 0:
            return self._init_state(p)
        for key in _QUANT_KEYS:  # moved with the model (.to()): the state follows on the next step
            value = state.get(key)
            if isinstance(value, torch.Tensor) and value.device != p.device:
                state[key] = value.to(p.device)
        missing = [f"state{i}" for i in range(1, self._n_state + 1) if f"state{i}" not in state]
        if missing or "step" not in state:
            raise KeyError(f"{type(self).__name__}: the state of a parameter lacks {missing or ['step']}")
        for i in range(1, self._n_state + 1):
            s = state[f"state{i}"]
            wanted = torch.uint8 if f"absmax{i}" in state else torch.float32
            if s.shape != p.shape or s.dtype != wanted:
                raise RuntimeError(f"{type(self).__name__}: state{i} is {s.dtype} {tuple(s.shape)}, its parameter "
                                   f"{tuple(p.shape)} needs {wanted} of that shape")  # fmt: skip
        return state

    # -- the step ------------------------------------------------------------------------------

    def _check(self, p: torch.Tensor) -> None:
        name, g = type(self).__name__, p.grad
        if g.is_sparse or p.is_sparse:
            raise RuntimeError(f"{name} does not support sparse gradients")
        if p.is_complex():
            raise TypeError(f"{name} does not support complex parameters ({p.dtype}); view them as real first")
        if p.dtype not in _DTYPES:
            raise TypeError(f"{name} updates float32, bfloat16 or float16 parameters, got {p.dtype}")
        if g.dtype != p.dtype or g.shape != p.shape or g.device != p.device:
            raise RuntimeError(f"{name}: a gradient must match its parameter's dtype, shape and device; got grad "
                               f"{g.dtype} {tuple(g.shape)} on {g.device} for param {p.dtype} {tuple(p.shape)} "
                               f"on {p.device}")  # fmt: skip

    def _backend_for(self, device: torch.device) -> str:
        if self.backend == AUTO:
            return "cuda" if device.type == "cuda" else "numba"
        if self.backend == "cuda" and device.type != _dispatch._DEVICE_TYPE["cuda"]:
            raise ValueError(f"{type(self).__name__}: backend 'cuda' updates CUDA tensors, got {device}")
        if self.backend != "cuda" and device.type != "cpu":
            raise ValueError(f"{type(self).__name__}: backend {self.backend!r} updates CPU tensors, got {device}; "
                             "use backend='cuda' or 'auto'")  # fmt: skip
        return self.backend

    @torch.no_grad()
    def step(self, closure=None):
        """One update of every parameter with a gradient; returns ``closure()``'s loss if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            for p in params:
                self._check(p)
            options = self._kernel_options(group)
            parts: dict = {}
            for p in params:
                parts.setdefault((p.dtype, p.device), []).append(p)
            for (_, device), part in parts.items():
                states = [self._state_of(p) for p in part]
                lists = _lists(part, states, self._n_state)
                steps = [state["step"] for state in states]  # advanced by the step
                backend = self._backend_for(device)
                seed = None
                if self.stochastic_rounding and part[0].dtype == torch.bfloat16:
                    seed = Precision._next_seed(self)
                masters = self.master_weights and part[0].dtype in (torch.bfloat16, torch.float16)
                if masters:  # the float32 masters are the kernel's parameters (and the gradients widened)
                    lists = ([self._master_of(p, state) for p, state in zip(part, states)],
                             [p.grad.float() for p in part], *lists[2:])  # fmt: skip
                if torch.compiler.is_compiling():  # one opaque op in the graph
                    if seed is not None or masters:
                        raise RuntimeError(f"{type(self).__name__}: stochastic_rounding and master_weights keep "
                                           "host state between steps; run the step eagerly")  # fmt: skip
                    values = [float(options[o.name]) for o in OPTIMIZERS[self._op].options]
                    torch.ops.fastnorm.step_8bit_(self._op, backend, *lists, steps, values, seed)
                else:
                    _run(backend, self._op, *lists, steps, options, seed)
                if masters:
                    for p, master in zip(part, lists[0]):
                        p.copy_(master)  # rounded to nearest even, as master_weights=True does elsewhere
                        self._marks[p] = _mark(p)
        return loss

    def _master_of(self, p: torch.Tensor, state: dict) -> torch.Tensor:
        """The float32 master of a 16-bit parameter (``state["master_param"]``), made from it on
        first use, and restarted from it when the parameter was written from outside since this
        optimizer last wrote it (``p.copy_``, ``model.load_state_dict``, ``p.data = ...``) and no
        longer equals the master rounded: the parameter is the truth (fastnorm/optim/_precision.py)."""
        master = state.get("master_param")
        if master is None or master.shape != p.shape or master.device != p.device:
            master = state["master_param"] = p.detach().to(torch.float32, copy=True)
        else:
            before = self._marks.get(p)
            if (before is None or not _same_mark(before, _mark(p))) and not torch.equal(master.to(p.dtype), p):
                master.copy_(p)
        return master

    # -- checkpoints ---------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """torch's, with each parameter's quantization tensors under bitsandbytes' wrapped key."""
        out = super().state_dict()
        out["state"] = {k: dict(v) for k, v in out["state"].items()}
        for state in out["state"].values():
            if isinstance(state.get("step"), torch.Tensor):  # bitsandbytes keeps an int
                state["step"] = int(state["step"].item())
            wrapped = {k: state.pop(k) for k in _QUANT_KEYS if k in state}
            if wrapped:
                state[_WRAPPED] = wrapped
        return out

    def load_state_dict(self, state_dict: dict) -> None:
        """Loads fastnorm's or bitsandbytes' 8-bit checkpoints (wrapped or not), and 32-bit ones of
        torch's Adam/AdamW or fastnorm's Lion (``exp_avg`` / ``exp_avg_sq``: quantized here where
        the parameter has ``min_8bit_size`` values). Deep-copied first, as bitsandbytes does: the
        loaded state never shares memory with the checkpoint's."""
        state_dict = copy.deepcopy(state_dict)
        saved = [g["params"] for g in state_dict["param_groups"]]
        ours = [g["params"] for g in self.param_groups]
        by_id = dict(zip(chain.from_iterable(saved), chain.from_iterable(ours))) if len(saved) == len(ours) else {}
        originals, converted = {}, {}
        for key, value in state_dict["state"].items():
            value = dict(value)
            value.update(value.pop(_WRAPPED, {}))
            if "exp_avg" in value and "state1" not in value and key in by_id:
                value = self._from_32bit(value, by_id[key])
            originals[key] = {k: v for k, v in value.items() if k in _QUANT_KEYS or k == "master_param"}
            converted[key] = value
        state_dict["state"] = converted
        super().load_state_dict(state_dict)  # torch's checks, hooks and casts
        for key, values in originals.items():  # bitsandbytes' rule: these keep their dtypes
            if key in by_id:
                p = by_id[key]
                for k, v in values.items():
                    self.state[p][k] = v.to(p.device)
                step = self.state[p].get("step", 0)
                self.state[p]["step"] = torch.tensor(float(step.item() if isinstance(step, torch.Tensor) else step))

    def _from_32bit(self, value: dict, p: torch.Tensor) -> dict:
        """A torch-format 32-bit state (``step``, ``exp_avg``, ``exp_avg_sq``) in this format."""
        keys = ["exp_avg", "exp_avg_sq"][: self._n_state]
        step = value.get("step", 0)
        out = {"step": torch.tensor(float(step.item() if isinstance(step, torch.Tensor) else step))}
        quantized = p.numel() >= self.min_8bit_size
        d = OPTIMIZERS[self._op]
        for i, key in enumerate(keys, start=1):
            x = value[key].detach().to("cpu", torch.float32).contiguous()
            if not quantized:
                out[f"state{i}"] = x.reshape(p.shape)
                continue
            code = quant8.dynamic_map(d.eight_bit_maps[i - 1])
            q, absmax = quant8.quantize(x.numpy(), code)
            out[f"state{i}"] = torch.from_numpy(q).reshape(p.shape)
            out[f"absmax{i}"] = torch.from_numpy(absmax)
            out[f"qmap{i}"] = torch.from_numpy(code.copy())
        return out

    def __getstate__(self) -> dict:
        """torch's, plus this optimizer's own settings (deepcopy and pickle keep them)."""
        keep = ("backend", "min_8bit_size", "stochastic_rounding", "master_weights", "_rounding_calls")
        return {**super().__getstate__(), **{k: getattr(self, k) for k in keep}}

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_maps", {})
        self.__dict__.setdefault("_marks", {})
        for key, default in (("backend", AUTO), ("min_8bit_size", 4096), ("stochastic_rounding", False),
                             ("master_weights", False), ("_rounding_calls", 0)):  # fmt: skip
            self.__dict__.setdefault(key, default)


def _lists(params: list, states: list[dict], n_state: int) -> tuple[list, ...]:
    """(params, grads, states, absmaxes) of one kernel call: the state lists per buffer (two, the
    second empty for one-state optimizers), an absmax list entry empty where the state is float32."""
    empty = torch.empty(0)
    rows = [[s[f"state{i}"] for s in states] if i <= n_state else [] for i in (1, 2)]
    absmax = [[s.get(f"absmax{i}", empty) for s in states] if i <= n_state else [] for i in (1, 2)]
    return params, [p.grad for p in params], rows[0], rows[1], absmax[0], absmax[1]


def _advance(steps: list[torch.Tensor]) -> list[float]:
    """step += 1 in each counter (a CPU float32 or float64 scalar tensor, as torch's); the new counts."""
    out = []
    for t in steps:
        if t.device.type != "cpu" or t.numel() != 1 or t.dtype not in (torch.float32, torch.float64):
            raise RuntimeError(f"a step counter must be a one-value float CPU tensor, got {t.dtype} on {t.device}")
        counter = (ctypes.c_double if t.dtype == torch.float64 else ctypes.c_float).from_address(t.data_ptr())
        counter.value = counter.value + 1.0
        out.append(float(counter.value))
    return out


def _run(backend: str, op: str, params: list, grads: list, state1: list, state2: list, absmax1: list,
         absmax2: list, step_counters: list[torch.Tensor], options: dict,
         rounding_seed: int | None = None) -> None:  # fmt: skip
    """One kernel call for parameters of one dtype and device; advances their step counters."""
    d = OPTIMIZERS[op]
    steps = _advance(step_counters)
    n_state = 2 if state2 else 1
    states = [state1, state2][:n_state]
    absmaxes = [[a if a.numel() else None for a in row] for row in (absmax1, absmax2)[:n_state]]
    staged = [(p, p.contiguous()) for p in params if not p.is_contiguous()]
    copies = {id(p): c for p, c in staged}
    data = [copies.get(id(p), p) for p in params]
    grads = [g.contiguous() for g in grads]
    if backend == "reference":
        from fastnorm_kernels.reference.optim8 import step_8bit

        view = CpuArrays.view
        step_8bit(op, [view(p) for p in data], [view(g) for g in grads], [[view(s) for s in row] for row in states],
                  [[None if a is None else view(a) for a in row] for row in absmaxes], steps, options,
                  rounding_seed)  # fmt: skip
    else:
        constants, flags, uses, host = d.pack(options)
        scalars = np.zeros((len(params), 2), np.float32)
        cache: dict = {}
        for t, step in enumerate(steps):
            if step not in cache:
                cache[step] = d.tensor_scalars(float(step), host)
            scalars[t] = cache[step]
        addrs = np.zeros((6, len(params)), np.int64)
        quantized = np.array([a is not None for a in absmaxes[0]], np.bool_)
        for t, (p, g) in enumerate(zip(data, grads)):
            addrs[0, t], addrs[1, t] = p.data_ptr(), g.data_ptr()
            for i in range(2):  # an absent buffer's rows repeat the gradient's, never touched
                addrs[2 + 2 * i, t] = states[i][t].data_ptr() if i < n_state else g.data_ptr()
                a = absmaxes[i][t] if i < n_state else None
                addrs[3 + 2 * i, t] = a.data_ptr() if a is not None else g.data_ptr()
        numels = tuple(p.numel() for p in params)
        if backend == "numba":
            from fastnorm_kernels.numba_cpu.optim8 import step_8bit_table
        else:
            from fastnorm_kernels.numba_cuda.optim8 import step_8bit_table
        step_8bit_table(op, addrs, numels, _STORAGE[params[0].dtype], quantized, scalars, constants, flags, uses,
                        rounding_seed)  # fmt: skip
    for p, c in staged:
        p.copy_(c)


@torch.library.custom_op(
    "fastnorm::step_8bit_", mutates_args=("params", "state1", "state2", "absmax1", "absmax2", "steps")
)
def _step_8bit_op(op: str, backend: str, params: list[torch.Tensor], grads: list[torch.Tensor],
                  state1: list[torch.Tensor], state2: list[torch.Tensor], absmax1: list[torch.Tensor],
                  absmax2: list[torch.Tensor], steps: list[torch.Tensor], options: list[float],
                  rounding_seed: int | None) -> None:  # fmt: skip
    """The 8-bit step as one op, for torch.compile (options: the description's, in its order)."""
    names = [o.name for o in OPTIMIZERS[op].options]
    kinds = {o.name: o.kind for o in OPTIMIZERS[op].options}
    values = {n: (bool(v) if kinds[n] is bool else v) for n, v in zip(names, options)}
    _run(backend, op, params, grads, state1, state2, absmax1, absmax2, steps, values, rounding_seed)


@_step_8bit_op.register_fake
def _(op, backend, params, grads, state1, state2, absmax1, absmax2, steps, options, rounding_seed) -> None:
    return None


def _check_option(cls: str, name: str, value) -> None:
    """bitsandbytes' checks and messages."""
    if name == "betas":
        for i, beta in enumerate(value):
            if not 0.0 <= beta < 1.0:
                raise ValueError(f"Invalid beta parameter at index {i}: {beta}")
        return
    label = {"lr": "learning rate", "eps": "epsilon value", "weight_decay": "weight_decay value"}.get(name)
    if label is not None and not 0.0 <= value:
        raise ValueError(f"Invalid {label}: {value}")


def eight_bit_class(op: str, spec) -> type:
    """The class of an ``EightBit`` entry of optimizer ``op``'s description: bitsandbytes'
    constructor (its defaults, then ``amsgrad`` for Adam, ``optim_bits``, ``args``,
    ``min_8bit_size``, ``is_paged``) plus ``backend``; param groups with bitsandbytes' keys."""
    positional, kw = inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY
    parameters = [inspect.Parameter("self", positional), inspect.Parameter("params", positional)]
    parameters += [inspect.Parameter(n, positional, default=v) for n, v in spec.defaults.items()]
    if spec.bnb_name == "adam":
        parameters.append(inspect.Parameter("amsgrad", positional, default=False))
    parameters += [inspect.Parameter("optim_bits", positional, default=32),
                   inspect.Parameter("args", positional, default=None),
                   inspect.Parameter("min_8bit_size", positional, default=4096),
                   inspect.Parameter("is_paged", positional, default=False),
                   inspect.Parameter("backend", kw, default=AUTO),
                   inspect.Parameter("stochastic_rounding", kw, default=False),
                   inspect.Parameter("master_weights", kw, default=False)]  # fmt: skip
    signature = inspect.Signature(parameters)
    name = spec.class_name

    def __init__(self, params, *args, **kwargs) -> None:
        bound = signature.bind(self, params, *args, **kwargs)
        bound.apply_defaults()
        a = dict(bound.arguments)
        if a.pop("amsgrad", False):
            raise ValueError(f"{name} does not support amsgrad=True")
        if a.pop("optim_bits") != 32:
            raise ValueError(f"{name} only supports optim_bits=32 (default value for compatibility)")
        args_ = a.pop("args")
        min_8bit_size = a.pop("min_8bit_size") if args_ is None else args_.min_8bit_size
        options = {n: a[n] for n in spec.defaults}
        options["betas"] = tuple(options["betas"])
        for n, v in options.items():
            _check_option(name, n, v)
        options.setdefault("eps", 0.0)  # bitsandbytes' one-state optimizers keep eps=0 in their groups
        if spec.bnb_name == "adam":
            options.update(alpha=0.0, t_alpha=None, t_beta3=None)
        Optimizer8bit.__init__(self, params, options, min_8bit_size=min_8bit_size, backend=a["backend"],
                               is_paged=a["is_paged"], stochastic_rounding=a["stochastic_rounding"],
                               master_weights=a["master_weights"])  # fmt: skip

    __init__.__signature__ = signature
    return type(name, (Optimizer8bit,), {"__init__": __init__, "__doc__": spec.doc, "__module__": "fastnorm.optim",
                                         "__qualname__": name, "_op": op, "_spec": spec})  # fmt: skip


CLASSES = {spec.class_name: eight_bit_class(op, spec) for op, d in OPTIMIZERS.items() for spec in d.eight_bit}
