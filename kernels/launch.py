"""Kernel launches at the driver's cost: every CUDA launch of the package.

numba's dispatcher spends ~31 us of host time per launch (typing each
argument, a strided memory view per array, ctypes objects, then cuda.core's
own packing); the driver's ``cuLaunchKernel`` with a parameter block built
once costs ~7 us (design.md 4.1, measured on an H100).  ``Kernel`` wraps a
numba-cuda dispatcher with the same ``kernel[grid, block, stream](*args)``
syntax and launches through the driver:

- each signature is compiled once (``dispatcher.compile``: numba's own
  compiler and caches) and its function handle kept (``Specialization``);
- the parameters numba's calling convention expects are packed with one
  ``struct.pack_into`` into a buffer that lives as long as the
  specialization, every parameter in an 8-byte slot, with a ``void*[]`` of
  their addresses built once.  The layout, per argument type:

      array (ndim d)   meminfo = 0, parent = 0, nitems, itemsize, data,
                       shape[0..d), strides[0..d) in bytes   (int64 each)
      None             one null pointer (``common.NoneAsNull``)
      bool             1 byte;  intN, floatN: their width;  float16 its bits

  which is exactly what ``numba.cuda.dispatcher._Kernel._prepare_args``
  produces (``tests/compile_ptx.py`` checks it for every kernel signature,
  and both against the PTX entry, without a GPU);
- a lock per specialization: two threads never share a parameter block mid
  launch (the driver copies the parameters before ``cuLaunchKernel`` returns);
- every ``CUresult`` is checked and raised as ``LaunchError`` naming the
  kernel.

Nothing else is done per call: no synchronization (the launch is
asynchronous on the given stream, so it can be captured in a CUDA graph) and
no occupancy warnings.

Every launch, on either path and under the simulator, first passes the
boundary (``launch_arguments``): None, bools, ints and floats as they are,
numba device arrays as they are, any other ``__cuda_array_interface__`` object
(a torch tensor, a CuPy array) viewed as a numba device array over the same
memory, anything else refused with a TypeError naming the kernel and the
parameter.  Kernels whose block reductions use full-warp shuffles refuse a
block that is not a whole number of warps (``common.check_whole_warps``).

**The driver path has not yet run on a GPU** (no GPU since it was written):
until a recorded GPU run validates it, numba's dispatcher is the default
(``GPUBN_LAUNCH=numba``, stream handles then numba streams) and
``GPUBN_LAUNCH=driver`` opts in.  Under the simulator the dispatcher is
always used.
"""

import ctypes
import os
import struct
import threading

import numpy as np
from numba import cuda, types

SIMULATED = bool(cuda.config.ENABLE_CUDASIM)

#: "numba" (default until a GPU run validates the driver path) or "driver":
#: how gpu_kernel launches on a real GPU.
LAUNCH = os.environ.get("GPUBN_LAUNCH", "numba").strip().lower() or "numba"
if LAUNCH not in ("numba", "driver"):
    raise ValueError(f"GPUBN_LAUNCH: {LAUNCH!r}; expected 'numba' or 'driver'")

_SLOT = 8  # bytes per parameter slot (the widest parameter: a pointer)
_SCALAR = {
    types.boolean: "?",
    types.int8: "b",
    types.uint8: "B",
    types.int16: "h",
    types.uint16: "H",
    types.int32: "i",
    types.uint32: "I",
    types.int64: "q",
    types.uint64: "Q",
    types.float32: "f",
    types.float64: "d",
    types.float16: "e",
    types.none: "Q",
}


class LaunchError(RuntimeError):
    """A CUDA driver call of a launch failed; the message names the kernel and the CUresult."""


def parameter_format(argtypes) -> str:
    """The ``struct`` format of the parameter block for numba types ``argtypes``:
    each kernel parameter in its own 8-byte slot, little-endian."""
    parts = []
    for ty in argtypes:
        if isinstance(ty, types.Array):
            parts.append("q" * (5 + 2 * ty.ndim))
        elif ty in _SCALAR:
            code = _SCALAR[ty]
            pad = _SLOT - struct.calcsize("<" + code)
            parts.append(code + (f"{pad}x" if pad else ""))
        else:
            raise TypeError(f"kernel argument of type {ty} has no parameter layout here")
    return "<" + "".join(parts)


