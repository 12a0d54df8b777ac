"""Torch-free kernels: arrays in, arrays out.

One sub-package per backend, each exposing the same functions with the same arguments:

=============  ========================  ==========================================
backend name   package                   runs on
=============  ========================  ==========================================
``reference``  :mod:`fastnorm_kernels.reference`  NumPy, any CPU (readable, float64 inside)
``numba``      :mod:`fastnorm_kernels.numba_cpu`  Numba ``@njit(parallel=True)``, CPU threads
``cuda``       :mod:`fastnorm_kernels.numba_cuda` Numba ``cuda.jit`` kernels, NVIDIA GPUs
=============  ========================  ==========================================

BatchNorm: ``batch_norm_forward_train``, ``batch_norm_forward_eval``, ``batch_norm_backward``,
``batch_norm_stats`` (statistics only, for SyncBatchNorm).
LayerNorm and RMSNorm (rows of an (M, D) array): ``layer_norm_forward``, ``layer_norm_backward``,
``rms_norm_forward``, ``rms_norm_backward``. GroupNorm ((N, C, S) arrays): ``group_norm_forward``,
``group_norm_backward``.
Optimizers: ``<name>_step`` for every description in
:data:`fastnorm_kernels.formulas.optim.OPTIMIZERS` (``sgd_step``, ``adagrad_step``, ``rmsprop_step``,
``adam_step``, ...).

Nothing here imports torch; the PyTorch face is the :mod:`fastnorm` package.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from .formulas.optim import OPTIMIZERS

OPS = {
    "batch_norm": ("batch_norm_forward_train", "batch_norm_forward_eval", "batch_norm_backward", "batch_norm_stats"),
    "layer_norm": ("layer_norm_forward", "layer_norm_backward"),
    "rms_norm": ("rms_norm_forward", "rms_norm_backward"),
    "group_norm": ("group_norm_forward", "group_norm_backward"),
    **{name: (f"{name}_step",) for name in OPTIMIZERS},
}
#: Every backend's public functions, per module (the compiled backends add the optimizers' table
#: entry points, ``<op>_step_table``, which fastnorm's optimizers prefer when present).
BATCH_NORM_API = OPS["batch_norm"]
LAYER_NORM_API = (*OPS["layer_norm"], *OPS["rms_norm"])
GROUP_NORM_API = OPS["group_norm"]
OPTIMIZER_API = tuple(f"{name}_step" for name in OPTIMIZERS)
TABLE_API = tuple(f"{name}_table" for name in OPTIMIZER_API)

PACKAGES = {
    "reference": "fastnorm_kernels.reference",
    "numba": "fastnorm_kernels.numba_cpu",
    "cuda": "fastnorm_kernels.numba_cuda",
}


def load(backend: str) -> ModuleType:
    """Import and return the kernels package of ``backend`` (ImportError if it cannot load)."""
    return importlib.import_module(PACKAGES[backend])


def implements(module: ModuleType, op: str) -> bool:
    """Whether a kernels package has every function of ``op`` (a key of :data:`OPS`)."""
    return all(hasattr(module, fn) for fn in OPS[op])
