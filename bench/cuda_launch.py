"""BatchNorm on a GPU through the C++ cuda ops against cuDNN and the Python launchers (issue #30).

Run by bench/gpu_check.sh (``python bench/cuda_launch.py [OUT.md]``); needs a CUDA GPU. Three
tables, every provider measured in the same interleaved rounds (medians over rounds, after
warm-up; the first calls, which compile or load the kernels, are timed apart):

1. training forward+backward wall time per step (CUDA events around 20 steps), with
   autograd, at the suite's GPU shapes: torch's module (cuDNN), fastnorm's module on the C++
   ops (``cpp``) and on the Python launchers (``python``: kernels/fastnorm_kernels/numba_cuda/batchnorm.py through
   fastnorm/autograd.py), and cpp / torch;
2. host time per op call: the training forward op alone (``torch.ops.fastnorm.batch_norm_forward``
   against ``torch.ops.aten.native_batch_norm``, and the Python launchers' forward), queued 200 times
   without synchronisation at a small size, so the host is the bottleneck: wall / calls;
3. LayerNorm / RMSNorm / GroupNorm forward+backward at the CPU suite's sizes: torch's (ATen),
   fastnorm's through the C++ ops and through the Python launchers;
4. an Adam step of the book's MLP (host-bound): torch fused and foreach, fastnorm through the
   C++ op and through the Python launcher;
5. device time of a CUDA-graph replay of forward+backward (no host work at all): the kernels
   themselves, cpp against torch.
"""

from __future__ import annotations

import statistics
import sys
import time

import torch
import torch.nn.functional as F

import fastnorm
from fastnorm import _dispatch, _ops
from fastnorm.autograd import batch_norm_function

DEV = torch.device("cuda")
SHAPES = [((64, 256), None), ((8192, 2048), None), ((64, 256, 28, 28), None), ((256, 64, 56, 56), None),
          ((32, 64, 14, 14), torch.channels_last)]  # fmt: skip
ROUNDS, STEPS = 15, 20


def _step_fn(provider, shape, fmt):
    c = shape[1]
    x = torch.randn(shape, device=DEV)
    if fmt is not None:
        x = x.to(memory_format=fmt)
    x.requires_grad_()
    dy = torch.randn_like(x)
    if provider == "torch":
        bn = (torch.nn.BatchNorm1d if len(shape) == 2 else torch.nn.BatchNorm2d)(c).to(DEV)
        return lambda: bn(x).backward(dy)
    cls = fastnorm.nn.BatchNorm1d if len(shape) == 2 else fastnorm.nn.BatchNorm2d
    bn = cls(c, backend="cuda").to(DEV)
    if provider == "cpp":
        return lambda: bn(x).backward(dy)
    chosen = _dispatch.resolve("cuda", "batch_norm", DEV)
    return lambda: batch_norm_function(chosen, x, bn.running_mean, bn.running_var, bn.weight, bn.bias, True, 0.1,
                                       1e-5).backward(dy)  # fmt: skip


def _time_events(fn, steps=STEPS) -> float:
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(steps):
        fn()
    stop.record()
    stop.synchronize()
    return start.elapsed_time(stop) * 1e3 / steps  # us per step


def _interleaved(fns: dict, rounds=ROUNDS, timer=_time_events) -> dict:
    first = {}
    for name, fn in fns.items():
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        first[name] = time.perf_counter() - t
    for fn in fns.values():  # warm-up
        timer(fn)
    samples = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            samples[name].append(timer(fn))
    return {name: statistics.median(v) for name, v in samples.items()}, first


def _host_time(fn, calls=200) -> float:
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - t
    torch.cuda.synchronize()
    return elapsed * 1e6 / calls


def _graph_fn(provider, shape, fmt):
    step = _step_fn(provider, shape, fmt)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


NORM_CASES = [("layer_norm", (4096, 768), None), ("layer_norm", (8192, 4096), None), ("rms_norm", (4096, 768), None),
              ("rms_norm", (8192, 4096), None), ("group_norm", (32, 256, 28, 28), None),
              ("group_norm", (32, 256, 28, 28), torch.channels_last)]  # fmt: skip


def _norm_step(provider: str, op: str, shape, fmt):
    from fastnorm import functional

    x = torch.randn(shape, device=DEV)
    if fmt is not None:
        x = x.to(memory_format=fmt)
    x.requires_grad_()
    dy = torch.randn_like(x)
    c = shape[1] if op == "group_norm" else shape[-1]
    w = torch.ones(c, device=DEV, requires_grad=True)
    b = torch.zeros(c, device=DEV, requires_grad=True)
    backend = "torch" if provider == "torch" else "cuda"
    call = {
        "layer_norm": lambda: functional.layer_norm(x, [c], w, b, backend=backend),
        "rms_norm": lambda: functional.rms_norm(x, [c], w, backend=backend),
        "group_norm": lambda: functional.group_norm(x, 32, w, b, backend=backend),
    }[op]
    if provider != "python":
        return lambda: call().backward(dy)

    def python_launch():
        saved, functional._cuda_op = functional._cuda_op, lambda name, input: False
        try:
            call().backward(dy)
        finally:
            functional._cuda_op = saved

    return python_launch


