"""Bad inputs: TypeError/ValueError naming the argument, nothing modified."""

import numpy as np
import pytest
from numba import cuda

import gpubn


def state(C=3, dtype=np.float32):
    return np.zeros(C, dtype), np.ones(C, dtype)


X = np.arange(24, dtype=np.float32).reshape(4, 3, 2)
SWAPPED = np.dtype(np.float32).newbyteorder("S")  # ">f4" on little-endian machines

# (description, kwargs overriding a valid call, exception, message fragment)
BAD_FORWARD = [
    ("int input", dict(x=X.astype(np.int32)), TypeError, "x: dtype int32"),
    ("bool input", dict(x=X > 3), TypeError, "x: dtype bool"),
    ("complex input", dict(x=X.astype(np.complex64)), TypeError, "x: dtype complex64"),
    ("object input", dict(x=X.astype(object)), TypeError, "x: dtype object"),
    ("masked array input", dict(x=np.ma.masked_array(X, X > 3)), TypeError, "x: a masked array"),
    ("swapped bytes input", dict(x=X.astype(SWAPPED)), TypeError, f"x: dtype {SWAPPED} is in non-native byte order"),
    ("axis out of range", dict(axis=3), ValueError, "axis: 3 is out of range"),
    ("axis negative out of range", dict(axis=-4), ValueError, "axis: -4"),
    ("axis float", dict(axis=1.0), TypeError, "axis: expected an int"),
    ("gamma shape", dict(gamma=np.ones(4, np.float32)), ValueError, "gamma: expected shape (3,)"),
    ("beta shape", dict(beta=np.ones((3, 1), np.float32)), ValueError, "beta: expected shape (3,)"),
    ("gamma dtype", dict(gamma=np.ones(3, np.int64)), TypeError, "gamma: dtype int64"),
    ("running_mean shape", dict(running_mean=np.zeros(2, np.float32)), ValueError, "running_mean: expected shape"),
    ("running_var shape", dict(running_var=np.ones(5, np.float32)), ValueError, "running_var: expected shape"),
    ("running_mean list", dict(running_mean=[0.0, 0.0, 0.0]), TypeError, "running_mean: expected a NumPy"),
    ("running_var only", dict(running_mean=None), ValueError, "running_mean, running_var: give both"),
    ("empty", dict(x=np.zeros((0, 3), np.float32)), ValueError, "x: empty input"),
    ("one value per channel", dict(x=np.ones((1, 3), np.float32)), ValueError, "x: expected more than 1 value"),
    ("eps negative", dict(eps=-1.0), ValueError, "eps:"),
    ("eps string", dict(eps="1e-5"), TypeError, "eps:"),
    ("momentum inf", dict(momentum=float("inf")), ValueError, "momentum:"),
    ("momentum None", dict(momentum=None), ValueError, "momentum:"),
    ("unknown backend", dict(backend="tpu"), ValueError, "backend: unknown backend 'tpu'"),
    ("eval without stats", dict(training=False, running_mean=None, running_var=None), ValueError, "required when"),
    ("read-only running", dict(running_mean=np.zeros(3, np.float32)[:]), None, None),
]


@pytest.mark.parametrize("case", BAD_FORWARD, ids=[c[0] for c in BAD_FORWARD])
def test_bad_forward_changes_nothing(backend, case):
    _, override, exc, msg = case
    rm, rv = state()
    kwargs = dict(x=X, gamma=np.ones(3, np.float32), beta=np.zeros(3, np.float32), running_mean=rm, running_var=rv)
    kwargs["backend"] = backend
    kwargs.update(override)
    if exc is None:  # read-only running stats
        kwargs["running_mean"].flags.writeable = False
        exc, msg = ValueError, "running_mean: array is read-only"
    arrays = {k: v for k, v in kwargs.items() if isinstance(v, np.ndarray)}  # x, gamma, beta, running stats
    snapshot = {k: v.copy() for k, v in arrays.items()}
    x = kwargs.pop("x")
    with pytest.raises(exc, match=msg.replace("(", r"\(").replace(")", r"\)")):
        gpubn.batch_norm_forward(x, kwargs.pop("gamma"), kwargs.pop("beta"), **kwargs)
    for k, v in arrays.items():  # every array the call was given, bad ones included, is as it was
        np.testing.assert_array_equal(v, snapshot[k], err_msg=k)
    np.testing.assert_array_equal(rm, 0)
    np.testing.assert_array_equal(rv, 1)


def test_bad_backward(backend):
    _, cache = gpubn.batch_norm_forward(X, backend=backend)
    with pytest.raises(ValueError, match=r"dy: shape \(4, 3\)"):
        gpubn.batch_norm_backward(np.ones((4, 3), np.float32), cache)
    with pytest.raises(TypeError, match="dy: dtype int64"):
        gpubn.batch_norm_backward(np.ones(X.shape, np.int64), cache)
    with pytest.raises(TypeError, match="cache: expected the cache"):
        gpubn.batch_norm_backward(np.ones(X.shape, np.float32), {"x": X})


def test_bad_batch_stats_and_normalize(backend):
    with pytest.raises(TypeError, match="x: dtype int64"):
        gpubn.batch_stats(np.arange(6).reshape(3, 2), backend=backend)
    with pytest.raises(ValueError, match="axis: 2"):
        gpubn.batch_stats(np.ones((3, 2)), axis=2, backend=backend)
    with pytest.raises(ValueError, match=r"var: expected shape \(3,\)"):
        gpubn.normalize(X, np.zeros(3), np.ones(2), backend=backend)
    with pytest.raises(ValueError, match="mean, var: both are required"):
        gpubn.normalize(X, None, np.ones(3), backend=backend)


def test_device_array_on_cpu_backend():
    if "cuda" not in gpubn.available_backends():
        pytest.skip("no CUDA backend to make a device array")
    d = cuda.to_device(X)
    with pytest.raises(TypeError, match="x: a device array cannot be used with backend 'cpu'"):
        gpubn.batch_norm_forward(d, backend="cpu")
    rm = cuda.to_device(np.zeros(3, np.float32))
    with pytest.raises(TypeError, match="running_mean: a device array"):
        gpubn.batch_norm_forward(X, running_mean=rm, running_var=np.ones(3, np.float32), backend="cpu")


def test_backend_selection(monkeypatch):
    assert "cpu" in gpubn.available_backends()
    monkeypatch.setenv("GPUBN_BACKEND", "cpu")
    assert gpubn.default_backend() == "cpu"
    monkeypatch.setenv("GPUBN_BACKEND", "bogus")
    with pytest.raises(ValueError, match="GPUBN_BACKEND: unknown backend 'bogus'"):
        gpubn.default_backend()
    monkeypatch.setenv("GPUBN_BACKEND", "auto")
    assert gpubn.default_backend() in gpubn.available_backends()
    if "cuda" not in gpubn.available_backends():
        with pytest.raises(ValueError, match="backend 'cuda' requested but no usable CUDA GPU"):
            gpubn.batch_stats(X, backend="cuda")
