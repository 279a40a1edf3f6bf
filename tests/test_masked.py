"""Masked batch norm: statistics from the True positions of a mask over x's
non-feature axes, every position normalized with them, on both backends.

The oracle is the float64 reference run on the unmasked values gathered into a
dense (n, C) array, and central differences for the general gradient."""

import numpy as np
import pytest

import gpubn

from reference import backward, forward, running_update, stats, tol

# (x's shape, feature axis): rows only (mask (N,)), (N, C, L) sequences, channels last, 4-D
LAYOUTS = [((13, 4), 1), ((4, 3, 5), 1), ((3, 4, 3), -1), ((2, 3, 2, 3), 1)]


def gathered(a, mask, axis):
    """The values of a at the mask's True positions as a dense (n, C) array."""
    return np.moveaxis(a, axis, -1)[mask]


def at_masked(a, mask, axis):
    """a's (outer..., C) view indexed at the mask's False positions."""
    return np.moveaxis(a, axis, -1)[~mask]


def random_mask(rng, shape, axis):
    ax = axis % len(shape)
    mshape = shape[:ax] + shape[ax + 1 :]
    mask = rng.random(mshape) < 0.5
    mask.flat[:2] = True  # at least two values per channel
    return mask


@pytest.mark.parametrize("shape,axis", LAYOUTS)
def test_masked_equals_bn_of_the_gathered_values(backend, rng, shape, axis):
    """Outputs at unmasked positions, running statistics and gradients (dy zero at
    masked positions) equal plain BN of the unmasked values gathered densely; the
    masked positions are normalized with the same statistics."""
    ax = axis % len(shape)
    C = shape[ax]
    dtypes = (np.float64, np.float32, np.float16) if backend == "cpu" else (np.float32,)
    for dtype in dtypes:
        acc = np.float64 if dtype == np.float64 else np.float32
        mask = random_mask(rng, shape, axis)
        x = (3.0 + 2.0 * rng.standard_normal(shape)).astype(dtype)
        dy = rng.standard_normal(shape).astype(dtype)
        np.moveaxis(dy, ax, -1)[~mask] = 0
        gamma, beta = (1 + 0.3 * rng.standard_normal(C)).astype(acc), rng.standard_normal(C).astype(acc)
        rm, rv = np.zeros(C, acc), np.ones(C, acc)
        y, cache = gpubn.batch_norm_forward(
            x, gamma, beta, axis=axis, mask=mask, running_mean=rm, running_var=rv, backend=backend
        )
        dense = gathered(x, mask, axis)  # (n, C): the reference's own BN over them
        mean, var = stats(dense, 1)
        t = tol(dtype)
        assert y.dtype == dtype and y.shape == x.shape
        ry, _ = forward(x, gamma, beta, axis, mean=mean, var=var)  # every position, these statistics
        np.testing.assert_allclose(y.astype(np.float64), ry, **t)
        erm, erv = running_update(np.zeros(C), np.ones(C), dense, 1, 0.1)  # unbiased with n = mask.sum()
        np.testing.assert_allclose(rm, erm, **tol(acc))
        np.testing.assert_allclose(rv, erv, **tol(acc))
        dx, dgamma, dbeta = gpubn.batch_norm_backward(dy, cache)
        rdx, rdg, rdb = backward(gathered(dy, mask, axis), dense, gamma, 1)
        n = len(dense)
        np.testing.assert_allclose(gathered(dx, mask, axis).astype(np.float64), rdx, **t)
        np.testing.assert_allclose(dgamma, rdg, atol=t["atol"] * n, rtol=t["rtol"] * 10)
        np.testing.assert_allclose(dbeta, rdb, atol=t["atol"] * n, rtol=t["rtol"] * 10)
        assert not at_masked(dx, mask, axis).any()  # no gradient flows into masked inputs when dy is 0 there


