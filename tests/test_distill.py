"""Tests of 03_distill.py (stage 3: dual-level distillation), tiny models.

Every divergence against a float64 loop and its closed-form cases; top-k with k = V equals the full
loss; the chunked student path against a naive full-logits one (values and gradients); DPO's closed
form and gradient sign; building a student from the teacher's layers; bad input (vocabulary,
template, prompts, caches); and real CLI runs: the teacher stays frozen, the held-out KL falls,
kill-and-resume, 1 process x accumulation 2 == 2 processes (torchrun, gloo, fp32), bf16 compute.
"""
import json
import math
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import common as C  # noqa: E402
import models as M  # noqa: E402
from stage_scripts import load_script  # noqa: E402

D3 = load_script("03_distill.py", "distill")
DATA = ROOT / "data"


# ----------------------------------------------------------------------------------------------
# Naive references: python loops over plain float64 probabilities


def probs(logits):
    return torch.softmax(logits.double(), -1)


def naive_kl(p, q):
    return sum(p[i] * math.log(p[i] / q[i]) for i in range(len(p)) if p[i] > 0)


def naive(kind, ps, pt, beta=0.5, a=0.1):
    """One divergence per row, from probability rows (python floats)."""
    out = []
    for s, t in zip(ps.tolist(), pt.tolist()):
        if kind == "fkl":
            out.append(naive_kl(t, s))
        elif kind == "rkl":
            out.append(naive_kl(s, t))
        elif kind == "jsd":
            m = [beta * ti + (1 - beta) * si for si, ti in zip(s, t)]
            out.append(beta * naive_kl(t, m) + (1 - beta) * naive_kl(s, m))
        elif kind == "skew_fkl":
            out.append(naive_kl(t, [a * ti + (1 - a) * si for si, ti in zip(s, t)]))
        elif kind == "skew_rkl":
            out.append(naive_kl(s, [a * si + (1 - a) * ti for si, ti in zip(s, t)]))
        elif kind == "tvd":
            out.append(0.5 * sum(abs(ti - si) for si, ti in zip(s, t)))
    return torch.tensor(out, dtype=torch.float64)


def kd_of(kind, beta=0.5, a=0.1, **kw):
    return D3.KD(divergence=kind, beta=beta, skew=a, **kw)


@pytest.fixture
def two_dists():
    g = torch.Generator().manual_seed(0)
    zs, zt = torch.randn(6, 7, generator=g) * 2, torch.randn(6, 7, generator=g) * 2
    return zs.double().log_softmax(-1), zt.double().log_softmax(-1)


@pytest.mark.parametrize("kind,beta,a", [("fkl", 0, 0), ("rkl", 0, 0), ("jsd", 0.5, 0), ("jsd", 0.1, 0),
                                         ("jsd", 0.9, 0), ("skew_fkl", 0, 0.1), ("skew_fkl", 0, 0.5),
                                         ("skew_rkl", 0, 0.1), ("skew_rkl", 0, 0.7), ("tvd", 0, 0)])
