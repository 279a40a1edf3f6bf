"""Does batch norm make a network train faster?  The course's promise, measured.

A fully connected network in the course's style, trained twice by mini-batch
gradient descent from the same initialisation and the same batches:

    plain:       z = W a + b            -> sigmoid
    batch norm:  z = W a  -> BN(z) = gamma * z_norm + beta -> sigmoid  (one fused gpubn layer)
                 (no bias before BN: beta replaces it)

The setup is Ioffe & Szegedy's MNIST experiment scaled down to scikit-learn's
bundled 8x8 digits (no download): 3 hidden layers of 100 sigmoid units, small
Gaussian initial weights, batches of 60.  The BN layers are ``gpubn.BatchNorm``;
everything else is plain NumPy.  Prints progress, the steps each network needs
to reach the target test accuracy, and saves both learning curves as a PNG.

    python examples/train_mlp.py                 # defaults: 13 s on 2 CPU cores (25 s the first time: compiling)
    python examples/train_mlp.py --quick         # a few seconds (used by the tests)
    python examples/train_mlp.py --backend cuda  # the BN kernels on the GPU
"""

import argparse
import sys
import time

try:  # the optional extras it needs, checked before any work
    import matplotlib  # noqa: F401
    import sklearn  # noqa: F401
except ImportError as exc:
    sys.exit(f'train_mlp.py needs {exc.name}: pip install "gpubn[examples]"')

import numpy as np  # noqa: E402

import gpubn  # noqa: E402


def load_digits(seed):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    X, y = load_digits(return_X_y=True)
    X = (X / 16.0).astype(np.float32)  # pixel intensities 0..16 -> [0, 1]
    return train_test_split(X, y, test_size=0.25, random_state=seed, stratify=y)


def sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


class MLP:
    """Hidden layers: linear -> sigmoid, or linear -> BN + sigmoid fused in one
    gpubn layer (``activation="sigmoid"``); output: linear -> softmax."""

    def __init__(self, sizes, weights, batch_norm, backend):
        self.W = [w.copy() for w in weights]
        self.b = [np.zeros(w.shape[1], np.float32) for w in weights]
        self.bn = None
        if batch_norm:  # BN and the sigmoid after it in one elementwise pass
            self.bn = [gpubn.BatchNorm(w.shape[1], backend=backend, activation="sigmoid") for w in weights[:-1]]

    def forward(self, x, train=True):
        self.acts = [x]
        for i, (W, b) in enumerate(zip(self.W, self.b, strict=True)):
            z = self.acts[-1] @ W
            if i == len(self.W) - 1:
                z = z + b
                z = z - z.max(axis=1, keepdims=True)
                p = np.exp(z)
                return p / p.sum(axis=1, keepdims=True)
            if self.bn:
                self.bn[i].train(train)
                self.acts.append(self.bn[i](z))  # sigmoid(BN(z))
            else:
                self.acts.append(sigmoid(z + b))

    def backward(self, probs, labels, lr):
        n = len(labels)
        dz = probs.copy()
        dz[np.arange(n), labels] -= 1.0
        dz /= n  # d(mean cross-entropy)/dz of the output layer
        for i in range(len(self.W) - 1, -1, -1):
            a = self.acts[i]
            grad_W, grad_b = a.T @ dz, dz.sum(axis=0)
            if i > 0:
                da = dz @ self.W[i].T
                if self.bn:  # through the sigmoid and BN together
                    dz = self.bn[i - 1].backward(da)
                else:
                    dz = da * self.acts[i] * (1.0 - self.acts[i])  # through the sigmoid
            self.W[i] -= lr * grad_W
            if self.bn and i < len(self.W) - 1:
                for name in ("gamma", "beta"):  # the optimizer updates BN params in place
                    self.bn[i].params[name][...] -= lr * self.bn[i].grads[name]
            else:
                self.b[i] -= lr * grad_b

    def accuracy(self, X, y):
        return float((self.forward(X, train=False).argmax(axis=1) == y).mean())


