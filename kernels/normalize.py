"""The elementwise pass: normalize, then scale and shift.

For each element of the canonical view ``x`` (outer, C, inner)

    y[o, c, i] = g((x[o, c, i] - mean[c]) * scale[c] + bias[c] (+ z[o, c, i]))

g the activation (identity, relu, sigmoid, tanh: ``activation.py``), z an
optional residual (None: none; a None argument removes its branch at compile
time), both fused into the same pass,

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

from .activation import activate, forward_at
from .common import (
    JIT_STEP,
    JIT_STREAM,
    channel_launch_config,
    channel_parts,
    cpu_driver,
    cpu_kernel,
    gpu_kernel,
    launches,
    task_channels,
    twin,
)
from .half import narrow, widen
from .rows import B_CONST, B_DY, B_X, BIAS, INVSTD, MEAN, SCALE, VAR
from .stats import finish_channels_cpu, moments_channels_cpu, moments_inner_cpu
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


@numba.njit(**JIT_STEP)
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


@numba.njit(inline="always", **JIT_STREAM)
def _forward_at(x, z, i, m, s, b, act, y):
    """y[i] = g((x[i] - m) * s + b (+ z[i])) (m, s, b: the channel's MEAN,
    SCALE, BIAS): the forward's element on the CPU (``activation.forward_at``
    is the GPU's); z and the token ``act`` (None: none) are constants to the compiler."""
    v = (widen(x[i]) - m) * s + b
    if z is not None:
        v += widen(z[i])
    if act is not None:
        v = activate(v, len(act))
    y[i] = narrow(v, y)


@cpu_kernel
def scale_shift_inner_cpu(x, z, coef, act, y):
    """scale_shift_cpu for inner > 1: x, z, y (outer, C, inner)."""
    outer, C, inner = x.shape
    parts = channel_parts(outer, C)
    for k in prange(outer * parts):
        o, c0, c1 = task_channels(k, parts, C)
        for c in range(c0, c1):
            m, s, b = coef[MEAN, c], coef[SCALE, c], coef[BIAS, c]
            for i in range(inner):
                _forward_at(x, z, (o, c, i), m, s, b, act, y)


@cpu_kernel
def scale_shift_channels_cpu(x, z, coef, act, y):
    """scale_shift_cpu for inner == 1: x, z, y (outer, C), channels contiguous."""
    outer, C = x.shape
    # coef indexed directly (not as row views): fewer arrays that might alias
    # y, so the compiler's runtime alias checks still allow vectorising
    for o in prange(outer):
        for c in range(C):
            _forward_at(x, z, (o, c), coef[MEAN, c], coef[SCALE, c], coef[BIAS, c], act, y)


# ----------------------------------------------------------------------------
# CPU: one driver per op (one call from Python: the kernels and the per-channel steps between them)


@cpu_driver
def forward_train_inner_cpu(x, mask, coef, gamma, beta, rmean, rvar, eps, momentum, update, act, z, y):
    """Training forward on x (outer, C, inner), inner > 1: statistics of the
    True positions of ``mask`` (outer, inner) (None: all), coef (5, C) and
    the running statistics (``update``), then y = g(BN(x) (+ z)) (y None:
    statistics only).  act: a token (``activation.TOKENS``)."""
    moments = np.empty((3, x.shape[1]))
    moments_inner_cpu(x, mask, moments)
    finish_channels_cpu(moments, coef, gamma, beta, rmean, rvar, eps, momentum, update)
    if y is not None:
        scale_shift_inner_cpu(x, z, coef, act, y)


@cpu_driver
def forward_train_channels_cpu(x, xf, rows, coef, gamma, beta, rmean, rvar, eps, momentum, update, act, z, y):
    """forward_train_inner_cpu for x, z, y (outer, C), channels contiguous;
    xf, rows: as ``stats.moments_channels_cpu``."""
    moments = np.empty((3, x.shape[1]))
    moments_channels_cpu(x, xf, rows, moments)
    finish_channels_cpu(moments, coef, gamma, beta, rmean, rvar, eps, momentum, update)
    if y is not None:
        scale_shift_channels_cpu(x, z, coef, act, y)


