"""Pieces shared by every kernel family: the stable merge, per-channel finalize,
the block reductions (warp shuffles, then across warps) and the helpers that
pick grids and blocks (``block_shape``, ``reduction_config``, ``one_pass``).

Per-channel statistics are carried as ``(count, mean, M2)`` triples, where
``M2 = sum((x - mean)**2)``.  Two triples merge exactly by Chan's formula

    n     = na + nb
    delta = mb - ma
    mean  = ma + delta * nb / n
    M2    = qa + qb + delta**2 * na * nb / n

which never subtracts two large sums, so an offset of 1e6 over a spread of 1 in
float32 loses nothing (unlike ``E[x^2] - E[x]^2``).
"""

import functools
import math
import os
import threading
import types
from typing import NamedTuple

import numba
import numpy as np
from numba import cuda
from numba import types as nbtypes
from numba.extending import overload

from . import cache  # noqa: F401  (before any cached njit: package-wide cache stamps)

#: True when numba's CUDA simulator runs the CUDA kernels (CI without a GPU).
CUDASIM = bool(cuda.config.ENABLE_CUDASIM)

#: LLVM flags for the streaming CPU kernels: reassociation lets the compiler
#: vectorise their reductions; "nnan"/"ninf" are left out on purpose so NaN and
#: Inf propagate.  The kernels keep every deviation explicit (``x - center``
#: with the center computed once), and everything that merges or finalizes
#: statistics is compiled without fastmath (see JIT).
FASTMATH = {"reassoc", "contract", "nsz", "arcp"}

#: numba.njit options of every CPU function: cached on disk, and IEEE division
#: (x/0 is inf or nan, as on the GPU) instead of Python's ZeroDivisionError.
#: fastmath=False is explicit on purpose: numba lets a callee that leaves an
#: option unset inherit it from its caller, and the careful helpers below
#: (centered, merges) must never be compiled with "reassoc".
JIT = {"cache": True, "error_model": "numpy", "fastmath": False}
#: ... and of the steps a driver runs between its kernels (per-channel
#: finishes, centers, nested drivers): inlined into the driver when it is
#: compiled.  A called function is compiled into a library of its own and then
#: linked into its caller's, where numba optimizes and generates code for it
#: again; inlined, it is compiled once (a cold first forward: 3.1 s, not 3.9 s).
JIT_STEP = {**JIT, "inline": "always"}
#: ... and of the streaming kernels: vectorised reductions, several cores.
JIT_STREAM = {**JIT, "fastmath": FASTMATH}
JIT_PARALLEL = {**JIT_STREAM, "parallel": True}

#: Below this many elements a CPU kernel runs on one core: waking the thread
#: pool costs more than it saves, and idle pool threads that spin compete with
#: the caller's own BLAS threads (a numpy MLP ran 50x slower before this).
PARALLEL_MIN_ELEMENTS = 1 << 16


def renamed(fn, suffix, globals_=None):
    """A copy of ``fn`` whose qualified name ends in ``suffix`` (and that
    resolves its globals in ``globals_`` when given).

    numba's disk cache names compiled code by the function's qualified name and
    argument types, not by its compile options: two variants of one function
    (parallel and serial) compiled under one name would share cache entries, and
    whichever was compiled first would be loaded for both.
    """
    scope = fn.__globals__ if globals_ is None else globals_
    copy = types.FunctionType(fn.__code__, scope, fn.__name__ + suffix, fn.__defaults__, fn.__closure__)
    copy.__qualname__ = fn.__qualname__ + suffix
    copy.__module__ = fn.__module__
    copy.__doc__ = fn.__doc__
    return copy


