"""SyncBatchNorm and data-parallel training on torch.distributed (gloo on 127.0.0.1, spawned
processes, every collective bounded by a timeout)."""

from __future__ import annotations

import inspect
import time

import pytest
import torch
import torch.nn.functional as F
from conftest import SHARED_MNIST, assert_close

import fastnorm
from fastnorm.distributed import RankFailed, spawn

BACKENDS = ["numba", "reference"]
C = 5


def _global_batch(total, tail):
    gen = torch.Generator().manual_seed(7)
    x = torch.randn((total, C, *tail), generator=gen, dtype=torch.float64) * 2 + 1
    dy = torch.randn((total, C, *tail), generator=gen, dtype=torch.float64)
    w = torch.rand(C, generator=gen, dtype=torch.float64) + 0.5
    b = torch.randn(C, generator=gen, dtype=torch.float64)
    return x, dy, w, b


def _sync_bn_worker(rank, world, sizes, tail, out_dir):
    x_all, dy_all, w, b = _global_batch(sum(sizes), tail)
    lo = sum(sizes[:rank])
    results = {}
    for backend in BACKENDS:
        bn = fastnorm.nn.SyncBatchNorm(C, momentum=0.3, dtype=torch.float64, backend=backend)
        with torch.no_grad():
            bn.weight.copy_(w)
            bn.bias.copy_(b)
        for _step in range(2):  # two steps: the running statistics accumulate
            x = x_all[lo : lo + sizes[rank]].clone().requires_grad_(True)
            bn.zero_grad()
            y = bn(x)
            y.backward(dy_all[lo : lo + sizes[rank]])
        results[backend] = {"y": y.detach(), "dx": x.grad, "dw": bn.weight.grad, "db": bn.bias.grad,
                            "rm": bn.running_mean, "rv": bn.running_var}  # fmt: skip
    torch.save(results, f"{out_dir}/rank{rank}.pt")


@pytest.mark.parametrize(
    "sizes,tail",
    [((3, 3), ()), ((5, 2, 0), ()), ((2, 1, 4), (3, 4)), ((4, 4), (7,))],
    ids=["2 ranks equal (N,C)", "3 ranks unequal, one empty", "3 ranks unequal (N,C,H,W)", "2 ranks (N,C,L)"],
)
def test_sync_batchnorm_equals_batchnorm_on_the_whole_batch(tmp_path, sizes, tail):
    spawn(_sync_bn_worker, len(sizes), sizes, tail, str(tmp_path), timeout_s=60)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(len(sizes))]
    x, dy, w, b = _global_batch(sum(sizes), tail)
    rm, rv = torch.zeros(C, dtype=torch.float64), torch.ones(C, dtype=torch.float64)
    for _ in range(2):
        xg = x.clone().requires_grad_(True)
        wg, bg = w.clone().requires_grad_(True), b.clone().requires_grad_(True)
        y = F.batch_norm(xg, rm, rv, wg, bg, training=True, momentum=0.3)
        y.backward(dy)
    for backend in BACKENDS:
        got = [r[backend] for r in ranks]
        assert_close(torch.cat([g["y"] for g in got]), y, 1e-10, 1e-10, f"{backend} output")
        assert_close(torch.cat([g["dx"] for g in got]), xg.grad, 1e-10, 1e-10, f"{backend} dx")
        # weight and bias gradients stay local (DDP averages them): their sum is the whole batch's
        assert_close(sum(g["dw"] for g in got), wg.grad, 1e-10, 1e-10, f"{backend} dweight")
        assert_close(sum(g["db"] for g in got), bg.grad, 1e-10, 1e-10, f"{backend} dbias")
        for g in got:
            assert_close(g["rm"], rm, 1e-10, 1e-12, f"{backend} running_mean")
            assert_close(g["rv"], rv, 1e-10, 1e-12, f"{backend} running_var")


def test_ddp_training_matches_single_process(tmp_path, mnist_cache):
    from fastnorm.book.data import load_mnist
    from fastnorm.book.train import TrainConfig, train, train_distributed

    config = TrainConfig(optimizer="momentum", epochs=1, backend="numba", train_limit=20 * 64, test_limit=500,
                         progress=False)  # fmt: skip
    train(config, load_mnist(SHARED_MNIST), out_dir=tmp_path / "single")
    train_distributed(config, 2, SHARED_MNIST, tmp_path / "ddp")
    single = torch.load(tmp_path / "single" / "checkpoint.pt", weights_only=False)
    ddp = torch.load(tmp_path / "ddp" / "checkpoint.pt", weights_only=False)
    assert len(single["history"]["step_loss"]) == len(ddp["history"]["step_loss"]) == 20
    for key, value in single["model"].items():
        assert_close(ddp["model"][key], value, 1e-4, 1e-5, key)


def _failing_worker(rank, world):
    if rank == 1:
        raise RuntimeError("rank 1 failed mid-step")
    bn = fastnorm.nn.SyncBatchNorm(3, backend="numba")
    bn(torch.randn(4, 3))  # waits in all_gather for rank 1, which never comes


def test_a_failing_rank_does_not_hang_the_others():
    start = time.perf_counter()
    # rank 0 then fails too (its all_gather loses its peer); the error raised is rank 1's, the cause
    with pytest.raises(RankFailed, match=r"(?s)rank 1 of 2 failed first.*rank 1 failed mid-step"):
        spawn(_failing_worker, 2, timeout_s=10)
    assert time.perf_counter() - start < 60


def test_outside_a_process_group_it_is_batchnorm():
    bn = fastnorm.nn.SyncBatchNorm(4, backend="numba")
    ref = torch.nn.BatchNorm1d(4)
    x = torch.randn(8, 4)
    assert_close(bn(x), ref(x), 1e-5, 1e-6, "output")
    assert_close(bn.running_var, ref.running_var, 1e-6, 1e-7, "running_var")


def test_signature_and_convert_sync():
    ours = [p for n, p in inspect.signature(fastnorm.nn.SyncBatchNorm).parameters.items() if n != "backend"]
    assert ours == list(inspect.signature(torch.nn.SyncBatchNorm).parameters.values())
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), fastnorm.nn.BatchNorm1d(4),
                                torch.nn.SyncBatchNorm(4))  # fmt: skip
    weight = model[1].weight
    fastnorm.nn.convert(model, backend="numba", sync=True)
    assert all(type(m) is fastnorm.nn.SyncBatchNorm for m in list(model)[1:])
    assert model[1].weight is weight and model[3].backend == "numba"
    fastnorm.nn.convert(model, backend="reference")  # sync=False keeps SyncBatchNorm
    assert type(model[1]) is fastnorm.nn.SyncBatchNorm and model[1].backend == "reference"
