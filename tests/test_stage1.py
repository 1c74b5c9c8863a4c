"""Tests of 01_cold_start_sft.py (stage 1: cold-start SFT with self-verification), tiny model.

The loss mask excludes wrong attempts (gradient of their targets is exactly zero); the loss equals
a float64 loop reference; packing does not change the loss; 1 process x accumulation 2 == 2
processes (torchrun, gloo) x accumulation 1; trajectory construction (true verdicts, segment
masks, difficulty -> attempts, both verification styles, perturbed fallbacks, bad input and
verifiers that raise or hang); the eval's trajectory parser and verdict scoring; a learning test;
stop-and-resume == uninterrupted.
"""
import json
import os
import subprocess
import sys
import threading
from collections import Counter
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import common as C  # noqa: E402
import models as M  # noqa: E402
import verify as V  # noqa: E402
from stage_scripts import load_script  # noqa: E402

IGNORE = C.IGNORE
DATA = ROOT / "data"


S1 = load_script("01_cold_start_sft.py", "cold_start_sft")


@pytest.fixture(scope="module")
def tok():
    return M.tiny_tokenizer()


def read(name):
    return [json.loads(line) for line in (DATA / name).read_text().splitlines() if line.strip()]


def math_row(qtype=None, question_has=None):
    for r in read("math_train.jsonl"):
        if (qtype is None or r["type"] == qtype) and (question_has is None or question_has in r["question"]):
            return r
    raise LookupError(qtype)


def grader_for(task):
    """grade(text, tests=None) as build_trajectories passes it to compose_trajectory (real verifiers)."""
    def grade(text, tests=None):
        t = task if tests is None else {**task, "tests": tests}
        return S1.safe_grade(S1.default_grader, t, text, 30.0)
    return grade


def assistant_text(traj):
    return "".join(s["text"] for s in traj["messages"][-1]["segments"])


def check_verdicts_true(task, traj):
    """Every verification's verdict equals the real grade of the attempt it checks; the last attempt
    is correct and confirmed; segment flags: wrong attempts False, everything else True."""
    segs = traj["messages"][-1]["segments"]
    steps = V.split_trajectory(assistant_text(traj))
    assert len(steps) == len(segs) // 2 == traj["n_failed"] + 1
    for k, st in enumerate(steps):
        ok, _ = S1.default_grader(task, st["attempt"])
        assert st["verdict"] is ok, (k, st)
        assert segs[2 * k]["train"] is ok and segs[2 * k + 1]["train"] is True
        assert st["attempt"].strip() == segs[2 * k]["text"].strip()
    assert steps[-1]["verdict"] is True and all(s["verdict"] is False for s in steps[:-1])


# ----------------------------------------------------------------------------------------------
# Format: parser, first attempt


def test_split_trajectory_round_trip_and_edge_cases():
    a1, a2 = "x is 3.\nThe answer is 3.", "x is 2.\nThe answer is 2."
    text = (a1 + V.verification_text("3 != 2", False) + a2 + V.verification_text("2 == 2", True))
    steps = V.split_trajectory(text)
    assert [s["attempt"] for s in steps] == [a1, a2]
    assert [s["verdict"] for s in steps] == [False, True]
    assert steps[0]["verification"] == V.VERIFY_OPEN + "3 != 2\n" + V.VERDICT_BAD
    assert [text[slice(*s["attempt_span"])] for s in steps] == [a1, a2]  # spans index the text
    # no verification: one attempt; an unfinished verification: verdict None
    keys = ("attempt", "verification", "verdict")
    one = V.split_trajectory("just an answer")
    assert [{k: s[k] for k in keys} for s in one] == [{"attempt": "just an answer", "verification": None, "verdict": None}]
    cut = V.split_trajectory(a1 + V.VERIFY_OPEN + "I solve it again")
    assert [{k: s[k] for k in keys} for s in cut] == [{"attempt": a1, "verification": V.VERIFY_OPEN + "I solve it again",
                                                      "verdict": None}]
    # free-form verifications (no VERIFY_OPEN): the attempt ends after its last "The answer is X."
    free = V.split_trajectory("6 * 7 = 41. The answer is 41. Check: 6 * 7 = 42. " + V.VERDICT_BAD + " The answer is 42.")
    assert [s["attempt"] for s in free] == ["6 * 7 = 41. The answer is 41.", "The answer is 42."]
    assert [s["verdict"] for s in free] == [False, None]
    # the verdict phrases are distinct (neither is a substring of the other)
    assert V.VERDICT_OK not in V.VERDICT_BAD and V.VERDICT_BAD not in V.VERDICT_OK
    # a sampled response is cut before any marker
    assert V.first_attempt(a1 + V.VERIFY_OPEN + "blah" + V.VERDICT_OK) == a1
    assert V.first_attempt("  plain  ") == "plain"


