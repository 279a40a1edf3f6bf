"""The functional API: batch statistics, normalize, forward and backward.

Each function validates everything first (a call that raises changes nothing),
builds the canonical ``(outer, C, inner)`` view of its input, and calls the
launchers in ``gpubn.kernels``.  Semantics follow ``torch.nn.functional.batch_norm``:
biased variance normalizes, the unbiased variance enters the running estimate,
``momentum`` is the weight of the new batch.

Arrays: NumPy in, NumPy out on either backend.  On the CUDA backend, device
arrays (numba, or anything with ``__cuda_array_interface__``: CuPy, PyTorch)
are used in place, every kernel runs on the caller's stream, and results come
back as the caller's library's arrays on the same device (torch tensors for
torch tensors, CuPy for CuPy, numba device arrays for anything else).
``out=`` writes results into the caller's own arrays.
"""

import functools
from typing import NamedTuple

import numpy as np

from ._arrays import (
    BFLOAT16_BITS,
    Source,
    StateVector,
    acc_dtype,
    array_device,
    as_input,
    canonical_shape,
    channel_vector,
    check_activation,
    check_axis,
    check_bool,
    check_float,
    check_momentum,
    check_scalar,
    deliver_as,
    device_scope,
    empty_like_library,
    host_copy,
    library_allocator,
    may_overlap,
    read_input,
    to_canonical,
    to_device,
    to_host,
)
from ._backend import resolve_backend
from .kernels import plan as _plan
from .kernels import stats as _st
from .kernels.common import current_device
from .kernels.half import bits as _bits
from .kernels.plan import Mask, plan_for
from .kernels.rows import INVSTD, MEAN, VAR
from .kernels.workspace import device_empty, host_empty
from .moments import Moments


def _on_input_device(fn):
    """Run ``fn(x, ...)`` with x's device current (a tensor on cuda:1 while
    cuda:0 is current: its kernels, workspaces and constants on cuda:1)."""

    @functools.wraps(fn)
    def call(x, *args, **kwargs):
        device = None if type(x) is np.ndarray else array_device(x)
        if device is None:  # host arrays, numba arrays, the simulator: nothing to switch
            return fn(x, *args, **kwargs)
        with device_scope(device):
            return fn(x, *args, **kwargs)

    return call


class _Shape(NamedTuple):
    """What an input's shape, strides, dtype and axis decide (validated once per key)."""

    shape: tuple  # the caller's shape
    dtype: np.dtype  # the caller's dtype
    axis: int
    shape3: tuple  # (outer, C, inner)
    acc: np.dtype  # statistics dtype
    plan: object  # kernels.plan: the plan of this call shape


_SHAPES = {}
_plan.forgetters.append(_SHAPES.clear)


def _shape_of(arr, axis, backend, name, bfloat16, allow_empty) -> _Shape:
    device = current_device() if backend == "cuda" else 0
    key = (backend, arr.shape, arr.strides, arr.dtype, axis, bfloat16, allow_empty, device)
    info = _SHAPES.get(key)
    if info is not None:
        return info
    if bfloat16:  # int16 bits of bfloat16 values (BFLOAT16_BITS), CPU kernels only
        if arr.dtype != BFLOAT16_BITS or backend != "cpu":
            raise TypeError(f"{name}: bfloat16 data must be int16 bits on the CPU backend")
        dtype = arr.dtype
    else:
        dtype = check_float(arr.dtype, name)
    ax = check_axis(axis, arr.ndim)
    shape3 = canonical_shape(arr.shape, ax)
    if 0 in arr.shape and not (allow_empty and shape3[1] > 0):
        raise ValueError(f"{name}: empty input of shape {tuple(arr.shape)}")
    contiguous = backend == "cpu" and bool(arr.flags.c_contiguous)
    plan = plan_for(backend, shape3, dtype, contiguous, device)
    return _plan.remember(_SHAPES, key, _Shape(tuple(arr.shape), dtype, ax, shape3, acc_dtype(dtype), plan))


