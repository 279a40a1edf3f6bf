"""numba's disk cache keeps the parallel and serial variants of a CPU kernel apart.

numba names cache entries by a function's qualified name and argument types,
not by its options: before CPUKernel compiled its serial variant under a name
of its own, whichever variant was compiled first was loaded for both (a
"parallel" kernel ran on one core, 1.5x slower, after the test suite had
cached the serial one).
"""

import importlib.util
import textwrap

import numpy as np

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
