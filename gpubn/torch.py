"""gpubn inside PyTorch models: a differentiable ``batch_norm``, drop-in
``BatchNorm1d/2d/3d`` modules and ``replace_batchnorm`` (torch is an optional
extra: ``pip install "gpubn[torch]"``).

    import gpubn.torch as gt

    y = gt.batch_norm(x, running_mean, running_var, weight, bias, training=True)
    model = gt.replace_batchnorm(model)  # every torch BatchNorm*d becomes gpubn's, in place

Semantics, arguments, parameters, buffers and ``state_dict`` keys are torch's
(``torch.nn.functional.batch_norm``, ``torch.nn.BatchNorm*d``): a state dict
saved from either loads into the other, and the numbers match torch's within
the dtype's tolerance.

How the tensors reach the kernels, with no copy:

- CPU tensors as NumPy views of their memory (``Tensor.numpy()``);
  ``channels_last`` tensors as their contiguous NHWC (NDHWC) view with the
  feature axis last, so the channels-contiguous kernels read them where they are.
- bfloat16 CPU tensors as their int16 bits, widened to float32 and rounded back
  inline by the kernels (``kernels/half.py``); statistics in float32.
- CUDA tensors through ``__cuda_array_interface__``, on the input's device and
  torch's current stream (scratch from torch's caching allocator, so calls can
  be captured in a CUDA graph).  bfloat16 CUDA tensors are converted to
  float32 and back by torch (the CUDA kernels have no bfloat16 loads yet).
  No GPU has run this path since it was rewritten (BENCHMARKS.md).

Autograd: in eager mode ``batch_norm`` is a ``torch.autograd.Function`` (the
least dispatch cost per call: these layers are often small); under
``torch.compile`` the same two passes are the custom operators
``gpubn::batch_norm`` and ``gpubn::batch_norm_backward`` (``torch.library``,
with fake implementations), which the compiler traces without graph breaks
(the operator returns the new running statistics, copied into the buffers in
place: an operator with an autograd formula may not mutate its inputs).  Between forward and
backward autograd keeps x and the (5, C) per-channel constants (see
RELIABILITY.md); a gradient of the gradient (double backward) raises.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import warnings
import weakref
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from ._arrays import (
    acc_dtype,
    canonical_shape,
    channel_vector,
    check_activation,
    device_scope,
    device_view,
    library_allocator,
)
from ._backend import available_backends
from .distributed import batch_norm_backward_sync, batch_norm_forward_sync, communicator
from .functional import moments as _moments
from .kernels import plan as _plan
from .kernels.activation import ACTIVATIONS
from .kernels.common import current_device
from .kernels.workspace import CACHE_MIN_BYTES, host_empty

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_CHANNELS_LAST = {4: (torch.channels_last, (0, 2, 3, 1)), 5: (torch.channels_last_3d, (0, 2, 3, 4, 1))}


# -- tensors <-> arrays ---------------------------------------------------------------


def _layout(t: Tensor):
    """(view, axis, perm): the tensor as the kernels should see it.  A
    channels-last tensor is permuted to its contiguous NHWC view (feature axis
    last, no copy); anything else stays (N, C, *) with the feature axis 1."""
    fmt = _CHANNELS_LAST.get(t.dim())
    if fmt is not None and not t.is_contiguous() and t.is_contiguous(memory_format=fmt[0]):
        return t.permute(fmt[1]), -1, fmt[1]
    return t, 1, None


def _restore(t: Tensor, perm) -> Tensor:
    """Undo ``_layout``'s permutation (a view: the result stays channels-last)."""
    if perm is None:
        return t
    inverse = [0] * len(perm)
    for i, p in enumerate(perm):
        inverse[p] = i
    return t.permute(inverse)


def _host(t: Tensor):
    """A NumPy view of a CPU tensor's memory (bfloat16 as its int16 bits)."""
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return t.numpy(force=True) if t.requires_grad else t.numpy()  # force: detached, 0.2 us less than detach()


def _array(t: Tensor | None):
    """What gpubn's functions take: a NumPy view of a CPU tensor (bfloat16 as
    int16 bits), the tensor itself on CUDA (``__cuda_array_interface__``)."""
    if t is None or t.is_cuda:
        return None if t is None else t.detach()
    return _host(t)


class _Memory:
    """A NumPy view's description of a tensor's memory that does not own it (``_vector``)."""

    def __init__(self, t: Tensor, dtype: np.dtype):
        self.__array_interface__ = {
            "data": (t.data_ptr(), False),
            "shape": (t.shape[0],),
            "strides": (t.stride(0) * dtype.itemsize,),
            "typestr": dtype.str,
            "version": 3,
        }


