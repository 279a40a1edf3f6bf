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
from .functional import moments, normalize
from .moments import Moments

try:  # a scikit-learn estimator where scikit-learn is installed (it is not required)
    from sklearn.base import BaseEstimator, OneToOneFeatureMixin, TransformerMixin
    from sklearn.exceptions import NotFittedError
    from sklearn.utils.validation import FLOAT_DTYPES, _check_sample_weight, validate_data
except ImportError:  # pragma: no cover - scikit-learn is in the test extra
    BaseEstimator = None

_PARAMS = ("axis", "with_mean", "with_std", "copy", "backend")


class _Protocol:
    """scikit-learn's estimator protocol (get_params / set_params, a repr), for
    when scikit-learn is not installed."""

    def get_params(self, deep: bool = True) -> dict:
        """The constructor arguments, as given."""
        return {name: getattr(self, name) for name in _PARAMS}

    def set_params(self, **params) -> "Standardizer":
        """Change constructor arguments (checked when fitting, as scikit-learn does)."""
        unknown = sorted(set(params) - set(_PARAMS))
        if unknown:
            raise ValueError(f"{unknown[0]}: not a parameter of Standardizer; valid parameters are {list(_PARAMS)}")
        for name, value in params.items():
            setattr(self, name, value)
        return self

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={getattr(self, k)!r}" for k in _PARAMS)
        return f"Standardizer({args})"


_BASES = (_Protocol,) if BaseEstimator is None else (OneToOneFeatureMixin, TransformerMixin, BaseEstimator)


