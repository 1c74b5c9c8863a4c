"""
Stage 1: cold-start SFT with self-verification and self-correction (01_cold_start_sft.py).

Teaches chain-of-thought solutions (math, code) and the reflective behaviour of S2R: an attempt,
a verification of it that ends in a verdict, and, when the verdict is "incorrect", a new attempt,
until an attempt is confirmed correct.

Papers
  S2R: Teaching LLMs to Self-verify and Self-correct via Reinforcement Learning, Ma et al. 2025,
    arXiv:2502.12853: stage 0 (trajectory construction from the policy's own samples, difficulty
    from the pass rate) and stage 1 (behaviour initialisation: SFT with a mask over wrong attempts)
  Reflective SFT (attempts checked, then corrected) and CoT pre-training on random windows of
    concatenated question / steps / answer text, as asked for in this stage's issue
  Loss normalised by the global number of trained tokens: transformers PR #34191 (PITFALLS #1)

Modes (`--mode`)
  build  S2R stage 0. For each question: sample K responses from the initial policy (temperature
         `--sample_temperature`), grade them (math: V.score_math; code: sandbox.run_code_tests on
         sandbox.extract_code), pass rate p = correct / graded -> difficulty bucket
         b = #{e in --difficulty_edges : p <= e} (edges 0.5 0.0: b=0 easy p>0.5, b=1 medium
         0<p<=0.5, b=2 hard p=0) -> number of failed attempts n drawn from the bucket's
         distribution in `--attempts_by_difficulty` ("n:prob,..." per bucket, buckets separated
         by ";", easy first) -> trajectory s1 v1 ... sn vn s_{n+1} v_{n+1}. Wrong attempts are the
         model's own wrong samples (too few: a perturbed reference solution with a wrong final
         answer, counted); the final attempt is a model sample graded correct when there is one,
         else the dataset's reference solution (counted). Writes `--trajectories` (chat JSONL).
         Defaults: the faithful recipe, K = 8 for 112 math questions and 24 code tasks. The K
         attempts are sampled with `--sample_instruction` after the question (the trajectory keeps
         the bare question): without it the embedded model rarely states a final answer in 64
         tokens, and a wrong attempt's verification then only says "never states a final answer"
         (measured: 164 of 179 wrong attempts; with the instruction 19 of 35).
         Budget extension (not in S2R, off by default): `--unsampled_*_questions` further questions
         get trajectories WITHOUT sampling: pass rate unknown (null), bucket `--unsampled_bucket`,
         wrong attempts = perturbed references (near misses: the last step's result changed),
         final = reference. Each JSONL row says "sampled": true / false.
  train  (default) SFT; with --objective reflective and no trajectories file, runs build first.
  eval   held-out eval of --model only.

Objectives (`--objective`)
  reflective    the trajectories, loss mask m: wrong attempts are NOT trained, verifications and
                the final attempt are (`--train_wrong_attempts true`: everything, the ablation)
  plain         question -> reference CoT solution -> answer (non-reflective SFT)
  cot_pretrain  plain LM loss on random `max_len` windows of the concatenated question + solution
                corpus. `--cot_pretrain_steps N` runs N such steps before reflective / plain.

Trajectory text format (defined once in verify.py; stage 4 rewards the same format)
  assistant = A1 V1 A2 V2 ... Aj Vj, each a separate segment of the assistant message:
    A_i = attempt text (math: CoT ending "The answer is X."; code: a ```python block)
    V_i = VERIFY_OPEN + check + "\\n" + verdict [+ ATTEMPT_SEP when the verdict is VERDICT_BAD]
  VERIFY_OPEN = "\\n\\nLet me check this answer.\\n"
  VERDICT_OK = "Verification: correct."     VERDICT_BAD = "Verification: incorrect."
  ATTEMPT_SEP = "\\n\\nLet me try again.\\n"   (ends a failed verification; the next attempt follows)
  `V.split_trajectory(text)` is the parser (eval uses it; the graded answer is the LAST attempt's).
  Verification styles (`--verify_style`), each built programmatically so its verdict is true:
    problem_solving  re-solve independently (the reference steps / a reference function), compare;
    confirmative     math equations: substitute the attempt's x into the equation, check both sides;
                     math word problems: recompute the reference's final step, compare with the
                     attempt's answer; code: run each test on the attempt's code, list pass / fail;
                     when no confirmative check can be built it falls back to problem_solving (counted);
    mixed            one of the two at random per verification.
  JSONL row: {"messages": [{"role": "user", ...}, {"role": "assistant", "segments": [{"text",
  "train"}, ...]}], "difficulty": b, "pass_rate": p, "source": "math"|"code", ...}

One optimizer step (mirrored by `# step N` comments in the loop)
  1. take samples from the shuffled stream at position `pos` (C.epoch_stream_indices) and pack
     them into exactly micro_batch_size x grad_accum x world_size rows of <= max_len tokens
     (cot_pretrain: that many random windows); every rank builds the same global rows;
  2. N = trained tokens of ALL those rows (no collective needed: every rank has them);
  3. loss = sum over this rank's micro-batches of C.masked_ce_loss(logp, labels, N), with the mask
     m = 0 on the wrong attempts (S2R behaviour initialisation); FSDP2 sums gradients over ranks,
     so 1 process x accumulation k == k processes x accumulation 1;
  4. clip, AdamW (warmup + cosine, C.lr_at); train_state holds `pos` -> exact resume.
  Steps 2-4 are the shared C.sft_step (stages 1, 2 and 3 train through it).

Eval (before training and at the end; every --eval_every steps a cheap held-out loss): greedy
accuracy of the FINAL attempt on held-out math (stratified over difficulty), on the transfer split
(`--math_transfer`: kinds and phrasings of math that no training file has; `transfer_*`) and on
code, accuracy of the first attempt, fraction of responses with a verification, and how often a
verdict matches the real correctness of the attempt it checks (`*_verdict_acc`, beside
`*_verdict_always_correct`: what a verifier that always says "correct" would score on the same
attempts). Prompts are sharded over ranks, counts all-reduced.

Deliberate simplifications
  * K is small and the policy is tiny, so most pass rates are 0 or 1/K: buckets are coarse.
  * Word-problem "confirmative" verification recomputes the reference's last step; it is not a
    substitution into the problem text (no general way to do that for templated word problems).
  * One LR schedule spans cot_pretrain + SFT steps; packing is sequential (next-fit).
  * Sampled responses are cut at the first format marker (a reflective model's first attempt).

Bad input: questions without an answer / reference, code without tests, and verifier calls that
raise or exceed `--verifier_timeout_s` are counted, reported and skipped, never silently zero.

Run (from the repo root)
  python 01_cold_start_sft.py                              # build + train + eval, embedded SmolLM2
  python 01_cold_start_sft.py --mode build --k_samples 4 --verify_style mixed
  python 01_cold_start_sft.py --objective plain
  python 01_cold_start_sft.py --cot_pretrain_steps 10 --objective reflective
  python 01_cold_start_sft.py --mode eval --model runs/01_cold_start_sft/final --out_dir runs/eval_s1
  python 01_cold_start_sft.py --model tiny --max_steps 4 --eval_limit 2   # seconds
  OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 01_cold_start_sft.py --device cpu   # FSDP2, gloo
"""
from __future__ import annotations

import json
import re
import time
from collections import Counter
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

import common as C
import models as M
import sampler as S
import sandbox
import verify as V


# ----------------------------------------------------------------------------------------------
# Config


