"""BatchNorm: the layer a training loop holds.  State only; the maths lives in
``gpubn.functional`` and the kernels."""

import numbers
from collections.abc import Mapping

import numpy as np
from numba import cuda

from . import _arrays as _A
from ._arrays import as_numpy, device_view, is_device_array
from ._backend import resolve_backend
from .distributed import SyncCache, batch_norm_backward_sync, batch_norm_forward_sync, communicator
from .functional import batch_norm_backward, batch_norm_forward, moments


class _Rows(Mapping):
    """``params`` / ``grads``: named (C,) rows of one of the layer's packed
    (2, C) buffers.

    Reading gives the row itself (a view an optimizer updates in place).
    Assigning copies the new values into that row, after checking shape and
    dtype, so the layer, its state_dict and every view see them; assigning to
    a name the layer does not have raises KeyError.  Keys cannot be removed.
    """

    def __init__(self, layer, attr: str, what: str):
        self._layer, self._attr, self._what = layer, attr, what

    def _names(self):
        return ("gamma", "beta") if self._layer.affine else ()

    def __getitem__(self, name):
        if name not in self._names():
            raise KeyError(name)
        packed = getattr(self._layer, self._attr)
        if getattr(self, "_views_of", None) is not packed:  # the same view objects until to_device()
            self._views, self._views_of = (packed[0], packed[1]), packed
        return self._views[self._names().index(name)]

    def __iter__(self):
        return iter(self._names())

    def __len__(self):
        return len(self._names())

    def __setitem__(self, name, value):
        if name not in self._names():
            why = "affine=False: no gamma or beta" if self._layer.affine is False else f"keys are {self._names()}"
            raise KeyError(f"{self._what}[{name!r}]: this layer has no such entry ({why})")
        C = self._layer.num_features
        label = f"{self._what}[{name!r}]"
        on_device = is_device_array(value)
        arr = device_view(value) if on_device else np.asarray(value)
        _A.check_float(arr.dtype, label)
        if tuple(arr.shape) != (C,):
            raise ValueError(f"{label}: expected shape ({C},) for num_features={C}, got {tuple(arr.shape)}")
        target = self[name]
        if on_device and not is_device_array(target):
            raise TypeError(f"{label}: a device array cannot be assigned to a layer whose state is on the host")
        _copy_into(target, arr)

    def __delitem__(self, name):
        raise TypeError(f"{self._what}: entries cannot be removed")

    def __repr__(self) -> str:
        return repr(dict(self.items()))


def _rows_property(name: str, doc: str) -> property:
    """``bn.params`` / ``bn.grads``: read-only attributes (their entries are assignable)."""

    def get(self):
        return getattr(self, "_" + name)

    def refuse(self, value):
        raise AttributeError(f'{name}: assign entries (bn.{name}["gamma"] = ...), not the whole mapping')

    return property(get, refuse, doc=doc)


