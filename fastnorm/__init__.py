"""fastnorm: compiled BatchNorm and optimizer kernels as PyTorch drop-ins.

The training techniques of "Deep Learning from Scratch", chapter 6 (SGD, Momentum, Nesterov,
AdaGrad, RMSprop, Adam, AdamW, Batch Normalization), each with a readable NumPy reference, Numba
CPU kernels and Numba CUDA kernels, next to PyTorch's own implementation:

>>> import fastnorm
>>> fastnorm.backends()                      # what runs on this machine
>>> bn = fastnorm.nn.BatchNorm1d(256)        # torch.nn.BatchNorm1d, plus backend=
>>> opt = fastnorm.optim.Adam(bn.parameters(), lr=1e-3)
>>> model = fastnorm.nn.convert(model)       # swap every BatchNorm of a model
"""

from . import functional, nn, optim
from ._dispatch import BACKENDS, backends
from ._ops import warmup

__version__ = "0.1.0"

__all__ = ["BACKENDS", "backends", "functional", "nn", "optim", "warmup", "__version__"]
