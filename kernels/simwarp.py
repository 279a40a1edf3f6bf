"""Warp shuffles for numba's CUDA simulator, so that CI runs the reductions as shipped.

The simulator runs one Python thread per CUDA thread and has no
``cuda.shfl_*_sync``.  Rather than choose other code under the simulator (the
code that ships would then never run anywhere without a GPU), ``install()``
adds the shuffles the kernels use to the simulator's ``cuda`` module:

    shfl_down_sync(mask, value, delta)   lane l gets lane l + delta's value
                                         (its own where l + delta >= 32)
    shfl_xor_sync(mask, value, lane_mask)

Each warp of a block exchanges values through 32-slot buffers and a barrier
of its own (``threading.Barrier`` over the warp's threads, not the block's
``syncthreads``: code that only some warps run, like the second stage of
``common.block_sum2``, then meets as on the GPU).  ``install()`` also makes
the simulator's shared-memory allocation thread-safe (``shared_array``).  As on the GPU with a
full mask, every thread of the warp must call them, and the warp must be whole
(``common.check_whole_warps``).
"""

import sys
import threading

import numpy as np

#: Seconds a warp waits for its other threads before the shuffle fails (a
#: thread that raised or took another branch would otherwise hang the test).
TIMEOUT = 120.0

#: The interpreter's thread switch interval under the simulator (seconds).
SWITCH_INTERVAL = 1e-4

_lock = threading.Lock()


def _warp_state():
    """[buffers, barrier, size, calls] of the calling simulator thread's warp,
    and its lane.  The states live on the block's manager (one per block run),
    so nothing outlives a launch."""
    me = threading.current_thread()
    manager = me._manager
    warp, lane = divmod(me.thread_id, 32)
    with _lock:
        warps = manager.__dict__.setdefault("gpubn_warps", {})
        state = warps.get(warp)
        if state is None:
            size = min(32, int(np.prod(manager._block_dim)) - 32 * warp)
            state = warps[warp] = [([None] * 32, [None] * 32), threading.Barrier(size, timeout=TIMEOUT), size, {}]
    return state, lane


def _exchange(value, source):
    """Every lane publishes ``value``; lane l gets lane ``source(l)``'s (its own
    when out of range).  One barrier per exchange: consecutive exchanges
    alternate between two buffers (a lane can only write a buffer again after
    the next barrier, which every lane reaches after reading it)."""
    (buffers, barrier, size, calls), lane = _warp_state()
    k = calls.get(lane, 0)
    calls[lane] = k + 1
    buffer = buffers[k % 2]
    buffer[lane] = value
    barrier.wait()
    src = source(lane)
    return buffer[src] if 0 <= src < size else value


def shfl_down_sync(self, mask, value, delta):
    return _exchange(value, lambda lane: lane + delta if lane + delta < 32 else -1)


def shfl_xor_sync(self, mask, value, lane_mask):
    return _exchange(value, lambda lane: lane ^ lane_mask)


_shared_lock = threading.Lock()


def shared_array(self, shape, dtype, alignment=None):
    """The simulator's ``cuda.shared.array`` with its allocation made atomic.

    The simulator keys a block's shared arrays by the calling line and
    allocates one on the first call: ``get``, ``np.empty``, store.  Two
    threads of a block switched between the two steps got two different
    arrays for one shared array (uninitialized memory read as a partial sum:
    a variance of 52 for data of variance 1e-8, seen once in CI at a 0.1 ms
    switch interval, and possible at any).  The same steps under a lock."""
    from numba.core import types
    from numba.np import numpy_support

    if alignment is not None:
        raise RuntimeError("Array alignment is not supported in cudasim")
    if isinstance(dtype, types.Type):
        dtype = numpy_support.as_dtype(dtype)
    if shape == 0:  # dynamic shared memory: one buffer for all
        return np.frombuffer(self._dynshared.data, dtype=dtype, count=self._dynshared_size // dtype.itemsize)
    caller = sys._getframe(1)
    key = (caller.f_code.co_filename, caller.f_lineno)
    with _shared_lock:
        res = self._allocations.get(key)
        if res is None:
            res = self._allocations[key] = np.empty(shape, dtype)
    return res


def install():
    """Add the warp shuffles to the simulator's cuda module and make its
    shared-memory allocation thread-safe (idempotent).

    Also shortens the interpreter's thread switch interval: every simulated
    barrier (``syncthreads`` and these shuffles) waits for 32 or more Python
    threads to take the GIL in turn, and at the default 5 ms interval a launch
    spends most of its time waiting for turns (a small batch_norm_forward: 24 s
    at 5 ms, 3 s at 0.1 ms).  Only under the simulator."""
    from numba.cuda.simulator.kernelapi import FakeCUDAModule, FakeCUDAShared

    sys.setswitchinterval(SWITCH_INTERVAL)
    FakeCUDAShared.array = shared_array
    FakeCUDAModule.shfl_down_sync = shfl_down_sync
    FakeCUDAModule.shfl_xor_sync = shfl_xor_sync
