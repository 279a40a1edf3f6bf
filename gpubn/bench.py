"""Benchmark gpubn's ops against the bytes they must move, beside PyTorch and NumPy.

    python -m gpubn.bench [--backend cpu|cuda] [--shapes NAME ...] [--ops OP ...]
                          [--repeat N] [--json PATH] [--no-torch] [--no-numpy]
                          [--plot PNG [--from-json RUN.json]] [--list] [--startup]

For every shape and op: validate against a float64 NumPy reference first, then
time (CUDA events on the GPU, a host timer on the CPU; warm-up, then the median
of ``--repeat`` runs, in series alternating with torch's) and print the median
ms, the GB/s this means for the minimum traffic of the op, and the fraction of
the floor set by a memory copy measured in the same run.  When torch is
importable, ``F.batch_norm`` (and autograd for the backward) is timed on the
same data and the speedup printed; on the CPU backend, so is the same op
written in plain NumPy (x's dtype, one core).

Minimum traffic, B = x.nbytes (design.md section 4):
    stats 1B (read x) | fwd-train 3B (stats pass + normalize pass) |
    eval 2B | backward 5B (dy and x read twice, dx written) |
    fwd+bwd: both, one Python call each, back to back (the launch-overhead case) |
    layer: the same through ``gpubn.BatchNorm`` (forward, backward) against
    ``torch.nn.BatchNorm*d`` through autograd |
    module: the same through autograd on torch tensors, gpubn.torch's
    BatchNorm*d module against torch's own (needs torch)

On the CUDA backend gpubn is called with torch CUDA tensors in (and gets torch
tensors out) when torch is installed (``--tensors numba``: numba device arrays).

``--cnn`` times a whole training step of a small CNN (torch convolutions, batch
norm, SGD) with torch's BatchNorm2d, then after ``gpubn.torch.replace_batchnorm``.
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

import numpy as np

import gpubn


@dataclass(frozen=True)
class Shape:
    name: str
    shape: tuple
    axis: int
    dtype: str = "float32"


GPU_SHAPES = [
    Shape("nchw-256x64x56x56", (256, 64, 56, 56), 1),
    Shape("nhwc-256x64x56x56", (256, 56, 56, 64), -1),
    Shape("nchw-256x64x56x56-f16", (256, 64, 56, 56), 1, "float16"),
    Shape("nchw-64x256x28x28", (64, 256, 28, 28), 1),
    Shape("nchw-32x2048x7x7", (32, 2048, 7, 7), 1),
    Shape("nc-65536x1024", (65536, 1024), 1),
    Shape("nc-4096x512", (4096, 512), 1),
    Shape("nc-64x16", (64, 16), 1),
    Shape("ncl-20x6x65536", (20, 6, 65536), 1),
]
CPU_SHAPES = [
    Shape("nchw-64x64x56x56", (64, 64, 56, 56), 1),
    Shape("nchw-128x256x14x14", (128, 256, 14, 14), 1),
    Shape("nhwc-64x64x56x56", (64, 56, 56, 64), -1),
    Shape("nc-4096x512", (4096, 512), 1),
    Shape("nchw-64x64x56x56-f16", (64, 64, 56, 56), 1, "float16"),
    Shape("nc-256x64", (256, 64), 1),
]
SHAPES = {s.name: s for s in GPU_SHAPES + CPU_SHAPES}
TRAFFIC = {"stats": 1, "fwd-train": 3, "eval": 2, "backward": 5, "fwd+bwd": 8, "layer": 8, "module": 8}
OPS = list(TRAFFIC)


# -- timing -------------------------------------------------------------------


class Timer:
    """Median milliseconds of a function; ``sample`` times one call."""

    warmup = 3
    #: Seconds of idle before each series: the other library's thread pool
    #: (torch and numba each bring an OpenMP runtime) stops spinning.
    settle = 0.02
    #: Series per function in ``compare``, alternating between the two.
    rounds = 3

    def series(self, fn, repeat):
        """``repeat`` timed calls after ``warmup`` untimed ones."""
        time.sleep(self.settle)
        for _ in range(self.warmup):
            fn()
        return [self.sample(fn) for _ in range(repeat)]

    def time(self, fn, repeat):
        return statistics.median(self.series(fn, repeat))

    def compare(self, fn, ref, repeat):
        """(fn's median, ref's median or None) over ``rounds`` alternating
        series of about repeat / rounds calls each.

        Series, not single calls, alternate: on a 2-core machine the OpenMP
        threads that one library leaves spinning after its call slow the
        other's next call.  Alternating series still spread slow phases of a
        shared machine over both."""
        if ref is None:
            return self.time(fn, repeat), None
        per = max(1, -(-repeat // self.rounds))
        a, b = [], []
        for _ in range(self.rounds):
            a += self.series(fn, per)
            b += self.series(ref, per)
        return statistics.median(a), statistics.median(b)


class HostTimer(Timer):
    def sample(self, fn):
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3

    def copy_bandwidth(self, nbytes=512 << 20):
        src = np.ones(nbytes // 4, np.float32)
        dst = np.empty_like(src)
        ms = self.time(lambda: np.copyto(dst, src), 10)
        return 2 * nbytes / ms / 1e6  # read + write, GB/s


class CudaTimer(Timer):
    warmup = 5

    def __init__(self):
        from numba import cuda

        self.cuda = cuda

    def sample(self, fn):
        cuda = self.cuda
        cuda.synchronize()
        start, stop = cuda.event(), cuda.event()
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        return cuda.event_elapsed_time(start, stop)

    def copy_bandwidth(self, nbytes=1 << 30):
        src = self.cuda.to_device(np.ones(nbytes // 4, np.float32))
        dst = self.cuda.device_array_like(src)
        ms = self.time(lambda: dst.copy_to_device(src), 20)
        return 2 * nbytes / ms / 1e6


def _torch():
    try:
        import torch
        import torch.nn.functional as F

        return torch, F
    except Exception:
        return None, None


# -- one shape ------------------------------------------------------------------


def _reference(x, gamma, beta, axis, dy):
    """float64 NumPy forward and backward for validation."""
    x64 = x.astype(np.float64)
    ax = axis % x.ndim
    red = tuple(i for i in range(x.ndim) if i != ax)
    b = [1] * x.ndim
    b[ax] = x.shape[ax]
    mean, var = x64.mean(axis=red), x64.var(axis=red)
    invstd = 1 / np.sqrt(var + 1e-5)
    xhat = (x64 - mean.reshape(b)) * invstd.reshape(b)
    y = xhat * gamma.reshape(b) + beta.reshape(b)
    g = dy.astype(np.float64) * gamma.reshape(b)
    dx = invstd.reshape(b) * (g - g.mean(axis=red, keepdims=True) - xhat * (g * xhat).mean(axis=red, keepdims=True))
    return mean, var, y, dx


def _host(a):
    if hasattr(a, "copy_to_host"):
        return a.copy_to_host()
    if type(a).__module__.startswith("torch"):
        return a.detach().cpu().numpy()
    return np.asarray(a)


def _device_arrays(arrays, tensors):
    """The arrays on the GPU as gpubn's callers hold them: torch CUDA tensors or numba device arrays."""
    if tensors == "torch":
        import torch

        return [torch.from_numpy(np.ascontiguousarray(a)).cuda() for a in arrays]
    from numba import cuda

    return [cuda.to_device(a) for a in arrays]