def test_masked_values_never_enter_the_statistics(backend, rng):
    """NaN, Inf and huge values at masked positions change nothing (a padded batch
    whose padding is garbage); the statistics equal those of the True positions."""
    shape = (4, 3, 6)
    mask = random_mask(rng, shape, 1)
    x = rng.standard_normal(shape)
    bad = x.copy()
    garbage = np.array([np.nan, np.inf, -np.inf, 1e300])
    pad = np.moveaxis(bad, 1, -1)
    pad[~mask] = garbage[np.arange((~mask).sum()) % 4][:, None]
    mean, var = gpubn.batch_stats(bad, mask=mask, backend=backend)
    rmean, rvar = stats(gathered(x, mask, 1), 1)
    np.testing.assert_allclose(mean, rmean, atol=1e-12)
    np.testing.assert_allclose(var, rvar, atol=1e-12)
    y, _ = gpubn.batch_norm_forward(bad, mask=mask, backend=backend)
    ry, _ = forward(x, None, None, 1, mean=rmean, var=rvar)
    np.testing.assert_allclose(gathered(y, mask, 1), gathered(ry, mask, 1), atol=1e-12)


def test_all_true_mask_is_plain_batch_norm(backend, rng):
    x, dy = rng.standard_normal((5, 3, 4)), rng.standard_normal((5, 3, 4))
    y0, c0 = gpubn.batch_norm_forward(x, backend=backend)
    y1, c1 = gpubn.batch_norm_forward(x, mask=np.ones((5, 4), bool), backend=backend)
    np.testing.assert_allclose(y1, y0, atol=1e-13)
    for g1, g0 in zip(gpubn.batch_norm_backward(dy, c1), gpubn.batch_norm_backward(dy, c0), strict=True):
        np.testing.assert_allclose(g1, g0, atol=1e-12)


def test_cache_keeps_its_own_mask(backend, rng):
    """Changing the mask after the forward does not change the backward."""
    x, dy = rng.standard_normal((4, 2, 3)), rng.standard_normal((4, 2, 3))
    mask = random_mask(rng, x.shape, 1)
    _, cache = gpubn.batch_norm_forward(x, mask=mask, backend=backend)
    want = gpubn.batch_norm_backward(dy, gpubn.batch_norm_forward(x, mask=mask.copy(), backend=backend)[1])
    mask[...] = True
    for got, ref in zip(gpubn.batch_norm_backward(dy, cache), want, strict=True):
        np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize("activation,with_residual", [(None, False), ("sigmoid", True)])
def test_finite_differences(backend, rng, activation, with_residual):
    """The exact gradient when dy is 0 outside the mask (a masked loss): the
    outputs at masked positions still depend on the statistics, but their dy
    is 0; dx at a masked position is then 0 too."""
    shape = (3, 2, 4)
    mask = random_mask(rng, shape, 1)
    m3 = np.broadcast_to(mask[:, None, :], shape)
    x, w = rng.standard_normal(shape), np.where(m3, rng.standard_normal(shape), 0.0)
    z = rng.standard_normal(shape) if with_residual else None
    gamma, beta = np.array([1.3, -0.6]), np.array([0.2, -0.1])

    def loss(x, gamma, beta):
        y, _ = gpubn.batch_norm_forward(x, gamma, beta, mask=mask, activation=activation, residual=z, backend=backend)
        return (y * w).sum()

    _, cache = gpubn.batch_norm_forward(x, gamma, beta, mask=mask, activation=activation, residual=z, backend=backend)
    dx, dgamma, dbeta, *_ = gpubn.batch_norm_backward(w, cache)
    h = 1e-6
    for name, arr, grad in (("x", x, dx), ("gamma", gamma, dgamma), ("beta", beta, dbeta)):
        idxs = [np.unravel_index(k, arr.shape) for k in range(arr.size)] if name != "x" else None
        if name == "x":  # a masked and an unmasked position
            idxs = [tuple(np.argwhere(m3)[0]), tuple(np.argwhere(~m3)[0])]
        for idx in idxs:
            args = {"x": x, "gamma": gamma, "beta": beta}
            plus, minus = arr.copy(), arr.copy()
            plus[idx] += h
            minus[idx] -= h
            num = (loss(**{**args, name: plus}) - loss(**{**args, name: minus})) / (2 * h)
            assert abs(num - grad[idx]) < 1e-6, (name, idx, num, grad[idx])


