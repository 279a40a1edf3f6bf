"""Device scratch reused across calls: no device allocation in the hot path.

Workspaces are per Python thread (two threads never share a partials buffer)
and keyed by (name, shape, dtype); a handful of shapes live at once, the least
recently used is dropped beyond ``MAX_ENTRIES``.  Counters are created zeroed
and every kernel that uses one leaves it zeroed.
"""

import threading
from collections import OrderedDict

import numpy as np
from numba import cuda

MAX_ENTRIES = 64
_local = threading.local()


def workspace(name, shape, dtype, zero=False):
    """A device array of ``shape``/``dtype`` owned by this thread, reused across calls."""
    cache = getattr(_local, "cache", None)
    if cache is None:
        cache = _local.cache = OrderedDict()
    key = (name, tuple(shape), np.dtype(dtype).str)
    arr = cache.get(key)
    if arr is None:
        if zero:
            arr = cuda.to_device(np.zeros(shape, dtype))
        else:
            arr = cuda.device_array(shape, dtype)
        cache[key] = arr
        while len(cache) > MAX_ENTRIES:
            cache.popitem(last=False)
    else:
        cache.move_to_end(key)
    return arr
