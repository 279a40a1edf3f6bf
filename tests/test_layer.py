"""BatchNorm and Standardizer against the float64 reference, both backends."""

import numpy as np
import pytest
from numba import cuda

import gpubn

from reference import backward, forward, stats, tol

STEPS = 5


def host(a):
    return a.copy_to_host() if hasattr(a, "copy_to_host") else np.asarray(a)


class ReferenceBN:
    """A float64 NumPy twin of the layer, written from PyTorch's documentation."""

    def __init__(self, C, axis, eps, momentum):
        self.gamma, self.beta = np.ones(C), np.zeros(C)
        self.rm, self.rv, self.count = np.zeros(C), np.ones(C), 0
        self.axis, self.eps, self.momentum = axis, eps, momentum

    def train_step(self, x, dy):
        self.count += 1
        m = self.momentum if self.momentum is not None else 1.0 / self.count
        mean, var = stats(x, self.axis)
        n = x.size // x.shape[self.axis]
        self.rm = (1 - m) * self.rm + m * mean
        self.rv = (1 - m) * self.rv + m * var * n / (n - 1)
        y, _ = forward(x, self.gamma, self.beta, self.axis, self.eps)
        return y, backward(dy, x, self.gamma, self.axis, self.eps)


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("shape,axis", [((6, 4, 3, 2), 1), ((12, 5), 1), ((4, 3, 3), -1)])
def test_layer_matches_reference_over_steps(backend, rng, shape, axis, momentum):
    C = shape[axis]
    bn = gpubn.BatchNorm(C, axis=axis, momentum=momentum, backend=backend, dtype="float64")
    ref = ReferenceBN(C, axis, bn.eps, momentum)
    lr = 0.1
    for step in range(STEPS):
        x = 1.5 + 2 * rng.standard_normal(shape)
        dy = rng.standard_normal(shape)
        y = bn(x)
        dx = bn.backward(dy)
        ry, (rdx, rdg, rdb) = ref.train_step(x, dy)
        np.testing.assert_allclose(y, ry, **tol(np.float64))
        np.testing.assert_allclose(dx, rdx, atol=1e-9)
        np.testing.assert_allclose(host(bn.grads["gamma"]), rdg, atol=1e-9)
        np.testing.assert_allclose(host(bn.grads["beta"]), rdb, atol=1e-9)
        np.testing.assert_allclose(host(bn.running_mean), ref.rm, atol=1e-12)
        np.testing.assert_allclose(host(bn.running_var), ref.rv, atol=1e-12)
        assert bn.num_batches_tracked == step + 1
        # an optimizer updates the params in place
        for name in ("gamma", "beta"):
            bn.params[name][...] = host(bn.params[name]) - lr * host(bn.grads[name])
        ref.gamma = ref.gamma - lr * rdg
        ref.beta = ref.beta - lr * rdb
    # eval mode uses the running statistics and leaves them alone
    bn.eval()
    x = rng.standard_normal(shape)
    rm_before = host(bn.running_mean).copy()
    y = bn(x)
    np.testing.assert_allclose(y, forward(x, ref.gamma, ref.beta, axis, bn.eps, ref.rm, ref.rv)[0], atol=1e-9)
    np.testing.assert_array_equal(host(bn.running_mean), rm_before)
    assert bn.num_batches_tracked == STEPS
    dy = rng.standard_normal(shape)
    np.testing.assert_allclose(
        bn.backward(dy), backward(dy, x, ref.gamma, axis, bn.eps, training=False, mean=ref.rm, var=ref.rv)[0], atol=1e-9
    )


def test_layer_float32_and_float16_inputs(backend, rng):
    bn = gpubn.BatchNorm(3, backend=backend)
    for dtype in (np.float32, np.float16):
        x = rng.standard_normal((10, 3, 4)).astype(dtype)
        y = bn(x)
        assert y.dtype == dtype
        np.testing.assert_allclose(y.astype(np.float64), forward(x, None, None, 1)[0], **tol(dtype))
        dx = bn.backward(np.ones_like(x))
        assert dx.dtype == dtype and np.abs(dx.astype(np.float64)).max() < 1e-2


