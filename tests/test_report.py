"""The pipeline report (flows/report.py, refinery/ops/report_figures.py) from synthetic evaluations: every
comparison shows n, the 95% CI and the verdict; report.html is rendered markdown (headings, tables, figures
beside it); headless Chromium's screenshot of the page is kept at ci-artifacts/report.png. No training."""
from __future__ import annotations

import csv
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml

from flows.report import build_report, report_flow, to_html, write_report
from refinery.evaluation.stats import bootstrap_mean, paired_difference, slope, win_rate
from refinery.ops import metrics_contract as mc
from refinery.ops import report_figures
from refinery.ops.tracking import _plot_png

REPO = Path(__file__).resolve().parents[1]
TASKS = {"summarize": "rouge_l", "which_module": "exact_match", "explain_topic": "rouge_l"}
PPO_STEPS = 12
TARGET_KL = 1.0


def _paired(rng, n, before_mean, shift, spread=0.1, lower_is_better=False):
    before = np.clip(rng.normal(before_mean, spread, n), 0, None)
    after = np.clip(before + rng.normal(shift, spread, n), 0, None)
    est = paired_difference(before.tolist(), after.tolist(), higher_is_better=not lower_is_better)
    return float(before.mean()), float(after.mean()), est.as_dict()


def synthetic() -> tuple[dict, list[dict]]:
    """Evaluations shaped as the stages write them (the contract's smallest records plus comparison blocks,
    early stopping and calibration), and plots/ppo/train.csv rows."""
    rng = np.random.default_rng(0)
    m = {s: mc.example(s) for s in mc.CONTRACTS if s != "compare"}  # compare: a command, not in the report

    d = m["dapt"]
    b, a, block = _paired(rng, 40, 3.2, -0.25, 0.2, lower_is_better=True)
    d["before"] = {"eval_loss": b, "perplexity": float(np.exp(b))}
    d["after"] = {"eval_loss": a, "perplexity": float(np.exp(a))}
    d["comparison"] = {"eval_loss_change": block}
    d["early_stopping"] = {"monitored": True, "best_step": 40, "best_validation_loss": a, "stopped_early": True,
                           "evaluations": 6, "why": f"lowest validation loss {a:.4f} at step 40 of 6 evaluations "
                                                    f"every 10 steps; stopped at step 60 after 2 without improvement"}

    s = m["sft"]
    s["before"], s["after"], s["comparison"] = {"tasks": {}}, {"tasks": {}}, {}
    for (task, metric), (mean, shift) in zip(TASKS.items(), ((0.24, 0.05), (0.1, 0.0), (0.18, -0.06))):
        n = 30
        sb, sa, score_change = _paired(rng, n, mean, shift)
        lb, la, loss_change = _paired(rng, n, 2.8, -0.4, 0.2, lower_is_better=True)
        s["before"]["tasks"][task] = {"score": sb, "loss": lb, "metric": metric, "n": n}
        s["after"]["tasks"][task] = {"score": sa, "loss": la, "metric": metric, "n": n}
        s["comparison"][task] = {"score_change": score_change, "loss_change": loss_change}
    s["before"]["mean_score"] = float(np.mean([t["score"] for t in s["before"]["tasks"].values()]))
    s["after"]["mean_score"] = float(np.mean([t["score"] for t in s["after"]["tasks"].values()]))
    s["train"]["mixture_share"] = {"summarize": 0.4, "which_module": 0.35, "explain_topic": 0.25}
    s["early_stopping"] = {"monitored": False,
                           "why": "validation monitoring off (training.eval_steps = 0): the last step is kept"}

    r = m["reward"]
    correct_before = (rng.random(64) < 0.5).astype(float)
    correct_after = (rng.random(64) < 0.78).astype(float)
    margins = np.sort(np.abs(rng.normal(0, 1.2, 64)))
    r["before"] = {"accuracy": float(correct_before.mean()), "margin": 0.01}
    r["eval"].update({"accuracy": float(correct_after.mean()), "margin": 0.9, "n": 64, "accuracy_by_task": {"qa": 0.8},
                      "calibration": [{"bucket": i, "abs_margin_min": round(float(margins[16 * i]), 4),
                                       "abs_margin_max": round(float(margins[16 * i + 15]), 4), "n": 16,
                                       "accuracy": float(correct_after[16 * i:16 * i + 16].mean())} for i in range(4)]})
    r["comparison"] = {"accuracy": bootstrap_mean(correct_after.tolist(), null=0.5).as_dict(),
                       "accuracy_change": paired_difference(correct_before.tolist(), correct_after.tolist()).as_dict()}
    r["early_stopping"] = {"monitored": True, "best_step": 12, "best_validation_loss": 0.52, "stopped_early": False,
                           "evaluations": 4, "why": "lowest validation loss 0.5200 at step 12 of 4 evaluations every 4 steps"}

    p = m["ppo"]
    rows = []
    for step in range(1, PPO_STEPS + 1):
        rows.append({"step": step, "reward_mean": 0.1 + 0.03 * step + float(rng.normal(0, 0.02)),
                     "kl": 0.15 * step + float(rng.normal(0, 0.05)), "kl_coef": 0.05, "entropy": 2.0})
    pol, sft = rng.normal(0.6, 0.5, 50), rng.normal(0.3, 0.5, 50)
    pol_k, sft_k = rng.normal(0.6, 0.5, (50, 4)), rng.normal(0.3, 0.5, (50, 4))  # 4 sampled answers per prompt
    ref_pol, ref_sft = rng.uniform(0.1, 0.5, 50), rng.uniform(0.1, 0.5, 50)
    p["train"].update({"steps": PPO_STEPS, "reward_first": rows[0]["reward_mean"], "reward_last": rows[-1]["reward_mean"],
                       "kl_last": rows[-1]["kl"], "kl_coef_last": 0.05, "target_kl": TARGET_KL,
                       "reward_slope": slope([x["reward_mean"] for x in rows]).as_dict()})
    p["eval"].update({"reward_policy": float(pol.mean()), "reward_sft": float(sft.mean()), "n": 50, "kl": 1.7,
                      "win_rate_vs_sft": win_rate(pol_k, sft_k).estimate, "win_rate": win_rate(pol_k, sft_k).as_dict(),
                      "win_rate_basis": "sampled: 4 answers per prompt", "win_rate_greedy": win_rate(pol, sft).as_dict(),
                      "reward_change": paired_difference(sft, pol).as_dict(),
                      "reference_score_policy": float(ref_pol.mean()), "reference_score_sft": float(ref_sft.mean()),
                      "reference_score_change": paired_difference(ref_sft, ref_pol).as_dict()})

    for stage, record in m.items():
        mc.validate(stage, record)
    return m, rows


