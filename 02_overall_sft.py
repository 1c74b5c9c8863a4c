"""
Stage 2: overall SFT on a curriculum mixture (02_overall_sft.py).

Broadens the cold-started model (stage 1) into a general assistant without losing its reasoning:
general conversation, agent / tool-use traces and reasoning data are mixed by weight, ordered by a
curriculum, and trained with the loss on assistant turns only. Held-out evaluation per domain before
and after: loss per domain, tool-call validity and task success in an executed agent loop, and math
accuracy (retention of stage 1's reasoning).

Papers
  Mixture of general + reasoning SFT data after a cold start: DeepSeek-R1, arXiv:2501.12948 (Sec. 2.3.3)
  Examples-proportional / weighted mixing of sources: T5, arXiv:1910.10683 (Sec. 3.5.2)
  Curriculum learning: Bengio et al. 2009 (ICML); competence-based curricula, arXiv:1903.09848
  Loss on assistant tokens only (prompt / user tokens zeroed): Llama 2, arXiv:2307.09288 (Sec. 3.1)
  Tool calls as text, tool results fed back, the model continues: Toolformer arXiv:2302.04761,
  ReAct arXiv:2210.03629

One optimizer step (mirrored by `# step N` comments in the loop)
  1. draw `batch_size` samples from the mixture (`MixtureSampler`: weighted, without replacement
     within each source's epoch, curriculum order; a pure function of the draw index -> exact resume);
  2. pack them into rows of <= max_len tokens (position ids restart per sample, so packed samples
     never attend to each other), split the rows into this rank's micro-batches;
  3. loss = sum over micro-batches of masked token CE / N, N = trained tokens of the WHOLE step over
     all ranks (C.masked_ce_loss), so 1 process == N processes, any accumulation (PITFALLS #1);
  4. clip, AdamW step (warmup + cosine); log loss and the step's domain / difficulty composition.

Data formats (one JSONL per source; see README "Data formats")
  {"messages": [...], "tools": [...]?}            chat and agent traces (OpenAI-style tool_calls)
  {"question", "solution", "answer"?}             reasoning: user = question, assistant = solution
  {"prompt", "solution"}                          e.g. code: user = prompt, assistant = solution
  Optional per row: "difficulty" (number) or "pass_rate" (stage 1's, in [0, 1]).
  Tool calls are trained in common.py's documented fallback text format
  `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` (SmolLM2's template has no tool support);
  tool schemas go into the system message. Samples with an unknown role or a tool call that does not
  parse are skipped and COUNTED (printed per source, and in eval_summary.json), never silently.

Curriculum (`--curriculum`)
  none          shuffled: the mixture's weighted draws in a seeded random order
  easy_to_hard  the same draws, each window of `curriculum_window` draws (0 = the whole run) sorted
                by difficulty (ties keep draw order): one easy -> hard sweep over the run
  weights       mixture weights move linearly from `--data` weights to `--weights_end` over training
                (e.g. `--weights_end reasoning=3`: the reasoning share rises)
  Difficulty per sample: the row's "difficulty", else from "pass_rate" (1 + 4 * (1 - pass_rate)),
  else derived (rank by number of tool calls, then reasoning steps = assistant lines, then assistant
  characters, mapped to [1, 5] by quantile within the source); `--difficulty_source` forces one.

Deliberate simplifications (read before trusting a number)
  * A step is a fixed number of SAMPLES (not tokens); with packing the number of rows varies, so the
    accumulation count is derived per step (ceil(rows / (world size x micro_batch_size)); a rank
    left without a row runs a 1-token row with no loss).
  * easy_to_hard reorders a fixed window; it is not competence-based sampling.
  * Agent eval: greedy; the conversation is cut at the first assistant turn after the LAST user
    message (for single-question tasks, the first assistant turn); validity is measured on the
    first generated turn (JSON parses, the tool exists, the arguments fit its schema, the tool runs
    without raising); an invalid call ends the episode (no retry); success = the task's expected
    result appears in the final answer, as a whole token.
  * Every assistant turn is trained, including earlier turns of a multi-turn conversation.
  * Eval under FSDP: parameters are gathered once (S.gathered_for_generation) and each rank
    evaluates its shard of every eval set; sums are all-reduced.

Run (from the repo root)
  python 02_overall_sft.py                                    # embedded SmolLM2-135M, a few minutes
  python 02_overall_sft.py --model runs/01_cold_start_sft/final
  python 02_overall_sft.py --data chat=data/chat_train.jsonl:1 agent=data/agent_train.jsonl:2 \\
      reasoning=data/math_train.jsonl:1 --curriculum weights --weights_end reasoning=3
  python 02_overall_sft.py --mixture_file mix.json   # {"chat": {"path": ..., "weight": 1, "weight_end": 1}, ...}
  python 02_overall_sft.py --model tiny --max_len 2048 --max_steps 5 --eval_limit 2   # seconds
  torchrun --nproc_per_node 2 02_overall_sft.py               # FSDP2 (gloo on CPU, nccl on GPU)
"""
from __future__ import annotations

import importlib.util
import json
import math
import re
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import common as C
import models as M
import sampler as S
import verify as V


# ----------------------------------------------------------------------------------------------
# Config


