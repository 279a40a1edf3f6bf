"""Property-based tests (hypothesis): random shapes, axes, dtypes, offsets,
scales and strided views, every op against the float64 reference.

Profiles (GPUBN_HYPOTHESIS=ci|large; ci by default):
  ci     300 examples per test on the CPU backend, 25 (tiny) under the CUDA
         simulator, derandomized: the same examples every run;
  large  3000 examples per test, random: run on demand.
"""

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gpubn

from conftest import SIM
from reference import backward, forward, running_update, stats

settings.register_profile(
    "ci", max_examples=300, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck)
)
settings.register_profile("large", max_examples=3000, deadline=None, suppress_health_check=list(HealthCheck))
settings.load_profile(os.environ.get("GPUBN_HYPOTHESIS", "ci"))

SIM_EXAMPLES = 25
TOL = {np.float16: 3e-2, np.float32: 2e-4, np.float64: 1e-9}


@st.composite
def inputs(draw, tiny):
    ndim = draw(st.integers(1, 5))
    most = 3 if tiny else 6
    shape = tuple(draw(st.lists(st.integers(1, most), min_size=ndim, max_size=ndim)))
    axis = draw(st.integers(-ndim, ndim - 1))
    dtype = draw(st.sampled_from([np.float16, np.float32, np.float64]))
    offset = draw(st.sampled_from([0.0, -3.0, 50.0, 1e3]))
    scale = draw(st.sampled_from([1e-2, 1.0, 30.0]))
    seed = draw(st.integers(0, 2**32 - 1))
    view = draw(st.sampled_from(["contiguous", "transposed", "strided"]))
    rng = np.random.default_rng(seed)
    base = (offset + scale * rng.standard_normal(shape)).astype(dtype)
    if view == "transposed" and ndim > 1:
        perm = tuple(rng.permutation(ndim))
        x = np.ascontiguousarray(base.transpose(perm)).transpose(np.argsort(perm))  # same values, other strides
        assert x.shape == shape
    elif view == "strided":
        big = np.repeat(base, 2, axis=0)
        x = big[::2]
    else:
        x = base
    return x, axis, rng


def _examples(backend):
    return SIM_EXAMPLES if (backend == "cuda" and SIM) else None


def _close(actual, expected, dtype, scale=1.0, extra=0.0):
    actual = np.asarray(actual, np.float64)
    tol = TOL[np.dtype(dtype).type]
    np.testing.assert_allclose(actual, expected, atol=tol * max(scale, 1.0) + extra, rtol=tol)


def check_forward_backward(backend, case):
    x, axis, rng = case
    C = x.shape[axis]
    n = x.size // C
    acc = np.float64 if x.dtype == np.float64 else np.float32
    gamma = (1 + 0.5 * rng.standard_normal(C)).astype(acc)
    beta = rng.standard_normal(C).astype(acc)
    rm0, rv0 = rng.standard_normal(C).astype(acc), (0.5 + rng.random(C)).astype(acc)
    rm, rv = rm0.copy(), rv0.copy()

    mean, var = gpubn.batch_stats(x, axis=axis, backend=backend)
    emean, evar = stats(x, axis)
    stat_dtype = np.float64 if x.dtype == np.float64 else np.float32
    _close(mean, emean, stat_dtype, np.abs(emean).max())
    _close(var, evar, stat_dtype, evar.max())

    if n < 2:
        with pytest.raises(ValueError, match="more than 1 value per channel"):
            gpubn.batch_norm_forward(x, gamma, beta, axis=axis, running_mean=rm, running_var=rv, backend=backend)
        np.testing.assert_array_equal(rm, rm0)
        return
    y, cache = gpubn.batch_norm_forward(
        x, gamma, beta, axis=axis, running_mean=rm, running_var=rv, momentum=0.25, backend=backend
    )
    yref, _ = forward(x, gamma, beta, axis)
    assert y.shape == x.shape and y.dtype == x.dtype
    # The mean itself is a float32 (float64) number: half an ulp of |mean|,
    # divided by the spread, is an error no implementation avoids.
    invstd = 1 / np.sqrt(evar + 1e-5)
    cond = np.finfo(stat_dtype).eps * np.max(np.abs(emean) * invstd) * np.abs(gamma).max()
    _close(y, yref, x.dtype, np.abs(yref).max(), extra=4 * cond)
    erm, erv = running_update(rm0, rv0, x, axis, 0.25)
    _close(rm, erm, stat_dtype, np.abs(erm).max())
    _close(rv, erv, stat_dtype, np.abs(erv).max())

    dy = rng.standard_normal(x.shape).astype(x.dtype)
    dx, dg, db = gpubn.batch_norm_backward(dy, cache)
    edx, edg, edb = backward(dy, x, gamma, axis)
    dx_extra = 4 * cond * invstd.max() * np.abs(dy.astype(np.float64)).max()
    _close(dx, edx, x.dtype, np.abs(edx).max() * (10 if x.dtype == np.float16 else 1), extra=dx_extra)
    _close(dg, edg, x.dtype, np.abs(edg).max() + np.sqrt(n), extra=4 * cond * n)
    _close(db, edb, x.dtype, np.abs(edb).max() + np.sqrt(n))

    ye, _ = gpubn.batch_norm_forward(x, gamma, beta, axis=axis, training=False, running_mean=rm0, running_var=rv0,
                                     backend=backend)  # fmt: skip
    yeref, _ = forward(x, gamma, beta, axis, mean=rm0, var=rv0)
    _close(ye, yeref, x.dtype, np.abs(yeref).max())


@pytest.mark.parametrize("backend_name", ["cpu", "cuda"])
def test_random_inputs_match_reference(backend_name):
    if backend_name not in gpubn.available_backends():
        pytest.skip("backend not available")
    tiny = backend_name == "cuda" and SIM
    wanted = _examples(backend_name) or settings().max_examples
    seen = []

    @settings(max_examples=wanted)
    @given(inputs(tiny))
    def run(case):
        seen.append(case[0].shape)
        check_forward_backward(backend_name, case)

    run()
    assert len(seen) >= wanted  # the examples really ran
    print(f"{backend_name}: {len(seen)} examples, {len(set(seen))} distinct shapes")


@pytest.mark.parametrize("backend_name", ["cpu", "cuda"])
def test_random_layer_steps(backend_name):
    """The layer over a few steps against the same reference, random layouts."""
    if backend_name not in gpubn.available_backends():
        pytest.skip("backend not available")
    tiny = backend_name == "cuda" and SIM

    @settings(max_examples=(SIM_EXAMPLES // 2) if tiny else 100)
    @given(inputs(tiny), st.sampled_from([0.1, 0.5, None]))
    def run(case, momentum):
        x, axis, rng = case
        x = x.astype(np.float64)
        C = x.shape[axis]
        if x.size // C < 2:
            return
        bn = gpubn.BatchNorm(C, axis=axis, momentum=momentum, backend=backend_name, dtype="float64")
        rm, rv = np.zeros(C), np.ones(C)
        for step in range(1, 4):
            xs = x + step
            y = bn(xs)
            m = momentum if momentum is not None else 1.0 / step
            rm, rv = running_update(rm, rv, xs, axis, m)
            _close(y, forward(xs, None, None, axis)[0], np.float64)
        _close(bn.running_mean, rm, np.float64)
        _close(bn.running_var, rv, np.float64)
        assert bn.num_batches_tracked == 3

    run()