@cpu_driver
def forward_eval_inner_cpu(x, mean, var, gamma, beta, eps, coef, act, z, y):
    """coef (5, C) from the given (C,) statistics, then y = g(BN(x) (+ z));
    x, z, y (outer, C, inner), inner > 1."""
    affine_coefficients_cpu(mean, var, gamma, beta, eps, coef)
    scale_shift_inner_cpu(x, z, coef, act, y)


@cpu_driver
def forward_eval_channels_cpu(x, mean, var, gamma, beta, eps, coef, act, z, y):
    """forward_eval_inner_cpu for x, z, y (outer, C), channels contiguous."""
    affine_coefficients_cpu(mean, var, gamma, beta, eps, coef)
    scale_shift_channels_cpu(x, z, coef, act, y)


def scale_shift_cpu(x, coef, y, act=None, z=None):
    """y = g((x - mean) * scale + bias (+ z)) on (outer, C, inner) views x, z, y
    (float32/64, or float16 as its bits: ``half.bits``); act: None, or the
    activation as a token (``activation.TOKENS``), z None for no residual."""
    if x.shape[2] > 1:
        scale_shift_inner_cpu(x, z, coef, act, y)
    else:  # a 2-D view: the compiler then knows the channels are contiguous
        scale_shift_channels_cpu(x[:, :, 0], None if z is None else z[:, :, 0], coef, act, y[:, :, 0])


@gpu_kernel
def scale_shift_cuda_inner(
    x,  # (outer, C, inner) input
    z,  # None, or (outer, C, inner) residual added before the activation
    coef,  # (5, C) per-channel MEAN, SCALE, BIAS (accumulation dtype)
    act,  # None, or an ACTIVATIONS code
    y,  # (outer, C, inner) out, x's dtype
):
    """y = g((x - mean) * scale + bias (+ z)).  Block (TX, TY); grid.y
    strides over the outer*C rows, grid.x over inner."""
    outer, C, inner = x.shape
    tx, ty, TX, TY = cuda.threadIdx.x, cuda.threadIdx.y, cuda.blockDim.x, cuda.blockDim.y
    for r in range(cuda.blockIdx.y * TY + ty, outer * C, cuda.gridDim.y * TY):  # rows (o, c) of the view
        o = r // C
        c = r - o * C
        m, s, b = coef[MEAN, c], coef[SCALE, c], coef[BIAS, c]
        for i in range(cuda.blockIdx.x * TX + tx, inner, cuda.gridDim.x * TX):
            forward_at(x, z, o, c, i, m, s, b, act, y)


@gpu_kernel
def scale_shift_cuda_channels(
    x,  # (outer, C, 1) input, channels contiguous
    z,  # None, or (outer, C, 1) residual
    coef,  # (5, C) per-channel MEAN, SCALE, BIAS
    act,  # None, or an ACTIVATIONS code
    y,  # (outer, C, 1) out
):
    """scale_shift_cuda_inner for inner == 1.  Block (TX, TY); grid.x tiles
    channels, grid.y strides over rows."""
    outer, C, _ = x.shape
    c = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    if c < C:
        m, s, b = coef[MEAN, c], coef[SCALE, c], coef[BIAS, c]
        TY = cuda.blockDim.y
        for o in range(cuda.blockIdx.y * TY + cuda.threadIdx.y, outer, cuda.gridDim.y * TY):
            forward_at(x, z, o, c, 0, m, s, b, act, y)


