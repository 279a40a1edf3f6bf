"""The functional API against the float64 reference, on both backends."""

import numpy as np
import pytest
from numba import cuda

import gpubn

from conftest import SIM
from reference import backward, forward, grad_tol, running_update, stats, tol

# (shape, feature axis): every layout of design.md's canonical-view table, plus
# 3-D and 5-D.  Under the simulator every CUDA thread is a Python thread: tiny.
LAYOUTS = [
    ((33, 5), 1),  # (N, C) dense
    ((4, 3, 5, 7), 1),  # NCHW
    ((3, 4, 5, 6), -1),  # channels-last
    ((3, 41), 0),  # course layout: features x examples
    ((5, 4, 9), 1),  # (N, C, L)
    ((2, 3, 2, 3, 4), 1),  # NCDHW
]
if not SIM:
    LAYOUTS += [((64, 17, 33, 31), 1), ((1025, 129), 1), ((16, 7, 7, 128), -1), ((20, 6, 4097), 1)]

# awkward (N, C) sizes around block and warp edges
EDGE_SIZES = [(2, 1), (3, 17), (17, 3), (31, 33)] if SIM else [(2, 1), (1023, 15), (1025, 129), (129, 1025), (7, 255)]
DTYPES = [np.float16, np.float32, np.float64]


def make(rng, shape, dtype, offset=-2.3, spread=0.5):
    """Deliberately offset data (Triton's tutorial trick) so cancellation shows."""
    return (offset + spread * rng.standard_normal(shape)).astype(dtype)


def host(a):
    return a.copy_to_host() if hasattr(a, "copy_to_host") else np.asarray(a)


