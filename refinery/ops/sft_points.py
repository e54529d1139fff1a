"""The per-point runner shared by the method comparison (flows/compare_methods.py) and the SFT sweep
(flows/sweep.py): one `python -m flows.sft` child process per point, its records under its own folder,
and the table of all points as CSV + markdown."""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

from refinery.atomic import atomic_write_text
from refinery.ops import metrics_contract
from refinery.ops.prefect_link import run_child_flow


def run_sft_point(folder: Path, settings: dict, env: dict, params_dir: str, stage: str = "sft",
                  extra_args: tuple[str, ...] = ()) -> tuple[dict | None, str]:
    """Run the sft flow with `settings` (dotted params) as a subflow of the calling Prefect task; outputs go
    to folder/model, records to folder/metrics, folder/plots, the log to folder/log.txt.
    Returns (the stage's metrics, "ok") or (None, "failed: <last line of stderr>")."""
    cmd = [sys.executable, "-m", "flows.sft", "--params-dir", params_dir, "--out-dir", str(folder / "model"),
           "--record-root", str(folder), *extra_args]
    if stage != "sft":
        cmd += ["--stage", stage]
    for key, value in settings.items():
        cmd += ["--set", f"{key}={json.dumps(value)}"]
    proc = run_child_flow("sft", cmd, env, folder / "log.txt")
    # the whole evaluation (per-task losses and all), not the headline numbers of metrics/<stage>.json
    evaluation = metrics_contract.read_evaluation(stage, folder)
    if proc.returncode != 0 or evaluation is None:
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        return None, f"failed: {last[:200]}"
    return evaluation, "ok"


def write_table(rows: list[dict], columns: list[str], out: Path, stem: str, title: str, footer: str = "") -> str:
    """rows -> out/<stem>.csv and out/<stem>.md (atomic); returns the markdown."""
    with open(out / f"{stem}.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=columns)
        w.writeheader()
        w.writerows({c: r.get(c, "") for c in columns} for r in rows)
    head = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n"
    body = "".join("| " + " | ".join(str(r.get(c, "")) for c in columns) + " |\n" for r in rows)
    md = f"# {title}\n\n" + head + body + (f"\n{footer}\n" if footer else "")
    atomic_write_text(out / f"{stem}.md", md)
    return md