def test_divergences_equal_float64_loops(two_dists, kind, beta, a):
    s, t = two_dists
    got = D3.token_divergence(s, t, kd_of(kind, beta, a))
    assert torch.allclose(got, naive(kind, s.exp(), t.exp(), beta, a), rtol=1e-10, atol=1e-12)
    # float32 (what training uses) within float32 rounding
    got32 = D3.token_divergence(s.float(), t.float(), kd_of(kind, beta, a))
    assert torch.allclose(got32.double(), naive(kind, s.exp(), t.exp(), beta, a), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", D3.DIVERGENCE_NAMES)
def test_identical_distributions_give_zero(two_dists, kind):
    s, _ = two_dists
    assert D3.token_divergence(s, s.clone(), kd_of(kind, 0.3, 0.2)).abs().max() < 1e-12


def test_jsd_limits_and_bounds(two_dists):
    s, t = two_dists
    fkl, rkl = D3.forward_kl(s, t), D3.reverse_kl(s, t)
    assert torch.equal(D3.generalized_jsd(s, t, 0.0), fkl) and torch.equal(D3.generalized_jsd(s, t, 1.0), rkl)
    eps = 1e-5  # the documented limits: JSD(b)/b -> KL(T||S) as b -> 0, JSD(b)/(1-b) -> KL(S||T) as b -> 1
    assert torch.allclose(D3.generalized_jsd(s, t, eps) / eps, fkl, rtol=1e-3)
    assert torch.allclose(D3.generalized_jsd(s, t, 1 - eps) / eps, rkl, rtol=1e-3)
    # disjoint supports: JSD(0.5) = log 2 exactly, TVD = 1
    a = torch.tensor([[0.0, -float("inf")]]).double()
    b = torch.tensor([[-float("inf"), 0.0]]).double()
    assert D3.generalized_jsd(a, b, 0.5).item() == pytest.approx(math.log(2), rel=1e-12)
    assert D3.total_variation(a, b).item() == pytest.approx(1.0)
    assert torch.isfinite(D3.forward_kl(a, b)).all()  # clamped at LOG_FLOOR, not inf / nan


def test_skew_limits(two_dists):
    s, t = two_dists
    assert torch.equal(D3.skew_forward_kl(s, t, 0.0), D3.forward_kl(s, t))
    assert torch.equal(D3.skew_reverse_kl(s, t, 0.0), D3.reverse_kl(s, t))
    assert D3.skew_forward_kl(s, t, 1.0).abs().max() == 0 and D3.skew_reverse_kl(s, t, 1.0).abs().max() == 0
    assert (D3.skew_forward_kl(s, t, 0.1) < D3.forward_kl(s, t)).all()  # mixing in the teacher shrinks it
    with pytest.raises(ValueError, match="skew alpha"):
        D3.skew_forward_kl(s, t, 1.5)
    with pytest.raises(ValueError, match="beta"):
        D3.generalized_jsd(s, t, -0.1)


def test_gradients_are_finite_at_zero_mass():
    s = torch.tensor([[0.0, -float("inf"), -1.0]], requires_grad=True)
    t = torch.tensor([[-0.5, -1.0, -float("inf")]]).log_softmax(-1)
    for kind in D3.DIVERGENCE_NAMES:
        s.grad = None
        D3.token_divergence(s.log_softmax(-1), t, kd_of(kind, 0.5, 0.1)).sum().backward()
        assert torch.isfinite(s.grad).all(), kind


@pytest.mark.parametrize("kind,beta,a", [("fkl", 0, 0), ("rkl", 0, 0), ("jsd", 0.5, 0), ("jsd", 0.2, 0),
                                         ("jsd", 0.0, 0), ("jsd", 1.0, 0), ("skew_fkl", 0, 0.1), ("skew_fkl", 0, 1.0),
                                         ("skew_rkl", 0, 0.3), ("skew_rkl", 0, 0.0), ("tvd", 0, 0)])
def test_divergence_grad_equals_autograd(two_dists, kind, beta, a):
    """The written-out d div / d s (divergence_grad, used by the student's chunk) against autograd
    through token_divergence, float64; and at zero mass (-inf log-probs on either side) both agree
    and stay finite."""
    s, t = two_dists
    zero_s = torch.tensor([[0.0, -float("inf"), -1.0]]).double().log_softmax(-1)
    zero_t = torch.tensor([[-0.5, -1.0, -float("inf")]]).double().log_softmax(-1)
    for s_logp, t_logp in ((s, t), (zero_s, zero_t), (zero_t, zero_s)):
        x = s_logp.clone().requires_grad_()
        div = D3.token_divergence(x, t_logp, kd_of(kind, beta, a)).sum()
        want = torch.autograd.grad(div, x)[0] if div.requires_grad else torch.zeros_like(x)  # skew a = 1: 0
        got = D3.divergence_grad(s_logp, t_logp, kd_of(kind, beta, a))
        assert torch.isfinite(got).all()
        assert torch.allclose(got, want, rtol=1e-10, atol=1e-12), (got, want)


@pytest.mark.parametrize("kind,top_k,tail,T,vocab", [("jsd", 0, True, 1.0, 0), ("rkl", 0, True, 2.0, 0),
                                                     ("fkl", 4, True, 1.0, 0), ("skew_rkl", 4, False, 0.7, 0),
                                                     ("tvd", 3, True, 1.0, 9), ("skew_fkl", 0, True, 1.5, 9)])
def test_student_chunk_backward_gradcheck(kind, top_k, tail, T, vocab):
    """_ChunkDivergence's hand-written backward (through the support, the temperature, padded
    vocabulary rows and the label log-prob) against finite differences, float64, two chunks;
    and a student so sure of the teacher's top-k that log1mexp's clamp holds the tail bucket: the
    gradient is still autograd's (through student_chunks' pure pieces)."""
    g = torch.Generator().manual_seed(3)
    n, H, V = 5, 4, 12
    h = torch.randn(n, H, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(V, H, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, V, (n,), generator=g)
    kd = kd_of(kind, 0.5, 0.2, temperature=T, top_k=top_k, tail=tail, vocab=vocab)
    real = vocab or V
    t_vals, t_idx = D3.teacher_topk((torch.randn(n, real, generator=g, dtype=torch.float64) * 2).log_softmax(-1),
                                    top_k, tail)
    c_lp, c_dv = torch.randn(n, generator=g, dtype=torch.float64), torch.randn(n, generator=g, dtype=torch.float64)

    def f(h, w):
        lp, dv = D3.student_chunks(h, w, y, t_vals, t_idx, kd, chunk_size=3)
        return (c_lp * lp).sum() + (c_dv * dv).sum()
    assert torch.autograd.gradcheck(f, (h, w))
    # the tail clamp: the student puts all its mass (in float64's rounding) on the teacher's top 4
    if top_k and tail:
        big = torch.zeros(n, V, dtype=torch.float64)
        big.scatter_(-1, t_idx, 80.0)
        hh, ww = big.clone().requires_grad_(), torch.eye(V, dtype=torch.float64).requires_grad_()
        D3.student_chunks(hh, ww, y, t_vals, t_idx, kd, chunk_size=3)[1].sum().backward()
        z = big.clone().requires_grad_()
        s, tail_s = D3._student_support(z, t_idx, tail, kd)
        D3.token_divergence(tail_s, t_vals, kd).sum().backward()
        assert torch.allclose(hh.grad, z.grad, atol=1e-12)


def test_topk_support_and_tail_against_loops():
    g = torch.Generator().manual_seed(1)
    t_logp = (torch.randn(5, 11, generator=g) * 3).double().log_softmax(-1)
    s_logp = (torch.randn(5, 11, generator=g) * 3).double().log_softmax(-1)
    vals, idx = D3.teacher_topk(t_logp, 3, tail=True)
    for r in range(5):
        top = sorted(range(11), key=lambda v: -t_logp[r, v].item())[:3]
        assert sorted(idx[r].tolist()) == sorted(top)
        pt = t_logp[r].exp()
        want = [pt[v].item() for v in idx[r].tolist()] + [1 - sum(pt[v].item() for v in top)]
        assert torch.allclose(vals[r].exp(), torch.tensor(want).double(), atol=1e-12)
        ps = D3.on_support(s_logp, idx, tail=False)[r].exp()
        raw = [s_logp[r, v].exp().item() for v in idx[r].tolist()]
        assert torch.allclose(ps, torch.tensor(raw).double() / sum(raw), atol=1e-12)  # renormalised
    full_t, none = D3.teacher_topk(t_logp, 0, True)
    assert none is None and torch.equal(full_t, t_logp)
    for tail in (True, False):  # k = V: the same distribution, permuted; every divergence unchanged
        v, ix = D3.teacher_topk(t_logp, 11, tail)
        assert ix is None
        for kind in D3.DIVERGENCE_NAMES:
            assert torch.allclose(D3.token_divergence(s_logp, v, kd_of(kind)),
                                  D3.token_divergence(s_logp, t_logp, kd_of(kind)))


def test_dpo_closed_form_and_gradient_sign():
    lc = torch.tensor([-1.0], dtype=torch.float64, requires_grad=True)
    lr = torch.tensor([-2.0], dtype=torch.float64, requires_grad=True)
    loss, m = D3.dpo_loss(lc, lr, torch.tensor([-1.5]).double(), torch.tensor([-1.5]).double(), beta=0.5)
    assert m.item() == pytest.approx(0.5)                      # 0.5 * ((-1 + 1.5) - (-2 + 1.5))
    assert loss.item() == pytest.approx(math.log1p(math.exp(-0.5)), rel=1e-12)   # -log sigmoid(0.5)
    loss.sum().backward()
    sig = 1 / (1 + math.exp(0.5))                              # sigmoid(-m)
    assert lc.grad.item() == pytest.approx(-0.5 * sig) and lr.grad.item() == pytest.approx(0.5 * sig)
    assert lc.grad.item() < 0 < lr.grad.item()                 # descent: chosen up, rejected down
    z, _ = D3.dpo_loss(torch.zeros(3), torch.zeros(3), torch.zeros(3), torch.zeros(3), 0.1)
    assert torch.allclose(z, torch.full((3,), math.log(2)))   # no preference yet: log 2


def test_token_level_loss_normalisation_and_temperature():
    div = torch.tensor([1.0, 2.0, 3.0])
    assert D3.token_level_loss(div, 6, 1.0).item() == pytest.approx(1.0)
    assert D3.token_level_loss(div, 6, 2.0).item() == pytest.approx(4.0)  # T^2


# ----------------------------------------------------------------------------------------------
# The chunked student / teacher paths against a naive full-logits computation


@pytest.fixture(scope="module")
def tok():
    return M.tiny_tokenizer()


def rows_for(tok, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        L = 12 + 3 * i
        ids = torch.randint(3, len(tok), (L,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [C.IGNORE] * 5 + ids[5:]})
    return out


def naive_student_loss(lm, teacher_lm, b, kd):
    """Full [B, T, V] logits of both models, float64, masked sum of the divergence."""
    logits = lm(input_ids=b["input_ids"], position_ids=b["position_ids"]).logits[:, :-1].double()
    with torch.no_grad():
        t_logits = teacher_lm(input_ids=b["input_ids"], position_ids=b["position_ids"]).logits[:, :-1].double()
    sel = b["labels"][:, 1:] != C.IGNORE
    s = (logits[sel] / kd.temperature).log_softmax(-1)
    t = (t_logits[sel] / kd.temperature).log_softmax(-1)
    if kd.top_k:
        t, idx = D3.teacher_topk(t, kd.top_k, kd.tail)
        if idx is not None:
            s = D3.on_support(s, idx, kd.tail)
    return D3.token_divergence(s, t, kd).sum()


@pytest.mark.parametrize("kind,top_k,tail,T", [("fkl", 0, True, 1.0), ("rkl", 0, True, 2.0), ("jsd", 0, True, 1.0),
                                               ("fkl", 8, True, 1.0), ("rkl", 8, False, 1.0), ("tvd", 5, True, 1.5),
                                               ("skew_fkl", 16, True, 1.0)])
def test_chunked_student_matches_naive_values_and_grads(tok, kind, top_k, tail, T):
    lm, t_lm = M.tiny_model(tok, seed=0), M.tiny_model(tok, seed=1)
    kd = D3.KD(divergence=kind, temperature=T, top_k=top_k, tail=tail)
    b = C.collate(rows_for(tok), tok.pad_token_id)
    teacher = D3.TeacherModel(t_lm, chunk_size=7).eval()
    student = D3.StudentModel(lm, chunk_size=5)  # chunks cross row boundaries
    t = teacher(b["input_ids"], b["labels"], b["position_ids"], kd=kd)
    out = student(b["input_ids"], b["labels"], b["position_ids"], t_vals=t["vals"], t_idx=t["idx"], kd=kd)
    out["div"].sum().backward()
    g_chunked = {n: p.grad.clone() for n, p in lm.named_parameters()}
    lm.zero_grad()
    ref = naive_student_loss(lm, t_lm, b, kd)
    ref.backward()
    assert out["div"].sum().item() == pytest.approx(ref.item(), rel=1e-4, abs=1e-6)
    for n, p in lm.named_parameters():
        assert torch.allclose(g_chunked[n], p.grad, rtol=1e-3, atol=1e-6), n
    # the label log-probs are HF's own log_softmax gathered
    full = lm(input_ids=b["input_ids"], position_ids=b["position_ids"]).logits.log_softmax(-1)
    want = full[:, :-1].gather(-1, b["input_ids"][:, 1:, None]).squeeze(-1) * (b["labels"][:, 1:] != C.IGNORE)
    assert torch.allclose(out["logp"][:, 1:], want, atol=1e-5)


def test_topk_with_k_equal_vocab_equals_full_loss(tok):
    lm, t_lm = M.tiny_model(tok, seed=0), M.tiny_model(tok, seed=1)
    b = C.collate(rows_for(tok), tok.pad_token_id)
    teacher, student = D3.TeacherModel(t_lm).eval(), D3.StudentModel(lm)
    V = len(tok)
    for kind in D3.DIVERGENCE_NAMES:
        res = []
        for k in (0, V, V + 5):
            kd = D3.KD(divergence=kind, top_k=k)
            t = teacher(b["input_ids"], b["labels"], b["position_ids"], kd=kd)
            with torch.no_grad():
                res.append(student(b["input_ids"], b["labels"], b["position_ids"], t_vals=t["vals"], t_idx=t["idx"],
                                   kd=kd)["div"].sum().item())
        assert res[1] == pytest.approx(res[0], rel=1e-6) and res[2] == pytest.approx(res[0], rel=1e-6), kind


def test_teacher_forward_never_builds_a_graph(tok):
    teacher = D3.TeacherModel(D3.frozen(M.tiny_model(tok), torch.float32))
    b = C.collate(rows_for(tok), tok.pad_token_id)
    t = teacher(b["input_ids"], b["labels"], b["position_ids"], kd=D3.KD(top_k=4))
    assert not t["vals"].requires_grad and t["idx"].shape == (t["vals"].shape[0], 4) and t["vals"].shape[1] == 5
    assert all(not p.requires_grad for p in teacher.parameters()) and not teacher.training


def test_paired_speed_alternates_student_and_teacher(tok, monkeypatch):
    """The speed-up is measured S T, T S, S T (ABBA: drift of the machine hits both, a steady drift
    favours neither), each model's rate the
    median of its calls: fake clocks make every student call take 1 s and the teacher's 2, 3, 4 s,
    so the medians are 1 and 3 and the speed-up 3 (the pairs' 2-4); a warm-up call of each is not timed."""
    student, teacher = M.tiny_model(tok, seed=0), D3.TeacherModel(D3.frozen(M.tiny_model(tok, seed=1), torch.float32))
    calls, clock = [], {"t": 0.0}
    cost = {"student": iter([1.0, 1.0, 1.0]), "teacher": iter([2.0, 4.0, 3.0])}

    def fake_generate(m, prompts, n, *a, **k):
        who = "student" if m is student else "teacher"
        calls.append((who, n))
        if n == 7:  # a timed call (warm-ups ask for 2 tokens)
            clock["t"] += next(cost[who])

    monkeypatch.setattr(D3.S, "generate", fake_generate)
    monkeypatch.setattr(D3.time, "perf_counter", lambda: clock["t"])
    cfg = D3.Config(speed_tokens=7, speed_repeats=3)
    d = C.init_distributed("cpu")
    got = D3.paired_speed(student, teacher, [[5, 6]] * 4, cfg, d, torch.float32)
    assert [w for w, n in calls if n == 7] == ["student", "teacher", "teacher", "student", "student", "teacher"]
    assert sorted(w for w, n in calls if n == 2) == ["student", "teacher"]
    assert got["student_tok_per_s"] == pytest.approx(4 * 7 / 1.0) and got["teacher_tok_per_s"] == pytest.approx(4 * 7 / 3.0)
    assert got["speedup"] == pytest.approx(3.0)
    assert (got["speedup_pairs_min"], got["speedup_pairs_max"]) == (pytest.approx(2.0), pytest.approx(4.0))  # 2/1 4/1 3/1
    assert D3.paired_speed(student, teacher, [], cfg, d, torch.float32) == {}


# ----------------------------------------------------------------------------------------------
# Building the student, checking compatibility


def test_pick_layers():
    got = D3.pick_layers("15", 30)
    assert len(got) == 15 and got[0] == 0 and got[-1] == 29 and got == sorted(set(got))
    assert D3.pick_layers("2", 4) == [0, 3] and D3.pick_layers("1", 4) == [0] and D3.pick_layers("4", 4) == [0, 1, 2, 3]
    assert D3.pick_layers("0,2,3", 4) == [0, 2, 3]
    for bad in ("5", "0", "3,1", "0,4", "x"):
        with pytest.raises(ValueError, match="student_layers"):
            D3.pick_layers(bad, 4)


def test_layer_scores_against_a_loop_and_closed_forms():
    """block_distances / block_influence against per-position loops with math.acos (float64), and
    the closed forms: a block that returns its input (distance 0, BI 0), one that turns every
    position's state by 90 degrees (distance 0.5, BI 1)."""
    g = torch.Generator().manual_seed(0)
    L, T, H = 5, 7, 6
    h = torch.randn(L + 1, T, H, generator=g)

    def cos(a, b):
        return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))

    hl = h.double().tolist()
    for n in (1, 2, 3):
        want = [sum(math.acos(max(-1.0, min(1.0, cos(hl[l][t], hl[l + n][t])))) / math.pi for t in range(T))
                for l in range(L - n)]
        assert D3.block_distances(h, n).tolist() == pytest.approx(want, rel=1e-9)
    want = [sum(1 - cos(hl[i][t], hl[i + 1][t]) for t in range(T)) for i in range(L)]
    assert D3.block_influence(h).tolist() == pytest.approx(want, rel=1e-9)
    flat = h.clone()
    flat[2] = flat[1] * 3.0  # layer 1 only rescales: the direction is unchanged
    flat[3] = flat[1] * 0.5
    assert D3.block_distances(flat, 2)[1].item() == pytest.approx(0.0, abs=1e-6)
    assert D3.block_influence(flat)[1:3].tolist() == pytest.approx([0.0, 0.0], abs=1e-9)
    e = torch.zeros(3, T, H)  # two layers; the last one's block is never a candidate
    e[0, :, 0], e[1, :, 1], e[2, :, 1] = 1.0, 2.0, 1.0  # layer 0 turns every position by 90 degrees
    assert D3.block_distances(e, 1).tolist() == pytest.approx([0.5 * T])
    assert D3.block_influence(e).tolist() == pytest.approx([1.0 * T, 0.0])


def test_skip_layer_nll_against_students_built_without_each_layer(tok):
    """skip_layer_nll (prefix reused, restarted at layer i+1) against a loop that builds a student
    without layer i (make_student) and sums -log p of each reference token one at a time in
    float64; the last entry is the whole model's. Closed form: a layer that adds nothing to the
    residual stream costs exactly 0."""
    t_lm = M.tiny_model(tok, seed=4, layers=4).eval()
    with torch.no_grad():
        t_lm.model.layers[1].self_attn.o_proj.weight.zero_()
        t_lm.model.layers[1].mlp.down_proj.weight.zero_()
    ids, n_prompt = torch.tensor([[5, 9, 13, 7, 21, 8, 30, 11]]), 3
    with torch.no_grad():
        got = D3.skip_layer_nll(t_lm, ids, n_prompt)

        def naive(lm):
            logp = lm(ids).logits[0].double().log_softmax(-1)
            return sum(-logp[t - 1, ids[0, t]].item() for t in range(n_prompt, ids.shape[1]))

        want = [naive(D3.make_student(t_lm, [j for j in range(4) if j != i])) for i in range(4)] + [naive(t_lm)]
    assert got.dtype == torch.float64 and got.shape == (5,)
    assert got.tolist() == pytest.approx(want, rel=1e-5)
    assert got[1].item() == pytest.approx(got[4].item(), rel=1e-6)  # layer 1 does nothing


def teacher_with_idle_layers(files, idle):
    """(tokenizer, a random 6-layer tiny teacher whose layers `idle` add nothing to the residual
    stream: their attention and MLP output projections are zero)."""
    tok = M.load_model_and_tokenizer(files["teacher"], 0)[1]
    t_lm = M.tiny_model(tok, seed=2, layers=6)
    with torch.no_grad():
        for i in idle:
            t_lm.model.layers[i].self_attn.o_proj.weight.zero_()
            t_lm.model.layers[i].mlp.down_proj.weight.zero_()
    return tok, t_lm


@pytest.mark.parametrize("choice", ["block", "influence"])
def test_choose_layers_drops_the_layers_that_do_nothing(files, choice):
    """A 6-layer teacher whose layers 2 and 3 add nothing to the residual stream (their output
    projections zeroed): asked for 4 layers, both scores drop exactly those two; the student then
    computes the teacher's function. 'even' ignores the teacher; a list is taken as given."""
    tok, t_lm = teacher_with_idle_layers(files, (2, 3))
    cfg = C.parse_config(D3.Config, ["--student_layers", "4", "--layer_choice", choice, "--layer_calib", "3",
                                     "--prompts", f"math={files['math']}", f"chat={files['chat']}"])
    layers, how = D3.choose_layers(t_lm, tok, cfg, C.Dist())
    assert layers == [0, 1, 4, 5] and how["layers_dropped"] == [2, 3] and how["calibration_tokens"] > 0
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    assert torch.allclose(D3.make_student(t_lm, layers)(ids).logits, t_lm(ids).logits, atol=1e-5)
    even = C.parse_config(D3.Config, ["--student_layers", "4", "--layer_choice", "even"])
    kept, how = D3.choose_layers(t_lm, tok, even, C.Dist())
    assert kept == D3.pick_layers("4", 6) and how["layers_dropped"] == sorted(set(range(6)) - set(kept))
    given = C.parse_config(D3.Config, ["--student_layers", "0,2,3", "--layer_choice", choice])
    assert D3.choose_layers(t_lm, tok, given, C.Dist())[0] == [0, 2, 3]
    with pytest.raises(ValueError, match="layer_choice"):
        D3.check_config(C.parse_config(D3.Config, ["--layer_choice", "random"]))


def test_choose_layers_ppl_ranks_layers_by_what_removing_them_costs(files):
    """--layer_choice ppl: each layer's score is the mean NLL increase per reference token when it
    alone is removed, checked against students built without it (make_student, float64 loop over
    the calibration references); the n lowest-scoring layers (last excluded) are dropped; layers
    2 and 3, which add nothing to the residual stream, cost exactly 0. (A random layer's removal
    can also lower the NLL: the score is signed, not a distance.)"""
    tok, t_lm = teacher_with_idle_layers(files, (2, 3))
    cfg = C.parse_config(D3.Config, ["--student_layers", "3", "--layer_choice", "ppl", "--layer_calib", "2",
                                     "--prompts", f"math={files['math']}", f"chat={files['chat']}"])
    layers, how = D3.choose_layers(t_lm, tok, cfg, C.Dist())
    score = how["layer_scores"]
    assert len(score) == 6 and score[2:4] == pytest.approx([0.0, 0.0], abs=1e-5)
    assert how["layers_dropped"] == sorted(sorted(range(5), key=lambda i: score[i])[:3])
    assert layers == [i for i in range(6) if i not in how["layers_dropped"]]
    tasks = D3.load_tasks(cfg.prompts, tok, 2, cfg.max_len, Counter(), "test")
    seqs = [(D3.text_sample(tok, t, t["reference"])["input_ids"], len(t["prompt_ids"])) for t in tasks]

    def nll(lm):
        total = 0.0
        with torch.no_grad():
            for ids, n in seqs:
                logp = lm(torch.tensor([ids])).logits[0].double().log_softmax(-1)
                total += sum(-logp[t - 1, ids[t]].item() for t in range(n, len(ids)))
        return total

    n_tok = sum(len(ids) - n for ids, n in seqs)
    assert how["calibration_tokens"] == n_tok
    full = nll(t_lm)
    want = [(nll(D3.make_student(t_lm, [j for j in range(6) if j != i])) - full) / n_tok for i in range(6)]
    assert score == pytest.approx(want, abs=2e-5)


def test_make_student_copies_the_chosen_layers(tok):
    t_lm = M.tiny_model(tok, seed=3, layers=4)
    s_lm = D3.make_student(t_lm, [0, 2, 3])
    ts, ss = t_lm.state_dict(), s_lm.state_dict()
    for new, old in enumerate([0, 2, 3]):
        for k in ss:
            if k.startswith(f"model.layers.{new}."):
                assert torch.equal(ss[k], ts[k.replace(f"layers.{new}.", f"layers.{old}.")])
    assert torch.equal(ss["model.embed_tokens.weight"], ts["model.embed_tokens.weight"])
    assert s_lm.config.num_hidden_layers == 3 and t_lm.config.num_hidden_layers == 4
    ids = torch.tensor([[5, 6, 7, 8]])
    same = D3.make_student(t_lm, [0, 1, 2, 3])  # every layer: the same function as the teacher
    assert torch.allclose(same(ids).logits, t_lm(ids).logits, atol=1e-6)
    narrow = D3.make_student(t_lm, [1, 3], intermediate=64)
    assert narrow.model.layers[0].mlp.gate_proj.weight.shape == (64, 64)
    g = t_lm.model.layers[1].mlp.gate_proj.weight
    kept = narrow.model.layers[0].mlp.gate_proj.weight
    assert all(any(torch.equal(r, g[i]) for i in range(g.shape[0])) for r in kept)  # rows of the teacher's
    with pytest.raises(ValueError, match="student_intermediate"):
        D3.make_student(t_lm, [0], intermediate=10 ** 6)


def test_incompatible_teacher_and_student_are_rejected(tok):
    t_lm = M.tiny_model(tok)
    other = M.tiny_tokenizer()
    other.add_special_tokens({"additional_special_tokens": ["<|tool|>"]})
    with pytest.raises(ValueError, match="different vocabularies"):
        D3.check_compatible(tok, other, t_lm, t_lm, "T", "S")
    templ = M.tiny_tokenizer()
    templ.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(ValueError, match="different chat templates"):
        D3.check_compatible(tok, templ, t_lm, t_lm, "T", "S")
    small = M.tiny_model(tok)
    small.resize_token_embeddings(len(tok) - 1)
    with pytest.raises(ValueError, match="output layers of"):
        D3.check_compatible(tok, M.tiny_tokenizer(), t_lm, small, "T", "S")
    D3.check_compatible(tok, M.tiny_tokenizer(), t_lm, M.tiny_model(tok, seed=5), "T", "S")  # same: fine


def test_padded_output_rows_are_left_out_of_the_divergence(tok):
    """PITFALLS #17: one family, padded differently. The teacher has 8 padding rows beyond the
    tokenizer's vocabulary (with large logits, so they would take mass); the divergence uses the
    real rows only and equals a naive one over them."""
    V = len(tok)
    s_lm, t_lm = M.tiny_model(tok, seed=0), M.tiny_model(tok, seed=1)
    t_lm.resize_token_embeddings(V + 8)
    with torch.no_grad():
        t_lm.get_output_embeddings().weight[V:] = 3.0
    D3.check_compatible(tok, M.tiny_tokenizer(), t_lm, s_lm, "T", "S")  # allowed, with a note
    b = C.collate(rows_for(tok), tok.pad_token_id)
    kd = D3.KD(divergence="fkl", vocab=V)
    t = D3.TeacherModel(t_lm).eval()(b["input_ids"], b["labels"], b["position_ids"], kd=kd)
    assert t["vals"].shape[1] == V
    with torch.no_grad():
        got = D3.StudentModel(s_lm)(b["input_ids"], b["labels"], b["position_ids"], t_vals=t["vals"], kd=kd)["div"].sum()
        sel = b["labels"][:, 1:] != C.IGNORE
        zs = s_lm(input_ids=b["input_ids"], position_ids=b["position_ids"]).logits[:, :-1][sel].double()
        zt = t_lm(input_ids=b["input_ids"], position_ids=b["position_ids"]).logits[:, :-1][sel].double()[:, :V]
        want = naive("fkl", zs.softmax(-1), zt.softmax(-1)).sum()
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    full = D3.TeacherModel(t_lm).eval()(b["input_ids"], b["labels"], b["position_ids"], kd=D3.KD())
    assert full["vals"].shape[1] == V + 8  # without KD.vocab the padding rows would take part


# ----------------------------------------------------------------------------------------------
# Real CLI runs on tiny models


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def read(name, n):
    return [json.loads(line) for line in (DATA / name).read_text().splitlines()[:n]]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Small data files and a tiny 4-layer teacher trained for a few steps on math and chat (so its
    distributions are peaked and there is something to distil)."""
    d = tmp_path_factory.mktemp("d3")
    f = {"math": write_jsonl(d / "math.jsonl", read("math_train.jsonl", 24)),
         "chat": write_jsonl(d / "chat.jsonl", [r for r in read("chat_train.jsonl", 40)
                                                if len(json.dumps(r)) < 600][:12]),
         "math_test": write_jsonl(d / "math_test.jsonl", read("math_test.jsonl", 6))}
    tok = M.tiny_tokenizer()
    lm = M.tiny_model(tok, seed=7, hidden=64, layers=4)
    samples = [C.tokenize_chat(tok, [{"role": "user", "content": r["question"]},
                                     {"role": "assistant", "content": r["solution"]}]) for r in read("math_train.jsonl", 48)]
    policy = M.LogProbModel(lm)
    opt = C.make_optimizer(policy, 3e-3, 0.0)
    dd = C.Dist()
    for step in range(30):
        rows = C.pack_rows([samples[(step * 4 + i) % len(samples)] for i in range(4)], 1024)
        C.sft_step(policy, opt, rows, dd, torch.float32, 4, tok.pad_token_id, 3e-3, 1.0, step)
    lm.save_pretrained(d / "teacher")
    tok.save_pretrained(d / "teacher")
    f["teacher"] = str(d / "teacher")
    return f


def cli(files, out, *extra):
    return ["--teacher", files["teacher"], "--student_layers", "2", "--precision", "fp32", "--out_dir", str(out),
            "--prompts", f"math={files['math']}", f"chat={files['chat']}", "--max_prompt_len", "200",
            "--max_new_tokens", "24", "--max_len", "400", "--math_test", files["math_test"], "--code_test", "",
            "--kl_data", files["math_test"], "--eval_limit", "4", "--kl_limit", "6", "--batch_size", "4",
            "--micro_batch_size", "2", "--pref_prompts", "6", "--pref_samples", "2", "--pref_scorer", "teacher_logp",
            "--pairs_per_step", "2", "--lr", "2e-3", "--warmup_steps", "1", *extra]


def metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def test_learning_heldout_kl_falls_steadily_teacher_frozen(files, tmp_path, monkeypatch):
    seen = {}
    real_step = D3.train_step

    def spy(student, teacher, *a, **k):  # the teacher's weights before the first and after every step
        seen.setdefault("before", {n: p.detach().clone() for n, p in teacher.named_parameters()})
        out = real_step(student, teacher, *a, **k)
        seen["grads"] = [p.grad for p in teacher.parameters()]
        seen["after"] = {n: p.detach().clone() for n, p in teacher.named_parameters()}
        return out
    monkeypatch.setattr(D3, "train_step", spy)
    summary = D3.main(cli(files, tmp_path / "learn", "--max_steps", "12", "--eval_every", "3", "--gamma", "0",
                          "--lr", "1e-4", "--warmup_steps", "3", "--offpolicy", "dataset", "--batch_size", "16"))
    kls = [summary["start"]["heldout_kl"]] + [r["eval_heldout_kl"] for r in metrics(tmp_path / "learn")
                                              if "eval_heldout_kl" in r and "eval_math_n" not in r]
    kls.append(summary["end"]["heldout_kl"])
    assert len(kls) == 5 and all(b < a for a, b in zip(kls, kls[1:])), kls   # measured 0.106 -> 0.009
    assert kls[-1] < 0.6 * kls[0]
    assert all(torch.equal(seen["before"][n], seen["after"][n]) for n in seen["before"])
    assert all(g is None for g in seen["grads"])
    assert summary["student_params"] < summary["teacher_params"]
    assert (tmp_path / "learn" / "final" / "model.safetensors").exists()


def test_dual_level_run_logs_every_term_and_pairs(files, tmp_path):
    summary = D3.main(cli(files, tmp_path / "dual", "--max_steps", "3", "--lmbda", "0.5", "--offpolicy", "dataset"))
    rows = [r for r in metrics(tmp_path / "dual") if "loss" in r]
    assert len(rows) == 3 and {r["on_policy"] for r in rows} <= {0, 1}
    assert all({"kd_div", "seqkd_ce", "dpo_loss", "dpo_margin", "pair_acc"} <= set(r) for r in rows)
    pairs = [json.loads(l) for l in (tmp_path / "dual" / "pairs.jsonl").read_text().splitlines()[1:]]
    assert pairs and all(p["score_chosen"] > p["score_rejected"] for p in pairs)
    assert summary["skipped"]["pairs"] == len(pairs)
    assert rows[0]["dpo_margin"] == pytest.approx(0.0, abs=1e-4)   # the reference is the starting student
    on = [int(__import__("numpy").random.default_rng(C.seed_for(0, 3, 0, s)).random() < 0.5) for s in range(3)]
    assert [r["on_policy"] for r in rows] == on                      # the seeded per-step draw, logged


def test_topk_cache_equals_live_teacher_and_bad_caches(files, tmp_path, monkeypatch):
    extra = ["--max_steps", "2", "--top_k", "8", "--gamma", "0"]
    live = D3.main(cli(files, tmp_path / "live", *extra))
    cached = D3.main(cli(files, tmp_path / "cached", *extra, "--teacher_cache", "true"))
    assert (tmp_path / "cached" / "teacher_topk.pt").exists()
    a = [r["loss"] for r in metrics(tmp_path / "live") if "loss" in r]
    b = [r["loss"] for r in metrics(tmp_path / "cached") if "loss" in r]
    assert a == pytest.approx(b, rel=1e-5) and live["end"]["heldout_kl"] == pytest.approx(cached["end"]["heldout_kl"], rel=1e-5)
    # a reused cache is checked before any compute (no generation, no teacher forward): corrupt,
    # empty, made with other settings, or by another teacher
    def no_compute(*a, **k):
        raise AssertionError("compute before the caches were checked")
    monkeypatch.setattr(D3.S, "generate", no_compute)
    monkeypatch.setattr(D3, "teacher_chunks", no_compute)
    for content, msg in ((b"not a torch file", "corrupt teacher cache"), (b"", "corrupt teacher cache")):
        out = tmp_path / f"bad{len(content)}"
        out.mkdir()
        (out / "teacher_topk.pt").write_bytes(content)
        with pytest.raises(C.DataError, match=msg):
            D3.main(cli(files, out, *extra, "--teacher_cache", "true"))
    with pytest.raises(C.DataError, match="made for"):
        D3.main(cli(files, tmp_path / "cached", "--max_steps", "4", "--top_k", "4", "--gamma", "0",
                    "--teacher_cache", "true", "--resume", "false"))
    (tmp_path / "cached" / "teacher_responses.jsonl").write_text('{"header": {"teacher": "someone else"}}\n')
    with pytest.raises(C.DataError, match="made for"):
        D3.main(cli(files, tmp_path / "cached", *extra, "--resume", "false"))


def test_bad_prompts_and_config_rejected(files, tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "no prompt here"}, {"question": "no answer"}])
    with pytest.raises(C.DataError, match="no usable prompts"):
        D3.main(cli(files, tmp_path / "o1", "--prompts", f"bad={bad}"))
    (tmp_path / "broken.jsonl").write_text('{"question": "1+1?", "answer": "2"}\n{not json\n')
    with pytest.raises(Exception, match="broken.jsonl:2"):
        D3.main(cli(files, tmp_path / "o2", "--prompts", f"b={tmp_path / 'broken.jsonl'}"))
    for flags, msg in ((["--divergence", "kl2"], "divergence"), (["--teacher_cache", "true"], "top_k"),
                       (["--alpha", "0", "--gamma", "0"], "not both off"), (["--lmbda", "2"], "probability"),
                       (["--max_len", "100"], "max_len")):
        with pytest.raises(ValueError, match=msg):
            D3.main(cli(files, tmp_path / "o3", *flags))
    other = tmp_path / "other_student"
    t2 = M.tiny_tokenizer()
    t2.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    M.tiny_model(t2).save_pretrained(other)
    t2.save_pretrained(other)
    with pytest.raises(ValueError, match="different chat templates"):
        D3.main(cli(files, tmp_path / "o4", "--student", str(other)))


def test_kill_and_resume_identical(files, tmp_path):
    extra = ["--max_steps", "4", "--lmbda", "0.5"]
    D3.main(cli(files, tmp_path / "straight", *extra))
    assert D3.main(cli(files, tmp_path / "resumed", *extra, "--stop_after", "2")) is None
    assert not (tmp_path / "resumed" / "final").exists()
    D3.main(cli(files, tmp_path / "resumed", *extra))
    a = load_file(tmp_path / "straight" / "final" / "model.safetensors")
    b = load_file(tmp_path / "resumed" / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    losses = lambda p: [r["loss"] for r in metrics(p) if "loss" in r]  # noqa: E731
    assert losses(tmp_path / "straight") == losses(tmp_path / "resumed")
    s = lambda p: {k: v for k, v in json.loads((p / "eval_summary.json").read_text())["start"].items()  # noqa: E731
                   if k != "gen_tok_per_s"}  # a wall-clock rate: differs run to run
    assert s(tmp_path / "resumed") == s(tmp_path / "straight")


@pytest.mark.slow
def test_torchrun_two_processes_equal_one_with_accumulation(files, tmp_path):
    """Token level + seq-KD + DPO, off-policy: 1 process x 2 micro-batches == 2 processes (FSDP2,
    gloo, fp32). The 2-process run reuses the 1-process run's teacher responses and pairs (the
    pairs' samples are drawn per rank, so they would differ), which also tests the caches."""
    extra = ["--max_steps", "2", "--micro_batch_size", "1", "--batch_size", "2", "--pairs_per_step", "2",
             "--eval_limit", "2", "--max_len", "230"]  # one sample per row: 2 KD rows, 2 pairs per step
    one = D3.main(cli(files, tmp_path / "one", *extra))
    (tmp_path / "two").mkdir()
    for f in ("teacher_responses.jsonl", "pairs.jsonl"):
        shutil.copy(tmp_path / "one" / f, tmp_path / "two" / f)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "03_distill.py"), *cli(files, tmp_path / "two", *extra)]
    res = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=None)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    la = [r for r in metrics(tmp_path / "one") if "loss" in r]
    assert all(r["kd_rows"] == 2 and r["micro_batches"] == 4 for r in la)  # 1 process: accumulation 2 per kind
    lb = [r for r in metrics(tmp_path / "two") if "loss" in r]
    for x, y in zip(la, lb):
        for k in ("loss", "kd_div", "seqkd_ce", "dpo_loss", "dpo_margin", "grad_norm"):
            assert y[k] == pytest.approx(x[k], rel=1e-5, abs=1e-7), k
    a = load_file(tmp_path / "one" / "final" / "model.safetensors")
    b = load_file(tmp_path / "two" / "final" / "model.safetensors")
    # A normalisation bug changes the losses or the gradient norm (compared above to 1e-5; Adam
    # alone would hide a gradient scaled by a constant). A mixing bug moves many weights by a
    # sizeable fraction of lr (2e-3) per step. Rounding moves almost none past 1e-6; the few it does
    # are weights whose gradient happens to cancel to ~1e-9, near Adam's eps, where g / (|g| + eps)
    # magnifies a rounding-level difference: 1.1e-5 and 2.0e-5 (one tied-embedding element each,
    # gradients -7.0e-10 against -5.8e-10) and 3.1e-5 (2 elements) were seen, 0.6-1.6% of lr.
    diff = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
    assert diff.max() < 0.1 * 2e-3 and (diff > 1e-6).float().mean() < 1e-4, (diff.max(), (diff > 1e-6).sum())
    two = json.loads((tmp_path / "two" / "eval_summary.json").read_text())
    assert two["start"]["heldout_kl"] == pytest.approx(one["start"]["heldout_kl"], rel=1e-5)


