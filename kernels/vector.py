"""16-byte loads and stores for the CUDA kernels: four float32 in one instruction.

numba-cuda has no vector loads: an array read is one ``ld.global.f32``.  A
streaming kernel with scalar loads peaks at ~81 % of a device-to-device copy on
an H100, with 16-byte loads at ~95 % (design.md 4.2, measured 2026-11-28).
``load4(a, k)`` reads ``a[k : k + 4]`` of a 1-D C-contiguous float32 array
through a ``<4 x float>`` pointer with 16-byte alignment, which NVVM emits as
one ``ld.global.v4.f32`` (``store4`` likewise ``st.global.v4.f32``; the PTX
test asserts both).  The caller guarantees the alignment: ``k`` a multiple of
4 and the array's address a multiple of 16 (``aligned16``).

Under the simulator (no NVVM) they are plain Python over the four elements,
so the kernels that use them run in CI unchanged.
"""

from numba import cuda, types

CUDASIM = bool(cuda.config.ENABLE_CUDASIM)


@cuda.jit(device=True)
def quad_grid(size, inner):
    """Where a thread of a 16-byte-load elementwise kernel works, over ``size``
    values in C-contiguous rows of ``inner`` (a multiple of 4): (rows, quads per
    row, first row, row step, first quad, quad step); grid.y strides over rows,
    grid.x over the quads of a row."""
    TX, TY = cuda.blockDim.x, cuda.blockDim.y
    row0 = cuda.blockIdx.y * TY + cuda.threadIdx.y
    quad0 = cuda.blockIdx.x * TX + cuda.threadIdx.x
    return size // inner, inner // 4, row0, cuda.gridDim.y * TY, quad0, cuda.gridDim.x * TX


def device_address(a) -> int:
    """The device address of a numba device array's first element."""
    if CUDASIM:  # the simulator's arrays wrap NumPy arrays
        return a.ctypes.data
    return a.device_ctypes_pointer.value


def aligned16(*arrays) -> bool:
    """Whether every array starts at a multiple of 16 bytes (``load4``'s condition)."""
    return all(device_address(a) % 16 == 0 for a in arrays)


if CUDASIM:

    def load4(a, k):
        """(a[k], a[k + 1], a[k + 2], a[k + 3])."""
        return a[k], a[k + 1], a[k + 2], a[k + 3]

    def store4(a, k, v0, v1, v2, v3):
        """a[k : k + 4] = v0, v1, v2, v3."""
        a[k] = v0
        a[k + 1] = v1
        a[k + 2] = v2
        a[k + 3] = v3

else:
    from llvmlite import ir
    from numba.cuda.extending import intrinsic

    _VEC4 = ir.VectorType(ir.FloatType(), 4)

    def _float32_vector(a, k):
        return (
            isinstance(a, types.Array)
            and a.ndim == 1
            and a.layout == "C"
            and a.dtype == types.float32
            and isinstance(k, types.Integer)
        )

    def _vector_pointer(context, builder, arrty, arr, k):
        data = context.make_array(arrty)(context, builder, arr).data
        return builder.bitcast(builder.gep(data, [k]), _VEC4.as_pointer())

    @intrinsic
    def load4(typingctx, a, k):
        """(a[k], ..., a[k + 3]) of a 1-D C-contiguous float32 array, one 16-byte load."""
        if not _float32_vector(a, k):
            return None
        sig = types.UniTuple(types.float32, 4)(a, k)

        def codegen(context, builder, signature, args):
            vec = builder.load(_vector_pointer(context, builder, signature.args[0], *args), align=16)
            parts = [builder.extract_element(vec, ir.Constant(ir.IntType(32), j)) for j in range(4)]
            return context.make_tuple(builder, signature.return_type, parts)

        return sig, codegen

    @intrinsic
    def store4(typingctx, a, k, v0, v1, v2, v3):
        """a[k : k + 4] = v0, ..., v3 (float32), one 16-byte store."""
        if not _float32_vector(a, k):
            return None
        sig = types.void(a, k, types.float32, types.float32, types.float32, types.float32)

        def codegen(context, builder, signature, args):
            vec = ir.Constant(_VEC4, ir.Undefined)
            for j, v in enumerate(args[2:]):
                vec = builder.insert_element(vec, v, ir.Constant(ir.IntType(32), j))
            builder.store(vec, _vector_pointer(context, builder, signature.args[0], args[0], args[1]), align=16)
            return context.get_dummy_value()

        return sig, codegen
