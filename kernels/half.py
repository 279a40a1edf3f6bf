"""float16 and bfloat16 on the CPU, where numba has neither type.

The CPU kernels take float16 arrays as their raw bits (``bits(x)``: a uint16
view) and compute in float32: every load goes through ``widen`` and every
store through ``narrow``, which convert inline and vectorise, so a float16
tensor moves half the bytes of a float32 one (no converted copies).
``compute_dtype(x)`` is the dtype they compute in.  (NumPy's own ``astype``
to or from float16 runs at ~1.6 ns per element here, twenty times slower than
the whole conversion-fused forward pass.)  The CUDA kernels read and write
float16 directly.

bfloat16 (from gpubn.torch) comes the same way, as int16 bits: its value is
the float32 whose top 16 bits they are, so ``widen`` is a shift and ``narrow``
rounds the float32 bits to nearest even (NaN kept quiet).  The dtype of the
bits says which format they hold: uint16 float16, int16 bfloat16.

Bit recipes: F. Giesen, "half_to_float_fast2" and "float_to_half_fast3_rtne"
(round to nearest even; NaN stays NaN, overflow becomes Inf, subnormals exact).
Both rely on exact IEEE float additions of magic constants: compiled without
fastmath.
"""

import platform

import numba
import numpy as np
from llvmlite import binding as llvm
from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload

from .common import JIT


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
    exponent.  No branch: it vectorises."""
    o = numba.uint32(h & 0x7FFF) << numba.uint32(13)
    f = _as_float(o) * _as_float(numba.uint32((254 - 15) << 23))
    was_inf_nan = numba.uint32(f >= _as_float(numba.uint32((127 + 16) << 23)))
    bits = _as_bits(f) | was_inf_nan * numba.uint32(255 << 23)
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


@numba.njit(inline="always", **JIT)
def bfloat16_to_float(h):
    """float32 value of the bfloat16 bits ``h`` (int16): exact, a shift."""
    return _as_float(numba.uint32(numba.uint16(h)) << numba.uint32(16))


@numba.njit(inline="always", **JIT)
def float_to_bfloat16(x):
    """bfloat16 bits (int16) of the float32 ``x``, rounded to nearest even;
    NaN stays a (quiet) NaN, overflow becomes Inf.  No branch: it vectorises."""
    u = _as_bits(numba.float32(x))
    rounded = (u + numba.uint32(0x7FFF) + ((u >> numba.uint32(16)) & numba.uint32(1))) >> numba.uint32(16)
    quiet_nan = (u >> numba.uint32(16)) | numba.uint32(0x0040)
    is_nan = (u & numba.uint32(0x7FFFFFFF)) > numba.uint32(0x7F800000)
    return numba.int16(quiet_nan if is_nan else rounded)


def bits(a):
    """``a`` as the CPU kernels take it: float16 arrays as their uint16 bits."""
    return a.view(np.uint16) if a.dtype == np.float16 else a


def widen(v):
    """(in kernels) A value loaded from a kernel array, as computed with:
    float16 bits (uint16) and bfloat16 bits (int16) become float32; floats
    are unchanged."""


def narrow(v, out):
    """(in kernels) ``v`` as stored into array ``out``: float16 bits (uint16)
    or bfloat16 bits (int16), rounded to nearest even, when ``out`` holds
    them, else ``v``."""


def compute_dtype(a):
    """(in kernels) The dtype the kernels compute in for array ``a``:
    float32 for float16/bfloat16 bits and float32, float64 for float64."""


@intrinsic
def _fpext_half(typingctx, h):
    """float32 of the float16 bits ``h`` by LLVM's ``fpext half``: one
    vcvtph2ps per 16 values with F16C / AVX-512."""
    if h != types.uint16:
        return None

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return types.float32(types.uint16), codegen


@intrinsic
def _fptrunc_half(typingctx, f):
    """float16 bits of the float32 ``f`` by LLVM's ``fptrunc`` (IEEE round to
    nearest even): one vcvtps2ph per 16 values with F16C / AVX-512."""
    if f != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))

    return types.uint16(types.float32), codegen


def hardware_half() -> bool:
    """Whether LLVM turns half <-> float into instructions here: numba compiles
    for this host (no NUMBA_CPU_NAME / NUMBA_CPU_FEATURES) and the host is
    x86-64 with F16C or 64-bit ARM.  Elsewhere LLVM would call runtime
    functions the JIT may not have, so the bit recipes above are used."""
    from numba.core import config

    if config.CPU_NAME or config.CPU_FEATURES:
        return False
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64"):
        try:
            return bool(llvm.get_host_cpu_features().get("f16c", False))
        except Exception:  # features unknown: stay portable
            return False
    return machine in ("aarch64", "arm64")


HARDWARE_HALF = hardware_half()


@overload(widen, inline="always")
def _widen(v):
    if v == types.uint16:
        return (lambda v: _fpext_half(v)) if HARDWARE_HALF else (lambda v: half_to_float(v))
    if v == types.int16:
        return lambda v: bfloat16_to_float(v)
    if isinstance(v, types.Float):
        return lambda v: v
    return None


@overload(narrow, inline="always")
def _narrow(v, out):
    if isinstance(out, types.Array) and out.dtype == types.uint16:
        if HARDWARE_HALF:
            return lambda v, out: _fptrunc_half(numba.float32(v))
        return lambda v, out: float_to_half(v)
    if isinstance(out, types.Array) and out.dtype == types.int16:
        return lambda v, out: float_to_bfloat16(v)
    return lambda v, out: v


@overload(compute_dtype, inline="always")
def _compute_dtype(a):
    if a.dtype == types.float64:
        return lambda a: np.float64
    return lambda a: np.float32
