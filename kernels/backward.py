"""The backward pass of batch normalization.

With ``xhat = (x - mean) * invstd`` and ``y = gamma * xhat + beta``, for each
channel c over its n = outer * inner values:

    dbeta[c]  = sum(dy)
    dgamma[c] = sum(dy * xhat) = invstd * sum(dy * (x - mean))

Training (mean and invstd are functions of x):

    dx = gamma * invstd / n * (n * dy - sum(dy) - xhat * sum(dy * xhat))
       = A * dy + B * (x - mean) + K,   with
    A = gamma * invstd
    B = -gamma * invstd**3 * sum(dy * (x - mean)) / n
    K = -gamma * invstd * sum(dy) / n

Inference (running statistics are constants): ``dx = A * dy`` (B = K = 0).

Masked batch norm (statistics from the n positions where a mask w is True,
every position normalized with them): positions outside the mask are padding.
The backward takes their dy as 0 whatever dy and x hold there: they never
enter the sums (dgamma, dbeta, B and K come from the True positions only), and
dx (and the residual's gradient) is 0 there.  That is the exact gradient when
dy is 0 outside the mask, as a masked loss gives; NaN padding and zero padding
give the same gradients.

Fused with an activation (y = g(v), v = BN(x) (+ z)), dy above becomes
dv = dy * g'(v), v recomputed from x (and z) where dy is read: every kernel
takes the activation's code ``act`` (None for plain batch norm: a None argument
removes the branch at compile time) and does that inline, at plain batch norm's
traffic plus the residual's read; the elementwise pass also writes dv, the
residual's gradient, when there is one.

Two passes, as for the forward: a split reduction of the two sums per channel
(``backward_sums_*``) that also finalizes dgamma, dbeta and the per-channel
constants ``bcoef`` (5, C) = (MEAN, A, B, K, BIAS); then the elementwise
``input_grad_*`` pass.  Traffic: dy and x read twice, dx written once (5B).  On
the GPU, where a channel fits one block (``common.one_pass``), the sums kernel
writes dx itself after finalizing: one launch, the re-read from L1/L2.
"""

import numba
import numpy as np
from numba import cuda, prange

from .activation import slope
from .common import (
    CHUNK,
    JIT,
    JIT_STREAM,
    MAX_THREADS,
    block_sum2,
    channel_parts,
    coherent,
    cpu_driver,
    cpu_kernel,
    gpu_kernel,
    last_block,
    launches,
    part_of,
    reduction_slot,
    repeat_groups,
    row_blocks,
    sum_parts,
    task_channels,
    twin,
)
from .half import compute_dtype, narrow, widen
from .normalize import elementwise_cuda_vec4, vec4_fits
from .rows import B_BIAS, B_CONST, B_DY, B_MEAN, B_X, BIAS, INVSTD, MEAN, SCALE
from .workspace import workspace


def finish_backward_channel(c, n, sum_dy, sum_dyx, coef, training, bcoef, dgamma, dbeta):
    """dgamma[c], dbeta[c] and bcoef[:, c] from the two sums of channel c.

    A = gamma * invstd is the forward's own ``coef[SCALE]``: the backward reads
    gamma only through the forward's constants, so a gamma changed after the
    forward (an optimizer step) cannot leak into the gradient."""
    invstd = coef[INVSTD, c]
    a = coef[SCALE, c]
    dbeta[c] = sum_dy
    dgamma[c] = sum_dyx * invstd
    bcoef[B_MEAN, c] = coef[MEAN, c]
    bcoef[B_DY, c] = a
    bcoef[B_BIAS, c] = coef[BIAS, c]
    if training:
        bcoef[B_X, c] = -a * invstd * invstd * sum_dyx / n
        bcoef[B_CONST, c] = -a * sum_dy / n
    else:
        bcoef[B_X, c] = 0.0
        bcoef[B_CONST, c] = 0.0


finish_backward_channel_cpu, finish_backward_channel_cuda = twin(finish_backward_channel)


@cuda.jit(device=True)
def dv_cuda(dy, x, z, o, c, i, coef, m, sc, b, act):
    """(dv, x - m) at [o, c, i] of dy, x (and z), in coef's dtype: dv = dy, or
    with an activation dy * g'(v), v = (x - m) * sc + b (+ z) recomputed (m,
    sc, b: the channel's MEAN, SCALE, BIAS).  The one place of the fused
    arithmetic on the GPU (``_dv`` is the CPU's); act None and z None remove
    their branches at compile time."""
    acc = coef.dtype.type
    g = acc(dy[o, c, i])
    d = acc(x[o, c, i]) - m
    if act is not None:
        v = d * sc + b
        if z is not None:
            v += acc(z[o, c, i])
        g *= acc(slope(v, act))
    return g, d