@dataclass
class Config:
    # run
    mode: str = C.arg("train", "build | train | eval (see the module docstring)")
    objective: str = C.arg("reflective", "reflective | plain | cot_pretrain")
    model: str = C.arg(M.EMBEDDED, "'smollm2-135m-instruct' (embedded), 'tiny' or a local HF dir")
    out_dir: str = C.arg("runs/01_cold_start_sft", "output dir: trajectories, metrics, ckpt-*, final/")
    seed: int = C.arg(0, "seed of sampling, trajectory composition, data order and the tiny model")
    device: str = C.arg("auto", "auto | cpu | cuda")
    precision: str = C.arg("auto", "auto | bf16 | fp32 (auto: bf16 only where the hardware has it)")
    # data
    math_train: str = C.arg("data/math_train.jsonl", "math questions {question, solution, answer, difficulty}")
    code_train: str = C.arg("data/code_train.jsonl", "code tasks {prompt, tests, entry_point, solution}")
    math_test: str = C.arg("data/math_test.jsonl", "held-out math questions")
    code_test: str = C.arg("data/code_test.jsonl", "held-out code tasks")
    math_transfer: str = C.arg("data/math_transfer.jsonl", "held-out math of kinds and phrasings that no training "
                               "file has (the transfer split; '' = none)")
    train_difficulties: list[int] = C.arg([1, 2, 3], "dataset difficulty levels (1-5) used for build / plain / cot")
    system_prompt: str = C.arg("", "system message ('' = the chat template's default)")
    math_instruction: str = C.arg("", "text appended to every math question (train and eval); '' = none")
    # build (S2R stage 0)
    trajectories: str = C.arg("", "trajectories JSONL ('' = out_dir/trajectories.jsonl); built if missing")
    build_math_questions: int = C.arg(112, "math questions sampled for trajectories (0 = none)")
    build_code_questions: int = C.arg(24, "code tasks sampled for trajectories (0 = none)")
    unsampled_math_questions: int = C.arg(0, "extra math questions NOT sampled (cheap): perturbed-reference "
                                         "wrong attempts, reference final attempt (see docstring)")
    unsampled_code_questions: int = C.arg(0, "extra code tasks not sampled (mutated-reference wrong attempts)")
    unsampled_bucket: int = C.arg(1, "difficulty bucket whose attempts distribution the unsampled questions use")
    k_samples: int = C.arg(8, "K: responses sampled per question to estimate its pass rate")
    sample_temperature: float = C.arg(0.7, "temperature of the K samples")
    sample_max_new_tokens: int = C.arg(64, "max new tokens per sampled response")
    sample_batch_size: int = C.arg(128, "prompts per generate call while sampling (K copies of a question are "
                                        "prefilled once; bigger batches share the weight reads)")
    sample_instruction: str = C.arg(" Finish with 'The answer is X.'", "appended to a math question only when "
                                    "the K attempts are sampled (not in the trajectories): see the docstring")
    difficulty_edges: list[float] = C.arg([0.5, 0.0], "pass-rate edges: bucket = #{e : pass_rate <= e}")
    attempts_by_difficulty: str = C.arg("0:0.8,1:0.2;0:0.5,1:0.5;0:0.3,1:0.5,2:0.2",
                                        "per bucket (easy first, ';'-separated): n_failed:prob,...")
    verify_style: str = C.arg("problem_solving", "problem_solving | confirmative | mixed (per verification)")
    verifier_timeout_s: float = C.arg(20.0, "time limit of one grading call (hang -> counted, skipped)")
    code_timeout_s: float = C.arg(5.0, "time limit of one sandboxed code run")
    code_workers: int = C.arg(0, "programs graded at once by the sandbox pool (0 = the number of cores, at most 8)")
    unsafe_code_exec: bool = C.arg(False, "run model-written code WITHOUT the bubblewrap sandbox (warned); only "
                                          "for machines where bwrap cannot run and that you can throw away")
    # train
    train_wrong_attempts: bool = C.arg(False, "ablation: also train on the wrong attempts (mask off)")
    cot_pretrain_steps: int = C.arg(0, "LM steps on random corpus windows before the SFT steps")
    max_len: int = C.arg(512, "tokens per packed row / pretraining window")
    packing: bool = C.arg(True, "pack several samples per row (position ids restart per sample)")
    overlong: str = C.arg("drop", "drop | truncate samples longer than max_len (counted)")
    micro_batch_size: int = C.arg(1, "rows per forward pass per rank")
    grad_accum: int = C.arg(1, "micro-batches per optimizer step per rank")
    lr: float = C.arg(1e-4, "peak learning rate (full fine-tuning; 2e-4 lost more code: README)")
    min_lr_ratio: float = C.arg(0.1, "final lr = min_lr_ratio * lr (cosine)")
    warmup_steps: int = C.arg(5, "linear warmup steps")
    weight_decay: float = C.arg(0.0, "AdamW weight decay (not on norms / biases)")
    max_grad_norm: float = C.arg(1.0, "gradient clipping (global L2 norm)")
    max_steps: int = C.arg(72, "SFT optimizer steps (after cot_pretrain_steps)")
    activation_checkpointing: bool = C.arg(False, "recompute activations in backward (saves memory)")
    save_every: int = C.arg(0, "checkpoint every N steps (0 = only at the end); resume from the latest")
    resume: bool = C.arg(True, "resume from the latest checkpoint in out_dir")
    stop_after: int = C.arg(0, "stop after this many steps with a checkpoint, as if killed (tests)")
    wandb_project: str = C.arg("", "wandb project (offline unless WANDB_MODE says otherwise); '' = off")
    # eval
    eval_limit: int = C.arg(40, "held-out math questions (stratified over difficulty); 0 = none")
    eval_code_limit: int = C.arg(24, "held-out code tasks; 0 = none")
    eval_transfer_limit: int = C.arg(40, "transfer-split math questions (stratified over difficulty); 0 = none")
    eval_difficulties: list[int] = C.arg([1, 2, 3, 4, 5], "difficulty levels of the held-out questions")
    eval_max_new_tokens: int = C.arg(128, "max new tokens per eval response (greedy)")
    eval_batch_size: int = C.arg(256, "prompts per generate call (and rows per held-out loss forward) during eval: "
                                      "the pipeline's 204 prompts in one call, a fifth faster than calls of 52 "
                                      "(BENCHMARKS.md); the batch changes bf16 greedy answers a little")
    eval_loss_limit: int = C.arg(16, "held-out samples for the teacher-forced loss")
    eval_every: int = C.arg(0, "held-out loss every N steps (0 = only start / end, with the full eval)")


OBJECTIVES = ("reflective", "plain", "cot_pretrain")
STYLES = ("problem_solving", "confirmative", "mixed")

# ----------------------------------------------------------------------------------------------
# Trajectory format: one definition, in verify.py, shared with stage 4's process rewards

# The format itself (VERIFY_OPEN, VERDICT_OK, VERDICT_BAD, ATTEMPT_SEP), its parser
# (V.split_trajectory) and V.first_attempt live in verify.py: stage 4 rewards the same format.


# ----------------------------------------------------------------------------------------------
# Data: tasks (math questions, code tasks), validated; bad rows counted and skipped


def math_task(row: dict, instruction: str = "") -> dict:
    """A math row -> task; raises C.DataError (-> counted skip) when a field is missing or empty."""
    for k in ("question", "answer", "solution"):
        if not isinstance(row.get(k), str) or not row[k].strip():
            raise C.DataError(f"math row without {k}")
    prompt = row["question"].strip() + (("\n" + instruction) if instruction else "")
    return {"domain": "math", "prompt": prompt, "question": row["question"], "answer": row["answer"].strip(),
            "reference": row["solution"].strip(), "difficulty": row.get("difficulty"), "type": row.get("type")}


def code_task(row: dict) -> dict:
    """A code row -> task; raises C.DataError for no prompt, no tests, no reference solution."""
    if not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
        raise C.DataError("code row without prompt")
    if not isinstance(row.get("tests"), list) or not row["tests"]:
        raise C.DataError("code row without tests")
    if not isinstance(row.get("solution"), str) or not row["solution"].strip():
        raise C.DataError("code row without solution")
    return {"domain": "code", "prompt": row["prompt"].strip(), "tests": [str(t) for t in row["tests"]],
            "entry_point": row.get("entry_point"), "reference": "```python\n" + row["solution"].rstrip() + "\n```",
            "difficulty": row.get("difficulty")}


