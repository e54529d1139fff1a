"""The pipeline report's figures (flows/report.py), each drawn as its data asks, as PNGs beside report.md:

    sft_task_scores.png     before/after per task as grouped bars (tasks are unrelated: no line across them),
                            the after bar with the 95% CI of the paired change as its error bar
                            (after = before + change, error = before + the change's CI); a loss panel likewise
    ppo_reward_kl.png       PPO training reward per step (with its fitted slope) and KL per step with the
                            controller's target KL as a horizontal line, two panels
    reward_calibration.png  reward-model accuracy per |margin| bucket, each bar labelled with its margin range

Each function takes plain records (the stages' evaluation dicts, plots/ppo/train.csv rows), draws with
matplotlib's Agg backend and returns the PNG's path, or None when there is nothing to draw (an old record, a
stage that ran 0 steps): the report then shows the tables without that figure.
"""
from __future__ import annotations

import csv
import math
from pathlib import Path

DPI = 110
BEFORE, AFTER, TARGET = "#9aa5b1", "#2f6fb0", "#c0392b"
SHORT = {"improved": "improved", "no significant change": "n.s.", "worse": "worse"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _num(v) -> float | None:
    """A finite float from a CSV cell or JSON value, else None."""
    if v is None or v == "" or isinstance(v, bool):
        return None
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _save(fig, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    _plt().close(fig)
    return path


def read_rows(path: str | Path) -> list[dict]:
    """The rows of a plots/<stage>/*.csv (as written by StageRecord.write_plot); [] when it is missing."""
    path = Path(path)
    if not path.is_file():
        return []
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


# -- SFT: grouped bars per task -------------------------------------------------------------------------------
def _task_panel(ax, tasks: list[str], sft: dict, key: str, change_key: str, higher_is_better: bool) -> bool:
    """One panel of grouped bars (before, after) for `key` ('score' or 'loss'); False when nothing to draw."""
    after = sft.get("after", {}).get("tasks", {})
    before = sft.get("before", {}).get("tasks", {})
    comparison = sft.get("comparison") or {}
    a_vals = [_num(after.get(t, {}).get(key)) for t in tasks]
    if all(v is None for v in a_vals):
        return False
    b_vals = [_num(before.get(t, {}).get(key)) for t in tasks]
    has_before = any(v is not None for v in b_vals)
    width = 0.38 if has_before else 0.6
    xs = list(range(len(tasks)))
    if has_before:
        ax.bar([x - width / 2 for x in xs], [v or 0.0 for v in b_vals], width, color=BEFORE, label="before")
    heights, low_err, high_err, verdicts = [], [], [], []
    for t, a, b in zip(tasks, a_vals, b_vals):
        block = comparison.get(t, {}).get(change_key)
        if isinstance(block, dict) and b is not None and None not in (_num(block.get("estimate")),
                                                                        _num(block.get("ci_low")),
                                                                        _num(block.get("ci_high"))):
            h = b + float(block["estimate"])  # after = before + change (means over the same examples)
            heights.append(h)
            low_err.append(max(0.0, h - (b + float(block["ci_low"]))))
            high_err.append(max(0.0, (b + float(block["ci_high"])) - h))
            verdicts.append(SHORT.get(block.get("verdict"), str(block.get("verdict", ""))))
        else:
            heights.append(a or 0.0)
            low_err.append(0.0)
            high_err.append(0.0)
            verdicts.append("")
    ax_x = [x + width / 2 for x in xs] if has_before else xs
    has_ci = any(low_err) or any(high_err) or any(verdicts)
    ax.bar(ax_x, heights, width, color=AFTER, label="after" + (" (95% CI of the change)" if has_ci else ""),
           yerr=[low_err, high_err] if has_ci else None, capsize=5, error_kw={"elinewidth": 1.2, "ecolor": "#222"})
    top = max([h + e for h, e in zip(heights, high_err)] + [v or 0.0 for v in b_vals] + [1e-9])
    for x, h, e, v in zip(ax_x, heights, high_err, verdicts):
        if v:
            ax.annotate(v, (x, h + e), xytext=(0, 3), textcoords="offset points", ha="center", va="bottom",
                        fontsize=8, color="#333")
    ax.set_ylim(0, top * 1.4)  # headroom for the verdicts and the legend
    labels = []
    for t in tasks:
        info = after.get(t, {})
        extra = [str(x) for x in ((info.get("metric") if key == "score" else None),
                                  (f"n={info['n']}" if "n" in info else None)) if x]
        labels.append("\n".join([t, *extra]))
    ax.set_xticks(xs, labels, fontsize=8)
    arrow = "higher is better" if higher_is_better else "lower is better"
    ax.set_ylabel(f"{key} ({arrow})")
    ax.set_title(f"held-out {key} per task")
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    ax.legend(fontsize=8, loc="upper center", ncol=2, frameon=False)
    return True


def sft_task_scores(sft: dict, path: str | Path) -> Path | None:
    """Grouped bars before/after per SFT task (score, and loss), the after bar carrying the change's 95% CI."""
    tasks = list(sft.get("after", {}).get("tasks", {}))
    if not tasks:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(max(8.0, 3.0 * len(tasks)), 4.0))
    drew = [_task_panel(axes[0], tasks, sft, "score", "score_change", True),
            _task_panel(axes[1], tasks, sft, "loss", "loss_change", False)]
    for ax, ok in zip(axes, drew):
        if not ok:
            ax.set_visible(False)
    if not any(drew):
        plt.close(fig)
        return None
    fig.suptitle("SFT: before and after, per task")
    fig.tight_layout()
    return _save(fig, path)


# -- PPO: reward and KL per step ------------------------------------------------------------------------------
def ppo_reward_kl(rows: list[dict], path: str | Path, target_kl: float | None = None,
                  reward_slope: dict | None = None) -> Path | None:
    """Two panels from plots/ppo/train.csv rows: training reward per step (with a line of the slope
    `train.reward_slope` reports, through the mean), and KL per step against the target KL (a horizontal line)."""
    pts = [(_num(r.get("step")), _num(r.get("reward_mean")), _num(r.get("kl"))) for r in rows]
    pts = sorted((s, rw, kl) for s, rw, kl in pts if s is not None)
    reward = [(s, rw) for s, rw, _ in pts if rw is not None]
    kls = [(s, kl) for s, _, kl in pts if kl is not None]
    if not reward and not kls:
        return None
    plt = _plt()
    fig, (ax_r, ax_k) = plt.subplots(1, 2, figsize=(10, 3.6))
    marker = "o" if len(pts) <= 40 else None
    if reward:
        xs, ys = [p[0] for p in reward], [p[1] for p in reward]
        ax_r.plot(xs, ys, marker=marker, ms=3, color=AFTER, label="reward (mean over the step's episodes)")
        if len(reward) >= 3:
            import numpy as np

            k, c = np.polyfit(xs, ys, 1)
            label = f"least-squares fit, slope {k:+.3g}/step"
            if isinstance(reward_slope, dict) and _num(reward_slope.get("estimate")) is not None:
                # the slope the metrics report (within prompts, see stats.within_group_slope), through the mean
                k = float(reward_slope["estimate"])
                c = float(np.mean(ys)) - k * float(np.mean(xs))
                label = f"{reward_slope.get('estimator', 'fitted')} slope {k:+.3g}/step"
            if isinstance(reward_slope, dict) and _num(reward_slope.get("ci_low")) is not None:
                label += (f"\n95% CI [{float(reward_slope['ci_low']):+.3g}, {float(reward_slope['ci_high']):+.3g}]"
                          f" ({reward_slope.get('verdict', '')})")
            ax_r.plot([xs[0], xs[-1]], [k * xs[0] + c, k * xs[-1] + c], "--", color="#555", lw=1, label=label)
    ax_r.set_title("training reward per step")
    ax_r.set_xlabel("PPO step")
    ax_r.set_ylabel("reward-model score")
    if kls:
        ax_k.plot([p[0] for p in kls], [p[1] for p in kls], marker=marker, ms=3, color=AFTER,
                  label="KL to the reference (per sequence)")
    if target_kl is not None and _num(target_kl) is not None:
        ax_k.axhline(float(target_kl), color=TARGET, ls="--", lw=1.2, label=f"target KL {float(target_kl):g}")
        ax_k.set_ylim(bottom=min(0.0, *(p[1] for p in kls)) if kls else 0.0)
    ax_k.set_title("KL per step")
    ax_k.set_xlabel("PPO step")
    ax_k.set_ylabel("KL (nats)")
    for ax in (ax_r, ax_k):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle("PPO training")
    fig.tight_layout()
    return _save(fig, path)


# -- reward model: calibration --------------------------------------------------------------------------------
def margin_label(bucket: dict) -> str:
    """'0.00-0.12': the |margin| range of a calibration bucket."""
    lo, hi = _num(bucket.get("abs_margin_min")), _num(bucket.get("abs_margin_max"))
    if lo is None or hi is None:
        return str(bucket.get("bucket", "?"))
    return f"{lo:.2f}-{hi:.2f}"


def reward_calibration(calibration: list[dict], path: str | Path, accuracy: float | None = None) -> Path | None:
    """Accuracy per |margin| bucket (least to most confident), bars labelled by their margin range and n."""
    buckets = [c for c in calibration or [] if _num(c.get("accuracy")) is not None]
    if not buckets:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(buckets)), 3.6))
    xs = list(range(len(buckets)))
    accs = [float(c["accuracy"]) for c in buckets]
    ax.bar(xs, accs, 0.65, color=AFTER)
    for x, a in zip(xs, accs):
        ax.annotate(f"{a:.2f}", (x, a), xytext=(0, 3), textcoords="offset points", ha="center", fontsize=8)
    ax.axhline(0.5, color=TARGET, ls="--", lw=1.2, label="chance (0.5)")
    if _num(accuracy) is not None:
        ax.axhline(float(accuracy), color="#555", ls=":", lw=1.2, label=f"overall accuracy {float(accuracy):.2f}")
    ax.set_xticks(xs, [f"{margin_label(c)}\nn={c.get('n', '?')}" for c in buckets], fontsize=8)
    ax.set_xlabel("|margin| range of the bucket (reward chosen - reward rejected)")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1.3)  # headroom for the legend above the bars
    ax.set_yticks([0, 0.25, 0.5, 0.75, 1.0])
    ax.set_title("reward model calibration: accuracy by confidence")
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    ax.legend(fontsize=8, loc="upper center", ncol=2, frameon=False)
    fig.tight_layout()
    return _save(fig, path)


def draw_all(metrics: dict[str, dict | None], plots_dir: str | Path, out: str | Path) -> list[str]:
    """Every figure the evaluations allow, into `out`; the file names drawn."""
    out, drawn = Path(out), []
    if (s := metrics.get("sft")) and sft_task_scores(s, out / "sft_task_scores.png"):
        drawn.append("sft_task_scores.png")
    if (r := metrics.get("reward")):
        e = r.get("eval", {})
        if reward_calibration(e.get("calibration", []), out / "reward_calibration.png", e.get("accuracy")):
            drawn.append("reward_calibration.png")
    if (p := metrics.get("ppo")):
        t = p.get("train", {})
        if ppo_reward_kl(read_rows(Path(plots_dir) / "ppo" / "train.csv"), out / "ppo_reward_kl.png",
                         t.get("target_kl"), t.get("reward_slope")):
            drawn.append("ppo_reward_kl.png")
    return drawn
