"""Synchronized batch norm: the statistics of the global batch across processes.

Each process (rank) holds a share of the batch.  The forward merges every
rank's per-channel Moments (count, mean, M2) exactly, in rank order, so every
rank normalizes with the same statistics of the concatenated batch and updates
its running statistics from them; the backward adds every rank's two
per-channel sums (sum dy, sum dy * (x - mean)), so dx is the gradient of the
global batch's function.  dgamma and dbeta stay each rank's own share (summed
over ranks they are the global gradient: what data-parallel training reduces).

Collectives per training step (every rank must call forward and backward the
same number of times, as with any collective):

    forward:  allgather of 3 int64 (status, channels, count), then of 3C float64 (moments)
    backward: allgather of 1 int64 (status), then allreduce of 2C float64 (sums)

The small status collective comes first so that a rank whose input is refused
(wrong channel count, dtype, shape) makes every rank raise, naming it, instead
of leaving the others waiting in the payload collective.  Ranks may hold
different batch sizes, or none (an empty share).

Communicators: an ``mpi4py`` communicator (NumPy buffers, ``Allgather`` /
``Allreduce``), or a ``torch.distributed`` process group (gloo on CPUs).  The
CPU backend only, for now.
"""

import numpy as np

from ._arrays import (
    StateVector,
    acc_dtype,
    canonical_shape,
    channel_vector,
    check_axis,
    check_float,
    check_momentum,
    check_scalar,
    read_input,
)
from ._backend import resolve_backend
from .functional import ForwardCache, batch_norm_backward, batch_norm_forward, moments
from .moments import Moments


class Communicator:
    """What synchronized batch norm needs of a communicator."""

    rank: int
    size: int

    def allgather(self, a: np.ndarray) -> np.ndarray:
        """(size, *a.shape): every rank's ``a``, in rank order."""
        raise NotImplementedError

    def allreduce(self, a: np.ndarray) -> np.ndarray:
        """The elementwise sum of every rank's ``a``."""
        raise NotImplementedError


class MPICommunicator(Communicator):
    def __init__(self, comm):
        self.comm = comm
        self.rank, self.size = comm.Get_rank(), comm.Get_size()

    def allgather(self, a):
        a = np.ascontiguousarray(a)
        out = np.empty((self.size, *a.shape), a.dtype)
        self.comm.Allgather(a, out)
        return out

    def allreduce(self, a):
        from mpi4py import MPI

        a = np.ascontiguousarray(a)
        out = np.empty_like(a)
        self.comm.Allreduce(a, out, op=MPI.SUM)
        return out


class TorchCommunicator(Communicator):
    def __init__(self, group):
        import torch.distributed as dist

        self.dist, self.group = dist, group
        self.rank, self.size = dist.get_rank(group), dist.get_world_size(group)

    def allgather(self, a):
        import torch

        t = torch.from_numpy(np.ascontiguousarray(a))
        parts = [torch.empty_like(t) for _ in range(self.size)]
        self.dist.all_gather(parts, t, group=self.group)
        return np.stack([p.numpy() for p in parts])

    def allreduce(self, a):
        import torch

        t = torch.from_numpy(np.array(a, copy=True))
        self.dist.all_reduce(t, group=self.group)
        return t.numpy()


def communicator(comm) -> Communicator:
    """A Communicator for an mpi4py communicator or a torch.distributed process group."""
    if isinstance(comm, Communicator):
        return comm
    module = type(comm).__module__ or ""
    if module.startswith("mpi4py"):
        return MPICommunicator(comm)
    if module.startswith("torch"):
        return TorchCommunicator(comm)
    raise TypeError(
        f"sync: expected an mpi4py communicator or a torch.distributed process group, got {type(comm).__name__}"
    )


class SyncCache(ForwardCache):
    """The forward cache of a synchronized step: also the communicator and the global count."""

    def __init__(self, cache: ForwardCache, comm: Communicator, n_global: int):
        super().__init__(cache.inp, cache.coef, True)
        self.comm, self.n_global = comm, n_global


def _agree(comm: Communicator, error, header) -> np.ndarray:
    """The status collective: every rank learns whether every rank's input was
    accepted; all raise together (the refused rank its own error)."""
    mine = np.array([0 if error is None else 1, *header], np.int64)
    table = comm.allgather(mine)
    if error is not None:
        raise error
    bad = [r for r in range(comm.size) if table[r, 0]]
    if bad:
        raise RuntimeError(f"sync: rank {bad[0]} refused its input (see its error); nothing was updated on any rank")
    return table


