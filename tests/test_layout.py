"""The layering of docs/architecture.md, checked: what each layer may import."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

APPLICATION_MODULES = ("tqdm", "matplotlib", "torchvision", "fastnorm.book")


def _modules_after(code: str) -> set[str]:
    """The modules loaded by ``code`` in a fresh interpreter."""
    script = f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def _loaded(modules: set[str], name: str) -> bool:
    return any(m == name or m.startswith(name + ".") for m in modules)


def test_import_fastnorm_leaves_the_application_unloaded():
    """``import fastnorm`` loads the library only. (``import torch`` itself loads tqdm when it is
    installed, through torch.hub: what counts is what fastnorm adds to torch.)"""
    with_torch = _modules_after("import torch")
    with_fastnorm = _modules_after("import fastnorm")
    added = with_fastnorm - with_torch
    for name in APPLICATION_MODULES:
        assert not _loaded(added, name), f"import fastnorm imported {name}"
    assert not _loaded(with_fastnorm, "fastnorm.book")
    assert not _loaded(with_fastnorm, "matplotlib") and not _loaded(with_fastnorm, "torchvision")


def test_kernels_never_import_torch_or_fastnorm():
    loaded = _modules_after(
        "import fastnorm_kernels.reference, fastnorm_kernels.numba_cpu, fastnorm_kernels.formulas.optim"
    )
    assert not _loaded(loaded, "torch") and not _loaded(loaded, "fastnorm")


@pytest.mark.parametrize("old", ["fastnorm.models", "fastnorm.data", "fastnorm.train", "fastnorm.experiments"])
def test_the_application_lives_in_fastnorm_book(old):
    assert importlib.util.find_spec(old) is None
    assert importlib.util.find_spec(old.replace("fastnorm.", "fastnorm.book.")) is not None


def test_cli_help_does_not_load_the_application():
    loaded = _modules_after("from fastnorm import cli\nparser = cli.build_parser()")
    assert not _loaded(loaded, "matplotlib") and not _loaded(loaded, "torchvision")


def _package_imports() -> dict[str, set[str]]:
    """fastnorm's library modules (not the book or the CLI) -> the fastnorm modules each imports,
    at module level or inside functions (lazy imports close cycles too)."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent / "fastnorm"
    names = {p.stem for p in root.glob("*.py")} - {"__init__", "__main__", "cli"}
    graph = {}
    for name in names:
        tree = ast.parse((root / f"{name}.py").read_text())
        found = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                if node.module:
                    found.add(node.module.split(".")[0])
                else:
                    found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fastnorm."):
                found.add(node.module.split(".")[1])
        graph[name] = found & names
    return graph


def test_the_library_has_no_import_cycle():
    """Was: _arrays -> _native -> _dispatch -> autograd -> ... -> _arrays."""
    graph = _package_imports()
    state: dict[str, int] = {}

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for other in sorted(graph[name]):
            assert state.get(other) != 1, "import cycle: " + " -> ".join([*path, name, other])
            if other not in state:
                visit(other, [*path, name])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [])
