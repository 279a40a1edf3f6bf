"""The host and device output caches reuse memory only once nothing views it."""

import subprocess
import sys

import numpy as np
import pytest

import gpubn
from gpubn.kernels import workspace

from conftest import SIM


def test_reused_only_after_every_view_is_gone():
    shape = (512, 1024)  # 2 MiB of float32: cached
    a = workspace.host_empty(shape, np.float32)
    a[...] = 1.0
    view = a[::3]
    addr = a.ctypes.data
    del a
    b = workspace.host_empty(shape, np.float32)  # the view still holds the first buffer
    assert b.ctypes.data != addr
    b[...] = 2.0
    np.testing.assert_array_equal(view, 1.0)
    del view
    c = workspace.host_empty(shape, np.float32)
    assert c.ctypes.data == addr  # now reused
    assert c.flags.writeable and c.flags.c_contiguous and c.shape == shape
    assert not np.shares_memory(b, c)


def test_outputs_of_successive_calls_do_not_alias():
    rng = np.random.default_rng(0)
    x1 = rng.standard_normal((64, 8, 1024)).astype(np.float32)
    x2 = 5 + 2 * x1
    y1, _ = gpubn.batch_norm_forward(x1, backend="cpu")
    y2, _ = gpubn.batch_norm_forward(x2, backend="cpu")
    assert not np.shares_memory(y1, y2)
    np.testing.assert_allclose(y1, y2, atol=1e-4)  # the same data, standardized
    del y1
    y3, _ = gpubn.batch_norm_forward(x1 * 0, backend="cpu")
    assert not np.shares_memory(y2, y3)
    np.testing.assert_array_equal(y3, 0)
    assert np.isfinite(y2).all()


def test_small_arrays_are_plain():
    a = workspace.host_empty((3, 4), np.float64)
    assert a.base is None


@pytest.mark.skipif(SIM, reason="the device output cache is bypassed under the simulator")
def test_device_output_reused_only_after_every_view_is_gone_cuda():
    from numba import cuda

    shape = (512, 1024)  # 2 MiB of float32: cached
    a = workspace.device_empty(shape, np.float32)
    a.copy_to_device(np.ones(shape, np.float32))
    view = a[::3]
    addr = a.device_ctypes_pointer.value
    del a
    b = workspace.device_empty(shape, np.float32)  # the view still holds the first buffer
    assert b.device_ctypes_pointer.value != addr
    b.copy_to_device(np.full(shape, 2.0, np.float32))
    np.testing.assert_array_equal(view.copy_to_host(), 1.0)
    del view
    c = workspace.device_empty(shape, np.float32)
    assert c.device_ctypes_pointer.value == addr  # now reused
    assert c.shape == shape and c.is_c_contiguous()
    c.copy_to_device(np.arange(np.prod(shape), dtype=np.float32).reshape(shape))
    np.testing.assert_array_equal(c.copy_to_host().ravel(), np.arange(np.prod(shape)))
    cuda.synchronize()
    del c
    d = workspace.device_empty(shape, np.float32, stream=0x5EED)  # freed for stream 0: not reused on another
    assert d.device_ctypes_pointer.value != addr


def test_workspaces_are_per_stream():
    """Two launches on different streams may run at once: they never share a
    partials buffer or a ticket counter (one thread, one stream: one workspace)."""
    if "cuda" not in gpubn.available_backends():
        pytest.skip("backend 'cuda' not available")
    a = workspace.workspace("test.work", (3, 4), np.float64, stream=0)
    b = workspace.workspace("test.work", (3, 4), np.float64, stream=0x5EED)
    assert a is not b
    assert workspace.workspace("test.work", (3, 4), np.float64, stream=0) is a
    counter = workspace.workspace("test.counter", (5,), np.int32, zero=True, stream=0x5EED)
    np.testing.assert_array_equal(counter.copy_to_host(), 0)


FREED_INSIDE_THE_LOCK = """
import gc, threading
import subprocess
import sys

import numpy as np
from gpubn.kernels import workspace

class Cycle:
    pass

c = Cycle()
c.self, c.array = c, workspace.host_empty((512, 1024), np.float32)  # cached, in a reference cycle
del c
done = threading.Event()

def inside():
    with workspace._host.lock:
        gc.collect()  # what an allocation inside take or give may start
    done.set()

threading.Thread(target=inside, daemon=True).start()
print("ok" if done.wait(20) else "deadlock")
"""


@pytest.mark.subprocess
def test_an_output_freed_by_the_collector_inside_the_cache_lock():
    """A cached output in a reference cycle goes back to the cache whenever the
    garbage collector runs, which may be inside the cache's own lock: before
    the lock was re-entrant, that thread waited for itself forever."""
    proc = subprocess.run([sys.executable, "-c", FREED_INSIDE_THE_LOCK], capture_output=True, text=True, timeout=300)
    assert proc.stdout.split() == ["ok"], proc.stdout + proc.stderr[-2000:]


def test_freed_buffers_are_reused_where_they_were_freed():
    """A device buffer is reused on its own device and stream only (work
    queued on its stream may still use it); host buffers have one place."""
    free = workspace._FreeList(1 << 20)
    free.give("on 0, stream 5", 256, (0, 5))
    free.give("host", 256)
    assert free.take(256, (0, 7)) is None  # another stream
    assert free.take(256, (1, 5)) is None  # another device
    assert free.take(512, (0, 5)) is None  # another size
    assert free.take(256, (0, 5)) == "on 0, stream 5"
    assert free.take(256, (0, 5)) is None
    assert free.take(256) == "host"
    assert free.cached == 0
