"""The functional API: batch statistics, normalize, forward and backward.

Each function validates everything first (a call that raises changes nothing),
builds the canonical ``(outer, C, inner)`` view of its input, and calls the
launchers in ``gpubn.kernels``.  Semantics follow ``torch.nn.functional.batch_norm``:
biased variance normalizes, the unbiased variance enters the running estimate,
``momentum`` is the weight of the new batch.

Arrays: NumPy in, NumPy out on either backend.  On the CUDA backend, device
arrays (numba, or anything with ``__cuda_array_interface__``: CuPy, PyTorch)
are used in place and results are numba device arrays on the same device.
"""

import functools
from dataclasses import dataclass
from types import SimpleNamespace

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
    device_view,
    empty_like_library,
    host_copy,
    library_allocator,
    read_input,
    to_canonical,
    to_device,
    to_host,
)
from ._backend import resolve_backend
from .kernels import activation as _act
from .kernels import backward as _bw
from .kernels import normalize as _nz
from .kernels import onepass as _op
from .kernels import stats as _st
from .kernels.half import bits as _bits
from .kernels.launch import numba_stream
from .kernels.workspace import device_empty, host_empty

_ENGINES = {
    "cpu": SimpleNamespace(
        forward_train=_op.launch_forward_train_cpu,
        affine=_nz.launch_affine_coefficients_cpu,
        normalize=_op.launch_normalize_cpu,
        backward=_bw.launch_backward_cpu,
    ),
    "cuda": SimpleNamespace(
        forward_train=_op.launch_forward_train_cuda,  # one launch for small channels, else split passes
        affine=_nz.launch_affine_coefficients_cuda,
        normalize=_op.launch_normalize_cuda,
        backward=_op.launch_backward_any_cuda,  # likewise
    ),
}


def _on_input_device(fn):
    """Run ``fn(x, ...)`` with x's device current (a tensor on cuda:1 while
    cuda:0 is current: its kernels, workspaces and constants on cuda:1)."""

    @functools.wraps(fn)
    def call(x, *args, **kwargs):
        device = array_device(x)
        if device is None:  # host arrays, numba arrays, the simulator: nothing to switch
            return fn(x, *args, **kwargs)
        with device_scope(device):
            return fn(x, *args, **kwargs)

    return call


@dataclass
class _Input:
    """A validated input: its canonical view ready for the kernels."""

    backend: str
    on_device: bool
    shape: tuple  # the caller's shape
    dtype: np.dtype  # the caller's dtype
    axis: int
    arr: object  # the caller's array (NumPy or numba device array)
    shape3: tuple  # (outer, C, inner)
    acc: np.dtype  # statistics dtype
    view: object = None  # (outer, C, inner) on the backend's side, set by _materialize
    library: str = "numpy"  # results go back as this library's arrays (_arrays.deliver_as)
    stream: int = 0  # the caller's stream: every kernel of the call launches on it
    owner: object = None  # the caller's array object (a torch tensor: its device)

    @property
    def C(self) -> int:
        return self.shape3[1]

    @property
    def count(self) -> int:
        """Values per channel."""
        return self.shape3[0] * self.shape3[2]

    def empty(self, rows=None):
        """A new array of the input's shape and dtype (rows=k: (k, C) stats)."""
        if rows is not None:
            shape, dtype = (rows, self.C), self.acc
        else:
            shape, dtype = self.shape, self.dtype
        if self.backend != "cuda":
            return host_empty(shape, dtype)
        out = empty_like_library(shape, dtype, self.library, self.owner)
        return device_empty(shape, dtype) if out is None else out

    @property
    def launch(self) -> dict:
        """The CUDA launchers' keyword arguments: the caller's stream (none on the CPU)."""
        return {"stream": self.stream} if self.backend == "cuda" else {}

    @property
    def reduce(self) -> dict:
        """The reduction launchers' keyword arguments: the caller's stream and,
        for torch tensors and CuPy arrays, its library's allocator for the
        partials (graph-aware: nothing of gpubn's own is allocated under capture)."""
        if self.backend != "cuda":
            return {}
        return {"stream": self.stream, "scratch": library_allocator(self.library, self.owner)}

    def deliver(self, arr):
        """Results go back where the input came from, as its library's arrays."""
        if self.backend == "cuda" and not self.on_device:
            return to_host(arr, self.stream)
        return deliver_as(arr, self.library, self.owner)