class _Input:
    """A validated input: its record (``_arrays.Source``), what its shape
    decides (``_Shape``, with the plan), and its canonical view (``_materialize``)."""

    __slots__ = ("backend", "src", "view", "shape", "dtype", "axis", "shape3", "acc", "plan", "C", "count", "launch")

    def __init__(self, backend, src, info):
        self.backend, self.src, self.view = backend, src, None
        self.shape, self.dtype, self.axis, self.shape3, self.acc, self.plan = info
        self.C = info.shape3[1]
        self.count = info.shape3[0] * info.shape3[2]  # values per channel
        # the CUDA ops' keyword arguments: the caller's stream and, for torch
        # tensors and CuPy arrays, its library's allocator for the split
        # reduction's partials (graph-aware: nothing of gpubn's own is allocated
        # under capture); none on the CPU
        self.launch = {}
        if backend == "cuda":
            self.launch = {"stream": src.stream, "scratch": library_allocator(src.library, src.owner)}

    @property
    def on_device(self) -> bool:
        return self.src.on_device

    @property
    def stream(self) -> int:
        return self.src.stream

    def empty(self, rows=None):
        """A new array of the input's shape and dtype (rows=k: (k, C) stats)."""
        if rows is not None:
            shape, dtype = (rows, self.C), self.acc
        else:
            shape, dtype = self.shape, self.dtype
        if self.backend != "cuda":
            return np.empty(shape, dtype) if rows is not None else host_empty(shape, dtype)
        out = empty_like_library(shape, dtype, self.src.library, self.src.owner)
        return device_empty(shape, dtype, self.src.stream) if out is None else out

    def deliver(self, arr):
        """Results go back where the input came from, as its library's arrays."""
        if self.backend != "cuda":
            return arr
        if not self.src.on_device:
            return to_host(arr, self.src.stream)
        return deliver_as(arr, self.src.library, self.src.owner)


def _prepare(x, axis, backend, name="x", bfloat16=False, allow_empty=False) -> _Input:
    """Validate x (dtype, axis, emptiness: once per shape) and read its record."""
    be = backend if backend == "cpu" else resolve_backend(backend)
    if type(x) is np.ndarray:
        src = Source(x, False, "numpy", 0, x)
    else:
        src = read_input(x, name, be)
    return _Input(be, src, _shape_of(src.arr, axis, be, name, bfloat16, allow_empty))


def _prepare_mask(mask, inp: _Input):
    """The (outer, inner) view of a bool mask over x's non-feature axes, or None."""
    if mask is None:
        return None
    arr, on_device = as_input(mask, "mask", inp.backend)
    if arr.dtype != np.bool_:
        raise TypeError(f"mask: dtype {arr.dtype}; expected bool (True where a position counts)")
    want = inp.shape[: inp.axis] + inp.shape[inp.axis + 1 :]
    if tuple(arr.shape) != want:
        raise ValueError(
            f"mask: shape {tuple(arr.shape)} does not match x's non-feature axes {want} "
            f"(x: {inp.shape}, axis={inp.axis})"
        )
    outer, _, inner = inp.shape3
    # gpubn's own copy (small: one byte per position), so a mask changed after
    # the forward cannot change the backward
    if on_device:
        arr = to_host(to_canonical(arr, (outer, inner), True, inp.stream), inp.stream)
    host = np.array(arr, dtype=bool, order="C").reshape(outer, inner)
    count = int(np.count_nonzero(host))
    origin = int(np.argmax(host)) if count else 0
    rows = np.flatnonzero(host[:, 0]) if inner == 1 else None
    view = to_device(host, inp.stream) if inp.backend == "cuda" else host
    return Mask(view, count, origin, rows)


def _materialize(inp: _Input) -> _Input:
    """Build the kernel-ready view of a validated input."""
    src = inp.src
    if not src.on_device:
        view = src.arr.reshape(inp.shape3)
        if inp.backend == "cuda":
            view = to_device(np.ascontiguousarray(view), src.stream)
    else:
        view = to_canonical(src.arr, inp.shape3, True, src.stream, inp.launch["scratch"])
    inp.view = view
    return inp


