"""The C++ cuda ops on a real GPU (fastnorm/csrc/batch_norm_cuda.cpp, cuda_launch.cpp): BatchNorm
with backend="cuda" launched from C++ through the CUDA driver, on torch's current stream.

Checked here, where tests/cudasim cannot: the PTX loads and its kernels run on the device;
results equal, bit for bit, those of the Python launchers (the same kernels and grids); the ops
follow torch's current stream, are captured by CUDA graphs (no host synchronisation, no
allocation outside torch's allocator) and traced by torch.compile."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close

import fastnorm
from fastnorm import _dispatch, _ops
from fastnorm.autograd import batch_norm_function

DEV = torch.device("cuda")


@pytest.fixture(autouse=True, scope="module")
def _cpp_cuda_ops():
    if not _ops.cuda_available():
        pytest.fail(f"the C++ cuda ops cannot launch on this GPU machine: {_ops.cuda_unusable()}")


def _python_launchers(x, rm, rv, w, b, training):
    """The same BatchNorm through the Python launchers (kernels/fastnorm_kernels/numba_cuda/batchnorm.py)."""
    chosen = _dispatch.resolve("cuda", "batch_norm", x.device)
    return batch_norm_function(chosen, x, rm, rv, w, b, training, 0.1, 1e-5)


SAME_BITS_CASES = [((64, 256), None), ((1031, 67), None), ((4, 3, 5, 7), None), ((64, 64, 28, 28), None),
                   ((32, 64, 14, 14), torch.channels_last), ((8192, 2048), None)]  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape,fmt", SAME_BITS_CASES, ids=str)
def test_cpp_and_python_launches_give_the_same_bits(shape, fmt, dtype):
    c = shape[1]
    x = (torch.randn(shape, device=DEV) * 3 + 1).to(dtype)
    dy = torch.randn(shape, device=DEV).to(dtype)
    if fmt is not None:
        x, dy = x.to(memory_format=fmt), dy.to(memory_format=fmt)
    w = (torch.rand(c, device=DEV) + 0.5).requires_grad_()
    b = torch.randn(c, device=DEV).requires_grad_()
    outs = []
    for path in ("cpp", "python"):
        rm, rv = torch.zeros(c, device=DEV), torch.ones(c, device=DEV)
        xi = x.clone().requires_grad_()
        if path == "cpp":
            y = fastnorm.functional.batch_norm(xi, rm, rv, w, b, True, 0.1, 1e-5, backend="cuda")
            assert "fastnorm::BatchNormBackward" in y.grad_fn.name(), "the C++ op ran"
        else:
            y = _python_launchers(xi, rm, rv, w, b, True)
        grads = torch.autograd.grad(y, (xi, w, b), dy)
        outs.append((y, *grads, rm, rv))
    for name, ours, theirs in zip(["y", "dx", "dweight", "dbias", "running_mean", "running_var"], *outs):
        assert torch.equal(ours, theirs), f"{name}: C++ and Python launches differ"


def test_eval_and_stats_on_the_gpu():
    x = torch.randn(256, 64, 7, 7, device=DEV) * 2 - 1
    rm, rv = torch.randn(64, device=DEV), torch.rand(64, device=DEV) + 0.5
    y = fastnorm.functional.batch_norm(x, rm, rv, None, None, False, backend="cuda")
    assert_close(y, F.batch_norm(x, rm, rv, None, None, False), 1e-5, 1e-5, "eval y")
    mean, var = torch.ops.fastnorm.batch_norm_stats(x)
    assert_close(mean, x.double().mean((0, 2, 3)), 1e-9, 1e-9, "stats mean")
    assert_close(var, x.double().var((0, 2, 3), unbiased=False), 1e-9, 1e-9, "stats var")


def test_a_side_stream_and_a_second_device():
    bn = fastnorm.nn.BatchNorm1d(512, backend="cuda").to(DEV)
    x = torch.randn(4096, 512, device=DEV)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        y = bn(x * 2)  # the multiply and the C++ op's launches queue on `side`, in order
    torch.cuda.current_stream().wait_stream(side)
    assert_close(y, F.batch_norm(x * 2, None, None, training=True), 1e-4, 1e-4, "output on a side stream")
    if torch.cuda.device_count() > 1:  # the kernels load into each device's context
        other = torch.device("cuda", 1)
        bn1 = fastnorm.nn.BatchNorm1d(512, backend="cuda").to(other)
        x1 = x.to(other)
        assert_close(bn1(x1), F.batch_norm(x1, None, None, training=True), 1e-4, 1e-4, "device 1")


def test_captured_in_a_cuda_graph():
    """A BatchNorm forward+backward captured once and replayed on new data gives eager's values."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.BatchNorm2d(16)).to(DEV)
    fastnorm.nn.convert(model, backend="cuda")
    static_x = torch.randn(32, 8, 14, 14, device=DEV)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: the kernels load before capture
        for _ in range(2):
            model(static_x).square().mean().backward()
    torch.cuda.current_stream().wait_stream(side)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    graph = torch.cuda.CUDAGraph()
    model.zero_grad(set_to_none=False)
    with torch.cuda.graph(graph):
        static_loss = model(static_x).square().mean()
        static_loss.backward()
    new_x = torch.randn_like(static_x)
    model.load_state_dict(state)
    model.zero_grad(set_to_none=False)
    static_x.copy_(new_x)
    graph.replay()
    replayed = (static_loss.clone(), model[0].weight.grad.clone(), model[1].running_mean.clone())
    model.load_state_dict(state)
    model.zero_grad(set_to_none=False)
    loss = model(new_x).square().mean()
    loss.backward()
    assert_close(replayed[0], loss, 1e-5, 1e-6, "loss")
    assert_close(replayed[1], model[0].weight.grad, 1e-4, 1e-6, "conv weight grad")
    assert_close(replayed[2], model[1].running_mean, 1e-5, 1e-6, "running_mean")


