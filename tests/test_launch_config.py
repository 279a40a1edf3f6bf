"""Launch configurations: every reduction path is exercised, and huge tensors
get valid 64-bit-safe grids (computed without allocating anything)."""

import numpy as np
import pytest

import gpubn
from gpubn import kernels as K

# shapes the simulated tests use must split channels over several blocks, so
# the cross-block merge (last block finalizes) runs in CI
SPLIT_SHAPES = [((16, 3, 40), "inner"), ((2, 2, 400), "inner"), ((200, 5, 1), "channels")]


@pytest.mark.parametrize("shape,regime", SPLIT_SHAPES)
def test_small_shapes_split_channels(shape, regime):
    kernel, grid, block, inner_splits, splits, columns = K.stats_launch_config(shape)
    assert kernel is K.batch_stats_cuda and (inner_splits is None) == (regime == "channels")
    assert splits > 1, (shape, grid, block)
    if shape == (2, 2, 400):
        assert inner_splits > 1  # too few rows: the inner axis carries the split


@pytest.mark.parametrize("shape,regime", SPLIT_SHAPES)
def test_split_reductions_on_both_backends(backend, rng, shape, regime):
    """The shapes above through forward and backward, against NumPy."""
    x = (3 + rng.standard_normal(shape)).astype(np.float32)
    y, cache = gpubn.batch_norm_forward(x, backend=backend)
    mean, var = x.astype(np.float64).mean(axis=(0, 2)), x.astype(np.float64).var(axis=(0, 2))
    ref = (x - mean[None, :, None]) / np.sqrt(var[None, :, None] + 1e-5)
    np.testing.assert_allclose(y, ref, atol=2e-4, rtol=2e-4)
    dy = rng.standard_normal(shape).astype(np.float32)
    dx, dg, db = gpubn.batch_norm_backward(dy, cache)
    np.testing.assert_allclose(db, dy.astype(np.float64).sum(axis=(0, 2)), atol=1e-3, rtol=1e-4)
    np.testing.assert_allclose(dg, (dy * ref).sum(axis=(0, 2)), atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("block", [(8, 4), (4, 8), (1, 32)], ids=str)  # (32, 1): every other simulated test
def test_every_block_shape_in_the_kernels(monkeypatch, rng, block):
    """Every CUDA kernel with blocks of several thread rows (TY > 1: the row
    striding, the tree merges along ty, the last block's loop over partials),
    which the simulator's default (32, 1) never runs (splits > 1 asserted): the statistics, the
    elementwise pass, the backward (plain, masked, fused with an activation
    and a residual) against the CPU backend, both access regimes."""
    if "cuda" not in gpubn.available_backends():
        pytest.skip("backend 'cuda' not available")
    from gpubn.kernels import common

    scale = common.MAX_THREADS // 32  # a real GPU's 256 threads: the same shapes, 8x the rows
    monkeypatch.setattr(common, "BLOCK_OVERRIDE", (block[0] * scale, block[1]) if block[0] > 1 else (1, 32 * scale))
    for shape in [(8, 3, 24), (2, 2, 200), (200, 5, 1)]:
        assert K.stats_launch_config(shape)[4] > 1  # every channel split over several blocks
        x = (3 + rng.standard_normal(shape)).astype(np.float32)
        z, dy = rng.standard_normal(shape).astype(np.float32), rng.standard_normal(shape).astype(np.float32)
        mask = rng.random((shape[0], shape[2])) < 0.7
        mask[0, 0] = False  # the first position masked: the kernels' reference value comes from elsewhere
        for kwargs in ({}, {"mask": mask}, {"activation": "relu", "residual": z}):
            got = gpubn.batch_norm_forward(x, backend="cuda", **kwargs)
            want = gpubn.batch_norm_forward(x, backend="cpu", **kwargs)
            np.testing.assert_allclose(got[0], want[0], atol=2e-5, rtol=2e-5)
            for g, w in zip(gpubn.batch_norm_backward(dy, got[1]), gpubn.batch_norm_backward(dy, want[1]), strict=True):
                np.testing.assert_allclose(g, w, atol=1e-4, rtol=1e-4)


HUGE = [(2**16, 64, 2**16), (2**33, 1, 1), (1, 3, 2**33), (2**27, 64, 1), (3, 2**31, 1)]


@pytest.mark.parametrize("shape", HUGE, ids=str)
def test_huge_tensor_launch_config(monkeypatch, shape):
    """More than 2**31 elements: grids stay within CUDA's limits, every channel
    is covered, and per-block counts stay exact in float32 (with a real GPU's
    constants: 132 SMs, 256 threads per block, also under the simulator)."""
    from gpubn.kernels import common

    monkeypatch.setattr(common, "SM_COUNT_OVERRIDE", 132)
    monkeypatch.setattr(common, "MAX_THREADS", 256)
    monkeypatch.setattr(common, "MIN_PER_THREAD", 16)
    outer, C, inner = shape
    kernel, grid, block, inner_splits, splits, columns = K.stats_launch_config(shape)
    assert grid[0] <= 2**31 - 1 and grid[1] <= 65535
    assert block[0] * block[1] <= 1024
    n = outer * inner
    if inner > 1:
        assert grid == (C, splits)
        outer_splits = splits // inner_splits
        rows = -(-outer // outer_splits)
        cols = -(-inner // inner_splits)
        assert rows * outer_splits >= outer and cols * inner_splits >= inner
        assert rows * cols < 2**24  # exact float32 counts per block
    else:
        assert grid[0] * block[0] >= C and grid[1] == splits
        assert -(-outer // splits) < 2**24 or n < 2**24
    regime, egrid, eblock = K.elementwise_launch_config(shape)
    assert egrid[0] <= 2**31 - 1 and egrid[1] <= 65535


@pytest.mark.parametrize("shape", [(4096, 512, 1), (200704, 64, 1), (256, 64, 3136), (32, 2048, 49)], ids=str)
def test_gpu_sized_grids_fill_the_device(monkeypatch, shape):
    """With an H200's 132 SMs and 256-thread blocks, every statistics launch
    has at least 2 blocks per SM (the channels regime once got 2 blocks in all
    for (4096, 512): measured 0.93 ms on the H200, where 256 split blocks suffice)."""
    from gpubn.kernels import common

    monkeypatch.setattr(common, "SM_COUNT_OVERRIDE", 132)
    monkeypatch.setattr(common, "MAX_THREADS", 256)
    monkeypatch.setattr(common, "MIN_PER_THREAD", 16)
    kernel, grid, block, inner_splits, splits, columns = K.stats_launch_config(shape)
    assert grid[0] * grid[1] >= 2 * 132 or grid[0] * grid[1] * block[0] * block[1] >= shape[0] * shape[1] * shape[2]
    assert block[0] * block[1] == 256


# -- configurations on real cards, computed without one --------------------------------------

#: the benchmark's GPU shapes and design.md section 6's, as (canonical view, itemsize)
CARD_SHAPES = {
    "nchw-256x64x56x56": ((256, 64, 3136), 4),
    "nhwc-256x64x56x56": ((802816, 64, 1), 4),
    "nchw-256x64x56x56-f16": ((256, 64, 3136), 2),
    "nchw-64x256x28x28": ((64, 256, 784), 4),
    "nchw-32x2048x7x7": ((32, 2048, 49), 4),
    "nc-65536x1024": ((65536, 1024, 1), 4),
    "nc-4096x512": ((4096, 512, 1), 4),
    "nc-64x16": ((64, 16, 1), 4),
    "ncl-20x6x65536": ((20, 6, 65536), 4),
    "nhwc-c2": ((802816, 2, 1), 4),
    "nhwc-c3": ((802816, 3, 1), 4),
}
#: a launch moving at most this much is host-bound on any card: it need not fill the card
HOST_BOUND = 1 << 20
#: most partials one thread of the last block merges serially
MERGE_PER_THREAD = 64


@pytest.fixture(params=[132, 108], ids=["H100", "A100"])
def card(request, monkeypatch):
    """The launch configurations of a real card (256 threads a block, its SM
    count), also under the simulator."""
    from gpubn.kernels import common

    monkeypatch.setattr(common, "MAX_THREADS", 256)
    monkeypatch.setattr(common, "MIN_PER_THREAD", 16)
    monkeypatch.setattr(common, "ONE_PASS_MAX", common.ONE_PASS_MAX_GPU)
    monkeypatch.setattr(common, "SM_COUNT_OVERRIDE", request.param)
    monkeypatch.setattr(common, "BLOCK_OVERRIDE", None)
    return request.param


def _fills(blocks, nbytes, sms):
    return blocks >= 2 * sms or nbytes <= HOST_BOUND


@pytest.mark.parametrize("name", list(CARD_SHAPES))
def test_reductions_fill_the_card_without_empty_blocks(card, name):
    """The statistics and backward sums (one launch, or the split reduction):
    at least 2 blocks per SM unless host-bound, every block with work, and
    the last block's merge of the partials bounded per thread."""
    shape, itemsize = CARD_SHAPES[name]
    outer, C, inner = shape
    nbytes = outer * C * inner * itemsize
    if K.one_pass(shape, itemsize):
        cfg = K.reduction_config(shape, True)
        assert cfg.splits == 1 and cfg.grid[1] == 1, (name, cfg)
        assert _fills(cfg.grid[0], nbytes, card), (name, cfg)
        assert (cfg.grid[0] - 1) * (1 if cfg.regime == "inner" else cfg.block[0]) < C
        return
    cfg = K.reduction_config(shape)
    (gx, gy), (tx, ty) = cfg.grid, cfg.block
    assert _fills(gx * gy, nbytes, card), (name, cfg)
    if cfg.regime == "inner":
        outer_splits = cfg.splits // cfg.inner_splits
        rows, cols = -(-outer // outer_splits), -(-inner // cfg.inner_splits)
        assert (outer_splits - 1) * rows < outer and (cfg.inner_splits - 1) * cols < inner, (name, cfg)
        assert -(-cfg.splits // (tx * ty)) <= MERGE_PER_THREAD
    else:
        rows = -(-outer // cfg.splits)
        assert (cfg.splits - 1) * rows < outer and (gx - 1) * tx < C, (name, cfg)
        assert -(-cfg.splits // ty) <= MERGE_PER_THREAD, (name, cfg)
        assert tx <= 32 and (C >= 32 or tx < 2 * C), (name, cfg)  # no idle lanes beyond rounding C up


@pytest.mark.parametrize("name", list(CARD_SHAPES))
def test_elementwise_passes_fill_the_card_without_empty_blocks(card, name):
    """The scalar elementwise pass, and the 16-byte-load one where inner % 4 == 0."""
    shape, itemsize = CARD_SHAPES[name]
    outer, C, inner = shape
    nbytes = outer * C * inner * itemsize
    views = [shape] + ([(outer, C, inner // 4)] if inner > 1 and inner % 4 == 0 else [])
    for view in views:
        regime, (gx, gy), (tx, ty) = K.elementwise_launch_config(view)
        assert _fills(gx * gy, nbytes, card), (name, view, (gx, gy))
        if regime == "inner":
            assert (gx - 1) * tx < view[2] and (gy - 1) * ty < outer * C, (name, view, (gx, gy))
        else:
            assert (gx - 1) * tx < C and (gy - 1) * ty < outer, (name, view, (gx, gy))
