"""Validation, the canonical (outer, C, inner) view, and host/device movement."""

import contextlib
import functools
import math
import numbers
from typing import NamedTuple

import numpy as np
from numba import cuda

from .kernels.activation import ACTIVATIONS
from .kernels.common import current_device
from .kernels.launch import numba_stream

FLOAT_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))
#: NumPy has no bfloat16: bfloat16 data (from gpubn.torch) travels as its int16
#: bits, which the CPU kernels widen to float32 and narrow back inline
#: (``kernels/half.py``).  Only internal callers say that int16 means this.
BFLOAT16_BITS = np.dtype(np.int16)


def is_device_array(a) -> bool:
    """Numba device arrays, PyTorch CUDA tensors and anything with ``__cuda_array_interface__``."""
    if getattr(a, "__cuda_ndarray__", False) or hasattr(a, "__cuda_array_interface__"):
        return True
    return _is_torch_cuda(a)


def _is_torch_cuda(a) -> bool:
    return type(a).__module__.startswith("torch") and bool(getattr(a, "is_cuda", False))


def array_library(a) -> str:
    """Which library a device array belongs to: "torch", "cupy", "numba", or
    "cai" (any other ``__cuda_array_interface__`` object); results are
    returned as the same library's arrays (``deliver``)."""
    if getattr(a, "__cuda_ndarray__", False):
        return "numba"
    module = type(a).__module__
    if module.startswith("torch"):
        return "torch"
    if module.startswith("cupy"):
        return "cupy"
    return "cai"


#: typestr of the dtypes read from torch tensors without their interface dict
_TORCH_TYPESTR = {}


def _torch_interface(t) -> dict:
    """``__cuda_array_interface__`` of a torch CUDA tensor from data_ptr() and
    stride() (reading torch's own dict costs ~2.4 us; this ~0.5 us: the 2-vCPU development VM), and the
    stream that torch's current stream on its device is."""
    import torch

    if not _TORCH_TYPESTR:
        _TORCH_TYPESTR.update({torch.float16: "<f2", torch.float32: "<f4", torch.float64: "<f8", torch.bool: "|b1"})
        _TORCH_TYPESTR.update({torch.int16: "<i2", torch.int32: "<i4", torch.int64: "<i8"})
    typestr = _TORCH_TYPESTR.get(t.dtype)
    if typestr is None:  # torch's own dict, and its own error for dtypes it cannot export (bfloat16)
        desc = dict(t.__cuda_array_interface__)
    else:
        size = t.element_size()
        desc = {
            "shape": tuple(t.shape),
            "strides": tuple(size * s for s in t.stride()),
            "typestr": typestr,
            "data": (t.data_ptr(), False),
            "version": 3,
        }
    desc["stream"] = torch.cuda.current_stream(t.device).cuda_stream
    return desc


def device_interface(a) -> dict:
    """The ``__cuda_array_interface__`` dict of a device array (torch tensors
    read without building torch's own); its "stream" is the stream the caller
    works on (None where it says none)."""
    if _is_torch_cuda(a):
        return _torch_interface(a)
    return dict(a.__cuda_array_interface__)


def launch_stream(desc) -> int:
    """The stream handle kernels for this array launch on: the interface's
    ``stream`` (None and 1, the legacy default stream, are handle 0; 2 is the
    per-thread default stream, a handle the driver takes as it is)."""
    stream = desc.get("stream")
    return 0 if stream in (None, 1) else int(stream)


def device_view(a, desc=None):
    """A numba device array over ``a``'s memory: zero-copy, and without
    synchronizing anything (numba's ``as_cuda_array`` synchronizes on the
    interface's stream; here the kernels run on that stream instead).

    Under the simulator an interface object's pointer is host memory (a
    stand-in for a device array, as in the tests): the view is a simulator
    array over that memory, so it too is used in place.
    """
    if getattr(a, "__cuda_ndarray__", False):
        return a
    desc = dict(device_interface(a) if desc is None else desc)
    desc.pop("stream", None)  # recorded by the caller (launch_stream), not synchronized on
    if cuda.config.ENABLE_CUDASIM:
        return _simulated_view(desc, a)
    return cuda.from_cuda_array_interface(desc, owner=a, sync=False)


