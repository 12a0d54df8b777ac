"""The NumPy reference backend: readable, the yardstick of the fast backends (BatchNorm, LayerNorm
and RMSNorm compute in float64 inside; the optimizers in the parameters' dtype, as torch's do)."""

from .batchnorm import *
from .groupnorm import *
from .layernorm import *
from .optim import *
