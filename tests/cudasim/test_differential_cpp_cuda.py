"""The differential machines of tests/test_differential_*.py through the C++ cuda ops, under the
simulator: the numba backend's whole stack (modules, the C++ autograd nodes, the optimizers) on
CPU tensors, with the C++ ops' CPU kernels replaced by their CUDA kernels (conftest.py,
``cpp_cuda_ops_on_cpu``): every BatchNorm, LayerNorm, RMSNorm, GroupNorm and optimizer update
of a random program is launched by fastnorm/csrc's CUDA code and run by the simulator, against
torch. Fewer and shorter programs than on the CPU: the simulator runs each GPU thread in Python."""

from __future__ import annotations

import pytest
from hypothesis import settings
from test_differential_batchnorm import BatchNormTwins, HalfBatchNormTwins
from test_differential_layer_norm import RowNormTwins
from test_differential_master_weights import MasterWeightsTwins
from test_differential_optim import BFloat16OptimizerTwins, OptimizerTwins
from test_differential_stochastic_rounding import StochasticRoundingTwins


@pytest.fixture
def numba_backend_through_cuda_kernels(cpp_cuda_ops_on_cpu, monkeypatch):
    """The machines draw the numba backend (its C++ ops now launching the CUDA kernels)."""
    for machine in (BatchNormTwins, OptimizerTwins, MasterWeightsTwins, StochasticRoundingTwins, RowNormTwins):
        monkeypatch.setattr(machine, "backends", ["numba"])
    return cpp_cuda_ops_on_cpu


def _through_cpp_cuda(machine, examples: int, steps: int):
    # a subclass of its own: the machine's TestCase is one class that other modules run too
    case = type(f"CppCuda{machine.__name__}", (machine.TestCase,), {})
    case.settings = settings(max_examples=examples, stateful_step_count=steps)
    return pytest.mark.usefixtures("numba_backend_through_cuda_kernels")(case)


TestCppCudaBatchNormTwins = _through_cpp_cuda(BatchNormTwins, 5, 8)
TestCppCudaHalfBatchNormTwins = _through_cpp_cuda(HalfBatchNormTwins, 6, 8)
TestCppCudaOptimizerTwins = _through_cpp_cuda(OptimizerTwins, 6, 10)
TestCppCudaBFloat16OptimizerTwins = _through_cpp_cuda(BFloat16OptimizerTwins, 3, 8)
TestCppCudaMasterWeightsTwins = _through_cpp_cuda(MasterWeightsTwins, 3, 8)
TestCppCudaStochasticRoundingTwins = _through_cpp_cuda(StochasticRoundingTwins, 3, 8)
TestCppCudaRowNormTwins = _through_cpp_cuda(RowNormTwins, 8, 10)
