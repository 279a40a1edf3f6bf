"""One launch per pass on the GPU (a block owns whole channels: the reduction
kernels with their elementwise tail, ``common.one_pass``) against the float64
reference, forced on and off, and the choice between it and the split passes."""

import numpy as np
import pytest

import gpubn
from gpubn.kernels import backward as bw
from gpubn.kernels import common, normalize, stats

from conftest import SIM, _Spy
from reference import backward, forward, running_update, tol

# (shape, feature axis): both regimes (inner > 1, inner == 1), awkward sizes
LAYOUTS = [((3, 5, 7), 1), ((2, 3, 4, 3), 1), ((17, 6), 1), ((3, 2, 3, 33), -1), ((4, 40), 0)]


@pytest.fixture(params=["one launch", "split"])
def path(request, monkeypatch):
    """Every test below runs once through each path of the CUDA launchers."""
    if "cuda" not in gpubn.available_backends():
        pytest.skip("backend 'cuda' not available")
    monkeypatch.setattr(common, "ONE_PASS_MAX", 1 << 40 if request.param == "one launch" else 0)
    return request.param


REDUCTIONS = {stats: ["batch_stats_cuda"], bw: ["backward_sums_cuda"]}
ELEMENTWISE = {normalize: ["scale_shift_cuda_inner", "scale_shift_cuda_channels", "elementwise_cuda_vec4"]}
ELEMENTWISE[bw] = ["input_grad_cuda_inner", "input_grad_cuda_channels", "elementwise_cuda_vec4"]


class _RegimeSpy(_Spy):
    """A reduction kernel that records "name (regime)" at each launch: its
    ``inner_splits`` (argument 13 of both) is None in the channels regime."""

    def __getitem__(self, config):
        launch = self.kernel[config]

        def record(*args):
            self.seen.append(f"{self.name} ({'channels' if args[13] is None else 'inner'})")
            return launch(*args)

        return record


def _launched(monkeypatch):
    """The reduction kernels (with their regime) and elementwise kernels launched while the test runs."""
    seen = []
    for group, spy in ((REDUCTIONS, _RegimeSpy), (ELEMENTWISE, _Spy)):
        for module, names in group.items():
            for name in names:
                monkeypatch.setattr(module, name, spy(getattr(module, name), name, seen))
    return seen


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
@pytest.mark.parametrize("shape,axis", LAYOUTS)
def test_forward_backward_match_the_reference(path, rng, shape, axis, dtype):
    ax = axis % len(shape)
    C = shape[ax]
    acc = np.float64 if dtype == np.float64 else np.float32
    x = (50.0 + 3.0 * rng.standard_normal(shape)).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    gamma, beta = (1 + 0.3 * rng.standard_normal(C)).astype(acc), rng.standard_normal(C).astype(acc)
    rm, rv = rng.standard_normal(C).astype(acc), (1 + rng.random(C)).astype(acc)
    want_rm, want_rv = running_update(rm, rv, x, axis, 0.1)
    y, cache = gpubn.batch_norm_forward(x, gamma, beta, axis=axis, running_mean=rm, running_var=rv, backend="cuda")
    t = tol(dtype)
    assert y.dtype == dtype and y.shape == x.shape
    np.testing.assert_allclose(y.astype(np.float64), forward(x, gamma, beta, axis)[0], **t)
    np.testing.assert_allclose(rm, want_rm, **t)
    np.testing.assert_allclose(rv, want_rv, **t)
    got = gpubn.batch_norm_backward(dy, cache)
    for g, w in zip(got, backward(dy, x, gamma, axis), strict=True):
        scale = max(1.0, float(np.abs(w).max()))  # sums over a channel: relative to their size
        np.testing.assert_allclose(g.astype(np.float64) / scale, w / scale, **t)
    mean, var = gpubn.batch_stats(x, axis=axis, backend="cuda")
    np.testing.assert_allclose(mean, x.astype(np.float64).mean(axis=tuple(i for i in range(x.ndim) if i != ax)), **t)
    assert mean.dtype == var.dtype == acc