class Standardizer(*_BASES):
    """Zero mean, unit variance per feature, fitted on training data only.

    Args:
        axis: the feature axis of the data (statistics run over all others);
            1 for scikit-learn's (n_samples, n_features).
        with_mean: subtract ``mean_`` in transform (False: only scale).
        with_std: divide by ``scale_`` in transform (False: only center).
        copy: False lets transform write its result into X itself where X is
            a writable float NumPy array of the result's dtype (scikit-learn's ``copy``).
        backend: "cpu", "cuda" or None (the default backend, chosen per call).

    The arguments are stored as given and checked when fitting (scikit-learn's
    convention: ``clone`` and ``set_params`` never raise).

    Input: float16/32/64 arrays of any shape (NumPy, or device arrays on the
    CUDA backend, or Dask arrays); integer and bool input is converted to
    float64, as scikit-learn does.  Results have the (converted) input's
    shape and dtype, in the input's library.  With scikit-learn installed,
    2-D input with ``axis=1`` goes through scikit-learn's own validation
    (lists, DataFrames with their feature names, sparse CSR/CSC matrices,
    its error messages), and the Standardizer passes scikit-learn's
    ``check_estimator`` (tests/test_sklearn.py).

    Fitting computes in float64 whatever the input dtype (fit runs once: a
    device array is copied to the host for it, on its stream).  NaN values are
    left out of the statistics, feature by feature, and stay NaN in transform
    (scikit-learn's behaviour); +-inf in fitted data raises ValueError.
    ``sample_weight`` ((n_samples,) for 2-D data) weights the statistics;
    weighted fits merge in ``partial_fit`` like the rest.  Sparse input
    (``with_mean=False`` only, as scikit-learn): the moments of the stored
    values merged with the implicit zeros; transform scales the stored values.

    Attributes after fitting, as StandardScaler's: ``mean_`` ((C,) float64;
    None when neither with_mean nor with_std, and for sparse input), ``var_``
    ((C,) float64 biased variance; None when with_std=False), ``scale_``
    ((C,) float64, 1 for constant features; None when with_std=False), ``n_samples_seen_`` (values per
    feature seen so far: an int, or an (C,) int64 array when NaNs made the
    features' counts differ, or the float sum of the sample weights),
    ``n_features_in_`` (C), ``feature_names_in_`` (from a DataFrame).
    Transforming before fitting raises scikit-learn's ``NotFittedError`` (a
    ValueError) when scikit-learn is installed.
    """

    def __init__(
        self,
        *,
        axis: int = 1,
        with_mean: bool = True,
        with_std: bool = True,
        copy: bool = True,
        backend: str | None = None,
    ):
        # stored exactly as given: scikit-learn's clone() checks identity
        self.axis = axis
        self.with_mean = with_mean
        self.with_std = with_std
        self.copy = copy
        self.backend = backend

    if BaseEstimator is not None:

        def __sklearn_tags__(self):
            tags = super().__sklearn_tags__()
            tags.input_tags.allow_nan = True
            tags.input_tags.sparse = not self.with_mean  # as StandardScaler: sparse data is only scaled
            tags.transformer_tags.preserves_dtype = ["float64", "float32"]
            return tags

    # -- fitting ------------------------------------------------------------------

    def fit(self, X, y=None, sample_weight=None) -> "Standardizer":
        """Statistics of X alone (forgets earlier fits).  y is ignored.

        X may be a Dask array: each block's moments are computed in a Dask
        task (the CPU kernels inside it) and merged exactly."""
        for name in ("mean_", "var_", "scale_", "n_samples_seen_", "_moments", "_weighted"):
            self.__dict__.pop(name, None)
        return self.partial_fit(X, y, sample_weight)

    def partial_fit(self, X, y=None, sample_weight=None) -> "Standardizer":
        """Merge X's statistics into those seen so far (exact, Chan's formula;
        per-feature counts where values are NaN, weight sums with
        ``sample_weight``).  y is ignored."""
        _check_params(self.axis, self.with_mean, self.with_std, self.copy, self.backend)
        first = getattr(self, "_moments", None) is None
        X = self._read(X, reset=first)
        if not first:
            self._check_features(X)
        m = self._chunk_moments(X, sample_weight)
        weighted = sample_weight is not None or getattr(self, "_weighted", False)
        if not first:
            m = self._moments.merge(m)
        self._set_stats(m, weighted, _is_sparse(X))
        return self

    def _chunk_moments(self, X, sample_weight) -> Moments:
        """X's per-feature Moments in float64, NaN values left out."""
        backend = resolve_backend(self.backend)
        if _is_sparse(X):
            if self.with_mean:
                raise ValueError(
                    "Cannot center sparse matrices: pass `with_mean=False` instead. "
                    "See docstring for motivation and alternatives."
                )
            return _sparse_moments(X, _weights(sample_weight, X))
        axis = check_axis(self.axis, len(_shape(X)))
        if sample_weight is not None and (len(_shape(X)) != 2 or axis != 1):
            raise ValueError("sample_weight: only for 2-D (n_samples, n_features) data with axis=1")
        if _is_dask(X):
            if sample_weight is not None:
                raise ValueError("sample_weight: not supported for Dask arrays")
            m = _dask_moments(X, axis)
        else:
            m = feature_moments(_host_data(X, backend), axis, _weights(sample_weight, X))
        if not np.any(m.count) and sample_weight is None:
            raise ValueError(f"X: empty input of shape {tuple(_shape(X))} (or every value NaN)")
        return m

    def _set_stats(self, m: Moments, weighted: bool, sparse: bool):
        self._moments, self._weighted = m, weighted
        if weighted:
            self.n_samples_seen_ = m.count.copy()
        else:
            count = m.count.astype(np.int64)
            # scikit-learn's convention: an int, or a per-feature array where NaNs made the counts differ
            self.n_samples_seen_ = int(count[0]) if np.all(count == count[0]) else count
        self.mean_ = m.mean
        with np.errstate(invalid="ignore", divide="ignore"):
            self.var_ = np.where(m.count > 0, m.m2 / np.where(m.count > 0, m.count, 1), np.nan)
        self.n_features_in_ = m.mean.shape[0]
        self.scale_ = _scale(self.var_, self.mean_, m.count) if self.with_std else None
        # StandardScaler's attributes: var_ only with with_std, mean_ unless neither step
        # (and never for sparse data); the moments themselves are kept for partial_fit
        if not self.with_std:
            self.var_ = None
        if sparse or not (self.with_mean or self.with_std):
            self.mean_ = None

    # -- applying -----------------------------------------------------------------

    def transform(self, X, copy=None):
        """Z = (X - mean_) / scale_ (each step as with_mean / with_std say).
        A Dask array in gives a lazy Dask array out."""
        return self._apply(X, "X", inverse=False, copy=copy)

    def inverse_transform(self, X, copy=None):
        """X = Z * scale_ + mean_ (each step as with_mean / with_std say)."""
        return self._apply(X, "X", inverse=True, copy=copy)

    def _apply(self, X, name, inverse, copy):
        if getattr(self, "_moments", None) is None:
            raise _not_fitted(f"{name}: this Standardizer is not fitted yet; call fit() or partial_fit() first")
        _check_params(self.axis, self.with_mean, self.with_std, self.copy, self.backend)
        X = self._check_features(self._read(X, reset=False, name=name), name)
        C = self.n_features_in_
        scale = self.scale_ if self.with_std else np.ones(C)
        mean = self._moments.mean if self.with_mean else np.zeros(C)
        if _is_sparse(X):
            factor = scale if inverse else 1.0 / scale
            return _scale_sparse(X, factor, self.copy if copy is None else copy)
        if inverse:  # x = z * scale + mean: normalize with mean 0, var 1, gamma = scale, beta = mean
            vectors = (np.zeros(C), np.ones(C), scale, mean)
        else:
            # normalize's (x - mean) / sqrt(var + eps) * gamma with var = 1, eps = 0:
            # 1 / scale_ as gamma, not scale_**2 as var, which would underflow in
            # float32 for features with std below 1e-19
            vectors = (mean, np.ones(C), 1.0 / scale, np.zeros(C))
        if _is_dask(X):
            return _dask_affine(X, self.axis, *vectors, self._backend())
        Z = normalize(X, *vectors, eps=0.0, axis=self.axis, backend=self._backend())
        in_place = not (self.copy if copy is None else copy)
        if in_place and isinstance(X, np.ndarray) and X.flags.writeable and X.dtype == Z.dtype:
            X[...] = Z
            return X
        return Z

    def fit_transform(self, X, y=None, sample_weight=None):
        """fit(X), then transform(X).  y is ignored.  (A Dask X is computed
        once for the statistics; the result stays lazy.)"""
        return self.fit(X, sample_weight=sample_weight).transform(X)

    # -- helpers --------------------------------------------------------------------

    def _backend(self) -> str:
        return resolve_backend(self.backend)

    def _read(self, X, reset: bool, name: str = "X"):
        """X as the statistics and kernels take it: 2-D host data with axis=1
        through scikit-learn's validation where it is installed (its messages,
        feature names and counts, sparse matrices), anything else as it is
        (device and Dask arrays) or as a NumPy array."""
        if _sklearn_2d(X, self.axis):
            return validate_data(
                self,
                X,
                reset=reset,
                accept_sparse=("csr", "csc"),
                dtype=FLOAT_DTYPES,
                ensure_all_finite="allow-nan",
                copy=False,
            )
        return _as_data(X, name)

    def _check_features(self, X, name: str = "X"):
        shape = _shape(X)
        C = shape[check_axis(self.axis, len(shape))]
        if C != self.n_features_in_:
            raise ValueError(
                f"{name}: {C} features (axis {self.axis} of shape {shape}), "
                f"the standardizer was fitted on {self.n_features_in_}"
            )
        return X


