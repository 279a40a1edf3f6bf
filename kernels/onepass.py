"""Small and mid tensors: one launch per pass, a block owning whole channels.

When a channel holds few values (at most ``ONE_PASS_MAX`` per channel), the
split reduction's machinery (partials in a workspace, a ticket, a last block,
then a second launch for the elementwise pass) costs more than the work.  Here
one block owns whole channels, reduces them, computes the per-channel
constants and applies them, re-reading its channels from L1/L2 instead of
handing partials to another launch.  Forward (training), for channel c with
its n counted values (the True positions of a mask, or all of them):

    1.  S = sum(x - K)                         K: one counted value of the channel
        m = K + S / n, rounded to the          (S per thread in the compute
            compute dtype                       dtype, float64 across threads)
    2.  D = sum(x - m),  Q = sum((x - m)**2)   x - m exact wherever x is within
                                               a factor 2 of m (Sterbenz)
        mean = m + D / n,  M2 = Q - D**2 / n   the corrected two-pass variance:
                                               exact algebra for any m, no
                                               cancellation at any offset
        then one thread: coef[:, c] and the running statistics
        (``stats.finish_channel``, the split path's own finalize)
    3.  y = g((x - mean) * scale + bias (+ z))  (y None: statistics only)

Backward, for channel c (``backward.py`` has the derivation):

    1.  s1 = sum(dv),  s2 = sum(dv * (x - mean))     dv = dy, or dy * g'(v)
        then one thread: dgamma, dbeta, bcoef[:, c]
        (``backward.finish_backward_channel``)
    2.  dx = A * dv + w * (B * (x - mean) + K)

Traffic: x (and dy) come from DRAM once; the re-reads hit L1/L2 while the
tensor is small, so the forward moves ~2B and the backward ~3B (B = x.nbytes)
in one launch, against 3B and 5B in two launches for the split path.

Two access regimes, as everywhere (``kernels/__init__.py``):
``*_onepass_cuda_inner`` (inner > 1: grid (C,), a block per channel, threads
over (rows, inner)) and ``*_onepass_cuda_channels`` (inner == 1: grid
(ceil(C / TX),), a block per tile of TX contiguous channels, TY threads per
channel walking its rows).

A plan (``plan.py``) chooses between these kernels and the split passes
(``stats.py``, ``normalize.py``, ``backward.py``) by the values per channel
(``one_pass``), once per call shape.
"""

import numba
from numba import cuda

from . import common
from .activation import activate
from .backward import dv_cuda, finish_backward_channel_cuda, input_grad_at
from .common import (
    B_CONST,
    B_X,
    BIAS,
    CUDASIM,
    MAX_THREADS,
    MEAN,
    SCALE,
    block_shape,
    block_sum2,
    gpu_kernel,
    next_pow2,
    sm_count,
    tree_sum2,
)
from .stats import finish_channel_cuda

#: Most values per channel for which one block owns a channel (one launch per
#: pass).  On a GPU: (32, 2048, 7, 7) (1568 per channel) and (4096, 512)
#: (4096 per channel) take one launch; (64, 256, 28, 28) (50 176) takes the
#: split path.  Chosen from the shapes, NOT yet measured on a card (the design
#: probe, design.md 4.2, ran one launch of this kind at 39 us on (4096, 512)
#: against torch's 59 us).  The simulator gets a small limit so that its tiny
#: test shapes run both paths.
ONE_PASS_MAX_GPU = 1 << 14
ONE_PASS_MAX = 64 if CUDASIM else ONE_PASS_MAX_GPU
#: ... and most bytes of x: the re-reads must hit L2 (50 MB on an H100, 60 MB
#: on an H200, with y or dx beside x), else one launch reads x from DRAM three
#: times where the split passes read it twice.
ONE_PASS_MAX_BYTES = 32 << 20


#: Inputs of at most this many bytes are host-bound on any card (a launch costs
#: more host time than moving them takes): one launch however few blocks it fills.
HOST_BOUND_BYTES = 1 << 20