@cuda.jit(device=True)
def input_grad_at(dy, x, z, mask, o, c, i, coef, m, a, beta, bx, k, act, dx, dz):
    """dx[o, c, i] = A * dv + B * (x - m) + K (and dz[o, c, i] = dv), or 0 in
    both where ``mask`` (None: every position counts) marks padding, whose
    values are then never read.  m, a, beta: the channel's MEAN, A (SCALE),
    BIAS; bx, k: its B and K.  The one place of the input gradient's element
    on the GPU (the elementwise pass and the sums kernels' one-launch tail)."""
    if mask is None or mask[o, i]:
        g, d = dv_cuda(dy, x, z, o, c, i, coef, m, a, beta, act)
        if dz is not None:
            dz[o, c, i] = g
        dx[o, c, i] = a * g + (bx * d + k)
    else:
        if dz is not None:
            dz[o, c, i] = 0
        dx[o, c, i] = 0


# ----------------------------------------------------------------------------
# CPU twin
#
# Fused with an activation, the kernels turn dy into dv = dy * g'(v) where they
# read it.  They take the activation as a token (``activation.TOKENS``: a
# tuple whose length is the code, () for plain batch norm), a constant to the
# compiler: each activation gets its own branch-free loop, which it vectorises.


@numba.njit(inline="always", **JIT_STREAM)
def _dv(dy, x, z, i, m, s, b, act):
    """(dv, x - m) at index i of dy, x (and z): dv = dy, or with an activation
    dy * g'(v), v = (x - m) * s + b (+ z) recomputed (m, s, b: the channel's
    MEAN, SCALE, BIAS).  The one place of the fused arithmetic on the CPU."""
    d = widen(x[i]) - m
    g = widen(dy[i])
    if act is not None:  # fused: a constant to the compiler
        v = d * s + b
        if z is not None:
            v += widen(z[i])
        g = g * compute_dtype(dy)(slope(v, len(act)))
    return g, d


@numba.njit(**JIT_STREAM)  # not inlined: the None test on ``keep`` must stay an argument's
def _run_sums(dy, x, z, keep, m, s, b, act):
    """sum(dv) and sum(dv * (x - m)) of 1-D runs dy, x (and z), in their compute
    dtype, over the positions where ``keep`` is True (None: all of them)."""
    s1 = compute_dtype(dy)(0)
    s2 = compute_dtype(dy)(0)
    for i in range(dy.shape[0]):
        if keep is None or keep[i]:
            g, d = _dv(dy, x, z, i, m, s, b, act)
            s1 += g
            s2 += g * d
    return s1, s2


@cpu_kernel
def backward_sums_inner_cpu(dy, x, coef, out, act, z, mask):
    """backward_sums_cpu for inner > 1: dy, x, z (outer, C, inner); mask None or (outer, inner)."""
    outer, C, inner = x.shape
    part = np.empty((2, outer, C))
    parts = channel_parts(outer, C)
    for k in prange(outer * parts):
        o, c0, c1 = task_channels(k, parts, C)
        for c in range(c0, c1):
            m, s, b = coef[MEAN, c], coef[SCALE, c], coef[BIAS, c]
            t1, t2 = 0.0, 0.0
            for start in range(0, inner, CHUNK):
                stop = min(start + CHUNK, inner)
                run = (o, c, slice(start, stop))
                s1, s2 = _run_sums(dy[run], x[run], part_of(z, run), part_of(mask, (o, run[2])), m, s, b, act)
                t1 += s1
                t2 += s2
            part[0, o, c] = t1
            part[1, o, c] = t2
    sum_parts(part, out)


@numba.njit(inline="always", **JIT_STREAM)
def _terms(dy, x, z, coef, o, c, act):
    """dv and dv * (x - mean) at (o, c) of 2-D dy, x, z."""
    g, d = _dv(dy, x, z, (o, c), coef[MEAN, c], coef[SCALE, c], coef[BIAS, c], act)
    return g, g * d


