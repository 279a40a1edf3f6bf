"""Mergeable statistics, synchronized batch norm over processes, recalibration."""

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import gpubn
from gpubn import Moments

from reference import backward, forward, running_update, stats

WORKER = Path(__file__).resolve().parent / "sync_worker.py"
sys.path.insert(0, str(WORKER.parent))
import sync_worker  # noqa: E402

# -- Moments ------------------------------------------------------------------------------


def parts_of(x, cuts):
    """Exact float64 moments of each part (the reference's two-pass statistics)."""
    out = []
    for p in np.split(x, cuts):
        if len(p) == 0:
            out.append(Moments.empty(x.shape[1]))
        else:
            mean, var = stats(p, 1)
            out.append(Moments(len(p), mean, var * len(p)))
    return out


def test_moments_of_a_batch_match_the_reference(backend, rng):
    x = 1e8 + rng.standard_normal((9, 4, 5))
    m = gpubn.moments(x, axis=1, backend=backend)
    mean, var = stats(x, 1)
    assert m.count.tolist() == [45.0] * 4 and m.mean.dtype == np.float64
    np.testing.assert_allclose(m.mean, mean, rtol=1e-15)
    np.testing.assert_allclose(m.var(), var, rtol=1e-9)
    np.testing.assert_allclose(m.var(ddof=1), var * 45 / 44, rtol=1e-9)
    empty = gpubn.moments(np.zeros((0, 4)), backend=backend)
    assert empty.count.tolist() == [0.0] * 4


@pytest.mark.parametrize("offset", [3.0, 1e8])
def test_merge_is_exact_associative_and_allows_empty_parts(rng, offset):
    x = offset + rng.standard_normal((200, 3))
    parts = parts_of(x, [0, 17, 17, 90, 150])  # two empty parts
    assert parts[0].count[0] == 0 and parts[2].count[0] == 0
    mean, var = stats(x, 1)
    left = parts[0]
    for p in parts[1:]:
        left = left.merge(p)
    right = parts[-1]
    for p in reversed(parts[:-1]):
        right = p.merge(right)
    tree = Moments.merge_all(parts)
    # float64 means at 1e8 are 1.5e-8 apart: the mean differences in the merges
    # carry that much, relative to a spread of 1
    rtol = 1e-12 if offset < 1e3 else 1e-7
    for m in (left, right, tree):
        np.testing.assert_allclose(m.mean, mean, rtol=1e-15)
        np.testing.assert_allclose(m.var(), var, rtol=rtol)
    np.testing.assert_allclose(left.m2, right.m2, rtol=rtol)  # associative
    again = Moments.merge_all(parts)
    assert np.array_equal(again.to_array(), tree.to_array())  # deterministic for a fixed order
    assert np.array_equal(Moments.from_array(tree.to_array()).m2, tree.m2)


def test_a_million_single_values(rng):
    x = 5.0 + rng.standard_normal((10**6, 1))
    singles = np.stack([np.ones_like(x), x, np.zeros_like(x)], axis=1)  # (10**6, 3, 1): count 1, M2 0
    merged = Moments.merge_all(singles)
    few = Moments.merge_all([Moments.from_array(a) for a in singles[:1000]])  # the same as Moments objects
    np.testing.assert_allclose(few.var(), x[:1000].var(), rtol=1e-12)
    mean, var = stats(x, 1)
    np.testing.assert_allclose(merged.mean, mean, rtol=1e-15)
    np.testing.assert_allclose(merged.var(), var, rtol=1e-12)


def test_moments_errors():
    with pytest.raises(ValueError, match="other: 2 channels"):
        Moments.empty(3).merge(Moments.empty(2))
    with pytest.raises(ValueError, match=r"a: expected a \(3, C\) array"):
        Moments.from_array(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="count"):
        Moments(-1, [0.0], [0.0])
    assert np.isnan(Moments(1, [2.0], [0.0]).var(ddof=1)).all()


# -- synchronized batch norm ----------------------------------------------------------------


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_torch_ranks(world, out, case="uneven", layer="gpubn"):
    port = free_port()
    args = ["--mode", "torch", "--world", str(world), "--port", str(port), "--out", str(out), "--case", case]
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), "--rank", str(r), *args, "--layer", layer],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(world)
    ]
    for p in procs:
        try:
            p.wait(timeout=240)  # a hung rank fails the test instead of hanging it
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail(f"a rank hung (case {case}, world {world})")
    return [p.stdout.read() for p in procs]


def mpiexec():
    exe = shutil.which("mpiexec", path=os.path.dirname(sys.executable)) or shutil.which("mpiexec")
    if exe is None:
        pytest.fail("mpiexec not found: the test extra installs mpich and mpi4py")
    return exe


def run_mpi_ranks(world, out, case="uneven"):
    cmd = [mpiexec(), "-n", str(world), sys.executable, str(WORKER), "--mode", "mpi", "--out", str(out), "--case", case]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    return [proc.stdout + proc.stderr]


