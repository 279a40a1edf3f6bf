"""The rows of the per-channel constants: every kernel hands them on packed
in one small (5, C) array of the accumulation dtype.

``coef``, the forward's: y = (x - MEAN) * SCALE + BIAS, with
SCALE = gamma * INVSTD, INVSTD = 1 / sqrt(VAR + eps), BIAS = beta.

``bcoef``, the backward's: dx = B_DY * dv + B_X * (x - B_MEAN) + B_CONST (the
A, B, K of ``backward.py``), B_BIAS = beta (to recompute the pre-activation).
"""

MEAN, VAR, INVSTD, SCALE, BIAS = range(5)
B_MEAN, B_DY, B_X, B_CONST, B_BIAS = range(5)
