"""Stage 4 pure functions: advantages, GAE, policy / value / Bradley-Terry losses, KL estimators.

Each against hand-computed values and a slow float64 loop reference.
"""
import math
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from stage_scripts import load_script  # noqa: E402

rl = load_script("04_rl.py", "rl04")


# ---------------------------------------------------------------------------- group advantages

def test_group_advantages_with_std_hand_computed():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    adv, st = rl.group_advantages(r, group_size=4, std_norm=True, eps=0.0 + 1e-12)
    s = 0.5 / math.sqrt(1 / 3)  # mean 0.5, Bessel std sqrt(4 * 0.25 / 3)
    torch.testing.assert_close(adv, torch.tensor([s, -s, -s, s, 0, 0, 0, 0]), atol=1e-6, rtol=0)
    assert st["zero_std_frac"] == 0.5


def test_group_advantages_without_std_dr_grpo():
    r = torch.tensor([[3.0, 1.0], [0.0, 0.0], [2.0, -2.0]])
    adv, st = rl.group_advantages(r, group_size=2, std_norm=False)
    torch.testing.assert_close(adv, torch.tensor([[1.0, -1.0], [0.0, 0.0], [2.0, -2.0]]))
    assert adv.shape == r.shape
    assert st["zero_std_frac"] == pytest.approx(1 / 3)


def test_group_advantages_vs_loop():
    g = torch.Generator().manual_seed(0)
    r = torch.rand(12, generator=g, dtype=torch.float64)
    adv, _ = rl.group_advantages(r, 3, True, eps=1e-6)
    for b in range(4):
        grp = [float(x) for x in r[3 * b:3 * b + 3]]
        mean = sum(grp) / 3
        std = math.sqrt(sum((x - mean) ** 2 for x in grp) / 2)
        for i in range(3):
            assert float(adv[3 * b + i]) == pytest.approx((grp[i] - mean) / (std + 1e-6), abs=1e-12)


# ---------------------------------------------------------------------------- GAE, whitening

def test_gae_three_step_hand_trajectory():
    # row 0: full 3-step episode; row 1: 2 tokens then padding (value at the pad must be ignored)
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0]], dtype=torch.float64)
    values = torch.tensor([[0.5, 0.6, 0.7], [0.5, 0.6, 9.0]], dtype=torch.float64)
    mask = torch.tensor([[1.0, 1, 1], [1, 1, 0]], dtype=torch.float64)
    adv, ret = rl.gae(rewards, values, mask, gamma=0.9, lam=0.8)
    # row 0: d2 = 1 - .7 = .3; d1 = .9*.7 - .6 = .03; d0 = .9*.6 - .5 = .04; A_t = d_t + .72 A_{t+1}
    a2 = 0.3
    a1 = 0.03 + 0.72 * a2
    a0 = 0.04 + 0.72 * a1
    # row 1: d1 = 1 - .6 = .4 (episode ends: no bootstrap); d0 = .9*.6 - .5 = .04
    b1 = 0.4
    b0 = 0.04 + 0.72 * b1
    torch.testing.assert_close(adv, torch.tensor([[a0, a1, a2], [b0, b1, 0.0]], dtype=torch.float64))
    torch.testing.assert_close(ret, torch.tensor([[a0 + .5, a1 + .6, a2 + .7], [b0 + .5, b1 + .6, 0.0]],
                                                 dtype=torch.float64))


def test_gae_lambda_one_gamma_one_is_return_minus_value():
    g = torch.Generator().manual_seed(1)
    r = torch.randn(2, 5, generator=g, dtype=torch.float64)
    v = torch.randn(2, 5, generator=g, dtype=torch.float64)
    m = torch.ones(2, 5, dtype=torch.float64)
    adv, ret = rl.gae(r, v, m, 1.0, 1.0)
    mc = r.flip(1).cumsum(1).flip(1)  # Monte-Carlo return
    torch.testing.assert_close(ret, mc)
    torch.testing.assert_close(adv, mc - v)


def test_whiten_masked_and_global_moments():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 100.0, 100.0]], dtype=torch.float64)
    m = torch.tensor([[1.0, 1, 1], [1, 0, 0]], dtype=torch.float64)
    w = rl.whiten(x, m, eps=0.0)
    vals = torch.tensor([1.0, 2, 3, 4], dtype=torch.float64)
    exp = (vals - 2.5) / vals.var(unbiased=False).sqrt()
    torch.testing.assert_close(w[m.bool()], exp)
    assert (w[~m.bool()] == 0).all()
    # moments summed over two halves (as all_reduce would) == moments of the whole
    mom = rl.masked_moments(x[:1], m[:1]) + rl.masked_moments(x[1:], m[1:])
    torch.testing.assert_close(rl.whiten(x[1:], m[1:], eps=0.0, moments=mom), w[1:])