def _prepare(x, axis, backend, name="x", bfloat16=False, allow_empty=False) -> _Input:
    be = resolve_backend(backend)
    src = read_input(x, name, be)
    arr, on_device = src.arr, src.on_device
    if bfloat16:  # int16 bits of bfloat16 values (BFLOAT16_BITS), CPU kernels only
        if arr.dtype != BFLOAT16_BITS or be != "cpu":
            raise TypeError(f"{name}: bfloat16 data must be int16 bits on the CPU backend")
        dtype = arr.dtype
    else:
        dtype = check_float(arr.dtype, name)
    ax = check_axis(axis, arr.ndim)
    shape3 = canonical_shape(arr.shape, ax)
    if 0 in arr.shape and not (allow_empty and shape3[1] > 0):
        raise ValueError(f"{name}: empty input of shape {tuple(arr.shape)}")
    return _Input(
        be, on_device, tuple(arr.shape), dtype, ax, arr, shape3, acc_dtype(dtype),
        library=src.library, stream=src.stream, owner=src.owner,
    )  # fmt: skip


@dataclass
class _Mask:
    """A validated mask: which positions give the statistics (masked batch norm)."""

    view: object  # (outer, inner) bool, on the backend's side
    count: int  # True positions: the values per channel the statistics come from
    origin: int  # flat index (o * inner + i) of the first True position (the CUDA kernels' reference value)


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
    view = to_device(host, inp.stream) if inp.backend == "cuda" else host
    return _Mask(view, count, origin)


def _materialize(inp: _Input) -> _Input:
    """Build the kernel-ready view of a validated input."""
    view = to_canonical(inp.arr, inp.shape3, inp.on_device, inp.stream, inp.reduce.get("scratch"))
    if inp.backend == "cuda" and not inp.on_device:
        view = to_device(np.ascontiguousarray(view), inp.stream)
    inp.view = view
    return inp


@_on_input_device
def batch_stats(x, axis: int = 1, backend=None, mask=None):
    """Per-feature mean and biased variance of ``x``.

    Args:
        x: array of any shape, float16/32/64; ``axis`` is the feature axis.
        mask: None, or a bool array of x's shape without the feature axis:
            the statistics come from the True positions only (at least one).
    Returns:
        (mean, var): each shape (C,), float32 (float64 for float64 x); NumPy
        arrays, or device arrays when x is a device array.
    """
    inp = _prepare(x, axis, backend)
    m = _prepare_mask(mask, inp)
    if m is not None and m.count == 0:
        raise ValueError("mask: no position is True; the statistics need at least one")
    inp = _materialize(inp)
    mean, var = _stats_of(inp, m)
    return inp.deliver(mean), inp.deliver(var)


@_on_input_device
def batch_stats_moments(x, axis: int = 1, backend=None, mask=None, float64: bool = False):
    """gpubn.moments: the per-channel Moments of x (see gpubn/moments.py).
    An input with no values per channel (or none True in the mask) gives count 0.

    float64=True: every value is widened to float64 before it is summed
    (gpubn.moments, the Standardizer: squares of |x| > 1.8e19 overflow
    float32); on the CUDA backend a float16/32 device array is then copied to
    the host once (on its stream) and reduced by the CPU kernels.  False: the
    kernels' own accumulation (float32 sums per chunk, float64 across chunks
    on the CPU; float32 ``var * n`` on CUDA), as synchronized batch norm uses."""
    from .moments import Moments

    inp = _prepare(x, axis, backend, allow_empty=True)
    m = _prepare_mask(mask, inp) if inp.count else None
    if inp.count == 0 or (m is not None and m.count == 0):
        return Moments.empty(inp.C)
    inp = _materialize(inp)
    view = inp.view
    if float64 and inp.backend == "cuda" and inp.dtype != np.float64:
        view = host_copy(Source(view, True, inp.library, inp.stream, inp.owner))
        mask_view = None if m is None else m.view.copy_to_host()
    else:
        mask_view = None if m is None else m.view
    if isinstance(view, np.ndarray):
        out = np.empty((3, inp.C))
        view = np.asarray(view, np.float64) if float64 else _bits(view)
        _st.channel_moments_cpu(view, out, mask_view)
        return Moments.from_array(out)
    mean, var = _stats_of(inp, m)
    n = float(inp.count if m is None else m.count)
    return Moments(n, to_host(mean, inp.stream), to_host(var, inp.stream).astype(np.float64) * n)