def test_layer_finite_differences(backend, rng):
    x = rng.standard_normal((5, 2, 3))
    w = rng.standard_normal(x.shape)
    bn = gpubn.BatchNorm(2, backend=backend, dtype="float64", track_running_stats=False)
    bn.params["gamma"][...] = [1.5, -0.5]
    bn(x)
    dx = bn.backward(w)
    h = 1e-6
    for idx in [(0, 0, 0), (4, 1, 2)]:
        e = np.zeros_like(x)
        e[idx] = h
        num = ((bn(x + e) * w).sum() - (bn(x - e) * w).sum()) / (2 * h)
        assert abs(num - dx[idx]) < 1e-6


def test_no_affine_no_tracking(backend, rng):
    bn = gpubn.BatchNorm(4, affine=False, track_running_stats=False, backend=backend).eval()
    x = rng.standard_normal((7, 4)).astype(np.float32)
    np.testing.assert_allclose(bn(x), forward(x, None, None, 1)[0], **tol(np.float32))  # batch stats in eval
    assert bn.params == {} and bn.state_dict() == {}
    with pytest.raises(ValueError, match="x: 3 features on axis 1"):
        bn(rng.standard_normal((7, 3)).astype(np.float32))


def test_state_dict_round_trip_and_refusals(backend, rng):
    bn = gpubn.BatchNorm(3, backend=backend)
    for _ in range(3):
        bn(rng.standard_normal((8, 3)).astype(np.float32))
    state = bn.state_dict()
    assert sorted(state) == ["beta", "gamma", "num_batches_tracked", "running_mean", "running_var"]
    assert all(isinstance(v, np.ndarray) for k, v in state.items() if k != "num_batches_tracked")
    other = gpubn.BatchNorm(3, backend=backend)
    gamma_obj = other.params["gamma"]
    other.load_state_dict(state)
    assert other.params["gamma"] is gamma_obj  # loaded in place
    for k, v in other.state_dict().items():
        np.testing.assert_array_equal(v, state[k])
    before = other.state_dict()
    bad_states = [
        ({**state, "extra": 1}, ValueError, "unexpected keys"),
        ({k: v for k, v in state.items() if k != "beta"}, ValueError, "missing keys"),
        ({**state, "running_mean": np.zeros(4)}, ValueError, "running_mean has shape"),
        ({**state, "gamma": np.zeros(3, np.int64)}, TypeError, "gamma has dtype"),
        ({**state, "running_var": -np.ones(3)}, ValueError, "negative"),
        ({**state, "num_batches_tracked": -1}, ValueError, "num_batches_tracked"),
        ([1, 2], TypeError, "state: expected a dict"),
    ]
    for bad, exc, msg in bad_states:
        with pytest.raises(exc, match=msg):
            other.load_state_dict(bad)
        for k, v in other.state_dict().items():
            np.testing.assert_array_equal(v, before[k])


def test_failed_calls_change_nothing(backend, rng):
    bn = gpubn.BatchNorm(3, backend=backend)
    bn(rng.standard_normal((8, 3)).astype(np.float32))
    before = bn.state_dict()
    with pytest.raises(ValueError, match="backward\\(\\) called before"):
        gpubn.BatchNorm(3, backend=backend).backward(np.ones((8, 3), np.float32))
    for bad in [np.ones((1, 3), np.float32), np.ones((8, 4), np.float32), np.zeros((0, 3), np.float32)]:
        with pytest.raises(ValueError):
            bn(bad)
    with pytest.raises(TypeError):
        bn(np.ones((8, 3), np.int32))
    after = bn.state_dict()
    for k in before:
        np.testing.assert_array_equal(after[k], before[k])
    with pytest.raises(ValueError, match="dy: shape"):
        bn.backward(np.ones((9, 3), np.float32))


def test_layer_constructor_errors():
    with pytest.raises(ValueError, match="num_features"):
        gpubn.BatchNorm(0)
    with pytest.raises(TypeError, match="dtype"):
        gpubn.BatchNorm(3, dtype="int32")
    with pytest.raises(ValueError, match="momentum"):
        gpubn.BatchNorm(3, momentum=float("nan"))
    with pytest.raises(ValueError, match="backend: unknown"):
        gpubn.BatchNorm(3, backend="metal")
    assert "BatchNorm(3, axis=1" in repr(gpubn.BatchNorm(3, backend="cpu"))