def load_tasks(path: str, domain: str, skipped: Counter, instruction: str = "",
               difficulties: list[int] | None = None) -> list[dict]:
    """Valid tasks of a JSONL file (optionally only the given dataset difficulties). Malformed JSON
    still raises (C.read_jsonl names file:line); rows with missing fields are counted in
    `skipped[f"{domain}_{reason}"]` and reported, never silently dropped."""
    tasks = []
    for line, row in enumerate(C.read_jsonl(C.resolve_path(path)), 1):
        try:
            t = math_task(row, instruction) if domain == "math" else code_task(row)
        except C.DataError as e:
            key = f"{domain}_" + str(e).split(" without ")[-1].replace(" ", "_") + "_missing"
            if skipped[key] < 3:
                C.print0(f"[data] skipped {path}:{line}: {e}")
            skipped[key] += 1
            continue
        if difficulties and t["difficulty"] is not None and int(t["difficulty"]) not in difficulties:
            continue
        tasks.append(t)
    return tasks


def stratified(tasks: list[dict], n: int, levels: list[int]) -> list[dict]:
    """Up to n tasks taken round-robin over difficulty levels (file order within a level)."""
    by = {lv: [t for t in tasks if t.get("difficulty") == lv] for lv in levels}
    by[None] = [t for t in tasks if t.get("difficulty") not in levels] if not levels else []
    out, i = [], 0
    while len(out) < n and any(i < len(v) for v in by.values()):
        for v in by.values():
            if i < len(v) and len(out) < n:
                out.append(v[i])
        i += 1
    return out


def prompt_messages(task: dict, system_prompt: str) -> list[dict]:
    return ([{"role": "system", "content": system_prompt}] if system_prompt else []) + \
        [{"role": "user", "content": task["prompt"]}]


# ----------------------------------------------------------------------------------------------
# Grading: every verifier call under a time limit; raises / hangs are counted, not fatal


def default_grader(task: dict, text: str, code_timeout_s: float = 5.0) -> tuple[bool, dict]:
    """Is `text` (one attempt) correct? math: V.score_math (strict final answer); code: all tests
    pass on sandbox.extract_code(text) in the sandbox. Returns (ok, info with "reason", math "pred")."""
    if task["domain"] == "math":
        r, info = V.score_math(text, task["answer"], prompt=task["prompt"])
        return r == 1.0, info
    r, info = sandbox.run_code_tests(sandbox.extract_code(text), task["tests"], task.get("entry_point"),
                                     timeout_s=code_timeout_s, all_or_nothing=True)
    return r == 1.0, {"reason": info["status"], "passed": info["passed"], "total": info["total"]}


def code_grades(pairs: list[tuple[dict, str]], cfg) -> dict:
    """{(prompt, text): (ok, info)} for the code (task, attempt) pairs, graded at once through the
    sandbox pool (sandbox.run_code_tests_batch), the same verdict default_grader gives one by one."""
    pairs = list({(t["prompt"], x): (t, x) for t, x in pairs if t["domain"] == "code"}.values())
    jobs = [{"code": sandbox.extract_code(x), "tests": t["tests"], "entry_point": t.get("entry_point")} for t, x in pairs]
    res = sandbox.run_code_tests_batch(jobs, cfg.code_workers, timeout_s=cfg.code_timeout_s, all_or_nothing=True)
    return {(t["prompt"], x): (r == 1.0, {"reason": info["status"], "passed": info["passed"], "total": info["total"]})
            for (t, x), (r, info) in zip(pairs, res)}


def as_grade(res, status: str, err) -> tuple[bool | None, dict]:
    """A guarded grader call's (value, status, error) -> (ok, info), or (None, {"reason":
    "verifier_timeout" | "verifier_error: ..."})."""
    if status != "ok":
        return None, {"reason": "verifier_timeout" if status == "timeout" else f"verifier_error: {err}"}
    ok, info = res
    return bool(ok), dict(info)


def safe_grade(grader, task: dict, text: str, timeout_s: float) -> tuple[bool | None, dict]:
    """The grader under V.call_with_timeout (a forked child, killed on time-out; safe from any thread)."""
    return as_grade(*V.call_with_timeout(grader, task, text, timeout_s=timeout_s))


def math_grades(pairs: list[tuple[dict, str]], cfg, grader) -> dict:
    """{(prompt, text): (ok | None, info)} for the math (task, attempt) pairs: the same results as
    safe_grade one by one, but all in ONE guarded child (V.map_with_timeout; a fresh child only
    after a hang). One fork of the 135M-model process per answer cost more than the grading."""
    pairs = list({(t["prompt"], x): (t, x) for t, x in pairs if t["domain"] == "math"}.values())
    res = V.map_with_timeout(lambda t, x: grader(t, x, cfg.code_timeout_s), pairs, cfg.verifier_timeout_s)
    return {(t["prompt"], x): as_grade(*r) for (t, x), r in zip(pairs, res)}


# ----------------------------------------------------------------------------------------------
# Pure functions of stage 0: difficulty, number of failed attempts, verifications, perturbations


def difficulty_bucket(pass_rate: float, edges: list[float]) -> int:
    """b = #{e in edges : pass_rate <= e}. Edges [0.5, 0.0]: 1.0 -> 0 (easy), 0.5 -> 1, 0 -> 2 (hard)."""
    return sum(pass_rate <= e for e in edges)


def parse_attempt_dists(spec: str, n_buckets: int) -> list[dict[int, float]]:
    """'0:0.8,1:0.2;0:0.5,1:0.5;...' -> one {n_failed: prob} per bucket (easy first); validated."""
    parts = [p for p in spec.split(";") if p.strip()]
    if len(parts) != n_buckets:
        raise ValueError(f"--attempts_by_difficulty has {len(parts)} distributions, need {n_buckets} "
                         f"(len(--difficulty_edges) + 1)")
    dists = []
    for p in parts:
        dist_ = {}
        for item in p.split(","):
            try:
                n, prob = item.split(":")
                n, prob = int(n), float(prob)
            except ValueError:
                raise ValueError(f"--attempts_by_difficulty: bad item {item!r}, expected n_failed:prob") from None
            if n < 0 or prob < 0:
                raise ValueError(f"--attempts_by_difficulty: negative value in {item!r}")
            dist_[n] = dist_.get(n, 0.0) + prob
        if abs(sum(dist_.values()) - 1.0) > 1e-6:
            raise ValueError(f"--attempts_by_difficulty: probabilities {p!r} sum to {sum(dist_.values())}, not 1")
        dists.append(dist_)
    return dists


def draw_n_failed(dist_: dict[int, float], rng: np.random.Generator) -> int:
    """Number of failed attempts before the correct one, drawn from {n: prob}."""
    ns = sorted(dist_)
    return int(ns[rng.choice(len(ns), p=np.array([dist_[n] for n in ns]))])


def fmt_number(v: Fraction) -> str:
    if v.denominator == 1:
        return str(v.numerator)
    return f"{v.numerator}/{v.denominator}"


_EQ_RE = re.compile(r"[0-9x(][0-9x+\-*/(). ]*=[0-9x+\-*/(). ]*[0-9x)]")
_STEP_RE = re.compile(r"(\d[\d./]*(?:\s*[-+*/]\s*\(?\d[\d./]*\)?)+)\s*=\s*(\d[\d./]*\d|\d)")


def equation_in(question: str) -> tuple[str, str] | None:
    """The single-variable equation of a 'Solve for x: ...' question as (lhs, rhs) text, else None."""
    for m in _EQ_RE.finditer(question):
        eq = m.group(0).strip()
        if eq.count("=") == 1 and "x" in eq:
            lhs, rhs = (s.strip() for s in eq.split("="))
            return lhs, rhs
    return None


def substitute(side: str, value: Fraction) -> str:
    """'5x + 2' with x = 3 -> '5 * 3 + 2' (implicit products made explicit; negatives in parens)."""
    s = re.sub(r"(\d)\s*(?=[x(])", r"\1 * ", side)
    s = re.sub(r"\)\s*(?=[\dx(])", ") * ", s)
    v = fmt_number(value)
    return s.replace("x", f"({v})" if value < 0 or value.denominator != 1 else v)


