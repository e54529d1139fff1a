"""PPO / RLHF maths as small pure-torch functions.

Everything here is stateless tensor arithmetic (except the KL controllers, which
hold one float), so it can be unit-tested against hand-computed numbers and
reused by the PPO training loop.

Conventions
-----------
* ``mask`` is a float or bool tensor of shape ``(batch, T)`` with 1 on response
  tokens (the tokens the policy generated and is trained on) and 0 on prompt /
  padding positions.  Non-zero entries count as "in the mask"; float masks are
  used as weights by :func:`masked_mean`.
* Per-token tensors (logprobs, values, rewards, advantages, ...) have shape
  ``(batch, T)`` and are aligned with ``mask``.

References
----------
* TRL's original ``PPOTrainer`` / ``trl.core`` (``masked_mean``, ``masked_var``,
  ``masked_whiten``, ``compute_advantages``, ``loss``, ``AdaptiveKLController``),
  removed from TRL in later releases.
* Huang et al., "The 37 Implementation Details of Proximal Policy Optimization"
  (ICLR blog track 2022): GAE, advantage normalisation, clipped value loss,
  approx-KL and clip-fraction diagnostics.
* Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences":
  per-token KL penalty and the adaptive KL controller.
* J. Schulman, "Approximating KL Divergence" (2020 blog post): k1/k2/k3
  estimators.
"""

from __future__ import annotations

from typing import Literal, Protocol

import torch

__all__ = [
    "WHITEN_EPS",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "kl_per_token",
    "per_token_rewards",
    "gae_advantages",
    "clipped_policy_loss",
    "clipped_value_loss",
    "entropy_from_logits",
    "logprobs_from_logits",
    "explained_variance",
    "KLController",
    "AdaptiveKLController",
    "FixedKLController",
    "make_kl_controller",
]

WHITEN_EPS = 1e-8

KLEstimator = Literal["k1", "k2", "k3", "abs"]


# --------------------------------------------------------------------------- #
# masked statistics
# --------------------------------------------------------------------------- #
def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over the positions where ``mask`` is non-zero.

    ``sum(x * mask) / sum(mask)`` (over all elements, or along ``dim``), as in
    TRL's ``masked_mean``.  A float mask acts as weights.  Where the mask sums
    to 0 the result is 0 rather than NaN, so an empty batch does not poison
    the loss.
    """
    m = mask.to(x.dtype)
    if dim is None:
        num = (x * m).sum()
        den = m.sum()
    else:
        num = (x * m).sum(dim=dim)
        den = m.sum(dim=dim)
    safe_den = torch.where(den > 0, den, torch.ones_like(den))
    return torch.where(den > 0, num / safe_den, torch.zeros_like(num))


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of ``x`` over the masked positions (all dims together).

    ``var = masked_mean((x - masked_mean(x))**2)``; with ``unbiased=True`` it is
    multiplied by the Bessel correction ``n / (n - 1)`` where ``n = sum(mask)``
    (TRL's ``masked_var``).  Raises ``ValueError`` on an empty mask.  With a
    single masked element (``n <= 1``) no Bessel correction is possible and the
    (biased, i.e. 0) variance is returned instead of NaN.
    """
    n = mask.to(x.dtype).sum()
    if n.item() == 0:
        raise ValueError("masked_var: mask has no non-zero entries")
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased and n.item() > 1:
        var = var * (n / (n - 1))
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """Normalise ``x`` with the masked mean/variance: ``(x - mu) / sqrt(var + 1e-8)``.

    ``mu`` and the (unbiased) ``var`` use only masked positions, so padding does
    not affect the statistics.  With ``shift_mean=False`` the mean is added back
    (``(x - mu) / sigma + mu``): TRL whitens advantages with ``shift_mean=True``
    and rewards with ``shift_mean=False``.  Positions outside the mask are set
    to 0 in the output (TRL leaves them as garbage; every consumer masks them).
    """
    mean = masked_mean(x, mask)
    var = masked_var(x, mask, unbiased=True)
    whitened = (x - mean) * torch.rsqrt(var + WHITEN_EPS)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask.bool(), whitened, torch.zeros_like(whitened))


