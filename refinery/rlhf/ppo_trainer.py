"""The PPO loop: rollout -> score -> per-token KL penalty -> GAE -> several clipped epochs over mini-batches.

Resumable: every `save_steps` a checkpoint (trainable policy and value weights as safetensors, optimiser
states, KL controller, score normaliser, prompt-order and torch RNG states, metric history) is written to a
temporary folder and renamed into place, the last `keep_checkpoints` kept. A rerun continues from the next
step: no step is repeated or lost.

On several processes (torchrun, `nproc_per_node` in params/ppo.yaml) each rank samples and scores its share of
the step's prompts and the update is shared (refinery/rlhf/ppo_distributed.py); rank 0 records and saves.
Mini-batches are drawn from a generator seeded by (seed, step), the same on every rank and in a resumed run.
"""
from __future__ import annotations

import json
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

from refinery.config import PPOParams
from refinery.modeling.attention import left_padded_attention
from refinery.modeling.loading import unwrapped
from refinery.ops.host_memory import release_freed_memory
from refinery.rlhf.ppo_distributed import Ranks
from refinery.rlhf.ppo_math import (
    clipped_policy_loss,
    clipped_value_loss,
    explained_variance,
    gae_advantages,
    kl_per_token,
    make_kl_controller,
    masked_mean,
    masked_whiten,
    per_token_rewards,
)
from refinery.rlhf.rollout import Rollout, policy_stats, sample, values
from refinery.rlhf.value_head import TrunkValueHead, trunk_stats
from refinery.train.reward_model import padding_free_on

RewardFn = Callable[[list[int], Rollout], torch.Tensor]  # (prompt indices, rollout) -> raw scores [B]


@dataclass
class PPOState:
    step: int = 0
    history: list[dict] = field(default_factory=list)
    # one [step, prompt index, RM score] per episode: the training-reward trend within each prompt
    episodes: list[list] = field(default_factory=list)


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().contiguous().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model, tensors: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    missing = [n for n in tensors if n not in params]
    if missing:
        raise ValueError(f"checkpoint does not match the model (e.g. '{missing[0]}')")
    with torch.no_grad():
        for n, t in tensors.items():
            params[n].copy_(t)


def disable_dropout(*models) -> None:
    """Dropout off in every PPO model (as TRL's PPO did): log-probs, values and KL must be those of the
    policy that sampled, not of a random sub-network; LoRA's own dropout included."""
    for model in models:
        if model is None:
            continue
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
            # attention dropout is functional (F.scaled_dot_product_attention's dropout_p), read from the
            # attention module's attribute, which it copied from the config at build time
            if isinstance(getattr(module, "attention_dropout", None), float):
                module.attention_dropout = 0.0
            config = getattr(module, "config", None)
            for key in ("attention_dropout", "hidden_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop"):
                if isinstance(getattr(config, key, None), float):
                    setattr(config, key, 0.0)


@dataclass
class ScoreScale:
    """One affine map for reward-model scores and for the value model's outputs: score' = (score - bias) /
    gain, fixed on the first step's rollouts of the (still SFT) policy. The value model starts as the reward
    model, so it predicts raw scores; putting both through the same map keeps values and returns on one scale
    (a raw-scale value bias against normalised returns makes the whitened advantage depend on the position,
    not on the score). Identity when `normalize_scores` is off."""

    bias: float = 0.0
    gain: float = 1.0
    fitted: bool = False

    def fit(self, raw: torch.Tensor) -> None:
        self.bias = float(raw.mean())
        self.gain = max(float(raw.std()), 1e-6) if raw.numel() > 1 else 1.0
        self.fitted = True

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.bias) / self.gain


