"""Compile every CUDA kernel of gpubn.kernels to PTX, without a GPU.

Run in a process without the simulator (NUMBA_ENABLE_CUDASIM=0): the simulator
checks what kernels do, this checks that the real compiler takes them (types,
float16 loads and stores, shared memory, atomics) for a given compute capability.
Prints one line per kernel and dtype; exit 1 when a kernel's PTX uses local
memory (a stack frame: spilled or addressed locals, slow on every GPU), when
float32 data is computed in float64 (``float32_arithmetic``), when a kernel of
WARP_SHUFFLES has no ``shfl.sync.down``, or when
the parameters numba-cuda's launcher packs for the signature (``_prepare_args``,
run here without a GPU) differ from those the PTX entry takes, exit 2 when no
CUDA compiler is installed.

    NUMBA_ENABLE_CUDASIM=0 python tests/compile_ptx.py [--cc 9.0]
"""

import argparse
import re
import struct
import sys
import types as pytypes

import numpy as np

#: kernels whose block reductions run on warp shuffles (common.block_sum2 / block_merge)
WARP_SHUFFLES = {"batch_stats_cuda", "backward_sums_cuda"}

#: kernels whose last block merges the other blocks' partials (common.last_block)
LAST_BLOCK = {"batch_stats_cuda", "backward_sums_cuda"}


def fenced_ticket(ptx) -> bool:
    """Whether the last-block ticket is fenced on both sides: a device-scope
    fence before the integer atomic add of the ticket (the partials released)
    and another after it (acquired before the last block reads them)."""
    ticket = re.search(r"atom\.global\.add\.[us]32", ptx)
    if ticket is None:
        return False
    fence = re.compile(r"\b(?:membar\.gl|fence\.(?:sc|acq_rel)\.gpu)\b")
    return bool(fence.search(ptx, 0, ticket.start())) and bool(fence.search(ptx, ticket.end()))


#: bytes of a kernel parameter by its PTX type
PTX_BYTES = {"u64": 8, "s64": 8, "b64": 8, "f64": 8, "u32": 4, "s32": 4, "b32": 4, "f32": 4}
PTX_BYTES.update({"u16": 2, "s16": 2, "b16": 2, "f16": 2, "u8": 1, "s8": 1, "b8": 1})


def ptx_parameters(ptx):
    """Bytes of each parameter of the PTX's one kernel entry, in order."""
    start = ptx.index(".entry")
    params = ptx[start : ptx.index(")", start)]
    return [PTX_BYTES[t] for t in re.findall(r"\.param \.(\w+)", params)]


def float32_arithmetic(kernel, ptx) -> bool:
    """Whether float32 data is computed in float32: no float64 arithmetic at all
    in the elementwise kernels, and the statistics kernels' per-value step
    ``s2 += d * d`` a float32 FMA (``fma.rn.f32``; their float64 is the merges
    and the finalize).  A Python literal in a kernel (``n += 1``, ``1.0 / x``)
    silently promotes float32 to float64: the statistics loop did so (a
    float64 division per value; no float32 FMA at all), and the fused sigmoid
    (float64 exp and division)."""
    name = kernel.py_func.__name__
    if name.startswith(("scale_shift", "input_grad", "elementwise")):
        return not re.search(r"\b(?:add|sub|mul|fma|div)\.(?:rn\.)?f64", ptx)
    if name.startswith("batch_stats"):
        return "fma.rn.f32" in ptx
    return True


def float16_widened(ptx) -> bool:
    """Whether float16 data is computed in float32: loaded, converted
    (``cvt.f32.f16``) and never added, multiplied or subtracted as float16
    (numba would round every step to 11 bits)."""
    return not re.search(r"\b(?:add|sub|mul|fma|div)\.(?:rn\.)?(?:ftz\.)?f16\b", ptx)


