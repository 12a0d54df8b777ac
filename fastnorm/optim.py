"""Drop-in optimizers: ``SGD``, ``Adagrad``, ``RMSprop``, ``Adam``, ``AdamW``.

Each class subclasses its ``torch.optim`` counterpart, so the constructor (signature, defaults,
argument checks), ``param_groups``, ``state_dict`` keys, ``zero_grad``, hooks, LR schedulers and
``add_param_group`` are torch's own; only ``step`` changes. State is created by torch's own
``_init_group`` (so it exists exactly where torch creates it, and an option toggled mid-run that
needs state torch never made raises torch's error); the per-step scalars are computed in float64
and one kernel call updates each group (and dtype). With ``backend="torch"``, and with ``"auto"``
for any group a fastnorm kernel cannot take (sparse or complex gradients, a dtype the kernels
lack, torch-only options) or that torch updates faster (on CPU: plain SGD, SGD with momentum under
50K elements; ``fastnorm._dispatch.AUTO_CPU_MIN_NUMEL``), torch's own ``step`` runs.

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

import functools
import inspect
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from itertools import chain

import numpy as np
import torch
import torch.optim.optimizer as _torch_optimizer

from fastnorm_kernels._bits import BFLOAT16
from fastnorm_kernels.formulas.optim import OPTIMIZERS

from . import _dispatch, _ops
from ._dispatch import AUTO, BACKENDS, Backend, _load, check_name, resolve
from ._signature import with_backend_signature

__all__ = ["SGD", "Adagrad", "RMSprop", "Adam", "AdamW"]

_TORCH_ONLY_OPTIONS = ("foreach", "fused", "capturable", "differentiable")
_STEP_DTYPES = (torch.float32, torch.float64)
#: parameter dtype -> the kernels' storage dtype (bfloat16 as uint16 bits: kernels/fastnorm_kernels/_bits.py)
_KERNEL_DTYPES = {torch.float32: np.dtype(np.float32), torch.float64: np.dtype(np.float64),
                  torch.float16: np.dtype(np.float16), torch.bfloat16: BFLOAT16}  # fmt: skip
_HALF = (torch.bfloat16, torch.float16)
_TORCH = Backend("torch", None, None)
_BUFFER_ROWS = 3  # state buffers per table (kernels/fastnorm_kernels/_optimizer_api.py: param, grad, 3 buffers)


def _unhooked(step: Callable) -> Callable:
    """torch wraps ``Optimizer.step`` with its hook runner once a class is instantiated; our
    ``step`` already runs the hooks, so call torch's without running them a second time."""
    return step.__wrapped__ if getattr(step, "hooked", False) else step


def _with_step_hooks(step: Callable) -> Callable:
    """torch's ``Optimizer.profile_hook_step`` (pre- and post-hooks, global and per optimizer,
    and a profiler record), with the record made only while a profiler runs: it costs ~10 µs
    per step, a tenth of a small model's update. Marked ``hooked`` so torch does not wrap again."""

    def run(self, args, kwargs):
        for pre_hook in chain(_torch_optimizer._global_optimizer_pre_hooks.values(),
                              self._optimizer_step_pre_hooks.values()):  # fmt: skip
            result = pre_hook(self, args, kwargs)
            if result is not None:
                if not (isinstance(result, tuple) and len(result) == 2):
                    raise RuntimeError(
                        f"{step} must return None or a tuple of (new_args, new_kwargs), but got {result}."
                    )
                args, kwargs = result
        out = step(self, *args, **kwargs)
        self._optimizer_step_code()
        for post_hook in chain(self._optimizer_step_post_hooks.values(),
                               _torch_optimizer._global_optimizer_post_hooks.values()):  # fmt: skip
            post_hook(self, args, kwargs)
        return out

    @functools.wraps(step)
    def wrapper(self, *args, **kwargs):
        if torch.compiler.is_compiling():
            return run(self, args, kwargs)
        if torch._C._autograd._profiler_enabled():
            with torch.autograd.profiler.record_function(f"Optimizer.step#{type(self).__name__}.step"):
                return run(self, args, kwargs)
        return run(self, args, kwargs)

    wrapper.hooked = True
    return wrapper


def _torch_only_options(group: dict) -> list[str]:
    return [f"{k}={group[k]!r}" for k in _TORCH_ONLY_OPTIONS if group.get(k) not in (None, False)]


def _parameters(fn: Callable) -> tuple[str, ...]:
    return tuple(inspect.signature(fn).parameters)


def _scalar(x) -> float:
    return float(x.item()) if isinstance(x, torch.Tensor) else float(x)


