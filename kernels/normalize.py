"""The elementwise pass: normalize, then scale and shift.

For each element of the canonical view ``x`` (outer, C, inner)

    y[o, c, i] = (x[o, c, i] - mean[c]) * scale[c] + bias[c]

with ``scale = gamma / sqrt(var + eps)`` and ``bias = beta`` precomputed once per
channel in ``coef`` (rows MEAN, SCALE, BIAS of the (5, C) layout of
``stats.py``).  This is the course's ``z_norm = (z - mu) / sqrt(var + eps)``,
``z~ = gamma * z_norm + beta`` as one subtract and one multiply-add.  Keeping the
subtraction (rather than folding it into ``x * scale + shift``) costs nothing in
a memory-bound pass and keeps two guarantees: data with a large offset loses no
digits to cancellation, and a constant channel maps to exactly ``beta``.

``affine_coefficients_*`` fills coef from given mean/var (inference, or
``gpubn.normalize``).
"""

import math

import numba
import numpy as np
from numba import cuda, prange

from .common import JIT, block_shape, channel_parts, cpu_kernel, gpu_kernel, sm_count, task_channels, twin
from .half import bits, narrow, widen
from .stats import BIAS, INVSTD, MEAN, SCALE, VAR
from .vector import aligned16, load4, quad_grid, store4

# ----------------------------------------------------------------------------
# per-channel constants from given statistics


def affine_channel(c, mean, var, gamma, beta, eps, coef):
    """coef[:, c] from mean, biased variance, gamma, beta."""
    invstd = 1.0 / math.sqrt(var[c] + eps)
    coef[MEAN, c] = mean[c]
    coef[VAR, c] = var[c]
    coef[INVSTD, c] = invstd
    coef[SCALE, c] = gamma[c] * invstd
    coef[BIAS, c] = beta[c]


affine_channel_cpu, affine_channel_cuda = twin(affine_channel)


@numba.njit(**JIT)
def affine_coefficients_cpu(mean, var, gamma, beta, eps, coef):
    """coef (5, C) out from (C,) mean, var, gamma, beta and float eps."""
    for c in range(coef.shape[1]):
        affine_channel_cpu(c, mean, var, gamma, beta, eps, coef)


@gpu_kernel
def affine_coefficients_cuda(
    mean,  # (C,) mean to normalize with
    var,  # (C,) biased variance
    gamma,  # (C,)
    beta,  # (C,)
    eps,  # float
    coef,  # (5, C) out
):
    """1-D grid over channels."""
    c = cuda.grid(1)
    if c < coef.shape[1]:
        affine_channel_cuda(c, mean, var, gamma, beta, eps, coef)

    # ----------------------------------------------------------------------------
    # the elementwise pass


@cpu_kernel
def scale_shift_inner_cpu(x, coef, y):
    """scale_shift_cpu for inner > 1: x, y (outer, C, inner)."""
    outer, C, inner = x.shape
    parts = channel_parts(outer, C)
    for k in prange(outer * parts):
        o, c0, c1 = task_channels(k, parts, C)
        for c in range(c0, c1):
            m = coef[MEAN, c]
            s = coef[SCALE, c]
            b = coef[BIAS, c]
            for i in range(inner):
                y[o, c, i] = narrow((widen(x[o, c, i]) - m) * s + b, y)


@cpu_kernel
def scale_shift_channels_cpu(x, coef, y):
    """scale_shift_cpu for inner == 1: x, y (outer, C), channels contiguous."""
    outer, C = x.shape
    # coef indexed directly (not as row views): fewer arrays that might alias
    # y, so the compiler's runtime alias checks still allow vectorising
    for o in prange(outer):
        for c in range(C):
            y[o, c] = narrow((widen(x[o, c]) - coef[MEAN, c]) * coef[SCALE, c] + coef[BIAS, c], y)


def scale_shift_cpu(x, coef, y):
    """y = (x - mean) * scale + bias on (outer, C, inner) views x and y
    (float32/64, or float16 as its bits: ``half.bits``)."""
    if x.shape[2] > 1:
        scale_shift_inner_cpu(x, coef, y)
    else:  # a 2-D view: the compiler then knows the channels are contiguous
        scale_shift_channels_cpu(x[:, :, 0], coef, y[:, :, 0])


@gpu_kernel
def scale_shift_cuda_inner(
    x,  # (outer, C, inner) input
    coef,  # (5, C) per-channel MEAN, SCALE, BIAS (accumulation dtype)
    y,  # (outer, C, inner) out, x's dtype
):
    """Block (TX, TY); grid.y strides over the outer*C rows, grid.x over inner."""
    outer, C, inner = x.shape
    tx, ty = cuda.threadIdx.x, cuda.threadIdx.y
    TX, TY = cuda.blockDim.x, cuda.blockDim.y
    for r in range(cuda.blockIdx.y * TY + ty, outer * C, cuda.gridDim.y * TY):
        o = r // C
        c = r - o * C
        m = coef[MEAN, c]
        s = coef[SCALE, c]
        b = coef[BIAS, c]
        for i in range(cuda.blockIdx.x * TX + tx, inner, cuda.gridDim.x * TX):
            y[o, c, i] = (x[o, c, i] - m) * s + b


