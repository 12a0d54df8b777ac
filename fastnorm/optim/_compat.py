"""torch compatibility of fastnorm's optimizers: torch's step hooks and profiler record, pickling
and deepcopy, ``state_dict`` extras, torch's own step where fastnorm's kernels do not run, and the
step ``torch.compile`` traces."""

from __future__ import annotations

import functools
from collections import defaultdict
from collections.abc import Callable
from itertools import chain

import torch
import torch.optim.optimizer as _torch_optimizer

from .._dispatch import AUTO
from . import _kernels
from ._kernels import _torch_only_options

_HALF = (torch.bfloat16, torch.float16)


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


class TorchCompat:
    """What torch and its tools expect of an optimizer beyond ``step`` (a mixin of
    ``_KernelOptimizer``)."""

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
            lists = self._empty_lists()
            params, grads = [], []
            if not self._traceable(group):
                torch_groups.append(group)
                continue
            self._gather(group, params, grads, lists)
            if not params:
                continue
            numel = sum(p.numel() for p in params)
            kind = "sgd_momentum" if self._op == "sgd" and group.get("momentum", 0) != 0 else self._op
            if _kernels._traced_backend(self.backend, self._op, params[0].device.type, kind, numel) != "numba" or any(
                g.is_sparse or p.is_complex() or p.dtype not in _kernels.KERNEL_DTYPES for p, g in zip(params, grads)
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
            _kernels._OPS[self._op](params, grads, *rows, *steps, **options, **extra)
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