# ----------------------------------------------------------------------------------------------
# Loss: mask, float64 reference, packing


def reflective_sample(tok):
    task = S1.math_task(math_row("rates"))
    wrong = "Speed is 7.\nThe answer is 7."
    traj = S1.compose_trajectory(task, [(wrong, False, S1.default_grader(task, wrong)[1])], 1, "problem_solving",
                                 np.random.default_rng(0), grader_for(task), Counter())
    return traj, wrong, C.tokenize_chat(tok, traj["messages"])


def test_mask_excludes_wrong_attempt(tok):
    traj, wrong, s = reflective_sample(tok)
    shown = C.show_masked(tok, s["input_ids"], s["labels"])
    trained = "".join(part.split("]]")[0] for part in shown.split("[[")[1:])
    assert wrong not in trained and "Speed is 7" not in trained  # the wrong attempt is context only
    assert V.VERDICT_BAD in trained and V.VERDICT_OK in trained and V.ATTEMPT_SEP.strip() in trained
    assert traj["messages"][-1]["segments"][2]["text"] in trained  # the final attempt is trained
    assert wrong in tok.decode(s["input_ids"])  # ... but present in the input

    # the gradient reaching the output layer from positions whose TARGET is a wrong-attempt token
    # is exactly zero; trained targets get -1/N
    model = M.tiny_model(tok, seed=0)
    policy = M.LogProbModel(model)
    b = C.collate([s], tok.pad_token_id, multiple=1)  # positions line up with the offsets below
    logp = policy(b["input_ids"], b["labels"])["logp"].detach().requires_grad_(True)
    n = C.count_trained(b["labels"])
    C.masked_ce_loss(logp, b["labels"], n).backward()
    enc = tok(C._render(tok, C.to_template_messages(traj["messages"], tok), None, False), add_special_tokens=False,
              return_offsets_mapping=True)
    full = tok.decode(enc["input_ids"])
    start = full.index(wrong)
    in_wrong = torch.tensor([start <= o[0] < start + len(wrong) for o in enc["offset_mapping"]])
    assert in_wrong.sum() >= len(wrong) - 2
    g = logp.grad[0]
    assert torch.all(g[in_wrong] == 0)
    trained_pos = b["labels"][0] != IGNORE
    trained_pos[0] = False
    assert torch.allclose(g[trained_pos], torch.full_like(g[trained_pos], -1.0 / n))
    # through the real model: the final hidden state at position t feeds only the prediction of
    # token t+1, so its gradient is zero exactly where the target is a wrong-attempt token
    captured = {}

    def keep(module, inputs, output):
        output.retain_grad()
        captured["h"] = output

    handle = model.model.norm.register_forward_hook(keep)
    model.zero_grad()
    out = policy(b["input_ids"], b["labels"])
    C.masked_ce_loss(out["logp"], b["labels"], n).backward()
    handle.remove()
    hg = captured["h"].grad[0].abs().sum(-1)  # [T]
    target_wrong = in_wrong[1:]  # hidden t predicts token t+1
    assert torch.all(hg[:-1][target_wrong] == 0)
    assert torch.all(hg[:-1][trained_pos[1:]] > 0)
    # the wrong attempt still conditions the rest (its input embeddings get gradient: context)
    assert model.model.embed_tokens.weight.grad is not None
    # the ablation (--train_wrong_attempts true) trains the wrong attempt too
    all_on = [{**m, "segments": [{**x, "train": True} for x in m["segments"]]} if "segments" in m else m
              for m in traj["messages"]]
    s_all = C.tokenize_chat(tok, all_on)
    assert C.count_trained(torch.tensor([s_all["labels"]])) > n + len(wrong) - 3


