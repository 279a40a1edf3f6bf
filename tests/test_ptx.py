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
CUDA_KERNELS = [
    "batch_stats_cuda_inner",
    "batch_stats_cuda_channels",
    "affine_coefficients_cuda",
    "scale_shift_cuda_inner",
    "scale_shift_cuda_channels",
    "backward_sums_cuda_inner",
    "backward_sums_cuda_channels",
    "input_grad_cuda_inner",
    "input_grad_cuda_channels",
]
#: float32 kernels with 16-byte loads: compiled once, their PTX must hold v4 instructions
VECTOR_KERNELS = ["elementwise_cuda_vec4"]  # compiled twice: the forward and the input gradient


def test_kernel_list_is_complete():
    """The compile check covers every CUDA kernel the package exports."""
    exported = sorted(name for name in dir(K) if "_cuda" in name and hasattr(getattr(K, name), "py_func"))
    assert exported == sorted(CUDA_KERNELS + VECTOR_KERNELS)


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
    assert len(lines) == 3 * len(CUDA_KERNELS) + 2 * len(VECTOR_KERNELS)
    for name in CUDA_KERNELS:
        assert sum(line.startswith(name + " ") for line in lines) == 3
    for name in VECTOR_KERNELS:
        assert sum(line.startswith(name + " ") and line.endswith("v4 loads/stores") for line in lines) == 2