def last_step(reference: str, answer: str) -> tuple[str, str] | None:
    """(expression, result) of the last arithmetic step of a reference solution whose result is the
    final answer and whose expression evaluates exactly to it, e.g. ('50 - 16', '34'); else None."""
    lines = [l for l in reference.split("\n") if not l.strip().lower().startswith("the answer is")]
    ref_v = V.parse_number(answer)
    for line in reversed(lines):
        for m in reversed(list(_STEP_RE.finditer(line))):
            expr, res = m.group(1).strip(), m.group(2)
            try:
                v = V.eval_arith(expr)
            except ValueError:
                continue
            if V.parse_number(res) == v and ref_v == v:
                return expr, res
    return None


def why_not_graded(info: dict) -> str | None:
    """A sentence for attempts that fail before any comparison (no answer, hedging, code errors)."""
    reason = info.get("reason")
    return {"no_final_answer": "The attempt above never states a final answer, so it is wrong.",
            "multiple_answers": "The attempt above gives more than one final answer, so it is wrong.",
            "too_long": "The attempt above is too long to give a usable answer, so it is wrong.",
            "echo": "The attempt above only repeats the question, so it is wrong.",
            "syntax_error": "The code above has a syntax error, so it is wrong.",
            "timeout": "The code above does not finish in time, so it is wrong."}.get(reason)


def math_verification(task: dict, ok: bool, info: dict, style: str) -> tuple[str, str]:
    """(check text, style used) for a math attempt with true correctness `ok` and grader info.

    problem_solving: the reference steps re-derived, result compared with the attempt's answer.
    confirmative: equations -> substitute the attempt's x into both sides; word problems ->
    recompute the reference's last step and compare. The caller asserts the verdict equals `ok`.
    """
    pred, ref = info.get("pred"), task["answer"]
    early = None if ok else why_not_graded(info)
    if style == "confirmative":
        eq = equation_in(task["question"])
        v = V.parse_number(pred)
        if eq is not None and v is not None and early is None:
            lhs_t, rhs_t = substitute(eq[0], v), substitute(eq[1], v)
            try:
                lhs, rhs = V.eval_arith(lhs_t), V.eval_arith(rhs_t)
            except ValueError:
                lhs = rhs = None
            if lhs is not None and (lhs == rhs) == ok:
                show = lambda t, val: t if t == fmt_number(val) else f"{t} = {fmt_number(val)}"  # noqa: E731
                head = (f"I substitute x = {fmt_number(v)} into {eq[0]} = {eq[1]}: the left side is "
                        f"{show(lhs_t, lhs)} and the right side is {show(rhs_t, rhs)}.")
                tail = ("They are equal, so the answer is correct." if ok else
                        "They are not equal, so the answer is wrong.")
                return head + "\n" + tail, "confirmative"
        elif eq is None:
            step = last_step(task["reference"], ref)
            if step is not None:
                head = f"I recompute the last step: {step[0]} = {step[1]}."
                if early is not None:
                    return head + "\n" + early, "confirmative"
                if pred is not None:
                    tail = (f"The answer above is {pred}, which agrees, so it is correct." if ok else
                            f"The answer above is {pred}, which is not {step[1]}, so it is wrong.")
                    return head + "\n" + tail, "confirmative"
    lines = [l for l in task["reference"].split("\n") if not l.strip().lower().startswith("the answer is")]
    head = "I solve the problem again.\n" + "\n".join(lines) + f"\nI get {ref}."
    if early is not None:
        return head + "\n" + early, "problem_solving"
    tail = (f"The answer above is {pred}, which agrees, so it is correct." if ok else
            f"The answer above is {pred}, which is not {ref}, so it is wrong.")
    return head + "\n" + tail, "problem_solving"


def code_verification(task: dict, ok: bool, info: dict, style: str, per_test: list[bool] | None) -> tuple[str, str]:
    """(check text, style used) for a code attempt. confirmative: each test with passes / fails
    (`per_test`, from running each test alone; used only when all-pass agrees with `ok`);
    problem_solving: the reference function, then the attempt's test count."""
    n = len(task["tests"])
    if style == "confirmative" and per_test is not None and all(per_test) == ok:
        lines = [f"{t} -> {'passes' if p else 'fails'}" for t, p in zip(task["tests"], per_test)]
        tail = (f"All {n} tests pass, so the code is correct." if ok else
                f"{sum(per_test)} of {n} tests pass, so the code is wrong.")
        return "I run the tests on the code above:\n" + "\n".join(lines) + "\n" + tail, "confirmative"
    head = "I write the function again from the specification:\n" + task["reference"]
    passed = int(info.get("passed", n if ok else 0))
    tail = (f"The code above passes all {n} tests, like this version, so it is correct." if ok else
            (why_not_graded(info) or f"The code above passes {passed} of {n} tests, so it is wrong."))
    return head + "\n" + tail, "problem_solving"


def perturb_math(reference: str, answer: str, rng: np.random.Generator) -> str | None:
    """The reference solution with a wrong final answer (last step's result and final line changed);
    None when the answer is not a number we can perturb."""
    v = V.parse_number(answer)
    lines = reference.rstrip().split("\n")
    if v is None or not lines[-1].lower().startswith("the answer is"):
        return None
    delta = [1, 2, 3, -1, -2, 10][int(rng.integers(6))]
    w = v + delta if v.denominator == 1 else Fraction(v.numerator + abs(delta), v.denominator)
    if w < 0:
        w = v + abs(delta)
    wrong = (str(float(w)) if "." in answer else fmt_number(w))
    lines[-1] = f"The answer is {wrong}."
    if len(lines) >= 2:
        lines[-2] = re.sub(rf"(=\s*){re.escape(answer)}(?![\d/.]\d)", lambda m: m.group(1) + wrong, lines[-2])
    return "\n".join(lines)


_CODE_MUTATIONS = [(r"<=", "<"), (r">=", ">"), (r"(?<![<>=!])<(?!=)", "<="), (r"(?<![<>=!])>(?!=)", ">="),
                   (r" \+ 1\b", ""), (r" - 1\b", ""), (r"\bTrue\b", "False"), (r"\bFalse\b", "True"),
                   (r"==", "!="), (r" \+ ", " - "), (r"\breturn (.+)", r"return None")]


def perturb_code_candidates(reference: str) -> list[str]:
    """Mutants of a reference code block (one edit each: an operator, a constant, the return);
    the caller keeps the first one the tests reject."""
    out = []
    for pat, rep in _CODE_MUTATIONS:
        m = re.sub(pat, rep, reference, count=1)
        if m != reference and m not in out:
            out.append(m)
    return out


# ----------------------------------------------------------------------------------------------
# Stage 0: compose one trajectory from graded samples (pure given its inputs and the rng)


