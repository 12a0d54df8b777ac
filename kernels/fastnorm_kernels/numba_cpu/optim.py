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
import inspect

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
from ..formulas.optim import OPTIMIZERS
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


# -- one compiled kernel per (optimizer, storage): the loop above around the formula -------------
# "contract": fused multiply-adds, as ATen's vectorised add(alpha=...) uses (vec::fmadd); with it
# the numba SGD stays bit-identical to torch's default through 400 MNIST training steps.
_FLAGS = dict(parallel=True, cache=True, error_model="numpy", nogil=True, fastmath={"contract"})
_ARGS = "addrs, chunks, steps, step_f64, advance, host, scalars, constants, flags, uses"
#: 16-bit storages: kernel suffix -> (load, store) (bfloat16 round-to-nearest, bfloat16 stochastic
#: rounding, float16); compiled when first used
_STORAGES16 = {"bf16": ("load_bf16", "store_bf16"), "bf16_sr": ("load_bf16", "store_bf16_stochastic"),
               "f16": ("load_f16", "store_f16")}  # fmt: skip


def _exec(source: str, name: str, namespace: dict):
    exec(compile(source, __file__, "exec"), namespace)  # noqa: S102 - text generated from the descriptions
    return namespace[name]


def _define() -> dict:
    """Per description (kernels/fastnorm_kernels/formulas/optim.py): the element adapter
    ``_element_<op>`` and one top-level kernel per storage, ``_<op>`` and ``_<op>_<suffix>``,
    written out as source (each needs its own name for Numba's on-disk cache and its own
    compile-time functions; a closure would share one cache entry)."""
    kernels = {}
    for op, d in OPTIMIZERS.items():
        element = f"_element_{op}"
        globals()[element] = njit(inline="always")(
            _exec(d.element_source(element, f"_FORMULAS.{d.update.__name__}"), element, globals())
        )
        scalars = d.step_scalars.__name__ if d.step_scalars is not None else "no_tensor_scalars"
        common = f"{element}, _FORMULAS.{scalars}, {len(d.constants)}, {len(d.buffers) > 1}, {len(d.buffers) > 2}"
        name = f"_{op}"
        source = f"def {name}({_ARGS}):\n    _table_update({common}, {_ARGS})\n"
        kernels[(op, None)] = globals()[name] = njit(**_FLAGS)(_exec(source, name, globals()))
        for storage, (load, store) in _STORAGES16.items():
            name = f"_{op}_{storage}"
            source = f"def {name}({_ARGS}, seed):\n    _table_update16({common}, {load}, {store}, {_ARGS}, seed)\n"
            kernels[(op, storage)] = globals()[name] = njit(**_FLAGS)(_exec(source, name, globals()))
    return kernels


_KERNELS = _define()


# -- launching (the entry points themselves are kernels/fastnorm_kernels/_optimizer_api.py) -----------------------

_NO_STEPS = np.zeros(0, np.int64)


def _launch(op, addrs, numels, dtype, step_addrs, step_f64, first_step, host, constants, flags, uses,
            seed=None) -> None:  # fmt: skip
    half = is_half(dtype)
    # per-tensor scalars: filled from the steps, or the first-step flags; float32 for 16-bit storage
    scalars = np.zeros((len(numels), 2), np.float32 if half else dtype)
    if first_step is not None:
        scalars[:, 0] = np.asarray(first_step, bool)
    steps = _NO_STEPS if first_step is not None else step_addrs
    args = (addrs, chunk_table(numels), steps, step_f64, first_step is None, host, scalars, constants, flags, uses)
    if not half:
        _KERNELS[(op, None)](*args)
        return
    storage = "f16" if np.dtype(dtype) == FLOAT16 else "bf16" if seed is None else "bf16_sr"
    _KERNELS[(op, storage)](*args, np.uint32(0 if seed is None else seed))


_API = OptimizerAPI("numba", OPTIMIZER_DTYPES, _launch, lambda a: a.ctypes.data,
                    lambda a: isinstance(a, np.ndarray) and a.flags.c_contiguous)  # fmt: skip
_API.install(globals())


# -- C entry points, for fastnorm's C++ ops (fastnorm/csrc/optim.cpp) -----------------------------
# Per (optimizer, storage) one C function that runs the kernel on tables the C++ op built
# (addresses, chunks, per-tensor scalars, constants in the compute dtype); every one has the same
# C signature:
#   void step(int64 addrs, T, chunks, K, steps, step_f64, advance, double host0, host1, host2,
#             int64 scalars, constants, flag_bits, use_bits, seed)
# addrs: (5, T) int64; chunks: (K, 3) int64; steps: (T,) int64 step counter addresses (0 where
# the optimizer counts no steps); scalars: (T, 2) and constants: the description's constants in
# the compute dtype (float32 for 16-bit storage); flag_bits, use_bits: bit i is flag / buffer row
# i; seed: the stochastic rounding seed (storage "bfloat16_sr" only).
# Per optimizer also a packer, void pack(int64 options, int64 out): the op's options (float64, in
# schema order, booleans 0/1) -> constants, flags, uses and host values (float64, in that order:
# Optimizer.pack compiled), and for the CUDA ops the step scalars, void scalars(double step,
# int64 host, int64 out): out[0:2] from the new step count and the three host values.

#: storage -> (the kernels' pointer type of the compute dtype, 16-bit kernel suffix)
C_STORAGES = {"float32": ("np.float32(0)", None), "float64": ("np.float64(0)", None),
              "bfloat16": ("np.float32(0)", "bf16"), "float16": ("np.float32(0)", "f16"),
              "bfloat16_sr": ("np.float32(0)", "bf16_sr")}  # fmt: skip