@pytest.mark.parametrize("shape,axis", [((4, 3, 5), 1), ((9, 3), 1)])
@pytest.mark.parametrize("activation,with_residual", [(None, False), ("relu", True)])
def test_padding_values_never_reach_the_gradient(backend, rng, shape, axis, activation, with_residual):
    """NaN padding and zero padding give the same gradients, whatever dy holds
    at the padding (0 from a masked loss, or not): positions outside the mask
    never enter the backward's sums, and their dx (and dresidual) is 0."""
    mask = random_mask(rng, shape, axis)
    pad = np.broadcast_to(np.expand_dims(~mask, axis), shape)
    x = rng.standard_normal(shape)
    z = rng.standard_normal(shape) if with_residual else None
    gamma, beta = np.array([1.3, -0.6, 0.4]), np.array([0.2, -0.1, 0.3])
    for dy_at_padding in (0.0, np.nan, 5.0):
        dy = np.where(pad, dy_at_padding, rng.standard_normal(shape))
        grads = []
        for fill in (0.0, np.nan):
            xp = np.where(pad, fill, x)
            zp = None if z is None else np.where(pad, fill, z)
            _, cache = gpubn.batch_norm_forward(
                xp, gamma, beta, mask=mask, activation=activation, residual=zp, axis=axis, backend=backend
            )
            grads.append(gpubn.batch_norm_backward(dy, cache))
        for zero_padded, nan_padded in zip(*grads, strict=True):
            assert np.isfinite(nan_padded).all()
            np.testing.assert_array_equal(nan_padded, zero_padded)
        dx = grads[1][0]
        assert not dx[pad].any()
        if with_residual:
            assert not grads[1][3][pad].any()
        # and the sums are those of the True positions alone: the reference on the gathered values
        if activation is None:
            dense = gathered(x, mask, axis)
            _, rdg, rdb = backward(gathered(np.where(pad, 0.0, dy), mask, axis), dense, gamma, 1)
            np.testing.assert_allclose(grads[1][1], rdg, atol=1e-10)
            np.testing.assert_allclose(grads[1][2], rdb, atol=1e-10)


def test_batch_stats_and_moments_take_the_mask(backend, rng):
    x = rng.standard_normal((6, 3, 2)) + 1e4
    mask = random_mask(rng, x.shape, 1)
    dense = gathered(x, mask, 1)
    rmean, rvar = stats(dense, 1)
    mean, var = gpubn.batch_stats(x, mask=mask, backend=backend)
    np.testing.assert_allclose(mean, rmean, rtol=1e-13)
    np.testing.assert_allclose(var, rvar, rtol=1e-8)
    m = gpubn.moments(x, backend=backend, mask=mask)
    assert (m.count == mask.sum()).all()
    np.testing.assert_allclose(m.mean, rmean, rtol=1e-13)
    np.testing.assert_allclose(m.var(), rvar, rtol=1e-8)
    assert gpubn.moments(x, backend=backend, mask=np.zeros((6, 2), bool)).count.max() == 0


def test_layer_with_mask(backend, rng):
    """Training runs its statistics on the True positions; eval checks the mask and normalizes every
    position with the running statistics; recalibrate pools the masked moments."""
    bn = gpubn.BatchNorm(3, backend=backend, dtype="float64")
    erm, erv = np.zeros(3), np.ones(3)
    for _ in range(2):
        x, dy = rng.standard_normal((4, 3, 5)), rng.standard_normal((4, 3, 5))
        mask = random_mask(rng, x.shape, 1)
        y = bn(x, mask=mask)
        dense = gathered(x, mask, 1)
        mean, var = stats(dense, 1)
        np.testing.assert_allclose(np.asarray(y), forward(x, None, None, 1, mean=mean, var=var)[0], atol=1e-12)
        erm, erv = running_update(erm, erv, dense, 1, 0.1)
        np.testing.assert_allclose(np.asarray(bn.running_mean), erm, atol=1e-12)
        np.testing.assert_allclose(np.asarray(bn.running_var), erv, atol=1e-12)
        np.moveaxis(dy, 1, -1)[~mask] = 0
        dx = bn.backward(dy)
        rdx, rdg, rdb = backward(gathered(dy, mask, 1), dense, np.ones(3), 1)
        np.testing.assert_allclose(gathered(np.asarray(dx), mask, 1), rdx, atol=1e-10)
        np.testing.assert_allclose(np.asarray(bn.grads["gamma"]), rdg, atol=1e-10)
    bn.eval()
    np.testing.assert_allclose(np.asarray(bn(x, mask=mask)), np.asarray(bn(x)), atol=0)
    with pytest.raises(ValueError, match="mask: shape"):
        bn(x, mask=mask.T)
    bn.train()
    batches = [(rng.standard_normal((4, 3, 5)), random_mask(rng, (4, 3, 5), 1)) for _ in range(2)]
    with gpubn.recalibrate(bn):
        for x, mask in batches:
            bn(x, mask=mask)
    pooled = np.concatenate([gathered(x, mask, 1) for x, mask in batches])
    np.testing.assert_allclose(np.asarray(bn.running_mean), pooled.mean(0), atol=1e-12)
    np.testing.assert_allclose(np.asarray(bn.running_var), pooled.var(0, ddof=1), atol=1e-12)


