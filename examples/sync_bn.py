"""Synchronized batch norm: 4 processes with uneven shards equal one process on the whole batch.

Every process builds the same global batch, keeps its own shard of it (uneven
sizes; with 4 processes one shard is empty), and runs training steps of
``gpubn.BatchNorm(C, sync=comm)``.  Rank 0 then checks the gathered outputs,
input gradients, summed gamma/beta gradients and running statistics against
one process running ``gpubn.BatchNorm`` on the whole batch, and reports the
time per step with and without synchronization.

    mpiexec -n 4 python examples/sync_bn.py             # over MPI (pip install "gpubn[mpi]")
    python examples/sync_bn.py --torch -n 4             # torch.distributed (gloo), spawned here
    python examples/sync_bn.py --torch -n 4 --quick     # a few steps (used by the tests)
"""

import argparse
import os
import sys
import time

import numpy as np

import gpubn

SHAPE = (1024, 64, 16)  # global batch (N, C, L): features on axis 1


def shard_bounds(world):
    """Uneven shards; with 4 processes: 40 %, nothing, 35 %, 25 %."""
    weights = {1: [1], 2: [0.3, 0.7], 3: [0.2, 0.5, 0.3], 4: [0.4, 0.0, 0.35, 0.25]}.get(world, [1] * world)
    cuts = np.round(np.cumsum([0] + weights) / sum(weights) * SHAPE[0]).astype(int)
    return cuts


def batch(step):
    rng = np.random.default_rng(step)
    x = (2.0 + 3.0 * rng.standard_normal(SHAPE)).astype(np.float32)
    return x, rng.standard_normal(SHAPE).astype(np.float32)


def run(comm, allreduce, allgather, rank, world, steps):
    """Training steps on this rank's shard; returns what rank 0 checks, and ms per step."""
    import numba

    numba.set_num_threads(1)  # several processes share this machine's cores: one thread each
    cuts = shard_bounds(world)
    mine = slice(cuts[rank], cuts[rank + 1])
    bn = gpubn.BatchNorm(SHAPE[1], sync=comm, backend="cpu")
    local = gpubn.BatchNorm(SHAPE[1], backend="cpu")  # the same step without synchronization
    ys, dxs, times, local_times = [], [], [], []
    for step in range(steps):
        x, dy = batch(step)
        t0 = time.perf_counter()
        y = bn(x[mine])
        dx = bn.backward(dy[mine])
        times.append(time.perf_counter() - t0)
        if x[mine].shape[0] > 1:
            t0 = time.perf_counter()
            local(x[mine])
            local.backward(dy[mine])
            local_times.append(time.perf_counter() - t0)
        for name in ("gamma", "beta"):  # data-parallel: the global gradient is the sum of the shares
            bn.params[name] -= 0.01 * allreduce(np.array(bn.grads[name], np.float64)).astype(np.float32)
        ys.append(allgather(y))
        dxs.append(allgather(dx))
    ms = 1e3 * np.median(times[1:] or times)
    ms_local = 1e3 * np.median(local_times[1:] or local_times) if local_times else float("nan")
    return ys, dxs, bn, ms, ms_local


def check(ys, dxs, bn, steps):
    """Rank 0: one process, the whole batch, the same steps."""
    whole = gpubn.BatchNorm(SHAPE[1], backend="cpu")
    worst = 0.0
    for step in range(steps):
        x, dy = batch(step)
        y = whole(x)
        dx = whole.backward(dy)
        worst = max(worst, np.abs(ys[step] - y).max(), np.abs(dxs[step] - dx).max())
        for name in ("gamma", "beta"):
            whole.params[name] -= 0.01 * whole.grads[name]
    for a, b in ((bn.running_mean, whole.running_mean), (bn.running_var, whole.running_var)):
        worst = max(worst, np.abs(a - b).max())
    return worst


def report(rank, world, steps, ys, dxs, bn, ms, ms_local, transport):
    if rank != 0:
        return
    worst = check(ys, dxs, bn, steps)
    cuts = shard_bounds(world)
    sizes = [int(b - a) for a, b in zip(cuts[:-1], cuts[1:], strict=True)]
    print(f"{world} processes over {transport}; global batch {SHAPE}, shards of {sizes} examples; {steps} steps")
    print(f"largest difference from one process on the whole batch: {worst:.2e} (outputs, dx, running stats)")
    print(f"rank 0, forward + backward per step: {ms:.2f} ms synchronized, {ms_local:.2f} ms on its shard alone")
    assert worst < 1e-4, worst


def main_mpi(steps):
    from mpi4py import MPI

    from gpubn.distributed import communicator

    comm = MPI.COMM_WORLD
    c = communicator(comm)

    def allgather(a):
        parts = comm.allgather(a)  # pickled: shards differ in size
        return np.concatenate(parts)

    ys, dxs, bn, ms, ms_local = run(comm, c.allreduce, allgather, c.rank, c.size, steps)
    report(c.rank, c.size, steps, ys, dxs, bn, ms, ms_local, "MPI")


def torch_rank(rank, world, port, steps):
    import torch.distributed as dist

    from gpubn.distributed import communicator

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    group = dist.group.WORLD
    c = communicator(group)

    def allgather(a):
        parts = [None] * world
        dist.all_gather_object(parts, a, group=group)
        return np.concatenate(parts)

    ys, dxs, bn, ms, ms_local = run(group, c.allreduce, allgather, rank, world, steps)
    report(rank, world, steps, ys, dxs, bn, ms, ms_local, "torch.distributed (gloo)")
    dist.barrier(group)  # nobody tears the group down while rank 0 still checks
    dist.destroy_process_group()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--torch", action="store_true", help="spawn the processes here, torch.distributed with gloo")
    ap.add_argument("-n", type=int, default=4, help="processes to spawn with --torch (default 4)")
    ap.add_argument("--quick", action="store_true", help="3 steps instead of 20")
    args = ap.parse_args(argv)
    steps = 3 if args.quick else 20
    if not args.torch:
        try:
            import mpi4py  # noqa: F401
        except ImportError:
            sys.exit('sync_bn.py needs mpi4py and an MPI: pip install "gpubn[mpi]", or use --torch')
        return main_mpi(steps)
    try:
        import torch.multiprocessing as mp
    except ImportError:
        sys.exit('sync_bn.py --torch needs torch: pip install "gpubn[torch]"')
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(torch_rank, args=(args.n, port, steps), nprocs=args.n, join=True)


if __name__ == "__main__":
    main()
