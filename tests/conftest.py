"""Test setup: the CUDA backend runs on numba's simulator unless a GPU is present.

NUMBA_ENABLE_CUDASIM must be set before numba is first imported, so this runs
before any test module imports gpubn.  Set it yourself (0 or 1) to override.
"""

import os
import shutil
import subprocess


def _has_gpu() -> bool:
    smi = shutil.which("nvidia-smi")
    if not smi:
        return False
    try:
        return subprocess.run([smi, "-L"], capture_output=True, timeout=20).returncode == 0
    except Exception:
        return False


if "NUMBA_ENABLE_CUDASIM" not in os.environ:
    os.environ["NUMBA_ENABLE_CUDASIM"] = "0" if _has_gpu() else "1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402

import gpubn  # noqa: E402
from gpubn._backend import simulated  # noqa: E402

SIM = simulated()
BACKENDS = ["cpu", "cuda"]


#: Modules whose every test runs CUDA kernels (on the simulator without a GPU).
SIM_MODULES = {"test_onepass", "test_interop", "test_devices", "test_vector"}
#: The quick tier (``-m quick``): the public API on both backends at small
#: shapes, its errors and numerics; everything but processes and slow cases.
QUICK_MODULES = {
    "test_functional",
    "test_errors",
    "test_numerics",
    "test_layer",
    "test_standardizer",
    "test_masked",
    "test_torch",
    "test_fold",
    "test_launch",
    "test_devices",
}


def pytest_collection_modifyitems(config, items):
    """Markers by what a test costs: ``sim`` (CUDA kernels on the simulator),
    ``quick`` (the day-to-day tier); ``subprocess`` and ``slow`` are set in the
    test files themselves."""
    for item in items:
        module = item.module.__name__.rsplit(".", 1)[-1]
        params = getattr(getattr(item, "callspec", None), "params", {})
        if SIM and (params.get("backend") == "cuda" or module in SIM_MODULES):
            item.add_marker(pytest.mark.sim)
        heavy = {"subprocess", "slow", "gpu"} & {m.name for m in item.iter_markers()}
        if module in QUICK_MODULES and not heavy and "dask_client" not in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.quick)


def pytest_report_header(config):
    mode = "numba CUDA simulator (tiny shapes)" if SIM else "real GPU"
    return f"gpubn {gpubn.__version__}: backends {gpubn.available_backends()}; CUDA backend on {mode}"


@pytest.fixture(autouse=True)
def fresh_plans():
    """Every test builds its own plans (kernels.plan): a test that patches a
    module-level choice (block shape, SM count, one-launch limit) or spies on
    kernels sees them in the plans it runs, and leaves none behind."""
    from gpubn.kernels import plan

    plan.clear()
    yield
    plan.clear()


@pytest.fixture(params=BACKENDS)
def backend(request):
    """Every test body runs on both backends."""
    if request.param not in gpubn.available_backends():
        pytest.skip(f"backend {request.param!r} not available")
    return request.param


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


class _Spy:
    """A CUDA kernel that records its name each time it is configured for a launch."""

    def __init__(self, kernel, name, seen):
        self.kernel, self.name, self.seen = kernel, name, seen

    def __getitem__(self, config):
        self.seen.append(self.name)
        return self.kernel[config]


def spy_launches(monkeypatch, module, names) -> list:
    """Replace the kernels ``names`` of ``module`` by spies; returns the list
    of the names launched (in order) while the test runs."""
    seen = []
    for name in names:
        monkeypatch.setattr(module, name, _Spy(getattr(module, name), name, seen))
    return seen


@pytest.fixture
def torch_as_cuda(monkeypatch):
    """CPU torch tensors posing as CUDA tensors, under the simulator: gpubn
    reads them through ``__cuda_array_interface__`` as it builds it for torch
    (``_arrays._torch_interface``), on torch's "current stream" (handle 0),
    and allocates from torch.  What a GPU adds (device memory, streams, the
    driver launch) is not here; what gpubn does with torch's CUDA tensors is."""
    if not SIM:
        pytest.skip("CPU tensors posing as CUDA ones: the simulator only")
    import types

    torch = pytest.importorskip("torch")
    import gpubn._arrays as arrays

    monkeypatch.setattr(arrays, "_is_torch_cuda", lambda a: isinstance(a, torch.Tensor))
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: types.SimpleNamespace(cuda_stream=0))
    return torch
