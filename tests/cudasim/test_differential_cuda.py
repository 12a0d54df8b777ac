"""The differential machines of tests/test_differential_*.py on the cuda backend, under the
simulator (fastnorm's cuda path on CPU tensors: see conftest.py), with fewer and shorter runs:
the simulator runs every GPU thread as a Python thread."""

from __future__ import annotations

import pytest
from hypothesis import settings
from test_differential_batchnorm import BatchNormTwins, HalfBatchNormTwins
from test_differential_layer_norm import RowNormTwins
from test_differential_master_weights import MasterWeightsTwins
from test_differential_optim import BFloat16OptimizerTwins, OptimizerTwins
from test_differential_stochastic_rounding import StochasticRoundingTwins

OptimizerTwins.backends = ["cuda"]
BatchNormTwins.backends = ["cuda"]
MasterWeightsTwins.backends = ["cuda"]
StochasticRoundingTwins.backends = ["cuda"]
RowNormTwins.backends = ["cuda"]  # LayerNorm, RMSNorm and GroupNorm


def _on_cuda(machine, examples: int, steps: int):
    """The machine's test case with the cuda backend on CPU tensors, ``examples`` programs of at
    most ``steps`` rules."""
    # a subclass of its own: the machine's TestCase is one class that other modules run too
    case = type(f"Cuda{machine.__name__}", (machine.TestCase,), {})
    case.settings = settings(max_examples=examples, stateful_step_count=steps)
    return pytest.mark.usefixtures("cuda_backend_on_cpu")(case)


TestCudaOptimizerTwins = _on_cuda(OptimizerTwins, 6, 10)
TestCudaBFloat16OptimizerTwins = _on_cuda(BFloat16OptimizerTwins, 4, 8)
TestCudaBatchNormTwins = _on_cuda(BatchNormTwins, 5, 8)
TestCudaHalfBatchNormTwins = _on_cuda(HalfBatchNormTwins, 4, 8)
TestCudaMasterWeightsTwins = _on_cuda(MasterWeightsTwins, 4, 8)
TestCudaStochasticRoundingTwins = _on_cuda(StochasticRoundingTwins, 4, 8)
TestCudaRowNormTwins = _on_cuda(RowNormTwins, 12, 10)
