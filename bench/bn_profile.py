"""Where BatchNorm's CPU time goes: a byte-accounting profile per shape and layout (issue #17).

For each shape and memory layout it times, paired (providers interleaved in a shuffled order per
round, bench/paired.py), every pass of fastnorm's numba kernels from NumPy views of the tensors:

* ``stats``      one read of x: the per-channel sums (the forward's first pass);
* ``forward``    stats, then x read again and y written (normalise);
* ``bwd sums``   one read of dy and x: sum(dy), sum(dy * (x - mean));
* ``backward``   the sums, then dy and x read again and dx written;

each twice: ``hot`` (the pass repeated: its arrays in L2/L3 where they fit) and ``cold`` (a
buffer twice the L3 read in between, so the arrays come from DRAM). Next to each it prints the
pass's bytes and where they come from: the minimal traffic (first reads and the writes), the
re-reads and whether they can hit a cache (the planes layout re-reads channel blocks of
``BLOCK_BYTES`` from L3; the rows layout re-reads all of x), and the write-allocate reads of the
outputs (a store to a line not in cache reads it first: +4 B per float32 output element that the
in-place roofline does not pay). Then the whole BatchNorm module forward+backward against
torch's, interleaved and five calls back to back; the same for the kernels alone (``numba-kernels``
against ``torch-prealloc``, bench/bn_providers.py), whose difference from the module is fastnorm's
layer (the Python module, the op's dispatch and checks, autograd, buffer pool); and the roofline
measured in the same run: ``a += s*b`` in place over 200 MB arrays (12 B per element), and a plain read of 200 MB.

Usage: python bench/bn_profile.py [--rounds 15] [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numba
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bn_providers import kernels_fn, prealloc_fn  # noqa: E402
from paired import Ratio, Spread, paired, ratio  # noqa: E402

import fastnorm  # noqa: E402
import fastnorm_kernels.numba_cpu as nb  # noqa: E402
from fastnorm_kernels.numba_cpu import batchnorm as nb_bn  # noqa: E402

SHAPES = [  # (shape, channels_last, quick)
    ((1024, 1024), False, False),
    ((8192, 2048), False, True),
    ((64, 64, 28, 28), False, True),
    ((64, 64, 28, 28), True, True),
    ((32, 256, 14, 14), False, False),
    ((32, 256, 14, 14), True, False),
]
ROOF_N = 50_000_000  # 200 MB per float32 array


def cache_bytes(level: int) -> int:
    """Size of the level-``level`` data/unified cache of cpu0 (per instance), from sysfs."""
    base = Path("/sys/devices/system/cpu/cpu0/cache")
    for index in sorted(base.glob("index*")):
        try:
            if int((index / "level").read_text()) != level or (index / "type").read_text().strip() == "Instruction":
                continue
            size = (index / "size").read_text().strip()
        except OSError:
            continue
        unit = {"K": 1 << 10, "M": 1 << 20}.get(size[-1], 1)
        return int(size.rstrip("KM")) * unit
    return {2: 512 << 10, 3: 32 << 20}[level]


@numba.njit(parallel=True, error_model="numpy", cache=True)
def _inplace_axpy(a, s, b):  # a, b: (N,) float32
    for i in numba.prange(a.size):
        a[i] += s * b[i]


@numba.njit(parallel=True, fastmath={"reassoc"}, cache=True)
def _read(a):  # a: (N,) float32 -> its sum (a read stream)
    s = 0.0
    for i in numba.prange(a.size):
        s += a[i]
    return s


def roofline(rounds: int) -> dict:
    a, b = np.ones(ROOF_N, np.float32), np.full(ROOF_N, 0.5, np.float32)
    s = paired({"axpy": lambda: _inplace_axpy(a, np.float32(1e-3), b), "read": lambda: _read(a)}, rounds)
    axpy, read = Spread.of(s["axpy"]), Spread.of(s["read"])
    return {"inplace_axpy_GBs": 12 * ROOF_N / axpy.median / 1e9, "read_GBs": 4 * ROOF_N / read.median / 1e9}


def _kernel_view(t: torch.Tensor, channels_last: bool) -> np.ndarray:
    a = t.detach().numpy()
    if channels_last:
        a = np.moveaxis(a, 1, -1)
        return a.reshape(-1, a.shape[-1], 1)
    return a.reshape(a.shape[0], a.shape[1], -1)


def byte_plan(n: int, c: int, s: int, l3: int) -> dict[str, dict]:
    """Bytes per pass (float32): first reads, writes, re-reads and where they can come from,
    write-allocate reads."""
    e = n * c * s
    x_bytes = 4 * e
    if s > 1:  # planes: channel blocks sized for L3 (kernels/fastnorm_kernels/numba_cpu/batchnorm.py)
        reread = f"L3 (blocks of {nb_bn.BLOCK_BYTES >> 20} MB)"
    else:
        reread = "L3" if 2 * x_bytes <= l3 else "DRAM (rows: all of x before the second pass)"
    return {
        "stats": {"reads": x_bytes, "writes": 0, "rereads": 0, "reread_from": "-", "write_allocate": 0},
        "forward": {
            "reads": x_bytes,
            "writes": x_bytes,
            "rereads": x_bytes,
            "reread_from": reread,
            "write_allocate": x_bytes,
        },  # fmt: skip
        "bwd sums": {"reads": 2 * x_bytes, "writes": 0, "rereads": 0, "reread_from": "-", "write_allocate": 0},
        "backward": {
            "reads": 2 * x_bytes,
            "writes": x_bytes,
            "rereads": 2 * x_bytes,
            "reread_from": reread,
            "write_allocate": x_bytes,
        },  # fmt: skip
    }


def profile_shape(shape, channels_last: bool, rounds: int, roof: dict, l3: int) -> dict:
    torch.manual_seed(0)
    c = shape[1]
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = (torch.randn(shape) * 2 + 0.5).contiguous(memory_format=fmt)
    dy = torch.randn(shape).contiguous(memory_format=fmt)
    xn, dyn = _kernel_view(x, channels_last), _kernel_view(dy, channels_last)
    n_, c_, s_ = xn.shape
    y, dx = np.empty_like(xn), np.empty_like(xn)
    w, b = np.ones(c, np.float32), np.zeros(c, np.float32)
    rm, rv = np.zeros(c, np.float32), np.ones(c, np.float32)
    sm, si, dw, db = (np.empty(c, np.float32) for _ in range(4))
    m64, v64 = np.empty(c), np.empty(c)
    nb.batch_norm_forward_train(xn, w, b, rm, rv, 0.1, 1e-5, y, sm, si)
    passes = {
        "stats": lambda: nb.batch_norm_stats(xn, m64, v64),
        "forward": lambda: nb.batch_norm_forward_train(xn, w, b, rm, rv, 0.1, 1e-5, y, sm, si),
        "bwd sums": lambda: nb.batch_norm_backward(dyn, xn, sm, si, w, True, None, dw, db),
        "backward": lambda: nb.batch_norm_backward(dyn, xn, sm, si, w, True, dx, dw, db),
    }
    flush = np.ones(2 * l3 // 4, np.float32)
    hot = {k: Spread.of(v) for k, v in paired(passes, rounds).items()}
    cold = {k: Spread.of(v) for k, v in paired(passes, rounds, before=lambda: _read(flush)).items()}
    plan = byte_plan(n_, c_, s_, l3)
    rows = []
    for k in passes:
        p = plan[k]
        minimal = p["reads"] + p["writes"]
        rows.append({"pass": k, "hot_ms": hot[k].median * 1e3, "cold_ms": cold[k].median * 1e3,
                     "cold_iqr_ms": (cold[k].q1 * 1e3, cold[k].q3 * 1e3), **p,
                     "minimal_MB": minimal / 1e6, "cold_GBs_minimal": minimal / cold[k].median / 1e9})  # fmt: skip

    cls = torch.nn.BatchNorm1d if len(shape) == 2 else torch.nn.BatchNorm2d

    def module(backend):
        """One module forward+backward."""
        bn = cls(c) if backend == "torch" else getattr(fastnorm.nn, cls.__name__)(c, backend=backend)
        xg = x.detach().clone(memory_format=fmt).requires_grad_(True)

        def step():
            bn(xg).backward(dy)
            xg.grad = None

        return step

    providers = {"torch": module("torch"), "numba": module("numba"),
                 "torch-prealloc": prealloc_fn("forward_backward", x, dy),
                 "numba-kernels": kernels_fn("forward_backward", x, dy, channels_last)}  # fmt: skip
    mods = paired(providers, rounds)  # interleaved: each call after another provider's
    alone = paired(providers, rounds, inner=5)  # five calls back to back: its own state in cache
    r: Ratio = ratio(mods["torch"], mods["numba"])
    rk: Ratio = ratio(mods["torch-prealloc"], mods["numba-kernels"])
    numba_fb = Spread.of(mods["numba"])
    counted = 20 * x.numel()
    med = {k: Spread.of(v).median * 1e3 for k, v in mods.items()}
    med_alone = {k: Spread.of(v).median * 1e3 for k, v in alone.items()}
    return {
        "shape": list(shape), "layout": "channels_last" if channels_last else "contiguous", "passes": rows,
        "torch_ms": med["torch"], "numba_ms": med["numba"],
        "speedup": r.value, "speedup_ci": [r.low, r.high],
        "numba_GBs_counted": counted / numba_fb.median / 1e9,
        "percent_roofline": 100 * counted / numba_fb.median / 1e9 / roof["inplace_axpy_GBs"],
        "torch_prealloc_ms": med["torch-prealloc"], "numba_kernels_ms": med["numba-kernels"],
        "kernels_speedup": rk.value, "kernels_speedup_ci": [rk.low, rk.high],
        "back_to_back_ms": med_alone,
        "python_layer_ms": med["numba"] - med["numba-kernels"],
        "python_layer_back_to_back_ms": med_alone["numba"] - med_alone["numba-kernels"],
    }  # fmt: skip


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--quick", action="store_true", help="the three largest cases only")
    ap.add_argument("--json", type=Path, help="write the results here too")
    args = ap.parse_args(argv)
    l2, l3 = cache_bytes(2), cache_bytes(3)
    roof = roofline(max(5, args.rounds // 3))
    print(f"# BatchNorm CPU byte profile (float32, training): {torch.get_num_threads()} threads, L2 {l2 >> 10} KB "
          f"per core, L3 {l3 >> 20} MB, numba {numba.__version__}, torch {torch.__version__}")  # fmt: skip
    print(f"roofline: in-place a += s*b {roof['inplace_axpy_GBs']:.1f} GB/s (12 B/element), "
          f"read {roof['read_GBs']:.1f} GB/s; {args.rounds} rounds per provider, interleaved, medians\n")  # fmt: skip
    results = []
    for shape, cl, quick in SHAPES:
        if args.quick and not quick:
            continue
        res = profile_shape(shape, cl, args.rounds, roof, l3)
        results.append(res)
        print(f"## {tuple(shape)} {res['layout']}")
        print("| pass | hot ms | cold ms (IQR) | first reads MB | re-reads MB (from) | writes MB | write-allocate MB "
              "| cold GB/s of minimal bytes |")  # fmt: skip
        print("|---|---|---|---|---|---|---|---|")
        for p in res["passes"]:
            print(f"| {p['pass']} | {p['hot_ms']:.2f} | {p['cold_ms']:.2f} ({p['cold_iqr_ms'][0]:.2f}-"
                  f"{p['cold_iqr_ms'][1]:.2f}) | {p['reads'] / 1e6:.1f} | {p['rereads'] / 1e6:.1f} "
                  f"({p['reread_from']}) | {p['writes'] / 1e6:.1f} | {p['write_allocate'] / 1e6:.1f} "
                  f"| {p['cold_GBs_minimal']:.1f} |")  # fmt: skip
        print(f"\nmodule forward+backward: torch {res['torch_ms']:.2f} ms, numba {res['numba_ms']:.2f} ms: "
              f"{res['speedup']:.2f}x [{res['speedup_ci'][0]:.2f}-{res['speedup_ci'][1]:.2f}]; numba "
              f"{res['numba_GBs_counted']:.1f} GB/s counted (20 B/element) = {res['percent_roofline']:.0f}% "
              "of the in-place roofline")  # fmt: skip
        print(f"kernels alone (no module, no autograd): torch-prealloc {res['torch_prealloc_ms']:.2f} ms, "
              f"numba-kernels {res['numba_kernels_ms']:.2f} ms: {res['kernels_speedup']:.2f}x "
              f"[{res['kernels_speedup_ci'][0]:.2f}-{res['kernels_speedup_ci'][1]:.2f}]")  # fmt: skip
        b2b = res["back_to_back_ms"]
        print(f"fastnorm's layer (numba - numba-kernels): {res['python_layer_ms']:.2f} ms interleaved, "
              f"{res['python_layer_back_to_back_ms']:.2f} ms back to back (five calls in a row: numba "
              f"{b2b['numba']:.2f}, numba-kernels {b2b['numba-kernels']:.2f}, torch {b2b['torch']:.2f}, "
              f"torch-prealloc {b2b['torch-prealloc']:.2f} ms)\n", flush=True)  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({"roofline": roof, "l2": l2, "l3": l3, "results": results}, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    main()