# ---------------------------------------------------------------------------- policy loss

def _naive_policy_loss(logp, old, adv, mask, cl, ch, agg, norm_const):
    B, T = len(logp), len(logp[0])
    per_seq, n_tok, n_seq, total = [], 0, 0, 0.0
    for i in range(B):
        s, cnt = 0.0, 0
        for t in range(T):
            if mask[i][t] == 0:
                continue
            a = adv[i][t] if isinstance(adv[i], list) else adv[i]
            rho = math.exp(logp[i][t] - old[i][t])
            s += -min(rho * a, min(max(rho, 1 - cl), 1 + ch) * a)
            cnt += 1
        total += s
        n_tok += cnt
        if cnt:
            n_seq += 1
            per_seq.append(s / cnt)
    if agg == "token_mean":
        return total / n_tok
    if agg == "seq_mean_token_mean":
        return sum(per_seq) / n_seq
    return total / (n_seq * norm_const)


@pytest.mark.parametrize("agg", ["token_mean", "seq_mean_token_mean", "seq_sum_norm"])
@pytest.mark.parametrize("per_token_adv", [False, True])
def test_policy_loss_vs_naive_loop_each_aggregation(agg, per_token_adv):
    g = torch.Generator().manual_seed(2)
    B, T = 4, 6
    logp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 2
    old = logp + 0.4 * torch.randn(B, T, generator=g, dtype=torch.float64)  # many clipped tokens
    adv = torch.randn(B, T, generator=g, dtype=torch.float64) if per_token_adv else \
        torch.randn(B, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0], [0] * 6, [1, 1, 1, 1, 0, 0]], dtype=torch.float64)
    n_global = float(rl.normaliser_count(mask, agg))
    loss, st = rl.policy_loss(logp, old, adv, mask, 0.2, 0.28, agg, n_global, norm_const=8.0)
    ref = _naive_policy_loss(logp.tolist(), old.tolist(), adv.tolist(), mask.tolist(), 0.2, 0.28, agg, 8.0)
    assert float(loss) == pytest.approx(ref, abs=1e-12)
    assert float(st["tokens"]) == 12.0
    assert 0 < float(st["clipped"]) < 12


@pytest.mark.parametrize("agg", ["token_mean", "seq_mean_token_mean", "seq_sum_norm"])
def test_aggregation_invariant_to_splitting(agg):
    """Summing micro-batch losses normalised by the GLOBAL count == the loss of the whole batch
    (what makes 1 process x accum N == N processes x accum 1)."""
    g = torch.Generator().manual_seed(3)
    logp = -torch.rand(6, 5, generator=g, dtype=torch.float64)
    old = logp + 0.1 * torch.randn(6, 5, generator=g, dtype=torch.float64)
    adv = torch.randn(6, generator=g, dtype=torch.float64)
    mask = (torch.rand(6, 5, generator=g) > 0.3).double()
    n = float(rl.normaliser_count(mask, agg))
    whole, _ = rl.policy_loss(logp, old, adv, mask, 0.2, 0.2, agg, n, 5.0)
    parts = sum(rl.policy_loss(logp[i:i + 2], old[i:i + 2], adv[i:i + 2], mask[i:i + 2], 0.2, 0.2, agg, n, 5.0)[0]
                for i in range(0, 6, 2))
    assert float(parts) == pytest.approx(float(whole), abs=1e-12)


def test_policy_loss_hand_clip_cases():
    # token 1: ratio e^.5 > 1.28, A = +1 -> clipped: -1.28; token 2: ratio .5 < .8, A = -1 -> clipped: +.8
    logp = torch.tensor([[0.5, math.log(0.5)]], dtype=torch.float64)
    old = torch.zeros(1, 2, dtype=torch.float64)
    adv = torch.tensor([[1.0, -1.0]], dtype=torch.float64)
    mask = torch.ones(1, 2, dtype=torch.float64)
    loss, st = rl.policy_loss(logp, old, adv, mask, 0.2, 0.28, "token_mean", 2.0)
    assert float(loss) == pytest.approx((-1.28 + 0.8) / 2)
    assert float(st["clipped"]) == 2
    # inside the clip range: plain -ratio * A, gradient d/dlogp = -ratio * A / N
    lp = torch.tensor([[0.1]], dtype=torch.float64, requires_grad=True)
    loss, st = rl.policy_loss(lp, torch.zeros(1, 1, dtype=torch.float64), torch.tensor([2.0], dtype=torch.float64),
                              torch.ones(1, 1, dtype=torch.float64), 0.2, 0.2, "token_mean", 1.0)
    loss.backward()
    assert float(loss.detach()) == pytest.approx(-2 * math.exp(0.1))
    assert float(lp.grad) == pytest.approx(-2 * math.exp(0.1))
    assert float(st["clipped"]) == 0


