"""gpubn's parallel CPU code under the rules of numba's thread pool
(``kernels.common._enter_pool``), each case in a fresh process with the
threading layer it needs:

- workqueue (numba's fallback where neither TBB nor OpenMP loads, as on macOS
  without libomp) is not thread-safe: two Python threads in parallel code at
  once abort the process.  Before gpubn held a lock around its parallel
  calls there, four threads (or a Dask threaded scheduler) aborted it.
- GNU OpenMP is not fork-safe: a child forked after the pool started dies at
  its first parallel region.  Before gpubn ran the serial variants in such a
  child, a ``multiprocessing`` pool (fork) calling gpubn after the parent had
  used a large input lost every worker and waited forever.
"""

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.subprocess

# (256, 64, 8): 131072 values, above PARALLEL_MIN_ELEMENTS (the parallel variants)
COMMON = """
import numpy as np, numba, gpubn
x = np.random.default_rng(0).standard_normal((256, 64, 8)).astype(np.float32)
dy = np.random.default_rng(1).standard_normal(x.shape).astype(np.float32)

def step():
    y, cache = gpubn.batch_norm_forward(x, backend="cpu")
    return y, gpubn.batch_norm_backward(dy, cache)[0]

y0, dx0 = step()
print("layer", numba.threading_layer(), flush=True)
"""

THREADS = (
    COMMON
    + """
import threading
bad = []

def work():
    for _ in range(20):
        y, dx = step()
        if not (np.array_equal(y, y0) and np.array_equal(dx, dx0)):
            bad.append(1)

threads = [threading.Thread(target=work) for _ in range(4)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print("ok" if not bad else f"{len(bad)} results differ")
"""
)

FORK = (
    COMMON
    + """
import multiprocessing as mp

def child(conn):
    y, dx = step()
    conn.send(bool(np.array_equal(y, y0) and np.array_equal(dx, dx0)))

ctx = mp.get_context("fork")
ours, theirs = ctx.Pipe()
p = ctx.Process(target=child, args=(theirs,))
p.start()
p.join(300)
equal = ours.recv() if ours.poll() else None
print("ok" if p.exitcode == 0 and equal else f"child exit {p.exitcode}, results equal: {equal}")
"""
)


def run(code, layer):
    env = dict(os.environ, NUMBA_THREADING_LAYER=layer, GPUBN_BACKEND="cpu")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0 and "layer" not in proc.stdout:
        if "No threading layer could be loaded" in proc.stderr or "not available" in proc.stderr:
            pytest.skip(f"numba's {layer} threading layer does not load here")
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr[-2000:]}"
    lines = proc.stdout.split("\n")
    assert f"layer {layer}" in lines, proc.stdout  # the layer the case is about
    assert "ok" in lines, proc.stdout


def test_four_threads_under_the_workqueue_layer():
    run(THREADS, "workqueue")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork on this platform")
def test_a_forked_child_under_gnu_openmp():
    run(FORK, "omp")
