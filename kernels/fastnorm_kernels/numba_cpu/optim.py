"""Fused multi-tensor optimizer updates on CPU threads with Numba.

Book: "Deep Learning from Scratch", section 6.1. The per-element math is kernels/fastnorm_kernels/formulas/optim.py
(shared with the CUDA kernels); this module holds the CPU loop around it.

Design: a chunk table over separate tensors
-------------------------------------------
A parameter group's tensors stay where they are (``model.parameters()`` remain ordinary tensors,
``zero_grad(set_to_none=True)`` keeps working, checkpoints keep torch's layout). One compiled
call per group and dtype receives

* ``addrs``: an int64 (5, T) table of data addresses, rows parameter, gradient and up to three
  state buffers of every tensor (all of one dtype, each dense with the parameter's layout); an
  unused buffer row repeats the gradient row and is never touched;
* a chunk table: (tensor, start, stop) rows cutting every tensor into pieces of CHUNK elements,
  so that one parallel loop over chunks balances threads across tensors of any sizes (the MLP's
  10-value bias and its 200,704-value weight alike); int64, so tensors beyond 2**31 elements
  index correctly;
* the addresses of the per-tensor step counters (torch's ``state["step"]`` scalar tensors),
  incremented in a serial prologue of the same call, which then computes each tensor's
  step-dependent scalars (formulas ``*_tensor_scalars``) in float64, as torch does on the host.

Inside a chunk every element's whole update is one pass that reads each buffer once and writes
it once, in the parameter's dtype with constants of that dtype (a float64 constant would widen
float32 vectors, see ../shared/NUMBA-NOTES.md), under ``error_model="numpy"`` so that divisions
vectorise. Option flags are loop-invariant branches that LLVM unswitches out of the vectorised
loop; ``stores(flags)`` comes from the same flags, so an unused buffer row is neither read nor
written in the loop version that runs.
"""

from __future__ import annotations

import functools

import numba
import numpy as np
from numba import njit, prange, types
from numba.extending import intrinsic
from numba.np.unsafe.ndarray import to_fixed_tuple

from .. import OPTIMIZER_API, TABLE_API
from .._bits import FLOAT16, HALF_DTYPES, is_half
from .._optimizer_api import OptimizerAPI
from .._pointer import pointer_intrinsic
from .._validate import FLOAT_DTYPES
from ..formulas import compiled
from ..formulas import optim as formulas
from ._bits import load_bf16, load_f16, row_key, store_bf16, store_bf16_stochastic, store_f16  # noqa: F401

__all__ = [*OPTIMIZER_API, *TABLE_API, "OPTIMIZER_DTYPES"]

#: the storage dtypes these optimizers update: float32, float64, float16 and bfloat16 (as uint16
#: bits, kernels/fastnorm_kernels/_bits.py), the 16-bit ones computed in float32
OPTIMIZER_DTYPES = (*FLOAT_DTYPES, *HALF_DTYPES)

CHUNK = 1 << 15  # elements per chunk of the parallel loop (the MLP's weight: 7 chunks)


_pointer = pointer_intrinsic(intrinsic, types)
_FORMULAS = compiled(njit(inline="always"), formulas)


@njit(inline="always")
def _elements(addr, lo, hi, like):
    """The elements lo..hi-1 of the tensor at ``addr`` as a 1-D array of ``like``'s type."""
    return numba.carray(_pointer(addr, like), hi)[lo:hi]


@njit(inline="always")
def _advance_step(addr, is_f64):
    """step += 1 in the scalar tensor at ``addr`` (float32 or float64); returns the new value."""
    if is_f64:
        s = numba.carray(_pointer(addr, np.float64(0)), 1)
        s[0] += 1.0
        return s[0]
    s32 = numba.carray(_pointer(addr, np.float32(0)), 1)
    s32[0] += np.float32(1.0)
    return np.float64(s32[0])


def chunk_table(numels: tuple[int, ...], chunk: int | None = None) -> np.ndarray:
    """(K, 3) int64 rows (tensor index, start, stop), one per chunk of ``chunk`` (default: the
    module's CHUNK, read at call time so that tests can shrink it). Depends on the sizes only."""
    return _chunk_table(numels, CHUNK if chunk is None else chunk)


