"""Tests for refinery/rlhf/ppo_math.py against values computed by hand (arithmetic in comments)."""

from __future__ import annotations

import math

import pytest
import torch

from refinery.rlhf.ppo_math import (
    AdaptiveKLController,
    FixedKLController,
    clipped_policy_loss,
    clipped_value_loss,
    entropy_from_logits,
    explained_variance,
    gae_advantages,
    kl_per_token,
    logprobs_from_logits,
    make_kl_controller,
    masked_mean,
    masked_var,
    masked_whiten,
    per_token_rewards,
)


def t(data, dtype=torch.float64) -> torch.Tensor:
    return torch.tensor(data, dtype=dtype)


def close(actual: torch.Tensor, expected, atol: float = 1e-6) -> None:
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype), atol=atol, rtol=0)


# --------------------------------------------------------------------------- #
# masked statistics
# --------------------------------------------------------------------------- #
def test_masked_mean_all_and_per_dim():
    x = t([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = t([[1, 1, 0], [0, 1, 1]])
    # all: (1 + 2 + 5 + 6) / 4 = 3.5
    close(masked_mean(x, mask), 3.5)
    # dim=1: row0 (1+2)/2 = 1.5, row1 (5+6)/2 = 5.5
    close(masked_mean(x, mask, dim=1), [1.5, 5.5])
    # bool mask gives the same
    close(masked_mean(x, mask.bool()), 3.5)


def test_masked_mean_empty_mask_is_zero_not_nan():
    x = t([[1.0, 2.0]])
    close(masked_mean(x, t([[0, 0]])), 0.0)
    close(masked_mean(x, t([[0, 0]]), dim=1), [0.0])


# masked entries: 1, 2, 3 | 4, 5 -> mean 3; squared deviations 4, 1, 0, 1, 4 (sum 10)
WHITEN_X = [[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, -50.0, 7.0]]
WHITEN_MASK = [[1, 1, 1, 0], [1, 1, 0, 0]]


def test_masked_var_biased_and_unbiased():
    x, mask = t(WHITEN_X), t(WHITEN_MASK)
    close(masked_var(x, mask, unbiased=False), 10.0 / 5)  # 2.0
    close(masked_var(x, mask, unbiased=True), 10.0 / 4)  # 2.5 (Bessel 5/4)


def test_masked_var_edge_cases():
    with pytest.raises(ValueError):
        masked_var(t([[1.0, 2.0]]), t([[0, 0]]))
    # single element: no Bessel correction possible -> 0, not NaN
    close(masked_var(t([[3.0, 9.0]]), t([[1, 0]])), 0.0)


def test_masked_whiten_mean_zero_var_one_and_ignores_padding():
    x, mask = t(WHITEN_X), t(WHITEN_MASK)
    w = masked_whiten(x, mask)
    # (x - 3) / sqrt(2.5 + 1e-8): 1 -> -2/1.58113883 = -1.26491106, 5 -> +1.26491106
    s = math.sqrt(2.5 + 1e-8)
    close(w, [[-2 / s, -1 / s, 0.0, 0.0], [1 / s, 2 / s, 0.0, 0.0]])
    close(masked_mean(w, mask), 0.0)
    close(masked_var(w, mask, unbiased=True), 1.0, atol=1e-6)
    # padded entries get 0 and changing them changes nothing
    x2 = x.clone()
    x2[0, 3] = -1e6
    x2[1, 2:] = 1e6
    close(masked_whiten(x2, mask), w)


def test_masked_whiten_keep_mean():
    x, mask = t(WHITEN_X), t(WHITEN_MASK)
    w = masked_whiten(x, mask, shift_mean=False)
    s = math.sqrt(2.5 + 1e-8)
    # (x - 3)/s + 3
    close(w, [[3 - 2 / s, 3 - 1 / s, 3.0, 0.0], [3 + 1 / s, 3 + 2 / s, 0.0, 0.0]])
    close(masked_mean(w, mask), 3.0)
    close(masked_var(w, mask), 1.0)


# --------------------------------------------------------------------------- #
# KL estimators
# --------------------------------------------------------------------------- #
LOGP = [[-1.0, -2.0, -0.3]]
REF = [[-1.5, -1.0, -0.3]]
# d = logp - ref = [0.5, -1.0, 0.0]; r = ref - logp = [-0.5, 1.0, 0.0]


def test_kl_k1_k2_abs():
    logp, ref = t(LOGP), t(REF)
    close(kl_per_token(logp, ref), [[0.5, -1.0, 0.0]])  # default is k1
    close(kl_per_token(logp, ref, "k1"), [[0.5, -1.0, 0.0]])
    close(kl_per_token(logp, ref, "k2"), [[0.125, 0.5, 0.0]])  # 0.5 * d^2
    close(kl_per_token(logp, ref, "abs"), [[0.5, 1.0, 0.0]])


def test_kl_k3():
    logp, ref = t(LOGP), t(REF)
    # exp(r) - 1 - r: r=-0.5 -> 0.60653066 - 1 + 0.5 = 0.10653066
    #                 r= 1.0 -> 2.71828183 - 1 - 1   = 0.71828183
    #                 r= 0   -> 0
    close(kl_per_token(logp, ref, "k3"), [[0.10653066, 0.71828183, 0.0]], atol=1e-7)


def test_kl_unknown_estimator():
    with pytest.raises(ValueError, match="k7"):
        kl_per_token(t(LOGP), t(REF), "k7")


def test_kl_k3_nonnegative_property():
    hypothesis = pytest.importorskip("hypothesis")
    st = pytest.importorskip("hypothesis.strategies")

    logprob = st.floats(min_value=-30.0, max_value=0.0, allow_nan=False, allow_infinity=False)

    @hypothesis.settings(max_examples=300, deadline=None)
    @hypothesis.given(st.lists(st.tuples(logprob, logprob), min_size=1, max_size=16))
    def check(pairs):
        for dtype in (torch.float32, torch.float64):
            logp = torch.tensor([[a for a, _ in pairs]], dtype=dtype)
            ref = torch.tensor([[b for _, b in pairs]], dtype=dtype)
            k3 = kl_per_token(logp, ref, "k3")
            assert torch.isfinite(k3).all()
            assert (k3 >= 0).all(), (pairs, k3)

    check()


# --------------------------------------------------------------------------- #
# rewards
# --------------------------------------------------------------------------- #
def test_per_token_rewards_score_on_last_response_token():
    scores = t([2.0, -1.0])
    kl = t([[0.1, 0.2, 0.3, 0.4], [0.5, 0.6, 0.7, 0.8]])
    mask = t([[1, 1, 1, 0], [0, 1, 1, 1]])  # row0: padding after; row1: prompt before
    rewards, non_score = per_token_rewards(scores, kl, 0.5, mask)
    # non_score = -0.5 * kl on masked tokens, 0 elsewhere
    close(non_score, [[-0.05, -0.10, -0.15, 0.0], [0.0, -0.30, -0.35, -0.40]])
    # row0 last response token = index 2: -0.15 + 2.0 = 1.85
    # row1 last response token = index 3: -0.40 - 1.0 = -1.40
    close(rewards, [[-0.05, -0.10, 1.85, 0.0], [0.0, -0.30, -0.35, -1.40]])


def test_per_token_rewards_empty_row_and_bool_mask():
    scores = t([3.0, 1.0])
    kl = t([[1.0, 1.0], [1.0, 1.0]])
    mask = torch.tensor([[False, False], [True, False]])
    rewards, non_score = per_token_rewards(scores, kl, 0.1, mask)
    close(non_score, [[0.0, 0.0], [-0.1, 0.0]])
    # row0 has no response token -> no score anywhere; row1: -0.1 + 1.0 = 0.9 at index 0
    close(rewards, [[0.0, 0.0], [0.9, 0.0]])


# --------------------------------------------------------------------------- #
# GAE
# --------------------------------------------------------------------------- #
def test_gae_hand_computed_with_padding():
    gamma, lam = 0.9, 0.8  # gamma * lam = 0.72
    rewards = t([[1.0, 0.0, 2.0, 9.0, 9.0], [5.0, 1.0, -1.0, 3.0, 3.0]])
    values = t([[0.5, 1.0, 1.5, 7.0, 7.0], [4.0, 2.0, 0.5, 6.0, 6.0]])
    mask = t([[1, 1, 1, 0, 0], [0, 1, 1, 0, 0]])
    adv, ret = gae_advantages(rewards, values, mask, gamma, lam)
    # row 0 (response = positions 0..2, value after the last one is 0):
    #   delta_2 = 2.0 + 0.9*0   - 1.5 = 0.5             A_2 = 0.5
    #   delta_1 = 0.0 + 0.9*1.5 - 1.0 = 0.35            A_1 = 0.35 + 0.72*0.5  = 0.71
    #   delta_0 = 1.0 + 0.9*1.0 - 0.5 = 1.4             A_0 = 1.4  + 0.72*0.71 = 1.9112
    #   returns = A + V: 2.4112, 1.71, 2.0
    # row 1 (prompt at 0, response 1..2):
    #   delta_2 = -1.0 + 0 - 0.5 = -1.5                 A_2 = -1.5
    #   delta_1 = 1.0 + 0.9*0.5 - 2.0 = -0.55           A_1 = -0.55 + 0.72*(-1.5) = -1.63
    #   returns: 0.37, -1.0
    close(adv, [[1.9112, 0.71, 0.5, 0.0, 0.0], [0.0, -1.63, -1.5, 0.0, 0.0]])
    close(ret, [[2.4112, 1.71, 2.0, 0.0, 0.0], [0.0, 0.37, -1.0, 0.0, 0.0]])

    # padding does not leak: wild rewards/values outside the mask change nothing
    rewards2, values2 = rewards.clone(), values.clone()
    rewards2[:, 3:] = 1e4
    values2[:, 3:] = -1e4
    rewards2[1, 0] = 123.0
    values2[1, 0] = -77.0
    adv2, ret2 = gae_advantages(rewards2, values2, mask, gamma, lam)
    close(adv2, adv)
    close(ret2, ret)


def test_gae_gamma_lam_one_is_reward_to_go_minus_value():
    # gamma = lam = 1: A_t = sum_{k>=t} r_k - V_t
    rewards = t([[1.0, 2.0, 3.0]])
    values = t([[0.5, 0.25, 1.0]])
    adv, ret = gae_advantages(rewards, values, t([[1, 1, 1]]), 1.0, 1.0)
    # reward-to-go: 6, 5, 3 -> A = 5.5, 4.75, 2.0; returns = 6, 5, 3
    close(adv, [[5.5, 4.75, 2.0]])
    close(ret, [[6.0, 5.0, 3.0]])


def test_gae_skips_hole_in_mask():
    # mask [1, 0, 1]: the masked-out middle token is skipped, next step of 0 is 2
    gamma, lam = 0.9, 0.8
    rewards = t([[1.0, 100.0, 2.0]])
    values = t([[0.5, 100.0, 1.0]])
    adv, _ = gae_advantages(rewards, values, t([[1, 0, 1]]), gamma, lam)
    # delta_2 = 2 - 1 = 1, A_2 = 1
    # delta_0 = 1 + 0.9*1.0 - 0.5 = 1.4, A_0 = 1.4 + 0.72*1 = 2.12
    close(adv, [[2.12, 0.0, 1.0]])


# --------------------------------------------------------------------------- #
# losses
# --------------------------------------------------------------------------- #
def test_clipped_policy_loss_hand_computed():
    eps = 0.2
    ratios = [1.1, 1.5, 1.5, 0.5, 0.5, 3.0]
    adv = t([[1.0, 1.0, -1.0, -2.0, 2.0, 5.0]])
    mask = t([[1, 1, 1, 1, 1, 0]])  # last token is padding
    old = t([[-1.0] * 6])
    logp = (old + torch.log(t([ratios]))).requires_grad_(True)
    loss, clip_frac, approx_kl = clipped_policy_loss(logp, old, adv, mask, eps)
    # token: -A*r            -A*clip(r,0.8,1.2)   max     clipped chosen?
    #  A=+1 r=1.1: -1.1      -1.1                 -1.1    no  (inside range)
    #  A=+1 r=1.5: -1.5      -1.2                 -1.2    yes
    #  A=-1 r=1.5:  1.5       1.2                  1.5    no  (outside range, unclipped worse)
    #  A=-2 r=0.5:  1.0       1.6                  1.6    yes
    #  A=+2 r=0.5: -1.0      -1.6                 -1.0    no
    # loss = (-1.1 - 1.2 + 1.5 + 1.6 - 1.0) / 5 = -0.2 / 5 = -0.04
    close(loss.detach(), -0.04)
    close(clip_frac, 2 / 5)
    # approx_kl = mean(0.5 * ln(r)^2)
    #   = 0.5 * (ln1.1^2 + 2*ln1.5^2 + 2*ln0.5^2) / 5
    #   = 0.5 * (0.00908403 + 2*0.16440195 + 2*0.48045301) / 5 = 0.12987939
    close(approx_kl, 0.12987939, atol=1e-7)
    assert not clip_frac.requires_grad and not approx_kl.requires_grad
    # gradient: d/dlogp (-A*r) = -A*r / 5 on unclipped tokens, 0 on clipped / padded
    #   -1.1/5 = -0.22, 0, 1.5/5 = 0.3, 0, -2*0.5/5 = -0.2, 0
    loss.backward()
    close(logp.grad, [[-0.22, 0.0, 0.3, 0.0, -0.2, 0.0]])


def test_clipped_policy_loss_on_policy():
    # ratio == 1: loss = -mean(A) over mask, nothing clipped, approx_kl 0
    logp = t([[-0.7, -1.3, -2.0]])
    adv = t([[1.0, -3.0, 100.0]])
    loss, clip_frac, approx_kl = clipped_policy_loss(logp, logp.clone(), adv, t([[1, 1, 0]]), 0.2)
    close(loss, 1.0)  # -(1 - 3)/2
    close(clip_frac, 0.0)
    close(approx_kl, 0.0)


def test_clipped_value_loss_hand_computed():
    eps = 0.2
    values = t([[1.0, 1.5, 1.5, 0.0, 0.0, 50.0]])
    old = t([[0.9, 1.0, 1.0, 1.0, 1.0, 0.0]])
    returns = t([[2.0, 2.0, 1.0, 3.0, -1.0, 0.0]])
    mask = t([[1, 1, 1, 1, 1, 0]])
    loss, clip_frac = clipped_value_loss(values, old, returns, mask, eps)
    # token: v_clipped = clip(v, old-0.2, old+0.2); (v-R)^2 vs (vc-R)^2 -> max
    #  v=1.0 old=0.9 R=2:  vc=1.0 -> 1.00 vs 1.00 -> 1.00 (not clipped)
    #  v=1.5 old=1.0 R=2:  vc=1.2 -> 0.25 vs 0.64 -> 0.64 (clipped)
    #  v=1.5 old=1.0 R=1:  vc=1.2 -> 0.25 vs 0.04 -> 0.25
    #  v=0.0 old=1.0 R=3:  vc=0.8 -> 9.00 vs 4.84 -> 9.00
    #  v=0.0 old=1.0 R=-1: vc=0.8 -> 1.00 vs 3.24 -> 3.24 (clipped)
    # loss = 0.5 * (1 + 0.64 + 0.25 + 9 + 3.24) / 5 = 0.5 * 14.13 / 5 = 1.413
    close(loss, 1.413)
    close(clip_frac, 2 / 5)


# --------------------------------------------------------------------------- #
# logits helpers
# --------------------------------------------------------------------------- #
def test_entropy_uniform_is_log_vocab():
    V = 7
    close(entropy_from_logits(torch.zeros(2, 3, V, dtype=torch.float64)), torch.full((2, 3), math.log(V)))
    # shift invariance / stability with huge logits (naive exp would overflow)
    big = torch.full((1, 2, V), 1e4, dtype=torch.float32)
    out = entropy_from_logits(big)
    assert out.shape == (1, 2)
    close(out, torch.full((1, 2), math.log(V)), atol=1e-6)


def test_entropy_known_values():
    # logits [0, ln3] -> p = [0.25, 0.75]
    # H = 0.25*ln4 + 0.75*ln(4/3) = 0.34657359 + 0.21576155 = 0.56233514
    logits = t([[[0.0, math.log(3.0)]]])
    close(entropy_from_logits(logits), [[0.56233514]], atol=1e-7)
    # a -inf (banned) logit contributes nothing: [0, 0, -inf] -> ln 2
    banned = t([[[0.0, 0.0, float("-inf")]]])
    close(entropy_from_logits(banned), [[math.log(2.0)]])
    # ... and its gradient is finite (usable as an entropy bonus)
    z = t([[[0.3, -1.2, float("-inf")]]]).requires_grad_(True)
    entropy_from_logits(z).sum().backward()
    assert torch.isfinite(z.grad).all()
    # dH/dz_i = -p_i * (log p_i + H); p = softmax([0.3, -1.2]) = [0.81757448, 0.18242552]
    #   H = -(0.81757448*ln 0.81757448 + 0.18242552*ln 0.18242552) = 0.16467 + 0.31038 = 0.47505156
    #   dH/dz_0 = -0.81757448*(ln 0.81757448 + H) = -0.81757448*(-0.20141328 + 0.47505156) = -0.22371968
    #   dH/dz_1 = +0.22371968 (gradients of a function of softmax sum to 0); banned logit -> 0
    close(z.grad, [[[-0.22371968, 0.22371968, 0.0]]], atol=1e-7)
    # bf16 input computed/returned in float32
    out = entropy_from_logits(torch.zeros(1, 1, 4, dtype=torch.bfloat16))
    assert out.dtype == torch.float32
    close(out, [[math.log(4.0)]])


def test_logprobs_from_logits():
    # logits [0, ln3] -> p = [0.25, 0.75]; [ln2, 0, 0] -> p = [0.5, 0.25, 0.25] (padded with -inf col)
    logits = t([[[0.0, math.log(3.0), float("-inf")], [math.log(2.0), 0.0, 0.0]]])
    labels = torch.tensor([[1, 2]])
    close(logprobs_from_logits(logits, labels), [[math.log(0.75), math.log(0.25)]])
    labels0 = torch.tensor([[0, 0]])
    close(logprobs_from_logits(logits, labels0), [[math.log(0.25), math.log(0.5)]])
    # bf16 path (row-wise float32): [ln3 ~ bf16, 0] -> close to ln 0.75 within bf16 rounding of ln3
    lp = logprobs_from_logits(torch.tensor([[[0.0, math.log(3.0)]]], dtype=torch.bfloat16), torch.tensor([[1]]))
    assert lp.dtype == torch.float32 and lp.shape == (1, 1)
    close(lp, [[math.log(0.75)]], atol=5e-3)


def test_explained_variance():
    returns = t([[1.0, 2.0, 3.0, 99.0]])
    mask = t([[1, 1, 1, 0]])
    # perfect values -> 1
    assert explained_variance(returns.clone(), returns, mask) == pytest.approx(1.0)
    # R - V = [0, 0, 1]: mean 1/3, Var = (1/9 + 1/9 + 4/9)/3 = 2/9; Var[R] = 2/3
    # EV = 1 - (2/9)/(2/3) = 2/3   (padding value -5 ignored)
    assert explained_variance(t([[1.0, 2.0, 2.0, -5.0]]), returns, mask) == pytest.approx(2 / 3)
    # constant prediction -> 0
    assert explained_variance(torch.zeros(1, 4, dtype=torch.float64), returns, mask) == pytest.approx(0.0)
    # Var[R] == 0 -> documented choice 0.0 (not NaN); empty mask too
    ev = explained_variance(t([[1.0, 1.0]]), t([[2.0, 2.0]]), t([[1, 1]]))
    assert isinstance(ev, float) and ev == 0.0
    assert explained_variance(t([[1.0]]), t([[2.0]]), t([[0]])) == 0.0


# --------------------------------------------------------------------------- #
# KL controllers
# --------------------------------------------------------------------------- #
def test_adaptive_kl_controller_two_updates():
    ctl = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=10000)
    # update 1: kl 9 -> 9/6 - 1 = 0.5 clipped to 0.2; mult = 1 + 0.2*256/10000 = 1.00512
    #   value = 0.1 * 1.00512 = 0.100512
    assert ctl.update(9.0, 256) == pytest.approx(0.100512, abs=1e-12)
    assert ctl.value == pytest.approx(0.100512, abs=1e-12)
    # update 2: kl 5.4 -> 5.4/6 - 1 = -0.1 (inside clip); mult = 1 - 0.1*256/10000 = 0.99744
    #   value = 0.100512 * 0.99744 = 0.100512 - 0.100512*0.00256 = 0.10025468928
    ctl.update(torch.tensor(5.4, dtype=torch.float64), 256)  # tensors accepted
    assert ctl.value == pytest.approx(0.10025468928, abs=1e-12)


def test_adaptive_kl_controller_clips_error():
    # kl 0 -> 0/6 - 1 = -1 clipped to -0.2; mult = 1 - 0.2*1000/10000 = 0.98
    ctl = AdaptiveKLController(0.5, 6.0, 10000)
    ctl.update(0.0, 1000)
    assert ctl.value == pytest.approx(0.49, abs=1e-12)
    # kl 600 -> 99 clipped to +0.2; mult = 1 + 0.2*1000/10000 = 1.02 -> 0.49 * 1.02 = 0.4998
    ctl.update(600.0, 1000)
    assert ctl.value == pytest.approx(0.4998, abs=1e-12)
    # exactly on target: no change
    ctl.update(6.0, 1000)
    assert ctl.value == pytest.approx(0.4998, abs=1e-12)


def test_adaptive_kl_controller_state_round_trip():
    a = AdaptiveKLController(0.2, 3.0, 500)
    a.update(4.5, 64)
    a.update(1.0, 64)
    state = a.state_dict()
    assert set(state) == {"value", "target", "horizon"}
    assert all(type(v) is float for v in state.values())
    b = AdaptiveKLController(0.9, 1.0, 1)
    b.load_state_dict(dict(state))
    assert b.state_dict() == state
    a.update(3.3, 32)
    b.update(3.3, 32)
    assert a.value == b.value


def test_adaptive_kl_controller_validates():
    with pytest.raises(ValueError):
        AdaptiveKLController(0.1, 0.0, 100)
    with pytest.raises(ValueError):
        AdaptiveKLController(0.1, 6.0, 0)


def test_fixed_kl_controller():
    ctl = FixedKLController(0.05)
    assert ctl.update(100.0, 10_000) == 0.05
    assert ctl.value == 0.05
    state = ctl.state_dict()
    assert state == {"value": 0.05}
    other = FixedKLController(1.0)
    other.load_state_dict(state)
    assert other.value == 0.05


def test_make_kl_controller():
    ada = make_kl_controller("adaptive", 0.1, target=6.0, horizon=10000)
    assert isinstance(ada, AdaptiveKLController)
    assert (ada.value, ada.target, ada.horizon) == (0.1, 6.0, 10000.0)
    fixed = make_kl_controller("fixed", 0.2)
    assert isinstance(fixed, FixedKLController) and fixed.value == 0.2
    with pytest.raises(ValueError, match="target"):
        make_kl_controller("adaptive", 0.1)
    with pytest.raises(ValueError, match="pid"):
        make_kl_controller("pid", 0.1, 6.0, 100)