def _simulated_view(desc, owner):
    """A simulator device array over the host memory an interface dict
    points to.  The view, and every slice of it, keeps ``owner`` alive (as
    numba's views of device memory do): a row of a new array, kept after
    the array itself is dropped, must not point into freed memory."""
    import ctypes

    from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray

    dtype = np.dtype(desc["typestr"])
    shape = tuple(desc["shape"])
    strides = desc.get("strides") or None
    if strides is None:
        strides = tuple(int(np.prod(shape[k + 1 :])) * dtype.itemsize for k in range(len(shape)))
    span = dtype.itemsize + sum((n - 1) * s for n, s in zip(shape, strides, strict=True)) if all(shape) else 0
    buffer = (ctypes.c_char * max(span, 1)).from_address(desc["data"][0])
    buffer.owner = owner  # the NumPy array's base, and every slice's
    return FakeCUDAArray(np.ndarray(shape, dtype, buffer=buffer, strides=strides))


def may_overlap(a, b) -> bool:
    """Whether two arrays on one side (host, or one device) may share memory:
    their address ranges meet (``np.may_share_memory``'s test, for any array)."""
    (a0, a1), (b0, b1) = _span(a), _span(b)
    return a0 < b1 and b0 < a1


def _span(a) -> tuple:
    """(first byte, last byte + 1) of an array's elements."""
    if not isinstance(a, np.ndarray):
        a = getattr(a, "_ary", a)  # the simulator's device arrays wrap a NumPy array
    desc = a.__array_interface__ if isinstance(a, np.ndarray) else device_interface(a)
    first = last = desc["data"][0]
    for n, step in zip(a.shape, a.strides, strict=True):
        if n == 0:
            return first, first
        if step < 0:
            first += (n - 1) * step
        else:
            last += (n - 1) * step
    return first, last + a.dtype.itemsize


def acc_dtype(dtype) -> np.dtype:
    """Accumulation / statistics dtype: float64 for float64 input, else float32."""
    return np.dtype(np.float64) if np.dtype(dtype) == np.float64 else np.dtype(np.float32)


def check_float(dtype, name: str) -> np.dtype:
    dt = np.dtype(dtype)
    if dt not in FLOAT_DTYPES:
        if dt.kind == "f" and not dt.isnative:  # '>f4' equals no native dtype
            raise TypeError(
                f"{name}: dtype {dt} is in non-native byte order; convert it first "
                f"(a.astype(a.dtype.newbyteorder('=')))"
            )
        raise TypeError(f"{name}: dtype {dt} is not supported; expected float16, float32 or float64")
    return dt


def check_axis(axis, ndim: int, name: str = "axis") -> int:
    """The feature axis as a non-negative int (negative counts from the end)."""
    if isinstance(axis, (bool, np.bool_)) or not isinstance(axis, numbers.Integral):
        raise TypeError(f"{name}: expected an int, got {type(axis).__name__}")
    if ndim == 0:
        raise ValueError(f"{name}: x is 0-d and has no feature axis")
    if not -ndim <= axis < ndim:
        raise ValueError(f"{name}: {axis} is out of range for an input with {ndim} dimensions")
    return int(axis) % ndim


def check_bool(value, name: str) -> bool:
    """A flag: bool or NumPy bool only (a string such as "no" is not False)."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name}: expected True or False, got {type(value).__name__} {value!r}")
    return bool(value)


def check_activation(value, name: str = "activation") -> int:
    """The kernels' code of an activation name (None, "relu", "sigmoid", "tanh")."""
    if value is None:
        return 0
    if not isinstance(value, str) or value not in ACTIVATIONS:
        raise ValueError(f"{name}: {value!r} is not one of None, 'relu', 'sigmoid', 'tanh'")
    return ACTIVATIONS[value]


