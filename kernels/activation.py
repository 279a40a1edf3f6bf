"""Batch norm followed by an activation, and a residual added before it.

Forward, one elementwise pass instead of two or three:

    v = (x - mean) * scale + bias  (+ z)        the pre-activation
    y = g(v),   g = identity | relu | sigmoid | tanh

The backward recomputes v from x (and z) and the per-channel constants, so v is
never stored: the gradient reaching batch norm (and the residual) is

    dv = dy * g'(v):   relu: [v > 0]   sigmoid: g(v) (1 - g(v))   tanh: 1 - g(v)**2

and batch norm's own backward runs on dv: the backward kernels (``backward.py``)
compute dv inline where they read dy, with ``slope`` below, at plain batch
norm's traffic.

The activation travels as an int (``ACTIVATIONS``); without a residual the
forward kernels here take x itself in z's place and a ``residual=False`` flag, so
z is never read (the backward kernels take None).
"""

import math

import numba
import numpy as np
from numba import cuda, prange

from .common import JIT, JIT_STREAM, channel_parts, cpu_kernel, gpu_kernel, task_channels
from .half import bits, narrow, widen
from .normalize import elementwise_launch_config, vec4_launch
from .stats import BIAS, MEAN, SCALE
from .vector import load4, quad_grid, store4

NONE, RELU, SIGMOID, TANH = range(4)
#: activation name -> the code the kernels take
ACTIVATIONS = {None: NONE, "relu": RELU, "sigmoid": SIGMOID, "tanh": TANH}

#: 0 and 1 as float32 constants: with a Python literal (0, 1.0) numba computes
#: float32 values in float64 (float64 exp and division per element on a GPU);
#: float32 constants keep float32 arithmetic float32 and float64 float64
_ZERO = np.float32(0.0)
_ONE = np.float32(1.0)


@numba.njit(inline="always", **JIT)
def activate(v, act):
    """g(v) for activation code ``act`` (NaN stays NaN)."""
    if act == RELU:
        return v if v > 0 else v * _ZERO
    if act == SIGMOID:
        return _ONE / (_ONE + math.exp(-v))
    if act == TANH:
        return math.tanh(v)
    return v


def act_token(code: int) -> tuple:
    """The activation as the CPU backward kernels take it: a tuple of ``code``
    Nones.  Its length is a constant to the compiler, so every activation gets
    its own compiled loop with no branch on the activation (vectorised), and
    plain batch norm, ``()``, none of the activation's code."""
    return (None,) * int(code)


@numba.njit(**JIT_STREAM)  # the flags of the CPU kernels that call it: cacheable
def relu_slope(v):
    """relu'(v): 1 where v > 0 (1 and 0 are exact in float32: float32 arithmetic stays float32)."""
    return _ONE if v > 0 else _ZERO


@numba.njit(**JIT_STREAM)  # the flags of the CPU kernels that call it: cacheable
def sigmoid_slope(v):
    """sigmoid'(v) = s (1 - s), s = sigmoid(v)."""
    s = _ONE / (_ONE + math.exp(-v))
    return s * (_ONE - s)


@numba.njit(**JIT_STREAM)  # the flags of the CPU kernels that call it: cacheable
def tanh_slope(v):
    """tanh'(v) = 1 - tanh(v)**2."""
    t = math.tanh(v)
    return _ONE - t * t


@numba.njit(inline="always", **JIT)
def slope(v, act):
    """g'(v), the derivative of the activation ``act`` at the pre-activation v.

    The CUDA kernels branch on ``act`` per element (a uniform branch); the CPU
    kernels pass ``len`` of an ``act_token``, a constant, so that the compiler
    folds the branches and sees one branch-free loop per activation."""
    if act == RELU:
        return relu_slope(v)
    if act == SIGMOID:
        return sigmoid_slope(v)
    if act == TANH:
        return tanh_slope(v)
    return _ONE


# ----------------------------------------------------------------------------
# CPU twins


@cpu_kernel
def scale_shift_act_inner_cpu(x, z, coef, act, residual, y):
    """y = g((x - mean) * scale + bias (+ z)); x, z, y (outer, C, inner)."""
    outer, C, inner = x.shape
    parts = channel_parts(outer, C)
    for k in prange(outer * parts):
        o, c0, c1 = task_channels(k, parts, C)
        for c in range(c0, c1):
            m = coef[MEAN, c]
            s = coef[SCALE, c]
            b = coef[BIAS, c]
            for i in range(inner):
                v = (widen(x[o, c, i]) - m) * s + b
                if residual:
                    v += widen(z[o, c, i])
                y[o, c, i] = narrow(activate(v, act), y)


@cpu_kernel
def scale_shift_act_channels_cpu(x, z, coef, act, residual, y):
    """The same for inner == 1: x, z, y (outer, C), channels contiguous."""
    outer, C = x.shape
    for o in prange(outer):
        for c in range(C):
            v = (widen(x[o, c]) - coef[MEAN, c]) * coef[SCALE, c] + coef[BIAS, c]
            if residual:
                v += widen(z[o, c])
            y[o, c] = narrow(activate(v, act), y)


