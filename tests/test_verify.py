"""Tests for the math verifier (verify.py); the code sandbox has tests/test_sandbox.py."""

import os
import sys
import threading

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from verify import extract_final_answer, math_answers_equal, score_math  # noqa: E402



# ---------------------------------------------------------------------------
# Math: extraction
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("so the result is \\boxed{5}", "5"),
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),  # nested braces
    ("first \\boxed{3} then \\boxed{4}", "4"),  # the last box
    ("$\\boxed{ 12 }$.", "12"),
    ("\\boxed{-3}", "-3"),
    ("The answer is 3. \\boxed{4}", "4"),  # a box beats a phrase
    ("The answer is 42.", "42"),
    ("The answer is 42. Let me double check that.", "42"),
    ("the ANSWER is 3.5", "3.5"),
    ("Final answer: $3.5$", "3.5"),
    ("answer: x = 4", "x = 4"),
    ("**Answer:** 7", "7"),
    ("Answer:\n42", "42"),
    ("The final answer is $\\frac{3}{4}$. I hope it is correct.", "\\frac{3}{4}"),
    ("Final Answer: The final answer is 9. I hope it is correct.", "9"),
    ("Natalia sold 48 + 24 = 72 clips.\n#### 72", "72"),
    ("The answer is 3 ... actually the answer is 5", "5"),  # the last phrase
    ("I think it's 12", None),
    ("let me verify the answer: 3+2=5", None),  # "answer:" mid-sentence is not a marker  # no marker: strict extraction finds nothing
    ("", None),
    ("\\boxed{}", None),  # an empty box is no answer
    ("\\boxed{5", None),  # unclosed box
])
def test_extract_final_answer(text, expected):
    assert extract_final_answer(text) == expected


def test_extract_last_number_fallback_is_opt_in():
    text = "so she has 1,234 apples and 3 pears left over, then 17"
    assert extract_final_answer(text) is None
    assert extract_final_answer(text, allow_last_number=True) == "17"
    assert extract_final_answer("we get 1,234 apples", allow_last_number=True) == "1,234"
    assert extract_final_answer("no digits here", allow_last_number=True) is None


def test_extract_is_linear_on_hostile_input():
    # 50k unclosed boxes: a quadratic scanner would take minutes.
    assert extract_final_answer("\\boxed{" * 50_000) is None


# ---------------------------------------------------------------------------
# Math: equivalence
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("pred, ref, expected", [
    ("\\frac{1}{2}", "0.5", True),
    ("1,234", "1234", True),
    ("1,000", "1000", True),
    ("0.75", "3/4", True),
    ("\\dfrac{3}{4}", "0.75", True),
    ("\\tfrac34", "0.75", True),  # not a plain number: goes through math_verify
    ("-\\frac{3}{4}", "-0.75", True),
    ("50%", "50", True),  # percent convention: p% == p == p/100
    ("50\\%", "0.5", True),
    ("25%", "0.25%", False),
    ("12 km", "12", True),
    ("120 minutes", "120", True),
    ("5\\text{ km}", "5", True),
    ("6 km/h", "6", True),
    ("x = 4", "4", True),
    ("$12", "12", True),
    ("\\$12.00", "12", True),
    ("-3", "-3", True),
    ("\u22123", "-3", True),  # unicode minus
    ("-3", "3", False),
    ("4", "5", False),
    ("3x", "3", False),  # a single letter is not a unit
    ("3 pi", "3", False),
    ("2 and 3", "2", False),
    ("\\left(1, 2\\right)", "(1,2)", True),
    ("2\\sqrt{3}", "\\sqrt{12}", True),  # symbolic, via math_verify
    ("\\frac{\\pi}{2}", "\\pi/2", True),
    ("x^2+2x+1", "(x+1)^2", True),
    ("10^{3}", "1000", True),
    ("\\sqrt{2}", "1.5", False),
    ("Yes", "yes", True),
    ("", "5", False),
    ("1" * 1001, "1" * 1001, False),  # over the length cap: rejected before any parsing
])
def test_math_answers_equal(pred, ref, expected):
    assert math_answers_equal(pred, ref) is expected


