"""Whole training steps, as users run them: forward, cross-entropy, backward, Adam step.

Models: the book's MNIST MLP (784-256-128-10 with BatchNorm) at batch 64 and 256,
torchvision's ResNet-18 (10 classes) at batch 32 on 64x64 images, in the contiguous and the
channels-last layout (model and input converted with ``memory_format=torch.channels_last``), and
a pre-norm transformer block (:class:`Block`: LayerNorm, attention, RMSNorm, MLP; 16 sequences of
128 tokens of width 256), whose norms fastnorm converts too.

Providers, every one of a case timed side by side (conftest.compare), each in two modes:
``eager:`` the model as built, ``compiled:`` the model under ``torch.compile(model)`` (default
options; the first call, which compiles, is reported apart). The optimizer runs outside the
compiled model, as users write it:

* ``torch``: torch's BatchNorm, ``torch.optim.Adam`` (its default implementation: ``foreach``
  on GPU, the for-loop on CPU);
* ``torch-fused``: torch's BatchNorm, ``Adam(fused=True)``;
* ``torch-compiled``: torch's BatchNorm, default Adam with its ``step`` under ``torch.compile``;
* ``fastnorm-numba``: every BatchNorm converted with ``fastnorm.nn.convert(model, "numba")``,
  ``fastnorm.optim.Adam(backend="numba")``;
* ``fastnorm-auto``: the same with ``backend="auto"`` (what fastnorm picks here per op and size);
* ``fastnorm-cuda``: the same with ``backend="cuda"`` (GPUs only: the C++ ops launching the
  numba-cuda kernels).

A Hugging Face Llama-style model (:func:`build_llama`: ``transformers.LlamaConfig``, random init,
4 layers of hidden 512, vocabulary 8192; 8 sequences of 256 tokens, next-token loss), in float32
and under bfloat16 autocast, has its own providers (:data:`LLAMA_VARIANTS`): torch's AdamW (default
and fused) against ``fastnorm.nn.convert`` (its RMSNorms on fastnorm's kernels with Llama's
semantics, fastnorm/families.py) with fastnorm's AdamW (numba, auto), and fastnorm's AdamW alone.

Bytes are not meaningful here (convolutions and matmuls dominate): the report shows times,
speedups against the best torch provider (of all modes, and of the provider's own mode) and
each provider's peak memory during one step (conftest.peak_memory).
"""

from __future__ import annotations

import pytest
import torch
from conftest import compare, provider_skip_reason
from test_bench_optim import step_fn

import fastnorm
from fastnorm.book.models import SimpleNN

#: (id, model, batch, image size, channels_last, quick)
CASES = [
    ("mlp-b64", "mlp", 64, 28, False, True),
    ("mlp-b256", "mlp", 256, 28, False, False),
    ("resnet18-b32-64x64", "resnet18", 32, 64, False, False),
    ("resnet18-b32-64x64-channels_last", "resnet18", 32, 64, True, False),
    ("block-b16x128x256", "block", 16, 128, False, False),
]
#: optimizer variant -> (BatchNorm backend, optimizer factory)
VARIANTS = {
    "torch": ("torch", lambda ps: torch.optim.Adam(ps, lr=1e-3)),
    "torch-fused": ("torch", lambda ps: torch.optim.Adam(ps, lr=1e-3, fused=True)),
    "torch-compiled": ("torch", lambda ps: torch.optim.Adam(ps, lr=1e-3)),
    "fastnorm-numba": ("numba", lambda ps: fastnorm.optim.Adam(ps, lr=1e-3, backend="numba")),
    "fastnorm-auto": ("auto", lambda ps: fastnorm.optim.Adam(ps, lr=1e-3, backend="auto")),
    "fastnorm-cuda": ("cuda", lambda ps: fastnorm.optim.Adam(ps, lr=1e-3, backend="cuda")),
}
MODES = ("eager", "compiled")

# every compiled model is a recompilation of the same forward (guarded on the module): past
# dynamo's default limit (8) the rest would silently run eagerly
for _limit, _value in (("recompile_limit", 512), ("cache_size_limit", 512), ("accumulated_recompile_limit", 8192),
                       ("accumulated_cache_size_limit", 8192)):  # fmt: skip
    if hasattr(torch._dynamo.config, _limit):
        setattr(torch._dynamo.config, _limit, _value)


class Block(torch.nn.Module):
    """A pre-norm transformer block and a classifier head: x + attn(LayerNorm(x)), then
    x + MLP(RMSNorm(x)), mean over tokens, Linear to 10 classes. Input (batch, tokens, width)."""

    def __init__(self, width: int = 256, heads: int = 4, classes: int = 10) -> None:
        super().__init__()
        self.norm1 = torch.nn.LayerNorm(width)
        self.attn = torch.nn.MultiheadAttention(width, heads, batch_first=True)
        self.norm2 = torch.nn.RMSNorm(width)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(width, 4 * width), torch.nn.GELU(),
                                       torch.nn.Linear(4 * width, width))  # fmt: skip
        self.head = torch.nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        x = x + self.mlp(self.norm2(x))
        return self.head(x.mean(1))


BLOCK_WIDTH = 256


def build_model(model: str, channels_last: bool) -> torch.nn.Module:
    """The case's model with torch's norms, from seed 0 (every provider starts from the same weights)."""
    torch.manual_seed(0)
    if model == "mlp":
        return SimpleNN(use_batch_norm=True, backend="torch")
    if model == "block":
        return Block(BLOCK_WIDTH)
    import torchvision

    net = torchvision.models.resnet18(num_classes=10)
    return net.to(memory_format=torch.channels_last) if channels_last else net


