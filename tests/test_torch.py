"""gpubn.torch against torch's own batch norm (the oracle: torch in float64 on
the same values), on CPU tensors; the GPU-marked tests repeat it on CUDA tensors."""

import numpy as np
import pytest
import torch

import gpubn.torch as gt

from conftest import SIM

# (input shape, memory format): (N, C), (N, C, L), NCHW, channels-last, NCDHW, channels-last 3-D
LAYOUTS = [
    ((16, 5), None),
    ((6, 4, 7), None),
    ((4, 3, 5, 6), None),
    ((4, 3, 5, 6), torch.channels_last),
    ((3, 2, 3, 4, 5), None),
    ((3, 2, 3, 4, 5), torch.channels_last_3d),
]
MODULES = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d, 5: torch.nn.BatchNorm3d}
# (atol, rtol) of outputs and input gradients of order 1, by input dtype
TOL = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (2e-4, 2e-4),
    torch.float16: (2e-2, 2e-2),
    torch.bfloat16: (6e-2, 3e-2),
}


def make_input(shape, fmt, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (2.0 + 1.5 * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype)
    x = x.to(device)
    return x.contiguous(memory_format=fmt) if fmt is not None else x


def pair(shape, dtype, device, **kwargs):
    """(gpubn module, torch float64 module) with the same non-trivial parameters."""
    C = shape[1]
    ours = gt.__dict__[MODULES[len(shape)].__name__](C, device=device, **kwargs)
    ref = MODULES[len(shape)](C, device=device, dtype=torch.float64, **kwargs)
    if ours.affine:
        with torch.no_grad():
            g = torch.Generator().manual_seed(1)
            ours.weight.copy_(1 + 0.3 * torch.randn(C, generator=g))
            ours.bias.copy_(torch.randn(C, generator=g))
            ref.weight.copy_(ours.weight)
            ref.bias.copy_(ours.bias)
    return ours, ref


def close(ours, ref, dtype, scale=1.0):
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(ours.double().cpu(), ref.double().cpu(), atol=atol * scale, rtol=rtol)


DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,fmt", LAYOUTS)
def test_module_matches_torch_over_steps(dtype, shape, fmt):
    check_module_steps("cpu", dtype, shape, fmt)


@pytest.fixture
def device_path(monkeypatch, torch_as_cuda):
    """gpubn.torch's CUDA path on CPU tensors (conftest's ``torch_as_cuda``):
    the CUDA call record (``_DeviceCall``), numba views of the tensors'
    memory, new tensors from torch's allocator, the CUDA plans and kernels.
    Returns the names of the call records that allocated (all should be
    _DeviceCall)."""
    monkeypatch.setattr(gt, "_on_gpu", lambda t: True)
    seen = []
    monkeypatch.setattr(gt._DeviceCall, "rows", _spy(gt._DeviceCall.rows, seen))
    return seen


def _spy(method, seen):
    def rows(self, shape):
        seen.append(type(self).__name__)
        return method(self, shape)

    return rows


@pytest.mark.sim
@pytest.mark.parametrize("shape,fmt,dtype", [((12, 3), None, torch.float32), ((4, 3, 2, 3), torch.channels_last,
                         torch.float64), ((3, 2, 5), None, torch.bfloat16)])  # fmt: skip
def test_module_on_the_cuda_path_under_the_simulator(device_path, shape, fmt, dtype):
    """Module steps (forward, backward, eval) on the CUDA path match torch's in float64."""
    check_module_steps("cpu", dtype, shape, fmt)
    assert device_path and set(device_path) == {"_DeviceCall"}


@pytest.mark.gpu
def test_module_matches_torch_over_steps_on_cuda():
    """Every case of the CPU test on CUDA tensors (run in a lent-GPU session)."""
    if SIM or not torch.cuda.is_available():
        pytest.skip("CUDA tensors need a real GPU and a CUDA build of torch")
    for dtype in DTYPES:
        for shape, fmt in LAYOUTS:
            check_module_steps("cuda", dtype, shape, fmt)


def check_module_steps(device, dtype, shape, fmt):
    ours, ref = pair(shape, dtype, device, momentum=0.2)
    if dtype == torch.float64:
        ours.double()
    for step in range(3):
        x = make_input(shape, fmt, dtype, device, seed=step)
        xo = x.detach().requires_grad_()
        xr = x.detach().double().requires_grad_()
        yo, yr = ours(xo), ref(xr)
        assert yo.dtype == dtype and yo.shape == x.shape
        if fmt is not None:  # channels-last in, channels-last out
            assert yo.is_contiguous(memory_format=fmt)
        close(yo, yr, dtype)
        dy = torch.randn(shape, generator=torch.Generator().manual_seed(10 + step), dtype=torch.float64)
        yo.backward(dy.to(dtype).to(device))
        yr.backward(dy.to(dtype).double().to(device))
        assert xo.grad.dtype == dtype
        close(xo.grad, xr.grad, dtype)
        n = x.numel() // x.shape[1]
        for p, q in ((ours.weight, ref.weight), (ours.bias, ref.bias)):
            assert p.grad.dtype == p.dtype
            close(p.grad, q.grad, dtype, scale=np.sqrt(n))  # sums over n values
        close(ours.running_mean, ref.running_mean, torch.float32)
        close(ours.running_var, ref.running_var, torch.float32)
        assert int(ours.num_batches_tracked) == step + 1
        ours.zero_grad()
        ref.zero_grad()
    ours.eval()
    ref.eval()
    x = make_input(shape, fmt, dtype, device, seed=99)
    close(ours(x), ref(x.double()), dtype)


@pytest.mark.parametrize("kwargs", [dict(momentum=None), dict(affine=False), dict(track_running_stats=False)])
def test_module_options(kwargs):
    shape = (8, 3, 4)
    ours, ref = pair(shape, torch.float64, "cpu", **kwargs)
    ours.double()
    for step in range(3):
        x = make_input(shape, None, torch.float64, "cpu", seed=step)
        torch.testing.assert_close(ours(x), ref(x))
    for name, buf in ref.named_buffers():
        torch.testing.assert_close(getattr(ours, name), buf)
    ours.eval()
    ref.eval()
    x = make_input(shape, None, torch.float64, "cpu", seed=7)
    torch.testing.assert_close(ours(x), ref(x))


def test_functional_matches_torch_and_updates_in_place():
    x = make_input((10, 4, 3), None, torch.float32, "cpu")
    rm, rv = torch.zeros(4), torch.ones(4)
    rm_ref, rv_ref = rm.clone().double(), rv.clone().double()
    ptr = rm.data_ptr()
    y = gt.batch_norm(x, rm, rv, training=True, momentum=0.3)
    y_ref = torch.nn.functional.batch_norm(x.double(), rm_ref, rv_ref, training=True, momentum=0.3)
    close(y, y_ref, torch.float32)
    assert rm.data_ptr() == ptr  # the buffer itself was updated, zero-copy
    close(rm, rm_ref, torch.float32)
    close(rv, rv_ref, torch.float32)
    y = gt.batch_norm(x, rm, rv)  # training=False: running statistics
    close(y, torch.nn.functional.batch_norm(x.double(), rm_ref, rv_ref), torch.float32)


def test_eager_call_without_torchs_python_wrapper_is_the_same_call():
    """batch_norm calls its autograd Function without ``Function.apply``'s
    Python wrapper when no functorch transform is active: the same output,
    gradients and running statistics, bit for bit, as through the wrapper;
    under a transform the wrapper runs (and refuses: no setup_context yet)."""
    results = []
    for via_wrapper in (False, True):
        x = make_input((8, 3, 4), None, torch.float32, "cpu").requires_grad_()
        w, b = torch.linspace(0.5, 2.0, 3, requires_grad=True), torch.linspace(-1.0, 1.0, 3, requires_grad=True)
        rm, rv = torch.zeros(3), torch.ones(3)
        if via_wrapper:
            y = gt._BatchNorm.apply(x, w, b, (rm, rv, True, 0.1, 1e-5, 0))
        else:
            y = gt.batch_norm(x, rm, rv, w, b, training=True)
        (y * torch.arange(y.numel()).reshape(y.shape)).sum().backward()
        results.append((y.detach(), x.grad, w.grad, b.grad, rm, rv))
    for fast, wrapped in zip(*results, strict=True):
        assert torch.equal(fast, wrapped)
    x = make_input((8, 3), None, torch.float32, "cpu")
    with pytest.raises(RuntimeError, match="setup_context"):
        torch.func.grad(lambda x: gt.batch_norm(x, None, None, training=True).pow(3).sum())(x)


@pytest.mark.parametrize("training", [True, False])
def test_gradcheck_float64(training):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    w = (1 + 0.3 * torch.randn(3, generator=g, dtype=torch.float64)).requires_grad_()
    b = torch.randn(3, generator=g, dtype=torch.float64, requires_grad=True)
    rm, rv = torch.randn(3, dtype=torch.float64), 1 + torch.rand(3, dtype=torch.float64)
    fn = lambda x, w, b: gt.batch_norm(x, rm.clone(), rv.clone(), w, b, training=training)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w, b))


