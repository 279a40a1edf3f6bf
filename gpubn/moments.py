"""Mergeable per-channel statistics: ``Moments`` (``gpubn.moments`` computes them: functional.py).

A batch's statistics per channel are three numbers: the count n, the mean, and
M2 = sum((x - mean)**2).  Two such triples merge exactly (Chan, Golub and
LeVeque's pairwise formula):

    n    = n_a + n_b
    d    = mean_b - mean_a
    mean = mean_a + d * n_b / n
    M2   = M2_a + M2_b + d**2 * n_a * n_b / n

so statistics of parts (chunks of a data set, the ranks of a data-parallel job,
the batches of a recalibration pass) combine into those of the whole without
revisiting the data.  Everything here is float64 NumPy, (C,) per field.
"""

import contextlib

import numpy as np


class Moments:
    """Per-channel (count, mean, M2), float64 (C,) NumPy arrays.

    ``count`` is the number of values seen, or the sum of their weights
    (weighted statistics, e.g. the Standardizer's ``sample_weight``); it may
    be 0 (an empty part: mean and M2 are 0 then and it merges as the
    identity).  Instances are immutable by convention: ``merge`` returns a
    new one.
    """

    __slots__ = ("count", "mean", "m2")

    def __init__(self, count, mean, m2):
        mean = np.array(mean, np.float64, ndmin=1)
        C = mean.shape[0]
        count = np.broadcast_to(np.asarray(count, np.float64), (C,)).copy()
        m2 = np.array(m2, np.float64, ndmin=1)
        if mean.ndim != 1 or m2.shape != (C,):
            raise ValueError(f"mean, m2: expected two (C,) arrays, got shapes {mean.shape} and {m2.shape}")
        if not np.all(np.isfinite(count)) or np.any(count < 0):
            raise ValueError("count: expected non-negative finite counts (values seen, or sums of sample weights)")
        empty = count == 0
        mean[empty] = 0.0
        m2[empty] = 0.0
        self.count, self.mean, self.m2 = count, mean, m2

    @classmethod
    def empty(cls, C: int) -> "Moments":
        """C channels, nothing seen (the identity of merge)."""
        return cls(np.zeros(C), np.zeros(C), np.zeros(C))

    @property
    def num_channels(self) -> int:
        return self.mean.shape[0]

    def var(self, ddof: int = 0) -> np.ndarray:
        """(C,) variance, biased (ddof=0) or unbiased (ddof=1); NaN where count <= ddof."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.count > ddof, self.m2 / (self.count - ddof), np.nan)

    def merge(self, other: "Moments") -> "Moments":
        """The moments of both parts together (exact up to rounding)."""
        if not isinstance(other, Moments):
            raise TypeError(f"other: expected Moments, got {type(other).__name__}")
        if other.num_channels != self.num_channels:
            raise ValueError(f"other: {other.num_channels} channels, these moments have {self.num_channels}")
        return Moments.merge_all((self, other))

    @staticmethod
    def merge_all(parts) -> "Moments":
        """Merge a sequence of Moments, or a (k, 3, C) array of their
        ``to_array()`` rows, in its order (deterministic for a fixed order).

        Merged pairwise as a balanced tree, vectorised over the parts: rounding
        grows with log(len), not len (10**6 one-value parts keep the variance
        to 1e-12)."""
        if isinstance(parts, np.ndarray):  # (k, 3, C): stacked to_array()s, e.g. an allgather's result
            if parts.ndim != 3 or parts.shape[1] != 3 or parts.shape[0] == 0:
                raise ValueError(f"parts: expected a (k, 3, C) array of to_array() rows, got shape {parts.shape}")
            n, mean, m2 = (np.array(parts[:, i], np.float64) for i in range(3))
        else:
            parts = list(parts)
            if not parts:
                raise ValueError("parts: nothing to merge")
            C = parts[0].num_channels
            if any(p.num_channels != C for p in parts):
                raise ValueError("parts: every part must have the same number of channels")
            n = np.stack([p.count for p in parts])
            mean = np.stack([p.mean for p in parts])
            m2 = np.stack([p.m2 for p in parts])
        while n.shape[0] > 1:
            k = n.shape[0] // 2 * 2  # pairs (0, 1), (2, 3), ...; an odd last part waits
            na, nb = n[0:k:2], n[1:k:2]
            total = na + nb
            safe = np.where(total > 0, total, 1.0)
            d = mean[1:k:2] - mean[0:k:2]
            merged = (
                total,
                mean[0:k:2] + d * (nb / safe),
                m2[0:k:2] + m2[1:k:2] + d * d * (na * nb / safe),
            )
            n, mean, m2 = (np.concatenate([m, a[k:]]) for m, a in zip(merged, (n, mean, m2), strict=True))
        return Moments(n[0], mean[0], m2[0])

    def to_array(self) -> np.ndarray:
        """One (3, C) float64 array [count, mean, m2]: what goes over a wire."""
        return np.stack([self.count, self.mean, self.m2])

    @classmethod
    def from_array(cls, a) -> "Moments":
        a = np.asarray(a, np.float64)
        if a.ndim != 2 or a.shape[0] != 3:
            raise ValueError(f"a: expected a (3, C) array [count, mean, m2], got shape {a.shape}")
        return cls(a[0], a[1], a[2])

    def __repr__(self) -> str:
        return f"Moments(C={self.num_channels}, count={_short(self.count)}, mean={_short(self.mean)})"


def _short(a):
    return np.array2string(a, threshold=6, precision=4)


@contextlib.contextmanager
def recalibrate(*layers):
    """Exact running statistics ("precise BN"): inside the block, every forward
    of these layers also records its batch's Moments; on a normal exit each
    layer's running_mean / running_var become the pooled mean and unbiased
    variance of all the batches it saw (merged moments: the statistics of the
    concatenated batches, not an average of per-batch means).

    Layers: ``gpubn.BatchNorm`` and the ``gpubn.torch`` modules, with running
    statistics.  Forward passes normalize as usual (by the layer's mode);
    a layer that saw no batch keeps its statistics; if the block raises, the
    running statistics and batch counters are put back as they were.  The recording costs one extra read of each input
    (float64 moments on the CPU).

        with gpubn.recalibrate(bn1, bn2):
            for xb in loader:
                model_forward(xb)
    """
    for layer in layers:
        if not hasattr(layer, "_recalibration"):
            raise TypeError(f"layers: {type(layer).__name__} is not a gpubn batch-norm layer")
        if getattr(layer, "running_mean", None) is None:
            raise ValueError(f"layers: {type(layer).__name__} has no running statistics (track_running_stats=False)")
        if layer._recalibration is not None:
            raise RuntimeError(f"layers: {type(layer).__name__} is already being recalibrated")
    saved = [layer._running_snapshot() for layer in layers]
    for layer in layers:
        layer._recalibration = []
    try:
        yield
        seen = [(layer, layer._recalibration) for layer in layers]
    except BaseException:
        for layer, snapshot in zip(layers, saved, strict=True):  # the forwards' own updates too
            layer._restore_running(*snapshot)
        raise
    finally:
        for layer in layers:
            layer._recalibration = None
    for layer, parts in seen:
        if parts:
            merged = Moments.merge_all(parts)
            layer._set_running_stats(merged.mean, merged.var(ddof=1))


__all__ = ["Moments", "recalibrate"]
