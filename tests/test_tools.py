"""torch's tools on converted models, with torch's values: jit.trace, jit.script (and a saved
script), torch.fx.symbolic_trace, torch.export, torch.func (per-sample gradients, vmap after
replace_all_batch_norm_modules_, jvp), forward-mode AD, gradcheck's batched-gradient check,
quantization fusion, and an empty batch of another dtype.

torch's own BatchNorm is the oracle of each: same values, or the same exception type."""

from __future__ import annotations

import copy
import io
import subprocess
import sys
import warnings

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from conftest import BN_BACKENDS, assert_close
from torch.func import functional_call, grad, jvp, replace_all_batch_norm_modules_, vmap

import fastnorm
from fastnorm.book.models import SimpleNN

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit is deprecated (2.15), still a user's tool


def _mlp_twins(backend):
    torch.manual_seed(0)
    ours = SimpleNN(use_batch_norm=True, backend=backend).double()
    theirs = fastnorm.nn.convert(copy.deepcopy(ours), backend="torch")
    return ours, theirs


def _cnn_twins(backend):
    torch.manual_seed(0)
    theirs = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, bias=False), torch.nn.BatchNorm2d(4), torch.nn.ReLU(), torch.nn.Flatten(),
        torch.nn.Linear(4 * 5 * 5, 3),
    ).double()  # fmt: skip
    return fastnorm.nn.convert(copy.deepcopy(theirs), backend=backend), theirs


X = torch.randn(16, 784, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("no_grad", [True, False], ids=["no_grad", "grad"])
@pytest.mark.parametrize("backend", BN_BACKENDS)
def test_jit_trace_records_the_op_and_gives_torchs_values_on_new_inputs(backend, no_grad):
    """Was: traced under no_grad the reference BatchNorm became a constant of the trace input and
    the numba one recorded uninitialised memory; with a gradient the numba trace failed."""
    ours, theirs = _mlp_twins(backend)
    ours.eval(), theirs.eval()
    with torch.no_grad() if no_grad else warnings.catch_warnings():
        traced = torch.jit.trace(ours, X)
    other = X * 2 + 1
    assert_close(traced(other), theirs(other), 1e-10, 1e-12, "traced eval")
    ours.train(), theirs.train()
    traced = torch.jit.trace(ours, X, check_trace=False)  # training: the running statistics move
    theirs(X)  # the batch the trace ran
    for _ in range(2):
        assert_close(traced(other), theirs(other), 1e-10, 1e-12, "traced training")
    assert_close(ours.bn1.running_var, theirs.bn1.running_var, 1e-10, 1e-12, "running_var")
    if backend == "numba":
        assert "fastnorm::batch_norm" in str(traced.bn1.graph)


@pytest.mark.parametrize("backend", [*BN_BACKENDS, "auto", "torch"])
def test_jit_script_compiles_saves_and_gives_torchs_values(backend):
    """Was: "Unknown type annotation: 'str'". The scripted forward is torch's with fastnorm's op
    (numba, auto on CPU) or torch's (the Python backends: TorchScript cannot run them)."""
    ours, theirs = _mlp_twins(backend)
    scripted = torch.jit.script(ours)
    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer)
    buffer.seek(0)
    loaded, loaded_twin = torch.jit.load(buffer), copy.deepcopy(theirs)  # the saved copy has buffers of its own
    for model, twin in ((scripted, theirs), (loaded, loaded_twin)):
        model.train(), twin.train()
        for _ in range(2):
            y, expected = model(X), twin(X)
            assert_close(y, expected, 1e-10, 1e-12, "scripted training")
            y.sum().backward(), expected.sum().backward()
        model.eval(), twin.eval()
        assert_close(model(X), twin(X), 1e-10, 1e-12, "scripted eval")
    assert_close(loaded.bn2.running_mean, loaded_twin.bn2.running_mean, 1e-10, 1e-12, "running_mean")
    assert torch.equal(loaded.bn2.num_batches_tracked, loaded_twin.bn2.num_batches_tracked)
    if backend in ("numba", "auto"):
        assert "fastnorm::batch_norm" in str(scripted.bn1._scripted_forward.graph)


