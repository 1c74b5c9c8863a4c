"""
sampler.py: the one hand-written sampler every stage generates with (evals, S2R builds, RL
rollouts, on-policy distillation).

  `generate`                  a batch of prompts -> `Generation` (ids, log-probs, lengths)
  `generate_texts`            prompts -> decoded strings, in batches (evals, data building)
  `sampling_model`            the module to sample from (a bf16 weight copy on one process)
  `gathered_for_generation`   under FSDP2: gather the parameters once per rollout, not per token
What keeps it correct: the logits go through `models.process_logits`, the same transform the
trainer scores with, so in fp32 the sampled log-probs equal the trainer's to ~1e-6 (tested).
What makes it fast (each decode step reads every weight and the whole cache; measured on
SmolLM2-135M, 64 rows, 2 cores): a KV cache and logits of the last position only;
`sample_categorical`, an inverse-CDF draw in two levels instead of torch.multinomial (-25% of a
decode step); weights in bf16 cast once per rollout (`sampling_model`) instead of once per token
under autocast; for those bf16 copies of Llama models a written-out decode step (`LlamaDecodeStep`:
a cache written in place, fused q/k/v and gate/up GEMMs, SDPA, on CPU weights packed for oneDNN once per
rollout instead of at every product: +12-25%); finished rows dropped from the batch
(`generate`'s compact_at); prompts prefilled in groups of similar length (`length_buckets`), a
prompt repeated in the batch (a GRPO group, S2R's K samples) prefilled once (-33% for 8 prompts x 8
samples x 64 tokens); under FSDP2 one gather per rollout. See BENCHMARKS.md.
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


def length_buckets(lengths: list[int], max_waste: float = 0.25) -> list[list[int]]:
    """Row indices grouped for the prefill: sorted by length, a new group whenever padding the
    group to its longest row would waste more than `max_waste` of its tokens. Why: one left-padded
    prefill of 64 math prompts of 39-88 tokens computes 5,632 positions for 3,435 real tokens
    (measured); grouped, under 25% of each group's positions are padding."""
    groups, group, real = [], [], 0
    for i in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        if group and (len(group) + 1) * lengths[i] > (1 + max_waste) * (real + lengths[i]):
            groups.append(group)
            group, real = [], 0
        group.append(i)
        real += lengths[i]
    return groups + ([group] if group else [])


def prefill(lm: nn.Module, prompts: list[list[int]], pad_id: int, device) -> tuple:
    """Run the prompts through the model in length groups (`length_buckets`) and assemble one
    left-padded batch. Returns (raw [B, V] fp32 logits of each prompt's last token, keys and
    values [(K, V) per layer, each [B, Hkv, P, D]], attn [B, P] 1 on real tokens, pos [B, P]
    position ids counting only real tokens). Padded slots hold zeros and are masked by `attn`.
    A prompt that appears several times (GRPO's G samples of one prompt, S2R's K, stage 3's
    preference samples) is run once and its logits and cache rows copied: the prefill of a group
    of G costs one row, not G."""
    first = {}  # prompt -> its row among the unique prompts
    inv = torch.tensor([first.setdefault(tuple(p), len(first)) for p in prompts], device=device)
    uniq = [list(p) for p in first]
    U, P = len(uniq), max(len(p) for p in uniq)
    attn = torch.zeros((U, P), dtype=torch.long, device=device)
    for i, p in enumerate(uniq):
        attn[i, P - len(p):] = 1
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    raw, kv = None, None
    for group in length_buckets([len(p) for p in uniq]):
        Pg = max(len(uniq[i]) for i in group)
        ids = torch.tensor([[pad_id] * (Pg - len(uniq[i])) + uniq[i] for i in group], device=device)
        rows = torch.tensor(group, device=device)
        # logits_to_keep=1: only the last position is sampled from; the full [B, P, V] prefill logits
        # would cost ~25% more prefill FLOPs and B * P * V * 4 bytes (1.4 GB for 8 x 450 x 49152)
        out = lm(input_ids=ids, attention_mask=attn[rows, P - Pg:], position_ids=pos[rows, P - Pg:],
                 use_cache=True, logits_to_keep=1)
        if raw is None:
            raw = torch.zeros(U, out.logits.shape[-1], device=device)
            kv = [tuple(x.new_zeros(U, x.shape[1], P, x.shape[3]) for x in (layer.keys, layer.values))
                  for layer in out.past_key_values.layers]
        raw[rows] = out.logits[:, -1].float()
        for (K, V), layer in zip(kv, out.past_key_values.layers):
            K[rows, :, P - Pg:], V[rows, :, P - Pg:] = layer.keys, layer.values
    if U < len(prompts):  # copy the repeated prompts' rows
        raw, kv, attn, pos = raw[inv], [(K[inv], V[inv]) for K, V in kv], attn[inv], pos[inv]
    return raw, kv, attn, pos


