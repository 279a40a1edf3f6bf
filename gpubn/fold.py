"""Folding batch norm into the layer before it, for inference.

In eval mode batch norm is an affine map per channel, ``y = z * s + t`` with

    s = gamma / sqrt(running_var + eps),   t = beta - running_mean * s,

so a linear or convolution layer ``z = W a + b`` followed by it is one layer
with ``W' = W * s`` (s along W's output-channel axis) and ``b' = b * s + t``.
"""

import warnings

import numpy as np

from ._arrays import as_numpy, check_axis


def _host64(a):
    """float64 NumPy copy of a torch tensor, numba device array or array; None stays None."""
    return None if a is None else np.asarray(as_numpy(a), np.float64)


def _bn_constants(bn):
    """(running_mean, running_var, gamma, beta, eps) of a gpubn or torch batch-norm layer, float64."""
    if getattr(bn, "running_mean", None) is None or getattr(bn, "running_var", None) is None:
        raise ValueError(f"bn: {type(bn).__name__} has no running statistics to fold (track_running_stats=False)")
    rm, rv = _host64(bn.running_mean), _host64(bn.running_var)
    if hasattr(bn, "params") and not hasattr(bn, "weight"):  # gpubn.BatchNorm
        gamma = _host64(bn.params["gamma"]) if bn.affine else None
        beta = _host64(bn.params["beta"]) if bn.affine else None
    else:  # torch modules (and gpubn.torch's)
        gamma, beta = _host64(getattr(bn, "weight", None)), _host64(getattr(bn, "bias", None))
    C = rm.shape[0]
    gamma = np.ones(C) if gamma is None else gamma
    beta = np.zeros(C) if beta is None else beta
    return rm, rv, gamma, beta, float(bn.eps)


def fold(weight, bias, bn, axis: int = 0):
    """(weight', bias') such that the layer with them equals "the layer, then ``bn`` in eval mode".

    Args:
        weight: the layer's weight, any shape, float16/32/64, NumPy or torch
            (dense ``(out, in)``, convolution ``(out, in, kh, kw)``, or
            channels-last ``(kh, kw, in, out)`` with ``axis=-1``).
        bias: (out,) or None (no bias: zero).
        bn: gpubn.BatchNorm, a gpubn.torch module or a torch BatchNorm module,
            with running statistics; its num_features must equal weight's
            size along ``axis``.
        axis: weight's output-channel axis.
    Returns:
        (weight', bias'): weight's shape and dtype, bias' (out,) of that dtype;
        torch tensors when weight is one.  Computed in float64.
    Warns:
        UserWarning when ``bn`` is in training mode: the folded layer uses its
        running statistics, which is what ``bn`` computes only in eval mode.
    """
    is_torch = hasattr(weight, "detach")
    w = as_numpy(weight)  # (bfloat16 tensors widened to float32)
    if w.dtype.kind != "f":
        raise TypeError(f"weight: dtype {w.dtype} is not supported; expected floats")
    ax = check_axis(axis, w.ndim)
    rm, rv, gamma, beta, eps = _bn_constants(bn)
    C = w.shape[ax]
    if rm.shape != (C,):
        raise ValueError(f"bn: {rm.shape[0]} features, weight has {C} output channels on axis {axis}")
    b = np.zeros(C) if bias is None else as_numpy(bias)
    if b.shape != (C,):
        raise ValueError(f"bias: expected shape ({C},) for {C} output channels, got {b.shape}")
    if getattr(bn, "training", False):
        warnings.warn(
            f"bn: {type(bn).__name__} is in training mode; fold() uses its running statistics "
            "(what it computes in eval mode); call bn.eval() first",
            UserWarning,
            stacklevel=2,
        )
    s = gamma / np.sqrt(rv + eps)
    shape = [1] * w.ndim
    shape[ax] = C
    w2 = w.astype(np.float64) * s.reshape(shape)
    b2 = (b.astype(np.float64) - rm) * s + beta
    if is_torch:  # rounded once, to the weight's dtype
        import torch

        return tuple(torch.from_numpy(a).to(weight.device, weight.dtype) for a in (w2, b2))
    return w2.astype(w.dtype), b2.astype(w.dtype)


__all__ = ["fold"]
