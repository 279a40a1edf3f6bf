"""Per-channel batch statistics: mean and biased variance by split reduction.

On the canonical view ``x`` of shape ``(outer, C, inner)``, for each channel c

    mean[c] = 1/n * sum_{o,i} x[o, c, i]               n = outer * inner
    var[c]  = 1/n * sum_{o,i} (x[o, c, i] - mean[c])**2

computed as partial ``(count, mean, M2)`` triples over bounded pieces of the
channel, merged by Chan's formula (``common.chan_merge``).  The same pass then
finalizes the per-channel constants of the forward pass into ``coef`` (5, C):

    coef[MEAN] = mean, coef[VAR] = var, coef[INVSTD] = 1/sqrt(var + eps),
    coef[SCALE] = gamma * invstd, coef[BIAS] = beta

and, when ``update`` is set, the running statistics (PyTorch's semantics):

    running_mean = (1 - momentum) * running_mean + momentum * mean
    running_var  = (1 - momentum) * running_var  + momentum * var * n / (n - 1)

CPU: ``channel_moments_cpu`` (numba.njit, parallel) then ``finish_channels_cpu``.
One pass of sums around a per-channel center (the mean of the channel's first
values), a second only where that center turned out far from the mean:
inner > 1 over each contiguous (o, c) row; inner == 1 over blocks of rows,
vectorised across channels.

CUDA: one launch.  Each channel's reduction is split over ``splits`` blocks;
each thread shifts its values by its first one (an offset of 1e6 costs
nothing), sums them around its running mean in chunks of ``SHIFT_CHUNK`` and
folds each chunk into its running triple by Chan's formula
(``common.fold_chunk``: one division per chunk, where Welford's update divides
per value; short chunks around the running mean keep a huge outlier from
costing digits), the block merges its threads' triples (``common.block_merge``:
warp shuffles, then across warps), every block writes its partial triple to a
workspace, and the last block of a channel column to finish (threadfence +
atomic ticket) merges the partials and finalizes.  Where a channel fits one
block (``common.one_pass``: splits == 1) the same block then writes y from
L1/L2: one launch for the whole training forward.  One kernel,
``batch_stats_cuda``, compiled once per access regime of the view
(``common.reduction_slot``): inner > 1, threads walk the contiguous inner axis
of one channel; inner == 1, a block's threads walk a tile of contiguous channels.

One algorithm on both backends, split or one launch: sums of deviations from a
value of the data (the CPU's center, the GPU's shift), pieces merged by Chan's
formula.

Error analysis (the one for every statistics kernel of the package).  An
offset costs nothing: every deviation is taken from a value of the data.  A
piece of k values summed around a shift s gives M2 = s2 - s1**2 / k, whose
rounding error relative to M2 is about eps * (1 + k * (s - piece mean)**2 /
M2): small while s is within a few standard deviations of the piece's mean.
The GPU sums chunks of SHIFT_CHUNK values around its running mean (after the
first chunk), so neither an offset nor an outlier costs digits; the CPU sums
around the mean of each channel's first values and runs a second pass around
the measured mean where n * (center - mean)**2 > RECENTER * M2.  Pieces meet
by Chan's formula in float64.  Relative error of the variance: a few eps of
the compute dtype times log2 of the pieces merged (float64 data with mean 1e8
and spread 1e-4 keeps its variance to 1e-9).
"""

import math

import numba
import numpy as np
from numba import cuda, prange

from .activation import forward_at
from .common import (
    CHUNK,
    JIT,
    JIT_STEP,
    JIT_STREAM,
    MAX_THREADS,
    block_merge,
    chan_merge,
    channel_parts,
    coherent,
    cpu_driver,
    cpu_kernel,
    finalize_channel,
    fold_chunk,
    fold_rows,
    gpu_kernel,
    last_block,
    launches,
    merge_moments,
    merge_rows,
    reduction_config,
    reduction_slot,
    repeat_groups,
    row_blocks,
    shifted_add,
    shifted_to_moments,
    task_channels,
    twin,
)
from .half import compute_dtype, widen
from .rows import BIAS, INVSTD, MEAN, SCALE, VAR
from .workspace import workspace

