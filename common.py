"""
common.py: the few helpers every stage needs to train. No stage logic lives here.

Read top to bottom:
  config -> CLI        `parse_config`: a script's @dataclass Config becomes its command line
  distributed          `init_distributed`, `print0`, and the ONLY collectives the stages use:
                       `all_reduce_sum`, `all_reduce_dict`, `gather_objects` (device-safe)
  precision            `resolve_dtype`: bf16 where the hardware does it natively, fp32 elsewhere
  FSDP2                `shard_model`: fully_shard per decoder layer, then the root
  data                 `read_jsonl`, `tokenize_chat`, `show_masked`, `pack_plan` / `pack_rows`, `collate`
  SFT step             `sft_step`: one optimizer step of masked CE over global rows (stages 1-3)
  logging              `MetricsLogger`: metrics.jsonl, tqdm on rank 0, optional wandb
Beside it: models.py (the model in, its per-token log-probs, the model out: loading, LogProbModel,
checkpoints), sampler.py (generation), verify.py (answer checking), sandbox.py (model-written code).
"""
from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import datetime
import gc
import json
import math
import os
import random
import sys
import time
import typing
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

IGNORE = -100  # label value for "no loss here" (the PyTorch / HF convention)
EMPTY_ROW = {"input_ids": [0], "labels": [IGNORE], "position_ids": [0]}  # a rank with no data runs this
LENGTH_MULTIPLE = 32  # batch lengths (collate) and head row counts (models.pad_rows) are multiples of it
REPO = Path(__file__).resolve().parent  # default data paths are relative to it (resolve_path)

# ----------------------------------------------------------------------------------------------
# Config -> CLI


def arg(default, help: str):
    """A Config field with a help string: `lr: float = arg(1e-5, "peak learning rate")`."""
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


def _str2bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true/false, got {s!r}")


def parse_config(cls, argv: list[str] | None = None):
    """Build an argparse CLI from a dataclass: every field is a `--name` flag with its help text.

    Types are enforced by argparse (`--lr abc` fails), unknown flags are rejected, booleans take
    `--flag true|false`, list fields take several values (`--data a=x.jsonl:1 b=y.jsonl:2`).
    """
    import argparse

    parser = argparse.ArgumentParser(description=(sys.modules[cls.__module__].__doc__ or "").split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_ = f.metadata.get("help", "")
        if tp is bool:
            parser.add_argument(f"--{f.name}", type=_str2bool, default=default, metavar="true|false", help=help_)
        elif typing.get_origin(tp) is list:
            (item,) = typing.get_args(tp)
            parser.add_argument(f"--{f.name}", type=item, nargs="*", default=default, help=help_)
        else:
            parser.add_argument(f"--{f.name}", type=tp, default=default, help=help_)
    return cls(**vars(parser.parse_args(argv)))


def config_to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


# ----------------------------------------------------------------------------------------------
# Distributed: the same code under `python script.py` (world size 1) and `torchrun script.py`


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    enabled: bool = False  # a process group exists (we were launched by torchrun)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def keep_freed_memory() -> bool:
    """glibc's malloc: keep freed memory for the next tensor (called by `init_distributed` on the CPU;
    KEEP_FREED_MEMORY=0: off). By default each allocation over the mmap threshold (<= 32 MiB) is a
    fresh mmap, page-faulted in at first write: exp() into a new [512, 49152] fp32 tensor took 57 ms,
    18 ms with this; SmolLM2-135M training 31-37% -> 42-46% MFU for 8-15% more peak RSS (2-core EPYC,
    BENCHMARKS.md). M_MMAP_MAX = 0 serves every block from the heap, a 2 GiB M_TRIM_THRESHOLD keeps
    freed blocks there: what preloading jemalloc / tcmalloc does, with nothing to install."""
    if os.environ.get("KEEP_FREED_MEMORY", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)  # glibc's; musl's is a no-op returning 0
    return bool(mallopt and mallopt(-4, 0) and mallopt(-1, 2**31 - 1))  # M_MMAP_MAX, M_TRIM_THRESHOLD


def init_distributed(device: str = "auto") -> Dist:
    """Join the process group when launched by torchrun (nccl on CUDA, gloo on CPU)."""
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    if not use_cuda:
        keep_freed_memory()
    if "RANK" not in os.environ:  # plain `python script.py`
        return Dist(device=torch.device("cuda" if use_cuda else "cpu"))
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if use_cuda:
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(minutes=30))
    return Dist(rank=rank, world_size=world, local_rank=local, device=dev, enabled=True)


