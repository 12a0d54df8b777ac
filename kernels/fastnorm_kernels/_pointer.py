"""Typed pointers from integer addresses, for the optimizers' multi-tensor address tables.

The CPU (numba) and GPU (numba-cuda) compilers each have their own ``intrinsic`` decorator and
type system; :func:`pointer_intrinsic` builds the same intrinsic for either.
"""

from __future__ import annotations


def pointer_intrinsic(intrinsic, types):
    """``_pointer(addr, like)``: int64 address -> pointer to elements of ``like``'s type."""

    @intrinsic
    def _pointer(typingctx, addr, like):
        ptr_type = types.CPointer(like)

        def codegen(context, builder, signature, args):
            return builder.inttoptr(args[0], context.get_value_type(ptr_type))

        return ptr_type(types.int64, like), codegen

    return _pointer
