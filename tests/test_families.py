"""Hugging Face transformers' RMSNorm families on fastnorm's kernels (fastnorm/families.py): every
listed class against its own forward and backward on every CPU backend, the classes that copy a
listed forward, what convert leaves and says, and fastnorm beside transformers in one process."""

from __future__ import annotations

import copy
import importlib
import io
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import transformers
from torch import nn
from ulps import ulps16

import fastnorm
from fastnorm import families

REPO = Path(__file__).resolve().parent.parent
BACKENDS = ["reference", "numba", "torch"]
LISTED = [path for family in families.FAMILIES for path in family.classes]
#: (input dtype, weight dtype): a float32 model, a bfloat16 model, bfloat16 activations of a
#: float32 model (autocast-style), a float16 model
DTYPES = [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32),
          (torch.float16, torch.float16)]  # fmt: skip


def _class(path: str) -> type:
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _norm(cls: type, d: int, wd: torch.dtype, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    module = cls(d, 1e-5).to(wd)
    with torch.no_grad():  # Gemma's weight starts at 0 and is used as 1 + weight
        module.weight.copy_(torch.randn(d) * 0.5 + (0.0 if "Gemma" in cls.__name__ else 1.0))
    return module


def _assert_same(got: torch.Tensor, want: torch.Tensor) -> None:
    """16-bit: equal but where the float32 normalised value rounds the other way (rstd's last bit:
    fastnorm's sum of squares is more accurate than torch's), by one ulp, in at most 0.5% of the
    values. float32: within float32 rounding of the operands."""
    assert got.dtype == want.dtype and got.shape == want.shape
    if got.dtype in (torch.bfloat16, torch.float16):
        ulps = ulps16(got, want)
        assert ulps.max() <= 1, f"{ulps.max()} ulps apart"
        assert (ulps > 0).float().mean() <= 5e-3, f"{(ulps > 0).float().mean():.2%} of the values differ"
    else:
        torch.testing.assert_close(got, want, rtol=2e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("xd, wd", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("path", LISTED, ids=lambda p: p.rpartition(".")[2])
@pytest.mark.parametrize("shape", [(3, 5, 257), (1, 64)], ids=["3x5x257", "1x64"])
def test_every_listed_class_follows_its_own_forward_and_backward(path, xd, wd, backend, shape):
    cls = _class(path)
    theirs = _norm(cls, shape[-1], wd)
    ours = fastnorm.nn.convert(copy.deepcopy(theirs), backend=backend)
    assert isinstance(ours, cls) and type(ours) is not cls
    torch.manual_seed(1)
    x = (torch.randn(shape) * 3 + 1).to(xd)
    x_theirs, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
    want, got = theirs(x_theirs), ours(x_ours)
    _assert_same(got, want)
    dy = torch.randn(want.shape).to(want.dtype)
    want.backward(dy)
    got.backward(dy)
    if xd == wd == torch.float32:
        torch.testing.assert_close(x_ours.grad, x_theirs.grad, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours.weight.grad, theirs.weight.grad, rtol=1e-5, atol=1e-4)
    else:  # 16-bit gradients: each side rounds its own intermediate values; against float64 truth
        truth = _norm(cls, shape[-1], torch.float64)
        truth.load_state_dict({"weight": theirs.weight.detach().double()})
        x64 = x.double().requires_grad_()
        cls.forward(truth, x64).backward(dy.double())
        for mine, torchs, want64 in ((x_ours.grad, x_theirs.grad, x64.grad),
                                     (ours.weight.grad, theirs.weight.grad, truth.weight.grad)):  # fmt: skip
            error, their_error = (mine.double() - want64).abs().max(), (torchs.double() - want64).abs().max()
            assert error <= 2 * their_error + 1e-2 * want64.abs().max(), (error, their_error)


def test_float64_runs_the_class_own_forward():
    """transformers' Llama forward computes a float64 input in float32: the converted module runs
    that forward itself for dtypes the kernels do not take."""
    cls = _class(LISTED[0])
    theirs = _norm(cls, 33, torch.float64)
    ours = fastnorm.nn.convert(copy.deepcopy(theirs), backend="numba")
    x = torch.randn(4, 33, dtype=torch.float64)
    assert torch.equal(ours(x), theirs(x))


def _transformers_classes() -> list[type]:
    import pkgutil

    import transformers.models as models

    found = []
    for info in pkgutil.iter_modules(models.__path__):
        try:
            module = importlib.import_module(f"transformers.models.{info.name}.modeling_{info.name}")
        except Exception:  # models whose optional dependencies are missing here
            continue
        found += [c for c in vars(module).values() if isinstance(c, type) and c.__module__ == module.__name__]
    return found


@pytest.mark.slow
def test_classes_that_copy_a_listed_forward_join_its_family():
    """transformers copies Llama's RMSNorm into most models: those classes (not listed) are found by
    their code; a class whose forward differs in any statement is not."""
    norms = [c for c in _transformers_classes() if c.__name__.endswith(("RMSNorm", "LayerNorm"))]
    matched = {c: families.family_of(c) for c in norms}
    llama = [c for c, f in matched.items() if f is not None and f.name == "llama"]
    assert len(llama) >= 100, len(llama)
    assert families.family_of(_class("transformers.models.mllama.modeling_mllama.MllamaTextRMSNorm")).name == "llama"
    gemma3n = _class("transformers.models.gemma3n.modeling_gemma3n.Gemma3nRMSNorm")  # with_scale, pow(-0.5)
    assert families.family_of(gemma3n) is None

    llama_norm = _class(LISTED[0])
    changed = type("LlamaRMSNormEps", (nn.Module,), {"__module__": "transformers.models.mine",
                   "__init__": llama_norm.__init__,  # the same __init__, a forward with one more eps
                   "forward": lambda self, x: llama_norm.forward(self, x * 1.0)})  # fmt: skip
    assert families.family_of(changed) is None


def test_convert_reports_what_it_converted_and_what_it_left(capsys):
    gemma3n = _class("transformers.models.gemma3n.modeling_gemma3n.Gemma3nRMSNorm")
    model = nn.Sequential(_norm(_class(LISTED[0]), 16, torch.float32), gemma3n(16), nn.InstanceNorm1d(16),
                          nn.LayerNorm(16), nn.Linear(16, 16))  # fmt: skip
    fastnorm.nn.convert(model, backend="numba", report=True)
    out = capsys.readouterr().out
    assert "fastnorm.nn.convert: 2 converted, 2 left" in out
    assert "converted 0: LlamaRMSNorm -> llama family, backend numba" in out
    assert "converted 3: LayerNorm -> fastnorm.nn's, backend numba" in out
    assert "left      1: transformers.models.gemma3n.modeling_gemma3n.Gemma3nRMSNorm: its forward is none" in out
    assert "left      2: fastnorm has no kernel for InstanceNorm1d" in out
    assert type(model[1]) is gemma3n and type(model[2]) is nn.InstanceNorm1d
    fastnorm.nn.convert(model, backend="numba")
    assert capsys.readouterr().out == ""  # report=False: silent


def test_a_converted_norm_keeps_its_state_class_and_round_trips():
    cls = _class(LISTED[0])
    theirs = _norm(cls, 24, torch.float32)
    ours = fastnorm.nn.convert(copy.deepcopy(theirs), backend="numba")
    x = torch.randn(3, 24)
    assert ours.state_dict().keys() == theirs.state_dict().keys() == {"weight"}
    assert repr(ours) == repr(theirs).removesuffix(")") + ", backend='numba')"
    for clone in (copy.deepcopy(ours), pickle.loads(pickle.dumps(ours))):
        assert type(clone) is type(ours) and clone.backend == "numba"
        assert torch.equal(clone(x), ours(x))
    buffer = io.BytesIO()
    torch.save(ours, buffer)
    buffer.seek(0)
    assert torch.equal(torch.load(buffer, weights_only=False)(x), ours(x))
    fresh = cls(24, 1e-5)
    fresh.load_state_dict(ours.state_dict())  # a converted model's checkpoint loads into transformers'
    assert torch.equal(fresh(x), theirs(x))
    weight = ours.weight
    reverted = fastnorm.nn.revert(ours)
    assert type(reverted) is cls and reverted.weight is weight and not hasattr(reverted, "backend")
    assert torch.equal(reverted(x), theirs(x))
    again = fastnorm.nn.convert(reverted, backend="reference")
    assert again.backend == "reference" and type(again) is type(copy.deepcopy(ours))


def test_fastnorm_and_transformers_share_a_process_and_train_as_transformers():
    """Run from the repository root (its kernels/ folder on sys.path): Hugging Face's kernels
    package is the one imported, fastnorm's kernels are fastnorm_kernels; a converted Llama trains
    with fastnorm's AdamW as transformers' model with torch's AdamW does (first-step loss within
    1e-6 relative, float32), and gives its losses under bfloat16 autocast and in bfloat16."""
    code = textwrap.dedent("""
        import copy, json, kernels, torch, transformers
        import fastnorm, fastnorm_kernels
        from transformers import LlamaConfig, LlamaForCausalLM
        assert hasattr(kernels, "kernelize"), kernels.__file__  # Hugging Face's
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
        theirs = LlamaForCausalLM(config)
        ours = fastnorm.nn.convert(copy.deepcopy(theirs), backend="numba")
        opt_theirs = torch.optim.AdamW(theirs.parameters(), lr=1e-3, fused=True)
        opt_ours = fastnorm.optim.AdamW(ours.parameters(), lr=1e-3, backend="numba")
        ids = torch.randint(0, 97, (2, 16))
        half = []  # first-step losses under bfloat16 autocast, then of the model in bfloat16
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half.append([m(input_ids=ids, labels=ids).loss.item() for m in (theirs, ours)])
        half.append([copy.deepcopy(m).bfloat16()(input_ids=ids, labels=ids).loss.item() for m in (theirs, ours)])
        losses = []
        for step in range(3):
            ids = torch.randint(0, 97, (2, 16))
            pair = []
            for model, opt in ((theirs, opt_theirs), (ours, opt_ours)):
                loss = model(input_ids=ids, labels=ids).loss
                loss.backward()
                opt.step()
                opt.zero_grad()
                pair.append(loss.item())
            losses.append(pair)
        print(json.dumps({"losses": losses, "half": half, "kernels": kernels.__file__}))
    """)
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    result = __import__("json").loads(done.stdout.strip().splitlines()[-1])
    assert "site-packages" in result["kernels"]
    (first_theirs, first_ours), *rest = result["losses"]
    assert abs(first_ours - first_theirs) <= 1e-6 * abs(first_theirs), result
    for theirs_loss, ours_loss in rest:
        assert abs(ours_loss - theirs_loss) <= 1e-4 * abs(theirs_loss), result
    for theirs_loss, ours_loss in result["half"]:  # bfloat16: equal but for a rare one-ulp norm output
        assert abs(ours_loss - theirs_loss) <= 1e-3 * abs(theirs_loss), result


def test_transformers_version_is_one_the_registry_was_read_against():
    """The listed classes exist in the installed transformers (a rename upstream shows up here)."""
    assert int(transformers.__version__.split(".")[0]) >= 5
    for path in LISTED:
        assert families.family_of(_class(path)) is not None, path


@pytest.mark.slow
def test_a_converted_transformers_model_compiles_fullgraph_in_a_fresh_process():
    """torch.compile(fullgraph=True) of a converted Llama, the first compile of a fresh process:
    no graph break, fastnorm's rms_norm ops in the graph, transformers' loss and gradients."""
    code = textwrap.dedent("""
        import copy, json, torch, fastnorm
        from transformers import LlamaConfig, LlamaForCausalLM
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2)
        theirs = LlamaForCausalLM(config)
        ours = fastnorm.nn.convert(copy.deepcopy(theirs), backend="numba")
        ids = torch.randint(0, 97, (2, 16))
        graphs = []
        def backend(gm, inputs):
            graphs.append(gm)
            return gm.forward
        torch.compile(copy.deepcopy(ours), fullgraph=True, backend=backend)(input_ids=ids, labels=ids)
        ops = sorted({str(n.target) for g in graphs for n in g.graph.nodes if "fastnorm" in str(n.target)})
        loss = torch.compile(ours, fullgraph=True)(input_ids=ids, labels=ids).loss
        loss.backward()
        want = theirs(input_ids=ids, labels=ids).loss
        want.backward()
        grads = max((p.grad - q.grad).abs().max().item() for p, q in zip(ours.parameters(), theirs.parameters()))
        print(json.dumps({"ops": ops, "loss": loss.item(), "want": want.item(), "grads": grads}))
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    result = __import__("json").loads(done.stdout.strip().splitlines()[-1])
    assert any("rms_norm" in op for op in result["ops"]), result
    assert abs(result["loss"] - result["want"]) <= 1e-6 * abs(result["want"]), result
    assert result["grads"] < 1e-5, result
