"""Standardizer: input normalization fitted on training data (the course's
"normalizing inputs to speed up learning"), on the batch-norm kernels.

    fit:        mean_ = mean(X), var_ = var(X)      per feature (biased variance)
    transform:  Z = (X - mean_) / scale_,  scale_ = sqrt(var_)

No epsilon: every feature with a spread comes out at unit variance, however
small the spread.  A feature whose variance is zero, or is no larger than the
rounding error of computing it (scikit-learn's test, from Chan, Golub and
LeVeque's error bound: ``var_ <= n eps var_ + (n eps mean_)**2`` with float64
eps), is constant: ``scale_ = 1`` and it is only centered.  (The course slide's
``X /= sigma**2`` is a known erratum: divide by the standard deviation.)
``partial_fit`` merges chunk statistics exactly by Chan's formula, so fitting
chunk by chunk gives the statistics of the whole.

The interface is scikit-learn's ``StandardScaler`` (``fit(X, y=None)``,
``get_params`` / ``set_params``, ``n_features_in_``), so that ``sklearn.base.clone``,
``Pipeline`` and ``cross_val_score`` take it; scikit-learn is not needed.
"""

import numbers

import numpy as np

from ._arrays import canonical_shape, check_axis, check_bool, host_copy, is_device_array, read_input
from ._backend import resolve_backend
from .functional import normalize
from .moments import Moments, moments

_PARAMS = ("axis", "with_mean", "with_std", "backend")


