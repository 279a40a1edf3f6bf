"""Memory reused across calls: device scratch, and large host outputs.

Workspaces (the split reductions' partials and ticket counters) are per
device, per Python thread and per stream (two launches that may run at the
same time never share a partials buffer or a ticket counter: kernels run on
the caller's stream, and one thread may use several) and keyed by (name,
shape, dtype).  Counters are created zeroed (on the stream that first uses
them) and every kernel that uses one leaves it zeroed.  A workspace is
allocated on its first use for a (device, stream, shape); after that a call of
the same shape allocates nothing.  A workspace is never freed while its
thread lives (no eviction: a captured CUDA graph may still use it); warm up
once on the capture stream before capturing a CUDA graph.
"""

import math
import os
import threading

import numpy as np
from numba import cuda

from .common import current_device

CUDASIM = bool(cuda.config.ENABLE_CUDASIM)

_local = threading.local()


def workspace(name, shape, dtype, zero=False, stream=0, scratch=None):
    """A device array of ``shape``/``dtype`` owned by this thread for launches
    on ``stream`` (a handle) of the current device, reused across calls;
    ``zero``: created zeroed, by a copy queued on that stream.

    ``scratch``: None, or the caller's allocator ``scratch(shape, dtype,
    zero)`` (torch's caching allocator for torch tensors: graph-aware, its
    zeros a memset on the caller's stream), used instead of the cache: under
    CUDA-graph capture every call's scratch then belongs to the graph."""
    if scratch is not None:
        return scratch(tuple(shape), dtype, zero)
    cache = getattr(_local, "cache", None)
    if cache is None:
        cache = _local.cache = {}
    key = (current_device(), name, tuple(shape), np.dtype(dtype).str, stream if isinstance(stream, int) else id(stream))
    arr = cache.get(key)
    if arr is None:
        from .launch import numba_stream

        if zero:
            arr = cuda.to_device(np.zeros(shape, dtype), stream=numba_stream(stream))
        else:
            arr = cuda.device_array(shape, dtype, stream=numba_stream(stream))
        cache[key] = arr
    return arr


# ----------------------------------------------------------------------------
# large outputs, host and device: freed buffers kept for reuse, by size


class _FreeList:
    """Freed buffers by size in bytes and ``where`` they may be reused, at
    most ``limit`` bytes kept (thread-safe).

    Device buffers: ``where`` = (device, stream).  A buffer is reused on its
    own device only, and by calls on the stream it was allocated for: freed
    by the host, it may still be in use by work queued on that stream, which
    a later call on the same stream queues after, and a call on another
    stream could run beside (the rule of torch's caching allocator).

    The lock is re-entrant: a buffer comes back from a finalizer, which the
    garbage collector may run inside ``take`` or ``give`` (an allocation there
    can start a collection that frees a cached array in a reference cycle)."""

    def __init__(self, limit: int):
        self.limit, self.cached, self.free, self.lock = limit, 0, {}, threading.RLock()

    def take(self, nbytes: int, where=None):
        """A kept buffer of ``nbytes`` for ``where``, or None."""
        with self.lock:
            free = self.free.get((nbytes, where))
            if not free:
                return None
            self.cached -= nbytes
            return free.pop()

    def give(self, buffer, nbytes: int, where=None):
        """Keep ``buffer`` for reuse at ``where`` (dropped when the list is full)."""
        with self.lock:
            if self.cached + nbytes <= self.limit:
                self.free.setdefault((nbytes, where), []).append(buffer)
                self.cached += nbytes


#: Outputs of at least this many bytes come from the caches.
CACHE_MIN_BYTES = 1 << 20
#: At most this much freed memory is kept for reuse (GPUBN_HOST_CACHE_MB,
#: GPUBN_DEVICE_CACHE_MB; 0 = off).
_host = _FreeList(int(os.environ.get("GPUBN_HOST_CACHE_MB", "1024")) << 20)
_device = _FreeList(int(os.environ.get("GPUBN_DEVICE_CACHE_MB", "4096")) << 20)


class _HostBlock:
    """Owns one cached host buffer while arrays view it; gives it back to the
    cache when the last of them is gone (NumPy keeps this object as ``.base``)."""

    def __init__(self, buffer, shape, dtype):
        self.buffer = buffer
        self.__array_interface__ = {
            "data": (buffer.ctypes.data, False),
            "shape": tuple(shape),
            "typestr": np.dtype(dtype).str,
            "version": 3,
        }

    def __del__(self):
        _host.give(self.buffer, self.buffer.nbytes)


def host_empty(shape, dtype):
    """np.empty(shape, dtype), but large arrays reuse memory freed by earlier ones.

    A fresh large array costs its size again in page faults and zero-filling by
    the kernel (2 ms of a 7 ms forward pass on 51 MB, on the 2-vCPU development
    VM); a reused buffer costs
    nothing.  Memory is reused only once every array viewing it is gone.
    """
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes < CACHE_MIN_BYTES or _host.limit == 0:
        return np.empty(shape, dtype)
    buffer = _host.take(nbytes)
    if buffer is None:
        buffer = np.empty(nbytes, np.uint8)
    return np.asarray(_HostBlock(buffer, shape, dtype))


def device_empty(shape, dtype, stream: int = 0):
    """cuda.device_array(shape, dtype), C order, but large arrays reuse device
    memory freed by earlier ones of the current device allocated for the same
    ``stream`` (a handle: the stream the caller's kernels use; ``_FreeList``).

    A fresh allocation costs a cudaMalloc (about 0.5 ms for a 200 MB output on
    an H200, longer than the kernel that fills it).  The array gets a numba
    ``AutoFreePointer`` of its own, reference-counted by the array and every
    view of it exactly like numba's own allocations; when the count reaches
    zero its finalizer gives the buffer back to the cache instead of freeing
    it.  Under the CUDA simulator this is plain ``cuda.device_array``.
    """
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    if CUDASIM or nbytes < CACHE_MIN_BYTES or _device.limit == 0:
        return cuda.device_array(shape, dtype)
    from numba.cuda.cudadrv.devicearray import DeviceNDArray
    from numba.cuda.cudadrv.driver import AutoFreePointer

    where = (current_device(), stream)
    base = _device.take(nbytes, where)
    if base is None:
        base = cuda.device_array(nbytes, np.uint8)

    def give_back():
        _device_live.discard(pointer)
        _device.give(base, nbytes, where)

    memory = base.gpu_data
    pointer = AutoFreePointer(memory.context, memory.device_pointer, nbytes, finalizer=give_back)
    _device_live.add(pointer)  # alive while counted, as numba's context keeps its own
    strides, step = [], dtype.itemsize
    for extent in reversed(shape):  # C order
        strides.insert(0, step)
        step *= extent
    return DeviceNDArray(tuple(shape), tuple(strides), dtype, gpu_data=pointer.own())


_device_live = set()
