"""The differential machines of tests/test_differential_*.py on the cuda backend, under the
simulator (fastnorm's cuda path on CPU tensors: see conftest.py), with fewer and shorter runs:
the simulator runs every GPU thread as a Python thread."""

from __future__ import annotations

import pytest
from hypothesis import settings
from test_differential_batchnorm import BatchNormTwins, HalfBatchNormTwins
from test_differential_master_weights import MasterWeightsTwins
from test_differential_optim import BFloat16OptimizerTwins, OptimizerTwins
from test_differential_stochastic_rounding import StochasticRoundingTwins

OptimizerTwins.backends = ["cuda"]
BatchNormTwins.backends = ["cuda"]
MasterWeightsTwins.backends = ["cuda"]
StochasticRoundingTwins.backends = ["cuda"]

TestCudaOptimizerTwins = pytest.mark.usefixtures("cuda_backend_on_cpu")(OptimizerTwins.TestCase)
TestCudaOptimizerTwins.settings = settings(max_examples=6, stateful_step_count=10)
TestCudaBatchNormTwins = pytest.mark.usefixtures("cuda_backend_on_cpu")(BatchNormTwins.TestCase)
TestCudaBatchNormTwins.settings = settings(max_examples=5, stateful_step_count=8)
TestCudaMasterWeightsTwins = pytest.mark.usefixtures("cuda_backend_on_cpu")(MasterWeightsTwins.TestCase)
TestCudaMasterWeightsTwins.settings = settings(max_examples=4, stateful_step_count=8)
TestCudaStochasticRoundingTwins = pytest.mark.usefixtures("cuda_backend_on_cpu")(StochasticRoundingTwins.TestCase)
TestCudaStochasticRoundingTwins.settings = settings(max_examples=4, stateful_step_count=8)
TestCudaBFloat16OptimizerTwins = pytest.mark.usefixtures("cuda_backend_on_cpu")(BFloat16OptimizerTwins.TestCase)
TestCudaBFloat16OptimizerTwins.settings = settings(max_examples=4, stateful_step_count=8)
TestCudaHalfBatchNormTwins = pytest.mark.usefixtures("cuda_backend_on_cpu")(HalfBatchNormTwins.TestCase)
TestCudaHalfBatchNormTwins.settings = settings(max_examples=4, stateful_step_count=8)