def _sklearn_2d(X, axis) -> bool:
    """Whether X goes through scikit-learn's validation: scikit-learn installed,
    host data of at most 2 dimensions (a 1-D or 0-D X gets its error), axis 1."""
    if BaseEstimator is None or _is_dask(X) or is_device_array(X) or axis not in (1, -1):
        return False
    if _is_sparse(X):
        return True
    try:
        return np.ndim(X) <= 2
    except Exception:  # ragged lists: scikit-learn's message
        return True


def _is_sparse(X) -> bool:
    return type(X).__module__.startswith("scipy.sparse")


def _weights(sample_weight, X):
    """(n_samples,) float64 weights, or None."""
    if sample_weight is None:
        return None
    if BaseEstimator is not None:
        return np.asarray(_check_sample_weight(sample_weight, X, dtype=np.float64))
    w = np.asarray(sample_weight, np.float64)
    if w.shape != (_shape(X)[0],) or not np.isfinite(w).all() or (w < 0).any():
        raise ValueError(f"sample_weight: expected ({_shape(X)[0]},) finite non-negative weights")
    return w


def _sparse_moments(X, w) -> Moments:
    """Per-column Moments of a CSR/CSC matrix: its stored values (NaN left
    out) merged with its implicit zeros, weighted by the rows' w (None: 1)."""
    if not np.isfinite(X.data[~np.isnan(X.data)]).all():
        raise ValueError("X: contains infinity; NaN values are left out of the statistics, +-inf are refused")
    coo = X.tocoo()
    rows, cols, vals = coo.row, coo.col, np.asarray(coo.data, np.float64)
    n, C = X.shape
    w_rows = np.ones(n) if w is None else w
    keep = ~np.isnan(vals)
    rows, cols, vals = rows[keep], cols[keep], vals[keep]
    wv = w_rows[rows]
    nan_weight = np.bincount(coo.col[~keep], weights=w_rows[coo.row[~keep]], minlength=C)
    count = w_rows.sum() - nan_weight  # every row counts in every column, but its NaN entries
    total = np.bincount(cols, weights=wv * vals, minlength=C)
    mean = np.where(count > 0, total / np.where(count > 0, count, 1), 0.0)
    stored_weight = np.bincount(cols, weights=wv, minlength=C)
    d = vals - mean[cols]
    m2 = np.bincount(cols, weights=wv * d * d, minlength=C) + (count - stored_weight) * mean * mean
    return Moments(count, mean, m2)