def _out(out, inp: _Input, name="out"):
    """A caller's output array for a result of x's shape and dtype, checked;
    None: a new one."""
    if out is None:
        return inp.empty()
    if inp.backend == "cuda" and not inp.on_device:
        raise TypeError(f"{name}: host input on the CUDA backend returns host arrays; out= is not supported then")
    arr, on_device = as_input(out, name, inp.backend)
    if on_device != inp.on_device or tuple(arr.shape) != inp.shape or arr.dtype != inp.dtype:
        raise ValueError(
            f"{name}: expected {'a device' if inp.on_device else 'a host'} array of shape {inp.shape} and dtype "
            f"{inp.dtype}, got shape {tuple(arr.shape)}, dtype {arr.dtype}"
        )
    if not on_device and not (arr.flags.c_contiguous and arr.flags.writeable):
        raise ValueError(f"{name}: expected a writeable C-contiguous array")
    if on_device and not arr.is_c_contiguous():
        raise ValueError(f"{name}: expected a C-contiguous device array")
    return arr


def _vector_out(out, inp: _Input, name):
    """A caller's (C,) output of the statistics dtype, checked; None: a new one."""
    if out is None:
        return inp.empty(rows=1)[0]
    arr, on_device = as_input(out, name, inp.backend)
    if tuple(arr.shape) != (inp.C,) or arr.dtype != inp.acc or on_device != (inp.backend == "cuda"):
        raise ValueError(
            f"{name}: expected a (C,) = ({inp.C},) {inp.acc} array on the backend's side, "
            f"got shape {tuple(arr.shape)}, dtype {arr.dtype}"
        )
    return arr


@_on_input_device
def batch_stats(x, axis: int = 1, backend=None, mask=None):
    """Per-feature mean and biased variance of ``x``.

    Args:
        x: array of any shape, float16/32/64; ``axis`` is the feature axis.
        mask: None, or a bool array of x's shape without the feature axis:
            the statistics come from the True positions only (at least one).
    Returns:
        (mean, var): each shape (C,), float32 (float64 for float64 x); NumPy
        arrays, or the input library's device arrays when x is a device array.
    """
    inp = _prepare(x, axis, backend)
    m = _prepare_mask(mask, inp)
    if m is not None and m.count == 0:
        raise ValueError("mask: no position is True; the statistics need at least one")
    inp = _materialize(inp)
    coef = _stats_of(inp, m)
    return inp.deliver(coef[MEAN]), inp.deliver(coef[VAR])


@_on_input_device
def moments(x, axis: int = 1, backend=None, mask=None) -> Moments:
    """The per-channel ``Moments`` of x (feature axis ``axis``), from the statistics kernels;
    of its True positions only with a ``mask`` (bool, x's shape without the feature axis).
    An input with no values per channel (or none True in the mask) gives count 0.

    Computed in float64 whatever x's dtype (each value widened before it is
    summed: float32 data with |x| ~ 1e19 keeps its M2, which fits in float64
    though its squares overflow float32), by the CPU statistics kernels; on
    the CUDA backend a float64 device array is reduced on the device, and a
    float16/32 one is copied to the host once (on its stream) first.
    """
    inp = _prepare(x, axis, backend, allow_empty=True)
    m = _prepare_mask(mask, inp) if inp.count else None
    if inp.count == 0 or (m is not None and m.count == 0):
        return Moments.empty(inp.C)
    inp = _materialize(inp)
    view = inp.view
    if inp.backend == "cuda" and inp.dtype == np.float64:  # float64 on the device: the kernels' own
        coef = _stats_of(inp, m)
        n = float(inp.count if m is None else m.count)
        var = to_host(coef[VAR], inp.stream)
        return Moments(n, to_host(coef[MEAN], inp.stream), var * n)
    if inp.backend == "cuda":
        view = host_copy(Source(view, True, inp.src.library, inp.stream, inp.src.owner))
        m = None if m is None else m._replace(view=m.view.copy_to_host())
    out = np.empty((3, inp.C))
    _st.channel_moments_cpu(np.asarray(view, np.float64), out, None if m is None else m.view)
    return Moments.from_array(out)


