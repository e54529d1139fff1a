"""Warm stage processes: the pipeline's stage processes start from an interpreter that has already imported
torch, transformers, peft, Prefect and MLflow, instead of importing them again in each stage.

Why: DVC runs each stage as `python -m flows.<stage>` in a new process. Its imports took ~3-5 s a stage on 2
cores, seven times a demo run: most of the orchestration share the "Fast and lean" issue asks to cut. The
pipeline flow (flows/pipeline.py) starts one server per run (`python -m refinery.ops.warm_start SOCKET`); it
imports PRELOAD, then listens on a Unix socket in a private (0700) temporary folder, so only this user's
processes can reach it and nothing listens on the network. When DVC runs a stage's command, `flows/__init__.py`
sees REFINERY_WARM_START and calls `delegate`: the process sends its argv, working folder, environment and
its stdin/stdout/stderr (SCM_RIGHTS) to the server, which forks; the fork takes the client's descriptors,
folder and environment and runs the module as `python -m` would (`runpy`), and the client exits with its exit
code. Everything else is what a cold start does: the same code, the same output on the same descriptors, the
exit code DVC sees, Prefect and MLflow records made from the fork (nothing of theirs is opened before the fork;
PyTorch's own DataLoader forks after `import torch` in the same way).

When the answer would not be the same the server refuses and the stage starts cold, saying why on stderr:
another interpreter or folder, an environment that differs in anything but the per-run variables (PER_RUN;
libraries read the rest when imported), or a preloaded source file changed since the server imported it
(its code would be stale). A server that is not up yet (it imports while the first stage runs) or gone is
not an error either: the stage starts cold.

Failure semantics are a cold start's: a SIGKILL of the client (a `kill -9` of the run) closes its socket and the
server kills the fork's process group at once; SIGTERM/SIGINT/SIGHUP to the client are passed on to the fork;
the fork dies with the server (PR_SET_PDEATHSIG) and the server with the pipeline process.
"""
from __future__ import annotations

import importlib
import json
import os
import select
import signal
import socket
import sys

from refinery.ops.distributed import die_with_parent

ENV = "REFINERY_WARM_START"  # the server's socket path, in the environment of the stage commands DVC runs
MARK = "REFINERY_PROCESS_START"  # "warm" in a forked stage (recorded as an MLflow tag by the stage record)
# variables that differ from one stage run to the next, or that the shell DVC runs the command in sets, and that
# no library reads at import time
PER_RUN = frozenset({ENV, "REFINERY_STAGE_FLOW_RUN_ID", "REFINERY_PARENT_RUN_ID", "REFINERY_PREFECT_FLOW_RUN_ID",
                     "PREFECT__FLOW_RUN_ID", "PWD", "OLDPWD", "SHLVL", "_", "PS1", "PS2", "PS4"})
# what `dvc repro` adds for the command it runs; functions an interactive shell exported
PER_RUN_PREFIXES = ("DVC_", "BASH_FUNC_")
# the stages' modules and what they import inside functions (a profile of a forked stage found MLflow's
# SQLAlchemy store, 1.6 s, imported on the first MLflow call; Prefect's engine, DVC, GitPython for MLflow's git
# tags, pyplot for the plots, TRL for dpo/grpo). A module missing here is imported by the fork as usual.
PRELOAD = ("torch", "transformers", "peft", "datasets", "trl", "prefect", "prefect.flow_engine", "prefect.artifacts",
           "prefect.runtime", "prefect.logging.handlers", "mlflow", "mlflow.store.tracking.sqlalchemy_store",
           "mlflow.store.model_registry.sqlalchemy_store", "git", "dvc.repo", "matplotlib.pyplot",
           "flows.base_model", "flows.prepare", "flows.dapt", "flows.sft", "flows.reward", "flows.ppo", "flows.dpo",
           "flows.grpo", "flows.report", "refinery.ops.tracking")
