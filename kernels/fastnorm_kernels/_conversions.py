"""The 16-bit conversion intrinsics, built once for the CPU (numba) and GPU (numba-cuda) compilers.

Both compilers lower the same LLVM IR (kernels/fastnorm_kernels/_bits.py explains the storage rule); each has
its own ``intrinsic`` decorator and type system, so :func:`conversion_intrinsics` builds the set
for either, as kernels/fastnorm_kernels/_pointer.py does for ``_pointer``:

* ``f32_from_bits(u32)`` / ``bits_from_f32(f32)``: bitcasts between float32 and uint32;
* ``f32_from_half(u16)`` / ``half_from_f32(f32)``: float16 bits <-> float32 (``fpext`` /
  ``fptrunc``, which rounds to nearest even);
* ``widen(v)``: a stored element as a float for arithmetic (bfloat16 uint16 bits and float16
  int16 bits to float32; float32 and float64 unchanged), typed per element type;
* ``narrow(x, out)``: ``x`` rounded to the storage of ``out``'s elements (``out`` an array or a
  typed pointer), to nearest even: bfloat16 bits (a NaN as the canonical quiet NaN 0x7FC0; the
  NaN case is a select, not a branch, which keeps loops vectorisable), float16 bits, or a float.
"""

from __future__ import annotations

from types import SimpleNamespace

from llvmlite import ir


def conversion_intrinsics(intrinsic, types) -> SimpleNamespace:
    @intrinsic
    def f32_from_bits(typingctx, u):
        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], ir.FloatType())

        return types.float32(types.uint32), codegen

    @intrinsic
    def bits_from_f32(typingctx, x):
        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], ir.IntType(32))

        return types.uint32(types.float32), codegen

    @intrinsic
    def f32_from_half(typingctx, u):
        def codegen(context, builder, signature, args):
            return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

        return types.float32(types.uint16), codegen

    @intrinsic
    def half_from_f32(typingctx, x):
        def codegen(context, builder, signature, args):  # fptrunc rounds to nearest even
            return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))

        return types.uint16(types.float32), codegen

    @intrinsic
    def widen(typingctx, v):
        if v == types.uint16:

            def codegen(context, builder, signature, args):
                u = builder.shl(builder.zext(args[0], ir.IntType(32)), ir.Constant(ir.IntType(32), 16))
                return builder.bitcast(u, ir.FloatType())

            return types.float32(v), codegen
        if v == types.int16:

            def codegen(context, builder, signature, args):
                return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

            return types.float32(v), codegen
        if isinstance(v, types.Float):
            return v(v), lambda context, builder, signature, args: args[0]
        return None

    @intrinsic
    def narrow(typingctx, x, out):
        storage = getattr(out, "dtype", None)
        if not isinstance(x, types.Float) or storage is None:
            return None
        if storage == types.uint16:

            def codegen(context, builder, signature, args):
                i32, f32 = ir.IntType(32), ir.FloatType()
                v = args[0] if x == types.float32 else builder.fptrunc(args[0], f32)
                v = builder.select(builder.fcmp_unordered("uno", v, v), ir.Constant(f32, float("nan")), v)
                u = builder.bitcast(v, i32)
                sixteen = ir.Constant(i32, 16)
                lsb = builder.and_(builder.lshr(u, sixteen), ir.Constant(i32, 1))
                rounded = builder.add(builder.add(u, ir.Constant(i32, 0x7FFF)), lsb)
                return builder.trunc(builder.lshr(rounded, sixteen), ir.IntType(16))

            return types.uint16(x, out), codegen
        if storage == types.int16:

            def codegen(context, builder, signature, args):
                return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))

            return types.int16(x, out), codegen
        if isinstance(storage, types.Float):

            def codegen(context, builder, signature, args):
                return context.cast(builder, args[0], x, storage)

            return storage(x, out), codegen
        return None

    return SimpleNamespace(f32_from_bits=f32_from_bits, bits_from_f32=bits_from_f32, f32_from_half=f32_from_half,
                           half_from_f32=half_from_f32, widen=widen, narrow=narrow)  # fmt: skip
