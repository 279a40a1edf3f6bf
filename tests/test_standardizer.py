"""Standardizer against the float64 reference and scikit-learn's StandardScaler, both backends."""

import numpy as np
import pytest
from sklearn.base import clone  # scikit-learn is in the test extra
from sklearn.preprocessing import StandardScaler

import gpubn

from reference import forward, stats


@pytest.mark.parametrize("axis", [1, 0, -1])
def test_fit_transform(backend, rng, axis):
    X = rng.standard_normal((20, 4, 3)) * np.array([1, 100, 1e-3])[None, None, :] + 7
    X = np.moveaxis(X, 2, axis % 3).astype(np.float32) if axis != -1 else X.astype(np.float32)
    sc = gpubn.Standardizer(axis=axis, backend=backend)
    Z = sc.fit_transform(X)
    mean, var = stats(X, axis)
    np.testing.assert_allclose(sc.mean_, mean, rtol=1e-5)
    np.testing.assert_allclose(sc.var_, var, rtol=1e-4)
    ref, _ = forward(X, None, None, axis, eps=0.0)  # (X - mean) / sqrt(var)
    np.testing.assert_allclose(Z, ref, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(sc.inverse_transform(Z), X, rtol=1e-4, atol=1e-4)
    assert sc.n_features_in_ == X.shape[axis]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_small_spreads_come_out_at_unit_variance(backend, rng, dtype):
    """No epsilon: std 1e-3 .. 1e-7 features are scaled to std 1, as scikit-learn does
    (with eps=1e-8 added to the variance, std 1e-5 came out as 0.1)."""
    spreads = np.array([1.0, 1e-3, 1e-4, 1e-5, 1e-7])
    X = (rng.standard_normal((64, 5)) * spreads + np.array([0, 0, 3, 0, 1e-3])).astype(dtype)
    sc = gpubn.Standardizer(backend=backend).fit(X)
    _, var = stats(X, 1)
    np.testing.assert_allclose(sc.scale_, np.sqrt(var), rtol=1e-5)
    np.testing.assert_allclose(sc.scale_, StandardScaler().fit(X).scale_, rtol=1e-5)
    Z = sc.transform(X)
    np.testing.assert_allclose(Z.astype(np.float64).std(axis=0), 1.0, rtol=1e-3 if dtype == np.float32 else 1e-9)
    np.testing.assert_allclose(Z.astype(np.float64).mean(axis=0), 0.0, atol=1e-3 if dtype == np.float32 else 1e-9)


def test_constant_and_near_constant_features(backend, rng):
    """Zero variance, and variance at the level of rounding error (values one
    ulp apart at 1e10), are 'constant': scale_ = 1, only centered; a small but
    real spread at a large offset is not."""
    n = 40
    X = rng.standard_normal((n, 4))
    X[:, 1] = 4.0
    X[:, 2] = np.where(np.arange(n) % 2 == 0, 1e10, np.nextafter(1e10, np.inf))
    X[:, 3] = 1e3 + 1e-6 * rng.standard_normal(n)  # std 1e-9 of the mean: real
    sc = gpubn.Standardizer(backend=backend).fit(X)
    expected = StandardScaler().fit(X).scale_
    assert sc.scale_[1] == 1.0 and sc.scale_[2] == 1.0 and expected[1] == 1.0 and expected[2] == 1.0
    np.testing.assert_allclose(sc.scale_[3], expected[3], rtol=1e-6)
    Z = sc.transform(X)
    np.testing.assert_array_equal(Z[:, 1], 0.0)
    assert np.abs(Z[:, 2]).max() < 1e-5  # centered, not blown up to +-1
    np.testing.assert_allclose(Z[:, 3].std(), 1.0, rtol=1e-6)


def test_partial_fit_equals_fit(backend, rng):
    X = rng.standard_normal((53, 5)) * 3 + 1e3
    full = gpubn.Standardizer(backend=backend).fit(X)
    part = gpubn.Standardizer(backend=backend)
    for chunk in np.array_split(X, [7, 8, 30]):
        part.partial_fit(chunk)
    assert part.n_samples_seen_ == full.n_samples_seen_ == 53
    np.testing.assert_allclose(part.mean_, full.mean_, rtol=1e-12)
    np.testing.assert_allclose(part.var_, full.var_, rtol=1e-9)
    np.testing.assert_allclose(part.var_, X.var(axis=0), rtol=1e-9)
    np.testing.assert_allclose(part.scale_, StandardScaler().fit(X).scale_, rtol=1e-9)


@pytest.mark.parametrize("with_mean,with_std", [(True, False), (False, True), (False, False)])
def test_with_mean_with_std_like_sklearn(backend, rng, with_mean, with_std):
    X = rng.standard_normal((30, 3)) * [1, 5, 0.1] + [2, -3, 10]
    sc = gpubn.Standardizer(with_mean=with_mean, with_std=with_std, backend=backend).fit(X)
    ref = StandardScaler(with_mean=with_mean, with_std=with_std).fit(X)
    Z = sc.transform(X)
    np.testing.assert_allclose(Z, ref.transform(X), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(sc.inverse_transform(Z), X, rtol=1e-9, atol=1e-9)
    assert (sc.scale_ is None) == (not with_std) == (sc.var_ is None) == (ref.var_ is None)
    assert (sc.mean_ is None) == (ref.mean_ is None)
    if sc.mean_ is not None:
        np.testing.assert_allclose(sc.mean_, ref.mean_, rtol=1e-13)


def test_integer_input_becomes_float64(backend):
    X = np.arange(24, dtype=np.int32).reshape(8, 3) ** 2
    sc = gpubn.Standardizer(backend=backend)
    Z = sc.fit_transform(X)
    assert Z.dtype == np.float64
    np.testing.assert_allclose(Z, StandardScaler().fit_transform(X), rtol=1e-9, atol=1e-12)
    Zl = gpubn.Standardizer(backend=backend).fit_transform([[1, 2], [3, 5], [4, 4]])  # lists too
    np.testing.assert_allclose(Zl, StandardScaler().fit_transform([[1, 2], [3, 5], [4, 4]]), atol=1e-12)


def test_errors_name_the_argument(backend, rng):
    X = rng.standard_normal((10, 3))
    with pytest.raises(ValueError, match="not fitted"):
        gpubn.Standardizer(backend=backend).transform(X)
    sc = gpubn.Standardizer(backend=backend).fit(X)
    wrong = "X has 6 features, but Standardizer is expecting 3 features as input"  # scikit-learn's words
    with pytest.raises(ValueError, match=wrong):
        sc.transform(rng.standard_normal((10, 6)))
    with pytest.raises(ValueError, match="X has 2 features"):
        sc.inverse_transform(X[:, :2])
    with pytest.raises(ValueError, match="X has 2 features"):
        sc.partial_fit(X[:, :2])
    X3 = rng.standard_normal((4, 3, 5))  # N-D data: gpubn's own checks, naming the axis
    sc3 = gpubn.Standardizer(backend=backend).fit(X3)
    nd_wrong = r"^X: 2 features \(axis 1 of shape \(4, 2, 5\)\), the standardizer was fitted on 3$"
    with pytest.raises(ValueError, match=nd_wrong):
        sc3.transform(X3[:, :2])
    # the parameters are checked when fitting (scikit-learn's convention: construction never raises)
    for kwargs, message in [
        (dict(with_mean="no"), "with_mean: expected True or False"),
        (dict(with_std=1), "with_std: expected True or False"),
        (dict(copy=None), "copy: expected True or False"),
    ]:
        bad = gpubn.Standardizer(backend=backend, **kwargs)
        with pytest.raises(TypeError, match=message):
            bad.fit(X)
        assert not hasattr(bad, "mean_")
    with pytest.raises(TypeError, match="axis: expected an int"):
        gpubn.Standardizer(axis=1.0, backend=backend).fit(X3)
    with pytest.raises(ValueError, match="inhomogeneous|setting an array element"):
        sc.transform([[1.0, 2.0, 3.0], [3.0]])


def test_get_set_params_and_clone(backend):
    sc = gpubn.Standardizer(axis=0, with_std=False, backend=backend)
    assert sc.get_params() == {"axis": 0, "with_mean": True, "with_std": False, "copy": True, "backend": backend}
    twin = clone(sc)  # scikit-learn checks that the constructor stores what it is given
    assert twin.get_params() == sc.get_params() and twin is not sc
    assert sc.set_params(with_std=True, axis=1) is sc and sc.get_params()["with_std"] is True
    with pytest.raises(ValueError, match="Invalid parameter 'scale' for estimator Standardizer"):
        sc.set_params(scale=2)


def test_inside_a_pipeline_with_cross_val_score(backend):
    """Where StandardScaler works, Standardizer works: the same scores."""
    from sklearn.datasets import load_wine
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score
    from sklearn.pipeline import make_pipeline

    X, y = load_wine(return_X_y=True)
    X, y = X[::3, :6], y[::3]  # small: the CUDA backend may be simulated
    ours = cross_val_score(make_pipeline(gpubn.Standardizer(backend=backend), LogisticRegression()), X, y, cv=3)
    theirs = cross_val_score(make_pipeline(StandardScaler(), LogisticRegression()), X, y, cv=3)
    np.testing.assert_allclose(ours, theirs, atol=1e-12)
    assert ours.mean() > 0.8


# -- Dask ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dask_client():
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        with Client(cluster) as client:
            yield client


@pytest.mark.parametrize("axis,chunks", [(1, (130, 3)), (0, (2, 90))])
def test_dask_fit_transform_equal_in_memory(dask_client, rng, axis, chunks):
    """Chunked along both axes, on a LocalCluster of two worker processes (CPU kernels in the tasks)."""
    import dask.array as da

    X = rng.standard_normal((1000, 7)) * np.arange(1, 8) + 1e3
    if axis == 0:
        X = np.ascontiguousarray(X.T)
    D = da.from_array(X, chunks=chunks)
    sc = gpubn.Standardizer(axis=axis, backend="cpu").fit(D)
    ref = gpubn.Standardizer(axis=axis, backend="cpu").fit(X)
    mean, var = stats(X, axis)
    np.testing.assert_allclose(sc.mean_, mean, rtol=1e-15)
    np.testing.assert_allclose(sc.var_, var, rtol=1e-11)
    assert sc.n_samples_seen_ == ref.n_samples_seen_ == 1000
    Z = sc.transform(D)
    assert isinstance(Z, da.Array)  # lazy
    np.testing.assert_allclose(Z.compute(), ref.transform(X), atol=1e-12)
    np.testing.assert_allclose(sc.inverse_transform(Z).compute(), X, rtol=1e-12)
    part = gpubn.Standardizer(axis=axis, backend="cpu")
    for piece in np.array_split(X, 3, axis=1 - axis):
        part.partial_fit(da.from_array(piece, chunks=chunks))
    np.testing.assert_allclose(part.var_, var, rtol=1e-11)


def test_dask_with_nan_equals_in_memory(dask_client, rng):
    import dask.array as da

    X = rng.standard_normal((300, 4)) + 50.0
    X[rng.random(X.shape) < 0.1] = np.nan
    sc = gpubn.Standardizer(backend="cpu").fit(da.from_array(X, chunks=(70, 3)))
    ref = StandardScaler().fit(X)
    np.testing.assert_array_equal(sc.n_samples_seen_, (~np.isnan(X)).sum(axis=0))
    np.testing.assert_allclose(sc.mean_, ref.mean_, rtol=1e-14)
    np.testing.assert_allclose(sc.var_, ref.var_, rtol=1e-10)


def test_nan_is_left_out_of_fit_and_kept_in_transform(backend):
    """scikit-learn's allow_nan: a feature with one NaN keeps its other values'
    statistics (per-feature counts), and the NaN stays where it was."""
    X = np.array([[1.0, 10.0], [2.0, np.nan], [3.0, 30.0], [4.0, 40.0]])
    sc = gpubn.Standardizer(backend=backend)
    Z = sc.fit_transform(X)
    ref = StandardScaler().fit(X)
    np.testing.assert_allclose(Z, ref.transform(X), rtol=1e-12, equal_nan=True)
    assert np.isnan(Z[1, 1]) and np.isfinite(np.delete(Z, 1, axis=0)).all()
    np.testing.assert_array_equal(sc.n_samples_seen_, [4, 3])
    np.testing.assert_allclose(sc.mean_, ref.mean_, rtol=1e-12)
    np.testing.assert_allclose(sc.var_, ref.var_, rtol=1e-12)
    with pytest.raises(ValueError, match="infinity"):
        gpubn.Standardizer(backend=backend).fit(np.where(np.isnan(X), np.inf, X))


def test_partial_fit_merges_per_feature_counts(backend, rng):
    X = rng.standard_normal((40, 3)) * [1, 3, 0.5] + [0, 1e3, -2]
    X[rng.random(X.shape) < 0.2] = np.nan
    part = gpubn.Standardizer(backend=backend)
    for chunk in np.array_split(X, [5, 6, 25]):
        part.partial_fit(chunk)
    ref = StandardScaler().fit(X)
    np.testing.assert_array_equal(part.n_samples_seen_, (~np.isnan(X)).sum(axis=0))
    np.testing.assert_allclose(part.mean_, np.nanmean(X, axis=0), rtol=1e-12)
    np.testing.assert_allclose(part.var_, np.nanvar(X, axis=0), rtol=1e-10)
    np.testing.assert_allclose(part.transform(X), ref.transform(X), rtol=1e-9, atol=1e-12, equal_nan=True)


def test_float32_statistics_are_float64(backend, rng):
    """Squares of |x| ~ 1e19 overflow float32, the variance (~1e38) does not; and
    at an offset of 1e4 the mean is exact, not float32-accurate."""
    huge = (rng.standard_normal((200, 3)) * 1e19).astype(np.float32)
    sc = gpubn.Standardizer(backend=backend).fit(huge)
    np.testing.assert_allclose(sc.var_, huge.astype(np.float64).var(axis=0), rtol=1e-12)
    np.testing.assert_allclose(sc.transform(huge).astype(np.float64).std(axis=0), 1.0, rtol=1e-5)
    m = gpubn.moments(huge, axis=1, backend=backend)
    assert np.isfinite(m.m2).all()
    np.testing.assert_allclose(m.var(), huge.astype(np.float64).var(axis=0), rtol=1e-12)
    offset = (1e4 + rng.standard_normal((1000, 3))).astype(np.float32)
    sc = gpubn.Standardizer(backend=backend).fit(offset)
    np.testing.assert_allclose(sc.mean_, offset.astype(np.float64).mean(axis=0), rtol=1e-15, atol=0)
    np.testing.assert_allclose(sc.mean_, StandardScaler().fit(offset).mean_, rtol=1e-14)


def test_transform_before_fit_raises_not_fitted(backend):
    from sklearn.exceptions import NotFittedError

    with pytest.raises(NotFittedError, match="not fitted"):
        gpubn.Standardizer(backend=backend).transform(np.ones((3, 2)))


WITHOUT_SKLEARN = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "sklearn" or name.startswith("sklearn."):
            raise ImportError("scikit-learn hidden")
sys.meta_path.insert(0, Block())
import numpy as np, gpubn
X = np.array([[1.0, 10.0], [2.0, np.nan], [3.0, 30.0], [4.0, 40.0]])
sc = gpubn.Standardizer(backend="cpu")
Z = sc.fit_transform(X)
seen = X[[0, 2, 3], 1]  # NumPy's statistics of the values that are not NaN
assert np.isnan(Z[1, 1]) and np.allclose(Z[[0, 2, 3], 1], (seen - seen.mean()) / seen.std(), rtol=1e-12), Z
assert list(sc.n_samples_seen_) == [4, 3]
assert sc.get_params()["copy"] is True and sc.set_params(with_std=False) is sc
try:
    gpubn.Standardizer().transform(X)
except ValueError as e:
    assert "not fitted" in str(e)
else:
    raise AssertionError("no error")
print("ok", type(sc).__mro__[1].__name__)
"""


@pytest.mark.subprocess
def test_usable_without_scikit_learn():
    """scikit-learn is optional: with it hidden, the Standardizer keeps its
    protocol (get_params / set_params) and its behaviour."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", WITHOUT_SKLEARN], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok _Protocol"
