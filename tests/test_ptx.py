"""Every CUDA kernel compiles for real hardware (sm_80, sm_90), even without a GPU,
without local memory (compile_ptx.py exits 1 when a kernel's PTX has a stack frame),
the 16-byte-load kernels with ld/st.global.v4.f32 (exit 1 without them), and
numba-cuda's launcher packs exactly the parameters each PTX entry takes, None
arguments included (exit 1 otherwise: before ``common.NoneAsNull`` every kernel
given a None raised NotImplementedError at launch on a real GPU)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

import gpubn.kernels as K

pytestmark = pytest.mark.subprocess

SCRIPT = Path(__file__).with_name("compile_ptx.py")
#: every CUDA kernel, with how many signatures compile_ptx.py compiles per dtype
#: (the reductions once per access regime: ``common.reduction_slot``)
CUDA_KERNELS = {
    "batch_stats_cuda": 2,
    "affine_coefficients_cuda": 1,
    "scale_shift_cuda_inner": 1,
    "scale_shift_cuda_channels": 1,
    "backward_sums_cuda": 2,
    "input_grad_cuda_inner": 1,
    "input_grad_cuda_channels": 1,
}
#: float32 kernels with 16-byte loads: compiled once, their PTX must hold v4 instructions
VECTOR_KERNELS = ["elementwise_cuda_vec4"]  # compiled twice: the forward and the input gradient


def test_kernel_list_is_complete():
    """The compile check covers every CUDA kernel the package exports."""
    kernels = {getattr(K, name) for name in dir(K) if "_cuda" in name and hasattr(getattr(K, name), "py_func")}
    assert sorted(k.py_func.__name__ for k in kernels) == sorted([*CUDA_KERNELS, *VECTOR_KERNELS])


@pytest.mark.parametrize("cc", ["8.0", "9.0"])
def test_kernels_compile_to_ptx(cc):
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="0")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--cc", cc], capture_output=True, text=True, env=env, timeout=900
    )
    if proc.returncode == 2:
        pytest.skip(f"no CUDA compiler installed ({proc.stdout.strip()}); install the cu13 extra")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 3 * sum(CUDA_KERNELS.values()) + 2 * len(VECTOR_KERNELS)
    for name, signatures in CUDA_KERNELS.items():
        assert sum(line.startswith(name + " ") for line in lines) == 3 * signatures
    for name in VECTOR_KERNELS:
        assert sum(line.startswith(name + " ") and line.endswith("v4 loads/stores") for line in lines) == 2
