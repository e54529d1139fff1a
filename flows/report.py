"""Stage `report`: every stage's evaluation in one place - reports/pipeline/report.md and report.html,
with the figures beside them. The pipeline flow publishes it as its final Prefect artifact.

It reads each stage's whole evaluation (reports/<stage>/evaluation.json; metrics/<stage>.json holds only the
headline), and only keys the metrics contract (refinery/ops/metrics_contract.py) requires, or `.get`s the rest:
tests/test_pipeline.py builds the report from the contract's smallest valid records, and an old record without
comparison blocks still reports (its rows say "not recorded").

Every comparison is one table row: quantity, n, before, after, change [95% CI], verdict, from a block written
by refinery/evaluation/stats.py (`Estimate.as_dict()`); the first line lists every verdict. report.html is the
same markdown rendered by the `Markdown` package (tables extension) in a small template; its figures are
drawn by refinery/ops/report_figures.py or copied from plots/<stage>/, all beside the page (relative paths).
tests/test_report.py checks both, and screenshots the page in headless Chromium (ci-artifacts/report.png)."""
from __future__ import annotations

import html
import re
import shutil
from pathlib import Path

from prefect import flow

from refinery.atomic import atomic_dir
from refinery.config import load_params
from refinery.evaluation.alignment import head_to_head, significance_sentence
from refinery.evaluation.forgetting import TOLERANCE as FORGETTING_TOLERANCE
from refinery.ops import metrics_contract as mc
from refinery.ops import report_figures
from refinery.ops.prefect_artifacts import publish_summary
from refinery.ops.registry import choose_across, register_policy
from refinery.ops.stage_cli import run_name, stage_main
from refinery.ops.tracking import StageRecord

STAGES = ("base_model", "prepare", "dapt", "sft", "reward")  # then the alignment stages params/pipeline.yaml selects
# plots/<stage>/*.png drawn by the stages themselves (StageRecord.write_plot), copied beside the report
COPIED = {"dapt": ("dapt/train.png",), "sft": ("sft/train.png",), "reward": ("reward/train.png",),
          "ppo": ("ppo/train.png",), "dpo": ("dpo/train.png",), "grpo": ("grpo/train.png",)}
HEADER = "| quantity | n | before | after | change [95% CI] | verdict |\n|---|---|---|---|---|---|"
NOT_RECORDED = "not recorded"
# the method comparison (flows/compare_methods.py) is a command, not a stage: the report reads DVC-tracked files only
METHOD_COMPARISON = ("Method comparison: not part of the pipeline; `make compare` writes it to "
                     "`experiments/compare/<name>/methods.md`.")


def _fmt(v) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def _signed(v: float) -> str:
    return f"{v:+.4f}"


def _block(d: dict | None, *keys: str) -> dict | None:
    """The comparison block at d[k1][k2]..., or None (a record written before comparisons were reported)."""
    for k in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return d if isinstance(d, dict) and {"estimate", "ci_low", "ci_high", "verdict"} <= set(d) else None


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


class _Section:
    """The markdown of the report, with every verdict collected for the summary line."""

    def __init__(self):
        self.lines: list[str] = []
        self.verdicts: list[tuple[str, str]] = []

    def add(self, *lines: str) -> None:
        self.lines += lines

    def row(self, label: str, quantity: str, block: dict | None, before="-", after="-", n=None) -> None:
        """One comparison row. For a block judged against a null other than 0 (a win rate or an accuracy
        against 0.5), `change` is the estimate minus the null, so every change column reads the same way."""
        if block is None:
            self.add(f"| {_cell(quantity)} | {n if n is not None else '-'} | {_fmt(before)} | {_fmt(after)} | "
                     f"{NOT_RECORDED} | - |")
            return
        null = float(block.get("null") or 0.0)
        est, lo, hi = (float(block[k]) - null for k in ("estimate", "ci_low", "ci_high"))
        self.add(f"| {_cell(quantity)} | {block.get('n', n if n is not None else '-')} | {_fmt(before)} | "
                 f"{_fmt(after)} | {_signed(est)} [{_signed(lo)}, {_signed(hi)}] | {block['verdict']} |")
        self.verdicts.append((label, block["verdict"]))