class BatchNorm:
    """Batch normalization over the feature axis, with learnable gamma and beta.

    Follows ``torch.nn.BatchNorm*d``: in training mode the batch's statistics
    normalize and the running statistics are updated (momentum = weight of the
    new batch; ``momentum=None`` = cumulative average over
    ``num_batches_tracked``; unbiased variance); in eval mode the running
    statistics normalize.

    Args:
        num_features: C, the size of the feature axis.
        axis: the feature axis of the inputs (negative allowed).
        eps: added to the variance.  momentum: a finite float (the weight of
            the new batch; usually in [0, 1], any value as torch) or None.
        affine: learn gamma (init 1) and beta (init 0).
        track_running_stats: keep running statistics (else batch statistics
            are used in eval mode too).
        backend: "cpu", "cuda" or None (default backend).
        dtype: "float32" or "float64", the dtype of parameters and statistics
            (float16 inputs use float32).
        sync: None, or an mpi4py communicator / torch.distributed process
            group: in training mode the statistics (and the backward's sums)
            are those of the batch shared by all its ranks (gpubn.distributed);
            every rank must call forward and backward together.
        activation: None, "relu", "sigmoid" or "tanh": the layer computes
            g(BN(x) + residual) in one elementwise pass (see forward).

    State: ``params`` and ``grads`` (mappings of (C,) arrays that an optimizer
    updates in place; assigning an entry copies the new values in),
    ``running_mean``, ``running_var``, ``num_batches_tracked``, ``training``
    (a bool).  They are NumPy arrays; on the CUDA backend they move to the
    device (numba device arrays) at the first device input, or at ``to_device()``,
    and stay there: a training loop on device arrays makes no host round trip.
    """

    def __init__(
        self,
        num_features: int,
        *,
        axis: int = 1,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        backend: str | None = None,
        dtype="float32",
        sync=None,
        activation=None,
    ):
        if isinstance(num_features, bool) or not isinstance(num_features, numbers.Integral) or num_features < 1:
            raise ValueError(f"num_features: expected a positive int, got {num_features!r}")
        if not isinstance(axis, numbers.Integral) or isinstance(axis, bool):
            raise TypeError(f"axis: expected an int, got {type(axis).__name__}")
        try:
            dt = np.dtype(dtype)
        except TypeError:
            raise TypeError(f"dtype: {dtype!r} is not a dtype") from None
        if dt not in (np.float32, np.float64):
            raise TypeError(f"dtype: expected float32 or float64, got {dt}")
        self.num_features = int(num_features)
        self.axis = int(axis)
        self.eps = _A.check_scalar(eps, "eps")
        self.momentum = None if momentum is None else _A.check_momentum(momentum)
        self.affine = _A.check_bool(affine, "affine")
        self.track_running_stats = _A.check_bool(track_running_stats, "track_running_stats")
        self.backend = resolve_backend(backend)
        self.dtype = dt
        self.training = True
        C = self.num_features
        # gamma/beta and their grads are rows of packed (2, C) buffers: kernels
        # write the gradients in place and one array crosses to the device
        self._packed = np.stack([np.ones(C, dt), np.zeros(C, dt)])
        self._packed_grads = np.zeros((2, C), dt)
        self.running_mean = np.zeros(C, dt) if self.track_running_stats else None
        self.running_var = np.ones(C, dt) if self.track_running_stats else None
        self.num_batches_tracked = 0
        self._params = _Rows(self, "_packed", "params")
        self._grads = _Rows(self, "_packed_grads", "grads")
        self._cache = None
        self._recalibration = None  # a list while inside gpubn.recalibrate
        _A.check_activation(activation)
        self.activation = activation
        self._comm = None if sync is None else communicator(sync)
        if self._comm is not None and activation is not None:
            raise ValueError("sync, activation: a synchronized layer has no fused activation yet")
        if self._comm is not None and self.backend != "cpu":
            raise ValueError("sync: synchronized batch norm runs on the CPU backend for now")

    params = _rows_property(
        "params",
        """{"gamma": (C,), "beta": (C,)} (empty when affine=False): update the
        arrays in place, or assign ``bn.params["gamma"] = new`` (copied in).""",
    )
    grads = _rows_property("grads", """{"gamma": (C,), "beta": (C,)}: filled in place by backward().""")

    @property
    def on_device(self) -> bool:
        return is_device_array(self._packed)

    def to_device(self) -> "BatchNorm":
        """Move parameters, gradients and running statistics to the GPU (CUDA
        backend only).  Hand ``params`` to an optimizer after this call."""
        if self.backend != "cuda":
            raise ValueError(f"backend: to_device() needs the 'cuda' backend, this layer uses {self.backend!r}")
        if not self.on_device:
            self._packed = cuda.to_device(self._packed)
            self._packed_grads = cuda.to_device(self._packed_grads)
            if self.track_running_stats:
                self.running_mean = cuda.to_device(self.running_mean)
                self.running_var = cuda.to_device(self.running_var)
        return self

    # -- modes ----------------------------------------------------------------

    @property
    def training(self) -> bool:
        return self._training

    @training.setter
    def training(self, mode):
        self._training = _A.check_bool(mode, "training")

    def train(self, mode: bool = True) -> "BatchNorm":
        self._training = _A.check_bool(mode, "mode")
        return self

    def eval(self) -> "BatchNorm":
        return self.train(False)

    # -- passes ---------------------------------------------------------------

    def forward(self, x, mask=None, residual=None):
        """y = gamma * (x - mean) / sqrt(var + eps) + beta; x's shape and dtype.

        Batch statistics in training mode (or without running statistics),
        running statistics in eval mode.  With ``activation`` and/or a
        ``residual`` (x's shape): y = g(BN(x) + residual); backward() then
        returns (dx, dresidual) when a residual was given.  ``mask`` (bool,
        x's shape without the feature axis, e.g. (N, L) for (N, C, L)): the
        batch statistics and the running statistics come from its True
        positions only; every position is normalized, and backward() treats
        the others as padding (never in its sums, dx = 0 there; see
        batch_norm_forward).
        """
        sync = self._comm is not None and self.training  # the batch shared by every rank of ``sync``
        if sync and residual is not None:
            raise ValueError("residual: a synchronized layer takes no residual yet")
        if sync and mask is not None:
            raise ValueError("mask: a synchronized layer takes no mask yet")
        shape = x.shape if hasattr(x, "shape") else np.shape(x)
        # (a synchronized layer's ranks check x together: batch_norm_forward_sync)
        if not sync and len(shape) > 0 and shape[_A.check_axis(self.axis, len(shape))] != self.num_features:
            raise ValueError(
                f"x: {shape[_A.check_axis(self.axis, len(shape))]} features on axis {self.axis} "
                f"(shape {tuple(shape)}), this layer has num_features={self.num_features}"
            )
        if self.backend == "cuda" and not self.on_device and is_device_array(x):
            self.to_device()
        update = self.training and self.track_running_stats
        momentum = self.momentum
        if update and momentum is None:
            momentum = 1.0 / (self.num_batches_tracked + 1)
        gamma = self._packed[0] if self.affine else None
        beta = self._packed[1] if self.affine else None
        tracked = self.track_running_stats
        common = dict(
            axis=self.axis,
            eps=self.eps,
            running_mean=self.running_mean if tracked else None,
            running_var=self.running_var if tracked else None,
            momentum=momentum if update else 0.0,
            backend=self.backend,
        )
        if sync:
            y, cache = batch_norm_forward_sync(x, gamma, beta, self._comm, num_features=self.num_features, **common)
        else:
            batch_stats = self.training or not tracked
            y, cache = batch_norm_forward(
                x, gamma, beta, training=batch_stats, activation=self.activation, residual=residual, mask=mask, **common
            )
        self._cache = cache
        if self._recalibration is not None:
            self._recalibration.append(moments(x, self.axis, self.backend, mask))
        if update:
            self.num_batches_tracked += 1
        return y

    __call__ = forward

    def backward(self, dy):
        """dx for the last forward; fills ``grads`` (when affine) in place.

        The last forward's x is read again here, not a copy of it: x must not
        change between forward and backward (params may: the gradient is that
        of the function the forward computed).
        """
        if self._cache is None:
            raise ValueError("dy: backward() called before any forward()")
        inp = self._cache.inp
        grads = self._packed_grads
        in_place = grads.dtype == inp.acc and self.on_device == (inp.backend == "cuda")
        out = (None, grads[0], grads[1]) if in_place else None  # the kernels write the gradients in place
        backward = batch_norm_backward_sync if isinstance(self._cache, SyncCache) else batch_norm_backward
        dx, dgamma, dbeta, *dresidual = backward(dy, self._cache, out=out)
        if self.affine and not in_place:
            self._store_grads(dgamma, dbeta)
        return (dx, *dresidual) if dresidual else dx

    def _store_grads(self, dgamma, dbeta):
        # the kernels wrote a separate buffer (other dtype or side): copy in
        _copy_into(self._packed_grads[0], as_numpy(dgamma))
        _copy_into(self._packed_grads[1], as_numpy(dbeta))

    def _running_snapshot(self):
        return as_numpy(self.running_mean).copy(), as_numpy(self.running_var).copy(), self.num_batches_tracked

    def _restore_running(self, mean, var, count):
        self._set_running_stats(mean, var)
        self.num_batches_tracked = count

    def _set_running_stats(self, mean, var):
        """(gpubn.recalibrate) Replace the running statistics, in place."""
        _copy_into(self.running_mean, np.asarray(mean))
        _copy_into(self.running_var, np.asarray(var))

    # -- state ----------------------------------------------------------------

    def _expected_keys(self):
        keys = []
        if self.affine:
            keys += ["gamma", "beta"]
        if self.track_running_stats:
            keys += ["running_mean", "running_var", "num_batches_tracked"]
        return keys

    def state_dict(self) -> dict:
        """Plain dict of NumPy copies (and the int counter)."""
        state = {}
        if self.affine:
            state["gamma"] = as_numpy(self._packed[0]).copy()
            state["beta"] = as_numpy(self._packed[1]).copy()
        if self.track_running_stats:
            state["running_mean"] = as_numpy(self.running_mean).copy()
            state["running_var"] = as_numpy(self.running_var).copy()
            state["num_batches_tracked"] = int(self.num_batches_tracked)
        return state

    def load_state_dict(self, state: dict) -> None:
        """Load a state_dict.  Wrong keys, shapes or values raise ValueError
        (TypeError for wrong types) and change nothing.

        gpubn's keys (gamma, beta, running_mean, running_var,
        num_batches_tracked) or torch's (``torch.nn.BatchNorm*d.state_dict()``:
        weight, bias, ...; tensors on any device and of any float dtype, the
        counter a 0-d tensor; a torch checkpoint without num_batches_tracked,
        as older torch versions saved, loads with the counter at 0)."""
        if not isinstance(state, dict):
            raise TypeError(f"state: expected a dict, got {type(state).__name__}")
        state = _gpubn_names(state, self.track_running_stats)
        expected = self._expected_keys()
        if sorted(state) != sorted(expected):
            missing = sorted(set(expected) - set(state))
            extra = sorted(set(state) - set(expected))
            raise ValueError(f"state: missing keys {missing}, unexpected keys {extra}")
        arrays = {}
        for key in expected:
            if key == "num_batches_tracked":
                continue
            value = state[key]
            arr = as_numpy(value)
            if arr.dtype.kind != "f":
                raise TypeError(f"state: {key} has dtype {arr.dtype}, expected floats")
            if arr.shape != (self.num_features,):
                raise ValueError(f"state: {key} has shape {arr.shape}, expected ({self.num_features},)")
            if key == "running_var" and np.any(arr < 0):
                raise ValueError("state: running_var has negative entries")
            arrays[key] = arr.astype(self.dtype)
        count = state.get("num_batches_tracked", 0)
        if isinstance(count, np.ndarray) and count.shape == ():
            count = count.item()
        if isinstance(count, bool) or not isinstance(count, numbers.Integral) or count < 0:
            raise ValueError(f"state: num_batches_tracked must be a non-negative int, got {count!r}")
        # -- validated: copy in place, keeping the arrays optimizers hold --
        targets = {
            "gamma": self._packed[0] if self.affine else None,
            "beta": self._packed[1] if self.affine else None,
            "running_mean": self.running_mean,
            "running_var": self.running_var,
        }
        for key, arr in arrays.items():
            _copy_into(targets[key], arr)
        if self.track_running_stats:
            self.num_batches_tracked = int(count)

    def __repr__(self) -> str:
        return (
            f"BatchNorm({self.num_features}, axis={self.axis}, eps={self.eps:g}, momentum={self.momentum}, "
            f"affine={self.affine}, track_running_stats={self.track_running_stats}, backend={self.backend!r}, "
            f"activation={self.activation!r}, "
            f"dtype='{self.dtype}', training={self.training}{', on device' if self.on_device else ''})"
        )


