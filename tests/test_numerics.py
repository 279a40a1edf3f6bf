"""design.md section 5: numerics and edge cases that must be right, both backends."""

import numpy as np
import pytest

import gpubn

from conftest import SIM
from reference import stats

N = 64 if SIM else 4096


@pytest.mark.parametrize("offset", [1e4, 1e6])
def test_large_offset_variance(backend, rng, offset):
    """mean 1e4 / 1e6, std 1, float32: variance within 1e-4 relative of the
    float64 variance of the same float32 values."""
    x = (offset + rng.standard_normal((N, 3, 8))).astype(np.float32)
    _, var = gpubn.batch_stats(x, backend=backend)
    _, ref = stats(x, 1)
    np.testing.assert_allclose(var, ref, rtol=1e-4)
    # and the channels-last regime
    xt = np.ascontiguousarray(x.transpose(0, 2, 1))
    _, var = gpubn.batch_stats(xt, axis=-1, backend=backend)
    np.testing.assert_allclose(var, ref, rtol=1e-4)


def test_tiny_variance_under_large_mean_float64(backend, rng):
    x = 1e8 + 1e-4 * rng.standard_normal((N, 2))
    mean, var = gpubn.batch_stats(x, backend=backend)
    _, ref = stats(x, 1)
    np.testing.assert_allclose(var, ref, rtol=1e-6)


@pytest.mark.parametrize("layout", ["inner", "channels"])
def test_constant_channel_gives_exactly_beta(backend, rng, layout):
    x = rng.standard_normal((9, 3, 5)).astype(np.float32)
    x[:, 1, :] = 0.1  # not exactly representable: a naive mean is off by an ulp
    beta = np.array([0.5, -1.25, 2.0], np.float32)
    gamma = np.array([2.0, 3.0, 4.0], np.float32)
    if layout == "channels":
        x = np.ascontiguousarray(x.transpose(0, 2, 1))
    axis = 1 if layout == "inner" else -1
    y, _ = gpubn.batch_norm_forward(x, gamma, beta, axis=axis, backend=backend)
    ch = y[:, 1, :] if layout == "inner" else y[:, :, 1]
    assert np.all(ch == beta[1])


def test_float16_whose_squares_overflow(backend, rng):
    x = (300 + 20 * rng.standard_normal((16, 2, 6))).astype(np.float16)
    with np.errstate(over="ignore"):
        assert not np.isfinite(np.float16(300) * np.float16(300))
    y, cache = gpubn.batch_norm_forward(x, backend=backend)
    mean, var = gpubn.batch_stats(x, backend=backend)
    assert np.all(np.isfinite(y)) and np.all(np.isfinite(var))
    np.testing.assert_allclose(var, stats(x, 1)[1], rtol=1e-3)
    dx, dg, db = gpubn.batch_norm_backward(np.ones_like(x), cache)
    assert np.all(np.isfinite(dx))


def test_denormal_inputs(backend):
    x = np.full((8, 2), 1e-40, np.float32)
    x[::2, 0] = 3e-40
    y, _ = gpubn.batch_norm_forward(x, backend=backend)
    assert np.all(np.isfinite(y))
    np.testing.assert_array_equal(y[:, 1], 0)  # constant channel


def test_single_value_per_channel_training_raises(backend):
    with pytest.raises(ValueError, match="x: expected more than 1 value per channel"):
        gpubn.batch_norm_forward(np.ones((1, 4), np.float32), backend=backend)
    # inference with one sample is fine
    y, _ = gpubn.batch_norm_forward(
        np.ones((1, 4), np.float32),
        training=False,
        running_mean=np.zeros(4, np.float32),
        running_var=np.ones(4, np.float32),
        backend=backend,
    )
    np.testing.assert_allclose(y, 1 / np.sqrt(1 + 1e-5), rtol=1e-6)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
