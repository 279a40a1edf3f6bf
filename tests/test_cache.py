"""numba's disk cache keeps the parallel and serial variants of a CPU kernel apart.

numba names cache entries by a function's qualified name and argument types,
not by its options: before CPUKernel compiled its serial variant under a name
of its own, whichever variant was compiled first was loaded for both (a
"parallel" kernel ran on one core, 1.5x slower, after the test suite had
cached the serial one).
"""

import importlib.util
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from gpubn.kernels.common import cpu_kernel

SOURCE = textwrap.dedent(
    """
    from numba import prange

    def double(x, y):
        for i in prange(x.shape[0]):
            y[i] = 2 * x[i]
    """
)


def load(path):
    spec = importlib.util.spec_from_file_location("cached_kernel", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_serial_cache_entry_is_not_loaded_as_parallel(tmp_path):
    path = tmp_path / "cached_kernel.py"
    path.write_text(SOURCE)
    x = np.arange(8.0)
    y = np.empty_like(x)

    first = cpu_kernel(load(path).double)
    first.serial(x, y)  # compiled and written to tmp_path/__pycache__
    np.testing.assert_array_equal(y, 2 * x)

    second = cpu_kernel(load(path).double)  # a fresh process would see the same
    second.parallel(x, y)
    second.serial(x, y)
    np.testing.assert_array_equal(y, 2 * x)
    assert not second.parallel.stats.cache_hits  # compiled, not the serial code
    assert second.parallel.stats.cache_misses
    assert second.serial.stats.cache_hits  # the serial entry is still found


def test_kernels_are_stamped_with_the_whole_package(tmp_path):
    """A kernel's cache entry is invalidated by an edit of any kernels/*.py
    (its compiled code contains helpers from other files of the package)."""
    from numba.core.caching import CompileResultCacheImpl as CacheImpl

    from gpubn.kernels import cache, normalize

    assert cache.INSTALLED
    locator = CacheImpl(normalize.scale_shift_inner_cpu.py_func)._locator
    assert isinstance(locator, cache.PackageLocator)
    assert locator.get_source_stamp() == cache.package_stamp()

    (tmp_path / "a.py").write_text("x = 1\n")
    (tmp_path / "b.py").write_text("y = 2\n")
    before = cache.package_stamp(tmp_path)
    (tmp_path / "b.py").write_text("y = 3\n")
    assert cache.package_stamp(tmp_path) != before

    path = tmp_path / "cached_kernel.py"  # outside the package: numba's own stamp
    path.write_text(SOURCE)
    assert not isinstance(CacheImpl(load(path).double)._locator, cache.PackageLocator)


def test_processes_compiling_at_once_never_share_a_cache_file(tmp_path, monkeypatch):
    """Two processes that read a function's empty index before either wrote it
    (xdist workers, MPI ranks on a cold cache) each save another signature.
    numba's counter names both data files 1, and the index can end up naming
    the other signature's code (the interleaving below: index A, index B, data
    B, data A).  gpubn's files are named by their key: the index names only a
    file that holds that key's code."""
    from numba.core.caching import IndexDataCacheFile

    from gpubn.kernels import cache

    assert IndexDataCacheFile.save.numba_save is not None  # gpubn's save is installed
    a, b = (IndexDataCacheFile(str(tmp_path), "f-1.py311", cache.PackageLocator.stamp) for _ in range(2))
    real_load = IndexDataCacheFile._load_index
    stale = {"b": True}

    def load_index(self):  # B read the index before A wrote it
        if self is b and stale["b"]:
            stale["b"] = False
            return {}
        return real_load(self)

    real_save_data = IndexDataCacheFile._save_data

    def save_data(self, name, data):  # A's data lands last
        if self is a:
            b.save("key-B", b"code of B")
        real_save_data(self, name, data)

    monkeypatch.setattr(IndexDataCacheFile, "_load_index", load_index)
    monkeypatch.setattr(IndexDataCacheFile, "_save_data", save_data)
    a.save("key-A", b"code of A")
    monkeypatch.setattr(IndexDataCacheFile, "_save_data", real_save_data)
    for key, code in (("key-A", b"code of A"), ("key-B", b"code of B")):
        got = a.load(key)
        assert got is None or got == code  # missing (a recompile) or right, never another key's
    assert a.load("key-B") == b"code of B"  # the last index written


FIRST_KERNEL = """
import numpy as np
from gpubn.kernels import stats
stats.channel_moments_channels_cpu.parallel(np.ones((4096, 32), np.float32), None, np.zeros(32, np.float32),
                                            np.empty((3, 32)))
"""
FIRST_DRIVER = """
import numpy as np, gpubn
x = np.random.default_rng(0).standard_normal((4096, 32)).astype(np.float32)
mean, var = gpubn.batch_stats(x, axis=1, backend="cpu")
print(float(np.abs(mean - x.mean(axis=0)).max()), float(np.abs(var - x.var(axis=0)).max()))
"""


@pytest.mark.subprocess
def test_driver_compiled_over_cached_kernels_loads_in_a_fresh_process(tmp_path):
    """A parallel kernel cached by one process; a second loads it and compiles
    the driver that calls it (numba saves that driver without its step that
    starts the thread pool); a third process loads the driver as its first
    parallel code.  Before CPUKernel started the pool itself, the third
    process died of a segmentation fault."""
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path), GPUBN_BACKEND="cpu")
    for step, code in enumerate((FIRST_KERNEL, FIRST_DRIVER, FIRST_DRIVER)):
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"process {step + 1}: exit {proc.returncode}\n{proc.stderr[-2000:]}"
        if code is FIRST_DRIVER:
            assert max(map(float, proc.stdout.split())) < 1e-5, proc.stdout
