"""The driver launch layer (kernels/launch.py).

Without a GPU: its parameter layout and argument typing (the byte-for-byte
comparison with numba-cuda's own packing, for every kernel signature, is in
compile_ptx.py, run by test_ptx.py).  On a GPU: every kernel goes through it,
its launches equal numba's dispatcher's, and driver errors become LaunchError.
"""

import struct

import numpy as np
import pytest
from numba import types

import gpubn
from gpubn import kernels as K
from gpubn.kernels import launch

from conftest import SIM


def test_parameter_layout_slot_by_slot():
    """Arrays take 5 + 2 * ndim int64 slots, scalars and None one 8-byte slot each."""
    sig = (types.float32[:, ::1], types.none, types.boolean, types.float32, types.int64, types.float64, types.int32)
    fmt = launch.parameter_format(sig)
    assert fmt == "<" + "q" * 9 + "Q" + "?7x" + "f4x" + "q" + "d" + "i4x"
    assert struct.calcsize(fmt) == 8 * launch.parameter_count(sig) == 8 * 15


def test_parameter_values_in_numbas_order():
    class Array:
        size, shape, strides, dtype = 12, (3, 4), (16, 4), np.dtype(np.float32)

    a = Array()
    sig = (types.float32[:, ::1], types.none, types.boolean, types.float32)
    values = launch.parameter_values(sig, (a, None, True, np.float32(2.5)), lambda arr: 0xABC0)
    assert values == [0, 0, 12, 4, 0xABC0, 3, 4, 16, 4, 0, True, np.float32(2.5)]
    block = struct.pack(launch.parameter_format(sig), *values)
    assert struct.unpack_from("<f", block, 8 * 11) == (2.5,)
    assert block[8 * 10] == 1 and block[8 * 9 : 8 * 10] == bytes(8)


def test_argument_types_match_numbas_typeof():
    from numba.cuda.typing.typeof import Purpose, typeof

    for v in (None, True, False, 3, -(2**40), 2.5, np.float32(1.5), np.float64(2.0), np.int32(4), np.bool_(True)):
        assert launch.argument_type(v) == typeof(v, Purpose.argument), v


def test_unknown_argument_types_are_refused():
    with pytest.raises(TypeError, match="no parameter layout"):
        launch.parameter_format((types.complex64,))


def test_streams_and_dims():
    assert launch._dim3(7) == (7, 1, 1) and launch._dim3((2, 3)) == (2, 3, 1)
    assert launch._stream_handle(0) == 0

    class Handle:
        value = 1234

    class Stream:
        handle = Handle()

    assert launch._stream_handle(Stream()) == 1234


@pytest.mark.skipif(not SIM, reason="under the simulator")
def test_simulator_uses_numbas_dispatcher():
    assert not isinstance(K.scale_shift_cuda_inner, launch.Kernel)


@pytest.mark.gpu
@pytest.mark.skipif(SIM, reason="needs a real GPU")
def test_every_kernel_launches_through_the_launch_layer():
    names = [n for n in dir(K) if "_cuda" in n and hasattr(getattr(K, n), "py_func")]
    assert names and all(isinstance(getattr(K, n), launch.Kernel) for n in names)


@pytest.mark.gpu
@pytest.mark.skipif(SIM, reason="needs a real GPU")
def test_driver_launch_equals_numba_launch(rng):
    from numba import cuda

    x = cuda.to_device((3 + rng.standard_normal((4, 5, 37))).astype(np.float32))
    coef = cuda.to_device(rng.standard_normal((5, 5)).astype(np.float32))
    y_driver, y_numba = cuda.device_array_like(x), cuda.device_array_like(x)
    kernel = K.scale_shift_cuda_inner
    kernel[(2, 3), (32, 4)](x, coef, y_driver)
    kernel.dispatcher[(2, 3), (32, 4)](x, coef, y_numba)
    np.testing.assert_array_equal(y_driver.copy_to_host(), y_numba.copy_to_host())
    # a None argument and scalars: the statistics kernel, plain and through numba
    x3 = cuda.to_device((3 + rng.standard_normal((64, 5, 9))).astype(np.float32))
    want = gpubn.batch_stats(x3.copy_to_host(), backend="cpu")
    got = gpubn.batch_stats(x3, backend="cuda")
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g.copy_to_host(), w, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(SIM, reason="needs a real GPU")
def test_driver_errors_raise_launch_error(rng):
    from numba import cuda

    if launch.LAUNCH != "driver":
        pytest.skip("GPUBN_LAUNCH=numba")
    x = cuda.to_device(np.ones((2, 3, 4), np.float32))
    coef = cuda.to_device(np.ones((5, 3), np.float32))
    with pytest.raises(launch.LaunchError, match="scale_shift_cuda_inner: cuLaunchKernel.*CUDA_ERROR"):
        K.scale_shift_cuda_inner[(1, 1), (2048, 1)](x, coef, cuda.device_array_like(x))  # > 1024 threads
