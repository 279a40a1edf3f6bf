"""Compile every CUDA kernel of gpubn.kernels to PTX, without a GPU.

Run in a process without the simulator (NUMBA_ENABLE_CUDASIM=0): the simulator
checks what kernels do, this checks that the real compiler takes them (types,
float16 loads and stores, shared memory, atomics) for a given compute capability.
Prints one line per kernel and dtype; exit 1 when a kernel's PTX uses local
memory (a stack frame: spilled or addressed locals, slow on every GPU), exit 2
when no CUDA compiler is installed.

    NUMBA_ENABLE_CUDASIM=0 python tests/compile_ptx.py [--cc 9.0]
"""

import argparse
import sys
import types as pytypes


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cc", default="9.0")
    cc = tuple(int(v) for v in ap.parse_args().cc.split("."))

    from numba import cuda, types
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
        signatures = {
            K.batch_stats_cuda_inner: (x3, MASK, i64, w3, i32, m2, v, v, v, v, acc, acc, flag, i64),
            K.batch_stats_cuda_channels: (strided, MASK, i64, w3, i32, m2, v, v, v, v, acc, acc, flag),
            K.affine_coefficients_cuda: (v, v, v, v, acc, m2),
            K.scale_shift_cuda_inner: (x3, m2, x3),
            K.scale_shift_cuda_channels: (strided, m2, x3),
            K.backward_sums_cuda_inner: (x3, x3, m2, w3, i32, m2, v, v, flag, f64, ACT, Z, i64),
            K.backward_sums_cuda_channels: (strided, x3, m2, w3, i32, m2, v, v, flag, f64, ACT, Z),
            K.input_grad_cuda_inner: (x3, x3, MASK, m2, x3, ACT, Z, Z),
            K.input_grad_cuda_channels: (x3, strided, MASK, m2, x3, ACT, Z, Z),
            K.scale_shift_act_cuda_inner: (x3, x3, m2, i64, flag, x3),
            K.scale_shift_act_cuda_channels: (strided, x3, m2, i64, flag, x3),
            K.forward_onepass_cuda_inner: (x3, MASK, i64, f64, m2, v, v, v, v, acc, acc, flag, i64, Z, x3),
            K.forward_onepass_cuda_channels: (strided, MASK, i64, f64, m2, v, v, v, v, acc, acc, flag, i64, Z, x3),
            K.backward_onepass_cuda_inner: (x3, x3, MASK, m2, m2, v, v, flag, f64, ACT, Z, x3, Z),
            K.backward_onepass_cuda_channels: (x3, strided, MASK, m2, m2, v, v, flag, f64, ACT, Z, x3, Z),
        }
        for kernel, sig in signatures.items():
            sizes = []
            variants = (True, False) if any(isinstance(t, list) for t in sig) else (False,)
            for plain in variants:
                concrete = tuple((types.none if plain else t[0]) if isinstance(t, list) else t for t in sig)
                ptx, _ = cuda.compile_ptx(kernel.py_func, concrete, cc=cc)
                sizes.append(f"{len(ptx):7d}")
                if ".local" in ptx:
                    print(f"{kernel.py_func.__name__} {xt} {concrete}: uses local memory")
                    status = 1
            print(f"{kernel.py_func.__name__:28s} {str(xt):8s} sm_{cc[0]}{cc[1]} {' / '.join(sizes)} chars of PTX")

    # float32 only: 16-byte loads and stores (kernels/vector.py), which must be
    # in the PTX as v4 instructions, not split into scalar ones
    f1, m2 = types.float32[::1], types.float32[:, ::1]
    for kernel, sig in {K.scale_shift_cuda_vec4: (f1, m2, f1, types.int64)}.items():
        ptx, _ = cuda.compile_ptx(kernel.py_func, sig, cc=cc)
        vector = all(op in ptx for op in ("ld.global.v4.f32", "st.global.v4.f32"))
        if not vector or ".local" in ptx:
            print(f"{kernel.py_func.__name__}: v4 loads and stores {vector}, local memory {'.local' in ptx}")
            status = 1
        print(f"{kernel.py_func.__name__:28s} float32  sm_{cc[0]}{cc[1]} {len(ptx):7d} chars of PTX, v4 loads/stores")
    return status


if __name__ == "__main__":
    sys.exit(main())
