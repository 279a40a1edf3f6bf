"""Plans: everything a call's shape decides, decided once (design.md 4.3).

A call's work splits into what depends only on its *shape* -- backend, the
canonical ``(outer, C, inner)``, dtype, layout, device -- and what depends on
its *values* (pointers, eps, momentum).  ``plan_for`` builds a plan on the
first call of a shape and caches it; every later call of that shape only runs
it.  A plan holds the choices:

- CPU: the access regime (inner > 1, or channels contiguous), the fold of
  narrow rows (``common.fold_rows``), the serial or parallel variant of each
  op's driver (one compiled call per op: ``normalize.forward_*_cpu``,
  ``backward.backward_*_cpu``);
- CUDA: one launch per pass (a block per channel: the reduction and the
  elementwise pass together) or the split passes (``common.one_pass``).

Every op takes the canonical views of its arrays (the backend's arrays: NumPy
on the CPU, numba device arrays on CUDA; on the CPU also views already in the
plan's ``kernel_shape``) and writes its outputs in place:

    forward_train(x, mask, coef, gamma, beta, rmean, rvar, eps, momentum, update, act, z, y)
    forward_eval(x, mean, var, gamma, beta, eps, coef, act, z, y)
    backward(dy, x, z, mask, coef, training, bcoef, dgamma, dbeta, act, dx, dz)

``act`` is the activation's code (``activation.ACTIVATIONS``, 0: none; the
plan hands the kernels None for none, as for every absent input), z/y/dz None
where absent, ``mask`` a ``Mask`` or None (training only).  CUDA ops also
take the caller's ``stream`` and ``scratch`` allocator.
"""

import threading
from typing import NamedTuple

import numpy as np

from . import common, normalize
from .activation import CUDA_CODES, TOKENS
from .backward import backward_channels_cpu, backward_inner_cpu, launch_backward_cuda
from .common import PARALLEL_MIN_ELEMENTS, fold_factor
from .normalize import launch_affine_coefficients_cuda, launch_scale_shift_cuda
from .stats import launch_stats_cuda


class Mask(NamedTuple):
    """A validated mask over the (outer, inner) positions: which give the statistics."""

    view: object  # (outer, inner) bool, on the backend's side
    count: int  # True positions: the values per channel the statistics come from
    origin: int  # flat index (o * inner + i) of the first True position (the CUDA kernels' reference value)
    rows: object  # (CPU, inner == 1) int64 indices of the True rows, else None