def _stats_of(inp: _Input, mask=None):
    """The (5, C) forward constants of a materialized input (its statistics
    in MEAN and VAR), on the backend's side: a training forward that writes no y."""
    ones = channel_vector(None, "gamma", inp.C, inp.acc, inp.backend, fill=1.0, stream=inp.stream)
    zeros = channel_vector(None, "beta", inp.C, inp.acc, inp.backend, fill=0.0, stream=inp.stream)
    return _forward(inp, ones, zeros, None, None, 0.0, 0.0, True, False, 0, None, mask, None)


@_on_input_device
def normalize(x, mean, var, gamma=None, beta=None, eps: float = 1e-5, axis: int = 1, backend=None, *, out=None):
    """The elementwise kernel: ``(x - mean) / sqrt(var + eps) * gamma + beta``.

    Args:
        x: array, float16/32/64, feature axis ``axis``.
        mean, var: (C,) statistics to normalize with (var is biased variance).
        gamma, beta: (C,) or None (1 and 0).
        out: None, or an array of x's shape and dtype (C-contiguous, on x's
            side) that receives y.
    Returns:
        y: x's shape and dtype (``out`` itself when given).
    """
    inp = _prepare(x, axis, backend)
    C = inp.C
    eps = check_scalar(eps, "eps")
    vec = [
        channel_vector(v, name, C, inp.acc, inp.backend, fill, inp.stream)
        for v, name, fill in ((mean, "mean", None), (var, "var", None), (gamma, "gamma", 1.0), (beta, "beta", 0.0))
    ]
    if vec[0] is None or vec[1] is None:
        raise ValueError("mean, var: both are required")
    y = _out(out, inp)
    inp = _materialize(inp)
    coef = inp.empty(rows=5)
    inp.plan.forward_eval(inp.view, *vec, eps, coef, 0, None, y.reshape(inp.shape3), **inp.launch)
    return y if out is not None else inp.deliver(y)


class ForwardCache:
    """What ``batch_norm_backward`` needs from a forward call.

    ``inp.view`` is x itself, not a copy: the canonical (outer, C, inner) view
    of the caller's array (a copy only where x had to be copied anyway: a host
    array on the CUDA backend, a non-contiguous device array).  ``coef`` is
    gpubn's own (5, C) array of per-channel constants (MEAN, VAR, INVSTD,
    SCALE = gamma * invstd, BIAS), computed by the forward; gamma, beta and
    the running statistics are not referenced, so changing them after the
    forward does not change the backward.  **x must not be modified between
    forward and backward**: the backward reads it again, and a changed x gives
    a wrong dx and dgamma without an error (copying x to guard against that
    would cost a pass over memory per forward).
    """

    __slots__ = ("inp", "coef", "training", "act", "z", "mask", "overwritten")

    def __init__(self, inp, coef, training, act=0, z=None, mask=None, overwritten=None):
        self.inp = inp
        self.coef = coef
        self.training = training
        self.act = act  # kernels.activation code: y = g(BN(x) + z)
        self.z = z  # the residual's canonical view (referenced like x), or None
        self.mask = mask  # the positions that gave the statistics (masked batch norm), or None
        self.overwritten = overwritten  # "x" or "residual" where the forward's out= was its memory, else None

    @property
    def backend(self) -> str:
        return self.inp.backend

    @property
    def mean(self):
        return self.inp.deliver(self.coef[MEAN])

    @property
    def invstd(self):
        return self.inp.deliver(self.coef[INVSTD])