def compose_trajectory(task: dict, samples: list[tuple[str, bool, dict]], n_failed: int, style: str,
                       rng: np.random.Generator, grade, counts: Counter, system_prompt: str = "") -> dict | None:
    """Build one S2R trajectory s1 v1 ... s_{n+1} v_{n+1} for a task.

    samples: (text, ok, info) of the graded model samples (verifier failures already removed).
    n_failed: wrong attempts before the final correct one. grade(text) -> (ok | None, info) grades
    perturbed / reference attempts and runs per-test checks (code). Wrong attempts: the model's
    wrong samples first, then perturbed references (counted: "perturbed_wrong"); final attempt: a
    model sample graded correct, else the reference (counted: "final_from_reference"). Every
    verification's verdict equals the grader's verdict on the attempt it checks. None (counted)
    when no valid trajectory can be built.
    """
    wrong = [(t, info) for t, ok, info in samples if not ok and t.strip()]
    right = [(t, info) for t, ok, info in samples if ok]
    attempts = []  # (text, ok, info)
    for t, info in wrong[:n_failed]:
        attempts.append((t, False, info))
    if len(attempts) < n_failed:
        cands = ([perturb_math(task["reference"], task["answer"], rng) for _ in range(3)] if task["domain"] == "math"
                 else perturb_code_candidates(task["reference"]))
        for c in cands:
            if len(attempts) >= n_failed:
                break
            if c is None or any(c == a[0] for a in attempts):
                continue
            ok, info = grade(c)
            if ok is False:
                attempts.append((c, False, info))
                counts["perturbed_wrong"] += 1
        if len(attempts) < n_failed:
            counts["fewer_wrong_than_drawn"] += 1
    if right:
        t, info = right[int(rng.integers(len(right)))]
        attempts.append((t, True, info))
        counts["final_from_model"] += 1
    else:
        ok, info = grade(task["reference"])
        if ok is not True:
            counts["reference_not_correct"] += 1
            C.print0(f"[build] skipped a task whose reference solution grades {ok} ({info.get('reason')}): "
                     f"{task['prompt'][:60]!r}")
            return None
        attempts.append((task["reference"], True, info))
        counts["final_from_reference"] += 1
    segments, styles = [], []
    for i, (text, ok, info) in enumerate(attempts):
        s = style if style != "mixed" else ("problem_solving", "confirmative")[int(rng.integers(2))]
        if task["domain"] == "math":
            check, used = math_verification(task, ok, info, s)
        else:
            per_test = None
            if s == "confirmative":
                per_test = []
                for t in task["tests"]:
                    r, _ = grade(text, [t])
                    if r is None:
                        per_test = None
                        break
                    per_test.append(r)
            check, used = code_verification(task, ok, info, s, per_test)
        if used != s:
            counts["confirmative_fell_back"] += 1
        styles.append(used)
        segments.append({"text": text.strip(), "train": ok})  # ATTEMPT_SEP ended the previous verification
        segments.append({"text": V.verification_text(check, ok), "train": True})
    return {"messages": prompt_messages(task, system_prompt) + [{"role": "assistant", "segments": segments}],
            "source": task["domain"], "n_failed": len(attempts) - 1, "verify_styles": styles,
            "final_from": "model" if right else "reference"}


def reference_trajectory(task: dict, style: str, rng: np.random.Generator, grade, system_prompt: str = "") -> dict | None:
    """The 0-failure trajectory (reference solution + its verification); used for held-out loss."""
    return compose_trajectory(task, [], 0, style, rng, grade, Counter(), system_prompt)


# ----------------------------------------------------------------------------------------------
# Stage 0: build trajectories


def sampling_task(task: dict, instruction: str) -> dict:
    """The task as its K attempts are sampled: a math question with --sample_instruction appended."""
    return {**task, "prompt": task["prompt"] + instruction} if task["domain"] == "math" and instruction else task


def build_trajectories(policy, tok, cfg: Config, d, dtype, grader=default_grader) -> tuple[list[dict], Counter]:
    """Sample K responses per question (this rank's shard), grade, bucket, compose; gathered on all
    ranks. Returns (trajectories, counts)."""
    counts = Counter()
    rng = np.random.default_rng([cfg.seed, 17])
    tasks, unsampled = [], []  # disjoint: the first n of a seeded permutation are sampled, the next are not
    for domain, path, n, n_un in (("math", cfg.math_train, cfg.build_math_questions, cfg.unsampled_math_questions),
                                  ("code", cfg.code_train, cfg.build_code_questions, cfg.unsampled_code_questions)):
        if n + n_un > 0:
            pool = load_tasks(path, domain, counts, cfg.math_instruction if domain == "math" else "",
                              cfg.train_difficulties)
            perm = rng.permutation(len(pool))
            tasks += [pool[i] for i in perm[:n]]
            unsampled += [pool[i] for i in perm[n:n + n_un]]
    if not tasks and not unsampled:
        raise ValueError("no questions to build trajectories from (--build_*_questions / --unsampled_*_questions)")
    n_buckets = len(cfg.difficulty_edges) + 1
    dists = parse_attempt_dists(cfg.attempts_by_difficulty, n_buckets)
    if not 0 <= cfg.unsampled_bucket < n_buckets:
        raise ValueError(f"--unsampled_bucket must be in [0, {n_buckets - 1}]")
    mine = list(range(d.rank, len(tasks), d.world_size))
    prompts = [C.chat_prompt_ids(tok, prompt_messages(sampling_task(tasks[i], cfg.sample_instruction), cfg.system_prompt))
               for i in mine for _ in range(cfg.k_samples)]
    t0 = time.time()
    policy.eval()
    with S.gathered_for_generation(policy), torch.no_grad():
        texts = S.generate_texts(policy, tok, prompts, cfg.sample_max_new_tokens, cfg.sample_batch_size, d, dtype,
                                 temperature=cfg.sample_temperature, seed=cfg.seed * 7919 + d.rank + 1)
    policy.train()
    C.print0(f"[build] sampled {len(texts)} responses on rank 0 in {time.time() - t0:.0f}s")
    out = []
    # the sampled attempts, graded at once: code by the sandbox pool (the default grader only), math in one child
    sampled = [(tasks[i], V.first_attempt(x)) for j, i in enumerate(mine)
               for x in texts[j * cfg.k_samples:(j + 1) * cfg.k_samples]]
    cache = {**(code_grades(sampled, cfg) if grader is default_grader else {}), **math_grades(sampled, cfg, grader)}
    # sampled questions: j indexes this rank's questions; unsampled ones (no responses) follow
    jobs = [(j, i, tasks[i]) for j, i in enumerate(mine)]
    jobs += [(None, len(tasks) + u, unsampled[u]) for u in range(d.rank, len(unsampled), d.world_size)]
    for j, i, task in jobs:
        trng = np.random.default_rng([cfg.seed, 29, i])

        def grade(text, tests=None, task=task):
            if tests is None and (task["prompt"], text) in cache:
                ok, info = cache[(task["prompt"], text)]
            else:
                t = task if tests is None else {**task, "tests": tests}
                ok, info = safe_grade(lambda a, b: grader(a, b, cfg.code_timeout_s), t, text, cfg.verifier_timeout_s)
            if ok is None:
                counts[info["reason"].split(":")[0]] += 1
                C.print0(f"[build] grading failed ({info['reason']}) on {task['prompt'][:50]!r}: counted, skipped")
            return ok, info

        if j is None:  # unsampled: pass rate unknown, the --unsampled_bucket distribution
            graded, p, b = [], None, cfg.unsampled_bucket
            counts["unsampled_questions"] += 1
        else:
            graded = []
            for text in texts[j * cfg.k_samples:(j + 1) * cfg.k_samples]:
                text = V.first_attempt(text)
                ok, info = grade(text)
                if ok is not None:
                    graded.append((text, ok, info))
            counts["samples_graded"] += len(graded)
            if not graded:
                counts["task_no_graded_sample"] += 1
                C.print0(f"[build] no sample of {task['prompt'][:50]!r} could be graded: question skipped")
                continue
            p = sum(ok for _, ok, _ in graded) / len(graded)
            b = difficulty_bucket(p, cfg.difficulty_edges)
        n_failed = draw_n_failed(dists[b], trng)
        traj = compose_trajectory(task, graded, n_failed, cfg.verify_style, trng, grade, counts, cfg.system_prompt)
        if traj is None:
            continue
        traj.update(difficulty=b, pass_rate=p, sampled=j is not None, dataset_difficulty=task.get("difficulty"), id=i)
        out.append(traj)
        counts[f"bucket_{b}" + ("" if j is not None else "_unsampled")] += 1
    out = sorted(C.gather_objects(out, d), key=lambda t: t["id"])
    keys = set(C.gather_objects(sorted(counts), d))  # every rank reduces the same names
    return out, Counter({k: int(v) for k, v in C.all_reduce_dict({k: counts[k] for k in keys}, d).items()})


# ----------------------------------------------------------------------------------------------
# Training data: tokenised samples (reflective / plain) and the cot_pretrain corpus


