"""
sampler.py: the one hand-written sampler every stage generates with (evals, S2R builds, RL
rollouts, on-policy distillation).

  `generate`                  a batch of prompts -> `Generation` (ids, log-probs, lengths)
  `generate_texts`            prompts -> decoded strings, in batches (evals, data building)
  `sampling_model`            the module to sample from (a bf16 weight copy on one process)
  `gathered_for_generation`   under FSDP2: gather the parameters once per rollout, not per token
What keeps it correct: the logits go through `models.process_logits`, the same transform the
trainer scores with, so in fp32 the sampled log-probs equal the trainer's to ~1e-6 (tested).
What makes it fast (decoding is memory-bound, one weight read per token; measured on SmolLM2-135M,
64 rows, 2 cores): a KV cache and logits of the last position only; `sample_categorical`, an
inverse-CDF draw in two levels instead of torch.multinomial (-25% of a decode step); weights in
bf16 cast once per rollout (`sampling_model`) instead of once per token under autocast; under
FSDP2 one gather per rollout. See BENCHMARKS.md for what was measured and tried.
"""
from __future__ import annotations

import contextlib
import copy
import weakref
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import common as C
import models as M


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


def sample_categorical(probs: torch.Tensor, generator: torch.Generator | None = None, block: int = 256) -> torch.Tensor:
    """One draw per row of probs [B, V] (non-negative; rows need not sum to exactly 1), by inverting
    the CDF in two levels with two uniforms per row: pick a block of `block` tokens with probability
    (its mass / total), then a token inside it with probability (its p / block mass); so
    P(i) = p_i / total exactly. Strict inequalities (`right=True`) never pick a zero-probability
    token. Why not torch.multinomial: it draws B x V exponentials, 70 ms of a 270 ms decode step at
    64 x 49152 on 2 cores (measured); two short cumsums over [B, V / block] and [B, block] cost
    well under a millisecond, and each stays short enough for fp32 to sum accurately."""
    B, V = probs.shape
    pad = (-V) % block
    blocks = F.pad(probs, (0, pad)).view(B, -1, block)  # [B, nb, block]
    cdf = blocks.sum(-1).cumsum(-1)  # [B, nb]
    u = torch.rand(B, 2, generator=generator, device=probs.device, dtype=probs.dtype)
    k = torch.searchsorted(cdf, u[:, :1] * cdf[:, -1:], right=True).clamp_(max=cdf.shape[1] - 1)  # [B, 1]
    inner = blocks.gather(1, k[:, :, None].expand(B, 1, block)).squeeze(1).cumsum(-1)  # [B, block]
    j = torch.searchsorted(inner, u[:, 1:] * inner[:, -1:], right=True).clamp_(max=block - 1)
    return (k * block + j).squeeze(-1).clamp_(max=V - 1)


@torch.no_grad()
def generate(model: nn.Module, prompts: list[list[int]], max_new_tokens: int, eos_ids: list[int] | int,
             pad_id: int, temperature: float = 1.0, top_p: float = 1.0, stop_strings: list[str] = (),
             tok=None, generator: torch.Generator | None = None) -> Generation:
    """Sample responses for a batch of tokenised prompts with a KV cache.

    Prompts are left-padded; position ids count only real tokens. Each step: logits of the last
    position -> M.process_logits (/T) -> top-p -> sample (argmax when T == 0). The returned logp is
    taken from the processed distribution BEFORE top-p, the same one the trainer recomputes, so the
    importance ratio is exactly 1 without an update when top_p = 1 (PITFALLS #5); with top_p < 1 the
    sampler and the scorer differ (PITFALLS #6): use top_p = 1 where exact ratios matter.
    `model`: a HF causal LM or a M.LogProbModel (its .lm is used); under FSDP2 call this inside
    `gathered_for_generation(root)` so parameters are gathered once.
    """
    lm = model.lm if isinstance(model, M.LogProbModel) else model
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
        logits = M.process_logits(out.logits[:, -1].float(), temperature)
        logp_all = logits.log_softmax(-1)  # [B, V], the distribution the trainer recomputes
        if temperature == 0.0:
            nxt = logits.argmax(-1)
        else:
            probs = logp_all.exp() if top_p >= 1.0 else top_p_filter(logits, top_p).softmax(-1)
            nxt = sample_categorical(probs, generator)
        lp = logp_all.gather(-1, nxt[:, None]).squeeze(-1)
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


_COPIES: "weakref.WeakKeyDictionary[nn.Module, nn.Module]" = weakref.WeakKeyDictionary()


@contextlib.contextmanager
def sampling_model(model: nn.Module, d: C.Dist, dtype: torch.dtype):
    """The module to sample from: `with sampling_model(policy, d, dtype) as m: generate(m, ...)`.

    fp32, or an FSDP2 model (inside gathered_for_generation its parameters are already gathered in
    the MixedPrecisionPolicy's param dtype): the model itself, under C.fwd_context. Otherwise, for
    bf16 on one process: a bf16 COPY of its HF model, made once (kept beside the model, not inside
    it: never saved or optimised) and refreshed from the fp32 master weights at every entry, so
    the weights are cast once per rollout instead of at every decoded token as autocast does
    (decoding reads every weight once per token: memory-bound). Costs one bf16 copy of the weights
    (270 MB for SmolLM2-135M). Rotary buffers stay fp32. The sampler's log-probs then differ from
    the trainer's a little more than under autocast (RMSNorm in bf16): logged as logp_diff_sampler,
    and what --tis_cap corrects."""
    if dtype == torch.float32 or C.is_sharded(model):
        with C.fwd_context(model, d, dtype):
            yield model
        return
    lm = model.lm if isinstance(model, M.LogProbModel) else model
    low = _COPIES.get(lm)
    with torch.no_grad():
        if low is None or next(low.parameters()).dtype != dtype:
            low = copy.deepcopy(lm).to(dtype).eval()
            for b_low, b in zip(low.buffers(), lm.buffers()):
                b_low.data = b.data.clone()  # rotary inv_freq etc.: full precision
            _COPIES[lm] = low
        else:
            for p_low, p in zip(low.parameters(), lm.parameters()):
                p_low.copy_(p)
    yield low


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



def generate_texts(policy: nn.Module, tok, prompts: list[list[int]], max_new_tokens: int, batch_size: int,
                   d: C.Dist, dtype, temperature: float = 0.0, seed: int = 0, stop_strings=()) -> list[str]:
    """Decoded responses (special tokens removed) for prompt id lists, in batches of batch_size;
    batch i samples with its own generator seeded from (seed, i) when temperature > 0. Under FSDP2
    call it inside gathered_for_generation (no collectives inside, so ranks may differ in work)."""
    texts = []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i:i + batch_size]
        gen = torch.Generator(device=d.device).manual_seed(seed * 1_000_003 + i) if temperature > 0 else None
        with sampling_model(policy, d, dtype) as m:
            g = generate(m, chunk, max_new_tokens, eos_ids=tok.eos_token_id, pad_id=tok.pad_token_id,
                         temperature=temperature, generator=gen, stop_strings=stop_strings,
                         tok=tok if stop_strings else None)
        texts += [tok.decode(g.response_ids(j), skip_special_tokens=True) for j in range(len(chunk))]
    return texts