class Standardizer:
    """Zero mean, unit variance per feature, fitted on training data only.

    Args:
        axis: the feature axis of the data (statistics run over all others);
            1 for scikit-learn's (n_samples, n_features).
        with_mean: subtract ``mean_`` in transform (False: only scale).
        with_std: divide by ``scale_`` in transform (False: only center).
        backend: "cpu", "cuda" or None (the default backend, chosen per call).

    Input: float16/32/64 arrays of any shape (NumPy, or device arrays on the
    CUDA backend); integer and bool input is converted to float64, as
    scikit-learn does.  Results have the (converted) input's shape and dtype.

    Fitting computes in float64 whatever the input dtype (fit runs once: a
    device array is copied to the host for it, on its stream).  NaN values are
    left out of the statistics, feature by feature, and stay NaN in transform
    (scikit-learn's behaviour); +-inf in fitted data raises ValueError.

    Attributes after fitting: ``mean_``, ``var_`` ((C,) float64 NumPy arrays,
    biased variance; computed whatever with_mean/with_std say), ``scale_``
    ((C,) float64, 1 for constant features; None when with_std=False),
    ``n_samples_seen_`` (values per feature seen so far: an int, or an (C,)
    int64 array when NaNs made the features' counts differ),
    ``n_features_in_`` (C).  Transforming before fitting raises
    scikit-learn's ``NotFittedError`` (a ValueError) when scikit-learn is installed.
    """

    def __init__(self, *, axis: int = 1, with_mean: bool = True, with_std: bool = True, backend: str | None = None):
        # stored exactly as given: scikit-learn's clone() checks identity
        self.axis = axis
        self.with_mean = with_mean
        self.with_std = with_std
        self.backend = backend
        _check_params(axis, with_mean, with_std, backend)

    # -- scikit-learn's estimator protocol ---------------------------------------

    def get_params(self, deep: bool = True) -> dict:
        """The constructor arguments, as given."""
        return {name: getattr(self, name) for name in _PARAMS}

    def set_params(self, **params) -> "Standardizer":
        """Change constructor arguments (validated together; nothing changes on error)."""
        unknown = sorted(set(params) - set(_PARAMS))
        if unknown:
            raise ValueError(f"{unknown[0]}: not a parameter of Standardizer; valid parameters are {list(_PARAMS)}")
        merged = {**self.get_params(), **params}
        _check_params(**merged)
        for name, value in params.items():
            setattr(self, name, value)
        return self

    # -- fitting ------------------------------------------------------------------

    def fit(self, X, y=None) -> "Standardizer":
        """Statistics of X alone (forgets earlier fits).  y is ignored.

        X may be a Dask array: each block's moments are computed in a Dask
        task (the CPU kernels inside it) and merged exactly."""
        X = _as_data(X)
        self._set_stats(self._chunk_moments(X))
        return self

    def partial_fit(self, X, y=None) -> "Standardizer":
        """Merge X's statistics into those seen so far (exact, Chan's formula;
        per-feature counts where values are NaN).  y is ignored."""
        X = _as_data(X)
        if getattr(self, "mean_", None) is None:
            return self.fit(X)
        self._check_features(X)
        seen = Moments(self.n_samples_seen_, self.mean_, self.var_ * self.n_samples_seen_)
        self._set_stats(seen.merge(self._chunk_moments(X)))
        return self

    def _chunk_moments(self, X) -> Moments:
        """X's per-feature Moments in float64, NaN values left out."""
        backend = resolve_backend(self.backend)
        _check_params(self.axis, self.with_mean, self.with_std, self.backend)
        axis = check_axis(self.axis, len(_shape(X)))
        if _is_dask(X):
            m = _dask_moments(X, axis)
        else:
            m = feature_moments(_host_data(X, backend), axis)
        if not np.any(m.count):
            raise ValueError(f"X: empty input of shape {tuple(_shape(X))} (or every value NaN)")
        return m

    def _set_stats(self, m: Moments):
        count = m.count.astype(np.int64)
        # scikit-learn's convention: an int, or a per-feature array where NaNs made the counts differ
        self.n_samples_seen_ = int(count[0]) if np.all(count == count[0]) else count
        self.mean_ = m.mean
        with np.errstate(invalid="ignore", divide="ignore"):
            self.var_ = np.where(m.count > 0, m.m2 / np.maximum(m.count, 1), np.nan)
        self.n_features_in_ = m.mean.shape[0]
        self.scale_ = _scale(self.var_, self.mean_, m.count) if self.with_std else None

    # -- applying -----------------------------------------------------------------

    def transform(self, X):
        """Z = (X - mean_) / scale_ (each step as with_mean / with_std say).
        A Dask array in gives a lazy Dask array out."""
        X = self._check_features(_as_data(X))
        C = self.n_features_in_
        mean = self.mean_ if self.with_mean else np.zeros(C)
        gamma = 1.0 / self.scale_ if self.with_std else np.ones(C)
        if _is_dask(X):
            return _dask_affine(X, self.axis, mean, np.ones(C), gamma, np.zeros(C), self._backend())
        # normalize's (x - mean) / sqrt(var + eps) * gamma with var = 1, eps = 0:
        # 1 / scale_ as gamma, not scale_**2 as var, which would underflow in
        # float32 for features with std below 1e-19
        return normalize(X, mean, np.ones(C), gamma, None, eps=0.0, axis=self.axis, backend=self._backend())

    def inverse_transform(self, Z):
        """X = Z * scale_ + mean_ (each step as with_mean / with_std say)."""
        Z = self._check_features(_as_data(Z, "Z"), "Z")
        C = self.n_features_in_
        scale = self.scale_ if self.with_std else np.ones(C)
        mean = self.mean_ if self.with_mean else np.zeros(C)
        if _is_dask(Z):
            return _dask_affine(Z, self.axis, np.zeros(C), np.ones(C), scale, mean, self._backend())
        return normalize(Z, np.zeros(C), np.ones(C), scale, mean, eps=0.0, axis=self.axis, backend=self._backend())

    def fit_transform(self, X, y=None):
        """fit(X), then transform(X).  y is ignored.  (A Dask X is computed
        once for the statistics; the result stays lazy.)"""
        X = _as_data(X)
        return self.fit(X).transform(X)

    # -- helpers --------------------------------------------------------------------

    def _backend(self) -> str:
        _check_params(self.axis, self.with_mean, self.with_std, self.backend)
        return resolve_backend(self.backend)

    def _check_features(self, X, name: str = "X"):
        if getattr(self, "mean_", None) is None:
            raise _not_fitted(f"{name}: this Standardizer is not fitted yet; call fit() or partial_fit() first")
        shape = _shape(X)
        C = shape[check_axis(self.axis, len(shape))]
        if C != self.n_features_in_:
            raise ValueError(
                f"{name}: {C} features (axis {self.axis} of shape {shape}), "
                f"the standardizer was fitted on {self.n_features_in_}"
            )
        return X

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={getattr(self, k)!r}" for k in _PARAMS)
        fitted = f"; fitted on {self.n_samples_seen_} samples" if getattr(self, "mean_", None) is not None else ""
        return f"Standardizer({args}){fitted}"


def _check_params(axis, with_mean, with_std, backend):
    if isinstance(axis, (bool, np.bool_)) or not isinstance(axis, numbers.Integral):
        raise TypeError(f"axis: expected an int, got {type(axis).__name__}")
    check_bool(with_mean, "with_mean")
    check_bool(with_std, "with_std")
    resolve_backend(backend)