#: Rows averaged into the center of the one-pass moments (channels contiguous).
CENTER_ROWS = 16
#: Largest n * (center - mean)**2 / M2 accepted from one pass around a center.
RECENTER = 64.0
# ----------------------------------------------------------------------------
# shared per-channel finalize (CPU and CUDA)


def finish_channel(c, n, mean, m2, coef, gamma, beta, rmean, rvar, eps, momentum, update):
    """Write channel c's forward constants to coef (5, C); update running stats."""
    var, invstd, scale, unbiased = finalize_channel(n, mean, m2, eps, gamma[c], momentum)
    coef[MEAN, c] = mean
    coef[VAR, c] = var
    coef[INVSTD, c] = invstd
    coef[SCALE, c] = scale
    coef[BIAS, c] = beta[c]
    if update:
        rmean[c] = (1.0 - momentum) * rmean[c] + momentum * mean
        rvar[c] = (1.0 - momentum) * rvar[c] + momentum * unbiased


finish_channel_cpu, finish_channel_cuda = twin(finish_channel)


# ----------------------------------------------------------------------------
# CPU twin


@numba.njit(inline="always", **JIT_STREAM)
def _centered_sums(v, center):
    """sum(v - center) and sum((v - center)**2) of a 1-D run, in v's compute dtype."""
    d = compute_dtype(v)(0)
    q = compute_dtype(v)(0)
    for i in range(v.shape[0]):
        t = widen(v[i]) - center
        d += t
        q += t * t
    return d, q


@numba.njit(inline="always", **JIT_STREAM)
def _masked_sums(v, keep, center):
    """_centered_sums over the values of v where ``keep`` is True (masked
    values never enter the arithmetic: a NaN there changes nothing)."""
    d = compute_dtype(v)(0)
    q = compute_dtype(v)(0)
    for i in range(v.shape[0]):
        t = widen(v[i]) - center if keep[i] else compute_dtype(v)(0)
        d += t
        q += t * t
    return d, q


@cpu_kernel
def channel_moments_inner_cpu(x, mask, center, out):
    """Moments of every channel of x (outer, C, inner), inner > 1, in one pass
    around a given ``center`` (C,) of x's compute dtype; only the positions
    where ``mask`` (outer, inner) is True count (mask None: all of them).

    Every contiguous (o, c) row yields ``D = sum(x - center)`` and
    ``Q = sum((x - center)**2)``, in x's compute dtype over chunks of CHUNK
    values, in float64 across chunks and rows; then mean = center + D / n,
    M2 = Q - D**2 / n (error: the module docstring).  out: (3, C) count, mean, M2.
    """
    outer, C, inner = x.shape
    part = np.empty((2, outer, C))  # D and Q of every row
    parts = channel_parts(outer, C)
    for k in prange(outer * parts):
        o, c0, c1 = task_channels(k, parts, C)
        for c in range(c0, c1):
            d, q = 0.0, 0.0
            for start in range(0, inner, CHUNK):
                stop = min(start + CHUNK, inner)
                if mask is None:
                    s1, s2 = _centered_sums(x[o, c, start:stop], center[c])
                else:
                    s1, s2 = _masked_sums(x[o, c, start:stop], mask[o, start:stop], center[c])
                d += s1
                q += s2
            part[0, o, c] = d
            part[1, o, c] = q
    total = np.empty((2, C))  # float64 D and Q whatever out's dtype
    for c in range(C):  # loops, not np.zeros: in a parallel kernel np.zeros is a parfor of its own
        total[0, c] = total[1, c] = 0.0
    for o in range(outer):
        for c in range(C):
            total[0, c] += part[0, o, c]
            total[1, c] += part[1, o, c]
    n = outer * inner
    if mask is not None:
        n = np.count_nonzero(mask)
    for c in range(C):
        out[0, c], out[1, c], out[2, c] = shifted_to_moments(n, center[c], total[0, c], total[1, c])


