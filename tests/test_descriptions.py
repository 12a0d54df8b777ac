"""Each optimizer is described once (kernels/fastnorm_kernels/formulas/optim.py): what follows from a
description follows from it everywhere, and a description that does not hold together is refused
where it is written."""

from __future__ import annotations

import math

import pytest
import torch

import fastnorm
import fastnorm_kernels
from fastnorm import _dispatch, _ops
from fastnorm.optim._eightbit import Optimizer8bit
from fastnorm_kernels import numba_cpu, reference
from fastnorm_kernels._description import Buffer, Optimizer, Option
from fastnorm_kernels.formulas.optim import OPTIMIZERS

NAMES = list(OPTIMIZERS)


@pytest.mark.parametrize("name", NAMES)
def test_every_layer_takes_its_optimizers_from_the_descriptions(name):
    d = OPTIMIZERS[name]
    assert fastnorm_kernels.OPS[name] == (f"{name}_step",)
    for module in (reference, numba_cpu):
        assert callable(getattr(module, f"{name}_step"))
    assert callable(getattr(numba_cpu, f"{name}_step_table"))
    assert _dispatch.AUTO_CPU_MIN_NUMEL[name] == d.auto_cpu_min_numel
    assert _dispatch.AUTO_CUDA_MIN_NUMEL[name] == d.auto_cuda_min_numel
    assert name in _dispatch.AUTO_CUDA_OPS

    assert _ops.load() is not None, _ops.error()
    schema = getattr(torch.ops.fastnorm, f"{name}_").default._schema
    assert str(schema) == f"fastnorm::{d.schema()}"
    written = {a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write}
    assert written == {"params", *(b.lists for b in d.buffers), *(("state_steps",) if d.counts_steps else ())}
    for key in ("CPU", "CUDA", "Meta", "ADInplaceOrView"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fastnorm::{name}_", key), key
    assert ("optim", f"_{name}{{storage}}", d.cuda_signature()) in _ops.load().cuda_kernels()


@pytest.mark.parametrize("name", NAMES)
def test_the_class_follows_the_description(name):
    d = OPTIMIZERS[name]
    classes = [getattr(fastnorm.optim, c) for c in fastnorm.optim.__all__]
    ours = [c for c in classes if c._op == name and not issubclass(c, Optimizer8bit)]
    assert ours, f"no class in fastnorm.optim runs {name}"
    for cls in ours:
        assert cls._table_rows == tuple(b.key for b in d.buffers)
        if d.class_name:  # an optimizer torch lacks: derived, with the description's defaults
            assert cls.__name__ == d.class_name and cls._torch_cls is None
            opt = cls([torch.zeros(3, requires_grad=True)])
            assert {k: opt.defaults[k] for k in d.defaults} == d.defaults
            assert "torch" not in fastnorm.backends(name)


@pytest.mark.parametrize("name", [n for n, d in OPTIMIZERS.items() if d.eight_bit])
def test_the_8bit_classes_follow_the_description(name):
    """Each EightBit entry is a class of fastnorm.optim with bitsandbytes' name and defaults, its
    kernels exist for every parameter storage, and its fixed options are passed to the update."""
    from fastnorm_kernels.numba_cpu import optim8

    d = OPTIMIZERS[name]
    for spec in d.eight_bit:
        cls = getattr(fastnorm.optim, spec.class_name)
        assert issubclass(cls, Optimizer8bit) and cls._op == name and spec.class_name in fastnorm.optim.__all__
        opt = cls([torch.zeros(3, requires_grad=True)])
        got = {k: opt.defaults[k] for k in spec.defaults}
        assert got == {k: tuple(v) if k == "betas" else v for k, v in spec.defaults.items()}
        options = opt._kernel_options(opt.param_groups[0])
        assert set(options) == {o.name for o in d.options}
        assert all(options[k] == v for k, v in spec.fixed.items())
        assert {(name, dt) for dt in optim8.PARAM_DTYPES} <= set(optim8._KERNELS)


def test_the_packer_compiled_for_the_ops_packs_as_the_description():
    """The C++ ops pack options with numba_cpu.optim.c_pack(name); Optimizer.pack is the Python
    side's: the same values for every description, options at odd values."""
    import ctypes

    import numpy as np

    from fastnorm_kernels.numba_cpu import optim

    for name, d in OPTIMIZERS.items():
        options = {o.name: (i % 2 == 0) if o.kind is bool else 0.1 + 0.07 * i for i, o in enumerate(d.options)}
        constants, flags, uses, host = d.pack(options)
        values = np.array([float(options[o.name]) for o in d.options])
        out = np.zeros(len(constants) + len(flags) + 6)
        fn = ctypes.CFUNCTYPE(None, ctypes.c_int64, ctypes.c_int64)(optim.c_pack(name).address)
        fn(values.ctypes.data, out.ctypes.data)
        expected = [*constants, *map(float, flags), *map(float, uses), *host, *[0.0] * (3 - len(host))]
        assert out.tolist() == expected, name


def _update(p, g, exp_avg, lr):
    return p - lr * g, exp_avg


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(constants={"lr": None, "rate": lambda lrate: lrate}), "reads .'lrate'., not options"),
        (dict(update=lambda p, g, exp_avg, lr, beta: (p, exp_avg)), "takes .'beta'., which its description"),
        (dict(buffers=()), "1 to 3 state buffers"),
        (dict(constants={}), "at least one constant"),
        (dict(buffers=(Buffer("exp_avg", "exp_avgs", clone_first=True),)), "cloned on its first step and step"),
    ],
)
def test_a_description_that_does_not_hold_together_is_refused(change, message):
    base = dict(name="toy", update=_update, buffers=(Buffer("exp_avg", "exp_avgs"),), options=(Option("lr"),),
                constants={"lr": None})  # fmt: skip
    with pytest.raises(ValueError, match=message):
        Optimizer(**{**base, **change})
    assert Optimizer(**base).pack({"lr": 0.5}) == ((0.5,), (False,), (True, False, False), ())
    assert math.isinf(OPTIMIZERS["sgd"].auto_cpu_min_numel)
