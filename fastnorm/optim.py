"""Drop-in optimizers: ``SGD``, ``Adagrad``, ``RMSprop``, ``Adam``, ``AdamW``.

Each class subclasses its ``torch.optim`` counterpart, so the constructor (signature, defaults,
argument checks), ``param_groups``, ``state_dict`` keys, ``zero_grad``, hooks, LR schedulers and
``add_param_group`` are torch's own; only ``step`` changes. It gathers each group's parameters
that have a gradient, checks them all before touching anything, creates missing state exactly
as torch does (``step`` a float32 CPU scalar tensor, buffers ``zeros_like`` the parameter),
computes the per-step scalars on the host in float64 and calls the backend's kernel once per
group. With ``backend="torch"`` (and with ``"auto"`` where no fastnorm kernel applies) torch's
own ``step`` runs, with torch's default implementation for the device.

torch's ``foreach``, ``fused``, ``capturable`` and ``differentiable`` select torch
implementations: with an explicit fastnorm backend a non-default value is refused (ValueError);
with ``"auto"`` it selects torch's implementation, as asked.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from ._dispatch import AUTO, Backend, check_name, resolve
from ._signature import with_backend_signature

__all__ = ["SGD", "Adagrad", "RMSprop", "Adam", "AdamW"]

_TORCH_ONLY_OPTIONS = ("foreach", "fused", "capturable", "differentiable")
_KERNEL_DTYPES = (torch.float32, torch.float64)
_TORCH = Backend("torch", None, None)


def _unhooked(step: Callable) -> Callable:
    """torch wraps ``Optimizer.step`` with its hook runner once a class is instantiated; our
    ``step`` already runs the hooks, so call torch's without running them a second time."""
    return step.__wrapped__ if getattr(step, "hooked", False) else step


def _torch_only_options(group: dict) -> list[str]:
    return [f"{k}={group[k]!r}" for k in _TORCH_ONLY_OPTIONS if group.get(k) not in (None, False)]