def cleanup_distributed(d: Dist) -> None:
    """Leave the process group. FSDP2 modules that died in reference cycles (e.g. a sub-stage's
    critic) are collected first: freed after the group is gone, their pending gloo work aborted the
    process at exit ("terminate called without an active exception", ~1 run in 12)."""
    if d.enabled and dist.is_initialized():
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()


def print0(*args, **kwargs) -> None:
    if int(os.environ.get("RANK", "0")) == 0:
        print(*args, **kwargs, flush=True)


# Every collective of the stages goes through the three helpers below (PITFALLS #20): they move
# the tensor to the process device first (nccl reduces only CUDA tensors; gloo here takes CPU
# ones, d.device is the CPU then) and hand the result back on the caller's device.


def all_reduce_sum(x: torch.Tensor, d: Dist) -> torch.Tensor:
    """Sum a tensor over ranks; a copy on x's own device (a no-op copy in a single process)."""
    y = x.detach().to(d.device, copy=True)
    if d.enabled:
        dist.all_reduce(y, op=dist.ReduceOp.SUM)
    return y.to(x.device)


def all_reduce_dict(stats: dict, d: Dist) -> dict[str, float]:
    """Sum named scalar statistics over ranks in ONE collective: {name: number or 0-d tensor} ->
    {name: float}, summed in float64. Every rank must pass the same names (sorted here)."""
    keys = sorted(stats)
    vals = torch.tensor([float(stats[k]) for k in keys], dtype=torch.float64)
    return dict(zip(keys, all_reduce_sum(vals, d).tolist()))


def gather_objects(items: list, d: Dist) -> list:
    """Concatenate a picklable list over ranks, in rank order (the list itself in one process)."""
    if not d.enabled:
        return list(items)
    out = [None] * d.world_size
    dist.all_gather_object(out, items)  # pickled; gloo and nccl both move it through d.device
    return [x for part in out for x in part]