def _early_stopping(d: dict) -> str:
    es = d.get("early_stopping")
    if not isinstance(es, dict):
        return f"**Early stopping:** {NOT_RECORDED} (a record from before the block existed)."
    if not es.get("monitored"):
        return f"**Early stopping:** off - {es.get('why', 'validation not monitored')}."
    stopped = "stopped early" if es.get("stopped_early") else "not stopped early"
    return f"**Early stopping:** kept step **{es.get('best_step')}** ({stopped}): {es.get('why', '')}."


def _train_line(t: dict) -> str:
    speed = f"{_fmt(t.get('tokens_per_second'))} tokens/s"
    if t.get("tokens_this_process") == 0 and t.get("resumed_from_step") is not None:  # 0.0 would read as a stall
        speed = f"resumed at step {t['resumed_from_step']}: nothing left to train, so no throughput"
    return (f"method `{t.get('method')}`, {t.get('steps')} steps, {speed}, "
            f"peak memory {_fmt(t.get('peak_memory_mb'))} MB, {_fmt(t.get('trainable_percent'))}% of parameters "
            f"trainable.")


def _shares(share) -> str:
    if isinstance(share, dict):
        return ", ".join(f"{k} {100 * float(v):.0f}%" if isinstance(v, (int, float)) else f"{k} {v}"
                         for k, v in share.items())
    return str(share)


def _figure(s: _Section, images: set[str], name: str, caption: str) -> None:
    if name in images:
        s.add(f"![{caption}]({name})", "")


def _registry(reg: dict | None) -> list[str]:
    out = ["## Model registry", ""]
    if reg is None:
        return [*out, "Not run: the report was built without the registry step.", ""]
    if "skipped" in reg:
        return [*out, f"Not registered: {reg['skipped']}.", ""]
    prev = reg.get("previous_champion")
    out.append(f"`{reg.get('model_name')}` version {reg.get('version')} -> alias **{reg.get('alias')}** "
               f"({f'previous champion: version {prev}' if prev else 'no previous champion'}).")
    out += ["", f"Why: {reg.get('why')}."]
    if len(reg.get("candidates") or {}) > 1:
        out += ["", f"Registered the **{reg.get('stage')}** policy, chosen across the alignment stages by the same "
                    "gate: " + "; ".join(f"{k}: {v}" for k, v in reg["candidates"].items()) + "."]
    rule = reg.get("rule")
    if rule:
        out += ["", f"Rule: {rule}."]
    return [*out, ""]