def test_double_backward_raises():
    """A gradient that is to be differentiated again (create_graph=True) raises
    at once rather than giving a second derivative that treats it as constant."""
    x = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    y = gt.batch_norm(x, None, None, training=True)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad((y * y.detach()).sum(), x, create_graph=True)
    (gx,) = torch.autograd.grad(gt.batch_norm(x, None, None, training=True).pow(2).sum(), x)  # first order: fine
    assert gx.shape == x.shape


def test_torch_compile_traces_without_graph_breaks():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3), gt.BatchNorm2d(4), torch.nn.ReLU())
    twin = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3), gt.BatchNorm2d(4), torch.nn.ReLU())
    twin.load_state_dict(model.state_dict())
    compiled = torch.compile(twin, backend="aot_eager", fullgraph=True)  # fullgraph: a graph break raises
    x = torch.randn(4, 2, 6, 6)
    y, yc = model(x), compiled(x)
    torch.testing.assert_close(yc, y)
    y.sum().backward()
    yc.sum().backward()
    torch.testing.assert_close(twin[0].weight.grad, model[0].weight.grad)
    torch.testing.assert_close(twin[1].weight.grad, model[1].weight.grad)
    torch.testing.assert_close(twin[1].running_mean, model[1].running_mean)


def test_state_dict_round_trips_both_ways():
    torch.manual_seed(0)
    theirs = torch.nn.BatchNorm2d(3)
    theirs(torch.randn(4, 3, 2, 2))
    ours = gt.BatchNorm2d(3)
    ours.load_state_dict(theirs.state_dict())
    assert list(ours.state_dict()) == list(theirs.state_dict())
    for k, v in theirs.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[k], v)
    ours(torch.randn(4, 3, 2, 2) + 1)
    back = torch.nn.BatchNorm2d(3)
    back.load_state_dict(ours.state_dict())
    for k, v in ours.state_dict().items():
        torch.testing.assert_close(back.state_dict()[k], v)
    assert isinstance(ours, torch.nn.BatchNorm2d)


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(1, 4, 3, padding=1),
            torch.nn.BatchNorm2d(4),
            torch.nn.ReLU(),
            torch.nn.Sequential(torch.nn.Conv2d(4, 6, 3), torch.nn.BatchNorm2d(6, momentum=None), torch.nn.ReLU()),
        )
        self.head = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(6 * 6 * 6, 16), torch.nn.BatchNorm1d(16))
        self.out = torch.nn.Linear(16, 3)

    def forward(self, x):
        return self.out(torch.relu(self.head(self.features(x))))