def _scale_sparse(X, factor, copy):
    """X with every stored value of column j multiplied by factor[j] (the format kept)."""
    X = X.copy() if copy else X
    if X.format == "csc":
        cols = np.repeat(np.arange(X.shape[1]), np.diff(X.indptr))
    else:
        cols = X.indices
    X.data *= factor[cols].astype(X.dtype)
    return X


def _check_params(axis, with_mean, with_std, copy, backend):
    if isinstance(axis, (bool, np.bool_)) or not isinstance(axis, numbers.Integral):
        raise TypeError(f"axis: expected an int, got {type(axis).__name__}")
    check_bool(with_mean, "with_mean")
    check_bool(with_std, "with_std")
    check_bool(copy, "copy")
    resolve_backend(backend)


def _not_fitted(message: str) -> ValueError:
    """scikit-learn's NotFittedError (a ValueError) when scikit-learn is installed."""
    if BaseEstimator is None:
        return ValueError(message)
    return NotFittedError(message)


def _scale(var, mean, n):
    """sqrt(var), 1 for features indistinguishable from constant (scikit-learn's test)."""
    eps = np.finfo(np.float64).eps
    constant = var <= n * eps * var + (n * mean * eps) ** 2
    return np.where(constant, 1.0, np.sqrt(var))


def feature_moments(X: np.ndarray, axis: int, weights=None) -> Moments:
    """Per-feature Moments of a host array in float64, NaN values left out
    (per-feature counts, as scikit-learn's ``allow_nan``); +-inf refused.
    ``weights``: None, or (n_samples,) for 2-D X with axis 1 (weighted
    moments: count is the weights' sum).

    Unweighted and without NaN: ``gpubn.moments`` (the CPU statistics
    kernels, every value widened to float64).  Otherwise two float64 passes
    over the values that are not NaN (mean, then the squared deviations)."""
    x = np.asarray(X, np.float64)
    if np.isinf(x).any():
        raise ValueError("X: contains infinity; NaN values are left out of the statistics, +-inf are refused")
    missing = np.isnan(x)
    if weights is None and not missing.any():
        return moments(x, axis, "cpu")
    outer, C, inner = canonical_shape(x.shape, axis)
    keep = ~missing.reshape(outer, C, inner)
    w = keep.astype(np.float64)
    if weights is not None:
        w *= np.asarray(weights, np.float64)[:, None, None]
    v = np.where(keep, x.reshape(outer, C, inner), 0.0)
    count = w.sum(axis=(0, 2))
    safe = np.where(count > 0, count, 1.0)
    mean = (w * v).sum(axis=(0, 2)) / safe
    d = np.where(keep, v - mean[None, :, None], 0.0)
    shift = (w * d).sum(axis=(0, 2)) / safe  # the first mean's rounding, corrected
    m2 = (w * d * d).sum(axis=(0, 2)) - shift * shift * count
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