@functools.lru_cache(maxsize=256)
def _chunk_table(numels: tuple[int, ...], chunk: int) -> np.ndarray:
    rows = [(t, lo, min(n, lo + chunk)) for t, n in enumerate(numels) for lo in range(0, n, chunk)]
    return np.array(rows, np.int64).reshape(-1, 3)


@njit(inline="always")
def _update_chunk(update, p, g, b0, b1, b2, n, constants, s0, s1, flags, use0, use1, use2):
    """n elements: p, g, b*: (n,) arrays; use*: literal booleans at every call site, so that each
    version of the loop is compiled for exactly the buffers it has (a buffer branch left to
    LLVM, e.g. amsgrad's NaN-propagating max, kept the loop from vectorising)."""
    for i in range(n):
        _FORMULAS.update_element(update, p, g, b0, b1, b2, i, constants, s0, s1, flags, use0, use1, use2)


@njit(inline="always")
def _table_update(update, tensor_scalars, n_constants, has1, has2, addrs, chunks, steps, step_f64, advance, host,
                  scalars, constant_array, flags, uses):  # fmt: skip
    """The one CPU loop: advance the steps (serial), then update every chunk (parallel).

    addrs: (5, T) int64; chunks: (K, 3) int64; steps: (T,) int64 addresses; host: float64 tuple;
    scalars: (T, 2) in the parameters' dtype, filled here when ``advance``; constant_array: the
    group's n_constants constants in that dtype (made a tuple here: values, not memory the
    loop's stores might alias; its first element also types the pointers); uses: which buffer
    rows exist.
    Buffer 0 exists whenever 1 or 2 does (true of every optimizer): at most five loop versions,
    fewer where the kernel passes constants has1 / has2 false (buffer 1 / 2 never exists), so
    that no optimizer compiles loop versions it cannot run."""
    constants = to_fixed_tuple(constant_array, n_constants)
    like = constants[0]
    if advance:
        for t in range(scalars.shape[0]):
            scalars[t, 0], scalars[t, 1] = tensor_scalars(_advance_step(steps[t], step_f64), host)
    use0, use1, use2 = uses
    for c in prange(chunks.shape[0]):
        t, lo, hi = chunks[c, 0], chunks[c, 1], chunks[c, 2]
        p = _elements(addrs[0, t], lo, hi, like)
        g = _elements(addrs[1, t], lo, hi, like)
        b0 = _elements(addrs[2, t], lo, hi, like)
        b1 = _elements(addrs[3, t], lo, hi, like)
        b2 = _elements(addrs[4, t], lo, hi, like)
        n, s0, s1 = hi - lo, scalars[t, 0], scalars[t, 1]
        if has2 and has1 and use2 and use1:
            _update_chunk(update, p, g, b0, b1, b2, n, constants, s0, s1, flags, True, True, True)
        elif has2 and use2:
            _update_chunk(update, p, g, b0, b1, b2, n, constants, s0, s1, flags, True, False, True)
        elif has1 and use1:
            _update_chunk(update, p, g, b0, b1, b2, n, constants, s0, s1, flags, True, True, False)
        elif use0:
            _update_chunk(update, p, g, b0, b1, b2, n, constants, s0, s1, flags, True, False, False)
        else:
            _update_chunk(update, p, g, b0, b1, b2, n, constants, s0, s1, flags, False, False, False)


@njit(inline="always")
def _update_chunk16(update, load, store, p, g, b0, b1, b2, lo, n, constants, s0, s1, flags, use0, use1, use2,
                    keys):  # fmt: skip
    """:func:`_update_chunk` for 16-bit storage: elements lo..lo+n-1 of their tensor."""
    base = np.uint32(lo & 0xFFFFFFFF)
    for i in range(n):
        _FORMULAS.update_element_16(update, load, store, p, g, b0, b1, b2, i, constants, s0, s1, flags,
                                    use0, use1, use2, keys, base + np.uint32(i))  # fmt: skip