class CPUKernel:
    """A CPU function compiled twice from one Python function: ``parallel``
    and ``serial``, cached on disk under distinct names.

    A kernel (``cpu_kernel``) runs its prange loops on every core in the
    parallel variant and as plain loops in the serial one.  A driver
    (``cpu_driver``: one whole op, the kernels it calls and the per-channel
    steps between them, one call from Python) calls the parallel variants of
    the kernels and drivers it names in its parallel variant, the serial ones
    in its serial variant.  Variants are built at their first use (the
    module's names are all defined by then).  Calling the object picks by the
    size of its first argument (a plan picks once per shape: ``variant``).

    A parallel variant starts numba's thread pool before it is compiled or
    loaded from the disk cache.  numba starts it when it loads a cached
    parallel function, but a driver compiled where its kernels were loaded
    from the cache is saved without that step, and the next process to load
    that driver first called a null pointer (a segmentation fault, found
    2026-12-03: ``tests/test_cache.py``).  Python calls a variant through
    ``entry``, which keeps the pool's rules (``_enter_pool``)."""

    def __init__(self, fn, options):
        self.py_func = fn
        self.options = options  # (parallel, serial) njit options
        self.__name__ = fn.__name__
        self.__doc__ = fn.__doc__
        self._variants = {}
        self._entries = {}

    def variant(self, parallel: bool):
        v = self._variants.get(parallel)
        if v is None:
            scope = dict(self.py_func.__globals__)
            for name in self.py_func.__code__.co_names:  # the kernels and drivers it calls
                value = scope.get(name)
                if isinstance(value, CPUKernel):
                    scope[name] = value.variant(parallel)
            suffix = "_parallel" if parallel else "_serial"
            options = self.options[0] if parallel else self.options[1]
            if parallel:
                _start_pool()  # see the class docstring
            v = self._variants[parallel] = numba.njit(**options)(renamed(self.py_func, suffix, scope))
        return v

    def entry(self, parallel: bool):
        """The variant as Python calls it: the serial one itself, the parallel
        one through ``_enter_pool``."""
        e = self._entries.get(parallel)
        if e is None:
            v = self.variant(parallel)
            e = self._entries[parallel] = functools.partial(_enter_pool, v, self) if parallel else v
        return e

    @property
    def parallel(self):
        return self.variant(True)

    @property
    def serial(self):
        return self.variant(False)

    def __call__(self, x, *args):
        return self.entry(x.size >= PARALLEL_MIN_ELEMENTS)(x, *args)


#: numba's thread pool as gpubn's Python calls must treat it (``_enter_pool``):
#: ``layer`` once gpubn started it; ``lock``, held around every call of
#: parallel code where the layer is workqueue (not thread-safe: two Python
#: threads inside it abort the process, as a Dask threaded scheduler did);
#: ``forked``, in a child forked after the pool started under GNU OpenMP (not
#: fork-safe: the child's first parallel region aborts it, and a
#: multiprocessing pool waits forever), where the serial variants run instead.
_pool = types.SimpleNamespace(layer=None, lock=None, forked=False)


def _start_pool():
    """Start numba's thread pool (before any parallel code is compiled or loaded: CPUKernel) and note its layer."""
    if _pool.layer is None:
        numba.get_num_threads()  # starts it
        _pool.layer = numba.threading_layer()
        _pool.lock = threading.Lock() if _pool.layer == "workqueue" else None


def _enter_pool(variant, kernel, *args):
    """Call the parallel ``variant`` of ``kernel`` from Python, under ``_pool``'s rules."""
    if _pool.forked:
        return kernel.variant(False)(*args)
    if _pool.lock is None:
        return variant(*args)
    with _pool.lock:
        return variant(*args)


def _after_fork_in_child():
    try:
        layer = numba.threading_layer()  # ValueError: no pool started (by gpubn or anyone), nothing to keep
    except ValueError:
        return
    if _pool.lock is not None:
        _pool.lock = threading.Lock()  # another thread may have held the parent's
    if layer == "omp":
        from numba.np.ufunc import omppool

        _pool.forked = getattr(omppool, "openmp_vendor", "GNU") == "GNU"


if hasattr(os, "register_at_fork"):  # POSIX
    os.register_at_fork(after_in_child=_after_fork_in_child)


def cpu_kernel(fn):
    """Decorator: ``fn`` (prange loops) becomes a CPUKernel."""
    return CPUKernel(fn, (JIT_PARALLEL, JIT_STREAM))


def cpu_driver(fn=None, *, step: bool = False):
    """Decorator: ``fn`` (one op: calls kernels) becomes a CPUKernel;
    ``step=True``: a driver that other drivers call, inlined into them (JIT_STEP)."""
    if fn is None:
        return lambda f: cpu_driver(f, step=step)
    options = JIT_STEP if step else JIT
    return CPUKernel(fn, (options, options))


class NoneAsNull:
    """A numba-cuda launch extension: a None argument is passed as a null
    pointer-sized parameter.

    A kernel compiled with a None argument (an optional array left out: no
    mask, no activation, no residual) takes one ``.u64`` parameter for it
    (NoneType's data model is an opaque pointer), but numba-cuda 0.30's
    launcher has no case for None and raises ``NotImplementedError(none,
    None)`` at every launch on a real GPU (the simulator never packs
    parameters).  ``tests/test_ptx.py`` checks the packing against the PTX.
    """

    def prepare_args(self, ty, val, stream=0, retr=None):
        if ty == nbtypes.none:
            return nbtypes.uint64, 0
        return ty, val


