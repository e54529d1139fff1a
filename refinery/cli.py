"""The `refinery` console command (installed by `pip install -e .`), beside the `python -m` commands it runs:

    refinery pipeline [--from S] [--to S] [--set STAGE.KEY=V] [--force]   = python -m flows.pipeline ...
    refinery stage <stage> [--set KEY=V] [--out-dir D]                     = python -m flows.<stage> ...
    refinery sweep --grid KEY=V1,V2                                        = python -m flows.sweep ...
    refinery compare [--name N] [--seeds 42,43] [--methods lora,ia3]       = python -m flows.compare_methods ...
    refinery generate --base models/base [--adapter NAME=PATH]             = python -m refinery.ops.generate ...
    refinery dvc-deps [--check]                                            = python -m refinery.ops.dvc_deps ...

Each subcommand imports only what it runs (a Prefect flow module costs seconds to import). The stage names are
dvc.yaml's, and every alignment stage (ppo, dpo, grpo: params/pipeline.yaml selects which are in dvc.yaml; any
of them runs as a command). `compare` (the method comparison) is an experiment command like
`sweep`, not a stage: its outputs go to experiments/compare/<name>/.
"""
from __future__ import annotations

import importlib
import sys

STAGE_MODULES = {"base_model": "flows.base_model", "prepare": "flows.prepare", "dapt": "flows.dapt",
                 "sft": "flows.sft", "reward": "flows.reward", "ppo": "flows.ppo", "report": "flows.report",
                 "dpo": "flows.dpo", "grpo": "flows.grpo"}
COMMANDS = {"pipeline": "flows.pipeline", "sweep": "flows.sweep", "compare": "flows.compare_methods",
            "generate": "refinery.ops.generate", "dvc-deps": "refinery.ops.dvc_deps"}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    usage = (f"usage: refinery {{{','.join(COMMANDS)}}} [args] | refinery stage {{{','.join(STAGE_MODULES)}}} "
             f"[args]\n{__doc__}")
    if not argv or argv[0] in ("-h", "--help"):
        print(usage)
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "stage":
        if not rest or rest[0] not in STAGE_MODULES:
            got = f"'{rest[0]}'" if rest else "nothing"
            print(f"error: refinery stage: expected one of {', '.join(STAGE_MODULES)}, got {got}", file=sys.stderr)
            return 2
        module, rest = STAGE_MODULES[rest[0]], rest[1:]
    elif cmd in COMMANDS:
        module = COMMANDS[cmd]
    else:
        print(f"error: unknown command '{cmd}' (expected stage, {', '.join(COMMANDS)})", file=sys.stderr)
        return 2
    sys.argv = [f"refinery {cmd}", *rest]
    result = importlib.import_module(module).main(rest)
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
