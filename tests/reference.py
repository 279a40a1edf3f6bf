"""The float64 NumPy oracle: forward, backward and running-statistics update.

Written from the formulas, independent of gpubn's code (no view tricks, no
merges): reduce over every axis but the feature axis.
"""

import numpy as np

# Tolerances by input dtype, written once: (atol, rtol) for outputs of order 1.
TOL = {
    np.float16: (2e-2, 2e-2),
    np.float32: (2e-4, 2e-4),
    np.float64: (1e-10, 1e-10),
}


#: Input gradients (and the (C,) parameter gradients of small test shapes),
#: by input dtype.  dx = invstd * (g - mean(g) - xhat * mean(g * xhat)):
#: invstd (up to 2 for the tests' std-0.5 data) and the |xhat| ~ 4 tails make
#: |dx| up to ~9, and float32 rounding of the per-value step and of the two
#: channel sums gives ~3e-6 absolute there (measured: 3.3e-6 on (7, 255) and
#: (1023, 15) at offset -2.3, CPU backend): float32 is allowed 30x that.
#: float16 dx is rounded once to float16 (2**-11 relative of |dx| <= 9: 4e-3).
GRAD_TOL = {
    np.float16: (2e-2, 2e-2),
    np.float32: (1e-4, 1e-4),
    np.float64: (1e-9, 1e-9),
}


def tol(dtype):
    atol, rtol = TOL[np.dtype(dtype).type]
    return {"atol": atol, "rtol": rtol}


def grad_tol(dtype):
    """Tolerances of input gradients (dx) by input dtype (GRAD_TOL)."""
    atol, rtol = GRAD_TOL[np.dtype(dtype).type]
    return {"atol": atol, "rtol": rtol}


def _axes(x, axis):
    axis %= x.ndim
    return tuple(i for i in range(x.ndim) if i != axis), axis


def _bshape(x, axis):
    shape = [1] * x.ndim
    shape[axis % x.ndim] = x.shape[axis % x.ndim]
    return shape


def stats(x, axis):
    """(mean, biased var) in float64, accurate at any offset.  NumPy's own
    x.var is not: its mean sums a strided axis one row at a time, and at an
    offset of 1e8 that rounding alone put the variance 4e-6 off.  Here the
    deviations d = x - m from a rounded mean m are exact (Sterbenz), and
    var = mean(d**2) - mean(d)**2 corrects for m's rounding."""
    red, _ = _axes(x, axis)
    x = np.asarray(x, np.float64)
    m = x.mean(axis=red, keepdims=True)
    m = m + (x - m).mean(axis=red, keepdims=True)
    d = x - m
    shift = d.mean(axis=red)
    return m.reshape(shift.shape) + shift, (d * d).mean(axis=red) - shift * shift


def forward(x, gamma, beta, axis, eps=1e-5, mean=None, var=None):
    """y and (mean, biased var) used; batch statistics unless mean/var given."""
    x = np.asarray(x, np.float64)
    if mean is None:
        mean, var = stats(x, axis)
    b = _bshape(x, axis)
    g = np.ones(x.shape[axis]) if gamma is None else np.asarray(gamma, np.float64)
    be = np.zeros(x.shape[axis]) if beta is None else np.asarray(beta, np.float64)
    xhat = (x - np.reshape(mean, b)) / np.sqrt(np.reshape(var, b) + eps)
    return xhat * g.reshape(b) + be.reshape(b), (mean, var)


def backward(dy, x, gamma, axis, eps=1e-5, training=True, mean=None, var=None):
    """(dx, dgamma, dbeta) in float64."""
    x = np.asarray(x, np.float64)
    dy = np.asarray(dy, np.float64)
    red, _ = _axes(x, axis)
    b = _bshape(x, axis)
    if mean is None:
        mean, var = stats(x, axis)
    g = np.ones(x.shape[axis]) if gamma is None else np.asarray(gamma, np.float64)
    invstd = 1.0 / np.sqrt(np.reshape(var, b) + eps)
    xhat = (x - np.reshape(mean, b)) * invstd
    dgamma = (dy * xhat).sum(axis=red)
    dbeta = dy.sum(axis=red)
    dxhat = dy * g.reshape(b)
    if training:
        dx = invstd * (
            dxhat - dxhat.mean(axis=red, keepdims=True) - xhat * (dxhat * xhat).mean(axis=red, keepdims=True)
        )
    else:
        dx = invstd * dxhat
    return dx, dgamma, dbeta


def running_update(running_mean, running_var, x, axis, momentum):
    """PyTorch's update: unbiased variance, momentum = weight of the new batch."""
    mean, var = stats(x, axis)
    n = x.size // x.shape[axis]
    rm = (1 - momentum) * np.asarray(running_mean, np.float64) + momentum * mean
    rv = (1 - momentum) * np.asarray(running_var, np.float64) + momentum * var * n / (n - 1)
    return rm, rv
