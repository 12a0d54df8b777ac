"""The NumPy reference backend: readable, the yardstick of the fast backends (BatchNorm computes
in float64 inside; the optimizers in the parameters' dtype, as torch's do)."""

from .batchnorm import *
from .optim import *
