"""Device arrays from other libraries through every public function: used in
place (no copy, no synchronization), results in the caller's library, the
caller's stream for every launch.

Under the simulator a bare ``__cuda_array_interface__`` object stands for a
device array from another library: its pointer is host memory, which the
simulator's kernels read and write in place.  On a GPU the same tests run on
device memory, and torch tensors (and CuPy arrays where installed) too.
"""

import numpy as np
import pytest

import gpubn

from conftest import SIM
from reference import backward, forward, grad_tol, running_update, tol

pytestmark = pytest.mark.skipif("cuda" not in gpubn.available_backends(), reason="backend 'cuda' not available")


class Interface:
    """Nothing but ``__cuda_array_interface__`` (version 3) over ``memory``:
    a NumPy array under the simulator, a numba device array on a GPU."""

    def __init__(self, memory, stream=None):
        self.memory = memory  # keeps the memory alive
        if SIM:
            data, strides = memory.ctypes.data, memory.strides
        else:
            desc = memory.__cuda_array_interface__
            data, strides = desc["data"][0], memory.strides
        self.__cuda_array_interface__ = {
            "shape": tuple(memory.shape),
            "strides": tuple(strides),
            "typestr": memory.dtype.str,
            "data": (data, False),
            "version": 3,
            "stream": stream,
        }

    def host(self) -> np.ndarray:
        return np.array(self.memory) if SIM else self.memory.copy_to_host()


def device(a, stream=None) -> Interface:
    if SIM:
        return Interface(np.array(a), stream)
    from numba import cuda

    return Interface(cuda.to_device(np.ascontiguousarray(a)), stream)


def host(result) -> np.ndarray:
    return result.copy_to_host() if hasattr(result, "copy_to_host") else np.asarray(result)


@pytest.mark.parametrize("shape,axis", [((5, 3, 6), 1), ((24, 4), 1), ((2, 3, 3, 4), -1)])
def test_every_function_in_place_on_interface_objects(rng, shape, axis):
    ax = axis % len(shape)
    C = shape[ax]
    x = (2 + rng.standard_normal(shape)).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    gamma, beta = (1 + 0.2 * rng.standard_normal(C)).astype(np.float32), rng.standard_normal(C).astype(np.float32)
    rm0, rv0 = rng.standard_normal(C).astype(np.float32), (1 + rng.random(C)).astype(np.float32)
    xd, dyd, gd, bd = device(x), device(dy), device(gamma), device(beta)
    rmd, rvd = device(rm0), device(rv0)
    t = tol(np.float32)
    red = tuple(i for i in range(len(shape)) if i != ax)

    mean, var = gpubn.batch_stats(xd, axis=axis, backend="cuda")
    assert hasattr(mean, "copy_to_host")  # a bare interface object's results: numba device arrays
    np.testing.assert_allclose(host(mean), x.astype(np.float64).mean(axis=red), **t)
    np.testing.assert_allclose(host(var), x.astype(np.float64).var(axis=red), **t)

    y = gpubn.normalize(xd, mean, var, gd, bd, axis=axis, backend="cuda")
    np.testing.assert_allclose(host(y), forward(x, gamma, beta, axis)[0], **t)

    y, cache = gpubn.batch_norm_forward(xd, gd, bd, axis=axis, running_mean=rmd, running_var=rvd, backend="cuda")
    np.testing.assert_allclose(host(y), forward(x, gamma, beta, axis)[0], **t)
    want_rm, want_rv = running_update(rm0, rv0, x, axis, 0.1)
    np.testing.assert_allclose(rmd.host(), want_rm, **t)  # updated in the caller's memory
    np.testing.assert_allclose(rvd.host(), want_rv, **t)
    np.testing.assert_array_equal(xd.host(), x)

    dx, dgamma, dbeta = gpubn.batch_norm_backward(dyd, cache)
    for got, want in zip((dx, dgamma, dbeta), backward(dy, x, gamma, axis), strict=True):
        np.testing.assert_allclose(host(got), want, **grad_tol(np.float32))

    y_eval, _ = gpubn.batch_norm_forward(
        xd, gd, bd, axis=axis, training=False, running_mean=rmd, running_var=rvd, backend="cuda"
    )
    want, _ = forward(x, gamma, beta, axis, mean=want_rm, var=want_rv)
    np.testing.assert_allclose(host(y_eval), want, **t)

    m = gpubn.moments(xd, axis=axis, backend="cuda")
    np.testing.assert_allclose(m.mean, x.astype(np.float64).mean(axis=red), **t)

    bn = gpubn.BatchNorm(C, axis=axis, backend="cuda")
    out = bn(xd)
    np.testing.assert_allclose(host(out), forward(x, None, None, axis)[0], **t)
    np.testing.assert_allclose(host(bn.backward(dyd)), backward(dy, x, None, axis)[0], **grad_tol(np.float32))

    sc = gpubn.Standardizer(axis=axis, backend="cuda").fit(xd)
    np.testing.assert_allclose(host(sc.transform(xd)), forward(x, None, None, axis, eps=0.0)[0], **t)