def check_scalar(value, name: str, low: float = 0.0, high: float = np.inf) -> float:
    if type(value) is float and low <= value <= high:
        return value
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a real number, got {type(value).__name__}")
    v = float(value)
    if not (low <= v <= high):
        raise ValueError(f"{name}: {value} is outside [{low}, {high}]")
    return v


def check_momentum(value, name: str = "momentum") -> float:
    """The running statistics' momentum: any finite real, as torch accepts
    (``running = (1 - momentum) * running + momentum * batch``; values outside
    [0, 1] extrapolate, and torch's own tests use -1)."""
    v = value if type(value) is float else check_scalar(value, name, -np.inf, np.inf)
    if not math.isfinite(v):
        raise ValueError(f"{name}: {value} is not finite")
    return v


def canonical_shape(shape, axis: int) -> tuple:
    """(outer, C, inner) of an array of ``shape`` whose feature axis is ``axis``.

    >>> canonical_shape((8, 3, 4, 5), 1)
    (8, 3, 20)
    >>> canonical_shape((8, 4, 5, 3), -1)
    (160, 3, 1)
    """
    axis = check_axis(axis, len(shape))
    outer = math.prod(shape[:axis])
    inner = math.prod(shape[axis + 1 :])
    return outer, int(shape[axis]), inner


class Source(NamedTuple):
    """An input as the kernels read it, and where its results go back."""

    arr: object  # a NumPy array, or a numba device array over the caller's memory
    on_device: bool
    library: str  # "numpy", or array_library() of the caller's device array
    stream: int  # the stream handle the kernels launch on (0: the default stream)
    owner: object  # the caller's object itself


def read_input(x, name: str, backend: str) -> Source:
    """A validated input: a NumPy array, or for the CUDA backend a numba
    device array viewing the caller's device memory (zero-copy, no
    synchronization), with the caller's library and stream."""
    if is_device_array(x):
        if backend != "cuda":
            raise TypeError(
                f"{name}: a device array cannot be used with backend {backend!r}; "
                "pass a NumPy array or use backend='cuda'"
            )
        if getattr(x, "__cuda_ndarray__", False):
            return Source(x, True, "numba", 0, x)
        desc = device_interface(x)
        return Source(device_view(x, desc), True, array_library(x), launch_stream(desc), x)
    if isinstance(x, np.ndarray):
        if type(x) is not np.ndarray and isinstance(x, np.ma.MaskedArray):
            raise TypeError(
                f"{name}: a masked array, and gpubn does not read its mask; pass np.asarray({name}) to use "
                "every value, or its data with mask= (bool over the non-feature axes, True: counted)"
            )
        return Source(x, False, "numpy", 0, x)
    try:
        arr = np.asarray(x)
    except Exception as exc:  # ragged lists and the like
        raise TypeError(f"{name}: cannot be read as an array ({exc})") from None
    return Source(arr, False, "numpy", 0, x)


def as_numpy(a) -> np.ndarray:
    """A NumPy array of a host or device array, or of a torch tensor (any
    device; bfloat16 widened to float32): a copy for device data, else a view
    where NumPy can make one."""
    if type(a).__module__.startswith("torch"):
        t = a.detach().cpu()
        return (t.float() if str(t.dtype) == "torch.bfloat16" else t).numpy()
    if is_device_array(a):
        return device_view(a).copy_to_host()
    return np.asarray(a)


def host_copy(src: Source) -> np.ndarray:
    """A host NumPy array of an input's values: the array itself when it is
    one, else a copy of the device array made on the caller's stream (after
    the work queued there; the host waits for it)."""
    if not src.on_device:
        return src.arr
    return to_host(src.arr, src.stream)


def as_input(x, name: str, backend: str):
    """(array, on_device) of ``read_input``."""
    src = read_input(x, name, backend)
    return src.arr, src.on_device


