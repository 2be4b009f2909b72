"""The data-parallel full-batch step (pipeline/engine/dist.py): median time per step with W = 1 and
W = `--world` processes (gloo on CPU, NCCL on GPUs), same model and data, measured one after
the other in one invocation; and the time of the one all-reduce of the gradients alone.

    python -m bench.dist_bench [--world 2] [--model cnn] [--n 2048] [--micro-batch 256] [--reps 9]

On CPU every process gets `--threads` threads (default 1), so W = 2 on a 2-core machine uses
both cores where W = 1 uses one: the ratio shows the overhead of the reductions, not GPU scaling.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time

import torch
import torch.distributed as td
import torch.multiprocessing as mp
from omegaconf import OmegaConf

from models import build_model
from pipeline.engine.dist import Ranks
from pipeline.engine.optim import Adam
from pipeline.engine.step import bn_layers, full_batch_step, partition, to_host


def _worker(rank, world, a, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(a.threads)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if world > 1:
        td.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world)
    ranks = Ranks(rank, world, rank, device)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(a.n, 3, 32, 32, generator=g).to(device)
    y = torch.randint(0, 10, (a.n,), generator=g).to(device)
    torch.manual_seed(0)
    cfg = OmegaConf.create(dict(name=a.model, norm="bn" if a.model.startswith("resnet") else "none",
                                width=a.width, bn_group=None))
    model = build_model(cfg, 10, (3, 32, 32)).to(device)
    params = list(model.parameters())
    opt = Adam(params, h=1e-4)
    parts, bns = partition(a.n, a.micro_batch), bn_layers(model)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def step():
        to_host(full_batch_step(model, x, y, "classification", parts, params, 1e-8, bns, ranks=ranks,
                                flags=(False, False)))  # the loop's one sync, its stop flags riding along
        opt.step()

    times, comm = [], []
    for i in range(a.reps + 2):
        sync()
        t = time.perf_counter()
        step()
        sync()
        if i >= 2:  # warm-up
            times.append(time.perf_counter() - t)
    if world > 1:
        grads = [p.grad for p in params]
        for _ in range(a.reps):
            sync()
            t = time.perf_counter()
            ranks.sum_(grads)
            sync()
            comm.append(time.perf_counter() - t)
        td.destroy_process_group()
    if rank == 0:
        out.put((statistics.median(times), statistics.median(comm) if comm else 0.0,
                 sum(p.numel() for p in params)))


def measure(world, a):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    q = mp.get_context("spawn").Queue()
    mp.start_processes(_worker, args=(world, a, port, q), nprocs=world, join=True, start_method="spawn")
    return q.get()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--model", default="cnn")
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--n", type=int, default=2048)
    ap.add_argument("--micro-batch", type=int, default=256)
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    one, _, p = measure(1, a)
    many, comm, _ = measure(a.world, a)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    print(f"{a.model} p={p:,} N={a.n} mb={a.micro_batch} ({backend}, {a.threads} thread(s) per process): "
          f"W=1 {one * 1e3:.1f} ms/step, W={a.world} {many * 1e3:.1f} ms/step, ratio W{a.world}/W1 "
          f"{many / one:.2f} (ideal {1 / a.world:.2f}); one all-reduce of the gradients {comm * 1e3:.2f} ms "
          f"({comm / many * 100:.1f}% of a step)")


if __name__ == "__main__":
    main()