def _not_fitted(message: str) -> ValueError:
    """scikit-learn's NotFittedError (a ValueError) when scikit-learn is installed."""
    try:
        from sklearn.exceptions import NotFittedError
    except ImportError:
        return ValueError(message)
    return NotFittedError(message)


def _scale(var, mean, n):
    """sqrt(var), 1 for features indistinguishable from constant (scikit-learn's test)."""
    eps = np.finfo(np.float64).eps
    constant = var <= n * eps * var + (n * mean * eps) ** 2
    return np.where(constant, 1.0, np.sqrt(var))


def feature_moments(X: np.ndarray, axis: int) -> Moments:
    """Per-feature Moments of a host array in float64, NaN values left out
    (per-feature counts, as scikit-learn's ``allow_nan``); +-inf refused.

    Without NaN: ``gpubn.moments`` (the CPU statistics kernels, every value
    widened to float64).  With NaN: two float64 passes over the values that
    are not NaN (mean, then the squared deviations from it)."""
    x = np.asarray(X, np.float64)
    if np.isinf(x).any():
        raise ValueError("X: contains infinity; NaN values are left out of the statistics, +-inf are refused")
    missing = np.isnan(x)
    if not missing.any():
        return moments(x, axis, "cpu")
    outer, C, inner = canonical_shape(x.shape, axis)
    keep = ~missing.reshape(outer, C, inner)
    v = np.where(keep, x.reshape(outer, C, inner), 0.0)
    count = keep.sum(axis=(0, 2))
    mean = v.sum(axis=(0, 2)) / np.maximum(count, 1)
    d = np.where(keep, v - mean[None, :, None], 0.0)
    shift = d.sum(axis=(0, 2)) / np.maximum(count, 1)  # the first mean's rounding, corrected
    m2 = (d * d).sum(axis=(0, 2)) - shift * shift * count
    return Moments(count, mean + shift, np.maximum(m2, 0.0))


def _host_data(X, backend: str) -> np.ndarray:
    """X's values on the host (a device array copied once, on its stream)."""
    return host_copy(read_input(X, "X", backend))


def _is_dask(X) -> bool:
    return type(X).__module__.startswith("dask") and hasattr(X, "to_delayed")


def _block_moments(block, axis):
    """(3, C_block) moments of one Dask block (runs inside a Dask task)."""
    return feature_moments(np.asarray(block), axis).to_array()


def _dask_moments(X, axis):
    """Moments of a Dask array: one task per block, merged exactly per channel block."""
    import dask

    blocks = X.to_delayed()
    task = dask.delayed(_block_moments, pure=True)
    parts = {}
    for idx in np.ndindex(blocks.shape):
        parts.setdefault(idx[axis], []).append(task(blocks[idx], axis))
    (computed,) = dask.compute(parts)
    merged = [Moments.merge_all(np.stack(computed[j])) for j in sorted(computed)]
    return Moments(*(np.concatenate([getattr(m, f) for m in merged]) for f in ("count", "mean", "m2")))


def _affine_block(block, axis, mean, var, gamma, beta, backend, block_info=None):
    start, stop = block_info[0]["array-location"][axis]
    sl = slice(start, stop)
    return normalize(block, mean[sl], var[sl], gamma[sl], beta[sl], eps=0.0, axis=axis, backend=backend)


def _dask_affine(X, axis, mean, var, gamma, beta, backend):
    """normalize() block by block, lazily."""
    return X.map_blocks(_affine_block, check_axis(axis, X.ndim), mean, var, gamma, beta, backend, dtype=X.dtype)


def _as_data(X, name: str = "X"):
    """Device and Dask arrays as they are; anything else as a NumPy array,
    integer and bool data converted to float64 (as scikit-learn does)."""
    if _is_dask(X):
        return X.astype(np.float64) if X.dtype.kind in "biu" else X
    if is_device_array(X):
        return X
    try:
        arr = np.asarray(X)
    except Exception as exc:  # ragged lists and the like
        raise TypeError(f"{name}: cannot be read as an array ({exc})") from None
    if arr.dtype.kind in "biu":
        arr = arr.astype(np.float64)
    return arr


def _shape(X) -> tuple:
    """X's shape, also for a bare ``__cuda_array_interface__`` object."""
    if hasattr(X, "shape"):
        return tuple(X.shape)
    return tuple(X.__cuda_array_interface__["shape"])


__all__ = ["Standardizer"]