@_on_input_device
def batch_norm_forward(
    x,
    gamma=None,
    beta=None,
    *,
    axis: int = 1,
    eps: float = 1e-5,
    training: bool = True,
    running_mean=None,
    running_var=None,
    momentum: float = 0.1,
    backend=None,
    activation=None,
    residual=None,
    mask=None,
    out=None,
    _bfloat16=False,
):
    """Batch normalization forward pass.

    Args:
        x: array of any shape, float16/32/64; ``axis`` is the feature axis (C).
        gamma, beta: (C,) scale and shift, or None (1 and 0).
        training: True or False (a bool; anything else raises TypeError).
            True normalizes with this batch's statistics and, when
            running_mean/running_var are given, updates them in place:
            ``running = (1 - momentum) * running + momentum * batch`` (unbiased
            variance).  False normalizes with running_mean/running_var (required).
        eps: added to the variance.  momentum: a finite float, the weight
            of the new batch (usually in [0, 1]; any value, as torch).
        activation: None, "relu", "sigmoid" or "tanh": y = g(BN(x) (+ residual)),
            in the same elementwise pass (the backward recomputes the
            pre-activation from x; it is never stored).
        residual: None, or an array of x's shape added before the activation
            (referenced by the cache like x: it must not change before the
            backward, which then also returns its gradient).
        mask: None, or a bool array of x's shape without the feature axis
            (e.g. (N, L) for (N, C, L) sequences): in training the statistics,
            and the running statistics (unbiased with the count of True
            positions), come from the True positions only; every position is
            still normalized with them (Flax's semantics).  The backward
            treats the positions outside the mask as padding: whatever x and
            dy hold there, they never enter its sums (dgamma, dbeta and the
            statistics' terms come from the True positions only) and dx (and
            dresidual) is 0 there; that is the exact gradient when dy is 0
            outside the mask (a masked loss), and NaN padding gives the same
            gradients as zero padding.  Ignored (but checked) when
            training=False.  At least 2 True positions when training.
        out: None, or an array of x's shape and dtype (C-contiguous, on x's
            side) that receives y (a layer's own buffer, or x itself: in
            place, but then batch_norm_backward raises ValueError, as it
            needs x; the same for the residual's memory).
        _bfloat16: (internal) x is bfloat16 as int16 bits (gpubn.torch);
            y comes back the same way.
    Returns:
        (y, cache): y has x's shape and dtype (``out`` itself when given);
        cache feeds batch_norm_backward.  The cache refers to x without
        copying it: x must not change before the backward (gamma, beta and
        the running statistics may: the cache holds the per-channel constants
        the forward computed from them).
    Raises:
        TypeError / ValueError naming the argument; nothing is modified then.
    """
    inp = _prepare(x, axis, backend, bfloat16=_bfloat16, allow_empty=not training)
    C = inp.C
    eps = check_scalar(eps, "eps")
    training = training if type(training) is bool else check_bool(training, "training")
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean, running_var: give both or neither")
    if training and inp.count < 2:
        raise ValueError(
            f"x: expected more than 1 value per channel when training, got input of shape {inp.shape} (axis={inp.axis})"
        )
    m = None if mask is None else _prepare_mask(mask, inp)
    if training and m is not None and m.count < 2:
        raise ValueError(f"mask: {m.count} True position(s); training needs more than 1 value per channel")
    if not training:
        m = None  # the running statistics normalize: the mask has nothing to select
    if not training and running_mean is None:
        raise ValueError("running_mean, running_var: required when training=False")
    update = training and running_mean is not None
    if update:
        if momentum is None:
            raise ValueError("momentum: None (cumulative average) needs a counter; use gpubn.BatchNorm")
        momentum = check_momentum(momentum)
    act = check_activation(activation)
    z = None if residual is None else _residual_view(residual, inp)
    g = channel_vector(gamma, "gamma", C, inp.acc, inp.backend, fill=1.0, stream=inp.stream)
    b = channel_vector(beta, "beta", C, inp.acc, inp.backend, fill=0.0, stream=inp.stream)
    rm = rv = None
    if running_mean is not None:
        rm = StateVector(running_mean, "running_mean", C, inp.acc, inp.backend, update, inp.stream)
        rv = StateVector(running_var, "running_var", C, inp.acc, inp.backend, update, inp.stream)
    y = inp.empty() if out is None else _out(out, inp)
    # -- validated: from here on nothing raises by design --
    inp = _materialize(inp)
    rmw, rvw = (None, None) if rm is None else (rm.work, rv.work)
    coef = _forward(inp, g, b, rmw, rvw, eps, momentum, training, update, act, z, m, y.reshape(inp.shape3))
    if update and rm.copied:
        rm.commit()
        rv.commit()
    overwritten = None
    if out is not None:  # y over x (or the residual): the forward is right, a backward could not be
        overwritten = "x" if may_overlap(y, inp.view) else "residual" if z is not None and may_overlap(y, z) else None
    if out is None and inp.backend == "cuda":
        y = inp.deliver(y)
    return y, ForwardCache(inp, coef, training, act, z, m, overwritten)