@numba.njit(inline="always", **JIT_STREAM)
def _rows_sums(dy, x, z, coef, o0, o1, s1, s2, act, rows):
    """s1 += sum(dv), s2 += sum(dv * (x - mean)) over rows [o0, o1) of 2-D dy, x, z
    (vectorised across the C contiguous channels; s1, s2: (C,)); only the rows
    where ``rows`` (outer,) bool is True when it is given (masked batch norm)."""
    C = x.shape[1]
    if rows is not None:
        for o in range(o0, o1):
            if rows[o]:
                for c in range(C):
                    g, h = _terms(dy, x, z, coef, o, c, act)
                    s1[c] += g
                    s2[c] += h
        return
    quads = o0 + (o1 - o0) // 4 * 4
    for o in range(o0, quads, 4):  # four rows a step: s1, s2, in memory, updated once
        for c in range(C):
            g0, h0 = _terms(dy, x, z, coef, o, c, act)
            g1, h1 = _terms(dy, x, z, coef, o + 1, c, act)
            g2, h2 = _terms(dy, x, z, coef, o + 2, c, act)
            g3, h3 = _terms(dy, x, z, coef, o + 3, c, act)
            s1[c] += (g0 + g1) + (g2 + g3)
            s2[c] += (h0 + h1) + (h2 + h3)
    for o in range(quads, o1):
        for c in range(C):
            g, h = _terms(dy, x, z, coef, o, c, act)
            s1[c] += g
            s2[c] += h


@cpu_kernel
def backward_sums_channels_cpu(dy, x, coef, out, act, z, rows):
    """backward_sums_cpu for inner == 1: dy, x, z (outer, C), channels contiguous;
    coef (5, C) the forward constants; rows None or (outer,) bool (the mask)."""
    outer, C = x.shape
    # rows of C contiguous values: a few row blocks per thread, float64
    # running sums per channel fed by input-dtype sums over cache-sized
    # sub-blocks of rows (vectorised across C)
    blocks, rows_per, sub = row_blocks(outer, C)
    part = np.empty((2, blocks, C))  # zeroed block by block, in parallel
    for k in prange(blocks):
        s1 = np.empty(C, compute_dtype(dy))
        s2 = np.empty(C, compute_dtype(dy))
        for c in range(C):  # loops, not slice fills: an array expression in a prange body compiles slowly
            part[0, k, c] = part[1, k, c] = 0.0
        end = min(outer, (k + 1) * rows_per)
        for o0 in range(k * rows_per, end, sub):
            for c in range(C):
                s1[c] = s2[c] = 0.0
            _rows_sums(dy, x, z, coef, o0, min(end, o0 + sub), s1, s2, act, rows)
            for c in range(C):
                part[0, k, c] += s1[c]
                part[1, k, c] += s2[c]
    sum_parts(part, out)


@cpu_driver(step=True)
def backward_sums_folded_cpu(dyf, xf, zf, coef, act, rows, out):
    """out (2, C) float64 <- sum(dv), sum(dv * (x - mean)) per channel of
    2-D dy, x (and z) with contiguous channels, folded f rows side by side
    (``common.fold_rows``: (outer / f, f * C); f = 1 unfolded, and always
    with ``rows``, the (outer,) bool mask of the rows that count)."""
    C = coef.shape[1]
    f = xf.shape[1] // C
    part = np.empty((2, f * C))
    backward_sums_channels_cpu(dyf, xf, repeat_groups(coef, f), part, act, zf, rows)
    for j in range(2):
        for c in range(C):
            t = 0.0
            for g in range(f):
                t += part[j, g * C + c]
            out[j, c] = t


@numba.njit(**JIT)  # called, not inlined (as stats.finish_channels_cpu)
def finish_backward_cpu(sums, n, coef, training, bcoef, dgamma, dbeta):
    for c in range(coef.shape[1]):
        finish_backward_channel_cpu(c, n, sums[0, c], sums[1, c], coef, training, bcoef, dgamma, dbeta)


@numba.njit(inline="always", **JIT_STREAM)
def _grad_at(dy, x, z, i, kept, m, a, b, k, beta, act, dx, dz):
    """dx[i] = A * dv + B * (x[i] - m) + K (and dz[i] = dv when given), or 0
    in both where not ``kept`` (padding, whose values are never read); m, a,
    b, k, beta: the channel's MEAN, A, B, K, BIAS.  The input gradient's
    element on the CPU (``input_grad_at`` is the GPU's)."""
    g = compute_dtype(dy)(0)
    r = compute_dtype(dy)(0)
    if kept:
        g, d = _dv(dy, x, z, i, m, a, beta, act)
        r = a * g + (b * d + k)
    if dz is not None:
        dz[i] = narrow(g, dz)
    dx[i] = narrow(r, dx)


