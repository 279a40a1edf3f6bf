"""The ops' ``out=``: results written into the caller's arrays, against the float64
reference, and checked like every other argument (a call that raises changes nothing)."""

import numpy as np
import pytest
from numba import cuda

import gpubn

from reference import backward, forward, grad_tol, running_update, tol

SHAPE, AXIS, C = (6, 3, 4), 1, 3


def side(a, backend):
    """a on the backend's side: a device array on the CUDA backend (out= needs device input there)."""
    return cuda.to_device(a) if backend == "cuda" else a


def host(a):
    return a.copy_to_host() if hasattr(a, "copy_to_host") else np.asarray(a)


def data(rng):
    x = (2 + rng.standard_normal(SHAPE)).astype(np.float32)
    gamma = (1 + 0.3 * rng.standard_normal(C)).astype(np.float32)
    beta = rng.standard_normal(C).astype(np.float32)
    dy = rng.standard_normal(SHAPE).astype(np.float32)
    return x, gamma, beta, dy


def test_results_land_in_out(backend, rng):
    x, gamma, beta, dy = data(rng)
    xs = side(x, backend)
    o = side(np.full(SHAPE, np.nan, np.float32), backend)
    y, cache = gpubn.batch_norm_forward(xs, gamma, beta, backend=backend, out=o)
    assert y is o
    ry, _ = forward(x, gamma, beta, AXIS)
    np.testing.assert_allclose(host(y), ry, **tol(np.float32))
    outs = tuple(side(np.full(s, np.nan, np.float32), backend) for s in (SHAPE, (C,), (C,)))
    grads = gpubn.batch_norm_backward(side(dy, backend), cache, out=outs)
    assert all(g is o for g, o in zip(grads, outs, strict=True))
    rdx, rdg, rdb = backward(dy, x, gamma, AXIS)
    for got, want in zip(grads, (rdx, rdg, rdb), strict=True):
        np.testing.assert_allclose(host(got), want, **grad_tol(np.float32))
    # one of the three given, the others new
    dx, dgamma, dbeta = gpubn.batch_norm_backward(side(dy, backend), cache, out=(None, None, outs[2]))
    assert dbeta is outs[2] and dx is not outs[0]
    np.testing.assert_allclose(host(dx), rdx, **grad_tol(np.float32))
    mean, var = x.mean(axis=(0, 2)), x.var(axis=(0, 2))
    o2 = side(np.full(SHAPE, np.nan, np.float32), backend)
    assert gpubn.normalize(xs, mean, var, gamma, beta, backend=backend, out=o2) is o2
    np.testing.assert_allclose(host(o2), forward(x, gamma, beta, AXIS, mean=mean, var=var)[0], **tol(np.float32))


def test_forward_over_its_own_input(backend, rng):
    """out=x: the forward is right (statistics first, then y), and the backward,
    which reads x again, refuses instead of using y as x."""
    x, gamma, beta, dy = data(rng)
    xs = side(x.copy(), backend)
    rm, rv = np.zeros(C, np.float32), np.ones(C, np.float32)
    y, cache = gpubn.batch_norm_forward(xs, gamma, beta, running_mean=rm, running_var=rv, backend=backend, out=xs)
    assert y is xs
    np.testing.assert_allclose(host(xs), forward(x, gamma, beta, AXIS)[0], **tol(np.float32))
    erm, erv = running_update(np.zeros(C), np.ones(C), x, AXIS, 0.1)
    np.testing.assert_allclose(rm, erm, **tol(np.float32))
    np.testing.assert_allclose(rv, erv, **tol(np.float32))
    with pytest.raises(ValueError, match="wrote y over x"):
        gpubn.batch_norm_backward(side(dy, backend), cache)
    # over the residual: the same
    z = rng.standard_normal(SHAPE).astype(np.float32)
    zs = side(z.copy(), backend)
    _, cache = gpubn.batch_norm_forward(side(x, backend), residual=zs, activation="relu", backend=backend, out=zs)
    np.testing.assert_allclose(host(zs), np.maximum(forward(x, None, None, AXIS)[0] + z, 0), **tol(np.float32))
    with pytest.raises(ValueError, match="wrote y over residual"):
        gpubn.batch_norm_backward(side(dy, backend), cache)
    # out in the other half of x's own buffer: apart from x, so the backward runs
    both = side(np.concatenate([x, np.empty_like(x)]), backend)
    _, cache = gpubn.batch_norm_forward(both[:6], backend=backend, out=both[6:])
    np.testing.assert_allclose(host(gpubn.batch_norm_backward(side(dy, backend), cache)[0]),
                               backward(dy, x, None, AXIS)[0], **grad_tol(np.float32))  # fmt: skip


def bad_outs(backend):
    """(out, message fragment) pairs that must raise ValueError."""
    cases = [
        (np.empty((6, 3, 5), np.float32), "shape"),
        (np.empty(SHAPE, np.float64), "dtype"),
    ]
    if backend == "cpu":
        cases += [(np.empty(SHAPE, np.float32, order="F"), "C-contiguous"), (_read_only(), "writeable")]
    else:
        cases += [(np.empty(SHAPE, np.float32), "device")]  # a host out beside device input
    return [(side(o, backend) if backend == "cuda" and what != "device" else o, what) for o, what in cases]


def _read_only():
    a = np.empty(SHAPE, np.float32)
    a.setflags(write=False)
    return a


def test_bad_out_changes_nothing(backend, rng):
    x, gamma, beta, _ = data(rng)
    xs = side(x, backend)
    for out, what in bad_outs(backend):
        rm, rv = np.zeros(C, np.float32), np.ones(C, np.float32)
        with pytest.raises(ValueError, match="out"):
            gpubn.batch_norm_forward(xs, gamma, beta, running_mean=rm, running_var=rv, backend=backend, out=out)
        assert (rm == 0).all() and (rv == 1).all(), what
        with pytest.raises(ValueError, match="out"):
            gpubn.normalize(xs, np.zeros(C), np.ones(C), backend=backend, out=out)