def train(model, X, y, Xt, yt, steps, batch, lr, eval_every, seed, label):
    rng = np.random.default_rng(seed)  # same batches for both networks
    curve, t0 = [], time.perf_counter()
    order = rng.permutation(len(X))
    pos = 0
    for step in range(1, steps + 1):
        if pos + batch > len(X):
            order, pos = rng.permutation(len(X)), 0
        idx = order[pos : pos + batch]
        pos += batch
        model.backward(model.forward(X[idx]), y[idx], lr)
        if step % eval_every == 0 or step == steps:
            acc = model.accuracy(Xt, yt)
            curve.append((step, acc))
            if step % (eval_every * 100) == 0 or step == steps:
                print(f"  [{label:10s}] step {step:5d}  test accuracy {acc:6.1%}  ({time.perf_counter() - t0:5.1f} s)")
    return curve


def steps_to(curve, target):
    return next((s for s, a in curve if a >= target), None)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a run of a few seconds")
    ap.add_argument("--backend", choices=["cpu", "cuda"], default=None, help="gpubn backend (default: auto)")
    ap.add_argument("--steps", type=int, default=None, help="training steps per network (default 10000)")
    ap.add_argument("--lr", type=float, default=0.5, help="learning rate of plain gradient descent (default 0.5)")
    ap.add_argument("--batch", type=int, default=60, help="examples per mini-batch (default 60)")
    ap.add_argument("--init-std", type=float, default=0.05, help="std of the Gaussian initial weights")
    ap.add_argument("--target", type=float, default=0.90, help="test accuracy to reach")
    ap.add_argument("--seed", type=int, default=0, help="seed of the data split, weights and batches")
    ap.add_argument(
        "--out",
        default=None,
        help="where to save the learning curves (default train_mlp.png, or train_mlp_quick.png with --quick)",
    )
    args = ap.parse_args(argv)
    if args.out is None:  # a quick run never overwrites the full run's figure
        args.out = "train_mlp_quick.png" if args.quick else "train_mlp.png"
    steps = args.steps or (300 if args.quick else 10000)
    eval_every = 10

    X, Xt, y, yt = load_digits(args.seed)
    sizes = [X.shape[1], 100, 100, 100, 10]
    rng = np.random.default_rng(args.seed)
    shapes = zip(sizes[:-1], sizes[1:], strict=True)
    weights = [(args.init_std * rng.standard_normal(shape)).astype(np.float32) for shape in shapes]
    backend = args.backend or gpubn.default_backend()
    print(f"digits: {len(X)} train / {len(Xt)} test images; network {sizes}; batch {args.batch}; lr {args.lr}")
    print(f"gpubn backend: {backend}; {steps} steps per network; target test accuracy {args.target:.0%}")

    curves = {}
    for label, bn in (("plain", False), ("batch norm", True)):
        model = MLP(sizes, weights, bn, backend)
        curves[label] = train(model, X, y, Xt, yt, steps, args.batch, args.lr, eval_every, args.seed, label)

    print()
    for label, curve in curves.items():
        hit = steps_to(curve, args.target)
        best = max(a for _, a in curve)
        reached = f"reaches {args.target:.0%} at step {hit}" if hit else f"does not reach {args.target:.0%}"
        print(f"{label:10s}: {reached}; best test accuracy {best:.1%}")
    plain, bn = steps_to(curves["plain"], args.target), steps_to(curves["batch norm"], args.target)
    if plain and bn:
        print(f"batch norm needs {plain / bn:.1f}x fewer steps to {args.target:.0%}")
    elif bn:
        print(f"batch norm reaches {args.target:.0%} in {bn} steps; the plain network not within {steps}")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, curve in curves.items():
        s, a = zip(*curve, strict=True)
        ax.plot(s, a, label=label)
    ax.axhline(args.target, color="gray", lw=0.8, ls="--", label=f"target {args.target:.0%}")
    ax.set(xlabel=f"training step (batch of {args.batch})", ylabel="test accuracy", ylim=(0, 1))
    ax.set_title("3x100 sigmoid MLP on digits: with and without batch norm")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"learning curves saved to {args.out}")
    return curves


if __name__ == "__main__":
    main()
