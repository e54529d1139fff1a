"""What every stage flow shares: the run name, the checkpoint key, the CLI wrapper, the summary text."""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
from pathlib import Path
from typing import NoReturn

from refinery.errors import UserError
from refinery.modeling.manifest import git_commit, hash_obj
from refinery.ops.health import server_answers

BAD_INPUT = "BadInput"


def run_name(stage: str, method: str | None = None) -> str:
    sha = (git_commit() or "nogit")[:7]
    return "-".join(p for p in (stage, method, sha) if p)


def flow_run_namer(stage: str):
    """A Prefect `flow_run_name` callable: `<stage>-<method>-<git sha>`, the method read from the run's
    overrides or from params/<stage>.yaml, so the UI says what ran."""

    def name() -> str:
        import yaml
        from prefect.runtime import flow_run

        args = flow_run.parameters or {}
        method = (args.get("overrides") or {}).get("method")
        if method is None:
            path = Path(args.get("params_dir", "params")) / f"{stage}.yaml"
            try:
                method = (yaml.safe_load(path.read_text()) or {}).get("method")
            except (OSError, yaml.YAMLError):
                method = None
        return run_name(args.get("stage") or stage, method)

    return name


def open_stage_record(stage: str, base, params: dict, *, method: str | None = None, root: str | Path = ".",
                      tags: dict[str, str] | None = None, name: str | None = None):
    """The one way a flow opens its MLflow record: experiment and unreachable-server policy from
    params/base.yaml, run name `<stage>-<method>-<sha>`, and the method and params-hash tags."""
    from refinery.ops.tracking import StageRecord

    lineage = {"method": method, "params_hash": hash_obj(params)[:12]} if method else {}
    return StageRecord(stage, experiment=base.tracking.experiment, params=params,
                       run_name=name or run_name(stage, method), root=Path(root),
                       on_unreachable=base.tracking.on_server_unreachable, tags={**lineage, **(tags or {})})


def checkpoint_dir(stage: str, *parts) -> Path:
    """checkpoints/<stage>/<hash of params + input hashes + the code>: outside DVC outs, so `dvc repro` can't
    delete it, and keyed so that changed params, inputs or code never resume a stale run. The code is in the key
    because a finished run's checkpoints stay: without it, `dvc repro` after a code change (DVC sees the stage's
    code deps changed) resumed the finished run's last step, trained nothing and saved the old weights again
    (seen when the reward stage's attention kernel changed)."""
    return Path("checkpoints") / stage / hash_obj((parts, code_fingerprint()))[:16]