def test_a_refused_call_changes_nothing_in_the_callers_memory(rng):
    x = rng.standard_normal((6, 3, 4)).astype(np.float32)
    rm, rv = device(np.zeros(3, np.float32)), device(np.ones(3, np.float32))
    bad = device(np.zeros(4, np.float32))
    with pytest.raises(ValueError, match="running_var: expected shape"):
        gpubn.batch_norm_forward(device(x), running_mean=rm, running_var=bad, backend="cuda")
    np.testing.assert_array_equal(rm.host(), 0)
    with pytest.raises(TypeError, match="gamma: device array of dtype float64"):
        gpubn.batch_norm_forward(device(x), device(np.ones(3)), running_mean=rm, running_var=rv, backend="cuda")
    np.testing.assert_array_equal(rm.host(), 0)
    np.testing.assert_array_equal(rv.host(), 1)


@pytest.mark.parametrize("stream,handle", [(None, 0), (1, 0), (2, 2), (0x5EED, 0x5EED)])
def test_kernels_launch_on_the_interfaces_stream(monkeypatch, rng, stream, handle):
    """The interface's ``stream`` (CAI v3: None none given, 1 the legacy default
    stream, 2 the per-thread default stream, else a handle) reaches every
    launcher of the call; nothing synchronizes on it."""
    if not SIM and stream == 0x5EED:
        pytest.skip("not a real stream on a GPU")
    seen = []
    from gpubn.kernels.plan import CUDAPlan

    def spy(name, fn):
        def launcher(*args, **kwargs):
            seen.append((name, kwargs.get("stream")))
            return fn(*args, **kwargs)

        return launcher

    for name in ("forward_train", "forward_eval", "backward"):
        monkeypatch.setattr(CUDAPlan, name, spy(name, getattr(CUDAPlan, name)))
    x = rng.standard_normal((4, 3, 5)).astype(np.float32)
    rm, rv = device(np.zeros(3, np.float32)), device(np.ones(3, np.float32))
    y, cache = gpubn.batch_norm_forward(device(x, stream), running_mean=rm, running_var=rv, backend="cuda")
    gpubn.batch_norm_backward(device(x, stream), cache)
    gpubn.batch_norm_forward(device(x, stream), training=False, running_mean=rm, running_var=rv, backend="cuda")
    assert [n for n, _ in seen] == ["forward_train", "backward", "forward_eval"]
    assert all(s == handle for _, s in seen), seen


# -- real GPU: torch tensors (and CuPy arrays) in, the same library out ----------------------


@pytest.mark.gpu
@pytest.mark.skipif(SIM, reason="needs a real GPU")
def test_torch_tensors_in_torch_tensors_out(rng):
    torch = pytest.importorskip("torch")
    check_torch_tensors(torch, rng, "cuda")


def test_torch_tensors_in_torch_tensors_out_under_the_simulator(torch_as_cuda, rng):
    """The same on CPU tensors posing as CUDA ones (conftest's ``torch_as_cuda``)."""
    check_torch_tensors(torch_as_cuda, rng, "cpu")