@dataclass
class _Part:
    """The tensors of a group that share a dtype: one kernel call.

    The kernels update state through aliases (``Tensor.detach()``) taken when the plan was
    built: they hold the storage they point to, so no later ``.data =``, ``set_`` or resize of a
    state tensor can leave the kernel an address it does not own. Each step the live state
    tensors' data pointers are compared with the aliases' (``state_ptrs``): any difference
    plans again."""

    params: list[torch.Tensor]
    shapes: list[torch.Size]
    numels: tuple[int, ...]
    dtype: torch.dtype  # the parameters'
    kernel_dtype: np.dtype  # the kernels' storage dtype: the parameters', or float32 with master weights
    masters: list[torch.Tensor] | None  # aliases of the float32 master copies (master_weights=True)
    buffers: list[list[torch.Tensor] | None]  # aliases, table rows b0..b2; None: unused
    steps: list[torch.Tensor]  # aliases of the step counters ([] for SGD)
    live_state: list[torch.Tensor]  # the state tensors themselves, buffers then steps
    state_ptrs: list[int]  # their data pointers when the plan was built
    first_step: list[bool]  # SGD: the momentum buffer is new this step
    new_buffers: list[tuple[torch.Tensor, torch.Tensor]]  # SGD: (param, buffer) to add to the state
    dense_buffers: bool  # every state buffer contiguous (else they are staged too, see _launch)
    buffer_ptrs: list[list[int] | None] | None  # the buffer rows' addresses, for a table backend
    step_ptrs: np.ndarray  # int64 addresses of the step counters
    #: master weights: each parameter's _mark() after the step wrote it (None: not yet written by
    #: this plan); a parameter found otherwise was changed from outside
    master_seen: list[tuple] | None = None


@dataclass
class _Plan:
    """What a group's update needs from one step to the next (see the module docstring)."""

    state: object  # the optimizer's state mapping it was built against
    options: tuple  # the group options that decide state and buffers
    params: list[torch.Tensor]
    state_dicts: list[tuple[torch.Tensor, dict]]  # (param, its state dict) it relies on
    entries: list[tuple[dict, str, torch.Tensor]]  # (state dict, key, tensor) it relies on
    parts: list[_Part]
    backend: Backend