@functools.cache
def code_fingerprint() -> str:
    """md5 over the source of the `refinery` and `flows` packages this process runs (paths and bytes): any edit
    gives a new key. A resume after a kill with the same code finds the same key. Both packages sit side by side
    (the repository, or site-packages for an installed wheel); found from this file, not imported."""
    import hashlib

    top = Path(__file__).resolve().parents[2]
    digest = hashlib.md5()
    for package in ("refinery", "flows"):
        for path in sorted((top / package).rglob("*.py")):
            digest.update(f"{path.relative_to(top).as_posix()}\0".encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def refuse(exc: UserError):
    """A flow's answer to bad input: a Failed state without a traceback; `run_cli` prints it on one line."""
    from prefect.states import Failed

    return Failed(message=str(exc), name=BAD_INPUT)


def cli_kwargs(argv: list[str] | None = None) -> dict:
    """`--set training.lr=0.001 --set method=ia3 --out-dir x` -> {"overrides": {...}, "out_dir": "x"}.
    Values after `=` are parsed as YAML (numbers, booleans, lists)."""
    import argparse

    import yaml

    parser = argparse.ArgumentParser(description="Run this stage as a Prefect flow (params from params/).")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a key of this stage's params file (dotted), e.g. training.lr=0.001")
    for name in ("params-dir", "input-dir", "data-dir", "out-dir", "stage", "record-root"):
        parser.add_argument(f"--{name}")
    args = parser.parse_args(argv)
    kwargs = {k: v for k, v in vars(args).items() if k != "set" and v is not None}
    overrides = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise UserError(f"--set {item}: expected KEY=VALUE")
        overrides[key] = yaml.safe_load(value)
    if overrides:
        kwargs["overrides"] = overrides
    return kwargs


@contextlib.contextmanager
def prefect_api_or_local():
    """A configured Prefect API that does not answer must not stop a stage run from the CLI: warn and run
    with a temporary local API instead (the run then shows in that API, not the configured one)."""
    from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings

    url = get_current_settings().api.url
    if url is None or server_answers(url):
        yield
        return
    print(f"warning: Prefect API {url} is unreachable; running this stage with a temporary local Prefect API",
          file=sys.stderr)
    from refinery.ops.prefect_link import ENV

    os.environ.pop(ENV, None)  # a flow run in the unreachable API cannot be ours
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        yield


def run_cli(flow_fn, precheck=None, **kwargs) -> None:
    """`python -m flows.<stage>`: run the flow; bad input -> `error: ...` and exit 2, a crash -> exit 1.

    `precheck` (params validation) runs before the flow, so bad params fail in a second, not after
    Prefect's API has started."""
    logging.getLogger("refinery").setLevel(logging.INFO)
    try:
        if precheck is not None:
            precheck()
        from refinery.ops.prefect_link import run_flow_as_linked

        with prefect_api_or_local():
            state = run_flow_as_linked(flow_fn, **kwargs)
    except UserError as exc:  # raised before the flow started (e.g. parameter validation)
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    if state.name == BAD_INPUT:
        print(f"error: {state.message}", file=sys.stderr)
        raise SystemExit(2)
    if state.is_failed() or state.is_crashed():
        print(f"error: stage failed: {state.message}", file=sys.stderr)
        raise SystemExit(1)


def summary_markdown(stage: str, title: str, lines: dict[str, object], run_url: str, out_dir: str) -> str:
    rows = "\n".join(f"| {k} | {v} |" for k, v in lines.items())
    return (f"# {stage}: {title}\n\nOutput: `{out_dir}`  \nMLflow: {run_url}\n\n| | |\n|---|---|\n{rows}\n")


def stage_main(flow_fn, stage: str | None, worker=None):
    """The `python -m flows.<stage>` entry point: parse `--set`/`--*-dir` options (refusing ones this flow
    does not take), validate params (and the method, where the stage has one) before the flow starts.

    `worker` is what a non-zero rank of a multi-process run does (refinery/ops/distributed.py); a stage without
    one refuses to run on several processes."""
    import inspect

    from refinery.config import apply_overrides, load_params
    from refinery.errors import exit_on_user_error
    from refinery.modeling.methods import check_stage_method
    from refinery.ops.distributed import die_with_launcher, is_worker_rank, relaunch, world_size

    name = stage or flow_fn.name

    @exit_on_user_error
    def main(argv: list[str] | None = None) -> None:
        argv = sys.argv[1:] if argv is None else list(argv)
        kwargs = cli_kwargs(argv)
        accepted = inspect.signature(flow_fn.fn).parameters
        for key in kwargs:
            if key not in accepted:
                raise UserError(f"{'--set' if key == 'overrides' else '--' + key.replace('_', '-')}: "
                                f"not an option of stage '{name}'")
        die_with_launcher()  # a rank of a multi-process run goes when its launcher goes (kill -9 included)
        if is_worker_rank() and worker is not None:
            worker(**kwargs)
            return
        pdir = kwargs.get("params_dir", "params")

        def precheck():
            base = load_params("base", pdir)
            if base.tracking.on_server_unreachable == "error":
                # an MLflow server that does not answer is bad input: one line and exit 2 here, before the
                # flow starts, rather than a traceback from inside it
                from refinery.ops.tracking import configure_mlflow

                configure_mlflow(Path("."), "error")
            training = None
            if stage is not None:
                cfg = load_params(stage, pdir, kwargs.get("overrides"))
                if hasattr(cfg, "method"):
                    check_stage_method(cfg, stage, f"{pdir}/{stage}.yaml")
                # Trainer stages keep it under `training`; ppo at its top level (it has no Trainer)
                training = getattr(cfg, "training", None) or (cfg if hasattr(cfg, "nproc_per_node") else None)
            if stage is not None and kwargs.get("overrides") and "out_dir" not in kwargs:
                # the stage writes its DVC out (models/<stage>): record the values in its params file first, as
                # `flows.pipeline --set` and `dvc exp run -S` do, so dvc.lock can describe what gets written.
                # With --out-dir the output goes where asked and the params file is left alone.
                apply_overrides({stage: kwargs["overrides"]}, pdir)
                print(f"note: {pdir}/{stage}.yaml updated with " + ", ".join(
                    f"{k}={v}" for k, v in kwargs["overrides"].items()) + " (a --set run writing "
                    f"models/{stage} records its values there; use --out-dir to write elsewhere instead)",
                    file=sys.stderr)
            nproc = training.nproc_per_node if training else 1
            launcher = getattr(training, "accelerate_config", None)
            if worker is None and (nproc > 1 or launcher or world_size() > 1):
                raise UserError(f"stage '{name}' runs in one process (several processes: dapt, sft, reward and ppo)")
            relaunch(_main_module(flow_fn), argv, nproc, launcher)

        run_cli(flow_fn, precheck=precheck, **kwargs)

    def entry(argv: list[str] | None = None) -> None:
        if not running_as(_main_module(flow_fn)):  # called in-process (tests, compare_methods): plain exits
            main(argv)
            return
        leave_after(main, argv)

    return entry


def running_as(module: str) -> bool:
    """True in the process `python -m <module>` started (or a warm fork standing in for it)."""
    argv = getattr(sys, "orig_argv", [])
    return len(argv) >= 3 and argv[1] == "-m" and argv[2] == module


def leave_after(main, *args) -> NoReturn:
    """Run a program's `main(*args)`, then end the process as the interpreter does (non-daemon threads joined,
    atexit handlers run: logging, Prefect's and MLflow's queues drained; stdio flushed) but without the
    interpreter's finalisation. Why: tearing down the modules torch, transformers, Prefect and MLflow left behind
    took 2.1-2.4 s of every stage process on 2 cores after its flow had finished (measured on the prepare stage:
    flow finished -> process gone; 0.1 s this way), on the pipeline's critical path once per stage. Nothing is
    lost: what a stage writes is closed (atomic writes) before its flow returns; the exit code is the one a
    plain `raise SystemExit(code)` would give."""
    import atexit
    import threading

    try:
        main(*args)
        code = 0
    except SystemExit as exc:
        code = exc.code
    except BaseException as exc:  # an uncaught error: the interpreter's own report and exit code
        import traceback

        traceback.print_exc()
        code = 130 if isinstance(exc, KeyboardInterrupt) else 1
    if code is None:
        code = 0
    elif not isinstance(code, int):  # SystemExit("message"): printed, exit 1, as Python does
        print(code, file=sys.stderr)
        code = 1
    shutdown = getattr(threading, "_shutdown", None)  # what the interpreter calls first: joins non-daemon threads
    if shutdown is not None:
        shutdown()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def _main_module(flow_fn) -> str:
    """`flows.sft` when run as `python -m flows.sft` (whose module is then `__main__`)."""
    module = flow_fn.fn.__module__
    if module == "__main__":
        spec = getattr(sys.modules["__main__"], "__spec__", None)
        module = spec.name if spec is not None else module
    return module