@pytest.mark.skipif(not C.cpu_has_native_bf16(), reason="this CPU has no native bf16 (AVX512-BF16 / AMX)")
def test_bf16_compute_really_runs_in_bf16(files, tmp_path, monkeypatch):
    seen = Counter()
    real = D3.make_student

    def hooked_make_student(t_lm, layers, intermediate=0):
        s_lm = real(t_lm, layers, intermediate)
        t_lm.model.layers[1].mlp.down_proj.register_forward_hook(lambda m, i, o: seen.update([f"teacher_{o.dtype}"]))
        s_lm.model.layers[0].self_attn.q_proj.register_forward_hook(lambda m, i, o: seen.update([f"student_{o.dtype}"]))
        return s_lm
    monkeypatch.setattr(D3, "make_student", hooked_make_student)
    args = cli(files, tmp_path / "bf16", "--max_steps", "2")
    args[args.index("--precision") + 1] = "bf16"
    D3.main(args)
    assert seen["teacher_torch.bfloat16"] > 0 and seen["student_torch.bfloat16"] > 0, seen
    assert seen["teacher_torch.float32"] == 0 and seen["student_torch.float32"] == 0, seen


def test_all_on_policy_without_sequence_terms_asks_the_teacher_for_no_responses(files, tmp_path, monkeypatch):
    """--lmbda 1 --gamma 0 (the pipeline's stage 3): every step samples the student, so the teacher's
    greedy responses would be generated for nothing: they are not, and every step still trains."""
    def never(*a, **k):
        raise AssertionError("teacher_responses called at --lmbda 1 --gamma 0")
    monkeypatch.setattr(D3, "teacher_responses", never)
    D3.main(cli(files, tmp_path / "onpol", "--max_steps", "3", "--lmbda", "1", "--gamma", "0", "--divergence", "rkl"))
    steps = [r for r in metrics(tmp_path / "onpol") if "loss" in r]
    assert [r["on_policy"] for r in steps] == [1, 1, 1] and all(r["kd_tokens"] > 0 for r in steps)
    assert all(math.isfinite(r["kd_div"]) and "seqkd_ce" not in r for r in steps)
    assert not (tmp_path / "onpol" / "teacher_responses.jsonl").exists()
    monkeypatch.undo()  # with a sequence-level term on, the responses are needed again
    D3.main(cli(files, tmp_path / "seq", "--max_steps", "1", "--lmbda", "1", "--pref_prompts", "0"))
    assert (tmp_path / "seq" / "teacher_responses.jsonl").exists()


