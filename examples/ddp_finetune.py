"""Data-parallel fine-tuning of a MobileNetV2-style network on torch.distributed.

    torchrun --standalone --nproc-per-node 2 examples/ddp_finetune.py
    python examples/ddp_finetune.py            # the same: starts 2 local ranks itself

Every rank compiles the same pockc step; the step all-reduces exactly its trained gradients inside
its own program (bucketed, overlapped with the rest of the backward), so a channel-sparse plan
sends only its trained rows over the network. gloo on CPU, NCCL where every rank has a GPU.

Options: ``--update`` (a pockc update policy, default ``last:4``), ``--channels R`` (train the
ratio R of the rows of those tensors: channel-sparse), ``--steps``, ``--batch`` (per rank).
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys

import torch
import torch.distributed as dist


def policy(update, channels, model):
    """``update`` as is, or with ``channels``: that ratio of the rows of each tensor it trains."""
    if channels is None:
        return update
    from pockc.plan import resolve_update
    return {n: f"channels:{channels}" for n in resolve_update(update, model).trainable_names()}


def task(rank, world, steps, batch, seed=0):
    """This rank's shard of a synthetic task that a few steps learn: 3 classes, each image tinted
    towards its class's colour channel (the global batch is the same whatever the world size)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        y = torch.randint(0, 3, (world * batch,), generator=g)
        x = torch.randn(world * batch, 3, 32, 32, generator=g)
        x[torch.arange(world * batch), y] += 1.0
        out.append((x[rank * batch:(rank + 1) * batch].clone(), y[rank * batch:(rank + 1) * batch].clone()))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--update", default="last:4")
    ap.add_argument("--channels", type=float, default=None, help="train this ratio of each tensor's rows")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=8, help="samples per rank and step")
    args = ap.parse_args(argv)
    if "RANK" not in os.environ:            # not under torchrun: start 2 local ranks
        return _launch(argv)
    cuda = torch.cuda.is_available() and torch.cuda.device_count() >= int(os.environ["WORLD_SIZE"])
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=120))
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if not cuda:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    import pockc
    from pockc import zoo
    ex = zoo.mobilenet_v2(batch=args.batch, image=32, width=0.5)
    model = ex.model.to(device)
    data = [(x.to(device), y.to(device)) for x, y in task(rank, world, args.steps, args.batch)]
    step = pockc.compile(model, ex.loss_fn, data[0], update=policy(args.update, args.channels, model),
                         optimizer=pockc.SGD(lr=0.1, momentum=0.9))       # distributed="auto": on
    if rank == 0:
        print(f"{world} ranks ({dist.get_backend()}), {len(step.update_plan.trainable_names())} trained tensors, "
              f"planned peak per rank {step.memory.peak_bytes / 2**20:.2f} MiB")
        print(step.comm.table())
    losses = []
    for t, (x, y) in enumerate(data):
        loss = step(x, y).detach()
        dist.all_reduce(loss)
        losses.append(loss.item() / world)
        if rank == 0 and (t % 10 == 0 or t == len(data) - 1):
            print(f"step {t:3d}  loss (mean over ranks) {losses[-1]:.4f}")
    # every rank must hold the same weights, bit for bit
    flat = torch.cat([p.detach().reshape(-1).double() for p in model.parameters()])
    sums = [torch.zeros(2, dtype=torch.float64, device=device) for _ in range(world)]
    dist.all_gather(sums, torch.stack([flat.sum(), (flat * flat).sum()]))
    same = all(torch.equal(s, sums[0]) for s in sums)
    if rank == 0:
        k = min(5, len(losses))
        print(f"mean loss of the first {k} steps {sum(losses[:k]) / k:.4f}, of the last {k} "
              f"{sum(losses[-k:]) / k:.4f}; weights identical on every rank: {same}")
    dist.barrier()                  # every rank done with its collectives before the group goes
    dist.destroy_process_group()
    return 0 if same else 1


def _launch(argv):
    """Run this script as 2 local ranks (what torchrun --standalone --nproc-per-node 2 does)."""
    from torch.distributed.run import main as torchrun
    torchrun(["--standalone", "--nproc-per-node", "2", os.path.abspath(__file__), *(argv or sys.argv[1:])])
    return 0


if __name__ == "__main__":
    sys.exit(main())
