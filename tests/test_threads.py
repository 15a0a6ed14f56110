"""--threads: the CPU threads a command computes with; the default is the physical cores this process may use."""

import json
import os
import subprocess
import sys

import pytest
import torch

import cnnkit
from cnnkit.errors import UserError
from cnnkit.threads import ThreadGovernor, oversubscribed, resolve_threads, usable_cores


def test_explicit_threads_win_and_bad_ones_are_user_errors(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert resolve_threads(5) == 5 and resolve_threads(5, workers=4) == 5
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(UserError, match="--threads"):
            resolve_threads(bad)


def test_default_counts_allowed_cores_less_loader_workers(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cores = usable_cores()
    assert 1 <= cores <= len(os.sched_getaffinity(0))
    assert resolve_threads(None) == cores
    assert resolve_threads(None, workers=cores) == 1  # never fewer than one
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert resolve_threads(None) == 1


def test_more_threads_than_cpus_is_warned_about(monkeypatch, tmp_path):
    # --threads 64 on 2 CPUs was taken without a word, and oversubscribed threads slow every step
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr("cnnkit.threads._cgroup_cpu_quota", lambda: None)
    assert oversubscribed(None) is None and oversubscribed(1) is None and oversubscribed(2) is None
    assert oversubscribed(3).startswith("--threads 3 is more than the 2 CPUs this process may run on: the extra "
                                        "threads take turns on them")
    monkeypatch.setattr("cnnkit.threads._cgroup_cpu_quota", lambda: 0.5)  # half a CPU's time: one CPU's worth
    assert "more than the 1 CPU this process" in oversubscribed(2)
    monkeypatch.undo()
    one_cpu = {min(os.sched_getaffinity(0))}
    proc = run_pinned(["train", "--threads", 2, "--epochs", 1, "--num-samples", 64, "--batch-size", 32,
                       "--out", tmp_path / "run"], one_cpu, tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert ("cnnkit: warning: --threads 2 is more than the 1 CPU this process may run on" in proc.stdout
            and "leave out --threads for the default (1 here)" in proc.stdout), proc.stdout


def run_pinned(args, cpus, tmp_path):
    """`cnnkit ARGS` in a process allowed to run on ``cpus`` only (as taskset or a container's CPU set does)."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    return subprocess.run([sys.executable, "-m", "cnnkit", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=600, preexec_fn=lambda: os.sched_setaffinity(0, cpus))


def test_train_default_follows_the_affinity_and_is_shown_and_recorded(tmp_path):
    one_cpu = {min(os.sched_getaffinity(0))}
    proc = run_pinned(["train", "--epochs", 1, "--num-samples", 64, "--batch-size", 32, "--out", tmp_path / "run"],
                      one_cpu, tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "cpu, " in proc.stdout and ", 1 CPU thread;" in proc.stdout, proc.stdout
    # config.json records the request (None: each machine's own default), so that replaying it on a machine with
    # more cores does not pin one thread; the count used is in the result.
    assert json.loads((tmp_path / "run" / "config.json").read_text())["threads"] is None
    assert json.loads((tmp_path / "run" / "result.json").read_text())["threads"] == 1


def test_threads_from_a_config_file_and_the_command_line(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("threads: 1\nepochs: 1\nnum_samples: 64\nbatch_size: 32\n")
    proc = run_pinned(["train", "--config", config, "--out", tmp_path / "a"], os.sched_getaffinity(0), tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert ", 1 CPU thread;" in proc.stdout and json.loads((tmp_path / "a" / "config.json").read_text())["threads"] == 1
    assert json.loads((tmp_path / "a" / "result.json").read_text())["threads"] == 1
    proc = run_pinned(["lr-find", "--threads", 1, "--num-samples", 64, "--batch-size", 32, "--steps", 10,
                       "--out", tmp_path / "lr"], os.sched_getaffinity(0), tmp_path)
    assert proc.returncode == 0 and "; 1 CPU thread" in proc.stdout, proc.stderr[-2000:]
    proc = run_pinned(["eval", tmp_path / "a", "--threads", 0], os.sched_getaffinity(0), tmp_path)
    assert proc.returncode == 2 and "--threads" in proc.stderr


def test_eval_and_predict_compute_with_their_threads_and_leave_the_callers_count(tmp_path, image_folder):
    from cnnkit.checkpoint import load_checkpoint

    before = torch.get_num_threads()
    callers = resolve_threads(None) + 1  # neither the default nor the count asked below
    try:
        result = cnnkit.train(model="simple_cnn", data="shapes", num_samples=64, batch_size=32, epochs=1,
                              progress=False, out=str(tmp_path / "run"), log=open(os.devnull, "w"), threads=1)
        assert result.threads == 1
        ckpt = load_checkpoint(str(tmp_path / "run"))
        seen = []  # torch's thread count while the model computes
        ckpt.model.register_forward_hook(lambda *_: seen.append(torch.get_num_threads()))
        for threads, expected in ((1, 1), (None, resolve_threads(None))):
            torch.set_num_threads(callers)
            seen.clear()
            r = cnnkit.evaluate(ckpt, threads=threads)
            assert r.threads == expected and set(seen) == {expected}
            assert torch.get_num_threads() == callers  # a library call leaves the process's setting alone
            seen.clear()
            assert cnnkit.predict(ckpt, image_folder, threads=threads)[0]["top"]
            assert set(seen) == {expected} and torch.get_num_threads() == callers
    finally:
        torch.set_num_threads(before)


class Machine:
    """A simulated CPU for ThreadGovernor: ``batch_ms(batch, threads)`` is how long a batch takes and
    ``share(batch, threads)`` the share of that time the process's threads run (1.0: the cores are free)."""

    def __init__(self, batch_ms, share=lambda batch, threads: 1.0, cores=2, schedstat=True, wait=None):
        self.batch_ms, self.share = batch_ms, share
        # the share of the time the training thread waits for a core: the time it does not run, unless it idles
        self.wait = wait or (lambda batch, threads: 1 - share(batch, threads))
        self.wall = self.cpu = self.waited = 0.0
        self.threads = cores
        self.switches: list[int] = []  # set_threads calls
        self.run_at: list[int] = []  # the thread count of each batch
        # schedstat=False: a system that does not report run-queue waits
        self.governor = ThreadGovernor(cores, clock=lambda: self.wall,
                                       wait_clock=(lambda: self.waited) if schedstat else (lambda: None),
                                       set_threads=self.set_threads)

    def set_threads(self, n):
        self.threads = n
        self.switches.append(n)
        self.switched_at = len(self.run_at)  # the first batch at the new count

    def train(self, batches):
        self.governor.start()
        for b in range(batches):
            seconds = self.batch_ms(b, self.threads) / 1e3
            self.wall += seconds
            self.cpu += seconds * self.threads * self.share(b, self.threads)
            self.waited += seconds * self.wait(b, self.threads)
            self.run_at.append(self.threads)
            self.governor.step()
        return self


def busy_share(batch, threads):  # another process computes on both cores: two threads run half the time
    return 0.5 if threads == 2 else 1.0


def test_governor_leaves_the_count_alone_on_free_cores():
    m = Machine(lambda b, n: 15 if n == 2 else 26).train(3000)
    assert m.switches == [] and m.governor.changes == []
    # Threads that idle between operations (short batches, Python in between) run 60% of the time but wait for no
    # core: no try, which would change the run's numbers for nothing
    assert Machine(lambda b, n: 5 if n == 2 else 8, lambda b, n: 0.6, wait=lambda b, n: 0.0).train(3000).switches == []


def test_governor_without_run_queue_figures_does_nothing():
    # Elsewhere than Linux the CPU time a process gets is the only figure, and it counts idle waits too: tries on
    # free cores would change the run's numbers for nothing, so there are none, even where the cores are busy.
    assert Machine(lambda b, n: 5 if n == 2 else 8, lambda b, n: 0.6, schedstat=False).train(3000).switches == []
    assert Machine(lambda b, n: 900 if n == 2 else 27, busy_share, schedstat=False).train(500).switches == []


def test_governor_drops_to_one_thread_while_other_processes_hold_the_cores_and_comes_back_after():
    busy_until = 5000  # batches: 2 threads wait for each other at every operation, one thread runs on
    m = Machine(lambda b, n: (900 if n == 2 else 27) if b < busy_until else (15 if n == 2 else 26),
                lambda b, n: busy_share(b, n) if b < busy_until else 1.0).train(15000)
    down, up = m.governor.changes
    assert (down.before, down.threads) == (2, 1) and down.batch <= 20  # at once: warm-up, a window, the try (18 batches)
    assert (down.s_before, down.s_after) == pytest.approx((0.9, 0.027))
    assert "900 ms with 2 CPU threads and 27 ms with 1 (other processes are busy" in down.note()
    assert (up.before, up.threads) == (1, 2) and up.batch > busy_until
    assert "the cores are free again" in up.note() and m.threads == 2
    # While busy, each try of two threads ended at its first batch: a 900 ms batch, where one thread takes 27
    twos_while_busy = sum(1 for b, n in enumerate(m.run_at[down.batch:busy_until]) if n == 2)
    tries = sum(1 for a, b in zip(m.switches, m.switches[1:]) if (a, b) == (1, 2)) - 1  # less the one that won
    assert tries >= 2 and twos_while_busy == tries


def test_governor_keeps_the_count_where_fewer_threads_are_no_faster_and_tries_less_often():
    m = Machine(lambda b, n: 30 if n == 2 else 29, busy_share).train(20000)  # 10 minutes of busy cores
    assert m.governor.changes == [] and m.threads == 2
    starts = [b for b, (x, y) in enumerate(zip(m.run_at, m.run_at[1:])) if (x, y) == (2, 1)]
    gaps = [(b - a) * 0.03 for a, b in zip(starts, starts[1:])]  # seconds between tries
    cap = ThreadGovernor.MAX_WAIT_S
    assert len(starts) >= 3 and gaps[0] >= 5 and max(gaps) < cap + 2  # (a try and a window: under 2 s here)
    assert all(later > 1.9 * earlier or later >= cap for earlier, later in zip(gaps, gaps[1:]))


def test_a_try_of_fewer_threads_runs_its_whole_window():
    # The first batches at a new count can be slow (caches, a burst of the other process): fewer threads cannot be
    # ruinous, so their try is judged on its window, not ended at its first slow batch.
    def ms(b, n):
        if n == 2:
            return 60
        return 200 if b - m.switched_at < 5 else 19  # the kernels' build, then slow batches

    m = Machine(ms, busy_share)
    m.train(200)
    assert [(c.before, c.threads) for c in m.governor.changes] == [(2, 1)]


def test_waits_between_tries_stop_doubling_at_a_ceiling():
    # Busy for an hour, then free: back to two threads within about one ceiling's wait, not an hour later.
    busy_s = 3600
    m = Machine(lambda b, n: (900 if n == 2 else 27) if m.wall < busy_s else (15 if n == 2 else 26),
                lambda b, n: busy_share(b, n) if m.wall < busy_s else 1.0)  # (m is bound before the first batch)
    walls = []  # the clock after each batch
    m.governor.start()
    b = 0
    while m.wall < busy_s + 600:
        n = m.threads
        seconds = m.batch_ms(b, n) / 1e3
        m.wall += seconds
        m.waited += seconds * (1 - m.share(b, n))
        m.run_at.append(n)
        m.governor.step()
        walls.append(m.wall)
        b += 1
    back = m.governor.changes[-1]
    assert (back.before, back.threads) == (1, 2) and m.threads == 2
    assert walls[back.batch - 1] - busy_s < ThreadGovernor.MAX_WAIT_S + 10


def test_governor_halves_step_by_step_on_more_cores():
    ms = {8: 500, 4: 300, 2: 40, 1: 60}
    share = {8: 0.3, 4: 0.5, 2: 0.9, 1: 1.0}
    m = Machine(lambda b, n: ms[n], lambda b, n: share[n], cores=8).train(3000)
    assert [(c.before, c.threads) for c in m.governor.changes] == [(8, 4), (4, 2)] and m.threads == 2
    # Going back up returns through the counts it came down (their loops are built): 6 -> 3 -> 1, then 3, not 2
    ms6 = {6: 500, 3: 300, 1: 40}
    busy = {6: 0.3, 3: 0.5, 1: 1.0}
    six = Machine(lambda b, n: ms6[n] if six.wall < 600 else {6: 10, 3: 15, 1: 40}[n],
                  lambda b, n: busy[n] if six.wall < 600 else 1.0, cores=6)
    six.train(40000)
    assert [(c.before, c.threads) for c in six.governor.changes] == [(6, 3), (3, 1), (1, 3), (3, 6)]
    assert set(six.switches) == {6, 3, 1} and six.threads == 6


def test_finish_ends_a_try_at_the_chosen_count():
    m = Machine(lambda b, n: 900 if n == 2 else 27, busy_share)
    m.train(12)  # the first try (of one thread) has begun: warm-up 3, window 6, then the switch
    assert m.threads == 1 and m.governor.count == 2
    m.governor.finish()
    assert m.threads == 2


def _governed_epoch(state=None, epoch=1):
    """One epoch of 40 tiny batches through train_one_epoch with a governor whose clock says that each batch takes
    0.9 s with 2 threads (waiting half the time for a core) and 0.03 s with one; returns the governor and torch's
    thread count at each forward pass."""
    from cnnkit.train import loop

    seen = []
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    model.register_forward_hook(lambda *_: seen.append(torch.get_num_threads()))

    class Batches:
        def __len__(self):
            return 40

        def batches(self, start=0):
            for _ in range(start, 40):
                yield torch.randn(4, 3, 2, 2), torch.randint(0, 3, (4,))

    clock = {"wall": 0.0, "wait": 0.0}

    def tick():
        n = torch.get_num_threads()
        clock["wall"] += 0.9 if n == 2 else 0.03
        clock["wait"] += 0.45 if n == 2 else 0.0
        return clock["wall"]

    governor = ThreadGovernor(2, clock=tick, wait_clock=lambda: clock["wait"])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        loop.train_one_epoch(model, Batches(), optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0),
                             torch.amp.GradScaler("cpu", enabled=False), torch.nn.CrossEntropyLoss(),
                             torch.device("cpu"), None, state, progress=False, governor=governor, epoch=epoch)
        return governor, seen, torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def test_training_changes_the_thread_count_between_batches():
    """The loop times each batch through the governor; its count is torch's from the next batch on."""
    governor, seen, after = _governed_epoch()
    change = governor.changes[0]
    assert (change.before, change.threads) == (2, 1) and after == 1
    tried = change.batch - governor.SETTLE - governor.WINDOW  # the try: settling, then a window
    assert set(seen[:tried]) == {2} and set(seen[tried:]) == {1}


def test_compiled_loops_keep_more_builds_than_torch_compiles_default(recwarn):
    """A compiled loop is built per shape and thread count: more than torch.compile's default of 8 must not
    turn the compiled loops off (with fullgraph=True, going past the limit is an error)."""
    from cnnkit import compiled

    def double_relu(x):
        return (x * 2).relu()

    for n in range(1, 11):
        assert torch.equal(compiled.run(double_relu, torch.arange(n) - 3.0, what="test loop"), (torch.arange(n) * 2 - 6.0).relu())
    assert compiled.available(), [str(w.message) for w in recwarn]


def test_a_thread_change_names_the_epoch_and_its_batch_as_steps_csv_does():
    """In a resumed epoch too: counted from the session's start, the batch read as the epoch's (or as steps.csv's
    step) named another batch than the one after which the count changed."""
    from cnnkit.train import loop

    governor, seen, _ = _governed_epoch(loop.EpochState(batch=10), epoch=3)  # epoch 3 resumed after its 10th batch
    (change,) = governor.changes
    assert (change.epoch, change.before, change.threads) == (3, 2, 1)
    # batches 11..40 ran: a warm-up and a window with 2 threads, then the try of 1 (settling, a window), kept
    # after batch change.batch of the epoch
    tried = change.batch - governor.SETTLE - governor.WINDOW
    assert tried == 10 + governor.WARMUP + governor.WINDOW
    assert seen == [2] * (tried - 10) + [1] * (40 - tried)