_VECTORS = {}  # id(tensor) -> (weakref to it, its data pointer, its dtype, a NumPy view of that memory)
_VECTOR_DTYPES = {torch.float32: np.dtype(np.float32), torch.float64: np.dtype(np.float64)}


def _vector(t: Tensor) -> np.ndarray:
    """_host for a float32/float64 (C,) CPU tensor, the view kept from one call
    to the next: a module passes the same parameters and buffers every step,
    and a view costs ~1.4 us to build (about 5 % of a small layer's step).  The
    view is used only while the caller holds t, and only while t still has the
    memory it was built over; it does not keep t alive."""
    hit = _VECTORS.get(id(t))
    if hit is not None and hit[0]() is t and hit[1] == t.data_ptr() and hit[2] is t.dtype:
        return hit[3]
    dtype = _VECTOR_DTYPES.get(t.dtype)
    if dtype is None:
        return _host(_widened(t))
    key = id(t)
    ref = weakref.ref(t, lambda r: _VECTORS.pop(key, None) if _VECTORS.get(key, (None,))[0] is r else None)
    view = np.asarray(_Memory(t, dtype))
    _VECTORS[key] = (ref, t.data_ptr(), t.dtype, view)
    return view


_HALF = (torch.float16, torch.bfloat16)


def _widened(t: Tensor | None) -> Tensor | None:
    """A float16 / bfloat16 (C,) parameter as float32 (the kernels' vectors); others as they are."""
    return t.float() if t is not None and t.dtype in _HALF else t


def _running(running_mean, running_var):
    """(rounded, mean, var): float16 / bfloat16 buffers (a module cast with
    .half()) as float32 copies for the kernels, written back (rounded) after."""
    rounded = running_mean is not None and running_mean.dtype in _HALF
    return (True, running_mean.float(), running_var.float()) if rounded else (False, running_mean, running_var)


# -- a call record per input signature: the plan, and how tensors reach it ------------------


class _HostCall:
    """What a CPU input's shape, strides and dtype decide, found once: its
    plan, and the kernels' views of tensors like it (NumPy views of their
    memory, in the plan's ``kernel_shape``; bfloat16 as int16 bits)."""

    def __init__(self, input: Tensor):
        x, axis, self.perm = _layout(input)
        arr = _host(x)
        self.shape = arr.shape  # the (permuted) tensor's
        shape3 = canonical_shape(arr.shape, axis)
        self.C = shape3[1]
        self.plan = _plan.plan_for("cpu", shape3, arr.dtype, bool(arr.flags.c_contiguous))
        self.kernel_shape = self.plan.kernel_shape
        self.dtype = arr.dtype  # of the kernels' data (int16: bfloat16 bits)
        self.acc = acc_dtype(arr.dtype)  # of the constants
        self.tensor_dtype = input.dtype
        self.device = None  # nothing to make current
        self.launch = {}
        # C-level callables: no Python frame per call on the small-layer path
        self.rows = functools.partial(np.empty, dtype=self.acc)  # rows((k, C)): a new array of the constants' dtype
        self.tensor = torch.from_numpy  # a tensor over an array of ``rows``
        # large outputs from gpubn's host cache: a fresh large tensor costs its
        # size again in page faults and zero-filling (the module step on (64,
        # 64, 56, 56) took 2.2x as long with ``torch.empty_like`` on the 2-vCPU
        # development VM)
        self.empty = host_empty if arr.nbytes >= CACHE_MIN_BYTES else np.empty

    def view(self, t: Tensor) -> np.ndarray:
        """The kernels' view of a tensor of the input's shape (x, dy), in the input's dtype."""
        if t.dtype is not self.tensor_dtype:
            t = t.to(self.tensor_dtype)
        a = _host(t if self.perm is None else t.permute(self.perm))
        return a if a.shape == self.kernel_shape else a.reshape(self.kernel_shape)

    def output(self):
        """(out, its kernel view): a new output of the input's shape (``result`` makes it a tensor)."""
        out = self.empty(self.shape, self.dtype)
        return out, (out if out.shape == self.kernel_shape else out.reshape(self.kernel_shape))

    def result(self, out) -> Tensor:
        """The tensor over an output the kernels wrote: the input's dtype and memory format."""
        t = torch.from_numpy(out)
        if self.tensor_dtype == torch.bfloat16:
            t = t.view(torch.bfloat16)
        return t if self.perm is None else _restore(t, self.perm)

    def vector(self, t: Tensor | None, fill: float = 0.0):
        """A (C,) tensor as the kernels take it (None: ``fill``)."""
        if t is None:
            return np.full(self.C, fill, self.acc)
        hit = _VECTORS.get(id(t))  # _vector's, looked up here: a call less per vector
        if hit is not None and hit[0]() is t and hit[1] == t.data_ptr() and hit[2] is t.dtype:
            return hit[3]
        return _vector(t)

    def array(self, t: Tensor):
        """The kernels' array over a tensor of constants (the inverse of ``tensor``)."""
        return _host(t)