def comparison_blocks(m: dict) -> list[dict]:
    """Every comparison block the synthetic records hold."""
    out = [m["dapt"]["comparison"]["eval_loss_change"], *m["reward"]["comparison"].values(),
           m["ppo"]["eval"]["win_rate"], m["ppo"]["eval"]["win_rate_greedy"], m["ppo"]["eval"]["reward_change"],
           m["ppo"]["eval"]["reference_score_change"],
           m["ppo"]["train"]["reward_slope"]]
    for task in m["sft"]["comparison"].values():
        out += task.values()
    return out


def write_plots(root: Path, ppo_rows: list[dict]) -> Path:
    """plots/ as the stages leave it: ppo/train.csv and a stage's own train.png (copied into the report)."""
    plots = root / "plots"
    (plots / "ppo").mkdir(parents=True)
    with open(plots / "ppo" / "train.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(ppo_rows[0]))
        w.writeheader()
        w.writerows(ppo_rows)
    (plots / "dapt").mkdir()
    history = [{"step": i, "loss": 3.2 - 0.4 * np.log1p(i), "lr": 3e-4, "grad_norm": 1.0 / (1 + i)} for i in range(1, 21)]
    _plot_png(history, plots / "dapt" / "train.png", "step", ("loss", "lr", "grad_norm"), "dapt: train")
    return plots


def ci_text(block: dict) -> str:
    """How a block's change and CI appear in the markdown table."""
    null = block.get("null") or 0.0
    est, lo, hi = (block[k] - null for k in ("estimate", "ci_low", "ci_high"))
    return f"{est:+.4f} [{lo:+.4f}, {hi:+.4f}]"


def test_every_comparison_has_n_ci_and_verdict():
    m, _ = synthetic()
    text, _ = build_report(m, registry={"model_name": "llm-refinery-policy", "version": "3", "alias": "challenger",
                                        "why": "win rate 0.640 [95% CI 0.530, 0.750], n=50: CI lower bound not above 0.7",
                                        "previous_champion": "2"})
    rows = [ln for ln in text.splitlines() if ln.startswith("| ")]
    for block in comparison_blocks(m):
        hits = [ln for ln in rows if ci_text(block) in ln]
        assert hits, f"no table row shows {ci_text(block)}:\n{text}"
        cells = [c.strip() for c in hits[0].strip("|").split("|")]
        assert cells[1] == str(block["n"]) and cells[-1] == block["verdict"], hits[0]
    summary = text.splitlines()[2]
    assert summary.startswith("**Verdicts (95% CI):**")
    assert summary.count("*improved*") + summary.count("*no significant change*") + summary.count("*worse*") \
        == len(comparison_blocks(m))
    assert "Registry: **challenger**" in summary
    # early stopping per training stage, the PPO specifics, the registry decision
    assert "kept step **40**" in text and "stopped at step 60" in text
    assert "Early stopping:** off - validation monitoring off" in text
    assert "kept step **12**" in text
    win = m["ppo"]["eval"]["win_rate"]
    assert f"Win rate **{win['estimate']:.3f}** [95% CI {win['ci_low']:.3f}, {win['ci_high']:.3f}], n=50" in text
    assert f"against the target {TARGET_KL}" in text
    assert "version 3 -> alias **challenger** (previous champion: version 2)" in text and "CI lower bound" in text
    assert "| 0.00-" in text or re.search(r"\| \d\.\d\d-\d\.\d\d \| 16 \|", text)  # calibration rows by margin range


def test_old_records_and_missing_stages_still_report():
    """A record from before comparison blocks (no `comparison`, no CI blocks in PPO's eval), sft without
    `before`, and no dapt at all: the report says what is missing instead of failing."""
    m, _ = synthetic()
    sft = m["sft"]
    del sft["comparison"], sft["early_stopping"]
    ppo = m["ppo"]
    for k in ("win_rate", "reward_change", "reference_score_change"):
        del ppo["eval"][k]
    del ppo["train"]["reward_slope"], ppo["train"]["target_kl"]
    text, _ = build_report({"sft": sft, "ppo": ppo, "reward": m["reward"]})
    assert "not recorded" in text and "Not run (no evaluation found): dapt." in text
    assert "(no target recorded)" in text
    no_before = mc.example("sft")
    text, _ = build_report({"sft": no_before})
    assert "No `before` evaluation" in text and "no comparisons recorded" in text


def test_figures_draw_what_the_data_asks(tmp_path):
    m, rows = synthetic()
    assert report_figures.sft_task_scores(m["sft"], tmp_path / "s.png").stat().st_size > 5000
    assert report_figures.ppo_reward_kl(rows, tmp_path / "p.png", TARGET_KL, m["ppo"]["train"]["reward_slope"])
    assert report_figures.reward_calibration(m["reward"]["eval"]["calibration"], tmp_path / "c.png", 0.78)
    assert report_figures.margin_label({"abs_margin_min": 0.0, "abs_margin_max": 0.1234}) == "0.00-0.12"
    # nothing to draw: no figure, no error
    assert report_figures.reward_calibration([], tmp_path / "none.png") is None
    assert report_figures.ppo_reward_kl([], tmp_path / "none.png", 1.0) is None
    assert report_figures.sft_task_scores(mc.example("sft"), tmp_path / "after_only.png")  # no `before`: after bars


def test_html_is_rendered_markdown_with_its_figures(tmp_path):
    m, rows = synthetic()
    plots = write_plots(tmp_path, rows)
    out = tmp_path / "reports" / "pipeline"
    text = write_report(m, out, plots, registry={"skipped": "no policy at models/ppo"})
    assert (out / "report.md").read_text() == text
    page = (out / "report.html").read_text()
    assert "<pre>" not in page
    assert page.count("<h2>") >= 5 and page.count("<table>") >= 5 and "<th>verdict</th>" in page  # 4 stages + registry
    images = re.findall(r'<img[^>]+src="([^"]+)"', page)
    assert {"sft_task_scores.png", "ppo_reward_kl.png", "reward_calibration.png", "dapt_train.png"} <= set(images)
    for src in images:
        assert not src.startswith("/") and (out / src).is_file(), src
    assert "Not registered: no policy at models/ppo." in text
    assert to_html("# t\n\n| a | b |\n|---|---|\n| 1 | improved |\n").count('<td class="improved">') == 1


def test_report_flow_writes_and_logs_the_report(tmp_path, monkeypatch):
    """The flow itself (without a Prefect run: `.fn`): reads reports/<stage>/evaluation.json, writes the
    report, logs it to MLflow; the method comparison (a command, not a stage) is only pointed to."""
    import mlflow

    m, rows = synthetic()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    (tmp_path / "params").mkdir()
    for name in ("base.yaml", "report.yaml", "pipeline.yaml"):
        shutil.copy(REPO / "params" / name, tmp_path / "params" / name)
    for stage in ("dapt", "sft", "reward", "ppo"):
        path = mc.evaluation_path(stage, tmp_path)
        path.parent.mkdir(parents=True)
        path.write_text(__import__("json").dumps(m[stage]))
    write_plots(tmp_path, rows)
    text = report_flow.fn(models_dir=str(tmp_path / "models"))
    assert "## PPO" in text and "## Method comparison" not in text and "`make compare`" in text
    assert "Not registered: no policy at" in text
    run = mlflow.search_runs(experiment_names=[yaml.safe_load((tmp_path / "params" / "base.yaml").read_text())
                                               ["tracking"]["experiment"]], output_format="list")[0]
    logged = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, "report")}
    assert {"report/report.md", "report/report.html", "report/ppo_reward_kl.png"} <= logged


def chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        if os.environ.get("CI"):
            raise AssertionError("chromium is not installed (.ci/run installs Debian's chromium)")
        pytest.skip("chromium not installed (apt-get install -y chromium); CI installs it (.ci/run)")
    return exe


def test_report_page_in_headless_chromium(tmp_path):
    """The page as a reader sees it: ci-artifacts/report.png (README, "What CI leaves behind")."""
    exe = chromium()
    m, rows = synthetic()
    plots = write_plots(tmp_path, rows)
    out = tmp_path / "reports" / "pipeline"
    write_report(m, out, plots, registry={"model_name": "llm-refinery-policy", "version": "1", "alias": "champion",
                                          "why": "first policy; win rate above 0.5", "previous_champion": None})
    shot = REPO / "ci-artifacts" / "report.png"
    shot.parent.mkdir(exist_ok=True)
    shot.unlink(missing_ok=True)
    proc = subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           f"--screenshot={shot}", "--window-size=1280,2400", "--virtual-time-budget=5000",
                           (out / "report.html").as_uri()], capture_output=True, text=True, timeout=180)
    assert shot.is_file(), f"no screenshot (exit {proc.returncode}): {proc.stderr[-2000:]}"
    assert shot.stat().st_size > 20_000, "the screenshot is suspiciously small (a blank page?)"
    import matplotlib.image

    pixels = matplotlib.image.imread(shot)
    assert pixels.shape[0] >= 2000 and pixels.shape[1] >= 1200, pixels.shape
    assert pixels[..., :3].std() > 0.05, "the screenshot is blank"