@torch.no_grad()
def generate(model: nn.Module, prompts: list[list[int]], max_new_tokens: int, eos_ids: list[int] | int,
             pad_id: int, temperature: float = 1.0, top_p: float = 1.0, stop_strings: list[str] = (),
             tok=None, generator: torch.Generator | None = None, compact_at: float = 0.75) -> Generation:
    """Sample responses for a batch of tokenised prompts with a KV cache.

    Prompts are left-padded; position ids count only real tokens. Each step: logits of the last
    position -> M.process_logits (/T) -> top-p -> sample (argmax when T == 0). The returned logp is
    taken from the processed distribution BEFORE top-p, the same one the trainer recomputes, so the
    importance ratio is exactly 1 without an update when top_p = 1 (PITFALLS #5); with top_p < 1 the
    sampler and the scorer differ (PITFALLS #6): use top_p = 1 where exact ratios matter.
    Finished rows are dropped from the batch (their cache rows too) once no more than `compact_at`
    of the batch is still decoding, so a step costs what the live rows need (0: never; 1: as soon
    as any row finishes).
    `rows` maps the rows of the shrinking batch to the prompts they answer.
    `model`: a HF causal LM or a M.LogProbModel (its .lm is used); under FSDP2 call this inside
    `gathered_for_generation(root)` so parameters are gathered once.
    (~85 lines: the decode loop is read as one piece, its state, rows / finished / cache, changing
    together; prefill, the decode step and the draw are the named functions above.)
    """
    lm = M.hf_model(model)
    device = next(lm.parameters()).device
    eos = torch.tensor([eos_ids] if isinstance(eos_ids, int) else list(eos_ids), device=device)
    B, P = len(prompts), max(len(p) for p in prompts)
    raw, past, attn, pos = prefill(lm, prompts, pad_id, device)
    engine = _ENGINES.get(lm)  # the written-out decode step (bf16 copies only)
    if engine is not None:  # the engine's cache is pre-allocated; -inf bias on the left padding
        kv = engine.cache_from(past, P, P + max_new_tokens)
        bias = torch.zeros(B, P + max_new_tokens, device=device)
        bias[:, :P] = torch.where(attn.bool(), 0.0, float("-inf"))
    else:
        from transformers import DynamicCache

        cache = DynamicCache()
        for i, (K, V) in enumerate(past):
            cache.update(K, V, i)
    del past
    tokens = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=device)
    logps = torch.zeros((B, max_new_tokens), dtype=torch.float32, device=device)
    lengths = torch.zeros(B, dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)  # per prompt
    rows = torch.arange(B, device=device)  # the prompt each row of the current batch answers
    finished = torch.zeros(B, dtype=torch.bool, device=device)  # per row of the current batch
    step_pos = pos[:, -1]
    texts = [""] * B
    for t in range(max_new_tokens):
        if t > 0 and engine is not None:  # one token per row into slot P + t - 1
            raw = engine(step_ids, step_pos, kv, P + t - 1, bias)
        elif t > 0:
            out = lm(input_ids=step_ids[:, None], attention_mask=attn, position_ids=step_pos[:, None],
                     past_key_values=cache, use_cache=True, logits_to_keep=1)
            cache, raw = out.past_key_values, out.logits[:, -1]
        logits = M.process_logits(raw.float(), temperature)
        logp_all = logits.log_softmax(-1)  # [b, V], the distribution the trainer recomputes
        if temperature == 0.0:
            nxt = logits.argmax(-1)
        else:
            probs = logp_all.exp() if top_p >= 1.0 else top_p_filter(logits, top_p).softmax(-1)
            nxt = sample_categorical(probs, generator)
        lp = logp_all.gather(-1, nxt[:, None]).squeeze(-1)
        alive = ~finished
        tokens[rows[alive], t] = nxt[alive]
        logps[rows[alive], t] = lp[alive]
        lengths[rows[alive]] += 1
        done_now = alive & torch.isin(nxt, eos)
        if stop_strings and tok is not None:
            for i in alive.nonzero().flatten().tolist():
                j = int(rows[i])  # the prompt this row answers
                texts[j] += tok.decode([int(nxt[i])])
                if any(s in texts[j] for s in stop_strings):
                    done_now[i] = True
        finished |= done_now
        done[rows[done_now]] = True
        if finished.all():
            break
        n_alive = int((~finished).sum())
        if n_alive < len(rows) and n_alive <= compact_at * len(rows):  # drop the finished rows
            keep = (~finished).nonzero().flatten()
            rows, finished, nxt, step_pos, attn = rows[keep], finished[keep], nxt[keep], step_pos[keep], attn[keep]
            if engine is not None:
                kv, bias = [(K[keep], V[keep]) for K, V in kv], bias[keep]
            else:
                cache.batch_select_indices(keep)
        step_ids = torch.where(finished, torch.full_like(nxt, pad_id), nxt)
        step_pos = step_pos + 1
        if engine is None:  # HF's forward takes the whole mask each step; the engine uses `bias`
            attn = torch.cat([attn, attn.new_ones(len(rows), 1)], dim=1)
    N = int(lengths.max()) if B else 0
    return Generation(tokens[:, :N].cpu(), logps[:, :N].cpu(), lengths.cpu(), done.cpu())


