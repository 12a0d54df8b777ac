"""Training the book's MNIST MLP on fastnorm's optimizers and BatchNorm.

Deterministic: the model is initialised from ``seed`` and epoch ``e`` shuffles with a generator
seeded ``(seed, e)``, so a run resumed from a checkpoint replays exactly the batches of an
uninterrupted one. Checkpoints (model, optimizer, epoch, history, RNG state) are written after
every epoch, atomically (a temporary file renamed over the old one).
"""

from __future__ import annotations

import contextlib
import csv
import functools
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .. import nn as fnn
from .. import optim
from .data import MNIST, batches
from .models import SimpleNN

#: optimizer choices: name -> (class name, default options)
OPTIMIZERS = {
    "sgd": ("SGD", {"lr": 0.01}),
    "momentum": ("SGD", {"lr": 0.01, "momentum": 0.9}),
    "nesterov": ("SGD", {"lr": 0.01, "momentum": 0.9, "nesterov": True}),
    "adagrad": ("Adagrad", {"lr": 0.01}),
    "rmsprop": ("RMSprop", {"lr": 0.001}),
    "adam": ("Adam", {"lr": 0.001}),
    "adamw": ("AdamW", {"lr": 0.001}),
}


@dataclass
class TrainConfig:
    """One training run. ``backend`` chooses BatchNorm's and the optimizer's implementation."""

    optimizer: str = "momentum"
    lr: float | None = None  # None: the optimizer's default above
    epochs: int = 10
    batch_size: int = 64
    batch_norm: bool = True
    backend: str = "auto"
    seed: int = 0
    train_limit: int | None = None  # first N training samples (quick runs, tests)
    test_limit: int | None = None
    progress: bool = True
    dtype: str = "float32"  # "float32", "bfloat16" or "float16": the parameters' (or with amp: autocast's)
    amp: bool = False  # float32 parameters, the forward under torch.autocast("cpu", dtype)


@dataclass
class History:
    """Per-step losses and per-epoch metrics of a run."""

    step_loss: list[float] = field(default_factory=list)
    epoch: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"step_loss": self.step_loss, "epoch": self.epoch}


def make_optimizer(name: str, params, lr: float | None, backend: str) -> torch.optim.Optimizer:
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}: choose one of {', '.join(OPTIMIZERS)}")
    cls_name, options = OPTIMIZERS[name]
    options = dict(options)
    if lr is not None:
        options["lr"] = lr
    return getattr(optim, cls_name)(params, backend=backend, **options)