def _stats_of(inp: _Input, mask=None):
    """(mean, var) of a materialized input, on the backend's side."""
    C = inp.C
    ones = channel_vector(None, "gamma", C, inp.acc, inp.backend, fill=1.0, stream=inp.stream)
    zeros = channel_vector(None, "beta", C, inp.acc, inp.backend, fill=0.0, stream=inp.stream)
    coef = inp.empty(rows=5)
    unused = inp.empty(rows=2)  # the running statistics' place (update=False: never written)
    eng = _ENGINES[inp.backend]
    eng.forward_train(
        inp.view, coef, ones, zeros, unused[0], unused[1], 0.0, 0.0, False, None, **_mask_args(mask), **inp.reduce
    )
    return coef[_st.MEAN], coef[_st.VAR]


def _mask_args(m: _Mask) -> dict:
    """The launchers' keyword arguments for a mask (none without one)."""
    return {} if m is None else {"mask": m.view, "origin": m.origin, "count": m.count}


@_on_input_device
def normalize(x, mean, var, gamma=None, beta=None, eps: float = 1e-5, axis: int = 1, backend=None):
    """The elementwise kernel: ``(x - mean) / sqrt(var + eps) * gamma + beta``.

    Args:
        x: array, float16/32/64, feature axis ``axis``.
        mean, var: (C,) statistics to normalize with (var is biased variance).
        gamma, beta: (C,) or None (1 and 0).
    Returns:
        y: x's shape and dtype.
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
    inp = _materialize(inp)
    eng = _ENGINES[inp.backend]
    coef = inp.empty(rows=5)
    eng.affine(*vec, eps, coef, **inp.launch)
    y = inp.empty()
    eng.normalize(inp.view, coef, y.reshape(*inp.shape3), **inp.launch)
    return inp.deliver(y)


@dataclass
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

    inp: _Input
    coef: object
    training: bool
    act: int = 0  # kernels.activation code: y = g(BN(x) + z)
    z: object = None  # the residual's canonical view (referenced like x), or None
    mask: _Mask = None  # the positions that gave the statistics (masked batch norm), or None

    @property
    def backend(self) -> str:
        return self.inp.backend

    @property
    def mean(self):
        return self.inp.deliver(self.coef[_st.MEAN])

    @property
    def invstd(self):
        return self.inp.deliver(self.coef[_st.INVSTD])


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
    _coef=None,
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
        _coef: (internal) a (5, C) array to hold the per-channel constants,
            so that a layer reuses one buffer instead of allocating per call.
        _bfloat16: (internal) x is bfloat16 as int16 bits (gpubn.torch);
            y comes back the same way.
    Returns:
        (y, cache): y has x's shape and dtype; cache feeds batch_norm_backward.
        The cache refers to x without copying it: x must not change before
        the backward (gamma, beta and the running statistics may: the cache
        holds the per-channel constants the forward computed from them).
    Raises:
        TypeError / ValueError naming the argument; nothing is modified then.
    """
    inp = _prepare(x, axis, backend, bfloat16=_bfloat16)
    C = inp.C
    eps = check_scalar(eps, "eps")
    training = check_bool(training, "training")
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean, running_var: give both or neither")
    if training and inp.count < 2:
        raise ValueError(
            f"x: expected more than 1 value per channel when training, got input of shape {inp.shape} (axis={inp.axis})"
        )
    m = _prepare_mask(mask, inp)
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
    # -- validated: from here on nothing raises by design --
    inp = _materialize(inp)
    eng = _ENGINES[inp.backend]
    coef = _coef if _buffer_fits(_coef, inp, 5) else inp.empty(rows=5)
    y = inp.empty()
    y3 = y.reshape(*inp.shape3)
    if training:  # statistics, running statistics and y: one launch for small channels on the GPU
        unused = None if update else inp.empty(rows=2)  # no caller's array, no shared constant, in their place
        eng.forward_train(
            inp.view, coef, g, b,
            rm.work if update else unused[0], rv.work if update else unused[1],
            eps, momentum if update else 0.0, update, y3, act=act, z=z, **_mask_args(m), **inp.reduce,
        )  # fmt: skip
        if update:
            rm.commit()
            rv.commit()
    else:
        eng.affine(rm.work, rv.work, g, b, eps, coef, **inp.launch)
        eng.normalize(inp.view, coef, y3, act, z, **inp.launch)
    return inp.deliver(y), ForwardCache(inp, coef, training, act, z, m)


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
    view = np.asarray(arr, dtype=inp.dtype).reshape(inp.shape3)
    return to_device(np.ascontiguousarray(view), inp.stream) if inp.backend == "cuda" else view


