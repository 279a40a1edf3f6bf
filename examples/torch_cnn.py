"""gpubn inside a PyTorch model: a small CNN trained with torch's BatchNorm2d, then with gpubn's.

A CNN on scikit-learn's bundled 8x8 digits (no download) is trained twice from
the same initialisation and the same batches: once as written (torch's
``BatchNorm2d`` / ``BatchNorm1d``), once after ``gpubn.torch.replace_batchnorm``
swapped every batch-norm module for gpubn's.  Both loss curves are printed side
by side (they must agree), with the time per training step of each, and saved
as a PNG.

    python examples/torch_cnn.py                 # 300 steps per run
    python examples/torch_cnn.py --quick         # 40 steps (used by the tests)
    python examples/torch_cnn.py --device cuda   # CUDA tensors (gpubn's CUDA kernels)

Needs the extras: ``pip install "gpubn[torch,examples]"`` (torch, scikit-learn, matplotlib).
"""

import argparse
import copy
import sys
import time

try:  # the optional extras it needs, checked before any work
    import matplotlib  # noqa: F401
    import sklearn  # noqa: F401
    import torch
except ImportError as exc:
    sys.exit(f'torch_cnn.py needs {exc.name}: pip install "gpubn[torch,examples]"')

import numpy as np  # noqa: E402

import gpubn.torch as gt  # noqa: E402


def make_model():
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 16, 3, padding=1, bias=False),
        torch.nn.BatchNorm2d(16),
        torch.nn.ReLU(),
        torch.nn.Conv2d(16, 32, 3, padding=1, bias=False),
        torch.nn.BatchNorm2d(32),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Flatten(),
        torch.nn.Linear(32 * 4 * 4, 64, bias=False),
        torch.nn.BatchNorm1d(64),
        torch.nn.ReLU(),
        torch.nn.Linear(64, 10),
    )


def load_digits(device, seed):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    X, y = load_digits(return_X_y=True)
    X = (X / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    X, Xt, y, yt = train_test_split(X, y, test_size=0.25, random_state=seed, stratify=y)
    as_t = lambda a, dt: torch.as_tensor(a, dtype=dt, device=device)  # noqa: E731
    return as_t(X, torch.float32), as_t(Xt, torch.float32), as_t(y, torch.long), as_t(yt, torch.long)


def train(model, X, y, Xt, yt, steps, batch, lr, seed):
    """Mini-batch SGD with momentum; returns (losses, seconds per step, test accuracy)."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    order = torch.Generator().manual_seed(seed)
    losses, times = [], []
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(X), (batch,), generator=order).to(X.device)
        t0 = time.perf_counter()
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(X[idx]), y[idx])
        loss.backward()
        opt.step()
        if X.is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    model.eval()
    with torch.no_grad():
        accuracy = (model(Xt).argmax(1) == yt).float().mean().item()
    return losses, float(np.median(times[len(times) // 4 :])), accuracy  # skip the warm-up steps


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="40 steps instead of 300")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where the tensors live (default cpu)")
    ap.add_argument("--steps", type=int, default=None, help="training steps per run (default 300)")
    ap.add_argument("--batch", type=int, default=128, help="examples per mini-batch (default 128)")
    ap.add_argument("--lr", type=float, default=0.05, help="SGD learning rate (default 0.05)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the split, the weights and the batches")
    ap.add_argument(
        "--out", default=None, help="where to save the loss curves (default torch_cnn.png, torch_cnn_quick.png)"
    )
    args = ap.parse_args(argv)
    steps = args.steps or (40 if args.quick else 300)
    out = args.out or ("torch_cnn_quick.png" if args.quick else "torch_cnn.png")
    device = torch.device(args.device)

    X, Xt, y, yt = load_digits(device, args.seed)
    torch.manual_seed(args.seed)
    theirs = make_model().to(device)
    ours = gt.replace_batchnorm(copy.deepcopy(theirs))  # same initial weights, gpubn's batch norm
    swapped = sum(type(m).__module__ == "gpubn.torch" for m in ours.modules())
    print(f"digits: {len(X)} train / {len(Xt)} test images; {steps} steps of {args.batch}; device {device}")
    print(f"replace_batchnorm swapped {swapped} batch-norm modules for gpubn's")

    runs = {}
    for label, model in (("torch BN", theirs), ("gpubn BN", ours)):
        runs[label] = train(model, X, y, Xt, yt, steps, args.batch, args.lr, args.seed)

    (l1, t1, a1), (l2, t2, a2) = runs["torch BN"], runs["gpubn BN"]
    print(f"\n{'step':>5s} {'loss, torch BN':>15s} {'loss, gpubn BN':>15s}")
    for s in sorted({0, 1, 2, 5, 10, 20, *range(0, steps, max(1, steps // 10)), steps - 1}):
        print(f"{s:5d} {l1[s]:15.6f} {l2[s]:15.6f}")
    gap = max(abs(a - b) for a, b in zip(l1, l2, strict=True))
    print(f"largest loss difference over {steps} steps: {gap:.2e}")
    print(f"time per training step: torch BN {t1 * 1e3:.2f} ms, gpubn BN {t2 * 1e3:.2f} ms ({t1 / t2:.2f}x)")
    print(f"test accuracy: torch BN {a1:.1%}, gpubn BN {a2:.1%}")
    assert gap < 1e-3, f"the loss curves disagree by {gap:.2e}"

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(l1, label=f"torch BatchNorm ({t1 * 1e3:.1f} ms/step)")
    ax.plot(l2, "--", label=f"gpubn BatchNorm ({t2 * 1e3:.1f} ms/step)")
    ax.set(xlabel=f"training step (batch of {args.batch})", ylabel="cross-entropy loss", yscale="log")
    ax.set_title(f"CNN on digits ({device}): torch's batch norm vs gpubn's")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(f"loss curves saved to {out}")
    return runs


if __name__ == "__main__":
    main()