def test_general_domain_retention_table():
    from refinery.evaluation.forgetting import retention

    m, _ = synthetic()
    before = [2.0 + 0.01 * (i % 5) for i in range(64)]
    m["dapt"]["general_retention"] = retention(before, [b + 0.1 for b in before], seed=0)  # +10.5%: beyond 5%
    m["sft"]["general_retention"] = retention(before, [b - 0.01 for b in before], seed=0)
    text, _ = build_report(m)
    table = text.split("## General-domain retention (forgetting)")[1].split("\n## ")[0]
    rows = [line for line in table.splitlines() if line.startswith("| dapt") or line.startswith("| sft")]
    assert len(rows) == 2
    assert "| dapt: general-domain perplexity (beyond +5%) | 64 |" in rows[0] and rows[0].endswith("| worse |")
    assert "+0.1052 [+0.1052, +0.1052]" in rows[0]  # exp(0.1) - 1, no spread
    assert "(within +5%)" in rows[1] and rows[1].endswith("| improved |")
    assert "dapt: general-domain perplexity *worse*" in text  # and in the verdict summary


def test_a_fully_resumed_stage_says_it_trained_nothing():
    """A stage resumed from its last checkpoint trains nothing in that process: its 0.0 tokens/s must not read as
    a stalled run."""
    from flows.report import _train_line

    resumed = {"method": "lora", "steps": 16, "tokens_per_second": 0.0, "tokens_this_process": 0,
               "resumed_from_step": 16, "peak_memory_mb": 900.0, "trainable_percent": 3.5}
    assert "resumed at step 16: nothing left to train" in _train_line(resumed)
    assert "0.0 tokens/s" not in _train_line(resumed)
    fresh = {**resumed, "tokens_per_second": 210.5, "tokens_this_process": 40960, "resumed_from_step": None}
    assert "210.5000 tokens/s" in _train_line(fresh)