@numba.njit(**JIT)
def _row(rows, o):
    """Row o of the rows a kernel walks: o itself, or rows[o] (the unmasked rows)."""
    if rows is None:
        return o
    return rows[o]


@cpu_kernel
def channel_moments_channels_cpu(x, rows, center, out):
    """Moments of every channel of x (outer, C) with contiguous channels, in
    one pass around a given ``center`` (C,) of x's compute dtype, over the
    rows listed in ``rows`` (int64, the unmasked rows) or all rows (None).

    Rows are split into a few blocks per thread; each block sums
    ``d = x - center`` and ``d**2`` in x's dtype over sub-blocks of rows
    (vectorised across C) and folds every sub-block into float64 running
    (mean - center, M2) by Chan's formula with the correction
    ``M2 = sum(d**2) - sum(d)**2 / n`` (``merge_rows``; error: the module
    docstring).  out: (3, C) float64 count, mean - center, M2.
    """
    outer, C = x.shape
    if rows is not None:
        outer = rows.shape[0]
    blocks, rows_per, sub = row_blocks(outer, C)
    part = np.empty((3, blocks, C))  # zeroed block by block, in parallel
    for k in prange(blocks):
        mean = part[1, k]
        m2 = part[2, k]
        for c in range(C):  # loops, not slice fills: an array expression in a prange body compiles slowly
            mean[c] = m2[c] = 0.0
        acc = np.empty((2, C), compute_dtype(x))  # sum of d, sum of d**2 (one array: fewer alias checks)
        n = 0.0
        end = min(outer, (k + 1) * rows_per)
        for o0 in range(k * rows_per, end, sub):
            o1 = min(end, o0 + sub)
            for c in range(C):
                acc[0, c] = acc[1, c] = 0.0
            quads = o0 + (o1 - o0) // 4 * 4
            for o in range(o0, quads, 4):  # four rows a step: acc, in memory, updated once
                x0, x1, x2, x3 = x[_row(rows, o)], x[_row(rows, o + 1)], x[_row(rows, o + 2)], x[_row(rows, o + 3)]
                for c in range(C):
                    d0 = widen(x0[c]) - center[c]
                    d1 = widen(x1[c]) - center[c]
                    d2 = widen(x2[c]) - center[c]
                    d3 = widen(x3[c]) - center[c]
                    acc[0, c] += (d0 + d1) + (d2 + d3)
                    acc[1, c] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3)
            for o in range(quads, o1):
                xo = x[_row(rows, o)]
                for c in range(C):
                    d = widen(xo[c]) - center[c]
                    acc[0, c] += d
                    acc[1, c] += d * d
            merge_rows(mean, m2, n, o1 - o0, center, center, acc[0], acc[1])
            n += o1 - o0
        for c in range(C):
            part[0, k, c] = n
    total = np.empty((2, C))  # the blocks merged in float64: mean - center, M2
    for c in range(C):  # loops, not np.zeros: in a parallel kernel np.zeros is a parfor of its own
        total[0, c] = total[1, c] = 0.0
    n = 0.0
    for k in range(blocks):
        nb = part[0, k, 0]
        merge_moments(total[0], total[1], n, nb, part[1, k], part[2, k])
        n += nb
    for c in range(C):
        out[0, c] = n
        out[1, c] = total[0, c]
        out[2, c] = total[1, c]


@numba.njit(**JIT_STEP)
def leading_center(x, mask):
    """Per-channel mean of the first CENTER_ROWS positions (o, i) of x (outer,
    C, inner) in row-major order, only those where ``mask`` (outer, inner) is
    True when a mask is given; in x's compute dtype, 0 where not finite (an Inf
    there must not become the center)."""
    outer, C, inner = x.shape
    total = np.empty(C)  # np.empty and loops, not np.zeros: one overload less to compile
    for c in range(C):
        total[c] = 0.0
    taken = 0
    for p in range(outer * inner):
        if taken == CENTER_ROWS:
            break
        o = p // inner
        i = p - o * inner
        if mask is None or mask[o, i]:
            taken += 1
            for c in range(C):
                total[c] += widen(x[o, c, i])
    center = np.empty(C, compute_dtype(x))
    for c in range(C):
        m = total[c] / max(taken, 1)
        center[c] = m if math.isfinite(m) else 0.0
    return center