def gpu_kernel(fn=None, *, whole_warps: bool = False):
    """``cuda.jit`` for every CUDA kernel of the package, wrapped by the launch
    layer (``launch.Kernel``: the argument boundary, the whole-warp check with
    ``whole_warps=True``; numba's dispatcher by default, None arguments passed
    as null parameters by ``NoneAsNull``, or the driver with a parameter block
    built once under ``GPUBN_LAUNCH=driver``).  Under the simulator the same
    wrapper over the simulator's dispatcher."""
    if fn is None:
        return lambda f: gpu_kernel(f, whole_warps=whole_warps)
    from .launch import Kernel

    dispatcher = cuda.jit(fn) if CUDASIM else cuda.jit(extensions=[NoneAsNull()])(fn)
    return Kernel(dispatcher, whole_warps=whole_warps)


#: Threads per CUDA block.  The simulator runs one Python thread per CUDA thread,
#: so it gets small blocks (one warp: the block reductions' cross-warp step is
#: run by tests that set BLOCK_OVERRIDE or launch wider blocks).
MAX_THREADS = 32 if CUDASIM else 256

#: Fewest elements per thread worth a reduction block of its own.  The
#: simulator's tiny test tensors still split every channel over several blocks,
#: so the cross-block merge runs in CI.
MIN_PER_THREAD = 2 if CUDASIM else 16


@numba.njit(**JIT)
def chan_merge(na, ma, qa, nb, mb, qb):
    """Merge two (count, mean, M2) triples; all arithmetic in float64."""
    na = numba.float64(na)
    nb = numba.float64(nb)
    ma = numba.float64(ma)
    mb = numba.float64(mb)
    qa = numba.float64(qa)
    qb = numba.float64(qb)
    if nb == 0.0:
        return na, ma, qa
    if na == 0.0:
        return nb, mb, qb
    n = na + nb
    delta = mb - ma
    w = nb / n
    return n, ma + delta * w, qa + qb + delta * delta * na * w


#: Values a CUDA thread sums around one shift before folding them into its
#: running moments (``fold_chunk``): one division per chunk instead of
#: Welford's one per value.  The simulator's threads see a few values each, so
#: it folds every 2 (the fold runs in CI).
SHIFT_CHUNK = 2 if CUDASIM else 32


@numba.njit(**JIT)
def fold_chunk(n, mean, m2, cnt, k, s1, s2, one):
    """A thread's running (count, mean, M2) merged with a chunk of ``cnt``
    values v given by their sums around the shift ``k``: s1 = sum(v - k),
    s2 = sum((v - k)**2).  Chan's formula, in the accumulators' dtype (error:
    stats.py's docstring).  ``one``: 1 in the accumulators' dtype (a Python 1
    would promote float32 arithmetic to float64)."""
    if cnt == 0:
        return n, mean, m2
    inv = one / cnt
    mb = k + s1 * inv
    qb = s2 - s1 * s1 * inv
    if qb < 0:
        qb = qb - qb
    total = n + cnt
    delta = mb - mean
    w = cnt / total
    return total, mean + delta * w, m2 + qb + delta * delta * n * w


@numba.njit(**JIT)
def shifted_add(v, n, mean, m2, k, s1, s2, cnt, one):
    """One value ``v`` into a CUDA thread's statistics: the state is its
    running (n, mean, M2) and the open chunk's sums around ``k`` (s1, s2, cnt);
    a full chunk (SHIFT_CHUNK values) is folded (``fold_chunk``) and the next
    one summed around the new running mean.  Returns the new state; every
    argument in the accumulators' dtype (``one`` = 1 in it)."""
    d = v - k
    s1 += d
    s2 += d * d
    cnt += one
    if cnt == SHIFT_CHUNK:
        n, mean, m2 = fold_chunk(n, mean, m2, cnt, k, s1, s2, one)
        return n, mean, m2, mean, s1 - s1, s2 - s2, cnt - cnt
    return n, mean, m2, k, s1, s2, cnt


@numba.njit(**JIT)
def shifted_to_moments(n, shift, s1, s2):
    """(count, mean, M2) from sums shifted by ``shift``: s1 = sum(x - shift),
    s2 = sum((x - shift)**2) (error: stats.py's docstring)."""
    if n == 0:
        return 0.0, 0.0, 0.0
    nf = numba.float64(n)
    d = numba.float64(s1) / nf
    m2 = numba.float64(s2) - numba.float64(s1) * d
    if m2 < 0.0:
        m2 = 0.0
    return nf, numba.float64(shift) + d, m2


@numba.njit(**JIT)
def merge_moments(mean, m2, n, nb, mean_b, m2_b):
    """Chan-merge per-channel moments of ``nb`` values (mean_b, m2_b: (C,))
    into running (mean, m2) of ``n`` values, every channel at once: one call
    per block of partials, an elementwise loop over C that vectorises."""
    if nb == 0:
        return
    w = nb / (n + nb)
    for c in range(mean.shape[0]):
        delta = mean_b[c] - mean[c]
        mean[c] += delta * w
        m2[c] += m2_b[c] + delta * delta * n * w