def packed_parameters(kernel, sig):
    """Bytes of each launch parameter numba-cuda's own launcher
    (``_Kernel._prepare_args``, through the kernel's extensions) packs for
    arguments of ``sig``: what a launch through numba hands the driver.
    Arrays are stand-ins with the attributes it reads; cuda.core passes a
    Python int as an intptr_t, a bool as a C++ bool, a ctypes value as itself.
    gpubn's own parameter block (``kernels/launch.py``) for the same values
    must hold the same bytes, one parameter per 8-byte slot (AssertionError
    otherwise)."""
    from numba.cuda import dispatcher
    from numba.cuda.args import ArgHint
    from numba.np.numpy_support import as_dtype

    from gpubn.kernels import launch

    class DeviceArray(ArgHint):
        def to_device(self, retr, stream=0):
            return self.value

    def example(k, ty):
        """A distinct value of type ty for argument k (arrays: a stand-in of
        what numba's launcher reads, and what gpubn's reads)."""
        if isinstance(ty, types.Array):
            dtype = as_dtype(ty.dtype)
            shape = tuple(3 + k + j for j in range(ty.ndim))
            strides = tuple(dtype.itemsize * int(np.prod(shape[j + 1 :])) for j in range(ty.ndim))
            layout = pytypes.SimpleNamespace(strides_in_bytes=strides)
            fields = dict(size=int(np.prod(shape)), dtype=dtype, shape=shape, strides=strides, _layout=layout)
            return pytypes.SimpleNamespace(ptr=4096 * (k + 1), **fields)
        if ty == types.none:
            return None
        if ty == types.boolean:
            return k % 2 == 0
        return 3 + k if isinstance(ty, types.Integer) else 1.5 + k

    values = [example(k, ty) for k, ty in enumerate(sig)]
    launcher = pytypes.SimpleNamespace(extensions=kernel.extensions)
    args = []
    for ty, v in zip(sig, values, strict=True):
        hinted = DeviceArray(v) if isinstance(ty, types.Array) else v
        dispatcher._Kernel._prepare_args(launcher, ty, hinted, 0, [], args)
    numba_bytes = []  # each parameter as cuda.core passes it to the driver
    for a in args:
        if isinstance(a, bool):
            numba_bytes.append(struct.pack("<?", a))
        elif isinstance(a, int):
            numba_bytes.append(struct.pack("<q", a))
        else:
            numba_bytes.append(bytes(a))
    block = struct.pack(launch.parameter_format(sig), *launch.parameter_values(sig, values, lambda a: a.ptr))
    ours = [block[8 * k : 8 * k + len(b)] for k, b in enumerate(numba_bytes)]
    if len(block) != 8 * len(numba_bytes) or ours != numba_bytes:
        raise AssertionError(f"gpubn's parameter block {block.hex()} differs from numba's {numba_bytes}")
    return [len(b) for b in numba_bytes]


