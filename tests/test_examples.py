"""Each example runs with --quick and says what it promises."""

import argparse
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.subprocess

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run(name, *args, sim=None, cwd=None):
    env = dict(os.environ)
    if sim is not None:
        env["NUMBA_ENABLE_CUDASIM"] = "1" if sim else "0"
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / name), "--quick", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        cwd=cwd,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_kernels_direct_cpu():
    out = run("kernels_direct.py", "--backend", "cpu")
    assert "ran channel_moments_cpu" in out and "all kernel results match NumPy" in out


def test_kernels_direct_cuda():
    """The CUDA kernels with explicit grids: on the GPU, or on the simulator."""
    from conftest import SIM

    out = run("kernels_direct.py", "--backend", "cuda", sim=SIM)
    assert "launched batch_stats_cuda" in out and "all kernel results match NumPy" in out


def test_normalize_inputs():
    out = run("normalize_inputs.py", "--backend", "cpu")
    assert "standardized : converged in" in out


def test_train_mlp(tmp_path):
    """--quick names its figure by mode: the full run's train_mlp.png is never overwritten."""
    (tmp_path / "train_mlp.png").write_bytes(b"the full run's figure")
    out = run("train_mlp.py", "--backend", "cpu", cwd=tmp_path)
    assert "batch norm: reaches 90%" in out
    assert "learning curves saved to train_mlp_quick.png" in out
    assert (tmp_path / "train_mlp_quick.png").stat().st_size > 10_000
    assert (tmp_path / "train_mlp.png").read_bytes() == b"the full run's figure"


ALL = ["kernels_direct.py", "normalize_inputs.py", "train_mlp.py", "torch_cnn.py", "sync_bn.py"]


@pytest.mark.parametrize("name", ALL)
def test_examples_have_help(name):
    proc = subprocess.run([sys.executable, str(EXAMPLES / name), "--help"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "--quick" in proc.stdout
    if name != "sync_bn.py":  # processes, not a backend choice
        assert ("--device" if name == "torch_cnn.py" else "--backend") in proc.stdout


@pytest.mark.parametrize("name", ALL)
def test_every_option_has_help_text(name, monkeypatch):
    parsers = []

    def capture(self, args=None, namespace=None):
        parsers.append(self)
        raise SystemExit(0)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    main = runpy.run_path(str(EXAMPLES / name))["main"]  # not run as __main__: defines main only
    with pytest.raises(SystemExit):
        main([])
    (parser,) = parsers
    silent = [a.option_strings for a in parser._actions if not a.help]
    assert silent == [], f"{name}: options without help text: {silent}"


def test_torch_cnn(tmp_path):
    """torch's BatchNorm and gpubn's via replace_batchnorm: the same loss curve."""
    out = run("torch_cnn.py", "--device", "cpu", cwd=tmp_path)
    assert "replace_batchnorm swapped 3 batch-norm modules" in out
    assert "largest loss difference over 40 steps" in out and "time per training step" in out
    assert (tmp_path / "torch_cnn_quick.png").stat().st_size > 10_000


BLOCK = """
import sys
class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == {name!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
sys.meta_path.insert(0, Blocker())
"""


@pytest.mark.parametrize("name,extra", [("train_mlp.py", "examples"), ("torch_cnn.py", "torch,examples")])
def test_missing_extra_is_said_before_any_work(tmp_path, name, extra):
    """Without matplotlib an example stops at once and names the extra to install."""
    (tmp_path / "sitecustomize.py").write_text(BLOCK.format(name="matplotlib"))
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / name), "--quick"], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 1
    assert proc.stderr.strip() == f'{name} needs matplotlib: pip install "gpubn[{extra}]"'
    assert proc.stdout == ""  # no training started


def test_sync_bn_torch_distributed(tmp_path):
    out = run("sync_bn.py", "--torch", "-n", "2", cwd=tmp_path)
    assert "2 processes over torch.distributed (gloo)" in out and "largest difference" in out


def test_sync_bn_mpi(tmp_path):
    from test_distributed import mpiexec

    proc = subprocess.run(
        [mpiexec(), "-n", "3", sys.executable, str(EXAMPLES / "sync_bn.py"), "--quick"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "3 processes over MPI" in proc.stdout and "largest difference" in proc.stdout
