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

from gpubn.kernels.common import CPUKernel

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

    first = CPUKernel(load(path).double)
    first.serial(x, y)  # compiled and written to tmp_path/__pycache__
    np.testing.assert_array_equal(y, 2 * x)

    second = CPUKernel(load(path).double)  # a fresh process would see the same
    second.parallel(x, y)
    second.serial(x, y)
    np.testing.assert_array_equal(y, 2 * x)
    assert not second.parallel.stats.cache_hits  # compiled, not the serial code
    assert second.parallel.stats.cache_misses
    assert second.serial.stats.cache_hits  # the serial entry is still found