# --------------------------------------------------------------------------- #
# KL penalty and rewards
# --------------------------------------------------------------------------- #
def kl_per_token(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    estimator: KLEstimator | str = "k1",
) -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from sampled-token logprobs.

    With ``d = logprobs - ref_logprobs`` (log pi(a) - log pi_ref(a), a ~ pi):

    * ``"k1"``: ``d`` (unbiased, can be negative; TRL's default ``kl_penalty="kl"``)
    * ``"k2"``: ``0.5 * d**2`` (low variance, biased)
    * ``"k3"``: ``exp(-d) - 1 + d`` = ``exp(r) - 1 - r`` with ``r = ref - logp``
      (Schulman's unbiased, always non-negative estimator; computed with
      ``expm1`` for accuracy near 0)
    * ``"abs"``: ``|d|``

    Unknown estimators raise ``ValueError``.
    """
    d = logprobs - ref_logprobs
    if estimator == "k1":
        return d
    if estimator == "k2":
        return 0.5 * d.square()
    if estimator == "k3":
        log_ratio = -d  # ref_logprobs - logprobs
        return torch.expm1(log_ratio) - log_ratio
    if estimator == "abs":
        return d.abs()
    raise ValueError(
        f"unknown KL estimator {estimator!r}; expected one of 'k1', 'k2', 'k3', 'abs'"
    )


def per_token_rewards(
    scores: torch.Tensor,
    kl: torch.Tensor,
    kl_coef: float | torch.Tensor,
    mask: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense per-token rewards for PPO-RLHF (Ziegler et al. 2019; TRL ``compute_rewards``).

    ``non_score_reward[b, t] = -kl_coef * kl[b, t]`` on response tokens (0 elsewhere);
    ``rewards = non_score_reward`` plus ``scores[b]`` (shape ``(batch,)``, the
    reward-model score) added on the LAST position where ``mask[b] != 0``.
    Rows with an empty mask get no score (there is no token to credit).

    Returns ``(rewards, non_score_reward)``, both ``(batch, T)``.
    """
    if scores.dim() != 1 or scores.shape[0] != kl.shape[0]:
        raise ValueError(
            f"scores must have shape (batch,) = ({kl.shape[0]},), got {tuple(scores.shape)}"
        )
    in_mask = mask.bool()
    non_score_reward = torch.where(in_mask, -kl_coef * kl, torch.zeros_like(kl))

    T = kl.shape[1]
    positions = torch.arange(T, device=kl.device).expand_as(in_mask)
    last_idx = torch.where(in_mask, positions, torch.full_like(positions, -1)).amax(dim=1)
    has_response = last_idx >= 0
    score_add = torch.zeros_like(non_score_reward)
    score_add.scatter_(
        1,
        last_idx.clamp(min=0).unsqueeze(1),
        torch.where(has_response, scores.to(kl.dtype), torch.zeros_like(scores, dtype=kl.dtype)).unsqueeze(1),
    )
    rewards = non_score_reward + score_add
    return rewards, non_score_reward


# --------------------------------------------------------------------------- #
# advantages
# --------------------------------------------------------------------------- #
def gae_advantages(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised Advantage Estimation over the response tokens (Schulman et al. 2016).

    Backwards over the masked positions of each row:
    ``delta_t = r_t + gamma * V_next - V_t``,  ``A_t = delta_t + gamma * lam * A_next``,
    where ``next`` is the next masked position; after the last response token
    ``V_next = 0`` and ``A_next = 0`` (the episode ends -- "37 details" #5, TRL
    ``compute_advantages``).  Positions outside the mask contribute nothing:
    their rewards/values are ignored and their advantage (and return) is 0.  A
    hole inside the mask (e.g. masked-out tool output in a multi-turn rollout)
    is skipped over, i.e. the next masked token is the next step.

    Returns ``(advantages, returns)`` with ``returns = advantages + values`` on
    masked positions (0 elsewhere).  Inputs should be detached; this is not meant
    to be differentiated.
    """
    in_mask = mask.bool()
    zeros = torch.zeros_like(rewards)
    r = torch.where(in_mask, rewards, zeros)
    v = torch.where(in_mask, values.to(rewards.dtype), zeros)

    batch, T = rewards.shape
    next_value = rewards.new_zeros(batch)
    next_adv = rewards.new_zeros(batch)
    adv_reversed: list[torch.Tensor] = []
    for t in reversed(range(T)):
        m_t = in_mask[:, t]
        delta = r[:, t] + gamma * next_value - v[:, t]
        a_t = delta + gamma * lam * next_adv
        adv_reversed.append(torch.where(m_t, a_t, torch.zeros_like(a_t)))
        next_adv = torch.where(m_t, a_t, next_adv)
        next_value = torch.where(m_t, v[:, t], next_value)
    advantages = torch.stack(adv_reversed[::-1], dim=1)
    returns = torch.where(in_mask, advantages + v, zeros)
    return advantages, returns


# --------------------------------------------------------------------------- #
# losses
# --------------------------------------------------------------------------- #
def clipped_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO clipped surrogate loss (Schulman et al. 2017; TRL ``PPOTrainer.loss``).

    ``ratio = exp(logprobs - old_logprobs)``;
    ``loss = masked_mean(max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)))``.

    Also returns (detached) diagnostics:
    ``clip_fraction`` = masked mean of ``[-A * clipped > -A * ratio]`` (the
    clipped term was the one chosen, so the token has no gradient), and
    ``approx_kl = masked_mean(0.5 * (logprobs - old_logprobs)**2)`` (k2 estimator,
    "37 details" #12).

    Returns ``(loss, clip_fraction, approx_kl)`` as 0-d tensors.
    """
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    pg_losses = -advantages * ratio
    pg_losses_clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.maximum(pg_losses, pg_losses_clipped), mask)
    with torch.no_grad():
        clip_fraction = masked_mean((pg_losses_clipped > pg_losses).to(pg_losses.dtype), mask)
        approx_kl = masked_mean(0.5 * log_ratio.square(), mask)
    return loss, clip_fraction, approx_kl


def clipped_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range_value: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value-function loss ("37 details" #9; TRL ``PPOTrainer.loss``).

    ``v_clipped = clip(v, old - eps, old + eps)``;
    ``loss = 0.5 * masked_mean(max((v - R)**2, (v_clipped - R)**2))``.

    Returns ``(loss, value_clip_fraction)`` where the clip fraction (detached)
    is the masked mean of ``[(v_clipped - R)**2 > (v - R)**2]``.
    """
    v_clipped = old_values + torch.clamp(values - old_values, -clip_range_value, clip_range_value)
    vf_losses = (values - returns).square()
    vf_losses_clipped = (v_clipped - returns).square()
    loss = 0.5 * masked_mean(torch.maximum(vf_losses, vf_losses_clipped), mask)
    with torch.no_grad():
        clip_fraction = masked_mean((vf_losses_clipped > vf_losses).to(vf_losses.dtype), mask)
    return loss, clip_fraction


# --------------------------------------------------------------------------- #
# logits helpers
# --------------------------------------------------------------------------- #
def _upcast(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of ``softmax(logits)`` over the last dim: ``logsumexp(z) - sum(softmax(z) * z)``.

    (TRL ``entropy_from_logits``.)  Numerically stable for large logits
    (logits are shifted by their max first); ``-inf`` logits (banned tokens)
    contribute 0 instead of NaN.  Half/bf16 inputs are computed and returned in
    float32.  Output shape is ``logits.shape[:-1]``.
    """
    z = _upcast(logits)
    # shift by the max (entropy is shift-invariant) so that logsumexp(z) and
    # sum(p * z) do not cancel catastrophically for large logits
    z_max = z.amax(dim=-1, keepdim=True)
    z = z - torch.where(torch.isfinite(z_max), z_max, torch.zeros_like(z_max))
    p = torch.softmax(z, dim=-1)
    # p == 0 exactly where z == -inf; zero those logits (not the product) so
    # that neither the value nor the gradient becomes 0 * inf = NaN
    z_finite = torch.where(torch.isfinite(z), z, torch.zeros_like(z))
    pz = p * z_finite
    return torch.logsumexp(z, dim=-1) - pz.sum(dim=-1)


def logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``log_softmax(logits)[..., labels]``: log-prob of each label, shape ``labels.shape``.

    Computed as ``gather(z, label) - logsumexp(z)`` to avoid materialising the
    full log-softmax; half/bf16 logits are processed row by row in float32
    (as TRL's ``selective_log_softmax``) and the result is float32.
    """
    idx = labels.long().unsqueeze(-1)
    if logits.dtype in (torch.float16, torch.bfloat16):
        rows = []
        for row_logits, row_idx in zip(logits, idx):
            z = row_logits.float()
            rows.append(z.gather(-1, row_idx).squeeze(-1) - torch.logsumexp(z, dim=-1))
        return torch.stack(rows)
    return logits.gather(-1, idx).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """Explained variance ``1 - Var[R - V] / Var[R]`` over masked positions ("37 details" #11).

    1 means perfect value predictions, 0 means no better than a constant, < 0
    worse than a constant.  Variances are the (biased) masked variances.
    Choice: when ``Var[R] == 0`` (or the mask is empty) the ratio is undefined;
    we return ``0.0`` (rather than NaN as in SB3) so logged metrics stay finite.
    """
    with torch.no_grad():
        if mask.bool().sum().item() == 0:
            return 0.0
        v = _upcast(values.detach())
        r = _upcast(returns.detach()).to(v.dtype)
        var_r = masked_var(r, mask, unbiased=False).item()
        if var_r == 0.0:
            return 0.0
        var_diff = masked_var(r - v, mask, unbiased=False).item()
        return float(1.0 - var_diff / var_r)


# --------------------------------------------------------------------------- #
# KL controllers
# --------------------------------------------------------------------------- #
class KLController(Protocol):
    """Interface shared by the KL-coefficient controllers."""

    value: float

    def update(self, current_kl: float | torch.Tensor, n_steps: int) -> float: ...

    def state_dict(self) -> dict[str, float]: ...

    def load_state_dict(self, state: dict[str, float]) -> None: ...


class AdaptiveKLController:
    """Adaptive KL coefficient (Ziegler et al. 2019, sec. 2.2; TRL ``AdaptiveKLController``).

    ``e = clip(current_kl / target - 1, -0.2, 0.2)``;
    ``value *= 1 + e * n_steps / horizon``.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float) -> None:
        if init_kl_coef < 0:
            raise ValueError(f"init_kl_coef must be >= 0, got {init_kl_coef}")
        if target <= 0:
            raise ValueError(f"target KL must be > 0, got {target}")
        if horizon <= 0:
            raise ValueError(f"horizon must be > 0, got {horizon}")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float | torch.Tensor, n_steps: int) -> float:
        """Update after ``n_steps`` samples with observed KL ``current_kl``; returns the new value."""
        proportional_error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        mult = 1.0 + proportional_error * n_steps / self.horizon
        self.value *= mult
        return self.value

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])
        self.target = float(state.get("target", self.target))
        self.horizon = float(state.get("horizon", self.horizon))

    def __repr__(self) -> str:
        return f"AdaptiveKLController(value={self.value}, target={self.target}, horizon={self.horizon})"


class FixedKLController:
    """Constant KL coefficient; ``update`` is a no-op (TRL ``FixedKLController``)."""

    def __init__(self, kl_coef: float) -> None:
        if kl_coef < 0:
            raise ValueError(f"kl_coef must be >= 0, got {kl_coef}")
        self.value = float(kl_coef)

    def update(self, current_kl: float | torch.Tensor, n_steps: int) -> float:
        """No-op; returns the (unchanged) value."""
        return self.value

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])

    def __repr__(self) -> str:
        return f"FixedKLController(value={self.value})"


def make_kl_controller(
    kind: Literal["adaptive", "fixed"] | str,
    init_kl_coef: float,
    target: float | None = None,
    horizon: float | None = None,
) -> AdaptiveKLController | FixedKLController:
    """Build a KL controller: ``"adaptive"`` (needs ``target`` and ``horizon``) or ``"fixed"``."""
    if kind == "adaptive":
        if target is None or horizon is None:
            raise ValueError("adaptive KL controller needs both target and horizon")
        return AdaptiveKLController(init_kl_coef, target, horizon)
    if kind == "fixed":
        return FixedKLController(init_kl_coef)
    raise ValueError(f"unknown KL controller kind {kind!r}; expected 'adaptive' or 'fixed'")