@njit(inline="always")
def _table_update16(update, tensor_scalars, n_constants, has1, has2, load, store, addrs, chunks, steps, step_f64,
                    advance, host, scalars, constant_array, flags, uses, seed):  # fmt: skip
    """:func:`_table_update` for bfloat16 / float16 storage (kernels/fastnorm_kernels/_bits.py): ``load`` and
    ``store`` convert each value to and from float32, the compute dtype of ``scalars`` and
    ``constant_array``; ``seed`` (uint32): the stochastic rounding generator's, per launch."""
    constants = to_fixed_tuple(constant_array, n_constants)
    bits = np.uint16(0)
    if advance:
        for t in range(scalars.shape[0]):
            scalars[t, 0], scalars[t, 1] = tensor_scalars(_advance_step(steps[t], step_f64), host)
    use0, use1, use2 = uses
    for c in prange(chunks.shape[0]):
        t, lo, hi = chunks[c, 0], chunks[c, 1], chunks[c, 2]
        p = _elements(addrs[0, t], lo, hi, bits)
        g = _elements(addrs[1, t], lo, hi, bits)
        b0 = _elements(addrs[2, t], lo, hi, bits)
        b1 = _elements(addrs[3, t], lo, hi, bits)
        b2 = _elements(addrs[4, t], lo, hi, bits)
        n, s0, s1 = hi - lo, scalars[t, 0], scalars[t, 1]
        tt = np.uint32(t)
        keys = (row_key(seed, tt, np.uint32(0)), row_key(seed, tt, np.uint32(1)), row_key(seed, tt, np.uint32(2)),
                row_key(seed, tt, np.uint32(3)))  # fmt: skip
        if has2 and has1 and use2 and use1:
            _update_chunk16(update, load, store, p, g, b0, b1, b2, lo, n, constants, s0, s1, flags, True, True, True,
                            keys)  # fmt: skip
        elif has2 and use2:
            _update_chunk16(update, load, store, p, g, b0, b1, b2, lo, n, constants, s0, s1, flags, True, False, True,
                            keys)  # fmt: skip
        elif has1 and use1:
            _update_chunk16(update, load, store, p, g, b0, b1, b2, lo, n, constants, s0, s1, flags, True, True, False,
                            keys)  # fmt: skip
        elif use0:
            _update_chunk16(update, load, store, p, g, b0, b1, b2, lo, n, constants, s0, s1, flags, True, False, False,
                            keys)  # fmt: skip
        else:
            _update_chunk16(update, load, store, p, g, b0, b1, b2, lo, n, constants, s0, s1, flags, False, False,
                            False, keys)  # fmt: skip


# -- one compiled kernel per optimizer: the loop above around the formula ----------------------
# "contract": fused multiply-adds, as ATen's vectorised add(alpha=...) uses (vec::fmadd); with it
# the numba SGD stays bit-identical to torch's default through 400 MNIST training steps.
_FLAGS = dict(parallel=True, cache=True, error_model="numpy", nogil=True, fastmath={"contract"})


@njit(**_FLAGS)
def _sgd(addrs, chunks, steps, step_f64, advance, host, scalars, constants, flags, uses):
    _table_update(_FORMULAS.sgd, _FORMULAS.no_tensor_scalars, 5, False, False,
                  addrs, chunks, steps, step_f64, advance, host, scalars, constants, flags, uses)  # fmt: skip


@njit(**_FLAGS)
def _adagrad(addrs, chunks, steps, step_f64, advance, host, scalars, constants, flags, uses):
    _table_update(_FORMULAS.adagrad, _FORMULAS.adagrad_tensor_scalars, 3, False, False,
                  addrs, chunks, steps, step_f64, advance, host, scalars, constants, flags, uses)  # fmt: skip


@njit(**_FLAGS)
def _rmsprop(addrs, chunks, steps, step_f64, advance, host, scalars, constants, flags, uses):
    _table_update(_FORMULAS.rmsprop, _FORMULAS.no_tensor_scalars, 7, True, True,
                  addrs, chunks, steps, step_f64, advance, host, scalars, constants, flags, uses)  # fmt: skip


@njit(**_FLAGS)
def _adam(addrs, chunks, steps, step_f64, advance, host, scalars, constants, flags, uses):
    _table_update(_FORMULAS.adam, _FORMULAS.adam_tensor_scalars, 8, True, True,
                  addrs, chunks, steps, step_f64, advance, host, scalars, constants, flags, uses)  # fmt: skip


