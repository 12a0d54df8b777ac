"""The C++ cuda ops' driver path (fastnorm/csrc/cuda_launch.cpp) against a stand-in CUDA driver.

Without a GPU nothing can run a kernel, but everything the C++ code asks of the driver can be
checked: tests/fake_libcuda.c exports the functions cuda_launch.cpp opens with dlopen
(``libcuda.so.1``) and records what it is given. In a fresh process that finds it first
(LD_LIBRARY_PATH), ``cuda_probe`` launches a kernel of the C++ kernel table without tensors: the
driver is initialised, the device's primary context retained and made current before the PTX
(compiled by kernels/fastnorm_kernels/numba_cuda/ptx.py for the compute capability the driver reports) is
loaded, the entry's name is the PTX's, the grid and block and every argument's bits reach
cuLaunchKernel as packed, a second launch reuses the loaded function, another device gets its own
context and module. What a GPU adds (the kernels' results, streams, graphs) is tests/gpu's.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
    pytest.skip("compiles PTX for a real GPU: runs outside the simulator", allow_module_level=True)

FAKE = Path(__file__).with_name("fake_libcuda.c")

SCRIPT = textwrap.dedent(
    """
    import ctypes, json, struct, sys, types
    import numba.cuda.api as api, numba.cuda.dispatcher as dispatcher

    fake = types.SimpleNamespace(compute_capability=(9, 0))  # numba-cuda asks a device; none here
    dispatcher.get_current_device = api.get_current_device = lambda: fake
    from fastnorm import _ops
    from fastnorm_kernels.numba_cuda import ptx

    module = _ops.load()
    out = {"unusable": module.cuda_unusable()}
    specs = module.cuda_kernels()
    index = [function for _, function, _ in specs].index("_finalize_eval")
    name, function, signature = specs[index]
    eps = struct.unpack("<q", struct.pack("<d", 1e-5))[0]
    bits = [0x1000, 0x2000, 0, 7, eps, 0x3000, 1, 0x4000, 0, 0x5000]  # aaKifababa
    driver = ctypes.CDLL("libcuda.so.1")  # the library the extension opened
    state = (ctypes.c_int64 * 64)()
    driver.fake_function.restype = ctypes.c_char_p
    runs = []
    for device in (0, 0, 1):
        module.cuda_probe(index, 0, device, (3, 2, 1), (256, 1, 1), bits)
        driver.fake_state(state)
        runs.append({"state": list(state[:13]), "params": list(state[13 : 13 + state[12]]),
                     "function": driver.fake_function().decode()})
    out.update(runs=runs, bits=bits, entry=ptx.kernel_ptx(name, function, signature, 0, 9, 0)[1])
    try:
        module.cuda_probe(index, 0, 0, (1, 1, 1), (1, 1, 1), bits[:-1])
    except Exception as exc:
        out["short"] = str(exc)
    print("RESULT", json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def fake_driver(tmp_path_factory):
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler to build the stand-in driver")
    directory = tmp_path_factory.mktemp("fake_cuda")
    subprocess.run([compiler, "-shared", "-fPIC", "-O1", "-o", str(directory / "libcuda.so.1"), str(FAKE)], check=True)
    return directory


def test_launches_reach_the_driver_as_packed(fake_driver, tmp_path):
    from fastnorm import _ops

    if _ops.load() is None:
        pytest.skip(f"fastnorm's C++ ops cannot be built here: {_ops.error()}")
    env = dict(os.environ, LD_LIBRARY_PATH=f"{fake_driver}:{os.environ.get('LD_LIBRARY_PATH', '')}",
               FASTNORM_PTX_CACHE=str(tmp_path / "ptx"))  # fmt: skip
    done = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[1])  # fmt: skip
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stderr[-3000:]
    out = json.loads(lines[0].removeprefix("RESULT "))
    assert out["unusable"] is None, "the stand-in driver opens and initialises"
    first, again, other = out["runs"]
    # state: initialised, modules loaded, launches, PTX had an entry, current context, grid, block, stream, count
    assert first["state"][:5] == [1, 1, 1, 1, 0x1000], "cuInit(0); device 0's primary context current, then PTX loaded"
    assert first["state"][5:11] == [3, 2, 1, 256, 1, 1], "grid and block"
    assert first["state"][11] == 0 and first["state"][12] == len(out["bits"]), "the stream given, every argument"
    assert first["params"] == out["bits"], "each argument's bits as packed"
    assert first["function"] == out["entry"], "the PTX entry's name"
    assert again["state"][1:3] == [1, 2], "a second launch reuses the loaded function"
    assert other["state"][1:3] == [2, 3] and other["state"][4] == 0x1001, "another device: its context, its module"
    assert "takes 10 arguments, 9 given" in out["short"]
