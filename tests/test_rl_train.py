"""Stage 4 loop on the tiny model: importance ratio == 1 before any update (PITFALLS #5), the
sampled EOS kept in the mask with pad == eos (#7, #8), token ids carried end to end (#10),
dynamic sampling (#3), GRPO and PPO learning a toy task with a known optimum, the Bradley-Terry
reward model, and 1 process x accumulation 2 == 2 processes x accumulation 1 (#1)."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import common as C  # noqa: E402
import models as M  # noqa: E402
import sampler as S  # noqa: E402
from stage_scripts import killed_at_log, load_script  # noqa: E402
from test_common import naive_top_p_keep  # noqa: E402

rl = load_script("04_rl.py", "rl04")
TINY = ["--model", "tiny", "--precision", "fp32", "--resume", "false", "--eval_kinds"]


def _prompts(tok, n=4):
    return [C.chat_prompt_ids(tok, [{"role": "user", "content": f"question number {i}" + "?" * i}]) for i in range(n)]


def _metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------- PITFALLS #5, #7, #8, #10

def test_importance_ratio_is_one_on_fresh_rollout():
    torch.manual_seed(0)
    lm, tok = M.load_model_and_tokenizer("tiny")
    policy = rl.ActorCritic(lm).eval()
    prompts = _prompts(tok)
    gen = S.generate(policy, prompts, 12, eos_ids=tok.eos_token_id, pad_id=tok.pad_token_id, temperature=0.7)
    with torch.no_grad():
        out = rl.response_forward(policy, prompts, gen.tokens, gen.lengths, tok.pad_token_id, 0.7, torch.device("cpu"))
        wrong_t = rl.response_forward(policy, prompts, gen.tokens, gen.lengths, tok.pad_token_id, 1.0,
                                      torch.device("cpu"))
    mask = rl.rollout_mask(gen.lengths, gen.finished, gen.tokens.shape[1], "none").bool()
    ratio = torch.exp(out["logp"] - gen.logp)[mask]
    assert mask.sum() > 20
    assert (ratio - 1).abs().max() < 1e-5
    # the test has teeth: rescoring at T = 1 after sampling at T = 0.7 breaks the ratio
    assert (torch.exp(wrong_t["logp"] - gen.logp)[mask] - 1).abs().max() > 1e-2


def test_top_p_draws_from_the_nucleus_and_returns_the_logp_the_trainer_recomputes():
    """PITFALLS #6. With top_p < 1 the sampler draws from the renormalised nucleus, but the logp it
    returns is that of the whole processed distribution (temperature only), the one the trainer
    recomputes: ratio == 1 before any update, as at top_p = 1. The draw's own probability differs
    from that logp by the nucleus' mass, the off-policy bias `sampler.generate` documents (use
    top_p = 1 where exact ratios matter)."""
    torch.manual_seed(0)
    lm, tok = M.load_model_and_tokenizer("tiny")
    policy = rl.ActorCritic(lm).eval()
    prompts = _prompts(tok)
    T, top_p = 0.7, 0.5
    gen = S.generate(policy, prompts, 12, eos_ids=tok.eos_token_id, pad_id=tok.pad_token_id, temperature=T,
                     top_p=top_p, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = rl.response_forward(policy, prompts, gen.tokens, gen.lengths, tok.pad_token_id, T, torch.device("cpu"))
    mask = rl.rollout_mask(gen.lengths, gen.finished, gen.tokens.shape[1], "none").bool()
    assert mask.sum() > 20
    assert (torch.exp(out["logp"] - gen.logp)[mask] - 1).abs().max() < 1e-5
    dropped = []  # -log(nucleus mass) of every step: what the returned logp leaves out
    for i, p in enumerate(prompts):
        n = int(gen.lengths[i])
        with torch.no_grad():
            logits = lm(input_ids=torch.tensor([p + gen.tokens[i, :n].tolist()])).logits[0]
        probs = (logits[len(p) - 1:len(p) - 1 + n].double() / T).softmax(-1)
        for t in range(n):
            pt = probs[t, gen.tokens[i, t]]
            assert probs[t][probs[t] > pt].sum() <= top_p + 1e-4  # the drawn token is inside the nucleus
            mass = sum(probs[t, j].item() for j in naive_top_p_keep(probs[t].tolist(), top_p))
            dropped.append(-math.log(mass))
    assert max(dropped) > 0.1  # the cut was real: the returned logp is not the draw's own probability


def _length_reward(items, texts, ids):  # rewards that differ within a group, so every step trains
    return [float(len(x) + x[0] % 3) for x in ids], ["ok"] * len(ids), [{}] * len(ids)


def test_sampler_trainer_mismatch_is_logged_every_step(tmp_path):
    """PITFALLS #19: every step logs `logp_diff_sampler`, the mean |trainer logp - sampler logp| over
    the trained tokens. fp32: 0 to rounding (the sampler is the model itself); bf16: the next test
    (`--tis_cap` corrects that mismatch; its loss is tested in test_rl_losses)."""
    res, _ = _run_direct(tmp_path, _direct_cfg(max_steps=2), _length_reward)
    assert [0 <= h["logp_diff_sampler"] < 1e-5 for h in res["history"]] == [True, True]


@pytest.mark.skipif(not C.cpu_has_native_bf16(), reason="this CPU has no native bf16 (AVX512-BF16 / AMX)")
def test_bf16_sampler_trainer_mismatch_shows_in_the_log(tmp_path):
    """PITFALLS #19, the bf16 half: the sampler's bf16 copy of the weights and the trainer's autocast
    disagree, and `logp_diff_sampler` shows it at every step."""
    res, _ = _run_direct(tmp_path, _direct_cfg(max_steps=2), _length_reward, dtype=torch.bfloat16)
    assert [h["logp_diff_sampler"] > 1e-4 for h in res["history"]] == [True, True]


def test_packed_response_forward_equals_each_sample_alone():
    """response_forward packs the rollout (rl.pack_rollout: several samples per row, position ids
    restarting per sample): logp, entropy and values of every response token equal those of the
    sample run alone, unpadded (fp32), for the policy with a value head and a separate critic, so
    packed samples never see each other (PITFALLS #13); 0 past each length."""
    torch.manual_seed(3)
    lm, tok = M.load_model_and_tokenizer("tiny")
    policy, critic = rl.ActorCritic(lm).eval(), rl.ScalarHeadModel(M.load_model_and_tokenizer("tiny")[0]).eval()
    with torch.no_grad():
        policy.value_head.weight.normal_()
    prompts = _prompts(tok, 6)
    gen = S.generate(policy, prompts, 10, eos_ids=tok.eos_token_id, pad_id=tok.pad_token_id, temperature=1.0)
    lengths = gen.lengths.clone()
    lengths[0] = 3  # a short response, so rows pack more than one sample
    batch, where = rl.pack_rollout(prompts, gen.tokens, lengths, tok.pad_token_id)
    assert batch["input_ids"].shape[0] < len(prompts) and batch["input_ids"].shape[1] % C.LENGTH_MULTIPLE == 0
    cpu = torch.device("cpu")
    with torch.no_grad():
        out = rl.response_forward(policy, prompts, gen.tokens, lengths, tok.pad_token_id, 0.7, cpu, return_values=True)
        vals = rl.response_forward(critic, prompts, gen.tokens, lengths, tok.pad_token_id, 0.7, cpu)["values"]
        for i, p in enumerate(prompts):
            n = int(lengths[i])
            ids = torch.tensor([p + gen.tokens[i, :n].tolist()])
            labels = torch.tensor([[C.IGNORE] * len(p) + gen.tokens[i, :n].tolist()])
            alone = policy(ids, labels, temperature=0.7, return_values=True)
            v_alone = rl.shift_right(critic(ids))
            for k in ("logp", "entropy", "values"):
                torch.testing.assert_close(out[k][i, :n], alone[k][0, len(p):], atol=1e-5, rtol=0)
                assert (out[k][i, n:] == 0).all()
            torch.testing.assert_close(vals[i, :n], v_alone[0, len(p):], atol=1e-5, rtol=0)


def test_eos_kept_in_mask_pad_eq_eos_and_truncation_told_apart():
    torch.manual_seed(1)
    lm, tok = M.load_model_and_tokenizer("tiny")
    eos = tok.eos_token_id
    assert eos == tok.pad_token_id
    bias = torch.zeros(len(tok))
    bias[eos] = 4.0  # make EOS likely so that some responses finish and some are truncated
    lm.lm_head.register_forward_hook(lambda m, i, o: o + bias)
    prompts = _prompts(tok, 8) * 2
    gen = S.generate(lm, prompts, 6, eos_ids=eos, pad_id=tok.pad_token_id, temperature=1.0)
    assert gen.finished.any() and (~gen.finished).any()
    T = gen.tokens.shape[1]
    mask = rl.rollout_mask(gen.lengths, gen.finished, T, "none")
    batch, P = rl.collate_rollout(prompts, gen.tokens, gen.lengths, tok.pad_token_id)
    for i in range(len(prompts)):
        L = int(gen.lengths[i])
        if gen.finished[i]:
            assert gen.tokens[i, L - 1] == eos and mask[i, L - 1] == 1  # the sampled EOS is trained
            assert batch["labels"][i, P + L - 1] == eos
        else:
            assert L == 6 and mask[i].sum() == 6  # truncated: known from sampling, not from ids
        assert mask[i, L:].sum() == 0 and (batch["labels"][i, P + L:] == C.IGNORE).all()
    naive = (gen.tokens != tok.pad_token_id).float()  # the classic bug: drops every EOS
    assert (naive.sum(1) < mask.sum(1))[gen.finished].all()
    masked = rl.rollout_mask(gen.lengths, gen.finished, T, "masked")
    assert masked[~gen.finished].sum() == 0 and torch.equal(masked[gen.finished], mask[gen.finished])


def _direct_cfg(**kw):
    base = dict(model="tiny", prompts_per_step=2, group_size=4, max_new_tokens=6, micro_batch_size=4,
                lr=1e-3, kl_coef=0.0, format_weight=0.0, max_steps=1, temperature=1.0)
    base.update(kw)
    return rl.Config(**base)


def _run_direct(tmp_path, cfg, reward_fn, kind="toy", n_prompts=4, dtype=torch.float32):
    lm, tok = M.load_model_and_tokenizer("tiny")
    policy = rl.ActorCritic(lm)
    items = [{"prompt_ids": p, "row": {"k": i}} for i, p in enumerate(_prompts(tok, n_prompts))]
    d = C.Dist()
    log = C.MetricsLogger(tmp_path, d, cfg.max_steps)
    return rl.rl_train(cfg, kind, policy, None, items, reward_fn, tok, d, dtype, log, 1, 0), tok


def test_token_ids_carried_end_to_end(tmp_path):
    seen = []

    def reward_fn(items, texts, ids):
        seen.extend(ids)
        return [float(len(x)) for x in ids], ["ok"] * len(ids), [{}] * len(ids)

    res, tok = _run_direct(tmp_path, _direct_cfg(), reward_fn)
    ro = res["last_rollout"]
    batch, P = rl.collate_rollout(ro.prompt_ids, ro.tokens, ro.lengths, tok.pad_token_id)
    for i, ids in enumerate(seen):
        L = int(ro.lengths[i])
        assert ro.tokens[i, :L].tolist() == ids  # the update trains on what the reward saw and the sampler drew
        assert batch["input_ids"][i, P:P + L].tolist() == ids
        assert batch["input_ids"][i, P - len(ro.prompt_ids[i]):P].tolist() == ro.prompt_ids[i]
    # random bytes rarely survive decode -> re-encode: re-encoding would have changed the ids
    reenc = [tok(tok.decode(x), add_special_tokens=False)["input_ids"] for x in seen]
    assert any(a != b for a, b in zip(reenc, seen))


def test_dynamic_sampling_refills_zero_variance_groups(tmp_path):
    def reward_fn(items, texts, ids):  # prompts 0 and 1: constant reward (zero-variance groups)
        r = [0.0 if it["row"]["k"] < 2 else float(len(x) + x[0] % 3) for it, x in zip(items, ids)]
        return r, ["ok"] * len(ids), [{}] * len(ids)

    cfg = _direct_cfg(dynamic_sampling=True, max_resample=12, max_steps=3, prompts_per_step=2)
    res, _ = _run_direct(tmp_path, cfg, reward_fn, n_prompts=4)
    for h in res["history"]:
        assert h["groups_sampled"] >= 2
    assert any(h["zero_std_group_frac"] > 0 for h in res["history"])
    assert any(h["groups_sampled"] > 2 for h in res["history"])  # something was refilled
    ro = res["last_rollout"]
    r = ro.rewards.view(-1, 4)
    assert (r.max(1).values > r.min(1).values).all()  # kept groups all carry a learning signal


@pytest.mark.parametrize("kl_coef", [0.0, 0.1])
def test_update_skips_rows_without_gradient_exactly(kl_coef):
    """rows_to_run leaves out of the update the rows that cannot move the policy (truncated ones under
    --overlong masked; with no reference KL also the zero-advantage rows of an equal-reward group):
    the gradient of the step equals that of an update over every row (fp32), and fewer rows ran."""
    import copy
    torch.manual_seed(0)
    lm, tok = M.load_model_and_tokenizer("tiny")
    policy = rl.ActorCritic(lm)
    ref = copy.deepcopy(policy).eval() if kl_coef else None
    items = [{"prompt_ids": p, "row": {"k": i}} for i, p in enumerate(_prompts(tok, 3))]

    def reward_fn(its, texts, ids):  # prompt 0: all rewards equal (zero advantages)
        return [0.0 if it["row"]["k"] == 0 else float(len(x) + x[0] % 3) for it, x in zip(its, ids)], \
            ["ok"] * len(ids), [{}] * len(ids)

    cfg = _direct_cfg(prompts_per_step=3, max_new_tokens=5, micro_batch_size=2, overlong="masked", kl_coef=kl_coef)
    d = C.Dist()
    ro = rl.rollout(policy, items, reward_fn, cfg, tok, d, torch.float32, 1, 0)
    ro.finished[:] = torch.arange(len(ro.texts)) % 3 != 1  # a third of the rows truncated (masked out)
    b = rl.score(ro, policy, ref, None, cfg, "toy", tok, d, torch.float32, {"mean": 0.0, "var": 1.0, "count": 0})
    n = len(ro.texts)
    live = [i for i in range(n) if b["mask"][i].any() and (kl_coef > 0 or b["adv"][i].any())]
    ran = rl.rows_to_run(list(range(n)), b["mask"], b["adv"], kl_coef == 0, 2, d)
    assert ran[:len(live)] == live and len(ran) == 2 * -(-len(live) // 2) < n  # padded to whole micro-batches
    assert len(live) < (n - 4 if kl_coef == 0 else n)  # the equal-reward group is out without a KL term
    weights = []
    for skip in (True, False):
        p = copy.deepcopy(policy)
        opt = torch.optim.SGD(p.parameters(), lr=1.0)  # weights - clipped gradient: compares the gradients
        orig = rl.rows_to_run
        try:
            if not skip:
                rl.rows_to_run = lambda rows, *a: rows
            rl.update(p, None, opt, None, ro, b, cfg, tok, d, torch.float32, 1.0, 0)
        finally:
            rl.rows_to_run = orig
        weights.append(torch.cat([x.detach().flatten() for x in p.parameters()]))
    start = torch.cat([x.detach().flatten() for x in policy.parameters()])
    assert (weights[1] - start).abs().max() > 1e-4  # the step moved the weights
    torch.testing.assert_close(weights[0], weights[1], atol=1e-6, rtol=0)


def test_old_and_ref_forwards_skip_rows_the_loss_masks_out():
    """forward_old runs the policy and the reference only over rows with a trained token: the
    log-probs of those rows are those of a pass over every row (fp32), the masked rows stay 0
    (every use of them is multiplied by the mask), and fewer micro-batches ran."""
    import copy
    torch.manual_seed(0)
    lm, tok = M.load_model_and_tokenizer("tiny")
    policy = rl.ActorCritic(lm)
    ref = copy.deepcopy(policy).eval()
    items = [{"prompt_ids": p, "row": {"k": i}} for i, p in enumerate(_prompts(tok, 3))]

    def reward_fn(its, texts, ids):
        return [float(len(x)) for x in ids], ["ok"] * len(ids), [{}] * len(ids)

    cfg = _direct_cfg(prompts_per_step=3, max_new_tokens=5, micro_batch_size=2, overlong="masked", kl_coef=0.1)
    d = C.Dist()
    ro = rl.rollout(policy, items, reward_fn, cfg, tok, d, torch.float32, 1, 0)
    n, T = ro.tokens.shape
    ro.finished[:] = torch.arange(n) % 3 == 0  # two thirds of the rows truncated (masked out)
    mask = rl.rollout_mask(ro.lengths, ro.finished, T, "masked")
    calls = []
    ref.register_forward_hook(lambda *a: calls.append(1))
    outs = [rl.forward_old(policy, ref, None, ro, cfg, tok, d, torch.float32, True, True, False, m)
            for m in (mask, torch.ones(n, T))]
    live = mask.any(1)
    assert 0 < live.sum() < n
    for key in ("old_logp", "ref_logp"):
        assert (outs[0][key][~live] == 0).all()
        torch.testing.assert_close(outs[0][key][live] * mask[live], outs[1][key][live] * mask[live],
                                   atol=1e-5, rtol=0)
        assert (outs[1][key][live] * mask[live]).abs().sum() > 0
    n_live_mb = -(-int(live.sum()) // cfg.micro_batch_size)
    assert len(calls) == n_live_mb + -(-n // cfg.micro_batch_size)  # skipped, then every row


def test_s2r_process_advantages_in_the_loop(tmp_path):
    def reward_fn(items, texts, ids):  # pretend every response is attempt + verification
        infos = [{"steps": [{"kind": "attempt", "start": 0, "end": 1, "reward": float(x[0] % 2)},
                            {"kind": "verify", "start": 1, "end": 10 ** 6, "reward": float(x[-1] % 2)}]} for x in ids]
        return [float(x[0] % 2) for x in ids], ["ok"] * len(ids), infos

    res, _ = _run_direct(tmp_path, _direct_cfg(s2r_reward="both"), reward_fn, kind="stem")
    assert torch.isfinite(torch.tensor(res["history"][0]["loss"]))
    ids = res["last_rollout"].tokens  # the logged process level: one verification each, right when the last id is odd
    h = res["history"][-1]
    last = [int(ids[i, int(res["last_rollout"].lengths[i]) - 1]) % 2 for i in range(ids.shape[0])]
    assert h["verify_per_resp"] == 1.0 and h["verify_reward_mean"] == pytest.approx(sum(last) / len(last))


def test_s2r_train_attempts_leaves_verification_tokens_out_of_the_policy_gradient():
    """--s2r_train attempts with the outcome reward: the tokens of the attempt step carry the
    group advantage, those of the verification step (and the EOS after it) 0."""
    lm, tok = M.load_model_and_tokenizer("tiny")
    torch.manual_seed(0)
    policy = rl.ActorCritic(lm)
    items = [{"prompt_ids": p, "row": {"k": i}} for i, p in enumerate(_prompts(tok, 2))]
    cut = 3  # characters: the attempt step ends here, the verification runs to the end

    def reward_fn(its, texts, ids):
        infos = [{"steps": [{"kind": "attempt", "start": 0, "end": cut, "reward": float(x[0] % 2)},
                            {"kind": "verify", "start": cut, "end": 10 ** 6, "reward": 1.0}]} for x in ids]
        return [float(x[0] % 2) + 0.1 * len(x) for x in ids], ["ok"] * len(ids), infos

    cfg = _direct_cfg(prompts_per_step=2, max_new_tokens=8, s2r_train="attempts")
    d = C.Dist()
    ro = rl.rollout(policy, items, reward_fn, cfg, tok, d, torch.float32, 1, 0)
    b = rl.score(ro, policy, None, None, cfg, "stem", tok, d, torch.float32, {"mean": 0.0, "var": 1.0, "count": 0})
    group = rl.group_advantages(b["total"], cfg.group_size, cfg.std_norm)[0]
    checked = 0
    for i in range(len(ro.texts)):
        offs = rl.char_offsets(tok, ro.tokens[i, :int(ro.lengths[i])].tolist())
        for t, off in enumerate(offs):
            want = float(group[i]) if off < cut else 0.0
            assert b["adv"][i, t].item() == pytest.approx(want, abs=1e-6), (i, t)
            checked += want != 0
    assert checked > 0 and (b["adv"] == 0).any()  # both kinds of token were there


# ---------------------------------------------------------------------------- learning

def _learn(tmp_path, algo, steps, extra=()):
    out = tmp_path / algo
    rl.main(TINY + ["--out_dir", str(out), "--stages", f"toy:{ROOT}/data/math_train.jsonl:{steps}",
                    "--algo", algo, "--prompts_per_step", "4", "--group_size", "8", "--micro_batch_size", "8",
                    "--max_new_tokens", "8", "--lr", "3e-3", "--kl_coef", "0", "--format_weight", "0",
                    *extra])
    r = [m["reward_mean"] for m in _metrics(out)]
    return sum(r[:3]) / 3, sum(r[-3:]) / 3


def test_grpo_learns_toy_task(tmp_path):
    """Reward = fraction of lowercase letters (optimum 1.0, chance ~26/259)."""
    start, end = _learn(tmp_path, "grpo", 30)
    assert start < 0.3
    assert end > 0.8


def test_ppo_learns_toy_task(tmp_path):
    start, end = _learn(tmp_path, "ppo", 16, ["--ppo_epochs", "2", "--num_minibatches", "2",
                                              "--clip_high", "0.2", "--vf_coef", "0.5"])
    assert start < 0.3
    assert end > 0.8


# ---------------------------------------------------------------------------- reward model

def _toy_prefs(path, n, seed):
    import random
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            q = f"Please answer question {rng.randint(0, 999)}."
            good = rng.choice(["Sure, happy to help: ", "Of course! ", "Gladly: "]) + "here it is."
            bad = rng.choice(["NO.", "Go away!!", "???"])
            f.write(json.dumps({"prompt": q, "chosen": good, "rejected": bad}) + "\n")


def test_rm_accuracy_in_length_order_equals_each_pair_scored_alone():
    """rm_accuracy batches the pairs in order of length: the count must equal a naive loop that
    scores each chosen and rejected sequence alone, unpadded (fp32), whatever order the file has."""
    torch.manual_seed(5)
    lm, tok = M.load_model_and_tokenizer("tiny")
    rm = rl.ScalarHeadModel(lm).eval()
    g = torch.Generator().manual_seed(0)
    rand = lambda: torch.randint(5, 200, (int(torch.randint(3, 40, (1,), generator=g)),), generator=g).tolist()  # noqa: E731
    pairs = [(rand(), rand()) for _ in range(13)]
    d = C.Dist()
    with torch.no_grad():
        alone = [float(rm(torch.tensor([c]), torch.arange(len(c))[None])[0, -1] >
                       rm(torch.tensor([j]), torch.arange(len(j))[None])[0, -1]) for c, j in pairs]
    assert 0 < sum(alone) < len(pairs)  # both outcomes occur: the check can fail
    for batch in (1, 4, 8):
        acc = rl.rm_accuracy(rm, pairs, tok.pad_token_id, d.device, d, torch.float32, batch=batch)
        assert acc == pytest.approx(sum(alone) / len(pairs)), batch


def test_reward_model_bradley_terry_then_pref_stage(tmp_path):
    _toy_prefs(tmp_path / "tr.jsonl", 64, 0)
    _toy_prefs(tmp_path / "te.jsonl", 32, 1)
    out = tmp_path / "run"
    res = rl.main(TINY + ["--mode", "train_reward_model", "--out_dir", str(out), "--pref_train",
                          str(tmp_path / "tr.jsonl"), "--pref_test", str(tmp_path / "te.jsonl"),
                          "--rm_steps", "30", "--rm_batch_pairs", "8", "--micro_batch_size", "8", "--rm_lr", "3e-3"])
    assert res["rm_test_acc_after"] >= 0.9
    assert (out / "reward_model" / "head.pt").exists() and (out / "reward_model" / "config.json").exists()
    # the pref sub-stage scores rollouts with it (normalised), and the eval reports the RM score
    summary = rl.main(TINY[:-1] + ["--out_dir", str(out), "--stages", f"pref:{tmp_path}/tr.jsonl:2",
                                   "--max_new_tokens", "6", "--eval_kinds", "pref", "--eval_limit", "4",
                                   "--eval_max_new_tokens", "6", "--pref_test", str(tmp_path / "te.jsonl")])
    assert "rm_score" in summary[-1]
    m = _metrics(out)
    assert len(m) == 2 and m[0]["kind"] == "pref" and m[0]["reward_fail_nan"] == 0


def test_stage_spec_parsing(tmp_path):
    st = rl.parse_stages(rl.Config(stages="stem:a.jsonl:20 -> code:b.jsonl:10steps -> pref:c.jsonl:5"))
    assert [(s["kind"], s["data"], s["steps"]) for s in st] == [("stem", "a.jsonl", 20), ("code", "b.jsonl", 10),
                                                                 ("pref", "c.jsonl", 5)]
    f = tmp_path / "s.json"
    f.write_text(json.dumps([{"kind": "stem", "data": "a.jsonl", "steps": 3, "algo": "ppo", "lr": 1e-5}]))
    st = rl.parse_stages(rl.Config(stages_file=str(f)))
    assert st[0]["overrides"] == {"algo": "ppo", "lr": 1e-5}
    f.write_text(json.dumps([{"kind": "stem", "data": "a.jsonl", "steps": 3, "lr_typo": 1}]))
    with pytest.raises(ValueError, match="lr_typo"):
        rl.parse_stages(rl.Config(stages_file=str(f)))
    with pytest.raises(ValueError, match="kind"):
        rl.parse_stages(rl.Config(stages="math:a.jsonl:3"))


# ---------------------------------------------------------------------------- world-size invariance

def _one_vs_two_processes(tmp_path, args):
    """Run 04_rl.py with `args` as 1 process and as 2 torchrun (gloo) processes."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    script = os.path.join(ROOT, "04_rl.py")
    for cmd, out in (([sys.executable, script], "w1"),
                     ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", script], "w2")):
        r = subprocess.run([*cmd, *args, "--out_dir", str(tmp_path / out)], cwd=ROOT, env=env, capture_output=True,
                           text=True)
        assert r.returncode == 0, r.stderr[-3000:]


@pytest.mark.slow
def test_reward_model_one_process_equals_two_processes(tmp_path):
    """Bradley-Terry RM training sharded over 2 ranks (each takes half of every batch, the loss
    divided by the global pair count) == 1 process with the whole batch."""
    from safetensors.torch import load_file
    _toy_prefs(tmp_path / "tr.jsonl", 16, 0)
    _toy_prefs(tmp_path / "te.jsonl", 5, 1)  # odd: the ranks score different numbers of pairs
    _one_vs_two_processes(tmp_path, TINY + ["toy", "--mode", "train_reward_model", "--pref_train",
                                            str(tmp_path / "tr.jsonl"), "--pref_test", str(tmp_path / "te.jsonl"),
                                            "--rm_steps", "3", "--rm_batch_pairs", "4", "--micro_batch_size", "2",
                                            "--rm_lr", "3e-3"])
    ha, hb = (torch.load(tmp_path / w / "reward_model" / "head.pt") for w in ("w1", "w2"))
    a, b = (load_file(tmp_path / w / "reward_model" / "model.safetensors") for w in ("w1", "w2"))
    init = M.load_model_and_tokenizer("tiny")[0].state_dict()
    # Adam's update is scale-free, so the loss scale is checked on the gradient norms (a loss
    # divided by the local instead of the global pair count would double them); the weights agree
    # up to summation-order noise that Adam amplifies on near-zero gradients (moved ~1e-2)
    la, lb = (_metrics(tmp_path / w / "reward_model_logs") for w in ("w1", "w2"))
    assert [m["grad_norm"] for m in la] == pytest.approx([m["grad_norm"] for m in lb], rel=1e-5)
    assert [m["rm_loss"] for m in la] == pytest.approx([m["rm_loss"] for m in lb], rel=1e-5)
    assert max((a[k] - init[k]).abs().max().item() for k in a) > 1e-3
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4
    # the head's bias is not identified by Bradley-Terry (r_c - r_r cancels it: zero gradient), so
    # Adam moves it by noise; its weight is compared
    assert torch.allclose(ha["weight"], hb["weight"], atol=1e-4)
    ra, rb = (json.loads((tmp_path / w / "reward_model" / "rm_eval.json").read_text()) for w in ("w1", "w2"))
    assert ra["n_test"] == rb["n_test"] == 5 and ra["rm_test_acc_before"] == rb["rm_test_acc_before"]


@pytest.mark.slow
def test_ppo_separate_critic_one_process_equals_two_processes(tmp_path):
    """PPO with a separate (sharded) value model: 2 PPO epochs x 2 minibatches, 1 process x
    accumulation 2 vs 2 processes x 1; policy weights and value losses agree."""
    from safetensors.torch import load_file
    _one_vs_two_processes(tmp_path, TINY + ["toy", "--eval_limit", "2", "--eval_max_new_tokens", "4",
                                            "--stages", f"toy:{ROOT}/data/math_train.jsonl:1", "--algo", "ppo",
                                            "--critic", "separate", "--ppo_epochs", "2", "--num_minibatches", "2",
                                            "--max_new_tokens", "6", "--prompts_per_step", "2", "--group_size", "4",
                                            "--micro_batch_size", "2", "--lr", "1e-3", "--critic_lr", "1e-3",
                                            "--kl_coef", "0", "--reproducible_rollouts", "true"])
    m1, m2 = _metrics(tmp_path / "w1")[0], _metrics(tmp_path / "w2")[0]
    assert m1["reward_mean"] == m2["reward_mean"]
    assert m1["value_loss"] == pytest.approx(m2["value_loss"], rel=1e-5)
    assert m1["grad_norm"] == pytest.approx(m2["grad_norm"], rel=1e-5)
    a, b = (load_file(tmp_path / w / "final" / "model.safetensors") for w in ("w1", "w2"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("overlong", ["none", "masked"])
def test_one_process_accum2_equals_two_processes(tmp_path, overlong):
    """One GRPO update (with a sharded reference model and KL in the loss): 1 process with 2
    micro-batches vs 2 processes with 1 each, the same reproducible rollouts; compare weights.
    masked: the truncated rows are left out of the reference's forward (`forward_old`) and of
    the update, a different number on each rank, padded to the same micro-batch count."""
    from safetensors.torch import load_file
    args = TINY + ["--stages", f"toy:{ROOT}/data/math_train.jsonl:1", "--max_new_tokens", "6",
                   "--prompts_per_step", "2", "--group_size", "4", "--micro_batch_size", "4", "--lr", "1e-3",
                   "--kl_coef", "0.1", "--reproducible_rollouts", "true", "--overlong", overlong,
                   "--stop_strings", "e"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    script = os.path.join(ROOT, "04_rl.py")
    subprocess.run([sys.executable, script, *args, "--out_dir", str(tmp_path / "w1")], cwd=ROOT, env=env,
                   check=True, capture_output=True)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", script, *args,
                    "--out_dir", str(tmp_path / "w2")], cwd=ROOT, env=env, check=True, capture_output=True)
    m1, m2 = _metrics(tmp_path / "w1")[0], _metrics(tmp_path / "w2")[0]
    assert m1["reward_mean"] == m2["reward_mean"] and m1["reward_mean"] > 0
    assert m1["grad_norm"] == pytest.approx(m2["grad_norm"], rel=1e-5)
    assert 0 < m1["truncated_frac"] < 1  # some rows are truncated (masked out), some are trained
    a = load_file(tmp_path / "w1" / "final" / "model.safetensors")
    b = load_file(tmp_path / "w2" / "final" / "model.safetensors")
    init = M.load_model_and_tokenizer("tiny")[0].state_dict()
    moved = max((a[k] - init[k]).abs().max().item() for k in a)
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    assert moved > 1e-4  # the update did something ...
    assert diff < 1e-6   # ... and the same thing in both layouts


# ---------------------------------------------------------------------------- resume inside a sub-stage

@pytest.mark.parametrize("critic", ["separate", "head"])
def test_killed_run_resumes_mid_stage_like_uninterrupted(tmp_path, monkeypatch, critic):
    """PPO (critic and its optimizer, value head, policy optimizer, RNG all in the checkpoint):
    4 steps straight == killed during step 3 (after the step-2 checkpoint) then resumed."""
    from safetensors.torch import load_file
    args = TINY + ["toy", "--eval_limit", "2", "--eval_max_new_tokens", "4",
                   "--stages", f"toy:{ROOT}/data/math_train.jsonl:4", "--algo", "ppo", "--critic", critic,
                   "--prompts_per_step", "2", "--group_size", "2", "--micro_batch_size", "2",
                   "--max_new_tokens", "6", "--lr", "1e-3", "--critic_lr", "1e-3", "--kl_coef", "0.05",
                   "--save_every", "2"]
    rl.main(args + ["--out_dir", str(tmp_path / "straight")])
    assert not (tmp_path / "straight" / "1_toy_ckpts").exists()  # removed once the sub-stage finished

    with killed_at_log(monkeypatch, lambda step, metrics: step == 2):
        rl.main(args + ["--out_dir", str(tmp_path / "killed")])
    ck = tmp_path / "killed" / "1_toy_ckpts" / "ckpt-000002"
    assert (ck / "state.json").exists() and not (tmp_path / "killed" / "1_toy").exists()
    assert (ck / "critic.pt").exists() if critic == "separate" else (ck / "extra_state.pt").exists()
    rl.main(args + ["--out_dir", str(tmp_path / "killed"), "--resume", "true"])

    a = load_file(tmp_path / "straight" / "final" / "model.safetensors")
    b = load_file(tmp_path / "killed" / "final" / "model.safetensors")
    init = M.load_model_and_tokenizer("tiny")[0].state_dict()
    assert max((a[k] - init[k]).abs().max().item() for k in a) > 1e-4
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    ma, mb = _metrics(tmp_path / "straight"), _metrics(tmp_path / "killed")
    assert [m["step"] for m in mb] == [0, 1, 2, 3]
    for x, y in zip(ma, mb):
        assert x["reward_mean"] == y["reward_mean"] and x["value_loss"] == pytest.approx(y["value_loss"], rel=1e-5)
    summary = json.loads((tmp_path / "killed" / "summary.json").read_text())
    assert [r["after"] for r in summary] == ["start", "1_toy"]


def test_select_prompts_by_difficulty():
    prompts = [{"row": {"difficulty": d}} for d in (1, 2, 3)] + [{"row": {}}]
    assert rl.select_prompts(prompts, -1, "f") == prompts
    assert [p["row"].get("difficulty") for p in rl.select_prompts(prompts, 2, "f")] == [1, 2, None]
    with pytest.raises(ValueError, match="difficulty <= 0"):
        rl.select_prompts(prompts[:3], 0, "f")