def test_policy_loss_zero_grad_when_clipped():
    lp = torch.tensor([[1.0]], dtype=torch.float64, requires_grad=True)  # ratio e > 1.2, A > 0
    loss, _ = rl.policy_loss(lp, torch.zeros(1, 1, dtype=torch.float64), torch.tensor([1.0], dtype=torch.float64),
                             torch.ones(1, 1, dtype=torch.float64), 0.2, 0.2, "token_mean", 1.0)
    loss.backward()
    assert float(lp.grad) == 0.0


# ---------------------------------------------------------------------------- KL estimators

def test_kl_estimators_hand_values():
    logp = torch.tensor([math.log(0.5)], dtype=torch.float64)
    ref = torch.tensor([math.log(0.25)], dtype=torch.float64)
    k = rl.kl_estimators(logp, ref)
    r = math.log(0.5)  # ref - logp
    assert float(k["k1"]) == pytest.approx(-r)
    assert float(k["k2"]) == pytest.approx(0.5 * r * r)
    assert float(k["k3"]) == pytest.approx(0.5 - 1 - r)
    z = rl.kl_estimators(logp, logp)
    assert all(float(v) == 0 for v in z.values())


def _categorical():
    g = torch.Generator().manual_seed(4)
    theta = torch.randn(5, generator=g, dtype=torch.float64, requires_grad=True)
    ref_logp = torch.log_softmax(torch.randn(5, generator=g, dtype=torch.float64), 0)
    return theta, ref_logp


def test_kl_estimator_values_are_unbiased_k1_k3():
    theta, ref = _categorical()
    logp = torch.log_softmax(theta, 0).detach()
    p = logp.exp()
    true_kl = float((p * (logp - ref)).sum())
    k = rl.kl_estimators(logp, ref)
    assert float((p * k["k1"]).sum()) == pytest.approx(true_kl, abs=1e-12)
    assert float((p * k["k3"]).sum()) == pytest.approx(true_kl, abs=1e-12)


def test_kl_in_loss_has_gradient_and_which_kl_it_follows():
    """Exact expectations over a 5-way categorical (no sampling noise):
    E_pi[grad k3] = grad KL(ref||pi) (biased for KL(pi||ref)), E_pi[grad k2] = grad KL(pi||ref),
    E_pi[grad k1] = 0; and k1 in the REWARD (score function) gives exactly -grad KL(pi||ref)."""
    theta, ref = _categorical()

    def grad_of(f):
        if theta.grad is not None:
            theta.grad = None
        f().backward()
        return theta.grad.clone()

    def expected_loss(name):  # sum_x pi(x) (detached sampling weight) * k(x), grad through logp only
        logp = torch.log_softmax(theta, 0)
        return (logp.exp().detach() * rl.kl_estimators(logp, ref)[name]).sum()

    fwd = grad_of(lambda: (torch.softmax(theta, 0) * (torch.log_softmax(theta, 0) - ref)).sum())  # KL(pi||ref)
    rev = grad_of(lambda: (ref.exp() * (ref - torch.log_softmax(theta, 0))).sum())  # KL(ref||pi)
    g3, g2, g1 = grad_of(lambda: expected_loss("k3")), grad_of(lambda: expected_loss("k2")), grad_of(lambda: expected_loss("k1"))
    assert g3.abs().sum() > 1e-3  # the KL term in the loss does carry a gradient
    torch.testing.assert_close(g3, rev)
    assert (g3 - fwd).abs().max() > 1e-3  # ... but not the gradient of KL(pi || ref)
    torch.testing.assert_close(g2, fwd)
    torch.testing.assert_close(g1, torch.zeros_like(g1), atol=1e-12, rtol=0)

    def reward_pg():  # REINFORCE with reward -k1 (detached): sum_x pi(x) * (-k1(x)) * grad log pi(x)
        logp = torch.log_softmax(theta, 0)
        k1 = rl.kl_estimators(logp.detach(), ref)["k1"]
        return -(logp.exp().detach() * (-k1) * logp).sum()  # minimise -J
    torch.testing.assert_close(grad_of(reward_pg), fwd)


# ---------------------------------------------------------------------------- value, BT losses

def test_value_loss_hand_values():
    v = torch.tensor([[0.9, 0.1, 5.0]], dtype=torch.float64)
    old = torch.tensor([[0.5, 0.5, 0.0]], dtype=torch.float64)
    ret = torch.tensor([[0.0, 0.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0, 0.0]], dtype=torch.float64)
    loss, st = rl.value_loss(v, old, ret, mask, clip=0.2, n_global=2.0)
    # token 0: unclipped .81 vs clipped (.7)^2=.49 -> .81; token 1: .01 vs (.3)^2=.09 -> .09 (clipped)
    assert float(loss) == pytest.approx(0.5 * (0.81 + 0.09) / 2)
    assert float(st["vf_clipped"]) == 1


