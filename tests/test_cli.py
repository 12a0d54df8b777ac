"""The command line: help everywhere, one clear line for bad arguments, train and resume."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import SHARED_MNIST


def run(*args, env=None, timeout=600):
    return subprocess.run([sys.executable, "-m", "fastnorm", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)  # fmt: skip


@pytest.mark.parametrize("command", [[], ["train"], ["compare"], ["figures"], ["demo"], ["bench"], ["side-by-side"]])
def test_help(command):
    done = run(*command, "--help")
    assert done.returncode == 0 and "usage: fastnorm" in done.stdout


@pytest.mark.parametrize(
    "args,message",
    [
        (["train", "--epochs", "-1"], "expected a positive integer, got -1"),
        (["train", "--backend", "bogus"], "invalid choice: 'bogus'"),
        (["train", "--optimizer", "lbfgs"], "invalid choice: 'lbfgs'"),
        (["compare", "--epochs", "two"], "expected a positive integer, got 'two'"),
        (["nope"], "invalid choice: 'nope'"),
        (["train", "--dtype", "float8"], "invalid choice: 'float8'"),
        (["train", "--amp"], "--amp (autocast) needs a 16-bit --dtype"),
        (["compare", "--amp", "--dtype", "float32"], "--amp (autocast) needs a 16-bit --dtype"),
    ],
)
def test_bad_arguments_get_one_clear_line(args, message):
    done = run(*args)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "--help" in lines[0]


def test_unknown_figure_and_missing_data(tmp_path):
    done = run("figures", "--only", "paths,nope", "--out", str(tmp_path))
    assert done.returncode != 0 and "unknown figure 'nope'" in done.stderr
    env = {**__import__("os").environ, "FASTNORM_CACHE": str(tmp_path / "cache"), "FASTNORM_DATA": ""}
    done = run("train", "--data-dir", str(tmp_path / "missing"), "--out", str(tmp_path), env=env)
    assert done.returncode != 0 and "MNIST not found" in done.stderr and "missing" in done.stderr


def test_train_then_resume(tmp_path, mnist_cache):
    out = tmp_path / "run"
    common = ["--data-dir", str(SHARED_MNIST), "--out", str(out), "--train-limit", "256", "--test-limit", "200",
              "--optimizer", "adam", "--no-progress"]  # fmt: skip
    done = run("train", "--epochs", "1", *common)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "epoch 1:" in done.stdout and (out / "checkpoint.pt").is_file() and (out / "log.csv").is_file()
    done = run("train", "--epochs", "2", "--resume", *common)
    assert done.returncode == 0, done.stderr[-2000:]
    assert [e["epoch"] for e in json.loads((out / "log.json").read_text())["epoch"]] == [1, 2]


@pytest.mark.parametrize("precision", [["--dtype", "bfloat16"], ["--dtype", "bfloat16", "--amp"],
                                       ["--dtype", "float16", "--amp"]], ids=" ".join)  # fmt: skip
def test_train_in_16_bits(tmp_path, mnist_cache, precision):
    """--dtype alone: 16-bit parameters (fastnorm's 16-bit kernels); with --amp: float32
    parameters and the forward under torch.autocast (float16: with a GradScaler)."""
    out = tmp_path / "run"
    # 2048 images: 32 steps (float16's GradScaler skips the first few while it finds its scale)
    done = run("train", "--epochs", "1", "--data-dir", str(SHARED_MNIST), "--out", str(out), "--train-limit",
               "2048", "--test-limit", "200", "--optimizer", "adam", "--backend", "numba", "--no-progress",
               *precision)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    log = json.loads((out / "log.json").read_text())
    assert log["config"]["dtype"] == precision[1] and log["config"]["amp"] == ("--amp" in precision)
    assert log["epoch"][0]["test_acc"] > 0.5  # it learned


def test_experiments_run_fastnorms_own_kernels_by_default():
    """The figures and the demo run fastnorm's numba kernels unless told otherwise (auto would
    hand the MLP's small BatchNorms to torch)."""
    from fastnorm.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["figures"]).backend == "numba"
    assert parser.parse_args(["demo"]).backend == "numba"
    assert parser.parse_args(["train"]).backend == "auto"