def seed_for(*parts: int) -> int:
    """A 62-bit seed that is a pure function of its integer parts (seed, stage, step, rank, ...):
    every generator of a run is seeded through this, so nothing depends on call order."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0] >> 2)


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------------------------
# Precision


def cpu_has_native_bf16() -> bool:
    """True when the CPU has bf16 matmul instructions (AVX512-BF16 or AMX); otherwise bf16 on
    CPU is emulated and can be 100x slower than fp32 (measured on an AVX2-only EPYC)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        flags = ""
    return ("avx512_bf16" in flags or "amx_bf16" in flags) and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def resolve_dtype(precision: str, device: torch.device) -> torch.dtype:
    """'auto' -> bf16 compute when native (CUDA with bf16, or a bf16 CPU), else fp32. Master weights
    and optimizer state always stay fp32; bf16 only applies to the compute (FSDP2
    MixedPrecisionPolicy when sharded, torch.autocast otherwise)."""
    if precision in ("fp32", "bf16"):
        return {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
    if precision != "auto":
        raise ValueError(f"--precision must be auto, bf16 or fp32, got {precision!r}")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if cpu_has_native_bf16() else torch.float32


def fwd_context(model: nn.Module, d: Dist, dtype: torch.dtype):
    """The context of every forward: bf16 autocast for an unsharded model (weights stay fp32), a
    no-op for an FSDP2 model (its MixedPrecisionPolicy already casts) and in fp32."""
    if dtype == torch.float32 or is_sharded(model):
        return contextlib.nullcontext()
    return torch.autocast(device_type=d.device.type, dtype=dtype)


# ----------------------------------------------------------------------------------------------
# FSDP2


def shard_model(model: nn.Module, d: Dist, dtype: torch.dtype, activation_checkpointing: bool = False) -> nn.Module:
    """fully_shard each decoder layer, then the root (torchtune's recipe). Single process: no-op.
    Mixed precision: parameters gathered and computed in `dtype`, gradients reduced in fp32,
    master weights and optimizer state fp32."""
    lm = getattr(model, "lm", model)  # a wrapper (LogProbModel, a scalar-head model) around an HF LM
    if activation_checkpointing:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.to(d.device)
    if not d.enabled:
        return model
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    for layer in lm.get_decoder().layers:
        fully_shard(layer, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    # Sum (not average) gradients over ranks: every loss here is already divided by the GLOBAL
    # count of tokens / sequences of the optimizer step, so averaging again would shrink the
    # update by the world size (PITFALLS #1).
    for m in model.modules():
        if hasattr(m, "set_gradient_divide_factor"):
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)  # plain SUM: gloo has no PREMUL_SUM
    return model


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


# ----------------------------------------------------------------------------------------------
# Data: JSONL, chat tokenisation with loss masks, packing


class DataError(ValueError):
    """Bad input data; the message names the file and line."""


def read_jsonl(path: str | Path, required: tuple[str, ...] = ()) -> list[dict]:
    """Read a JSONL (or a JSON list) file. Malformed lines and missing fields raise DataError
    naming the file and line; an empty file is an error too."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None
        numbered = list(enumerate(rows if isinstance(rows, list) else [rows], 1))
    else:
        numbered = []
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                numbered.append((i, json.loads(line)))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{i}: malformed JSON ({e.msg}): {line[:80]!r}") from None
    if not numbered:
        raise DataError(f"{path}: no records (empty file)")
    for i, row in numbered:
        if not isinstance(row, dict):
            raise DataError(f"{path}:{i}: expected a JSON object, got {type(row).__name__}")
        missing = [k for k in required if k not in row]
        if missing:
            raise DataError(f"{path}:{i}: missing field(s) {missing}")
    return [row for _, row in numbered]


def template_supports_tools(tok) -> bool:
    """True when the chat template renders `tools` / `tool_calls` itself (SmolLM2's does not:
    stage 2 then writes tool calls as text, see its `tool_fallback`)."""
    return "tool_calls" in (tok.chat_template or "")


def to_template_messages(messages: list[dict], tok) -> list[dict]:
    """Validate roles and contents; segments (`{"segments": [{"text", "train"}]}`) are joined
    into `content`; tool calls pass through only where the template renders them (else an error:
    silently dropping them would train the model on turns it never sees)."""
    out = []
    for i, m in enumerate(messages):
        role = m.get("role")
        if role not in ("system", "user", "assistant", "tool"):
            raise DataError(f"message {i}: unknown role {role!r} (expected system/user/assistant/tool)")
        content = "".join(s["text"] for s in m["segments"]) if "segments" in m else m.get("content")
        if content is None:
            raise DataError(f"message {i} ({role}): no content")
        msg = {"role": role, "content": content}
        if m.get("tool_calls"):
            if not template_supports_tools(tok):
                raise DataError(f"message {i}: tool calls, but the chat template cannot render them "
                                f"(convert them to text first, as stage 2's tool_fallback does)")
            msg["tool_calls"] = m["tool_calls"]
        out.append(msg)
    return out


def _render(tok, messages, tools, add_generation_prompt):
    return tok.apply_chat_template(messages, tools=tools if template_supports_tools(tok) else None,
                                   tokenize=False, add_generation_prompt=add_generation_prompt)


def tokenize_chat(tok, messages: list[dict], tools: list[dict] | None = None) -> dict:
    """messages -> {"input_ids", "labels"}: labels = IGNORE on everything the assistant did not write.

    Trained: each assistant message's content and its end-of-turn token (so the model learns to
    stop, PITFALLS #7), minus any segment marked `"train": false`. Not trained: system, user and
    tool text, and the template's own role headers.

    How (PITFALLS #9): the whole conversation is rendered once and tokenised once with character
    offsets; the character span of assistant message i is [len(render(msgs[:i], gen_prompt)),
    len(render(msgs[:i+1]).rstrip())). Each partial render must be a prefix of the full one, or
    we fail loudly instead of producing a wrong mask.
    """
    if not getattr(tok, "chat_template", None):
        raise ValueError("the tokenizer has no chat template; set tok.chat_template (see README, Data formats)")
    msgs = to_template_messages(messages, tok)
    full = _render(tok, msgs, tools, False)
    spans = []  # (start, end, train) character spans
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        head = _render(tok, msgs[:i], tools, True)
        upto = _render(tok, msgs[:i + 1], tools, False).rstrip()
        if not full.startswith(head) or not full.startswith(upto):
            raise ValueError("chat template is not prefix-stable (a partial render is not a prefix of the "
                             "full one); cannot derive the assistant mask safely")
        source = messages[i]
        if "segments" in source:  # per-segment masks, e.g. stage 1's wrong attempts
            pos = len(head)
            for seg in source["segments"]:
                spans.append((pos, pos + len(seg["text"]), bool(seg.get("train", True))))
                pos += len(seg["text"])
            spans.append((pos, len(upto), bool(source["segments"][-1].get("train", True))))  # end-of-turn
        else:
            spans.append((len(head), len(upto), bool(source.get("train", True))))
    enc = tok(full, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    labels = [IGNORE] * len(ids)
    for j, (s, e) in enumerate(offsets):
        for a, b, train in spans:
            if a <= s < b and train:
                labels[j] = ids[j]
                break
    return {"input_ids": ids, "labels": labels}


def show_masked(tok, input_ids: list[int], labels: list[int], color: bool = False) -> str:
    """Render a tokenised sample with the trained tokens inside [[ ]] (or green with color=True)."""
    out, cur, cur_train = [], [], None
    for t, l in zip(input_ids, labels):
        train = l != IGNORE
        if cur_train is not None and train != cur_train:
            out.append((cur_train, tok.decode(cur)))
            cur = []
        cur.append(t)
        cur_train = train
    if cur:
        out.append((cur_train, tok.decode(cur)))
    if color:
        return "".join(f"\033[32m{s}\033[0m" if tr else s for tr, s in out)
    return "".join(f"[[{s}]]" if tr else s for tr, s in out)


def fit_length(samples: list[dict], max_len: int, policy: str = "drop") -> tuple[list[dict], int]:
    """Over-long samples: 'drop' them or 'truncate' them to max_len. Returns (kept, n_affected) so
    callers can say how many; samples with no trained token left are dropped (and counted)."""
    if policy not in ("drop", "truncate"):
        raise ValueError(f"over-long policy must be drop or truncate, got {policy!r}")
    kept, n = [], 0
    for s in samples:
        if len(s["input_ids"]) > max_len:
            n += 1
            if policy == "drop":
                continue
            s = {k: v[:max_len] if isinstance(v, list) else v for k, v in s.items()}
            if all(l == IGNORE for l in s["labels"][1:]):
                continue
        kept.append(s)
    return kept, n


def pack_plan(lengths: list[int], max_len: int, packing: bool = True) -> list[list[int]]:
    """Which samples go into each row: greedy first-fit in the given order (packing=False: one
    sample per row). pack_rows builds its rows from this; stage 3 uses it to keep per-sample data."""
    groups, cur = [], 0
    for i, n in enumerate(lengths):
        if n > max_len:
            raise ValueError(f"sample of {n} tokens > max_len {max_len}: call fit_length first")
        if not groups or not packing or cur + n > max_len:
            groups.append([])
            cur = 0
        groups[-1].append(i)
        cur += n
    return groups


def pack_rows(samples: list[dict], max_len: int, packing: bool = True) -> list[dict]:
    """Samples -> rows of at most max_len tokens (pack_plan) with per-sample position ids. Each
    sample restarts its position ids at 0, which the HF attention mask builder turns into a
    block-diagonal causal mask, so packed samples never see each other (PITFALLS #13)."""
    rows = []
    for group in pack_plan([len(s["input_ids"]) for s in samples], max_len, packing):
        row = {"input_ids": [], "labels": [], "position_ids": []}
        for s in (samples[i] for i in group):
            n = len(s["input_ids"])
            row["input_ids"] += s["input_ids"]
            # a sample's first token has no prefix: never trained (packed, it would be "predicted"
            # from the previous sample's last token, a cross-sample leak the mask cannot block)
            row["labels"] += [IGNORE] + s["labels"][1:] if n else []
            row["position_ids"] += list(range(n))
        rows.append(row)
    return rows


def collate(rows: list[dict], pad_id: int, pad_to: int | None = None,
            multiple: int = LENGTH_MULTIPLE) -> dict[str, torch.Tensor]:
    """Right-pad rows to the longest, rounded up to a multiple of `multiple` (or to pad_to): labels
    IGNORE, positions continuing, so a causal model's real positions never see the pads. Rounded: in
    bf16 on CPU oneDNN builds a kernel per new GEMM shape (5-40 ms on an AMX host; 1-8 ms to run)."""
    T = pad_to or -(-max(len(r["input_ids"]) for r in rows) // multiple) * multiple
    out = {"input_ids": [], "labels": [], "position_ids": []}
    for r in rows:
        n = len(r["input_ids"])
        pos = r.get("position_ids") or list(range(n))  # a bare sample: one sequence
        out["input_ids"].append(r["input_ids"] + [pad_id] * (T - n))
        out["labels"].append(r["labels"] + [IGNORE] * (T - n))
        last = pos[-1] + 1 if n else 0
        out["position_ids"].append(pos + list(range(last, last + T - n)))
    return {k: torch.tensor(v, dtype=torch.long) for k, v in out.items()}


def masked_ce_loss(logp: torch.Tensor, labels: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """Token cross-entropy normalised by the trained tokens of the WHOLE optimizer step.

        L = -(1 / N) * sum_{b,t} m[b,t] * log p(y[b,t] | y[<t])    m = labels != IGNORE

    logp: [B, T] from LogProbModel (aligned with labels); labels: [B, T]; n_tokens: N, the count
    over all micro-batches and all ranks of the step. Summing this loss over micro-batches and
    (with FSDP gradient sums) over ranks gives exactly the global token mean, whatever the
    accumulation and world size (PITFALLS #1). Per-micro-batch means would not.
    """
    mask = (labels != IGNORE).float()
    mask[:, 0] = 0.0  # position 0 has no prefix: it is never predicted
    return -(logp * mask).sum() / max(n_tokens, 1)


def count_trained(labels: torch.Tensor) -> int:
    """Number of tokens with a loss in a [B, T] label tensor (labels are unshifted)."""
    return int((labels[:, 1:] != IGNORE).sum())


def epoch_stream_indices(n: int, start: int, count: int, seed: int) -> list[int]:
    """Indices [start, start+count) of an endless stream of shuffled epochs over n items.

    Deterministic given the seed, and a function of the position alone: resuming at sample
    `start` yields exactly the batches an uninterrupted run would have seen (PITFALLS #18).
    """
    if n <= 0:
        raise ValueError("empty dataset")
    out, perms = [], {}
    for pos in range(start, start + count):
        epoch, k = divmod(pos, n)
        if epoch not in perms:
            perms[epoch] = np.random.default_rng([seed, epoch]).permutation(n)
        out.append(int(perms[epoch][k]))
    return out


def rank_micro_batches(rows: list, d: Dist, micro_batch_size: int, empty=None) -> list[list]:
    """This rank's micro-batches of one optimizer step's global rows: micro-batch a of rank r holds
    rows[(a * W + r) * mbs : +mbs], so 1 process x accumulation N and N processes see the same rows.
    Every rank runs ceil(len / (W x mbs)) of them (FSDP2's collectives must match); the last may be
    short, and one with no row left holds [empty] (no loss). No empty rows are padded in: collated
    with real ones they would run at full length (5 real rows + 3 empty ones cost 8 full rows)."""
    W, mbs = d.world_size, micro_batch_size
    accum = -(-len(rows) // (W * mbs))
    return [rows[(a * W + d.rank) * mbs:(a * W + d.rank + 1) * mbs] or [empty] for a in range(accum)]


# ----------------------------------------------------------------------------------------------
# Optimisation helpers


def lr_at(step: int, total_steps: int, warmup_steps: int, peak_lr: float, min_lr_ratio: float = 0.1) -> float:
    """Linear warmup to peak_lr, then cosine decay to min_lr_ratio * peak_lr at total_steps."""
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return peak_lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(model: nn.Module, lr: float, weight_decay: float, betas=(0.9, 0.95)):
    """AdamW, fused (one kernel, not ~10 passes: 0.22 -> 0.12 s per step on 135M params, 2 cores);
    no weight decay on biases and norms (parameters with fewer than 2 dims)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=betas, fused=True)


def optimizer_step(model: nn.Module, opt, lr: float, max_grad_norm: float) -> float:
    """Clip, set the learning rate, step, zero grads. Returns the global grad norm (pre-clip)."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    if hasattr(norm, "full_tensor"):  # a DTensor under FSDP2
        norm = norm.full_tensor()
    if not torch.isfinite(norm):
        raise FloatingPointError(f"gradient norm is {float(norm)}: NaN/inf in the gradients "
                                 f"(try a lower --lr or --precision fp32)")
    for g in opt.param_groups:
        g["lr"] = lr
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(norm)


def check_finite(loss_sum: float, step: int) -> None:
    if not math.isfinite(loss_sum):
        raise FloatingPointError(f"step {step}: loss is {loss_sum}; stopping before it corrupts the weights")


def sft_step(policy: nn.Module, opt, rows: list[dict], d: Dist, dtype: torch.dtype, micro_batch_size: int,
             pad_id: int, lr: float, max_grad_norm: float, step: int) -> dict:
    """One optimizer step of masked cross-entropy over the step's GLOBAL rows (stages 1, 2, 3).

    `rows`: packed rows (pack_rows / collate format), the SAME list on every rank.
      1. this rank's micro-batches (rank_micro_batches: every rank runs the same number, as FSDP2's
         collectives need; one with no row left runs a 1-token row with no loss);
      2. N = trained tokens of ALL rows: every rank has them, so no collective is needed;
      3. loss = sum over micro-batches of masked_ce_loss(logp, labels, N); FSDP2 sums gradients over
         ranks (synchronised on the last micro-batch only), so 1 process x accumulation k ==
         k processes x accumulation 1, exactly (PITFALLS #1);
      4. stop on a NaN / inf loss, clip, AdamW step at `lr`.
    Returns {"loss" (global), "grad_norm", "trained_tokens" (N), "tokens" (real input tokens), "rows"}.
    """
    n_in = sum(len(r["input_ids"]) for r in rows)
    n_tokens = sum(sum(l != IGNORE for l in r["labels"][1:]) for r in rows)  # step 2
    micro = rank_micro_batches(rows, d, micro_batch_size, EMPTY_ROW)  # step 1
    loss_sum = torch.zeros((), dtype=torch.float64, device=d.device)
    for a, mb in enumerate(micro):  # step 3
        if is_sharded(policy):
            policy.set_requires_gradient_sync(a == len(micro) - 1)
        b = {k: v.to(d.device) for k, v in collate(mb, pad_id).items()}
        untrained = count_trained(b["labels"]) == 0
        with fwd_context(policy, d, dtype):
            out = policy(b["input_ids"], b["labels"], position_ids=b["position_ids"], return_hidden=untrained)
            loss = masked_ce_loss(out["logp"], b["labels"], n_tokens)
            if untrained:  # no trained token here: keep every parameter in the graph so that FSDP's
                loss = loss + 0.0 * out["hidden"].sum()  # gradient reduce-scatter runs on every rank
        loss.backward()
        loss_sum += loss.detach().double()
    loss_val = float(all_reduce_sum(loss_sum, d))
    check_finite(loss_val, step)  # step 4
    gnorm = optimizer_step(policy, opt, lr, max_grad_norm)
    return {"loss": loss_val, "grad_norm": gnorm, "trained_tokens": n_tokens, "tokens": n_in, "rows": len(rows)}


def chat_prompt_ids(tok, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
    """Token ids of a conversation followed by the assistant header (the generation prompt)."""
    msgs = to_template_messages(messages, tok)
    return tok(_render(tok, msgs, tools, True), add_special_tokens=False)["input_ids"]


# ----------------------------------------------------------------------------------------------
# Evaluation helpers shared by the stages


def resolve_path(p: str | Path) -> Path:
    """Relative paths are taken from the current directory, else from the repo root (so the
    default data/... paths work from anywhere)."""
    path = Path(p)
    if path.is_absolute() or path.exists() or not (REPO / path).exists():
        return path
    return REPO / path


@torch.no_grad()
def loss_sums(policy: nn.Module, samples: list[dict], batch_size: int, pad_id: int, d: Dist, dtype) -> tuple[float, int]:
    """(sum of -log p over trained tokens, number of trained tokens) of held-out samples, one sample
    per row; sum both over ranks and divide for a mean that does not depend on the split."""
    total, n = 0.0, 0
    for i in range(0, len(samples), batch_size):
        b = {k: v.to(d.device) for k, v in collate(samples[i:i + batch_size], pad_id).items()}
        with fwd_context(policy, d, dtype):
            out = policy(b["input_ids"], b["labels"], position_ids=b["position_ids"])
        total += float(masked_ce_loss(out["logp"], b["labels"], 1))
        n += count_trained(b["labels"])
    return total, n


def numeric(ev: dict) -> dict:
    """The int / float entries of an eval dict (what goes to the logs and the summary)."""
    return {k: v for k, v in ev.items() if isinstance(v, (int, float))}


def print_table(start: dict, end: dict) -> None:
    """metric | start | end | change, for the float metrics present in both."""
    w = max([len(k) for k in end] + [6]) + 2
    print0(f"{'metric':<{w}}{'start':>10}{'end':>10}{'change':>10}")
    for k in end:
        if isinstance(end[k], float) and isinstance(start.get(k), float):
            print0(f"{k:<{w}}{start[k]:>10.4f}{end[k]:>10.4f}{end[k] - start[k]:>+10.4f}")


# ----------------------------------------------------------------------------------------------
# Logging


class MetricsLogger:
    """Appends one JSON line per call to out_dir/metrics.jsonl (rank 0), mirrors to wandb when a
    project is given (offline unless WANDB_MODE says otherwise), and drives a tqdm bar."""

    def __init__(self, out_dir: str | Path, d: Dist, total_steps: int, cfg=None, wandb_project: str = "",
                 initial_step: int = 0):
        self.d = d
        self.path = Path(out_dir) / "metrics.jsonl"
        self.wandb = self.bar = None
        if not d.is_main:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if wandb_project:
            import wandb
            os.environ.setdefault("WANDB_MODE", "offline")
            self.wandb = wandb.init(project=wandb_project, dir=str(out_dir),
                                    config=config_to_dict(cfg) if cfg is not None else None)
        from tqdm import tqdm
        self.bar = tqdm(total=total_steps, initial=initial_step, dynamic_ncols=True, disable=not sys.stderr.isatty())

    def log(self, step: int, metrics: dict, advance: bool = True) -> None:
        if not self.d.is_main:
            return
        row = {"step": step, "time": round(time.time(), 3), **{k: _jsonable(v) for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.wandb is not None:
            self.wandb.log(row, step=step)
        if self.bar is not None:
            if advance:
                self.bar.update(1)
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items() if isinstance(v, float)}, refresh=False)
        if self.bar is None or self.bar.disable:
            short = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()
                             if isinstance(v, (int, float)))
            print(f"step {step} {short}", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.wandb is not None:
            self.wandb.finish()


def _jsonable(v):
    if isinstance(v, torch.Tensor):
        return v.item() if v.numel() == 1 else v.tolist()
    if isinstance(v, float):
        return round(v, 6)
    return v
