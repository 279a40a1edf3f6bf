"""The driver launch layer (kernels/launch.py).

Without a GPU: its parameter layout and argument typing (the byte-for-byte
comparison with numba-cuda's own packing, for every kernel signature, is in
compile_ptx.py, run by test_ptx.py).  On a GPU: every kernel goes through it,
its launches equal numba's dispatcher's, and driver errors become LaunchError.
"""

import struct

import numpy as np
import pytest
from numba import cuda, types

import gpubn
from gpubn import kernels as K
from gpubn.kernels import launch
from gpubn.kernels.common import block_merge, block_sum2

from conftest import SIM


@cuda.jit
def _reduce(v, width, out):
    """block_sum2 of (v, v**2) and block_merge of (1, v, 0) over the block,
    thread t in channel t % width: channel j's five results into out[j]."""
    t = cuda.threadIdx.x
    a1 = cuda.shared.array(1024, np.float64)
    a2 = cuda.shared.array(1024, np.float64)
    a3 = cuda.shared.array(1024, np.float64)
    block_sum2(a1, a2, v[t], v[t] * v[t], t, cuda.blockDim.x, width)
    if t < width:
        out[t, 0] = a1[t]
        out[t, 1] = a2[t]
    cuda.syncthreads()
    block_merge(a1, a2, a3, 1.0, v[t], 0.0, t, cuda.blockDim.x, width)
    if t < width:
        out[t, 2] = a1[t]
        out[t, 3] = a2[t]
        out[t, 4] = a3[t]


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


def test_every_kernel_goes_through_the_launch_layer():
    """On a GPU and under the simulator alike: the argument boundary and the
    whole-warp check run for every launch (the simulator's dispatcher underneath)."""
    names = [n for n in dir(K) if "_cuda" in n and hasattr(getattr(K, n), "py_func")]
    assert names and all(isinstance(getattr(K, n), launch.Kernel) for n in names)


@pytest.mark.subprocess
def test_numbas_launcher_is_the_default_until_a_gpu_validates_the_driver():
    import subprocess
    import sys

    env = {k: v for k, v in __import__("os").environ.items() if k != "GPUBN_LAUNCH"}
    code = "from gpubn.kernels import launch; print(launch.LAUNCH)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "numba"


class _Interface:
    """A device array of another library: only __cuda_array_interface__ (host memory under the simulator)."""

    def __init__(self, arr):
        self.arr = arr
        self.__cuda_array_interface__ = {
            "shape": arr.shape,
            "strides": None,
            "typestr": arr.dtype.str,
            "data": (arr.ctypes.data, False),
            "version": 3,
        }


@pytest.mark.skipif(not SIM, reason="interface objects over host memory stand in for device arrays under the simulator")
def test_interface_objects_are_converted_at_the_boundary(rng):
    """A torch tensor (or any __cuda_array_interface__ object) handed to a kernel is
    viewed as a numba device array before packing: the AttributeError of
    device_ctypes_pointer deep in the driver path can no longer happen
    (gpubn.torch's backward passed its saved constants as a tensor)."""
    x = rng.standard_normal((2, 3, 8)).astype(np.float32)
    coef = rng.standard_normal((5, 3)).astype(np.float32)
    y = np.zeros_like(x)
    args = launch.launch_arguments(K.scale_shift_cuda_inner, (_Interface(x), None, _Interface(coef), 0, _Interface(y)))
    assert all(getattr(a, "__cuda_ndarray__", False) for a in args[::2])
    K.scale_shift_cuda_inner[(1, 2), (8, 4)](_Interface(x), None, _Interface(coef), 0, _Interface(y))
    want = (x - coef[0][None, :, None]) * coef[3][None, :, None] + coef[4][None, :, None]
    np.testing.assert_allclose(y, want, rtol=1e-6, atol=1e-6)


def test_unknown_arguments_are_refused_naming_the_parameter():
    with pytest.raises(TypeError, match=r"scale_shift_cuda_inner: argument 2 \(coef\) is a builtins.list"):
        launch.launch_arguments(K.scale_shift_cuda_inner, (None, None, [1.0, 2.0], 0, None))
    with pytest.raises(TypeError, match=r"argument 0 \(x\) is a numpy.ndarray"):
        launch.launch_arguments(K.scale_shift_cuda_inner, (np.ones(3), None, None, 0, None))


@pytest.mark.parametrize("block", [(33, 1), (16, 1), (8, 3), (64, 32), (32, 16)])
def test_shuffle_kernels_refuse_partial_warps(block):
    """The full-mask shuffle reductions need whole warps, at most MAX_THREADS
    (their shared partials): a custom block (as examples/kernels_direct.py
    invites) that is not is refused at configuration."""
    for kernel in (K.batch_stats_cuda, K.backward_sums_cuda):
        with pytest.raises(ValueError, match="multiple of 32 threads"):
            kernel[(1, 1), block]
    K.scale_shift_cuda_inner[(1, 1), (8, 3)]  # no shuffles: any block


@pytest.mark.skipif(not SIM, reason="the simulator's emulated shuffles")
@pytest.mark.parametrize("threads,width", [(32, 1), (96, 1), (64, 4), (96, 32), (128, 64)])
def test_block_reductions_run_their_shuffles_under_the_simulator(threads, width):
    """block_sum2 and block_merge as shipped (warp shuffles, then across warps),
    one channel per block (width 1: inner > 1) or thread t in channel t % width
    (a tile of channels: inner == 1; width 64 is a GPU's (64, 4) block), on one
    warp and on several, against NumPy."""
    v = np.random.default_rng(0).standard_normal(threads) + 3
    out = np.zeros((width, 5))
    _reduce[1, threads](v, width, out)
    per = v.reshape(-1, width)  # column j: channel j's values
    mean = per.mean(axis=0)
    want = [per.sum(axis=0), (per * per).sum(axis=0), np.full(width, threads // width), mean]
    want.append(((per - mean) ** 2).sum(axis=0))
    np.testing.assert_allclose(out, np.stack(want, axis=1), rtol=1e-12)


@pytest.mark.gpu
@pytest.mark.skipif(SIM, reason="needs a real GPU")
def test_driver_launch_equals_numba_launch(rng):
    from numba import cuda

    x = cuda.to_device((3 + rng.standard_normal((4, 5, 37))).astype(np.float32))
    coef = cuda.to_device(rng.standard_normal((5, 5)).astype(np.float32))
    y_driver, y_numba = cuda.device_array_like(x), cuda.device_array_like(x)
    kernel = K.scale_shift_cuda_inner
    kernel[(2, 3), (32, 4)](x, None, coef, 0, y_driver)
    kernel.dispatcher[(2, 3), (32, 4)](x, None, coef, 0, y_numba)
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
        K.scale_shift_cuda_inner[(1, 1), (2048, 1)](x, None, coef, 0, cuda.device_array_like(x))  # > 1024 threads
