"""The install for each NVIDIA driver generation: the extras resolve to the CUDA
libraries of that major version (checked by resolving them with pip, without
installing), and asking for the CUDA backend where the libraries are newer than
the driver says what to install instead."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

from gpubn import _backend

ROOT = Path(__file__).resolve().parent.parent


def requirements(extra: str) -> list:
    """The requirement strings of one of gpubn's extras, gpubn[...] references expanded."""
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    out = []
    for req in extras[extra]:
        if req.startswith("gpubn["):
            for name in req[len("gpubn[") : -1].split(","):
                out += requirements(name.strip())
        else:
            out.append(req)
    return out


@pytest.mark.parametrize("extra,major", [("cu12", 12), ("cu13", 13), ("test", 13), ("test-cu12", 12)])
def test_extras_name_one_cuda_major(extra, major):
    reqs = requirements(extra)
    cuda = [r for r in reqs if r.startswith("numba-cuda")]
    assert cuda == [f"numba-cuda[cu{major}]>=0.30"], reqs


@pytest.mark.subprocess
@pytest.mark.parametrize("extra,major", [("cu12", 12), ("test-cu12", 12), ("cu13", 13)])
def test_extras_resolve_to_that_cuda_major(tmp_path, extra, major):
    """pip resolves the extra (with the package's own dependencies) without
    installing: every CUDA library it picks is of that major version."""
    base = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    report = tmp_path / "report.json"
    cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet"]
    proc = subprocess.run(
        [*cmd, "--report", str(report), *base, *requirements(extra)], capture_output=True, text=True, timeout=600
    )
    if proc.returncode != 0 and ("No matching distribution" in proc.stderr or "connection" in proc.stderr.lower()):
        pytest.skip(f"the package index is not reachable here: {proc.stderr.strip().splitlines()[-1]}")
    assert proc.returncode == 0, proc.stderr
    picked = {
        i["metadata"]["name"].lower(): i["metadata"]["version"] for i in json.loads(report.read_text())["install"]
    }
    assert int(picked["cuda-bindings"].split(".")[0]) == major, picked
    other = 13 if major == 12 else 12
    assert not [n for n in picked if n.startswith("nvidia-") and n.endswith(f"-cu{other}")], picked


def test_toolkit_newer_than_driver_names_the_extra_to_install(monkeypatch):
    monkeypatch.setattr(_backend, "_gpu_usable", lambda: False)
    monkeypatch.setattr(_backend, "simulated", lambda: False)
    monkeypatch.setattr(_backend, "driver_cuda_version", lambda: 12080)
    monkeypatch.setattr(_backend, "toolkit_cuda_major", lambda: 13)
    with pytest.raises(ValueError, match=r"CUDA libraries are CUDA 13 but the NVIDIA driver supports only CUDA 12\.8"):
        _backend.resolve_backend("cuda")
    with pytest.raises(ValueError, match=r"install gpubn\[cu12\] instead of gpubn\[cu13\]"):
        _backend.resolve_backend("cuda")
    monkeypatch.setattr(_backend, "driver_cuda_version", lambda: None)
    with pytest.raises(ValueError, match="no NVIDIA driver could be loaded"):
        _backend.resolve_backend("cuda")
    monkeypatch.setattr(_backend, "driver_cuda_version", lambda: 13000)
    monkeypatch.setattr(_backend, "toolkit_cuda_major", lambda: None)
    with pytest.raises(ValueError, match=r"pip install 'gpubn\[cu13\]'"):
        _backend.resolve_backend("cuda")