def naive_ce(logits: torch.Tensor, labels: torch.Tensor, n: int) -> float:
    """-(1/N) sum over t with labels[b, t] != IGNORE (t >= 1) of log softmax(logits[b, t-1])[labels[b, t]], float64 loop."""
    total = 0.0
    lg = logits.double()
    for bi in range(labels.shape[0]):
        for t in range(1, labels.shape[1]):
            y = int(labels[bi, t])
            if y != IGNORE:
                total -= float(torch.log_softmax(lg[bi, t - 1], -1)[y])
    return total / n


def test_loss_hand_case_and_float64_reference(tok):
    # hand case: logp given, labels with IGNORE; position 0 is never counted
    logp = torch.tensor([[-5.0, -1.0, -2.0, -3.0], [-7.0, -0.5, -9.0, -0.25]])
    labels = torch.tensor([[9, 1, IGNORE, 1], [9, IGNORE, IGNORE, 1]])
    assert torch.isclose(C.masked_ce_loss(logp, labels, 4), torch.tensor((1.0 + 3.0 + 0.25) / 4))
    # the model's loss vs a float64 loop over the HF model's own logits
    traj, _, s = reflective_sample(tok)
    plain = C.tokenize_chat(tok, [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}])
    b = C.collate([s, plain], tok.pad_token_id)
    model = M.tiny_model(tok, seed=1)
    policy = M.LogProbModel(model)
    n = C.count_trained(b["labels"])
    loss = C.masked_ce_loss(policy(b["input_ids"], b["labels"], position_ids=b["position_ids"])["logp"], b["labels"], n)
    with torch.no_grad():
        logits = model(input_ids=b["input_ids"], position_ids=b["position_ids"]).logits
    assert abs(loss.item() - naive_ce(logits, b["labels"], n)) < 1e-5