def _adam_step(provider: str):
    from fastnorm import optim

    params = [torch.randn(s, device=DEV, requires_grad=True) for s in [(784, 256), (256,), (256, 128), (128,),
                                                                        (128, 10), (10,)]]  # fmt: skip
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    if provider in ("fused", "foreach"):
        opt = torch.optim.Adam(params, lr=1e-3, **{provider: True})
        return opt.step
    opt = fastnorm.optim.Adam(params, lr=1e-3, backend="cuda")
    if provider == "cpp":
        return opt.step

    def python_launch():  # the Python launcher (kernels/fastnorm_kernels/numba_cuda/optim.py) for this step
        saved, optim._kernels._cuda_op = optim._kernels._cuda_op, lambda backend, tensors: False
        try:
            opt.step()
        finally:
            optim._kernels._cuda_op = saved

    return python_launch


def main(out: str | None) -> None:
    if not _ops.cuda_available():
        raise SystemExit(f"the C++ cuda ops cannot launch here: {_ops.cuda_unusable()}")
    lines = [f"# BatchNorm on {torch.cuda.get_device_name()}: C++ cuda ops, Python launchers, cuDNN", "",
             f"torch {torch.__version__}; medians of {ROUNDS} interleaved rounds of {STEPS} steps (CUDA events)", "",
             "## training forward+backward, us per step (with autograd)", "",
             "| shape | torch (cuDNN) | cpp | python | cpp / torch | python / torch | first call cpp (s) |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for shape, fmt in SHAPES:
        fns = {p: _step_fn(p, shape, fmt) for p in ("torch", "cpp", "python")}
        med, first = _interleaved(fns)
        label = "x".join(map(str, shape)) + ("-channels_last" if fmt is not None else "")
        ratios = f"{med['cpp'] / med['torch']:.2f}x | {med['python'] / med['torch']:.2f}x"
        lines.append(f"| {label} | {med['torch']:.1f} | {med['cpp']:.1f} | {med['python']:.1f} | {ratios} | "
                     f"{first['cpp']:.2f} |")  # fmt: skip
        print(lines[-1], flush=True)

    lines += ["", "## host time per training-forward op call, us (200 calls queued, (64, 256))", "",
              "| aten::native_batch_norm | fastnorm::batch_norm_forward (C++) | Python launchers' forward |",
              "|---|---|---|"]  # fmt: skip
    x = torch.randn(64, 256, device=DEV)
    w, b = torch.ones(256, device=DEV), torch.zeros(256, device=DEV)
    rm, rv = torch.zeros(256, device=DEV), torch.ones(256, device=DEV)
    chosen = _dispatch.resolve("cuda", "batch_norm", DEV)
    fns = {
        "aten": lambda: torch.ops.aten.native_batch_norm(x, w, b, rm, rv, True, 0.1, 1e-5),
        "cpp": lambda: torch.ops.fastnorm.batch_norm_forward(x, w, b, rm, rv, True, 0.1, 1e-5),
        "python": lambda: batch_norm_function(chosen, x, rm, rv, w, b, True, 0.1, 1e-5),
    }
    with torch.no_grad():
        med, _ = _interleaved(fns, timer=_host_time)
    lines.append(f"| {med['aten']:.1f} | {med['cpp']:.1f} | {med['python']:.1f} |")
    print(lines[-1], flush=True)

    lines += ["", "## LayerNorm / RMSNorm / GroupNorm forward+backward, us per step (with autograd)", "",
              "| case | torch | cpp | python | cpp / torch | python / torch |",
              "|---|---|---|---|---|---|"]  # fmt: skip
    for case in NORM_CASES:
        fns = {p: _norm_step(p, *case) for p in ("torch", "cpp", "python")}
        med, _ = _interleaved(fns)
        op, shape, fmt = case
        label = f"{op} " + "x".join(map(str, shape)) + ("-channels_last" if fmt is not None else "")
        lines.append(f"| {label} | {med['torch']:.1f} | {med['cpp']:.1f} | {med['python']:.1f} | "
                     f"{med['cpp'] / med['torch']:.2f}x | {med['python'] / med['torch']:.2f}x |")  # fmt: skip
        print(lines[-1], flush=True)

    lines += ["", "## Adam step of the book's MLP (784-256-128-10, 235K parameters), us per step", "",
              "| torch fused | torch foreach | fastnorm cpp | fastnorm python | cpp / fused |",
              "|---|---|---|---|---|"]  # fmt: skip
    fns = {name: _adam_step(name) for name in ("fused", "foreach", "cpp", "python")}
    med, _ = _interleaved(fns)
    lines.append(f"| {med['fused']:.1f} | {med['foreach']:.1f} | {med['cpp']:.1f} | {med['python']:.1f} | "
                 f"{med['cpp'] / med['fused']:.2f}x |")  # fmt: skip
    print(lines[-1], flush=True)

    lines += ["", "## CUDA-graph replay of forward+backward, us (device time: no host work)", "",
              "| shape | torch (cuDNN) | cpp | cpp / torch |", "|---|---|---|---|"]  # fmt: skip
    for shape, fmt in SHAPES:
        fns = {p: _graph_fn(p, shape, fmt) for p in ("torch", "cpp")}
        med, _ = _interleaved(fns)
        label = "x".join(map(str, shape)) + ("-channels_last" if fmt is not None else "")
        lines.append(f"| {label} | {med['torch']:.1f} | {med['cpp']:.1f} | {med['cpp'] / med['torch']:.2f}x |")
        print(lines[-1], flush=True)
    ref = F.batch_norm(x, None, None, w, b, True)
    assert torch.allclose(torch.ops.fastnorm.batch_norm_forward(x, w, b, None, None, True, 0.1, 1e-5)[0], ref,
                          atol=1e-4, rtol=1e-4)  # fmt: skip
    text = "\n".join(lines) + "\n"
    if out:
        with open(out, "w") as handle:
            handle.write(text)
    print(text)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
