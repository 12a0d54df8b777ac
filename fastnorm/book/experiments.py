"""The four experiments of the book's chapter 6, each producing a figure.

1. :func:`optimizer_paths`: SGD, Momentum, Nesterov, AdaGrad, RMSprop and Adam descending
   f(x, y) = x²/20 + y² from (-7, 2) (book section 6.1.7, ``optimizer_compare_naive.py``).
2. :func:`weight_init_histograms`: activations of 5 layers of 100 units for std 1, std 0.01,
   Xavier and He initialisations, with sigmoid, tanh and ReLU (section 6.2, ``weight_init_activation_histogram.py``).
3. :func:`batchnorm_mnist` and :func:`weight_scale_sweep`: the MLP with and without
   BatchNorm on MNIST, and the book's ``batch_norm_test.py`` sweep of 16 weight scales (section 6.3).
4. :func:`compare_backends`: the same training with every backend, loss curves and epoch times.

Every figure is written with matplotlib's Agg backend (no display needed).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from .. import nn as fnn  # noqa: E402
from .. import optim  # noqa: E402
from .._dispatch import backends  # noqa: E402
from .data import MNIST, batches  # noqa: E402
from .train import TrainConfig, train  # noqa: E402

# -- 1. optimizer paths -----------------------------------------------------------------------

#: (label, optimizer class, options): the book's learning rates, plus Nesterov and RMSprop
PATH_OPTIMIZERS = [
    ("SGD", "SGD", {"lr": 0.95}),
    ("Momentum", "SGD", {"lr": 0.1, "momentum": 0.9}),
    ("Nesterov", "SGD", {"lr": 0.1, "momentum": 0.9, "nesterov": True}),
    ("AdaGrad", "Adagrad", {"lr": 1.5}),
    ("RMSprop", "RMSprop", {"lr": 0.1, "alpha": 0.9}),
    ("Adam", "Adam", {"lr": 0.3}),
]


def f_xy(x, y):
    """The book's anisotropic bowl f(x, y) = x²/20 + y² (minimum at the origin)."""
    return x**2 / 20.0 + y**2


def optimizer_path(
    cls_name: str, options: dict, steps: int = 30, start=(-7.0, 2.0), backend: str = "auto"
) -> np.ndarray:
    """The (steps + 1, 2) path of a fastnorm optimizer minimising :func:`f_xy`."""
    xy = torch.tensor(start, dtype=torch.float64, requires_grad=True)
    opt = getattr(optim, cls_name)([xy], backend=backend, **options)
    path = [xy.detach().clone()]
    for _ in range(steps):
        opt.zero_grad()
        f_xy(xy[0], xy[1]).backward()
        opt.step()
        path.append(xy.detach().clone())
    return torch.stack(path).numpy()


def optimizer_paths(out: Path, steps: int = 30, backend: str = "reference") -> Path:
    """Figure 1: contour plots of f with each optimizer's path and the minimum marked."""
    xs, ys = np.meshgrid(np.arange(-10, 10, 0.05), np.arange(-5, 5, 0.05))
    zs = f_xy(xs, ys)
    fig, axes = plt.subplots(2, 3, figsize=(13, 7.5))
    for ax, (label, cls_name, options) in zip(axes.flat, PATH_OPTIMIZERS):
        path = optimizer_path(cls_name, options, steps, backend=backend)
        ax.contour(xs, ys, zs, levels=np.geomspace(0.05, 30, 12), colors="0.6", linewidths=0.8)
        ax.plot(path[:, 0], path[:, 1], "o-", color="tab:red", markersize=3, linewidth=1)
        ax.plot(0, 0, "+", color="black", markersize=14, markeredgewidth=2)
        opts = ", ".join(f"{k}={v}" for k, v in options.items())
        ax.set_title(f"{label} ({opts})\nafter {steps} steps: f = {f_xy(*path[-1]):.2e}", fontsize=9)
        ax.set_xlim(-10, 10)
        ax.set_ylim(-5, 5)
        ax.set_xlabel("x")
        ax.set_ylabel("y")
    fig.suptitle(f"Optimizer paths on f(x, y) = x²/20 + y² from (-7, 2), {steps} steps (fastnorm.optim, "
                 f"backend {backend})")  # fmt: skip
    fig.tight_layout()
    return _save(fig, out)


# -- 2. weight initialisation -------------------------------------------------------------------

INITS = {
    "std 1": lambda n: 1.0,
    "std 0.01": lambda n: 0.01,
    "Xavier 1/sqrt(n)": lambda n: 1.0 / np.sqrt(n),
    "He sqrt(2/n)": lambda n: np.sqrt(2.0 / n),
}
ACTIVATIONS = {"sigmoid": torch.sigmoid, "tanh": torch.tanh, "relu": torch.relu}