# -- the same for 16-bit storage: one kernel per optimizer and storage, compiled when first used --
# (bfloat16 round-to-nearest, bfloat16 stochastic rounding, float16)
_ARGS16 = "addrs, chunks, steps, step_f64, advance, host, scalars, constants, flags, uses, seed"
_OPTIMIZERS16 = {  # op: (update, tensor scalars, number of constants, has buffer 1, has buffer 2)
    "sgd": ("sgd", "no_tensor_scalars", 5, False, False),
    "adagrad": ("adagrad", "adagrad_tensor_scalars", 3, False, False),
    "rmsprop": ("rmsprop", "no_tensor_scalars", 7, True, True),
    "adam": ("adam", "adam_tensor_scalars", 8, True, True),
}
_STORAGES16 = {"bf16": ("load_bf16", "store_bf16"), "bf16_sr": ("load_bf16", "store_bf16_stochastic"),
               "f16": ("load_f16", "store_f16")}  # fmt: skip


def _define16() -> dict:
    """One top-level kernel per (optimizer, storage), named ``_<op>_<storage>``: written out as
    source (each needs its own name for Numba's on-disk cache and its own compile-time functions;
    a closure would share one cache entry)."""
    kernels = {}
    for op, (update, scalars, n, has1, has2) in _OPTIMIZERS16.items():
        for storage, (load, store) in _STORAGES16.items():
            name = f"_{op}_{storage}"
            source = (f"def {name}({_ARGS16}):\n"
                      f"    _table_update16(_FORMULAS.{update}, _FORMULAS.{scalars}, {n}, {has1}, {has2}, "
                      f"{load}, {store}, {_ARGS16})\n")  # fmt: skip
            exec(compile(source, __file__, "exec"), globals())  # noqa: S102 - fixed text, no input
            kernels[(op, storage)] = globals()[name] = njit(**_FLAGS)(globals()[name])
    return kernels


_KERNELS16 = _define16()


# -- launching (the entry points themselves are kernels/fastnorm_kernels/_optimizer_api.py) -----------------------

_KERNELS = {"sgd": _sgd, "adagrad": _adagrad, "rmsprop": _rmsprop, "adam": _adam}
_NO_STEPS = np.zeros(0, np.int64)


def _launch(op, addrs, numels, dtype, step_addrs, step_f64, first_step, host, constants, flags, uses,
            seed=None) -> None:  # fmt: skip
    half = is_half(dtype)
    # per-tensor scalars: filled from the steps, or SGD's first-step flags; float32 for 16-bit storage
    scalars = np.zeros((len(numels), 2), np.float32 if half else dtype)
    if first_step is not None:
        scalars[:, 0] = np.asarray(first_step, bool)
    steps = _NO_STEPS if first_step is not None else step_addrs
    args = (addrs, chunk_table(numels), steps, step_f64, first_step is None, host, scalars, constants, flags, uses)
    if not half:
        _KERNELS[op](*args)
        return
    storage = "f16" if np.dtype(dtype) == FLOAT16 else "bf16" if seed is None else "bf16_sr"
    _KERNELS16[(op, storage)](*args, np.uint32(0 if seed is None else seed))


_API = OptimizerAPI("numba", OPTIMIZER_DTYPES, _launch, lambda a: a.ctypes.data,
                    lambda a: isinstance(a, np.ndarray) and a.flags.c_contiguous)  # fmt: skip
sgd_step, adagrad_step, rmsprop_step, adam_step = _API.sgd_step, _API.adagrad_step, _API.rmsprop_step, _API.adam_step
sgd_step_table, adagrad_step_table = _API.sgd_step_table, _API.adagrad_step_table
rmsprop_step_table, adam_step_table = _API.rmsprop_step_table, _API.adam_step_table


# -- C entry points: one C function per (optimizer, storage), for fastnorm's C++ ops --------------
# fastnorm/csrc/optim.cpp builds the tables (addresses, chunks, per-tensor scalars, constants in
# the compute dtype, kernels/fastnorm_kernels/_optimizer_api.py's flags and uses) and calls these through their
# addresses. Every one has the same C signature:
#   void step(int64 addrs, T, chunks, K, steps, step_f64, advance, double host0, host1, host2,
#             int64 scalars, constants, flag0, flag1, use0, use1, use2, seed)
# addrs: (5, T) int64; chunks: (K, 3) int64; steps: (T,) int64 step counter addresses (0 for SGD);
# scalars: (T, 2) and constants: (N_CONSTANTS[op],) in the compute dtype (float32 for 16-bit
# storage); flags: the op's N_FLAGS[op] flags (the rest ignored); seed: the stochastic rounding
# seed (storage "bfloat16_sr" only).

