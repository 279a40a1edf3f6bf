"""Warp shuffles for numba's CUDA simulator, so that CI runs the reductions as shipped.

The simulator runs one Python thread per CUDA thread and has no
``cuda.shfl_*_sync``.  Rather than choose other code under the simulator (the
code that ships would then never run anywhere without a GPU), ``install()``
adds the shuffles the kernels use to the simulator's ``cuda`` module:

    shfl_down_sync(mask, value, delta)   lane l gets lane l + delta's value
                                         (its own where l + delta >= 32)
    shfl_xor_sync(mask, value, lane_mask)

Each warp of a block exchanges values through a 32-slot buffer between two
barriers of its own (``threading.Barrier`` over the warp's threads, not the
block's ``syncthreads``: code that only some warps run, like the second stage
of ``common.block_sum2``, then meets as on the GPU).  As on the GPU with a
full mask, every thread of the warp must call them, and the warp must be whole
(``common.check_whole_warps``).
"""

import threading

import numpy as np

#: Seconds a warp waits for its other threads before the shuffle fails (a
#: thread that raised or took another branch would otherwise hang the test).
TIMEOUT = 120.0

#: The interpreter's thread switch interval under the simulator (seconds).
SWITCH_INTERVAL = 1e-4

_lock = threading.Lock()
_warps = {}


def _warp_state():
    """[buffers, barrier, size, calls] of the calling simulator thread's warp, and its lane."""
    me = threading.current_thread()
    threads = int(np.prod(me._manager._block_dim))
    warp, lane = divmod(me.thread_id, 32)
    key = (id(me._manager), tuple(me.blockIdx), warp)
    state = _warps.get(key)
    if state is None:
        with _lock:
            state = _warps.get(key)
            if state is None:
                if len(_warps) > 4096:  # finished launches' warps
                    _warps.clear()
                size = min(32, threads - 32 * warp)
                state = _warps[key] = [([None] * 32, [None] * 32), threading.Barrier(size, timeout=TIMEOUT), size, {}]
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


def install():
    """Add the warp shuffles to the simulator's cuda module (idempotent).

    Also shortens the interpreter's thread switch interval: every simulated
    barrier (``syncthreads`` and these shuffles) waits for 32 or more Python
    threads to take the GIL in turn, and at the default 5 ms interval a launch
    spends most of its time waiting for turns (a small batch_norm_forward: 24 s
    at 5 ms, 3 s at 0.1 ms).  Only under the simulator."""
    import sys

    from numba.cuda.simulator.kernelapi import FakeCUDAModule

    sys.setswitchinterval(SWITCH_INTERVAL)
    FakeCUDAModule.shfl_down_sync = shfl_down_sync
    FakeCUDAModule.shfl_xor_sync = shfl_xor_sync