def load_sft_samples(cfg: Config, tok, traj_path: Path, skipped: Counter) -> list[dict]:
    """Tokenised training samples of the objective (labels IGNORE outside trained segments)."""
    if cfg.objective == "reflective":
        convs = []
        for line, row in enumerate(C.read_jsonl(traj_path, required=("messages",)), 1):
            msgs = row["messages"]
            if cfg.train_wrong_attempts:  # the ablation: the mask m is all ones
                msgs = [{**m, "segments": [{**s, "train": True} for s in m["segments"]]} if "segments" in m else m
                        for m in msgs]
            convs.append(msgs)
    else:
        tasks = load_tasks(cfg.math_train, "math", skipped, cfg.math_instruction, cfg.train_difficulties)
        tasks += load_tasks(cfg.code_train, "code", skipped, difficulties=cfg.train_difficulties)
        convs = [prompt_messages(t, cfg.system_prompt) + [{"role": "assistant", "content": t["reference"]}]
                 for t in tasks]
    samples = [C.tokenize_chat(tok, m) for m in convs]
    samples, n_long = C.fit_length(samples, cfg.max_len, cfg.overlong)
    skipped["overlong_" + cfg.overlong] += n_long
    if n_long:
        C.print0(f"[data] {n_long} samples longer than max_len {cfg.max_len}: {cfg.overlong} (counted)")
    if not samples:
        raise ValueError(f"no training samples left (objective {cfg.objective}, max_len {cfg.max_len})")
    return samples


def cot_corpus(cfg: Config, tok, skipped: Counter) -> list[int]:
    """Token ids of all question + solution texts, concatenated with EOS between documents."""
    tasks = load_tasks(cfg.math_train, "math", skipped, cfg.math_instruction, cfg.train_difficulties)
    tasks += load_tasks(cfg.code_train, "code", skipped, difficulties=cfg.train_difficulties)
    ids = []
    for t in tasks:
        ids += tok(t["prompt"] + "\n" + t["reference"] + "\n", add_special_tokens=False)["input_ids"]
        ids.append(tok.eos_token_id)
    if len(ids) <= cfg.max_len:
        raise ValueError(f"cot corpus has {len(ids)} tokens, not more than max_len {cfg.max_len}")
    return ids


def corpus_windows(corpus: list[int], first_row: int, n_rows: int, max_len: int, seed: int) -> list[dict]:
    """Rows of max_len tokens at random starts; row g's start depends only on (seed, g) -> resumable."""
    rows = []
    for g in range(first_row, first_row + n_rows):
        s = int(np.random.default_rng([seed, 41, g]).integers(0, len(corpus) - max_len + 1))
        ids = corpus[s:s + max_len]
        rows.append({"input_ids": ids, "labels": list(ids), "position_ids": list(range(len(ids)))})
    return rows


def step_rows(samples: list[dict], pos: int, n_rows: int, max_len: int, packing: bool, seed: int) -> tuple[list[dict], int]:
    """Exactly n_rows packed rows from the shuffled sample stream starting at `pos`; returns
    (rows, new pos). Next-fit packing in stream order (C.pack_rows); deterministic in (pos, seed)."""
    chosen, rows_used, cur = [], 0, max_len + 1
    while True:
        s = samples[C.epoch_stream_indices(len(samples), pos + len(chosen), 1, seed)[0]]
        n = len(s["input_ids"])
        if not packing or cur + n > max_len:
            if rows_used == n_rows:
                break
            rows_used, cur = rows_used + 1, 0
        chosen.append(s)
        cur += n
    rows = C.pack_rows(chosen, max_len, packing)
    assert len(rows) == n_rows, (len(rows), n_rows)
    return rows, pos + len(chosen)


# ----------------------------------------------------------------------------------------------
# Eval


def load_eval_sets(cfg: Config, tok, skipped: Counter) -> dict:
    sets = {"math": [], "transfer": [], "code": [], "loss": []}
    if cfg.eval_limit > 0 and cfg.math_test:
        pool = load_tasks(cfg.math_test, "math", skipped, cfg.math_instruction)
        sets["math"] = stratified(pool, cfg.eval_limit, cfg.eval_difficulties)
    if cfg.eval_transfer_limit > 0 and cfg.math_transfer:  # graded as math, reported as transfer_*
        pool = load_tasks(cfg.math_transfer, "math", skipped, cfg.math_instruction)
        sets["transfer"] = [{**t, "set": "transfer"} for t in stratified(pool, cfg.eval_transfer_limit,
                                                                         cfg.eval_difficulties)]
    if cfg.eval_code_limit > 0 and cfg.code_test:
        pool = load_tasks(cfg.code_test, "code", skipped)
        sets["code"] = stratified(pool, cfg.eval_code_limit, cfg.eval_difficulties)
    if cfg.eval_loss_limit > 0 and cfg.math_test:
        pool = load_tasks(cfg.math_test, "math", skipped, cfg.math_instruction)
        rng = np.random.default_rng([cfg.seed, 53])
        for t in pool[-cfg.eval_loss_limit:]:  # the file's tail: mostly disjoint from the greedy eval set
            traj = None
            if cfg.objective == "reflective":
                traj = reference_trajectory(t, cfg.verify_style, rng, lambda x, tests=None, t=t: default_grader(t, x),
                                            cfg.system_prompt)
            if traj is not None:
                conv = traj["messages"]
            else:
                conv = prompt_messages(t, cfg.system_prompt) + [{"role": "assistant", "content": t["reference"]}]
            sets["loss"].append(C.tokenize_chat(tok, conv))
        sets["loss"], _ = C.fit_length(sets["loss"], cfg.max_len, "truncate")
    return sets


def score_responses(tasks: list[dict], texts: list[str], grade) -> Counter:
    """Counts over responses: n, correct (last attempt), first_correct, answered (math: a final
    answer), with_verification, verdicts, verdicts_right (verdict == real correctness of the
    attempt it checks), verdicts_on_correct (checked attempts that are correct: the verdict
    accuracy of a verifier that always says "correct"), verdicts_right_on_correct (of those, the
    ones it called correct; with the others this gives the balanced accuracy, where both constant
    verifiers score 1/2), grade_failed. grade(task, text) -> (ok | None, info)."""
    c = Counter()
    for task, text in zip(tasks, texts):
        steps = V.split_trajectory(text)
        c["n"] += 1
        c["attempts"] += len(steps)
        c["with_verification"] += any(s["verification"] is not None for s in steps)
        real = {}
        for k, s in enumerate(steps):
            if k == 0 or k == len(steps) - 1 or s["verdict"] is not None:
                ok, info = grade(task, s["attempt"])
                real[k] = (ok, info)
            if s["verdict"] is not None and real[k][0] is not None:
                c["verdicts"] += 1
                c["verdicts_right"] += s["verdict"] == real[k][0]
                c["verdicts_on_correct"] += bool(real[k][0])
                c["verdicts_right_on_correct"] += bool(real[k][0]) and s["verdict"]
        ok, info = real[len(steps) - 1]
        if ok is None:
            c["grade_failed"] += 1
            continue
        c["correct"] += ok
        c["first_correct"] += bool(real[0][0])
        c["answered"] += info.get("reason") not in ("no_final_answer", "too_long", "echo")
    return c


def attempt_grades(task: dict, text: str, grade) -> dict:
    """{"correct": last attempt right, "first_correct": first attempt right} of one response (None
    where grading failed), graded as score_responses grades them: per question, so two models'
    answers to the same questions can be compared pairwise (pipeline.py's McNemar test)."""
    steps = V.split_trajectory(text)
    return {"correct": grade(task, steps[-1]["attempt"])[0], "first_correct": grade(task, steps[0]["attempt"])[0]}


def verdict_balanced_acc(n: float, right: float, on_correct: float, right_on_correct: float) -> float | None:
    """Balanced verdict accuracy: 1/2 (right verdicts on correct attempts / correct attempts + right
    verdicts on wrong attempts / wrong attempts). A verifier that always says "correct" (or always
    "incorrect") scores 1/2 whatever the model's accuracy; None unless both kinds were checked."""
    on_wrong = n - on_correct
    if on_correct <= 0 or on_wrong <= 0:
        return None
    return 0.5 * (right_on_correct / on_correct + (right - right_on_correct) / on_wrong)


