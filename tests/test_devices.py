"""Devices, streams and graph capture on the CUDA path, checked without a GPU
(design.md section 8): per-device caches, the input's device made current for
the call, every copy on the caller's stream, and nothing allocated outside the
caller's allocator once a split-path shape has run (what CUDA-graph capture
needs).  Under the simulator, interface objects over host memory stand in for
device arrays of another library; the GPU-marked tests repeat the point on a
real card."""

import contextlib

import numpy as np
import pytest
from numba import cuda
from test_interop import Interface, device

import gpubn
from gpubn import _arrays, functional
from gpubn.kernels import common, workspace
from gpubn.kernels.common import one_pass

from conftest import SIM
from reference import backward, forward, tol

pytestmark = pytest.mark.skipif("cuda" not in gpubn.available_backends(), reason="backend 'cuda' not available")
needs_sim = pytest.mark.skipif(not SIM, reason="patches the simulator's copies and devices")

#: a shape on the split path (more values per channel than one block takes) under the simulator
SPLIT = (40, 3, 5)


def test_split_shape_is_split():
    assert not one_pass((SPLIT[0], SPLIT[1], SPLIT[2]), 4)


@needs_sim
def test_caches_are_keyed_by_device(monkeypatch):
    """Workspaces, the shared constant vectors and the SM count of device 0 are
    never handed to a call on device 1 (they were keyed without the device)."""
    current = [0]
    monkeypatch.setattr(common, "current_device", lambda: current[0])
    monkeypatch.setattr(workspace, "current_device", lambda: current[0])
    monkeypatch.setattr(_arrays, "current_device", lambda: current[0])
    monkeypatch.setattr(common, "_SM_COUNTS", {1: 132})
    on0 = workspace.workspace("test.partials", (2, 3), np.float64)
    ones0 = _arrays.channel_vector(None, "gamma", 3, np.float32, "cuda", fill=1.0)
    sms0 = common.sm_count()
    current[0] = 1
    assert workspace.workspace("test.partials", (2, 3), np.float64) is not on0
    assert _arrays.channel_vector(None, "gamma", 3, np.float32, "cuda", fill=1.0) is not ones0
    assert common.sm_count() == 132 != sms0
    current[0] = 0
    assert workspace.workspace("test.partials", (2, 3), np.float64) is on0


@needs_sim
def test_every_call_runs_in_its_inputs_device_context(monkeypatch, rng):
    """An input on device 1 while device 0 is current: every launcher of the call
    runs with device 1 made current (it launched device-0 kernels on device-1 pointers)."""
    inside = []
    monkeypatch.setattr(functional, "array_device", lambda x: 1 if isinstance(x, Interface) else None)

    @contextlib.contextmanager
    def scope(dev):
        inside.append(dev)
        yield
        inside.pop()

    monkeypatch.setattr(functional, "device_scope", scope)
    seen = []
    from gpubn.kernels.plan import CUDAPlan

    for name in ("forward_train", "forward_eval", "backward"):
        fn = getattr(CUDAPlan, name)
        monkeypatch.setattr(
            CUDAPlan, name, lambda *a, _fn=fn, _n=name, **k: (seen.append((_n, list(inside))), _fn(*a, **k))[1]
        )
    x = rng.standard_normal((4, 3, 5)).astype(np.float32)
    y, cache = gpubn.batch_norm_forward(device(x), backend="cuda")
    gpubn.batch_norm_backward(device(x), cache)
    gpubn.batch_stats(device(x), backend="cuda")
    gpubn.normalize(device(x), np.zeros(3), np.ones(3), backend="cuda")
    assert {n for n, _ in seen} == {"forward_train", "forward_eval", "backward"}
    assert all(devices == [1] for _, devices in seen), seen


