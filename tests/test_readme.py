"""README.md's Python blocks run as written, in order, in one namespace (so the
README cannot drift from the code).  A block whose first line is ``# needs a
GPU`` runs only on a real GPU and is skipped visibly elsewhere."""

import re
from pathlib import Path

import pytest

from conftest import SIM

README = Path(__file__).resolve().parent.parent / "README.md"
GPU = "# needs a GPU"


def _blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_its_examples():
    blocks = _blocks()
    assert len(blocks) >= 5
    assert sum(b.startswith(GPU) for b in blocks) == 1


def _run(blocks, namespace):
    for k, code in enumerate(blocks):
        exec(compile(code, f"README.md block {k + 1}", "exec"), namespace)


@pytest.mark.slow
def test_readme_cpu_blocks_run_in_order(monkeypatch):
    pytest.importorskip("torch")
    pytest.importorskip("sklearn")
    monkeypatch.setenv("GPUBN_BACKEND", "cpu")
    cpu = [b for b in _blocks() if not b.startswith(GPU)]
    namespace = {"__name__": "readme"}
    _run(cpu, namespace)
    assert namespace["accuracy"] > 0.9 and namespace["score"] > 0.9  # the blocks' own results


@pytest.mark.gpu
@pytest.mark.skipif(SIM, reason="needs a real GPU")
def test_readme_gpu_block_runs_after_the_others():
    pytest.importorskip("torch")
    namespace = {"__name__": "readme"}
    _run(_blocks(), namespace)
