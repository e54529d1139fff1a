"""Multi-process training on the libraries' own engines: the stage relaunches itself under `torchrun` or
`accelerate launch`, and transformers' Trainer does DDP / FSDP / DeepSpeed from the environment they set.

Rank 0 runs the stage as usual (the Prefect flow, the MLflow run, evaluation, the saved output). Every
other rank runs only the stage's `train_worker`: the same inputs, the same seed, the same Trainer, and
nothing else, so only rank 0 writes outputs and records. (Trainer itself writes each rank's RNG state into
the checkpoint, which a resumed run needs.)
"""
from __future__ import annotations

import os
import shutil
import sys

from refinery.errors import UserError


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_worker_rank() -> bool:
    """A non-zero rank of a multi-process run: trains, and writes nothing of its own."""
    return world_size() > 1 and rank() != 0


def die_with_launcher() -> None:
    """Make this rank die with the launcher that started it. torchrun starts each rank in a session of its own,
    so a `kill -9` of the run (the launcher, or its process group) would leave the ranks training on as orphans,
    writing checkpoints and outputs behind the back of the rerun that resumes. Linux's PR_SET_PDEATHSIG sends
    this process SIGKILL when its parent exits; elsewhere this does nothing."""
    if world_size() > 1:
        die_with_parent()


def die_with_parent() -> None:
    """SIGKILL this process when its parent exits (Linux's PR_SET_PDEATHSIG; elsewhere nothing)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    parent = os.getppid()
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1
    if os.getppid() != parent:  # the parent died before the call: nothing would signal us now
        os._exit(1)


def launch_command(module: str, argv: list[str], nproc: int, accelerate_config: str | None) -> list[str] | None:
    """The command that relaunches `python -m <module> <argv>` on `nproc` processes, or None to run here."""
    if world_size() > 1 or (nproc <= 1 and not accelerate_config):
        return None  # already launched (we are one of its ranks), or a single-process run
    if accelerate_config:
        if not os.path.isfile(accelerate_config):
            raise UserError(f"training.accelerate_config: {accelerate_config}: no such file")
        if shutil.which("accelerate") is None:
            raise UserError("training.accelerate_config is set but `accelerate` is not on PATH")
        return ["accelerate", "launch", "--config_file", accelerate_config,
                *(["--num_processes", str(nproc)] if nproc > 1 else []), "-m", module, *argv]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", module, *argv]


def relaunch(module: str, argv: list[str], nproc: int, accelerate_config: str | None) -> None:
    """Replace this process by the launcher when the stage asks for several processes (never returns then)."""
    cmd = launch_command(module, argv, nproc, accelerate_config)
    if cmd is None:
        return
    print(f"launching {nproc} processes: {' '.join(cmd)}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os.execvp(cmd[0], cmd)