def test_torch_compile_traces_the_cpp_op():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.BatchNorm1d(128), torch.nn.ReLU()).to(DEV)
    ref = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.BatchNorm1d(128), torch.nn.ReLU()).to(DEV)
    ref.load_state_dict(model.state_dict())
    fastnorm.nn.convert(model, backend="cuda")
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(256, 64, device=DEV)
    y = compiled(x)
    y.sum().backward()
    y_ref = ref(x)
    y_ref.sum().backward()
    assert_close(y, y_ref, 1e-4, 1e-5, "compiled y")
    assert_close(model[0].weight.grad, ref[0].weight.grad, 1e-3, 1e-4, "compiled linear grad")
    assert_close(model[1].running_var, ref[1].running_var, 1e-5, 1e-6, "compiled running_var")


def _adam_run(monkeypatch, through_op: bool, steps: int = 4):
    from fastnorm import optim

    cuda_op = optim._kernels._cuda_op if through_op else (lambda backend, tensors: False)
    monkeypatch.setattr(optim._kernels, "_cuda_op", cuda_op)
    torch.manual_seed(0)
    params = [torch.randn(s, device=DEV, requires_grad=True) for s in [(784, 256), (256,), (256, 10), (10,)]]
    opt = fastnorm.optim.Adam(params, lr=1e-2, weight_decay=0.01, amsgrad=True, backend="cuda")
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    return params, opt


def test_optimizer_steps_through_the_cpp_ops_give_the_python_launchers_bits(monkeypatch):
    ours, opt = _adam_run(monkeypatch, True)
    theirs, _ = _adam_run(monkeypatch, False)
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b), "C++ and Python launches differ"
    assert opt.state[ours[0]]["step"].device.type == "cpu", "host step counters, as torch's without capturable"