def test_bradley_terry_loss_hand_values():
    rc = torch.tensor([2.0, 0.0], dtype=torch.float64)
    rr = torch.tensor([0.0, 1.0], dtype=torch.float64)
    loss, st = rl.bradley_terry_loss(rc, rr)
    assert float(loss) == pytest.approx((math.log1p(math.exp(-2)) + math.log1p(math.e)) / 2)
    assert st["acc"] == 0.5
    loss_g, _ = rl.bradley_terry_loss(rc, rr, n_global=4.0)
    assert float(loss_g) == pytest.approx(float(loss) / 2)


# ---------------------------------------------------------------------------- masks, moments

def test_rollout_mask_keeps_eos_and_overlong_modes():
    lengths = torch.tensor([3, 5, 2])
    finished = torch.tensor([True, False, True])  # row 1 truncated at the limit 5
    m = rl.rollout_mask(lengths, finished, 5, "none")
    torch.testing.assert_close(m, torch.tensor([[1.0, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]))
    mm = rl.rollout_mask(lengths, finished, 5, "masked")
    torch.testing.assert_close(mm[1], torch.zeros(5))
    torch.testing.assert_close(mm[0], m[0])


def test_running_moments_update_equals_batch_moments():
    x = torch.randn(50, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    mean, var, n = 0.0, 1.0, 0.0
    for chunk in x.split(7):
        mean, var, n = rl.running_moments_update(mean, var, n, chunk.mean().item(),
                                                 chunk.var(unbiased=False).item(), chunk.numel())
    assert n == 50
    assert mean == pytest.approx(x.mean().item())
    assert var == pytest.approx(x.var(unbiased=False).item())


# ---------------------------------------------------------------------------- truncated importance sampling

def test_truncated_is_weight_vs_float64_loop():
    g = torch.Generator().manual_seed(0)
    old, gen = torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)
    w = rl.truncated_is_weight(old, gen, 2.0)
    for i in range(3):
        for t in range(5):
            ref = min(math.exp(float(old[i, t].double() - gen[i, t].double())), 2.0)
            assert abs(float(w[i, t]) - ref) < 1e-6 * max(1.0, ref)
    assert not w.requires_grad and float(w.max()) <= 2.0 + 1e-6


def test_policy_loss_with_tis_is_the_weighted_per_token_loss():
    """l_t -> w_t l_t: against a loop, and off (tis_cap 0) or with pi_sampler == pi_old (w = 1) it is
    exactly the loss without correction; the gradient of each token is scaled by w_t."""
    g = torch.Generator().manual_seed(1)
    B, T = 2, 4
    old = torch.randn(B, T, generator=g)
    logp = (old + 0.1 * torch.randn(B, T, generator=g)).requires_grad_()
    gen = old + 0.5 * torch.randn(B, T, generator=g)
    adv = torch.randn(B, generator=g)
    mask = torch.ones(B, T)
    mask[1, 3] = 0
    cfg = rl.Config(tis_cap=2.0, loss_agg="token_mean")
    n = float(mask.sum())
    loss, st = rl.rl_loss(logp, old, adv, mask, n, cfg, gen_logp=gen)
    ref = 0.0
    for i in range(B):
        for t in range(T):
            if mask[i, t]:
                r = math.exp(float(logp[i, t].detach() - old[i, t]))
                a = float(adv[i])
                l_t = max(-a * r, -a * min(max(r, 1 - cfg.clip_low), 1 + cfg.clip_high))
                if a < 0:
                    l_t = min(l_t, -a * cfg.clip_ratio_c)
                ref += min(math.exp(float(old[i, t] - gen[i, t])), 2.0) * l_t
    assert abs(float(loss.detach()) - ref / n) < 1e-5
    assert float(st["tis_weight"]) > 0
    base, _ = rl.rl_loss(logp, old, adv, mask, n, rl.Config(tis_cap=0.0, loss_agg="token_mean"), gen_logp=gen)
    same, _ = rl.rl_loss(logp, old, adv, mask, n, cfg, gen_logp=old.clone())
    assert float(same.detach()) == pytest.approx(float(base.detach()), abs=1e-7)
    grad_w, = torch.autograd.grad(loss, logp)
    grad_0, = torch.autograd.grad(base, logp)
    w = rl.truncated_is_weight(old, gen, 2.0)
    torch.testing.assert_close(grad_w, grad_0 * w * mask, atol=1e-7, rtol=1e-5)