def test_device_mask(rng):
    """On the CUDA backend the mask may be a device array (x on either side)."""
    if "cuda" not in gpubn.available_backends():
        pytest.skip("backend 'cuda' not available")
    from numba import cuda

    x = rng.standard_normal((4, 3, 5))
    mask = random_mask(rng, x.shape, 1)
    want, _ = gpubn.batch_norm_forward(x, mask=mask, backend="cpu")
    y, _ = gpubn.batch_norm_forward(x, mask=cuda.to_device(mask), backend="cuda")
    np.testing.assert_allclose(y, want, atol=1e-12)
    yd, _ = gpubn.batch_norm_forward(cuda.to_device(x), mask=cuda.to_device(mask), backend="cuda")
    np.testing.assert_allclose(yd.copy_to_host(), want, atol=1e-12)


def test_bad_masks_name_the_argument_and_change_nothing(backend):
    x = np.arange(24, dtype=np.float32).reshape(4, 3, 2)
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    one = np.zeros((4, 2), bool)
    one[0, 0] = True
    cases = [
        (np.ones((4, 3), bool), ValueError, r"mask: shape \(4, 3\) does not match x's non-feature axes \(4, 2\)"),
        (np.ones((4, 2), np.int8), TypeError, "mask: dtype int8; expected bool"),
        (np.ones((4, 2)), TypeError, "mask: dtype float64"),
        (one, ValueError, r"mask: 1 True position\(s\); training needs more than 1"),
        ([[True, False]] * 4, None, None),  # a nested list of bools is an array
    ]
    for mask, exc, msg in cases:
        if exc is None:
            gpubn.batch_norm_forward(x, mask=mask, backend=backend)
            continue
        with pytest.raises(exc, match=msg):
            gpubn.batch_norm_forward(x, running_mean=rm, running_var=rv, mask=mask, backend=backend)
        assert (rm == 0).all() and (rv == 1).all()
    with pytest.raises(ValueError, match="mask: no position is True"):
        gpubn.batch_stats(x, mask=np.zeros((4, 2), bool), backend=backend)
    # eval: the mask is checked, and one True position is enough (nothing is estimated)
    gpubn.batch_norm_forward(x, running_mean=rm, running_var=rv, training=False, mask=one, backend=backend)
    with pytest.raises(ValueError, match="mask: shape"):
        gpubn.batch_norm_forward(x, running_mean=rm, running_var=rv, training=False, mask=one.T, backend=backend)


def test_synchronized_layer_refuses_a_mask():
    """Not built yet: a clear error, nothing changed."""
    MPI = pytest.importorskip("mpi4py.MPI")
    bn = gpubn.BatchNorm(3, sync=MPI.COMM_SELF, backend="cpu", dtype="float64")
    x = np.arange(24.0).reshape(4, 3, 2)
    with pytest.raises(ValueError, match="mask: a synchronized layer takes no mask yet"):
        bn(x, mask=np.ones((4, 2), bool))
    assert bn.num_batches_tracked == 0 and (np.asarray(bn.running_mean) == 0).all()