def evaluate(policy, tok, cfg: Config, sets: dict, d, dtype, full: bool = True, grader=default_grader) -> dict:
    """Held-out loss; with full=True also greedy generation + grading on math and code. Each rank
    takes the shard [rank::world] (no collectives inside gathered_for_generation); sums are
    all-reduced once at the end."""
    was_training = policy.training
    policy.eval()
    r, W = d.rank, d.world_size
    sums, examples, responses = Counter(), [], []

    cache = {}

    def grade(task, text):
        if (task["prompt"], text) in cache:
            return cache[(task["prompt"], text)]
        ok, info = safe_grade(lambda a, b: grader(a, b, cfg.code_timeout_s), task, text, cfg.verifier_timeout_s)
        return ok, info

    with S.gathered_for_generation(policy), torch.no_grad():
        if sets["loss"]:
            tot, n = C.loss_sums(policy, sets["loss"][r::W], cfg.eval_batch_size, tok.pad_token_id, d, dtype)
            sums["loss_num"], sums["loss_den"] = tot, n
        if full:  # math and code prompts share the generate batches (fewer, fuller batches)
            tasks = sets["math"][r::W] + sets["transfer"][r::W] + sets["code"][r::W]
            prompts = [C.chat_prompt_ids(tok, prompt_messages(t, cfg.system_prompt)) for t in tasks]
            texts = S.generate_texts(policy, tok, prompts, cfg.eval_max_new_tokens, cfg.eval_batch_size, d, dtype)
            attempts = [(t, st["attempt"]) for t, x in zip(tasks, texts) for st in V.split_trajectory(x)]
            if grader is default_grader:  # every attempt of every code response, through the pool at once
                cache.update(code_grades(attempts, cfg))
            cache.update(math_grades(attempts, cfg, grader))  # and every math attempt in one guarded child
            for dom in ("math", "transfer", "code"):
                pairs = [(t, x) for t, x in zip(tasks, texts) if t.get("set", t["domain"]) == dom]
                for k, v in score_responses([t for t, _ in pairs], [x for _, x in pairs], grade).items():
                    sums[f"{dom}_{k}"] += v
                examples += [f"[{dom}] {t['prompt']}\n---\n{x}" for t, x in pairs[:1]]
            responses = [{"domain": t.get("set", t["domain"]), "difficulty": t.get("difficulty"), "prompt": t["prompt"],
                          "response": x, **attempt_grades(t, x, grade)} for t, x in zip(tasks, texts)]
    tot = C.all_reduce_dict({k: sums[k] for k in set(C.gather_objects(sorted(sums), d))}, d)
    out = {}
    if tot.get("loss_den"):
        out["heldout_loss"] = tot["loss_num"] / tot["loss_den"]
    for dom in ("math", "transfer", "code"):
        n = tot.get(f"{dom}_n", 0)
        if not n:
            continue
        g = lambda k: tot.get(f"{dom}_{k}", 0.0)  # noqa: E731
        out.update({f"{dom}_n": int(n), f"{dom}_acc": g("correct") / n, f"{dom}_acc_first": g("first_correct") / n,
                    f"{dom}_with_verification": g("with_verification") / n,
                    f"{dom}_attempts": g("attempts") / n, f"{dom}_verdicts": int(g("verdicts")),
                    f"{dom}_verdict_acc": g("verdicts_right") / g("verdicts") if g("verdicts") else None,
                    f"{dom}_verdict_always_correct": g("verdicts_on_correct") / g("verdicts") if g("verdicts") else None,
                    f"{dom}_verdict_balanced_acc": verdict_balanced_acc(g("verdicts"), g("verdicts_right"),
                                                                         g("verdicts_on_correct"),
                                                                         g("verdicts_right_on_correct")),
                    f"{dom}_grade_failed": int(g("grade_failed"))})
        if dom != "code":
            out[f"{dom}_answered"] = g("answered") / n
    out["examples"] = examples
    out["responses"] = C.gather_objects(responses, d) if full else []  # every rank's, for eval_*_responses.jsonl
    policy.train(was_training)
    return out


def write_responses(path: Path, responses: list[dict], d) -> None:
    """The eval's prompts, greedy responses and their grades, one JSON line each (rank 0 writes)."""
    if d.is_main:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in responses))


# ----------------------------------------------------------------------------------------------
# Main: setup -> (build) -> data -> model -> loop -> eval -> save


def check_config(cfg: Config) -> None:
    if cfg.mode not in ("build", "train", "eval"):
        raise ValueError(f"--mode must be build, train or eval, got {cfg.mode!r}")
    if cfg.objective not in OBJECTIVES:
        raise ValueError(f"--objective must be one of {OBJECTIVES}, got {cfg.objective!r}")
    if cfg.verify_style not in STYLES:
        raise ValueError(f"--verify_style must be one of {STYLES}, got {cfg.verify_style!r}")
    if cfg.k_samples < 1:
        raise ValueError("--k_samples must be >= 1")
    if list(cfg.difficulty_edges) != sorted(cfg.difficulty_edges, reverse=True):
        raise ValueError(f"--difficulty_edges must be decreasing, got {cfg.difficulty_edges}")
    parse_attempt_dists(cfg.attempts_by_difficulty, len(cfg.difficulty_edges) + 1)
    if min(cfg.micro_batch_size, cfg.grad_accum) < 1 or cfg.max_steps < 0 or cfg.cot_pretrain_steps < 0:
        raise ValueError("micro_batch_size, grad_accum >= 1 and max_steps, cot_pretrain_steps >= 0")


def run_build(policy, tok, cfg: Config, d, dtype, traj_path: Path, grader) -> tuple[int, Counter]:
    """S2R stage 0: build the trajectories, write them (atomically) and build_stats.json.
    Returns (number of trajectories, counts)."""
    t0 = time.time()
    trajs, counts = build_trajectories(policy, tok, cfg, d, dtype, grader)
    if d.is_main:
        traj_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = traj_path.with_name(traj_path.name + ".tmp")
        tmp.write_text("".join(json.dumps(t, ensure_ascii=False) + "\n" for t in trajs))
        tmp.replace(traj_path)
        (Path(cfg.out_dir) / "build_stats.json").write_text(json.dumps(dict(counts), indent=2))
    C.barrier(d)
    C.print0(f"[build] {len(trajs)} trajectories -> {traj_path} in {time.time() - t0:.0f}s; "
             f"counts {dict(sorted(counts.items()))}")
    if not trajs:
        raise ValueError("build produced no trajectories (see the counts above)")
    return len(trajs), counts


def run_eval_only(policy, tok, cfg: Config, eval_sets: dict, d, dtype, skipped: Counter, grader) -> dict:
    """--mode eval: the held-out eval of --model, written to eval_summary.json / eval_responses.jsonl."""
    out_dir, t0 = Path(cfg.out_dir), time.time()
    ev = evaluate(policy, tok, cfg, eval_sets, d, dtype, grader=grader)
    write_responses(out_dir / "eval_responses.jsonl", ev.pop("responses"), d)
    summary = {"model": cfg.model, "eval": C.numeric(ev), "examples": ev["examples"],
               "skipped": dict(skipped), "eval_seconds": time.time() - t0}
    if d.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "eval_summary.json").write_text(json.dumps(summary, indent=2))
    C.print0(json.dumps(C.numeric(ev), indent=1))
    return summary