def test_replace_batchnorm_same_trajectory():
    torch.manual_seed(0)
    theirs = Net().double()
    ours = Net().double()
    ours.load_state_dict(theirs.state_dict())
    opt = torch.optim.SGD(ours.parameters(), lr=0.1, momentum=0.9)  # made before the swap: must keep working
    ours.eval()
    assert gt.replace_batchnorm(ours) is ours
    assert ours.training is False and not ours.features[1].training  # the mode is kept
    ours.train()
    swapped = [m for m in ours.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert len(swapped) == 3 and all(type(m).__module__ == "gpubn.torch" for m in swapped)
    opt_ref = torch.optim.SGD(theirs.parameters(), lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(5)
    for _ in range(20):
        x = torch.randn(8, 1, 8, 8, generator=g, dtype=torch.float64)
        target = torch.randint(0, 3, (8,), generator=g)
        for model, o in ((ours, opt), (theirs, opt_ref)):
            o.zero_grad()
            torch.nn.functional.cross_entropy(model(x), target).backward()
            o.step()
    for (k, v), (k2, v2) in zip(ours.state_dict().items(), theirs.state_dict().items(), strict=True):
        assert k == k2
        torch.testing.assert_close(v, v2, atol=1e-9, rtol=1e-9)


BAD = [
    ("wrong channel count", dict(weight=torch.ones(4)), RuntimeError, "weight: should contain 3 elements"),
    ("running stats channels", dict(running_mean=torch.zeros(2)), RuntimeError, "running_mean: should contain 3"),
    ("one value per channel", dict(input=torch.ones(1, 3)), ValueError, "Expected more than 1 value per channel"),
    ("int input", dict(input=torch.ones(4, 3, dtype=torch.int64)), RuntimeError, "input: dtype torch.int64"),
    ("1-d input", dict(input=torch.ones(3)), ValueError, "input: expected at least 2 dimensions"),
    ("eval without stats", dict(training=False, running_mean=None, running_var=None), RuntimeError, "required when"),
    ("one of two stats", dict(running_var=None), RuntimeError, "give both or neither"),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_inputs_raise_like_torch_and_change_nothing(case):
    _, override, exc, msg = case
    rm, rv = torch.zeros(3), torch.ones(3)
    kwargs = dict(input=torch.randn(4, 3), running_mean=rm, running_var=rv, weight=None, bias=None, training=True)
    kwargs.update(override)
    with pytest.raises(exc, match=msg):
        gt.batch_norm(**kwargs)
    assert (rm == 0).all() and (rv == 1).all()


def test_module_errors_change_nothing():
    bn = gt.BatchNorm1d(3)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        bn(torch.ones(1, 3))
    with pytest.raises(ValueError, match="expected 2D or 3D input"):  # torch's own check, inherited
        bn(torch.ones(2, 3, 4, 5))
    assert int(bn.num_batches_tracked) == 0 and (bn.running_mean == 0).all()


@pytest.mark.parametrize("act", ["relu", "sigmoid", "tanh"])
def test_module_with_fused_activation(act):
    """gt.BatchNorm2d(C, activation=...) == the activation after torch's BatchNorm2d,
    forward and every gradient, eager and compiled."""
    torch.manual_seed(0)
    g = {"relu": torch.relu, "sigmoid": torch.sigmoid, "tanh": torch.tanh}[act]
    ours = gt.BatchNorm2d(3, activation=act).double()
    ref = torch.nn.BatchNorm2d(3).double()
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5)
        ours.bias.normal_()
        ref.load_state_dict(ours.state_dict())
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    dy = torch.randn_like(x)
    for model in (ours, torch.compile(ours, backend="aot_eager", fullgraph=True)):
        xo, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
        yo, yr = model(xo), g(ref(xr))
        torch.testing.assert_close(yo, yr)
        yo.backward(dy)
        yr.backward(dy)
        torch.testing.assert_close(xo.grad, xr.grad)
        torch.testing.assert_close(ours.weight.grad, ref.weight.grad)
        torch.testing.assert_close(ours.bias.grad, ref.bias.grad)
        ours.zero_grad()
        ref.zero_grad()
    assert "activation='relu'" in repr(gt.BatchNorm1d(3, activation="relu"))
    with pytest.raises(ValueError, match="activation: 'gelu'"):
        gt.BatchNorm1d(3, activation="gelu")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(16, 3), (4, 3, 5, 6)])
