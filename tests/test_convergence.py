"""Convergence: the same training run with fastnorm and with torch, step by step.

The book's MLP (784-256-128-10 with BatchNorm1d) and a small CNN (two conv-BatchNorm2d-ReLU
blocks, the second strided, global average pooling, a linear head) are trained for ``STEPS``
steps on the same MNIST batches from the same initial weights: once with torch's BatchNorm and
``torch.optim``, once converted with ``fastnorm.nn.convert`` and ``fastnorm.optim`` on each
fastnorm backend. The loss of every step and every parameter and buffer at the end must agree
within the tolerances of the dtype (``TOLERANCES``): the arithmetic of the two runs differs only
in its rounding (a fused multiply-add, a summation order), which 30 steps compound; largest
differences seen here: float64 losses 9e-13 relative, parameters and buffers 2e-9; float32
losses 2e-7 relative, parameters 5e-6.

Two cases are chaotic for every implementation (``CHAOTIC``), where two float32 runs are
compared with the float64 run instead (``test_float32_chaotic_runs_are_as_close_to_the_truth_as_torchs``:
fastnorm's float32 run must be as close to it as torch's float32 run is):
- the MLP with Adam. BatchNorm after the first Linear layer cancels the gradient of the weights
  of MNIST's constant background pixels (a constant input only shifts the batch mean, which
  BatchNorm subtracts), so their gradient is rounding noise, which Adam normalises to steps of
  ±lr: torch's own float32 run ends 0.57 away from the float64 run in bn1.running_mean.
- the CNN with SGD momentum. Its float32 rounding grows over 30 steps to the size of the
  tolerance, and how far depends on the CPU's convolution kernels: on an AMD EPYC (2026-12-03)
  torch's float32 run ended 1.5e-4 from the float64 run in conv1.weight and fastnorm's (reference
  and numba alike) 1.8e-4, 1.2e-4 from torch's; on the Intel Xeon of earlier runs the two float32
  runs stayed within 5e-5.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import BN_BACKENDS, SHARED_MNIST, assert_close
from torch import nn

import fastnorm
from fastnorm.book.models import SimpleNN

STEPS = 30
BATCH = 64
#: dtype -> (rtol, atol) of the losses, (rtol, atol) of the parameters and buffers after STEPS steps
TOLERANCES = {
    torch.float64: ((1e-10, 1e-12), (1e-6, 1e-8)),
    torch.float32: ((1e-5, 1e-6), (1e-3, 5e-5)),
}
#: the chaotic cases (see the module's text): (model, optimizer) in float32; there fastnorm's float32
#: distance to the float64 run may be at most this many times torch's own, per tensor (plus FLOOR)
CHAOTIC = [("mlp", "adam"), ("cnn", "sgd_momentum")]
CHAOS_FACTOR, CHAOS_FLOOR = 3.0, 1e-4
OPTIMIZERS = {
    "adam": ("Adam", dict(lr=1e-3)),
    "sgd_momentum": ("SGD", dict(lr=0.05, momentum=0.9)),
}


class SmallCNN(nn.Module):
    """conv(1->8, 3x3)-BN-ReLU, conv(8->16, 3x3, stride 2)-BN-ReLU, global average pool, linear(16->10)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 16, 3, stride=2, bias=False), nn.BatchNorm2d(16)
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.head(x.mean((2, 3)))


MODELS = {"mlp": lambda: SimpleNN(use_batch_norm=True, backend="torch"), "cnn": SmallCNN}


@pytest.fixture(scope="module")
def batches(request):
    """STEPS batches of MNIST (the offline copy; random images shaped like it where it is absent)."""
    if SHARED_MNIST.is_dir():
        mnist = request.getfixturevalue("mnist")
        images, labels = mnist.train_images[: STEPS * BATCH], mnist.train_labels[: STEPS * BATCH]
    else:
        gen = torch.Generator().manual_seed(0)
        images = torch.randn(STEPS * BATCH, 1, 28, 28, generator=gen)
        labels = torch.randint(0, 10, (STEPS * BATCH,), generator=gen)
    return [(images[i : i + BATCH], labels[i : i + BATCH]) for i in range(0, STEPS * BATCH, BATCH)]


def train(model: nn.Module, opt: torch.optim.Optimizer, batches, dtype: torch.dtype) -> list[float]:
    """The loss of each step of a plain training loop."""
    losses = []
    model.train()
    for x, y in batches:
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x.to(dtype)), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def twin_runs(model_name: str, optimizer: str, backend: str, dtype: torch.dtype, batches):
    """(torch's model and losses, fastnorm's model and losses) of the same run."""
    torch.manual_seed(0)
    theirs = MODELS[model_name]().to(dtype)
    ours = fastnorm.nn.convert(copy.deepcopy(theirs), backend=backend)
    name, options = OPTIMIZERS[optimizer]
    their_losses = train(theirs, getattr(torch.optim, name)(theirs.parameters(), **options), batches, dtype)
    our_opt = getattr(fastnorm.optim, name)(ours.parameters(), **options, backend=backend)
    our_losses = train(ours, our_opt, batches, dtype)
    return (theirs, their_losses), (ours, our_losses)


def _cases():
    for model_name in MODELS:
        for optimizer in OPTIMIZERS:
            for dtype, name in ((torch.float64, "float64"), (torch.float32, "float32")):
                if dtype != torch.float32 or (model_name, optimizer) not in CHAOTIC:
                    yield pytest.param(model_name, optimizer, dtype, id=f"{model_name}-{optimizer}-{name}")


@pytest.mark.parametrize("model_name,optimizer,dtype", list(_cases()))
@pytest.mark.parametrize("backend", BN_BACKENDS)
def test_training_matches_torch_step_by_step(backend, model_name, optimizer, dtype, batches):
    (theirs, their_losses), (ours, our_losses) = twin_runs(model_name, optimizer, backend, dtype, batches)
    (loss_rtol, loss_atol), (rtol, atol) = TOLERANCES[dtype]
    assert their_losses[-1] < their_losses[0], "the run does not train: the comparison would say little"
    assert_close(torch.tensor(our_losses, dtype=torch.float64), torch.tensor(their_losses, dtype=torch.float64),
                 loss_rtol, loss_atol, "losses step by step")  # fmt: skip
    for (name, a), b in zip(ours.state_dict().items(), theirs.state_dict().values()):
        assert_close(a, b, rtol, atol, f"{name} after {STEPS} steps")


@pytest.mark.parametrize("model_name,optimizer", CHAOTIC, ids=[f"{m}-{o}" for m, o in CHAOTIC])
@pytest.mark.parametrize("backend", BN_BACKENDS)
def test_float32_chaotic_runs_are_as_close_to_the_truth_as_torchs(backend, model_name, optimizer, batches):
    (truth, truth_losses), _ = twin_runs(model_name, optimizer, "torch", torch.float64, batches)
    (theirs, their_losses), (ours, our_losses) = twin_runs(model_name, optimizer, backend, torch.float32, batches)
    assert their_losses[-1] < their_losses[0]

    def gap(a, b):
        return (a.double() - b.double()).abs().max().item()

    def loss_gap(losses):
        return max(abs(a - b) for a, b in zip(losses, truth_losses))

    assert loss_gap(our_losses) <= CHAOS_FACTOR * loss_gap(their_losses) + CHAOS_FLOOR
    for (name, t), ours_t, theirs_t in zip(truth.state_dict().items(), ours.state_dict().values(),
                                          theirs.state_dict().values()):  # fmt: skip
        assert gap(ours_t, t) <= CHAOS_FACTOR * gap(theirs_t, t) + CHAOS_FLOOR, name