def test_steps_per_generation_samples_ahead_in_one_call_and_resumes_mid_block(files, tmp_path, monkeypatch):
    """--steps_per_generation 2: the on-policy samples of steps 0-1 and 2-3 come from one sampler call
    each (on the student of the block's first step), step 1 trains on the second half of step 0's
    call, and a run killed between the two steps of a block (the samples of step 1 already drawn)
    resumes to the same weights and losses as the straight run."""
    calls, trained = [], {}
    real_sample, real_step = D3.on_policy_samples, D3.train_step

    def spy_sample(student, tok, tasks, cfg, d, dtype, step):
        out = real_sample(student, tok, tasks, cfg, d, dtype, step)
        calls.append((step, len(tasks), [s["input_ids"] for s in out]))
        return out

    def spy_step(student, teacher, opt, data, cfg, *a, **k):
        trained[a[-1]] = [s["input_ids"] for s in data.kd]  # keyed by step (train_step's last argument)
        return real_step(student, teacher, opt, data, cfg, *a, **k)
    monkeypatch.setattr(D3, "on_policy_samples", spy_sample)
    monkeypatch.setattr(D3, "train_step", spy_step)
    extra = ["--max_steps", "3", "--lmbda", "1", "--gamma", "0", "--divergence", "rkl", "--steps_per_generation", "2"]
    D3.main(cli(files, tmp_path / "straight", *extra))
    assert [(s, n) for s, n, _ in calls] == [(0, 8), (2, 4)]  # batch 4: two steps' prompts, then the last step's
    assert trained[0] == calls[0][2][:4] and trained[1] == calls[0][2][4:] and trained[2] == calls[1][2]
    calls.clear()
    assert D3.main(cli(files, tmp_path / "resumed", *extra, "--stop_after", "1")) is None
    assert (tmp_path / "resumed" / "ckpt-000001" / D3.AHEAD_FILE).exists()  # step 1's samples, drawn at step 0
    D3.main(cli(files, tmp_path / "resumed", *extra))
    assert [(s, n) for s, n, _ in calls] == [(0, 8), (2, 4)]  # the resumed run did not sample step 1 again
    a = load_file(tmp_path / "straight" / "final" / "model.safetensors")
    b = load_file(tmp_path / "resumed" / "final" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    losses = lambda p: [r["loss"] for r in metrics(p) if "loss" in r]  # noqa: E731
    assert losses(tmp_path / "straight") == losses(tmp_path / "resumed")
    with pytest.raises(ValueError, match="steps_per_generation"):
        D3.main(cli(files, tmp_path / "bad", "--steps_per_generation", "0"))
