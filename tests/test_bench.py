"""`python -m gpubn.bench`: its timer and one small shape end to end (CPU)."""

import json

import numpy as np
import pytest

from gpubn import bench


class CountingTimer(bench.Timer):
    """Each sample is the position of the call in the run."""

    warmup = 1
    settle = 0.0

    def __init__(self):
        self.calls = []

    def sample(self, fn):
        fn()
        return float(len(self.calls))


class StepTimer(bench.Timer):
    """Calls each function as the bench would, and reports 2 ms for the first
    function of a comparison and 3 ms for the second (the reference), so that
    the rows' arithmetic can be checked exactly."""

    warmup = 0
    settle = 0.0

    def compare(self, fn, ref, repeat):
        fn()
        if ref is not None:
            ref()
        return 2.0, (None if ref is None else 3.0)

    def time(self, fn, repeat):
        fn()
        return 2.0


def test_compare_alternates_series_after_warmup():
    timer = CountingTimer()
    timer.rounds = 2
    a = lambda: timer.calls.append("a")  # noqa: E731
    b = lambda: timer.calls.append("b")  # noqa: E731
    ms_a, ms_b = timer.compare(a, b, repeat=4)
    # each series: one warm-up call, then 2 timed ones
    assert timer.calls == ["a"] * 3 + ["b"] * 3 + ["a"] * 3 + ["b"] * 3
    assert (ms_a, ms_b) == (5.5, 8.5)  # medians of (2, 3, 8, 9) and (5, 6, 11, 12)
    assert timer.compare(a, None, repeat=1) == (14.0, None)


# Minimum traffic in passes over x, from what each op must read and write:
# statistics read x; the forward reads x for them and again to write y; eval
# reads x and writes y; the backward reads dy and x for its sums, then both
# again to write dx; forward + backward is both.
PASSES = {"stats": 1, "fwd-train": 1 + 2, "eval": 2, "backward": 2 + 3, "fwd+bwd": 3 + 5, "layer": 3 + 5}


@pytest.mark.parametrize("axis", [1, -1])
def test_bench_shape_validates_and_times(axis):
    spec = bench.Shape("tiny", (8, 6, 5, 4), axis)
    rows = bench.bench_shape(spec, "cpu", bench.OPS, 2, StepTimer(), 10.0, (None, None))
    assert [r["op"] for r in rows] == [op for op in bench.OPS if op != "module"]  # module rows need torch
    for r in rows:
        assert r["bytes"] == PASSES[r["op"]] * 8 * 6 * 5 * 4 * 4
        assert r["ms"] == 2.0 and r["GB/s"] == pytest.approx(r["bytes"] / 2e-3 / 1e9)
        assert r["pct_floor"] == pytest.approx(100 * r["GB/s"] / 10.0)
        assert all(e < 1e-3 for e in r["validation"].values())
        assert "torch_ms" not in r