def parameter_count(argtypes) -> int:
    """Kernel parameters (slots) of ``argtypes``: 5 + 2 * ndim per array, 1 per scalar."""
    return sum(5 + 2 * ty.ndim if isinstance(ty, types.Array) else 1 for ty in argtypes)


def array_fields(a, data: int) -> list:
    """The 5 + 2 * ndim parameters of an array argument (its device address ``data``)."""
    return [0, 0, a.size, a.dtype.itemsize, data, *a.shape, *a.strides]


def parameter_values(argtypes, args, address) -> list:
    """The values that ``parameter_format(argtypes)`` packs for ``args``;
    ``address(a)`` gives an array's device address."""
    values = []
    for ty, v in zip(argtypes, args, strict=True):
        if isinstance(ty, types.Array):
            values += array_fields(v, address(v))
        elif ty == types.none:
            values.append(0)
        else:
            values.append(v)
    return values


def argument_type(v):
    """The numba type numba's dispatcher gives a kernel argument ``v``."""
    if v is None:
        return types.none
    cls = type(v)
    if cls is bool:
        return types.boolean
    if cls is int:
        return types.int64
    if cls is float:
        return types.float64
    numba_type = getattr(v, "_numba_type_", None)  # numba device arrays
    if numba_type is not None:
        return numba_type
    from numba.cuda.typing.typeof import Purpose, typeof

    return typeof(v, Purpose.argument)


def _device_address(a) -> int:
    return a.device_ctypes_pointer.value or 0


def launch_arguments(kernel, args) -> tuple:
    """The arguments of a launch as the launch layer can pack them (see the
    module's docstring): device arrays of other libraries viewed as numba
    device arrays, anything unknown refused with a TypeError naming the
    parameter.  ``kernel``: the Kernel (for its name and parameter names)."""
    out = list(args)
    for k, v in enumerate(args):
        if v is None or isinstance(v, (bool, int, float, np.number, np.bool_)):
            continue
        if getattr(v, "__cuda_ndarray__", False):  # numba's (and the simulator's) device arrays
            continue
        if hasattr(v, "__cuda_array_interface__") or _is_torch_cuda(v):
            from gpubn._arrays import device_view

            out[k] = device_view(v)
            continue
        names = kernel.py_func.__code__.co_varnames
        name = names[k] if k < kernel.py_func.__code__.co_argcount else f"#{k}"
        raise TypeError(
            f"{kernel.__name__}: argument {k} ({name}) is a {type(v).__module__}.{type(v).__name__}; "
            "a kernel takes device arrays (numba, or any __cuda_array_interface__ object), None, bools and numbers"
        )
    return tuple(out)


def _is_torch_cuda(v) -> bool:
    return type(v).__module__.startswith("torch") and bool(getattr(v, "is_cuda", False))


def _dim3(d) -> tuple:
    if isinstance(d, int):
        return (d, 1, 1)
    d = tuple(int(v) for v in d)
    return d + (1,) * (3 - len(d))


def _stream_handle(stream) -> int:
    """The CUstream of a stream argument: 0 (the default stream), an int
    handle, or a numba / cuda.core stream object."""
    if isinstance(stream, int):
        return stream
    handle = getattr(stream, "handle", stream)
    handle = getattr(handle, "value", handle)  # ctypes c_void_p
    return int(handle or 0)


def _check(result, what: str):
    from cuda.bindings import driver

    err = result[0] if isinstance(result, tuple) else result
    if err != driver.CUresult.CUDA_SUCCESS:
        _, name = driver.cuGetErrorName(err)
        name = name.decode() if isinstance(name, bytes) else str(err)
        raise LaunchError(f"{what}: {name}")
    return result