@numba.njit(**JIT)
def merge_rows(mean, m2, n, cnt, center, shift, d, q):
    """Chan-merge a block of ``cnt`` rows into running float64 moments of ``n``
    rows, every channel at once (an elementwise loop over C that vectorises).

    mean, m2: (C,) running (mean - shift, M2); center, shift, d, q: (C,) the
    block's center, the channel shifts, sum(x - center), sum((x - center)**2).
    Compiled without fastmath: reassociating ``(center - shift) + d / cnt``
    would round at the data's offset.
    """
    total = n + cnt
    w = cnt / total
    inv = 1.0 / cnt
    for c in range(mean.shape[0]):
        dc = numba.float64(d[c]) * inv
        qb = numba.float64(q[c]) - numba.float64(d[c]) * dc
        if qb < 0.0:
            qb = 0.0
        delta = (numba.float64(center[c]) - numba.float64(shift[c])) + dc - mean[c]
        mean[c] += delta * w
        m2[c] += qb + delta * delta * n * w


@numba.njit(**JIT)
def finalize_channel(n, mean, m2, eps, gamma, momentum):
    """Per-channel constants of the forward pass from merged moments.

    Returns ``(var, invstd, scale, running_var_sample)``: biased variance (what
    normalizes), 1/sqrt(var + eps), gamma * invstd, and the unbiased variance
    that goes into the running estimate.  NaN stays NaN (no max()).
    """
    var = m2 / n
    if var < 0.0:
        var = 0.0
    invstd = 1.0 / math.sqrt(var + eps)
    unbiased = m2 / max(n - 1.0, 1.0)
    return var, invstd, gamma * invstd, unbiased


@cuda.jit(device=True)
def _warp_sum2(a, b, width):
    """Sums of a and b over the lanes of a warp that agree modulo ``width``
    (a power of two, at most 32), in lanes 0 .. width - 1 (shuffles down to
    offset ``width``; width 32: every lane keeps its own)."""
    off = 16
    while off >= width:
        a += cuda.shfl_down_sync(0xFFFFFFFF, a, off)
        b += cuda.shfl_down_sync(0xFFFFFFFF, b, off)
        off //= 2
    return a, b


@cuda.jit(device=True)
def _warp_merge(n, m, q, width):
    """The Chan merge of the (count, mean, M2) triples of the lanes that
    agree modulo ``width``, in lanes 0 .. width - 1 (as ``_warp_sum2``)."""
    off = 16
    while off >= width:
        nb = cuda.shfl_down_sync(0xFFFFFFFF, n, off)
        mb = cuda.shfl_down_sync(0xFFFFFFFF, m, off)
        qb = cuda.shfl_down_sync(0xFFFFFFFF, q, off)
        n, m, q = chan_merge(n, m, q, nb, mb, qb)
        off //= 2
    return n, m, q


# The block reductions of every CUDA kernel.  Thread t of a block holds a
# partial of channel t % width: width 1 when the whole block reduces one
# channel (inner > 1), width TX when thread (tx, ty) walks channel tx of a
# tile (inner == 1).  Warp shuffles combine the lanes of a channel inside each
# warp; the warps' partials then meet in shared memory, where thread j < width
# combines channel j's (a few per block, in a fixed order: deterministic).
# ``threads`` is the block's size, a multiple of 32 (``check_whole_warps``);
# every thread calls, and finds channel j's result at index j on return.