def batch_norm_forward_sync(
    x,
    gamma,
    beta,
    comm,
    *,
    axis=1,
    eps=1e-5,
    running_mean=None,
    running_var=None,
    momentum=0.1,
    backend=None,
    num_features=None,
):
    """Training-mode batch_norm_forward over the batch shared by every rank of ``comm``.

    Args as ``batch_norm_forward`` (``momentum`` None is not accepted here:
    the layer turns it into 1 / batches); x may be empty on some ranks.
    Returns (y, SyncCache).  Raises on every rank when any rank's input is
    refused or the channel counts differ, naming the rank; nothing is updated then.
    num_features: (the layer's) the channel count x must have.
    """
    comm = communicator(comm)
    error, C, n = None, -1, 0
    try:
        if resolve_backend(backend) != "cpu":
            raise ValueError("backend: synchronized batch norm runs on the CPU backend for now")
        arr = read_input(x, "x", "cpu").arr
        check_float(arr.dtype, "x")
        outer, C, inner = canonical_shape(arr.shape, check_axis(axis, arr.ndim))
        n = outer * inner
        if num_features is not None and C != num_features:
            raise ValueError(f"x: {C} features on axis {axis}, this layer has num_features={num_features}")
        eps = check_scalar(eps, "eps")
        momentum = check_momentum(momentum)
        if (running_mean is None) != (running_var is None):
            raise ValueError("running_mean, running_var: give both or neither")
        stats = []
        if running_mean is not None:
            for name, v in (("running_mean", running_mean), ("running_var", running_var)):
                stats.append(StateVector(v, name, C, np.float64, "cpu").target)
        for v, name in ((gamma, "gamma"), (beta, "beta")):
            channel_vector(v, name, C, acc_dtype(arr.dtype), "cpu", fill=1.0)
    except (TypeError, ValueError) as exc:
        error = exc
    table = _agree(comm, error, (C, n))
    channels = table[:, 1]
    if np.any(channels != C):
        r = int(np.flatnonzero(channels != C)[0])
        raise ValueError(
            f"x: rank {r} has {channels[r]} channels, rank {comm.rank} has {C}; every rank must have the same"
        )
    n_global = int(table[:, 2].sum())
    if n_global < 2:
        raise ValueError(f"x: expected more than 1 value per channel over all ranks when training, got {n_global}")
    # -- every rank accepted its input: the payload collectives --
    merged = Moments.merge_all(comm.allgather(moments(arr, axis, "cpu").to_array()))  # (size, 3, C), in rank order
    mean, var = merged.mean, merged.var(ddof=0)
    if stats:  # in place, computed in float64 (PyTorch's rule: the unbiased variance)
        rm, rv = stats
        rm[...] = (1 - momentum) * rm.astype(np.float64) + momentum * mean
        rv[...] = (1 - momentum) * rv.astype(np.float64) + momentum * merged.m2 / (n_global - 1)
    acc = acc_dtype(arr.dtype)  # an empty share too: the constants for the backward
    y, cache = batch_norm_forward(
        arr, gamma, beta, axis=axis, eps=eps, training=False, running_mean=mean.astype(acc),
        running_var=var.astype(acc), backend="cpu",
    )  # fmt: skip
    return y, SyncCache(cache, comm, n_global)


def batch_norm_backward_sync(dy, cache: SyncCache, *, out=None):
    """batch_norm_backward of a synchronized forward: (dx, dgamma, dbeta), dx the
    gradient of the global batch's function, dgamma/dbeta this rank's share."""
    if not isinstance(cache, SyncCache):
        raise TypeError(f"cache: expected the cache of batch_norm_forward_sync, got {type(cache).__name__}")
    comm = cache.comm
    error = None
    try:
        arr = np.asarray(dy) if not hasattr(dy, "__cuda_array_interface__") else dy
        if tuple(arr.shape) != cache.inp.shape:
            raise ValueError(f"dy: shape {tuple(arr.shape)} does not match the forward input's shape {cache.inp.shape}")
        check_float(arr.dtype, "dy")
    except (TypeError, ValueError) as exc:
        error = exc
    _agree(comm, error, ())
    return batch_norm_backward(dy, cache, out=out, _reduce=(comm.allreduce, cache.n_global))


__all__ = ["Communicator", "communicator", "batch_norm_forward_sync", "batch_norm_backward_sync"]