def bench_shape(
    spec, backend, ops, repeat, timer, floor_gbs, torch_mods, validate=True, numpy=False, tensors="numba"
):  # fmt: skip
    rng = np.random.default_rng(0)
    dtype = np.dtype(spec.dtype)
    x = (0.5 + rng.standard_normal(spec.shape, np.float32)).astype(dtype)
    dy = rng.standard_normal(spec.shape, np.float32).astype(dtype)
    C = spec.shape[spec.axis]
    gamma = rng.uniform(0.5, 1.5, C).astype(np.float32)
    beta = rng.standard_normal(C).astype(np.float32)
    rm, rv = np.zeros(C, np.float32), np.ones(C, np.float32)
    if backend == "cuda":
        xs, dys, gamma_b, beta_b, rm_b, rv_b = _device_arrays((x, dy, gamma, beta, rm, rv), tensors)
    else:
        xs, dys, gamma_b, beta_b, rm_b, rv_b = x, dy, gamma, beta, rm, rv
    kw = dict(axis=spec.axis, backend=backend)

    def fwd():
        return gpubn.batch_norm_forward(xs, gamma_b, beta_b, running_mean=rm_b, running_var=rv_b, **kw)

    y, cache = fwd()
    checks = {}
    if validate:
        mean, var, y_ref, dx_ref = _reference(x, gamma, beta, spec.axis, dy)
        dx, _, _ = gpubn.batch_norm_backward(dys, cache)
        m, v = gpubn.batch_stats(xs, **kw)
        scale = 3e-2 if dtype == np.float16 else 1e-3
        checks = {
            "mean": float(np.abs(_host(m) - mean).max()),
            "var": float(np.abs(_host(v) - var).max() / var.max()),
            "y": float(np.abs(_host(y).astype(np.float64) - y_ref).max()),
            "dx": float(np.abs(_host(dx).astype(np.float64) - dx_ref).max() / max(np.abs(dx_ref).max(), 1e-30)),
        }
        bad = {k: e for k, e in checks.items() if not e < scale}
        if bad:
            raise AssertionError(f"{spec.name}: validation failed on {backend}: {bad}")

    fns = {
        "stats": lambda: gpubn.batch_stats(xs, **kw),
        "fwd-train": fwd,
        "eval": lambda: gpubn.batch_norm_forward(
            xs, gamma_b, beta_b, training=False, running_mean=rm_b, running_var=rv_b, **kw
        ),
        "backward": lambda: gpubn.batch_norm_backward(dys, cache),
        "fwd+bwd": lambda: gpubn.batch_norm_backward(dys, fwd()[1]),
    }
    layer = gpubn.BatchNorm(C, axis=spec.axis, backend=backend)
    if backend == "cuda":
        layer.to_device()

    def layer_step():
        layer(xs)
        return layer.backward(dys)

    fns["layer"] = layer_step
    torch_fns = _torch_fns(spec, x, dy, gamma, beta, backend, torch_mods) if torch_mods[0] else {}
    numpy_fns = _numpy_fns(spec, x, dy, gamma, beta) if numpy else {}
    if torch_mods[0] is not None and ("module" in ops or "layer" in ops):
        fns["module"], torch_fns["module"] = _module_fns(spec, x, dy, gamma, beta, backend, torch_mods[0])
        torch_fns["layer"] = torch_fns["module"]  # torch.nn.BatchNorm*d, forward and backward
    rows = []
    for op in ops:
        if op not in fns:  # module rows without torch
            continue
        ms, torch_ms = timer.compare(fns[op], torch_fns.get(op), repeat)
        nbytes = TRAFFIC[op] * x.nbytes
        gbs = nbytes / ms / 1e6
        row = {
            "shape": spec.name,
            "dims": list(spec.shape),
            "axis": spec.axis,
            "dtype": spec.dtype,
            "op": op,
            "backend": backend,
            "ms": ms,
            "bytes": nbytes,
            "GB/s": gbs,
            "floor_ms": nbytes / floor_gbs / 1e6,
            "pct_floor": 100 * gbs / floor_gbs,
            "validation": checks,
        }
        if torch_ms is not None:
            row["torch_ms"] = torch_ms
            row["speedup"] = torch_ms / ms
        if op in numpy_fns:  # a slow single-threaded baseline: fewer runs, not interleaved
            row["numpy_ms"] = timer.time(numpy_fns[op], max(3, repeat // 3))
        rows.append(row)
    return rows


def _numpy_fns(spec, x, dy, gamma, beta, eps=1e-5):
    """The same ops as a NumPy user would write them, on one core: in x's dtype,
    float16 converted to float32 and back (NumPy's float16 sums overflow)."""
    ax = spec.axis % x.ndim
    red = tuple(i for i in range(x.ndim) if i != ax)
    shape = [1] * x.ndim
    shape[ax] = -1
    dtype = np.float32 if x.dtype == np.float16 else x.dtype
    g = gamma.astype(dtype).reshape(shape)
    b = beta.astype(dtype).reshape(shape)
    rm, rv = np.zeros_like(g), np.ones_like(g)
    n = x.size // x.shape[ax]

    def fwd():
        xc = x.astype(dtype, copy=False)
        invstd = 1 / np.sqrt(xc.var(axis=red, keepdims=True) + eps)
        xhat = (xc - xc.mean(axis=red, keepdims=True)) * invstd
        return (xhat * g + b).astype(x.dtype, copy=False), (xhat, invstd)

    def bwd(saved):
        xhat, invstd = saved
        g_out = dy.astype(dtype, copy=False)
        dbeta = g_out.sum(axis=red, keepdims=True)
        dgamma = (g_out * xhat).sum(axis=red, keepdims=True)
        dx = g * invstd / n * (n * g_out - dbeta - xhat * dgamma)
        return dx.astype(x.dtype, copy=False), dgamma, dbeta

    def stats():
        xc = x.astype(dtype, copy=False)
        return xc.mean(axis=red), xc.var(axis=red)

    saved = fwd()[1]
    return {
        "stats": stats,
        "fwd-train": fwd,
        "eval": lambda: ((x.astype(dtype, copy=False) - rm) / np.sqrt(rv + eps) * g + b).astype(x.dtype, copy=False),
        "backward": lambda: bwd(saved),
        "fwd+bwd": lambda: bwd(fwd()[1]),
    }


def _torch_fns(spec, x, dy, gamma, beta, backend, torch_mods):
    torch, F = torch_mods
    device = "cuda" if backend == "cuda" else "cpu"
    ax = spec.axis % x.ndim
    if ax == x.ndim - 1 and x.ndim == 4:  # channels-last: same memory, NCHW view
        xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).to(device)
        xt = xt.contiguous(memory_format=torch.channels_last)
        dyt = torch.from_numpy(np.ascontiguousarray(dy.transpose(0, 3, 1, 2))).to(device)
        dyt = dyt.contiguous(memory_format=torch.channels_last)
    elif ax == 1:
        xt, dyt = torch.from_numpy(x).to(device), torch.from_numpy(dy).to(device)
    else:
        return {}
    pdt = torch.float32
    w = torch.from_numpy(gamma).to(device, pdt).requires_grad_()
    b = torch.from_numpy(beta).to(device, pdt).requires_grad_()
    rm = torch.zeros(len(gamma), device=device)
    rv = torch.ones(len(gamma), device=device)
    xg = xt.clone().requires_grad_()
    y = F.batch_norm(xg, rm, rv, w, b, training=True)

    def fwd_bwd():
        yy = F.batch_norm(xg, rm, rv, w, b, training=True)
        torch.autograd.grad(yy, (xg, w, b), dyt)

    with torch.no_grad():
        fns = {
            "fwd-train": lambda: F.batch_norm(xt, rm, rv, w.detach(), b.detach(), training=True),
            "eval": lambda: F.batch_norm(xt, rm, rv, w.detach(), b.detach(), training=False),
        }
    fns = {k: _no_grad(torch, f) for k, f in fns.items()}
    fns["backward"] = lambda: torch.autograd.grad(y, (xg, w, b), dyt, retain_graph=True)
    fns["fwd+bwd"] = fwd_bwd
    return fns


def _torch_layout(torch, a, axis, device):
    """x as torch's batch norm takes it: (N, C, *), channels-last memory for NHWC."""
    if axis % a.ndim == a.ndim - 1 and a.ndim == 4:
        t = torch.from_numpy(a).to(device).permute(0, 3, 1, 2)  # NCHW shape, NHWC memory
        assert t.is_contiguous(memory_format=torch.channels_last)
        return t
    return torch.from_numpy(a).to(device) if axis % a.ndim == 1 else None


def _module_fns(spec, x, dy, gamma, beta, backend, torch):
    """(gpubn module fwd+bwd, torch module fwd+bwd) on the same tensors."""
    import gpubn.torch as gt

    device = "cuda" if backend == "cuda" else "cpu"
    xt, dyt = _torch_layout(torch, x, spec.axis, device), _torch_layout(torch, dy, spec.axis, device)
    if xt is None:
        return None, None
    name = {2: "BatchNorm1d", 3: "BatchNorm1d", 4: "BatchNorm2d", 5: "BatchNorm3d"}[x.ndim]
    xg = xt.detach().requires_grad_()
    fns = []
    for cls in (getattr(gt, name), getattr(torch.nn, name)):
        m = cls(len(gamma), device=device)
        with torch.no_grad():
            m.weight.copy_(torch.from_numpy(gamma))
            m.bias.copy_(torch.from_numpy(beta))

        def step(m=m):
            torch.autograd.grad(m(xg), (xg, m.weight, m.bias), dyt)

        fns.append(step)
    return fns[0], fns[1]


def half_mask(shape, axis):
    """A mask over x's non-feature axes with half the positions True: the first
    half of every sample's positions (a padded batch), or of the rows when each
    sample is one row."""
    ax = axis % len(shape)
    mask = np.zeros(shape[:ax] + shape[ax + 1 :], bool)
    per_sample = mask.reshape(mask.shape[0], -1)
    if per_sample.shape[1] > 1:
        per_sample[:, : per_sample.shape[1] // 2] = True
    else:
        mask[: mask.shape[0] // 2] = True
    return mask


def bench_fusion(spec, backend, repeat, timer, torch_mods):
    """Rows for batch norm fused with ReLU (and a residual add): the fused gpubn
    op, the same as separate gpubn + NumPy passes, plain gpubn batch norm, and
    torch's separate ops (autograd for the backward); and masked batch norm
    with half the positions masked (``half_mask``) against plain batch norm."""
    rng = np.random.default_rng(0)
    x = (0.5 + rng.standard_normal(spec.shape, np.float32)).astype(spec.dtype)
    z = rng.standard_normal(spec.shape, np.float32).astype(spec.dtype)
    dy = rng.standard_normal(spec.shape, np.float32).astype(spec.dtype)
    kw = dict(axis=spec.axis, backend=backend)

    def unfused(residual):
        y, cache = gpubn.batch_norm_forward(x, **kw)
        if residual:
            np.add(y, z, out=y)
        return np.maximum(y, 0, out=y), cache

    _, fused_cache = gpubn.batch_norm_forward(x, activation="relu", **kw)
    _, plain_cache = gpubn.batch_norm_forward(x, **kw)
    mask = half_mask(spec.shape, spec.axis)
    _, masked_cache = gpubn.batch_norm_forward(x, mask=mask, **kw)
    fns = {
        "fwd-relu": (
            lambda: gpubn.batch_norm_forward(x, activation="relu", **kw),
            lambda: unfused(False),
        ),
        "fwd-add-relu": (
            lambda: gpubn.batch_norm_forward(x, activation="relu", residual=z, **kw),
            lambda: unfused(True),
        ),
        "bwd-relu": (
            lambda: gpubn.batch_norm_backward(dy, fused_cache),
            lambda: gpubn.batch_norm_backward(dy * (unfused(False)[0] > 0), plain_cache),
        ),
        "fwd-masked": (lambda: gpubn.batch_norm_forward(x, mask=mask, **kw), None),
        "bwd-masked": (lambda: gpubn.batch_norm_backward(dy, masked_cache), None),
    }
    plain = {
        "fwd-relu": lambda: gpubn.batch_norm_forward(x, **kw),
        "bwd-relu": lambda: gpubn.batch_norm_backward(dy, plain_cache),
    }
    plain["fwd-add-relu"] = plain["fwd-masked"] = plain["fwd-relu"]
    plain["bwd-masked"] = plain["bwd-relu"]
    torch_fns = _torch_fusion_fns(spec, x, z, dy, torch_mods[0]) if torch_mods[0] is not None else {}
    rows = []
    for op, (fused, separate) in fns.items():
        ms, plain_ms = timer.compare(fused, plain[op], repeat)  # alternating series: the ratio is the target
        row = {"shape": spec.name, "op": op, "backend": backend, "ms": ms, "plain_bn_ms": plain_ms}
        if separate is not None:
            row["unfused_ms"] = timer.time(separate, repeat)
        torch_ms = timer.time(torch_fns[op], repeat) if op in torch_fns else None
        row["vs_plain"] = ms / row["plain_bn_ms"]
        if torch_ms is not None:
            row["torch_ms"], row["speedup"] = torch_ms, torch_ms / ms
        rows.append(row)
    return rows


def _torch_fusion_fns(spec, x, z, dy, torch):
    """torch's batch norm, then ReLU (and the add), as separate ops."""
    F = torch.nn.functional
    xt, zt, dyt = (_torch_layout(torch, a, spec.axis, "cpu") for a in (x, z, dy))
    if xt is None:
        return {}
    C = xt.shape[1]
    w, b = torch.ones(C, requires_grad=True), torch.zeros(C, requires_grad=True)
    rm, rv = torch.zeros(C), torch.ones(C)
    xg = xt.detach().requires_grad_()
    y = F.relu(F.batch_norm(xg, rm, rv, w, b, training=True))

    def fwd(add):
        with torch.no_grad():
            v = F.batch_norm(xt, rm, rv, w, b, training=True)
            return F.relu(v + zt if add else v)

    return {
        "fwd-relu": lambda: fwd(False),
        "fwd-add-relu": lambda: fwd(True),
        "bwd-relu": lambda: torch.autograd.grad(y, (xg, w, b), dyt, retain_graph=True),
    }


def bench_cnn(timer, repeat, device="cpu", batch=64, size=32):
    """ms per training step of a small CNN, torch's batch norm vs gpubn's."""
    import copy

    import torch

    import gpubn.torch as gt

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        *(
            layer
            for cin, cout in ((3, 32), (32, 64), (64, 64))
            for layer in (
                torch.nn.Conv2d(cin, cout, 3, padding=1, bias=False),
                torch.nn.BatchNorm2d(cout),
                torch.nn.ReLU(),
                torch.nn.MaxPool2d(2),
            )
        ),
        torch.nn.Flatten(),
        torch.nn.Linear(64 * (size // 8) ** 2, 10),
    ).to(device)
    ours = gt.replace_batchnorm(copy.deepcopy(model))
    x = torch.randn(batch, 3, size, size, device=device)
    target = torch.randint(0, 10, (batch,), device=device)
    steps = []
    for m in (ours, model):
        opt = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)

        def step(m=m, opt=opt):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(m(x), target).backward()
            opt.step()

        steps.append(step)
    ms, torch_ms = timer.compare(steps[0], steps[1], repeat)
    return {"op": "cnn-step", "backend": device, "batch": batch, "input": [3, size, size], "ms": ms,
            "torch_ms": torch_ms, "speedup": torch_ms / ms}  # fmt: skip


def _no_grad(torch, fn):
    def run():
        with torch.no_grad():
            return fn()

    return run


# -- start-up ---------------------------------------------------------------------

_FIRST_CALL = """
import sys, time
t0 = time.perf_counter()
import numpy as np, gpubn
t1 = time.perf_counter()
x = np.random.default_rng(0).standard_normal(tuple(map(int, sys.argv[1].split(",")))).astype(np.float32)
y, cache = gpubn.batch_norm_forward(x, backend=sys.argv[2])
gpubn.batch_norm_backward(np.ones_like(y), cache)
print(t1 - t0, time.perf_counter() - t1)
"""


def startup(backend, shapes=((8, 16, 12, 12), (64, 64, 56, 56), (4096, 512))):
    """First forward+backward in a fresh process: cold, then warm compile cache."""
    import tempfile

    print(f"{'input':22s} {'import s':>9s} {'cold s':>8s} {'warm s':>8s}   (first forward + backward)")
    with tempfile.TemporaryDirectory() as cache_dir:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache_dir)
        for shape in shapes:
            arg = ",".join(map(str, shape))
            runs = []
            for _ in range(2):
                out = subprocess.run(
                    [sys.executable, "-c", _FIRST_CALL, arg, backend], env=env, capture_output=True, text=True
                )
                if out.returncode != 0:
                    raise RuntimeError(out.stderr)
                runs.append([float(v) for v in out.stdout.split()])
            print(f"{str(shape):22s} {runs[1][0]:9.2f} {runs[0][1]:8.2f} {runs[1][1]:8.2f}")


# -- report ---------------------------------------------------------------------


def _versions():
    import numba

    v = {"python": platform.python_version(), "numpy": np.__version__, "numba": numba.__version__}
    v["gpubn"] = gpubn.__version__
    try:
        import numba_cuda

        v["numba_cuda"] = numba_cuda.__version__
    except Exception:
        pass
    torch, _ = _torch()
    if torch is not None:
        v["torch"] = torch.__version__
    return v


def _commit():
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        out = subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        return out.stdout.strip() or None
    except Exception:
        return None


def _device_name(backend):
    if backend == "cuda":
        from numba import cuda

        dev = cuda.get_current_device()
        name = dev.name.decode() if isinstance(dev.name, bytes) else str(dev.name)
        return f"{name} ({dev.MULTIPROCESSOR_COUNT} SMs)"
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"


def plot(meta, rows, path):
    """Draw achieved bandwidth against the copy floor: one panel per op, a
    pair of bars per shape (gpubn, and torch from the same run where timed),
    the machine's memory-copy bandwidth as a line.  Needs matplotlib (the
    ``examples`` extra)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r.get("op") in TRAFFIC]
    ops = [op for op in OPS if any(r["op"] == op for r in rows)]
    if not ops:
        raise ValueError("plot: no timed rows to draw")
    fig, axes = plt.subplots(len(ops), 1, figsize=(9, 2.6 * len(ops)), squeeze=False)
    for ax, op in zip(axes[:, 0], ops, strict=True):
        mine = [r for r in rows if r["op"] == op]
        names = [r["shape"] for r in mine]
        pos = np.arange(len(mine))
        ax.bar(pos - 0.2, [r["GB/s"] for r in mine], 0.4, label="gpubn")
        theirs = [r["bytes"] / r["torch_ms"] / 1e6 if "torch_ms" in r else 0.0 for r in mine]
        if any(theirs):
            ax.bar(pos + 0.2, theirs, 0.4, label="torch")
        ax.axhline(meta["copy_GBs"], color="k", linestyle="--", linewidth=1, label="memory copy (floor)")
        ax.set_xticks(pos, names, fontsize=8)
        ax.set_ylabel("GB/s")
        ax.set_title(f"{op}: {TRAFFIC[op]}x the bytes of x", fontsize=9, loc="left")
    handles, labels = max((ax.get_legend_handles_labels() for ax in axes[:, 0]), key=lambda hl: len(hl[0]))
    fig.legend(handles, labels, fontsize=8, loc="upper right")
    title = f"{meta['device']}, backend {meta['backend']}, commit {meta['commit']}, {meta['date'][:10]}"
    fig.suptitle(title, fontsize=9, x=0.02, ha="left")
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m gpubn.bench", description=__doc__.splitlines()[0])
    ap.add_argument("--backend", choices=["cpu", "cuda"], default=None)
    ap.add_argument("--shapes", nargs="+", default=None, help="names (see --list); default: the backend's set")
    ap.add_argument("--ops", nargs="+", default=OPS, choices=OPS)
    ap.add_argument("--repeat", type=int, default=None, help="timed runs per op (default 30 GPU, 10 CPU)")
    ap.add_argument("--json", default=None, help="write the numbers to this file")
    ap.add_argument(
        "--plot", default=None, help="draw GB/s against the copy floor, gpubn and torch, to this PNG (matplotlib)"
    )
    ap.add_argument(
        "--from-json", default=None, help="with --plot: draw a recorded run (a --json file, e.g. a GPU's) instead"
    )
    ap.add_argument("--no-torch", action="store_true", help="skip the PyTorch reference")
    ap.add_argument("--no-numpy", action="store_true", help="skip the NumPy baseline (CPU backend)")
    ap.add_argument("--list", action="store_true", help="list the shapes and exit")
    ap.add_argument("--startup", action="store_true", help="time the first call in fresh processes (cold/warm cache)")
    ap.add_argument("--cnn", action="store_true", help="also time a small CNN's training step (needs torch)")
    ap.add_argument(
        "--fusion",
        action="store_true",
        help="time BN + ReLU (+ add) fused, unfused, and torch's ops; masked BN (half masked) against plain BN",
    )
    ap.add_argument(
        "--tensors",
        choices=["torch", "numba"],
        default=None,
        help="CUDA backend: what gpubn is called with (default torch CUDA tensors when torch is installed)",
    )
    ap.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="alternating series per op and library (default 3); more on a noisy host",
    )
    args = ap.parse_args(argv)
    if args.from_json:
        if not args.plot:
            ap.error("--from-json draws a recorded run: give --plot FILE.png")
        with open(args.from_json) as f:
            recorded = json.load(f)
        plot(recorded["meta"], recorded["rows"], args.plot)
        print(f"wrote {args.plot}")
        return 0
    if args.list:
        for s in SHAPES.values():
            print(f"{s.name:24s} {str(s.shape):22s} axis={s.axis:2d} {s.dtype}")
        return 0
    backend = gpubn._backend.resolve_backend(args.backend)
    if args.startup:
        startup(backend)
        return 0
    if backend == "cuda" and gpubn._backend.simulated():
        print("the CUDA backend is simulated here (NUMBA_ENABLE_CUDASIM=1): nothing to time", file=sys.stderr)
        return 2
    names = args.shapes or [s.name for s in (GPU_SHAPES if backend == "cuda" else CPU_SHAPES)]
    unknown = [n for n in names if n not in SHAPES]
    if unknown:
        ap.error(f"unknown shapes {unknown}; see --list")
    repeat = args.repeat or (30 if backend == "cuda" else 10)
    timer = CudaTimer() if backend == "cuda" else HostTimer()
    if args.rounds:
        timer.rounds = args.rounds
    torch_mods = (None, None) if args.no_torch else _torch()
    floor = timer.copy_bandwidth()
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "backend": backend,
        "device": _device_name(backend),
        "commit": _commit(),
        "versions": _versions(),
        "copy_GBs": floor,
        "repeat": repeat,
        "rounds": timer.rounds,
    }
    print(f"gpubn bench: {meta['device']}, backend {backend}, commit {meta['commit']}, {meta['date']}")
    print(f"versions: {meta['versions']}")
    print(f"memory copy: {floor:.1f} GB/s (read + write) = the floor; median of {repeat} runs\n")
    header = f"{'shape':24s} {'op':9s} {'ms':>9s} {'GB/s':>8s} {'floor':>6s}"
    if torch_mods[0] is not None:
        header += f" {'torch ms':>9s} {'speedup':>8s}"
    numpy = backend == "cpu" and not args.no_numpy
    if numpy:
        header += f" {'numpy ms':>9s}"
    print(header)
    tensors = args.tensors or ("torch" if torch_mods[0] is not None else "numba")
    meta["tensors"] = tensors if backend == "cuda" else "numpy"
    rows = []
    for name in names:
        spec = SHAPES[name]
        for row in bench_shape(spec, backend, args.ops, repeat, timer, floor, torch_mods, numpy=numpy, tensors=tensors):
            rows.append(row)
            line = f"{row['shape']:24s} {row['op']:9s} {row['ms']:9.3f} {row['GB/s']:8.1f} {row['pct_floor']:5.0f}%"
            if "torch_ms" in row:
                line += f" {row['torch_ms']:9.3f} {row['speedup']:7.2f}x"
            elif torch_mods[0] is not None:
                line += " " * 18
            if "numpy_ms" in row:
                line += f" {row['numpy_ms']:9.3f}"
            print(line, flush=True)
    if args.fusion:
        print(f"\n{'shape':24s} {'op':13s} {'fused ms':>9s} {'unfused':>9s} {'plain BN':>9s} {'vs BN':>6s}"
              f" {'torch ms':>9s} {'speedup':>8s}")  # fmt: skip
        for name in names:
            for row in bench_fusion(SHAPES[name], backend, repeat, timer, torch_mods):
                rows.append(row)
                unfused = f"{row['unfused_ms']:9.3f}" if "unfused_ms" in row else f"{'-':>9s}"
                line = (f"{row['shape']:24s} {row['op']:13s} {row['ms']:9.3f} {unfused}"
                        f" {row['plain_bn_ms']:9.3f} {row['vs_plain']:5.2f}x")  # fmt: skip
                if "torch_ms" in row:
                    line += f" {row['torch_ms']:9.3f} {row['speedup']:7.2f}x"
                print(line, flush=True)
    if args.cnn:
        if torch_mods[0] is None:
            ap.error("--cnn needs torch")
        row = bench_cnn(timer, repeat, "cuda" if backend == "cuda" else "cpu")
        rows.append(row)
        print(
            f"\nsmall CNN training step (batch {row['batch']} x {row['input']}, 3 conv + BN + ReLU + pool): "
            f"gpubn BN {row['ms']:.2f} ms, torch BN {row['torch_ms']:.2f} ms ({row['speedup']:.2f}x)"
        )
    if args.json:  # before the chart: a missing matplotlib loses nothing measured
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
        print(f"\nwrote {args.json}")
    if args.plot:
        plot(meta, rows, args.plot)
        print(f"\nwrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