@numba.njit(**JIT_STEP)
def recenter(moments, center):
    """Move center[c] to the measured mean where n * (center - mean)**2 > RECENTER * M2;
    True if any moved."""
    moved = False
    for c in range(center.shape[0]):
        d = moments[1, c] - center[c]
        if moments[0, c] * d * d > RECENTER * moments[2, c] and math.isfinite(moments[1, c]):
            center[c] = moments[1, c]
            moved = True
    return moved


@numba.njit(**JIT_STEP)
def merge_groups(part, center, out):
    """out (3, C) <- count, mean, M2 of every channel from the ``groups``
    side-by-side partials in part (3, groups * C) of (count, mean - center,
    M2) around one center per channel (Chan, float64: exact, as no absolute
    mean is rounded before the merge)."""
    C = out.shape[1]
    mean = part[1, :C].copy()
    m2 = part[2, :C].copy()
    n = part[0, 0]
    for g in range(1, part.shape[1] // C):
        nb = part[0, g * C]
        merge_moments(mean, m2, n, nb, part[1, g * C : (g + 1) * C], part[2, g * C : (g + 1) * C])
        n += nb
    for c in range(C):
        out[0, c] = n
        out[1, c] = center[c] + mean[c]
        out[2, c] = m2[c]


@cpu_driver(step=True)
def moments_inner_cpu(x, mask, out):
    """out (3, C) float64 <- count, mean, M2 of every channel of x (outer, C,
    inner), inner > 1; only the True positions of ``mask`` (outer, inner)
    count (None: all).  One pass around the mean of the first values
    (``leading_center``), a second around the measured mean where that center
    was far from it (``recenter``)."""
    center = leading_center(x, mask)
    channel_moments_inner_cpu(x, mask, center, out)
    if recenter(out, center):
        channel_moments_inner_cpu(x, mask, center, out)


@cpu_driver(step=True)
def moments_channels_cpu(x, xf, rows, out):
    """moments_inner_cpu for x (outer, C) with contiguous channels, over the
    ``rows`` listed (int64, the unmasked rows; xf is then x) or all of them
    (None).  xf: x folded (``fold_rows``: (outer / f, f * C), f rows side by
    side; x itself for f = 1)."""
    C = x.shape[1]
    f = xf.shape[1] // C
    first = np.ascontiguousarray(x[:CENTER_ROWS]) if rows is None else x[rows[:CENTER_ROWS]]
    center = leading_center(first.reshape((-1, C, 1)), None)
    part = np.empty((3, xf.shape[1]))
    channel_moments_channels_cpu(xf, rows, repeat_groups(center.reshape((1, C)), f)[0], part)
    merge_groups(part, center, out)
    if recenter(out, center):
        channel_moments_channels_cpu(xf, rows, repeat_groups(center.reshape((1, C)), f)[0], part)
        merge_groups(part, center, out)


def channel_moments_cpu(x, out, mask=None):
    """Moments of every channel of x (outer, C, inner): float32, float64, or
    float16 as its bits (``half.bits``).

    out: (3, C) float64, receives count, mean and M2 (sum of squared deviations).
    mask: None, or (outer, inner) bool: only the positions where it is True
    count (masked batch norm); the count is then the number of True.
    """
    if x.shape[2] > 1:
        moments_inner_cpu(x, mask, out)
        return
    x2 = x[:, :, 0]  # a 2-D view: the compiler then knows the channels are contiguous
    rows = None if mask is None else np.flatnonzero(mask[:, 0])
    xf = fold_rows(x2)[0] if rows is None else x2
    moments_channels_cpu(x2, xf, rows, out)


@numba.njit(**JIT)  # called, not inlined: inlined beside moments_*_cpu, a driver took 1.3 us more (256, 64)
def finish_channels_cpu(moments, coef, gamma, beta, rmean, rvar, eps, momentum, update):
    """finish_channel for every channel from channel_moments_cpu's output."""
    for c in range(coef.shape[1]):
        finish_channel_cpu(
            c, moments[0, c], moments[1, c], moments[2, c],
            coef, gamma, beta, rmean, rvar, eps, momentum, update,
        )  # fmt: skip


# ----------------------------------------------------------------------------
# CUDA kernels


@gpu_kernel(whole_warps=True)
def batch_stats_cuda(
    x,  # (outer, C, inner) input, float16/32/64
    mask,  # None, or (outer, inner) bool: only True positions count
    origin,  # int: flat (o * inner + i) position of the first counted value (0 without a mask)
    work,  # (3, splits, C) float64 partial count/mean/M2 (a float32 mean at 1e6 loses 0.03)
    counter,  # (columns,) int32 blocks finished per column of blocks; zero between launches
    coef,  # (5, C) out: MEAN, VAR, INVSTD, SCALE, BIAS
    gamma,  # (C,) scale
    beta,  # (C,) shift
    rmean,  # (C,) running mean, updated in place when update
    rvar,  # (C,) running (unbiased) variance, updated in place when update
    eps,  # float
    momentum,  # float, weight of this batch in the running statistics
    update,  # bool
    inner_splits,  # int: splits along inner (inner > 1), or None: channels contiguous (inner == 1)
    act,  # None, or an ACTIVATIONS code, with y
    z,  # None, or (outer, C, inner) residual added before the activation, with y
    y,  # None, or (outer, C, inner) out (one block per column only: gridDim.y == 1)
):
    """Grid (columns, splits), block (TX, TY): block (column, s) reduces the
    s-th slice of its channels (``common.reduction_slot``: one channel when
    inner > 1, a tile of TX contiguous channels when inner == 1)."""
    outer, C, inner = x.shape
    acc = coef.dtype.type  # float32, or float64 for float64 input
    ty, TX, TY = cuda.threadIdx.y, cuda.blockDim.x, cuda.blockDim.y
    s, splits, t, threads = cuda.blockIdx.y, cuda.gridDim.y, ty * TX + cuda.threadIdx.x, TX * TY
    c, width, o0, o1, i0, i1, ix, di = reduction_slot(outer, inner, inner_splits)

    # per thread: values shifted by the thread's first value (large offsets
    # exact), summed around the running mean in chunks of SHIFT_CHUNK, one
    # Chan fold per chunk (no division per value; fold_chunk).  Partial means
    # are then taken relative to the channel's first value (float64), so
    # merges never round an absolute mean at the data's offset.
    one, n, mean, m2, shift = acc(1), acc(0), acc(0), acc(0), acc(0)
    base = 0.0
    if c < C:
        ob = origin // inner
        base = numba.float64(x[ob, c, origin - ob * inner])  # a counted value
        shift = acc(base)
        if o0 + ty < o1 and i0 + ix < i1 and (mask is None or mask[o0 + ty, i0 + ix]):
            shift = acc(x[o0 + ty, c, i0 + ix])
        k, s1, s2, cnt = acc(0), acc(0), acc(0), acc(0)
        for o in range(o0 + ty, o1, TY):
            for i in range(i0 + ix, i1, di):
                if mask is None or mask[o, i]:
                    n, mean, m2, k, s1, s2, cnt = shifted_add(acc(x[o, c, i]) - shift, n, mean, m2, k, s1, s2, cnt, one)
        n, mean, m2 = fold_chunk(n, mean, m2, cnt, k, s1, s2, one)

    sn = cuda.shared.array(MAX_THREADS, numba.float64)
    sm = cuda.shared.array(MAX_THREADS, numba.float64)
    sq = cuda.shared.array(MAX_THREADS, numba.float64)
    flag = cuda.shared.array(1, numba.int32)
    block_merge(sn, sm, sq, n, (numba.float64(shift) - base) + numba.float64(mean), m2, t, threads, width)
    if t < width and c < C:  # thread t < width: row ty == 0, channel t of the block
        work[0, s, c] = sn[t]
        work[1, s, c] = sm[t]
        work[2, s, c] = sq[t]

    if last_block(counter, cuda.blockIdx.x, splits, flag):
        pn, pm, pq = 0.0, 0.0, 0.0  # the partials of channel c, a stride of them per thread
        if c < C:
            for j in range(t // width, splits, threads // width):
                pn, pm, pq = chan_merge(
                    pn, pm, pq, coherent(work, 0, j, c), coherent(work, 1, j, c), coherent(work, 2, j, c)
                )
        block_merge(sn, sm, sq, pn, pm, pq, t, threads, width)
        if t < width and c < C:
            finish_channel_cuda(c, sn[t], base + sm[t], sq[t], coef, gamma, beta, rmean, rvar, eps, momentum, update)
        if y is not None:  # the block owns its channels: the elementwise pass, re-read from L1/L2
            cuda.syncthreads()  # coef[:, c] written
            if c < C:
                m, sc, b = coef[MEAN, c], coef[SCALE, c], coef[BIAS, c]
                for o in range(ty, outer, TY):
                    for i in range(ix, inner, di):
                        forward_at(x, z, o, c, i, m, sc, b, act, y)


def stats_launch_config(shape, one_launch=False):
    """(kernel, grid, block, inner_splits or None, splits, columns) for a view shape
    (``common.reduction_config``; the kernel is ``batch_stats_cuda`` in either regime)."""
    cfg = reduction_config(shape, one_launch)
    return batch_stats_cuda, cfg.grid, cfg.block, cfg.inner_splits, cfg.splits, cfg.columns


def launch_stats_cuda(
    x, coef, gamma, beta, rmean, rvar, eps, momentum, update, mask=None, origin=0, stream=0, scratch=None,
    act=None, z=None, y=None, launch=None,
):  # fmt: skip
    """Batch statistics and forward constants on the GPU, one launch; with
    ``launch.one_launch`` (a block per channel: ``common.one_pass``) it
    writes y too.

    Args:
        x: (outer, C, inner) device array, float16/32/64.
        coef: (5, C) device array, out, accumulation dtype: rows MEAN, VAR,
            INVSTD, SCALE, BIAS.
        gamma, beta, rmean, rvar: (C,) device arrays of the accumulation dtype
            (float64 for float64 x, else float32); rmean/rvar updated when update.
        eps, momentum: floats.  update: bool.
        mask: None, or an (outer, inner) bool device array: statistics from
            its True positions; origin: the flat (o * inner + i) index of one
            of them (the kernels' reference value).
        stream: the caller's stream handle; scratch: the caller's allocator
            for the partials (``workspace.workspace``).
        act, z, y: with ``launch.one_launch``, y like x, out:
            y = g((x - mean) * scale + bias (+ z)); act None (no
            activation) or an ACTIVATIONS code, z None or like x.
        launch: the shape's ``common.Launches`` (a plan's), or None for the
            split reduction chosen here (statistics only).
    """
    acc = gamma.dtype
    launch = launch or launches(x.shape)
    regime, grid, block, inner_splits, splits, columns = launch.reduce
    C = x.shape[1]
    work = workspace("stats.work", (3, splits, C), np.float64, stream=stream, scratch=scratch)
    counter = workspace("stats.counter", (columns,), np.int32, zero=True, stream=stream, scratch=scratch)
    args = (x, mask, int(origin), work, counter, coef, gamma, beta, rmean, rvar)
    z, y = (z, y) if launch.one_launch else (None, None)
    batch_stats_cuda[grid, block, stream](*args, acc.type(eps), acc.type(momentum), bool(update), inner_splits,
                                          act, z, y)  # fmt: skip