def test_unknown_shape_is_an_error(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--backend", "cpu", "--shapes", "no-such-shape"])
    assert "unknown shapes" in capsys.readouterr().err


def test_numpy_baseline_computes_batch_norm(rng):
    """The NumPy column times a real batch norm: its outputs match the reference."""
    from reference import backward, forward

    spec = bench.Shape("tiny", (8, 6, 5), 1, "float64")
    x, dy = rng.standard_normal((8, 6, 5)), rng.standard_normal((8, 6, 5))
    gamma, beta = rng.uniform(0.5, 1.5, 6), rng.standard_normal(6)
    fns = bench._numpy_fns(spec, x, dy, gamma, beta)
    y, _ = fns["fwd-train"]()
    np.testing.assert_allclose(y, forward(x, gamma, beta, 1)[0], rtol=1e-10, atol=1e-10)
    dx, dgamma, dbeta = fns["fwd+bwd"]()
    dx_ref, dgamma_ref, dbeta_ref = backward(dy, x, gamma, 1)
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(dgamma.ravel(), dgamma_ref, rtol=1e-10)
    np.testing.assert_allclose(dbeta.ravel(), dbeta_ref, rtol=1e-10)


def test_bench_shape_with_numpy_column():
    spec = bench.Shape("tiny", (8, 6, 5), 1)
    rows = bench.bench_shape(spec, "cpu", ["stats", "eval"], 2, StepTimer(), 10.0, (None, None), numpy=True)
    assert [r["numpy_ms"] for r in rows] == [2.0, 2.0]


@pytest.mark.parametrize("axis", [1, -1])
def test_module_rows_time_both_modules(axis):
    """With torch: the module row times gpubn.torch's module beside torch's (NCHW and channels-last)."""
    spec = bench.Shape("tiny", (8, 6, 5, 4), axis)
    rows = bench.bench_shape(spec, "cpu", ["module"], 2, StepTimer(), 10.0, bench._torch())
    (row,) = rows
    assert row["op"] == "module" and row["ms"] == 2.0 and row["torch_ms"] == 3.0 and row["speedup"] == 1.5
    assert row["bytes"] == 8 * 8 * 6 * 5 * 4 * 4


def test_cnn_step_row():
    row = bench.bench_cnn(StepTimer(), 2, batch=4, size=8)
    assert row["op"] == "cnn-step" and row["ms"] == 2.0 and row["torch_ms"] == 3.0


def test_fusion_rows():
    spec = bench.Shape("tiny", (8, 6, 5, 4), 1)
    rows = bench.bench_fusion(spec, "cpu", 2, StepTimer(), bench._torch())
    assert [r["op"] for r in rows] == ["fwd-relu", "fwd-add-relu", "bwd-relu", "fwd-masked", "bwd-masked"]
    for r in rows[:3]:  # fused (2 ms) against plain batch norm (3 ms), the unfused ops and torch's timed alone
        assert (r["ms"], r["plain_bn_ms"], r["unfused_ms"], r["torch_ms"]) == (2.0, 3.0, 2.0, 2.0)
        assert r["vs_plain"] == pytest.approx(2 / 3) and r["speedup"] == 1.0
    for r in rows[3:]:  # torch has no masked batch norm
        assert (r["ms"], r["plain_bn_ms"]) == (2.0, 3.0) and "torch_ms" not in r and "unfused_ms" not in r


@pytest.mark.parametrize("shape,axis", [((8, 6, 5, 4), 1), ((64, 16), 1), ((4, 6, 5, 3), -1)])
def test_half_mask(shape, axis):
    mask = bench.half_mask(shape, axis)
    assert mask.shape == shape[: axis % len(shape)] + shape[axis % len(shape) + 1 :]
    assert mask.sum() * 2 == mask.size


def test_layer_rows_time_the_layer_beside_torchs_module():
    """The layer row: gpubn.BatchNorm forward + backward beside torch.nn.BatchNorm2d through autograd."""
    spec = bench.Shape("tiny", (8, 6, 5, 4), 1)
    (row,) = bench.bench_shape(spec, "cpu", ["layer"], 2, StepTimer(), 10.0, bench._torch())
    assert row["op"] == "layer" and row["ms"] == 2.0 and row["torch_ms"] == 3.0
    assert row["bytes"] == 8 * 8 * 6 * 5 * 4 * 4


def test_plot_draws_every_op_with_torch_beside(tmp_path):
    """``--plot``: one panel per op timed, gpubn's and torch's bars and the copy
    floor, from the rows of a run (here: StepTimer's, so torch at 3 ms)."""
    matplotlib = pytest.importorskip("matplotlib")
    spec = bench.Shape("tiny", (8, 6, 5, 4), 1)
    torch_mods = bench._torch()
    rows = bench.bench_shape(spec, "cpu", ["stats", "fwd-train", "backward"], 2, StepTimer(), 10.0, torch_mods)
    meta = {"device": "test", "backend": "cpu", "commit": "abc", "date": "2026-12-02T00:00:00", "copy_GBs": 10.0}
    bench.plot(meta, rows, tmp_path / "three.png")
    bench.plot(meta, [r for r in rows if r["op"] == "stats"], tmp_path / "one.png")
    three, one = (matplotlib.image.imread(tmp_path / name) for name in ("three.png", "one.png"))
    assert three.shape[0] == pytest.approx(3 * one.shape[0], rel=0.02)  # a panel per op, one above the other
    assert three.shape[1] == one.shape[1] > 300
    with pytest.raises(ValueError, match="no timed rows"):
        bench.plot(meta, [], tmp_path / "none.png")


def test_plot_from_a_recorded_run(tmp_path):
    """``--plot FILE --from-json RUN``: the chart of a recorded run (a GPU's
    JSON drawn where matplotlib is), without timing anything."""
    pytest.importorskip("matplotlib")
    spec = bench.Shape("tiny", (8, 6, 5, 4), 1)
    rows = bench.bench_shape(spec, "cpu", ["fwd-train"], 2, StepTimer(), 10.0, (None, None))
    meta = {"device": "test", "backend": "cuda", "commit": "abc", "date": "2026-12-02T00:00:00", "copy_GBs": 10.0}
    run = tmp_path / "run.json"
    run.write_text(json.dumps({"meta": meta, "rows": rows}))
    assert bench.main(["--plot", str(tmp_path / "run.png"), "--from-json", str(run)]) == 0
    assert (tmp_path / "run.png").stat().st_size > 1000
    with pytest.raises(SystemExit):
        bench.main(["--from-json", str(run)])  # nothing to draw to
