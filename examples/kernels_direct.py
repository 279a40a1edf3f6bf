"""Call gpubn's kernels themselves, without the functional API.

The batch-norm forward pass is two kernels on the canonical (outer, C, inner)
view of the input: a statistics kernel (mean and variance per channel by a
split reduction, finishing with the per-channel constants) and an elementwise
kernel y = (x - mean) * scale + beta.  On the CUDA backend this script launches
the CUDA kernels with an explicit grid and block; on the CPU it calls their
numba.njit twins.  Every result is checked against NumPy.

    python examples/kernels_direct.py [--backend cpu|cuda] [--quick]

(Without a GPU, ``NUMBA_ENABLE_CUDASIM=1 python examples/kernels_direct.py
--backend cuda --quick`` runs the CUDA kernels on numba's simulator.)
"""

import argparse

import numpy as np

import gpubn
from gpubn import kernels as K


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--backend",
        choices=["cpu", "cuda"],
        default=None,
        help="cpu: the njit twins; cuda: the CUDA kernels with explicit grids (default: cuda when a GPU is usable)",
    )
    ap.add_argument("--quick", action="store_true", help="a small tensor")
    args = ap.parse_args(argv)
    backend = args.backend or gpubn.default_backend()

    rng = np.random.default_rng(0)
    shape = (4, 3, 6, 5) if args.quick else (32, 64, 28, 28)  # NCHW
    x = (5.0 + 2.0 * rng.standard_normal(shape)).astype(np.float32)
    outer, C, inner = gpubn.canonical_shape(x.shape, axis=1)
    x3 = x.reshape(outer, C, inner)  # a view: no copy
    gamma = rng.uniform(0.5, 1.5, C).astype(np.float32)
    beta = rng.standard_normal(C).astype(np.float32)
    running_mean, running_var = np.zeros(C, np.float32), np.ones(C, np.float32)
    eps, momentum = 1e-5, 0.1
    print(f"x: NCHW {shape} float32 -> canonical view (outer, C, inner) = {(outer, C, inner)}; backend {backend}")

    coef = np.empty((5, C), np.float32)  # rows MEAN, VAR, INVSTD, SCALE, BIAS
    y3 = np.empty_like(x3)
    if backend == "cpu":
        moments = np.empty((3, C))  # count, mean, M2 per channel
        K.channel_moments_cpu(x3, moments)
        K.finish_channels_cpu(moments, coef, gamma, beta, running_mean, running_var, eps, momentum, True)
        K.scale_shift_cpu(x3, coef, y3)
        print("ran channel_moments_cpu, finish_channels_cpu, scale_shift_cpu")
    else:
        from numba import cuda

        d_x = cuda.to_device(x3)
        d_coef = cuda.device_array((5, C), np.float32)
        d_gamma, d_beta = cuda.to_device(gamma), cuda.to_device(beta)
        d_rm, d_rv = cuda.to_device(running_mean), cuda.to_device(running_var)
        # the statistics kernel: grid (C, splits), block (TX, TY); each block
        # reduces one slice of one channel, the last block of a channel finalizes
        # (channels-contiguous views, inner == 1: a block per tile of channels,
        # and inner_splits None)
        kernel, grid, block, inner_splits, splits, columns = K.stats_launch_config(x3.shape)
        work = cuda.device_array((3, splits, C), np.float64)  # partial count/mean/M2
        counter = cuda.to_device(np.zeros(columns, np.int32))  # blocks done per channel
        mask, origin = None, 0  # no mask: every position counts (else a bool (outer, inner) array)
        stats_args = (d_x, mask, origin, work, counter, d_coef, d_gamma, d_beta, d_rm, d_rv)
        act, residual = None, None  # no activation (else an ACTIVATIONS code), no residual
        # y None: statistics only (a launch with one block per channel may pass y and write it too)
        kernel[grid, block](*stats_args, np.float32(eps), np.float32(momentum), True, inner_splits, act, residual, None)
        print(f"launched {kernel.py_func.__name__}[grid={grid}, block={block}] ({splits} blocks per channel)")
        # the elementwise kernel: a 2-D grid over (inner, outer*C rows)
        regime, grid, block = K.elementwise_launch_config(x3.shape)
        d_y = cuda.device_array_like(d_x)
        K.scale_shift_cuda_inner[grid, block](d_x, residual, d_coef, act, d_y)
        print(f"launched scale_shift_cuda_inner[grid={grid}, block={block}]")
        coef, y3 = d_coef.copy_to_host(), d_y.copy_to_host()
        running_mean, running_var = d_rm.copy_to_host(), d_rv.copy_to_host()

    # check against NumPy in float64
    x64 = x.astype(np.float64)
    mean, var = x64.mean(axis=(0, 2, 3)), x64.var(axis=(0, 2, 3))
    n = outer * inner
    b = (1, C, 1, 1)
    y_ref = (x64 - mean.reshape(b)) / np.sqrt(var.reshape(b) + eps) * gamma.reshape(b) + beta.reshape(b)
    errors = {
        "mean": np.abs(coef[K.MEAN] - mean).max(),
        "var": np.abs(coef[K.VAR] - var).max(),
        "y": np.abs(y3.reshape(shape) - y_ref).max(),
        "running_var": np.abs(running_var - (0.9 + 0.1 * var * n / (n - 1))).max(),
    }
    for name, err in errors.items():
        print(f"  max |{name} - numpy| = {err:.2e}")
    assert all(err < 1e-4 for err in errors.values()), errors
    print("all kernel results match NumPy")


if __name__ == "__main__":
    main()