class PPOTrainer:
    def __init__(self, cfg: PPOParams, policy, value_model, reward_fn: RewardFn, prompts: list[list[int]],
                 tokenizer, ckpt_dir: Path, seed: int, ref_model=None, record=None, progress=None,
                 on_step: Callable[[int, dict, Rollout], None] | None = None, ranks: Ranks | None = None):
        self.cfg, self.policy, self.value_model, self.reward_fn = cfg, policy, value_model, reward_fn
        # a head on the policy's trunk (value_head.py): values come from the policy's own forward
        self.shared_trunk = isinstance(value_model, TrunkValueHead)
        self.prompts, self.tokenizer, self.ckpt_dir = prompts, tokenizer, Path(ckpt_dir)
        self.ref_model, self.record, self.progress, self.on_step = ref_model, record, progress, on_step
        self.pad, self.eos = tokenizer.pad_token_id, tokenizer.eos_token_id
        self.kl_ctl = make_kl_controller(cfg.kl_controller, cfg.init_kl_coef, cfg.target_kl, cfg.kl_horizon)
        self.scale = ScoreScale()
        disable_dropout(policy, value_model, ref_model)
        self.opt_policy = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=cfg.lr)
        self.opt_value = torch.optim.AdamW([p for p in value_model.parameters() if p.requires_grad], lr=cfg.value_lr)
        self.ranks = ranks or Ranks()
        if self.ranks.world > 1 and cfg.mini_batch_size % self.ranks.world:
            raise ValueError(f"mini_batch_size {cfg.mini_batch_size} is not a multiple of nproc_per_node {self.ranks.world}")
        self.seed = seed
        attn = getattr(getattr(unwrapped(policy), "config", None), "_attn_implementation", None)
        self.padding_free = padding_free_on(cfg.padding_free, attn)
        self.order_rng = random.Random(seed)  # the prompt order: the same on every rank
        torch.manual_seed(seed + self.ranks.rank)  # sampling: each rank draws its own answers
        self.state = PPOState()
        self.resumed_from: int | None = None  # the checkpoint step a resumed run started from
        self._order: list[int] = []

    # ---- the reference policy: the adapter switched off (weights held once), or a frozen copy ------
    def ref_logprobs(self, r: Rollout) -> torch.Tensor:
        if self.ref_model is not None:
            return policy_stats(self.ref_model, r, self.cfg.temperature)[0]
        with self.policy.disable_adapter():
            return policy_stats(self.policy, r, self.cfg.temperature)[0]

    def scoring_stats(self, r: Rollout) -> tuple[torch.Tensor, torch.Tensor]:
        """The sampling policy's log-probs and the raw values of a rollout: one forward with a trunk head."""
        if self.shared_trunk:
            logprobs, _, raw_values = trunk_stats(self.policy, self.value_model, r, self.cfg.temperature)
            return logprobs, raw_values
        return policy_stats(self.policy, r, self.cfg.temperature)[0], values(self.value_model, r)

    def scaled(self, v: torch.Tensor) -> torch.Tensor:
        return self.scale(v) if self.cfg.normalize_scores else v

    def next_prompts(self) -> list[int]:
        out = []
        while len(out) < self.cfg.batch_size:
            if not self._order:
                self._order = self.order_rng.sample(range(len(self.prompts)), len(self.prompts))
            out.append(self._order.pop())
        return out

    def shape_scores(self, raw: torch.Tensor, r: Rollout) -> torch.Tensor:
        scores = raw.clone()
        if self.cfg.missing_eos_penalty is not None:
            scores = scores - self.cfg.missing_eos_penalty * (~r.has_eos).float()
        if self.cfg.normalize_scores:
            scores = self.scale(scores)
        if self.cfg.reward_clip is not None:
            scores = scores.clamp(-self.cfg.reward_clip, self.cfg.reward_clip)
        return scores

    # ---- one PPO step ------------------------------------------------------------------------------
    def step(self) -> dict:
        cfg, t0 = self.cfg, time.perf_counter()
        idx = self.next_prompts()  # the whole step's prompts; this rank samples and scores its share
        mine = self.ranks.share(idx)
        r = sample(self.policy, [self.prompts[i] for i in mine], self.pad, self.eos, cfg.max_new_tokens,
                   cfg.temperature, cfg.top_k, cfg.top_p)
        r.padding_free = self.padding_free  # how every forward of this step reads the rollout
        with torch.no_grad():
            old_logprobs, raw_values = self.scoring_stats(r)
            ref_logprobs = self.ref_logprobs(r)
            raw = self.reward_fn(mine, r).float()
        r, (old_logprobs, ref_logprobs, raw_values), (raw,) = self.ranks.gather_rollout(
            r, self.pad, [old_logprobs, ref_logprobs, raw_values], [raw])
        mask = r.response_mask.float()
        if cfg.normalize_scores and not self.scale.fitted:
            self.scale.fit(raw)  # on the whole step's scores: one normaliser on every rank
        old_values = self.scaled(raw_values)
        scores = self.shape_scores(raw, r)
        kl = kl_per_token(old_logprobs, ref_logprobs, cfg.kl_estimator)
        rewards, non_score = per_token_rewards(scores, kl, self.kl_ctl.value, mask)
        if cfg.whiten_rewards:
            rewards = masked_whiten(rewards, mask, shift_mean=False)
        adv, returns = gae_advantages(rewards, old_values, mask, cfg.gamma, cfg.lam)
        adv = masked_whiten(adv, mask)

        stats: dict[str, list[float]] = {k: [] for k in ("policy_loss", "value_loss", "clip_fraction",
                                                         "value_clip_fraction", "approx_kl", "entropy")}
        self.policy.train()
        self.value_model.train()
        n = len(idx)
        order = torch.Generator().manual_seed(self.seed * 1_000_003 + self.state.step)
        trained = [[p for g in opt.param_groups for p in g["params"]] for opt in (self.opt_policy, self.opt_value)]
        for _ in range(cfg.ppo_epochs):
            perm = torch.randperm(n, generator=order)
            for start in range(0, n, cfg.mini_batch_size):
                whole = perm[start:start + cfg.mini_batch_size]
                mb = self.ranks.mini_batch_share(whole)
                sub, m = r.select(mb), mask[mb]
                # this rank's share of the mini-batch's response tokens: the losses are token means, so the
                # ranks' weighted means, averaged, are the mean over the whole mini-batch (one rank: exactly 1)
                share = float(m.sum() / mask[whole].sum())
                self.opt_policy.zero_grad()
                self.opt_value.zero_grad()
                # the loss is pg_loss + vf_coef * vf_loss. Two models: its two terms are backpropagated one after
                # the other (gradients accumulate, so they are the sum's), so only one model's activations are
                # held at a time. A trunk head: one forward and one backward of the sum.
                weight = share * self.ranks.world
                if self.shared_trunk:
                    logprobs, entropy, raw_v = trunk_stats(self.policy, self.value_model, sub, cfg.temperature)
                else:
                    logprobs, entropy = policy_stats(self.policy, sub, cfg.temperature)
                pg_loss, clipfrac, approx_kl = clipped_policy_loss(logprobs, old_logprobs[mb], adv[mb], m,
                                                                   cfg.clip_range)
                if not self.shared_trunk:  # the policy's term now, before the value model's forward
                    (pg_loss * weight).backward()
                    raw_v = values(self.value_model, sub)
                vf_loss, vf_clipfrac = clipped_value_loss(self.scaled(raw_v), old_values[mb], returns[mb], m,
                                                          cfg.clip_range_value)
                value_term = cfg.vf_coef * vf_loss
                ((pg_loss + value_term if self.shared_trunk else value_term) * weight).backward()
                for opt, params in zip((self.opt_policy, self.opt_value), trained):
                    self.ranks.average_gradients(params)
                    torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                    opt.step()
                values_now = [float(v.detach()) if torch.is_tensor(v) else float(v) for v in
                              (pg_loss, vf_loss, clipfrac, vf_clipfrac, approx_kl, masked_mean(entropy, m))]
                values_now = self.ranks.sum([v * share for v in values_now], mask.device)
                for k, v in zip(stats, values_now):
                    stats[k].append(v)
        seq_kl = float((kl * mask).sum(-1).mean())
        self.kl_ctl.update(seq_kl, n)
        seconds = time.perf_counter() - t0
        generated = int(mask.sum())
        metrics = {
            "reward_mean": float(raw.mean()), "reward_std": float(raw.std()) if n > 1 else 0.0,
            "score_shaped_mean": float(scores.mean()), "kl": seq_kl, "kl_coef": float(self.kl_ctl.value),
            "non_score_reward": float((non_score * mask).sum(-1).mean()),
            **{k: sum(v) / len(v) for k, v in stats.items()},
            "explained_variance": explained_variance(old_values, returns, mask),
            "response_length": float(mask.sum(-1).mean()), "eos_fraction": float(r.has_eos.float().mean()),
            "episodes_per_second": n / seconds, "tokens_per_second": generated / seconds, "seconds": seconds,
        }
        self.state.step += 1
        metrics["step"] = self.state.step
        self.state.history.append(metrics)
        self.state.episodes += [[self.state.step, int(i), float(s)] for i, s in zip(idx, raw.tolist())]
        if self.record is not None:
            self.record.log_step(self.state.step, metrics)
        if self.on_step is not None:
            self.on_step(self.state.step, metrics, r)
        return metrics

    def train(self) -> PPOState:
        from tqdm.auto import tqdm

        self.resume()
        bar = tqdm(total=self.cfg.steps, initial=self.state.step, desc="ppo", unit="step",
                   disable=not self.ranks.is_main)
        while self.state.step < self.cfg.steps:
            with left_padded_attention():  # every forward of a step runs on left-padded rollouts
                m = self.step()
            bar.update(1)
            bar.set_postfix(reward=f"{m['reward_mean']:.3f}", kl=f"{m['kl']:.3f}")
            if self.progress is not None:
                self.progress(self.state.step, self.cfg.steps)
            if self.state.step % self.cfg.save_steps == 0 or self.state.step == self.cfg.steps:
                self.save_checkpoint()
            release_freed_memory()  # the step's rollout-sized blocks back to the OS (ops/host_memory.py)
        bar.close()
        self.ranks.close()
        return self.state

    # ---- checkpoints -------------------------------------------------------------------------------
    def save_checkpoint(self) -> Path | None:
        """Written by rank 0 (weights and optimiser states are the same on every rank), with every rank's RNG."""
        rngs = self.ranks.gather_objects(_rng_states())  # a collective: every rank takes part
        final = self.ckpt_dir / f"step-{self.state.step}"
        if not self.ranks.is_main:
            return None
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.ckpt_dir / f".tmp-step-{self.state.step}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_file(trainable_state(self.policy), tmp / "policy.safetensors")
        save_file(trainable_state(self.value_model), tmp / "value.safetensors")
        # rank 0's keys as a one-process run names them; rank k's with a `_rank{k}` suffix
        save_file({(key if k == 0 else f"{key}_rank{k}"): t for k, states in enumerate(rngs) for key, t in states.items()},
                  tmp / "rng.safetensors")
        torch.save({"policy": self.opt_policy.state_dict(), "value": self.opt_value.state_dict()}, tmp / "optim.pt")
        state = {"step": self.state.step, "history": self.state.history, "episodes": self.state.episodes,
                 "kl_controller": self.kl_ctl.state_dict(),
                 "score_scale": {"bias": self.scale.bias, "gain": self.scale.gain, "fitted": self.scale.fitted},
                 "order": self._order,
                 "order_rng": _rng_to_json(self.order_rng.getstate())}
        (tmp / "state.json").write_text(json.dumps(state))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)  # the checkpoint exists only once complete
        for old in sorted(self._checkpoints())[:-self.cfg.keep_checkpoints]:
            shutil.rmtree(old[1], ignore_errors=True)
        return final

    def _checkpoints(self) -> list[tuple[int, Path]]:
        if not self.ckpt_dir.is_dir():
            return []
        return [(int(p.name.split("-")[1]), p) for p in self.ckpt_dir.iterdir()
                if p.name.startswith("step-") and (p / "state.json").is_file()]

    def resume(self) -> int | None:
        found = sorted(self._checkpoints())
        if not found:
            return None
        step, path = found[-1]
        load_trainable_state(self.policy, load_file(path / "policy.safetensors"))
        load_trainable_state(self.value_model, load_file(path / "value.safetensors"))
        optim = torch.load(path / "optim.pt", weights_only=True)  # our own file; tensors and plain types only
        self.opt_policy.load_state_dict(optim["policy"])
        self.opt_value.load_state_dict(optim["value"])
        rng = load_file(path / "rng.safetensors")
        suffix = f"_rank{self.ranks.rank}" if self.ranks.rank else ""
        mine = ({k.removesuffix(suffix): t for k, t in rng.items() if k.endswith(suffix)} if suffix
                else {k: t for k, t in rng.items() if "_rank" not in k})
        torch.set_rng_state(mine["torch_rng"])
        cuda_states = [mine[k] for k in sorted((k for k in mine if k.startswith("cuda_rng_")), key=lambda k: int(k[9:]))]
        if cuda_states and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(cuda_states)
        state = json.loads((path / "state.json").read_text())
        self.state = PPOState(step=state["step"], history=state["history"], episodes=state.get("episodes", []))
        self.kl_ctl.load_state_dict(state["kl_controller"])
        self.scale = ScoreScale(**state["score_scale"])
        self._order = state["order"]
        self.order_rng.setstate(_rng_from_json(state["order_rng"]))
        self.resumed_from = step
        return step