def test_layer_keeps_state_on_device(rng):
    if "cuda" not in gpubn.available_backends():
        pytest.skip("no CUDA backend")
    bn = gpubn.BatchNorm(3, backend="cuda")
    x = rng.standard_normal((6, 3, 2)).astype(np.float32)
    y = bn(cuda.to_device(x))
    assert bn.on_device and hasattr(bn.params["gamma"], "copy_to_host") and hasattr(y, "copy_to_host")
    np.testing.assert_allclose(y.copy_to_host(), forward(x, None, None, 1)[0], **tol(np.float32))
    dy = rng.standard_normal(x.shape).astype(np.float32)
    dx = bn.backward(cuda.to_device(dy))
    np.testing.assert_allclose(bn.grads["gamma"].copy_to_host(), backward(dy, x, None, 1)[1], atol=1e-4)
    np.testing.assert_allclose(dx.copy_to_host(), backward(dy, x, None, 1)[0], atol=1e-4)
    # host input on a device-resident layer still works, NumPy out
    assert isinstance(bn(x), np.ndarray)
    assert bn.num_batches_tracked == 2


# -- params and grads: assigning takes effect or raises, never ignored ------------


def test_assigning_params_and_grads_takes_effect(backend, rng):
    for on_device in [False, True] if backend == "cuda" else [False]:  # a layer on the host, then on the device
        assign_and_check(gpubn.BatchNorm(3, backend=backend, dtype="float64"), rng, on_device)


def assign_and_check(bn, rng, on_device):
    if on_device:
        bn.to_device()
    gamma_view = bn.params["gamma"]
    new_gamma, new_beta = np.array([2.0, -1.0, 0.5]), np.array([0.1, 0.2, 0.3], np.float32)
    bn.params["gamma"] = new_gamma  # a new array, not an in-place update
    bn.params["beta"] = new_beta  # float32 into a float64 layer: converted
    assert bn.params["gamma"] is gamma_view  # copied into the layer's storage
    np.testing.assert_array_equal(host(bn.params["gamma"]), new_gamma)
    np.testing.assert_array_equal(bn.state_dict()["gamma"], new_gamma)
    np.testing.assert_array_equal(bn.state_dict()["beta"], new_beta.astype(np.float64))
    x = rng.standard_normal((6, 3))
    np.testing.assert_allclose(bn(x), forward(x, new_gamma, new_beta.astype(np.float64), 1)[0], atol=1e-12)
    bn.grads["gamma"] = np.full(3, 7.0)
    np.testing.assert_array_equal(host(bn.grads["gamma"]), 7.0)


def test_bad_assignments_raise_and_change_nothing(backend):
    bn = gpubn.BatchNorm(3, backend=backend)
    before = bn.state_dict()
    with pytest.raises(ValueError, match=r"params\['gamma'\]: expected shape \(3,\) for num_features=3, got \(4,\)"):
        bn.params["gamma"] = np.ones(4)
    with pytest.raises(TypeError, match=r"params\['beta'\]: dtype int64"):
        bn.params["beta"] = np.arange(3)
    with pytest.raises(KeyError, match="running_mean"):
        bn.params["running_mean"] = np.zeros(3)
    with pytest.raises(ValueError, match=r"grads\['gamma'\]: expected shape"):
        bn.grads["gamma"] = np.ones((3, 1))
    with pytest.raises(AttributeError, match="params: assign entries"):
        bn.params = {"gamma": np.ones(3), "beta": np.zeros(3)}
    with pytest.raises(TypeError, match="cannot be removed"):
        del bn.params["gamma"]
    for k, v in bn.state_dict().items():
        np.testing.assert_array_equal(v, before[k])
    plain = gpubn.BatchNorm(3, affine=False, backend=backend)
    with pytest.raises(KeyError, match="affine=False"):
        plain.params["gamma"] = np.ones(3)
    assert dict(plain.params) == {} and len(bn.params) == 2 and sorted(bn.grads) == ["beta", "gamma"]


# -- boolean options: bools only -----------------------------------------------------


