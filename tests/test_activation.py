"""Batch norm fused with an activation and a residual, against the float64
reference composition g(BN(x) + z), on both backends."""

import numpy as np
import pytest

import gpubn

from reference import backward, forward, running_update, tol

G = {
    None: (lambda v: v, lambda v: np.ones_like(v)),
    "relu": (lambda v: np.maximum(v, 0), lambda v: (v > 0) * 1.0),
    "sigmoid": (lambda v: 1 / (1 + np.exp(-v)), lambda v: np.exp(-v) / (1 + np.exp(-v)) ** 2),
    "tanh": (np.tanh, lambda v: 1 / np.cosh(v) ** 2),
}
LAYOUTS = [((13, 4), 1), ((4, 3, 5), 1), ((3, 4, 3), -1)]


def reference(x, gamma, beta, axis, z, act, dy):
    """(y, dx, dgamma, dbeta, dz) of y = g(BN(x) + z) in float64, by the chain rule."""
    g, dg = G[act]
    bn, _ = forward(x, gamma, beta, axis)
    v = bn + (0 if z is None else np.asarray(z, np.float64))
    dv = np.asarray(dy, np.float64) * dg(v)
    dx, dgamma, dbeta = backward(dv, x, gamma, axis)
    return g(v), dx, dgamma, dbeta, dv


# every activation with and without a residual, and a residual alone (plain BN: test_functional.py)
FUSIONS = [(act, res) for act in ("relu", "sigmoid", "tanh") for res in (True, False)] + [(None, True)]


@pytest.mark.parametrize("act,with_residual", FUSIONS)
@pytest.mark.parametrize("shape,axis", LAYOUTS)
def test_fused_matches_reference(backend, rng, shape, axis, act, with_residual):
    C = shape[axis]
    # the simulator is slow: float32 everywhere, float16 once per activation layout
    dtypes = (np.float64, np.float32, np.float16) if backend == "cpu" else (np.float32,)
    if backend == "cuda" and with_residual and shape == LAYOUTS[0][0]:
        dtypes += (np.float16,)
    for dtype in dtypes:
        acc = np.float64 if dtype == np.float64 else np.float32
        x = (1.5 + rng.standard_normal(shape)).astype(dtype)
        z = rng.standard_normal(shape).astype(dtype) if with_residual else None
        dy = rng.standard_normal(shape).astype(dtype)
        gamma, beta = (1 + 0.3 * rng.standard_normal(C)).astype(acc), rng.standard_normal(C).astype(acc)
        rm, rv = np.zeros(C, acc), np.ones(C, acc)
        y, cache = gpubn.batch_norm_forward(
            x, gamma, beta, axis=axis, activation=act, residual=z, running_mean=rm, running_var=rv, backend=backend
        )
        ry, rdx, rdg, rdb, rdz = reference(x, gamma, beta, axis, z, act, dy)
        t = tol(dtype)
        assert y.dtype == dtype and y.shape == x.shape
        np.testing.assert_allclose(y.astype(np.float64), ry, **t)
        erm, erv = running_update(np.zeros(C), np.ones(C), x, axis, 0.1)  # statistics of x alone
        np.testing.assert_allclose(rm, erm, **tol(acc))
        np.testing.assert_allclose(rv, erv, **tol(acc))
        grads = gpubn.batch_norm_backward(dy, cache)
        assert len(grads) == (4 if with_residual else 3)
        n = x.size // C
        np.testing.assert_allclose(grads[0].astype(np.float64), rdx, **t)
        np.testing.assert_allclose(grads[1], rdg, atol=t["atol"] * n, rtol=t["rtol"] * 10)
        np.testing.assert_allclose(grads[2], rdb, atol=t["atol"] * n, rtol=t["rtol"] * 10)
        if with_residual:
            assert grads[3].dtype == dtype and grads[3].shape == x.shape
            np.testing.assert_allclose(grads[3].astype(np.float64), rdz, **t)


@pytest.mark.parametrize("act", ["sigmoid", "tanh", "relu"])
def test_finite_differences(rng, act):
    """The gradients of the fused function, x, z, gamma and beta, by central differences."""
    x, z, w = rng.standard_normal((5, 3, 2)), rng.standard_normal((5, 3, 2)), rng.standard_normal((5, 3, 2))
    gamma, beta = np.array([1.2, -0.7, 0.9]), np.array([0.1, -0.2, 0.3])

    def loss(x, z, gamma, beta):
        y, _ = gpubn.batch_norm_forward(x, gamma, beta, activation=act, residual=z, backend="cpu")
        return (y * w).sum()

    _, cache = gpubn.batch_norm_forward(x, gamma, beta, activation=act, residual=z, backend="cpu")
    dx, dgamma, dbeta, dz = gpubn.batch_norm_backward(w, cache)
    h = 1e-6
    for name, arr, grad in (("x", x, dx), ("z", z, dz), ("gamma", gamma, dgamma), ("beta", beta, dbeta)):
        for idx in [(0,) * arr.ndim, tuple(s - 1 for s in arr.shape)]:
            args = {"x": x, "z": z, "gamma": gamma, "beta": beta}
            plus, minus = arr.copy(), arr.copy()
            plus[idx] += h
            minus[idx] -= h
            num = (loss(**{**args, name: plus}) - loss(**{**args, name: minus})) / (2 * h)
            assert abs(num - grad[idx]) < 1e-6, (name, idx, num, grad[idx])


def test_layer_with_activation_and_residual(backend, rng):
    bn = gpubn.BatchNorm(3, activation="relu", backend=backend, dtype="float64")
    for _ in range(2):
        x, z, dy = (rng.standard_normal((6, 3, 2)) for _ in range(3))
        y = bn(x, residual=z)
        ry, rdx, rdg, _, rdz = reference(x, np.ones(3), np.zeros(3), 1, z, "relu", dy)
        np.testing.assert_allclose(np.asarray(y), ry, atol=1e-12)
        dx, dz = bn.backward(dy)
        np.testing.assert_allclose(dx, rdx, atol=1e-10)
        np.testing.assert_allclose(dz, rdz, atol=1e-12)
        np.testing.assert_allclose(np.asarray(bn.grads["gamma"]), rdg, atol=1e-10)
    y = bn(x)  # no residual: backward returns dx alone
    assert isinstance(bn.backward(dy), np.ndarray)
    assert "activation='relu'" in repr(bn)


def test_bad_inputs_name_the_argument_and_change_nothing(backend):
    x = np.arange(24, dtype=np.float32).reshape(4, 3, 2)
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    cases = [
        (dict(activation="gelu"), ValueError, "activation: 'gelu' is not one of"),
        (dict(activation=1), ValueError, "activation: 1"),
        (dict(residual=np.ones((4, 3))), ValueError, r"residual: shape \(4, 3\) does not match"),
        (dict(residual=np.ones(x.shape, np.int32)), TypeError, "residual: dtype int32"),
    ]
    for kwargs, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            gpubn.batch_norm_forward(x, running_mean=rm, running_var=rv, backend=backend, **kwargs)
        assert (rm == 0).all() and (rv == 1).all()
    with pytest.raises(ValueError, match="activation: 'swish'"):
        gpubn.BatchNorm(3, activation="swish")