class _KernelOptimizer:
    """``step`` for torch.optim subclasses whose update runs on fastnorm's kernels."""

    _op: str  # key of kernels.OPS
    _torch_cls: type[torch.optim.Optimizer]
    backend: str

    def __init__(self, params, *args, backend: str = "auto", **kwargs) -> None:
        check_name(backend, self._op)
        super().__init__(params, *args, **kwargs)
        self.backend = backend
        for group in self.param_groups:
            self._refuse_torch_only_options(group)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        if hasattr(self, "backend"):  # torch's __init__ adds the first groups before we are set
            self._refuse_torch_only_options(self.param_groups[-1])

    def _refuse_torch_only_options(self, group: dict) -> None:
        asked = _torch_only_options(group)
        if asked and self.backend not in (AUTO, "torch"):
            raise ValueError(
                f"{type(self).__name__}(backend={self.backend!r}) runs fastnorm's own fused "
                f"update and does not do {', '.join(asked)}; leave them at their defaults, or "
                f"use backend='torch' for torch's implementation"
            )

    # -- choosing and checking -------------------------------------------------------------

    def _resolve(self, group: dict, params: list[torch.Tensor]) -> Backend:
        if _torch_only_options(group):
            self._refuse_torch_only_options(group)
            return _TORCH  # "auto" with torch-only options: torch's implementation, as asked
        devices = {p.device for p in params}
        chosen = resolve(self.backend, self._op, params[0].device)
        if chosen.is_torch:
            return chosen
        if len(devices) > 1:
            raise ValueError(
                f"backend {chosen.name!r} updates a parameter group on one device, but this "
                f"group has parameters on {sorted(map(str, devices))}"
            )
        return chosen

    def _check(self, params: list[torch.Tensor], backend: Backend) -> None:
        name = type(self).__name__
        for p in params:
            g = p.grad
            if g.is_sparse or p.is_sparse:
                raise RuntimeError(
                    f"{name} (fastnorm backend {backend.name!r}) does not support sparse "
                    f"gradients; use dense gradients or backend='torch'"
                )
            if p.is_complex():
                raise TypeError(
                    f"{name} (fastnorm backend {backend.name!r}) does not support complex "
                    f"parameters ({p.dtype}); use backend='torch'"
                )
            if p.dtype not in _KERNEL_DTYPES:
                raise TypeError(
                    f"{name} (fastnorm backend {backend.name!r}) updates float32 and float64 "
                    f"parameters, got {p.dtype}; use backend='torch' for other dtypes"
                )
            if g.dtype != p.dtype or g.shape != p.shape or g.device != p.device:
                raise RuntimeError(
                    f"{name}: a gradient must match its parameter's dtype, shape and device; got "
                    f"grad {g.dtype} {tuple(g.shape)} on {g.device} for param {p.dtype} "
                    f"{tuple(p.shape)} on {p.device}"
                )

    # -- the step ---------------------------------------------------------------------------

    def step(self, closure: Callable[[], float] | None = None):
        """Perform a single optimization step.

        Args:
            closure: reevaluates the model and returns the loss (optional).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with torch.no_grad():
            kernel_groups, torch_groups, planned = [], [], []
            for group in self.param_groups:
                params = [p for p in group["params"] if p.grad is not None]
                if not params:
                    continue
                plan = self._plans.get(id(group))
                if plan is not None and plan.matches(self, group, params):
                    planned.append((plan, group))
                    continue
                backend = self._resolve(group, params)
                if backend.is_torch:
                    torch_groups.append(group)
                    continue
                self._check(params, backend)
                kernel_groups.append((group, params, backend))
            # every check passed before any parameter or state changes
            if torch_groups:
                self._torch_step(torch_groups)
            for plan, group in planned:
                plan.run(self, group)
            for group, params, backend in kernel_groups:
                parts = _by_dtype(params)
                for part in parts:
                    self._update(group, part, backend)
                self._plans[id(group)] = _TablePlan.build(self, group, params, backend) if len(parts) == 1 else None
        return loss

    @property
    def _plans(self) -> dict:
        plans = self.__dict__.get("_table_plans")
        if plans is None:
            plans = self.__dict__["_table_plans"] = {}
        return plans

    def _torch_step(self, groups: list[dict]) -> None:
        all_groups = self.param_groups
        self.param_groups = groups
        try:
            _unhooked(self._torch_cls.step)(self)
        finally:
            self.param_groups = all_groups

    # -- one kernel call per group (and dtype) ---------------------------------------------------

    _has_step = True  # the optimizer keeps torch's per-parameter "step" counter

    def _update(self, group: dict, params: list[torch.Tensor], backend: Backend) -> None:
        extra = self._init_states(group, params)
        if self._has_step and params[0].device.type != "cpu":
            # GPU kernels advance the step counters on the device (torch's capturable layout),
            # so nothing is read back to the host; a CPU counter (a torch checkpoint) moves there
            for p in params:
                state = self.state[p]
                if state["step"].device != p.device:
                    state["step"] = state["step"].to(p.device)
        rows = self._rows(group, params)
        steps = [self.state[p]["step"] for p in params] if self._has_step else []
        table_fn = getattr(backend.kernels, f"{self._op}_step_table", None)
        if table_fn is not None and _flat(rows, steps):
            # addresses straight from the tensors: no per-tensor conversion on the host
            addrs = np.array([[t.data_ptr() for t in row] for row in rows], np.int64)
            step_addrs = np.array([s.data_ptr() for s in steps], np.int64)
            step_f64 = bool(steps) and steps[0].dtype == torch.float64
            numels = tuple(p.numel() for p in params)
            dtype = _NUMPY_DTYPES[params[0].dtype]
            self._call_table(table_fn, group, addrs, numels, dtype, step_addrs, step_f64, extra)
            return
        # list-of-arrays API: every backend has it (non-contiguous tensors: contiguous copies,
        # one per tensor even where a row repeats another, written back after the update)
        step_values = self._advance_steps(steps)
        copies: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for row in rows[:1] + rows[2:]:
            for t in row:
                if not t.is_contiguous() and id(t) not in copies:
                    copies[id(t)] = (t, t.contiguous())
        grads = [g.contiguous() for g in rows[1]]

        def kernel_view(t):
            return backend.as_array(copies[id(t)][1] if id(t) in copies else t)

        arrays = [[kernel_view(t) for t in row] for row in rows[:1]]
        arrays += [[backend.as_array(g) for g in grads]] + [[kernel_view(t) for t in row] for row in rows[2:]]
        self._call_list(backend.kernels, group, arrays, step_values, extra, params[0].device, backend)
        for original, copy in copies.values():
            original.copy_(copy)

    def _init_states(self, group: dict, params: list[torch.Tensor]):
        """Create missing state exactly as torch does; returns what the kernel call needs extra."""
        raise NotImplementedError

    def _rows(self, group: dict, params: list[torch.Tensor]) -> list[list[torch.Tensor]]:
        """[params, grads, state buffers...]: the table's rows (unused rows repeat another)."""
        raise NotImplementedError

    def _call_table(self, fn, group, addrs, numels, dtype, step_addrs, step_f64, extra) -> None:
        raise NotImplementedError

    def _call_list(self, kernels, group, arrays, steps, extra, device, backend) -> None:
        raise NotImplementedError

    # -- helpers for the subclasses -----------------------------------------------------------

    @staticmethod
    def _advance_steps(steps: list[torch.Tensor]) -> list[float]:
        """step += 1 for every parameter; returns the new step counts (as torch, per parameter)."""
        values = []
        for step_t in steps:
            step_t += 1
            values.append(float(step_t))
        return values

    def _buffers(self, params, key: str) -> list[torch.Tensor]:
        return [self.state[p][key] for p in params]


