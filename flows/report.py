"""Stage `report`: every stage's evaluation in one place - reports/pipeline/report.md and report.html,
with the plots beside them. The pipeline flow publishes it as its final Prefect artifact."""
from __future__ import annotations

import html
import json
import shutil
from pathlib import Path

from prefect import flow

from refinery.ops.prefect_artifacts import publish_summary
from refinery.atomic import atomic_dir
from refinery.config import load_params
from refinery.ops.registry import register_policy
from refinery.ops.stage_cli import run_name, stage_main
from refinery.ops.tracking import StageRecord

STAGES = ("base_model", "prepare", "dapt", "sft", "reward", "ppo", "compare")


def _load(metrics_dir: Path, stage: str) -> dict | None:
    path = metrics_dir / f"{stage}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _fmt(v) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def build_report(m: dict[str, dict | None]) -> tuple[str, list[str]]:
    """Markdown text and the plot files it refers to."""
    out = ["# llm-refinery pipeline report", ""]
    plots: list[str] = []
    if (d := m.get("dapt")):
        out += ["## DAPT (domain-adaptive pretraining)", "",
                "| | before | after |", "|---|---|---|",
                f"| eval loss | {_fmt(d['before']['eval_loss'])} | {_fmt(d['after']['eval_loss'])} |",
                f"| perplexity | {_fmt(d['before']['perplexity'])} | {_fmt(d['after']['perplexity'])} |", "",
                f"method `{d['train']['method']}`, {d['train']['steps']} steps, "
                f"{d['train']['tokens_per_second']} tokens/s, peak memory {d['train']['peak_memory_mb']} MB", ""]
        plots.append("dapt/train.png")
    if (s := m.get("sft")):
        out += ["## SFT (multi-task)", "", "| task | metric | score before | score after | loss before | loss after |",
                "|---|---|---|---|---|---|"]
        for task, a in s["after"]["tasks"].items():
            b = s["before"]["tasks"][task]
            out.append(f"| {task} | {a.get('metric', '')} | {_fmt(b['score'])} | {_fmt(a['score'])} | "
                       f"{_fmt(b['loss'])} | {_fmt(a['loss'])} |")
        out += ["", f"method `{s['train']['method']}`, mixture share {s['train'].get('mixture_share')}", ""]
        plots += ["sft/train.png", "sft/task_scores.png"]
    if (r := m.get("reward")):
        e = r["eval"]
        out += ["## Reward model", "", f"held-out accuracy **{_fmt(e['accuracy'])}** (before training "
                f"{_fmt(r.get('before', {}).get('accuracy', float('nan')))}), mean margin {_fmt(e['margin'])}, "
                f"{e.get('n')} pairs; by task {e.get('accuracy_by_task')}", "",
                "| |abs margin| bucket | n | accuracy |", "|---|---|---|"]
        out += [f"| {c['abs_margin_min']}-{c['abs_margin_max']} | {c['n']} | {_fmt(c['accuracy'])} |"
                for c in e.get("calibration", [])]
        out.append("")
        plots += ["reward/train.png", "reward/calibration.png"]
    if (p := m.get("ppo")):
        t, e = p["train"], p["eval"]
        out += ["## PPO", "", f"training reward {_fmt(t['reward_first'])} -> {_fmt(t['reward_last'])}, "
                f"KL {_fmt(t['kl_last'])} (target {t.get('target_kl')}), {t['steps']} steps, "
                f"{_fmt(t['episodes_per_second'])} episodes/s", "",
                "| held-out prompts | PPO policy | SFT policy |", "|---|---|---|",
                f"| reward-model score | {_fmt(e['reward_policy'])} | {_fmt(e['reward_sft'])} |",
                f"| agreement with reference answers | {_fmt(e['reference_score_policy'])} | "
                f"{_fmt(e['reference_score_sft'])} |", "",
                f"RM-judged win rate of PPO over SFT: **{_fmt(e['win_rate_vs_sft'])}**; KL to the reference "
                f"{_fmt(e['kl'])}."]
        if e["reward_policy"] > e["reward_sft"] and e["reference_score_policy"] < e["reference_score_sft"]:
            out.append("**Warning: reward over-optimisation** - the reward model prefers the PPO policy while its "
                       "agreement with the reference answers fell.")
        out.append("")
        plots.append("ppo/train.png")
    if (c := m.get("compare")):
        out += ["## Method comparison (SFT)", "", "| method | trainable % | peak MB | s/step | tokens/s | eval loss | score |",
                "|---|---|---|---|---|---|---|"]
        for name, row in c["methods"].items():
            out.append(f"| {name} | {row.get('trainable_percent')} | {row.get('peak_memory_mb')} | "
                       f"{row.get('seconds_per_step')} | {row.get('tokens_per_second')} | {row.get('eval_loss')} | "
                       f"{row.get('score')} |")
        out.append("")
    return "\n".join(out) + "\n", plots


