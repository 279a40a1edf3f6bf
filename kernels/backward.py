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

Two passes, as for the forward: a split reduction of the two sums per channel
(``backward_sums_*``) that also finalizes dgamma, dbeta and the per-channel
constants ``bcoef`` (4, C) = (MEAN, A, B, K); then the elementwise
``input_grad_*`` pass.  Traffic: dy and x read twice, dx written once (5B).
"""

import numba
import numpy as np
from numba import cuda, prange

from .common import JIT, JIT_STREAM, MAX_THREADS, channel_parts, cpu_kernel, task_channels, tree_sum2, twin
from .half import bits, compute_dtype, narrow, widen
from .normalize import elementwise_launch_config
from .stats import (
    CHUNK,
    INVSTD,
    MEAN,
    SCALE,
    block_slice,
    coherent,
    fold_rows,
    last_block,
    repeat_groups,
    row_blocks,
    stats_launch_config,
)
from .workspace import workspace

B_MEAN, B_DY, B_X, B_CONST = range(4)


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
    if training:
        bcoef[B_X, c] = -a * invstd * invstd * sum_dyx / n
        bcoef[B_CONST, c] = -a * sum_dy / n
    else:
        bcoef[B_X, c] = 0.0
        bcoef[B_CONST, c] = 0.0


finish_backward_channel_cpu, finish_backward_channel_cuda = twin(finish_backward_channel)


# ----------------------------------------------------------------------------
# CPU twin


@numba.njit(**JIT_STREAM)
def _chunk_sums(dy, x, m):
    s1 = compute_dtype(dy)(0)
    s2 = compute_dtype(dy)(0)
    for i in range(dy.shape[0]):
        g = widen(dy[i])
        s1 += g
        s2 += g * (widen(x[i]) - m)
    return s1, s2


@cpu_kernel
def backward_sums_inner_cpu(dy, x, coef, out):
    """backward_sums_cpu for inner > 1: dy, x (outer, C, inner)."""
    outer, C, inner = x.shape
    part = np.empty((2, outer, C))
    parts = channel_parts(outer, C)
    for k in prange(outer * parts):
        o, c0, c1 = task_channels(k, parts, C)
        for c in range(c0, c1):
            m = compute_dtype(x)(coef[MEAN, c])
            t1, t2 = 0.0, 0.0
            for start in range(0, inner, CHUNK):
                stop = min(start + CHUNK, inner)
                s1, s2 = _chunk_sums(dy[o, c, start:stop], x[o, c, start:stop], m)
                t1 += s1
                t2 += s2
            part[0, o, c] = t1
            part[1, o, c] = t2
    for c in prange(C):
        t1, t2 = 0.0, 0.0
        for o in range(outer):
            t1 += part[0, o, c]
            t2 += part[1, o, c]
        out[0, c] = t1
        out[1, c] = t2


@numba.njit(inline="always", **JIT_STREAM)
def _terms(dy, x, m, o, c):
    """dy and dy * (x - mean) at (o, c) of 2-D dy, x; m: (C,) mean."""
    g = widen(dy[o, c])
    return g, g * (widen(x[o, c]) - m[c])


@cpu_kernel
def backward_sums_channels_cpu(dy, x, mean, out):
    """backward_sums_cpu for inner == 1: dy, x (outer, C), channels contiguous;
    mean (C,) the forward mean."""
    outer, C = x.shape
    # rows of C contiguous values: a few row blocks per thread, float64
    # running sums per channel fed by input-dtype sums over cache-sized
    # sub-blocks of rows (vectorised across C)
    blocks, rows_per, sub = row_blocks(outer, C)
    part = np.empty((2, blocks, C))  # zeroed block by block, in parallel
    m = mean.astype(compute_dtype(x))
    for k in prange(blocks):
        part[:, k] = 0
        s1 = np.empty(C, compute_dtype(dy))
        s2 = np.empty(C, compute_dtype(dy))
        end = min(outer, (k + 1) * rows_per)
        for o0 in range(k * rows_per, end, sub):
            s1[:] = 0
            s2[:] = 0
            o1 = min(end, o0 + sub)
            quads = o0 + (o1 - o0) // 4 * 4
            for o in range(o0, quads, 4):  # four rows a step: s1, s2, in memory, updated once
                for c in range(C):
                    g0, h0 = _terms(dy, x, m, o, c)
                    g1, h1 = _terms(dy, x, m, o + 1, c)
                    g2, h2 = _terms(dy, x, m, o + 2, c)
                    g3, h3 = _terms(dy, x, m, o + 3, c)
                    s1[c] += (g0 + g1) + (g2 + g3)
                    s2[c] += (h0 + h1) + (h2 + h3)
            for o in range(quads, o1):
                for c in range(C):
                    g, h = _terms(dy, x, m, o, c)
                    s1[c] += g
                    s2[c] += h
            for c in range(C):
                part[0, k, c] += s1[c]
                part[1, k, c] += s2[c]
    for c in prange(C):
        t1, t2 = 0.0, 0.0
        for k in range(blocks):
            t1 += part[0, k, c]
            t2 += part[1, k, c]
        out[0, c] = t1
        out[1, c] = t2


def backward_sums_cpu(dy, x, coef, out):
    """out (2, C) float64 <- sum(dy) and sum(dy * (x - mean)) per channel.

    dy, x: (outer, C, inner), same float dtype; coef: (5, C) forward constants.
    Partial sums in the input's dtype over bounded pieces, combined in float64.
    """
    if x.shape[2] > 1:
        backward_sums_inner_cpu(dy, x, coef, out)
        return
    # a 2-D view: the compiler then knows the channels are contiguous; narrow
    # rows folded side by side (stats.fold_rows), the f partial sums added
    (dy2, f), (x2, fx) = fold_rows(dy[:, :, 0]), fold_rows(x[:, :, 0])
    if f != fx:
        dy2, x2, f = dy[:, :, 0], x[:, :, 0], 1
    part = out if f == 1 else np.empty((2, x2.shape[1]))
    backward_sums_channels_cpu(dy2, x2, repeat_groups(coef[MEAN], f), part)
    if f > 1:
        out[...] = part.reshape(2, f, -1).sum(axis=1)


@numba.njit(**JIT)
def finish_backward_cpu(sums, n, coef, training, bcoef, dgamma, dbeta):
    for c in range(coef.shape[1]):
        finish_backward_channel_cpu(c, n, sums[0, c], sums[1, c], coef, training, bcoef, dgamma, dbeta)


@cpu_kernel
def input_grad_inner_cpu(dy, x, bcoef, dx):
    """input_grad_cpu for inner > 1: dy, x, dx (outer, C, inner)."""
    outer, C, inner = x.shape
    parts = channel_parts(outer, C)
    for t in prange(outer * parts):
        o, c0, c1 = task_channels(t, parts, C)
        for c in range(c0, c1):
            m = bcoef[B_MEAN, c]
            a = bcoef[B_DY, c]
            b = bcoef[B_X, c]
            k = bcoef[B_CONST, c]
            for i in range(inner):
                dx[o, c, i] = narrow(a * widen(dy[o, c, i]) + b * (widen(x[o, c, i]) - m) + k, dx)


@cpu_kernel
def input_grad_channels_cpu(dy, x, bcoef, dx):
    """input_grad_cpu for inner == 1: dy, x, dx (outer, C), channels contiguous."""
    outer, C = x.shape
    # one (4, C) array rather than four row views: fewer arrays that might
    # alias dx, so the compiler's runtime alias checks still allow vectorising
    for o in prange(outer):
        for c in range(C):
            g = bcoef[B_DY, c] * widen(dy[o, c]) + bcoef[B_X, c] * (widen(x[o, c]) - bcoef[B_MEAN, c])
            dx[o, c] = narrow(g + bcoef[B_CONST, c], dx)


def input_grad_cpu(dy, x, bcoef, dx):
    """dx = A * dy + B * (x - mean) + K on (outer, C, inner) views."""
    if x.shape[2] > 1:
        input_grad_inner_cpu(dy, x, bcoef, dx)
    else:  # a 2-D view: the compiler then knows the channels are contiguous
        input_grad_channels_cpu(dy[:, :, 0], x[:, :, 0], bcoef, dx[:, :, 0])


def launch_backward_cpu(dy, x, coef, training, bcoef, dgamma, dbeta, dx, reduce=None):
    """Both backward passes on the CPU.

    Args:
        dy, x: (outer, C, inner) float16/32/64 arrays (float16 computed in float32).
        coef: (5, C) forward constants (MEAN, VAR, INVSTD, SCALE, BIAS).
        training: whether the forward used batch statistics.
        bcoef: (4, C) out (MEAN, A, B, K); dgamma, dbeta: (C,) out; dx: like x, out
            (a float16 dx is rounded once).
        reduce: None, or (fn, n) for synchronized batch norm: ``fn`` maps this
            process's (2, C) float64 sums to the sums over every process and
            ``n`` is the global count per channel; dx then is the gradient of
            the global batch's function, dgamma and dbeta stay this process's
            share (their sum over processes is the global gradient).
    """
    outer, C, inner = x.shape
    dy, x, dx = bits(dy), bits(x), bits(dx)
    sums = np.empty((2, C))
    if outer * inner:
        backward_sums_cpu(dy, x, coef, sums)
    else:  # an empty share of a synchronized batch
        sums[...] = 0.0
    if reduce is None:
        finish_backward_cpu(sums, float(outer * inner), coef, training, bcoef, dgamma, dbeta)
    else:
        fn, n = reduce
        finish_backward_cpu(fn(sums), float(n), coef, training, bcoef, dgamma, dbeta)
        dbeta[...] = sums[0]
        dgamma[...] = sums[1] * coef[INVSTD]
    if outer * inner:
        input_grad_cpu(dy, x, bcoef, dx)

    # ----------------------------------------------------------------------------
    # CUDA kernels


@cuda.jit
def backward_sums_cuda_inner(
    dy,  # (outer, C, inner) upstream gradient
    x,  # (outer, C, inner) forward input
    coef,  # (5, C) forward constants (MEAN, VAR, INVSTD, SCALE, BIAS)
    work,  # (2, splits, C) float64 partial sums
    counter,  # (C,) int32 blocks finished per channel; zero between launches
    bcoef,  # (4, C) out: MEAN, A, B, K
    dgamma,  # (C,) out
    dbeta,  # (C,) out
    training,  # bool: statistics came from this batch
    inner_splits,  # splits along inner; gridDim.y = outer splits * inner_splits
):
    """Grid (C, splits), block (TX, TY), the same slicing as batch_stats_cuda_inner."""
    outer, C, inner = x.shape
    acc = coef.dtype.type  # float32, or float64 for float64 input
    c = cuda.blockIdx.x
    s = cuda.blockIdx.y
    tx, ty = cuda.threadIdx.x, cuda.threadIdx.y
    TX, TY = cuda.blockDim.x, cuda.blockDim.y
    t = ty * TX + tx
    o0, o1, i0, i1 = block_slice(outer, inner, s, inner_splits)
    m = coef[MEAN, c]
    s1 = acc(0)
    s2 = acc(0)
    for o in range(o0 + ty, o1, TY):
        for i in range(i0 + tx, i1, TX):
            g = acc(dy[o, c, i])
            s1 += g
            s2 += g * (acc(x[o, c, i]) - m)

    a1 = cuda.shared.array(MAX_THREADS, numba.float64)
    a2 = cuda.shared.array(MAX_THREADS, numba.float64)
    flag = cuda.shared.array(1, numba.int32)
    a1[t] = s1
    a2[t] = s2
    cuda.syncthreads()
    tree_sum2(a1, a2, t, 0, 1, TX * TY)
    if t == 0:
        work[0, s, c] = a1[0]
        work[1, s, c] = a2[0]

    splits = cuda.gridDim.y
    if last_block(counter, c, splits, flag):
        t1, t2 = 0.0, 0.0
        for j in range(t, splits, TX * TY):
            t1 += coherent(work, 0, j, c)
            t2 += coherent(work, 1, j, c)
        a1[t] = t1
        a2[t] = t2
        cuda.syncthreads()
        tree_sum2(a1, a2, t, 0, 1, TX * TY)
        if t == 0:
            n = numba.float64(outer) * inner
            finish_backward_channel_cuda(c, n, a1[0], a2[0], coef, training, bcoef, dgamma, dbeta)


@cuda.jit
def backward_sums_cuda_channels(
    dy,  # (outer, C, 1) upstream gradient, channels contiguous
    x,  # (outer, C, 1) forward input
    coef,  # (5, C) forward constants
    work,  # (2, splits, C) float64 partial sums
    counter,  # (ceil(C / TX),) int32 blocks finished per channel tile
    bcoef,  # (4, C) out: MEAN, A, B, K
    dgamma,  # (C,) out
    dbeta,  # (C,) out
    training,  # bool
):
    """Grid (ceil(C / TX), splits), block (TX, TY), as batch_stats_cuda_channels."""
    outer, C, _ = x.shape
    acc = coef.dtype.type  # float32, or float64 for float64 input
    tile = cuda.blockIdx.x
    s = cuda.blockIdx.y
    splits = cuda.gridDim.y
    tx, ty = cuda.threadIdx.x, cuda.threadIdx.y
    TX, TY = cuda.blockDim.x, cuda.blockDim.y
    t = ty * TX + tx
    c = tile * TX + tx
    rows = (outer + splits - 1) // splits
    o0 = s * rows
    o1 = min(outer, o0 + rows)
    s1 = acc(0)
    s2 = acc(0)
    if c < C:
        m = coef[MEAN, c]
        for o in range(o0 + ty, o1, TY):
            g = acc(dy[o, c, 0])
            s1 += g
            s2 += g * (acc(x[o, c, 0]) - m)

    a1 = cuda.shared.array(MAX_THREADS, numba.float64)
    a2 = cuda.shared.array(MAX_THREADS, numba.float64)
    flag = cuda.shared.array(1, numba.int32)
    a1[t] = s1
    a2[t] = s2
    cuda.syncthreads()
    tree_sum2(a1, a2, ty, tx, TX, TY)
    if ty == 0 and c < C:
        work[0, s, c] = a1[tx]
        work[1, s, c] = a2[tx]

    if last_block(counter, tile, splits, flag):
        t1, t2 = 0.0, 0.0
        if c < C:
            for j in range(ty, splits, TY):
                t1 += coherent(work, 0, j, c)
                t2 += coherent(work, 1, j, c)
        a1[t] = t1
        a2[t] = t2
        cuda.syncthreads()
        tree_sum2(a1, a2, ty, tx, TX, TY)
        if ty == 0 and c < C:
            n = numba.float64(outer)
            finish_backward_channel_cuda(c, n, a1[tx], a2[tx], coef, training, bcoef, dgamma, dbeta)


@cuda.jit
def input_grad_cuda_inner(
    dy,  # (outer, C, inner) upstream gradient
    x,  # (outer, C, inner) forward input
    bcoef,  # (4, C) MEAN, A, B, K
    dx,  # (outer, C, inner) out
):
    """dx = A * dy + B * (x - mean) + K; the grid of scale_shift_cuda_inner."""
    outer, C, inner = x.shape
    tx, ty = cuda.threadIdx.x, cuda.threadIdx.y
    TX, TY = cuda.blockDim.x, cuda.blockDim.y
    for r in range(cuda.blockIdx.y * TY + ty, outer * C, cuda.gridDim.y * TY):
        o = r // C
        c = r - o * C
        m = bcoef[B_MEAN, c]
        a = bcoef[B_DY, c]
        b = bcoef[B_X, c]
        k = bcoef[B_CONST, c]
        for i in range(cuda.blockIdx.x * TX + tx, inner, cuda.gridDim.x * TX):
            dx[o, c, i] = a * dy[o, c, i] + b * (x[o, c, i] - m) + k


@cuda.jit
def input_grad_cuda_channels(
    dy,  # (outer, C, 1) upstream gradient
    x,  # (outer, C, 1) forward input
    bcoef,  # (4, C) MEAN, A, B, K
    dx,  # (outer, C, 1) out
):
    """dx = A * dy + B * (x - mean) + K; the grid of scale_shift_cuda_channels."""
    outer, C, _ = x.shape
    c = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    if c < C:
        m = bcoef[B_MEAN, c]
        a = bcoef[B_DY, c]
        b = bcoef[B_X, c]
        k = bcoef[B_CONST, c]
        TY = cuda.blockDim.y
        for o in range(cuda.blockIdx.y * TY + cuda.threadIdx.y, outer, cuda.gridDim.y * TY):
            dx[o, c, 0] = a * dy[o, c, 0] + b * (x[o, c, 0] - m) + k


def launch_backward_cuda(dy, x, coef, training, bcoef, dgamma, dbeta, dx, stream=0):
    """Both backward passes on the GPU: two launches.

    Args as launch_backward_cpu, as device arrays; dy, x, dx float16/32/64 and
    coef, bcoef, dgamma, dbeta of the accumulation dtype.
    """
    outer, C, inner = x.shape
    _, grid, block, inner_splits, splits, columns = stats_launch_config(x.shape)
    work = workspace("backward.work", (2, splits, C), np.float64)
    counter = workspace("backward.counter", (columns,), np.int32, zero=True)
    if inner_splits is not None:
        backward_sums_cuda_inner[grid, block, stream](
            dy, x, coef, work, counter, bcoef, dgamma, dbeta, bool(training), inner_splits
        )
    else:
        backward_sums_cuda_channels[grid, block, stream](
            dy, x, coef, work, counter, bcoef, dgamma, dbeta, bool(training)
        )
    regime, grid, block = elementwise_launch_config(x.shape)
    kernel = input_grad_cuda_inner if regime == "inner" else input_grad_cuda_channels
    kernel[grid, block, stream](dy, x, bcoef, dx)