@pytest.mark.parametrize("shape,axis", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_batch_stats(backend, rng, shape, axis, dtype):
    x = make(rng, shape, dtype)
    mean, var = gpubn.batch_stats(x, axis=axis, backend=backend)
    rmean, rvar = stats(x, axis)
    acc = np.float64 if dtype == np.float64 else np.float32
    assert mean.dtype == acc and var.dtype == acc and mean.shape == (x.shape[axis],)
    t = tol(np.float32 if dtype == np.float16 else dtype)  # statistics accumulate in float32
    np.testing.assert_allclose(mean, rmean, **t)
    np.testing.assert_allclose(var, rvar, **t)


@pytest.mark.parametrize("shape,axis", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_backward_training(backend, rng, shape, axis, dtype):
    x = make(rng, shape, dtype)
    C = x.shape[axis]
    acc = np.float64 if dtype == np.float64 else np.float32
    gamma = (1 + 0.3 * rng.standard_normal(C)).astype(acc)
    beta = rng.standard_normal(C).astype(acc)
    rm0 = rng.standard_normal(C).astype(acc)
    rv0 = (1 + rng.random(C)).astype(acc)
    rm, rv = rm0.copy(), rv0.copy()
    y, cache = gpubn.batch_norm_forward(
        x, gamma, beta, axis=axis, running_mean=rm, running_var=rv, momentum=0.3, backend=backend
    )
    assert y.shape == x.shape and y.dtype == x.dtype
    yref, _ = forward(x, gamma, beta, axis)
    np.testing.assert_allclose(y.astype(np.float64), yref, **tol(dtype))
    erm, erv = running_update(rm0, rv0, x, axis, 0.3)
    t = tol(np.float32 if dtype == np.float16 else dtype)
    np.testing.assert_allclose(rm, erm, **t)
    np.testing.assert_allclose(rv, erv, **t)

    dy = rng.standard_normal(shape).astype(dtype)
    dx, dgamma, dbeta = gpubn.batch_norm_backward(dy, cache)
    edx, edg, edb = backward(dy, x, gamma, axis)
    assert dx.shape == x.shape and dx.dtype == x.dtype and dgamma.dtype == acc
    n = x.size // C
    np.testing.assert_allclose(dx.astype(np.float64), edx, **tol(dtype))
    # sums of n terms of order 1: error grows like n * eps at worst
    atol, rtol = tol(dtype).values()
    np.testing.assert_allclose(dgamma, edg, atol=atol * np.sqrt(n) * 4, rtol=rtol)
    np.testing.assert_allclose(dbeta, edb, atol=atol * np.sqrt(n) * 4, rtol=rtol)


@pytest.mark.parametrize("dtype", DTYPES)
def test_folded_rows(rng, dtype):
    """Narrow channel rows of a large input, folded side by side on the CPU
    (``kernels.common.fold_rows``): statistics, y, the running statistics and
    the gradients as the reference's."""
    from gpubn.kernels.plan import plan_for

    shape = (4096, 64)
    assert plan_for("cpu", (*shape, 1), np.dtype(dtype)).fold > 1  # the case under test
    x = make(rng, shape, dtype)
    acc = np.float64 if dtype == np.float64 else np.float32
    gamma = (1 + 0.3 * rng.standard_normal(64)).astype(acc)
    rm, rv = np.zeros(64, acc), np.ones(64, acc)
    y, cache = gpubn.batch_norm_forward(x, gamma, running_mean=rm, running_var=rv, momentum=1.0, backend="cpu")
    np.testing.assert_allclose(y.astype(np.float64), forward(x, gamma, None, 1)[0], **tol(dtype))
    erm, erv = running_update(np.zeros(64), np.ones(64), x, 1, 1.0)
    t = tol(np.float32 if dtype == np.float16 else dtype)
    np.testing.assert_allclose(rm, erm, **t)
    np.testing.assert_allclose(rv, erv, **t)
    dy = rng.standard_normal(shape).astype(dtype)
    dx, dgamma, dbeta = gpubn.batch_norm_backward(dy, cache)
    edx, edg, edb = backward(dy, x, gamma, 1)
    np.testing.assert_allclose(dx.astype(np.float64), edx, **grad_tol(dtype))
    atol, rtol = tol(dtype).values()
    np.testing.assert_allclose(dgamma, edg, atol=atol * np.sqrt(4096) * 4, rtol=rtol)
    np.testing.assert_allclose(dbeta, edb, atol=atol * np.sqrt(4096) * 4, rtol=rtol)


@pytest.mark.parametrize("shape3", [(33, 5, 1), (4, 3, 35)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_plan_takes_either_view(rng, shape3, dtype):
    """A CPU plan given canonical (outer, C, inner) views, or views already in
    its ``kernel_shape`` (gpubn.torch's), computes the same bits; both match
    the float64 reference."""
    from gpubn.kernels.plan import plan_for

    plan = plan_for("cpu", shape3, np.dtype(dtype))
    C, acc = shape3[1], np.float64 if dtype == np.float64 else np.float32
    x, dy = make(rng, shape3, dtype), rng.standard_normal(shape3).astype(dtype)
    results = []
    for view in (lambda a: a, lambda a: a.reshape(plan.kernel_shape)):
        y, dx = np.empty(shape3, dtype), np.empty(shape3, dtype)
        coef, bcoef, grads = np.empty((5, C), acc), np.empty((5, C), acc), np.empty((2, C), acc)
        ones, zeros, unused = np.ones(C, acc), np.zeros(C, acc), np.empty((2, C), acc)
        plan.forward_train(view(x), None, coef, ones, zeros, *unused, 1e-5, 0.0, False, 0, None, view(y))
        plan.backward(view(dy), view(x), None, None, coef, True, bcoef, grads[0], grads[1], 0, view(dx), None)
        results.append((y, dx, grads))
    for a, b in zip(results[0], results[1], strict=True):
        np.testing.assert_array_equal(a, b)
    y, dx, (dgamma, dbeta) = results[0]
    np.testing.assert_allclose(y.astype(np.float64), forward(x, None, None, 1)[0], **tol(dtype))
    edx, edg, edb = backward(dy, x, None, 1)
    np.testing.assert_allclose(dx.astype(np.float64), edx, **grad_tol(dtype))
    atol, rtol = tol(dtype).values()
    n = shape3[0] * shape3[2]
    np.testing.assert_allclose(dgamma, edg, atol=atol * np.sqrt(n) * 4, rtol=rtol)
    np.testing.assert_allclose(dbeta, edb, atol=atol * np.sqrt(n) * 4, rtol=rtol)


@pytest.mark.parametrize("shape", EDGE_SIZES)
def test_edge_sizes(backend, rng, shape):
    x = make(rng, shape, np.float32)
    y, cache = gpubn.batch_norm_forward(x, backend=backend)
    np.testing.assert_allclose(y, forward(x, None, None, 1)[0], **tol(np.float32))
    dy = rng.standard_normal(shape).astype(np.float32)
    dx, _, _ = gpubn.batch_norm_backward(dy, cache)
    np.testing.assert_allclose(dx, backward(dy, x, None, 1)[0], **grad_tol(np.float32))


@pytest.mark.parametrize("dtype", DTYPES)
def test_inference_uses_running_stats(backend, rng, dtype):
    x = make(rng, (6, 4, 3, 5), dtype)
    acc = np.float64 if dtype == np.float64 else np.float32
    gamma, beta = rng.standard_normal(4).astype(acc), rng.standard_normal(4).astype(acc)
    rm, rv = rng.standard_normal(4).astype(acc), (0.5 + rng.random(4)).astype(acc)
    rm0, rv0 = rm.copy(), rv.copy()
    y, cache = gpubn.batch_norm_forward(
        x, gamma, beta, training=False, running_mean=rm, running_var=rv, backend=backend
    )
    np.testing.assert_allclose(y.astype(np.float64), forward(x, gamma, beta, 1, mean=rm, var=rv)[0], **tol(dtype))
    np.testing.assert_array_equal(rm, rm0)  # inference never updates
    np.testing.assert_array_equal(rv, rv0)
    dy = rng.standard_normal(x.shape).astype(dtype)
    dx, dg, db = gpubn.batch_norm_backward(dy, cache)
    edx, edg, edb = backward(dy, x, gamma, 1, training=False, mean=rm, var=rv)
    np.testing.assert_allclose(dx.astype(np.float64), edx, **tol(dtype))
    np.testing.assert_allclose(dg, edg, atol=0.05 if dtype == np.float16 else 1e-3, rtol=1e-3)


def test_normalize_matches_reference(backend, rng):
    x = make(rng, (5, 3, 4), np.float32)
    mean, var = rng.standard_normal(3), 0.5 + rng.random(3)
    gamma, beta = rng.standard_normal(3), rng.standard_normal(3)
    y = gpubn.normalize(x, mean, var, gamma, beta, eps=1e-3, backend=backend)
    ref, _ = forward(x, gamma, beta, 1, eps=1e-3, mean=mean, var=var)
    np.testing.assert_allclose(y, ref, **tol(np.float32))
    # without gamma/beta: plain standardization
    y = gpubn.normalize(x, mean, var, axis=1, backend=backend)
    np.testing.assert_allclose(y, forward(x, None, None, 1, mean=mean, var=var)[0], **tol(np.float32))


def test_backward_finite_differences(backend, rng):
    """dx, dgamma, dbeta against central differences of L = sum(y * w)."""
    x = rng.standard_normal((4, 3, 5))
    gamma, beta = 1 + 0.2 * rng.standard_normal(3), rng.standard_normal(3)
    w = rng.standard_normal(x.shape)

    def loss(x_, g_, b_):
        y, _ = gpubn.batch_norm_forward(x_, g_, b_, backend=backend)
        return float((y * w).sum())

    _, cache = gpubn.batch_norm_forward(x, gamma, beta, backend=backend)
    dx, dg, db = gpubn.batch_norm_backward(w, cache)
    h = 1e-6
    for idx in [(0, 0, 0), (3, 2, 4), (1, 1, 2)]:
        e = np.zeros_like(x)
        e[idx] = h
        num = (loss(x + e, gamma, beta) - loss(x - e, gamma, beta)) / (2 * h)
        assert abs(num - dx[idx]) < 1e-6 * max(1, abs(num))
    for c in range(3):
        e = np.zeros(3)
        e[c] = h
        assert abs((loss(x, gamma + e, beta) - loss(x, gamma - e, beta)) / (2 * h) - dg[c]) < 1e-6
        assert abs((loss(x, gamma, beta + e) - loss(x, gamma, beta - e)) / (2 * h) - db[c]) < 1e-6


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_seed_identity(backend, rng, dtype):
    """The course's remark: gamma = sqrt(var + eps), beta = mean gives y == x."""
    x = make(rng, (7, 4, 6), dtype, offset=3.0, spread=2.0)
    mean, var = stats(x, 1)
    eps = 1e-5
    y, _ = gpubn.batch_norm_forward(x, np.sqrt(var + eps), mean, eps=eps, backend=backend)
    np.testing.assert_allclose(y, x, **tol(dtype))


def test_non_contiguous_inputs(backend, rng):
    base = make(rng, (6, 10, 8), np.float32)
    for x, axis in [(base[:, ::2, :], 1), (base.transpose(2, 0, 1), -1), (base[::2, :, 1:7], 2), (base.T, 0)]:
        assert not x.flags.c_contiguous
        y, cache = gpubn.batch_norm_forward(x, axis=axis, backend=backend)
        np.testing.assert_allclose(y, forward(x, None, None, axis)[0], **tol(np.float32))
        dy = rng.standard_normal(x.shape).astype(np.float32)
        dx, _, _ = gpubn.batch_norm_backward(dy.T.copy().T, cache)  # dy non-contiguous too
        np.testing.assert_allclose(dx, backward(dy, x, None, axis)[0], **grad_tol(np.float32))


def test_device_arrays_stay_on_device(rng):
    if "cuda" not in gpubn.available_backends():
        pytest.skip("no CUDA backend")
    x = make(rng, (5, 3, 4), np.float32)
    gamma, beta = rng.standard_normal(3).astype(np.float32), rng.standard_normal(3).astype(np.float32)
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    d_x, d_rm, d_rv = cuda.to_device(x), cuda.to_device(rm), cuda.to_device(rv)
    y, cache = gpubn.batch_norm_forward(
        d_x, cuda.to_device(gamma), beta, running_mean=d_rm, running_var=d_rv, backend="cuda"
    )
    assert hasattr(y, "copy_to_host")
    np.testing.assert_allclose(y.copy_to_host(), forward(x, gamma, beta, 1)[0], **tol(np.float32))
    erm, erv = running_update(rm, rv, x, 1, 0.1)
    np.testing.assert_allclose(d_rm.copy_to_host(), erm, **tol(np.float32))
    np.testing.assert_allclose(d_rv.copy_to_host(), erv, **tol(np.float32))
    dy = rng.standard_normal(x.shape).astype(np.float32)
    dx, dg, db = gpubn.batch_norm_backward(cuda.to_device(dy), cache)
    assert hasattr(dx, "copy_to_host") and hasattr(dg, "copy_to_host")
    np.testing.assert_allclose(dx.copy_to_host(), backward(dy, x, gamma, 1)[0], atol=1e-4, rtol=1e-4)
    mean, var = gpubn.batch_stats(d_x, backend="cuda")
    np.testing.assert_allclose(mean.copy_to_host(), stats(x, 1)[0], **tol(np.float32))


def test_running_stats_in_other_dtype(backend, rng):
    """float64 running statistics with float32 input are updated in place."""
    x = make(rng, (8, 3), np.float32)
    rm, rv = np.zeros(3), np.ones(3)
    gpubn.batch_norm_forward(x, running_mean=rm, running_var=rv, backend=backend)
    erm, erv = running_update(np.zeros(3), np.ones(3), x, 1, 0.1)
    np.testing.assert_allclose(rm, erm, **tol(np.float32))
    np.testing.assert_allclose(rv, erv, **tol(np.float32))


def test_forward_cache_holds_x_but_not_the_parameters(backend, rng):
    """The documented contract (ForwardCache, README, RELIABILITY.md): gamma,
    beta and the running statistics may change between forward and backward;
    x is referenced, not copied, so it must not."""
    x = make(rng, (6, 3, 4), np.float64)
    gamma, beta = np.array([2.0, -1.0, 0.5]), np.array([0.3, 0.0, -0.2])
    rm, rv = np.zeros(3), np.ones(3)
    gamma0 = gamma.copy()
    _, cache = gpubn.batch_norm_forward(x, gamma, beta, running_mean=rm, running_var=rv, backend=backend)
    gamma *= 10
    beta += 1
    rm += 5
    rv *= 3
    dy = rng.standard_normal(x.shape)
    dx, dgamma, dbeta = gpubn.batch_norm_backward(dy, cache)
    edx, edg, edb = backward(dy, x, gamma0, 1)
    np.testing.assert_allclose(dx, edx, atol=1e-10)
    np.testing.assert_allclose(dgamma, edg, atol=1e-10)
    np.testing.assert_allclose(dbeta, edb, atol=1e-10)
    if backend == "cpu":  # x itself is the cache's view: no copy (on the CUDA backend a host x is copied)
        assert np.shares_memory(cache.inp.view, x)

    def fields(o):
        return [getattr(o, k) for k in o.__slots__]

    held = fields(cache) + fields(cache.inp) + list(cache.inp.src)
    assert not any(v is gamma or v is beta or v is rm or v is rv for v in held)


@pytest.mark.parametrize("training", [True, False])
def test_read_only_inputs(backend, rng, training):
    """np.frombuffer / memory-mapped arrays: x, dy, gamma, beta are only read;
    running statistics only in inference (training=False)."""

    def frozen(a):
        a = np.array(a)
        a.flags.writeable = False
        return a

    x = make(rng, (5, 3, 2), np.float32)
    gamma, beta = frozen(np.array([1.5, 0.5, 1.0], np.float32)), frozen(np.array([0.1, 0.2, 0.3], np.float32))
    rm, rv = frozen(np.array([0.1, -0.2, 0.0], np.float32)), frozen(np.array([1.0, 2.0, 0.5], np.float32))
    stats_kw = {} if training else dict(running_mean=rm, running_var=rv)
    y, cache = gpubn.batch_norm_forward(frozen(x), gamma, beta, training=training, backend=backend, **stats_kw)
    mean, var = (None, None) if training else (rm, rv)
    np.testing.assert_allclose(y, forward(x, gamma, beta, 1, mean=mean, var=var)[0], **tol(np.float32))
    dy = make(rng, x.shape, np.float32)
    dx, dgamma, _ = gpubn.batch_norm_backward(frozen(dy), cache)
    edx, edg, _ = backward(dy, x, gamma, 1, training=training, mean=mean, var=var)
    np.testing.assert_allclose(dx, edx, **tol(np.float32))
    np.testing.assert_allclose(dgamma, edg, atol=1e-4)
    z = gpubn.normalize(frozen(x), rm, rv, gamma, beta, backend=backend)
    np.testing.assert_allclose(z, forward(x, gamma, beta, 1, mean=rm, var=rv)[0], **tol(np.float32))
    if training:  # running statistics that would be updated must be writable
        with pytest.raises(ValueError, match="running_mean: array is read-only"):
            gpubn.batch_norm_forward(x, gamma, beta, running_mean=rm, running_var=rv.copy(), backend=backend)


@pytest.mark.parametrize("bad", ["no", "False", 0, 1, None, np.float64(1.0)])
def test_training_flag_must_be_a_bool(backend, bad):
    x = np.arange(12, dtype=np.float32).reshape(4, 3)
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    with pytest.raises(TypeError, match="training: expected True or False"):
        gpubn.batch_norm_forward(x, training=bad, running_mean=rm, running_var=rv, backend=backend)
    np.testing.assert_array_equal(rm, 0)  # nothing updated
    np.testing.assert_array_equal(rv, 1)
    y, _ = gpubn.batch_norm_forward(x, training=np.bool_(False), running_mean=rm, running_var=rv, backend=backend)
    np.testing.assert_allclose(y, x / np.sqrt(1 + 1e-5), rtol=1e-6)


def test_shape_caches_stay_bounded(monkeypatch, rng):
    """Ever new shapes (variable-length inputs) do not grow the caches of
    plans and call shapes past MAX_SHAPES; a forgotten shape is planned again."""
    from gpubn import functional
    from gpubn.kernels import plan

    monkeypatch.setattr(plan, "MAX_SHAPES", 4)
    first = (1 + rng.standard_normal((5, 3, 2))).astype(np.float32)
    for length in range(2, 12):
        x = first if length == 2 else rng.standard_normal((5, 3, length)).astype(np.float32)
        y, _ = gpubn.batch_norm_forward(x, backend="cpu")
        np.testing.assert_allclose(y, forward(x, None, None, 1)[0], **tol(np.float32))
        assert len(plan._plans) <= 4 and len(functional._SHAPES) <= 4
    y, _ = gpubn.batch_norm_forward(first, backend="cpu")  # its plan long forgotten
    np.testing.assert_allclose(y, forward(first, None, None, 1)[0], **tol(np.float32))
