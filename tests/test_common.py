"""Unit tests of common.py against slow, obvious references (float64, loops) and hand-computed cases.

Tiny model and byte-level tokenizer unless marked slow (slow = the real SmolLM2 tokenizer).
"""
import contextlib
import json
import math
import random
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import common as C  # noqa: E402
import models as M  # noqa: E402
import sampler as S  # noqa: E402
from stage_scripts import load_script  # noqa: E402

S2 = load_script("02_overall_sft.py", "s2_for_common")  # the tool-call text fallback lives in stage 2

IGNORE = C.IGNORE


@pytest.fixture(scope="module")
def tok():
    return M.tiny_tokenizer()


@pytest.fixture
def lm(tok):
    return M.tiny_model(tok, seed=0)


def chat_ids(tok, messages, **kw):
    """The tokenizer's own render+tokenise (a BatchEncoding in transformers 5, a list in older ones)."""
    out = tok.apply_chat_template(messages, tokenize=True, **kw)
    return list(out["input_ids"]) if hasattr(out, "keys") else list(out)


# ----------------------------------------------------------------------------------------------
# Log-probabilities: selective / chunked path vs the naive float64 full log-softmax


def naive_logprobs(hidden, weight, labels, temperature):
    """float64 reference: full [B, T, V] log_softmax, gather, entropy; 0 where IGNORE."""
    logits = (hidden.double() @ weight.double().t()) / temperature
    lsm = logits.log_softmax(-1)
    mask = labels != IGNORE
    logp = lsm.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1) * mask
    entropy = -(lsm.exp() * lsm).sum(-1) * mask
    return logp, entropy


@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.6])
@pytest.mark.parametrize("chunk_size", [3, 1024])
def test_selective_logprobs_exact_and_gradients(temperature, chunk_size):
    g = torch.Generator().manual_seed(0)
    B, T, H, V = 3, 7, 16, 50
    hidden = torch.randn(B, T, H, generator=g, requires_grad=True)
    weight = torch.randn(V, H, generator=g, requires_grad=True)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :3] = IGNORE
    labels[2, -2:] = IGNORE
    labels[1, 4] = IGNORE
    n_sel = int((labels != IGNORE).sum())
    assert chunk_size == 1024 or n_sel > 3 * chunk_size  # several chunks, the last one partial

    logp, entropy = M.selective_logprobs(hidden, weight, labels, temperature, chunk_size)
    ref_logp, ref_ent = naive_logprobs(hidden, weight, labels, temperature)
    assert logp.dtype == torch.float32 and logp.shape == (B, T)
    torch.testing.assert_close(logp.double(), ref_logp, atol=1e-5, rtol=0)
    torch.testing.assert_close(entropy.double(), ref_ent, atol=1e-5, rtol=0)
    assert (logp[labels == IGNORE] == 0).all() and (entropy[labels == IGNORE] == 0).all()

    w = torch.randn(B, T, generator=g)  # an arbitrary linear loss on the log-probs
    gh, gw = torch.autograd.grad((logp * w).sum(), (hidden, weight))
    rh, rw = torch.autograd.grad((ref_logp * w.double()).sum(), (hidden, weight))
    torch.testing.assert_close(gh, rh, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gw, rw, atol=1e-5, rtol=1e-5)
    assert (gh[labels == IGNORE] == 0).all()


def test_selective_logprobs_backward_passes_gradcheck_in_float64():
    """The hand-written backward (dz = g (onehot(y) - p) / T) against finite differences."""
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, 5, 6, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(9, 6, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 9, (2, 5), generator=g)
    labels[1, 0] = IGNORE
    assert torch.autograd.gradcheck(lambda h, w: M.selective_logprobs(h, w, labels, 0.7, 3)[0], (hidden, weight))


def test_selective_logprobs_under_bf16_autocast_agrees_with_float64_to_bf16_precision():
    """bf16 projection as autocast would do it, fp32 outputs and fp32 gradients (several chunks)
    within bf16 precision of the float64 reference."""
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(1, 40, 32, generator=g, requires_grad=True)
    weight = (0.2 * torch.randn(64, 32, generator=g)).requires_grad_()
    labels = torch.randint(0, 64, (1, 40), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logp, _ = M.selective_logprobs(hidden, weight, labels, 1.0, 8)
    assert logp.dtype == torch.float32
    gh, gw = torch.autograd.grad(logp.sum(), (hidden, weight))
    assert gh.dtype == gw.dtype == torch.float32
    ref_logp, _ = naive_logprobs(hidden, weight, labels, 1.0)
    rh, rw = torch.autograd.grad(ref_logp.sum(), (hidden, weight))
    assert (logp.double() - ref_logp).abs().max() < 0.05
    assert (gw.double() - rw).norm() / rw.norm() < 0.02 and (gh.double() - rh).norm() / rh.norm() < 0.02


def test_selective_logprobs_all_ignored_and_no_grad():
    hidden, weight = torch.randn(2, 4, 8), torch.randn(11, 8)
    labels = torch.full((2, 4), IGNORE)
    logp, ent = M.selective_logprobs(hidden, weight, labels)
    assert logp.shape == (2, 4) and (logp == 0).all() and (ent == 0).all()
    labels[1, 2] = 5
    with torch.no_grad():
        logp, _ = M.selective_logprobs(hidden, weight, labels)
    ref = torch.log_softmax(hidden[1, 2].double() @ weight.double().t(), -1)[5]
    assert abs(float(logp[1, 2]) - float(ref)) < 1e-5


def naive_model_logprobs(lm, ids, labels, temperature, position_ids=None):
    """float64 reference through the HF model's own full logits."""
    logits = lm(input_ids=ids, position_ids=position_ids).logits.double() / temperature
    lsm = logits[:, :-1].log_softmax(-1)
    y = labels[:, 1:]
    mask = y != IGNORE
    logp = lsm.gather(-1, y.clamp(min=0)[..., None]).squeeze(-1) * mask
    ent = -(lsm.exp() * lsm).sum(-1) * mask
    zero = logp.new_zeros(ids.shape[0], 1)
    return torch.cat([zero, logp], 1), torch.cat([zero, ent], 1)


@pytest.mark.parametrize("temperature,chunk_size", [(1.0, 1024), (0.7, 4)])
def test_logprob_model_matches_naive(lm, temperature, chunk_size):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 259, (2, 12), generator=g)
    labels = ids.clone()
    labels[:, :4] = IGNORE  # a prompt
    labels[1, 9] = IGNORE
    policy = M.LogProbModel(lm, chunk_size=chunk_size)
    out = policy(ids, labels, temperature=temperature, return_hidden=True)
    ref_logp, ref_ent = naive_model_logprobs(lm, ids, labels, temperature)
    assert out["logp"].shape == (2, 12) and out["hidden"].shape == (2, 12, lm.config.hidden_size)
    assert (out["logp"][:, 0] == 0).all()
    torch.testing.assert_close(out["logp"].double(), ref_logp, atol=1e-5, rtol=0)
    torch.testing.assert_close(out["entropy"].double(), ref_ent, atol=1e-5, rtol=0)

    params = [p for p in lm.parameters()]
    w = torch.rand(2, 12, generator=g)
    got = torch.autograd.grad(-(out["logp"] * w).sum(), params)
    want = torch.autograd.grad(-(ref_logp * w.double()).sum(), params)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def hf_rms_norm(x, w, eps):
    """HF's LlamaRMSNorm.forward, written out (autograd differentiates it)."""
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return w * h.to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # bf16: FSDP2's mixed precision
def test_lean_rms_norm_and_silu_mul_equal_autograd(dtype):
    """_RMSNorm: HF's output bit for bit, gradients equal to a float64 reference's to fp32 / bf16
    rounding, and gradcheck in float64; _SiluMul: autograd's, bit for bit both ways."""
    g = torch.Generator().manual_seed(3)
    x = (3 * torch.randn(2, 7, 48, generator=g)).to(dtype).requires_grad_()
    w = (1 + 0.1 * torch.randn(48, generator=g)).to(dtype).requires_grad_()
    dy = torch.randn(2, 7, 48, generator=g).to(dtype)
    got = M._RMSNorm.apply(x, w, 1e-5)
    assert got.dtype == dtype and torch.equal(got, hf_rms_norm(x, w, 1e-5))
    x64, w64 = (t.detach().double().requires_grad_() for t in (x, w))
    ref = w64 * x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-5)  # float64 throughout
    want = torch.autograd.grad(ref, (x64, w64), dy.double())
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for a, b in zip(torch.autograd.grad(got, (x, w), dy), want):
        assert a.dtype == dtype
        torch.testing.assert_close(a.double(), b, **tol)
    assert torch.autograd.gradcheck(lambda a, b: M._RMSNorm.apply(a, b, 1e-5), (x64[:1, :3], w64))
    a, b = (torch.randn(2, 7, 96, generator=g).to(dtype).requires_grad_() for _ in range(2))
    dz = torch.randn(2, 7, 96, generator=g).to(dtype)
    want = torch.nn.functional.silu(a) * b
    got = M._SiluMul.apply(a, b)
    assert torch.equal(got, want)
    for p, q in zip(torch.autograd.grad(got, (a, b), dz), torch.autograd.grad(want, (a, b), dz)):
        assert torch.equal(p, q)