@gpu_kernel
def elementwise_cuda_vec4(
    x,  # (outer * C * inner,) float32 input: the C-contiguous view, flat, 16-byte aligned
    z,  # None, or (outer * C * inner,) float32 residual (forward), 16-byte aligned
    dy,  # None (forward), or (outer * C * inner,) float32 upstream gradient (input gradient)
    coef,  # (5, C) float32: MEAN, SCALE, BIAS (forward), or bcoef's B_MEAN, B_DY, B_X, B_CONST
    act,  # None, or an ACTIVATIONS code (forward)
    out,  # (outer * C * inner,) float32 out: y, or dx; 16-byte aligned
    inner,  # int: a multiple of 4, so that every row starts 16-byte aligned
):
    """Both elementwise passes with 16-byte loads and stores: thread (tx, ty)
    takes quads of four values along a row (grid.x over quads, grid.y over
    rows), each one ``ld.global.v4.f32`` per array and one ``st.global.v4.f32``.

    Forward (dy None): y = g((x - mean) * scale + bias (+ z)).
    Input gradient (dy given: plain batch norm): dx = A * dy + B * (x - mean) + K.
    ``dy is None`` is decided when the kernel is compiled."""
    C = coef.shape[1]
    rows, quads, row0, drow, quad0, dquad = quad_grid(x.shape[0], inner)
    for r in range(row0, rows, drow):
        c = r - (r // C) * C
        m = coef[MEAN, c]  # = B_MEAN
        if dy is None:
            s, b, k = coef[SCALE, c], coef[BIAS, c], coef[BIAS, c]
        else:
            s, b, k = coef[B_DY, c], coef[B_X, c], coef[B_CONST, c]
        for q in range(quad0, quads, dquad):
            e = r * inner + 4 * q
            v0, v1, v2, v3 = load4(x, e)
            if dy is None:
                v0, v1, v2, v3 = (v0 - m) * s + b, (v1 - m) * s + b, (v2 - m) * s + b, (v3 - m) * s + b
                if z is not None:
                    z0, z1, z2, z3 = load4(z, e)
                    v0, v1, v2, v3 = v0 + z0, v1 + z1, v2 + z2, v3 + z3
                if act is not None:
                    v0, v1, v2, v3 = activate(v0, act), activate(v1, act), activate(v2, act), activate(v3, act)
                store4(out, e, v0, v1, v2, v3)
            else:
                g0, g1, g2, g3 = load4(dy, e)
                store4(
                    out, e,
                    s * g0 + (b * (v0 - m) + k), s * g1 + (b * (v1 - m) + k),
                    s * g2 + (b * (v2 - m) + k), s * g3 + (b * (v3 - m) + k),
                )  # fmt: skip


def vec4_fits(x, *others) -> bool:
    """Whether ``elementwise_cuda_vec4`` can take x and the arrays of its
    shape beside it (outer, C, inner): float32, C-contiguous, inner a multiple
    of 4, every one 16-byte aligned."""
    return (
        x.shape[2] % 4 == 0
        and all(a.dtype == np.float32 and a.is_c_contiguous() for a in (x, *others))
        and aligned16(x, *others)
    )


def launch_scale_shift_cuda(x, coef, y, act=None, z=None, stream=0, launch=None):
    """y = g((x - mean) * scale + bias (+ z)) on the GPU, one launch (16-byte
    loads for float32 rows of a multiple of 4 starting 16-byte aligned).

    x, z, y: (outer, C, inner) device arrays (float16/32/64; y may be x for in
    place); coef: (5, C) device array of the accumulation dtype; launch: the
    shape's ``common.Launches`` (a plan's), or None to choose here.
    """
    launch = launch or launches(x.shape)
    others = (y,) if z is None else (z, y)
    if launch.quads is not None and vec4_fits(x, *others):  # quads of four along inner: 16-byte loads
        (grid, block), size = launch.quads, x.size
        flat = None if z is None else z.reshape(size)
        x1, y1 = x.reshape(size), y.reshape(size)
        elementwise_cuda_vec4[grid, block, stream](x1, flat, None, coef, act, y1, x.shape[2])
        return
    regime, grid, block = launch.elementwise
    kernel = scale_shift_cuda_inner if regime == "inner" else scale_shift_cuda_channels
    kernel[grid, block, stream](x, z, coef, act, y)


def launch_affine_coefficients_cuda(mean, var, gamma, beta, eps, coef, stream=0):
    """coef (5, C) device array from (C,) device arrays mean, var, gamma, beta."""
    grid, block = channel_launch_config(coef.shape[1])
    affine_coefficients_cuda[grid, block, stream](mean, var, gamma, beta, coef.dtype.type(eps), coef)
