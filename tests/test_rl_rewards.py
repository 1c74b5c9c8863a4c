"""Stage 4 reward system: math / code / S2R / shaping rewards on tricky cases, and safe_reward
against rewards that raise, hang (in Python and in C) or return NaN."""
import os
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


from stage_scripts import load_script  # noqa: E402

rl = load_script("04_rl.py", "rl04")
import verify as V  # noqa: E402
Q = "Tom has 6 apples and buys 7 more. How many apples does he have?"


# ---------------------------------------------------------------------------- math (hack table)

@pytest.mark.parametrize("response, reward, why", [
    ("6 + 7 = 13.\nThe answer is 13.", 1.0, "plain correct"),
    ("6 + 7 = 13 apples.\nThe answer is 13 apples.", 1.0, "unit stripped"),
    ("\\boxed{13}", 1.0, "boxed"),
    ("6 + 7 = 12.\nThe answer is 12.", 0.0, "wrong"),
    ("The answer is 12. The answer is 13.", 0.0, "several different final answers (hedging)"),
    ("\\boxed{12} \\boxed{13} \\boxed{14}", 0.0, "box every candidate"),
    ("6 + 7 = 13, so he has 13 apples.", 0.0, "answer only inside the reasoning: no final answer"),
    ("I think it is 13", 0.0, "no marker"),
    (Q + " The answer is 13.", 1.0, "restate then answer is fine"),
    (Q, 0.0, "echoed prompt"),
    ("13 " * 5000 + "The answer is 13.", 0.0, "huge output"),
    ("The answer is 13." + " padding" * 2000, 0.0, "huge output after the answer"),
    ("", 0.0, "empty"),
])
def test_math_reward_table(response, reward, why):
    r, info = rl.math_reward(response, "13", Q)
    assert r == reward, (why, info)


def test_math_reward_echoed_reference_in_prompt():
    prompt = "Example: 2 + 2. The answer is 4. Now: what is 3 + 1?"
    assert rl.math_reward(prompt, "4", prompt)[0] == 0.0  # copying a worked example from the prompt
    assert rl.math_reward("3 + 1 = 4. The answer is 4.", "4", prompt)[0] == 1.0


# ---------------------------------------------------------------------------- S2R steps / advantages

S2R_OK = ("6 + 7 = 12. The answer is 12.\nCheck: 6 + 7 = 13, not 12. " + V.VERDICT_BAD +
          "\n6 + 7 = 13. The answer is 13.\nCheck: 13 - 7 = 6. " + V.VERDICT_OK)
S2R_BAD = "6 + 7 = 12. The answer is 12.\nCheck: looks right. " + V.VERDICT_OK


def test_s2r_steps_rewards():
    steps = rl.s2r_steps(S2R_OK, "13")
    assert [s["kind"] for s in steps] == ["attempt", "verify", "attempt", "verify"]
    assert [s["reward"] for s in steps] == [0.0, 1.0, 1.0, 1.0]  # wrong attempt, correctly rejected, ...
    assert S2R_OK[steps[1]["start"]:steps[1]["end"]].endswith(V.VERDICT_BAD)
    assert steps[-1]["end"] == len(S2R_OK)
    bad = rl.s2r_steps(S2R_BAD, "13")
    assert [s["reward"] for s in bad] == [0.0, 0.0]  # wrong attempt; verification wrongly says correct
    # outcome = correctness of the LAST attempt (several answers are the format, not hedging)
    assert rl.math_reward(S2R_OK, "13", Q)[0] == 1.0
    assert rl.math_reward(S2R_BAD, "13", Q)[0] == 0.0
    assert rl.math_reward(S2R_OK.replace("The answer is 13.", "The answer is 14."), "13", Q)[0] == 0.0


def test_s2r_path_applies_the_strict_answer_check():
    """Bug pinned: the S2R step split graded an attempt by its LAST answer only, so a hedged
    attempt with two boxed answers scored 1 through math_reward while score_math alone gave 0."""
    hedge = "The answer is \\boxed{1} \\boxed{84}. " + V.VERDICT_OK
    assert V.score_math(hedge.replace(V.VERDICT_OK, ""), "84")[0] == 0.0
    assert rl.math_reward(hedge, "84", Q)[0] == 0.0
    steps = rl.s2r_steps(hedge, "84")
    assert [(s["kind"], s["reward"]) for s in steps] == [("attempt", 0.0), ("verify", 0.0)]
    two = "The answer is 3.5. The answer is 13.\n" + V.VERDICT_OK  # two answers in one attempt: hedging
    assert [s["reward"] for s in rl.s2r_steps(two, "13")] == [0.0, 0.0] and rl.math_reward(two, "13", Q)[0] == 0.0
    # text after a final "correct" verdict is a new attempt without an answer: the outcome is 0
    assert rl.math_reward("The answer is 13. " + V.VERDICT_OK + " and some trailing words", "13", Q)[0] == 0.0
    assert rl.math_reward("The answer is 13. " + V.VERDICT_OK, "13", Q)[0] == 1.0


def test_process_advantages_hand_values():
    step_rewards = [[0.0, 1.0, 1.0, 1.0], [0.0, 0.0]]  # one group of G=2
    outcome = torch.tensor([1.0, 0.0])
    o = rl.process_advantages(step_rewards, outcome, 2, "outcome", std_norm=False)
    assert o == [[0.5] * 4, [-0.5] * 2]
    p = rl.process_advantages(step_rewards, outcome, 2, "process", std_norm=False)
    assert p == [[0.0, 0.5, 0.0, 0.0], [0.0, -0.5]]
    b = rl.process_advantages(step_rewards, outcome, 2, "both", std_norm=False)
    assert b == [[0.5, 1.0, 0.5, 0.5], [-0.5, -1.0]]
    ps = rl.process_advantages(step_rewards, outcome, 2, "process", std_norm=True)
    assert ps[0][1] == pytest.approx(0.5 / (2 ** -0.5 + 1e-6))
    with pytest.raises(ValueError):
        rl.process_advantages(step_rewards, outcome, 2, "steps")