class _DeviceCall:
    """_HostCall for CUDA tensors: numba views of their memory
    (``__cuda_array_interface__``), new tensors from torch's caching allocator
    (graph-aware), the kernels on torch's current stream and the input's
    device.  bfloat16 is computed in float32 (the CUDA kernels have no
    bfloat16 loads yet).  No GPU has run this path since it was rewritten
    (BENCHMARKS.md); tests/test_torch.py runs it under the simulator."""

    def __init__(self, input: Tensor):
        if "cuda" not in available_backends():
            raise RuntimeError("input: a CUDA tensor, but gpubn's CUDA backend is not usable here")
        x, axis, self.perm = _layout(input)
        self.shape = tuple(x.shape)
        self.device = input.device
        self.tensor_dtype = input.dtype
        self.compute = torch.float32 if input.dtype == torch.bfloat16 else input.dtype  # the kernels' dtype
        self.acc = torch.float64 if input.dtype == torch.float64 else torch.float32
        shape3 = canonical_shape(self.shape, axis)
        self.C = shape3[1]
        self.kernel_shape = shape3
        with device_scope(self.device.index):
            self.plan = _plan.plan_for("cuda", shape3, _NUMPY_DTYPES[self.compute], True, current_device())
        self._scratch = library_allocator("torch", _Owner(self.device))

    @property
    def launch(self) -> dict:
        """The launches' keyword arguments: torch's current stream, its allocator for the partials."""
        return {"stream": torch.cuda.current_stream(self.device).cuda_stream, "scratch": self._scratch}

    def view(self, t: Tensor):
        if t.dtype is not self.compute:
            t = t.to(self.compute)
        if self.perm is not None:
            t = t.permute(self.perm)
        return device_view(t.detach().contiguous().view(self.kernel_shape))

    def output(self):
        out = torch.empty(self.shape, dtype=self.compute, device=self.device)
        return out, device_view(out.view(self.kernel_shape))

    def result(self, out: Tensor) -> Tensor:
        out = out if self.perm is None else _restore(out, self.perm)
        return out.to(torch.bfloat16) if self.tensor_dtype == torch.bfloat16 else out

    def vector(self, t: Tensor | None, fill: float = 0.0):
        if t is None:
            return channel_vector(None, "", self.C, _NUMPY_DTYPES[self.acc], "cuda", fill)
        return device_view(_widened(t).detach())

    def rows(self, shape: tuple):
        t = torch.empty(shape, dtype=self.acc, device=self.device)
        view = device_view(t)
        view.gpubn_tensor = t  # ``tensor`` hands back the tensor itself
        return view

    def tensor(self, a) -> Tensor:
        return a.gpubn_tensor

    def array(self, t: Tensor):
        return device_view(t.detach())


class _Owner(NamedTuple):
    """What the torch allocator of ``_arrays.library_allocator`` reads of a tensor: its device."""

    device: torch.device


_NUMPY_DTYPES = {torch.float16: np.dtype(np.float16), torch.float32: np.dtype(np.float32)}
_NUMPY_DTYPES[torch.float64] = np.dtype(np.float64)
_CALLS = {}
_plan.forgetters.append(_CALLS.clear)


def _call(input: Tensor):
    """The record of input's call signature (its dtype, shape and values per
    channel checked by ``_check``), built on first sight."""
    key = (input.shape, input.stride(), input.dtype, input.device)
    call = _CALLS.get(key)
    if call is None:
        if input.device.type not in ("cpu", "cuda"):
            raise RuntimeError(f"input: tensors on {input.device.type!r} are not supported; expected CPU or CUDA")
        call = _plan.remember(_CALLS, key, _DeviceCall(input) if _on_gpu(input) else _HostCall(input))
    return call


def _on_gpu(t: Tensor) -> bool:
    """Whether t's call takes the CUDA path (a test runs CPU tensors through it under the simulator)."""
    return t.is_cuda