def _rng_states() -> dict[str, torch.Tensor]:
    """This process's torch RNG states (sampling on the GPU draws from the CUDA generators)."""
    rng = {"torch_rng": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng.update({f"cuda_rng_{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return rng


def _rng_to_json(state) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _rng_from_json(data) -> tuple:
    version, internal, gauss = data
    return version, tuple(internal), gauss


def ppo_train_block(trainer: PPOTrainer, init_from: str, trainable: int, total: int, peak_memory_mb: float) -> dict:
    """The `train` block of metrics/ppo.json from the trainer's history; rates averaged over the steps this
    process ran (a resumed run's earlier steps were timed by another process)."""
    h, cfg = trainer.state.history, trainer.cfg
    ran = [x for x in h if x["step"] > (trainer.resumed_from or 0)]
    mean = lambda key: sum(x[key] for x in ran) / max(len(ran), 1)  # noqa: E731
    return {"method": cfg.method, "init_from": init_from, "steps": trainer.state.step,
            "reward_first": h[0]["reward_mean"], "reward_last": h[-1]["reward_mean"],
            "reward_last3_mean": sum(x["reward_mean"] for x in h[-3:]) / len(h[-3:]),
            "kl_last": h[-1]["kl"], "kl_coef_last": h[-1]["kl_coef"], "target_kl": cfg.target_kl,
            # one step's KL is the mean of batch_size sequences: the last quarter of the run is what the
            # controller is judged on
            "kl_last_quarter_mean": sum(x["kl"] for x in h[-max(1, len(h) // 4):]) / max(1, len(h) // 4),
            "episodes_per_second": mean("episodes_per_second"), "tokens_per_second": mean("tokens_per_second"),
            "seconds": round(sum(x["seconds"] for x in ran), 2),  # this process's training steps
            "peak_memory_mb": round(peak_memory_mb, 1), "trainable_params": trainable,
            "trainable_percent": round(100 * trainable / total, 4), "resumed_from_step": trainer.resumed_from}
