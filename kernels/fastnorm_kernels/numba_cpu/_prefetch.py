"""Software prefetch for the Numba CPU loops: ``prefetch(a, i)`` asks the CPU to bring the cache
line holding ``a.flat[i]`` (a C-contiguous array, read soon) into cache.

It emits LLVM's ``llvm.prefetch`` (read, high locality, data cache): a hint, never a fault, so an
address past the end of the array would be harmless; callers still keep ``i`` in range. Used where
the hardware prefetcher does not follow the access pattern: BatchNorm's short rows read eight at a
time (kernels/fastnorm_kernels/numba_cpu/batchnorm.py).
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic


@intrinsic
def prefetch(typingctx, array, index):
    """``prefetch(a, i)``: a 1-D C-contiguous array, i an integer index into it."""
    if not (isinstance(array, types.Array) and array.ndim == 1 and isinstance(index, types.Integer)):
        return None

    def codegen(context, builder, signature, args):
        array_type = signature.args[0]
        ary = context.make_array(array_type)(context, builder, args[0])
        index = context.cast(builder, args[1], signature.args[1], types.intp)
        ptr = cgutils.get_item_pointer(context, builder, array_type, ary, [index], wraparound=False)
        i32 = ir.IntType(32)
        byte_ptr = builder.bitcast(ptr, ir.IntType(8).as_pointer())
        fnty = ir.FunctionType(ir.VoidType(), [byte_ptr.type, i32, i32, i32])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0")
        builder.call(fn, [byte_ptr, i32(0), i32(3), i32(1)])  # read, keep in all levels, data
        return context.get_dummy_value()

    return types.void(array, index), codegen