def _copy_into(target, values):
    """Write (C,) values into the layer's own (C,) array ``target`` (host or
    device), in place, in target's dtype (NumPy casts float32 <-> float64)."""
    if not is_device_array(target):
        target[...] = values
    elif is_device_array(values) and values.dtype == target.dtype:
        target.copy_to_device(values)
    else:
        target.copy_to_device(np.ascontiguousarray(as_numpy(values), target.dtype))


#: torch.nn.BatchNorm*d's state_dict keys that gpubn names otherwise
_TORCH_KEYS = {"weight": "gamma", "bias": "beta"}


def _gpubn_names(state: dict, tracked: bool) -> dict:
    """A state dict under gpubn's key names: torch's ``weight``/``bias``
    renamed; a torch state without num_batches_tracked gets 0 (as torch's own
    load does for checkpoints saved before the counter existed)."""
    if not any(k in state for k in _TORCH_KEYS):
        return state
    clash = sorted(k for k, v in _TORCH_KEYS.items() if k in state and v in state)
    if clash:
        raise ValueError(f"state: both torch's and gpubn's names for the same entry: {clash}")
    renamed = {_TORCH_KEYS.get(k, k): v for k, v in state.items()}
    if tracked and "running_mean" in renamed and "num_batches_tracked" not in renamed:
        renamed["num_batches_tracked"] = 0
    count = renamed.get("num_batches_tracked")
    if type(count).__module__.startswith("torch"):
        renamed["num_batches_tracked"] = as_numpy(count)
    return renamed


__all__ = ["BatchNorm"]