def _cache_for(x, coef, axis: int, training: bool, backend: str, bfloat16: bool = False, activation=None):
    """(internal) The ForwardCache of a forward of x whose per-channel constants
    ``coef`` are known: gpubn.torch keeps x and coef as tensors between the
    passes (autograd saves tensors, not Python objects)."""
    inp = _materialize(_prepare(x, axis, backend, bfloat16=bfloat16))
    if inp.backend == "cuda" and not getattr(coef, "__cuda_ndarray__", False):
        coef = device_view(coef)  # a torch tensor: the kernels take numba views
    return ForwardCache(inp, coef, training, _act.ACTIVATIONS[activation])


def _buffer_fits(buf, inp: _Input, rows: int) -> bool:
    if buf is None:
        return False
    on_device = hasattr(buf, "copy_to_host")
    return on_device == (inp.backend == "cuda") and buf.shape == (rows, inp.C) and buf.dtype == inp.acc


@_on_input_device
def batch_norm_backward(dy, cache: ForwardCache, _grads=None, _reduce=None):
    """Gradients of batch_norm_forward.

    Args:
        dy: gradient of the loss w.r.t. y; y's shape.
        cache: the second result of the matching batch_norm_forward.
    Returns:
        (dx, dgamma, dbeta): dx has x's shape and dtype; dgamma, dbeta are (C,)
        float32 (float64 for float64 x).  With training=False in the forward,
        the statistics are constants: dx = gamma / sqrt(running_var + eps) * dy.
        (dx, dgamma, dbeta, dresidual) when the forward had a residual;
        dresidual has x's shape and dtype.  dy is the gradient w.r.t. the
        forward's y, after its activation.
        _grads: (internal) a (2, C) array to receive dgamma, dbeta in place.
        _reduce: (internal, CPU) (fn, n) of synchronized batch norm
            (``kernels.backward.launch_backward_cpu``).
    """
    if not isinstance(cache, ForwardCache):
        raise TypeError(f"cache: expected the cache returned by batch_norm_forward, got {type(cache).__name__}")
    inp = cache.inp
    arr, on_device = as_input(dy, "dy", inp.backend)
    if inp.dtype == BFLOAT16_BITS:
        if arr.dtype != BFLOAT16_BITS:
            raise TypeError(f"dy: dtype {arr.dtype}; a bfloat16 forward takes bfloat16 gradients (int16 bits)")
    else:
        check_float(arr.dtype, "dy")
    if tuple(arr.shape) != inp.shape:
        raise ValueError(f"dy: shape {tuple(arr.shape)} does not match the forward input's shape {inp.shape}")
    if on_device and arr.dtype != inp.dtype:
        raise TypeError(f"dy: device array of dtype {arr.dtype}; the forward input was {inp.dtype}")
    # -- validated --
    dyv = to_canonical(arr, inp.shape3, on_device, inp.stream)
    if inp.backend == "cuda" and not on_device:
        dyv = to_device(np.ascontiguousarray(dyv, dtype=inp.dtype), inp.stream)
    elif inp.backend == "cpu" and dyv.dtype not in (np.float16, BFLOAT16_BITS):  # read as they are, inline
        dyv = dyv.astype(inp.acc, copy=False)
    dx = inp.empty()
    grads = _grads if _buffer_fits(_grads, inp, 2) else inp.empty(rows=2)  # dgamma, dbeta
    bcoef = inp.empty(rows=5)
    dres = None if cache.z is None else inp.empty()  # the residual's gradient: dv = dy * g'(v)
    options = {} if _reduce is None else {"reduce": _reduce}
    if cache.mask is not None:
        options.update(mask=cache.mask.view, count=cache.mask.count)
    if cache.act:  # dv recomputed from x (and z) where dy is read
        options.update(act=_act.act_token(cache.act), z=cache.z, dz=None if dres is None else dres.reshape(*inp.shape3))
    elif dres is not None:  # no activation: dv is dy
        _copy_into(dres, dyv, inp)
    dx3 = dx.reshape(*inp.shape3)
    eng = _ENGINES[inp.backend]
    eng.backward(dyv, inp.view, cache.coef, cache.training, bcoef, grads[0], grads[1], dx3, **options, **inp.reduce)
    out = (inp.deliver(dx), inp.deliver(grads[0]), inp.deliver(grads[1]))
    return out if dres is None else (*out, inp.deliver(dres))


def _copy_into(out, a, inp: _Input):
    """out (x's shape and dtype) <- a, an (outer, C, inner) array on the same side."""
    if inp.backend == "cuda":  # a device array of x's dtype (the backward's dy)
        out.reshape(*inp.shape3).copy_to_device(a, stream=numba_stream(inp.stream))
    else:
        out.reshape(inp.shape3)[...] = a


__all__ = ["batch_stats", "normalize", "batch_norm_forward", "batch_norm_backward", "ForwardCache"]
