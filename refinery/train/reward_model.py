"""Reward model: a scalar head on the SFT model (LlamaForSequenceClassification, num_labels=1), trained
with the Bradley-Terry loss on preference pairs. The same head scores PPO's responses and initialises
PPO's value model (as InstructGPT and DeepSpeed-Chat do).

The text scored is the chat-rendered conversation (user prompt + assistant answer, end-of-turn
included); the head reads the last non-padding token. Plain `transformers` loads and scores it:
    AutoModelForSequenceClassification.from_pretrained("models/reward")(**tok(text)).logits[0, 0]
"""
from __future__ import annotations

import math
import random
import sys

import torch
import torch.nn.functional as F
from transformers import Trainer

from refinery.data.chat import conversation_ids
from refinery.data.packing import pad_with_mask
from refinery.modeling.loading import load_scalar_model, unwrapped


def render(tokenizer, prompt: str | list[dict], answer: str, max_length: int) -> list[int]:
    ids = conversation_ids(tokenizer, prompt, answer)
    return ids[-max_length:]  # keep the answer end: the head reads the last token


def pair_rows(tokenizer, records: list[dict], max_length: int) -> list[dict]:
    return [{"chosen": render(tokenizer, r["prompt"], r["chosen"], max_length),
             "rejected": render(tokenizer, r["prompt"], r["rejected"], max_length),
             "task": r.get("task", "")} for r in records]


def weight_tasks(rows: list[dict], weights: dict[str, float], seed: int, source: str) -> list[dict]:
    """The training pairs with each task's pairs repeated `weights[task]` times (a fractional part: that share
    of its pairs once more, drawn with `seed`), grouped by task (the trainer's sampler shuffles them), so training
    sees the task that often. A weight naming no task in the data is ignored with a warning naming the params file and
    field, not refused: the demo's params weight `which_module`, which a user's own preference data need not have."""
    tasks = {r["task"] for r in rows}
    for task in sorted(set(weights) - tasks):
        print(f"warning: {source}: task_weights.{task}: no training pair has task '{task}' (tasks: "
              f"{', '.join(sorted(t or '(none)' for t in tasks))}); this weight does nothing", file=sys.stderr)
    if not set(weights) & tasks:
        return rows
    rng = random.Random(seed)
    out: list[dict] = []
    for task in sorted(tasks):
        mine = [r for r in rows if r["task"] == task]
        w = weights.get(task, 1.0)
        whole, frac = int(w), w - int(w)
        out += mine * whole + rng.sample(mine, round(frac * len(mine)))
    return out