class _KernelOptimizer:
    """``step`` for optimizers whose update runs on fastnorm's kernels.

    A subclass names its description (``_op``, a key of
    ``fastnorm_kernels.formulas.optim.OPTIMIZERS``), from which its table rows (the state
    buffers), the options that decide which buffers exist and the kernels' keyword arguments
    follow. A torch twin (``_torch_cls``) also names the lists its ``_init_group`` fills after
    params and grads (``_state_lists``, in that function's argument order).
    """

    _op: str  # key of OPTIMIZERS
    _torch_cls: type[torch.optim.Optimizer] | None = None
    _state_lists: tuple[str, ...] = ()
    _option_defaults: dict = {}  # kernel options a group may lack (AdamW: decoupled_weight_decay)
    backend: str

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if getattr(cls, "_op", None) is None:
            return
        d = cls._description = OPTIMIZERS[cls._op]
        cls._table_rows = tuple(b.key for b in d.buffers)
        structural = [a for b in d.buffers if b.when is not None for a in _parameters(b.when)]
        cls._plan_options = (*dict.fromkeys(structural), *_TORCH_ONLY_OPTIONS)
        if cls._torch_cls is None:
            cls._state_lists = (*cls._table_rows, *(("step",) if d.counts_steps else ()))

    def _kernel_options(self, group: dict) -> dict:
        """The op's keyword options from a parameter group (``betas`` gives beta1 and beta2)."""
        options = {}
        for o in self._description.options:
            name = o.name
            if name in group:
                value = group[name]
            elif name in ("beta1", "beta2"):
                value = group["betas"][name == "beta2"]
            else:
                value = self._option_defaults.get(name, o.default)
            options[name] = bool(value) if o.kind is bool else _scalar(value)
        return options

    def __init__(self, params, *args, backend: str = "auto", master_weights: bool = False,
                 stochastic_rounding: bool = False, **kwargs) -> None:  # fmt: skip
        check_name(backend, self._op)
        self.backend = backend
        self.master_weights, self.stochastic_rounding = bool(master_weights), bool(stochastic_rounding)
        self._rounding_calls = 0
        super().__init__(params, *args, **kwargs)
        self._check_precision_options()

    def _check_precision_options(self) -> None:
        """``master_weights`` / ``stochastic_rounding``: refused where they do not apply."""
        name = type(self).__name__
        if self.master_weights and self.stochastic_rounding:
            raise ValueError(
                f"{name}: master_weights=True and stochastic_rounding=True are alternatives (a float32 master "
                f"copy already keeps the updates smaller than one bfloat16 ulp); choose one"
            )
        asked = "master_weights=True" if self.master_weights else "stochastic_rounding=True"
        if not (self.master_weights or self.stochastic_rounding):
            return
        if self.backend == "torch":
            raise ValueError(f"{name}: {asked} is fastnorm's own update; torch's implementation (backend='torch') "
                             f"has no such option")  # fmt: skip
        dtypes = {p.dtype for group in self.param_groups for p in group["params"]}
        wanted = _HALF if self.master_weights else (torch.bfloat16,)
        if not dtypes & set(wanted):
            raise ValueError(
                f"{name}: {asked} applies to {' and '.join(map(str, wanted))} parameters, and these are "
                f"{', '.join(sorted(map(str, dtypes)))}; convert the model first (model.bfloat16()) or leave it off"
            )

    def _next_seed(self) -> int:
        """The stochastic rounding seed of the next kernel launch: a splitmix64 hash of
        ``torch.initial_seed()`` and this optimizer's launch count (32 bits)."""
        self._rounding_calls += 1
        mask = (1 << 64) - 1
        x = (torch.initial_seed() * 0x9E3779B97F4A7C15 + self._rounding_calls * 0xBF58476D1CE4E5B9) & mask
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & mask
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & mask
        return (x ^ (x >> 31)) & 0xFFFFFFFF

    # -- what torch's pickling and deepcopy keep ----------------------------------------------

    _KEPT = {"backend": AUTO, "master_weights": False, "stochastic_rounding": False, "_rounding_calls": 0}

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        for key in self._KEPT:
            state[key] = getattr(self, key)
        return state

    def __setstate__(self, state: dict) -> None:
        state = dict(state)  # load_state_dict passes only state and param_groups: keep the options
        kept = {key: state.pop(key, self.__dict__.get(key, default)) for key, default in self._KEPT.items()}
        super().__setstate__(state)
        self.__dict__.update(kept)
        self.__dict__.pop("_plans", None)

    #: the state_dict key of the stochastic rounding launch count (top level: torch's
    #: ``load_state_dict`` ignores it, so such a checkpoint still loads into torch's optimizer)
    ROUNDING_CALLS_KEY = "fastnorm_rounding_calls"

    def state_dict(self) -> dict:
        """torch's; with ``stochastic_rounding`` also the launch count that seeds the rounding
        stream, so that a run resumed from it rounds as the uninterrupted run would."""
        state = super().state_dict()
        if self.stochastic_rounding:
            state[self.ROUNDING_CALLS_KEY] = self._rounding_calls
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's, except that with ``master_weights`` the float32 master copies and state of
        16-bit parameters stay float32 (torch casts every state tensor to its parameter's dtype),
        and a saved stochastic rounding launch count is taken (a checkpoint without one leaves
        this optimizer's)."""
        super().load_state_dict(state_dict)
        if self.ROUNDING_CALLS_KEY in state_dict:
            self._rounding_calls = int(state_dict[self.ROUNDING_CALLS_KEY])
        if not getattr(self, "master_weights", False):
            return
        saved_ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = chain.from_iterable(g["params"] for g in self.param_groups)
        for saved_id, p in zip(saved_ids, params):
            saved = state_dict["state"].get(saved_id, {})
            if p.dtype not in _HALF or "master_param" not in saved:
                continue
            for key, value in saved.items():
                if key != "step" and isinstance(value, torch.Tensor) and value.dtype == torch.float32:
                    self.state[p][key] = value.to(device=p.device, copy=True)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        self._refuse_torch_only_options(self.param_groups[-1])

    def _refuse_torch_only_options(self, group: dict) -> None:
        asked = _torch_only_options(group)
        if asked and getattr(self, "backend", AUTO) not in (AUTO, "torch"):
            raise ValueError(
                f"{type(self).__name__}(backend={self.backend!r}) runs fastnorm's own fused "
                f"update and does not do {', '.join(asked)}; leave them at their defaults, or "
                f"use backend='torch' for torch's implementation"
            )

    # -- the step -------------------------------------------------------------------------------

    @_with_step_hooks
    def step(self, closure: Callable[[], float] | None = None):
        """Perform a single optimization step.

        Under ``torch.compile`` (a compiled ``optimizer.step`` or a compiled training step) the
        numba backend's update is one ``torch.ops.fastnorm.<op>_`` node per parameter group in the
        graph (:meth:`_traced_step`); the other backends run torch's own update there.

        Args:
            closure: reevaluates the model and returns the loss (optional).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if torch.compiler.is_compiling():
            self._traced_step()
            return loss
        plans = self.__dict__.setdefault("_plans", {})
        ready, torch_groups = [], []
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            plan = plans.get(id(group))
            arguments = self._arguments(plan) if plan is not None and self._still_valid(plan, group, params) else None
            if arguments is None:  # first step, or something changed: plan again (torch's errors)
                try:
                    with torch.no_grad():
                        plan = plans[id(group)] = self._build_plan(group, params)
                    arguments = self._arguments(plan, strict=True)
                except Exception:
                    # torch steps group by group: an error that torch's own step raises for a
                    # group before this one comes first, as in torch (found on copies)
                    if torch_groups:
                        self._torch_step_on_copies(torch_groups)
                    raise
            if plan.backend.is_torch:
                torch_groups.append(group)
            else:
                ready.append((group, plan, arguments))
        # every check passed before any parameter or state changes
        if torch_groups:
            self._torch_step(torch_groups)
        for group, plan, arguments in ready:
            options = self._kernel_options(group)
            for part, (rows, addrs) in zip(plan.parts, arguments):
                if part.masters is not None:
                    _adopt_outside_changes(part)
                part_options = options
                if self.stochastic_rounding and part.kernel_dtype == BFLOAT16:
                    part_options = {**options, "rounding_seed": self._next_seed()}
                with plan.backend.device_guard(part.params[0]):
                    _launch(plan.backend, self._description, part, rows, addrs, part_options)
                if part.new_buffers:  # buffers cloned on their first step (SGD's momentum) join the state
                    key = self._table_rows[self._description.clone_first]
                    for p, buf in part.new_buffers:
                        self.state[p][key] = buf
                    part.new_buffers = []
                    part.first_step = [False] * len(part.first_step)
        return loss

    def _torch_step(self, groups: list[dict], state: defaultdict | None = None) -> None:
        """torch's own step of ``groups`` (and of ``state`` in place of the optimizer's, if given)."""
        if self._torch_cls is None:
            raise RuntimeError(
                f"{type(self).__name__}: torch.optim has no {type(self).__name__}, and this step needs torch's "
                f"implementation (under torch.compile: master_weights, stochastic_rounding or a backend other "
                f"than numba); run the step eagerly, or compile with backend='numba'"
            )
        all_groups, all_state = self.param_groups, self.state
        self.param_groups = groups
        if state is not None:
            self.state = state
        try:
            _unhooked(self._torch_cls.step)(self)
        finally:
            self.param_groups, self.state = all_groups, all_state

    def _torch_step_on_copies(self, groups: list[dict]) -> None:
        """torch's step of ``groups`` on copies of their parameters, gradients and state: raises
        what torch's step would raise for them, and changes nothing (a failed fastnorm step
        leaves the optimizer as it was)."""
        copies, state = {}, defaultdict(dict)
        for p in (p for group in groups for p in group["params"]):
            q = copies[p] = p.detach().clone()
            q.grad = None if p.grad is None else p.grad.detach().clone()
            if p in self.state:
                state[q] = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in self.state[p].items()}
        self._torch_step([{**group, "params": [copies[p] for p in group["params"]]} for group in groups], state)

    # -- under torch.compile ------------------------------------------------------------------------

    def _traced_step(self) -> None:
        """The step ``torch.compile`` traces: per group, torch's ``_init_group`` (which creates state
        as torch does, and which the compiler runs with its own guards), then one
        ``torch.ops.fastnorm.<op>_`` call on the lists it gathered, the backend chosen while
        tracing. Groups the numba kernels do not take (another backend, 16-bit parameters with
        master weights or stochastic rounding, sparse or complex gradients, torch-only options)
        run torch's own update, traced as torch's is."""
        torch_groups = []
        for group in self.param_groups:
            lists = {name: [] for name in self._state_lists}
            params, grads = [], []
            if not self._traceable(group):
                torch_groups.append(group)
                continue
            self._gather(group, params, grads, lists)
            if not params:
                continue
            numel = sum(p.numel() for p in params)
            kind = "sgd_momentum" if self._op == "sgd" and group.get("momentum", 0) != 0 else self._op
            if _traced_backend(self.backend, self._op, params[0].device.type, kind, numel) != "numba" or any(
                g.is_sparse or p.is_complex() or p.dtype not in _KERNEL_DTYPES for p, g in zip(params, grads)
            ):
                torch_groups.append(group)
                continue
            options = self._kernel_options(group)
            d = self._description
            uses = d.pack(options)[2]
            rows = [lists[b.key] if use else [] for b, use in zip(d.buffers, uses)]
            extra = {}
            cloned = d.clone_first
            if cloned is not None:
                first_step = [b is None for b in rows[cloned]]
                rows[cloned] = [torch.zeros_like(p) if b is None else b for p, b in zip(params, rows[cloned])]
                extra["first_step"] = first_step if uses[cloned] else []
            steps = [lists["step"]] if d.counts_steps else []
            _OPS[self._op](params, grads, *rows, *steps, **options, **extra)
            if cloned is not None and uses[cloned]:
                for p, b, new in zip(params, rows[cloned], first_step):
                    if new:
                        self.state[p][d.buffers[cloned].key] = b
        if torch_groups:
            self._torch_step(torch_groups)

    def _traceable(self, group: dict) -> bool:
        """Whether a group may take the traced kernel update (else torch's traced update serves).
        (``capturable`` is not read: the compiler sets it itself for the step it traces.)"""
        if self.master_weights or self.stochastic_rounding:
            return False
        return not (bool(group.get("foreach")) or bool(group.get("fused")) or bool(group.get("differentiable")))

    def _gather(self, group: dict, params: list, grads: list, lists: dict) -> None:
        """The group's parameters with gradients, their gradients and state lists (``lists``: name ->
        list, filled in place), state created where it is missing: torch's ``_init_group`` for a torch
        twin (its state, keys and errors exactly), else from the description: each buffer that
        exists under the group's options as zeros of its parameter's dtype and layout (a buffer
        cloned on its first step: None until then, as torch's SGD keeps it), and a step counter
        (``torch.tensor(0.0)`` of torch's scalar dtype) where the optimizer counts steps."""
        if self._torch_cls is not None:  # called as self._init_group: torch.compile knows it by that name
            self._init_group(group, params, grads, *lists.values())
            return
        d = self._description
        uses = d.pack(self._kernel_options(group))[2]
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
            params.append(p)
            grads.append(p.grad)
            state = self.state[p]
            if d.counts_steps and "step" not in state:
                state["step"] = torch.tensor(0.0, dtype=_torch_optimizer._get_scalar_dtype())
            for b, use in zip(d.buffers, uses):
                if use and b.key not in state and not b.clone_first:
                    state[b.key] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if use:
                    lists[b.key].append(state.get(b.key))
            if d.counts_steps:
                lists["step"].append(state["step"])

    # -- the plan ---------------------------------------------------------------------------------

    def _options_key(self, group: dict) -> tuple:
        return tuple(map(group.get, self._plan_options))

    def _still_valid(self, plan: _Plan, group: dict, params: list[torch.Tensor]) -> bool:
        """The fingerprint: same objects and options as when the plan was built. (A plan that
        hands the group to torch is rebuilt every step: under "auto" that choice depends on
        the gradients, e.g. sparse ones.)"""
        if plan.backend.is_torch or plan.state is not self.state or plan.options != self._options_key(group):
            return False
        if len(params) != len(plan.params):
            return False
        for a, b in zip(params, plan.params):  # plain loops: this runs every step
            if a is not b:
                return False
        get = self.state.get
        for p, d in plan.state_dicts:
            if get(p) is not d:
                return False
        for d, key, t in plan.entries:
            if d.get(key) is not t:
                return False
        return True

    def _build_plan(self, group: dict, params: list[torch.Tensor]) -> _Plan:
        """Choose the backend, create state as torch does, check everything (torch's errors)."""
        backend = self._resolve(group, params)
        options = self._options_key(group)
        if backend.is_torch:
            return _Plan(self.state, options, params, [], [], [], backend)
        self._check_gradients(params, backend)
        lists = {name: [] for name in self._state_lists}
        got, grads = [], []
        self._gather(group, got, grads, lists)
        if self.master_weights and self._make_masters(params):  # new float32 state: gather it again
            lists = {name: [] for name in self._state_lists}
            got, grads = [], []
            self._gather(group, got, grads, lists)
        master = [self.master_weights and p.dtype in _HALF for p in params]
        if self.stochastic_rounding and any(p.dtype == torch.float16 for p in params):
            raise ValueError(
                f"{type(self).__name__}: stochastic_rounding=True rounds bfloat16 parameters; this group has "
                f"float16 ones (use bfloat16, or master_weights=True)"
            )
        steps = lists.get("step", [])
        if steps and params[0].device.type != "cpu":
            # the cuda kernels advance the step counters in host memory, where torch keeps them
            # without capturable=True; a counter found on a GPU (a fused or capturable torch
            # optimizer's checkpoint) comes back to the CPU, with its value
            for i, p in enumerate(params):
                if steps[i].device.type != "cpu":
                    steps[i] = self.state[p]["step"] = steps[i].detach().cpu()
        rows = [lists[name] if lists.get(name) else None for name in self._table_rows]
        rows += [None] * (_BUFFER_ROWS - len(rows))
        first_step = [False] * len(params)
        cloned = self._description.clone_first
        if cloned is not None and rows[cloned] is not None:
            # torch clones the gradient into a new buffer after the update: the kernel writes it
            # there, and the buffer joins the state when the update runs (see _launch)
            for i, p in enumerate(params):
                if rows[cloned][i] is None:
                    rows[cloned][i] = torch.zeros_like(p, dtype=torch.float32 if master[i] else p.dtype)
                    first_step[i] = True
        if _state_moved(params, rows, steps, master):
            # state of another dtype or device than its parameter (the model was moved with
            # .to() after the first step) or step counters of mixed dtypes: torch's own update
            # computes with them as they are; so does this step
            return _Plan(self.state, options, params, [], [], [], _TORCH)
        for i, p in enumerate(params):
            self._check_state(p, [row[i] for row in rows if row is not None], steps[i] if steps else None,
                              torch.float32 if master[i] else p.dtype)  # fmt: skip
        state_dicts = [(p, self.state[p]) for p in params if p in self.state]
        entries = [(d, key, t) for _, d in state_dicts for key, t in d.items() if isinstance(t, torch.Tensor)]
        entries += [(self.state[p], self._table_rows[cloned], rows[cloned][i])
                    for i, p in enumerate(params) if first_step[i]]  # fmt: skip
        parts = []
        table = hasattr(backend.kernels, f"{self._op}_step_table") and backend.name != "numba"  # cuda's address table
        for index in _by_dtype(params, master):
            live_rows = [None if row is None else [row[i] for i in index] for row in rows]
            live = [t for row in live_rows if row is not None for t in row] + [steps[i] for i in index if steps]
            masters = [self.state[params[i]]["master_param"] for i in index] if master[index[0]] else None
            live += masters or []
            dense = all(t.is_contiguous() for row in live_rows if row is not None for t in row)
            parts.append(_Part(
                params=[params[i] for i in index], shapes=[params[i].shape for i in index],
                numels=tuple(params[i].numel() for i in index), dtype=params[index[0]].dtype,
                kernel_dtype=np.dtype(np.float32) if masters else _KERNEL_DTYPES[params[index[0]].dtype],
                masters=None if masters is None else [m.detach() for m in masters],
                buffers=[None if row is None else [t.detach() for t in row] for row in live_rows],
                steps=[steps[i].detach() for i in index] if steps else [], live_state=live,
                state_ptrs=[t.data_ptr() for t in live], first_step=[first_step[i] for i in index],
                new_buffers=[(params[i], rows[cloned][i]) for i in index if first_step[i]],
                dense_buffers=dense,
                buffer_ptrs=[None if row is None else [t.data_ptr() for t in row] for row in live_rows]
                if table and dense else None,
                step_ptrs=np.array([steps[i].data_ptr() for i in index] if steps else [], np.int64),
            ))  # fmt: skip
        return _Plan(self.state, options, params, state_dicts, entries, parts, backend)

    def _make_masters(self, params: list[torch.Tensor]) -> bool:
        """master_weights: each 16-bit parameter's state gets ``"master_param"`` (a float32 copy)
        and its buffers in float32 (exact: they are new, or values of a 16-bit checkpoint).
        Returns whether any state changed."""
        changed = False
        for p in params:
            if p.dtype not in _HALF:
                continue
            state = self.state[p]
            if "master_param" not in state:
                state["master_param"] = p.detach().to(torch.float32, copy=True)
                changed = True
            for key, t in list(state.items()):
                if key != "step" and isinstance(t, torch.Tensor) and t.shape == p.shape and t.dtype != torch.float32:
                    state[key] = t.detach().to(torch.float32)
                    changed = True
        return changed

    def _resolve(self, group: dict, params: list[torch.Tensor]) -> Backend:
        precision = self.master_weights or self.stochastic_rounding
        name = type(self).__name__
        if _torch_only_options(group):
            self._refuse_torch_only_options(group)
            if precision:
                raise ValueError(f"{name}: master_weights / stochastic_rounding are fastnorm's own update, which "
                                 f"does not do {', '.join(_torch_only_options(group))}")  # fmt: skip
            return _TORCH  # "auto" with torch-only options: torch's implementation, as asked
        if self.backend == AUTO and not precision:  # size and kind decide (_dispatch.AUTO_CPU_MIN_NUMEL)
            kind = "sgd_momentum" if self._op == "sgd" and group.get("momentum", 0) != 0 else self._op
            chosen = resolve(AUTO, self._op, params[0].device, sum(p.numel() for p in params), kind)
        else:
            chosen = resolve(self.backend, self._op, params[0].device)
        if chosen.is_torch and self._torch_cls is None:
            ours = [b for b in _dtype_backends(params[0].dtype, self._op) if b != "torch"]
            raise ValueError(
                f"{name}: torch.optim has no {name}, so backend {chosen.name!r} cannot run here; use one of "
                f"fastnorm's backends: {', '.join(ours)}"
            )
        if chosen.is_torch and not precision:
            return chosen
        unsupported = _unsupported(params, chosen, self._op)
        if unsupported:
            if self.backend == AUTO and not precision:
                return _TORCH  # "auto" never refuses what torch supports
            if precision and chosen.is_torch:
                raise ValueError(f"{name}: master_weights / stochastic_rounding need fastnorm's kernels, and none "
                                 f"here updates these parameters: {unsupported[1]}")  # fmt: skip
            raise unsupported[0](f"{name} (fastnorm backend {chosen.name!r}) {unsupported[1]}")
        devices = {p.device for p in params}
        if len(devices) > 1:
            raise ValueError(
                f"backend {chosen.name!r} updates a parameter group on one device, but this "
                f"group has parameters on {sorted(map(str, devices))}"
            )
        return chosen

    def _check_gradients(self, params: list[torch.Tensor], backend: Backend) -> None:
        for p in params:
            g = p.grad
            if g.dtype != p.dtype or g.shape != p.shape or g.device != p.device:
                raise RuntimeError(
                    f"{type(self).__name__}: a gradient must match its parameter's dtype, shape and "
                    f"device; got grad {g.dtype} {tuple(g.shape)} on {g.device} for param {p.dtype} "
                    f"{tuple(p.shape)} on {p.device}"
                )

    def _check_state(self, p: torch.Tensor, buffers: list[torch.Tensor], step: torch.Tensor | None,
                     dtype: torch.dtype) -> None:  # fmt: skip
        """State tensors must match their parameter (torch's own kernels raise RuntimeError), in
        ``dtype`` (float32 for master weights)."""
        for t in buffers:
            if t.shape != p.shape or t.dtype != dtype or t.device != p.device:
                raise RuntimeError(
                    f"{type(self).__name__}: optimizer state of shape {tuple(t.shape)}, {t.dtype} on "
                    f"{t.device} does not match its parameter ({tuple(p.shape)}, {p.dtype} on "
                    f"{p.device}); was the parameter replaced after the optimizer's first step?"
                )
        if step is not None and (step.numel() != 1 or step.dtype not in _STEP_DTYPES):
            raise RuntimeError(f"{type(self).__name__}: a step counter must be a float scalar tensor, got {step}")

    def _arguments(self, plan: _Plan, strict: bool = False) -> list[tuple] | None:
        """Per part, (the five table rows of tensors, the address table or None), checked now
        against the plan before any update: the parameters and gradients (shape, dtype, device,
        dense layout) and every state tensor's data pointer. None if something changed since
        the plan was built (the caller plans again), or with ``strict`` the error."""
        arguments = []
        on_gpu = plan.backend.device_type == "cuda"
        strided = torch.strided
        for part in plan.parts:
            params, dtype = part.params, part.dtype
            grads = [p.grad for p in params]
            # one plain loop (no generators: this runs every step, for every tensor)
            ok = [t.data_ptr() for t in part.live_state] == part.state_ptrs
            if ok:
                for p, g, shape in zip(params, grads, part.shapes):
                    if (p.shape != shape or g.shape != shape or p.dtype is not dtype or g.dtype is not dtype
                            or p.is_cuda is not on_gpu or g.is_cuda is not on_gpu
                            or g.layout is not strided):  # fmt: skip
                        ok = False
                        break
            if not ok:
                if strict:
                    raise RuntimeError(
                        f"{type(self).__name__}: parameters, gradients and state must be dense tensors that "
                        f"match in shape, dtype and device"
                    )
                return None
            if part.masters is not None:  # float32 master weights: the kernel updates those
                params, grads = part.masters, [g.to(torch.float32) for g in grads]
            rows = [params, grads, *(grads if row is None else row for row in part.buffers)]
            addrs = None
            if part.buffer_ptrs is not None and all(t.is_contiguous() for t in (*params, *grads)):
                grad_ptrs = [g.data_ptr() for g in grads]
                buffer_ptrs = [grad_ptrs if row is None else row for row in part.buffer_ptrs]
                addrs = np.array([[p.data_ptr() for p in params], grad_ptrs, *buffer_ptrs], np.int64)
            arguments.append((rows, addrs))
        return arguments


def _unsupported(params: list[torch.Tensor], chosen: Backend, op: str):
    """(exception type, why) if ``chosen``'s kernels cannot update these parameters, else None."""
    for p in params:
        g = p.grad
        if g.is_sparse or p.is_sparse:
            return RuntimeError, "does not support sparse gradients; use dense gradients or backend='torch'"
        if p.is_complex():
            return TypeError, f"does not support complex parameters ({p.dtype}); use backend='torch'"
        dtype = _KERNEL_DTYPES.get(p.dtype)
        if chosen.is_torch or dtype is None or dtype not in chosen.kernels.OPTIMIZER_DTYPES:
            return ValueError, (
                f"does not update {p.dtype} parameters on {p.device}; backends that do: "
                f"{', '.join(_dtype_backends(p.dtype, op))}"
            )
    return None


def _dtype_backends(dtype: torch.dtype, op: str) -> list[str]:
    """The backends usable here whose ``op`` kernels update parameters of ``dtype`` (and torch)."""
    names = []
    for name in BACKENDS:
        module, why = _load(name)
        if why is None and (module is None or _KERNEL_DTYPES.get(dtype) in getattr(module, "OPTIMIZER_DTYPES", ())):
            names.append(name)
    return names


def _by_dtype(params: list[torch.Tensor], master: list[bool]) -> list[list[int]]:
    """Indices of the parameters of each (dtype, kept in a float32 master copy), in first-seen order."""
    parts: dict = {}
    for i, p in enumerate(params):
        parts.setdefault((p.dtype, master[i]), []).append(i)
    return list(parts.values())


def _launch(backend: Backend, d, part: _Part, tensors: list[list[torch.Tensor]], addrs: np.ndarray | None,
            options: dict) -> None:  # fmt: skip
    """One kernel call of optimizer ``d`` (its description) for a part: the address table for the
    compiled backends (``addrs``, or built here), arrays for the reference. A non-contiguous
    tensor is updated through a contiguous copy, written back after."""
    staged = []
    through_op = backend.name == "numba" or _cuda_op(backend, tensors)
    if addrs is None:
        candidates = (*tensors[0], *tensors[1])
        if not part.dense_buffers:
            candidates = {id(t): t for row in tensors for t in row}.values()
        if not all(t.is_contiguous() for t in candidates):
            if through_op:  # the op takes any one dense layout per tensor (channels-last weights)
                keep = _same_dense_layout(tensors)
                candidates = [t for i, column in enumerate(zip(*tensors)) if not keep[i] for t in column]
            staged = [(t, t.contiguous()) for t in {id(t): t for t in candidates}.values() if not t.is_contiguous()]
        if staged:
            copies = {id(t): c for t, c in staged}
            tensors = [[copies.get(id(t), t) for t in row] for row in tensors]
    n = len(d.buffers)
    cloned = d.clone_first is not None and part.buffers[d.clone_first] is not None
    if through_op:  # the C++ op (fastnorm/csrc/optim.cpp; on a GPU, optim_cuda.cpp launches)
        buffers = [[] if row is None else tensors[2 + i] for i, row in enumerate(part.buffers[:n])]
        extra = {"first_step": part.first_step if cloned else []} if d.clone_first is not None else {}
        steps = [part.steps] if d.counts_steps else []
        _OPS[d.name](tensors[0], tensors[1], *buffers, *steps, **options, **extra)
    elif (table := getattr(backend.kernels, f"{d.name}_step_table", None)) is not None:
        if addrs is None:
            addrs = np.array([[t.data_ptr() for t in row] for row in tensors], np.int64)
        if d.counts_steps:
            args = (part.step_ptrs, part.steps[0].dtype == torch.float64)
        else:
            args = (part.first_step,) if d.clone_first is not None else ()
        table(addrs, part.numels, part.kernel_dtype, *args, **options)
    else:
        arrays = [[backend.as_array(t) for t in row] for row in tensors]
        buffers = [None if row is None else arrays[2 + i] for i, row in enumerate(part.buffers[:n])]
        if d.counts_steps:
            extra = ([backend.as_array(s) for s in part.steps],)
        else:
            extra = (part.first_step,) if d.clone_first is not None else ()
        getattr(backend.kernels, f"{d.name}_step")(arrays[0], arrays[1], *buffers, *extra, **options)
    if not staged and part.masters is None:
        return
    with torch.no_grad():  # parameters are leaves that require grad (torch's step runs under no_grad too)
        for original, copy in staged:
            original.copy_(copy)
        if part.masters is not None:  # the 16-bit parameter: its float32 master, rounded once
            for p, master in zip(part.params, part.masters):
                p.copy_(master)
            part.master_seen = [_mark(p) for p in part.params]


def _cuda_op(backend: Backend, tensors: list[list[torch.Tensor]]) -> bool:
    """Whether the cuda backend's update of these tensors runs through the C++ op (CUDA tensors,
    the C++ ops can launch here: fastnorm._ops.cuda_available, and the backend allows them:
    fastnorm._dispatch.cpp_cuda_allowed); else its Python launcher."""
    return (
        backend.name == "cuda"
        and backend.cpp_cuda
        and bool(tensors[0])
        and tensors[0][0].is_cuda
        and (_ops.cuda_available())
    )


_DENSE_FORMATS = {4: torch.channels_last, 5: torch.channels_last_3d}


def _same_dense_layout(rows: list[list[torch.Tensor]]) -> list[bool]:
    """Per tensor index, whether the parameter is dense (contiguous or channels-last) and its
    gradient and state buffers have its very strides: an elementwise update then runs over their
    memory as it lies (the op's own check, fastnorm/csrc/optim.cpp), without staging copies."""
    keep = []
    for column in zip(*rows):
        p = column[0]
        fmt = _DENSE_FORMATS.get(p.dim())
        dense = p.is_contiguous() or (fmt is not None and p.is_contiguous(memory_format=fmt))
        strides = p.stride()
        keep.append(dense and all(t.stride() == strides for t in column))
    return keep


def _mark(p: torch.Tensor) -> tuple:
    """What an outside write changes: the version (``copy_``, in-place ops) or the storage and
    address (``p.data = ...``, which keeps the version). Holding the storage keeps its address
    from being reused by a later ``p.data = ...`` until the next step takes a new mark."""
    return p.untyped_storage(), p.data_ptr(), p._version


def _same_mark(a: tuple, b: tuple) -> bool:
    return a[0] is b[0] and a[1] == b[1] and a[2] == b[2]


def _adopt_outside_changes(part: _Part) -> None:
    """Master weights: a 16-bit parameter changed since the last step wrote it (``p.copy_``,
    ``model.load_state_dict``, ``p.data = ...``: its :func:`_mark` moved), or a master
    that does not round to its parameter (a plan's first step, e.g. after loading an optimizer
    checkpoint without the matching model weights), restarts from the parameter's values, as
    torch's optimizers use whatever the parameters hold: the parameter is the truth, the float32
    master only its extra precision while it still rounds to it."""
    seen = part.master_seen or [None] * len(part.params)
    with torch.no_grad():
        for p, master, before in zip(part.params, part.masters, seen):
            if before is not None and _same_mark(before, _mark(p)):
                continue  # every step but the rare one: nothing written from outside
            if not torch.equal(master.to(p.dtype), p):
                master.copy_(p)


class _Ops(dict):
    """op name -> ``torch.ops.fastnorm.<op>_.default`` (looked up once the ops are registered)."""

    def __missing__(self, op: str):
        _ops.load()
        fn = self[op] = getattr(torch.ops.fastnorm, f"{op}_").default
        return fn


_OPS = _Ops()


@torch.compiler.assume_constant_result
def _traced_backend(backend: str, op: str, device_type: str, kind: str, numel: int) -> str:
    """The backend a group's update resolves to, while torch.compile traces (a constant of the graph)."""
    small = _dispatch.auto_prefers_torch(kind, numel, device_type)
    try:
        return _dispatch._resolve(backend, op, torch.device(device_type), small).name
    except ValueError:
        return "torch"


_TORCH = Backend("torch", None)


def _state_moved(params, rows, steps, master) -> bool:
    """True if a state buffer has its parameter's shape but another dtype (than the parameter's,
    or float32 for ``master`` ones) or device, or the step counters differ in dtype: states
    torch's update handles and the kernels do not."""
    for row in rows:
        if row is None:
            continue
        for p, t, m in zip(params, row, master):
            if t.shape == p.shape and (t.dtype != (torch.float32 if m else p.dtype) or t.device != p.device):
                return True
    return len({s.dtype for s in steps}) > 1


# -- the optimizers ---------------------------------------------------------------------------------


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
    _state_lists = ("momentum_buffer",)

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
    _state_lists = ("sum", "step")

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
    _state_lists = ("square_avg", "momentum_buffer", "grad_avg", "step")

    @with_backend_signature(torch.optim.RMSprop, precision_options=True)
    def __init__(self, *args, backend: str = "auto", **kwargs) -> None:
        super().__init__(*args, backend=backend, **kwargs)


class _AdamUpdate:
    """What Adam and AdamW share (AdamW: ``decoupled_weight_decay``)."""

    _op = "adam"
    _state_lists = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "step")


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
    and ``stochastic_rounding``; its state is fastnorm's (:meth:`_KernelOptimizer._gather`)."""
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
