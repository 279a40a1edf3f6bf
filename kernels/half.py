"""float16 <-> float32 on the CPU, where numba has no float16 type.

The CPU kernels compute in float32; float16 arrays are converted by these two
elementwise kernels, which work on the raw bits (``x.view(np.uint16)``) and
vectorise (NumPy's own ``astype`` runs at ~1.6 ns per element here, ten times
slower).  The CUDA kernels read and write float16 directly.

Bit recipes: F. Giesen, "half_to_float_fast2" and "float_to_half_fast3_rtne"
(round to nearest even; NaN stays NaN, overflow becomes Inf, subnormals exact).
Both rely on exact IEEE float additions of magic constants: compiled without
fastmath.
"""

import numba
import numpy as np
from llvmlite import ir
from numba import prange, types
from numba.extending import intrinsic

from .common import JIT, cpu_kernel
from .workspace import host_empty


@intrinsic
def _as_float(typingctx, u):
    """The float32 whose bits are the low 32 bits of the integer ``u``."""
    if not isinstance(u, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        bits = args[0]
        if u.bitwidth > 32:
            bits = builder.trunc(bits, ir.IntType(32))
        return builder.bitcast(bits, ir.FloatType())

    return types.float32(u), codegen


@intrinsic
def _as_bits(typingctx, f):
    """The uint32 bits of the float32 ``f``."""
    if f != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.uint32(types.float32), codegen


@numba.njit(inline="always", **JIT)
def half_to_float(h):
    """float32 value of the float16 bits ``h`` (uint16).

    The exponent/mantissa bits, placed as a float32 and multiplied by 2**112,
    give the value exactly (subnormals included); Inf/NaN keep an all-ones
    exponent.  No branch but a select: it vectorises."""
    o = numba.uint32(h & 0x7FFF) << numba.uint32(13)
    f = _as_float(o) * _as_float(numba.uint32((254 - 15) << 23))
    bits = _as_bits(f)
    if f >= _as_float(numba.uint32((127 + 16) << 23)):  # was Inf / NaN
        bits |= numba.uint32(255 << 23)
    return _as_float(bits | (numba.uint32(h & 0x8000) << numba.uint32(16)))


@numba.njit(inline="always", **JIT)
def float_to_half(x):
    """float16 bits (uint16) of the float32 ``x``, rounded to nearest even."""
    u = _as_bits(numba.float32(x))
    sign = u & numba.uint32(0x80000000)
    u ^= sign
    if u >= numba.uint32((127 + 16) << 23):  # overflow, Inf or NaN
        o = numba.uint32(0x7E00) if u > numba.uint32(255 << 23) else numba.uint32(0x7C00)
    elif u < numba.uint32(113 << 23):  # subnormal or zero: let the FPU round
        magic = numba.uint32(((127 - 15) + (23 - 10) + 1) << 23)
        o = (_as_bits(_as_float(u) + _as_float(magic)) - magic) & numba.uint32(0xFFFFFFFF)
    else:
        mant_odd = (u >> numba.uint32(13)) & numba.uint32(1)
        u = (u + numba.uint32((((15 - 127) << 23) + 0xFFF) & 0xFFFFFFFF) + mant_odd) & numba.uint32(0xFFFFFFFF)
        o = u >> numba.uint32(13)
    o |= sign >> numba.uint32(16)
    return numba.uint16(o)


@cpu_kernel
def _to_float32(src, dst):
    for i in prange(src.shape[0]):
        dst[i] = half_to_float(src[i])


@cpu_kernel
def _to_float16(src, dst):
    for i in prange(src.shape[0]):
        dst[i] = float_to_half(src[i])


def to_float32(a):
    """A float32 copy of the float16 array ``a`` (any shape and strides)."""
    src = np.ascontiguousarray(a).view(np.uint16).reshape(-1)
    out = host_empty(a.shape, np.float32)
    _to_float32(src, out.reshape(-1))
    return out


def store_float16(src, dst):
    """dst[...] = src for float32 ``src`` and a float16 ``dst`` of one shape."""
    src = np.ascontiguousarray(src, np.float32).reshape(-1)
    if dst.flags.c_contiguous:
        _to_float16(src, dst.reshape(-1).view(np.uint16))
    else:
        tmp = host_empty(dst.shape, np.float16)
        _to_float16(src, tmp.reshape(-1).view(np.uint16))
        dst[...] = tmp