PACK_WEIGHTS = True  # LlamaDecodeStep.repack: oneDNN-packed bf16 GEMM weights on CPU (a switch for A/B timing)


class LlamaDecodeStep:
    """One decode step (one new token per row) of a Llama-architecture HF model, written out.

    Why: decoding is overhead- and memory-bound; HF's forward re-copies the whole growing KV cache
    at every token and runs q / k / v and gate / up as five small GEMMs. Here the cache is
    pre-allocated and written in place, q / k / v and gate / up are two fused GEMMs, and the
    attention of the one query is SDPA over the filled slots (grouped-query: no repeated K / V;
    against two batched matmuls with an fp32 softmax, measured per layer in bf16 on 2 cores: 240
    rows x 250 slots 11.7 -> 4.1 ms, 3 rows 0.26 -> 0.09 ms, and closer to a float64 reference,
    mean error 1.7e-4 vs 3.3e-4). The model's own q/k/v and gate/up weights become VIEWS into the fused ones,
    so refreshing the model's parameters refreshes the engine; on CPU the GEMMs read a copy of the
    weights packed for oneDNN, re-packed at every refresh (`repack`). Used only for
    the bf16 sampling copy (`sampling_model`): fp32 decoding stays on HF's forward, token-identical
    to before. In bf16 it agrees with HF's bf16 forward on the test models token for token; on
    SmolLM2-135M both diverge from fp32 after ~40 greedy tokens on average (41 vs 45 of 96).
    `supported(lm)`: LlamaForCausalLM without biases or rope scaling (else HF's forward is used)."""

    @staticmethod
    def supported(lm: nn.Module) -> bool:
        c = lm.config
        rope = getattr(c, "rope_scaling", None) or {}
        return (type(lm).__name__ == "LlamaForCausalLM" and not getattr(c, "attention_bias", False)
                and not getattr(c, "mlp_bias", False) and rope.get("rope_type", "default") == "default")

    def __init__(self, lm: nn.Module):
        c, m = lm.config, lm.model
        self.H, self.Hkv = c.num_attention_heads, c.num_key_value_heads
        self.D = getattr(c, "head_dim", None) or c.hidden_size // self.H
        self.eps, self.layers = c.rms_norm_eps, []
        with torch.no_grad():
            for layer in m.layers:
                a, f = layer.self_attn, layer.mlp
                qkv = torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight])
                gu = torch.cat([f.gate_proj.weight, f.up_proj.weight])
                for mod, w in zip((a.q_proj, a.k_proj, a.v_proj), qkv.split([a.q_proj.weight.shape[0],
                                                                            a.k_proj.weight.shape[0],
                                                                            a.v_proj.weight.shape[0]])):
                    mod.weight.data = w  # a view into the fused weight
                f.gate_proj.weight.data, f.up_proj.weight.data = gu.chunk(2)
                self.layers.append((layer.input_layernorm.weight, qkv, a.o_proj.weight,
                                    layer.post_attention_layernorm.weight, gu, f.down_proj.weight))
        self.norm, self.embed, self.head = m.norm.weight, m.embed_tokens.weight, lm.lm_head.weight
        self.inv_freq = m.rotary_emb.inv_freq.float()
        self.rope_scale = getattr(m.rotary_emb, "attention_scaling", 1.0)
        self.packed: dict[int, torch.Tensor] = {}
        self.repack()

    def repack(self) -> None:
        """Re-pack the GEMM weights for oneDNN (CPU, bf16) after the model's weights changed.

        Why: a bf16 `x @ w.t()` on CPU re-orders the whole weight into oneDNN's blocked layout at
        every call, which at decode's few rows costs more than the product (SmolLM2's head at 64
        rows: 15.2 -> 9.9 ms; at 1 row 5.3 -> 1.5 ms, measured). Packing once per rollout gives the
        same products bit for bit (tested) for one more bf16 copy of the GEMM weights, re-packed at
        every refresh (57-102 ms for SmolLM2-135M). Off on GPU, in fp32, on CPUs without native bf16
        and where torch lacks the (private) oneDNN ops: the plain product is used there."""
        self.packed = {}
        ws = [w for layer in self.layers for w in (layer[1], layer[2], layer[4], layer[5])] + [self.head]
        if not (PACK_WEIGHTS and ws[0].device.type == "cpu" and ws[0].dtype == torch.bfloat16
                and C.cpu_has_native_bf16() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")):
            return
        try:
            self.packed = {id(w): torch.ops.mkldnn._reorder_linear_weight(w.detach(), 64) for w in ws}
            probe = torch.linspace(-1, 1, 2 * ws[0].shape[1]).view(2, -1).to(ws[0].dtype)  # no RNG drawn
            if not torch.equal(self._mm(probe, ws[0]), probe @ ws[0].t()):  # a build whose products differ
                self.packed = {}
        except RuntimeError:  # a CPU or build without oneDNN bf16 GEMMs: keep the plain product
            self.packed = {}

    def _mm(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """x @ w.t(), through w's packed copy when there is one."""
        wp = self.packed.get(id(w))
        if wp is None:
            return x @ w.t()
        return torch.ops.mkldnn._linear_pointwise(x, wp, None, "none", [], "")

    def _rms(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:  # HF's LlamaRMSNorm
        xf = x.float()
        return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)

    def cache_from(self, past: list, P: int, total: int) -> list:
        """Pre-allocated keys and values [B, Hkv, total, D] per layer, the prefill's P slots copied
        in (past: [(K, V) per layer], each [B, Hkv, P, D], as `prefill` returns them)."""
        out = []
        for keys, values in past:
            B = keys.shape[0]
            K, V = keys.new_zeros(B, self.Hkv, total, self.D), keys.new_zeros(B, self.Hkv, total, self.D)
            K[:, :, :P], V[:, :, :P] = keys, values
            out.append((K, V))
        return out

    @torch.no_grad()
    def __call__(self, ids: torch.Tensor, pos: torch.Tensor, cache: list, slot: int, bias: torch.Tensor):
        """ids, pos: [B] the new tokens and their positions; writes slot `slot` of every layer's
        cache; bias [B, S] 0 on real slots, -inf on left padding. Returns fp32 logits [B, V]."""
        B, H, Hkv, D = ids.shape[0], self.H, self.Hkv, self.D
        h = self.embed[ids]
        freqs = pos.float()[:, None] * self.inv_freq[None]
        emb = torch.cat([freqs, freqs], -1)
        cos, sin = ((emb.cos() * self.rope_scale).to(h.dtype)[:, None], (emb.sin() * self.rope_scale).to(h.dtype)[:, None])

        def rope(x):  # [B, n, D]
            return x * cos + torch.cat([-x[..., D // 2:], x[..., :D // 2]], -1) * sin
        t = slot + 1
        b = bias[:, None, None, :t].to(h.dtype)
        for (w_in, w_qkv, w_o, w_post, w_gu, w_down), (K, V) in zip(self.layers, cache):
            qkv = self._mm(self._rms(h, w_in), w_qkv)
            q = rope(qkv[:, :H * D].view(B, H, D))
            K[:, :, slot] = rope(qkv[:, H * D:(H + Hkv) * D].view(B, Hkv, D))
            V[:, :, slot] = qkv[:, (H + Hkv) * D:].view(B, Hkv, D)
            a = F.scaled_dot_product_attention(q[:, :, None], K[:, :, :t], V[:, :, :t], attn_mask=b, enable_gqa=True)
            h = h + self._mm(a.reshape(B, H * D), w_o)
            g, u = self._mm(self._rms(h, w_post), w_gu).chunk(2, -1)
            h = h + self._mm(F.silu(g) * u, w_down)
        return self._mm(self._rms(h, self.norm), self.head).float()


_ENGINES: "weakref.WeakKeyDictionary[nn.Module, LlamaDecodeStep]" = weakref.WeakKeyDictionary()
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
    and what --tis_cap corrects. A model whose weights are already in `dtype` (stage 3's frozen
    teacher) is sampled from directly, with the decode step, and never copied."""
    if dtype == torch.float32 or C.is_sharded(model):
        with C.fwd_context(model, d, dtype):
            yield model
        return
    lm = M.hf_model(model)
    if next(lm.parameters()).dtype == dtype:  # already held in the compute dtype (a frozen teacher): no copy
        if lm not in _ENGINES and LlamaDecodeStep.supported(lm):
            _ENGINES[lm] = LlamaDecodeStep(lm)
        yield lm
        return
    low = _COPIES.get(lm)
    with torch.no_grad():
        if low is None or next(low.parameters()).dtype != dtype:
            low = copy.deepcopy(lm).to(dtype).eval()
            for b_low, b in zip(low.buffers(), lm.buffers()):
                b_low.data = b.data.clone()  # rotary inv_freq etc.: full precision
            _COPIES[lm] = low
            if LlamaDecodeStep.supported(low):
                _ENGINES[low] = LlamaDecodeStep(low)
        else:
            for p_low, p in zip(low.parameters(), lm.parameters()):
                p_low.copy_(p)
            if low in _ENGINES:
                _ENGINES[low].repack()
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