def one_pass(shape, itemsize: int = 4) -> bool:
    """Whether a canonical view (outer, C, inner) of ``itemsize``-byte values
    takes the one-launch kernels: few values per channel, x small enough to be
    re-read from L2, and either enough channels (blocks) for two per SM or so
    small that the launch is host-bound ((4096, 512) gave 16 blocks of 32
    channels to a 132-SM card: it takes the split passes)."""
    outer, C, inner = shape
    nbytes = outer * C * inner * itemsize
    if outer * inner > ONE_PASS_MAX or nbytes > ONE_PASS_MAX_BYTES:
        return False
    blocks = one_pass_config(shape)[1][0]
    return nbytes <= HOST_BOUND_BYTES or blocks >= 2 * sm_count()


def one_pass_config(shape):
    """(regime, grid, block) of the one-launch kernels for a view shape.

    inner > 1: a block per channel, TX threads along inner (``block_shape``).
    inner == 1: a block per tile of TX <= 32 channels (a warp reads 32
    contiguous values), the other threads of the block walking the rows.
    """
    outer, C, inner = shape
    if inner > 1:
        return "inner", (C,), block_shape(outer, C, inner)
    if common.BLOCK_OVERRIDE is not None:
        tx, ty = common.BLOCK_OVERRIDE
    else:
        tx = min(32, next_pow2(C))
        ty = MAX_THREADS // tx
    return "channels", (-(-C // tx),), (tx, ty)


# ----------------------------------------------------------------------------
# forward


@gpu_kernel(whole_warps=True)
def forward_onepass_cuda_inner(
    x,  # (outer, C, inner) input, float16/32/64
    mask,  # None, or (outer, inner) bool: only True positions give the statistics
    origin,  # int: flat (o * inner + i) index of a counted position (0 without a mask)
    n,  # float: counted values per channel
    coef,  # (5, C) out: MEAN, VAR, INVSTD, SCALE, BIAS (accumulation dtype)
    gamma,  # (C,)
    beta,  # (C,)
    rmean,  # (C,) running mean, updated in place when update
    rvar,  # (C,) running (unbiased) variance, updated in place when update
    eps,  # float
    momentum,  # float
    update,  # bool
    act,  # int: an ACTIVATIONS code (0: none)
    z,  # None, or (outer, C, inner) residual added before the activation
    y,  # None (statistics only), or (outer, C, inner) out, x's dtype
):
    """Grid (C,), block (TX, TY): block c owns channel c."""
    outer, C, inner = x.shape
    acc = coef.dtype.type
    c = cuda.blockIdx.x
    tx, ty = cuda.threadIdx.x, cuda.threadIdx.y
    TX, TY = cuda.blockDim.x, cuda.blockDim.y
    t = ty * TX + tx
    a1 = cuda.shared.array(MAX_THREADS, numba.float64)
    a2 = cuda.shared.array(MAX_THREADS, numba.float64)

    ob = origin // inner
    k = acc(x[ob, c, origin - ob * inner])
    s = acc(0)
    for o in range(ty, outer, TY):
        for i in range(tx, inner, TX):
            if mask is None or mask[o, i]:
                s += acc(x[o, c, i]) - k
    block_sum2(a1, a2, s, 0.0, t, TX * TY)
    m = acc(numba.float64(k) + a1[0] / n)  # the mean, rounded to the compute dtype
    cuda.syncthreads()  # every thread has read a1[0]

    d1 = acc(0)
    d2 = acc(0)
    for o in range(ty, outer, TY):
        for i in range(tx, inner, TX):
            if mask is None or mask[o, i]:
                d = acc(x[o, c, i]) - m  # exact where x is within 2x of m (Sterbenz)
                d1 += d
                d2 += d * d
    block_sum2(a1, a2, d1, d2, t, TX * TY)
    if t == 0:
        q = a1[0] / n  # what m's rounding left of the mean
        m2 = a2[0] - a1[0] * q
        finish_channel_cuda(c, n, numba.float64(m) + q, m2, coef, gamma, beta, rmean, rvar, eps, momentum, update)
    cuda.syncthreads()  # coef[:, c] written (visible to the block after the barrier)

    if y is not None:
        m = coef[MEAN, c]
        sc = coef[SCALE, c]
        b = coef[BIAS, c]
        for o in range(ty, outer, TY):
            for i in range(tx, inner, TX):
                v = (acc(x[o, c, i]) - m) * sc + b
                if z is not None:
                    v += acc(z[o, c, i])
                y[o, c, i] = activate(v, act)


@gpu_kernel
def forward_onepass_cuda_channels(
    x,  # (outer, C, 1) input, channels contiguous
    mask,  # None, or (outer, 1) bool: only True rows give the statistics
    origin,  # int: a counted row (0 without a mask)
    n,  # float: counted values per channel
    coef,  # (5, C) out: MEAN, VAR, INVSTD, SCALE, BIAS
    gamma,  # (C,)
    beta,  # (C,)
    rmean,  # (C,) running mean
    rvar,  # (C,) running variance
    eps,  # float
    momentum,  # float
    update,  # bool
    act,  # int: an ACTIVATIONS code (0: none)
    z,  # None, or (outer, C, 1) residual
    y,  # None (statistics only), or (outer, C, 1) out
):
    """Grid (ceil(C / TX),), block (TX, TY): thread (tx, ty) of block ``tile``
    walks rows ty, ty + TY, ... of channel tile * TX + tx."""
    outer, C, _ = x.shape
    acc = coef.dtype.type
    tx, ty = cuda.threadIdx.x, cuda.threadIdx.y
    TX, TY = cuda.blockDim.x, cuda.blockDim.y
    t = ty * TX + tx
    c = cuda.blockIdx.x * TX + tx
    a1 = cuda.shared.array(MAX_THREADS, numba.float64)
    a2 = cuda.shared.array(MAX_THREADS, numba.float64)

    k = acc(0)
    s = acc(0)
    if c < C:
        k = acc(x[origin, c, 0])
        for o in range(ty, outer, TY):
            if mask is None or mask[o, 0]:
                s += acc(x[o, c, 0]) - k
    a1[t] = s
    a2[t] = 0.0
    cuda.syncthreads()
    tree_sum2(a1, a2, ty, tx, TX, TY)
    m = acc(numba.float64(k) + a1[tx] / n)
    cuda.syncthreads()

    d1 = acc(0)
    d2 = acc(0)
    if c < C:
        for o in range(ty, outer, TY):
            if mask is None or mask[o, 0]:
                d = acc(x[o, c, 0]) - m
                d1 += d
                d2 += d * d
    a1[t] = d1
    a2[t] = d2
    cuda.syncthreads()
    tree_sum2(a1, a2, ty, tx, TX, TY)
    if ty == 0 and c < C:
        q = a1[tx] / n
        m2 = a2[tx] - a1[tx] * q
        finish_channel_cuda(c, n, numba.float64(m) + q, m2, coef, gamma, beta, rmean, rvar, eps, momentum, update)
    cuda.syncthreads()

    if y is not None and c < C:
        m = coef[MEAN, c]
        sc = coef[SCALE, c]
        b = coef[BIAS, c]
        for o in range(ty, outer, TY):
            v = (acc(x[o, c, 0]) - m) * sc + b
            if z is not None:
                v += acc(z[o, c, 0])
            y[o, c, 0] = activate(v, act)


# ----------------------------------------------------------------------------
# backward


@gpu_kernel(whole_warps=True)
def backward_onepass_cuda_inner(
    dy,  # (outer, C, inner) upstream gradient
    x,  # (outer, C, inner) forward input
    mask,  # None, or (outer, inner) bool: positions that gave the statistics (training only)
    coef,  # (5, C) forward constants (MEAN, VAR, INVSTD, SCALE, BIAS)
    bcoef,  # (5, C) out: MEAN, A, B, K, BIAS
    dgamma,  # (C,) out
    dbeta,  # (C,) out
    training,  # bool: the statistics came from this batch
    n,  # float: values per channel the statistics came from
    act,  # None, or an ACTIVATIONS code: dy is the gradient w.r.t. g(v)
    z,  # None, or (outer, C, inner) the forward's residual (with act)
    dx,  # (outer, C, inner) out
    dz,  # None, or (outer, C, inner) out: dv, the residual's gradient (with act)
):
    """Grid (C,), block (TX, TY): block c owns channel c."""
    outer, C, inner = x.shape
    acc = coef.dtype.type
    c = cuda.blockIdx.x
    tx, ty = cuda.threadIdx.x, cuda.threadIdx.y
    TX, TY = cuda.blockDim.x, cuda.blockDim.y
    t = ty * TX + tx
    m = coef[MEAN, c]
    sc = coef[SCALE, c]
    b = coef[BIAS, c]
    s1 = acc(0)
    s2 = acc(0)
    for o in range(ty, outer, TY):
        for i in range(tx, inner, TX):
            if mask is None or mask[o, i]:  # padding never enters the sums
                g, d = dv_cuda(dy, x, z, o, c, i, coef, m, sc, b, act)
                s1 += g
                s2 += g * d
    a1 = cuda.shared.array(MAX_THREADS, numba.float64)
    a2 = cuda.shared.array(MAX_THREADS, numba.float64)
    block_sum2(a1, a2, s1, s2, t, TX * TY)
    if t == 0:
        finish_backward_channel_cuda(c, n, a1[0], a2[0], coef, training, bcoef, dgamma, dbeta)
    cuda.syncthreads()  # bcoef[:, c] written

    bx = bcoef[B_X, c]  # A is the forward's SCALE (sc): finish_backward_channel copies it
    kc = bcoef[B_CONST, c]
    for o in range(ty, outer, TY):
        for i in range(tx, inner, TX):
            input_grad_at(dy, x, z, mask, o, c, i, coef, m, sc, b, bx, kc, act, dx, dz)


@gpu_kernel
def backward_onepass_cuda_channels(
    dy,  # (outer, C, 1) upstream gradient, channels contiguous
    x,  # (outer, C, 1) forward input
    mask,  # None, or (outer, 1) bool: rows that gave the statistics (training only)
    coef,  # (5, C) forward constants
    bcoef,  # (5, C) out: MEAN, A, B, K, BIAS
    dgamma,  # (C,) out
    dbeta,  # (C,) out
    training,  # bool
    n,  # float
    act,  # None, or an ACTIVATIONS code
    z,  # None, or (outer, C, 1) the forward's residual (with act)
    dx,  # (outer, C, 1) out
    dz,  # None, or (outer, C, 1) out: dv (with act)
):
    """Grid (ceil(C / TX),), block (TX, TY), as forward_onepass_cuda_channels."""
    outer, C, _ = x.shape
    acc = coef.dtype.type
    tx, ty = cuda.threadIdx.x, cuda.threadIdx.y
    TX, TY = cuda.blockDim.x, cuda.blockDim.y
    t = ty * TX + tx
    c = cuda.blockIdx.x * TX + tx
    s1 = acc(0)
    s2 = acc(0)
    m = acc(0)
    sc = acc(0)
    b = acc(0)
    if c < C:
        m = coef[MEAN, c]
        sc = coef[SCALE, c]
        b = coef[BIAS, c]
        for o in range(ty, outer, TY):
            if mask is None or mask[o, 0]:  # padding never enters the sums
                g, d = dv_cuda(dy, x, z, o, c, 0, coef, m, sc, b, act)
                s1 += g
                s2 += g * d
    a1 = cuda.shared.array(MAX_THREADS, numba.float64)
    a2 = cuda.shared.array(MAX_THREADS, numba.float64)
    a1[t] = s1
    a2[t] = s2
    cuda.syncthreads()
    tree_sum2(a1, a2, ty, tx, TX, TY)
    if ty == 0 and c < C:
        finish_backward_channel_cuda(c, n, a1[tx], a2[tx], coef, training, bcoef, dgamma, dbeta)
    cuda.syncthreads()

    if c < C:
        bx = bcoef[B_X, c]
        kc = bcoef[B_CONST, c]
        for o in range(ty, outer, TY):
            input_grad_at(dy, x, z, mask, o, c, 0, coef, m, sc, b, bx, kc, act, dx, dz)
