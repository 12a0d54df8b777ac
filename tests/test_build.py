"""The C++ ops are built once per source version and toolchain (fastnorm/_build.py): keyed
directories, one compile for processes starting together, nothing left running or half-written by
a killed build, a real cause for a failed one, and a wheel of the repository that works."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from fastnorm import _build, _ops

REPO = Path(__file__).resolve().parent.parent

# A tiny extension module (no torch headers: compiles in about a second), its header beside it.
TINY_HEADER = "#pragma once\n#define TINY_ANSWER 42\n"
TINY_SOURCE = textwrap.dedent("""
    #include <Python.h>
    #include "tiny.h"
    static struct PyModuleDef tiny = {PyModuleDef_HEAD_INIT, "tiny", nullptr, -1, nullptr};
    PyMODINIT_FUNC PyInit_tiny(void) {
      PyObject* m = PyModule_Create(&tiny);
      PyModule_AddIntConstant(m, "answer", TINY_ANSWER);
      return m;
    }
""")
# A slow one: torch's whole extension header (~20 s of compiler time), to be killed mid-build.
SLOW_SOURCE = "#include <torch/extension.h>\nPYBIND11_MODULE(slow, m) {}\n"

BUILD = """
import json, sys
from fastnorm import _build
library, compiled = _build.build(sys.argv[1], [sys.argv[2]], ())
module = _build.load_module(sys.argv[1], library)
print(json.dumps({"compiled": compiled, "answer": getattr(module, "answer", None), "library": str(library)}))
"""


def _sources(tmp_path: Path, name: str = "tiny", source: str = TINY_SOURCE) -> Path:
    folder = tmp_path / "src"
    folder.mkdir(exist_ok=True)
    (folder / "tiny.h").write_text(TINY_HEADER)
    (folder / f"{name}.cpp").write_text(source)
    return folder / f"{name}.cpp"


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("FASTNORM_OPS_CACHE", str(root))
    return root


def _build_in_subprocess(name: str, source: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", BUILD, name, str(source)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip


def test_the_key_follows_sources_headers_torch_and_flags(tmp_path, cache, monkeypatch):
    source = _sources(tmp_path)
    key = _build.build_key("tiny", [source], ["-O2"])
    assert key.startswith(f"tiny-{sys.implementation.cache_tag}-torch")
    assert _build.build_key("tiny", [source], ["-O2"]) == key  # deterministic
    assert _build.build_key("tiny", [source], ["-O3"]) != key
    (source.parent / "tiny.h").write_text(TINY_HEADER + "// edited\n")  # a header is a source too
    assert _build.build_key("tiny", [source], ["-O2"]) != key
    (source.parent / "tiny.h").write_text(TINY_HEADER)
    assert _build.build_key("tiny", [source], ["-O2"]) == key
    monkeypatch.setattr(torch, "__version__", "0.0.1")
    assert _build.build_key("tiny", [source], ["-O2"]) != key


def test_the_key_does_not_depend_on_the_environment_or_checkout(tmp_path, cache):
    """Another venv, PATH or copy of the same sources with the same torch builds the same library:
    it finds the first one's build (the extension's key ignores install paths)."""
    source = _sources(tmp_path)
    other = tmp_path / "elsewhere"
    other.mkdir()
    for f in source.parent.iterdir():
        (other / f.name).write_bytes(f.read_bytes())
    env = {**os.environ, "PATH": "/usr/bin:/bin", "VIRTUAL_ENV": "/nowhere", "FASTNORM_OPS_CACHE": str(cache)}
    code = "import sys; from fastnorm import _build; print(_build.build_key('tiny', [sys.argv[1]], ['-O2']))"
    keys = {
        subprocess.run(
            [sys.executable, "-c", code, str(s)], env=env, capture_output=True, text=True, check=True
        ).stdout.strip()  # fmt: skip
        for s in (source, other / source.name)
    }
    assert keys == {_build.build_key("tiny", [source], ["-O2"])}


def test_processes_starting_at_once_compile_once(tmp_path, cache):
    source = _sources(tmp_path)
    processes = [_build_in_subprocess("tiny", source) for _ in range(4)]
    results = []
    for p in processes:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert sum(r["compiled"] for r in results) == 1, results
    assert {r["answer"] for r in results} == {42}
    assert len({r["library"] for r in results}) == 1
    again = _build_in_subprocess("tiny", source)  # the next start compiles nothing
    out, err = again.communicate(timeout=120)
    assert json.loads(out.strip().splitlines()[-1])["compiled"] is False, err


def _compilers_under(path: Path) -> list[int]:
    """Live processes whose command line names ``path`` (the compilers of a build there)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = next(line for line in (proc / "status").read_text().splitlines() if line.startswith("State:"))
        except (OSError, StopIteration):
            continue
        if str(path) in cmdline and "Z" not in state.split()[1]:
            found.append(int(proc.name))
    return found


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG and /proc are Linux's")
def test_a_killed_build_leaves_no_compiler_and_no_library(tmp_path, cache):
    source = _sources(tmp_path, "slow", SLOW_SOURCE)
    building = _build_in_subprocess("slow", source)
    deadline = time.monotonic() + 120
    while not _compilers_under(cache) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _compilers_under(cache), "the build never started a compiler"
    time.sleep(1.0)
    building.kill()  # SIGKILL: no handler of the dying process runs
    building.wait()
    deadline = time.monotonic() + 20
    while _compilers_under(cache) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _compilers_under(cache) == [], "a compiler outlived its killed build"
    library = _build.library_path("slow", [source], ())
    assert not library.exists() and not library.parent.exists()
    assert list(cache.glob("*.building-*")), "the staging directory is where the killed build left it"
    # the next process builds afresh, removes the leftover and installs a complete library
    source.write_text(TINY_SOURCE.replace("tiny", "slow").replace('"slow.h"', '"tiny.h"'))
    out, err = _build_in_subprocess("slow", source).communicate(timeout=300)
    built = json.loads(out.strip().splitlines()[-1])
    assert built == {"compiled": True, "answer": 42, "library": str(_build.library_path("slow", [source], ()))}
    assert not list(cache.glob("*.building-*"))


