"""The CPU kernels' float16 loads and stores (half.widen / half.narrow, inlined
into fastmath kernels, serial and parallel) agree with NumPy bit for bit."""

import os
import subprocess
import sys

import numpy as np
import pytest
from numba import prange

import gpubn
from gpubn.kernels import half
from gpubn.kernels.common import cpu_kernel

from reference import backward, forward, tol


def _widen_all(src, dst):
    for i in prange(src.shape[0]):
        dst[i] = half.widen(src[i])


def _narrow_all(src, dst):
    for i in prange(src.shape[0]):
        dst[i] = half.narrow(src[i], dst)


def _recipe_widen_all(src, dst):
    for i in prange(src.shape[0]):
        dst[i] = half.half_to_float(src[i])


def _recipe_narrow_all(src, dst):
    for i in prange(src.shape[0]):
        dst[i] = half.float_to_half(src[i])


# what the kernels use (F16C instructions here when half.HARDWARE_HALF), and
# the portable bit recipes used where it is False
WIDEN = {"kernels": cpu_kernel(_widen_all), "recipe": cpu_kernel(_recipe_widen_all)}
NARROW = {"kernels": cpu_kernel(_narrow_all), "recipe": cpu_kernel(_recipe_narrow_all)}
CASES = [(impl, variant) for impl in ("kernels", "recipe") for variant in ("serial", "parallel")]


def same_bits(a, b):
    bits = {2: np.uint16, 4: np.uint32}[a.dtype.itemsize]
    return (a.view(bits) == b.view(bits)) | (np.isnan(a) & np.isnan(b))


@pytest.mark.parametrize("impl, variant", CASES)
def test_every_float16_widens_exactly(impl, variant):
    h = np.arange(65536, dtype=np.uint16)
    ours = np.empty(h.shape, np.float32)
    getattr(WIDEN[impl], variant)(h, ours)
    assert same_bits(ours, h.view(np.float16).astype(np.float32)).all()


@pytest.mark.parametrize("impl, variant", CASES)
def test_float32_narrows_like_numpy(impl, variant):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(1 << 16) * 10.0 ** rng.integers(-9, 6, 1 << 16)
    special = [np.inf, -np.inf, np.nan, 65504, 65519.99, 65520, 1e-8, 2.9802322e-08, 5.96e-8, 0.0, -0.0, 1 + 2**-11]
    x = np.concatenate([x, special]).astype(np.float32)
    ours = np.empty(x.shape, np.uint16)
    getattr(NARROW[impl], variant)(x, ours)
    with np.errstate(over="ignore"):
        ref = x.astype(np.float16)
    same = same_bits(ours.view(np.float16), ref)
    assert same.all(), x[~same][:5]


@pytest.mark.parametrize("dy_dtype", [np.float16, np.float32])
def test_strided_float16_input_and_gradient(rng, dy_dtype):
    """float16 read through strided uint16 views, both regimes, forward and backward."""
    base = rng.standard_normal((6, 40, 4)).astype(np.float16)
    for x, axis in ((base[:, ::2], 1), (base[:, :, ::2].transpose(0, 2, 1), -1)):
        y, cache = gpubn.batch_norm_forward(x, axis=axis, backend="cpu")
        assert y.dtype == np.float16 and y.shape == x.shape
        np.testing.assert_allclose(y.astype(np.float64), forward(x, None, None, axis)[0], **tol(np.float16))
        dy = rng.standard_normal(x.shape).astype(dy_dtype)
        dx, dgamma, dbeta = gpubn.batch_norm_backward(dy, cache)
        dx_ref, dgamma_ref, dbeta_ref = backward(dy, x, None, axis)
        assert dx.dtype == np.float16
        np.testing.assert_allclose(dx.astype(np.float64), dx_ref, **tol(np.float16))
        np.testing.assert_allclose(dgamma, dgamma_ref, rtol=1e-3, atol=1e-3)
        np.testing.assert_allclose(dbeta, dbeta_ref, rtol=1e-3, atol=1e-3)