# the simulator computes in NumPy scalars, which warn at inf - inf
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_nan_inf_confined_to_channel(backend, rng, bad):
    x = rng.standard_normal((10, 3, 4)).astype(np.float32)
    x[3, 1, 2] = bad
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    y, cache = gpubn.batch_norm_forward(x, running_mean=rm, running_var=rv, backend=backend)
    assert np.all(np.isfinite(y[:, [0, 2]]))
    assert not np.any(np.isfinite(y[:, 1]) & (y[:, 1] != 0)) or np.isnan(y[:, 1]).all()
    assert np.isnan(y[:, 1]).all()
    assert np.all(np.isfinite(rm[[0, 2]])) and np.all(np.isfinite(rv[[0, 2]]))
    dx, dg, db = gpubn.batch_norm_backward(np.ones_like(x), cache)
    assert np.all(np.isfinite(dx[:, [0, 2]])) and np.isfinite(dg[[0, 2]]).all()


def test_single_huge_outlier(backend, rng):
    x = rng.standard_normal((N, 2)).astype(np.float32)
    x[0, 0] = 1e6  # also the first value seen: the worst shift for shifted sums
    mean, var = gpubn.batch_stats(x, backend=backend)
    rmean, rvar = stats(x, 1)
    # any float32 sum that meets the outlier rounds at its ulp
    np.testing.assert_allclose(mean, rmean, rtol=1e-6, atol=np.finfo(np.float32).eps * 1e6)
    np.testing.assert_allclose(var, rvar, rtol=1e-4)


@pytest.mark.parametrize("offset", [0.0, 1e4])
@pytest.mark.parametrize("layout", ["channels-last", "nchw"])
def test_outliers_among_the_first_values(rng, offset, layout):
    """CPU: the one-pass moments are centered on the mean of each channel's
    first 16 values; outliers there put the center ~64 standard deviations off
    (one pass alone: 5e-4 relative variance error), and a second pass recenters."""
    if layout == "channels-last":
        x = (offset + rng.standard_normal((1 << 16, 3))).astype(np.float32)
        x[:16, 0] = offset + 1e6
        axis = 1
    else:
        x = (offset + rng.standard_normal((16, 3, 4096))).astype(np.float32)
        x[0, 0, :16] = offset + 1e6
        axis = 1
    mean, var = gpubn.batch_stats(x, axis=axis, backend="cpu")
    rmean, rvar = stats(x, axis)
    np.testing.assert_allclose(var, rvar, rtol=2e-5)
    np.testing.assert_allclose(mean, rmean, rtol=1e-6, atol=1e-6 * np.abs(x).max())


@pytest.mark.parametrize("offset", [1e4, 1e6])
def test_offset_variance_no_worse_than_torch(backend, rng, offset):
    """Where PyTorch is installed: our variance error <= torch's on the same data."""
    torch = pytest.importorskip("torch")
    x = (offset + rng.standard_normal((N, 3, 8))).astype(np.float32)
    _, ref = stats(x, 1)
    _, var = gpubn.batch_stats(x, backend=backend)
    t_var = torch.var_mean(torch.from_numpy(x), dim=(0, 2), unbiased=False)[0].numpy()
    ours = np.abs(var - ref).max() / ref.max()
    theirs = np.abs(t_var - ref).max() / ref.max()
    assert ours <= max(theirs, 1e-6), (ours, theirs)


@pytest.mark.parametrize("shape", [(64, 8, 50), (100, 16, 1)], ids=["inner", "channels"])
def test_kernel_moments_accumulate_in_float64_whatever_out_dtype(rng, shape):
    """kernels.channel_moments_cpu (called directly, as examples/kernels_direct.py
    does) sums and merges in float64 and only stores into ``out``: a float32
    ``out`` holds the float64 results rounded once (summed in a float32 ``out``,
    M2 of the inner shape was 6x further from the float64 value)."""
    from gpubn.kernels import channel_moments_cpu

    x = (1000 + 0.01 * rng.standard_normal(shape)).astype(np.float32)
    out64, out32 = np.empty((3, shape[1])), np.empty((3, shape[1]), np.float32)
    channel_moments_cpu(x, out64)
    channel_moments_cpu(x, out32)
    np.testing.assert_array_equal(out32, out64.astype(np.float32))