def test_packing_does_not_change_the_loss(tok):
    _, _, s = reflective_sample(tok)
    others = [C.tokenize_chat(tok, [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a" * (5 + i)}])
              for i in range(3)]
    samples = [s] + others
    model = M.tiny_model(tok, seed=2)
    policy = M.LogProbModel(model)
    n = sum(C.count_trained(torch.tensor([x["labels"]])) for x in samples)
    losses = []
    for packing in (True, False):
        rows = C.pack_rows(samples, 2048, packing)
        assert len(rows) == (1 if packing else 4)
        b = C.collate(rows, tok.pad_token_id)
        out = policy(b["input_ids"], b["labels"], position_ids=b["position_ids"])
        losses.append(C.masked_ce_loss(out["logp"], b["labels"], n).item())
    assert abs(losses[0] - losses[1]) < 1e-5


# ----------------------------------------------------------------------------------------------
# Trajectory construction (pure functions + real verifiers)


def test_difficulty_buckets_and_attempt_distributions():
    edges = [0.5, 0.0]
    assert [S1.difficulty_bucket(p, edges) for p in (1.0, 0.75, 0.5, 0.25, 0.0)] == [0, 0, 1, 1, 2]
    dists = S1.parse_attempt_dists("0:1.0;0:0.5,1:0.5;1:0.25,3:0.75", 3)
    assert dists == [{0: 1.0}, {0: 0.5, 1: 0.5}, {1: 0.25, 3: 0.75}]
    rng = np.random.default_rng(0)
    draws = Counter(S1.draw_n_failed(dists[2], rng) for _ in range(4000))
    assert set(draws) == {1, 3} and abs(draws[3] / 4000 - 0.75) < 0.03
    assert all(S1.draw_n_failed(dists[0], rng) == 0 for _ in range(50))
    for bad, msg in (("0:1.0;0:1.0", "need 3"), ("0:0.5;0:1;1:1", "sum to"), ("0:1;x;0:1", "bad item"),
                     ("0:1;-1:1;0:1", "negative")):
        with pytest.raises(ValueError, match=msg):
            S1.parse_attempt_dists(bad, 3)


@pytest.mark.parametrize("style", ["problem_solving", "confirmative"])
@pytest.mark.parametrize("qtype", ["linear_equation", "shopping", "fractions"])
def test_math_trajectories_verdicts_are_true(style, qtype):
    task = S1.math_task(math_row(qtype))
    wrong1 = "I think it is 12345.\nThe answer is 12345."
    wrong2 = "Not sure."  # no final answer
    samples = [(t, *S1.default_grader(task, t)) for t in (wrong1, wrong2)]
    assert [ok for _, ok, _ in samples] == [False, False]
    counts = Counter()
    traj = S1.compose_trajectory(task, samples, 2, style, np.random.default_rng(0), grader_for(task), counts)
    check_verdicts_true(task, traj)
    assert traj["final_from"] == "reference" and counts["final_from_reference"] == 1
    text = assistant_text(traj)
    assert wrong1 in text and wrong2 in text
    if style == "problem_solving":
        assert text.count("I solve the problem again.") == 3
    elif qtype == "linear_equation":
        assert text.count("I substitute x =") == 2  # the no-answer attempt cannot be substituted
        assert traj["verify_styles"] == ["confirmative", "problem_solving", "confirmative"]
    elif qtype == "shopping":
        assert text.count("I recompute the last step:") == 3
    assert "never states a final answer" in text


def test_math_trajectory_difficulty_and_fallbacks():
    task = S1.math_task(math_row("linear_equation"))
    ref = task["reference"]
    # all samples correct, but the draw asks for one failure: a perturbed reference is the wrong attempt
    counts = Counter()
    right = [(ref, *S1.default_grader(task, ref))]
    traj = S1.compose_trajectory(task, right, 1, "confirmative", np.random.default_rng(0), grader_for(task), counts)
    check_verdicts_true(task, traj)
    assert counts["perturbed_wrong"] == 1 and counts["final_from_model"] == 1 and traj["final_from"] == "model"
    assert traj["messages"][-1]["segments"][0]["text"] != ref
    # zero failures: the model's correct sample alone, trained and confirmed
    traj0 = S1.compose_trajectory(task, right, 0, "problem_solving", np.random.default_rng(0), grader_for(task), Counter())
    check_verdicts_true(task, traj0)
    assert [s["train"] for s in traj0["messages"][-1]["segments"]] == [True, True]
    # perturbations produce a different, wrong number
    for seed in range(20):
        bad = S1.perturb_math(ref, task["answer"], np.random.default_rng(seed))
        assert S1.default_grader(task, bad)[0] is False and bad.splitlines()[:-2] == ref.splitlines()[:-2]


def test_code_trajectory_confirmative_and_problem_solving():
    row = next(r for r in read("code_train.jsonl") if r["difficulty"] <= 2)
    task = S1.code_task(row)
    wrong = "```python\ndef " + row["entry_point"] + "(*a):\n    return 123456\n```"
    samples = [(wrong, *S1.default_grader(task, wrong))]
    assert samples[0][1] is False
    for style in ("confirmative", "problem_solving"):
        counts = Counter()
        traj = S1.compose_trajectory(task, samples, 2, style, np.random.default_rng(0), grader_for(task), counts)
        check_verdicts_true(task, traj)
        text = assistant_text(traj)
        assert counts["perturbed_wrong"] == 1  # one model-wrong sample, one mutant of the reference
        if style == "confirmative":
            assert "-> fails" in text and "-> passes" in text and f"All {len(row['tests'])} tests pass" in text
        else:
            assert "I write the function again" in text


def test_eval_arith_is_safe():
    assert V.eval_arith("4 * (3 + 1) - 1/2") == Fraction(31, 2)
    for bad in ("__import__('os')", "2 ** 1000000", "a + 1", "1/0", "x" * 300):
        with pytest.raises(ValueError):
            V.eval_arith(bad)
    assert S1.equation_in("What value of x satisfies 4(x + 1) = 12?") == ("4(x + 1)", "12")
    assert S1.equation_in("Find x if 5x + 2 = x + 6.") == ("5x + 2", "x + 6")
    assert S1.substitute("4(x + 1)", Fraction(-2)) == "4 * ((-2) + 1)"
    assert S1.last_step("The change is 50 - 16 = 34 dollars.\nThe answer is 34.", "34") == ("50 - 16", "34")


def test_bad_input_rows_are_counted(tmp_path):
    rows = [{"question": "1+1?", "solution": "1 + 1 = 2.\nThe answer is 2.", "answer": "2", "difficulty": 1},
            {"question": "no answer", "solution": "x", "difficulty": 1},
            {"question": "empty answer", "solution": "x", "answer": " ", "difficulty": 1}]
    p = tmp_path / "m.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    skipped = Counter()
    assert len(S1.load_tasks(str(p), "math", skipped)) == 1
    assert skipped == Counter({"math_answer_missing": 2})
    code = [{"prompt": "f", "tests": [], "solution": "def f(): pass", "entry_point": "f"},
            {"prompt": "g", "tests": ["assert g() == 1"], "solution": "def g(): return 1", "entry_point": "g"}]
    p2 = tmp_path / "c.jsonl"
    p2.write_text("".join(json.dumps(r) + "\n" for r in code))
    assert len(S1.load_tasks(str(p2), "code", skipped)) == 1 and skipped["code_tests_missing"] == 1


def test_verifier_that_raises_or_hangs_is_counted():
    grade = lambda task, text: (1 / 0, {})  # noqa: E731
    assert S1.safe_grade(grade, {}, "x", 5.0)[1]["reason"].startswith("verifier_error: ZeroDivisionError")
    hang = lambda task, text: (threading.Event().wait(60), {})  # noqa: E731
    assert S1.safe_grade(hang, {}, "x", 0.5) == (None, {"reason": "verifier_timeout"})


@pytest.mark.slow
def test_build_counts_raising_and_hanging_verifiers(tmp_path):
    # prompts in the order first graded (in a file: each grading call runs in its own forked child,
    # so the grader keeps no state in memory): the 1st one's verifier raises, the 2nd one's hangs
    seen = tmp_path / "order.json"

    def grader(task, text, code_timeout_s):
        order = json.loads(seen.read_text()) if seen.exists() else []
        if task["prompt"] not in order:
            seen.write_text(json.dumps(order + [task["prompt"]]))
            order.append(task["prompt"])
        if task["prompt"] == order[0]:
            raise RuntimeError("broken verifier")
        if len(order) > 1 and task["prompt"] == order[1]:
            threading.Event().wait(60)
        return S1.default_grader(task, text, code_timeout_s)

    res = S1.main(["--mode", "build", "--model", "tiny", "--out_dir", str(tmp_path), "--build_math_questions", "5",
                   "--build_code_questions", "0", "--unsampled_math_questions", "0", "--unsampled_code_questions", "0",
                   "--k_samples", "2", "--sample_max_new_tokens", "8",
                   "--verifier_timeout_s", "0.3"], grader=grader)
    counts = res["counts"]
    assert counts["verifier_error"] == 2 and counts["verifier_timeout"] == 2  # K = 2 samples each
    assert counts["task_no_graded_sample"] == 2 and counts["samples_graded"] == 6
    assert res["trajectories"] == 3
    lines = (tmp_path / "trajectories.jsonl").read_text().splitlines()
    assert len(lines) == res["trajectories"]
    assert json.loads((tmp_path / "build_stats.json").read_text())["verifier_error"] == counts["verifier_error"]


# ----------------------------------------------------------------------------------------------
# Eval scoring


def test_score_responses_counts_verdicts():
    task = S1.math_task(math_row("linear_equation"))
    good, bad = task["reference"], "The answer is 12345."
    texts = [bad + V.verification_text("no", False) + good + V.verification_text("yes", True),  # 2 right verdicts
             bad + V.verification_text("looks fine", True),  # a wrong verdict, wrong final
             good]  # no verification, correct
    c = S1.score_responses([task] * 3, texts, lambda t, x: S1.default_grader(t, x))
    assert c["n"] == 3 and c["correct"] == 2 and c["first_correct"] == 1
    assert c["with_verification"] == 2 and c["verdicts"] == 3 and c["verdicts_right"] == 2
    assert c["verdicts_on_correct"] == 1  # an always-"correct" verifier: right on 1 of the 3 checked attempts
    assert c["verdicts_right_on_correct"] == 1
    # balanced: the correct attempt called correct (1/1), the wrong ones: 1 of 2 called incorrect
    assert S1.verdict_balanced_acc(c["verdicts"], c["verdicts_right"], c["verdicts_on_correct"],
                                   c["verdicts_right_on_correct"]) == pytest.approx(0.75)
    assert c["answered"] == 3 and c["attempts"] == 4


def test_verdict_balanced_acc_scores_constant_verifiers_one_half():
    for n, on_correct in ((10, 1), (10, 9), (40, 3)):
        assert S1.verdict_balanced_acc(n, on_correct, on_correct, on_correct) == 0.5           # always "correct"
        assert S1.verdict_balanced_acc(n, n - on_correct, on_correct, 0) == 0.5                # always "incorrect"
    assert S1.verdict_balanced_acc(10, 10, 4, 4) == 1.0                                        # a perfect verifier
    assert S1.verdict_balanced_acc(5, 5, 0, 0) is None and S1.verdict_balanced_acc(5, 0, 5, 0) is None


def test_eval_reports_the_transfer_split_apart(tmp_path):
    """--mode eval grades the transfer split like math but reports it as transfer_* (and tags its
    responses), beside the regular math set, never mixed into it."""
    s = S1.main(["--mode", "eval", *TINY, "--eval_limit", "2", "--eval_transfer_limit", "3", "--eval_max_new_tokens", "4",
                 "--eval_loss_limit", "0", "--out_dir", str(tmp_path)])
    ev = s["eval"]
    assert ev["math_n"] == 2 and ev["transfer_n"] == 3
    assert 0 <= ev["transfer_acc"] <= 1 and 0 <= ev["transfer_answered"] <= 1
    rows = [json.loads(x) for x in (tmp_path / "eval_responses.jsonl").read_text().splitlines()]
    transfer = {r["prompt"] for r in rows if r["domain"] == "transfer"}
    assert len(transfer) == 3 and not transfer & {r["prompt"] for r in rows if r["domain"] == "math"}
    qs = {json.loads(x)["question"] for x in open(S1.C.resolve_path("data/math_transfer.jsonl"))}
    assert transfer <= qs


def test_step_rows_exact_count_and_resumable(tok):
    samples = [C.tokenize_chat(tok, [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a" * k}])
               for k in range(1, 30, 3)]
    rows, pos = S1.step_rows(samples, 0, 3, 250, True, seed=0)
    assert len(rows) == 3 and all(len(r["input_ids"]) <= 250 for r in rows)
    rows2, pos2 = S1.step_rows(samples, pos, 3, 250, True, seed=0)
    again, _ = S1.step_rows(samples, pos, 3, 250, True, seed=0)
    assert rows2 == again and pos2 > pos
    unpacked, p = S1.step_rows(samples, 0, 3, 250, False, seed=0)
    assert len(unpacked) == 3 and p == 3
    corpus = list(range(500))
    w = S1.corpus_windows(corpus, 4, 2, 64, seed=0)
    assert w == S1.corpus_windows(corpus, 4, 2, 64, seed=0) and all(len(r["input_ids"]) == 64 for r in w)


# ----------------------------------------------------------------------------------------------
# CLI runs: build fixture, learning, resume, 1 process x accum 2 == 2 processes x accum 1

TINY = ["--model", "tiny", "--precision", "fp32", "--device", "cpu", "--eval_limit", "0", "--eval_code_limit", "0",
        "--eval_transfer_limit", "0"]


@pytest.fixture(scope="module")
def trajectories(tmp_path_factory):
    out = tmp_path_factory.mktemp("build")
    res = S1.main(["--mode", "build", *TINY, "--out_dir", str(out), "--build_math_questions", "8",
                   "--build_code_questions", "2", "--unsampled_math_questions", "4", "--unsampled_code_questions", "1",
                   "--k_samples", "2", "--sample_max_new_tokens", "12"])
    assert res["trajectories"] == 15
    assert res["counts"]["unsampled_questions"] == 5 and res["counts"]["samples_graded"] == 20
    path = out / "trajectories.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert any(r["n_failed"] > 0 for r in rows) and all("difficulty" in r and "pass_rate" in r for r in rows)
    assert sum(not r["sampled"] for r in rows) == 5
    assert all(r["pass_rate"] is None and r["difficulty"] == 1 for r in rows if not r["sampled"])
    return str(path)


def test_sample_instruction_is_in_the_sampled_prompts_only(tmp_path, monkeypatch):
    """--sample_instruction follows each math question when the K attempts are sampled; the
    trajectories the model is trained on keep the bare question."""
    seen = []

    def fake_generate(policy, tok, prompts, *a, **kw):
        seen.extend(tok.decode(p) for p in prompts)
        return ["The answer is 1."] * len(prompts)

    monkeypatch.setattr(S1.S, "generate_texts", fake_generate)
    res = S1.main(["--mode", "build", *TINY, "--out_dir", str(tmp_path), "--build_math_questions", "3",
                   "--build_code_questions", "1", "--k_samples", "2", "--sample_instruction", " Say X."])
    assert res["trajectories"] == 4 and len(seen) == 8
    assert sum(" Say X." in p for p in seen) == 6  # the math prompts, not the code task's
    rows = [json.loads(x) for x in (tmp_path / "trajectories.jsonl").read_text().splitlines()]
    assert not any("Say X." in m.get("content", "") for r in rows for m in r["messages"])


def test_train_wrong_attempts_flag_turns_the_mask_off(tok, trajectories):
    counts = {}
    for flag in (False, True):
        cfg = S1.Config(model="tiny", objective="reflective", train_wrong_attempts=flag, max_len=4096)
        samples = S1.load_sft_samples(cfg, tok, Path(trajectories), Counter())
        counts[flag] = [C.count_trained(torch.tensor([x["labels"]])) for x in samples]
    rows = [json.loads(line) for line in Path(trajectories).read_text().splitlines()]
    for row, off, on in zip(rows, counts[False], counts[True]):
        assert (on > off) == (row["n_failed"] > 0), row["n_failed"]  # more trained tokens iff wrong attempts exist


def final_weights(out_dir):
    return load_file(str(Path(out_dir) / "final" / "model.safetensors"))


@pytest.mark.slow
def test_learning_plain_and_reflective(tmp_path, trajectories):
    for objective in ("plain", "reflective"):
        out = tmp_path / objective
        s = S1.main([*TINY, "--objective", objective, "--trajectories", trajectories, "--out_dir", str(out),
                     "--max_steps", "20", "--lr", "3e-3", "--warmup_steps", "2", "--micro_batch_size", "4",
                     "--max_len", "512", "--eval_loss_limit", "16"])
        start, end = s["start"]["heldout_loss"], s["end"]["heldout_loss"]
        assert end < start - 1.0, (objective, start, end)
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        losses = [r["loss"] for r in rows if "loss" in r]
        assert len(losses) == 20 and np.mean(losses[-5:]) < np.mean(losses[:5]) - 1.0


@pytest.mark.slow
def test_cot_pretrain_then_reflective_runs(tmp_path, trajectories):
    s = S1.main([*TINY, "--cot_pretrain_steps", "3", "--trajectories", trajectories, "--out_dir", str(tmp_path),
                 "--max_steps", "2", "--max_len", "1024", "--eval_loss_limit", "4"])
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in rows if "phase" in r] == ["cot_pretrain"] * 3 + ["reflective"] * 2
    assert s["steps"] == 5


@pytest.mark.slow
def test_resume_equals_uninterrupted(tmp_path, trajectories):
    common = [*TINY, "--trajectories", trajectories, "--max_steps", "4", "--lr", "1e-3", "--max_len", "1024",
              "--eval_loss_limit", "4", "--cot_pretrain_steps", "1"]
    S1.main([*common, "--out_dir", str(tmp_path / "a")])
    assert S1.main([*common, "--out_dir", str(tmp_path / "b"), "--stop_after", "2"]) is None
    assert not (tmp_path / "b" / "final").exists()
    S1.main([*common, "--out_dir", str(tmp_path / "b")])
    wa, wb = final_weights(tmp_path / "a"), final_weights(tmp_path / "b")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    pos = [json.loads(line).get("pos") for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    pos_b = [json.loads(line).get("pos") for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [p for p in pos if p is not None] == [p for p in pos_b if p is not None]


@pytest.mark.slow
def test_one_process_accum2_equals_two_processes(tmp_path, trajectories):
    common = [*TINY, "--trajectories", trajectories, "--max_steps", "2", "--lr", "1e-3", "--max_len", "1024",
              "--eval_loss_limit", "0", "--micro_batch_size", "1", "--warmup_steps", "1"]
    S1.main([*common, "--out_dir", str(tmp_path / "one"), "--grad_accum", "2"])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "01_cold_start_sft.py"), *common, "--out_dir", str(tmp_path / "two"), "--grad_accum", "1"]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    w1, w2 = final_weights(tmp_path / "one"), final_weights(tmp_path / "two")
    # the FSDP save also writes the tied output embedding (models.save_hf); it must equal the input one
    extra = set(w2) - set(w1)
    assert extra <= {"lm_head.weight"} and set(w1) <= set(w2)
    if extra:
        assert torch.equal(w2["lm_head.weight"], w2["model.embed_tokens.weight"])
    for k in w1:
        assert torch.allclose(w1[k], w2[k], atol=1e-6, rtol=0), (k, (w1[k] - w2[k]).abs().max())
    m1 = [json.loads(x) for x in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    m2 = [json.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    l1, l2 = [r["loss"] for r in m1 if "loss" in r], [r["loss"] for r in m2 if "loss" in r]
    assert np.allclose(l1, l2, atol=1e-6)


def test_code_grades_in_a_batch_equal_the_one_by_one_grader():
    """Stage 1 grades its sampled code attempts through the sandbox pool (code_grades): the verdicts
    and infos are those of default_grader called one at a time."""
    tasks = [json.loads(l) for l in (ROOT / "data" / "code_test.jsonl").read_text().splitlines()[:3]]
    tasks = [{**t, "domain": "code"} for t in tasks]
    pairs = [(t, f"```python\n{t['solution']}```") for t in tasks] + [(t, "def nope():\n    pass\n") for t in tasks]
    cfg = S1.Config(code_workers=2)
    got = S1.code_grades(pairs, cfg)
    assert len(got) == len(pairs)
    for t, x in pairs:
        assert got[(t["prompt"], x)] == S1.default_grader(t, x), t["entry_point"]
    assert sum(ok for ok, _ in got.values()) == 3