def _forward(inp: _Input, g, b, rm, rv, eps, momentum, training, update, act, z, m, y3):
    """Run a validated, materialized forward on the kernels' arrays: y3
    written, the running statistics rm, rv (the kernels' (C,) arrays, or
    None) updated when ``update``; returns the (5, C) constants."""
    coef = inp.empty(rows=5)
    if training:
        unused = None if update else inp.empty(rows=2)  # no caller's array, no shared constant, in their place
        inp.plan.forward_train(
            inp.view, m, coef, g, b, rm if update else unused[0], rv if update else unused[1],
            eps, momentum if update else 0.0, update, act, z, y3, **inp.launch,
        )  # fmt: skip
    else:
        inp.plan.forward_eval(inp.view, rm, rv, g, b, eps, coef, act, z, y3, **inp.launch)
    return coef


def _residual_view(residual, inp: _Input):
    """The residual's (outer, C, inner) view, validated against x, on x's side and in x's dtype."""
    arr, on_device = as_input(residual, "residual", inp.backend)
    check_float(arr.dtype, "residual")
    if tuple(arr.shape) != inp.shape:
        raise ValueError(f"residual: shape {tuple(arr.shape)} does not match x's shape {inp.shape}")
    if on_device != inp.on_device or (on_device and arr.dtype != inp.dtype):
        where = "a device array" if on_device else "a host array"
        raise TypeError(f"residual: {where} of dtype {arr.dtype}; x is {inp.dtype}, on the same side")
    if inp.dtype == BFLOAT16_BITS:
        raise TypeError("residual: not supported with bfloat16 input")
    if on_device:
        return to_canonical(arr, inp.shape3, True, inp.stream)
    view = np.ascontiguousarray(np.asarray(arr, dtype=inp.dtype).reshape(inp.shape3))
    return to_device(view, inp.stream) if inp.backend == "cuda" else view