@cpu_kernel
def input_grad_inner_cpu(dy, x, mask, bcoef, dx, act, z, dz):
    """input_grad_cpu for inner > 1: dy, x, z, dx, dz (outer, C, inner); mask None or (outer, inner)."""
    outer, C, inner = x.shape
    parts = channel_parts(outer, C)
    for t in prange(outer * parts):
        o, c0, c1 = task_channels(t, parts, C)
        for c in range(c0, c1):  # the element inlined in the loop: rows may be short (16 values)
            m, a, b, k, beta = bcoef[B_MEAN, c], bcoef[B_DY, c], bcoef[B_X, c], bcoef[B_CONST, c], bcoef[B_BIAS, c]
            for i in range(inner):
                _grad_at(dy, x, z, (o, c, i), mask is None or mask[o, i], m, a, b, k, beta, act, dx, dz)


@cpu_kernel
def input_grad_channels_cpu(dy, x, mask, bcoef, dx, act, z, dz):
    """input_grad_cpu for inner == 1: dy, x, z, dx, dz (outer, C), channels
    contiguous; mask None or (outer,)."""
    for o in prange(x.shape[0]):  # the element inlined in the loop: rows may be short (C values)
        kept = mask is None or mask[o]
        for c in range(x.shape[1]):
            m, a, b, k, beta = bcoef[B_MEAN, c], bcoef[B_DY, c], bcoef[B_X, c], bcoef[B_CONST, c], bcoef[B_BIAS, c]
            _grad_at(dy, x, z, (o, c), kept, m, a, b, k, beta, act, dx, dz)


@cpu_driver
def backward_inner_cpu(dy, x, z, mask, coef, training, n, bcoef, dgamma, dbeta, act, dx, dz):
    """Both backward passes on dy, x, z, dx, dz (outer, C, inner), inner > 1:
    the sums over the True positions of ``mask`` (outer, inner) (None: all),
    dgamma, dbeta and bcoef, then dx = A * dv + B * (x - mean) + K (0 outside
    the mask; dz = dv when given).  n: the values per channel the forward's
    statistics came from; act: a token (``activation.TOKENS``)."""
    sums = np.empty((2, x.shape[1]))
    backward_sums_inner_cpu(dy, x, coef, sums, act, z, mask)
    finish_backward_cpu(sums, n, coef, training, bcoef, dgamma, dbeta)
    input_grad_inner_cpu(dy, x, mask, bcoef, dx, act, z, dz)


@cpu_driver
def backward_channels_cpu(dy, x, z, dyf, xf, zf, rows, coef, training, n, bcoef, dgamma, dbeta, act, dx, dz):
    """backward_inner_cpu for 2-D dy, x, z, dx, dz (outer, C), channels
    contiguous; dyf, xf, zf: folded views (``backward_sums_folded_cpu``);
    rows: None, or the (outer,) bool mask."""
    sums = np.empty((2, x.shape[1]))
    backward_sums_folded_cpu(dyf, xf, zf, coef, act, rows, sums)
    finish_backward_cpu(sums, n, coef, training, bcoef, dgamma, dbeta)
    input_grad_channels_cpu(dy, x, rows, bcoef, dx, act, z, dz)


# ----------------------------------------------------------------------------
# CUDA kernels