def test_module_cast_to_half_matches_torch(shape, dtype):
    """model.to(torch.bfloat16) or model.half(): half parameters and running statistics, as torch's."""
    classes = ({2: gt.BatchNorm1d, 4: gt.BatchNorm2d}[len(shape)], MODULES[len(shape)])
    ours, theirs = (cls(3).to(dtype) for cls in classes)
    x = make_input(shape, None, dtype, "cpu")
    w = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = ours(xa), theirs(xb)
    assert ya.dtype == dtype and ours.running_mean.dtype == dtype
    (ya.float() * w).sum().backward()
    (yb.float() * w).sum().backward()
    atol, rtol = TOL[dtype]
    pairs = [(ya, yb), (xa.grad, xb.grad)]
    pairs += [(getattr(ours, n), getattr(theirs, n)) for n in ("running_mean", "running_var")]
    pairs += [(ours.weight.grad, theirs.weight.grad), (ours.bias.grad, theirs.bias.grad)]
    for a, b in pairs:
        torch.testing.assert_close(a.float(), b.float(), atol=atol * 2, rtol=rtol)
    ours.eval()
    theirs.eval()
    torch.testing.assert_close(ours(x).float(), theirs(x).float(), atol=atol * 2, rtol=rtol)


@pytest.mark.parametrize("shape", [(0, 3), (0, 3, 4, 4), (0, 3, 2, 2, 2)])
@pytest.mark.parametrize("training", [True, False])
def test_empty_batch_like_torch(shape, training):
    """N = 0 (no proposals, an empty data-parallel shard): an empty output, zero
    parameter gradients, running statistics unchanged, num_batches_tracked as torch counts it."""
    ours = {2: gt.BatchNorm1d, 4: gt.BatchNorm2d, 5: gt.BatchNorm3d}[len(shape)](3).train(training)
    theirs = MODULES[len(shape)](3).train(training)
    xa, xb = torch.randn(shape, requires_grad=True), torch.randn(shape, requires_grad=True)
    ya, yb = ours(xa), theirs(xb)
    assert ya.shape == yb.shape == shape and ya.dtype == yb.dtype
    ya.sum().backward()
    yb.sum().backward()
    assert xa.grad.shape == shape
    torch.testing.assert_close(ours.weight.grad, theirs.weight.grad)
    torch.testing.assert_close(ours.bias.grad, theirs.bias.grad)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(ours, name), getattr(theirs, name))


