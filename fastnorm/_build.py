"""Build a C++ extension once per source version and toolchain, and share it safely.

torch's ``cpp_extension.load`` builds into one directory per extension name
(``~/.cache/torch_extensions/<py>_<cu>/<name>``), shared by every environment and checkout, and
rebuilds whenever the flags or include paths differ from the last build there: two environments
on one machine rebuild each other's. Here every build lands in a directory named by a key of
everything that changes the binary, so a build is reused by every process and environment that
would produce the same one, and never overwritten by another:

    key = sha256(every file of the sources' folder (sources and headers), torch's version and
                 git revision, its C++ ABI flag, Python's cache tag and extension suffix, the
                 machine, the compile flags, $CXX)
    <cache>/<name>-<python>-torch<version>-<key[:16]>/<name>.so        (cache: FASTNORM_OPS_CACHE,
                                                                       else ~/.cache/fastnorm/ops)

A missing library is built under an OS lock (``flock``: released when its holder dies, however
it dies), so processes starting at once compile once and the others wait for it. The compiler
runs in a builder process of its own process group that kills the group when its parent dies
(``PR_SET_PDEATHSIG``): a killed build leaves no compiler running. It builds into a staging
directory that is renamed into place only when the library is complete, so no process ever
loads a half-written library; the next build removes a dead one's staging directory.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType

import torch

#: how long a process waits for another process's build of the same library before it gives up
BUILD_WAIT_SECONDS = 600


class BuildError(RuntimeError):
    """The extension could not be built; the message names the cause (a missing tool, or the
    compiler's first errors) and where the whole log is."""


def cache_root() -> Path:
    """Where built libraries are kept: ``$FASTNORM_OPS_CACHE``, else ``$XDG_CACHE_HOME/fastnorm/ops``
    (``~/.cache/fastnorm/ops``)."""
    if os.environ.get("FASTNORM_OPS_CACHE"):
        return Path(os.environ["FASTNORM_OPS_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fastnorm" / "ops"


def build_key(name: str, sources: Sequence[Path], cflags: Sequence[str]) -> str:
    """The directory name of the library that ``sources`` (with every other file of their
    folders: the headers they include) build into with this torch, Python and flags."""
    digest = hashlib.sha256()
    folders = sorted({Path(s).resolve().parent for s in sources})
    inputs = sorted({p for folder in folders for p in folder.iterdir() if p.suffix in (".cpp", ".h", ".c", ".hpp")})
    inputs += [Path(s).resolve() for s in sources if Path(s).resolve() not in inputs]
    for path in inputs:
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    toolchain = {
        "torch": torch.__version__,
        "torch_git": getattr(torch.version, "git_version", ""),
        "cxx11_abi": bool(torch._C._GLIBCXX_USE_CXX11_ABI),
        "python": sys.implementation.cache_tag,
        "ext_suffix": sysconfig.get_config_var("EXT_SUFFIX"),
        "machine": platform.machine(),
        "cflags": list(cflags),
        "cxx": os.environ.get("CXX", "c++"),
        "sources": [Path(s).name for s in sources],
    }
    digest.update(json.dumps(toolchain, sort_keys=True).encode())
    version = re.sub(r"[^0-9A-Za-z.]", "_", torch.__version__)
    return f"{name}-{sys.implementation.cache_tag}-torch{version}-{digest.hexdigest()[:16]}"


def library_path(name: str, sources: Sequence[Path], cflags: Sequence[str]) -> Path:
    """Where the library of ``sources`` lies once built (it may not be there yet)."""
    return cache_root() / build_key(name, sources, cflags) / f"{name}.so"


def build(
    name: str, sources: Sequence[Path], cflags: Sequence[str] = (), say: Callable[[str], None] | None = None
) -> tuple[Path, bool]:
    """The path of the built library of ``sources`` and whether this call compiled it (False: it
    was on disk, or another process built it meanwhile). ``say`` is told before a build starts and
    when it ends. Raises :class:`BuildError` naming the cause of a failed build."""
    library = library_path(name, sources, cflags)
    if library.is_file():
        return library, False
    root, key = library.parent.parent, library.parent.name
    root.mkdir(parents=True, exist_ok=True)
    with _exclusive(root / f"{key}.lock", f"another process has been building {library.parent}"):
        if library.is_file():
            return library, False
        _remove_dead_builds(root, key)
        _check_tools()
        if say is not None:
            say(f"compiling its C++ ops for first use (~2 min on 2 cores, cached in {library.parent})")
        started = time.perf_counter()
        staging = Path(tempfile.mkdtemp(prefix=f"{key}.building-", dir=root))
        try:
            _run_builder(name, sources, cflags, staging, root / f"{key}.log")
            if library.parent.exists():  # emptied by hand: nothing loads from it
                shutil.rmtree(library.parent)
            staging.rename(library.parent)  # atomic: the library appears complete or not at all
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        if say is not None:
            say(f"C++ ops compiled in {time.perf_counter() - started:.0f} s")
    return library, True


def _remove_dead_builds(root: Path, held: str) -> None:
    """Remove the staging directories of builds that died (of any source version: those whose
    lock nobody holds; ``held``'s is this process's)."""
    for staging in root.glob("*.building-*"):
        key = staging.name.split(".building-")[0]
        if key == held:
            shutil.rmtree(staging, ignore_errors=True)
            continue
        with contextlib.suppress(TimeoutError), _exclusive(root / f"{key}.lock", "", wait=False):
            shutil.rmtree(staging, ignore_errors=True)


def load_module(name: str, library: Path) -> ModuleType:
    """Import a built extension module (its ops registered with torch's dispatcher as it loads)."""
    spec = importlib.util.spec_from_file_location(name, library)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def _exclusive(path: Path, waiting: str, wait: bool = True):
    """An exclusive ``flock`` on ``path`` (released by the OS when its holder dies), waited for at
    most BUILD_WAIT_SECONDS (``wait``; else not at all) before TimeoutError. Where there is no
    fcntl (Windows): no lock."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(path, "a") as handle:
        deadline = time.monotonic() + BUILD_WAIT_SECONDS
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not wait or time.monotonic() > deadline:
                    raise TimeoutError(f"{waiting} for {BUILD_WAIT_SECONDS} s") from None
                time.sleep(0.2)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _tool_path() -> str:
    """PATH with the ninja wheel's binary (off PATH when the venv is not activated)."""
    path = os.environ.get("PATH", "")
    if shutil.which("ninja") is None:
        with contextlib.suppress(ImportError):
            import ninja

            return ninja.BIN_DIR + os.pathsep + path
    return path


def _check_tools() -> None:
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        raise BuildError(f"no C++ compiler: {cxx!r} is not on PATH (install g++, or set CXX)")
    if shutil.which("ninja", path=_tool_path()) is None:
        raise BuildError("ninja is not installed (pip install ninja)")


# The builder process: its own process group, killed whole when its parent dies.
_BUILDER = r"""
import ctypes, json, os, signal, sys
args = json.loads(sys.argv[1])
signal.signal(signal.SIGTERM, lambda *_: os.killpg(0, signal.SIGKILL))
ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
if os.getppid() != args["parent"]:
    os.killpg(0, signal.SIGKILL)
import logging
logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # "no CUDA runtime": a CPU build
from torch.utils import cpp_extension
cpp_extension.load(args["name"], args["sources"], extra_cflags=args["cflags"], build_directory=args["directory"],
                   verbose=True)
"""


def _run_builder(name: str, sources: Sequence[Path], cflags: Sequence[str], directory: Path, log: Path) -> None:
    payload = {"name": name, "sources": [str(s) for s in sources], "cflags": list(cflags),
               "directory": str(directory), "parent": os.getpid()}  # fmt: skip
    env = {**os.environ, "PATH": _tool_path()}
    process = subprocess.Popen(
        [sys.executable, "-c", _BUILDER, json.dumps(payload)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
        start_new_session=True, text=True, errors="replace",
    )  # fmt: skip
    try:
        output, _ = process.communicate()
    except BaseException:  # interrupted: the compilers go with it
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        raise
    log.write_text(output)
    if process.returncode != 0:
        raise BuildError(f"building {name} failed: {_cause(output, process.returncode)} (whole log: {log})")


def _cause(output: str, returncode: int) -> str:
    """The compiler's first error lines, else the builder's last words."""
    lines = [line.strip() for line in output.splitlines()]
    errors = [line for line in lines if re.search(r"\b(fatal )?error\b:", line) and "ninja: build stopped" not in line]
    if errors:
        return "; ".join(dict.fromkeys(errors[:3]))
    if returncode < 0:
        return f"the builder was killed by signal {signal.Signals(-returncode).name}"
    tail = [line for line in lines if line][-1:] or [f"exit status {returncode}"]
    return tail[0]