def test_a_failed_build_names_its_cause(tmp_path, cache, monkeypatch):
    source = _sources(tmp_path, "broken", '#include "missing_header.h"\n')
    with pytest.raises(_build.BuildError, match=r"missing_header\.h: No such file or directory") as failure:
        _build.build("broken", [source], ())
    assert "whole log" in str(failure.value)
    assert not list(cache.glob("*.building-*")) and not _build.library_path("broken", [source], ()).exists()
    monkeypatch.setenv("CXX", "no-such-compiler")
    with pytest.raises(_build.BuildError, match="no C\\+\\+ compiler: 'no-such-compiler' is not on PATH"):
        _build.build("tiny", [_sources(tmp_path)], ())


def test_first_use_says_what_it_compiles(tmp_path, cache):
    said = []
    _build.build("tiny", [_sources(tmp_path)], (), say=said.append)
    assert said[0].startswith("compiling its C++ ops for first use") and "cached in" in said[0]
    assert said[1].startswith("C++ ops compiled in")
    said.clear()
    _build.build("tiny", [_sources(tmp_path)], (), say=said.append)
    assert said == []


@pytest.mark.slow
def test_a_wheel_of_the_repository_installed_in_a_fresh_venv_has_the_numba_ops(tmp_path):
    """``pip wheel .`` ships every source of the C++ ops (headers included); installed in a new
    environment (this one's torch and numba through a .pth, fastnorm only from the wheel, run
    outside the checkout), its numba backend works, and it reuses the library this environment
    built (the same sources and torch: the same key), compiling nothing."""
    assert _ops.load() is not None, _ops.error()  # this environment's build, as the first use makes it
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(wheels), str(REPO)], check=True, capture_output=True, timeout=600)  # fmt: skip
    (wheel,) = wheels.glob("fastnorm-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())  # fmt: skip
    ours = next(p for p in map(Path, sys.path) if p.name == "site-packages" and (p / "torch").is_dir())
    (site / "deps.pth").write_text(f"{ours}\n")  # torch, numba, ...: not fastnorm (its editable hook is not read)
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q", str(wheel)],
                   check=True, capture_output=True, timeout=600)  # fmt: skip
    code = textwrap.dedent("""
        import torch, fastnorm, fastnorm_kernels
        from fastnorm import _ops
        assert "site-packages" in fastnorm.__file__ and "site-packages" in fastnorm_kernels.__file__, fastnorm.__file__
        print("backends", fastnorm.backends())
        torch.manual_seed(0)
        x = torch.randn(5, 33)
        y = fastnorm.functional.layer_norm(x, (33,), backend="numba")
        torch.testing.assert_close(y, torch.nn.functional.layer_norm(x, (33,)))
        print("library", _ops.load().__file__)
    """)
    done = subprocess.run([python, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "'numba'" in done.stdout
    assert "compiling its C++ ops" not in done.stderr, done.stderr  # the first environment's build is reused
    assert f"library {_ops.load().__file__}" in done.stdout


def test_the_extension_loads_from_its_keyed_directory():
    module = _ops.load()
    assert module is not None, _ops.error()
    assert Path(module.__file__) == _build.library_path(_ops.NAME, _ops.SOURCES, _ops.CFLAGS)