@pytest.mark.parametrize("backend", BN_BACKENDS)
def test_fx_symbolic_trace_keeps_fastnorms_modules_as_leaves(backend):
    """Was: fx traced into the forward and failed on its control flow. As torch's BatchNorm,
    fastnorm's is a leaf of the graph (a call_module node), so that graph.eval() switches it."""
    ours, theirs = _mlp_twins(backend)
    graph = torch.fx.symbolic_trace(ours)
    calls = [n.target for n in graph.graph.nodes if n.op == "call_module"]
    assert calls == ["fc1", "bn1", "fc2", "bn2", "fc3"]
    assert isinstance(graph.bn1, fastnorm.nn.BatchNorm1d) and graph.bn1.backend == backend
    for training in (True, False):
        graph.train(training), theirs.train(training)
        assert_close(graph(X), theirs(X), 1e-10, 1e-12, f"fx graph, training={training}")
    assert_close(ours.bn1.running_mean, theirs.bn1.running_mean, 1e-10, 1e-12, "running_mean")


@pytest.mark.parametrize("backend", BN_BACKENDS)
def test_torch_export_keeps_fastnorms_op(backend):
    ours, theirs = _mlp_twins(backend)
    for training in (False, True):
        ours.train(training), theirs.train(training)
        exported = torch.export.export(copy.deepcopy(ours), (X,))
        assert_close(exported.module()(X), theirs(X), 1e-10, 1e-12, f"exported, training={training}")
        if backend == "numba":
            assert "fastnorm" in str(exported.graph)


@pytest.mark.parametrize("backend", BN_BACKENDS)
def test_per_sample_gradients_with_vmap_of_grad(backend):
    """torch.func's per-sample gradients, vmap(grad(functional_call)) in eval mode: fastnorm's
    modules run torch's op under transforms (fastnorm's ops have no batching rule)."""
    ours, theirs = _mlp_twins(backend)
    ours.eval(), theirs.eval()

    def per_sample(model):
        params = {k: v.detach() for k, v in model.named_parameters()}
        buffers = dict(model.named_buffers())

        def loss(p, x):
            return functional_call(model, (p, buffers), (x[None],)).square().sum()

        return vmap(grad(loss), in_dims=(None, 0))(params, X[:6])

    ga, gb = per_sample(ours), per_sample(theirs)
    for key in gb:
        assert_close(ga[key], gb[key], 1e-10, 1e-12, f"per-sample {key}")


@pytest.mark.parametrize("backend", BN_BACKENDS)
def test_vmap_after_replace_all_batch_norm_modules(backend):
    ours, theirs = _mlp_twins(backend)
    replace_all_batch_norm_modules_(ours), replace_all_batch_norm_modules_(theirs)
    xs = X.reshape(4, 4, 784)
    assert_close(vmap(ours)(xs), vmap(theirs)(xs), 1e-10, 1e-12, "vmap")


@pytest.mark.parametrize("backend", BN_BACKENDS)
def test_jvp_and_forward_mode_ad(backend):
    ours, theirs = _mlp_twins(backend)
    tangent = torch.randn_like(X)
    ours.eval(), theirs.eval()  # (in training both refuse: the batch count mutates a captured buffer)
    (ya, ta), (yb, tb) = jvp(ours, (X,), (tangent,)), jvp(theirs, (X,), (tangent,))
    assert_close(ya, yb, 1e-10, 1e-12, "jvp primal")
    assert_close(ta, tb, 1e-10, 1e-12, "jvp tangent")
    ours.train(), theirs.train()
    with fwAD.dual_level():
        dual = fwAD.make_dual(X, tangent)
        ta, tb = fwAD.unpack_dual(ours(dual)).tangent, fwAD.unpack_dual(theirs(dual)).tangent
    assert ta is not None
    assert_close(ta, tb, 1e-10, 1e-12, "forward AD tangent")


@pytest.mark.parametrize("backend", BN_BACKENDS)
def test_a_dual_running_statistic_raises_torchs_error(backend):
    """PyTorch's test_nn: forward-mode AD through an eval-mode batch_norm refuses tangents of the
    running statistics ("not differentiable"); so does fastnorm's."""
    x = torch.randn(6, 3, dtype=torch.float64)
    for fn in (
        torch.nn.functional.batch_norm,
        lambda *a, **k: fastnorm.functional.batch_norm(*a, **k, backend=backend),
    ):
        with fwAD.dual_level():
            dual = fwAD.make_dual(x, torch.randn_like(x))
            mean = fwAD.make_dual(torch.zeros(3, dtype=torch.float64), torch.randn(3, dtype=torch.float64))
            with pytest.raises(RuntimeError, match="not differentiable"):
                fn(dual, mean, torch.ones(3, dtype=torch.float64), training=False)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("backend", BN_BACKENDS)