def test_attempts_only_zeroes_the_verification_steps():
    kinds = [["attempt", "verify", "attempt", "verify"], ["attempt"]]
    steps = [[{"kind": k} for k in ks] for ks in kinds]
    adv = [[0.5, 1.0, 0.5, 0.5], [-0.5]]
    assert rl.attempts_only(adv, steps) == [[0.5, 0.0, 0.5, 0.0], [-0.5]]
    assert adv == [[0.5, 1.0, 0.5, 0.5], [-0.5]]  # pure: the input is not changed


def test_token_step_index():
    steps = [{"end": 8}, {"end": 15}]
    assert rl.token_step_index([0, 5, 10, 20], steps) == [0, 0, 1, 1]
    assert rl.token_step_index([0, 1], []) == [-1, -1]


# ---------------------------------------------------------------------------- code, toy, shaping

def test_code_reward_fraction_all_or_nothing_and_hostile():
    resp = "Here you go:\n```python\ndef f(x):\n    return x + 1\n```"
    tests = ["assert f(1) == 2", "assert f(2) == 4"]
    assert rl.code_reward(resp, tests, "f")[0] == 0.5
    assert rl.code_reward(resp, tests, "f", all_or_nothing=True)[0] == 0.0
    r, info = rl.code_reward("```python\ndef f(x):\n    while True: pass\n```", tests, "f", timeout_s=1.0)
    assert r == 0.0 and info["status"] == "timeout"


def test_code_reward_batch_through_the_pool_equals_one_by_one():
    """Stage 4 scores a whole code batch at once (sandbox.run_code_tests_batch): same rewards as
    code_reward one response at a time, in order."""
    tests = ["assert f(1) == 2", "assert f(2) == 3", "assert f(0) == 1"]
    texts = ["```python\ndef f(x):\n    return x + 1\n```", "```python\ndef f(x):\n    return 2 * x\n```",
             "no code", "```python\ndef f(x):\n    return 1\n```"] * 2
    items = [{"row": {"tests": tests, "entry_point": "f"}} for _ in texts]
    fn = rl.make_reward_fn("code", rl.Config(code_workers=3))
    rewards, statuses, infos = fn(items, texts, [None] * len(texts))
    assert rewards == [rl.code_reward(t, tests, "f")[0] for t in texts] == [1.0, 1 / 3, 0.0, 1 / 3] * 2
    assert statuses == ["ok"] * len(texts) and all(i["sandbox"] == "bwrap" for i in infos)


def test_toy_format_overlong():
    assert rl.toy_reward("abc") == 1.0
    assert rl.toy_reward("aB1 ") == 0.25
    assert rl.toy_reward("") == 0.0
    assert rl.format_reward("so 13. The answer is 13.", "stem") == 1.0
    assert rl.format_reward("so 13", "stem") == 0.0
    assert rl.format_reward("```python\nx=1\n```", "code") == 1.0
    assert rl.format_reward("x = 1", "code") == 0.0
    assert rl.overlong_penalty(48, 64, 16) == 0.0
    assert rl.overlong_penalty(56, 64, 16) == -0.5
    assert rl.overlong_penalty(64, 64, 16) == -1.0
    assert rl.overlong_penalty(65, 64, 16) == -1.0


# ---------------------------------------------------------------------------- safe_reward

def _raise(*a):
    raise RuntimeError("boom")


def _sleep_forever(*a):
    while True:
        time.sleep(1)


def _busy_in_c(*a):
    return sum(range(10 ** 14))  # one C call holding the GIL: no signal handler can interrupt it


def _die(*a):
    os._exit(3)


@pytest.mark.parametrize("timeout", [None, 5.0])
@pytest.mark.parametrize("fn, status", [
    (_raise, "error"),
    (lambda: float("nan"), "nan"),
    (lambda: float("inf"), "nan"),
    (lambda: "not a number", "nan"),
    (lambda: None, "nan"),
    (lambda: (0.75, {"why": "ok"}), "ok"),
    (lambda: 1, "ok"),
])
def test_safe_reward_failures_inline_and_forked(fn, status, timeout):
    v, st, info = rl.safe_reward(fn, timeout_s=timeout, failure_value=-1.0)
    assert st == status
    if status == "ok":
        assert v in (0.75, 1.0)
    else:
        assert v == -1.0


@pytest.mark.parametrize("fn", [_sleep_forever, _busy_in_c])
def test_safe_reward_hangs_are_killed(fn):
    v, st, _ = rl.safe_reward(fn, timeout_s=1.0, failure_value=0.0)
    assert (v, st) == (0.0, "timeout")


def test_safe_reward_worker_death_is_a_failure():
    v, st, info = rl.safe_reward(_die, timeout_s=5.0)
    assert (v, st) == (0.0, "error") and "died" in info["error"]


def test_stem_reward_fn_counts_failures():
    cfg = rl.Config(reward_timeout_s=5.0, failure_reward=0.0)
    fn = rl.make_reward_fn("stem", cfg)
    items = [{"row": {"question": Q, "answer": "13"}}, {"row": {"question": Q, "answer": "13"}},
             {"row": {"question": Q}}]  # a malformed row: the reward raises inside -> counted
    rewards, status, infos = fn(items, ["The answer is 13.", "The answer is 12.", "The answer is 13."], [[], [], []])
    assert rewards == [1.0, 0.0, 0.0]
    assert status == ["ok", "ok", "error"]
