"""One run over W processes with torch.distributed (NCCL on GPUs, gloo on CPU), started by
`torchrun` or by Slurm through submitit. W = 1 is the one-process path: no process group,
nothing reduced, nothing waited for.

Every rank holds the whole dataset and builds the same partition into micro-batches (with
`reshuffle`, the same seeded draw); rank r takes micro-batches r, r + W, r + 2W, ... Per step:
the local sums are added across ranks in one all-reduce of the gradients (flattened into one
buffer) and one of the scalars (loss, number correct, stop flags) and of the BatchNorm
statistics, so every rank holds the one-process values up to the order of summation. Rank 0
alone writes the run directory, holds its lease and talks to wandb.
"""

from __future__ import annotations

import contextlib
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as td
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from ..errors import exit_status


class FollowerExit(SystemExit):
    """A rank other than 0 stops because rank 0 stopped with an error (rank 0 says why)."""


@dataclass
class Ranks:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def shard(self, parts: list) -> list:
        """This rank's micro-batches: r, r + W, r + 2W, ... of the common partition."""
        return parts[self.rank::self.world] if self.world > 1 else parts

    def sum_(self, tensors: list[torch.Tensor]) -> None:
        """Add the tensors across ranks, in place, in one all-reduce per dtype."""
        if self.world == 1 or not tensors:
            return
        for dtype in dict.fromkeys(t.dtype for t in tensors):  # the same order on every rank
            group = [t for t in tensors if t.dtype == dtype]
            flat = _flatten_dense_tensors(group)
            td.all_reduce(flat)
            for t, s in zip(group, _unflatten_dense_tensors(flat, group)):
                t.copy_(s)

    def min(self, value: int) -> int:
        """The smallest of the ranks' values (a micro-batch that fits on every GPU)."""
        if self.world == 1:
            return value
        t = torch.tensor([value], device=self.device)
        td.all_reduce(t, op=td.ReduceOp.MIN)
        return int(t.item())  # host sync: once, for micro_batch=auto

    def hosts(self) -> list[str]:
        """Every rank's host name, in rank order (the nodes a run of several processes ran on)."""
        name = socket.gethostname()
        if self.world == 1:
            return [name]
        out = [None] * self.world
        td.all_gather_object(out, name)
        return out

    def share(self, fn):
        """Run `fn` on rank 0 and give every rank its result (JSON-like values); when it raises,
        rank 0 re-raises and the other ranks exit with the matching status, silently."""
        if self.world == 1:
            return fn()
        box = [None]
        if self.main:
            try:
                box[0] = ("ok", fn())
            except BaseException as e:
                box[0] = ("error", exit_status(e))  # every rank exits with rank 0's status
                td.broadcast_object_list(box, src=0)
                raise
        td.broadcast_object_list(box, src=0)
        if box[0][0] == "error":
            raise FollowerExit(box[0][1])
        return box[0][1]


def _world_from_env() -> tuple[int, int, int] | None:
    """(rank, world, local rank) from torchrun's variables or, inside a submitit job with
    several tasks (Slurm's, or the local executor's), from submitit's job environment, exported
    for torch's env:// initialisation."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    if os.environ.get("SUBMITIT_EXECUTOR"):
        import submitit

        if submitit.JobEnvironment().num_tasks > 1:
            env = submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
            return env.rank, env.world_size, env.local_rank
    return None


@contextlib.contextmanager
def group(device: torch.device):
    """The ranks of this run, with a process group for the time of the block when W > 1.
    Yields (ranks, the device this rank computes on)."""
    found = _world_from_env()
    if found is None:
        yield Ranks(), device
        return
    rank, world, local = found
    if device.type == "cuda":
        device = torch.device("cuda", local % torch.cuda.device_count())
        torch.cuda.set_device(device)
    td.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world)
    ranks = Ranks(rank, world, local, device)
    done = False
    try:
        yield ranks, device
        done = True
    finally:
        # A clean shutdown: every rank has left every collective before any closes its connections
        # (a rank that tore down while a peer still used the group could abort that peer at exit);
        # then each destroys its group, so no gloo thread outlives the interpreter.
        if done:
            td.barrier()
        td.destroy_process_group()
