"""Run-time choice between the CUDA kernels and their CPU twins."""

import functools
import os

from numba import cuda

BACKENDS = ("cpu", "cuda")


@functools.cache
def _gpu_usable() -> bool:
    """A real CUDA device that numba can drive (the simulator is not one)."""
    if cuda.config.ENABLE_CUDASIM:
        return False
    try:
        return bool(cuda.is_available())
    except Exception:  # a broken driver install is "no GPU", not a crash
        return False


def simulated() -> bool:
    """True when the CUDA backend runs on numba's CUDA simulator."""
    return bool(cuda.config.ENABLE_CUDASIM)


def available_backends() -> tuple:
    """Backends that can run here: ("cpu",) or ("cpu", "cuda").

    "cuda" is listed with a usable GPU, and also under numba's CUDA simulator
    (``NUMBA_ENABLE_CUDASIM=1``), where it is correct but slow.
    """
    if _gpu_usable() or simulated():
        return ("cpu", "cuda")
    return ("cpu",)


def default_backend() -> str:
    """ "cuda" when a real GPU is usable, else "cpu".

    ``GPUBN_BACKEND=cpu|cuda|auto`` overrides; asking for "cuda" where it is
    not available is an error, never a silent fallback.  The simulator is not
    picked automatically (it is for tests): set GPUBN_BACKEND=cuda to use it.
    """
    choice = os.environ.get("GPUBN_BACKEND", "auto").strip().lower() or "auto"
    if choice == "auto":
        return "cuda" if _gpu_usable() else "cpu"
    return resolve_backend(choice, source="GPUBN_BACKEND")


def resolve_backend(backend=None, source: str = "backend") -> str:
    """Validate a backend request; None means default_backend()."""
    if backend is None:
        return default_backend()
    if not isinstance(backend, str) or backend.lower() not in BACKENDS + ("auto",):
        raise ValueError(f"{source}: unknown backend {backend!r}; expected one of 'cpu', 'cuda', 'auto'")
    backend = backend.lower()
    if backend == "auto":
        return "cuda" if _gpu_usable() else "cpu"
    if backend not in available_backends():
        raise ValueError(f"{source}: backend 'cuda' requested but no usable CUDA GPU was found ({cuda_diagnosis()})")
    return backend


def driver_cuda_version():
    """The CUDA version the NVIDIA driver supports, as 1000 * major + 10 * minor
    (12080: CUDA 12.8), or None without a loadable driver."""
    try:
        from cuda.bindings import driver

        err, version = driver.cuDriverGetVersion()
        return int(version) if err == driver.CUresult.CUDA_SUCCESS else None
    except Exception:
        return None


def toolkit_cuda_major():
    """The CUDA major version of the installed CUDA Python bindings (numba-cuda's
    cu12 / cu13 extras), or None when they are not installed."""
    try:
        from importlib.metadata import version

        return int(version("cuda-bindings").split(".")[0])
    except Exception:
        return None


def cuda_diagnosis() -> str:
    """Why the CUDA backend is not usable, and what to install."""
    driver, toolkit = driver_cuda_version(), toolkit_cuda_major()
    if driver is None:
        return "no NVIDIA driver could be loaded; use backend='cpu', or install the driver"
    major, minor = divmod(driver, 1000)
    if toolkit is None:
        version = f"{major}.{minor // 10}"
        return f"the driver supports CUDA {version}; install the CUDA libraries: pip install 'gpubn[cu{major}]'"
    if toolkit > major:
        return (
            f"the installed CUDA libraries are CUDA {toolkit} but the NVIDIA driver supports only CUDA "
            f"{major}.{minor // 10}: install gpubn[cu{major}] instead of gpubn[cu{toolkit}] "
            "(pip uninstall the cuda-* and nvidia-* packages first), or update the driver"
        )
    return f"CUDA {toolkit} libraries and a CUDA {major}.{minor // 10} driver, but numba found no usable device"
