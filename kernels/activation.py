"""Batch norm followed by an activation, and a residual added before it.

Forward, one elementwise pass instead of two or three:

    v = (x - mean) * scale + bias  (+ z)        the pre-activation
    y = g(v),   g = identity | relu | sigmoid | tanh

The backward recomputes v from x (and z) and the per-channel constants, so v is
never stored: the gradient reaching batch norm (and the residual) is

    dv = dy * g'(v):   relu: [v > 0]   sigmoid: g(v) (1 - g(v))   tanh: 1 - g(v)**2

and batch norm's own backward runs on dv: the backward kernels (``backward.py``)
compute dv inline where they read dy, with ``slope`` below, at plain batch
norm's traffic.

No activation is None on both backends, as every absent optional input (a
None argument removes its code when the kernel is compiled).  An activation
travels as its int code (``ACTIVATIONS``) to the CUDA kernels (a uniform
branch per element) and as a token to the CPU kernels (``TOKENS[code]``: a
constant to the compiler, one branch-free loop per activation); a plan
converts the code once per call.  The kernels are in ``normalize.py`` (forward)
and ``backward.py``.
"""

import math

import numba
import numpy as np
from numba import cuda

from .common import JIT, JIT_STREAM

NONE, RELU, SIGMOID, TANH = range(4)
#: activation name -> the code the kernels take
ACTIVATIONS = {None: NONE, "relu": RELU, "sigmoid": SIGMOID, "tanh": TANH}

#: 0 and 1 as float32 constants: with a Python literal (0, 1.0) numba computes
#: float32 values in float64 (float64 exp and division per element on a GPU);
#: float32 constants keep float32 arithmetic float32 and float64 float64
_ZERO = np.float32(0.0)
_ONE = np.float32(1.0)


@numba.njit(inline="always", **JIT)
def activate(v, act):
    """g(v) for activation code ``act`` (NaN stays NaN)."""
    if act == RELU:
        return v if v > 0 else v * _ZERO
    if act == SIGMOID:
        return _ONE / (_ONE + math.exp(-v))
    if act == TANH:
        return math.tanh(v)
    return v


@cuda.jit(device=True)
def forward_at(x, z, o, c, i, m, s, b, act, y):
    """y[o, c, i] = g((x[o, c, i] - m) * s + b (+ z[o, c, i])): the forward's
    element on the GPU (m, s, b: the channel's MEAN, SCALE, BIAS, in the
    accumulation dtype; act None and z None remove their branches at compile
    time)."""
    v = (x[o, c, i] - m) * s + b
    if z is not None:
        v += z[o, c, i]
    if act is not None:
        v = activate(v, act)
    y[o, c, i] = v


#: The activation as the CPU kernels take it, by code: None for none, else a
#: tuple of ``code`` Nones.  Its length is a constant to the compiler, so every
#: activation gets its own compiled loop with no branch on the activation
#: (vectorised), and plain batch norm none of the activation's code.
TOKENS = (None, *((None,) * code for code in range(1, len(ACTIVATIONS))))
#: ... and as the CUDA kernels take it: None for none, else the code itself.
CUDA_CODES = (None, RELU, SIGMOID, TANH)


@numba.njit(**JIT_STREAM)  # the flags of the CPU kernels that call it: cacheable
def relu_slope(v):
    """relu'(v): 1 where v > 0 (1 and 0 are exact in float32: float32 arithmetic stays float32)."""
    return _ONE if v > 0 else _ZERO


@numba.njit(**JIT_STREAM)  # the flags of the CPU kernels that call it: cacheable
def sigmoid_slope(v):
    """sigmoid'(v) = s (1 - s), s = sigmoid(v)."""
    s = _ONE / (_ONE + math.exp(-v))
    return s * (_ONE - s)


@numba.njit(**JIT_STREAM)  # the flags of the CPU kernels that call it: cacheable
def tanh_slope(v):
    """tanh'(v) = 1 - tanh(v)**2."""
    t = math.tanh(v)
    return _ONE - t * t


@numba.njit(inline="always", **JIT)
def slope(v, act):
    """g'(v), the derivative of the activation ``act`` at the pre-activation v.

    The CUDA kernels branch on ``act`` per element (a uniform branch); the CPU
    kernels pass ``len`` of a token (``TOKENS``), a constant, so that the compiler
    folds the branches and sees one branch-free loop per activation."""
    if act == RELU:
        return relu_slope(v)
    if act == SIGMOID:
        return sigmoid_slope(v)
    if act == TANH:
        return tanh_slope(v)
    return _ONE
