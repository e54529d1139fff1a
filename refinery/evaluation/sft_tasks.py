"""Per-task SFT evaluation on the held-out split: response-only loss and the task's metric on generations."""
from __future__ import annotations

from refinery.evaluation.heldout import eval_loss, generate_batch
from refinery.data.packing import PadCollator
from refinery.data.chat import prompt_ids, render_example
from refinery.evaluation.text_metrics import METRICS


def evaluate_tasks(model, tokenizer, val: dict[str, list[dict]], metrics: dict[str, str], cfg) -> tuple[dict, list[dict]]:
    """{"tasks": {task: {"loss", "score", "metric", "n"}}, "mean_score"} and the generations (for a table)."""
    collate = PadCollator(tokenizer.pad_token_id)
    result, samples = {}, []
    for task, records in val.items():
        records = records[:cfg.eval.max_examples_per_task]
        rows = [dict(zip(("input_ids", "labels"), render_example(tokenizer, r["prompt"], r["response"])))
                for r in records]
        loss = eval_loss(model, rows, cfg.eval.batch_size, len(rows), collate)["eval_loss"]
        prompts = [prompt_ids(tokenizer, r["prompt"])
                   for r in records]
        gens = generate_batch(model, tokenizer, prompts, cfg.eval.max_new_tokens, cfg.eval.batch_size)
        fn = METRICS[metrics[task]]
        scores = [fn(g, r["response"]) for g, r in zip(gens, records)]
        result[task] = {"loss": loss, "score": sum(scores) / len(scores), "metric": metrics[task], "n": len(records)}
        samples += [{"task": task, "prompt": r["prompt"][:300], "reference": r["response"], "generation": g,
                     "score": round(s, 3)} for r, g, s in zip(records[:3], gens[:3], scores[:3])]
    mean = sum(v["score"] for v in result.values()) / len(result)
    return {"tasks": result, "mean_score": mean}, samples