def layer_activations(activation: str, init: str, samples: int = 1000, units: int = 100, layers: int = 5,
                      seed: int = 0) -> list[np.ndarray]:  # fmt: skip
    """Activations of each layer for Gaussian inputs (samples x units)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, units, generator=gen)
    outputs = []
    for _ in range(layers):
        w = torch.randn(units, units, generator=gen) * INITS[init](units)
        x = ACTIVATIONS[activation](x @ w)
        outputs.append(x.numpy())
    return outputs


def weight_init_histograms(out_dir: Path, samples: int = 1000) -> list[Path]:
    """Figure 2: one figure per activation, a row per initialisation, a column per layer."""
    paths = []
    for activation in ACTIVATIONS:
        fig, axes = plt.subplots(len(INITS), 5, figsize=(13, 9), sharey="row")
        for row, init in enumerate(INITS):
            acts = layer_activations(activation, init, samples)
            lo, hi = {"sigmoid": (0, 1), "tanh": (-1, 1), "relu": (0, 1)}[activation]
            for col, a in enumerate(acts):
                ax = axes[row, col]
                ax.hist(a.ravel(), bins=30, range=(lo, hi), color="tab:blue")
                if row == 0:
                    ax.set_title(f"layer {col + 1}")
                if col == 0:
                    ax.set_ylabel(init)
                ax.tick_params(labelsize=7)
        fig.suptitle(f"Activation histograms, {activation}, 5 layers of 100 units, {samples} Gaussian inputs")
        fig.tight_layout()
        paths.append(_save(fig, Path(out_dir) / f"weight_init_{activation}.png"))
    return paths


# -- 3. BatchNorm on MNIST ------------------------------------------------------------------------


def batchnorm_mnist(data: MNIST, out: Path, epochs: int = 10, backend: str = "numba", optimizer: str = "momentum",
                    seed: int = 0, train_limit: int | None = None, progress: bool = True) -> dict:  # fmt: skip
    """Train with and without BatchNorm; figure of loss per step and test accuracy per epoch.

    Returns {"with BatchNorm": history, "without BatchNorm": history, "figure": path}.
    """
    runs = {}
    for label, use_bn in (("with BatchNorm", True), ("without BatchNorm", False)):
        cfg = TrainConfig(optimizer=optimizer, epochs=epochs, batch_norm=use_bn, backend=backend, seed=seed,
                          train_limit=train_limit, progress=progress)  # fmt: skip
        _, history = train(cfg, data)
        runs[label] = history
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.8))
    colors = {"with BatchNorm": "tab:red", "without BatchNorm": "tab:blue"}
    for label, h in runs.items():
        loss = np.asarray(h.step_loss)
        window = max(1, min(50, len(loss) // 20))
        smooth = np.convolve(loss, np.ones(window) / window, mode="valid")
        ax1.plot(loss, color=colors[label], alpha=0.2, linewidth=0.5)
        ax1.plot(np.arange(window - 1, len(loss)), smooth, color=colors[label], label=label)
        ax2.plot([e["epoch"] for e in h.epoch], [100 * e["test_acc"] for e in h.epoch], "o-", color=colors[label],
                 label=f"{label}: {100 * h.epoch[-1]['test_acc']:.2f}%")  # fmt: skip
    ax1.set_xlabel("training step (batch of 64)")
    ax1.set_ylabel("cross-entropy loss")
    ax1.set_yscale("log")
    ax1.set_title("training loss per step (light: raw, dark: running mean)")
    ax1.legend()
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("test accuracy (%)")
    ax2.set_title("test accuracy per epoch")
    ax2.legend()
    ax2.grid(alpha=0.3)
    fig.suptitle(f"MNIST MLP 784-256-128-10, {optimizer}, batch 64, {epochs} epochs: BatchNorm vs none "
                 f"(backend {backend})")  # fmt: skip
    fig.tight_layout()
    runs["figure"] = _save(fig, out)
    return runs


class WeightScaleNet(nn.Module):
    """The book's ``MultiLayerNetExtend`` of ``batch_norm_test.py``: 784-[100]*5-10, ReLU,
    optional BatchNorm after every hidden Linear, weights drawn from N(0, weight_scale²)."""

    def __init__(self, weight_scale: float, use_batch_norm: bool, backend: str = "auto") -> None:
        super().__init__()
        sizes = [784, 100, 100, 100, 100, 100]
        layers: list[nn.Module] = []
        for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
            layers.append(_scaled_linear(fan_in, fan_out, weight_scale))
            if use_batch_norm:
                layers.append(fnn.BatchNorm1d(fan_out, backend=backend))
            layers.append(nn.ReLU())
        layers.append(_scaled_linear(100, 10, weight_scale))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.reshape(x.shape[0], -1))


def _scaled_linear(fan_in: int, fan_out: int, scale: float) -> nn.Linear:
    layer = nn.Linear(fan_in, fan_out)
    with torch.no_grad():
        layer.weight.normal_(0.0, scale)
        layer.bias.zero_()
    return layer


def weight_scale_sweep(data: MNIST, out: Path, samples: int = 1000, epochs: int = 20, scales: int = 16,
                       backend: str = "numba", seed: int = 0) -> dict:  # fmt: skip
    """The book's sweep: 16 weight scales from 1 to 1e-4, training accuracy per epoch with and
    without BatchNorm on a ``samples``-image subset (SGD lr 0.01, batch 100, as in the book)."""
    x, y = data.train_images[:samples], data.train_labels[:samples]
    weight_scales = np.logspace(0, -4, num=scales)
    curves = {}
    for scale in weight_scales:
        for use_bn in (True, False):
            torch.manual_seed(seed)
            model = WeightScaleNet(float(scale), use_bn, backend)
            opt = optim.SGD(model.parameters(), lr=0.01, backend=backend)
            accs = []
            for epoch in range(epochs):
                gen = torch.Generator().manual_seed(seed * 1000 + epoch)
                for xb, yb in batches(x, y, 100, gen):
                    opt.zero_grad(set_to_none=True)
                    nn.functional.cross_entropy(model(xb), yb).backward()
                    opt.step()
                model.eval()
                with torch.no_grad():
                    accs.append((model(x).argmax(1) == y).float().mean().item())
                model.train()
            curves[(float(scale), use_bn)] = accs
    cols = 4
    rows = -(-scales // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(13, 2.6 * rows), sharex=True, sharey=True)
    for ax, scale in zip(axes.flat, weight_scales):
        ax.plot(curves[(float(scale), True)], color="tab:red", label="BatchNorm")
        ax.plot(curves[(float(scale), False)], "--", color="tab:blue", label="no BatchNorm")
        ax.set_title(f"weight scale {scale:.2g}", fontsize=9)
        ax.set_ylim(0, 1)
    axes.flat[0].legend(fontsize=8)
    fig.supxlabel("epoch")
    fig.supylabel("training accuracy")
    fig.suptitle(f"Weight-scale sweep on {samples} MNIST images (book: batch_norm_test.py; backend {backend})")
    fig.tight_layout()
    return {"curves": curves, "figure": _save(fig, out)}


# -- 4. backends side by side -----------------------------------------------------------------------


def compare_backends(data: MNIST, out: Path, epochs: int = 1, names: list[str] | None = None,
                     optimizer: str = "momentum", seed: int = 0, train_limit: int | None = None,
                     progress: bool = True, dtype: str = "float32", amp: bool = False) -> dict:  # fmt: skip
    """The same run (seed, batches) with each backend: loss curves and seconds per epoch.

    Returns {backend: history, ..., "figure": path}. CUDA is skipped (the data lives on the CPU).
    """
    names = names or [b for b in backends() if b != "cuda"]
    runs = {}
    for name in names:
        cfg = TrainConfig(optimizer=optimizer, epochs=epochs, batch_norm=True, backend=name, seed=seed,
                          train_limit=train_limit, progress=progress, dtype=dtype, amp=amp)  # fmt: skip
        start = time.perf_counter()
        _, history = train(cfg, data)
        history.total_seconds = time.perf_counter() - start
        runs[name] = history
    base = "torch" if "torch" in runs else names[0]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(11, 7), sharex=True, gridspec_kw={"height_ratios": [2, 1]})
    for name, h in runs.items():
        ax1.plot(h.step_loss, label=f"{name}: {np.mean([e['seconds'] for e in h.epoch]):.2f} s/epoch", linewidth=0.8)
        diff = np.abs(np.asarray(h.step_loss) - np.asarray(runs[base].step_loss))
        if name != base:
            ax2.semilogy(np.maximum(diff, 1e-12), label=f"|{name} - {base}|", linewidth=0.8)
    ax1.set_ylabel("training loss")
    ax1.set_yscale("log")
    ax1.legend()
    ax1.set_title(f"Same seed, same batches, {optimizer} + BatchNorm: the loss curves coincide")
    ax2.set_xlabel("training step")
    ax2.set_ylabel("loss difference")
    if len(runs) > 1:
        ax2.legend(fontsize=8)
    fig.tight_layout()
    runs["figure"] = _save(fig, out)
    return runs


def _save(fig, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return path