class _Pass(NamedTuple):
    """What a forward leaves for its backward."""

    call: object  # _HostCall or _DeviceCall
    x: object  # x's kernel view: x itself (a contiguous copy only where x was not)
    coef: object  # (5, C) constants
    training: bool
    act: int  # kernels.activation code


def _forward(input, weight, bias, running_mean, running_var, training, momentum, eps, act=0):
    """(y, pass): y like input, running_mean/var updated in place when
    training; the pass holds the (5, C) float32 (float64 for float64 input)
    per-channel constants (MEAN, VAR, INVSTD, SCALE, BIAS) the backward
    needs.  The arguments are checked (``_check``); the kernels get views of
    the tensors.  ``act``: the activation's code (``check_activation``)."""
    call = _call(input)
    if call.device is None:
        return _forward_on(call, input, weight, bias, running_mean, running_var, training, momentum, eps, act)
    with device_scope(call.device.index):
        return _forward_on(call, input, weight, bias, running_mean, running_var, training, momentum, eps, act)


def _forward_on(call, input, weight, bias, running_mean, running_var, training, momentum, eps, act):
    x = call.view(input)
    y, y3 = call.output()
    w, b = call.vector(weight, 1.0), call.vector(bias)
    rounded, rm, rv = _running(running_mean, running_var)
    update = training and rm is not None
    coef = call.rows((5, call.C))
    launch = call.launch
    if training:
        rmv, rvv = (call.vector(rm), call.vector(rv)) if update else call.rows((2, call.C))  # the latter: never written
        call.plan.forward_train(x, None, coef, w, b, rmv, rvv, eps, momentum if update else 0.0, update, act, None,
                                y3, **launch)  # fmt: skip
    else:
        call.plan.forward_eval(x, call.vector(rm), call.vector(rv), w, b, eps, coef, act, None, y3, **launch)
    if rounded and update:
        with torch.no_grad():
            running_mean.copy_(rm)
            running_var.copy_(rv)
    return call.result(y), _Pass(call, x, coef, training, act)


def _backward(grad_output, saved: _Pass):
    """(grad_input, grad_weight, grad_bias) of the forward that left ``saved``;
    the two (C,) in the constants' dtype."""
    device = saved.call.device
    if device is None:
        return _backward_on(grad_output, saved)
    with device_scope(device.index):
        return _backward_on(grad_output, saved)


def _backward_on(grad_output, saved: _Pass):
    call = saved.call
    dx, dx3 = call.output()
    C = call.C
    dgamma, dbeta, bcoef = (
        call.rows((C,)),
        call.rows((C,)),
        call.rows((5, C)),
    )  # apart: an operator's returns may not alias
    call.plan.backward(call.view(grad_output), saved.x, None, None, saved.coef, saved.training, bcoef, dgamma, dbeta,
                       saved.act, dx3, None, **call.launch)  # fmt: skip
    return call.result(dx), call.tensor(dgamma), call.tensor(dbeta)


def _empty_batch(input, weight, bias) -> Tensor:
    """torch's result for a batch with no values (N = 0): an empty tensor like
    input, differentiable (weight and bias get zero gradients), nothing updated."""
    shape = (1, input.shape[1]) + (1,) * (input.dim() - 2)
    y = input
    if weight is not None:
        y = y * weight.view(shape)
    if bias is not None:
        y = y + bias.view(shape)
    return y.to(input.dtype)


def _no_double_backward():
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():
        raise RuntimeError(
            "gpubn.torch.batch_norm: double backward (a gradient of a gradient, create_graph=True) "
            "is not implemented; use torch.nn.functional.batch_norm for it"
        )


def _param_grads(dgamma, dbeta, weight_dtype, bias_dtype):
    """The parameters' gradients in their own dtypes (None for an absent parameter)."""
    dw = None if weight_dtype is None else dgamma if dgamma.dtype == weight_dtype else dgamma.to(weight_dtype)
    db = None if bias_dtype is None else dbeta if dbeta.dtype == bias_dtype else dbeta.to(bias_dtype)
    return dw, db


# -- eager mode: an autograd.Function (the least dispatch cost per call) --------------------


class _BatchNorm(torch.autograd.Function):
    """input, weight and bias are differentiable; ``rest`` = (running_mean,
    running_var, training, momentum, eps, act) is not (one argument: each
    costs ``apply`` time)."""

    @staticmethod
    def forward(ctx, input, weight, bias, rest):
        y, saved = _forward(input, weight, bias, *rest)
        ctx.save_for_backward(input)  # autograd's check that input is not modified before the backward
        ctx.saved = saved  # its kernel view, plan and constants: the backward reads nothing again
        ctx.dtypes = (None if weight is None else weight.dtype, None if bias is None else bias.dtype)
        return y

    @staticmethod
    def backward(ctx, grad_output):
        _no_double_backward()
        _ = ctx.saved_tensors  # autograd raises here if input was modified since the forward
        dx, dgamma, dbeta = _backward(grad_output, ctx.saved)
        return (dx, *_param_grads(dgamma, dbeta, *ctx.dtypes), None)


