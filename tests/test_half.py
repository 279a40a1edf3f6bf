"""The CPU backend's float16 <-> float32 conversions agree with NumPy bit for bit."""

import numpy as np

from gpubn.kernels import half


def test_every_float16_to_float32():
    h = np.arange(65536, dtype=np.uint16).view(np.float16)
    ours, ref = half.to_float32(h), h.astype(np.float32)
    same = (ours.view(np.uint32) == ref.view(np.uint32)) | (np.isnan(ours) & np.isnan(ref))
    assert same.all()


def test_float32_to_float16_rounds_like_numpy():
    rng = np.random.default_rng(0)
    x = rng.standard_normal(1 << 16) * 10.0 ** rng.integers(-9, 6, 1 << 16)
    special = [np.inf, -np.inf, np.nan, 65504, 65519.99, 65520, 1e-8, 2.9802322e-08, 5.96e-8, 0.0, -0.0, 1 + 2**-11]
    x = np.concatenate([x, special]).astype(np.float32)
    ours = np.empty(x.shape, np.float16)
    half.store_float16(x, ours)
    with np.errstate(over="ignore"):
        ref = x.astype(np.float16)
    same = (ours.view(np.uint16) == ref.view(np.uint16)) | (np.isnan(ours) & np.isnan(ref))
    assert same.all(), x[~same][:5]


def test_strided_float16_destination():
    x = np.linspace(-3, 3, 60, dtype=np.float32).reshape(6, 10)
    dst = np.zeros((6, 20), np.float16)[:, ::2]
    half.store_float16(x, dst)
    np.testing.assert_array_equal(dst, x.astype(np.float16))