_MAX_REQUEST = 1 << 22
SOCKET, PID = "stage.sock", "server.pid"  # in the server's private folder
READY_TIMEOUT = 180.0  # seconds a client waits for a server that is still importing, then starts cold


def stage_module(argv: list[str] | None = None) -> str | None:
    """`flows.<name>` when this process was started as `python -m flows.<name> ...` (DVC's stage commands)."""
    argv = list(getattr(sys, "orig_argv", []) if argv is None else argv)
    if len(argv) >= 3 and argv[1] == "-m" and argv[2].startswith("flows.") and argv[2] != "flows.pipeline":
        return argv[2]
    return None


def maybe_delegate() -> None:
    """Called by `flows/__init__.py`: hand this stage to the warm server when one was offered (never returns
    then); otherwise return, and the stage starts here as usual."""
    path, module = os.environ.get(ENV), stage_module()
    if path and module:
        delegate(path, module, list(sys.orig_argv[3:]))


def _send(conn: socket.socket, obj: dict, fds: list[int] | None = None) -> None:
    data = json.dumps(obj).encode() + b"\n"
    if fds:
        socket.send_fds(conn, [data], fds)
    else:
        conn.sendall(data)


def _read_line(conn: socket.socket, buffer: bytearray, limit: int = _MAX_REQUEST) -> dict | None:
    while b"\n" not in buffer:
        chunk = conn.recv(65536)
        if not chunk or len(buffer) > limit:
            return None
        buffer.extend(chunk)
    line, _, rest = bytes(buffer).partition(b"\n")
    buffer[:] = rest
    return json.loads(line)


def _alive(pid: int) -> bool:
    """Running (not a zombie its parent has yet to reap, which signal 0 would still find)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:  # no /proc
        try:
            os.kill(pid, 0)
            return True
        except OSError:
            return False


def _server_ready(path: str, timeout: float = READY_TIMEOUT) -> bool:
    """True once the socket exists; waits while the server that will create it (its pid beside it) is alive
    and still importing, so that every stage after the first is forked whatever the machine's speed."""
    import time

    end = time.monotonic() + timeout
    while not os.path.exists(path):
        try:
            with open(os.path.join(os.path.dirname(path), PID)) as f:
                pid = int(f.read())
        except (OSError, ValueError):  # no server was started here: a cold start
            return False
        if not _alive(pid):  # it died importing
            return False
        if time.monotonic() > end:
            print(f"note: cold start (the warm stage server was not ready after {timeout:.0f} s)", file=sys.stderr)
            return False
        time.sleep(0.05)
    return True


def delegate(path: str, module: str, args: list[str]) -> None:
    """Run `python -m <module> <args>` in a fork of the server at `path`; exits this process with its exit code.
    Returns (the caller starts cold) when no server answers or it refuses."""
    if not _server_ready(path):
        return
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(path)
    except OSError:  # gone: a cold start
        conn.close()
        return
    buffer = bytearray()
    try:
        _send(conn, {"module": module, "args": args, "cwd": os.getcwd(), "env": dict(os.environ),
                     "executable": sys.executable}, [0, 1, 2])
        reply = _read_line(conn, buffer)
    except (OSError, ValueError):
        reply = None
    if reply is None or "refused" in reply:
        why = reply["refused"] if reply else "the warm server did not answer"
        print(f"note: {module}: cold start ({why})", file=sys.stderr, flush=True)
        conn.close()
        return
    pid = reply["pid"]

    def forward(signum, _frame):  # the fork is the stage: what would stop the stage must reach it
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, forward)
    try:
        done = _read_line(conn, buffer)
    except (OSError, ValueError):
        done = None
    if done is None:  # the server died: its fork died with it (PR_SET_PDEATHSIG)
        print(f"error: {module}: the warm stage server went away during the stage", file=sys.stderr, flush=True)
        os._exit(1)
    os._exit(int(done["exit"]))


