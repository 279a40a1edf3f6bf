"""One rank of a synchronized-batch-norm test (tests/test_distributed.py).

    python tests/sync_worker.py --mode torch --rank R --world W --port P --out DIR --case CASE
    mpiexec -n W python tests/sync_worker.py --mode mpi --out DIR --case CASE

Every rank builds the same global batch (seeded), takes its shard along the
batch axis, runs 3 training steps of ``gpubn.BatchNorm(sync=...)`` (forward,
backward, an SGD step on gamma/beta with the global gradient), and saves what
it saw to DIR/rank{R}.npz, or the error it raised to DIR/rank{R}.err.
"""

import argparse
import os
import sys
import traceback

import numpy as np

SHAPE = (14, 3, 5)  # global batch: (N, C, L), feature axis 1
SHARDS = {1: [14], 2: [5, 9], 4: [3, 0, 6, 5]}  # rank 1 of 4 holds nothing
STEPS = 3


def global_batch(step):
    rng = np.random.default_rng(100 + step)
    x = 3.0 + 2.0 * rng.standard_normal(SHAPE) * np.array([1.0, 0.1, 10.0])[None, :, None]
    return x, rng.standard_normal(SHAPE)


def shard(a, world, rank):
    bounds = np.cumsum([0] + SHARDS[world])
    return a[bounds[rank] : bounds[rank + 1]]


class TorchLayer:
    """gpubn.torch.BatchNorm1d synchronized through replace_batchnorm(sync=...),
    driven through autograd like gpubn.BatchNorm's forward/backward/params."""

    def __init__(self, C, group):
        import torch

        import gpubn.torch as gt

        self.torch = torch
        model = torch.nn.Sequential(torch.nn.BatchNorm1d(C, momentum=0.3, dtype=torch.float64))
        self.module = gt.replace_batchnorm(model, sync=group)[0]
        self.params = {"gamma": self.module.weight.data.numpy(), "beta": self.module.bias.data.numpy()}

    def __call__(self, x):
        self.x = self.torch.from_numpy(x).requires_grad_()
        self.y = self.module(self.x)
        return self.y.detach().numpy()

    def backward(self, dy):
        self.module.zero_grad()
        self.y.backward(self.torch.from_numpy(dy))
        self.grads = {"gamma": self.module.weight.grad.numpy(), "beta": self.module.bias.grad.numpy()}
        return self.x.grad.numpy()

    @property
    def running_mean(self):
        return self.module.running_mean.numpy()

    @property
    def running_var(self):
        return self.module.running_var.numpy()

    @property
    def num_batches_tracked(self):
        return int(self.module.num_batches_tracked)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=["torch", "mpi"])
    ap.add_argument("--rank", type=int, default=0)
    ap.add_argument("--world", type=int, default=1)
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--out")
    ap.add_argument("--case", choices=["uneven", "mismatch"], default="uneven")
    ap.add_argument("--layer", choices=["gpubn", "torch"], default="gpubn", help="gpubn.BatchNorm or gpubn.torch")
    args = ap.parse_args()
    if args.mode == "torch":
        import torch.distributed as dist

        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(args.port))
        dist.init_process_group("gloo", rank=args.rank, world_size=args.world)
        comm, rank, world = dist.group.WORLD, args.rank, args.world
    else:
        from mpi4py import MPI

        comm = MPI.COMM_WORLD
        rank, world = comm.Get_rank(), comm.Get_size()

    import gpubn
    from gpubn.distributed import communicator

    allreduce = communicator(comm).allreduce
    C = SHAPE[1] + (1 if args.case == "mismatch" and rank == 1 else 0)
    if args.layer == "torch":
        bn = TorchLayer(C, comm)
    else:
        bn = gpubn.BatchNorm(C, sync=comm, backend="cpu", dtype="float64", momentum=0.3)
    saved = {}
    try:
        for step in range(STEPS):
            x, dy = global_batch(step)
            if C != SHAPE[1]:
                x, dy = np.concatenate([x, x[:, :1]], axis=1), np.concatenate([dy, dy[:, :1]], axis=1)
            xs, dys = shard(x, world, rank), shard(dy, world, rank)
            saved[f"y{step}"] = bn(xs)
            saved[f"dx{step}"] = bn.backward(dys)
            for name in ("gamma", "beta"):  # data-parallel: the global gradient is the sum of the shares
                g = allreduce(np.array(bn.grads[name]))
                saved[f"d{name}{step}"] = g
                bn.params[name] -= 0.1 * g
        saved["running_mean"], saved["running_var"] = bn.running_mean, bn.running_var
        saved["num_batches_tracked"] = np.array(bn.num_batches_tracked)
        np.savez(os.path.join(args.out, f"rank{rank}.npz"), **saved)
    except Exception as exc:
        with open(os.path.join(args.out, f"rank{rank}.err"), "w") as f:
            f.write(f"{type(exc).__name__}: {exc}\n")
            traceback.print_exc(file=sys.stderr)
    if args.mode == "torch":
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
