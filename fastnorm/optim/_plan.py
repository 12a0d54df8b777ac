"""A parameter group's plan (fastnorm/optim/__init__.py says what it holds and why): built once,
with state created and checked as torch creates and checks it, revalidated every step."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.optim.optimizer as _torch_optimizer

from .._dispatch import Backend
from . import _kernels
from ._kernels import KERNEL_DTYPES as _KERNEL_DTYPES
from ._kernels import TORCH as _TORCH

_STEP_DTYPES = (torch.float32, torch.float64)
_HALF = (torch.bfloat16, torch.float16)
_BUFFER_ROWS = 3  # state buffers per table (kernels/fastnorm_kernels/_optimizer_api.py: param, grad, 3 buffers)


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


class Planner:
    """Builds, checks and revalidates plans (a mixin of ``_KernelOptimizer``)."""

    def _gather(self, group: dict, params: list, grads: list, lists: dict) -> None:
        """The group's parameters with gradients, their gradients and state lists (``lists``: buffer
        key or ``"step"`` -> list, filled in place), creating state from the description as torch's
        ``_init_group`` creates it: a parameter's state is made when it has none (its step counter,
        ``torch.tensor(0.0)`` of torch's scalar dtype, and each buffer that exists under the group's
        options, zeros or a constructor default's value of the parameter's dtype and layout, in the
        description's key order), and read afterwards: a buffer an option asks for that the state
        lacks raises torch's KeyError. A buffer cloned on its first step stays None until then
        (torch's SGD), and a parameter whose optimizer keeps no state is not given an entry."""
        d = self._description
        uses = d.pack(self._kernel_options(group))[2]
        keeps_state = d.counts_steps or any(uses)
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse and self._torch_cls is None:
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
            params.append(p)
            grads.append(p.grad)
            if not keeps_state:
                continue
            state = self.state[p]
            if len(state) == 0:
                for key in d.state_keys:
                    if key == "step":
                        state["step"] = torch.tensor(0.0, dtype=_torch_optimizer._get_scalar_dtype())
                        continue
                    i = d.buffer_index[key]
                    b = d.buffers[i]
                    if uses[i] and not b.clone_first:
                        fill = 0.0 if b.initial is None else self.defaults[b.initial]
                        state[key] = torch.full_like(p, fill, memory_format=torch.preserve_format)
            for b, use in zip(d.buffers, uses):
                if use:
                    lists[b.key].append(state.get(b.key) if b.clone_first else state[b.key])
            if d.counts_steps:
                lists["step"].append(state["step"])

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
        backend = _kernels.resolve_backend(self, group, params)
        options = self._options_key(group)
        if backend.is_torch:
            return _Plan(self.state, options, params, [], [], [], backend)
        _kernels.check_gradients(self, params, backend)
        lists = self._empty_lists()
        got, grads = [], []
        self._gather(group, got, grads, lists)
        if self.master_weights and self._make_masters(params):  # new float32 state: gather it again
            lists = self._empty_lists()
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


def _by_dtype(params: list[torch.Tensor], master: list[bool]) -> list[list[int]]:
    """Indices of the parameters of each (dtype, kept in a float32 master copy), in first-seen order."""
    parts: dict = {}
    for i, p in enumerate(params):
        parts.setdefault((p.dtype, master[i]), []).append(i)
    return list(parts.values())


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
