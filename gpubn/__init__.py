"""gpubn: batch normalization as fast Numba kernels, on NVIDIA GPUs or the CPU.

Functional ops (``batch_stats``, ``normalize``, ``batch_norm_forward``,
``batch_norm_backward``), a ``BatchNorm`` layer for training loops and a
``Standardizer`` for input normalization.  The kernels themselves live in
``gpubn.kernels``.
"""

__version__ = "0.1.0"

from ._arrays import canonical_shape
from ._backend import available_backends, default_backend
from .fold import fold
from .functional import ForwardCache, batch_norm_backward, batch_norm_forward, batch_stats, moments, normalize
from .layer import BatchNorm
from .moments import Moments, recalibrate


def __getattr__(name):
    """``gpubn.Standardizer`` is imported on first use: it builds on
    scikit-learn's estimator classes where scikit-learn is installed, whose
    import (0.8 s on the 2-vCPU development VM) ``import gpubn`` need not pay."""
    if name == "Standardizer":
        from .standardizer import Standardizer

        return Standardizer
    raise AttributeError(f"module 'gpubn' has no attribute {name!r}")


__all__ = [
    "__version__",
    "available_backends",
    "default_backend",
    "batch_stats",
    "normalize",
    "batch_norm_forward",
    "batch_norm_backward",
    "ForwardCache",
    "BatchNorm",
    "fold",
    "Moments",
    "moments",
    "recalibrate",
    "Standardizer",
    "canonical_shape",
]
