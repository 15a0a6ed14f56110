"""How many CPU threads a command computes with: ``--threads N``, else the physical cores this process may use.

PyTorch's own default counts the machine's cores, not the ones this process is allowed (``taskset``, a
container's CPU set or quota), and a second thread on a hyper-threaded sibling or on a core another job is
busy with makes every step wait for the slowest: oversubscribed, a run goes slower than with fewer threads.
So cnnkit counts the physical cores among the CPUs in ``os.sched_getaffinity``, caps them by a cgroup CPU
quota, and leaves one core to each DataLoader worker process. ``OMP_NUM_THREADS``, where set (``train
--nproc`` sets it for each process), is the default instead.

torch's thread count is one setting for the whole process: library calls that compute for a while (evaluate,
predict) set it for their own work and put the caller's back when they return (``torch_threads``,
``keeps_torch_threads``).
"""

from __future__ import annotations

import contextlib
import functools
import os
from typing import Any, Callable, Iterator, TypeVar

from cnnkit.errors import UserError


def usable_cores() -> int:
    """Physical cores among the CPUs this process may run on, at most the cgroup's CPU quota (at least 1)."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows: no affinity masks
        cpus = list(range(os.cpu_count() or 1))
    cores = set()
    for cpu in cpus:  # hyper-threaded siblings share a (package, core) pair
        topology = f"/sys/devices/system/cpu/cpu{cpu}/topology/"
        try:
            with open(topology + "physical_package_id") as package, open(topology + "core_id") as core:
                cores.add((package.read().strip(), core.read().strip()))
        except OSError:
            cores.add(("cpu", str(cpu)))
    quota = _cgroup_cpu_quota()
    return max(1, min(len(cores), int(quota)) if quota is not None else len(cores))


def _cgroup_cpu_quota() -> float | None:
    """CPUs' worth of time the cgroup may use (cgroup v2 ``cpu.max``, or v1's CFS quota), None if unlimited."""
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        with open("/sys/fs/cgroup/cpu/cpu.cfs_quota_us") as q, open("/sys/fs/cgroup/cpu/cpu.cfs_period_us") as p:
            quota_us, period_us = int(q.read()), int(p.read())
        return None if quota_us <= 0 else quota_us / period_us
    except (OSError, ValueError):
        return None


def resolve_threads(threads: int | None, workers: int = 0) -> int:
    """``threads`` checked, or the default: ``OMP_NUM_THREADS`` where set, else the usable physical cores less
    ``workers`` (DataLoader processes decoding images beside the computation), at least 1."""
    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise UserError(f"--threads must be a whole number, 1 or more, got {threads!r}")
        return threads
    omp = os.environ.get("OMP_NUM_THREADS", "")
    if omp.isdigit() and int(omp) > 0:
        return int(omp)
    return max(1, usable_cores() - workers)


def set_torch_threads(threads: int | None, workers: int = 0) -> int:
    """Make torch compute with ``resolve_threads(threads, workers)`` threads (for the whole process); returns it."""
    import torch

    n = resolve_threads(threads, workers)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


@contextlib.contextmanager
def _restoring_torch_threads() -> Iterator[None]:
    """Inside the block torch's thread count may change; on leaving it, it is what it was before."""
    import torch

    before = torch.get_num_threads()
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


@contextlib.contextmanager
def torch_threads(threads: int | None, workers: int = 0) -> Iterator[int]:
    """Inside the block torch computes with ``resolve_threads(threads, workers)`` threads (yielded); on leaving
    it, torch's count is what it was before, so that a library call leaves the process's setting as it found it."""
    with _restoring_torch_threads():
        yield set_torch_threads(threads, workers)


F = TypeVar("F", bound=Callable[..., Any])


def keeps_torch_threads(fn: F) -> F:
    """``fn``, which may set torch's thread count for its work (``set_torch_threads``), with the count the process
    had put back when it returns or raises."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with _restoring_torch_threads():
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