def test_replace_and_restore_batchnorm(caplog):
    """replace_batchnorm logs what it swapped, warns about an unmaterialized lazy
    module (and swaps it once materialized); restore_batchnorm swaps back, keeping
    the tensors, so that torch.jit.script works again."""
    import logging

    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3), torch.nn.LazyBatchNorm1d())
    weight = model[1].weight
    with caplog.at_level(logging.DEBUG, logger="gpubn.torch"), pytest.warns(UserWarning, match="not materialized"):
        gt.replace_batchnorm(model)
    assert type(model[1]) is gt.BatchNorm1d and model[1].weight is weight
    assert "replace_batchnorm: 1 (BatchNorm1d)" in caplog.text
    assert isinstance(model[2], torch.nn.LazyBatchNorm1d)
    model(torch.randn(8, 4))  # materializes the lazy module
    gt.replace_batchnorm(model)
    assert type(model[2]) is gt.BatchNorm1d
    x = torch.randn(8, 4)
    model.eval()
    want = model(x)
    gt.restore_batchnorm(model)
    assert type(model[1]) is torch.nn.BatchNorm1d and type(model[2]) is torch.nn.BatchNorm1d
    assert model[1].weight is weight
    torch.testing.assert_close(torch.jit.script(model)(x), want)
    with pytest.raises(ValueError, match="activation"):
        gt.restore_batchnorm(gt.BatchNorm1d(3, activation="relu"))


# -- torch's documented semantics, case by case against torch itself ----------------------------


