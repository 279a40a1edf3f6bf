"""Calls from several Python threads at once give correct results.

CPU kernels share no mutable state (every scratch array is allocated inside
the call); CUDA workspaces are per thread (kernels/workspace.py).
"""

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import gpubn

from conftest import SIM
from reference import backward, forward, grad_tol

# one shape below and one above the CPU kernels' parallel threshold
SHAPES = [(6, 5, 7), (64, 8, 160)]


@pytest.mark.parametrize("shape", SHAPES)
def test_threads_cpu(shape):
    _run_threads("cpu", shape, threads=4, rounds=5)


def test_threads_cuda():
    if "cuda" not in gpubn.available_backends():
        pytest.skip("no CUDA backend")
    if SIM:
        pytest.skip("numba's CUDA simulator is not thread-safe; runs on a real GPU")
    for shape in [(64, 8, 160), (64, 8, 400)]:  # one launch per pass, and the split passes (common.one_pass)
        _run_threads("cuda", shape, threads=4, rounds=5)


def _run_threads(backend, shape, threads, rounds):
    def work(seed):
        rng = np.random.default_rng(seed)
        for _ in range(rounds):
            x = (seed + rng.standard_normal(shape)).astype(np.float32)
            dy = rng.standard_normal(shape).astype(np.float32)
            y, cache = gpubn.batch_norm_forward(x, backend=backend)
            dx, _, _ = gpubn.batch_norm_backward(dy, cache)
            np.testing.assert_allclose(y, forward(x, None, None, 1)[0], atol=2e-4, rtol=2e-4)
            np.testing.assert_allclose(dx, backward(dy, x, None, 1)[0], **grad_tol(np.float32))
        return seed

    with ThreadPoolExecutor(threads) as pool:
        assert sorted(pool.map(work, range(threads * 2))) == list(range(threads * 2))