class Specialization:
    """One compiled signature of a kernel in the current CUDA context: its
    function handle and its own parameter block."""

    def __init__(self, dispatcher, argtypes):
        from cuda.bindings import driver

        self.name = dispatcher.py_func.__name__
        self.argtypes = argtypes
        kernel = dispatcher.compile(argtypes)  # numba's compiler and caches
        kernel.bind()  # loaded into the current context
        self.function = driver.CUfunction(int(kernel._codelibrary.get_cufunc().handle))
        self.format = parameter_format(argtypes)
        count = parameter_count(argtypes)
        self.block = ctypes.create_string_buffer(count * _SLOT)
        base = ctypes.addressof(self.block)
        self.pointers = (ctypes.c_void_p * count)(*[base + _SLOT * k for k in range(count)])
        self.pointers_address = ctypes.addressof(self.pointers)
        self.lock = threading.Lock()
        self._streams = {}

    def launch(self, grid, block, stream, args):
        from cuda.bindings import driver

        values = parameter_values(self.argtypes, args, _device_address)
        gx, gy, gz = _dim3(grid)
        bx, by, bz = _dim3(block)
        handle = _stream_handle(stream)
        cu_stream = self._streams.get(handle)
        if cu_stream is None:
            cu_stream = self._streams[handle] = driver.CUstream(handle)
        with self.lock:
            struct.pack_into(self.format, self.block, 0, *values)
            result = driver.cuLaunchKernel(
                self.function, gx, gy, gz, bx, by, bz, 0, cu_stream, self.pointers_address, 0
            )
        _check(result, f"{self.name}: cuLaunchKernel grid {(gx, gy, gz)} block {(bx, by, bz)}")


class _Configured:
    __slots__ = ("kernel", "grid", "block", "stream")

    def __init__(self, kernel, grid, block, stream):
        self.kernel, self.grid, self.block, self.stream = kernel, grid, block, stream

    def __call__(self, *args):
        self.kernel.launch(self.grid, self.block, self.stream, args)


class Kernel:
    """A numba-cuda kernel launched through the launch layer (see the module's docstring).

    ``kernel[grid, block]`` / ``kernel[grid, block, stream]`` then a call,
    like numba's; ``dispatcher``, ``py_func`` and ``extensions`` are numba's.
    ``whole_warps``: the kernel reduces with full-warp shuffles, and a block
    that is not a whole number of warps is refused (ValueError).
    """

    def __init__(self, dispatcher, whole_warps: bool = False):
        self.dispatcher = dispatcher
        self.py_func = dispatcher.py_func
        self.__name__ = dispatcher.py_func.__name__
        self.__doc__ = dispatcher.py_func.__doc__
        self.whole_warps = whole_warps
        self._specs = {}
        self._lock = threading.Lock()

    @property
    def extensions(self):
        return self.dispatcher.extensions

    def __getitem__(self, config):
        grid, block = config[0], config[1]
        stream = config[2] if len(config) > 2 else 0
        if self.whole_warps:
            from .common import check_whole_warps

            check_whole_warps(block, self.__name__)
        return _Configured(self, grid, block, stream)

    def specialization(self, argtypes) -> Specialization:
        """The compiled specialization for ``argtypes`` in the current context."""
        from cuda.bindings import driver

        _, context = _check(driver.cuCtxGetCurrent(), f"{self.__name__}: cuCtxGetCurrent")
        if not int(context):  # no context yet: numba's own, as its dispatcher would
            from numba import cuda

            cuda.current_context()
            _, context = _check(driver.cuCtxGetCurrent(), f"{self.__name__}: cuCtxGetCurrent")
        key = (int(context), argtypes)
        spec = self._specs.get(key)
        if spec is None:
            with self._lock:  # one compile per signature, even from several threads
                spec = self._specs.get(key)
                if spec is None:
                    spec = self._specs[key] = Specialization(self.dispatcher, argtypes)
        return spec

    def launch(self, grid, block, stream, args):
        args = launch_arguments(self, args)
        if SIMULATED:
            self.dispatcher[grid, block, stream](*args)
            return
        if LAUNCH == "numba":
            self.dispatcher[grid, block, numba_stream(stream)](*args)
            return
        argtypes = tuple(argument_type(a) for a in args)
        self.specialization(argtypes).launch(grid, block, stream, args)


_NUMBA_STREAMS = {}


def numba_stream(stream):
    """A stream as numba's dispatcher and copies take it: 0, or a numba Stream
    object (one per external handle, made once); under the simulator (which
    has no external streams and runs everything in order) the handle itself."""
    if not isinstance(stream, int) or stream == 0 or SIMULATED:
        return stream
    from .common import current_device

    key = (current_device(), stream)  # a numba Stream belongs to the context it was made in
    s = _NUMBA_STREAMS.get(key)
    if s is None:
        s = _NUMBA_STREAMS[key] = cuda.external_stream(stream)
    return s