def _run_both(make, x, steps=2, train=True, grad=True, context=None):
    """The same modules (gpubn's, torch's) from ``make(cls)``, the same inputs:
    outputs, gradients and every buffer compared after each step."""
    ours, theirs = make(gt.BatchNorm2d if x.dim() == 4 else gt.BatchNorm1d), make(MODULES[x.dim()])
    theirs.load_state_dict(ours.state_dict())
    ours.train(train)
    theirs.train(train)
    for step in range(steps):
        xo = (x + step).detach().requires_grad_(grad)
        xt = (x + step).detach().requires_grad_(grad)
        with context() if context is not None else torch.enable_grad():
            yo, yt = ours(xo), theirs(xt)
        torch.testing.assert_close(yo, yt, atol=2e-5, rtol=2e-5)
        if grad and yo.requires_grad:
            w = torch.randn(x.shape, generator=torch.Generator().manual_seed(step))
            (yo * w).sum().backward()
            (yt * w).sum().backward()
            torch.testing.assert_close(xo.grad, xt.grad, atol=1e-4, rtol=1e-4)
            for p, q in zip(ours.parameters(), theirs.parameters(), strict=True):
                torch.testing.assert_close(p.grad, q.grad, atol=1e-4, rtol=1e-4)
        for (name, a), (_, b) in zip(ours.named_buffers(), theirs.named_buffers(), strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=name)
    return ours, theirs


CASES = {
    "momentum -1, eps 0.6 (torch's own test)": dict(momentum=-1.0, eps=0.6),
    "momentum 1.5": dict(momentum=1.5),
    "momentum None (cumulative)": dict(momentum=None),
    "affine False": dict(affine=False),
    "track_running_stats False": dict(track_running_stats=False),
}


@pytest.mark.parametrize("kwargs", list(CASES.values()), ids=list(CASES))
@pytest.mark.parametrize("train", [True, False])
def test_module_options_like_torch(kwargs, train):
    x = make_input((6, 3, 4, 5), None, torch.float32, "cpu")
    _run_both(lambda cls: cls(3, **kwargs), x, train=train)


def test_track_running_stats_false_with_buffers_like_torch():
    """Buffers made, then track_running_stats switched off: torch then
    normalizes with the batch in eval too and leaves the buffers alone."""

    def make(cls):
        m = cls(3)
        m.track_running_stats = False
        return m

    x = make_input((8, 3), None, torch.float32, "cpu")
    for train in (True, False):
        _run_both(make, x, train=train)


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode], ids=["no_grad", "inference_mode"])
def test_no_grad_and_inference_mode_like_torch(context):
    x = make_input((6, 3, 4, 5), None, torch.float32, "cpu")
    ours, _ = _run_both(lambda cls: cls(3), x, grad=False, context=context)
    assert int(ours.num_batches_tracked) == 2


def test_input_without_requires_grad_like_torch():
    x = make_input((6, 3), None, torch.float32, "cpu")
    _run_both(lambda cls: cls(3), x, grad=False)


def test_one_element_channels_like_torch():
    """(N, 1) and spatial 1x1: a single channel; and one value per channel in
    eval mode (fine), in training mode (torch's ValueError)."""
    _run_both(lambda cls: cls(1), make_input((7, 1), None, torch.float32, "cpu"))
    _run_both(lambda cls: cls(3), make_input((5, 3, 1, 1), None, torch.float32, "cpu"))
    _run_both(lambda cls: cls(3), make_input((1, 3), None, torch.float32, "cpu"), train=False)
    for module in (gt.BatchNorm1d(3), torch.nn.BatchNorm1d(3)):
        with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
            module(torch.ones(1, 3))
        assert int(module.num_batches_tracked) == (0 if isinstance(module, gt.BatchNorm1d) else 1)


def test_half_input_with_float32_parameters_like_torch():
    """Mixed precision: float16 / bfloat16 activations, float32 weights and buffers."""
    for dtype in (torch.float16, torch.bfloat16):
        x = make_input((6, 3, 4, 5), None, dtype, "cpu")
        ours, theirs = gt.BatchNorm2d(3), torch.nn.BatchNorm2d(3)
        yo, yt = ours(x), theirs(x)
        assert yo.dtype == yt.dtype == dtype
        torch.testing.assert_close(yo.float(), yt.float(), atol=6e-2, rtol=3e-2)
        torch.testing.assert_close(ours.running_var, theirs.running_var, atol=1e-3, rtol=1e-3)