def launch_scale_shift_act_cpu(x, z, coef, act, residual, y):
    """y = g((x - mean) * scale + bias (+ z)) on (outer, C, inner) views.

    x, z, y: float16/32/64 of one dtype (z may be x itself when ``residual`` is
    False); coef (5, C) of the compute dtype; act: an ACTIVATIONS code.
    """
    x, z, y = bits(x), bits(z), bits(y)
    if x.shape[2] > 1:
        scale_shift_act_inner_cpu(x, z, coef, act, residual, y)
    else:
        scale_shift_act_channels_cpu(x[:, :, 0], z[:, :, 0], coef, act, residual, y[:, :, 0])


# ----------------------------------------------------------------------------
# CUDA kernels


@gpu_kernel
def scale_shift_act_cuda_inner(
    x,  # (outer, C, inner) input
    z,  # (outer, C, inner) residual (x itself when residual is False)
    coef,  # (5, C) per-channel MEAN, SCALE, BIAS (accumulation dtype)
    act,  # int: an ACTIVATIONS code
    residual,  # bool: add z
    y,  # (outer, C, inner) out, x's dtype
):
    """The grid of scale_shift_cuda_inner."""
    outer, C, inner = x.shape
    acc = coef.dtype.type
    tx, ty = cuda.threadIdx.x, cuda.threadIdx.y
    TX, TY = cuda.blockDim.x, cuda.blockDim.y
    for r in range(cuda.blockIdx.y * TY + ty, outer * C, cuda.gridDim.y * TY):
        o = r // C
        c = r - o * C
        m = coef[MEAN, c]
        s = coef[SCALE, c]
        b = coef[BIAS, c]
        for i in range(cuda.blockIdx.x * TX + tx, inner, cuda.gridDim.x * TX):
            v = (acc(x[o, c, i]) - m) * s + b
            if residual:
                v += acc(z[o, c, i])
            y[o, c, i] = activate(v, act)


@gpu_kernel
def scale_shift_act_cuda_channels(
    x,  # (outer, C, 1) input, channels contiguous
    z,  # (outer, C, 1) residual (x itself when residual is False)
    coef,  # (5, C) per-channel MEAN, SCALE, BIAS
    act,  # int: an ACTIVATIONS code
    residual,  # bool
    y,  # (outer, C, 1) out
):
    """The grid of scale_shift_cuda_channels."""
    outer, C, _ = x.shape
    acc = coef.dtype.type
    c = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    if c < C:
        m = coef[MEAN, c]
        s = coef[SCALE, c]
        b = coef[BIAS, c]
        TY = cuda.blockDim.y
        for o in range(cuda.blockIdx.y * TY + cuda.threadIdx.y, outer, cuda.gridDim.y * TY):
            v = (acc(x[o, c, 0]) - m) * s + b
            if residual:
                v += acc(z[o, c, 0])
            y[o, c, 0] = activate(v, act)


@gpu_kernel
def scale_shift_act_cuda_vec4(
    x,  # (outer * C * inner,) float32 input: the C-contiguous view, flat, 16-byte aligned
    z,  # (outer * C * inner,) float32 residual (x itself when residual is False), 16-byte aligned
    coef,  # (5, C) float32 per-channel MEAN, SCALE, BIAS
    act,  # int: an ACTIVATIONS code
    residual,  # bool: add z
    y,  # (outer * C * inner,) float32 out, 16-byte aligned
    inner,  # int: a multiple of 4
):
    """scale_shift_act_cuda_inner with 16-byte loads and stores (the quads of
    normalize.scale_shift_cuda_vec4)."""
    C = coef.shape[1]
    rows, quads, row0, drow, quad0, dquad = quad_grid(x.shape[0], inner)
    for r in range(row0, rows, drow):
        c = r - (r // C) * C
        m = coef[MEAN, c]
        s = coef[SCALE, c]
        b = coef[BIAS, c]
        for q in range(quad0, quads, dquad):
            k = r * inner + 4 * q
            v0, v1, v2, v3 = load4(x, k)
            v0, v1, v2, v3 = (v0 - m) * s + b, (v1 - m) * s + b, (v2 - m) * s + b, (v3 - m) * s + b
            if residual:
                z0, z1, z2, z3 = load4(z, k)
                v0, v1, v2, v3 = v0 + z0, v1 + z1, v2 + z2, v3 + z3
            store4(y, k, activate(v0, act), activate(v1, act), activate(v2, act), activate(v3, act))


def launch_scale_shift_act_cuda(x, z, coef, act, residual, y, stream=0):
    """launch_scale_shift_act_cpu on device arrays: one launch (16-byte loads
    for float32 rows of a multiple of 4 starting 16-byte aligned)."""
    vec = vec4_launch(x, z, y)
    if vec is not None:
        grid, block, size = vec
        flat = [a.reshape(size) for a in (x, z, y)]
        scale_shift_act_cuda_vec4[grid, block, stream](flat[0], flat[1], coef, act, bool(residual), flat[2], x.shape[2])
        return
    regime, grid, block = elementwise_launch_config(x.shape)
    kernel = scale_shift_act_cuda_inner if regime == "inner" else scale_shift_act_cuda_channels
    kernel[grid, block, stream](x, z, coef, act, bool(residual), y)
