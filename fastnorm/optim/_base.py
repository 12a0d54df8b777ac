"""``_KernelOptimizer``: the ``step`` of fastnorm's optimizers, around one kernel call per group."""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch

from fastnorm_kernels._bits import BFLOAT16
from fastnorm_kernels.formulas.optim import OPTIMIZERS

from .._dispatch import check_name
from . import _kernels
from ._compat import TorchCompat, _with_step_hooks
from ._kernels import _TORCH_ONLY_OPTIONS
from ._plan import Planner
from ._precision import Precision, _adopt_outside_changes


def _parameters(fn: Callable) -> tuple[str, ...]:
    return tuple(inspect.signature(fn).parameters)


def _options_function(d, defaults: dict) -> Callable:
    """``_kernel_options(self, group)`` of description ``d``, written out: each option read from
    the group (beta1 / beta2 from ``betas``; ``defaults`` or the option's own default where a
    group may lack it), as a float or a bool."""
    items = []
    for o in d.options:
        if o.name in ("beta1", "beta2"):
            value = f"group['betas'][{int(o.name == 'beta2')}]"
        elif o.name in defaults or o.default is not None:
            value = f"group.get({o.name!r}, {defaults.get(o.name, o.default)!r})"
        else:
            value = f"group[{o.name!r}]"
        items.append(f"{o.name!r}: {'bool' if o.kind is bool else '_scalar'}({value})")
    source = f"def _kernel_options(self, group):\n    return {{{', '.join(items)}}}\n"
    namespace = {"_scalar": _scalar}
    exec(compile(source, f"<{d.name} options>", "exec"), namespace)  # noqa: S102 - text from the description
    return namespace["_kernel_options"]


def _scalar(x) -> float:
    return float(x.item()) if isinstance(x, torch.Tensor) else float(x)


class _KernelOptimizer(TorchCompat, Precision, Planner):
    """``step`` for optimizers whose update runs on fastnorm's kernels.

    A subclass names its description (``_op``, a key of
    ``fastnorm_kernels.formulas.optim.OPTIMIZERS``), from which its table rows (the state
    buffers), the options that decide which buffers exist and the kernels' keyword arguments
    follow, and the state it creates (``Planner._gather``). A torch twin (``_torch_cls``) runs
    torch's own step where fastnorm's kernels do not.
    """

    _op: str  # key of OPTIMIZERS
    _torch_cls: type[torch.optim.Optimizer] | None = None
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
        cls._state_lists = (*cls._table_rows, *(("step",) if d.counts_steps else ()))
        cls._kernel_options = _options_function(d, cls._option_defaults)

    def _empty_lists(self) -> dict:
        """The state lists :meth:`_gather` fills: one per buffer key, and ``"step"``."""
        return {name: [] for name in self._state_lists}

    def _kernel_options(self, group: dict) -> dict:
        """The op's keyword options from a parameter group (``betas`` gives beta1 and beta2);
        replaced in each subclass by :func:`_options_function`'s text of the same (it runs every
        step: a loop over the description's options cost 0.5 µs more)."""
        raise NotImplementedError

    def __init__(self, params, *args, backend: str = "auto", master_weights: bool = False,
                 stochastic_rounding: bool = False, **kwargs) -> None:  # fmt: skip
        check_name(backend, self._op)
        self.backend = backend
        self.master_weights, self.stochastic_rounding = bool(master_weights), bool(stochastic_rounding)
        self._rounding_calls = 0
        super().__init__(params, *args, **kwargs)
        self._check_precision_options()

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
                    _kernels._launch(plan.backend, self._description, part, rows, addrs, part_options)
                if part.new_buffers:  # buffers cloned on their first step (SGD's momentum) join the state
                    key = self._table_rows[self._description.clone_first]
                    for p, buf in part.new_buffers:
                        self.state[p][key] = buf
                    part.new_buffers = []
                    part.first_step = [False] * len(part.first_step)
        return loss