def saved_bytes(fn) -> int:
    """Bytes of the distinct storages autograd keeps for the backward while fn() runs."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


@pytest.mark.parametrize("autocast", [False, True])
def test_lean_activations_same_model_fewer_saved_tensors(tok, autocast, monkeypatch):
    """The patched model gives HF's logits bit for bit and its gradients to fp32 rounding, keeps
    exactly one [B, T, H] fp32 tensor per norm and one [B, T, I] per MLP less, survives
    deepcopy (04_rl's reference model) and gradient checkpointing; LEAN_ACTIVATIONS=0 is HF's."""
    import copy
    monkeypatch.setenv("LEAN_ACTIVATIONS", "0")
    hf = M.tiny_model(tok, seed=0)
    monkeypatch.delenv("LEAN_ACTIVATIONS")
    lean = M.lean_activations(copy.deepcopy(hf))
    ids = torch.randint(3, 259, (3, 20), generator=torch.Generator().manual_seed(4))
    ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if autocast else contextlib.nullcontext

    def run(model):
        model.zero_grad(set_to_none=True)
        with ctx():
            logits, kept = saved_bytes(lambda: model(input_ids=ids).logits)
        logits.float().logsumexp(-1).sum().backward()
        return logits.detach(), {n: p.grad for n, p in model.named_parameters()}, kept
    (l_hf, g_hf, kept_hf), (l_lean, g_lean, kept_lean) = run(hf), run(lean)
    assert torch.equal(l_hf, l_lean)
    for n in g_hf:
        torch.testing.assert_close(g_lean[n], g_hf[n], rtol=1e-5, atol=1e-6)
    cfg, n_tok = hf.config, ids.numel()  # one fp32 [B, T, H] per norm, one [B, T, I] per MLP
    assert kept_hf - kept_lean == n_tok * ((2 * cfg.num_hidden_layers + 1) * cfg.hidden_size * 4
                                           + cfg.num_hidden_layers * cfg.intermediate_size * (2 if autocast else 4))
    twin = copy.deepcopy(lean)
    assert twin.model.norm.forward.__self__ is twin.model.norm
    assert twin.model.layers[0].mlp.forward.__self__ is twin.model.layers[0].mlp
    lean.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lean.train()
    l_ck, g_ck, _ = run(lean)
    assert torch.equal(l_ck, l_hf) and all(torch.equal(g_ck[n], g_lean[n]) for n in g_hf)
    assert "forward" not in vars(hf.model.norm) and "forward" not in vars(hf.model.layers[0].mlp)
    assert "forward" in vars(M.tiny_model(tok, seed=0).model.norm)  # every model the stages build


def test_masked_ce_loss_and_count_trained():
    logp = torch.tensor([[0.0, -1.0, -2.0, -3.0], [0.0, -0.5, -0.25, -4.0]])
    labels = torch.tensor([[5, 6, IGNORE, 7], [5, IGNORE, 8, 9]])  # position 0 is never predicted
    assert C.count_trained(labels) == 4
    loss = C.masked_ce_loss(logp, labels, n_tokens=8)
    assert float(loss) == pytest.approx((1.0 + 3.0 + 0.25 + 4.0) / 8)


# ----------------------------------------------------------------------------------------------
# Chat tokenisation and masks, checked on decoded text


def trained_pieces(tok, ids, labels):
    """Decoded text of every maximal run of trained tokens (labels must equal ids there)."""
    pieces, cur = [], []
    for t, l in zip(ids, labels):
        if l != IGNORE:
            assert l == t
            cur.append(t)
        elif cur:
            pieces.append(tok.decode(cur))
            cur = []
    if cur:
        pieces.append(tok.decode(cur))
    return pieces


def assistant_text(m):
    """What the assistant wrote in a message, in the documented fallback format for tool calls."""
    content = m.get("content") or ""
    calls = [S2.format_tool_call(c["function"]["name"], c["function"]["arguments"]) for c in m.get("tool_calls", [])]
    return (content + "\n" if content and calls else content) + "\n".join(calls)


def expected_pieces(tok, messages):
    end = tok.eos_token  # <|im_end|>
    return [assistant_text(m) + end for m in messages if m["role"] == "assistant" and m.get("train", True)]


SINGLE = [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "2 + 3 = 5."}]
MULTI = [{"role": "system", "content": "You are terse."},
         {"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."},
         {"role": "user", "content": "Another one, please."}, {"role": "assistant", "content": "Green, of course!"},
         {"role": "user", "content": "Thanks"}, {"role": "assistant", "content": "You're welcome."}]
PLAIN = {"single": SINGLE, "multi": MULTI, "system": MULTI[:3]}


def check_plain_conversations(tok):
    for name, msgs in PLAIN.items():
        r = C.tokenize_chat(tok, msgs)
        assert len(r["input_ids"]) == len(r["labels"])
        # the ids are exactly the tokenizer's own chat template tokenisation
        assert r["input_ids"] == chat_ids(tok, msgs), name
        assert tok.decode(r["input_ids"]) == tok.apply_chat_template(msgs, tokenize=False)
        assert trained_pieces(tok, r["input_ids"], r["labels"]) == expected_pieces(tok, msgs), name
        # nothing of the system / user text is trained
        untrained = tok.decode([t for t, l in zip(r["input_ids"], r["labels"]) if l == IGNORE])
        for m in msgs:
            if m["role"] != "assistant":
                assert m["content"] in untrained
        # prompt ids: the render up to the assistant header is a prefix of the full ids
        prompt = C.chat_prompt_ids(tok, msgs[:-1])
        assert r["input_ids"][:len(prompt)] == prompt
        assert prompt == chat_ids(tok, msgs[:-1], add_generation_prompt=True)


def check_tool_traces(tok, n_rows=3):
    rows = C.read_jsonl(ROOT / "data" / "agent_train.jsonl", required=("messages", "tools"))[:n_rows]
    for row in rows:
        msgs = row["messages"]
        assert any(m.get("tool_calls") for m in msgs) and any(m["role"] == "tool" for m in msgs)
        with pytest.raises(C.DataError, match="cannot render them"):  # never silently dropped
            C.tokenize_chat(tok, msgs, row["tools"])
        r = C.tokenize_chat(tok, S2.tool_fallback(msgs, tok, row["tools"]), row["tools"])
        assert trained_pieces(tok, r["input_ids"], r["labels"]) == expected_pieces(tok, msgs)
        untrained = tok.decode([t for t, l in zip(r["input_ids"], r["labels"]) if l == IGNORE])
        for m in msgs:
            if m["role"] == "tool":
                assert f"<|im_start|>tool\n{m['content']}<|im_end|>" in untrained  # tool output: not trained
        for t in row["tools"]:
            assert t["function"]["description"] in untrained  # schemas in the system message
        assert S2.TOOL_CALL_OPEN in tok.decode(C.chat_prompt_ids(tok, S2.tool_fallback(msgs[:2], tok, row["tools"]),
                                                                row["tools"]))


def check_segments(tok):
    end = tok.eos_token
    msgs = [{"role": "user", "content": "What is 6 * 7?"},
            {"role": "assistant", "segments": [{"text": "6 * 7 = 48.\nWait, that is wrong.\n", "train": False},
                                               {"text": "6 * 7 = 42.", "train": True}]}]
    r = C.tokenize_chat(tok, msgs)
    assert trained_pieces(tok, r["input_ids"], r["labels"]) == ["6 * 7 = 42." + end]
    assert "6 * 7 = 48." in tok.decode(r["input_ids"])  # the untrained segment is still in the context
    # a trained segment, an untrained one, a trained one
    msgs[1]["segments"] = [{"text": "Try: 48.\n", "train": True}, {"text": "No.\n", "train": False},
                           {"text": "It is 42.", "train": True}]
    r = C.tokenize_chat(tok, msgs)
    assert trained_pieces(tok, r["input_ids"], r["labels"]) == ["Try: 48.\n", "It is 42." + end]
    # a whole assistant message marked train: false (e.g. a demonstration turn) is context only
    msgs = MULTI[:3] + [{**MULTI[3]}, {**MULTI[4], "train": False}] + MULTI[5:]
    r = C.tokenize_chat(tok, msgs)
    assert trained_pieces(tok, r["input_ids"], r["labels"]) == ["Blue." + end, "You're welcome." + end]
    assert r["input_ids"] == chat_ids(tok, MULTI)


def test_tokenize_chat_plain_tiny(tok):
    check_plain_conversations(tok)


def test_tokenize_chat_tool_traces_tiny(tok):
    check_tool_traces(tok)


def test_tokenize_chat_segments_tiny(tok):
    check_segments(tok)


@pytest.fixture(scope="module")
def smol_tok():
    return M.load_tokenizer(M.EMBEDDED)


@pytest.mark.slow
def test_tokenize_chat_plain_smollm2(smol_tok):
    assert smol_tok.eos_token == "<|im_end|>" and smol_tok.pad_token_id == smol_tok.eos_token_id
    check_plain_conversations(smol_tok)


@pytest.mark.slow
def test_tokenize_chat_tool_traces_smollm2(smol_tok):
    check_tool_traces(smol_tok)


@pytest.mark.slow
def test_tokenize_chat_segments_smollm2(smol_tok):
    check_segments(smol_tok)


def test_show_masked(tok):
    r = C.tokenize_chat(tok, SINGLE)
    shown = C.show_masked(tok, r["input_ids"], r["labels"])
    assert shown.endswith("<|im_start|>assistant\n[[2 + 3 = 5.<|im_end|>]]\n")
    assert shown.count("[[") == 1


def test_tokenizer_without_chat_template_fails_clearly(tmp_path):
    tok = M.tiny_tokenizer()
    tok.chat_template = None
    with pytest.raises(ValueError, match="chat template"):
        C.tokenize_chat(tok, SINGLE)
    # the same when loading a saved model whose tokenizer has no template
    M.tiny_model(tok).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="chat template"):
        M.load_model_and_tokenizer(str(tmp_path))


def test_tokenize_chat_rejects_unknown_role(tok):
    with pytest.raises(C.DataError, match="role"):
        C.tokenize_chat(tok, [{"role": "narrator", "content": "x"}])


# ----------------------------------------------------------------------------------------------
# Reading data: errors name the file and line


def test_read_jsonl_good_and_blank_lines(tmp_path):
    p = tmp_path / "ok.jsonl"
    p.write_text('{"question": "q1", "answer": "1"}\n\n{"question": "q2", "answer": "2"}\n')
    rows = C.read_jsonl(p, required=("question", "answer"))
    assert rows == [{"question": "q1", "answer": "1"}, {"question": "q2", "answer": "2"}]


def test_read_jsonl_malformed_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"question": "q1", "answer": "1"}\n{"question": "q2", "answer": \n')
    with pytest.raises(C.DataError, match=r"bad\.jsonl:2: malformed JSON"):
        C.read_jsonl(p)


def test_read_jsonl_missing_field(tmp_path):
    p = tmp_path / "missing.jsonl"
    p.write_text('{"question": "q1", "answer": "1"}\n{"question": "q2", "answer": "2"}\n{"question": "q3"}\n')
    with pytest.raises(C.DataError, match=r"missing\.jsonl:3: missing field.*answer"):
        C.read_jsonl(p, required=("question", "answer"))


def test_read_jsonl_not_an_object(tmp_path):
    p = tmp_path / "list.jsonl"
    p.write_text('{"a": 1}\n[1, 2]\n')
    with pytest.raises(C.DataError, match=r"list\.jsonl:2: expected a JSON object"):
        C.read_jsonl(p)


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_read_jsonl_empty_file(tmp_path, content):
    p = tmp_path / "empty.jsonl"
    p.write_text(content)
    with pytest.raises(C.DataError, match=r"empty\.jsonl.*empty"):
        C.read_jsonl(p)


def test_read_jsonl_missing_file(tmp_path):
    with pytest.raises(C.DataError, match="not found"):
        C.read_jsonl(tmp_path / "nope.jsonl")


def test_read_json_list_file(tmp_path):
    p = tmp_path / "rows.json"
    p.write_text(json.dumps([{"prompt": "a", "chosen": "b", "rejected": "c"}, {"prompt": "d", "chosen": "e"}], indent=1))
    with pytest.raises(C.DataError, match=r"rows\.json:2: missing field.*rejected"):
        C.read_jsonl(p, required=("prompt", "chosen", "rejected"))
    assert C.read_jsonl(p, required=("prompt",))[1] == {"prompt": "d", "chosen": "e"}
    p.write_text('[{"prompt": "a"},\n {"prompt": }]')
    with pytest.raises(C.DataError, match=r"rows\.json:2: malformed JSON"):
        C.read_jsonl(p)
    p.write_text("[]")
    with pytest.raises(C.DataError, match="empty"):
        C.read_jsonl(p)


# ----------------------------------------------------------------------------------------------
# Lengths, packing, collation


def sample(n, n_prompt=0, start=10):
    ids = list(range(start, start + n))
    return {"input_ids": ids, "labels": [IGNORE] * n_prompt + ids[n_prompt:]}


def test_fit_length_drop_and_truncate():
    samples = [sample(3), sample(5), sample(8, 2), sample(9, 6)]  # the last: all trained tokens beyond 5
    kept, n = C.fit_length(samples, 5, "drop")
    assert n == 2 and [len(s["input_ids"]) for s in kept] == [3, 5]
    kept, n = C.fit_length(samples, 5, "truncate")
    assert n == 2  # two over-long samples; the one with nothing left to train is dropped
    assert [len(s["input_ids"]) for s in kept] == [3, 5, 5]
    assert kept[2] == {"input_ids": samples[2]["input_ids"][:5], "labels": samples[2]["labels"][:5]}
    assert samples[2]["input_ids"] == list(range(10, 18))  # the input is not modified
    with pytest.raises(ValueError, match="drop or truncate"):
        C.fit_length(samples, 5, "wrap")


def test_pack_rows_and_collate():
    samples = [sample(3, 1, 10), sample(4, 2, 20), sample(2, 0, 30), sample(5, 1, 40)]
    rows = C.pack_rows(samples, 8, packing=True)
    assert [len(r["input_ids"]) for r in rows] == [7, 7]
    assert rows[0]["position_ids"] == [0, 1, 2, 0, 1, 2, 3]
    assert rows[1]["input_ids"] == [30, 31, 40, 41, 42, 43, 44]
    # each sample's first token has no prefix: never trained (packed, it would be predicted from
    # the previous sample's last token)
    assert rows[1]["labels"] == [IGNORE, 31, IGNORE, 41, 42, 43, 44]
    assert rows[0]["labels"] == [IGNORE, 11, 12, IGNORE, IGNORE, 22, 23]
    unpacked = C.pack_rows(samples, 8, packing=False)
    assert len(unpacked) == 4 and [r["position_ids"] for r in unpacked][1] == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="fit_length"):
        C.pack_rows([sample(9)], 8)

    b = C.collate(unpacked, pad_id=2)  # the longest (5), rounded up to a multiple of 32
    assert b["input_ids"].shape == (4, C.LENGTH_MULTIPLE) and b["labels"][:, 5:].eq(IGNORE).all()
    b = C.collate(unpacked, pad_id=2, multiple=1)
    assert b["input_ids"].shape == (4, 5) and b["input_ids"].dtype == torch.long
    assert b["input_ids"][2].tolist() == [30, 31, 2, 2, 2]
    assert b["labels"][2].tolist() == [IGNORE, 31, IGNORE, IGNORE, IGNORE]
    assert b["position_ids"][2].tolist() == [0, 1, 2, 3, 4]
    b = C.collate(rows, pad_id=2, pad_to=9)
    assert b["input_ids"].shape == (2, 9)
    assert b["position_ids"][0].tolist() == [0, 1, 2, 0, 1, 2, 3, 4, 5]
    assert b["labels"][0, 7:].tolist() == [IGNORE, IGNORE]


def chat_samples(tok, n=6):
    rows = C.read_jsonl(ROOT / "data" / "chat_train.jsonl", required=("messages",))[:n]
    return [C.tokenize_chat(tok, r["messages"]) for r in rows]


def summed_logp(policy, rows, pad_id):
    b = C.collate(rows, pad_id)
    out = policy(b["input_ids"], b["labels"], position_ids=b["position_ids"])
    return float((out["logp"] * (b["labels"] != IGNORE)).sum()), C.count_trained(b["labels"])


def test_packing_gives_the_same_loss(tok, lm):
    samples, _ = C.fit_length(chat_samples(tok), 256, "truncate")
    samples += [sample(9, 0, 40), sample(5, 0, 120)]  # fully trained, first token included
    policy = M.LogProbModel(lm).eval()
    packed = C.pack_rows(samples, 512, packing=True)
    unpacked = C.pack_rows(samples, 512, packing=False)
    assert len(packed) < len(unpacked)
    with torch.no_grad():
        lp_packed, n_packed = summed_logp(policy, packed, tok.pad_token_id)
        lp_unpacked, n_unpacked = summed_logp(policy, unpacked, tok.pad_token_id)
        # and one sample at a time, no padding at all
        lp_single = sum(summed_logp(policy, [s], tok.pad_token_id)[0] for s in samples)
    assert n_packed == n_unpacked == sum(C.count_trained(torch.tensor([s["labels"]])) for s in samples)
    assert lp_packed == pytest.approx(lp_unpacked, rel=1e-5)
    assert lp_packed == pytest.approx(lp_single, rel=1e-5)


def test_packed_samples_do_not_attend_each_other(lm):
    policy = M.LogProbModel(lm).eval()
    a, b = sample(6, 0, 10), sample(5, 0, 100)
    a2 = {"input_ids": [250 - i for i in range(6)], "labels": [250 - i for i in range(6)]}
    with torch.no_grad():
        outs = []
        for first in (a, a2):
            batch = C.collate(C.pack_rows([first, b], 16), pad_id=2)
            assert batch["input_ids"].shape[0] == 1
            outs.append(policy(batch["input_ids"], batch["labels"], position_ids=batch["position_ids"])["logp"][0])
    assert not torch.allclose(outs[0][:6], outs[1][:6])  # sample A changed
    assert outs[0][6] == outs[1][6] == 0  # B's first token is not "predicted" from A's last one
    torch.testing.assert_close(outs[0][6:], outs[1][6:], atol=1e-6, rtol=0)  # sample B did not change


# ----------------------------------------------------------------------------------------------
# Data order and work split


def test_epoch_stream_indices_deterministic_and_resumable():
    n = 7
    full = C.epoch_stream_indices(n, 0, 30, seed=3)
    assert full == C.epoch_stream_indices(n, 0, 30, seed=3)
    assert full != C.epoch_stream_indices(n, 0, 30, seed=4)
    for cut in (0, 5, 7, 13):  # resume anywhere, also mid-epoch
        assert C.epoch_stream_indices(n, 0, cut, 3) + C.epoch_stream_indices(n, cut, 30 - cut, 3) == full
    for e in range(4):  # every full epoch is a permutation
        assert sorted(full[e * n:(e + 1) * n]) == list(range(n))
    assert full[:n] != full[n:2 * n]  # epochs are reshuffled
    with pytest.raises(ValueError):
        C.epoch_stream_indices(0, 0, 1, 0)


@pytest.mark.parametrize("world,mbs,n", [(1, 2, 12), (2, 2, 12), (3, 1, 12), (4, 3, 12), (2, 4, 10), (4, 2, 3)])
def test_rank_micro_batches_cover_the_step(world, mbs, n):
    """Every row of the step exactly once over all ranks; every rank runs the same number of
    micro-batches, ceil(n / (W x mbs)); one left with no row holds the filler (never padded)."""
    rows = list(range(n))
    per_rank = [C.rank_micro_batches(rows, C.Dist(rank=r, world_size=world), mbs, "E") for r in range(world)]
    accum = -(-n // (world * mbs))
    assert all(len(m) == accum and all(1 <= len(mb) <= mbs for mb in m) for m in per_rank)
    got = sorted(x for m in per_rank for mb in m for x in mb if x != "E")
    assert got == rows
    assert sum(mb == ["E"] for m in per_rank for mb in m) == world * accum - -(-n // mbs)  # slots with no row
    if n % (world * mbs) == 0:  # divisible: every micro-batch full
        assert all(len(mb) == mbs for m in per_rank for mb in m)


def test_empty_rows_are_not_run(tok, monkeypatch):
    """A step's rows are not padded with empty rows to a multiple of world size x micro batch:
    collated with real ones they would be padded to the longest and run in full. A last
    micro-batch holds what is left (1 row of 4), a rank left with nothing runs one 1-token row;
    the step's loss and weights equal those of the real rows in one micro-batch."""
    real = C.tokenize_chat(tok, [{"role": "user", "content": "What is 2 + 3?"},
                                 {"role": "assistant", "content": "2 + 3 = 5. The answer is 5."}])
    shapes, collate = [], C.collate
    monkeypatch.setattr(C, "collate", lambda rows, pad_id, **kw: shapes.append(len(rows)) or collate(rows, pad_id, **kw))
    results = []
    for rows, mbs, run in (([real, real], 2, [2]), ([real, real], 4, [2]), ([real, real, real], 2, [2, 1])):
        policy = M.LogProbModel(M.tiny_model(tok, seed=0))
        opt = C.make_optimizer(policy, 1e-3, 0.0)
        shapes.clear()
        res = C.sft_step(policy, opt, rows, C.Dist(), torch.float32, mbs, tok.pad_token_id, 1e-3, 1e9, 0)
        assert shapes == run and res["rows"] == len(rows)  # rows collated per micro-batch
        results.append((res["loss"], [p.detach().clone() for p in policy.parameters()]))
    (loss2, w2), (loss4, w4) = results[:2]  # 2 rows in a micro-batch of 4 == the same 2 rows alone
    assert loss4 == pytest.approx(loss2, rel=1e-6) and all(torch.allclose(a, b, atol=1e-6) for a, b in zip(w2, w4))
    # world size 2, one micro-batch of 2 rows between them: rank 1 is left with nothing
    assert C.rank_micro_batches([real], C.Dist(rank=1, world_size=2), 2, "E") == [["E"]]


# ----------------------------------------------------------------------------------------------
# Optimisation


def test_lr_at_warmup_and_cosine():
    peak, total, warm, m = 1e-3, 110, 10, 0.1
    assert C.lr_at(0, total, warm, peak, m) == pytest.approx(1e-4)
    assert C.lr_at(4, total, warm, peak, m) == pytest.approx(5e-4)
    assert C.lr_at(9, total, warm, peak, m) == pytest.approx(peak)
    assert C.lr_at(10, total, warm, peak, m) == pytest.approx(peak)
    assert C.lr_at(60, total, warm, peak, m) == pytest.approx(peak * (0.1 + 0.9 * 0.5))  # half way: cos = 0
    assert C.lr_at(35, total, warm, peak, m) == pytest.approx(peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4))))
    assert C.lr_at(110, total, warm, peak, m) == pytest.approx(peak * m)
    assert C.lr_at(500, total, warm, peak, m) == pytest.approx(peak * m)
    assert C.lr_at(0, 5, 0, peak, 0.0) == pytest.approx(peak)


