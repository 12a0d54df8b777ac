"""Fused multi-tensor optimizer updates on NVIDIA GPUs with ``numba.cuda.jit``.

Book: "Deep Learning from Scratch", section 6.1. The per-element math is kernels/fastnorm_kernels/formulas/optim.py
(shared with the CPU kernels); this module holds the launches. The design is the CPU one (read
kernels/fastnorm_kernels/numba_cpu/optim.py): a parameter group is one (5, T) table of data addresses and one
chunk table (tensor, start, stop), int64 device arrays the kernels take by address (as every
fastnorm CUDA kernel takes its arrays: launchable from C++, fastnorm/csrc/optim_cuda.cpp); one
launch updates every element of every tensor of the group, blocks striding over chunks and
threads over a chunk's elements (coalesced).

Step counters live in host memory, where torch keeps them without ``capturable=True``: the
host advances them and computes each tensor's step-dependent scalars in float64 (torch's own
arithmetic), and tensors sharing those scalars (usually all of a group) share one launch, the
scalars passed by value. The address and chunk tables are uploaded once per distinct content
and kept (they hold addresses and sizes only: a table is right for any tensors at those
addresses). A step is then one kernel launch with no host-to-device copy.
"""

from __future__ import annotations

import ctypes
import functools

import numpy as np
from numba import cuda

from .. import OPTIMIZER_API, TABLE_API
from .._bits import FLOAT16, HALF_DTYPES, is_half
from .._optimizer_api import OptimizerAPI
from ..formulas import compiled
from ..formulas import optim as formulas
from ..formulas.optim import OPTIMIZERS
from ._bits import load_bf16, load_f16, row_key, store_bf16, store_bf16_stochastic, store_f16  # noqa: F401
from ._device import BLOCK, SIMULATOR, address, host_address, stream, view

__all__ = [*OPTIMIZER_API, *TABLE_API, "OPTIMIZER_DTYPES"]

#: the storage dtypes these optimizers update: float32, float64, float16 and bfloat16 (uint16 bits,
#: kernels/fastnorm_kernels/_bits.py), the 16-bit ones computed in float32
OPTIMIZER_DTYPES = (np.dtype(np.float32), np.dtype(np.float64), *HALF_DTYPES)

CHUNK = 1 << 16  # elements per chunk
MAX_BLOCKS = 4096

_jit = cuda.jit if SIMULATOR else cuda.jit(cache=True)
_inline = cuda.jit(device=True) if SIMULATOR else cuda.jit(device=True, inline="always")
_FORMULAS = compiled(_inline, formulas)


@functools.lru_cache(maxsize=256)
def _chunk_table_host(numels: tuple[int, ...], chunk: int) -> np.ndarray:
    rows = [(t, lo, min(n, lo + chunk)) for t, n in enumerate(numels) for lo in range(0, n, chunk)]
    return np.array(rows, np.int64).reshape(-1, 3)


_DEVICE_TABLES: dict = {}


def _device_table(host: np.ndarray):
    """A device copy of a small table, made once per content (at most 256 kept)."""
    key = (host.dtype.str, host.shape, host.tobytes())
    table = _DEVICE_TABLES.get(key)
    if table is None:
        if len(_DEVICE_TABLES) >= 256:
            _DEVICE_TABLES.clear()
        st = stream()
        table = cuda.to_device(np.ascontiguousarray(host), stream=st)
        st.synchronize()  # once per table: later launches on any stream may read it
        _DEVICE_TABLES[key] = table
    return table


_CHUNK_TABLES: dict = {}


def _chunk_table(numels: tuple[int, ...]):
    """The (K, 3) int64 chunk table on the device, uploaded once per set of sizes."""
    key = (numels, CHUNK)
    table = _CHUNK_TABLES.get(key)
    if table is None:
        if len(_CHUNK_TABLES) >= 64:
            _CHUNK_TABLES.clear()
        table = _CHUNK_TABLES[key] = _device_table(_chunk_table_host(numels, CHUNK))
    return table


# -- the two loops every optimizer shares ------------------------------------------------------


@_inline
def _table_update(update, addrs_addr, T, chunks_addr, K, s0, s1, constants, flags, uses):
    """Blocks stride over the K chunks, threads over a chunk's elements. The tables are int64
    device arrays given by address: addrs (5, T) (param, grad, three buffer rows), chunks (K, 3)
    (tensor, start, stop); ``uses``: the buffer rows that exist (the others are neither read nor
    written)."""
    like = constants[0]
    addrs = view(addrs_addr, 5 * T, np.int64(0))
    chunks = view(chunks_addr, 3 * K, np.int64(0))
    use0, use1, use2 = uses
    k = cuda.blockIdx.x
    while k < K:
        t, lo, hi = chunks[3 * k], chunks[3 * k + 1], chunks[3 * k + 2]
        p = view(addrs[t], hi, like)
        g = view(addrs[T + t], hi, like)
        b0 = view(addrs[2 * T + t], hi, like)
        b1 = view(addrs[3 * T + t], hi, like)
        b2 = view(addrs[4 * T + t], hi, like)
        i = lo + cuda.threadIdx.x
        while i < hi:
            _FORMULAS.update_element(update, p, g, b0, b1, b2, i, constants, s0, s1, flags, use0, use1, use2)
            i += cuda.blockDim.x
        k += cuda.gridDim.x


