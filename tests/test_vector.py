"""The 16-byte-load elementwise kernel (kernels/vector.py, normalize.elementwise_cuda_vec4, both passes):
taken exactly when float32 rows of a multiple of 4 start 16-byte aligned, and
equal to the scalar kernel's results.  (The PTX test checks its v4 instructions.)"""

import numpy as np
import pytest

import gpubn
from gpubn.kernels import normalize, vector

from conftest import spy_launches
from reference import forward, tol


@pytest.fixture
def launched(monkeypatch):
    """The names of the scale-shift kernels launched while the test runs."""
    if "cuda" not in gpubn.available_backends():
        pytest.skip("backend 'cuda' not available")
    return spy_launches(
        monkeypatch, normalize, ["elementwise_cuda_vec4", "scale_shift_cuda_inner", "scale_shift_cuda_channels"]
    )


@pytest.mark.parametrize(
    "shape,dtype,kernel",
    [
        ((3, 5, 8), np.float32, "elementwise_cuda_vec4"),
        ((2, 3, 4, 3), np.float32, "elementwise_cuda_vec4"),  # inner = 12
        ((3, 5, 4), np.float32, "elementwise_cuda_vec4"),  # one quad a row
        ((3, 5, 6), np.float32, "scale_shift_cuda_inner"),  # inner % 4 != 0
        ((3, 5, 8), np.float64, "scale_shift_cuda_inner"),  # float32 only
        ((3, 5, 8), np.float16, "scale_shift_cuda_inner"),
        ((12, 8), np.float32, "scale_shift_cuda_channels"),  # inner == 1
    ],
)
def test_kernel_choice_and_results(launched, rng, shape, dtype, kernel):
    x = (4 + rng.standard_normal(shape)).astype(dtype)
    C = shape[1]
    acc = np.float64 if dtype == np.float64 else np.float32
    mean, var = rng.standard_normal(C).astype(acc), (0.5 + rng.random(C)).astype(acc)
    gamma, beta = rng.standard_normal(C).astype(acc), rng.standard_normal(C).astype(acc)
    y = gpubn.normalize(x, mean, var, gamma, beta, backend="cuda")
    assert launched == [kernel]
    want, _ = forward(x, gamma, beta, 1, mean=mean.astype(np.float64), var=var.astype(np.float64))
    np.testing.assert_allclose(y.astype(np.float64), want, **tol(dtype))


def test_unaligned_arrays_take_the_scalar_kernel(launched, rng):
    """A device view that starts 4 bytes into an allocation: 16-byte loads
    would fault on a GPU, so the scalar kernel runs."""
    from numba import cuda

    flat = cuda.to_device((4 + rng.standard_normal(1 + 3 * 5 * 8)).astype(np.float32))
    x = flat[1:].reshape(3, 5, 8)
    assert not vector.aligned16(x) and vector.aligned16(flat)
    C = 5
    mean, var = np.zeros(C, np.float32), np.ones(C, np.float32)
    y = gpubn.normalize(x, mean, var, backend="cuda")
    assert launched == ["scale_shift_cuda_inner"]
    host = flat.copy_to_host()[1:].reshape(3, 5, 8)
    np.testing.assert_allclose(y.copy_to_host(), host / np.sqrt(1 + 1e-5), rtol=1e-6)


def test_eval_forward_uses_it(launched, rng):
    """The inference forward's elementwise pass (and the training forward's on
    the split path) goes through the same launcher."""
    x = rng.standard_normal((2, 3, 16)).astype(np.float32)
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    y, _ = gpubn.batch_norm_forward(x, training=False, running_mean=rm, running_var=rv, backend="cuda")
    assert launched == ["elementwise_cuda_vec4"]
    np.testing.assert_allclose(y, x / np.sqrt(1 + 1e-5), rtol=1e-6)


@pytest.mark.parametrize(
    "shape,kwargs,kernel",
    [
        ((3, 5, 40), {}, "elementwise_cuda_vec4"),  # the split path (more than ONE_PASS_MAX values a channel)
        ((3, 5, 42), {}, "input_grad_cuda_inner"),  # inner % 4 != 0
        ((3, 5, 40), {"activation": "relu"}, "input_grad_cuda_inner"),  # fused: the scalar kernel
    ],
)
def test_backward_elementwise_pass(monkeypatch, rng, shape, kwargs, kernel):
    """The backward's elementwise pass takes 16-byte loads for plain float32 batch norm."""
    if "cuda" not in gpubn.available_backends():
        pytest.skip("backend 'cuda' not available")
    from gpubn.kernels import backward as bw
    from gpubn.kernels import common

    monkeypatch.setattr(common, "ONE_PASS_MAX", 0)  # the split passes (as on a GPU for large channels)
    seen = spy_launches(monkeypatch, bw, ["elementwise_cuda_vec4", "input_grad_cuda_inner"])
    x = (2 + rng.standard_normal(shape)).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    _, cache = gpubn.batch_norm_forward(x, backend="cuda", **kwargs)
    _, cache_cpu = gpubn.batch_norm_forward(x, backend="cpu", **kwargs)
    got, want = gpubn.batch_norm_backward(dy, cache), gpubn.batch_norm_backward(dy, cache_cpu)
    assert seen == [kernel]
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("activation", ["relu", "sigmoid", "tanh"])
@pytest.mark.parametrize("residual", [False, True])
def test_fused_forward_elementwise_pass(monkeypatch, rng, activation, residual):
    """BN + activation (+ residual) takes 16-byte loads too (the eval forward and
    the split path's), against the CPU backend."""
    if "cuda" not in gpubn.available_backends():
        pytest.skip("backend 'cuda' not available")
    seen = spy_launches(monkeypatch, normalize, ["elementwise_cuda_vec4", "scale_shift_cuda_inner"])
    x = rng.standard_normal((2, 3, 8)).astype(np.float32)
    z = rng.standard_normal(x.shape).astype(np.float32) if residual else None
    rm, rv = (0.1 * rng.standard_normal(3)).astype(np.float32), (1 + rng.random(3)).astype(np.float32)
    kw = dict(training=False, running_mean=rm, running_var=rv, activation=activation, residual=z)
    got, _ = gpubn.batch_norm_forward(x, backend="cuda", **kw)
    want, _ = gpubn.batch_norm_forward(x, backend="cpu", **kw)
    assert seen == ["elementwise_cuda_vec4"]
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=1e-5)