@dataclass
class Config:
    # model / run
    model: str = C.arg(M.EMBEDDED, "HF dir (e.g. runs/01_cold_start_sft/final), 'smollm2-135m-instruct' or 'tiny'")
    out_dir: str = C.arg("runs/02_overall_sft", "output dir: metrics.jsonl, eval_summary.json, ckpt-*, final/")
    seed: int = C.arg(0, "seed of the mixture sampler and of the tiny model")
    device: str = C.arg("auto", "auto | cpu | cuda")
    precision: str = C.arg("auto", "auto | bf16 | fp32 (auto: bf16 only where the hardware has it)")
    # mixture
    data: list[str] = C.arg(["chat=data/chat_train.jsonl:1", "agent=data/agent_train.jsonl:1",
                             "reasoning=data/math_train.jsonl:1"],
                            "training sources, each name=path:weight (weight > 0; shares are by samples)")
    mixture_file: str = C.arg("", "JSON/YAML mixture spec {name: {path, weight, weight_end?}}; replaces --data")
    # curriculum
    curriculum: str = C.arg("none", "none | easy_to_hard | weights (see the module docstring)")
    weights_end: list[str] = C.arg([], "curriculum=weights: final weights name=w (unlisted sources keep theirs)")
    curriculum_window: int = C.arg(0, "easy_to_hard: draws per sorted window (0 = the whole run)")
    difficulty_source: str = C.arg("auto", "auto | field | pass_rate | derived: where a sample's difficulty comes from")
    # batching
    max_len: int = C.arg(1024, "tokens per packed row (longer samples: see --overlong)")
    batch_size: int = C.arg(8, "samples per optimizer step (global, all ranks together)")
    micro_batch_size: int = C.arg(1, "packed rows per forward pass per rank")
    packing: bool = C.arg(True, "pack several samples per row (block-diagonal attention via position ids)")
    overlong: str = C.arg("drop", "drop | truncate samples longer than max_len (counted either way)")
    # optimisation
    lr: float = C.arg(3e-4, "peak learning rate")
    min_lr_ratio: float = C.arg(0.1, "final lr = min_lr_ratio * lr (cosine)")
    warmup_steps: int = C.arg(2, "linear warmup steps")
    weight_decay: float = C.arg(0.0, "AdamW weight decay (not on norms / biases)")
    max_grad_norm: float = C.arg(1.0, "gradient clipping (global L2 norm)")
    max_steps: int = C.arg(16, "optimizer steps")
    activation_checkpointing: bool = C.arg(False, "recompute activations in backward (saves memory)")
    # eval
    eval_data: list[str] = C.arg(["chat=data/chat_test.jsonl", "agent=data/agent_test.jsonl",
                                  "reasoning=data/math_test.jsonl"], "held-out loss sets, name=path")
    agent_test: str = C.arg("data/agent_test.jsonl", "agent tasks ({messages, tools, task: {expected}}); '' = skip")
    math_test: str = C.arg("data/math_test.jsonl", "math questions ({question, answer}); '' = skip")
    tools_module: str = C.arg("data/make_data.py", "python file whose run_tool(name, arguments) executes the tools")
    eval_limit: int = C.arg(32, "agent tasks and math questions evaluated (first N of each file)")
    eval_loss_limit: int = C.arg(8, "held-out samples per domain for the loss (0 = no loss eval)")
    eval_batch_size: int = C.arg(32, "prompts / rows per eval forward (decoding is memory-bound: bigger is faster)")
    eval_every: int = C.arg(0, "per-domain held-out loss every N steps (0 = never; the full eval runs at start and end)")
    agent_max_rounds: int = C.arg(2, "tool calls allowed per agent task before the answer must come")
    agent_max_new_tokens: int = C.arg(56, "new tokens per agent turn (SmolLM2: tool calls <= 50 tokens, answers <= 18)")
    math_max_new_tokens: int = C.arg(128, "new tokens per math answer (SmolLM2: reference solutions <= 103)")
    math_margin: float = C.arg(0.10, "math accuracy counts as retained if end >= start - margin (absolute)")
    # checkpoints / logging
    save_every: int = C.arg(0, "checkpoint every N steps (0 = only at the end); resume from the latest")
    resume: bool = C.arg(True, "resume from the latest checkpoint in out_dir")
    stop_after: int = C.arg(0, "stop after this many steps once the checkpoint there is written, as if killed (tests)")
    wandb_project: str = C.arg("", "wandb project (offline unless WANDB_MODE says otherwise); '' = off")


CURRICULA = ("none", "easy_to_hard", "weights")

# ----------------------------------------------------------------------------------------------
# Data: mixture spec, rows -> chat messages, validation, difficulty


@dataclass
class Source:
    name: str
    path: str
    weight: float
    weight_end: float


def _check_weight(name: str, w, what: str) -> float:
    try:
        w = float(w)
    except (TypeError, ValueError):
        raise ValueError(f"mixture source {name!r}: {what} {w!r} is not a number") from None
    if not math.isfinite(w) or w <= 0:
        raise ValueError(f"mixture source {name!r}: {what} must be > 0, got {w} "
                         f"(drop the source instead of giving it weight 0)")
    return w


def parse_source(spec: str) -> tuple[str, str, float]:
    """'name=path:weight' (weight optional, default 1) -> (name, path, weight > 0)."""
    if "=" not in spec:
        raise ValueError(f"--data {spec!r}: expected name=path:weight")
    name, rest = spec.split("=", 1)
    path, weight = rest, 1.0
    if ":" in rest and "/" not in rest.rsplit(":", 1)[1]:
        path, weight = rest.rsplit(":", 1)
    if not name or not path:
        raise ValueError(f"--data {spec!r}: expected name=path:weight")
    return name, path, _check_weight(name, weight, "weight")


def parse_mixture(data: list[str], mixture_file: str = "", weights_end: list[str] = ()) -> list[Source]:
    """The training sources from `--data` (or `--mixture_file`) and `--weights_end`.

    Errors (ValueError / FileNotFoundError, naming the source): weight <= 0 or not a number, a
    duplicate name, a missing file, a --weights_end name that is not a source.
    """
    sources: list[Source] = []
    if mixture_file:
        path = C.resolve_path(mixture_file)
        if not path.exists():
            raise FileNotFoundError(f"--mixture_file {mixture_file}: file not found")
        if path.suffix in (".yaml", ".yml"):
            import yaml
            spec = yaml.safe_load(path.read_text())
        else:
            spec = json.loads(path.read_text())
        if isinstance(spec, dict) and "sources" in spec:
            spec = spec["sources"]
        items = spec.items() if isinstance(spec, dict) else [(s.get("name"), s) for s in spec]
        for name, s in items:
            if not name or "path" not in s:
                raise ValueError(f"{mixture_file}: every source needs a name and a path, got {s}")
            w = _check_weight(name, s.get("weight", 1.0), "weight")
            we = _check_weight(name, s.get("weight_end", w), "weight_end")
            sources.append(Source(name, s["path"], w, we))
    else:
        for spec in data:
            name, p, w = parse_source(spec)
            sources.append(Source(name, p, w, w))
    if not sources:
        raise ValueError("the mixture has no sources (--data or --mixture_file)")
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate source names in the mixture: {names}")
    by_name = {s.name: s for s in sources}
    for spec in weights_end:
        if "=" not in spec:
            raise ValueError(f"--weights_end {spec!r}: expected name=weight")
        name, w = spec.split("=", 1)
        if name not in by_name:
            raise ValueError(f"--weights_end {spec!r}: no source named {name!r} (sources: {names})")
        by_name[name].weight_end = _check_weight(name, w, "weight_end")
    for s in sources:
        if not C.resolve_path(s.path).exists():
            raise FileNotFoundError(f"mixture source {s.name!r}: {s.path}: file not found")
    return sources


