"""The book's experiments at tiny sizes: every figure is written, training resumes exactly."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fastnorm.book import experiments as ex
from fastnorm.book.train import TrainConfig, train


def _is_png(path, min_bytes=20_000):
    data = path.read_bytes()
    return data.startswith(b"\x89PNG") and len(data) > min_bytes


def test_optimizer_paths(tmp_path):
    path = ex.optimizer_paths(tmp_path / "paths.png")
    assert _is_png(path)
    for label, cls_name, options in ex.PATH_OPTIMIZERS:
        trace = ex.optimizer_path(cls_name, options, steps=30)
        assert trace.shape == (31, 2) and np.isfinite(trace).all()
        assert trace[0].tolist() == [-7.0, 2.0]
        assert ex.f_xy(*trace[-1]) < ex.f_xy(*trace[0]) / 10, label  # every one gets much closer


def test_optimizer_path_follows_torch():
    """The path is fastnorm.optim's; with the torch backend it is torch.optim's own."""
    ours = ex.optimizer_path("Adam", {"lr": 0.3}, steps=10, backend="reference")
    theirs = ex.optimizer_path("Adam", {"lr": 0.3}, steps=10, backend="torch")
    np.testing.assert_allclose(ours, theirs, rtol=1e-12, atol=1e-12)


def test_weight_init_histograms(tmp_path):
    paths = ex.weight_init_histograms(tmp_path, samples=200)
    assert [p.name for p in paths] == ["weight_init_sigmoid.png", "weight_init_tanh.png", "weight_init_relu.png"]
    assert all(_is_png(p) for p in paths)
    # the book's observations: std 0.01 collapses sigmoid activations to 0.5; He keeps ReLU alive
    collapsed = ex.layer_activations("sigmoid", "std 0.01")[-1]
    assert abs(collapsed.mean() - 0.5) < 0.01 and collapsed.std() < 0.05
    he = ex.layer_activations("relu", "He sqrt(2/n)")[-1]
    assert he.std() > 0.3


def test_batchnorm_mnist_and_sweep(tmp_path, mnist):
    runs = ex.batchnorm_mnist(mnist, tmp_path / "bn.png", epochs=1, train_limit=640, progress=False)
    assert _is_png(runs["figure"])
    assert len(runs["with BatchNorm"].step_loss) == 10 and len(runs["without BatchNorm"].epoch) == 1
    sweep = ex.weight_scale_sweep(mnist, tmp_path / "sweep.png", samples=200, epochs=2, scales=4)
    assert _is_png(sweep["figure"], 10_000)
    assert len(sweep["curves"]) == 8 and all(len(c) == 2 for c in sweep["curves"].values())


def test_compare_backends_curves_coincide(tmp_path, mnist):
    runs = ex.compare_backends(mnist, tmp_path / "cmp.png", epochs=1, names=["reference", "numba", "torch"],
                               train_limit=640, progress=False)  # fmt: skip
    assert _is_png(runs["figure"])
    base = np.asarray(runs["torch"].step_loss)
    for name in ("reference", "numba"):
        assert np.abs(np.asarray(runs[name].step_loss) - base).max() < 1e-4, name


@pytest.mark.parametrize("backend", ["numba", "torch"])
def test_resume_continues_to_the_same_result(tmp_path, mnist, backend):
    config = TrainConfig(optimizer="adam", epochs=3, backend=backend, train_limit=320, test_limit=500, progress=False)
    model_a, history_a = train(config, mnist, out_dir=tmp_path / "straight")
    interrupted = TrainConfig(**{**config.__dict__, "epochs": 1})
    train(interrupted, mnist, out_dir=tmp_path / "resumed")
    model_b, history_b = train(config, mnist, out_dir=tmp_path / "resumed", resume=True)
    assert history_a.step_loss == history_b.step_loss
    assert [e["test_acc"] for e in history_a.epoch] == [e["test_acc"] for e in history_b.epoch]
    for (k, a), b in zip(model_a.state_dict().items(), model_b.state_dict().values()):
        assert torch.equal(a, b), k
    log = json.loads((tmp_path / "resumed" / "log.json").read_text())
    assert [e["epoch"] for e in log["epoch"]] == [1, 2, 3]
    assert (tmp_path / "resumed" / "log.csv").read_text().count("\n") == 4
    with pytest.raises(ValueError, match="different configuration"):
        train(TrainConfig(**{**config.__dict__, "seed": 1}), mnist, out_dir=tmp_path / "resumed", resume=True)