@_inline
def _table_update16(update, load, store, addrs_addr, T, chunks_addr, K, s0, s1, constants, flags, uses, seed):
    """:func:`_table_update` for bfloat16 / float16 storage: ``load`` and ``store`` convert each
    value to and from float32 (kernels/fastnorm_kernels/numba_cuda/_bits.py), the compute dtype of ``s0``, ``s1``
    and ``constants``; ``seed`` (uint32): the stochastic rounding generator's, per launch."""
    bits = np.uint16(0)
    addrs = view(addrs_addr, 5 * T, np.int64(0))
    chunks = view(chunks_addr, 3 * K, np.int64(0))
    use0, use1, use2 = uses
    k = cuda.blockIdx.x
    while k < K:
        t, lo, hi = chunks[3 * k], chunks[3 * k + 1], chunks[3 * k + 2]
        p = view(addrs[t], hi, bits)
        g = view(addrs[T + t], hi, bits)
        b0 = view(addrs[2 * T + t], hi, bits)
        b1 = view(addrs[3 * T + t], hi, bits)
        b2 = view(addrs[4 * T + t], hi, bits)
        tt = np.uint32(t)
        keys = (row_key(seed, tt, np.uint32(0)), row_key(seed, tt, np.uint32(1)), row_key(seed, tt, np.uint32(2)),
                row_key(seed, tt, np.uint32(3)))  # fmt: skip
        i = lo + cuda.threadIdx.x
        while i < hi:
            _FORMULAS.update_element_16(update, load, store, p, g, b0, b1, b2, i, constants, s0, s1, flags,
                                        use0, use1, use2, keys, np.uint32(i & 0xFFFFFFFF))  # fmt: skip
            i += cuda.blockDim.x
        k += cuda.gridDim.x


# -- one kernel per (optimizer, storage), from its description ----------------------------------
_STORAGES16 = {"bf16": ("load_bf16", "store_bf16"), "bf16_sr": ("load_bf16", "store_bf16_stochastic"),
               "f16": ("load_f16", "store_f16")}  # fmt: skip
_ARGS = "addrs_addr, T, chunks_addr, K, s0, s1, constants, flags, uses, seed"  # seed: 16-bit storage only


def _exec(source: str, name: str):
    exec(compile(source, __file__, "exec"), globals())  # noqa: S102 - text generated from the descriptions
    return globals()[name]


def _define() -> dict:
    """Per description (kernels/fastnorm_kernels/formulas/optim.py): its element adapter and one
    kernel per storage, ``_<op>`` and ``_<op>_<suffix>``, written out as source, each with its own
    name (Numba's on-disk cache) and compile-time functions (see the CPU module)."""
    kernels = {}
    for op, d in OPTIMIZERS.items():
        element = f"_element_{op}"
        globals()[element] = _inline(_exec(d.element_source(element, f"_FORMULAS.{d.update.__name__}"), element))
        name = f"_{op}"
        source = f"def {name}({_ARGS}):\n    _table_update({element}, {_ARGS.removesuffix(', seed')})\n"
        kernels[(op, None)] = globals()[name] = _jit(_exec(source, name))
        for storage, (load, store) in _STORAGES16.items():
            name = f"_{op}_{storage}"
            source = f"def {name}({_ARGS}):\n    _table_update16({element}, {load}, {store}, {_ARGS})\n"
            kernels[(op, storage)] = globals()[name] = _jit(_exec(source, name))
    return kernels


_KERNELS = _define()


# -- launching (the entry points themselves are kernels/fastnorm_kernels/_optimizer_api.py) -----------------------


def _advance_host_steps(step_addrs, step_f64: bool) -> list[float]:
    """step += 1 for each host counter (float32 arithmetic for float32 counters, as torch's);
    returns the new values."""
    ctype = ctypes.c_double if step_f64 else ctypes.c_float
    values = []
    for addr in step_addrs.tolist():
        counter = ctype.from_address(addr)
        counter.value = counter.value + 1.0  # exact in float64, then rounded once to the counter's type
        values.append(counter.value)
    return values


def _launch(op, addrs, numels, dtype, step_addrs, step_f64, first_step, host, constants, flags, uses,
            seed=None) -> None:  # fmt: skip
    kernel = _KERNELS[(op, None)]
    if is_half(dtype):  # 16-bit storage: float32 scalars, the storage's kernel
        storage = "f16" if np.dtype(dtype) == FLOAT16 else "bf16" if seed is None else "bf16_sr"
        kernel, dtype = _KERNELS[(op, storage)], np.dtype(np.float32)
    if first_step is None:
        steps = _advance_host_steps(step_addrs, step_f64)
        cache: dict = {}
        tensor_scalars = OPTIMIZERS[op].tensor_scalars
        keys = [cache.get(s) or cache.setdefault(s, tensor_scalars(s, host)) for s in steps]
    else:  # s0 != 0 where a buffer cloned on its first step is new (SGD's momentum)
        keys = [(1.0 if fresh else 0.0, 0.0) for fresh in first_step]
    groups: dict = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    st = stream()
    constants = tuple(constants)  # by value, as kernel arguments
    for (s0, s1), index in groups.items():
        if len(index) == len(numels):
            table, sizes = addrs, numels
        else:  # tensors whose steps differ: one launch per set of scalars
            table, sizes = addrs[:, index], tuple(numels[i] for i in index)
        chunks = _chunk_table(sizes)
        k = chunks.shape[0]
        kernel[max(1, min(k, MAX_BLOCKS)), BLOCK, st](
            address(_device_table(table)), len(sizes), address(chunks), k, dtype.type(s0), dtype.type(s1), constants,
            flags, uses, np.uint32(seed or 0),
        )  # fmt: skip


_API = OptimizerAPI("cuda", OPTIMIZER_DTYPES, _launch, address, lambda a: True, host_address)
_API.install(globals())