# ----------------------------------------------------------------------------------------------
# Tool calls as text: the documented fallback for chat templates without tool support


TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"


def format_tool_call(name: str, arguments: dict) -> str:
    """The fallback text of one tool call: <tool_call>{"name": ..., "arguments": {...}}</tool_call>."""
    return f"{TOOL_CALL_OPEN}{json.dumps({'name': name, 'arguments': arguments}, ensure_ascii=False)}{TOOL_CALL_CLOSE}"


def call_name_and_args(call, i: int) -> tuple[str, dict]:
    """(name, arguments) of one OpenAI-style tool call of message i (`{"function": {"name",
    "arguments"}}` or flat; arguments a dict or a JSON string). Raises C.DataError when the name is
    missing or the arguments are not a JSON object."""
    fn = (call.get("function", call) if isinstance(call, dict) else None) or {}
    if not isinstance(fn.get("name"), str):
        raise C.DataError(f"message {i}: tool call without a name: {call!r}")
    args = fn.get("arguments", {})
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            raise C.DataError(f"message {i}: tool call arguments are not JSON: {args!r}") from None
    if not isinstance(args, dict):
        raise C.DataError(f"message {i}: tool call arguments must be an object, got {args!r}")
    return fn["name"], args


def tool_fallback(messages: list[dict], tok, tools: list[dict] | None = None) -> list[dict]:
    """For a chat template without tool support (SmolLM2's), rewrite tool use as text; others unchanged.

    An assistant message's `tool_calls` become `format_tool_call` lines appended to its content;
    tool results stay messages with role "tool"; the tool schemas are described in the system
    message (appended to it, or a new first message). Other keys (`train`, `segments`) are kept,
    so C.tokenize_chat derives the same masks. Raises C.DataError on a call without a name or
    with arguments that are not JSON.
    """
    if C.template_supports_tools(tok):
        return messages
    out = []
    for i, m in enumerate(messages):
        calls = m.get("tool_calls") or []
        if not calls:
            out.append(m)
            continue
        if "segments" in m:
            raise C.DataError(f"message {i}: tool calls and segments in one message are not supported")
        texts = [format_tool_call(*call_name_and_args(c, i)) for c in calls]
        content = m.get("content") or ""
        out.append({k: v for k, v in m.items() if k != "tool_calls"}
                   | {"content": (content + "\n" if content else "") + "\n".join(texts)})
    if tools:
        desc = ("You can call these tools. To call one, write " + TOOL_CALL_OPEN + '{"name": ..., "arguments": {...}}'
                + TOOL_CALL_CLOSE + ".\nTools: " + json.dumps(tools, ensure_ascii=False))
        if out and out[0].get("role") == "system":
            out[0] = {**out[0], "content": out[0]["content"] + "\n\n" + desc}
        else:
            out.insert(0, {"role": "system", "content": desc})
    return out


def row_to_chat(row: dict) -> tuple[list[dict], list[dict] | None]:
    """One JSONL row -> (messages, tools). Raises C.DataError on an unknown format."""
    if "messages" in row:
        if not isinstance(row["messages"], list) or not row["messages"]:
            raise C.DataError("'messages' must be a non-empty list")
        return row["messages"], row.get("tools") or None
    for q, a in (("question", "solution"), ("prompt", "solution"), ("prompt", "completion")):
        if q in row and a in row:
            return [{"role": "user", "content": row[q]}, {"role": "assistant", "content": row[a]}], None
    raise C.DataError(f"unknown row format (keys {sorted(row)}): expected messages, question+solution "
                      f"or prompt+solution")


def tool_names(tools: list[dict] | None) -> list[str]:
    return [t.get("function", t).get("name") for t in tools or []]


def check_tool_calls(messages: list[dict], tools: list[dict] | None) -> None:
    """Tool calls must parse: structured `tool_calls` name a known tool (when tools are given) with
    dict/JSON arguments, and text calls `<tool_call>...</tool_call>` in assistant content are JSON
    {"name", "arguments"}. Raises C.DataError (-> a counted skip)."""
    names = tool_names(tools)
    for i, m in enumerate(messages):
        if m.get("role") != "assistant":
            continue
        for c in m.get("tool_calls") or []:
            name, args = call_name_and_args(c, i)
            if names and name not in names:
                raise C.DataError(f"message {i}: tool call to unknown tool {name!r} (tools: {names})")
        content = m.get("content") or ""
        if TOOL_CALL_OPEN in content or TOOL_CALL_CLOSE in content:
            n_open, n_close = content.count(TOOL_CALL_OPEN), content.count(TOOL_CALL_CLOSE)
            if n_open != n_close:
                raise C.DataError(f"message {i}: unbalanced {TOOL_CALL_OPEN} tags in {content[:80]!r}")
            for body in re.findall(re.escape(TOOL_CALL_OPEN) + r"(.*?)" + re.escape(TOOL_CALL_CLOSE), content, re.S):
                _, err = parse_call_json(body, names)
                if err:
                    raise C.DataError(f"message {i}: text tool call does not parse ({err}): {body[:80]!r}")