def test_flags_must_be_bools(backend):
    bn = gpubn.BatchNorm(3, backend=backend)
    for bad in ("no", "False", 0, 1, None, 0.0):
        with pytest.raises(TypeError, match="mode: expected True or False"):
            bn.train(bad)
        with pytest.raises(TypeError, match="training: expected True or False"):
            bn.training = bad
        with pytest.raises(TypeError, match="affine: expected True or False"):
            gpubn.BatchNorm(3, affine=bad, backend=backend)
        with pytest.raises(TypeError, match="track_running_stats: expected True or False"):
            gpubn.BatchNorm(3, track_running_stats=bad, backend=backend)
    assert bn.training is True  # the refusals left the mode alone
    assert bn.train(np.bool_(False)).training is False  # NumPy bools are bools
    bn.training = True
    assert bn.eval().training is False


# -- what the forward cache holds ---------------------------------------------------


def test_optimizer_step_between_forward_and_backward(backend, rng):
    """The gradient is that of the function the forward computed: an update of
    gamma (in place, as optimizers do) before backward() does not leak into it
    (the cache holds the forward's constants, not gamma)."""
    bn = gpubn.BatchNorm(3, backend=backend, dtype="float64")
    gamma0 = np.array([1.5, -0.5, 2.0])
    bn.params["gamma"][...] = gamma0
    x, dy = rng.standard_normal((7, 3)), rng.standard_normal((7, 3))
    bn(x)
    bn.params["gamma"][...] = 100.0  # an optimizer step taken early
    bn.params["beta"][...] = 100.0
    dx = bn.backward(dy)
    rdx, rdg, rdb = backward(dy, x, gamma0, 1)
    np.testing.assert_allclose(dx, rdx, atol=1e-10)
    np.testing.assert_allclose(host(bn.grads["gamma"]), rdg, atol=1e-10)
    np.testing.assert_allclose(host(bn.grads["beta"]), rdb, atol=1e-10)


def test_loads_a_torch_state_dict(backend, rng):
    """torch's key names (weight, bias, ...), tensors (bfloat16 too), the counter
    as a 0-d tensor, and an old checkpoint without num_batches_tracked."""
    torch = pytest.importorskip("torch")
    C = 4
    t = torch.nn.BatchNorm1d(C)
    with torch.no_grad():
        t.weight.copy_(torch.tensor(1 + 0.3 * rng.standard_normal(C)))
        t.bias.copy_(torch.tensor(rng.standard_normal(C)))
    t(torch.tensor(rng.standard_normal((16, C)) * 2 + 1, dtype=torch.float32))
    bn = gpubn.BatchNorm(C, backend=backend)
    bn.load_state_dict(t.state_dict())
    got = bn.state_dict()
    assert set(got) == {"gamma", "beta", "running_mean", "running_var", "num_batches_tracked"}
    np.testing.assert_array_equal(got["gamma"], t.weight.detach().numpy())
    np.testing.assert_array_equal(got["beta"], t.bias.detach().numpy())
    np.testing.assert_array_equal(got["running_mean"], t.running_mean.numpy())
    np.testing.assert_array_equal(got["running_var"], t.running_var.numpy())
    assert got["num_batches_tracked"] == 1
    x = rng.standard_normal((8, C)).astype(np.float32)
    bn.eval()
    t.eval()
    np.testing.assert_allclose(bn(x), t(torch.from_numpy(x)).detach().numpy(), atol=1e-6)
    old = {k: v for k, v in t.state_dict().items() if k != "num_batches_tracked"}
    bn.load_state_dict(old)
    assert bn.num_batches_tracked == 0
    half = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in t.state_dict().items()}
    bn.load_state_dict(half)
    np.testing.assert_array_equal(bn.state_dict()["gamma"], t.weight.detach().to(torch.bfloat16).float().numpy())
    before = bn.state_dict()
    with pytest.raises(ValueError, match="both torch's and gpubn's names"):
        bn.load_state_dict({**t.state_dict(), "gamma": np.ones(C)})
    with pytest.raises(ValueError, match="shape"):
        bn.load_state_dict({**t.state_dict(), "bias": torch.zeros(C + 1)})
    for key, value in bn.state_dict().items():
        np.testing.assert_array_equal(value, before[key])