def pad_batch(seqs: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    ids, mask = pad_with_mask(seqs, pad_id)
    return {"input_ids": ids, "attention_mask": mask}


class PairCollator:
    """Chosen answers first, then rejected ones, in one padded batch of 2B rows."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, features: list[dict]) -> dict:
        return pad_batch([f["chosen"] for f in features] + [f["rejected"] for f in features], self.pad_id)


class FlatPairCollator:
    """Padding-free pairs (`padding_free: true` in params/reward.yaml): the batch's chosen sequences, then its
    rejected ones, joined into one row with positions restarting at 0 per sequence (transformers turns the
    restarts into a block-diagonal causal mask, as for FlatCollator's rows), and `score_index`: where each
    sequence ends, the token its score is read at (chosen ones first, as PairCollator orders its rows). Same
    scores, loss and gradients as PairCollator's padded batch (tests/test_reward_padding_free.py), no padding
    position computed. Like FlatCollator it pays with a varlen attention kernel (flash_attention_2); under sdpa
    the mask spans the whole joined row.

    `shared_prefix` (params/reward.yaml `share_prompts`; the row must run under `segment_sdpa`, which reads it:
    `pair_attention`): each pair's tokens common to both sequences (the chat-rendered prompt) are computed once.
    The pair is laid out as the
    chosen sequence, then the rejected one's tokens after the common prefix with positions continuing from it: a
    branch the kernel attends to that prefix and to itself. Under causal attention a prefix token's hidden states
    never depend on what follows it, so the scores, loss and gradients are the unshared row's (the prefix's
    gradients arrive from both answers at once). The demo's pairs are 46% shared prompt tokens. No library does
    this for reward models (TRL's RewardTrainer pads each pair's sequences separately), hence by hand."""

    def __init__(self, shared_prefix: bool = False):
        self.shared_prefix = shared_prefix

    def __call__(self, features: list[dict]) -> dict:
        ids: list[int] = []
        positions: list[int] = []
        ends: dict[str, list[int]] = {"chosen": [], "rejected": []}

        def add(seq: list[int], start: int, side: str) -> None:  # seq[start:] at positions start, start + 1, ...
            ids.extend(seq[start:])
            positions.extend(range(start, len(seq)))
            ends[side].append(len(ids) - 1)

        if self.shared_prefix:  # per pair: chosen, then rejected as a branch after their common prefix
            for f in features:
                add(f["chosen"], 0, "chosen")
                add(f["rejected"], common_prefix_length(f["chosen"], f["rejected"]), "rejected")
        else:  # every chosen sequence, then every rejected one
            for side in ("chosen", "rejected"):
                for f in features:
                    add(f[side], 0, side)
        # the pairs' own tokens (the row's, plus each shared prefix once more): what tokens/s counts, as a padded
        # batch counts its non-padding tokens, so the rate compares across settings and with TRL
        return {"input_ids": torch.tensor([ids]), "position_ids": torch.tensor([positions]),
                "score_index": torch.tensor(ends["chosen"] + ends["rejected"]),
                "pair_tokens": torch.tensor(sum(len(f["chosen"]) + len(f["rejected"]) for f in features))}


def common_prefix_length(a: list[int], b: list[int]) -> int:
    """Tokens two sequences share from their start, leaving each at least its last token (the one scored)."""
    limit = min(len(a), len(b)) - 1
    n = 0
    while n < limit and a[n] == b[n]:
        n += 1
    return n


def padding_free_on(setting: bool | str, attn_implementation: str | None) -> bool:
    """`padding_free: auto` resolved where it was measured (bench/RESULTS-padding-free.md, by bench/padding_free_bench.py): on a
    CPU the padding saved is compute saved, and the demo's pairs padded are 43% padding (which_module pairs are a
    few dozen tokens, summaries hundreds), so the joined row trains 1.34x faster in bf16 although its mask spans
    the whole row; with flash_attention_2 the restarts give a varlen kernel (no whole-row attention at all); on a
    GPU under sdpa/eager the whole-row attention costs more than the padding (bench/RESULTS-gpu.md: TRL's flattened
    SFT rows spent 3.7x our attention time). SFT's packed rows are 7% padding: padding-free measured 0.90x on the
    CPU, so dapt and sft keep a plain true/false, off by default."""
    if setting != "auto":
        return bool(setting)
    return attn_implementation == "flash_attention_2" or not torch.cuda.is_available()


def pair_attention(share_prompts: bool, attn_implementation: str | None) -> str | None:
    """The attention kernel the reward stage loads its model with: `segment_sdpa` when pairs share their prompts
    (params/reward.yaml `share_prompts`: the kernel that reads a branch; refused in one line with a kernel of
    another family), else params/base.yaml's. Only this stage's model: PPO's joined rollouts are short and
    measured slower per sequence (README "Padding-free pairs"); the kernel's name never reaches the saved config."""
    if not share_prompts:
        return attn_implementation
    if attn_implementation not in (None, "sdpa", "segment_sdpa"):
        from refinery.errors import UserError

        raise UserError(f"params/reward.yaml: share_prompts: true needs params/base.yaml attn_implementation null, "
                        f"sdpa or segment_sdpa (the branches it makes are read by segment_sdpa), not "
                        f"{attn_implementation}")
    return "segment_sdpa"


def pair_layout(share_prompts: bool, padding_free: bool | str, attn_implementation: str | None
                ) -> tuple[bool, str | None]:
    """(joined pairs?, the attention kernel to load the model with) for params/reward.yaml's `share_prompts` and
    `padding_free` and params/base.yaml's kernel: what the stage and bench/bench.py's reward cases train with.
    Shared prompts are always joined."""
    return share_prompts or padding_free_on(padding_free, attn_implementation), \
        pair_attention(share_prompts, attn_implementation)


def pair_collator(padding_free: bool, pad_id: int, share_prompts: bool = False):
    """The reward stage's training (and validation-loss) collator: padded pairs, joined pairs, or joined pairs
    sharing their prompts (`share_prompts`, for a model loaded with `pair_attention`'s segment_sdpa)."""
    if share_prompts:
        return FlatPairCollator(shared_prefix=True)
    return FlatPairCollator() if padding_free else PairCollator(pad_id)


def scalar_head(model):
    """The per-position scalar head (`score`) of a *ForSequenceClassification model, inside DDP/FSDP (`module`)
    and peft wrappers (a ModulesToSaveWrapper's output is its trained copy's); None when the model has none."""
    return getattr(unwrapped(getattr(model, "module", model)), "score", None)