def evaluate(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 1000,
             autocast=contextlib.nullcontext) -> float:  # fmt: skip
    """Accuracy in eval mode (BatchNorm uses its running statistics), in the model's dtype (and
    under ``autocast()``, a context factory, for mixed-precision runs)."""
    was_training = model.training
    model.eval()
    correct = 0
    dtype = next(model.parameters()).dtype
    with torch.no_grad(), autocast():
        for start in range(0, images.shape[0], batch_size):
            logits = model(images[start : start + batch_size].to(dtype))
            correct += (logits.argmax(1) == labels[start : start + batch_size]).sum().item()
    model.train(was_training)
    return correct / max(1, images.shape[0])


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def train(config: TrainConfig, data: MNIST, out_dir: str | os.PathLike | None = None,
          resume: bool = False) -> tuple[torch.nn.Module, History]:  # fmt: skip
    """Train ``SimpleNN(config.batch_norm)`` on ``data``; returns the model and its history.

    With ``out_dir``: writes ``log.json`` and ``log.csv`` (per-epoch metrics) and
    ``checkpoint.pt`` after every epoch; ``resume=True`` continues from that checkpoint.
    """
    data = data.subset(config.train_limit, config.test_limit)
    rank, world = _process_group()
    dtype, autocast, scaler = _precision(config)
    torch.manual_seed(config.seed)
    model = SimpleNN(use_batch_norm=config.batch_norm, backend=config.backend)
    if not config.amp:
        model = model.to(dtype)  # pure 16-bit training: 16-bit parameters, fastnorm's 16-bit kernels
    net = model
    if world > 1:  # data parallel: SyncBatchNorm, gradients averaged by DDP, a shard of each batch
        model = fnn.convert(model, backend=config.backend, sync=True)
        net = torch.nn.parallel.DistributedDataParallel(model)
    opt = make_optimizer(config.optimizer, model.parameters(), config.lr, config.backend)
    progress = config.progress and rank == 0
    writer = rank == 0  # every rank may resume from the checkpoint; rank 0 alone writes
    loss_fn = torch.nn.CrossEntropyLoss()
    history, first_epoch = History(), 0
    out = Path(out_dir) if out_dir is not None else None
    ckpt = out / "checkpoint.pt" if out is not None else None
    if out is not None and writer:
        out.mkdir(parents=True, exist_ok=True)
    if resume:
        if ckpt is None or not ckpt.is_file():
            raise FileNotFoundError(f"--resume: no checkpoint at {ckpt}")
        state = torch.load(ckpt, weights_only=False)
        if _run_identity(state["config"]) != _run_identity(asdict(config)):
            raise ValueError(f"--resume: {ckpt} was written by a different configuration: {state['config']}")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        history = History(**state["history"])
        first_epoch = state["epoch"]
        torch.set_rng_state(state["torch_rng"])

    model.train()
    n_steps = -(-data.train_images.shape[0] // config.batch_size)
    epochs = tqdm(range(first_epoch, config.epochs), desc="epochs", disable=not progress,
                  initial=first_epoch, total=config.epochs)  # fmt: skip
    for epoch in epochs:
        gen = torch.Generator().manual_seed(config.seed * 1000 + epoch)
        start = time.perf_counter()
        total, correct, seen = 0.0, 0, 0
        steps = tqdm(batches(data.train_images, data.train_labels, config.batch_size, gen), total=n_steps,
                     desc=f"epoch {epoch + 1}", leave=False, disable=not progress)  # fmt: skip
        for images, labels in steps:
            if world > 1:
                images, labels = images.tensor_split(world)[rank], labels.tensor_split(world)[rank]
            opt.zero_grad(set_to_none=True)
            with autocast():
                logits = net(images if config.amp else images.to(dtype))
                loss = loss_fn(logits.float(), labels)
            if scaler is None:
                loss.backward()
                opt.step()
            else:  # float16 autocast: scaled gradients
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            value = loss.item()
            history.step_loss.append(value)
            total += value * labels.shape[0]
            correct += (logits.argmax(1) == labels).sum().item()
            seen += labels.shape[0]
            steps.set_postfix(loss=f"{value:.4f}", refresh=False)
        wall = time.perf_counter() - start
        record = {
            "epoch": epoch + 1,
            "train_loss": total / max(seen, 1),
            "train_acc": correct / max(seen, 1),
            "test_acc": evaluate(model, data.test_images, data.test_labels, autocast=autocast),
            "seconds": wall,
        }
        history.epoch.append(record)
        epochs.set_postfix(loss=f"{record['train_loss']:.4f}", test_acc=f"{record['test_acc']:.4f}")
        if out is not None and writer:
            _write_logs(out, config, history)
            _atomic_save({"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch + 1,
                          "history": history.to_dict(), "config": asdict(config),
                          "torch_rng": torch.get_rng_state()}, ckpt)  # fmt: skip
    return model, history


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _precision(config: TrainConfig):
    """(dtype, autocast context factory, GradScaler or None) of a run's ``dtype`` and ``amp``."""
    if config.dtype not in DTYPES:
        raise ValueError(f"unknown dtype {config.dtype!r}: choose one of {', '.join(DTYPES)}")
    dtype = DTYPES[config.dtype]
    if not config.amp:
        return dtype, contextlib.nullcontext, None
    if dtype == torch.float32:
        raise ValueError("amp (autocast) needs a 16-bit dtype: bfloat16 or float16")
    scaler = torch.amp.GradScaler("cpu") if dtype == torch.float16 else None
    return dtype, functools.partial(torch.autocast, "cpu", dtype=dtype), scaler


def _process_group() -> tuple[int, int]:
    """(rank, world size) of the default process group, (0, 1) outside one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _train_worker(rank: int, world: int, config: TrainConfig, data_dir, out_dir, resume: bool) -> None:
    from .data import load_mnist

    train(config, load_mnist(data_dir), out_dir=out_dir, resume=resume)


def train_distributed(config: TrainConfig, nproc: int, data_dir=None, out_dir=None, resume: bool = False) -> None:
    """:func:`train` on ``nproc`` local processes (gloo): each process takes its shard of every
    batch, BatchNorm is synchronised (fastnorm.nn.SyncBatchNorm) and DistributedDataParallel
    averages the gradients, so the run follows single-process training on the full batches.
    Rank 0 writes the logs and checkpoints."""
    from ..distributed import spawn

    spawn(_train_worker, nproc, config, data_dir, out_dir, resume, timeout_s=300)


def _run_identity(config: dict) -> dict:
    """The settings a resumed run must share with the checkpoint (it may run more epochs)."""
    return {k: v for k, v in config.items() if k not in ("epochs", "progress")}


def _write_logs(out: Path, config: TrainConfig, history: History) -> None:
    tmp = out / "log.json.tmp"
    tmp.write_text(json.dumps({"config": asdict(config), **history.to_dict()}, indent=1))
    os.replace(tmp, out / "log.json")
    with open(out / "log.csv.tmp", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(history.epoch[0]))
        writer.writeheader()
        writer.writerows(history.epoch)
    os.replace(out / "log.csv.tmp", out / "log.csv")