@pytest.mark.parametrize("shape,axis", LAYOUTS[:4])
def test_fused_masked_and_eval(path, rng, shape, axis):
    """Activation + residual, a mask and the inference backward give the CPU
    backend's results (itself checked against the reference elsewhere)."""
    ax = axis % len(shape)
    x = (3 + rng.standard_normal(shape)).astype(np.float32)
    z, dy = rng.standard_normal(shape).astype(np.float32), rng.standard_normal(shape).astype(np.float32)
    mask = rng.random(shape[:ax] + shape[ax + 1 :]) < 0.6
    mask.flat[0] = False  # the reference value comes from elsewhere
    mask.flat[1:3] = True
    C = shape[ax]
    for kwargs in (
        {"activation": "sigmoid", "residual": z},
        {"activation": "relu"},
        {"mask": mask},
        {"training": False, "running_mean": np.full(C, 3, np.float32), "running_var": np.full(C, 2, np.float32)},
    ):
        outs = {}
        for be in ("cuda", "cpu"):
            y, cache = gpubn.batch_norm_forward(x, axis=axis, backend=be, **kwargs)
            outs[be] = (y, *gpubn.batch_norm_backward(dy, cache))
        for g, w in zip(outs["cuda"], outs["cpu"], strict=True):
            np.testing.assert_allclose(g, w, atol=3e-5, rtol=3e-5, err_msg=str(kwargs))


@pytest.mark.parametrize("block", [(32, 1), (8, 4), (4, 8), (1, 32)], ids=str)
def test_one_launch_every_block_shape(monkeypatch, rng, block):
    """Blocks with several thread rows (the tree sums along ty, rows strided by
    TY) and a single column (TX = 1), against the CPU backend."""
    if "cuda" not in gpubn.available_backends():
        pytest.skip("backend 'cuda' not available")
    scale = common.MAX_THREADS // 32
    monkeypatch.setattr(common, "BLOCK_OVERRIDE", (block[0] * scale, block[1]) if block[0] > 1 else (1, 32 * scale))
    monkeypatch.setattr(common, "ONE_PASS_MAX", 1 << 40)
    seen = _launched(monkeypatch)
    for shape in [(5, 3, 6), (2, 2, 17), (37, 5, 1)]:
        x = (7 + rng.standard_normal(shape)).astype(np.float32)
        dy = rng.standard_normal(shape).astype(np.float32)
        mask = rng.random((shape[0], shape[2])) < 0.7
        mask[0, 0] = False
        mask[1, 0] = True
        for kwargs in ({}, {"mask": mask}):
            got, cache = gpubn.batch_norm_forward(x, backend="cuda", **kwargs)
            want, cache_cpu = gpubn.batch_norm_forward(x, backend="cpu", **kwargs)
            np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)
            both = gpubn.batch_norm_backward(dy, cache), gpubn.batch_norm_backward(dy, cache_cpu)
            for g, w in zip(*both, strict=True):
                np.testing.assert_allclose(g, w, atol=3e-5, rtol=3e-5)
    # every reduction kernel ran in both regimes, each also writing y or dx: no elementwise launch
    names = [name for names in REDUCTIONS.values() for name in names]
    assert set(seen) == {f"{name} ({r})" for name in names for r in ("inner", "channels")}