ALIGNMENT_HEADER = ("| stage | method | n | win rate vs SFT [95% CI] | verdict | greedy win rate | RM score change "
                    "[95% CI] | reference agreement change [95% CI] | KL to SFT | general-domain perplexity change | "
                    "train s | eval s | peak MB |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def _whole(v) -> str:
    return f"{v:,.0f}" if isinstance(v, (int, float)) else "-"


def _ci(block: dict | None, null: float = 0.0) -> str:
    if block is None:
        return NOT_RECORDED
    est, lo, hi = (float(block[k]) for k in ("estimate", "ci_low", "ci_high"))
    fmt = _signed if null == 0.0 else (lambda v: f"{v:.3f}")
    return f"{fmt(est)} [{fmt(lo)}, {fmt(hi)}]"


def _alignment_section(s: _Section, m: dict, stages: list[str], imgs: set[str]) -> None:
    """One row per alignment stage, each against its SFT policy on the same held-out prompts, then the stages
    head to head (refinery/evaluation/alignment.py) and the sentence on which differences are significant."""
    s.add("## Alignment methods", "", "Each alignment stage against the SFT policy on the same held-out prompts, "
          "judged by the reward model (win rate on sampled answers; RM score, reference agreement and KL on greedy "
          "answers; perplexity change on the general-domain set). Time: training and evaluation seconds.", "",
          ALIGNMENT_HEADER)
    evals = {}
    for st in stages:
        d = m[st]
        e, t = d.get(mc.PPO_EVAL, {}), d.get("train", {})
        evals[st] = e
        win = _block(e, "win_rate")
        g = d.get("general_retention") if isinstance(d.get("general_retention"), dict) else None
        retention = (f"{100 * g['perplexity_change']:+.1f}% [{100 * g['ci_low']:+.1f}, {100 * g['ci_high']:+.1f}]"
                     if g else "-")
        s.add(f"| {st} | {t.get('method', '-')} | {e.get('n', '-')} | {_ci(win, 0.5)} | "
              f"{win['verdict'] if win else '-'} | {_ci(_block(e, 'win_rate_greedy'), 0.5)} | "
              f"{_ci(_block(e, 'reward_change'))} | {_ci(_block(e, 'reference_score_change'))} | "
              f"{_fmt(e.get(mc.KL, '-'))} | {retention} | {_whole(t.get('seconds'))} | {_whole(e.get('seconds'))} "
              f"| {_whole(t.get('peak_memory_mb'))} |")
        if win is not None and st != "ppo":  # ppo's is in its own section's verdicts already
            s.verdicts.append((f"{st.upper()} win rate", win["verdict"]))
    s.add("")
    if len(stages) > 1:
        rows = head_to_head(evals)
        s.add("Head to head: the reward model's preference for the first stage's sampled answers over the second's, "
              "per prompt the share of the k x k answer pairs won (0.5 = no preference).", "",
              "| stages | n | win rate of the first [95% CI] | verdict |", "|---|---|---|---|")
        for r in rows:
            if "skipped" in r:
                s.add(f"| {r['a']} vs {r['b']} | - | not compared: {_cell(r['skipped'])} | - |")
            else:
                s.add(f"| {r['a']} vs {r['b']} | {r['n']} | {_ci(r, 0.5)} | {r['verdict']} |")
                s.verdicts.append((f"Head-to-head {r['a']} vs {r['b']}", r["verdict"]))
        s.add("", significance_sentence(rows), "")
    for st in stages:
        if st != "ppo":  # ppo has its own section above
            s.add(f"**{st}:** " + _train_line(m[st].get("train", {})), "")
            _figure(s, imgs, f"{st}_train.png", f"{st} training curves")


def build_report(m: dict[str, dict | None], images: list[str] | set[str] | None = None,
                 registry: dict | None = None, alignment: list[str] | tuple[str, ...] = ("ppo",)) -> tuple[str, list[str]]:
    """Markdown text and the stage plots (paths under plots/) it shows. `images`: the figure files that lie
    beside report.md (the report links only those); `registry`: register_policy's result, or {"skipped": why};
    `alignment`: the alignment stages the pipeline selects (params/pipeline.yaml)."""
    imgs = set(images or ())
    s = _Section()
    plots: list[str] = []
    if (d := m.get("dapt")):
        before, after = d.get("before", {}), d.get("after", {})
        s.add("## DAPT (domain-adaptive pretraining)", "", HEADER)
        s.row("DAPT eval loss", "held-out eval loss (change: mean per row, lower is better)",
              _block(d, "comparison", "eval_loss_change"), before.get("eval_loss", "-"), after.get("eval_loss", "-"))
        s.add("", f"Perplexity {_fmt(before.get('perplexity', '-'))} -> {_fmt(after.get('perplexity', '-'))} "
                  f"(the exponential of the loss above).", "", _early_stopping(d), "", _train_line(d.get("train", {})), "")
        _figure(s, imgs, "dapt_train.png", "DAPT training curves")
        plots += COPIED["dapt"]
    if (sft := m.get("sft")):
        s.add("## SFT (multi-task)", "")
        tasks_b = sft.get("before", {}).get("tasks", {})
        if not tasks_b:
            s.add("No `before` evaluation (eval.before: false): scores after SFT only, no change to test.", "")
        s.add(HEADER)
        for task, a in sft["after"]["tasks"].items():
            b = tasks_b.get(task, {})
            metric = a.get("metric") or "score"
            for key, label in (("score", f"score ({metric}, higher is better)"), ("loss", "response loss (lower is better)")):
                block = _block(sft, "comparison", task, f"{key}_change")
                if block is None and not b:  # nothing to compare: the after value only
                    s.add(f"| {_cell(task)}: {label} | {a.get('n', '-')} | - | {_fmt(a.get(key, '-'))} | - | - |")
                else:
                    s.row(f"SFT {task} {key}", f"{task}: {label}", block, b.get(key, "-"), a.get(key, "-"), a.get("n"))
        mean_b = sft.get("before", {}).get("mean_score")
        share = sft.get("train", {}).get("mixture_share")
        s.add("", f"Mean task score {_fmt(mean_b) if mean_b is not None else '-'} -> {_fmt(sft['after']['mean_score'])}"
                  + (f"; training mixture: {_shares(share)}" if share else "") + ".", "", _early_stopping(sft), "",
              _train_line(sft.get("train", {})), "")
        _figure(s, imgs, "sft_task_scores.png", "SFT before and after per task, with the 95% CI of the change")
        _figure(s, imgs, "sft_train.png", "SFT training curves")
        plots += COPIED["sft"]
    if (r := m.get("reward")):
        e = r.get("eval", {})
        s.add("## Reward model", "", HEADER)
        s.row("Reward accuracy vs chance", "pairwise accuracy against chance (0.5)", _block(r, "comparison", "accuracy"),
              0.5, e.get("accuracy", "-"), e.get("n"))
        s.row("Reward accuracy change", "pairwise accuracy, before vs after training",
              _block(r, "comparison", "accuracy_change"), r.get("before", {}).get("accuracy", "-"),
              e.get("accuracy", "-"), e.get("n"))
        s.add("", f"Mean margin (reward chosen - rejected) {_fmt(r.get('before', {}).get('margin', '-'))} -> "
                  f"{_fmt(e.get('margin', '-'))}, {e.get('n')} held-out pairs.")
        if e.get("accuracy_by_task"):
            s.add("", "Accuracy by task: " + ", ".join(f"{k} {_fmt(v)}" for k, v in e["accuracy_by_task"].items()) + ".")
        if e.get("calibration"):
            s.add("", "Calibration (pairs sorted by |margin|, least confident first):", "",
                  "| abs margin range | n | accuracy |", "|---|---|---|")
            s.add(*(f"| {report_figures.margin_label(c)} | {c.get('n')} | {_fmt(c.get('accuracy'))} |"
                    for c in e["calibration"]))
        s.add("", _early_stopping(r), "", _train_line(r.get("train", {})), "")
        _figure(s, imgs, "reward_calibration.png", "Reward-model accuracy per margin range")
        _figure(s, imgs, "reward_train.png", "Reward-model training curves")
        plots += COPIED["reward"]
    if (p := m.get("ppo")):
        t, e = p["train"], p[mc.PPO_EVAL]
        s.add("## PPO", "", f"{e.get('n')} held-out prompts, PPO policy against its SFT policy; "
                            f"training: {t['steps']} steps, {_fmt(t['episodes_per_second'])} episodes/s.", "", HEADER)
        sampled = str(e.get("win_rate_basis", "")).startswith("sampled")
        s.row("PPO win rate", "RM-judged win rate of PPO over SFT (0.5 = no preference)"
              + (", sampled answers" if sampled else ""), _block(e, "win_rate"), 0.5, e[mc.WIN_RATE_VS_SFT], e.get("n"))
        if sampled and (greedy := _block(e, "win_rate_greedy")) is not None:
            s.row("PPO win rate, greedy", "RM-judged win rate of PPO over SFT, one greedy answer each", greedy, 0.5,
                  greedy["estimate"], greedy.get("n"))
        s.row("PPO reward-model score", "reward-model score (SFT -> PPO)", _block(e, "reward_change"),
              e[mc.REWARD_SFT], e[mc.REWARD_POLICY], e.get("n"))
        s.row("PPO reference agreement", "agreement with reference answers (SFT -> PPO)",
              _block(e, "reference_score_change"), e[mc.REFERENCE_SCORE_SFT], e[mc.REFERENCE_SCORE_POLICY], e.get("n"))
        for task, block in (e.get("reference_score_change_by_task") or {}).items():
            s.row(f"PPO reference agreement: {task}", f"agreement with reference answers, {task} prompts (SFT -> PPO)",
                  block, "-", "-", block.get("n"))
        slope = _block(t, "reward_slope")
        if slope is not None or t["steps"] >= 3:
            s.row("PPO training reward slope", "training reward per step (first -> last step; change: fitted slope)",
                  slope, t["reward_first"], t["reward_last"], t["steps"])
        s.add("")
        win = _block(e, "win_rate")
        if win is not None:
            s.add(f"Win rate **{float(win['estimate']):.3f}** [95% CI {float(win['ci_low']):.3f}, "
                  f"{float(win['ci_high']):.3f}], n={win.get('n')}: {win['verdict']}"
                  + (f" ({e['win_rate_basis']})" if e.get("win_rate_basis") else "") + ".", "")
        target = t.get("target_kl")
        recent = t.get("kl_last_quarter_mean", t["kl_last"])
        versus = (f" against the target {target} ({recent / target:.2f}x the target)"
                  if isinstance(target, (int, float)) and target > 0 else " (no target recorded)")
        s.add(f"**KL:** {_fmt(e[mc.KL])} nats from the SFT policy on the held-out prompts (exact per-position KL "
              f"summed over the response, mean over prompts); during training {_fmt(recent)} over the last quarter "
              f"of the steps (last step {_fmt(t['kl_last'])}){versus}, controller coefficient "
              f"{_fmt(t.get('kl_coef_last', '-'))}.", "")
        if t["steps"] < 3 and slope is None:
            s.add(f"Training reward {_fmt(t['reward_first'])} -> {_fmt(t['reward_last'])} (a slope needs >= 3 steps).", "")
        if e[mc.REWARD_POLICY] > e[mc.REWARD_SFT] and e[mc.REFERENCE_SCORE_POLICY] < e[mc.REFERENCE_SCORE_SFT]:
            ref = _block(e, "reference_score_change")
            if ref is None or ref.get("verdict") == "worse":
                s.add("**Warning: reward over-optimisation** - the reward model prefers the PPO policy while its "
                      "agreement with the reference answers fell"
                      + (f" (that fall, over {ref.get('n')} prompts: {ref['verdict']})" if ref else "") + ".", "")
            else:  # a lower point estimate inside the noise is no evidence of over-optimisation
                s.add(f"Reference agreement {_fmt(e[mc.REFERENCE_SCORE_SFT])} -> {_fmt(e[mc.REFERENCE_SCORE_POLICY])}: "
                      f"{ref['verdict']} over {ref.get('n')} prompts (95% CI {float(ref['ci_low']):+.3f}, "
                      f"{float(ref['ci_high']):+.3f}), so no sign of reward over-optimisation.", "")
        _figure(s, imgs, "ppo_reward_kl.png", "PPO reward and KL per step, with the target KL")
        _figure(s, imgs, "ppo_train.png", "PPO training diagnostics")
        plots += COPIED["ppo"]
    aligned = [st for st in alignment if isinstance(m.get(st), dict)]
    if aligned:
        _alignment_section(s, m, aligned, imgs)
        plots += [p for st in aligned if st != "ppo" for p in COPIED[st]]
    retention = {st: d["general_retention"] for st in ("dapt", "sft", *alignment)
                 if isinstance(d := m.get(st), dict) and isinstance(d.get("general_retention"), dict)}
    if retention:
        s.add("## General-domain retention (forgetting)", "",
              "Perplexity of a general-domain held-out set (never trained on; data/demo/README.md) with the model "
              "each stage starts from and the one it ends with. Change: relative perplexity change, geometric mean "
              f"over the paragraphs (lower is better); the goal is within +{100 * FORGETTING_TOLERANCE:.0f}%.", "",
              HEADER)
        for st, g in retention.items():
            block = {"estimate": g["perplexity_change"], "ci_low": g["ci_low"], "ci_high": g["ci_high"],
                     "verdict": g["verdict"], "n": g["n"]}
            s.row(f"{st} general-domain perplexity", f"{st}: general-domain perplexity"
                  f" ({'within' if g.get('retained') else 'beyond'} +{100 * FORGETTING_TOLERANCE:.0f}%)",
                  block, g["perplexity_before"], g["perplexity_after"], g["n"])
        s.add("")
    if registry is not None:
        s.add(*_registry(registry))
    placed = {name for line in s.lines for name in re.findall(r"^!\[[^\]]*\]\(([^)]+)\)$", line)}
    if (rest := sorted(imgs - placed)):
        s.add("## Other figures", "", *(f"![{i}]({i})\n" for i in rest))

    by_stage: dict[str, list[str]] = {}
    for label, verdict in s.verdicts:
        stage, _, what = label.partition(" ")
        by_stage.setdefault(stage, []).append(f"{what} *{verdict}*")
    summary = " · ".join(f"{stage}: {', '.join(v)}" for stage, v in by_stage.items()) or "no comparisons recorded"
    head = ["# llm-refinery pipeline report", "", f"**Verdicts (95% CI):** {summary}."]
    if registry and registry.get("alias"):
        head[-1] += f" Registry: **{registry['alias']}**."
    missing = [st for st in ("dapt", "sft", "reward", *alignment) if not m.get(st)]
    if missing:
        head += ["", "Not run (no evaluation found): " + ", ".join(missing) + "."]
    head += ["", METHOD_COMPARISON]
    return "\n".join([*head, "", *s.lines]).rstrip() + "\n", plots


CSS = """
body { font: 16px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; color: #1d232a;
       max-width: 64rem; margin: 2rem auto; padding: 0 1.5rem; background: #fff; }
h1 { font-size: 1.8rem; border-bottom: 2px solid #2f6fb0; padding-bottom: .3rem; }
h2 { font-size: 1.35rem; margin-top: 2.2rem; border-bottom: 1px solid #d8dee4; padding-bottom: .2rem; }
table { border-collapse: collapse; margin: .8rem 0; font-size: .9rem; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid #d8dee4; padding: .35rem .6rem; text-align: left; vertical-align: top; }
th { background: #f3f5f7; }
td + td { white-space: nowrap; }
tr:nth-child(even) td { background: #fafbfc; }
code { background: #f3f5f7; padding: .05rem .3rem; border-radius: 3px; font-size: .9em; }
img { max-width: 100%; border: 1px solid #e3e7eb; border-radius: 4px; margin: .4rem 0; }
.improved { color: #1e7d34; font-weight: 600; }
.worse { color: #b3261e; font-weight: 600; }
.nochange { color: #6a737d; }
"""

_VERDICT_CLASS = {"improved": "improved", "no significant change": "nochange", "worse": "worse"}


def to_html(markdown_text: str, images: list[str] | None = None) -> str:
    """report.html: the report's markdown rendered by the `Markdown` package (tables extension) in a small
    template; verdicts coloured. Figures are the markdown's own image links (relative paths)."""
    import markdown

    body = markdown.markdown(markdown_text, extensions=["tables"], output_format="html")
    for verdict, cls in _VERDICT_CLASS.items():
        body = body.replace(f"<td>{verdict}</td>", f'<td class="{cls}">{verdict}</td>')
        body = body.replace(f"<em>{verdict}</em>", f'<em class="{cls}">{verdict}</em>')
    title = html.escape(next((ln[2:] for ln in markdown_text.splitlines() if ln.startswith("# ")), "report"))
    return (f'<!doctype html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n<title>{title}</title>\n'
            f"<style>{CSS}</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n")


def _without_images(markdown_text: str) -> str:
    """For the Prefect artifact: image links are relative to report.md and would show broken there."""
    return re.sub(r"^!\[[^\]]*\]\([^)]+\)\n?", "", markdown_text, flags=re.M)


def write_report(metrics: dict[str, dict | None], out_dir: str | Path, plots_dir: str | Path = "plots",
                 registry: dict | None = None, alignment: list[str] | tuple[str, ...] = ("ppo",)) -> str:
    """report.md, report.html and their figures into `out_dir` (replaced atomically); returns the markdown."""
    _, wanted = build_report(metrics, alignment=alignment)
    with atomic_dir(out_dir) as tmp:
        for p in wanted:
            if (Path(plots_dir) / p).is_file():
                shutil.copy2(Path(plots_dir) / p, tmp / p.replace("/", "_"))
        report_figures.draw_all(metrics, plots_dir, tmp)
        images = sorted(f.name for f in tmp.glob("*.png"))
        markdown_text, _ = build_report(metrics, images, registry, alignment)
        (tmp / "report.md").write_text(markdown_text)
        (tmp / "report.html").write_text(to_html(markdown_text, images))
    return markdown_text


@flow(name="report", flow_run_name="report")
def report_flow(params_dir: str = "params", record_root: str = ".", plots_dir: str = "plots",
                out_dir: str = "reports/pipeline", models_dir: str = "models"):
    """`record_root`: the folder holding the stages' reports/<stage>/evaluation.json (and metrics/); the policies
    are `models_dir`/<alignment stage>."""
    base = load_params("base", params_dir)
    cfg = load_params("report", params_dir)
    alignment = load_params("pipeline", params_dir).alignment
    metrics = {s: mc.read_evaluation(s, record_root) for s in (*STAGES, *alignment)}
    evals = {s: metrics[s][mc.PPO_EVAL] for s in alignment if metrics.get(s)}
    with StageRecord("report", experiment=base.tracking.experiment, params={"report": cfg.model_dump()},
                     run_name=run_name("report"), on_unreachable=base.tracking.on_server_unreachable) as rec:
        if not cfg.registry.enabled:
            registered = {"skipped": "the registry is disabled (params/report.yaml registry.enabled)"}
        elif not evals:
            registered = {"skipped": f"no evaluation of an alignment stage ({', '.join(alignment)}) to judge by"}
        elif not (policy_dir := Path(models_dir) / (chosen := choose_across(evals, cfg.registry))[0]).is_dir():
            registered = {"skipped": f"no policy at {policy_dir}"}
        else:
            registered = register_policy(policy_dir, evals[chosen[0]], cfg.registry, stage=chosen[0])
            registered["candidates"] = chosen[1]
            registered["rule"] = (f"champion only when the win rate's 95% CI lower bound lies above "
                                  f"{cfg.registry.min_win_rate} and the policy is not significantly worse than the "
                                  f"current champion (reference agreement by more than "
                                  f"{cfg.registry.max_reference_drop})"
                                  + ("; and its agreement with the reference answers not significantly below its SFT "
                                     "policy's" if cfg.registry.reference_must_hold else ""))
            rec.set_tags({f"registry.{k}": str(v) for k, v in registered.items() if k not in ("rule", "candidates")})
        markdown_text = write_report(metrics, out_dir, plots_dir, registered, alignment)
        rec.log_artifact(Path(out_dir) / "report.md", "report")
        rec.log_artifact(Path(out_dir) / "report.html", "report")
        for png in sorted(Path(out_dir).glob("*.png")):  # beside report.html in MLflow too, so its links work
            rec.log_artifact(png, "report")
        publish_summary("report", _without_images(markdown_text))
    print(markdown_text)
    print(f"report: {out_dir}/report.md and {out_dir}/report.html")
    return markdown_text


main = stage_main(report_flow, 'report')


if __name__ == "__main__":
    main()