def test_gradcheck_with_batched_gradients(backend, training):
    """gradcheck's batched-gradient check (vmap over the backward), as PyTorch's module tests run it."""
    torch.manual_seed(0)
    x = torch.randn(5, 3, 2, dtype=torch.float64, requires_grad=True)
    w = torch.rand(3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)

    def fn(x, w, b):
        rm, rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
        return fastnorm.functional.batch_norm(x, rm, rv, w, b, training, backend=backend)

    assert torch.autograd.gradcheck(fn, (x, w, b), check_batched_grad=True)


@pytest.mark.parametrize("backend", BN_BACKENDS)
def test_quantization_fusion_gives_torchs_fused_modules(backend):
    """Was: fuse_modules found no fuser for fastnorm's BatchNorm2d (torch looks the types up
    exactly). Each pattern with torch's BatchNorm has its twin with fastnorm's, which fuses as
    torch's does; fastnorm.nn.revert gives torch's classes back for other tools."""
    ours, theirs = _cnn_twins(backend)
    ours.eval(), theirs.eval()
    x = torch.randn(2, 3, 7, 7, dtype=torch.float64)
    fused_ours = torch.ao.quantization.fuse_modules(copy.deepcopy(ours), [["0", "1", "2"]])
    fused_theirs = torch.ao.quantization.fuse_modules(copy.deepcopy(theirs), [["0", "1", "2"]])
    assert type(fused_ours[0]) is type(fused_theirs[0]) and type(fused_ours[1]) is torch.nn.Identity
    assert_close(fused_ours(x), fused_theirs(x), 1e-10, 1e-12, "fused")
    ours.train(), theirs.train()
    qat_ours = torch.ao.quantization.fuse_modules_qat(copy.deepcopy(ours), [["0", "1"]])
    qat_theirs = torch.ao.quantization.fuse_modules_qat(copy.deepcopy(theirs), [["0", "1"]])
    assert type(qat_ours[0]) is type(qat_theirs[0])
    reverted = fastnorm.nn.revert(copy.deepcopy(ours))
    assert type(reverted[1]) is torch.nn.BatchNorm2d
    assert reverted.state_dict().keys() == ours.state_dict().keys()
    for a, b in zip(reverted.state_dict().values(), ours.state_dict().values()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BN_BACKENDS)
def test_an_empty_batch_of_another_dtype_gives_an_empty_output(backend):
    """Was: an empty float64 batch into a float32 BatchNorm raised where torch returns an empty output."""
    ours, theirs = fastnorm.nn.BatchNorm1d(4, backend=backend), torch.nn.BatchNorm1d(4)
    x = torch.randn(0, 4, dtype=torch.float64)
    ya, yb = ours(x), theirs(x)
    assert ya.shape == yb.shape and ya.dtype == yb.dtype
    assert torch.equal(ours.running_mean, theirs.running_mean)


SCRIPT = r"""
import io, json, warnings
warnings.simplefilter("ignore", FutureWarning)
import torch, fastnorm
torch.manual_seed(0)
model = fastnorm.nn.convert(torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.BatchNorm1d(4)), backend=BACKEND)
twin = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.BatchNorm1d(4))
twin.load_state_dict(model.state_dict())
x = torch.randn(8, 5)
scripted = torch.jit.script(model)
model.eval(), twin.eval()
with torch.no_grad():
    traced = torch.jit.trace(model, x)
print(json.dumps({"script": (scripted(x) - twin.train()(x)).abs().max().item(),
                  "trace": (traced(2 * x) - twin.eval()(2 * x)).abs().max().item()}))
"""


@pytest.mark.parametrize("backend", [*BN_BACKENDS, "auto"])
def test_script_and_trace_in_a_fresh_process(backend):
    """The first script and trace of a process (the op registered by then, whatever the backend)."""
    done = subprocess.run([sys.executable, "-c", SCRIPT.replace("BACKEND", repr(backend))], capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    import json

    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["script"] < 1e-6 and result["trace"] < 1e-6, result
