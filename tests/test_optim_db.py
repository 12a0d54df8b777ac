"""PyTorch's own optimizer configurations (``torch.testing._internal.common_optimizers.optim_db``):
every configuration torch's test suite runs its SGD, Adagrad, RMSprop, Adam and AdamW with, run by
fastnorm's class side by side with torch's, on every backend: parameters and state after the
steps, or the same exception type. Configurations with options the kernels do not take
(``foreach``, ``capturable``, a tensor ``lr``, ...) exercise the hand-over to torch's update.

Needs ``expecttest`` (a dev dependency: torch's internal testing modules import it)."""

from __future__ import annotations

import inspect

import pytest
import torch
from conftest import OPTIM_BACKENDS
from test_optim_parity import assert_same_state

import fastnorm

pytest.importorskip("expecttest", reason="torch's optim_db imports expecttest (pip install -e '.[dev]')")
from torch.testing._internal.common_optimizers import optim_db  # noqa: E402

NAMES = ("SGD", "Adagrad", "RMSprop", "Adam", "AdamW")


def _configurations():
    for info in optim_db:
        name = info.optim_cls.__name__
        if name not in NAMES:
            continue
        func = info.optim_inputs_func
        inputs = (
            func(device="cpu", dtype=torch.float64)
            if "dtype" in inspect.signature(func).parameters
            else func(device="cpu")
        )
        for i, config in enumerate(inputs):
            yield pytest.param(name, config.kwargs, id=f"{name}-{i}-{config.desc}")


@pytest.mark.parametrize("backend", OPTIM_BACKENDS)
@pytest.mark.parametrize("name,options", list(_configurations()))
def test_torch_optim_db_configuration(backend, name, options):
    torch.manual_seed(0)
    shapes = [(5, 3), (4,), (1,)]
    ref_params = [torch.randn(s, dtype=torch.float64) for s in shapes]
    our_params = [p.clone() for p in ref_params]
    try:
        ref = getattr(torch.optim, name)(ref_params, **options)
    except Exception as exc:  # noqa: BLE001 - then fastnorm must refuse it alike
        with pytest.raises(type(exc)):
            getattr(fastnorm.optim, name)(our_params, backend=backend, **options)
        return
    ours = getattr(fastnorm.optim, name)(our_params, backend=backend, **options)
    for _ in range(4):
        for a, b in zip(ref_params, our_params):
            g = torch.randn_like(a)
            a.grad, b.grad = g.clone(), g.clone()
        ref.step()
        ours.step()
    assert_same_state(ref, ours, ref_params, our_params, torch.float64, f"{name}{options}")
