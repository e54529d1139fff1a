"""PPO rollouts: sample responses, and the per-token log-probs / values aligned with them.

Layout of a rollout batch: prompts left-padded to width P, responses right-padded to width R, so
`sequences` is [B, P+R] and response token j sits at column P+j. Everything per-token is [B, R]:
`logprobs[:, j] = log π(token_{P+j} | tokens_<P+j)` comes from the logits at column P+j-1, and the
value of the state before token P+j comes from the hidden state at the same column.

A rollout marked `padding_free` goes through the models without that padding (`flat_inputs`): each row's real
tokens (the prompt without its left padding, the response up to and including its first EOS) joined into one
row, positions restarting per row (transformers turns the restarts into a block-diagonal causal mask, as for
the reward stage's padding-free pairs), and only the response-predicting positions read out, then put back in
the [B, R] layout with 0 where the response mask is 0 (every consumer masks those positions). On the demo's
prompts (50-128 tokens, answers of ~6 of at most 20) a mini-batch padded is ~40% padding.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import GenerationConfig

from refinery.data.packing import pad_with_mask
from refinery.modeling.attention import left_padded_attention
from refinery.modeling.loading import unwrapped
from refinery.rlhf.ppo_math import entropy_from_logits, logprobs_from_logits


@dataclass
class Rollout:
    sequences: torch.Tensor       # [B, P+R]
    attention_mask: torch.Tensor  # [B, P+R]
    response_mask: torch.Tensor   # [B, R] 1 on response tokens up to and including the first EOS
    prompt_width: int
    has_eos: torch.Tensor         # [B] bool
    padding_free: bool = False    # forward passes on the rows' real tokens joined into one row (flat_inputs)

    @property
    def responses(self) -> torch.Tensor:
        return self.sequences[:, self.prompt_width:]

    def position_ids(self) -> torch.Tensor:
        return (self.attention_mask.cumsum(-1) - 1).clamp(min=0)

    def select(self, idx: torch.Tensor) -> "Rollout":
        return Rollout(self.sequences[idx], self.attention_mask[idx], self.response_mask[idx], self.prompt_width,
                       self.has_eos[idx], self.padding_free)


@dataclass
class FlatRollout:
    input_ids: torch.Tensor     # [1, T]: every row's real tokens, row after row
    position_ids: torch.Tensor  # [1, T]: restarting at 0 per row
    predicting: torch.Tensor    # [K]: the flat position whose output predicts each real response token
    keep: torch.Tensor          # [B, R] bool: where those K outputs go back (the response mask)


def flat_inputs(r: Rollout) -> FlatRollout:
    """The rollout without padding. Response token j of row b (column P+j) is predicted by the output at column
    P+j-1: the prompt's last token for j=0 (left padding puts it at column P-1), else the previous response
    token, which is real wherever token j is."""
    real = r.attention_mask.bool()
    flat_pos = torch.full(real.shape, -1, dtype=torch.long, device=real.device)
    flat_pos[real] = torch.arange(int(real.sum()), device=real.device)
    keep = r.response_mask.bool()
    width = keep.shape[1]
    predicting = flat_pos[:, r.prompt_width - 1:r.prompt_width - 1 + width][keep]
    return FlatRollout(r.sequences[real][None], r.position_ids()[real][None], predicting, keep)


def unflatten(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """[K] per-response-token values back to [B, R], 0 outside the response mask (differentiable)."""
    out = x.new_zeros(keep.shape)
    out[keep] = x
    return out


@torch.no_grad()
def sample(policy, prompts: list[list[int]], pad_id: int, eos_id: int, max_new_tokens: int, temperature: float,
           top_k: int, top_p: float, greedy: bool = False) -> Rollout:
    ids, mask = pad_with_mask(prompts, pad_id, side="left")
    device = next(policy.parameters()).device
    ids, mask = ids.to(device), mask.to(device)
    policy.eval()
    with left_padded_attention():
        out = policy.generate(input_ids=ids, attention_mask=mask,
                              generation_config=sampling_config(max_new_tokens, pad_id, eos_id, temperature, top_k,
                                                                top_p, greedy))
    width = ids.shape[1]
    resp = out[:, width:]
    if resp.shape[1] == 0:
        resp = torch.full((out.shape[0], 1), eos_id, device=device)
        out = torch.cat([out, resp], 1)
    is_eos = resp == eos_id
    has_eos = is_eos.any(-1)
    first_eos = torch.where(has_eos, is_eos.float().argmax(-1), torch.full_like(has_eos, resp.shape[1], dtype=torch.long))
    cols = torch.arange(resp.shape[1], device=device)
    response_mask = (cols[None, :] <= first_eos[:, None]).long()
    attention = torch.cat([mask, response_mask], 1)
    seq = out.clone()
    seq[:, width:][response_mask == 0] = pad_id
    return Rollout(seq, attention, response_mask, width, has_eos)


def sampling_config(max_new_tokens: int, pad_id: int, eos_id: int, temperature: float, top_k: int, top_p: float,
                    greedy: bool = False) -> GenerationConfig:
    """The complete generation config of a rollout, built here rather than merged with the model's own
    generation_config.json: a repetition_penalty, min_new_tokens or no_repeat_ngram_size there would change
    the distribution the tokens are drawn from, while PPO scores them under the plain (temperature-scaled)
    policy. So the sampled policy is the scored policy."""
    # transformers fills every field left None from the model's generation_config.json: state each
    # logits processor's neutral value so none can come from there
    neutral = dict(repetition_penalty=1.0, encoder_repetition_penalty=1.0, no_repeat_ngram_size=0,
                   min_new_tokens=0, typical_p=1.0, epsilon_cutoff=0.0, eta_cutoff=0.0, top_k=0, top_p=1.0,
                   temperature=1.0, renormalize_logits=False)
    if not greedy:
        neutral.update(temperature=temperature, top_k=top_k, top_p=top_p)
    return GenerationConfig(max_new_tokens=max_new_tokens, do_sample=not greedy, pad_token_id=pad_id,
                            eos_token_id=eos_id, **neutral)


def response_logits(model, r: Rollout) -> torch.Tensor:
    """Logits that predict each response token: columns P-1 .. P+R-2, shape [B, R, V].

    Only the last R+1 columns go through the LM head (`logits_to_keep`): the prompt's logits are never
    used, and with a 49k vocabulary they were most of PPO's memory (a 128-token prompt and a 20-token answer:
    7x the logits the loss needs)."""
    width = r.sequences.shape[1] - r.prompt_width + 1
    out = model(input_ids=r.sequences, attention_mask=r.attention_mask, position_ids=r.position_ids(),
                use_cache=False, logits_to_keep=width)
    return out.logits[:, -width:-1]


def policy_stats(model, r: Rollout, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probs of the sampled tokens, entropy) under `model`, [B, R] each; logits scaled by the sampling
    temperature so that the old and new policies are the distribution the tokens were drawn from."""
    if r.padding_free:
        f = flat_inputs(r)
        # use_cache off: a KV cache would turn off the block-diagonal mask the position restarts mark
        logits = model(input_ids=f.input_ids, position_ids=f.position_ids, use_cache=False,
                       logits_to_keep=f.predicting).logits[0] / temperature
        return (unflatten(logprobs_from_logits(logits, r.responses[f.keep]), f.keep),
                unflatten(entropy_from_logits(logits), f.keep))
    logits = response_logits(model, r) / temperature
    return logprobs_from_logits(logits, r.responses), entropy_from_logits(logits)


def response_hidden(inner, r: Rollout) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The backbone's last hidden state at the positions that predict the response tokens, and where they go:
    ([K, H], the [B, R] keep mask) for a padding-free rollout (`unflatten` puts per-position outputs back), or
    ([B, R, H], None) for the padded batch. `inner` is the unwrapped model (its `.model` is the backbone)."""
    if r.padding_free:
        f = flat_inputs(r)
        hidden = inner.model(input_ids=f.input_ids, position_ids=f.position_ids, use_cache=False).last_hidden_state
        return hidden[0, f.predicting], f.keep
    hidden = inner.model(input_ids=r.sequences, attention_mask=r.attention_mask, position_ids=r.position_ids(),
                         use_cache=False).last_hidden_state
    return hidden[:, r.prompt_width - 1:-1], None


def values(value_model, r: Rollout) -> torch.Tensor:
    """Per-token values from the value model's backbone + scalar head (the reward model's architecture)."""
    inner = unwrapped(value_model)
    hidden, keep = response_hidden(inner, r)
    v = inner.score(hidden).squeeze(-1).float()
    return v if keep is None else unflatten(v, keep)