class CPUPlan:
    """The CPU drivers and views of one call shape."""

    def __init__(self, shape3, dtype, contiguous: bool):
        outer, C, inner = shape3
        self.shape3 = shape3
        self.inner = inner > 1
        self.half = np.dtype(dtype) == np.float16  # read as its bits (``half.bits``)
        parallel = outer * C * inner >= PARALLEL_MIN_ELEMENTS
        if self.inner:
            self._train = normalize.forward_train_inner_cpu.entry(parallel)
            self._eval = normalize.forward_eval_inner_cpu.entry(parallel)
            self._backward = backward_inner_cpu.entry(parallel)
        else:
            self._train = normalize.forward_train_channels_cpu.entry(parallel)
            self._eval = normalize.forward_eval_channels_cpu.entry(parallel)
            self._backward = backward_channels_cpu.entry(parallel)
        fold = contiguous and not self.inner and outer * C >= common.FOLD_MIN
        self.fold = fold_factor(outer, C) if fold else 1
        self.folded = (outer // self.fold, self.fold * C)
        #: the drivers' view of an array: (outer, C) where inner == 1 (the
        #: compiler then knows the channels are contiguous), else (outer, C, inner)
        self.kernel_shape = shape3 if self.inner else (outer, C)
        self.count = float(outer * inner)  # values per channel without a mask

    def _views(self, *arrays) -> list:
        """The drivers' views of (outer, C, inner) arrays, or of arrays
        already in ``kernel_shape`` (None stays None); float16 as its bits.
        The arrays of one call are all of one kind: the first one's tells
        (``_direct``) whether any needs a view."""
        views = []
        for a in arrays:
            if a is not None:
                if self.half and a.dtype == np.float16:
                    a = a.view(np.uint16)
                if a.ndim == 3 and not self.inner:
                    a = a[:, :, 0]
            views.append(a)
        return views

    def _direct(self, a) -> bool:
        """Whether the arrays of a call whose first one is ``a`` are the drivers' views already."""
        return not self.half and a.ndim == len(self.kernel_shape)

    def forward_train(self, x, mask, coef, gamma, beta, rmean, rvar, eps, momentum, update, act, z, y):
        if not self._direct(x):
            x, z, y = self._views(x, z, y)
        if self.inner:
            m = None if mask is None else mask.view
            self._train(x, m, coef, gamma, beta, rmean, rvar, eps, momentum, update, TOKENS[act], z, y)
            return
        # x is C-contiguous wherever the plan folds (``contiguous``)
        xf, rows = (x.reshape(self.folded) if self.fold > 1 else x, None) if mask is None else (x, mask.rows)
        self._train(x, xf, rows, coef, gamma, beta, rmean, rvar, eps, momentum, update, TOKENS[act], z, y)

    def forward_eval(self, x, mean, var, gamma, beta, eps, coef, act, z, y):
        if not self._direct(x):
            x, z, y = self._views(x, z, y)
        self._eval(x, mean, var, gamma, beta, eps, coef, TOKENS[act], z, y)

    def backward(self, dy, x, z, mask, coef, training, bcoef, dgamma, dbeta, act, dx, dz):
        n = self.count if mask is None else float(mask.count)
        if not self._direct(dy):
            dy, x, z, dx, dz = self._views(dy, x, z, dx, dz)
        if self.inner:
            m = None if mask is None else mask.view
            self._backward(dy, x, z, m, coef, training, n, bcoef, dgamma, dbeta, TOKENS[act], dx, dz)
            return
        rows = None if mask is None else mask.view[:, 0]
        folded = (dy, x, z)  # folded where every one is C-contiguous (a gradient may not be)
        if rows is None and self.fold > 1 and dy.flags.c_contiguous and (z is None or z.flags.c_contiguous):
            f = self.folded
            folded = (dy.reshape(f), x.reshape(f), None if z is None else z.reshape(f))
        args = (coef, training, n, bcoef, dgamma, dbeta, TOKENS[act], dx, dz)
        self._backward(dy, x, z, *folded, rows, *args)


class CUDAPlan:
    """The CUDA launches of one call shape (``common.launches``): one launch
    per pass where a channel fits a block (``common.one_pass``), else the
    split passes."""

    def __init__(self, shape3, dtype):
        self.shape3 = shape3
        self.onepass = common.one_pass(shape3, np.dtype(dtype).itemsize)
        self.launch = common.launches(shape3, self.onepass)

    def forward_train(
        self, x, mask, coef, gamma, beta, rmean, rvar, eps, momentum, update, act, z, y, stream=0, scratch=None
    ):
        m, origin = (None, 0) if mask is None else (mask.view, mask.origin)
        args = (x, coef, gamma, beta, rmean, rvar, eps, momentum, update, m, origin, stream, scratch)
        launch_stats_cuda(*args, CUDA_CODES[act], z, y, self.launch)
        if y is not None and not self.onepass:
            launch_scale_shift_cuda(x, coef, y, CUDA_CODES[act], z, stream, self.launch)

    def forward_eval(self, x, mean, var, gamma, beta, eps, coef, act, z, y, stream=0, scratch=None):
        launch_affine_coefficients_cuda(mean, var, gamma, beta, eps, coef, stream=stream)
        launch_scale_shift_cuda(x, coef, y, CUDA_CODES[act], z, stream, self.launch)

    def backward(self, dy, x, z, mask, coef, training, bcoef, dgamma, dbeta, act, dx, dz, stream=0, scratch=None):
        m, count = (None, None) if mask is None else (mask.view, mask.count)
        args = (dy, x, coef, training, bcoef, dgamma, dbeta, dx, m, count, CUDA_CODES[act], z, dz)
        launch_backward_cuda(*args, stream, scratch, self.launch)


_plans = {}
_lock = threading.Lock()

#: The most call shapes a cache of them keeps (``remember``).
MAX_SHAPES = 4096


def remember(cache: dict, key, value):
    """``cache[key] = value``, the cache first emptied when it holds
    MAX_SHAPES entries: a process that meets ever new shapes (a server of
    variable-length inputs) would otherwise grow by 1.5-2.7 KB a shape for
    as long as it runs.  A forgotten shape is planned again when it returns."""
    if len(cache) >= MAX_SHAPES:
        cache.clear()
    cache[key] = value
    return value


def clear():
    """Forget every plan (tests that change a module-level choice: block
    shapes, SM counts, the one-launch limit, or spy on kernels)."""
    with _lock:
        _plans.clear()
        for forget in forgetters:
            forget()


#: callbacks of the caches that hold plans (gpubn.functional's shapes)
forgetters = []


def plan_for(backend: str, shape3: tuple, dtype, contiguous: bool = True, device: int = 0):
    """The plan of a call shape, built on the first call (thread-safe).

    ``contiguous``: the CPU input's (outer, C) view is C-contiguous (narrow
    rows can then be folded); ``device``: the CUDA device ordinal (launch
    configurations depend on its SM count)."""
    key = (backend, shape3, dtype, contiguous, device)
    plan = _plans.get(key)
    if plan is None:
        plan = CPUPlan(shape3, dtype, contiguous) if backend == "cpu" else CUDAPlan(shape3, dtype)
        with _lock:
            remember(_plans, key, plan)
    return plan