def test_old_checkpoint_without_num_batches_tracked_loads_like_torch():
    state = torch.nn.BatchNorm1d(3).state_dict()
    del state["num_batches_tracked"]
    state._metadata = {"": {"version": 1}}  # saved before the counter existed
    ours, theirs = gt.BatchNorm1d(3), torch.nn.BatchNorm1d(3)
    ours.load_state_dict(state)
    theirs.load_state_dict(state)
    assert int(ours.num_batches_tracked) == int(theirs.num_batches_tracked) == 0


def test_refused_inputs_like_torch():
    """What torch refuses, gpubn refuses with the same exception type, nothing updated."""
    cases = [
        torch.randn(4, 5),  # wrong channel count
        torch.randn(4),  # 1-D
        torch.randn(4, 3).to(torch.int64),  # integer input
    ]
    for x in cases:
        ours, theirs = gt.BatchNorm1d(3), torch.nn.BatchNorm1d(3)
        with pytest.raises(Exception) as theirs_error:
            theirs(x)
        with pytest.raises(type(theirs_error.value)):
            ours(x)
        assert int(ours.num_batches_tracked) == 0
        torch.testing.assert_close(ours.running_mean, torch.zeros(3))


def test_custom_ops_pass_opcheck():
    """torch.library.opcheck over gpubn's operators (schema, fake tensors, autograd registration)."""
    x = make_input((6, 3, 4), None, torch.float32, "cpu").requires_grad_()
    w, b = torch.ones(3, requires_grad=True), torch.zeros(3, requires_grad=True)
    rm, rv = torch.zeros(3), torch.ones(3)
    for args in [
        (x, w, b, rm, rv, True, 0.1, 1e-5, ""),
        (x, w, b, rm, rv, False, 0.1, 1e-5, "relu"),
        (x, None, None, None, None, True, 0.1, 1e-5, ""),
    ]:
        torch.library.opcheck(torch.ops.gpubn.batch_norm.default, args)
    y, coef, _, _ = torch.ops.gpubn.batch_norm(x.detach(), w, b, rm, rv, True, 0.1, 1e-5, "")
    torch.library.opcheck(torch.ops.gpubn.batch_norm_backward.default, (torch.ones_like(y), x.detach(), coef, True, ""))


def test_parameter_and_buffer_dtypes_follow_torchs_rule():
    """One dtype for weight, bias and the running statistics: the input's, or
    float32 for float16/bfloat16 input; anything else is refused as torch does."""
    dtypes = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
    for xd in dtypes:
        for pd in dtypes:
            for bd in dtypes:
                x = torch.randn(4, 3, dtype=xd)
                args = (
                    torch.zeros(3, dtype=bd),
                    torch.ones(3, dtype=bd),
                    torch.ones(3, dtype=pd),
                    torch.zeros(3, dtype=pd),
                )
                try:
                    torch.nn.functional.batch_norm(x, *args, training=True)
                    accepted = True
                except RuntimeError:
                    accepted = False
                before = args[0].clone()
                if accepted:
                    gt.batch_norm(x, *args, training=True)
                else:
                    with pytest.raises(RuntimeError):
                        gt.batch_norm(x, *args, training=True)
                    torch.testing.assert_close(args[0], before)


def test_parameter_views_follow_their_tensors():
    """gpubn.torch keeps NumPy views of (C,) parameters and buffers from one
    call to the next: a parameter given new memory is read there, a strided
    one where its values are, and a view never keeps its tensor alive."""
    import gc
    import weakref

    x = make_input((8, 3), None, torch.float32, "cpu")
    m = gt.BatchNorm1d(3)
    m(x)
    m.weight.data = torch.tensor([2.0, -1.0, 0.5])  # new memory: the cached view must not be used
    m.bias.data = torch.arange(6.0)[::2]  # strided: (0, 2, 4)
    want = torch.nn.functional.batch_norm(x, None, None, m.weight.detach(), m.bias.detach(), True)
    torch.testing.assert_close(m(x).detach(), want, atol=1e-5, rtol=1e-5)
    w = torch.ones(3)
    gt.batch_norm(x, None, None, w, None, True)
    alive = weakref.ref(w)
    del w
    gc.collect()
    assert alive() is None


