"""Training prompts for the stages that sample their own answers (ppo, grpo), from one or more prepared splits
(`prompt_sources` in params/ppo.yaml and params/grpo.yaml):

- `prompts`: data/prepared/prompts/train.jsonl (the prompt split; its validation half is the held-out set);
- `preferences`: the prompts of data/prepared/preferences/train.jsonl, the pairs the reward model learned from
  (their answers are not used).

Why a second source: the demo's prompt split holds 50 training prompts, 39 of them within max_prompt_tokens, and
a PPO run revisits each of them many times (48 steps of 8: ~10 visits). Measured on the demo's SFT and reward
models (README "PPO prompts"): with those 39, 48 steps raised the training reward but the held-out win rate fell
to 0.549 [0.497, 0.601]; with the 303 preference prompts added it was 0.604 [0.536, 0.673]. Taking RL prompts
from the preference data is common practice (InstructGPT's PPO prompts and comparison data came from one
distribution; OpenRLHF's --prompt_data takes several datasets).

Kept out: a prompt that is also in prompts/validation.jsonl (the held-out evaluation stays on prompts the policy
never trained on) and a prompt already taken from an earlier source (duplicates would weigh it twice).
"""
from __future__ import annotations

import json
from pathlib import Path

from refinery.data.records import read_jsonl
from refinery.errors import UserError


def _key(prompt) -> str:
    """A prompt as a comparable string: plain text, or a conversation (a list of messages) as sorted JSON."""
    return prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True)


def source_dirs(data_dir: str | Path, sources) -> dict[str, str]:
    """Source name -> the prepared folder it reads (the stage's inputs: hashed into its manifest and checkpoint
    key, so adding a source is a different run)."""
    return {source: str(Path(data_dir) / source) for source in sources}


def training_prompts(data_dir: str | Path, sources, held_out: list[dict]) -> list[dict]:
    """The training prompt records of `sources`, in source order then file order: {"id", "prompt", "task" (when
    the record has one), "source"} (a `prompts` record keeps its other fields too)."""
    held = {_key(r["prompt"]) for r in held_out}
    seen: set[str] = set()
    out = []
    for source in sources:
        for _, r in read_jsonl(Path(data_dir) / source / "train.jsonl"):
            key = _key(r["prompt"])
            if key in held or key in seen:
                continue
            seen.add(key)
            if source == "prompts":
                out.append({**r, "source": source})
            else:
                out.append({**{k: r[k] for k in ("id", "task") if k in r}, "prompt": r["prompt"], "source": source})
    return out


def none_within(data_dir: str | Path, sources, max_prompt_tokens: int) -> UserError:
    """The refusal when no training prompt of `sources` fits max_prompt_tokens (ppo and grpo say the same)."""
    return UserError(f"{data_dir}/{{{','.join(sources)}}}/train.jsonl: no prompt within "
                     f"max_prompt_tokens={max_prompt_tokens}")