def make_step(model_name: str, batch: int, size: int, channels_last: bool, variant: str, mode: str,
              device: torch.device):  # fmt: skip
    """One provider's training step (a closure over its own model, optimizer and batch)."""
    bn, make_opt = VARIANTS[variant]
    model = build_model(model_name, channels_last).to(device)
    if bn != "torch":
        model = fastnorm.nn.convert(model, backend=bn)
    opt = make_opt(model.parameters())
    opt_step = step_fn(opt, variant)
    forward = torch.compile(model) if mode == "compiled" else model
    gen = torch.Generator().manual_seed(1)
    if model_name == "mlp":
        x = torch.randn(batch, 1, 28, 28, generator=gen)
    elif model_name == "block":
        x = torch.randn(batch, size, BLOCK_WIDTH, generator=gen)  # size: tokens per sequence
    else:
        x = torch.randn(batch, 3, size, size, generator=gen)
        if channels_last:
            x = x.to(memory_format=torch.channels_last)
    x = x.to(device)
    target = torch.randint(0, 10, (batch,), generator=gen).to(device)
    loss_fn = torch.nn.CrossEntropyLoss()

    def step():
        opt.zero_grad(set_to_none=True)
        loss_fn(forward(x), target).backward()
        opt_step()

    return step


#: the Llama-style cases: (id, autocast to bfloat16)
LLAMA_CASES = [("llama-h512-l4-b8x256", False), ("llama-h512-l4-b8x256-bf16-autocast", True)]
#: provider -> (norm backend: None keeps transformers' RMSNorm, optimizer factory)
LLAMA_VARIANTS = {
    "torch": (None, lambda ps: torch.optim.AdamW(ps, lr=1e-4)),
    "torch-fused": (None, lambda ps: torch.optim.AdamW(ps, lr=1e-4, fused=True)),
    "fastnorm-optim-only": (None, lambda ps: fastnorm.optim.AdamW(ps, lr=1e-4, backend="numba")),
    "fastnorm-numba": ("numba", lambda ps: fastnorm.optim.AdamW(ps, lr=1e-4, backend="numba")),
    "fastnorm-auto": ("auto", lambda ps: fastnorm.optim.AdamW(ps, lr=1e-4, backend="auto")),
}


def build_llama(layers: int = 4, hidden: int = 512, vocab: int = 8192) -> torch.nn.Module:
    """A Llama-style causal LM from ``transformers.LlamaConfig`` with random weights from seed 0."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 8 // 3 // 16 * 16,
                         num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=8,
                         max_position_embeddings=1024)  # fmt: skip
    return LlamaForCausalLM(config)


def make_llama_step(variant: str, mode: str, autocast: bool, device: torch.device, batch: int = 8,
                    tokens: int = 256):  # fmt: skip
    """One provider's training step of the Llama-style model (closure over its model and optimizer)."""
    norms, make_opt = LLAMA_VARIANTS[variant]
    model = build_llama().to(device)
    if norms is not None:
        model = fastnorm.nn.convert(model, backend=norms)
    opt = make_opt(model.parameters())
    forward = torch.compile(model) if mode == "compiled" else model
    ids = torch.randint(0, model.config.vocab_size, (batch, tokens), generator=torch.Generator().manual_seed(1))
    ids = ids.to(device)

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = forward(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()

    return step


@pytest.mark.parametrize("autocast", [a for _, a in LLAMA_CASES], ids=[c for c, _ in LLAMA_CASES])
def test_llama_training_step(benchmark, request, device, budget, autocast):
    wanted = [p for p in request.config.getoption("--bench-providers").split(",") if p]
    providers = {}
    for mode in MODES:
        for variant, (norms, _) in LLAMA_VARIANTS.items():
            name = f"{mode}:{variant}"
            why = None
            if wanted and not {name, variant} & set(wanted):
                why = f"provider {variant!r} not selected (--bench-providers)"
            elif mode == "compiled" and benchmark.disabled:
                why = "torch.compile of the model takes minutes here: compiled in the timed run only"
            elif variant.startswith("fastnorm"):
                backend = "numba" if variant == "fastnorm-optim-only" else norms
                why = provider_skip_reason(backend, "rms_norm", device) or provider_skip_reason(
                    backend, "AdamW", device
                )
            providers[name] = why or make_llama_step(variant, mode, autocast, device)
    case = request.node.callspec.id
    compare(benchmark, request, providers, device=device, budget=budget, op="e2e_training_step", case=case,
            bytes_moved=0, memory=True, model="llama", batch=8)  # fmt: skip


def _params():
    for cid, model, batch, size, channels_last, quick in CASES:
        marks = [pytest.mark.quick] if quick else []
        yield pytest.param(model, batch, size, channels_last, marks=marks, id=cid)


@pytest.mark.parametrize("model,batch,size,channels_last", list(_params()))
def test_training_step(benchmark, request, device, budget, model, batch, size, channels_last):
    if model == "resnet18":
        pytest.importorskip("torchvision")
    wanted = [p for p in request.config.getoption("--bench-providers").split(",") if p]
    providers = {}
    for mode in MODES:
        for variant, (bn, _) in VARIANTS.items():
            name = f"{mode}:{variant}"
            why = None
            if wanted and not {name, variant} & set(wanted):
                why = f"provider {variant!r} not selected (--bench-providers)"
            elif bn != "torch":
                why = provider_skip_reason(bn, "batch_norm", device) or provider_skip_reason(bn, "Adam", device)
            providers[name] = why or make_step(model, batch, size, channels_last, variant, mode, device)
    case = request.node.callspec.id
    compare(benchmark, request, providers, device=device, budget=budget, op="e2e_training_step", case=case,
            bytes_moved=0, memory=True, model=model, batch=batch)  # fmt: skip
