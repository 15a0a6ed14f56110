"""Multi-process training glue: PyTorch's own DistributedDataParallel, launched by ``torchrun``.

cnnkit only reads the environment torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, ...), joins the
process group (gloo on CPU, nccl on CUDA), and lets rank 0 alone print and write. Multi-node training is the
same command with torchrun's rendezvous options, e.g. on each of two machines:

    torchrun --nnodes 2 --node-rank {0|1} --nproc-per-node 1 --master-addr HOST0 --master-port 29500 \\
        -m cnnkit train --model resnet18 --data /shared/images --out /shared/runs/r1
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup(device: torch.device) -> Dist:
    """Join the process group when started by torchrun with more than one process; else a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
    return Dist(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local_rank)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum over processes (in place), or ``tensor`` itself in a single process."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_text(text: str | None, ctx: Dist) -> str:
    """Rank 0's ``text`` on every process (the run folder only rank 0 creates)."""
    if ctx.world == 1:
        return text or ""
    box = [text]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(ctx: Dist) -> None:
    if ctx.world > 1:
        dist.barrier()


def cleanup(ctx: Dist) -> None:
    if ctx.world > 1 and dist.is_initialized():
        dist.destroy_process_group()


def launch(nproc: int, argv: list[str]) -> int:
    """``cnnkit train --nproc N ...``: run the same command under torchrun with N local processes."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "cnnkit", *argv]
    from cnnkit.threads import usable_cores

    # Each process computes with its share of the cores (cnnkit/threads.py reads OMP_NUM_THREADS as the default).
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(max(1, usable_cores() // nproc)))}
    return subprocess.call(cmd, env=env)