def test_layer_standardizer_and_moments_on_torch_tensors_under_the_simulator(torch_as_cuda, rng):
    """gpubn.BatchNorm (its state moved to the device at the first torch
    tensor), Standardizer and moments on CPU tensors posing as CUDA ones:
    torch tensors out, the values of the float64 reference."""
    torch = torch_as_cuda
    x = (2 + rng.standard_normal((8, 4, 5))).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    bn = gpubn.BatchNorm(4, backend="cuda")
    y = bn(torch.from_numpy(x))
    assert isinstance(y, torch.Tensor) and bn.on_device
    np.testing.assert_allclose(y.numpy(), forward(x, None, None, 1)[0], **tol(np.float32))
    dx = bn.backward(torch.from_numpy(dy))
    ref = backward(dy, x, None, 1)
    assert isinstance(dx, torch.Tensor)
    np.testing.assert_allclose(dx.numpy(), ref[0], **grad_tol(np.float32))
    np.testing.assert_allclose(host(bn.grads["beta"]), ref[2], rtol=1e-4, atol=1e-4 * np.sqrt(x.size / 4))
    np.testing.assert_allclose(host(bn.running_mean), running_update(np.zeros(4), np.ones(4), x, 1, 0.1)[0], atol=1e-5)
    x2 = np.ascontiguousarray(x.transpose(0, 2, 1).reshape(40, 4))
    sc = gpubn.Standardizer(backend="cuda").fit(torch.from_numpy(x2))
    z = sc.transform(torch.from_numpy(x2))
    ref64 = x2.astype(np.float64)
    assert isinstance(z, torch.Tensor)
    np.testing.assert_allclose(z.numpy(), (ref64 - ref64.mean(0)) / ref64.std(0), **tol(np.float32))
    m = gpubn.moments(torch.from_numpy(x), backend="cuda")
    np.testing.assert_allclose(m.mean, x.astype(np.float64).mean(axis=(0, 2)), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(m.m2, ((x - x.astype(np.float64).mean(axis=(0, 2))[:, None]) ** 2).sum(axis=(0, 2)),
                               rtol=1e-5)  # fmt: skip


def check_torch_tensors(torch, rng, device):
    x = (2 + rng.standard_normal((8, 4, 5))).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    xt, dyt = torch.from_numpy(x).to(device), torch.from_numpy(dy).to(device)
    rm, rv = torch.zeros(4, device=device), torch.ones(4, device=device)
    y, cache = gpubn.batch_norm_forward(xt, running_mean=rm, running_var=rv, backend="cuda")
    assert isinstance(y, torch.Tensor) and y.device == xt.device and y.dtype == xt.dtype
    np.testing.assert_allclose(y.cpu().numpy(), forward(x, None, None, 1)[0], **tol(np.float32))
    np.testing.assert_allclose(rm.cpu().numpy(), running_update(np.zeros(4), np.ones(4), x, 1, 0.1)[0], atol=1e-5)
    dx, dgamma, dbeta = gpubn.batch_norm_backward(dyt, cache)
    assert all(isinstance(a, torch.Tensor) and a.device == xt.device for a in (dx, dgamma, dbeta))
    ref = backward(dy, x, None, 1)
    np.testing.assert_allclose(dx.cpu().numpy(), ref[0], **grad_tol(np.float32))
    for ours, theirs in zip((dgamma, dbeta), ref[1:], strict=True):
        np.testing.assert_allclose(ours.cpu().numpy(), theirs, rtol=1e-4, atol=1e-4 * np.sqrt(x.size / 4))
    mean, var = gpubn.batch_stats(xt, backend="cuda")
    assert isinstance(mean, torch.Tensor) and isinstance(var, torch.Tensor)
    np.testing.assert_allclose(mean.cpu().numpy(), x.astype(np.float64).mean(axis=(0, 2)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(var.cpu().numpy(), x.astype(np.float64).var(axis=(0, 2)), rtol=1e-5, atol=1e-6)
    z = gpubn.normalize(xt, mean, var, backend="cuda")
    assert isinstance(z, torch.Tensor) and z.device == xt.device
    np.testing.assert_allclose(z.cpu().numpy(), forward(x, None, None, 1)[0], **tol(np.float32))


@pytest.mark.gpu
@pytest.mark.skipif(SIM, reason="needs a real GPU")
@pytest.mark.parametrize("shape,split", [((16, 8, 12), False), ((64, 8, 4096), True)])
def test_torch_side_stream_and_cuda_graph(rng, shape, split):
    """Calls on a side stream need no synchronization of their own, and a
    forward + backward captured in a CUDA graph replays to the eager results:
    a one-launch shape, and a split-path one (partials and counters from
    torch's allocator: nothing of gpubn's allocated under capture)."""
    torch = pytest.importorskip("torch")
    from gpubn.kernels.common import one_pass

    assert one_pass(shape, 4) != split
    x = torch.from_numpy((1 + rng.standard_normal(shape)).astype(np.float32)).cuda()
    dy = torch.from_numpy(rng.standard_normal(shape).astype(np.float32)).cuda()
    gamma, beta = torch.rand(shape[1], device="cuda") + 0.5, torch.randn(shape[1], device="cuda")
    eager_y, eager_cache = gpubn.batch_norm_forward(x, gamma, beta, backend="cuda")
    eager = (eager_y, *gpubn.batch_norm_backward(dy, eager_cache))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # warm-up on the side stream: compiles, workspaces
            y, cache = gpubn.batch_norm_forward(x, gamma, beta, backend="cuda")
            outs = (y, *gpubn.batch_norm_backward(dy, cache))
    torch.cuda.current_stream().wait_stream(side)
    for a, b in zip(outs, eager, strict=True):
        torch.testing.assert_close(a, b)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y, cache = gpubn.batch_norm_forward(x, gamma, beta, backend="cuda")
        captured = (y, *gpubn.batch_norm_backward(dy, cache))
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(captured, eager, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.gpu
@pytest.mark.skipif(SIM, reason="needs a real GPU")
def test_cupy_in_cupy_out(rng):
    cupy = pytest.importorskip("cupy")
    x = (2 + rng.standard_normal((8, 4, 5))).astype(np.float32)
    y, _ = gpubn.batch_norm_forward(cupy.asarray(x), backend="cuda")
    assert isinstance(y, cupy.ndarray)
    np.testing.assert_allclose(cupy.asnumpy(y), forward(x, None, None, 1)[0], **tol(np.float32))
