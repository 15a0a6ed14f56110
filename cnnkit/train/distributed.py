"""Multi-process training glue: PyTorch's own DistributedDataParallel, launched by ``torchrun``.

cnnkit only reads the environment torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, ...), joins the
process group (gloo on CPU, nccl on CUDA), and lets rank 0 alone print and write. Multi-node training is the
same command with torchrun's rendezvous options, e.g. on each of two machines:

    torchrun --nnodes 2 --node-rank {0|1} --nproc-per-node 1 --master-addr HOST0 --master-port 29500 \\
        -m cnnkit train --model resnet18 --data /shared/images --out /shared/runs/r1
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from typing import Iterator

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


def reports() -> bool:
    """Whether this process speaks for the run on the terminal: any process but the workers other than rank 0 of a
    multi-process run (a RANK left in the environment of a single process does not silence it)."""
    return int(os.environ.get("WORLD_SIZE", "1")) <= 1 or os.environ.get("RANK", "0") == "0"


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


def broadcast_buffers(module: torch.nn.Module, ctx: Dist) -> None:
    """Rank 0's buffers of ``module`` (BatchNorm's running statistics) on every process. DistributedDataParallel
    sends them out at the start of each training forward pass, which then updates each process's own copy: after
    the last one they differ, and validation, each process scoring its share of the images, must use the model
    rank 0 saves."""
    if ctx.world > 1:
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


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


@contextlib.contextmanager
def main_first(ctx: Dist) -> Iterator[None]:
    """Run the block in rank 0 before the other processes, which wait for it at a barrier: a download into a shared
    cache (torchvision's pretrained weights) then happens once, and the others read the file it left. Rank 0
    reaches the barrier even when its block fails, so that the others never wait for it in vain: they then run the
    block themselves and fail on their own."""
    if not ctx.main:
        barrier(ctx)
    try:
        yield
    finally:
        if ctx.main:
            barrier(ctx)


def cleanup(ctx: Dist) -> None:
    if ctx.world > 1 and dist.is_initialized():
        dist.destroy_process_group()


# Seconds torchrun lets its workers take to stop after it passes a signal on, before it kills them (its own
# default is 30): a worker finishes its optimizer step (with --accum-steps, several batches), the validation under
# way and rank 0's save of last.pt first.
SHUTDOWN_TIMEOUT_S = 600


def launch(nproc: int, argv: list[str]) -> int:
    """``cnnkit train --nproc N ...``: run the same command under torchrun with N local processes; its exit code.

    torchrun starts its workers in sessions of their own, so a signal reaches them only through torchrun, which
    passes on what it receives: this process runs torchrun in a session of its own too (a terminal's Ctrl-C then
    reaches it once, from here) and forwards SIGINT as SIGINT, and SIGTERM, SIGHUP and SIGQUIT as SIGTERM, the
    signals cnnkit's training stops on, saving. Killed instead, torchrun would leave the workers training with
    nobody to stop them."""
    cmd = [sys.executable, "-m", "cnnkit.train.distributed", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "cnnkit", *argv]
    from cnnkit.threads import usable_cores

    # Each process computes with its share of the cores (cnnkit/threads.py reads OMP_NUM_THREADS as the default).
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(max(1, usable_cores() // nproc))),
           "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": os.environ.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", str(SHUTDOWN_TIMEOUT_S))}
    received: list[int] = []
    pending: list[int] = []  # arrived before torchrun ran
    running: list[subprocess.Popen] = []

    def send(signum: int) -> None:
        running[0].send_signal(signal.SIGINT if signum == signal.SIGINT else signal.SIGTERM)

    def forward(signum: int, frame: object) -> None:
        received.append(signum)
        if running:
            send(signum)
        else:
            pending.append(signum)

    # Handlers first: a signal while torchrun starts is forwarded once it runs, not lost with this process. One that
    # this process was started ignoring (SIGHUP under nohup, SIGINT for `cnnkit train ... &` in a script) stays
    # ignored, as a single process's training leaves it (loop.StopSignals): forwarded, it stopped the run.
    forwarded = [getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT") if hasattr(signal, name)]
    previous = {s: signal.signal(s, forward) for s in forwarded if signal.getsignal(s) != signal.SIG_IGN}
    try:
        running.append(subprocess.Popen(cmd, env=env, start_new_session=True))
        while pending:
            send(pending.pop(0))
        code = running[0].wait()  # resumed after each forwarded signal (PEP 475)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    # Stopped by a signal: the shell's convention (130 for Ctrl-C, 143 for SIGTERM), as a single process gives.
    return 128 + received[0] if received else code


def torchrun(args: list[str]) -> int:
    """torchrun with the command-line arguments ``args``, as ``launch`` runs it in its child process; its exit code.

    torchrun stops on a signal by passing it on to the workers, waiting for them, then raising its SignalException
    out of its main function, a traceback under the stop line that rank 0 prints (where the run was saved and how
    to continue it). Caught here: the same shell code as ``launch`` gives, 128 + the signal's number. So is its
    ChildFailedError after workers that failed with a one-line error: their exit code, without a traceback."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main

    try:
        main(args)
    except SignalException as e:
        return 128 + int(e.sigval)
    except ChildFailedError as e:
        # Workers that exited with an error code printed their own line (a UserError's); torchrun's traceback and
        # summary under it say nothing more. A worker killed by a signal (exit code < 0) keeps torchrun's report.
        if all(failure.exitcode > 0 for failure in e.failures.values()):
            return e.get_first_failure()[1].exitcode
        raise
    return 0


if __name__ == "__main__":
    sys.exit(torchrun(sys.argv[1:]))