@_on_input_device
def batch_norm_backward(dy, cache: ForwardCache, *, out=None, _reduce=None):
    """Gradients of batch_norm_forward.

    Args:
        dy: gradient of the loss w.r.t. y; y's shape.
        cache: the second result of the matching batch_norm_forward.
        out: None, or (dx, dgamma, dbeta), each None or an array to write
            that result into: dx like x (C-contiguous, on x's side), dgamma
            and dbeta (C,) of the statistics dtype (a layer's own gradient
            buffers).
        _reduce: (internal, CPU) (fn, n) of synchronized batch norm: ``fn``
            maps this process's (2, C) float64 sums to the sums over every
            process, ``n`` is the global count per channel; dgamma and dbeta
            then stay this process's share.
    Returns:
        (dx, dgamma, dbeta): dx has x's shape and dtype; dgamma, dbeta are (C,)
        float32 (float64 for float64 x).  With training=False in the forward,
        the statistics are constants: dx = gamma / sqrt(running_var + eps) * dy.
        (dx, dgamma, dbeta, dresidual) when the forward had a residual;
        dresidual has x's shape and dtype.  dy is the gradient w.r.t. the
        forward's y, after its activation.
    """
    if not isinstance(cache, ForwardCache):
        raise TypeError(f"cache: expected the cache returned by batch_norm_forward, got {type(cache).__name__}")
    if cache.overwritten is not None:
        raise ValueError(
            f"cache: its forward wrote y over {cache.overwritten} (out=), which the backward reads; "
            "give that forward another out"
        )
    inp = cache.inp
    if type(dy) is np.ndarray and inp.backend == "cpu":
        arr, on_device = dy, False
    else:
        arr, on_device = as_input(dy, "dy", inp.backend)
    if inp.dtype == BFLOAT16_BITS:
        if arr.dtype != BFLOAT16_BITS:
            raise TypeError(f"dy: dtype {arr.dtype}; a bfloat16 forward takes bfloat16 gradients (int16 bits)")
    else:
        check_float(arr.dtype, "dy")
    if arr.shape != inp.shape and tuple(arr.shape) != inp.shape:
        raise ValueError(f"dy: shape {tuple(arr.shape)} does not match the forward input's shape {inp.shape}")
    if on_device and arr.dtype != inp.dtype:
        raise TypeError(f"dy: device array of dtype {arr.dtype}; the forward input was {inp.dtype}")
    dx_out, dg_out, db_out = (None, None, None) if out is None else out
    dx = _out(dx_out, inp, "out[0] (dx)")
    dgamma = _vector_out(dg_out, inp, "out[1] (dgamma)")
    dbeta = _vector_out(db_out, inp, "out[2] (dbeta)")
    # -- validated --
    if on_device:
        dyv = to_canonical(arr, inp.shape3, True, inp.stream)
    elif inp.backend == "cuda":
        dyv = to_device(np.ascontiguousarray(arr.reshape(inp.shape3), dtype=inp.dtype), inp.stream)
    else:
        dyv = arr.reshape(inp.shape3)
        if dyv.dtype not in (np.float16, BFLOAT16_BITS):  # read as they are, inline
            dyv = dyv.astype(inp.acc, copy=False)
    bcoef = inp.empty(rows=5)
    dres = None if cache.z is None else inp.empty()  # the residual's gradient: dv = dy * g'(v)
    dz = None if dres is None else dres.reshape(inp.shape3)
    dx3 = dx.reshape(inp.shape3)
    mask = cache.mask if cache.training else None
    if _reduce is None:
        inp.plan.backward(dyv, inp.view, cache.z, mask, cache.coef, cache.training, bcoef, dgamma, dbeta, cache.act,
                          dx3, dz, **inp.launch)  # fmt: skip
    else:
        _backward_sync(inp, dyv, cache, bcoef, dgamma, dbeta, dx3, _reduce)
    result = [dx if dx_out is not None else inp.deliver(dx)]
    result += [v if o is not None else inp.deliver(v) for v, o in ((dgamma, dg_out), (dbeta, db_out))]
    return tuple(result) if dres is None else (*result, inp.deliver(dres))


def _backward_sync(inp, dyv, cache, bcoef, dgamma, dbeta, dx3, reduce):
    """The backward of synchronized batch norm (CPU, no mask or activation):
    this process's sums reduced over every process by ``reduce = (fn, n)``."""
    from .kernels import backward as bw

    fn, n = reduce
    sums = np.zeros((2, inp.C))
    dy, x, dx = _bits(dyv), _bits(inp.view), _bits(dx3)
    if inp.shape3[2] == 1:  # 2-D views: channels contiguous
        dy, x, dx = dy[:, :, 0], x[:, :, 0], dx[:, :, 0]
    if inp.count:
        if x.ndim == 3:
            bw.backward_sums_inner_cpu(dy, x, cache.coef, sums, None, None, None)
        else:
            bw.backward_sums_folded_cpu(dy, x, None, cache.coef, None, None, sums)
    bw.finish_backward_cpu(fn(sums), float(n), cache.coef, True, bcoef, dgamma, dbeta)
    dbeta[...] = sums[0]
    dgamma[...] = sums[1] * cache.coef[INVSTD]
    if inp.count:
        grad = bw.input_grad_inner_cpu if x.ndim == 3 else bw.input_grad_channels_cpu
        grad(dy, x, None, bcoef, dx, None, None, None)


__all__ = ["batch_stats", "moments", "normalize", "batch_norm_forward", "batch_norm_backward", "ForwardCache"]
