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

Other processes may start computing on the same cores at any time, and then the default count can be ruinous:
each operation of a step waits at its end for every thread, and a thread the system has paused for another
process holds up the rest for a whole time slice. So training with the default count times its batches and tries
fewer threads when that might pay (``ThreadGovernor``), keeping whichever runs faster.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, TypeVar

from cnnkit.errors import UserError


def _allowed_cpus() -> list[int]:
    """The CPUs this process may run on: its affinity mask (``taskset``, a container's CPU set)."""
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows: no affinity masks
        return list(range(os.cpu_count() or 1))


def usable_cores() -> int:
    """Physical cores among the CPUs this process may run on, at most the cgroup's CPU quota (at least 1)."""
    cores = set()
    for cpu in _allowed_cpus():  # hyper-threaded siblings share a (package, core) pair
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


def bad_threads(threads: object) -> str | None:
    """What is wrong with a requested thread count (said after the option's name), None where it is a count."""
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        return f"must be a whole number, 1 or more, got {threads!r}"
    return None


def resolve_threads(threads: int | None, workers: int = 0) -> int:
    """``threads`` checked, or the default: ``OMP_NUM_THREADS`` where set, else the usable physical cores less
    ``workers`` (DataLoader processes decoding images beside the computation), at least 1."""
    if threads is not None:
        if (wrong := bad_threads(threads)) is not None:
            raise UserError(f"--threads {wrong}")
        return threads
    return _omp_threads() or max(1, usable_cores() - workers)


def oversubscribed(threads: int | None) -> str | None:
    """A warning when ``threads`` (an explicit --threads) is more than the CPUs this process may run on (its
    affinity mask, at most the cgroup's CPU quota, rounded up): threads beyond them take turns on the same CPUs
    and every operation waits for the last of them. None when it fits, or when cnnkit chooses the count."""
    if threads is None:
        return None
    quota = _cgroup_cpu_quota()
    cpus = len(_allowed_cpus()) if quota is None else min(len(_allowed_cpus()), max(1, math.ceil(quota)))
    if threads <= cpus:
        return None
    return (f"--threads {threads} is more than the {cpus} CPU{'s' if cpus > 1 else ''} this process may run on: "
            "the extra threads take turns on them and every step waits for the last one; leave out --threads for "
            f"the default ({resolve_threads(None)} here)")


def default_threads(threads: int | None) -> bool:
    """Whether ``threads`` leaves the count to cnnkit: None, and no ``OMP_NUM_THREADS`` that names one."""
    return threads is None and _omp_threads() is None


def _omp_threads() -> int | None:
    """The count ``OMP_NUM_THREADS`` names, None where it names none."""
    omp = os.environ.get("OMP_NUM_THREADS", "")
    return int(omp) if omp.isdigit() and int(omp) > 0 else None


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


@dataclass
class ThreadChange:
    """A change of the thread count during training: after batch ``batch`` of epoch ``epoch`` (counted within
    the epoch from 1, as steps.csv's "step" and a stop's "epoch E, batch B" count them, a resumed epoch's too), from
    ``before`` threads to ``threads``, and the median seconds per batch with each."""

    epoch: int
    batch: int
    before: int
    threads: int
    s_before: float
    s_after: float

    def note(self) -> str:
        why = "other processes are busy on these cores" if self.threads < self.before else "the cores are free again"
        return (f"batches took {self.s_before * 1e3:,.0f} ms with {_threads(self.before)} and "
                f"{self.s_after * 1e3:,.0f} ms with {self.threads} ({why}): training goes on with "
                f"{_threads(self.threads)} (--threads N fixes the count)")


def _threads(n: int) -> str:
    return f"{n} CPU thread{'s' if n > 1 else ''}"


