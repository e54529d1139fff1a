"""Per-task SFT evaluation on the held-out split: response-only loss and the task's metric on generations."""
from __future__ import annotations

from refinery.data.chat import prompt_ids, render_example
from refinery.data.formats import prompt_text
from refinery.data.packing import PadCollator
from refinery.evaluation.heldout import generate_batch, row_losses
from refinery.evaluation.stats import paired_difference
from refinery.evaluation.text_metrics import METRICS


def evaluate_tasks(model, tokenizer, val: dict[str, list[dict]], metrics: dict[str, str],
                   cfg) -> tuple[dict, list[dict], dict[str, dict[str, list[float]]]]:
    # each task generates up to its own max_new_tokens (params/sft.yaml tasks.<task>.max_new_tokens)
    """({"tasks": {task: {"loss", "score", "metric", "n"}}, "mean_score"}, sample generations for a table,
    {task: {"score": [...], "loss": [...]}} per example, for the paired before/after comparison)."""
    collate = PadCollator(tokenizer.pad_token_id)
    result, samples, per_example = {}, [], {}
    for task, records in val.items():
        records = records[:cfg.eval.max_examples_per_task]
        rows = [dict(zip(("input_ids", "labels"), render_example(tokenizer, r["prompt"], r["response"], all_turns=False)))
                for r in records]
        summary, losses = row_losses(model, rows, cfg.eval.batch_size, len(rows), collate)
        loss = summary["eval_loss"]
        prompts = [prompt_ids(tokenizer, r["prompt"])
                   for r in records]
        new_tokens = cfg.tasks[task].max_new_tokens or cfg.eval.max_new_tokens
        gens = generate_batch(model, tokenizer, prompts, new_tokens, cfg.eval.generate_batch_size)
        fn = METRICS[metrics[task]]
        scores = [fn(g, r["response"]) for g, r in zip(gens, records)]
        per_example[task] = {"score": scores, "loss": losses}
        result[task] = {"loss": loss, "score": sum(scores) / len(scores), "metric": metrics[task], "n": len(records)}
        samples += [{"task": task, "prompt": prompt_text(r["prompt"])[:300], "reference": r["response"], "generation": g,
                     "score": round(s, 3)} for r, g, s in zip(records[:3], gens[:3], scores[:3])]
    mean = sum(v["score"] for v in result.values()) / len(result)
    return {"tasks": result, "mean_score": mean}, samples, per_example


def compare_tasks(before: dict[str, dict[str, list[float]]], after: dict[str, dict[str, list[float]]],
                  seed: int) -> dict[str, dict]:
    """Per task: the paired change of the task metric (higher is better) and of the response loss (lower is
    better) over the same held-out examples, each with n, a 95% bootstrap CI and a verdict."""
    return {task: {"score_change": paired_difference(before[task]["score"], after[task]["score"], seed=seed).as_dict(),
                   "loss_change": paired_difference(before[task]["loss"], after[task]["loss"], higher_is_better=False,
                                                    seed=seed).as_dict()}
            for task in after}