def reference_run():
    """Single-process float64 batch norm over the concatenated batch, 3 SGD steps."""
    C = sync_worker.SHAPE[1]
    gamma, beta, rm, rv = np.ones(C), np.zeros(C), np.zeros(C), np.ones(C)
    steps = []
    for step in range(sync_worker.STEPS):
        x, dy = sync_worker.global_batch(step)
        y, _ = forward(x, gamma, beta, 1)
        dx, dg, db = backward(dy, x, gamma, 1)
        rm, rv = running_update(rm, rv, x, 1, 0.3)
        steps.append((y, dx, dg, db))
        gamma, beta = gamma - 0.1 * dg, beta - 0.1 * db
    return steps, rm, rv


@pytest.mark.parametrize(
    "transport,world,layer",
    [("torch", 2, "gpubn"), ("torch", 4, "gpubn"), ("mpi", 2, "gpubn"), ("mpi", 4, "gpubn"), ("torch", 4, "torch")],
)
@pytest.mark.subprocess
def test_sync_batch_norm_equals_one_process_on_the_whole_batch(tmp_path, transport, world, layer):
    """gpubn.BatchNorm(sync=...) over MPI and gloo, and gpubn.torch modules made by
    replace_batchnorm(model, sync=group): uneven shards, an empty one with 4 ranks."""
    if transport == "torch":
        logs = run_torch_ranks(world, tmp_path, layer=layer)
    else:
        logs = run_mpi_ranks(world, tmp_path)
    errors = sorted(tmp_path.glob("*.err"))
    assert not errors, [e.read_text() for e in errors] + logs
    ranks = [np.load(tmp_path / f"rank{r}.npz") for r in range(world)]
    steps, rm, rv = reference_run()
    for step, (y, dx, dg, db) in enumerate(steps):
        np.testing.assert_allclose(np.concatenate([r[f"y{step}"] for r in ranks]), y, atol=1e-12)
        np.testing.assert_allclose(np.concatenate([r[f"dx{step}"] for r in ranks]), dx, atol=1e-12)
        for r in ranks:
            np.testing.assert_allclose(r[f"dgamma{step}"], dg, atol=1e-11)
            np.testing.assert_allclose(r[f"dbeta{step}"], db, atol=1e-11)
    for r in ranks:
        np.testing.assert_allclose(r["running_mean"], rm, atol=1e-12)
        np.testing.assert_allclose(r["running_var"], rv, rtol=1e-12)
        assert int(r["num_batches_tracked"]) == sync_worker.STEPS
    if world == 4:
        assert ranks[1]["y0"].shape == (0, 3, 5)  # the empty share


@pytest.mark.subprocess
@pytest.mark.parametrize("transport,world", [("torch", 2), ("mpi", 4)])
def test_mismatched_channels_raise_on_every_rank(tmp_path, transport, world):
    logs = (run_torch_ranks if transport == "torch" else run_mpi_ranks)(world, tmp_path, case="mismatch")
    for r in range(world):
        err = tmp_path / f"rank{r}.err"
        assert err.exists(), f"rank {r} did not raise: " + "".join(logs)
        text = err.read_text()
        assert "ValueError" in text and "rank 1" in text or (r == 1 and "channels" in text), text
    assert not list(tmp_path.glob("*.npz"))


def test_sync_refuses_what_it_cannot_do():
    with pytest.raises(TypeError, match="sync: expected an mpi4py communicator or a torch.distributed"):
        gpubn.BatchNorm(3, sync="world")


# -- recalibration --------------------------------------------------------------------------


def test_recalibrate_gives_the_statistics_of_all_batches(backend, rng):
    bn = gpubn.BatchNorm(3, backend=backend, dtype="float64")
    batches = [5.0 + rng.standard_normal((n, 3, 2)) * np.array([1, 2, 3])[None, :, None] for n in (4, 9, 2, 7)]
    with gpubn.recalibrate(bn):
        for xb in batches:
            bn(xb)
    whole = np.concatenate(batches)
    mean, var = stats(whole, 1)
    n = whole.size // 3
    np.testing.assert_allclose(np.asarray(bn.running_mean if backend == "cpu" else bn.running_mean), mean, rtol=1e-12)
    np.testing.assert_allclose(bn.running_var, var * n / (n - 1), rtol=1e-10)
    before = bn.state_dict()
    with pytest.raises(KeyError), gpubn.recalibrate(bn):  # a failing block changes nothing
        bn(batches[0] + 100)
        raise KeyError("stop")
    np.testing.assert_array_equal(bn.state_dict()["running_mean"], before["running_mean"])
    with pytest.raises(TypeError, match="not a gpubn batch-norm layer"):
        with gpubn.recalibrate(object()):
            pass


def test_recalibrate_torch_modules(rng):
    import torch

    import gpubn.torch as gt

    model = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 1), gt.BatchNorm2d(3))
    batches = [torch.from_numpy(rng.standard_normal((n, 2, 4, 4)).astype(np.float32)) for n in (3, 5, 2)]
    with torch.no_grad(), gpubn.recalibrate(model[1]):
        for xb in batches:
            model(xb.contiguous(memory_format=torch.channels_last))
    with torch.no_grad():
        z = torch.cat([model[0](xb) for xb in batches]).double().numpy()
    mean, var = stats(z, 1)
    n = z.size // 3
    np.testing.assert_allclose(model[1].running_mean.numpy(), mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(model[1].running_var.numpy(), var * n / (n - 1), rtol=1e-5)