_NUMPY_DTYPES = {torch.float32: np.float32, torch.float64: np.float64}


class _TablePlan:
    """What stays the same from one step to the next for a group on a table backend.

    At the MNIST MLP's size the update itself takes ~100 µs; gathering the state of six
    parameters through ``self.state[p]`` (a Python-level ``Tensor.__hash__`` each), checking
    them and building the address table took longer. A plan keeps the state tensors of the
    group (holding them, so no address can dangle), and each step it re-checks what can change:
    the same parameters have gradients, every state entry is still the same tensor, and every
    gradient is a dense tensor of the parameters' dtype and shape. Then it reads the addresses
    afresh and calls the kernel once. Anything else falls back to the full path, which rebuilds
    the plan (and raises the clear errors).
    """

    __slots__ = ("params", "state", "entries", "rows", "steps", "numels", "dtype", "torch_dtype", "fn", "extra", "backend")

    @classmethod
    def build(cls, opt, group, params, backend) -> _TablePlan | None:
        fn = getattr(backend.kernels, f"{opt._op}_step_table", None)
        if fn is None:
            return None
        rows = opt._rows(group, params)
        steps = [opt.state[p]["step"] for p in params] if opt._has_step else []
        if not _flat(rows, steps):
            return None
        plan = cls()
        plan.params = list(params)
        plan.state = opt.state
        plan.entries = [(opt.state[p], key, value) for p in params for key, value in opt.state[p].items()]
        plan.rows = rows[2:]  # state rows; params and grads are read each step
        plan.steps = steps
        plan.numels = tuple(p.numel() for p in params)
        plan.torch_dtype = params[0].dtype
        plan.dtype = _NUMPY_DTYPES[plan.torch_dtype]
        plan.fn = fn
        plan.extra = [False] * len(params)  # SGD: every momentum buffer exists from now on
        plan.backend = backend
        return plan

    def matches(self, opt, group, params) -> bool:
        if opt.state is not self.state or len(params) != len(self.params):
            return False
        if any(a is not b for a, b in zip(params, self.params)):
            return False
        if any(d.get(key) is not value for d, key, value in self.entries):
            return False
        dtype = self.torch_dtype
        for p in params:
            g = p.grad
            if g.dtype is not dtype or g.layout is not torch.strided or not g.is_contiguous() or g.shape != p.shape:
                return False
            if not p.is_contiguous():
                return False
        return True

    def run(self, opt, group) -> None:
        params = self.params
        addrs = np.array(
            [[p.data_ptr() for p in params], [p.grad.data_ptr() for p in params],
             *([t.data_ptr() for t in row] for row in self.rows)],
            np.int64,
        )  # fmt: skip
        step_addrs = np.array([s.data_ptr() for s in self.steps], np.int64)
        step_f64 = bool(self.steps) and self.steps[0].dtype == torch.float64
        opt._call_table(self.fn, group, addrs, self.numels, self.dtype, step_addrs, step_f64, self.extra)


