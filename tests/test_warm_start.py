"""The warm stage server (refinery/ops/warm_start.py): a stage forked from it behaves as a cold start would (its
output on the caller's descriptors, its exit code, its folder and environment), it refuses (and the caller
starts cold) whenever a fork could differ, and a stage never outlives the command that DVC started."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from refinery.ops.warm_start import stage_module

PROBE = """import os, signal, sys, time
if sys.argv[1:] == ["sleep"]:
    open("pid", "w").write(str(os.getpid()))
    signal.signal(signal.SIGTERM, lambda s, f: (open("got", "w").write(str(s)), sys.exit(3)))
    time.sleep(60)
print("out", sys.argv[1:], os.getcwd(), os.environ.get("PROBE"), os.environ.get("REFINERY_PROCESS_START", "cold"))
print("err", file=sys.stderr)
if sys.argv[1:] == ["fail"]:
    raise SystemExit(2)
if sys.argv[1:] == ["boom"]:
    raise RuntimeError("boom")
"""
# what flows/__init__.py does: hand over to the server, else (it returned) run the module here
CLIENT = ("import runpy, sys\nfrom refinery.ops.warm_start import delegate\n"
          "delegate(sys.argv[1], 'warm_pkg.probe', sys.argv[2:])\n"
          "sys.argv = ['probe.py'] + sys.argv[2:]\nrunpy.run_module('warm_pkg.probe', run_name='__main__')\n")


@pytest.fixture
def server(tmp_path):
    (tmp_path / "warm_pkg").mkdir()  # a package's module, as flows.<stage> is
    (tmp_path / "warm_pkg" / "__init__.py").write_text("")
    (tmp_path / "warm_pkg" / "probe.py").write_text(PROBE)
    (tmp_path / "warm_lib.py").write_text("VALUE = 1\n")
    sock = str(tmp_path / "s.sock")
    env = {**os.environ, "PROBE": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-m", "refinery.ops.warm_start", sock, "json", "warm_lib",
                             "warm_pkg.probe"],
                            cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    (tmp_path / "server.pid").write_text(str(proc.pid))  # as WarmServer.start does: clients wait for it
    yield tmp_path, sock, env
    proc.kill()
    proc.wait()


def client(root: Path, sock: str, env: dict, *args: str, **kw):
    return subprocess.run([sys.executable, "-c", CLIENT, sock, *args], cwd=root, env=env, capture_output=True,
                          text=True, timeout=60, **kw)


def test_a_forked_stage_is_a_cold_start_on_the_callers_descriptors(server):
    root, sock, env = server
    ok = client(root, sock, env, "a", "b")  # sent while the server still imports: it waits, then forks
    assert ok.returncode == 0 and ok.stdout == f"out ['a', 'b'] {root} 1 warm\n" and ok.stderr == "err\n"
    assert client(root, sock, env, "fail").returncode == 2
    boom = client(root, sock, env, "boom")
    assert boom.returncode == 1 and boom.stderr.rstrip().endswith("RuntimeError: boom")
    assert "warm_start.py" not in boom.stderr  # the traceback is the stage's own, as a cold start prints it
    assert client(root, sock, env, "again").stdout.endswith("warm\n")  # one fork per stage, the server stays


def test_it_refuses_when_a_fork_could_differ_and_the_stage_starts_cold(server):
    root, sock, env = server
    other = client(root, sock, {**env, "HF_HOME": "/elsewhere"}, "x")
    assert other.stdout.endswith("cold\n") and "cold start (environment differs in HF_HOME)" in other.stderr
    run_vars = client(root, sock, {**env, "REFINERY_STAGE_FLOW_RUN_ID": "1", "DVC_ROOT": str(root), "PS1": "$ "}, "x")
    assert run_vars.stdout.endswith("warm\n")  # per-run variables are the stage's own
    later = time.time() + 5
    os.utime(root / "warm_lib.py", (later, later))  # the server's copy of the code is stale now
    stale = client(root, sock, env, "x")
    assert stale.stdout.endswith("cold\n") and "warm_lib.py changed since the server imported it" in stale.stderr
    (root / "other").mkdir()
    gone = client(root, str(root / "other" / "s.sock"), env, "x")
    assert gone.returncode == 0 and gone.stdout.endswith("cold\n") and gone.stderr == "err\n"  # no server: quiet
    dead = subprocess.Popen(["true"])
    dead.wait()
    (root / "other" / "server.pid").write_text(str(dead.pid))  # a server that died importing: no wait for it
    t0 = time.monotonic()
    assert client(root, str(root / "other" / "s.sock"), env, "x").stdout.endswith("cold\n")
    assert time.monotonic() - t0 < 30


def wait_file(path: Path) -> str:
    end = time.monotonic() + 30
    while not path.exists() or not path.read_text():
        assert time.monotonic() < end, f"{path} never appeared"
        time.sleep(0.05)
    return path.read_text()


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG and /proc: Linux")
def test_signals_reach_the_stage_and_a_killed_command_takes_its_stage_along(server):
    root, sock, env = server
    proc = subprocess.Popen([sys.executable, "-c", CLIENT, sock, "sleep"], cwd=root, env=env)
    pid = int(wait_file(root / "pid"))
    assert pid != proc.pid  # the stage runs in the fork
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 3 and wait_file(root / "got") == str(int(signal.SIGTERM))

    (root / "pid").unlink()
    proc = subprocess.Popen([sys.executable, "-c", CLIENT, sock, "sleep"], cwd=root, env=env)
    pid = int(wait_file(root / "pid"))
    proc.kill()  # kill -9 of the command DVC runs: nothing can be passed on, the server ends the stage
    proc.wait()
    end = time.monotonic() + 10
    while alive(pid):
        assert time.monotonic() < end, "the stage outlived its killed command"
        time.sleep(0.05)


def test_only_stage_commands_are_handed_over():
    assert stage_module(["python", "-m", "flows.sft", "--set", "a=1"]) == "flows.sft"
    assert stage_module(["python", "-m", "flows.pipeline"]) is None  # the pipeline starts the server
    assert stage_module(["python", "-m", "pytest"]) is None and stage_module(["python", "x.py"]) is None
