"""The book's models, built from fastnorm's drop-ins."""

from __future__ import annotations

import torch
from torch import nn

from .. import nn as fnn


class SimpleNN(nn.Module):
    """The MNIST MLP of the book's BatchNorm experiment: 784-256-128-10.

    ``Linear -> [BatchNorm1d] -> ReLU`` twice, then ``Linear`` to 10 logits. Without BatchNorm
    it has six parameter tensors (235,146 values); BatchNorm adds 2 x (256 + 128).

    Args:
        use_batch_norm: insert :class:`fastnorm.nn.BatchNorm1d` after the hidden Linear layers.
        backend: the BatchNorm backend (``"auto"``, ``"reference"``, ``"numba"``, ``"cuda"``,
            ``"torch"``).

    Shape:
        Input ``(N, 1, 28, 28)`` or ``(N, 784)``; output ``(N, 10)`` logits.

    Example:
        >>> model = SimpleNN(use_batch_norm=True, backend="reference")
        >>> logits = model(torch.randn(64, 1, 28, 28))
    """

    def __init__(self, use_batch_norm: bool = False, backend: str = "auto") -> None:
        super().__init__()
        self.use_batch_norm = use_batch_norm
        self.fc1 = nn.Linear(784, 256)
        self.bn1 = fnn.BatchNorm1d(256, backend=backend) if use_batch_norm else nn.Identity()
        self.fc2 = nn.Linear(256, 128)
        self.bn2 = fnn.BatchNorm1d(128, backend=backend) if use_batch_norm else nn.Identity()
        self.fc3 = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(-1, 784)
        x = torch.relu(self.bn1(self.fc1(x)))
        x = torch.relu(self.bn2(self.fc2(x)))
        return self.fc3(x)