from numba import types  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cc", default="9.0")
    cc = tuple(int(v) for v in ap.parse_args().cc.split("."))

    from numba import cuda
    from numba.cuda import dispatcher

    import gpubn.kernels as K

    # Device functions are compiled for the current device's capability; there
    # is no device here, so say which one to target.
    dispatcher.get_current_device = lambda: pytypes.SimpleNamespace(compute_capability=cc)

    try:
        cuda.compile_ptx(lambda a: None, (types.float32[::1],), cc=cc)
    except Exception as exc:  # no NVVM / NVRTC installed
        print(f"no CUDA compiler: {type(exc).__name__}: {str(exc).splitlines()[0]}")
        return 2

    status = 0
    for xt in (types.float16, types.float32, types.float64):
        acc = types.float64 if xt == types.float64 else types.float32
        x3, v, m2, w3 = xt[:, :, ::1], acc[::1], acc[:, ::1], types.float64[:, :, ::1]
        i32, flag, i64, f64 = types.int32[::1], types.boolean, types.int64, types.float64
        strided = xt[:, :, :]  # non-contiguous views reach the kernels too
        # optional arguments (marked by a list), compiled twice: all None (plain
        # batch norm) and all given (mask, activation code, residual / its gradient)
        MASK, ACT, Z = [types.boolean[:, ::1]], [types.int64], [x3]
        stats = (MASK, i64, w3, i32, m2, v, v, v, v, acc, acc, flag)
        sums = (m2, w3, i32, m2, v, v, flag, f64, ACT, Z, MASK)
        none = types.none  # inner_splits of the channels regime (inner == 1)
        signatures = [  # the reductions once per access regime: inner_splits an int (inner > 1) or None
            (K.batch_stats_cuda, (x3, *stats, i64, ACT, Z, Z)),
            (K.batch_stats_cuda, (strided, *stats, none, ACT, Z, Z)),
            (K.affine_coefficients_cuda, (v, v, v, v, acc, m2)),
            (K.scale_shift_cuda_inner, (x3, Z, m2, ACT, x3)),
            (K.scale_shift_cuda_channels, (strided, Z, m2, ACT, x3)),
            (K.backward_sums_cuda, (x3, x3, *sums, i64, Z, Z)),
            (K.backward_sums_cuda, (strided, x3, *sums, none, Z, Z)),
            (K.input_grad_cuda_inner, (x3, x3, MASK, m2, x3, ACT, Z, Z)),
            (K.input_grad_cuda_channels, (x3, strided, MASK, m2, x3, ACT, Z, Z)),
        ]
        for kernel, sig in signatures:
            sizes = []
            variants = (True, False) if any(isinstance(t, list) for t in sig) else (False,)
            for plain in variants:
                concrete = tuple((types.none if plain else t[0]) if isinstance(t, list) else t for t in sig)
                ptx, _ = cuda.compile_ptx(kernel.py_func, concrete, cc=cc)
                sizes.append(f"{len(ptx):7d}")
                if ".local" in ptx:
                    print(f"{kernel.py_func.__name__} {xt} {concrete}: uses local memory")
                    status = 1
                try:
                    packed = packed_parameters(kernel, concrete)
                except (NotImplementedError, AssertionError) as exc:
                    packed = f"{type(exc).__name__}{exc.args}"
                if kernel.py_func.__name__ in LAST_BLOCK and not fenced_ticket(ptx):
                    print(f"{kernel.py_func.__name__} {xt} {concrete}: the last-block ticket lacks a fence on a side")
                    status = 1
                if kernel.py_func.__name__ in WARP_SHUFFLES and "shfl.sync.down" not in ptx:
                    print(f"{kernel.py_func.__name__} {xt} {concrete}: no warp shuffles (common.block_sum2)")
                    status = 1
                if xt == types.float16 and not float16_widened(ptx):
                    print(f"{kernel.py_func.__name__} {xt} {concrete}: float16 values computed in float16")
                    status = 1
                if xt == types.float32 and not float32_arithmetic(kernel, ptx):
                    print(f"{kernel.py_func.__name__} {xt} {concrete}: float32 values computed in float64")
                    status = 1
                takes = ptx_parameters(ptx)
                if packed != takes:
                    print(f"{kernel.py_func.__name__} {xt} {concrete}: launch packs {packed}, PTX takes {takes}")
                    status = 1
            print(f"{kernel.py_func.__name__:28s} {str(xt):8s} sm_{cc[0]}{cc[1]} {' / '.join(sizes)} chars of PTX")

    # float32 only: 16-byte loads and stores (kernels/vector.py), which must be
    # in the PTX as v4 instructions, not split into scalar ones
    f1, m2 = types.float32[::1], types.float32[:, ::1]
    vector_kernels = [  # the forward (dy None), the input gradient (z None)
        (K.elementwise_cuda_vec4, (f1, f1, types.none, m2, types.int64, f1, types.int64)),
        (K.elementwise_cuda_vec4, (f1, types.none, f1, m2, types.none, f1, types.int64)),
    ]
    for kernel, sig in vector_kernels:
        ptx, _ = cuda.compile_ptx(kernel.py_func, sig, cc=cc)
        vector = all(op in ptx for op in ("ld.global.v4.f32", "st.global.v4.f32"))
        packed_ok = packed_parameters(kernel, sig) == ptx_parameters(ptx)
        if not vector or ".local" in ptx or not packed_ok or not float32_arithmetic(kernel, ptx):
            print(
                f"{kernel.py_func.__name__}: v4 loads and stores {vector}, local memory {'.local' in ptx}, "
                f"packing {packed_ok}, float32 {float32_arithmetic(kernel, ptx)}"
            )
            status = 1
        print(f"{kernel.py_func.__name__:28s} float32  sm_{cc[0]}{cc[1]} {len(ptx):7d} chars of PTX, v4 loads/stores")
    return status


if __name__ == "__main__":
    sys.exit(main())