class ThreadGovernor:
    """Chooses torch's thread count for training on a CPU that other processes may be busy on.

    Over each window of ``WINDOW`` batches it measures the batches' median time and how long the training thread
    waited, ready to run, for a core another process held (Linux's run-queue delay, ``/proc/thread-self/schedstat``;
    where the system does not report it, the governor does nothing). Where that wait passes ``BUSY_WAIT`` of the
    window, it tries half the threads for a window; below the full count, it goes back now and then to the count
    it came from, since the other processes may have finished. A count tried is kept only where its batches are
    clearly faster; a try of more threads ends at its first batch far slower than the current count's, and a try
    that lost waits ``RECHECK_S`` seconds before the next of its kind, twice as long after each further loss, at
    most ``MAX_WAIT_S``. On free cores it never tries anything, so that a run there stays bit for bit what it was.

    Call ``start()`` when a stretch of batches begins (the time before it, validation or saving, is not a
    batch's), ``step()`` after each batch and ``finish()`` after the last; ``changes`` lists what changed."""

    # Beside another process's threads a batch can take 50 times as long as on free cores: the sooner a try,
    # the less that costs (warm-up and a window: the first try starts 9 batches in and is decided at 18).
    WARMUP = 3  # batches not timed at the start: the first ones compile loops and build kernels
    # Batches not timed after a change to fewer threads: the loops compile for the new count, and the first few
    # batches run slow. A try of more threads goes back to a count the run had (``_path``), whose loops are built,
    # and is judged from its first batch: beside a busy process each can cost 50 times the current count's.
    SETTLE = 3
    WINDOW = 6  # batches whose median is a count's time
    BUSY_WAIT = 0.2  # waiting for a core this share of the window: other processes hold the cores, try fewer threads
    FASTER = 0.8  # a count tried is kept where its median is at most this share of the current count's
    ABORT = 3.0  # a try of more threads ends at its first batch slower than this many times the current median
    # Seconds before trying again what lost last time, doubled after each further loss up to MAX_WAIT_S (the
    # other processes may stop, or start, at any time). Fewer threads cost little when they lose (at most the share
    # of the cores they leave); more, beside a busy process, can cost 50 times.
    RECHECK_S = {"fewer": 5.0, "more": 30.0}
    MAX_WAIT_S = 120.0

    def __init__(self, threads: int, clock: Callable[[], float] = time.perf_counter,
                 wait_clock: Callable[[], float | None] | None = None,
                 set_threads: Callable[[int], None] | None = None) -> None:
        self.most = self.count = threads
        self.clock = clock
        self.wait_clock = wait_clock or run_queue_wait
        self.set_threads = set_threads or _set_torch_num_threads
        self.changes: list[ThreadChange] = []
        self.epoch, self.batch = 1, 0  # where training is: the batches of the epoch done
        self._path = [threads]  # the counts gone down through, the current one last
        self._skip = self.WARMUP
        self._last: float | None = None  # the wall clock at the end of the last batch
        self._times: list[float] = []  # this window's batches, seconds
        self._window_start: tuple[float, float | None] = (0.0, None)  # (wall, run-queue wait) clocks
        self._trying: int | None = None  # the count being tried
        self._base = 0.0  # the current count's median when the try began
        self._wait = {"fewer": 0.0, "more": self.RECHECK_S["more"]}  # seconds after a decision before the next try
        self._next = {"fewer": 0.0, "more": 0.0}  # the clock time from which each kind of try may run

    def start(self, epoch: int = 1, batch: int = 0) -> None:
        """A stretch of batches begins: of epoch ``epoch``, after its first ``batch`` (a resumed epoch's)."""
        self.epoch, self.batch = epoch, batch
        self._last = self.clock()
        self._times = []  # a window spans no pause

    def finish(self) -> None:
        """After the last batch: a try under way ends, and the count is the one the run had chosen."""
        if self._trying is not None:
            self._trying, self._times = None, []
            self.set_threads(self.count)

    def step(self) -> None:
        now, last = self.clock(), self._last
        self._last = now
        self.batch += 1
        if self.most < 2 or last is None:
            return
        seconds = now - last
        if self._skip:  # compiling, or the first batches at a new count (its kernels are built then)
            self._skip -= 1
            return
        self._times.append(seconds)
        if self._trying is not None:
            if (self._trying > self.count and seconds > self.ABORT * self._base) or len(self._times) == self.WINDOW:
                self._decide(now)
            return
        if len(self._times) == 1:  # the window's waits are measured from here, over its other batches
            self._window_start = (now, self.wait_clock())
            return
        if len(self._times) < self.WINDOW:
            return
        median = statistics.median(self._times)
        self._times = []
        if self.count > 1 and self._busy(now) and now >= self._next["fewer"]:
            self._try(self.count // 2, median)
        elif len(self._path) > 1 and now >= self._next["more"]:
            self._try(self._path[-2], median)

    def _busy(self, now: float) -> bool:
        """Whether other processes held the cores for a good part of the window just ended (never, where the
        system does not say: the CPU time a process gets counts idle waits too, and tries on free cores would
        change a run's numbers for nothing)."""
        wall0, wait0 = self._window_start
        wait = self.wait_clock()
        return wait is not None and wait0 is not None and (wait - wait0) / max(now - wall0, 1e-9) > self.BUSY_WAIT

    def _try(self, count: int, median: float) -> None:
        self._trying, self._base, self._times = count, median, []
        self._switch(count, settle=self.SETTLE if count < self.count else 0)

    def _decide(self, now: float) -> None:
        count, self._trying = self._trying, None
        assert count is not None
        kind = "fewer" if count < self.count else "more"
        median, full = statistics.median(self._times), len(self._times) == self.WINDOW
        self._times = []
        if full and median <= self.FASTER * self._base:
            self.changes.append(ThreadChange(self.epoch, self.batch, self.count, count, self._base, median))
            self.count = count
            if kind == "fewer":
                self._path.append(count)
            else:
                self._path.pop()
            # Going down may go further at once; going up may go up again after the usual wait.
            self._wait = {"fewer": 0.0, "more": self.RECHECK_S["more"]}
            self._next = {"fewer": now, "more": now + self.RECHECK_S["more"]}
        else:
            self._switch(self.count, settle=1)
            self._wait[kind] = min(max(self._wait[kind] * 2, self.RECHECK_S[kind]), self.MAX_WAIT_S)
            self._next[kind] = now + self._wait[kind]

    def _switch(self, count: int, settle: int) -> None:
        self.set_threads(count)
        self._skip = settle


def _set_torch_num_threads(count: int) -> None:
    import torch

    torch.set_num_threads(count)


def run_queue_wait() -> float | None:
    """Seconds the calling thread has spent ready to run but waiting for a CPU (Linux's run-queue delay, the
    second field of /proc/thread-self/schedstat); None where the system does not say."""
    try:
        with open("/proc/thread-self/schedstat") as f:
            return int(f.read().split()[1]) / 1e9
    except (OSError, ValueError, IndexError):
        return None