@needs_sim
def test_every_copy_is_on_the_callers_stream(monkeypatch, rng):
    """Host parameters, running statistics, mask and gradient copied in, the
    running statistics copied back (and a non-contiguous input made dense on
    the way): every transfer on the interface's stream, ordered with the
    call's kernels (they ran on the legacy default stream)."""
    handle = 0x5EED
    streams = []
    to_device = cuda.to_device
    from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray

    copy_to_host = FakeCUDAArray.copy_to_host

    def record(fn):
        def call(*args, stream=0, **kwargs):
            streams.append((fn.__name__, stream))
            return fn(*args, stream=stream, **kwargs)

        return call

    monkeypatch.setattr(cuda, "to_device", record(to_device))
    monkeypatch.setattr(
        FakeCUDAArray,
        "copy_to_host",
        lambda self, ary=None, stream=0: (streams.append(("copy_to_host", stream)), copy_to_host(self, ary, stream))[1],
    )
    x = (2 + rng.standard_normal((6, 3, 8))).astype(np.float32)
    strided = Interface(np.array(x[:, :, ::2]), handle)  # a contiguous copy ...
    desc = strided.__cuda_array_interface__
    wide = np.zeros((6, 3, 8), np.float32)
    wide[...] = x
    strided = Interface(wide, handle)
    strided.__cuda_array_interface__ = {
        **desc,
        "data": (wide.ctypes.data, False),
        "strides": (96, 32, 8),
    }  # ... x[:, :, ::2] in place
    mask = np.ones((6, 4), bool)
    mask[0, 0] = False
    gamma, beta = np.full(3, 1.5, np.float32), np.full(3, 0.5, np.float32)
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    y, cache = gpubn.batch_norm_forward(
        strided, gamma, beta, mask=mask, running_mean=rm, running_var=rv, backend="cuda"
    )
    dx, dgamma, dbeta = gpubn.batch_norm_backward(np.ones((6, 3, 4), np.float32), cache)
    assert {name for name, _ in streams} == {"to_device", "copy_to_host"}
    assert all(s == handle for _, s in streams), [c for c in streams if c[1] != handle]
    assert not np.array_equal(rm, np.zeros(3))  # copied back
    keep = mask.reshape(6, 1, 4)
    ref = forward(
        x[:, :, ::2],
        gamma,
        beta,
        1,
        mean=np.moveaxis(x[:, :, ::2], 1, -1)[mask].mean(0),
        var=np.moveaxis(x[:, :, ::2], 1, -1)[mask].var(0),
    )[0]
    np.testing.assert_allclose(np.array(y.copy_to_host() if hasattr(y, "copy_to_host") else y), ref, **tol(np.float32))
    assert keep.any()


@needs_sim
def test_split_path_allocates_only_from_the_callers_allocator(monkeypatch, rng):
    """After a warm-up on one stream, a forward + backward of a split-path shape
    on another stream (torch's capture stream) allocates nothing of its own and
    copies nothing from the host: its partials, counters and outputs come from
    the caller's allocator (torch's, graph-aware).  They were allocated lazily
    per stream, inside the capture, where allocation fails."""
    from gpubn._arrays import device_view

    made = []

    def allocator(shape, dtype, zero):
        memory = np.zeros(shape, dtype) if zero else np.full(shape, np.nan, dtype)
        made.append(memory)  # alive for the test (the views hold only its address)
        return device_view(Interface(memory))

    monkeypatch.setattr(functional, "library_allocator", lambda library, owner: allocator)
    monkeypatch.setattr(
        functional, "empty_like_library", lambda shape, dtype, library, owner, zero=False: allocator(shape, dtype, zero)
    )
    x = (3 + rng.standard_normal(SPLIT)).astype(np.float32)
    dy = rng.standard_normal(SPLIT).astype(np.float32)
    gamma, beta = device(np.full(3, 1.2, np.float32)), device(np.full(3, -0.3, np.float32))
    gpubn.batch_norm_backward(device(dy, 7), gpubn.batch_norm_forward(device(x, 7), gamma, beta, backend="cuda")[1])

    def refuse(*args, **kwargs):
        raise AssertionError("allocated or copied outside the caller's allocator")

    for name in ("to_device", "device_array", "device_array_like", "pinned_array"):
        monkeypatch.setattr(cuda, name, refuse)
    made.clear()
    y, cache = gpubn.batch_norm_forward(device(x, 9), gamma, beta, backend="cuda")
    dx, dgamma, dbeta = gpubn.batch_norm_backward(device(dy, 9), cache)
    assert made  # the partials came from the caller's allocator
    g = np.full(3, 1.2)
    np.testing.assert_allclose(np.asarray(y.copy_to_host()), forward(x, g, np.full(3, -0.3), 1)[0], **tol(np.float32))
    rdx, rdg, rdb = backward(dy, x, g, 1)
    np.testing.assert_allclose(np.asarray(dx.copy_to_host()), rdx, **tol(np.float32))
    np.testing.assert_allclose(np.asarray(dgamma.copy_to_host()), rdg, rtol=1e-4, atol=1e-3)


@pytest.mark.gpu
@pytest.mark.skipif(SIM, reason="needs a real GPU")
def test_tensor_on_a_second_device(rng):
    torch = pytest.importorskip("torch")
    if torch.cuda.device_count() < 2:
        pytest.skip("one GPU")
    x = (2 + rng.standard_normal((64, 4, 50))).astype(np.float32)
    with torch.cuda.device(0):
        xt = torch.from_numpy(x).to("cuda:1")
        rm, rv = torch.zeros(4, device="cuda:1"), torch.ones(4, device="cuda:1")
        y, cache = gpubn.batch_norm_forward(xt, running_mean=rm, running_var=rv, backend="cuda")
        dx, dgamma, dbeta = gpubn.batch_norm_backward(xt, cache)
    assert y.device == xt.device == dx.device
    np.testing.assert_allclose(y.cpu().numpy(), forward(x, None, None, 1)[0], **tol(np.float32))