def test_optimizer_step_rejects_nan(lm):
    opt = C.make_optimizer(lm, 1e-3, 0.1)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() < 2 for p in no_decay["params"]) and all(p.dim() >= 2 for p in decay["params"])
    for p in lm.parameters():
        p.grad = torch.full_like(p, float("nan"))
    with pytest.raises(FloatingPointError):
        C.optimizer_step(lm, opt, 1e-3, 1.0)
    with pytest.raises(FloatingPointError):
        C.check_finite(float("nan"), 3)


# ----------------------------------------------------------------------------------------------
# Config -> CLI


@dataclass
class SampleConfig:
    model: str = C.arg("tiny", "model name or path")
    lr: float = C.arg(1e-5, "peak learning rate")
    max_steps: int = C.arg(10, "optimizer steps")
    packing: bool = C.arg(True, "pack samples into rows")
    data: list[str] = C.arg(["a.jsonl", "b.jsonl"], "data files")
    ids: list[int] = C.arg([1, 2], "some integers")


def test_parse_config_defaults_and_types():
    cfg = C.parse_config(SampleConfig, [])
    assert cfg == SampleConfig()
    cfg.data.append("c")
    assert C.parse_config(SampleConfig, []).data == ["a.jsonl", "b.jsonl"]  # defaults not shared
    cfg = C.parse_config(SampleConfig, ["--lr", "3e-4", "--max_steps", "7", "--packing", "false",
                                        "--data", "x.jsonl", "--ids", "5", "6", "7", "--model", "m"])
    assert cfg == SampleConfig(model="m", lr=3e-4, max_steps=7, packing=False, data=["x.jsonl"], ids=[5, 6, 7])
    assert type(cfg.lr) is float and type(cfg.max_steps) is int
    for word, val in [("true", True), ("1", True), ("yes", True), ("False", False), ("0", False), ("off", False)]:
        assert C.parse_config(SampleConfig, ["--packing", word]).packing is val


