"""The Standardizer as a scikit-learn estimator: scikit-learn's own
``check_estimator`` suite (every check StandardScaler passes), and
StandardScaler's results on the same data (NaNs, weights, sparse input,
offsets, int input, copy=False, feature names)."""

import numpy as np
import pytest
from scipy import sparse
from sklearn.preprocessing import StandardScaler
from sklearn.utils.estimator_checks import parametrize_with_checks

import gpubn

#: StandardScaler is checked the same way by scikit-learn itself: its
#: sparse sample-weight check with with_mean=False (centering sparse data is refused)
ESTIMATORS = [
    gpubn.Standardizer(backend="cpu"),
    gpubn.Standardizer(backend="cpu", with_mean=False),
    gpubn.Standardizer(backend="cpu", with_std=False),
]


def _expected_failures(estimator):
    if estimator.with_mean:
        return {"check_sample_weight_equivalence_on_sparse_data": "sparse data is never centered (StandardScaler too)"}
    return {}


@parametrize_with_checks(ESTIMATORS, expected_failed_checks=_expected_failures)
def test_scikit_learns_estimator_checks(estimator, check):
    check(estimator)


def both(X, sample_weight=None, backend="cpu", **params):
    ours = gpubn.Standardizer(backend=backend, **params).fit(X, sample_weight=sample_weight)
    theirs = StandardScaler(**params).fit(X, sample_weight=sample_weight)
    return ours, theirs


def test_sample_weights_like_standardscaler(backend, rng):
    X = rng.standard_normal((50, 4)) * [1, 10, 0.1, 3] + [0, 1e3, -5, 1e8]
    w = rng.uniform(0, 3, 50)
    ours, theirs = both(X, w, backend)
    np.testing.assert_allclose(ours.n_samples_seen_, theirs.n_samples_seen_, rtol=1e-12)
    np.testing.assert_allclose(ours.mean_, theirs.mean_, rtol=1e-13)
    np.testing.assert_allclose(ours.var_, theirs.var_, rtol=1e-8)
    np.testing.assert_allclose(ours.transform(X), theirs.transform(X), rtol=1e-6, atol=1e-8)
    # integer weights are repeated rows
    k = rng.integers(0, 4, 50)
    rep = gpubn.Standardizer(backend=backend).fit(np.repeat(X, k, axis=0))
    weighted = gpubn.Standardizer(backend=backend).fit(X, sample_weight=k)
    np.testing.assert_allclose(weighted.mean_, rep.mean_, rtol=1e-12)
    np.testing.assert_allclose(weighted.var_, rep.var_, rtol=1e-9)
    # weighted partial fits merge exactly
    part = gpubn.Standardizer(backend=backend)
    for rows in np.array_split(np.arange(50), [10, 11, 30]):
        part.partial_fit(X[rows], sample_weight=w[rows])
    np.testing.assert_allclose(part.mean_, ours.mean_, rtol=1e-13)
    np.testing.assert_allclose(part.var_, ours.var_, rtol=1e-9)
    np.testing.assert_allclose(part.n_samples_seen_, w.sum(), rtol=1e-13)


@pytest.mark.parametrize("fmt", ["csr", "csc"])
def test_sparse_input_like_standardscaler(rng, fmt):
    """with_mean=False: the stored values' moments merged with the implicit
    zeros; transform scales the stored values and keeps the format; NaNs left out."""
    dense = rng.standard_normal((60, 5)) * [1, 2, 3, 4, 5]
    dense[rng.random(dense.shape) < 0.6] = 0.0
    dense[3, 2] = np.nan
    X = sparse.csr_matrix(dense) if fmt == "csr" else sparse.csc_matrix(dense)
    w = rng.uniform(0.5, 2, 60)
    for weights in (None, w):
        ours, theirs = both(X, weights, with_mean=False)
        np.testing.assert_allclose(ours.var_, theirs.var_, rtol=1e-10)
        np.testing.assert_allclose(ours.scale_, theirs.scale_, rtol=1e-10)
        np.testing.assert_allclose(ours.n_samples_seen_, theirs.n_samples_seen_, rtol=1e-12)
        Z = ours.transform(X)
        assert sparse.issparse(Z) and Z.format == fmt
        np.testing.assert_allclose(Z.toarray(), theirs.transform(X).toarray(), rtol=1e-10, equal_nan=True)
        np.testing.assert_allclose(ours.inverse_transform(Z).toarray(), dense, rtol=1e-10, equal_nan=True)
    with pytest.raises(ValueError, match="Cannot center sparse matrices"):
        gpubn.Standardizer().fit(X)


def test_offsets_constant_and_int_columns_like_standardscaler(backend, rng):
    X = np.column_stack(
        [
            1e8 + rng.standard_normal(40),  # an offset of 1e8
            np.full(40, 3.0),  # constant
            1e10 + np.where(np.arange(40) % 2, 0.0, np.spacing(1e10)),  # one ulp apart: constant too
            rng.integers(0, 5, 40),
        ]
    )
    ours, theirs = both(X, backend=backend)
    np.testing.assert_allclose(ours.mean_, theirs.mean_, rtol=1e-15)
    np.testing.assert_allclose(ours.scale_, theirs.scale_, rtol=1e-7)
    np.testing.assert_allclose(ours.transform(X), theirs.transform(X), rtol=1e-6, atol=1e-9)
    Xi = rng.integers(-5, 5, (30, 3))
    ours, theirs = both(Xi, backend=backend)
    assert ours.transform(Xi).dtype == theirs.transform(Xi).dtype == np.float64
    np.testing.assert_allclose(ours.transform(Xi), theirs.transform(Xi), rtol=1e-12, atol=1e-12)


def test_copy_false_transforms_in_place(backend, rng):
    X = rng.standard_normal((20, 3)) + 4
    sc = gpubn.Standardizer(copy=False, backend=backend).fit(X)
    want = StandardScaler().fit(X).transform(X)
    Z = sc.transform(X)
    assert Z is X
    np.testing.assert_allclose(X, want, rtol=1e-12, atol=1e-12)
    Y = rng.standard_normal((20, 3)) + 4
    Z = gpubn.Standardizer(backend=backend).fit(Y).transform(Y)
    assert Z is not Y  # copy=True (the default) leaves X alone


def test_feature_names(rng):
    X = rng.standard_normal((10, 3))
    sc = gpubn.Standardizer().fit(X)
    assert list(sc.get_feature_names_out()) == ["x0", "x1", "x2"]
    pd = pytest.importorskip("pandas")
    df = pd.DataFrame(X, columns=["a", "b", "c"])
    sc = gpubn.Standardizer().set_output(transform="pandas").fit(df)
    assert list(sc.feature_names_in_) == ["a", "b", "c"]
    out = sc.transform(df)
    assert list(out.columns) == ["a", "b", "c"]
    np.testing.assert_allclose(out.to_numpy(), StandardScaler().fit_transform(X), rtol=1e-12)
    out = gpubn.Standardizer().set_output(transform="pandas").fit_transform(df)
    assert list(out.columns) == ["a", "b", "c"]


def test_refit_forgets_the_weights(rng):
    X = rng.standard_normal((12, 2))
    sc = gpubn.Standardizer().fit(X, sample_weight=np.full(12, 0.5))
    assert sc.n_samples_seen_.tolist() == [6.0, 6.0]
    assert sc.fit(X).n_samples_seen_ == 12 == StandardScaler().fit(X).n_samples_seen_