# ---- the server ---------------------------------------------------------------------------------------------

def _sources(root: str) -> dict[str, int]:
    """mtime of every imported module's source file under `root` (the repository's own code)."""
    root = os.path.join(os.path.realpath(root), "")
    out = {}
    for mod in list(sys.modules.values()):
        path = getattr(mod, "__file__", None)
        if path and os.path.realpath(path).startswith(root):
            try:
                out[path] = os.stat(path).st_mtime_ns
            except OSError:
                pass
    return out


def refusal(request: dict, env: dict[str, str], cwd: str, sources: dict[str, int]) -> str | None:
    """Why a fork of this server would not run the request as a cold start would; None when it would."""
    if request.get("executable") != sys.executable:
        return f"another interpreter ({request.get('executable')})"
    if os.path.realpath(request.get("cwd", "")) != os.path.realpath(cwd):
        return f"another working folder ({request.get('cwd')})"
    theirs = request.get("env", {})
    differ = sorted(k for k in set(theirs) | set(env)
                    if theirs.get(k) != env.get(k) and k not in PER_RUN and not k.startswith(PER_RUN_PREFIXES))
    if differ:
        return "environment differs in " + ", ".join(differ[:5]) + (" ..." if len(differ) > 5 else "")
    for path, mtime in sources.items():
        try:
            if os.stat(path).st_mtime_ns != mtime:
                return f"{os.path.relpath(path, cwd)} changed since the server imported it"
        except OSError:
            return f"{os.path.relpath(path, cwd)} is gone"
    return None


def _run_fork(request: dict, fds: list[int], set_by_imports: dict[str, str]) -> None:
    """In the fork: become the client's stage process, run the module as `python -m` does, exit as it does."""
    os.setpgid(0, 0)  # its own group: the server can stop it with everything it started (torchrun's ranks)
    die_with_parent()
    signal.signal(signal.SIGINT, signal.default_int_handler)  # the server ignores these; the stage must not
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
    for fd in fds:
        if fd > 2:
            os.close(fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update({k: v for k, v in request["env"].items() if k != ENV})  # its own children start cold
    for key, value in set_by_imports.items():
        os.environ.setdefault(key, value)
    os.environ[MARK] = "warm"
    import random

    random.seed()  # a cold start seeds these from the OS; a fork would share the server's state
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed()
    import runpy

    # `python -m` runs the module as __main__ only; the server's preloaded copy would make runpy warn about it
    sys.modules.pop(request["module"], None)
    sys.argv = [request["module"], *request["args"]]  # runpy puts the module's file in argv[0]
    sys.orig_argv = [sys.executable, "-m", request["module"], *request["args"]]
    try:
        runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
    except SystemExit:
        raise
    except BaseException as exc:  # as the interpreter reports it, without the server's and runpy's frames
        import traceback

        tb = exc.__traceback__
        while tb is not None and tb.tb_frame.f_code.co_filename in (__file__, "<frozen runpy>", runpy.__file__):
            tb = tb.tb_next
        traceback.print_exception(type(exc), exc, tb)
        raise SystemExit(130 if isinstance(exc, KeyboardInterrupt) else 1) from None
    raise SystemExit(0)  # leaves through the interpreter's own exit: threads joined, atexit handlers run


def _wait(conn: socket.socket, pid: int) -> int:
    """The fork's exit code (128 + signal when killed); kills its process group if the client goes away."""
    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        pidfd = None
    watch = [conn]
    while True:
        ready, _, _ = select.select(watch + ([pidfd] if pidfd is not None else []), [], [],
                                    None if pidfd is not None else 0.2)
        if conn in ready and not conn.recv(64):  # the client is gone (kill -9): the stage goes with it
            watch = []
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            if pidfd is not None:
                os.close(pidfd)
            code = os.waitstatus_to_exitcode(status)
            return code if code >= 0 else 128 - code


def serve(path: str, preload: tuple[str, ...] = PRELOAD) -> None:
    """Import `preload`, then run each request in a fork, one at a time (the pipeline runs its stages in order)."""
    die_with_parent()
    # a Ctrl-C reaches the whole foreground group: the client passes it to the stage, which must get to handle
    # it (Prefect and MLflow mark their runs); the server going first would SIGKILL the stage instead
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    env = dict(os.environ)
    for name in preload:
        try:
            importlib.import_module(name)
        except Exception as exc:  # an optional library not installed: the fork imports what it needs itself
            print(f"warm start: not preloaded: {name} ({type(exc).__name__}: {exc})", file=sys.stderr)
    # what the imports themselves set (flows/__init__.py's defaults, libraries' own): a cold start's imports
    # would set it too, so each fork gets it on top of its client's environment
    set_by_imports = {k: v for k, v in os.environ.items() if env.get(k) != v}
    cwd, server = os.getcwd(), os.getpid()
    sources = _sources(cwd)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path + ".tmp")
    listener.listen(4)
    os.rename(path + ".tmp", path)  # clients connect only once it is listening
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        while True:
            conn, _ = listener.accept()
            buffer = bytearray()
            try:
                msg, fds, _, _ = socket.recv_fds(conn, _MAX_REQUEST, 3)
                buffer.extend(msg)
                request = _read_line(conn, buffer)
            except (OSError, ValueError):
                conn.close()
                continue
            why = refusal(request, env, cwd, sources) if request and len(fds) == 3 else "a malformed request"
            if why:
                for fd in fds:
                    os.close(fd)
                _send(conn, {"refused": why})
                conn.close()
                continue
            pid = os.fork()
            if pid == 0:
                listener.close()
                conn.close()
                _run_fork(request, fds, set_by_imports)
            for fd in fds:
                os.close(fd)
            try:
                _send(conn, {"pid": pid})
            except OSError:
                pass
            code = _wait(conn, pid)
            try:
                _send(conn, {"exit": code})
            except OSError:
                pass
            conn.close()
    finally:
        if os.getpid() == server:  # a fork leaves through here too (SystemExit): only the server cleans up
            listener.close()
            for p in (path, path + ".tmp"):
                try:
                    os.unlink(p)
                except OSError:
                    pass