FALLBACK = """
import numpy as np, gpubn
from gpubn.kernels import half
assert not half.HARDWARE_HALF
rng = np.random.default_rng(0)
x = rng.standard_normal((64, 3, 50)).astype(np.float16)
y, cache = gpubn.batch_norm_forward(x, backend="cpu")
dx, _, _ = gpubn.batch_norm_backward(np.ones_like(x), cache)
x64 = x.astype(np.float64)
ref = (x64 - x64.mean((0, 2), keepdims=True)) / np.sqrt(x64.var((0, 2), keepdims=True) + 1e-5)
assert np.abs(y.astype(np.float64) - ref).max() < 2e-2, np.abs(y - ref).max()
assert np.abs(dx.astype(np.float64)).max() < 2e-2
print("ok")
"""


@pytest.mark.subprocess
def test_bit_recipes_in_the_kernels_where_no_hardware_half(tmp_path):
    """NUMBA_CPU_NAME=generic: no F16C for LLVM, so the kernels use the recipes."""
    env = {**os.environ, "NUMBA_CPU_NAME": "generic", "NUMBA_CACHE_DIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", FALLBACK], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


# -- bfloat16 (gpubn.torch hands bfloat16 tensors over as int16 bits) ---------------


def _bf16_value(b):
    """float64 values of bfloat16 bits (int16 or uint16 array): the float32 of those top bits."""
    b = b.view(np.uint16) if b.dtype == np.int16 else b
    with np.errstate(invalid="ignore"):  # signalling NaN patterns
        return (b.astype(np.uint32) << 16).view(np.float32).astype(np.float64)


def _bf16_round_reference(x):
    """bfloat16 bits of float32 x by its definition: the nearer of the two
    neighbouring bfloat16 values, the even one on a tie (float64 arithmetic)."""
    u = x.view(np.uint32)
    low = (u >> 16).astype(np.uint16)  # truncated toward zero
    high = low + np.uint16(1)  # the next value away from zero
    v_high = _bf16_value(high)
    v_high = np.where(np.isinf(v_high), np.sign(v_high) * 2.0**128, v_high)  # IEEE: overflow past max + ulp/2
    with np.errstate(invalid="ignore"):  # Inf - Inf, NaN: handled below
        d_low = np.abs(x.astype(np.float64) - _bf16_value(low))
        d_high = np.abs(v_high - x.astype(np.float64))
    pick_high = (d_high < d_low) | ((d_high == d_low) & (low % 2 == 1))
    out = np.where(pick_high, high, low)
    nan = np.isnan(x)
    out[nan] = low[nan] | np.uint16(0x0040)  # NaN stays a quiet NaN
    return out.view(np.int16)


BF16_WIDEN = cpu_kernel(_widen_all)  # int16 in: the bfloat16 overload
BF16_NARROW = cpu_kernel(_narrow_all)  # int16 out: the bfloat16 overload


@pytest.mark.parametrize("variant", ["serial", "parallel"])
def test_every_bfloat16_widens_exactly(variant):
    b = np.arange(-32768, 32768, dtype=np.int16)
    ours = np.empty(b.shape, np.float32)
    getattr(BF16_WIDEN, variant)(b, ours)
    ref = _bf16_value(b).astype(np.float32)
    assert same_bits(ours, ref).all()


@pytest.mark.parametrize("variant", ["serial", "parallel"])
def test_float32_narrows_to_bfloat16_by_the_definition(variant):
    rng = np.random.default_rng(1)
    x = rng.standard_normal(1 << 16) * 10.0 ** rng.integers(-30, 30, 1 << 16)
    halfway = (np.arange(1, 2000, dtype=np.uint32) << 16 | np.uint32(0x8000)).view(np.float32)  # exact ties
    special = [np.inf, -np.inf, np.nan, 3.3895314e38, 3.4028235e38, 1e-40, -1e-45, 0.0, -0.0, 1 + 2**-8, 1 + 3 * 2**-9]
    x = np.concatenate([x.astype(np.float32), halfway, np.array(special, np.float32)])
    ours = np.empty(x.shape, np.int16)
    getattr(BF16_NARROW, variant)(x, ours)
    ref = _bf16_round_reference(x)
    same = (ours == ref) | (np.isnan(x) & np.isnan(_bf16_value(ours)))
    assert same.all(), x[~same][:5]
    try:
        import torch
    except ImportError:
        return
    theirs = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy()
    assert ((ours == theirs) | np.isnan(x)).all()
