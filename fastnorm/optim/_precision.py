"""Precision of 16-bit parameters: float32 master weights and stochastic rounding."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from ._plan import _Part

_HALF = (torch.bfloat16, torch.float16)


class Precision:
    """``master_weights`` / ``stochastic_rounding`` (a mixin of ``_KernelOptimizer``)."""

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