@pytest.mark.sim
def test_custom_ops_on_the_cuda_path_under_the_simulator(device_path):
    """The torch.compile operators through the CUDA path: opcheck, and their
    results against torch's batch norm in float64."""
    x = make_input((6, 3, 4), None, torch.float32, "cpu")
    w, b = torch.rand(3) + 0.5, torch.randn(3)
    rm, rv = torch.zeros(3), torch.ones(3)
    torch.library.opcheck(torch.ops.gpubn.batch_norm.default, (x, w, b, rm, rv, True, 0.1, 1e-5, ""))
    y, coef, new_mean, new_var = torch.ops.gpubn.batch_norm(x, w, b, rm, rv, True, 0.1, 1e-5, "")
    xr, wr, br = (t.double().requires_grad_() for t in (x, w, b))
    rmr, rvr = rm.double(), rv.double()
    yr = torch.nn.functional.batch_norm(xr, rmr, rvr, wr, br, True, 0.1, 1e-5)
    close(y, yr, torch.float32)
    close(new_mean, rmr, torch.float32)
    close(new_var, rvr, torch.float32)
    dy = torch.randn(x.shape)
    dx, dw, db = torch.ops.gpubn.batch_norm_backward(dy, x, coef, True, "")
    torch.library.opcheck(torch.ops.gpubn.batch_norm_backward.default, (dy, x, coef, True, ""))
    yr.backward(dy.double())
    close(dx, xr.grad, torch.float32)
    close(dw, wr.grad, torch.float32, scale=np.sqrt(24))
    close(db, br.grad, torch.float32, scale=np.sqrt(24))
    assert set(device_path) == {"_DeviceCall"}


@pytest.mark.sim
def test_fused_activation_and_float16_on_the_cuda_path_under_the_simulator(device_path):
    """A module with a fused activation, and float16 input (float32 parameters), on the CUDA path."""
    torch.manual_seed(0)
    ours, ref = gt.BatchNorm2d(3, activation="tanh").double(), torch.nn.BatchNorm2d(3).double()
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5)
        ours.bias.normal_()
        ref.load_state_dict(ours.state_dict())
    x, dy = torch.randn(2, 3, 3, 4, dtype=torch.float64), torch.randn(2, 3, 3, 4, dtype=torch.float64)
    xo, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    yo, yr = ours(xo), torch.tanh(ref(xr))
    torch.testing.assert_close(yo, yr)
    yo.backward(dy)
    yr.backward(dy)
    for a, b in ((xo.grad, xr.grad), (ours.weight.grad, ref.weight.grad), (ours.bias.grad, ref.bias.grad)):
        torch.testing.assert_close(a, b)
    check_module_steps("cpu", torch.float16, (6, 3, 4), None)
    assert set(device_path) == {"_DeviceCall"}


def test_call_records_stay_bounded(monkeypatch):
    """Ever new input shapes (variable-length sequences) do not grow the
    module's call records past MAX_SHAPES; results stay torch's."""
    from gpubn.kernels import plan

    monkeypatch.setattr(plan, "MAX_SHAPES", 4)
    torch.manual_seed(0)
    ours, ref = gt.BatchNorm1d(3), torch.nn.BatchNorm1d(3)
    for length in list(range(2, 12)) + [2]:
        x = torch.randn(4, 3, length)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ours(xa).square().sum().backward()
        ref(xb).square().sum().backward()
        torch.testing.assert_close(xa.grad, xb.grad)
        assert len(gt._CALLS) <= 4
    torch.testing.assert_close(ours.running_var, ref.running_var)