def sequence_scores(model, inputs: dict) -> torch.Tensor:
    """One score per sequence of a PairCollator or FlatPairCollator batch. A joined row's scores are read from the
    head's per-position output (a forward hook) at `score_index`: the model's own pooling takes one position per
    row. The forward still goes through the (DDP/peft-wrapped) model, so its gradient hooks run as usual."""
    if "score_index" not in inputs:
        return model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits.squeeze(-1)
    seen: list[torch.Tensor] = []
    handle = scalar_head(model).register_forward_hook(lambda _module, _args, out: seen.append(out))
    try:  # use_cache off: a KV cache would turn off the block-diagonal mask the position restarts mark
        model(input_ids=inputs["input_ids"], position_ids=inputs["position_ids"], use_cache=False)
    finally:
        handle.remove()
    return seen[-1][0, inputs["score_index"], 0]


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor, margin: float = 0.0) -> torch.Tensor:
    return -F.logsigmoid(r_chosen - r_rejected - margin).mean()


class BradleyTerryTrainer(Trainer):
    def __init__(self, *args, margin: float = 0.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.margin = margin

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        rewards = sequence_scores(model, inputs)
        r_chosen, r_rejected = rewards.chunk(2)
        loss = bradley_terry_loss(r_chosen, r_rejected, self.margin)
        return (loss, {"rewards": rewards}) if return_outputs else loss

    def _track_num_input_tokens(self, inputs):
        """A joined row counts its pairs' tokens (`pair_tokens`: a shared prompt twice, as the padded batch counts
        it), not the fewer positions it computes. Trainer's own counter reads only input_ids or attention_mask."""
        if "pair_tokens" not in inputs or self.args.include_num_input_tokens_seen == "no":
            return super()._track_num_input_tokens(inputs)
        tokens = torch.as_tensor(inputs["pair_tokens"], device=self.args.device, dtype=torch.int64)
        self.state.num_input_tokens_seen += self.accelerator.gather(tokens).sum().item()

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Validation loss = the Bradley-Terry loss on held-out pairs (the batches carry no `labels`, so
        Trainer's default would compute no loss)."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None


def init_reward_model(sft_dir, pad_token_id: int, seed: int, trust_remote_code: bool = False, method=None,
                      attn_implementation: str | None = None):
    """A scalar-head model on the SFT weights (4-bit base when `method` is qlora); the new head seeded."""
    torch.manual_seed(seed)  # the new head's init
    model = load_scalar_model(sft_dir, trust_remote_code, method, attn_implementation, num_labels=1)
    model.config.pad_token_id = pad_token_id
    return model


@torch.no_grad()
def score(model, seqs: list[list[int]], pad_id: int, batch_size: int = 8) -> list[float]:
    model.eval()
    out: list[float] = []
    for i in range(0, len(seqs), batch_size):
        batch = {k: v.to(model.device) for k, v in pad_batch(seqs[i:i + batch_size], pad_id).items()}
        out += model(**batch).logits[:, 0].float().tolist()
    return out


def evaluate_pairs(model, rows: list[dict], pad_id: int, batch_size: int, buckets: int) -> tuple[dict, list[float]]:
    """(accuracy, mean margin, accuracy per task, and calibration: accuracy by |margin| quantile bucket (a
    calibrated model is more often right when it is more confident); 1.0/0.0 per pair, for paired tests)."""
    rc = score(model, [r["chosen"] for r in rows], pad_id, batch_size)
    rr = score(model, [r["rejected"] for r in rows], pad_id, batch_size)
    margins = [c - r for c, r in zip(rc, rr)]
    correct = [m > 0 for m in margins]
    order = sorted(range(len(margins)), key=lambda i: abs(margins[i]))
    size = math.ceil(len(order) / buckets)
    calibration = []
    for b in range(buckets):
        idx = order[b * size:(b + 1) * size]
        if idx:
            calibration.append({"bucket": b, "abs_margin_min": round(abs(margins[idx[0]]), 4),
                                "abs_margin_max": round(abs(margins[idx[-1]]), 4), "n": len(idx),
                                "accuracy": sum(correct[i] for i in idx) / len(idx)})
    by_task: dict[str, list[bool]] = {}
    for r, c in zip(rows, correct):
        by_task.setdefault(r["task"] or "all", []).append(c)
    return {"accuracy": sum(correct) / len(correct), "margin": sum(margins) / len(margins),
            "n": len(rows), "calibration": calibration,
            "accuracy_by_task": {t: sum(v) / len(v) for t, v in sorted(by_task.items())}}, [float(c) for c in correct]
