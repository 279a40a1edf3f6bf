"""Normalizing inputs speeds up learning: the course's first slide, measured.

Subtract the mean and divide by the standard deviation of every input feature,
with statistics fitted on the training set only and then applied, unchanged, to
held-out data:

    mu = 1/m sum x(i)          X = X - mu
    var = 1/m sum (x(i) - mu)**2   X = X / sqrt(var + eps)

(The slide's ``X /= sigma**2`` is a known erratum: divide by the standard
deviation.)  The data is scikit-learn's bundled wine recipes, whose 13 features
span four orders of magnitude (hue ~1, proline ~1000).  Logistic regression by
plain gradient descent, each run with the largest safe step (1/L), needs far
more iterations on the raw features: the loss surface is a long narrow valley.

    python examples/normalize_inputs.py [--backend cpu|cuda] [--quick]
"""

import argparse
import sys

try:  # the optional extras it needs, checked before any work
    import sklearn  # noqa: F401
except ImportError as exc:
    sys.exit(f'normalize_inputs.py needs {exc.name}: pip install "gpubn[examples]"')

import numpy as np  # noqa: E402

import gpubn  # noqa: E402


def gradient_descent(X, y, tol, max_iter):
    """Logistic regression by full-batch gradient descent with step 1/L.

    Returns (weights, iterations until the gradient norm falls below tol)."""
    Xb = np.hstack([X, np.ones((len(X), 1))])  # bias column
    L = np.linalg.eigvalsh(Xb.T @ Xb / len(X)).max() / 4  # Lipschitz constant of the gradient
    w = np.zeros(Xb.shape[1])
    for it in range(1, max_iter + 1):
        p = 1 / (1 + np.exp(-Xb @ w))
        grad = Xb.T @ (p - y) / len(X)
        if np.linalg.norm(grad) < tol:
            return w, it
        w -= grad / L
    return w, None


def accuracy(w, X, y):
    Xb = np.hstack([X, np.ones((len(X), 1))])
    return float(((Xb @ w > 0) == y).mean())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--backend", choices=["cpu", "cuda"], default=None, help="gpubn backend (default: cuda when a GPU is usable)"
    )
    ap.add_argument("--quick", action="store_true", help="fewer iterations")
    ap.add_argument("--tol", type=float, default=1e-3, help="gradient norm that counts as converged")
    args = ap.parse_args(argv)
    max_iter = 5_000 if args.quick else 200_000

    from sklearn.datasets import load_wine
    from sklearn.model_selection import train_test_split

    data = load_wine()
    X, y = data.data.astype(np.float64), (data.target == 0).astype(np.float64)  # class 0 vs the rest
    X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.3, random_state=0, stratify=y)

    scaler = gpubn.Standardizer(axis=1, backend=args.backend)  # features are columns: axis 1
    Z_train = scaler.fit_transform(X_train)  # statistics of the training set only
    Z_test = scaler.transform(X_test)  # ... applied unchanged to held-out data
    backend = args.backend or gpubn.default_backend()
    print(f"wine: {len(X_train)} train / {len(X_test)} test samples, {X.shape[1]} features; backend {backend}")
    cols = ("raw mean", "raw std", "train mean", "train std", "test mean")
    print(f"{'feature':>30s} {cols[0]:>10s} {cols[1]:>9s} -> {cols[2]:>10s} {cols[3]:>9s} {cols[4]:>9s}")
    for j in np.argsort(scaler.scale_)[[0, 1, -2, -1]]:
        print(
            f"{data.feature_names[j]:>30s} {scaler.mean_[j]:10.3f} {scaler.scale_[j]:9.3f} -> "
            f"{Z_train[:, j].mean():10.1e} {Z_train[:, j].std():9.3f} {Z_test[:, j].mean():9.3f}"
        )
    assert np.allclose(scaler.inverse_transform(Z_test), X_test)

    print(f"\nlogistic regression, gradient descent with step 1/L, until |gradient| < {args.tol:g}:")
    results = {}
    for label, A, B in (("raw features", X_train, X_test), ("standardized", Z_train, Z_test)):
        w, iters = gradient_descent(A, y_train, args.tol, max_iter)
        results[label] = iters
        done = f"converged in {iters:6d} iterations" if iters else f"not converged after {max_iter} iterations"
        print(f"  {label:13s}: {done}; test accuracy {accuracy(w, B, y_test):.1%}")
    raw, std = results["raw features"], results["standardized"]
    if raw and std:
        print(f"standardizing the inputs cut the iterations {raw / std:.0f}x")
    elif std:
        print(f"standardized inputs converge in {std} iterations; raw ones not within {max_iter}")
    return results


if __name__ == "__main__":
    main()
