"""`cnnkit` commands for the tests, forked from a process that has imported torch already.

Most tests start real `cnnkit` commands, and each fresh `python -m cnnkit` pays about 2.4 s of CPU before it
does anything: `import torch`, and `torch._dynamo`, which the first optimizer loads. Over the suite that was
about a third of its time on 2 cores. So each test process keeps one server that has imported those two once
and forks a child per command. The child is a real process, with its own pid, arguments, environment, working
folder, stdin (/dev/null), stdout and stderr, exit code or signal, atexit handlers and DataLoader workers; it
imports cnnkit itself and runs it as `python -m cnnkit` does. What a child cannot have is a fresh import of
torch, so a command runs as a fresh `python -m cnnkit` instead where its environment changes anything read
when torch or Python starts (`FRESH_PREFIXES`: thread counts, CPU capability, PYTHONPATH, the locale, ...),
and every command does while ``CNNKIT_TEST_FRESH_PROCESSES=1`` is set (the check that both ways agree).

The server reads one request per line on stdin (JSON: argv, cwd, env and the files for stdout and stderr),
answers the child's pid, then its exit status as subprocess reports it (negative: killed by that signal).
"""
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import threading

# Environment variables read when Python, torch, OpenMP, MKL or oneDNN start (or cached by them then): a
# command whose environment differs from the server's in one of these starts fresh.
FRESH_PREFIXES = ("OMP_", "MKL_", "KMP_", "GOMP_", "ATEN_", "ONEDNN_", "DNNL_", "PYTORCH", "TORCH", "CUDA",
                  "NVIDIA", "LD_", "PYTHON", "MALLOC_", "OPENBLAS", "LC_", "LANG")
# Read by torch when it is asked, not when it is imported.
RUNTIME_ONLY = {"TORCH_HOME"}
TIMEOUT_S = 600


def needs_fresh_process(env: dict[str, str], server_env: dict[str, str]) -> bool:
    """Whether a command with environment ``env`` must start as a fresh process rather than as a fork of a
    server started with ``server_env``."""
    if env.get("CNNKIT_TEST_FRESH_PROCESSES") == "1":
        return True
    changed = {k for k in env.keys() | server_env.keys() if env.get(k) != server_env.get(k)}
    return any(k.startswith(FRESH_PREFIXES) and k not in RUNTIME_ONLY for k in changed)


class Server:
    """One preloaded server process, started on first use; its commands run one at a time."""

    def __init__(self):
        self._proc = None
        self._env = None
        self._lock = threading.Lock()

    def _start(self):
        self._env = dict(os.environ)
        code = ("import sys; sys.path.pop(0); exec(compile(open(sys.argv[1]).read(), sys.argv[1], 'exec'), "
                "{'__name__': '__preloaded_server__'})")
        self._proc = subprocess.Popen([sys.executable, "-c", code, __file__], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, env=self._env, cwd=os.path.dirname(__file__))

    def run(self, argv: list[str], cwd=None, env=None) -> subprocess.CompletedProcess:
        """``python -m cnnkit *argv``, with its output captured as text, like ``subprocess.run``."""
        env = {**os.environ, **(env or {})}
        command = [sys.executable, "-m", "cnnkit", *argv]
        with self._lock:
            if self._proc is None or self._proc.poll() is not None:
                self._start()
            if needs_fresh_process(env, self._env):
                return subprocess.run(command, capture_output=True, text=True, cwd=cwd, env=env,
                                      timeout=TIMEOUT_S)
            with tempfile.TemporaryDirectory(prefix="cnnkit-cmd-") as folder:
                out, err = os.path.join(folder, "stdout"), os.path.join(folder, "stderr")
                request = {"argv": argv, "cwd": os.path.abspath(cwd or os.getcwd()), "env": env, "stdout": out,
                           "stderr": err}
                self._proc.stdin.write(json.dumps(request).encode() + b"\n")
                self._proc.stdin.flush()
                pid = int(self._read_line(TIMEOUT_S))
                try:
                    returncode = int(self._read_line(TIMEOUT_S))
                except subprocess.TimeoutExpired:
                    os.kill(pid, 9)
                    self._read_line(60)
                    raise subprocess.TimeoutExpired(command, TIMEOUT_S) from None
                # As subprocess.run(text=True) decodes: the locale's encoding, universal newlines.
                with open(out) as f_out, open(err) as f_err:
                    return subprocess.CompletedProcess(command, returncode, f_out.read(), f_err.read())

    def _read_line(self, timeout: float) -> bytes:
        ready, _, _ = select.select([self._proc.stdout], [], [], timeout)
        if not ready:
            raise subprocess.TimeoutExpired("preloaded cnnkit", timeout)
        line = self._proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the preloaded cnnkit server exited ({self._proc.wait()})")
        return line


def _serve():
    import torch._dynamo  # noqa: F401 - torch, and what the first optimizer of every training run loads

    import gc
    gc.freeze()  # the children's collections leave torch's objects, and the pages they share, alone
    requests, replies = sys.stdin.buffer, os.dup(1)
    while True:
        line = requests.readline()
        if not line:
            return
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _child(request, replies)  # never returns
        os.write(replies, f"{pid}\n".encode())
        _, status = os.waitpid(pid, 0)
        os.write(replies, f"{os.waitstatus_to_exitcode(status)}\n".encode())


def _child(request, replies):
    import runpy

    os.close(replies)
    for fd, path, flags in ((0, os.devnull, os.O_RDONLY), (1, request["stdout"], os.O_WRONLY | os.O_CREAT),
                            (2, request["stderr"], os.O_WRONLY | os.O_CREAT)):
        opened = os.open(path, flags, 0o600)
        os.dup2(opened, fd)
        os.close(opened)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    sys.path.insert(0, os.getcwd())  # as `python -m` puts the working folder first
    import importlib.util
    sys.argv = [importlib.util.find_spec("cnnkit.__main__").origin, *request["argv"]]
    try:
        runpy.run_module("cnnkit", run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as e:
        code = _exit_code(e.code)
    except KeyboardInterrupt:
        sys.excepthook(*sys.exc_info())
        _shut_down()
        signal.signal(signal.SIGINT, signal.SIG_DFL)  # as Python ends on an uncaught Ctrl-C: killed by SIGINT
        os.kill(os.getpid(), signal.SIGINT)
        code = 130
    except BaseException:
        sys.excepthook(*sys.exc_info())
        code = 1
    _shut_down()
    os._exit(code)


def _exit_code(code) -> int:
    """The exit status of ``sys.exit(code)``, printing a message as Python does."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr)
    return 1


def _shut_down():
    """What a Python process does on its way out that a command can see: wait for its threads, run its atexit
    functions, flush its output. Not the interpreter's teardown of every module, which in a forked child
    writes to every page of torch's objects that it shares with the server (1-2 s of copying)."""
    import atexit
    import threading

    threading._shutdown()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass


if __name__ == "__preloaded_server__":
    _serve()