def empty_like_library(shape, dtype, library: str, owner, zero: bool = False):
    """A new device array of ``shape``/``dtype`` allocated by the caller's
    library (torch's caching allocator on the tensor's device, on its current
    stream: graph-aware; CuPy's pool), as a numba view for the kernels; zeroed
    by the library (a memset on that stream) with ``zero``; None for other libraries."""
    if library == "torch":
        import torch

        make = torch.zeros if zero else torch.empty
        t = make(shape, dtype=getattr(torch, np.dtype(dtype).name), device=owner.device)
        view = device_view(t)
        view.gpubn_tensor = t  # deliver_as hands back the tensor itself
        return view
    if library == "cupy":
        import cupy

        with cupy.cuda.Device(owner.device.id):
            return device_view((cupy.zeros if zero else cupy.empty)(shape, dtype))
    return None


def library_allocator(library: str, owner):
    """``scratch(shape, dtype, zero)`` allocating from the caller's library
    (``empty_like_library``), or None where the library has no allocator of its own."""
    if library not in ("torch", "cupy"):
        return None
    return functools.partial(_allocate, library, owner)


def _allocate(library, owner, shape, dtype, zero):
    return empty_like_library(shape, dtype, library, owner, zero)


def deliver_as(arr, library: str, owner):
    """A numba device array result as the caller's library's array (zero-copy):
    a torch tensor on the input's device, a CuPy array, or the numba array."""
    if library == "torch":
        import torch

        tensor = getattr(arr, "gpubn_tensor", None)  # allocated by empty_like_library
        return tensor if tensor is not None else torch.as_tensor(arr, device=owner.device)
    if library == "cupy":
        import cupy

        return cupy.asarray(arr)
    return arr


def to_canonical(arr, shape3, on_device: bool, stream: int = 0, scratch=None):
    """The (outer, C, inner) view of ``arr``: zero-copy when contiguous.

    A non-contiguous host array is reshaped by NumPy (a view where strides
    allow, a copy otherwise); a non-contiguous device array is first copied
    into a contiguous one on the device, on ``stream`` (the caller's), in
    memory from ``scratch(shape, dtype, zero)`` (the caller's allocator) when given.
    """
    if not on_device:
        return arr.reshape(shape3)
    if not arr.is_c_contiguous():
        s = numba_stream(stream)
        if scratch is not None:
            dense = scratch(tuple(arr.shape), arr.dtype, False)
        else:
            dense = cuda.device_array(arr.shape, arr.dtype, stream=s)
        if hasattr(dense, "setitem"):
            dense.setitem(Ellipsis, arr, stream=s)
        else:  # the simulator's arrays (no streams there)
            dense[...] = arr
        arr = dense
    return arr.reshape(*shape3)


def to_device(host, stream: int = 0):
    """A device copy of a host array, queued on ``stream`` (a handle: the
    caller's stream, so that it is ordered with the call's kernels)."""
    return cuda.to_device(host, stream=numba_stream(stream))


def to_host(arr, stream: int = 0) -> np.ndarray:
    """A host copy of a device array, made on ``stream`` after the work queued
    there; the host waits for it."""
    s = numba_stream(stream)
    host = arr.copy_to_host(stream=s)
    if hasattr(s, "synchronize"):  # an int under the simulator, where copies are synchronous
        s.synchronize()
    return host


def array_device(x):
    """The CUDA device ordinal a device array lives on (torch, CuPy, or any
    interface object by its pointer); None for host arrays, numba device
    arrays (made in the current context) and under the simulator."""
    if cuda.config.ENABLE_CUDASIM or getattr(x, "__cuda_ndarray__", False) or not is_device_array(x):
        return None
    library = array_library(x)
    if library == "torch":
        return x.device.index
    if library == "cupy":
        return int(x.device.id)
    from cuda.bindings import driver

    ptr = device_interface(x)["data"][0]
    attr = driver.CUpointer_attribute.CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL
    err, ordinal = driver.cuPointerGetAttribute(attr, ptr)
    return int(ordinal) if err == driver.CUresult.CUDA_SUCCESS else None


def device_scope(device):
    """A context in which the CUDA calls run on ``device`` (its primary
    context made current, then restored); nothing when it is None or already current."""
    if device is None or device == current_device():
        return contextlib.nullcontext()
    return cuda.gpus[device]