def to_html(markdown: str, images: list[str]) -> str:
    """A dependency-free HTML view: the markdown as preformatted text, the plots as images."""
    imgs = "\n".join(f'<figure><img src="{html.escape(i)}" style="max-width:100%"><figcaption>{html.escape(i)}'
                     f"</figcaption></figure>" for i in images)
    return (f"<!doctype html><meta charset='utf-8'><title>llm-refinery report</title>"
            f"<body style='font-family:sans-serif;max-width:60em;margin:auto'><pre>{html.escape(markdown)}</pre>"
            f"{imgs}</body>")


@flow(name="report", flow_run_name="report")
def report_flow(params_dir: str = "params", metrics_dir: str = "metrics", plots_dir: str = "plots",
                out_dir: str = "reports/pipeline", policy_dir: str = "models/ppo"):
    base = load_params("base", params_dir)
    metrics = {s: _load(Path(metrics_dir), s) for s in STAGES}
    markdown, plots = build_report(metrics)
    present = [p for p in plots if (Path(plots_dir) / p).is_file()]
    compare_png = Path("reports/compare/quality_vs_trainable.png")
    with atomic_dir(out_dir) as tmp:
        for p in present:
            dst = tmp / p.replace("/", "_")
            shutil.copy2(Path(plots_dir) / p, dst)
        if compare_png.is_file():
            shutil.copy2(compare_png, tmp / "compare_quality_vs_trainable.png")
        images = sorted(f.name for f in tmp.glob("*.png"))
        (tmp / "report.md").write_text(markdown + "\n" + "\n".join(f"![{i}]({i})" for i in images) + "\n")
        (tmp / "report.html").write_text(to_html(markdown, images))
    cfg = load_params("report", params_dir)
    registered = None
    with StageRecord("report", experiment=base.tracking.experiment, params={"report": cfg.model_dump()},
                     run_name=run_name("report"), on_unreachable=base.tracking.on_server_unreachable) as rec:
        rec.log_artifact(Path(out_dir) / "report.md", "report")
        rec.log_artifact(Path(out_dir) / "report.html", "report")
        if cfg.registry.enabled and metrics.get("ppo") and Path(policy_dir).is_dir():
            registered = register_policy(policy_dir, metrics["ppo"]["eval"], cfg.registry)
            rec.set_tags({f"registry.{k}": str(v) for k, v in registered.items()})
            markdown += (f"\n## Model registry\n\n`{registered['model_name']}` version {registered['version']} "
                         f"-> **{registered['alias']}** ({registered['why']}).\n")
            (Path(out_dir) / "report.md").write_text(markdown)
        publish_summary("report", markdown)
    print(markdown)
    print(f"report: {out_dir}/report.md and {out_dir}/report.html")
    return markdown


main = stage_main(report_flow, 'report')


if __name__ == "__main__":
    main()