try:  # _BatchNorm.apply less its Python wrapper: 1.3 us of a small layer's ~50 us step
    _apply_c = torch._C._FunctionBase.__dict__["apply"].__get__(None, _BatchNorm)
    _unwrap, _transforms_active = torch._C._functorch.unwrap_if_dead, torch._C._are_functorch_transforms_active

    def _apply(input, weight, bias, rest):
        """What ``Function.apply`` does for a Function without ``setup_context``
        when no functorch transform is active (vmap, grad: then the wrapper's own path)."""
        if _transforms_active():
            return _BatchNorm.apply(input, weight, bias, rest)
        weight = weight if weight is None else _unwrap(weight)
        return _apply_c(_unwrap(input), weight, bias if bias is None else _unwrap(bias), rest)

except AttributeError:  # pragma: no cover - a torch without these internals
    _apply = _BatchNorm.apply


# -- synchronized: the statistics of the batch shared by a process group (gpubn.distributed) --


class _SyncBatchNorm(torch.autograd.Function):
    """Training-mode batch norm over every rank's share (CPU tensors, eager mode)."""

    @staticmethod
    def forward(ctx, input, weight, bias, running_mean, running_var, momentum, eps, comm):
        if input.is_cuda:
            raise RuntimeError("process_group: synchronized batch norm runs on CPU tensors for now")
        x, axis, perm = _layout(input)
        x32 = x.float() if x.dtype == torch.bfloat16 else x  # no bfloat16 in the synchronized path
        y, cache = batch_norm_forward_sync(
            _array(x32),
            _array(_widened(weight)),
            _array(_widened(bias)),
            comm,
            axis=axis,
            eps=eps,
            running_mean=_array(running_mean),
            running_var=_array(running_var),
            momentum=momentum,
            backend="cpu",
        )
        ctx.cache, ctx.perm, ctx.dtype = cache, perm, input.dtype
        ctx.dtypes = (None if weight is None else weight.dtype, None if bias is None else bias.dtype)
        return _restore(torch.from_numpy(y), perm).to(input.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        _no_double_backward()
        dy = grad_output.to(torch.float32 if ctx.dtype == torch.bfloat16 else ctx.dtype)
        if ctx.perm is not None:
            dy = dy.permute(ctx.perm)
        dx, dgamma, dbeta = batch_norm_backward_sync(_array(dy), ctx.cache)
        dx = _restore(torch.from_numpy(dx), ctx.perm).to(ctx.dtype)
        dw, db = _param_grads(torch.from_numpy(dgamma), torch.from_numpy(dbeta), *ctx.dtypes)
        return dx, dw, db, None, None, None, None, None


# -- torch.compile: the same two passes as custom operators --------------------------------


@torch.library.custom_op("gpubn::batch_norm", mutates_args=())
def _forward_op(
    input: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    training: bool,
    momentum: float,
    eps: float,
    activation: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(y, coef, new_running_mean, new_running_var): an operator with an
    autograd formula may not mutate its inputs, so the kernels update (C,)
    copies of the running statistics (empty when not updated), which
    ``batch_norm`` writes back in place."""
    update = training and running_mean is not None
    if update:
        running_mean, running_var = running_mean.clone(), running_var.clone()
    act = ACTIVATIONS[activation or None]  # "" for none: a plain str in the operator's schema
    y, saved = _forward(input, weight, bias, running_mean, running_var, training, momentum, eps, act)
    coef = saved.call.tensor(saved.coef)
    if not update:
        running_mean, running_var = input.new_empty(0), input.new_empty(0)
    return y, coef, running_mean, running_var


@_forward_op.register_fake
def _(input, weight, bias, running_mean, running_var, training, momentum, eps, activation):
    coef_dtype = torch.float64 if input.dtype == torch.float64 else torch.float32
    coef = input.new_empty((5, input.shape[1]), dtype=coef_dtype)
    if training and running_mean is not None:
        return torch.empty_like(input), coef, torch.empty_like(running_mean), torch.empty_like(running_var)
    return torch.empty_like(input), coef, input.new_empty(0), input.new_empty(0)


@torch.library.custom_op("gpubn::batch_norm_backward", mutates_args=())
def _backward_op(
    grad_output: Tensor, input: Tensor, coef: Tensor, training: bool, activation: str
) -> tuple[Tensor, Tensor, Tensor]:
    """(grad_input, grad_weight, grad_bias) of gpubn::batch_norm."""
    call = _call(input)
    with contextlib.nullcontext() if call.device is None else device_scope(call.device.index):
        saved = _Pass(call, call.view(input), call.array(coef), training, ACTIVATIONS[activation or None])
    return _backward(grad_output, saved)


@_backward_op.register_fake
def _(grad_output, input, coef, training, activation):
    C = input.shape[1]
    return torch.empty_like(input), coef.new_empty(C), coef.new_empty(C)


def _setup_context(ctx, inputs, output):
    input, weight, bias, _, _, training, _, _, activation = inputs
    _, coef, new_mean, new_var = output
    ctx.mark_non_differentiable(coef, new_mean, new_var)
    ctx.save_for_backward(input, coef)
    ctx.training, ctx.activation = training, activation
    ctx.dtypes = (None if weight is None else weight.dtype, None if bias is None else bias.dtype)


def _op_backward(ctx, grad_output, _grad_coef, _grad_mean, _grad_var):
    _no_double_backward()
    input, coef = ctx.saved_tensors
    dx, dgamma, dbeta = torch.ops.gpubn.batch_norm_backward(grad_output, input, coef, ctx.training, ctx.activation)
    return (dx, *_param_grads(dgamma, dbeta, *ctx.dtypes), None, None, None, None, None, None)


torch.library.register_autograd("gpubn::batch_norm", _op_backward, setup_context=_setup_context)


# -- the functional API ------------------------------------------------------------------------


def batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    activation: str | None = None,
) -> Tensor:
    """``torch.nn.functional.batch_norm`` on gpubn's kernels, differentiable.

    Args:
        input: (N, C, *) tensor, float16/bfloat16/float32/float64, CPU or CUDA,
            any memory format (channels-last is read where it is).
        running_mean, running_var: (C,) buffers or None; updated in place when
            training (unbiased variance, ``momentum`` = weight of the new batch);
            required when not training.
        weight, bias: (C,) or None (1 and 0); float32 parameters with float16 or
            bfloat16 input are fine.
        activation: None, "relu", "sigmoid" or "tanh" (gpubn's addition):
            g(batch_norm(...)) in the same elementwise pass.
    Returns:
        A tensor like input (same shape, dtype, device and memory format).
        An empty batch (N = 0) gives an empty tensor and updates nothing, as torch's.
    Raises:
        The exception types torch's raises (RuntimeError for a wrong channel
        count, dtype or device, ValueError for one value per channel in
        training), naming the argument; nothing is updated then.
    """
    _check(input, running_mean, running_var, weight, bias, training)
    act = 0 if activation is None else check_activation(activation)
    if input.numel() == 0:  # an empty batch (N = 0): torch returns an empty tensor, updates nothing
        return _empty_batch(input, weight, bias)
    rest = (running_mean, running_var, bool(training), float(momentum), float(eps))
    if not torch.compiler.is_compiling():
        return _apply(input, weight, bias, (*rest, act))  # running statistics updated in place
    y, _, new_mean, new_var = _forward_op(input, weight, bias, *rest, activation or "")
    if training and running_mean is not None:
        with torch.no_grad():  # in place, as torch's: the buffers stay the same tensors
            running_mean.copy_(new_mean)
            running_var.copy_(new_var)
    return y


_VECTOR_NAMES = ("running_mean", "running_var", "weight", "bias")


def _check(input, running_mean, running_var, weight, bias, training):
    if not isinstance(input, Tensor):
        raise TypeError(f"input: expected a Tensor, got {type(input).__name__}")
    dtype = input.dtype
    if dtype not in _DTYPES:
        # torch raises NotImplementedError (a RuntimeError) for integer and bool input
        error = RuntimeError if dtype.is_floating_point else NotImplementedError
        raise error(f"input: dtype {dtype} is not supported; expected float16, bfloat16, float32 or float64")
    if input.dim() < 2:
        raise ValueError(f"input: expected at least 2 dimensions (N, C, *), got input of size {tuple(input.shape)}")
    C, on_cpu = input.shape[1], input.is_cpu
    shape, first, mixed = (C,), None, False
    vectors = (running_mean, running_var, weight, bias)
    for k, t in enumerate(vectors):
        if t is None:
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"{_VECTOR_NAMES[k]}: expected a Tensor or None, got {type(t).__name__}")
        if t.shape != shape:
            raise RuntimeError(
                f"{_VECTOR_NAMES[k]}: should contain {C} elements (the channels of input), not {tuple(t.shape)}"
            )
        dtype_t = t.dtype
        if dtype_t is not first:
            if dtype_t not in _DTYPES:
                raise RuntimeError(
                    f"{_VECTOR_NAMES[k]}: dtype {dtype_t} is not supported; expected a floating-point tensor"
                )
            mixed, first = first is not None, dtype_t
        if not (on_cpu and t.is_cpu) and t.device != input.device:
            raise RuntimeError(f"{_VECTOR_NAMES[k]}: on {t.device}, input on {input.device}; expected the same device")
    # torch's rule: one dtype, the input's (or float32 for half input)
    if first is not None and (mixed or not (first is dtype or (dtype in _HALF and first is torch.float32))):
        given = sorted({str(t.dtype) for t in vectors if t is not None})
        raise RuntimeError(
            f"weight, bias, running_mean, running_var: dtypes {given}; expected all "
            f"{dtype}" + (" or all torch.float32" if dtype in _HALF else "") + f" for {dtype} input"
        )
    if (running_mean is None) != (running_var is None):
        raise RuntimeError("running_mean, running_var: give both or neither")
    if not training and running_mean is None:
        raise RuntimeError("running_mean, running_var: required when training=False")
    if training and input.numel() > 0 and (C == 0 or input.numel() // C <= 1):
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {input.size()}")


# -- modules --------------------------------------------------------------------------------------


class _GpubnBatchNorm:
    """torch's ``_BatchNorm.forward`` with gpubn's batch_norm: the same
    exponential-average factor, and ``num_batches_tracked`` counted only once
    the call has succeeded (torch counts first)."""

    _recalibration = None  # a list while inside gpubn.recalibrate

    def __init__(self, *args, process_group=None, activation=None, **kwargs):
        super().__init__(*args, **kwargs)
        check_activation(activation)
        if activation is not None and process_group is not None:
            raise ValueError("process_group, activation: a synchronized module has no fused activation yet")
        self.activation = activation
        self.process_group = process_group
        self._comm = None if process_group is None else communicator(process_group)

    def extra_repr(self) -> str:
        more = f", activation={self.activation!r}" if self.activation else ""
        return super().extra_repr() + more

    def _running_snapshot(self):
        count = None if self.num_batches_tracked is None else self.num_batches_tracked.clone()
        return self.running_mean.clone(), self.running_var.clone(), count

    def _restore_running(self, mean, var, count):
        with torch.no_grad():
            self.running_mean.copy_(mean)
            self.running_var.copy_(var)
            if count is not None:
                self.num_batches_tracked.copy_(count)

    def _set_running_stats(self, mean, var):
        """(gpubn.recalibrate) Replace the running statistics, in place."""
        with torch.no_grad():
            self.running_mean.copy_(torch.from_numpy(mean))
            self.running_var.copy_(torch.from_numpy(var))

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        buffers, params = self._buffers, self._parameters  # read once: each attribute costs a lookup
        mean, var, counter = buffers["running_mean"], buffers["running_var"], buffers.get("num_batches_tracked")
        training, track = self.training, self.track_running_stats
        factor = 0.0 if self.momentum is None else self.momentum
        count = training and track and counter is not None
        if count and self.momentum is None:
            factor = 1.0 / float(counter + 1)  # cumulative moving average
        if training and self._comm is not None:  # statistics of every rank's share
            y = _SyncBatchNorm.apply(
                input,
                params["weight"],
                params["bias"],
                mean if track else None,
                var if track else None,
                factor if track else 0.0,
                self.eps,
                self._comm,
            )
        else:
            use_running = not training or track
            bn_training = training or (mean is None and var is None)
            if not use_running:
                mean = var = None
            y = batch_norm(input, mean, var, params["weight"], params["bias"], bn_training, factor, self.eps,
                           self.activation)  # fmt: skip
        if count:
            counter.add_(1)
        if self._recalibration is not None:
            x, axis, _ = _layout(input.detach())
            x = x.float() if x.dtype == torch.bfloat16 else x  # an extra read only while recalibrating
            self._recalibration.append(_moments(_array(x), axis, "cuda" if x.is_cuda else "cpu"))
        return y


class BatchNorm1d(_GpubnBatchNorm, torch.nn.BatchNorm1d):
    """``torch.nn.BatchNorm1d`` on gpubn's kernels: (N, C) or (N, C, L).

    Extra keyword arguments (all gpubn's modules): ``activation`` (None,
    "relu", "sigmoid", "tanh": applied in the same elementwise pass) and
    ``process_group`` (synchronized statistics, CPU tensors)."""


class BatchNorm2d(_GpubnBatchNorm, torch.nn.BatchNorm2d):
    """``torch.nn.BatchNorm2d`` on gpubn's kernels: (N, C, H, W), NCHW or channels-last."""


class BatchNorm3d(_GpubnBatchNorm, torch.nn.BatchNorm3d):
    """``torch.nn.BatchNorm3d`` on gpubn's kernels: (N, C, D, H, W)."""


_REPLACEMENTS = {
    torch.nn.BatchNorm1d: BatchNorm1d,
    torch.nn.BatchNorm2d: BatchNorm2d,
    torch.nn.BatchNorm3d: BatchNorm3d,
}


def replace_batchnorm(module: torch.nn.Module, sync=None) -> torch.nn.Module:
    """Swap every ``torch.nn.BatchNorm1d/2d/3d`` in ``module`` for gpubn's, in place.

    The new modules hold the very same parameter and buffer tensors (an
    optimizer built before the swap keeps working) and the same train/eval
    mode.  Subclasses of torch's modules (which may change forward) and
    ``SyncBatchNorm`` are left alone.  ``LazyBatchNorm*d`` modules are
    replaced once materialized (after a first forward they are plain
    ``BatchNorm*d``); one not yet materialized has no parameters to share, so
    it is left alone with a UserWarning naming it.  ``sync``: a
    torch.distributed process group (or mpi4py communicator) that the new
    modules synchronize their training statistics over (``process_group=``).
    Each replacement is logged at debug level (logger ``gpubn.torch``).
    Returns ``module`` (or its replacement, when ``module`` itself is a
    batch-norm module).

    gpubn's modules run gpubn's kernels from Python, which ``torch.jit.script``
    and ``torch.onnx.export`` cannot trace into: for those, swap them back
    with ``restore_batchnorm``.
    """
    return _replace(module, sync, "")


def restore_batchnorm(module: torch.nn.Module) -> torch.nn.Module:
    """The inverse of ``replace_batchnorm``: every gpubn ``BatchNorm1d/2d/3d``
    in ``module`` becomes torch's, in place, holding the same tensors (for
    ``torch.jit.script``, ``torch.onnx.export`` or torch's own kernels).
    A synchronized gpubn module becomes a plain torch one (torch's
    SyncBatchNorm takes a torch.distributed group; swap it yourself if
    needed), a fused activation raises ValueError (torch's modules have none).
    Returns ``module`` (or its replacement)."""
    back = _TORCH_MODULES.get(type(module))
    if back is not None:
        if module.activation is not None:
            raise ValueError(f"module: a gpubn module with activation={module.activation!r} has no torch equivalent")
        return _swap(module, back)
    for name, child in module.named_children():
        new = restore_batchnorm(child)
        if new is not child:
            setattr(module, name, new)
    return module


def _replace(module, sync, path):
    cls = _REPLACEMENTS.get(type(module))
    if cls is not None:
        _log.debug(
            "replace_batchnorm: %s (%s) -> gpubn.torch.%s", path or "<root>", type(module).__name__, cls.__name__
        )
        return _swap(module, cls, sync)
    if isinstance(module, torch.nn.modules.lazy.LazyModuleMixin) and isinstance(
        module, torch.nn.modules.batchnorm._BatchNorm
    ):
        warnings.warn(
            f"module {path or '<root>'}: {type(module).__name__} is not materialized yet and was not replaced; "
            "run one forward pass first, then call replace_batchnorm",
            UserWarning,
            stacklevel=3,
        )
        return module
    for name, child in module.named_children():
        new = _replace(child, sync, f"{path}.{name}" if path else name)
        if new is not child:
            setattr(module, name, new)
    return module


def _swap(bn, cls, sync=None):
    kwargs = {"process_group": sync} if issubclass(cls, _GpubnBatchNorm) else {}
    new = cls(
        bn.num_features,
        bn.eps,
        bn.momentum,
        bn.affine,
        bn.track_running_stats,
        device="meta",
        dtype=torch.float32,
        **kwargs,
    )
    for name in ("weight", "bias"):
        setattr(new, name, getattr(bn, name))
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        setattr(new, name, getattr(bn, name))
    return new.train(bn.training)


_TORCH_MODULES = {gpubn: torch_cls for torch_cls, gpubn in _REPLACEMENTS.items()}
_log = logging.getLogger("gpubn.torch")


__all__ = ["batch_norm", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "replace_batchnorm", "restore_batchnorm"]