@pytest.mark.parametrize("argv", [["--lr", "abc"], ["--max_steps", "1.5"], ["--packing", "maybe"],
                                  ["--ids", "1", "x"], ["--unknown", "1"], ["--lrr", "1"], ["extra"]])
def test_parse_config_rejects(argv, capsys):
    with pytest.raises(SystemExit) as e:
        C.parse_config(SampleConfig, argv)
    assert e.value.code == 2
    assert "error" in capsys.readouterr().err


def test_parse_config_help_lists_every_field(capsys):
    with pytest.raises(SystemExit) as e:
        C.parse_config(SampleConfig, ["--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # undo argparse's line wrapping
    for f in SampleConfig.__dataclass_fields__.values():
        assert f"--{f.name}" in text and f.metadata["help"] in text, f.name


# ----------------------------------------------------------------------------------------------
# Generation


def naive_greedy(lm, prompt, n, eos=None):
    """Argmax loop without a KV cache, one unpadded prompt at a time."""
    seq = list(prompt)
    out = []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(lm(torch.tensor([seq])).logits[0, -1].argmax())
            out.append(nxt)
            seq.append(nxt)
            if nxt == eos:
                break
    return out


PROMPTS = [[5, 60, 70, 80, 90, 100, 110], [40, 41], [7, 8, 9, 200]]


def test_generate_greedy_matches_naive_loop_with_left_padding(tok, lm):
    lm.eval()
    never = 258  # an "EOS" that greedy decoding does not produce here (checked below)
    gen = S.generate(lm, PROMPTS, 10, eos_ids=never, pad_id=tok.pad_token_id, temperature=0.0)
    assert gen.tokens.shape == (3, 10) and gen.logp.shape == (3, 10)
    assert gen.lengths.tolist() == [10, 10, 10] and not gen.finished.any()
    for i, p in enumerate(PROMPTS):
        ref = naive_greedy(lm, p, 10)
        assert never not in ref
        assert gen.response_ids(i) == ref, i
    # greedy log-probs are scored at T = 1
    seq = PROMPTS[1] + gen.response_ids(1)
    with torch.no_grad():
        lsm = lm(torch.tensor([seq])).logits[0].double().log_softmax(-1)
    ref = [float(lsm[len(PROMPTS[1]) - 1 + k, t]) for k, t in enumerate(gen.response_ids(1))]
    assert gen.logp[1].tolist() == pytest.approx(ref, abs=1e-5)


def test_generate_stops_at_eos(tok, lm):
    lm.eval()
    free = [naive_greedy(lm, p, 12) for p in PROMPTS]
    eos = free[0][3]  # make the 4th greedy token of prompt 0 the EOS
    k0 = free[0].index(eos)
    gen = S.generate(lm, PROMPTS, 12, eos_ids=[eos, 257], pad_id=tok.pad_token_id, temperature=0.0)
    for i, ref in enumerate(free):
        n = ref.index(eos) + 1 if eos in ref else 12
        assert gen.lengths[i] == n and bool(gen.finished[i]) == (eos in ref)
        assert gen.response_ids(i) == ref[:n]
        assert (gen.tokens[i, n:] == tok.pad_token_id).all() and (gen.logp[i, n:] == 0).all()
    assert gen.lengths[0] == k0 + 1 and gen.finished[0] and gen.response_ids(0)[-1] == eos
    assert gen.tokens.shape[1] == int(gen.lengths.max())
    # every sequence finishing early ends the loop early
    gen = S.generate(lm, PROMPTS[:1], 12, eos_ids=eos, pad_id=tok.pad_token_id, temperature=0.0)
    assert gen.tokens.shape == (1, k0 + 1) and gen.finished.all()


def test_length_buckets_partition_rows_and_bound_padding():
    """sampler.length_buckets: every row exactly once, each group sorted by length and padded to
    its longest row with at most 25% padding; one group when all lengths are equal."""
    lengths = [39, 88, 41, 54, 70, 42, 39, 66, 50, 84, 2, 60]
    groups = S.length_buckets(lengths)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    for g in groups:
        assert [lengths[i] for i in g] == sorted(lengths[i] for i in g)
        assert len(g) * max(lengths[i] for i in g) <= 1.25 * sum(lengths[i] for i in g)
    assert S.length_buckets([5] * 7) == [list(range(7))] and S.length_buckets([]) == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_generate_dropping_finished_rows_changes_no_token(tok, lm, dtype):
    """Dropping finished rows from the batch (compact_at) and the grouped prefill give, in fp32, the
    tokens and log-probs of a never-compacting run and of one prompt at a time; in bf16 (the
    written-out decode step) the tokens of a never-compacting run."""
    lm.eval()
    prompts = PROMPTS + [[11, 12, 13, 14, 15, 16, 17, 18, 19], [30], [99, 98, 97], [5, 60, 70]]
    free = [naive_greedy(lm, p, 12) for p in prompts]
    eos = [free[0][2], free[3][5]]  # rows end at different steps
    d, wrapped = C.Dist(), M.LogProbModel(lm)
    with S.sampling_model(wrapped, d, dtype) as m:
        assert (m in S._ENGINES) == (dtype == torch.bfloat16)
        runs = [S.generate(m, prompts, 12, eos, tok.pad_token_id, temperature=0.0, compact_at=c)
                for c in (0.0, 0.75, 1.0)]
        alone = [S.generate(m, [p], 12, eos, tok.pad_token_id, temperature=0.0) for p in prompts]
    assert 0 < int(runs[0].finished.sum()) < len(prompts) - 1  # some rows end early, not all
    for g in runs[1:]:
        assert torch.equal(g.tokens, runs[0].tokens) and torch.equal(g.lengths, runs[0].lengths)
        assert torch.equal(g.finished, runs[0].finished)
        if dtype == torch.float32:
            torch.testing.assert_close(g.logp, runs[0].logp, atol=1e-5, rtol=0)
    if dtype == torch.float32:
        for i, (g, ref) in enumerate(zip(alone, free)):
            n = ref.index(next(t for t in ref if t in eos)) + 1 if any(t in eos for t in ref) else 12
            assert g.response_ids(0) == runs[0].response_ids(i) == ref[:n], i
            torch.testing.assert_close(g.logp[0, :n], runs[0].logp[i, :n], atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_generate_prefills_a_repeated_prompt_once(tok, lm, dtype):
    """A prompt that appears several times in one call (GRPO's group, S2R's K samples) is run
    through the prefill once; every copy, in any order among prompts of other lengths, then decodes
    exactly as that prompt alone (greedy; fp32: the log-probs to 1e-5 too)."""
    lm.eval()
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[0], PROMPTS[2], PROMPTS[1], PROMPTS[0]]
    d, wrapped, seen = C.Dist(), M.LogProbModel(lm), []
    with S.sampling_model(wrapped, d, dtype) as m:
        hf = m.lm if isinstance(m, M.LogProbModel) else m  # fp32: the model itself; bf16: its copy
        hook = hf.register_forward_pre_hook(  # the prefill's calls (a decode step passes the cache)
            lambda mod, args, kw: seen.append(0 if "past_key_values" in kw else kw["input_ids"].shape[0]),
            with_kwargs=True)
        try:
            dup = S.generate(m, prompts, 10, [], tok.pad_token_id, temperature=0.0)
        finally:
            hook.remove()
        alone = [S.generate(m, [p], 10, [], tok.pad_token_id, temperature=0.0) for p in PROMPTS]
    assert sum(seen) == len(PROMPTS)  # each distinct prompt went through the prefill once
    for i, p in enumerate(prompts):
        ref = alone[PROMPTS.index(p)]
        n = 6 if dtype == torch.bfloat16 else 10  # bf16 on a random tiny model meets near-ties later
        assert dup.response_ids(i)[:n] == ref.response_ids(0)[:n], i
        if dtype == torch.float32:
            torch.testing.assert_close(dup.logp[i], ref.logp[0], atol=1e-5, rtol=0)


def test_generate_stop_strings(tok, lm):
    lm.eval()
    free = naive_greedy(lm, PROMPTS[0], 12)
    stop = tok.decode(free[4:6])
    k = next(j for j in range(12) if stop in tok.decode(free[:j + 1]))
    gen = S.generate(lm, PROMPTS[:2], 12, eos_ids=257, pad_id=tok.pad_token_id, temperature=0.0,
                     stop_strings=[stop], tok=tok)
    assert gen.finished[0] and gen.response_ids(0) == free[:k + 1]


def test_generate_logp_equals_rescored_logp(tok, lm):
    """Sampling at T = 0.7 and rescoring with LogProbModel at T = 0.7 gives ratio 1 (PITFALLS #5)."""
    lm.eval()
    T = 0.7
    g = torch.Generator().manual_seed(0)
    gen = S.generate(lm, PROMPTS, 9, eos_ids=257, pad_id=tok.pad_token_id, temperature=T, generator=g)
    policy = M.LogProbModel(lm, chunk_size=5)
    rows = []
    for i, p in enumerate(PROMPTS):
        resp = gen.response_ids(i)
        rows.append({"input_ids": p + resp, "labels": [IGNORE] * len(p) + resp})
    b = C.collate(rows, tok.pad_token_id)  # batched, right padded
    with torch.no_grad():
        logp = policy(b["input_ids"], b["labels"], position_ids=b["position_ids"], temperature=T)["logp"]
    for i, p in enumerate(PROMPTS):
        n = int(gen.lengths[i])
        new = logp[i, len(p):len(p) + n]
        ratio = torch.exp(new - gen.logp[i, :n])
        torch.testing.assert_close(ratio, torch.ones_like(ratio), atol=1e-5, rtol=0)
    # the same seed gives the same samples
    again = S.generate(lm, PROMPTS, 9, eos_ids=257, pad_id=tok.pad_token_id, temperature=T,
                       generator=torch.Generator().manual_seed(0))
    assert torch.equal(again.tokens, gen.tokens)


def naive_top_p_keep(probs, top_p):
    """Indices of the smallest set of most-probable tokens whose total probability reaches top_p."""
    order = sorted(range(len(probs)), key=lambda i: -probs[i])
    keep, total = set(), 0.0
    for i in order:
        keep.add(i)
        total += probs[i]
        if total >= top_p:
            break
    return keep


def test_top_p_filter():
    probs = torch.tensor([0.15, 0.5, 0.05, 0.3])
    logits = probs.log()
    for top_p, keep in [(0.4, {1}), (0.7, {1, 3}), (0.85, {1, 3, 0}), (0.9, {1, 3, 0}), (0.97, {0, 1, 2, 3}),
                        (1.0, {0, 1, 2, 3})]:
        out = S.top_p_filter(logits[None], top_p)[0]
        assert {i for i in range(4) if out[i] > -math.inf} == keep, top_p
        assert torch.equal(out[list(keep)], logits[list(keep)])  # kept logits unchanged
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 40, generator=g) * 2
    for top_p in (0.3, 0.6, 0.95):
        out = S.top_p_filter(logits, top_p)
        for b in range(5):
            want = naive_top_p_keep(logits[b].double().softmax(-1).tolist(), top_p)
            assert {i for i in range(40) if out[b, i] > -math.inf} == want


# ----------------------------------------------------------------------------------------------
# Checkpoints


@dataclass
class CkptConfig:
    lr: float = C.arg(1e-2, "learning rate")
    model: str = C.arg("tiny", "model")


def train_step(policy, opt, batch):
    out = policy(batch["input_ids"], batch["labels"], position_ids=batch["position_ids"])
    loss = C.masked_ce_loss(out["logp"], batch["labels"], C.count_trained(batch["labels"]))
    loss.backward()
    C.optimizer_step(policy, opt, 1e-2, 1.0)
    return float(loss.detach())


def test_checkpoint_roundtrip(tmp_path, tok):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    d = C.Dist()
    samples, _ = C.fit_length(chat_samples(tok, 4), 128, "truncate")
    batch = C.collate(C.pack_rows(samples, 128, packing=False), tok.pad_token_id)
    policy = M.LogProbModel(M.tiny_model(tok, seed=0))
    opt = C.make_optimizer(policy, 1e-2, 0.1)
    for _ in range(2):
        train_step(policy, opt, batch)

    C.set_seed(5)
    ck = M.save_checkpoint(tmp_path, 2, policy, tok, opt, d, CkptConfig(), {"sample_pos": 8})
    after_save = (torch.rand(3), random.random(), np.random.rand())
    assert ck == tmp_path / "ckpt-000002" and (ck / "model" / "config.json").exists()
    assert json.loads((ck / "config.json").read_text()) == {"lr": 0.01, "model": "tiny"}

    # the model dir is a plain HF model with fp32 weights and the same logits
    with safe_open(str(ck / "model" / "model.safetensors"), "pt") as f:
        assert all(f.get_tensor(k).dtype == torch.float32 for k in f.keys())
    hf = AutoModelForCausalLM.from_pretrained(ck / "model")
    with torch.no_grad():
        assert torch.equal(hf(batch["input_ids"]).logits, policy.lm(batch["input_ids"]).logits)
    assert M.load_tokenizer(str(ck / "model")).chat_template == tok.chat_template

    # a kill mid-write leaves a .tmp dir (and maybe an incomplete dir): both ignored
    (tmp_path / "ckpt-000009.tmp" / "model").mkdir(parents=True)
    (tmp_path / "ckpt-000007").mkdir()
    assert M.latest_checkpoint(tmp_path) == ck
    assert M.latest_checkpoint(tmp_path / "nothing_here") is None

    # resume: model from ck/model, fresh optimizer, restore optimizer + RNG + train state
    torch.manual_seed(123)
    random.seed(123)
    np.random.seed(123)
    model2, _ = M.load_model_and_tokenizer(str(ck / "model"))
    policy2 = M.LogProbModel(model2)
    opt2 = C.make_optimizer(policy2, 1e-2, 0.1)
    state = M.load_checkpoint(M.latest_checkpoint(tmp_path), policy2, opt2, d)
    assert state == {"step": 2, "sample_pos": 8}
    assert (torch.rand(3), random.random(), np.random.rand())[1:] == after_save[1:]
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s1["param_groups"] == s2["param_groups"]
    for k in s1["state"]:
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(s1["state"][k][name], s2["state"][k][name])
    # one more step from both gives identical weights
    train_step(policy, opt, batch)
    train_step(policy2, opt2, batch)
    for (n, a), b in zip(policy.named_parameters(), policy2.parameters()):
        assert torch.equal(a, b), n


def test_checkpoint_rng_and_keep_last(tmp_path, tok):
    d = C.Dist()
    policy = M.LogProbModel(M.tiny_model(tok))
    opt = C.make_optimizer(policy, 1e-2, 0.0)
    torch.manual_seed(7)
    for step in (1, 2, 3):
        M.save_checkpoint(tmp_path, step, policy, tok, opt, d, CkptConfig(), {})
    expected = torch.rand(4)
    assert sorted(p.name for p in tmp_path.glob("ckpt-*")) == ["ckpt-000002", "ckpt-000003"]
    torch.rand(10)
    M.load_checkpoint(M.latest_checkpoint(tmp_path), policy, opt, d)
    assert torch.equal(torch.rand(4), expected)


def test_save_hf_final(tmp_path, tok):
    policy = M.LogProbModel(M.tiny_model(tok, seed=3))
    M.save_hf(policy, tok, tmp_path / "final", C.Dist())
    assert not (tmp_path / "final.tmp").exists()
    model, tok2 = M.load_model_and_tokenizer(str(tmp_path / "final"))
    for (n, a), (m, b) in zip(policy.lm.state_dict().items(), model.state_dict().items()):
        assert n == m and torch.equal(a, b)
    assert tok2.pad_token_id == tok2.eos_token_id == tok.eos_token_id


# ----------------------------------------------------------------------------------------------
# Logging and precision


def test_metrics_logger(tmp_path, capsys):
    log = C.MetricsLogger(tmp_path / "run", C.Dist(), total_steps=2)
    log.log(1, {"loss": 0.123456789, "n": 3, "t": torch.tensor(2.5)})
    log.log(2, {"loss": 0.5, "lens": torch.tensor([1, 2])})
    log.close()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[0]["loss"] == pytest.approx(0.123457, abs=1e-6) and rows[0]["n"] == 3 and rows[0]["t"] == 2.5
    assert rows[1]["lens"] == [1, 2] and "time" in rows[1]
    # a non-main rank writes nothing
    C.MetricsLogger(tmp_path / "rank1", C.Dist(rank=1, world_size=2), 2).log(1, {"loss": 1.0})
    assert not (tmp_path / "rank1" / "metrics.jsonl").exists()


def test_resolve_dtype(monkeypatch):
    cpu = torch.device("cpu")
    native = C.cpu_has_native_bf16()
    assert C.resolve_dtype("auto", cpu) == (torch.bfloat16 if native else torch.float32)
    if "avx512_bf16" not in Path("/proc/cpuinfo").read_text() and "amx_bf16" not in Path("/proc/cpuinfo").read_text():
        assert not native and C.resolve_dtype("auto", cpu) == torch.float32  # e.g. this AVX2-only EPYC
    monkeypatch.setattr(C, "cpu_has_native_bf16", lambda: True)
    assert C.resolve_dtype("auto", cpu) == torch.bfloat16
    monkeypatch.setattr(C, "cpu_has_native_bf16", lambda: False)
    assert C.resolve_dtype("auto", cpu) == torch.float32
    assert C.resolve_dtype("fp32", cpu) == torch.float32 and C.resolve_dtype("bf16", cpu) == torch.bfloat16
    with pytest.raises(ValueError, match="precision"):
        C.resolve_dtype("fp16", cpu)
    lin, d = torch.nn.Linear(2, 2), C.Dist()
    with C.fwd_context(lin, d, torch.bfloat16):
        assert lin(torch.ones(1, 2)).dtype == torch.bfloat16
    with C.fwd_context(lin, d, torch.float32):
        assert lin(torch.ones(1, 2)).dtype == torch.float32


def test_sample_categorical_is_exact_in_distribution_and_skips_zero_probabilities():
    """The sampler's two-level inverse-CDF draw (sampler.sample_categorical): chi-square against
    the probabilities over 200k draws (V = 600, not a multiple of the block), never a token of
    probability 0, and deterministic given the generator."""
    g = torch.Generator().manual_seed(0)
    V, n = 600, 200_000
    p = torch.rand(V, generator=g) ** 3
    p[::7] = 0.0  # zero-probability tokens (as after top-p)
    p = p / p.sum()
    draws = S.sample_categorical(p.expand(n, V).contiguous(), torch.Generator().manual_seed(1), block=64)
    counts = torch.bincount(draws, minlength=V).double()
    assert counts[p == 0].sum() == 0
    keep = p > 0
    expected = p.double()[keep] * n
    chi2 = float(((counts[keep] - expected) ** 2 / expected).sum())
    dof = int(keep.sum()) - 1
    assert chi2 < dof + 5 * math.sqrt(2 * dof), (chi2, dof)  # ~5 sigma
    again = S.sample_categorical(p.expand(4, V).contiguous(), torch.Generator().manual_seed(3))
    assert torch.equal(again, S.sample_categorical(p.expand(4, V).contiguous(), torch.Generator().manual_seed(3)))


def test_sampling_model_bf16_copy_is_refreshed_and_fp32_is_the_model_itself(tok, lm):
    d = C.Dist()
    wrapped = M.LogProbModel(lm)
    with S.sampling_model(wrapped, d, torch.float32) as m:
        assert m is wrapped
    with S.sampling_model(wrapped, d, torch.bfloat16) as m:
        assert m is not lm and next(m.parameters()).dtype == torch.bfloat16
        assert all(b.dtype == b0.dtype for b, b0 in zip(m.buffers(), lm.buffers()))  # rotary stays fp32
        first = m
    with torch.no_grad():
        lm.get_input_embeddings().weight.add_(1.0)  # a training step moves the master weights
    with S.sampling_model(wrapped, d, torch.bfloat16) as m:
        assert m is first  # one copy, refreshed in place
        torch.testing.assert_close(m.get_input_embeddings().weight.float(),
                                   lm.get_input_embeddings().weight.bfloat16().float())
    assert sum(1 for _ in wrapped.parameters()) == sum(1 for _ in lm.parameters())  # not a submodule


def decode_prompts(tok) -> list[list[int]]:
    """Two prompts of different lengths (so one is left-padded) for the decode-step tests."""
    return [tok(t, add_special_tokens=False)["input_ids"] for t in ("Hello there, how are", "Two plus")]


def test_llama_decode_step_matches_hf_bf16_and_follows_weight_refreshes(tok, lm):
    """The written-out bf16 decode step (sampler.LlamaDecodeStep, used for the bf16 sampling copy)
    gives HF's bf16 greedy tokens and log-probs; after the master weights move, sampling_model's
    refresh reaches it (its q/k/v and gate/up weights are views into the fused ones)."""
    d = C.Dist()
    wrapped = M.LogProbModel(lm)
    prompts = decode_prompts(tok)

    def both():
        with S.sampling_model(wrapped, d, torch.bfloat16) as m:
            assert m in S._ENGINES
            fast = S.generate(m, prompts, 12, [], tok.pad_token_id, temperature=0.0)
            engine = S._ENGINES.pop(m)
            try:
                slow = S.generate(m, prompts, 12, [], tok.pad_token_id, temperature=0.0)
            finally:
                S._ENGINES[m] = engine
        return fast, slow
    # bf16 greedy decoding of a random tiny model meets near-ties (flat distributions), where two
    # correct bf16 computations may pick different tokens: compare the first steps
    fast, slow = both()
    assert torch.equal(fast.tokens[:, :6], slow.tokens[:, :6])
    torch.testing.assert_close(fast.logp[:, :6], slow.logp[:, :6], atol=0.05, rtol=0)
    with torch.no_grad():
        for p_ in lm.parameters():
            p_.mul_(1.5)
    fast2, slow2 = both()
    assert torch.equal(fast2.tokens[:, :6], slow2.tokens[:, :6])
    torch.testing.assert_close(fast2.logp[:, :6], slow2.logp[:, :6], atol=0.05, rtol=0)
    assert (fast2.logp[:, :6] - fast.logp[:, :6]).abs().max() > 0.05  # the refresh reached the engine


@pytest.mark.skipif(not C.cpu_has_native_bf16(), reason="the oneDNN-packed weights are used only where the CPU has native bf16")
def test_packed_decode_weights_give_the_plain_products_bit_for_bit_and_follow_refreshes(tok, lm):
    """LlamaDecodeStep.repack: the GEMMs through the oneDNN-packed weights give exactly the tokens
    and log-probs of the plain products (x @ w.t()), before and after the master weights move (a
    stale packed copy would sample from the old weights)."""
    d = C.Dist()
    wrapped = M.LogProbModel(lm)
    prompts = decode_prompts(tok)

    def packed_and_plain():
        with S.sampling_model(wrapped, d, torch.bfloat16) as m:
            engine = S._ENGINES[m]
            assert len(engine.packed) == 4 * len(engine.layers) + 1  # q|k|v, o, gate|up, down; the head
            gen = torch.Generator().manual_seed(0)
            packed = S.generate(m, prompts, 12, [], tok.pad_token_id, temperature=1.0, generator=gen)
            kept, engine.packed = engine.packed, {}
            try:
                gen = torch.Generator().manual_seed(0)
                plain = S.generate(m, prompts, 12, [], tok.pad_token_id, temperature=1.0, generator=gen)
            finally:
                engine.packed = kept
        assert torch.equal(packed.tokens, plain.tokens) and torch.equal(packed.logp, plain.logp)
        return packed
    before = packed_and_plain()
    with torch.no_grad():
        for p_ in lm.parameters():
            p_.mul_(1.5)
    after = packed_and_plain()
    assert (after.logp - before.logp).abs().max() > 0.05  # the weights moved, and the packed copy with them