@gpu_kernel(whole_warps=True)
def backward_sums_cuda(
    dy,  # (outer, C, inner) upstream gradient
    x,  # (outer, C, inner) forward input
    coef,  # (5, C) forward constants (MEAN, VAR, INVSTD, SCALE, BIAS)
    work,  # (2, splits, C) float64 partial sums
    counter,  # (columns,) int32 blocks finished per column of blocks; zero between launches
    bcoef,  # (5, C) out: MEAN, A, B, K, BIAS
    dgamma,  # (C,) out
    dbeta,  # (C,) out
    training,  # bool: statistics came from this batch
    n,  # float: values per channel the statistics came from
    act,  # None, or an ACTIVATIONS code: dy is the gradient w.r.t. g(v)
    z,  # None, or (outer, C, inner) the forward's residual (with act)
    mask,  # None, or (outer, inner) bool: only True positions are summed
    inner_splits,  # int: splits along inner (inner > 1), or None: channels contiguous (inner == 1)
    dx,  # None, or (outer, C, inner) out (one block per column only: gridDim.y == 1)
    dz,  # None, or (outer, C, inner) out: dv, the residual's gradient (with dx and act)
):
    """Grid (columns, splits), block (TX, TY), the slices of batch_stats_cuda
    (``common.reduction_slot``)."""
    outer, C, inner = x.shape
    acc = coef.dtype.type  # float32, or float64 for float64 input
    ty, TX, TY = cuda.threadIdx.y, cuda.blockDim.x, cuda.blockDim.y
    s, splits, t, threads = cuda.blockIdx.y, cuda.gridDim.y, ty * TX + cuda.threadIdx.x, TX * TY
    c, width, o0, o1, i0, i1, ix, di = reduction_slot(outer, inner, inner_splits)
    s1 = s2 = m = sc = b = acc(0)
    if c < C:
        m, sc, b = coef[MEAN, c], coef[SCALE, c], coef[BIAS, c]
        for o in range(o0 + ty, o1, TY):
            for i in range(i0 + ix, i1, di):
                if mask is None or mask[o, i]:
                    g, d = dv_cuda(dy, x, z, o, c, i, coef, m, sc, b, act)
                    s1 += g
                    s2 += g * d

    a1 = cuda.shared.array(MAX_THREADS, numba.float64)
    a2 = cuda.shared.array(MAX_THREADS, numba.float64)
    flag = cuda.shared.array(1, numba.int32)
    block_sum2(a1, a2, s1, s2, t, threads, width)
    if t < width and c < C:  # thread t < width: row ty == 0, channel t of the block
        work[0, s, c] = a1[t]
        work[1, s, c] = a2[t]

    if last_block(counter, cuda.blockIdx.x, splits, flag):
        t1, t2 = 0.0, 0.0  # the partials of channel c, a stride of them per thread
        if c < C:
            for j in range(t // width, splits, threads // width):
                t1 += coherent(work, 0, j, c)
                t2 += coherent(work, 1, j, c)
        block_sum2(a1, a2, t1, t2, t, threads, width)
        if t < width and c < C:
            finish_backward_channel_cuda(c, n, a1[t], a2[t], coef, training, bcoef, dgamma, dbeta)
        if dx is not None:  # the block owns its channels: the input gradient, re-read from L1/L2
            cuda.syncthreads()  # bcoef[:, c] written
            if c < C:
                bx, kc = bcoef[B_X, c], bcoef[B_CONST, c]
                for o in range(ty, outer, TY):
                    for i in range(ix, inner, di):
                        input_grad_at(dy, x, z, mask, o, c, i, coef, m, sc, b, bx, kc, act, dx, dz)


@gpu_kernel
def input_grad_cuda_inner(
    dy,  # (outer, C, inner) upstream gradient
    x,  # (outer, C, inner) forward input
    mask,  # None, or (outer, inner) bool: positions that gave the statistics
    bcoef,  # (5, C) MEAN, A, B, K, BIAS
    dx,  # (outer, C, inner) out
    act,  # None, or an ACTIVATIONS code
    z,  # None, or (outer, C, inner) the forward's residual (with act)
    dz,  # None, or (outer, C, inner) out: dv, the residual's gradient
):
    """dx = A * dv + B * (x - mean) + K (0 outside the mask); the grid of scale_shift_cuda_inner."""
    outer, C, inner = x.shape
    tx, ty, TX, TY = cuda.threadIdx.x, cuda.threadIdx.y, cuda.blockDim.x, cuda.blockDim.y
    for r in range(cuda.blockIdx.y * TY + ty, outer * C, cuda.gridDim.y * TY):  # rows (o, c) of the view
        o = r // C
        c = r - o * C
        m = bcoef[B_MEAN, c]
        a = bcoef[B_DY, c]
        b = bcoef[B_X, c]
        k = bcoef[B_CONST, c]
        beta = bcoef[B_BIAS, c]
        for i in range(cuda.blockIdx.x * TX + tx, inner, cuda.gridDim.x * TX):
            input_grad_at(dy, x, z, mask, o, c, i, bcoef, m, a, beta, b, k, act, dx, dz)


@gpu_kernel
def input_grad_cuda_channels(
    dy,  # (outer, C, 1) upstream gradient
    x,  # (outer, C, 1) forward input
    mask,  # None, or (outer, 1) bool: rows that gave the statistics
    bcoef,  # (5, C) MEAN, A, B, K, BIAS
    dx,  # (outer, C, 1) out
    act,  # None, or an ACTIVATIONS code
    z,  # None, or (outer, C, 1) the forward's residual (with act)
    dz,  # None, or (outer, C, 1) out: dv, the residual's gradient
):
    """dx = A * dv + B * (x - mean) + K (0 outside the mask); the grid of scale_shift_cuda_channels."""
    outer, C, _ = x.shape
    c = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    if c < C:
        m = bcoef[B_MEAN, c]
        a = bcoef[B_DY, c]
        b = bcoef[B_X, c]
        k = bcoef[B_CONST, c]
        beta = bcoef[B_BIAS, c]
        TY = cuda.blockDim.y
        for o in range(cuda.blockIdx.y * TY + cuda.threadIdx.y, outer, cuda.gridDim.y * TY):
            input_grad_at(dy, x, z, mask, o, c, 0, bcoef, m, a, beta, b, k, act, dx, dz)


def launch_input_grad_cuda(dy, x, bcoef, dx, mask=None, act=None, z=None, dz=None, stream=0, launch=None):
    """The elementwise backward pass: 16-byte loads for plain float32 batch
    norm on aligned rows of a multiple of 4 (``normalize.vec4_fits``), else
    the scalar kernel of the view's regime (launch: ``common.Launches`` or None)."""
    launch = launch or launches(x.shape)
    if launch.quads is not None and mask is None and act is None and vec4_fits(x, dy, dx):
        (grid, block), size = launch.quads, x.size
        dy1, x1, dx1 = (a.reshape(size) for a in (dy, x, dx))
        elementwise_cuda_vec4[grid, block, stream](x1, None, dy1, bcoef, None, dx1, x.shape[2])
        return
    regime, grid, block = launch.elementwise
    kernel = input_grad_cuda_inner if regime == "inner" else input_grad_cuda_channels
    kernel[grid, block, stream](dy, x, mask, bcoef, dx, act, z, dz)


def launch_backward_cuda(
    dy, x, coef, training, bcoef, dgamma, dbeta, dx, mask=None, count=None, act=None, z=None, dz=None, stream=0,
    scratch=None, launch=None,
):  # fmt: skip
    """Both backward passes on the GPU: the sums, then the input gradient
    (one launch with a block per channel where ``launch.one_launch``).

    Args:
        dy, x: (outer, C, inner) device arrays, float16/32/64.
        coef: (5, C) forward constants (MEAN, VAR, INVSTD, SCALE, BIAS), the
            accumulation dtype, as bcoef (5, C) out (MEAN, A, B, K, BIAS) and
            dgamma, dbeta (C,) out; training: whether the forward used batch
            statistics; dx: like x, out.
        mask: None, or the forward's (outer, inner) bool mask (training only),
            count its True positions: outside it, padding (dx = 0 there).
        act: None, or the forward's ACTIVATIONS code: dy is then the gradient
            w.r.t. g(v), v = BN(x) (+ z), z the forward's residual or None;
            dz: None, or like x, out: dv = dy * g'(v).
        stream: the caller's stream handle; scratch: the caller's allocator
            for the partials (``workspace.workspace``).
        launch: the shape's ``common.Launches`` (a plan's: one launch or the
            split passes), or None for the split passes chosen here.
    """
    outer, C, inner = x.shape
    launch = launch or launches(x.shape)
    grid, block, inner_splits, splits, columns = launch.reduce[1:]
    work = workspace("backward.work", (2, splits, C), np.float64, stream=stream, scratch=scratch)
    counter = workspace("backward.counter", (columns,), np.int32, zero=True, stream=stream, scratch=scratch)
    n = float(outer * inner if mask is None else count)
    mask = mask if training else None
    args = (dy, x, coef, work, counter, bcoef, dgamma, dbeta, bool(training), n, act, z, mask, inner_splits)
    tail = (dx, dz) if launch.one_launch else (None, None)  # a block per channel: it writes dx too
    backward_sums_cuda[grid, block, stream](*args, *tail)
    if not launch.one_launch:
        launch_input_grad_cuda(dy, x, bcoef, dx, mask, act, z, dz, stream, launch)