def test_math_answers_equal_works_off_the_main_thread():
    # math_verify's timeouts use signal.alarm, which raises in non-main threads.
    results = []
    worker = threading.Thread(target=lambda: results.append(math_answers_equal("2\\sqrt{3}", "\\sqrt{12}")))
    worker.start()
    worker.join()
    assert results == [True]


# ---------------------------------------------------------------------------
# Math: reward and its anti-hacking checks
# ---------------------------------------------------------------------------

_PROMPT = ("Compute 17 + 25. For example, 1 + 1 gives \\boxed{2}. "
           "Put your final answer in \\boxed{}.")


@pytest.mark.parametrize("response, ref, prompt, reward, reason", [
    ("Half of one is \\boxed{\\frac{1}{2}}", "0.5", "", 1.0, "correct"),
    ("Final answer: $1,234$.", "1234", "", 1.0, "correct"),
    ("The answer is 50%", "50", "", 1.0, "correct"),
    ("The answer is 12 km.", "12", "", 1.0, "correct"),
    ("**Answer:** x = 4", "4", "", 1.0, "correct"),
    ("\\boxed{-7}", "-7", "", 1.0, "correct"),
    ("#### 72", "72", "", 1.0, "correct"),
    ("\\boxed{7}", "-7", "", 0.0, "wrong"),
    ("\\boxed{3}", "4", "", 0.0, "wrong"),
    # the same answer stated twice, in two spellings, is fine
    ("The answer is 0.5.\n\nSo: \\boxed{\\frac{1}{2}}", "1/2", "", 1.0, "correct"),
    ("\\boxed{5} and to confirm, \\boxed{5}", "5", "", 1.0, "correct"),
    # hack: hedging with several different final answers
    ("It is either \\boxed{3} or \\boxed{5}", "5", "", 0.0, "multiple_answers"),
    ("The answer is 3. Hmm, no. The answer is 5.", "5", "", 0.0, "multiple_answers"),
    # a box outranks marker phrases; only answers of the winning kind are compared
    ("The answer is 3.\n\\boxed{5}", "5", "", 1.0, "correct"),
    # reasoning chatter is not a final answer
    ("Let me verify the answer: 3 + 2 = 5.\nThe answer is 5.", "5", "", 1.0, "correct"),
    # hack: the right number only inside the reasoning, no committed answer
    ("17 + 25 = 42, so we get 42", "42", "", 0.0, "no_final_answer"),
    # hack: echoing the prompt (which contains a boxed example)
    (_PROMPT, "2", _PROMPT, 0.0, "echo"),
    (_PROMPT.replace(" ", "\n  ") + " ok", "2", _PROMPT, 0.0, "echo"),
    # restating a short question and then answering is not an echo
    ("What is 2+2? \\boxed{4}", "4", "What is 2+2?", 1.0, "correct"),
])
def test_score_math(response, ref, prompt, reward, reason):
    got_reward, info = score_math(response, ref, prompt)
    assert (got_reward, info["reason"]) == (reward, reason)


def test_score_math_too_long():
    assert score_math("x" * 9000 + "\\boxed{4}", "4") == (0.0, {"pred": None, "reason": "too_long"})
    assert score_math("\\boxed{4}" + " " * 100, "4", max_chars=50)[1]["reason"] == "too_long"
    assert score_math("\\boxed{4}" + " " * 100, "4", max_chars=500) == (1.0, {"pred": "4", "reason": "correct"})


def test_score_math_reports_prediction():
    assert score_math("so \\boxed{\\dfrac{1}{2}}.", "0.5") == (1.0, {"pred": "\\dfrac{1}{2}", "reason": "correct"})