def channel_vector(v, name: str, C: int, dtype, backend: str, fill=None, stream: int = 0):
    """A per-channel (C,) vector as the kernels take it: ``dtype``, on the
    backend's side (a host vector copied on ``stream``).  None gives ``fill``
    (or None when fill is None)."""
    if type(v) is np.ndarray and v.shape == (C,) and v.dtype == dtype and backend == "cpu" and v.flags.c_contiguous:
        return v if v.flags.writeable else v.copy()  # read-only: a (C,) copy keeps one kernel signature
    if v is None:
        if fill is None:
            return None
        if backend == "cuda":  # read-only constants: one copy per shape and device, not a transfer per call
            return _device_full(current_device(), C, np.dtype(dtype).str, float(fill))
        return np.full(C, fill, dtype)
    arr, on_device = _checked_vector(v, name, C, dtype, backend)
    if on_device:
        return arr
    host = np.ascontiguousarray(arr, dtype=dtype)
    if not host.flags.writeable:  # np.frombuffer, mmap: a (C,) copy keeps one kernel signature
        host = host.copy()
    return to_device(host, stream) if backend == "cuda" else host


def _checked_vector(v, name: str, C: int, dtype, backend: str):
    """(array, on_device): a per-channel argument checked (side, float dtype,
    shape (C,), and a device array's dtype, which is not converted)."""
    on_device = is_device_array(v)
    if on_device and backend != "cuda":
        raise TypeError(f"{name}: a device array cannot be used with backend {backend!r}")
    arr = device_view(v) if on_device else np.asarray(v)
    check_float(arr.dtype, name)
    if tuple(arr.shape) != (C,):
        raise ValueError(f"{name}: expected shape ({C},) to match the {C} channels of x, got {tuple(arr.shape)}")
    if on_device and arr.dtype != dtype:
        raise TypeError(f"{name}: device array of dtype {arr.dtype}; this input needs {np.dtype(dtype)}")
    return arr, on_device


@functools.lru_cache(maxsize=64)
def _device_full(device: int, C: int, dtype: str, fill: float):
    """A (C,) array of ``fill`` on ``device`` (the current one), shared by
    every call that needs it (the kernels only read gamma and beta); made
    synchronously once, so that it is ready on every stream."""
    return cuda.to_device(np.full(C, fill, dtype))


class StateVector:
    """A per-channel vector the kernels update in place (running statistics).

    ``work`` is what the kernel writes: the caller's array itself when its
    dtype and side fit, else a copy that ``commit()`` writes back.  Validation
    happens at construction, so a refused call changes nothing.  With
    ``update=False`` the vector is only read (inference): a read-only array
    (``np.load(..., mmap_mode="r")``) is accepted then.
    """

    def __init__(self, v, name: str, C: int, dtype, backend: str, update: bool = True, stream: int = 0):
        self.copied = False
        self.stream = stream
        if type(v) is np.ndarray and v.shape == (C,) and v.dtype == dtype and backend == "cpu" and v.flags.writeable:
            self.target = self.work = v  # the kernels update the caller's array
            return
        if not isinstance(v, np.ndarray) and not is_device_array(v):
            raise TypeError(f"{name}: expected a NumPy or device array (updated in place), got {type(v).__name__}")
        arr, on_device = _checked_vector(v, name, C, dtype, backend)
        if not on_device and not arr.flags.writeable:
            if update:
                raise ValueError(f"{name}: array is read-only; it is updated in place")
            arr = arr.copy()  # read only: a (C,) copy keeps one kernel signature
        self.target = arr
        if on_device:
            self.work = arr
        elif backend == "cuda":
            self.work, self.copied = to_device(np.ascontiguousarray(arr, dtype), stream), True
        elif arr.dtype != dtype:
            self.work, self.copied = arr.astype(dtype), True
        else:
            self.work = arr

    def commit(self):
        """Write a copy the kernels updated back to the caller's array (nothing when they updated it)."""
        if self.copied:
            w = self.work
            self.target[...] = to_host(w, self.stream) if is_device_array(w) else w
