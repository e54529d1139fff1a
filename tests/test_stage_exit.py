"""A stage process ends through `stage_cli.leave_after` (no interpreter teardown): what a plain exit guarantees must
still hold: the exit code, non-daemon threads finished, atexit handlers run, buffered output flushed."""
import subprocess
import sys
import textwrap

import pytest

from refinery.ops.stage_cli import running_as

PROGRAM = textwrap.dedent("""
    import atexit, sys, threading, time
    from pathlib import Path
    from refinery.ops.stage_cli import leave_after

    out = Path(sys.argv[1])

    def main(how):
        atexit.register(lambda: (out / "atexit").write_text("ran"))
        def late():
            time.sleep(0.3)
            (out / "thread").write_text("done")
        threading.Thread(target=late).start()  # non-daemon: the interpreter waits for it, so must we
        sys.stdout.write("buffered, no newline")
        if how == "return":
            return
        if how == "code":
            raise SystemExit(3)
        if how == "message":
            raise SystemExit("stage failed: bad thing")
        raise RuntimeError("boom")

    leave_after(main, sys.argv[2])
""")


@pytest.mark.parametrize("how,code", [("return", 0), ("code", 3), ("message", 1), ("error", 1)])
def test_leave_after_exits_as_the_interpreter_would(tmp_path, how, code):
    proc = subprocess.run([sys.executable, "-c", PROGRAM, str(tmp_path), how], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == code, proc.stderr
    assert proc.stdout == "buffered, no newline"
    assert (tmp_path / "atexit").read_text() == "ran"
    assert (tmp_path / "thread").read_text() == "done"
    if how == "message":
        assert proc.stderr.strip() == "stage failed: bad thing"
    if how == "error":
        assert "RuntimeError: boom" in proc.stderr


def test_only_the_program_itself_leaves_early(monkeypatch):
    monkeypatch.setattr(sys, "orig_argv", [sys.executable, "-m", "flows.prepare", "--set", "x=1"])
    assert running_as("flows.prepare")
    assert not running_as("flows.sft")
    monkeypatch.setattr(sys, "orig_argv", [sys.executable, "-m", "pytest", "tests"])
    assert not running_as("flows.prepare")  # a test calling a stage's main() gets plain SystemExits back