def derived_difficulty_key(messages: list[dict]) -> tuple[int, int, int]:
    """(number of tool calls, reasoning steps = non-empty assistant lines, assistant characters)."""
    calls = steps = chars = 0
    for m in messages:
        if m.get("role") != "assistant":
            continue
        calls += len(m.get("tool_calls") or []) + (m.get("content") or "").count(TOOL_CALL_OPEN)
        text = m.get("content") or "".join(s.get("text", "") for s in m.get("segments", []))
        steps += sum(1 for line in text.split("\n") if line.strip())
        chars += len(text)
    return calls, steps, chars


def quantile_scores(keys: list, low: float = 1.0, high: float = 5.0) -> list[float]:
    """Map sortable keys to [low, high] by their quantile (ties share their average rank).

    score_i = low + (high - low) * avgrank_i / (n - 1); a single item gets the midpoint.
    """
    n = len(keys)
    if n == 1:
        return [(low + high) / 2]
    order = sorted(range(n), key=lambda i: keys[i])
    rank = [0.0] * n
    i = 0
    while i < n:
        j = i
        while j + 1 < n and keys[order[j + 1]] == keys[order[i]]:
            j += 1
        for k in range(i, j + 1):
            rank[order[k]] = (i + j) / 2
        i = j + 1
    return [low + (high - low) * r / (n - 1) for r in rank]


def difficulties(rows: list[dict], messages: list[list[dict]], source: str = "auto", where: str = "") -> list[float]:
    """A difficulty per sample, on a 1 (easy) .. 5 (hard) scale.

    field: row["difficulty"]; pass_rate: 1 + 4 * (1 - row["pass_rate"]) (stage 1's pass rate over K
    samples: never solved -> 5); derived: quantile of `derived_difficulty_key` within the source;
    auto: field, else pass_rate, else derived, per row. Missing or invalid values raise C.DataError.
    """
    if source not in ("auto", "field", "pass_rate", "derived"):
        raise ValueError(f"--difficulty_source must be auto, field, pass_rate or derived, got {source!r}")
    derived = quantile_scores([derived_difficulty_key(m) for m in messages])
    out = []
    for i, (row, d) in enumerate(zip(rows, derived)):
        use = source
        if source == "auto":
            use = "field" if "difficulty" in row else "pass_rate" if "pass_rate" in row else "derived"
        if use == "field":
            v = row.get("difficulty")
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise C.DataError(f"{where} sample {i}: 'difficulty' must be a number, got {v!r}")
            out.append(float(v))
        elif use == "pass_rate":
            v = row.get("pass_rate")
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1:
                raise C.DataError(f"{where} sample {i}: 'pass_rate' must be in [0, 1], got {v!r}")
            out.append(1.0 + 4.0 * (1.0 - float(v)))
        else:
            out.append(d)
    return out


def skip_reason(msg: str) -> str:
    msg = msg.lower()
    if "unknown role" in msg:
        return "unknown_role"
    if "tool" in msg:
        return "bad_tool_call"
    if "format" in msg:
        return "unknown_format"
    return "malformed"


def load_source(name: str, path: str, tok, max_len: int, overlong: str, difficulty_source: str = "auto",
                limit: int = 0) -> tuple[list[dict], Counter]:
    """Read, validate and tokenise one source.

    Returns (samples, skips): samples = {"input_ids", "labels", "difficulty", "domain"};
    skips counts dropped samples by reason (unknown_role, bad_tool_call, unknown_format, malformed,
    no_trained_token, overlong); the first message of each reason is printed.
    """
    path_ = C.resolve_path(path)
    if not path_.exists():
        raise FileNotFoundError(f"source {name!r}: {path}: file not found")
    rows = C.read_jsonl(path_)
    skips, first_msg = Counter(), {}
    ok_rows, msgs, toks = [], [], []
    for line, row in enumerate(rows, 1):
        if limit and len(ok_rows) >= limit:
            break
        try:
            messages, tools = row_to_chat(row)
            check_tool_calls(messages, tools)
            enc = C.tokenize_chat(tok, tool_fallback(messages, tok, tools), tools)
        except C.DataError as e:
            reason = skip_reason(str(e))
            skips[reason] += 1
            first_msg.setdefault(reason, f"{path}:{line}: {e}")
            continue
        if all(l == C.IGNORE for l in enc["labels"][1:]):
            skips["no_trained_token"] += 1
            first_msg.setdefault("no_trained_token", f"{path}:{line}: no assistant text to train on")
            continue
        ok_rows.append(row)
        msgs.append(messages)
        toks.append(enc)
    diffs = difficulties(ok_rows, msgs, difficulty_source, where=str(path)) if ok_rows else []
    samples = [dict(enc, difficulty=dv, domain=name) for enc, dv in zip(toks, diffs)]
    kept, n_long = C.fit_length(samples, max_len, overlong)
    if n_long:
        skips["overlong_" + overlong] += n_long
        first_msg.setdefault("overlong_" + overlong, f"{n_long} samples longer than max_len {max_len}")
    for reason, n in skips.items():
        C.print0(f"[{name}] skipped {n} sample(s): {reason}; first: {first_msg[reason]}")
    if not kept:
        raise C.DataError(f"source {name!r} ({path}): no usable samples (skips: {dict(skips)})")
    return kept, skips


# ----------------------------------------------------------------------------------------------
# Mixture sampler with curriculum