def train_loop(policy, opt, tok, cfg: Config, d, dtype, data: dict, start_step: int, pos: int, eval_start: dict,
               eval_sets: dict, log, skipped: Counter, grader) -> bool:
    """Optimizer steps start_step .. total (`# step N` as in the module docstring). Returns False
    when --stop_after stopped the run early (after writing a checkpoint), else True."""
    pre_steps, total_steps = data["pre_steps"], data["total_steps"]
    n_rows = cfg.micro_batch_size * cfg.grad_accum * d.world_size
    for step in range(start_step, total_steps):
        t0 = time.time()
        # step 1: this step's global rows, identical on every rank (cot windows or packed samples)
        if step < pre_steps:
            rows, phase = corpus_windows(data["corpus"], step * n_rows, n_rows, cfg.max_len, cfg.seed), "cot_pretrain"
        else:
            rows, pos = step_rows(data["samples"], pos, n_rows, cfg.max_len, cfg.packing, cfg.seed)
            phase = cfg.objective
        # steps 2-4: global token count, masked CE over this rank's micro-batches, clip, AdamW
        lr = C.lr_at(step, total_steps, cfg.warmup_steps, cfg.lr, cfg.min_lr_ratio)
        st = C.sft_step(policy, opt, rows, d, dtype, cfg.micro_batch_size, tok.pad_token_id, lr,
                        cfg.max_grad_norm, step)
        done = step + 1
        log.log(done, {"loss": st["loss"], "lr": lr, "grad_norm": st["grad_norm"],
                       "trained_tokens": st["trained_tokens"], "tokens": st["tokens"],
                       "tokens_per_s": st["tokens"] / (time.time() - t0), "phase": phase, "pos": pos})
        if cfg.eval_every and done % cfg.eval_every == 0 and done < total_steps:
            ev = evaluate(policy, tok, cfg, eval_sets, d, dtype, full=False, grader=grader)
            log.log(done, {f"eval_{k}": v for k, v in C.numeric(ev).items()}, advance=False)
        if (cfg.save_every and done % cfg.save_every == 0) or done == total_steps or done == cfg.stop_after:
            M.save_checkpoint(cfg.out_dir, done, policy, tok, opt, d, cfg,
                              {"pos": pos, "eval_start": eval_start, "skipped": dict(skipped)})
        if cfg.stop_after and done == cfg.stop_after and done < total_steps:
            C.print0(f"stopping after step {done} (--stop_after); rerun to resume")
            return False
    return True


def load_train_data(cfg: Config, tok, traj_path: Path, d, skipped: Counter) -> dict:
    """The samples (reflective / plain) and / or the cot_pretrain corpus, and the step counts."""
    pre_steps = cfg.max_steps if cfg.objective == "cot_pretrain" else cfg.cot_pretrain_steps
    data = {"pre_steps": pre_steps, "total_steps": pre_steps if cfg.objective == "cot_pretrain" else pre_steps + cfg.max_steps,
            "corpus": cot_corpus(cfg, tok, skipped) if pre_steps else None,
            "samples": load_sft_samples(cfg, tok, traj_path, skipped) if cfg.objective != "cot_pretrain" else None}
    samples = data["samples"]
    if samples is not None:
        n_tr = sum(C.count_trained(torch.tensor([s["labels"]])) for s in samples)
        C.print0(f"[data] {len(samples)} {cfg.objective} samples, {sum(len(s['input_ids']) for s in samples)} tokens "
                 f"({n_tr} trained); {cfg.micro_batch_size * cfg.grad_accum * d.world_size} rows of <= "
                 f"{cfg.max_len} per step")
        C.print0("[data] first sample, trained text in [[ ]]:\n" + C.show_masked(tok, samples[0]["input_ids"],
                                                                                 samples[0]["labels"]))
    return data


def main(argv=None, grader=default_grader):
    """The stage as one story: setup -> model -> (build) -> (eval mode) -> data -> eval at start ->
    loop -> eval -> save; every step of it is a named function above."""
    t_start = time.time()
    cfg = C.parse_config(Config, argv)
    check_config(cfg)
    d = C.init_distributed(cfg.device)
    C.set_seed(cfg.seed)
    dtype = C.resolve_dtype(cfg.precision, d.device)
    out_dir = Path(cfg.out_dir)
    traj_path = Path(cfg.trajectories) if cfg.trajectories else out_dir / "trajectories.jsonl"
    C.print0(json.dumps(C.config_to_dict(cfg), indent=1))
    C.print0(f"world size {d.world_size}, device {d.device}, compute dtype {dtype}")
    if cfg.build_code_questions or cfg.unsampled_code_questions or cfg.eval_code_limit:
        C.print0(f"code sandbox: {sandbox.check_sandbox(cfg.unsafe_code_exec)}")  # fail now, not mid-run
    skipped = Counter()

    # ---- model (from the newest checkpoint when resuming a training run)
    ck = M.latest_checkpoint(out_dir) if (cfg.resume and cfg.mode == "train") else None
    model, tok = M.load_model_and_tokenizer(str(ck / "model") if ck else cfg.model, cfg.seed)
    policy = C.shard_model(M.LogProbModel(model), d, dtype, cfg.activation_checkpointing)

    # ---- build (S2R stage 0): --mode build, or train with reflective and no trajectories file
    build_counts = None
    if cfg.mode == "build" or (cfg.mode == "train" and cfg.objective == "reflective" and not traj_path.exists()):
        n_traj, build_counts = run_build(policy, tok, cfg, d, dtype, traj_path, grader)
        if cfg.mode == "build":
            C.cleanup_distributed(d)
            return {"trajectories": n_traj, "counts": dict(build_counts)}
    eval_sets = load_eval_sets(cfg, tok, skipped)
    if cfg.mode == "eval":
        summary = run_eval_only(policy, tok, cfg, eval_sets, d, dtype, skipped, grader)
        C.cleanup_distributed(d)
        return summary

    # ---- data, optimizer, resume
    data = load_train_data(cfg, tok, traj_path, d, skipped)
    opt = C.make_optimizer(policy, cfg.lr, cfg.weight_decay)
    start_step, pos, eval_start = 0, 0, None
    if ck is not None:
        state = M.load_checkpoint(ck, policy, opt, d)
        start_step, pos, eval_start = state["step"], state["pos"], state.get("eval_start")
        C.print0(f"resumed from {ck} at step {start_step} (sample position {pos})")
    policy.train()
    log = C.MetricsLogger(out_dir, d, data["total_steps"], cfg, cfg.wandb_project, initial_step=start_step)

    # ---- eval at the start (skipped on resume: saved with the checkpoint)
    if eval_start is None:
        t0 = time.time()
        eval_start = evaluate(policy, tok, cfg, eval_sets, d, dtype, grader=grader)
        log.log(0, {f"eval_{k}": v for k, v in C.numeric(eval_start).items()} | {"eval_seconds": time.time() - t0},
                advance=False)
        write_responses(out_dir / "eval_start_responses.jsonl", eval_start.pop("responses"), d)
        C.print0("[eval start] " + json.dumps(C.numeric(eval_start)))

    # ---- loop
    if not train_loop(policy, opt, tok, cfg, d, dtype, data, start_step, pos, eval_start, eval_sets, log,
                      skipped, grader):
        log.close()
        C.cleanup_distributed(d)
        return None

    # ---- eval at the end, save
    t0 = time.time()
    eval_end = evaluate(policy, tok, cfg, eval_sets, d, dtype, grader=grader)
    log.log(data["total_steps"], {f"eval_{k}": v for k, v in C.numeric(eval_end).items()}
            | {"eval_seconds": time.time() - t0}, advance=False)
    write_responses(out_dir / "eval_end_responses.jsonl", eval_end.pop("responses"), d)
    M.save_hf(policy, tok, out_dir / "final", d)
    s, e = C.numeric(eval_start), C.numeric(eval_end)
    summary = {"start": s, "end": e, "change": {k: e[k] - s[k] for k in e if k in s and isinstance(e[k], float)},
               "objective": cfg.objective, "steps": data["total_steps"], "skipped": dict(skipped),
               "build": dict(build_counts) if build_counts else None,
               "minutes_this_process": (time.time() - t_start) / 60,
               "examples_start": eval_start.get("examples", []), "examples_end": eval_end.get("examples", [])}
    if d.is_main:
        (out_dir / "eval_summary.json").write_text(json.dumps(summary, indent=2))
    C.print_table(s, e)
    for ex in eval_end.get("examples", []):
        C.print0("[example end]\n" + ex)
    C.print0(f"done in {(time.time() - t_start) / 60:.1f} min; final model in {out_dir / 'final'}")
    log.close()
    C.cleanup_distributed(d)
    return summary


if __name__ == "__main__":
    main()