_I64, _F64 = types.int64, types.float64
_C_STEP = types.void(*[_I64] * 7, _F64, _F64, _F64, *[_I64] * 5)
_C_STEP_ARGS = (
    "addrs, t, chunks, k, steps, step_f64, advance, h0, h1, h2, scalars, constants, flag_bits, use_bits, seed"
)
_C_PACK = types.void(_I64, _I64)
_C_SCALARS = types.void(_F64, _I64, _I64)


@njit(inline="always")
def _table_at(addr, like, rows, cols):
    return numba.carray(_pointer(addr, like), (rows, cols))


@njit(inline="always")
def _vector_at(addr, like, n):
    return numba.carray(_pointer(addr, like), n)


def _bits(name: str, n: int) -> str:
    return "(" + "".join(f"({name} >> {i}) & 1 != 0, " for i in range(n)) + ")"


@functools.cache
def _c_function(op: str, storage: str):
    """The Python source of the C entry point of (op, storage), written out with a name of its own
    (``_c_<op>_<storage>``), so that Numba's on-disk cache keys each apart."""
    if op not in OPTIMIZERS or storage not in C_STORAGES:
        raise ValueError(f"no C entry point for optimizer {op!r} and storage {storage!r}")
    d = OPTIMIZERS[op]
    compute, suffix = C_STORAGES[storage]
    if storage == "float64":
        compute = "np.float64(0)"
    kernel = f"_{op}" if suffix is None else f"_{op}_{suffix}"
    seed = "" if suffix is None else ", np.uint32(seed)"
    fn = f"_c_{op}_{storage}"
    source = (
        f"def {fn}({_C_STEP_ARGS}):\n"
        f"    {kernel}(_table_at(addrs, np.int64(0), 5, t), _table_at(chunks, np.int64(0), k, 3),\n"
        f"        _vector_at(steps, np.int64(0), t if steps != 0 else 0), step_f64 != 0, advance != 0, (h0, h1, h2),\n"
        f"        _table_at(scalars, {compute}, t, 2), _vector_at(constants, {compute}, {len(d.constants)}),\n"
        f"        {_bits('flag_bits', d.n_flags)}, {_bits('use_bits', 3)}{seed})\n"
    )
    function = _exec(source, fn, dict(globals()))
    function.__module__ = __name__
    return function


@functools.cache
def c_entry_point(op: str, storage: str):
    """The C function of optimizer ``op`` (a key of OPTIMIZERS) for ``storage`` (a key of
    C_STORAGES): a ``numba.cfunc`` (callers take its ``.address``), compiled on the first call
    (~5-60 s) or loaded from Numba's on-disk cache (:func:`c_entry_point_cached`)."""
    function = _c_function(op, storage)
    numba.get_num_threads()  # the threading layer before a cached parallel C function (batchnorm.py)
    return numba.cfunc(_C_STEP, cache=True, nogil=True)(function)


def c_entry_point_cached(op: str, storage: str) -> bool | None:
    """Whether :func:`c_entry_point` will load from Numba's cache rather than compile (None: unknown)."""
    from ._jit import cached

    return cached(_c_function(op, storage))


def _value(name, fn, options: dict, index: dict, namespace: dict) -> str:
    """The packer's expression of a derived value: the option itself, or ``fn`` of options
    (compiled into ``namespace``)."""

    def arg(a):
        return f"(o[{index[a]}] != 0)" if options[a].kind is bool else f"o[{index[a]}]"

    if fn is None:
        return arg(name)
    helper = f"_derived{len(namespace)}"
    namespace[helper] = njit(inline="always")(fn)
    return f"{helper}({', '.join(arg(a) for a in inspect.signature(fn).parameters)})"


@functools.cache
def c_pack(op: str):
    """The packer of optimizer ``op`` (a ``numba.cfunc``; see above), compiled on first use (~1 s)
    or loaded from Numba's on-disk cache."""
    d = OPTIMIZERS[op]
    options = {o.name: o for o in d.options}
    index = {o.name: i for i, o in enumerate(d.options)}
    namespace = dict(globals())
    values = [_value(n, fn, options, index, namespace) for n, fn in d.constants.items()]
    values += [_value(n, fn, options, index, namespace) for n, fn in d.flags.items()] or ["False"]
    values += ["True" if b.when is None else _value(b.key, b.when, options, index, namespace) for b in d.buffers]
    values += ["False"] * (3 - len(d.buffers))
    values += [f"o[{index[h]}]" for h in d.host] + ["0.0"] * (3 - len(d.host))
    body = "".join(f"    out[{i}] = 1.0 * ({v})\n" for i, v in enumerate(values))
    source = (f"def _pack_{op}(options, out_addr):\n"
              f"    o = _vector_at(options, np.float64(0), {len(d.options)})\n"
              f"    out = _vector_at(out_addr, np.float64(0), {len(values)})\n{body}")  # fmt: skip
    return numba.cfunc(_C_PACK, cache=True, nogil=True)(_exec(source, f"_pack_{op}", namespace))


@functools.cache
def c_scalars(op: str):
    """The step scalars of optimizer ``op`` for the CUDA ops (a ``numba.cfunc``; see above)."""
    d = OPTIMIZERS[op]
    scalars = d.step_scalars.__name__ if d.step_scalars is not None else "no_tensor_scalars"
    source = (f"def _scalars_{op}(step, host_addr, out_addr):\n"
              f"    h = _vector_at(host_addr, np.float64(0), 3)\n"
              f"    out = _vector_at(out_addr, np.float64(0), 2)\n"
              f"    out[0], out[1] = _FORMULAS.{scalars}(step, (h[0], h[1], h[2]))\n")  # fmt: skip
    return numba.cfunc(_C_SCALARS, cache=True, nogil=True)(_exec(source, f"_scalars_{op}", dict(globals())))