class MixtureSampler:
    """Weighted mixture of sources, without replacement within each source's epoch, resumable.

    Draw k = 0, 1, 2, ... of the run belongs to optimizer step s = k // batch_size:
      1. source: u_k from one seeded uniform stream; source i with probability
         w_i(p) / sum_j w_j(p), w_i(p) = w_i + (w_end_i - w_i) * p, p = min(1, s / (max_steps - 1))
         (w_end = w unless curriculum == 'weights');
      2. element: the c-th draw of source i takes element (c mod n_i) of a seeded permutation of
         source i for epoch c // n_i: no sample repeats within an epoch of its source;
      3. easy_to_hard: draws are cut into windows of `window` draws (0 = max_steps * batch_size,
         the whole run) and each window is sorted by (difficulty, k): same samples, easy first.
    Every draw is a pure function of k and the constructor arguments, so the sampler's whole state
    is the number of draws consumed (`state()`); `plan(k, n)` after a resume returns exactly what an
    uninterrupted run would have drawn (PITFALLS #18).
    """

    def __init__(self, names: list[str], difficulty: dict[str, list[float]], weights: dict[str, float],
                 weights_end: dict[str, float] | None, curriculum: str, seed: int, batch_size: int,
                 max_steps: int, window: int = 0):
        if curriculum not in CURRICULA:
            raise ValueError(f"--curriculum must be one of {CURRICULA}, got {curriculum!r}")
        if batch_size < 1 or max_steps < 1:
            raise ValueError("batch_size and max_steps must be >= 1")
        self.names, self.seed, self.curriculum = list(names), seed, curriculum
        self.difficulty = {n: np.asarray(difficulty[n], dtype=np.float64) for n in names}
        self.sizes = np.array([len(self.difficulty[n]) for n in names])
        if (self.sizes == 0).any():
            raise ValueError(f"empty source in the mixture: {dict(zip(names, self.sizes.tolist()))}")
        self.w0 = np.array([_check_weight(n, weights[n], "weight") for n in names])
        end = weights_end if (curriculum == "weights" and weights_end) else weights
        self.w1 = np.array([_check_weight(n, end.get(n, weights[n]), "weight_end") for n in names])
        self.batch_size, self.max_steps = batch_size, max_steps
        self.window = window if window > 0 else max_steps * batch_size
        self._src = np.zeros(0, dtype=np.int64)   # source of draw k
        self._occ = np.zeros(0, dtype=np.int64)   # c: how many earlier draws chose the same source
        self._perms: dict[tuple[int, int], np.ndarray] = {}
        self._sorted_window: tuple[int, list] = (-1, [])  # easy_to_hard: the last sorted window

    def shares(self, step: int) -> np.ndarray:
        """Sampling probabilities of the sources at optimizer step `step`."""
        p = min(1.0, step / max(1, self.max_steps - 1))
        w = self.w0 + (self.w1 - self.w0) * p
        return w / w.sum()

    def _extend(self, n: int) -> None:
        if len(self._src) >= n:
            return
        n = max(n, 2 * len(self._src), 256)
        u = np.random.default_rng([self.seed, 1]).random(n)  # prefix-stable: draw k never changes
        steps = np.arange(n) // self.batch_size
        probs = np.stack([self.shares(int(s)) for s in range(int(steps[-1]) + 1)])[steps]  # [n, S]
        src = (u[:, None] >= np.cumsum(probs, 1)).sum(1).clip(max=len(self.names) - 1)
        occ = np.zeros(n, dtype=np.int64)
        for i in range(len(self.names)):
            where = np.flatnonzero(src == i)
            occ[where] = np.arange(len(where))
        self._src, self._occ = src, occ

    def _element(self, i: int, c: int) -> int:
        epoch, pos = divmod(int(c), int(self.sizes[i]))
        key = (i, epoch)
        if key not in self._perms:
            self._perms[key] = np.random.default_rng([self.seed, 2, i, epoch]).permutation(self.sizes[i])
        return int(self._perms[key][pos])

    def _draw(self, k: int) -> tuple[int, int]:
        return int(self._src[k]), self._element(int(self._src[k]), int(self._occ[k]))

    def plan(self, start: int, count: int) -> list[tuple[str, int]]:
        """Draws [start, start + count) as (source name, element index) pairs."""
        if self.curriculum != "easy_to_hard":
            self._extend(start + count)
            return [(self.names[i], e) for i, e in (self._draw(k) for k in range(start, start + count))]
        out = []
        for w in range(start // self.window, (start + count - 1) // self.window + 1 if count else 0):
            lo = w * self.window
            if self._sorted_window[0] != w:
                self._extend(lo + self.window)
                draws = [self._draw(k) for k in range(lo, lo + self.window)]
                order = sorted(range(len(draws)), key=lambda j: (self.difficulty[self.names[draws[j][0]]][draws[j][1]], j))
                self._sorted_window = (w, [draws[j] for j in order])
            for i, e in self._sorted_window[1][max(start, lo) - lo:min(start + count, lo + self.window) - lo]:
                out.append((self.names[i], e))
        return out

    def state(self, draws: int) -> dict:
        """The resumable state after `draws` draws (+ per-source counts, for information)."""
        self._extend(draws)
        counts = np.bincount(self._src[:draws], minlength=len(self.names))
        return {"draws": int(draws), "per_source": dict(zip(self.names, counts.tolist()))}


# ----------------------------------------------------------------------------------------------
# Steps: packing, per-step composition


def composition(samples: list[dict], names: list[str]) -> dict:
    """Domain shares and mean difficulty of a step's samples (logged with every step)."""
    n = len(samples)
    out = {f"frac_{name}": sum(s["domain"] == name for s in samples) / n for name in names}
    out["mean_difficulty"] = sum(s["difficulty"] for s in samples) / n
    return out


# ----------------------------------------------------------------------------------------------
# Eval: pure parts (tool-call parsing, answer matching, the agent loop driven by a text generator)


def parse_call_json(body: str, names: list[str] | None) -> tuple[dict | None, str | None]:
    """JSON of one tool call -> ({"name", "arguments"}, None) or (None, error)."""
    try:
        call = json.loads(body)
    except json.JSONDecodeError:
        return None, "bad_json"
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        return None, "no_name"
    args = call.get("arguments", {})
    if not isinstance(args, dict):
        return None, "bad_arguments"
    if names and call["name"] not in names:
        return None, "unknown_tool"
    return {"name": call["name"], "arguments": args}, None


JSON_TYPES = {"string": str, "number": (int, float), "integer": int, "boolean": bool, "object": dict, "array": list}


def check_arguments(args: dict, schema: dict | None) -> str | None:
    """Arguments against the tool's JSON-schema `parameters` (the subset our tools use: required,
    properties, type, enum). Returns None when they conform, else what is wrong."""
    if not schema:
        return None
    props = schema.get("properties") or {}
    missing = [k for k in schema.get("required", []) if k not in args]
    if missing:
        return f"missing argument(s) {missing}"
    for k, v in args.items():
        if props and k not in props:
            return f"unknown argument {k!r}"
        p = props.get(k, {})
        want = JSON_TYPES.get(p.get("type"))
        if want and (not isinstance(v, want) or (isinstance(v, bool) and p.get("type") != "boolean")):
            return f"argument {k!r} should be a {p['type']}, got {v!r}"
        if "enum" in p and v not in p["enum"]:
            return f"argument {k!r}: {v!r} is not one of {p['enum']}"
    return None


def tool_schemas(tools: list[dict] | None) -> dict[str, dict]:
    return {t.get("function", t).get("name"): t.get("function", t).get("parameters") for t in tools or []}


def parse_tool_call(text: str, names: list[str]) -> tuple[dict | None, str | None, str]:
    """The first `<tool_call>{...}</tool_call>` of a generated turn.

    Returns (call, error, text_before): error is None for a parsed call to a known tool, "no_call"
    when the turn has no tool call (a final answer), else unclosed / bad_json / no_name /
    bad_arguments / unknown_tool.
    """
    start = text.find(TOOL_CALL_OPEN)
    if start < 0:
        return None, "no_call", text
    end = text.find(TOOL_CALL_CLOSE, start)
    if end < 0:
        return None, "unclosed", text[:start]
    call, err = parse_call_json(text[start + len(TOOL_CALL_OPEN):end].strip(), names)
    return call, err, text[:start]


def answer_matches(answer: str, expected: str) -> bool:
    """`expected` appears in `answer` as a whole token (case-insensitive): '86' matches '= 86.' but
    not '186' or '86.5'."""
    pat = r"(?<![\w.])" + re.escape(expected.strip()) + r"(?!\w|\.\d)"
    return re.search(pat, answer, flags=re.IGNORECASE) is not None


def agent_prefix(messages: list[dict]) -> list[dict]:
    """The conversation up to the assistant turn that answers the LAST user message."""
    last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
    return messages[:last_user + 1]


def run_agent_tasks(tasks: list[dict], generate_turns, run_tool, max_rounds: int) -> dict:
    """Executed agent loop over tasks = [{"messages", "tools", "expected"}]; returns sums.

    generate_turns(list of (messages, tools)) -> list of generated assistant texts (greedy).
    Round r: generate; a turn without `<tool_call>` is the final answer (success if the expected
    result appears in it); a valid call is executed and the assistant call + `tool` result are
    appended (canonical format, as trained); an invalid call ends the task (failure); after
    `max_rounds` tool calls the next turn must answer.
    Valid call: the JSON parses, names a known tool, its arguments conform to the tool's schema
    (`check_arguments`) and the tool runs without raising. First-turn stats: call (a tool call was
    attempted), valid, tool_error (a valid call whose tool returned an "error: ..." string, e.g. an
    expression the calculator cannot parse).
    """
    convs = [list(t["messages"]) for t in tasks]
    stats = Counter(n=len(tasks))
    transcripts = [[] for _ in tasks]
    active = list(range(len(tasks)))
    for r in range(max_rounds + 1):
        if not active:
            break
        texts = generate_turns([(convs[i], tasks[i]["tools"]) for i in active])
        nxt = []
        for i, text in zip(active, texts):
            transcripts[i].append(text)
            call, err, before = parse_tool_call(text, tool_names(tasks[i]["tools"]))
            result, raised = None, False
            if call is not None and check_arguments(call["arguments"], tool_schemas(tasks[i]["tools"]).get(call["name"])):
                call, err = None, "schema"
            if call is not None:
                try:
                    result = str(run_tool(call["name"], call["arguments"]))
                except Exception as e:  # the model's arguments crash the tool: an invalid call
                    raised, result = True, f"{type(e).__name__}: {e}"
            if r == 0:
                stats["call"] += err != "no_call"
                stats["valid"] += call is not None and not raised
                stats["tool_error"] += call is not None and not raised and result.startswith("error")
            if err == "no_call":
                stats["success"] += answer_matches(text, tasks[i]["expected"])
                continue
            if call is None or raised or r == max_rounds:
                continue
            transcripts[i].append(f"[tool] {result}")
            convs[i] = convs[i] + [
                {"role": "assistant", "content": before.strip(),
                 "tool_calls": [{"type": "function", "function": call}]},
                {"role": "tool", "content": result}]
            nxt.append(i)
        active = nxt
    stats["examples"] = transcripts
    return stats


# ----------------------------------------------------------------------------------------------
# Eval: model parts


def evaluate(policy, tok, cfg: Config, sets: dict, run_tool, d, dtype, full: bool = True) -> dict:
    """Held-out loss per domain; with full=True also agent validity / success and math accuracy.

    Each rank evaluates its shard [rank::world] of every set inside one gathered_for_generation
    (no collectives inside, so shards may differ in length); sums are all-reduced at the end.
    """
    was_training = policy.training
    policy.eval()
    r, W = d.rank, d.world_size
    sums = {}
    with S.gathered_for_generation(policy), torch.no_grad():
        for name, samples in sets["loss"].items():
            sums[f"lossnum_{name}"], sums[f"lossden_{name}"] = C.loss_sums(
                policy, samples[r::W], cfg.eval_batch_size, tok.pad_token_id, d, dtype)
        examples = []
        if full and sets["agent"]:
            def generate_turns(batch):
                prompts = [C.chat_prompt_ids(tok, tool_fallback(m, tok, t), t) for m, t in batch]
                return S.generate_texts(policy, tok, prompts, cfg.agent_max_new_tokens, cfg.eval_batch_size, d, dtype,
                                        stop_strings=(TOOL_CALL_CLOSE,))
            st = run_agent_tasks(sets["agent"][r::W], generate_turns, run_tool, cfg.agent_max_rounds)
            examples = st.pop("examples")[:2]
            for k in ("n", "call", "valid", "tool_error", "success"):
                sums[f"agent_{k}"] = st[k]
        if full and sets["math"]:
            rows = sets["math"][r::W]
            prompts = [C.chat_prompt_ids(tok, [{"role": "user", "content": q["question"]}]) for q in rows]
            texts = S.generate_texts(policy, tok, prompts, cfg.math_max_new_tokens, cfg.eval_batch_size, d, dtype)
            steps = [V.split_trajectory(t) for t in texts]  # a reflective answer: grade its LAST attempt
            scores = [V.score_math(st[-1]["attempt"], str(q["answer"]), prompt=q["question"])
                      for st, q in zip(steps, rows)]
            sums["math_n"] = len(rows)
            sums["math_correct"] = sum(s for s, _ in scores)
            sums["math_answered"] = sum(info["reason"] in ("correct", "wrong") for _, info in scores)
            sums["math_verification"] = sum(any(x["verification"] is not None for x in st) for st in steps)
            examples += [f"Q: {rows[0]['question']}\nA: {texts[0]}"] if rows else []
    tot = C.all_reduce_dict(sums, d)
    out = {}
    for name in sets["loss"]:
        out[f"loss_{name}"] = tot[f"lossnum_{name}"] / max(tot[f"lossden_{name}"], 1)
    if "agent_n" in tot and tot["agent_n"]:
        n = tot["agent_n"]
        out.update(agent_n=int(n), agent_call_rate=tot["agent_call"] / n, agent_valid=tot["agent_valid"] / n,
                   agent_tool_error=tot["agent_tool_error"] / n, agent_success=tot["agent_success"] / n)
    if "math_n" in tot and tot["math_n"]:
        n = tot["math_n"]
        out.update(math_n=int(n), math_acc=tot["math_correct"] / n, math_answered=tot["math_answered"] / n,
                   math_with_verification=tot["math_verification"] / n)
    out["examples"] = examples  # rank 0's first transcripts, for reading
    policy.train(was_training)
    return out


def load_eval_sets(cfg: Config, tok) -> tuple[dict, Counter]:
    """{"loss": {domain: samples}, "agent": [{"messages", "tools", "expected"}], "math": rows} and skips."""
    sets, skips = {"loss": {}, "agent": [], "math": []}, Counter()
    for spec in cfg.eval_data if cfg.eval_loss_limit > 0 else []:
        if "=" not in spec:
            raise ValueError(f"--eval_data {spec!r}: expected name=path")
        name, path = spec.split("=", 1)
        samples, sk = load_source(f"eval:{name}", path, tok, cfg.max_len, "truncate", "auto",
                                  limit=cfg.eval_loss_limit)
        sets["loss"][name] = samples
        skips.update({f"eval_{name}_{k}": v for k, v in sk.items()})
    if cfg.agent_test and cfg.eval_limit > 0:
        for line, row in enumerate(C.read_jsonl(C.resolve_path(cfg.agent_test)), 1):
            if len(sets["agent"]) >= cfg.eval_limit:
                break
            try:
                if "task" not in row or "expected" not in row["task"] or "messages" not in row:
                    raise C.DataError("agent task needs messages and task.expected")
                msgs = agent_prefix(row["messages"])
                C.to_template_messages(tool_fallback(msgs, tok, row.get("tools")), tok)  # validates roles, calls
            except (C.DataError, ValueError) as e:
                skips["eval_agent_" + skip_reason(str(e))] += 1
                C.print0(f"[eval agent] skipped {cfg.agent_test}:{line}: {e}")
                continue
            sets["agent"].append({"messages": msgs, "tools": row.get("tools"), "expected": str(row["task"]["expected"])})
    if cfg.math_test and cfg.eval_limit > 0:
        sets["math"] = C.read_jsonl(C.resolve_path(cfg.math_test), required=("question", "answer"))[:cfg.eval_limit]
    return sets, skips


def load_run_tool(path: str):
    """run_tool(name, arguments) from a python file (the data generator), imported by path."""
    p = C.resolve_path(path)
    if not p.exists():
        raise FileNotFoundError(f"--tools_module {path}: file not found")
    spec = importlib.util.spec_from_file_location(f"_tools_{p.stem}", p)
    mod = importlib.util.module_from_spec(spec)
    dont_write, sys.dont_write_bytecode = sys.dont_write_bytecode, True
    try:
        spec.loader.exec_module(mod)
    finally:
        sys.dont_write_bytecode = dont_write
    if not hasattr(mod, "run_tool"):
        raise AttributeError(f"--tools_module {path} has no run_tool(name, arguments)")
    return mod.run_tool


# ----------------------------------------------------------------------------------------------
# Main: setup -> data -> model -> loop -> eval -> save


def load_mixture(cfg: Config, sources: list[Source], tok) -> tuple[dict, list[str], MixtureSampler, dict]:
    """Every source tokenised (bad rows counted per source), and the mixture sampler over them.
    Returns (data {name: samples}, names, sampler, skipped counts)."""
    data, skipped = {}, {}
    for s in sources:
        data[s.name], sk = load_source(s.name, s.path, tok, cfg.max_len, cfg.overlong, cfg.difficulty_source)
        skipped.update({f"{s.name}_{k}": v for k, v in sk.items()})
    names = [s.name for s in sources]
    sampler = MixtureSampler(names, {n: [x["difficulty"] for x in data[n]] for n in names},
                             {s.name: s.weight for s in sources}, {s.name: s.weight_end for s in sources},
                             cfg.curriculum, cfg.seed, cfg.batch_size, cfg.max_steps, cfg.curriculum_window)
    C.print0("mixture: " + ", ".join(f"{s.name}={len(data[s.name])} samples (weight {s.weight}"
                                     + (f" -> {s.weight_end})" if cfg.curriculum == "weights" else ")") for s in sources))
    return data, names, sampler, skipped


def summarize(cfg: Config, eval_start: dict, eval_end: dict, skipped: dict, t_start: float, d) -> dict:
    """Start / end figures, the math-retention verdict, eval_summary.json and the printed table."""
    s, e = C.numeric(eval_start), C.numeric(eval_end)
    summary = {"start": s, "end": e, "change": {k: e[k] - s[k] for k in e if k in s and isinstance(e[k], float)},
               "math_margin": cfg.math_margin,
               "math_retained": (e["math_acc"] >= s["math_acc"] - cfg.math_margin) if "math_acc" in e else None,
               "skipped": skipped, "steps": cfg.max_steps, "minutes_this_process": (time.time() - t_start) / 60,
               "examples_end": eval_end.get("examples", [])}
    if d.is_main:
        (Path(cfg.out_dir) / "eval_summary.json").write_text(json.dumps(summary, indent=2))
    C.print_table(s, e)
    if summary["math_retained"] is not None:
        C.print0(f"math accuracy {s['math_acc']:.3f} -> {e['math_acc']:.3f}: "
                 f"{'retained' if summary['math_retained'] else 'DROPPED'} within margin {cfg.math_margin}")
    return summary


def main(argv=None):
    """The stage as one story: setup -> data -> model -> eval at start -> loop -> eval -> save.
    Kept in one function (a little over 80 lines) so that it reads as the script's outline; every
    step of it is a named function above."""
    t_start = time.time()
    cfg = C.parse_config(Config, argv)
    if cfg.curriculum not in CURRICULA:
        raise ValueError(f"--curriculum must be one of {CURRICULA}, got {cfg.curriculum!r}")
    if cfg.weights_end and cfg.curriculum != "weights":
        raise ValueError("--weights_end needs --curriculum weights")
    d = C.init_distributed(cfg.device)
    C.set_seed(cfg.seed)
    dtype = C.resolve_dtype(cfg.precision, d.device)
    out_dir = Path(cfg.out_dir)
    C.print0(json.dumps(C.config_to_dict(cfg), indent=1))
    C.print0(f"world size {d.world_size}, device {d.device}, compute dtype {dtype}")

    # ---- data (the model's tokenizer first: from the newest checkpoint when resuming)
    sources = parse_mixture(cfg.data, cfg.mixture_file, cfg.weights_end)
    ck = M.latest_checkpoint(out_dir) if cfg.resume else None
    model, tok = M.load_model_and_tokenizer(str(ck / "model") if ck else cfg.model, cfg.seed)
    data, names, sampler, skipped = load_mixture(cfg, sources, tok)
    eval_sets, eval_skips = load_eval_sets(cfg, tok)
    skipped.update(eval_skips)
    run_tool = load_run_tool(cfg.tools_module) if eval_sets["agent"] else None

    # ---- model
    policy = M.LogProbModel(model)
    policy = C.shard_model(policy, d, dtype, cfg.activation_checkpointing)
    opt = C.make_optimizer(policy, cfg.lr, cfg.weight_decay)
    start_step, draws, eval_start = 0, 0, None
    if ck is not None:
        state = M.load_checkpoint(ck, policy, opt, d)
        start_step, draws, eval_start = state["step"], state["sampler"]["draws"], state.get("eval_start")
        C.print0(f"resumed from {ck} at step {start_step} ({draws} samples drawn)")
    policy.train()
    log = C.MetricsLogger(out_dir, d, cfg.max_steps, cfg, cfg.wandb_project, initial_step=start_step)

    def save(step):
        M.save_checkpoint(out_dir, step, policy, tok, opt, d, cfg,
                          {"sampler": sampler.state(draws), "eval_start": eval_start, "skipped": skipped})

    # ---- eval at the start (skipped on resume: the start figures were saved with the checkpoint)
    if eval_start is None:
        t0 = time.time()
        eval_start = evaluate(policy, tok, cfg, eval_sets, run_tool, d, dtype, full=True)
        log.log(0, {f"eval_{k}": v for k, v in C.numeric(eval_start).items()} | {"eval_seconds": time.time() - t0},
                advance=False)

    # ---- loop
    for step in range(start_step, cfg.max_steps):
        t0 = time.time()
        # step 1: draw the step's samples from the mixture
        plan = sampler.plan(draws, cfg.batch_size)
        samples = [data[name][i] for name, i in plan]
        draws += len(plan)
        # steps 2-4: pack; masked CE over this rank's micro-batches / the step's global trained
        # tokens; clip, AdamW with warmup + cosine (C.sft_step, shared with stages 1 and 3)
        rows = C.pack_rows(samples, cfg.max_len, cfg.packing)
        lr = C.lr_at(step, cfg.max_steps, cfg.warmup_steps, cfg.lr, cfg.min_lr_ratio)
        st = C.sft_step(policy, opt, rows, d, dtype, cfg.micro_batch_size, tok.pad_token_id, lr,
                        cfg.max_grad_norm, step)
        log.log(step + 1, {"loss": st["loss"], "lr": lr, "grad_norm": st["grad_norm"],
                           "trained_tokens": st["trained_tokens"], "tokens": st["tokens"], "rows": st["rows"],
                           "tokens_per_s": st["tokens"] / (time.time() - t0), **composition(samples, names)})
        done = step + 1
        if cfg.eval_every and done % cfg.eval_every == 0 and done < cfg.max_steps:
            ev = evaluate(policy, tok, cfg, eval_sets, run_tool, d, dtype, full=False)
            log.log(done, {f"eval_{k}": v for k, v in C.numeric(ev).items()}, advance=False)
        if (cfg.save_every and done % cfg.save_every == 0) or done == cfg.max_steps or done == cfg.stop_after:
            save(done)
        if cfg.stop_after and done == cfg.stop_after and done < cfg.max_steps:
            C.print0(f"stopping after step {done} (--stop_after); rerun to resume")
            log.close()
            C.cleanup_distributed(d)
            return None

    # ---- eval at the end, save
    t0 = time.time()
    eval_end = evaluate(policy, tok, cfg, eval_sets, run_tool, d, dtype, full=True)
    log.log(cfg.max_steps, {f"eval_{k}": v for k, v in C.numeric(eval_end).items()}
            | {"eval_seconds": time.time() - t0}, advance=False)
    M.save_hf(policy, tok, out_dir / "final", d)
    summary = summarize(cfg, eval_start, eval_end, skipped, t_start, d)
    C.print0(f"done in {(time.time() - t_start) / 60:.1f} min; final model in {out_dir / 'final'}")
    log.close()
    C.cleanup_distributed(d)
    return summary


if __name__ == "__main__":
    main()