def test_sgd_steps_are_captured_in_a_cuda_graph_and_adam_refuses():
    torch.manual_seed(0)
    params = [torch.randn(s, device=DEV, requires_grad=True) for s in [(512, 300), (300,)]]
    ref = [p.detach().clone().requires_grad_() for p in params]
    opt = fastnorm.optim.SGD(params, lr=0.1, momentum=0.9, nesterov=True, backend="cuda")
    ref_opt = torch.optim.SGD(ref, lr=0.1, momentum=0.9, nesterov=True)
    grads = [torch.randn_like(p) for p in params]
    for p, r, g in zip(params, ref, grads):
        p.grad, r.grad = g.clone(), g.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: the momentum buffers and the address tables exist after it
        opt.step()
    torch.cuda.current_stream().wait_stream(side)
    ref_opt.step()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    for _ in range(3):
        graph.replay()
        ref_opt.step()
    for p, r in zip(params, ref):
        assert_close(p, r, 1e-5, 1e-6, "SGD parameter after graph replays")
    adam = fastnorm.optim.Adam(params, lr=1e-3, backend="cuda")
    adam.step()
    with pytest.raises(RuntimeError, match="cannot capture this step"):
        with torch.cuda.graph(torch.cuda.CUDAGraph()):
            adam.step()


def test_a_table_read_on_a_side_stream_outlives_its_eviction():
    """A step's address tables are torch-allocated and evicted after 1024 distinct ones. A table
    last read by a launch on another stream than its upload's must not be handed to a new
    allocation before that launch ran (optim_cuda.cpp records it on the stream, as record_stream)."""
    torch.manual_seed(0)
    p = torch.randn(70_001, device=DEV, requires_grad=True)
    r = p.detach().clone().requires_grad_()
    opt = fastnorm.optim.SGD([p], lr=0.1, momentum=0.9, backend="cuda")
    ref = torch.optim.SGD([r], lr=0.1, momentum=0.9)
    p.grad = torch.randn_like(p)
    r.grad = p.grad.clone()
    opt.step()  # uploads p's tables on the default stream
    ref.step()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(2_000_000_000)  # the side stream's step runs about a second from now
        opt.step()
    ref.step()
    # meanwhile, on the default stream: 1100 other tables evict p's and reuse freed memory
    others = [torch.zeros(1 + i % 7, device=DEV, requires_grad=True) for i in range(1100)]
    for q in others:
        q.grad = torch.ones_like(q)
        fastnorm.optim.SGD([q], lr=0.1, momentum=0.9, backend="cuda").step()
    torch.cuda.synchronize()
    assert_close(p, r, 1e-5, 1e-6, "the side stream's step after its tables were evicted")
    assert all(torch.allclose(q, torch.full_like(q, -0.1)) for q in others)


NORMS = [
    ("layer_norm", (4096, 768), None),
    ("rms_norm", (8, 128, 1000), None),
    ("group_norm", (32, 256, 28, 28), None),
    ("group_norm", (16, 64, 14, 14), torch.channels_last),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("op,shape,fmt", NORMS, ids=str)
def test_norms_through_the_cpp_ops_give_the_python_launchers_bits(monkeypatch, op, shape, fmt, dtype):
    from fastnorm import functional

    x = (torch.randn(shape, device=DEV) * 2 + 1).to(dtype)
    dy = torch.randn(shape, device=DEV).to(dtype)
    if fmt is not None:
        x, dy = x.to(memory_format=fmt), dy.to(memory_format=fmt)
    c = shape[1] if op == "group_norm" else shape[-1]
    w = (torch.rand(c, device=DEV) + 0.5).requires_grad_()
    b = torch.randn(c, device=DEV).requires_grad_()
    outs = []
    for through_op in (True, False):
        if not through_op:
            monkeypatch.setattr(functional, "_cuda_op", lambda name, input: False)
        xi = x.clone().requires_grad_()
        if op == "group_norm":
            y = functional.group_norm(xi, 32 if c % 32 == 0 else 8, w, b, backend="cuda")
        elif op == "layer_norm":
            y = functional.layer_norm(xi, [c], w, b, backend="cuda")
        else:
            y = functional.rms_norm(xi, [c], w, backend="cuda")
        assert ("fastnorm::" in y.grad_fn.name()) == through_op, y.grad_fn.name()
        inputs = (xi, w) if op == "rms_norm" else (xi, w, b)
        outs.append((y, *torch.autograd.grad(y, inputs, dy)))
    for name, ours, theirs in zip(["y", "dx", "dweight", "dbias"], *outs):
        assert torch.equal(ours, theirs), f"{op} {name}: C++ and Python launches differ"