def _by_dtype(params: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    dtype = params[0].dtype
    if all(p.dtype == dtype for p in params):
        return [params]
    parts: dict = {}
    for p in params:
        parts.setdefault(p.dtype, []).append(p)
    return list(parts.values())


def _flat(rows: list[list[torch.Tensor]], steps: list[torch.Tensor]) -> bool:
    """Whether the table path applies: contiguous tensors on the parameters' device, step
    counters of one float dtype beside them."""
    device = rows[0][0].device
    if not all(t.is_contiguous() and t.device == device for row in rows for t in row):
        return False
    if steps:
        dtype = steps[0].dtype
        if dtype not in _KERNEL_DTYPES or any(s.dtype != dtype or s.device != device or s.numel() != 1 for s in steps):
            return False
    return True


def _zeros_like(p: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(p, memory_format=torch.preserve_format)


def _new_step() -> torch.Tensor:
    """torch's step counter: a CPU scalar of the default float dtype (float32 unless float64)."""
    dtype = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
    return torch.tensor(0.0, dtype=dtype)


def _scalar(x) -> float:
    return float(x.item()) if isinstance(x, torch.Tensor) else float(x)


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

    @with_backend_signature(torch.optim.SGD)
    def __init__(self, *args, backend: str = "auto", **kwargs) -> None:
        super().__init__(*args, backend=backend, **kwargs)

    _has_step = False

    def _init_states(self, group, params):
        if group["momentum"] == 0:
            return [False] * len(params)
        first_step = []
        for p in params:
            state = self.state[p]
            first_step.append(state.get("momentum_buffer") is None)
            if first_step[-1]:  # torch clones the gradient here; the kernel copies it
                state["momentum_buffer"] = _zeros_like(p)
        return first_step

    def _rows(self, group, params):
        grads = [p.grad for p in params]
        return [params, grads, self._buffers(params, "momentum_buffer") if group["momentum"] != 0 else grads]

    def _options(self, group):
        return dict(lr=_scalar(group["lr"]), weight_decay=_scalar(group["weight_decay"]),
                    momentum=float(group["momentum"]), dampening=float(group["dampening"]),
                    nesterov=bool(group["nesterov"]), maximize=bool(group["maximize"]))  # fmt: skip

    def _call_table(self, fn, group, addrs, numels, dtype, step_addrs, step_f64, extra):
        fn(addrs, numels, dtype, np.array(extra, np.int8), **self._options(group))

    def _call_list(self, kernels, group, arrays, steps, extra, device, backend):
        buffers = arrays[2] if group["momentum"] != 0 else None
        kernels.sgd_step(arrays[0], arrays[1], buffers, extra, **self._options(group))


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

    @with_backend_signature(torch.optim.Adagrad)
    def __init__(self, *args, backend: str = "auto", **kwargs) -> None:
        super().__init__(*args, backend=backend, **kwargs)

    def _init_states(self, group, params):
        for p in params:
            state = self.state[p]
            if "sum" not in state:  # added after construction (torch fills state in __init__)
                state["step"] = _new_step()
                state["sum"] = torch.full_like(
                    p, group["initial_accumulator_value"], memory_format=torch.preserve_format
                )

    def _rows(self, group, params):
        return [params, [p.grad for p in params], self._buffers(params, "sum")]

    def _call_table(self, fn, group, addrs, numels, dtype, step_addrs, step_f64, extra):
        fn(addrs, numels, dtype, step_addrs, step_f64, lr=_scalar(group["lr"]), lr_decay=float(group["lr_decay"]),
           weight_decay=float(group["weight_decay"]), eps=float(group["eps"]), maximize=bool(group["maximize"]))  # fmt: skip

    def _call_list(self, kernels, group, arrays, steps, extra, device, backend):
        lr, lr_decay = _scalar(group["lr"]), group["lr_decay"]
        clrs = _host_scalars(backend, [lr / (1 + (t - 1) * lr_decay) for t in steps], device)
        kernels.adagrad_step(arrays[0], arrays[1], arrays[2], clrs, weight_decay=float(group["weight_decay"]),
                             eps=float(group["eps"]), maximize=bool(group["maximize"]))  # fmt: skip


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

    @with_backend_signature(torch.optim.RMSprop)
    def __init__(self, *args, backend: str = "auto", **kwargs) -> None:
        super().__init__(*args, backend=backend, **kwargs)

    def _init_states(self, group, params):
        for p in params:
            state = self.state[p]
            if len(state) == 0:
                state["step"] = _new_step()
                state["square_avg"] = _zeros_like(p)
                if group["momentum"] > 0:
                    state["momentum_buffer"] = _zeros_like(p)
                if group["centered"]:
                    state["grad_avg"] = _zeros_like(p)

    def _rows(self, group, params):
        square_avgs = self._buffers(params, "square_avg")
        return [params, [p.grad for p in params], square_avgs,
                self._buffers(params, "grad_avg") if group["centered"] else square_avgs,
                self._buffers(params, "momentum_buffer") if group["momentum"] > 0 else square_avgs]  # fmt: skip

    def _options(self, group):
        return dict(lr=_scalar(group["lr"]), alpha=float(group["alpha"]), eps=float(group["eps"]),
                    weight_decay=float(group["weight_decay"]), momentum=float(group["momentum"]),
                    centered=bool(group["centered"]), maximize=bool(group["maximize"]))  # fmt: skip

    def _call_table(self, fn, group, addrs, numels, dtype, step_addrs, step_f64, extra):
        fn(addrs, numels, dtype, step_addrs, step_f64, **self._options(group))

    def _call_list(self, kernels, group, arrays, steps, extra, device, backend):
        kernels.rmsprop_step(arrays[0], arrays[1], arrays[2], arrays[3] if group["centered"] else None,
                             arrays[4] if group["momentum"] > 0 else None, **self._options(group))  # fmt: skip


class _AdamUpdate:
    """The Adam/AdamW update (AdamW: ``decoupled_weight_decay``)."""

    _decoupled: bool

    def _init_states(self, group, params):
        for p in params:
            state = self.state[p]
            if len(state) == 0:
                state["step"] = _new_step()
                state["exp_avg"] = _zeros_like(p)
                state["exp_avg_sq"] = _zeros_like(p)
                if group["amsgrad"]:
                    state["max_exp_avg_sq"] = _zeros_like(p)

    def _rows(self, group, params):
        exp_avg_sqs = self._buffers(params, "exp_avg_sq")
        return [params, [p.grad for p in params], self._buffers(params, "exp_avg"), exp_avg_sqs,
                self._buffers(params, "max_exp_avg_sq") if group["amsgrad"] else exp_avg_sqs]  # fmt: skip

    def _options(self, group):
        beta1, beta2 = (_scalar(b) for b in group["betas"])
        return dict(lr=_scalar(group["lr"]), beta1=beta1, beta2=beta2, eps=float(group["eps"]),
                    weight_decay=float(group["weight_decay"]),
                    decoupled_weight_decay=bool(group.get("decoupled_weight_decay", self._decoupled)),
                    amsgrad=bool(group["amsgrad"]), maximize=bool(group["maximize"]))  # fmt: skip

    def _call_table(self, fn, group, addrs, numels, dtype, step_addrs, step_f64, extra):
        fn(addrs, numels, dtype, step_addrs, step_f64, **self._options(group))

    def _call_list(self, kernels, group, arrays, steps, extra, device, backend):
        options = self._options(group)
        lr, beta1, beta2 = options["lr"], options["beta1"], options["beta2"]
        step_sizes = _host_scalars(backend, [lr / (1 - beta1**t) for t in steps], device)
        bc2_sqrts = _host_scalars(backend, [math.sqrt(1 - beta2**t) for t in steps], device)
        kernels.adam_step(arrays[0], arrays[1], arrays[2], arrays[3], arrays[4] if group["amsgrad"] else None,
                          step_sizes, bc2_sqrts, **options)  # fmt: skip


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

    _op = "adam"
    _torch_cls = torch.optim.Adam
    _decoupled = False

    @with_backend_signature(torch.optim.Adam)
    def __init__(self, *args, backend: str = "auto", **kwargs) -> None:
        super().__init__(*args, backend=backend, **kwargs)


class AdamW(_AdamUpdate, _KernelOptimizer, torch.optim.AdamW):
    r"""AdamW: Adam with decoupled weight decay, ``θ ← θ (1 - γλ)`` before the moment update.

    Args: exactly :class:`torch.optim.AdamW`'s, plus ``backend``.

    Example:
        >>> opt = AdamW(model.parameters(), lr=1e-3, weight_decay=1e-2, backend="reference")
    """

    _op = "adam"
    _torch_cls = torch.optim.AdamW
    _decoupled = True

    @with_backend_signature(torch.optim.AdamW)
    def __init__(self, *args, backend: str = "auto", **kwargs) -> None:
        super().__init__(*args, backend=backend, **kwargs)


def _host_scalars(backend: Backend, values: list[float], device: torch.device):
    """Per-tensor float64 scalars, as the backend's kernels take them."""
    t = torch.tensor(values, dtype=torch.float64)
    if device.type != "cpu":
        t = t.to(device, non_blocking=True)
    return backend.as_array(t)