@pytest.mark.parametrize("offset", [1e4, 1e6, 1e8])
def test_large_offsets_and_an_outlier_as_reference_value(monkeypatch, rng, offset):
    """The two-pass variance on chip: exact to float64 rounding at offsets up to
    1e8 with spread 1e-4 (float64), and an outlier as the channel's reference
    value K does not cost float32 accuracy."""
    if "cuda" not in gpubn.available_backends():
        pytest.skip("backend 'cuda' not available")
    monkeypatch.setattr(common, "ONE_PASS_MAX", 1 << 40)
    x = offset + 1e-4 * rng.standard_normal((40, 3))
    mean, var = gpubn.batch_stats(x, axis=1, backend="cuda")
    from reference import stats

    want_mean, want_var = stats(x, 1)
    np.testing.assert_allclose(var, want_var, rtol=1e-7)
    np.testing.assert_allclose(mean, want_mean, rtol=1e-15)
    x32 = (1e4 + rng.standard_normal((40, 3))).astype(np.float32)
    x32[0] = 1e4 + 3e3  # the first row (K) far out
    _, var32 = gpubn.batch_stats(x32, axis=1, backend="cuda")
    np.testing.assert_allclose(var32, stats(x32, 1)[1], rtol=1e-4)


def test_constant_channel_is_exactly_beta(path):
    x = np.full((6, 2, 5), 1234.5, np.float32)
    beta = np.array([0.25, -3.0], np.float32)
    y, _ = gpubn.batch_norm_forward(x, np.array([2.0, 3.0], np.float32), beta, backend="cuda")
    np.testing.assert_array_equal(y, np.broadcast_to(beta[None, :, None], x.shape))


def test_the_choice_follows_the_values_per_channel(monkeypatch):
    """One launch exactly while a channel has at most ONE_PASS_MAX values; the
    GPU's limit puts the small design shapes on one launch, (64, 256, 28, 28) not."""
    limit = common.ONE_PASS_MAX
    assert common.one_pass((limit, 3, 1)) and not common.one_pass((limit + 1, 3, 1))
    assert common.one_pass((1, 3, limit)) and not common.one_pass((2, 3, limit))
    monkeypatch.setattr(common, "ONE_PASS_MAX", common.ONE_PASS_MAX_GPU)
    for shape, want in [((4096, 512, 1), True), ((32, 2048, 49), True), ((64, 16, 1), True), ((64, 256, 784), False)]:
        assert common.one_pass(shape) == want, shape
    # few values a channel but too many bytes for L2: the split passes
    assert common.one_pass((16384, 512, 1), 4) and not common.one_pass((16384, 1024, 1), 4)
    assert common.one_pass((16384, 1024, 1), 2)
    regime, grid, block = common.reduction_config((4096, 512, 1), True)[:3]
    assert regime == "channels" and block[0] == min(32, common.MAX_THREADS) and grid == (512 // block[0], 1)
    regime, grid, block = common.reduction_config((32, 2048, 49), True)[:3]
    assert regime == "inner" and grid == (2048, 1) and block[0] * block[1] == common.MAX_THREADS


@pytest.mark.skipif(not SIM, reason="the simulator's limit")
def test_simulated_tests_run_both_paths():
    """Under the simulator the tiny shapes of the other test files reach both
    paths: (4, 3, 5) and (13, 4) one launch, the split-reduction shapes not."""
    assert common.one_pass((4, 3, 5)) and common.one_pass((13, 4, 1))
    for shape in [(16, 3, 40), (2, 2, 400), (200, 5, 1), (8, 3, 24)]:
        assert not common.one_pass(shape)


@pytest.mark.parametrize(
    "case",
    [
        ("test_large_offset_variance", 1e4),
        ("test_large_offset_variance", 1e6),
        ("test_tiny_variance_under_large_mean_float64",),
        ("test_float16_whose_squares_overflow",),
        ("test_nan_inf_confined_to_channel", np.nan),
        ("test_nan_inf_confined_to_channel", np.inf),
        ("test_single_huge_outlier",),
    ],
    ids=lambda c: "-".join(map(str, c)),
)
# the simulator computes in NumPy scalars, which warn at inf - inf
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_numerics_on_both_paths(path, rng, case):
    """design.md section 5's numerics tests (test_numerics.py), each run through
    the one-launch kernels and through the split reduction."""
    import test_numerics

    name, *args = case
    getattr(test_numerics, name)("cuda", rng, *args)
