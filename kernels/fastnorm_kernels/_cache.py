"""Keep Numba's on-disk cache honest about the shared formulas.

Numba's cache (``cache=True``) revalidates a compiled kernel against the timestamp of the file
that defines it, not of the functions it inlines from other modules; the kernels inline (paths
in this package) formulas/*.py, _description.py (the generated adapters), _pointer.py, the
16-bit conversions (_bits.py, _conversions.py,
*/_bits.py), the CPU prefetch (numba_cpu/_prefetch.py) and the 8-bit state's table cells
(quant8.py).
:func:`drop_if_stale` keeps a hash of those sources next to a backend's cache files and deletes
the cache files when the hash changes, so an edited formula is never run from a stale compiled
kernel. (Installed read-only, or with a
cache elsewhere, there is nothing to do: the sources cannot change there.)
"""

from __future__ import annotations

import hashlib
from pathlib import Path

_ROOT = Path(__file__).resolve().parent
_SOURCES = sorted([*(_ROOT / "formulas").glob("*.py"), _ROOT / "_pointer.py", _ROOT / "_bits.py",
                   _ROOT / "_description.py", _ROOT / "_conversions.py", _ROOT / "quant8.py",
                   *_ROOT.glob("*/_bits.py"), _ROOT / "numba_cpu" / "_prefetch.py"])  # fmt: skip


def _digest() -> str:
    h = hashlib.sha256()
    for path in _SOURCES:
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def drop_if_stale(package_dir: str | Path) -> None:
    """Delete ``package_dir``'s Numba cache files if the shared sources changed since."""
    cache = Path(package_dir) / "__pycache__"
    stamp = cache / "fastnorm-formulas.sha256"
    digest = _digest()
    try:
        if stamp.is_file() and stamp.read_text() == digest:
            return
        for pattern in ("*.nbi", "*.nbc"):
            for path in cache.glob(pattern):
                path.unlink(missing_ok=True)
        cache.mkdir(exist_ok=True)
        stamp.write_text(digest)
    except OSError:
        pass  # read-only installation: nothing is edited there
