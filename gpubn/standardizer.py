"""Standardizer: input normalization fitted on training data (the course's
"normalizing inputs to speed up learning"), on the batch-norm kernels.

    fit:        mean_ = mean(X), var_ = var(X)            per feature
    transform:  Z = (X - mean_) / scale_,  scale_ = sqrt(var_ + eps)  (1 where var_ == 0)

(The course slide's ``X /= sigma**2`` is a known erratum: divide by the standard
deviation.)  ``partial_fit`` merges chunk statistics exactly by Chan's formula,
so fitting chunk by chunk gives the statistics of the whole.
"""

import numpy as np

from ._arrays import check_axis, check_scalar, is_device_array
from ._backend import resolve_backend
from .functional import batch_stats, normalize


class Standardizer:
    """Zero mean, unit variance per feature, fitted on training data only.

    Args:
        axis: the feature axis of the data (statistics run over all others).
        eps: added to the variance before the square root.
        backend: "cpu", "cuda" or None (default backend).

    Attributes after fitting: ``mean_``, ``var_`` ((C,) float64 NumPy arrays,
    biased variance), ``scale_`` ((C,), 1 for zero-variance features),
    ``n_samples_seen_`` (values per feature seen so far).
    """

    def __init__(self, *, axis: int = 1, eps: float = 1e-8, backend: str | None = None):
        if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)):
            raise TypeError(f"axis: expected an int, got {type(axis).__name__}")
        self.axis = int(axis)
        self.eps = check_scalar(eps, "eps")
        self.backend = resolve_backend(backend)
        self.mean_ = None
        self.var_ = None
        self.n_samples_seen_ = 0

    @property
    def scale_(self):
        if self.var_ is None:
            return None
        return np.where(self.var_ > 0, np.sqrt(self.var_ + self.eps), 1.0)

    def _chunk_stats(self, X):
        mean, var = batch_stats(X, axis=self.axis, backend=self.backend)
        mean, var = _host(mean).astype(np.float64), _host(var).astype(np.float64)
        shape = X.shape if hasattr(X, "shape") else np.shape(X)
        n = int(np.prod(shape)) // shape[check_axis(self.axis, len(shape))]
        return n, mean, var

    def fit(self, X) -> "Standardizer":
        """Statistics of X alone (forgets earlier fits)."""
        n, mean, var = self._chunk_stats(X)
        self.n_samples_seen_, self.mean_, self.var_ = n, mean, var
        return self

    def partial_fit(self, X) -> "Standardizer":
        """Merge X's statistics into those seen so far (exact, Chan's formula)."""
        n_b, mean_b, var_b = self._chunk_stats(X)
        if self.mean_ is None:
            self.n_samples_seen_, self.mean_, self.var_ = n_b, mean_b, var_b
            return self
        if mean_b.shape != self.mean_.shape:
            raise ValueError(f"X: {mean_b.shape[0]} features, the standardizer was fitted on {self.mean_.shape[0]}")
        n_a = self.n_samples_seen_
        n = n_a + n_b
        delta = mean_b - self.mean_
        mean = self.mean_ + delta * (n_b / n)
        m2 = self.var_ * n_a + var_b * n_b + delta * delta * (n_a * n_b / n)
        self.n_samples_seen_, self.mean_, self.var_ = n, mean, m2 / n
        return self

    def _check_fitted(self, X):
        if self.mean_ is None:
            raise ValueError("X: this Standardizer is not fitted yet; call fit() or partial_fit() first")

    def transform(self, X):
        """Z = (X - mean_) / scale_; X's shape and dtype."""
        self._check_fitted(X)
        s = self.scale_
        return normalize(X, self.mean_, s * s, eps=0.0, axis=self.axis, backend=self.backend)

    def inverse_transform(self, Z):
        """X = Z * scale_ + mean_; Z's shape and dtype."""
        self._check_fitted(Z)
        C = self.mean_.shape[0]
        zeros, ones = np.zeros(C), np.ones(C)
        return normalize(Z, zeros, ones, self.scale_, self.mean_, eps=0.0, axis=self.axis, backend=self.backend)

    def fit_transform(self, X):
        return self.fit(X).transform(X)

    def __repr__(self) -> str:
        fitted = f", fitted on {self.n_samples_seen_} samples" if self.mean_ is not None else ""
        return f"Standardizer(axis={self.axis}, eps={self.eps:g}, backend={self.backend!r}{fitted})"


def _host(a):
    return a.copy_to_host() if is_device_array(a) and hasattr(a, "copy_to_host") else np.asarray(a)