class WarmServer:
    """The pipeline's handle on its server: started on first use, its socket offered to the stage commands,
    stopped (and its private folder removed) at the end of the run. REFINERY_COLD_START=1 turns it off."""

    def __init__(self, env: dict[str, str]):
        self.env = env  # the environment the stage processes will have, less PER_RUN
        self.proc = None
        self.folder = None

    def start(self) -> None:
        """Start importing (the stage running meanwhile starts cold); nothing when REFINERY_COLD_START=1."""
        if self.proc is not None or os.environ.get("REFINERY_COLD_START") == "1":
            return
        import subprocess
        import tempfile

        self.folder = tempfile.mkdtemp(prefix="refinery-warm-")  # 0700: this user's processes only
        with open(os.path.join(self.folder, "server.log"), "wb") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "refinery.ops.warm_start",
                                          os.path.join(self.folder, SOCKET)],
                                         env=self.env, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        with open(os.path.join(self.folder, PID), "w") as f:  # a client waits while this process imports
            f.write(str(self.proc.pid))

    def offer(self, env: dict[str, str]) -> dict[str, str]:
        """`env` for a stage command: with the server's socket once `start` ran, else unchanged."""
        return {**env, ENV: os.path.join(self.folder, SOCKET)} if self.proc is not None else env

    def close(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except Exception:
                self.proc.kill()
            self.proc = None
        if self.folder is not None:
            import shutil

            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None


if __name__ == "__main__":  # python -m refinery.ops.warm_start SOCKET [MODULE ...]: MODULEs instead of PRELOAD
    serve(sys.argv[1], tuple(sys.argv[2:]) or PRELOAD)
