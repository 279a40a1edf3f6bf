"""gpubn.fold: the layer with folded weights equals the layer, then batch norm in eval mode."""

import numpy as np
import pytest
import torch

import gpubn
import gpubn.torch as gt

from reference import forward


def trained_bn(C, rng, dtype="float64", backend="cpu"):
    """A gpubn.BatchNorm with non-trivial gamma, beta and running statistics."""
    bn = gpubn.BatchNorm(C, backend=backend, dtype=dtype)
    bn.params["gamma"] = 1 + 0.5 * rng.standard_normal(C)
    bn.params["beta"] = rng.standard_normal(C)
    bn.running_mean[...] = rng.standard_normal(C)
    bn.running_var[...] = 0.5 + rng.random(C)
    return bn.eval()


@pytest.mark.parametrize("dtype,tol", [(np.float64, 1e-12), (np.float32, 2e-5)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_dense_layer(backend, rng, dtype, tol, with_bias):
    W = rng.standard_normal((5, 7)).astype(dtype)  # (out, in)
    b = rng.standard_normal(5).astype(dtype) if with_bias else None
    a = rng.standard_normal((11, 7)).astype(dtype)
    bn = trained_bn(5, rng, backend=backend)
    if backend == "cuda":
        bn.to_device()  # statistics read back from the device
    z = a.astype(np.float64) @ W.T.astype(np.float64) + (0 if b is None else b)
    expected, _ = forward(z, bn.state_dict()["gamma"], bn.state_dict()["beta"], 1, bn.eps,
                          bn.state_dict()["running_mean"], bn.state_dict()["running_var"])  # fmt: skip
    W2, b2 = gpubn.fold(W, b, bn)
    assert W2.dtype == dtype and b2.dtype == dtype and W2.shape == W.shape
    np.testing.assert_allclose(a.astype(np.float64) @ W2.T.astype(np.float64) + b2, expected, atol=tol * 10, rtol=tol)
    np.testing.assert_allclose(np.asarray(bn(z)), expected, atol=1e-10)  # the layer agrees with the reference


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_conv_layers_torch(dtype, tol):
    """(out, in, kh, kw) convolution weights and torch modules: conv(W', b') == bn(conv(W, b)) in eval."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 4, 3).to(dtype)
    for bn in (torch.nn.BatchNorm2d(4).to(dtype), gt.BatchNorm2d(4).to(dtype)):
        with torch.no_grad():
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_()
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2)
        bn.eval()
        x = torch.randn(2, 3, 8, 8, dtype=dtype)
        W2, b2 = gpubn.fold(conv.weight, conv.bias, bn)
        assert W2.dtype == dtype
        with torch.no_grad():
            torch.testing.assert_close(torch.nn.functional.conv2d(x, W2, b2), bn(conv(x)), atol=tol, rtol=tol)


def test_half_torch_weights_are_rounded_once():
    """float16 and bfloat16 weights (bfloat16 has no NumPy dtype): the float64 fold, rounded once."""
    torch.manual_seed(0)
    conv, bn = torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.running_var.uniform_(0.5, 2)
    bn.eval()
    for dtype in (torch.float16, torch.bfloat16):
        w, b = conv.weight.to(dtype), conv.bias.to(dtype)
        W2, b2 = gpubn.fold(w, b, bn)
        W64, b64 = gpubn.fold(w.double(), b.double(), bn)
        assert W2.dtype == b2.dtype == dtype
        assert torch.equal(W2, W64.to(dtype)) and torch.equal(b2, b64.to(dtype))


def test_channels_last_weight_axis(rng):
    W = rng.standard_normal((3, 3, 2, 6))  # (kh, kw, in, out)
    bn = trained_bn(6, rng)
    W2, b2 = gpubn.fold(W, None, bn, axis=-1)
    s = bn.state_dict()
    scale = s["gamma"] / np.sqrt(s["running_var"] + bn.eps)
    np.testing.assert_allclose(W2, W * scale, rtol=1e-15)
    np.testing.assert_allclose(b2, s["beta"] - s["running_mean"] * scale, rtol=1e-14)


def test_bad_inputs(rng):
    bn = trained_bn(5, rng)
    with pytest.raises(ValueError, match="bn: 5 features, weight has 4 output channels"):
        gpubn.fold(np.ones((4, 3)), None, bn)
    with pytest.raises(ValueError, match=r"bias: expected shape \(5,\)"):
        gpubn.fold(np.ones((5, 3)), np.ones(3), bn)
    with pytest.raises(TypeError, match="weight: dtype int64"):
        gpubn.fold(np.ones((5, 3), np.int64), None, bn)
    with pytest.raises(ValueError, match="axis: 2 is out of range"):
        gpubn.fold(np.ones((5, 3)), None, bn, axis=2)
    with pytest.raises(ValueError, match="no running statistics"):
        gpubn.fold(np.ones((5, 3)), None, gpubn.BatchNorm(5, track_running_stats=False))


def test_training_mode_layer_warns(rng):
    """fold() uses the running statistics: a layer in training mode normalizes otherwise."""
    W = rng.standard_normal((5, 3))
    for bn in (trained_bn(5, rng).train(), gt.BatchNorm1d(5).train(), torch.nn.BatchNorm1d(5)):
        with pytest.warns(UserWarning, match="training mode"):
            gpubn.fold(W, None, bn)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gpubn.fold(W, None, trained_bn(5, rng))  # eval mode: silent