@gpu_kernel
def scale_shift_cuda_channels(
    x,  # (outer, C, 1) input, channels contiguous
    coef,  # (5, C) per-channel MEAN, SCALE, BIAS
    y,  # (outer, C, 1) out
):
    """Block (TX, TY); grid.x tiles channels, grid.y strides over rows."""
    outer, C, _ = x.shape
    c = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    if c < C:
        m = coef[MEAN, c]
        s = coef[SCALE, c]
        b = coef[BIAS, c]
        TY = cuda.blockDim.y
        for o in range(cuda.blockIdx.y * TY + cuda.threadIdx.y, outer, cuda.gridDim.y * TY):
            y[o, c, 0] = (x[o, c, 0] - m) * s + b


@gpu_kernel
def scale_shift_cuda_vec4(
    x,  # (outer * C * inner,) float32 input: the C-contiguous view, flat, 16-byte aligned
    coef,  # (5, C) float32 per-channel MEAN, SCALE, BIAS
    y,  # (outer * C * inner,) float32 out, 16-byte aligned
    inner,  # int: a multiple of 4, so that every row starts 16-byte aligned
):
    """scale_shift_cuda_inner with 16-byte loads and stores: thread (tx, ty)
    takes quads of four values along a row (grid.x over quads, grid.y over
    rows), each one ``ld.global.v4.f32`` and one ``st.global.v4.f32``."""
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
            store4(y, k, (v0 - m) * s + b, (v1 - m) * s + b, (v2 - m) * s + b, (v3 - m) * s + b)


def vec4_launch(x, *others):
    """(grid, block, size) of a 16-byte-load elementwise kernel over the
    (outer, C, inner) view x and the arrays of its shape beside it (``vec4_fits``
    for each, inner > 1), or None where the scalar kernel must run."""
    outer, C, inner = x.shape
    if inner == 1 or not all(vec4_fits(x, a) for a in others):
        return None
    _, grid, block = elementwise_launch_config((outer, C, inner // 4))
    return grid, block, outer * C * inner


def vec4_fits(x, y) -> bool:
    """Whether ``scale_shift_cuda_vec4`` can take x and y (outer, C, inner):
    float32, C-contiguous, inner a multiple of 4, both 16-byte aligned."""
    return (
        x.dtype == np.float32
        and y.dtype == np.float32
        and x.shape[2] % 4 == 0
        and x.is_c_contiguous()
        and y.is_c_contiguous()
        and aligned16(x, y)
    )


def elementwise_launch_config(shape):
    """(regime, grid, block) for an elementwise pass over a canonical view.

    Enough blocks for ~32 resident per SM; each thread then strides over several
    elements (independent loads in flight), never dividing per element.
    """
    outer, C, inner = shape
    tx, ty = block_shape(outer, C, inner)
    budget = 32 * sm_count()
    if inner > 1:
        gx = min(-(-inner // tx), 65535)
        gy = max(1, min(-(-(outer * C) // ty), budget // gx, 65535))
        return "inner", (gx, gy), (tx, ty)
    gx = -(-C // tx)
    gy = max(1, min(-(-outer // ty), max(1, budget // gx), 65535))
    return "channels", (gx, gy), (tx, ty)


def launch_scale_shift_cpu(x, coef, y):
    """y = (x - mean) * scale + bias.

    x, y: (outer, C, inner) float16/32/64 (float16 is computed in float32 and
    rounded once); coef (5, C) of x's compute dtype.
    """
    scale_shift_cpu(bits(x), coef, bits(y))


def launch_scale_shift_cuda(x, coef, y, stream=0):
    """y = (x - mean) * scale + bias on the GPU, one launch.

    x, y: (outer, C, inner) device arrays (float16/32/64; y may be x for in place);
    coef: (5, C) device array of the accumulation dtype.
    """
    vec = vec4_launch(x, y)
    if vec is not None:  # quads of four along inner: 16-byte loads
        grid, block, size = vec
        scale_shift_cuda_vec4[grid, block, stream](x.reshape(size), coef, y.reshape(size), x.shape[2])
        return
    regime, grid, block = elementwise_launch_config(x.shape)
    kernel = scale_shift_cuda_inner if regime == "inner" else scale_shift_cuda_channels
    kernel[grid, block, stream](x, coef, y)


def launch_affine_coefficients_cpu(mean, var, gamma, beta, eps, coef):
    """coef (5, C) from (C,) mean, var, gamma, beta."""
    affine_coefficients_cpu(mean, var, gamma, beta, eps, coef)


def launch_affine_coefficients_cuda(mean, var, gamma, beta, eps, coef, stream=0):
    """coef (5, C) device array from (C,) device arrays mean, var, gamma, beta."""
    C = coef.shape[1]
    threads = min(128, max(32, C))
    affine_coefficients_cuda[-(-C // threads), threads, stream](mean, var, gamma, beta, coef.dtype.type(eps), coef)