#: storage -> (the kernels' pointer type of the storage and of the compute dtype, 16-bit kernel suffix)
C_STORAGES = {"float32": ("np.float32(0)", None), "float64": ("np.float64(0)", None),
              "bfloat16": ("np.float32(0)", "bf16"), "float16": ("np.float32(0)", "f16"),
              "bfloat16_sr": ("np.float32(0)", "bf16_sr")}  # fmt: skip
#: per optimizer: how many flags and constants its kernel takes (kernels/fastnorm_kernels/_optimizer_api.py)
N_FLAGS = {"sgd": 2, "adagrad": 1, "rmsprop": 2, "adam": 2}
N_CONSTANTS = {"sgd": 5, "adagrad": 3, "rmsprop": 7, "adam": 8}
_I64, _F64 = types.int64, types.float64
_C_STEP = types.void(*[_I64] * 7, _F64, _F64, _F64, *[_I64] * 8)
_C_STEP_ARGS = "addrs, t, chunks, k, steps, step_f64, advance, h0, h1, h2, scalars, constants, f0, f1, u0, u1, u2, seed"


@njit(inline="always")
def _table_at(addr, like, rows, cols):
    return numba.carray(_pointer(addr, like), (rows, cols))


@njit(inline="always")
def _vector_at(addr, like, n):
    return numba.carray(_pointer(addr, like), n)


@functools.cache
def _c_function(op: str, storage: str):
    """The Python source of the C entry point of (op, storage), written out with a name of its own
    (``_c_<op>_<storage>``), so that Numba's on-disk cache keys each apart."""
    if op not in N_FLAGS or storage not in C_STORAGES:
        raise ValueError(f"no C entry point for optimizer {op!r} and storage {storage!r}")
    compute, suffix = C_STORAGES[storage]
    if storage == "float64":
        compute = "np.float64(0)"
    flags = ", ".join(f"f{i} != 0" for i in range(N_FLAGS[op])) + ","
    kernel = f"_{op}" if suffix is None else f"_{op}_{suffix}"
    seed = "" if suffix is None else ", np.uint32(seed)"
    fn = f"_c_{op}_{storage}"
    source = (
        f"def {fn}({_C_STEP_ARGS}):\n"
        f"    {kernel}(_table_at(addrs, np.int64(0), 5, t), _table_at(chunks, np.int64(0), k, 3),\n"
        f"        _vector_at(steps, np.int64(0), t if steps != 0 else 0), step_f64 != 0, advance != 0, (h0, h1, h2),\n"
        f"        _table_at(scalars, {compute}, t, 2), _vector_at(constants, {compute}, {N_CONSTANTS[op]}),\n"
        f"        ({flags}), (u0 != 0, u1 != 0, u2 != 0){seed})\n"
    )
    namespace = dict(globals())
    exec(compile(source, __file__, "exec"), namespace)  # noqa: S102 - fixed text, no input
    function = namespace[fn]
    function.__module__ = __name__
    return function


@functools.cache
def c_entry_point(op: str, storage: str):
    """The C function of optimizer ``op`` ("sgd", "adagrad", "rmsprop", "adam") for ``storage`` (a
    key of C_STORAGES): a ``numba.cfunc`` (callers take its ``.address``), compiled on the first
    call (~5-60 s) or loaded from Numba's on-disk cache (:func:`c_entry_point_cached`)."""
    function = _c_function(op, storage)
    numba.get_num_threads()  # the threading layer before a cached parallel C function (batchnorm.py)
    return numba.cfunc(_C_STEP, cache=True, nogil=True)(function)


def c_entry_point_cached(op: str, storage: str) -> bool | None:
    """Whether :func:`c_entry_point` will load from Numba's cache rather than compile (None: unknown)."""
    from ._jit import cached

    return cached(_c_function(op, storage))