@cuda.jit(device=True)
def block_sum2(a1, a2, s1, s2, t, threads, width):
    """Sums of s1 and s2 per channel over the block into a1[j], a2[j]
    (a1, a2: float64 shared arrays of at least ``threads`` slots)."""
    v1, v2 = _warp_sum2(numba.float64(s1), numba.float64(s2), width)
    lanes = min(width, 32)  # partials a warp leaves
    lane = t % 32
    if lane < lanes:
        a1[(t // 32) * lanes + lane] = v1
        a2[(t // 32) * lanes + lane] = v2
    cuda.syncthreads()
    if t < width:
        for e in range(t + width, (threads // 32) * lanes, width):
            v1 += a1[e]
            v2 += a2[e]
        a1[t] = v1
        a2[t] = v2
    cuda.syncthreads()


@cuda.jit(device=True)
def block_merge(sn, sm, sq, n, m, q, t, threads, width):
    """The Chan merge of (n, m, q) per channel over the block into sn[j],
    sm[j], sq[j] (as ``block_sum2``)."""
    vn, vm, vq = _warp_merge(numba.float64(n), numba.float64(m), numba.float64(q), width)
    lanes = min(width, 32)
    lane = t % 32
    if lane < lanes:
        e = (t // 32) * lanes + lane
        sn[e] = vn
        sm[e] = vm
        sq[e] = vq
    cuda.syncthreads()
    if t < width:
        for e in range(t + width, (threads // 32) * lanes, width):
            vn, vm, vq = chan_merge(vn, vm, vq, sn[e], sm[e], sq[e])
        sn[t] = vn
        sm[t] = vm
        sq[t] = vq
    cuda.syncthreads()


def check_whole_warps(block, kernel: str):
    """Raise ValueError unless ``block`` (an int or a tuple) is a whole number of
    warps, at most MAX_THREADS: the block reductions (block_sum2, block_merge)
    shuffle with full masks and stage their partials in MAX_THREADS slots."""
    dims = (block,) if isinstance(block, int) else tuple(block)
    threads = int(np.prod(dims))
    if threads % 32 or threads > MAX_THREADS:
        raise ValueError(
            f"block: {dims} is {threads} threads; {kernel} reduces with full-warp shuffles "
            f"and needs a multiple of 32 threads, at most {MAX_THREADS}"
        )


if CUDASIM:  # the simulator gets the warp shuffles it lacks (the code above then runs as shipped)
    from .simwarp import install as _install_warp_shuffles

    _install_warp_shuffles()


def part_of(a, index):
    """(in CPU kernels) ``a[index]``, or None where ``a`` is None: an optional
    array's part, typed as an array or as None, never Optional (a plain njit
    function would return Optional, and the None checks on it would stay in
    the loops instead of being resolved when the kernel is compiled)."""


@overload(part_of, inline="always")
def _part_of(a, index):
    if isinstance(a, nbtypes.NoneType):
        return lambda a, index: None
    return lambda a, index: a[index]


def twin(fn):
    """Compile one per-channel helper for both targets: ``(cpu, cuda)``.

    Helpers that take arrays cannot be a single ``numba.njit`` function: the
    CUDA simulator hands kernels fake device arrays that njit cannot unbox.
    Scalar-only helpers (``chan_merge`` ...) are plain njit functions, callable
    from CPU code and CUDA kernels alike.
    """
    return numba.njit(**JIT_STEP)(fn), cuda.jit(device=True)(fn)


#: Fewest tasks of the CPU kernels' parallel loops over (o, channel range):
#: several per thread on any machine, each still hundreds of rows on big inputs.
MIN_TASKS = 256


@numba.njit(**JIT)
def channel_parts(outer, C):
    """Channel ranges to cut each of ``outer`` slabs into, so that a parallel
    loop over ``outer * parts`` tasks has at least MIN_TASKS tasks (inner > 1
    kernels: a loop over all outer * C rows would instead pay an integer
    division per row, 15 % of a 200-element row's time)."""
    return max(1, min(C, (MIN_TASKS + outer - 1) // outer))


@numba.njit(**JIT)
def task_channels(k, parts, C):
    """Slab ``o`` and channels ``[c0, c1)`` of task k of ``outer * parts``.

    The channel bounds are unsigned on purpose: indexing with a signed channel
    that numba cannot prove non-negative costs a wraparound check per row, 15 %
    of a 200-element row's time."""
    o = k // parts
    p = k - o * parts
    return o, numba.uint64(p * C // parts), numba.uint64((p + 1) * C // parts)


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def current_device() -> int:
    """Ordinal of the current CUDA device (0 under the simulator): every
    per-device cache (workspaces, constant vectors, SM counts) is keyed by it."""
    if CUDASIM:
        return 0
    return int(cuda.get_current_device().id)


#: Tests set this to an SM count (132: an H100, 108: an A100) to compute the
#: launch configurations of a real card without one.
SM_COUNT_OVERRIDE = None
_SM_COUNTS = {}


def sm_count() -> int:
    """Streaming multiprocessors of the current device (2 under the simulator)."""
    if SM_COUNT_OVERRIDE is not None:
        return SM_COUNT_OVERRIDE
    device = current_device()
    count = _SM_COUNTS.get(device)
    if count is None:
        count = _SM_COUNTS[device] = 2 if CUDASIM else int(cuda.get_current_device().MULTIPROCESSOR_COUNT)
    return count


#: Tests set this to a ``(TX, TY)`` (powers of two, TX * TY == MAX_THREADS) to
#: run every kernel with that block: the simulator's own choice is (32, 1) for
#: its small shapes, which never runs the code paths of several thread rows.
BLOCK_OVERRIDE = None


def block_shape(outer: int, C: int, inner: int) -> tuple:
    """Threads per block ``(TX, TY)`` for the canonical view.

    ``inner > 1``: TX threads (32 to MAX_THREADS) walk the contiguous inner
    axis, TY walk rows.  ``inner == 1``: TX threads walk channels (contiguous),
    TY walk rows; TX is at most a warp (32 contiguous values: a warp's loads
    coalesce, and the TY rows of a block then share the last block's merge),
    and no wider than C rounded up to a power of two (C = 2: a warp reads 16
    rows of 2 channels, not 2 lanes of 32 busy).  Both are powers of two with
    TX * TY == MAX_THREADS.
    """
    if BLOCK_OVERRIDE is not None:
        return BLOCK_OVERRIDE
    if inner == 1:
        tx = min(32, MAX_THREADS, next_pow2(C))
    else:
        tx = min(MAX_THREADS, max(min(32, MAX_THREADS), next_pow2(inner)))
    return tx, MAX_THREADS // tx


def reduction_splits(n_per_channel: int, columns: int, threads: int) -> int:
    """Blocks per channel column for a split reduction.

    Enough blocks in all for ~4 per SM, but each of the ``threads`` threads
    of a block that share one channel still gets MIN_PER_THREAD elements, and
    each block fewer than 2**23 (counts stay exact in float32).
    """
    want = max(1, -(-4 * sm_count() // columns))
    most = max(1, n_per_channel // (MIN_PER_THREAD * threads))
    least = -(-n_per_channel // (1 << 23))
    return int(min(65535, max(least, min(want, most))))


# ----------------------------------------------------------------------------
# CPU: the row blocks, chunks and folded rows of the reduction kernels

#: Elements per chunk of a row summed in x's compute dtype (inner > 1; also
#: the backward sums): short enough that float32 sums over it stay accurate.
CHUNK = 4096
#: Elements per sub-block of rows (channels contiguous), and most rows in
#: one: short enough that x.dtype sums over it stay accurate, long enough to
#: amortise its float64 merge.
SUB_BLOCK = 1 << 16
SUB_ROWS = 1024
#: Channels-contiguous rows narrower than this are folded (``fold_rows``) ...
FOLD_WIDTH = 512
#: ... in inputs of at least this many elements: below, the folded partials
#: cost more than the longer loops save ((256, 64) on the development VM:
#: backward 13 us folded, 8 us not; forward 7.4 against 6.0).
FOLD_MIN = 1 << 18
#: Row blocks of the CPU kernels when channels are contiguous (inner == 1):
#: a few per core, few enough that merging their partials costs nothing ...
ROW_BLOCKS = 32
#: ... and none of fewer elements than this: small inputs get few blocks, so
#: their float64 partials cost less than their work.
BLOCK_MIN = 1 << 14


@numba.njit(**JIT)
def row_blocks(outer, C):
    """(blocks, rows per block, rows per sub-block) of a channels-contiguous
    CPU kernel over x (outer, C): at most ROW_BLOCKS blocks of at least
    BLOCK_MIN elements, sub-blocks of SUB_BLOCK elements or SUB_ROWS rows."""
    blocks = max(1, min(outer, ROW_BLOCKS, outer * C // BLOCK_MIN))
    rows_per = (outer + blocks - 1) // blocks
    blocks = (outer + rows_per - 1) // rows_per
    return blocks, rows_per, max(1, min(rows_per, SUB_BLOCK // C, SUB_ROWS))


@numba.njit(inline="always", **JIT_STREAM)
def sum_parts(part, out):
    """out[j, c] = the float64 sum over k of part[j, k, c], in k's order: the
    partials of a CPU reduction meet in a fixed order whatever the thread count
    (serially: a few blocks' or rows' partials per channel)."""
    for c in range(part.shape[2]):
        for j in range(part.shape[0]):
            t = 0.0
            for k in range(part.shape[1]):
                t += part[j, k, c]
            out[j, c] = t


def fold_factor(outer: int, C: int) -> int:
    """How many consecutive rows of a C-contiguous (outer, C) array ``fold_rows``
    puts side by side: the largest power of two f with f * C <= FOLD_WIDTH
    that divides outer."""
    f = 1
    while 2 * f * C <= FOLD_WIDTH and outer % (2 * f) == 0:
        f *= 2
    return f


def fold_rows(x, f=None):
    """x (outer, C), C-contiguous, viewed as (outer / f, f * C): f consecutive
    rows side by side (``fold_factor``; f = 1 where x is not contiguous).
    Column g * C + c of the view holds channel c: a kernel that treats the f * C
    columns as channels computes f partial results per channel, and runs its
    vectorised loop over rows long enough to amortise the loop's overhead
    (NHWC with C = 64: 1.5x).  Returns (view, f)."""
    outer, C = x.shape
    if x.strides != (C * x.itemsize, x.itemsize):
        return x, 1
    f = fold_factor(outer, C) if f is None else f
    return x.reshape(outer // f, f * C), f


@numba.njit(**JIT)
def repeat_groups(a, f):
    """a (k, C) repeated for f side-by-side groups of folded rows: (k, f * C)."""
    C = a.shape[1]
    out = np.empty((a.shape[0], f * C), a.dtype)
    for k in range(a.shape[0]):
        for j in range(f * C):
            out[k, j] = a[k, j % C]
    return out


# ----------------------------------------------------------------------------
# CUDA: the pieces of a split reduction (partials -> workspace -> last block)


@cuda.jit(device=True)
def block_slice(outer, inner, s, inner_splits):
    """Rows [o0, o1) and inner range [i0, i1) of split s of a channel."""
    outer_splits = cuda.gridDim.y // inner_splits
    so = s // inner_splits
    si = s - so * inner_splits
    rows = (outer + outer_splits - 1) // outer_splits
    cols = (inner + inner_splits - 1) // inner_splits
    o0 = so * rows
    i0 = si * cols
    return o0, min(outer, o0 + rows), i0, min(inner, i0 + cols)


@cuda.jit(device=True)
def reduction_slot(outer, inner, inner_splits):
    """Where this thread of a split reduction works, on grid (columns, splits)
    and block (TX, TY) over the view (outer, C, inner): (c, width, o0, o1, i0,
    i1, ix, di).  Thread (tx, ty) walks channel c over the rows o0 + ty, o0 +
    ty + TY, ... < o1 and, in each, the positions i0 + ix, i0 + ix + di, ...
    < i1; a block reduces ``width`` channels (thread t holds a partial of its
    t % width-th: ``block_sum2``, ``block_merge``).

    ``inner_splits`` an int (inner > 1): block (c, s) owns slice s of channel
    c (``block_slice``), its TX * TY threads walk the slice's rows and inner
    positions (width 1).  None (inner == 1, channels contiguous): block
    (tile, s) covers channels tile * TX ... tile * TX + TX - 1 over the s-th
    slice of the rows, thread tx walks channel tile * TX + tx (width TX; c may
    be past C in the last tile).  ``inner_splits is None`` is decided when the
    kernel is compiled: one source, one specialization per access regime.
    """
    TX, tx = cuda.blockDim.x, cuda.threadIdx.x
    if inner_splits is None:
        o0, o1, _, _ = block_slice(outer, 1, cuda.blockIdx.y, 1)
        return cuda.blockIdx.x * TX + tx, TX, o0, o1, 0, 1, 0, 1
    o0, o1, i0, i1 = block_slice(outer, inner, cuda.blockIdx.y, inner_splits)
    return cuda.blockIdx.x, 1, o0, o1, i0, i1, tx, TX


@cuda.jit(device=True)
def last_block(counter, column, splits, flag):
    """True in every thread of the last block of ``column`` to get here.

    Every block fences its partials before taking the ticket (release), and
    the last block fences again after it, before reading anyone's partials
    (acquire): the pattern of the CUDA programming guide's threadFenceReduction.
    The last block resets the counter for the next launch."""
    t = cuda.threadIdx.y * cuda.blockDim.x + cuda.threadIdx.x
    cuda.threadfence()
    cuda.syncthreads()
    if t == 0:
        ticket = cuda.atomic.add(counter, column, 1)
        flag[0] = 1 if ticket == splits - 1 else 0
        if ticket == splits - 1:
            counter[column] = 0
    cuda.syncthreads()
    last = flag[0] == 1
    if last:
        cuda.threadfence()
    return last


@cuda.jit(device=True)
def coherent(work, k, j, c):
    """Read work[k, j, c] through L2 (an atomic no-op), never a stale L1 line."""
    return cuda.atomic.add(work, (k, j, c), 0)


class ReductionConfig(NamedTuple):
    """How a reduction over the canonical view is launched (the statistics
    and the backward sums share it).

    regime: "inner" (threads walk the contiguous inner axis; grid (C, splits))
    or "channels" (inner == 1: threads walk channels; grid (columns, splits)).
    inner_splits: splits along inner ("inner" regime; None otherwise).
    splits: blocks per channel; 1 when a block owns whole channels, and then
    the same launch runs the elementwise pass too (``one_pass``).
    columns: blocks across channels, one ticket counter each.
    """

    regime: str
    grid: tuple
    block: tuple
    inner_splits: object
    splits: int
    columns: int


#: Most values per channel for which one block owns a channel: the reduction
#: and the elementwise pass in one launch (a block re-reads its channels from
#: L1/L2 instead of handing partials to a second launch).  On a GPU: (32,
#: 2048, 7, 7) (1568 per channel) and (4096, 512) (4096 per channel) take one
#: launch; (64, 256, 28, 28) (50 176) takes the split path.  Chosen from the
#: shapes, NOT yet measured on a card.  The simulator gets a small limit so
#: that its tiny test shapes run both paths.
ONE_PASS_MAX_GPU = 1 << 14
ONE_PASS_MAX = 64 if CUDASIM else ONE_PASS_MAX_GPU
#: ... and most bytes of x: the re-reads must hit L2 (50 MB on an H100, 60 MB
#: on an H200, with y or dx beside x).
ONE_PASS_MAX_BYTES = 32 << 20
#: Inputs of at most this many bytes are host-bound on any card (a launch costs
#: more host time than moving them takes): one launch however few blocks it fills.
HOST_BOUND_BYTES = 1 << 20


def one_pass(shape, itemsize: int = 4) -> bool:
    """Whether a canonical view (outer, C, inner) of ``itemsize``-byte values
    is reduced and written in one launch per pass (a block per channel, or per
    tile of channels): few values per channel, x small enough to be re-read
    from L2, and either enough blocks for two per SM or so small that the
    launch is host-bound ((4096, 512) gave 16 blocks of 32 channels to a
    132-SM card: it takes the split passes)."""
    outer, C, inner = shape
    nbytes = outer * C * inner * itemsize
    if outer * inner > ONE_PASS_MAX or nbytes > ONE_PASS_MAX_BYTES:
        return False
    return nbytes <= HOST_BOUND_BYTES or reduction_config(shape, True).columns >= 2 * sm_count()


def reduction_config(shape, one_launch: bool = False) -> ReductionConfig:
    """The reduction's launch for a view shape (outer, C, inner): channels
    split over blocks for ~4 blocks per SM, or (``one_launch``) a block per
    channel (inner > 1) or per tile of channels (inner == 1)."""
    outer, C, inner = shape
    tx, ty = block_shape(outer, C, inner)
    n = outer * inner
    if inner > 1:
        if one_launch:
            return ReductionConfig("inner", (C, 1), (tx, ty), 1, 1, C)
        splits = reduction_splits(n, C, tx * ty)
        # split the inner axis only as far as the rows cannot carry the split
        inner_splits = nonempty(inner, max(1, min(-(-splits // max(1, -(-outer // ty))), -(-inner // tx))))
        outer_splits = nonempty(outer, max(1, min(-(-splits // inner_splits), -(-outer // ty))))
        splits = outer_splits * inner_splits
        return ReductionConfig("inner", (C, splits), (tx, ty), inner_splits, splits, C)
    # channels contiguous: a block covers tx channels, so only its ty threads
    # share a channel's rows (passing tx * ty left (4096, 512) with 2 blocks)
    columns = -(-C // tx)
    splits = 1 if one_launch else nonempty(outer, min(reduction_splits(n, columns, ty), max(1, -(-outer // ty))))
    return ReductionConfig("channels", (columns, splits), (tx, ty), None, splits, columns)


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


def channel_launch_config(C: int) -> tuple:
    """(grid, block) of a kernel with a thread per channel."""
    threads = min(128, max(32, C))
    return -(-C // threads), threads


class Launches(NamedTuple):
    """Every launch configuration of one call shape, chosen once (a CUDA plan
    holds one; the launchers choose it themselves when called without)."""

    one_launch: bool  # a block per channel: the reduction kernels write y / dx too (``one_pass``)
    reduce: ReductionConfig  # the statistics and the backward sums
    elementwise: tuple  # (regime, grid, block) of the scalar elementwise kernels
    quads: object  # (grid, block) of the 16-byte-load kernel over quads, or None (inner % 4 != 0)
    channels: tuple  # (grid, block) of a thread per channel


def launches(shape, one_launch: bool = False) -> Launches:
    """The launch configurations of a view shape (outer, C, inner)."""
    outer, C, inner = shape
    quads = None
    if inner > 1 and inner % 4 == 0:
        quads = elementwise_launch_config((outer, C, inner // 4))[1:]
    reduce = reduction_config(shape, one_launch)
    return Launches(one_launch, reduce, elementwise_launch_config(shape), quads, channel_launch_config(C))


def nonempty(length: int, parts: int) -> int:
    """The number of parts of ``length`` items cut into ceil(length / parts)
    each (``block_slice``): at most ``parts``, and none of them empty ((20,
    6, 65536) had 18 row splits of 2 rows for its 20 rows: 8 empty)."""
    per = -(-length // max(1, parts))
    return max(1, -(-length // per))
