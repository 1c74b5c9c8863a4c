"""
Stage 3: dual-level preference distillation, large teacher -> small student (03_distill.py).

A frozen teacher (default: stage 2's output) teaches a smaller student (default: the teacher with
15 of its 30 decoder layers kept, the 15 that change its hidden states most) at two levels at once:
  token level     the student matches the teacher's next-token distribution at every response
                  token (a divergence between two [V] distributions per position);
  sequence level  the student learns the teacher's whole responses (sequence-level KD) and the
                  teacher's preferences between responses (DPO on teacher-ranked pairs).
Total loss of a step:  L = alpha * L_token + gamma * (seqkd_weight * L_seqkd + dpo_weight * L_dpo).

Papers
  Knowledge distillation, soft targets, the T^2 factor: Hinton et al. 2015, arXiv:1503.02531
  Sequence-level KD (train on the teacher's outputs): Kim & Rush 2016, arXiv:1606.07947
  Reverse KL for generative students: MiniLLM, Gu et al. 2024, arXiv:2306.08543
  On-policy distillation, generalised JSD, the lmbda mixture: GKD, Agarwal et al. 2024, arXiv:2306.13649
  Skew KL: DistiLLM, Ko et al. 2024, arXiv:2402.03898
  DPO: Rafailov et al. 2023, arXiv:2305.18290
  Layer-dropped students: DistilBERT arXiv:1910.01108 (every other layer), Minitron arXiv:2407.14679,
  which layers: ShortGPT's Block Influence, Men et al. 2024, arXiv:2403.03853; the angular distance
  of a block, Gromov et al. 2024, arXiv:2403.17887

One optimizer step (mirrored by `# step N` comments in `train_step`)
  1. the step's prompts from the shuffled stream (C.epoch_stream_indices: exact resume); a seeded
     draw decides on-policy (probability --lmbda: fresh student samples from the shared sampler,
     --steps_per_generation steps' worth per sampler call)
     or off-policy (the teacher's cached responses, or the dataset's with --offpolicy dataset);
  2. teacher targets at every response token: top-k log-probs (+ a tail bucket) from the disk
     cache (--teacher_cache) or a live teacher forward on the same packed rows;
  3. the step's preference pairs (built once at the start, reference log-probs included);
  4. every micro-batch of every kind on this rank: token-level divergence / N_kd, seq-KD CE / N_ce,
     DPO / N_pairs, where each N counts the WHOLE step over all ranks (1 process x accumulation k
     == k processes, PITFALLS #1); FSDP2 sums gradients, synchronised on the last micro-batch;
  5. clip, AdamW (warmup + cosine); log every term separately.

Token-level divergences (pure functions below; p_T teacher, p_S student, both at temperature T)
  fkl      KL(p_T || p_S)                      mode-covering (Hinton)
  rkl      KL(p_S || p_T)                      mode-seeking (MiniLLM)
  jsd      beta KL(p_T||M) + (1-beta) KL(p_S||M), M = beta p_T + (1-beta) p_S (GKD); --jsd_beta 0 /
           1 are defined as fkl / rkl, the limits of JSD(beta)/beta and JSD(beta)/(1-beta)
  skew_fkl KL(p_T || a p_T + (1-a) p_S), skew_rkl KL(p_S || a p_S + (1-a) p_T) (DistiLLM, --skew_alpha)
  tvd      1/2 sum |p_T - p_S|
  The token-level term is multiplied by T^2 (Hinton): the gradient of a divergence between
  softened distributions scales as 1/T^2, so without the factor raising T would quietly shrink the
  KD term against the sequence-level terms. At T = 1 (the default) the factor is 1.
  Top-k (--top_k k): the teacher's k most likely tokens; with --tail a (k+1)-th bucket holds the
  rest of the mass (1 - sum of the k) on both sides, else both distributions are renormalised over
  the k. With k >= V the support is the whole vocabulary and the loss equals the full one (tested).
  Memory: the student's logits are projected from its hidden states chunk by chunk over positions
  (--chunk_size rows of [V] at a time, each chunk recomputed in backward), so no [B, T, V] tensor of
  the student ever exists; the teacher's targets are [N, k+1] (top-k) or, with --top_k 0, one
  [N, V] fp32 tensor over the N response positions (bench/distill_memory.py measures both).

Sequence level
  seq-KD   the teacher answers every training prompt once (greedy; cached in
           out_dir/teacher_responses.jsonl with the teacher's id) and the student trains on those
           responses with masked CE (the same rows also carry the off-policy token-level targets);
  DPO      for --pref_prompts prompts: --pref_samples student samples (+ the teacher's response),
           ranked by the teacher's judgment (--pref_scorer): the verifier where the task is
           verifiable (math answer, code tests), else the teacher's length-normalised
           log-likelihood; chosen = best, rejected = worst, ties skipped and counted. Reference =
           the student at the start of the stage: its log-probs are computed once, with the pairs
           (out_dir/pairs.jsonl), so no reference copy is kept. Loss: dpo_loss.

Deliberate simplifications (read before trusting a number)
  * Pairs are built once from the starting student (offline DPO), not re-sampled during training.
  * On-policy samples are drawn per rank with a (seed, step, rank) generator: they depend on the
    world size (off-policy steps and DPO are world-size invariant, tested).
  * Narrowing the MLP (--student_intermediate) keeps the channels with the largest weight norms
    (|gate_i| |up_i| |down_:,i|), a cheap magnitude criterion (Minitron ranks by activations).
  * The teacher is held in the compute dtype (frozen: no master weights needed); its top-k cache
    is tied to the teacher's weights, the top-k settings and the exact token ids (checked on load).

Run (from the repo root)
  python 03_distill.py                                    # teacher: stage 2's output (else embedded)
  python 03_distill.py --teacher runs/02_overall_sft/final --student_layers 15 --divergence jsd
  python 03_distill.py --gamma 0                          # token level only (the ablation)
  python 03_distill.py --lmbda 0.5 --divergence rkl        # half the batches on-policy (GKD)
  python 03_distill.py --top_k 64 --teacher_cache true     # teacher outputs computed once, on disk
  python 03_distill.py --teacher tiny --max_steps 4 --eval_limit 2   # seconds
  OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 03_distill.py --device cpu   # FSDP2, gloo
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import common as C
import models as M
import sampler as S
import sandbox
import verify as V

STAGE2_OUT = "runs/02_overall_sft/final"


# ----------------------------------------------------------------------------------------------
# Config


@dataclass
class Config:
    # teacher / student
    teacher: str = C.arg("auto", "teacher: HF dir, 'smollm2-135m-instruct', 'tiny' (tests); auto = "
                                 f"{STAGE2_OUT} if it exists, else the embedded SmolLM2-135M")
    student: str = C.arg("", "student: an HF dir with the teacher's vocabulary; '' = built from the teacher")
    student_layers: str = C.arg("15", "student built from the teacher: N of its layers (which ones: --layer_choice) "
                                      "or a list 0,2,4 of teacher layer indices")
    layer_choice: str = C.arg("influence", "which N layers: even (evenly spaced, first and last kept) | block (drop "
                                           "the contiguous block that changes the hidden state least) | influence "
                                           "(drop the layers that change it least) | ppl (drop the layers whose "
                                           "removal raises the references' NLL least); measured: README")
    layer_calib: int = C.arg(16, "block / influence / ppl: training references per prompt source the teacher is "
                                 "measured on")
    student_intermediate: int = C.arg(0, "student MLP width (0 = the teacher's); narrower keeps the largest channels")
    out_dir: str = C.arg("runs/03_distill", "output dir: metrics.jsonl, eval_summary.json, caches, ckpt-*, final/")
    seed: int = C.arg(0, "seed of the data stream, the on-policy draws and the samples")
    device: str = C.arg("auto", "auto | cpu | cuda")
    precision: str = C.arg("auto", "auto | bf16 | fp32 (auto: bf16 only where the hardware has it)")
    # data
    prompts: list[str] = C.arg(["math=data/math_train.jsonl", "code=data/code_train.jsonl", "chat=data/chat_train.jsonl"],
                               "training prompt sources name=path ({question,solution,answer} | {prompt,solution,tests} | {messages})")
    prompt_limit: int = C.arg(64, "prompts used per source (first N; 0 = all)")
    max_prompt_len: int = C.arg(256, "prompts longer than this (tokens) are skipped and counted")
    max_len: int = C.arg(512, "tokens per packed training row")
    max_new_tokens: int = C.arg(128, "new tokens of teacher responses, student samples and eval answers")
    # token level
    alpha: float = C.arg(1.0, "weight of the token-level term (0 = off)")
    divergence: str = C.arg("fkl", "fkl | rkl | jsd | skew_fkl | skew_rkl | tvd (see the module docstring)")
    jsd_beta: float = C.arg(0.5, "jsd: mixture weight beta of the teacher (0 = fkl, 1 = rkl)")
    skew_alpha: float = C.arg(0.1, "skew_fkl / skew_rkl: the skew a (0 = plain KL)")
    kd_temperature: float = C.arg(1.0, "temperature of both distributions (the term is scaled by T^2)")
    top_k: int = C.arg(0, "teacher support: its top-k tokens (0 = the whole vocabulary)")
    tail: bool = C.arg(True, "with top_k: a (k+1)-th bucket for the remaining mass (else renormalise over the k)")
    teacher_cache: bool = C.arg(False, "compute the teacher's top-k targets of the off-policy rows once, keep them "
                                       "in out_dir/teacher_topk.pt (needs --top_k > 0)")
    chunk_size: int = C.arg(512, "positions per projected [chunk, V] block (memory)")
    lmbda: float = C.arg(0.0, "probability that a step is on-policy (fresh student samples; GKD's lambda)")
    steps_per_generation: int = C.arg(1, "on-policy samples of this many steps drawn in one sampler call, from "
                                         "the student of the first (1 = strictly on-policy; k > 1: k x the rows "
                                         "per call, k x fewer calls, samples up to k - 1 updates old)")
    offpolicy: str = C.arg("teacher", "off-policy sequences: teacher (its cached responses) | dataset (references)")
    sample_temperature: float = C.arg(1.0, "temperature of on-policy and preference samples")
    # sequence level
    gamma: float = C.arg(1.0, "weight of the sequence-level terms (0 = off)")
    seqkd_weight: float = C.arg(1.0, "seq-KD: CE on the teacher's responses, inside gamma")
    dpo_weight: float = C.arg(1.0, "DPO on teacher-ranked pairs, inside gamma")
    dpo_beta: float = C.arg(0.1, "DPO beta")
    pref_prompts: int = C.arg(48, "prompts to build preference pairs from (0 = no DPO)")
    pref_samples: int = C.arg(4, "student samples per preference prompt")
    pref_include_teacher: bool = C.arg(True, "the teacher's response is a candidate too")
    pref_scorer: str = C.arg("auto", "verifier | teacher_logp | auto (verifier where verifiable, else teacher_logp)")
    pairs_per_step: int = C.arg(4, "preference pairs per optimizer step")
    # optimisation
    batch_size: int = C.arg(8, "prompts per optimizer step (global)")
    micro_batch_size: int = C.arg(2, "rows (pairs for DPO) per forward per rank")
    lr: float = C.arg(3e-4, "peak learning rate")
    min_lr_ratio: float = C.arg(0.1, "final lr = min_lr_ratio * lr (cosine)")
    warmup_steps: int = C.arg(2, "linear warmup steps")
    weight_decay: float = C.arg(0.0, "AdamW weight decay (not on norms / biases)")
    max_grad_norm: float = C.arg(1.0, "gradient clipping (global L2 norm)")
    max_steps: int = C.arg(24, "optimizer steps")
    activation_checkpointing: bool = C.arg(False, "recompute the student's activations in backward")
    # eval
    math_test: str = C.arg("data/math_test.jsonl", "held-out math ({question, answer}); '' = skip")
    code_test: str = C.arg("data/code_test.jsonl", "held-out code ({prompt, tests}); '' = skip")
    kl_data: list[str] = C.arg(["data/math_test.jsonl", "data/chat_test.jsonl"], "held-out sequences for KL(teacher || student)")
    eval_limit: int = C.arg(40, "held-out math questions (first N)")
    code_eval_limit: int = C.arg(8, "held-out code problems (first N)")
    kl_limit: int = C.arg(16, "held-out KL sequences per file")
    eval_batch_size: int = C.arg(48, "prompts per eval generate batch")
    eval_every: int = C.arg(0, "held-out KL every N steps (0 = only at start and end)")
    speed_batch: int = C.arg(32, "prompts in the generation speed measurement (student vs teacher)")
    speed_tokens: int = C.arg(32, "new tokens per prompt in the speed measurement (no EOS stop)")
    speed_repeats: int = C.arg(5, "timed generate calls of each model, student and teacher alternated; the "
                                  "medians are reported (one call varied by up to a third here)")
    verifier_timeout_s: float = C.arg(20.0, "time limit of one batch of math gradings")
    code_timeout_s: float = C.arg(5.0, "time limit of one sandboxed code run")
    code_workers: int = C.arg(0, "programs graded at once (0 = the number of cores, at most 8)")
    unsafe_code_exec: bool = C.arg(False, "run model-written code WITHOUT the bubblewrap sandbox (warned)")
    # checkpoints / logging
    save_every: int = C.arg(0, "checkpoint every N steps (0 = only at the end); resume from the latest")
    resume: bool = C.arg(True, "resume from the latest checkpoint in out_dir")
    stop_after: int = C.arg(0, "stop after this many steps once the checkpoint there is written, as if killed (tests)")
    wandb_project: str = C.arg("", "wandb project (offline unless WANDB_MODE says otherwise); '' = off")


DIVERGENCE_NAMES = ("fkl", "rkl", "jsd", "skew_fkl", "skew_rkl", "tvd")
LOG_FLOOR = -1e4  # log-probs are clamped here, so 0 * log 0 = 0 stays finite in forward and backward


# ----------------------------------------------------------------------------------------------
# Token-level divergences: pure functions of two log-prob tensors over the same support.
# s_logp, t_logp: [N, K] log-probabilities (each row sums to 1 in probability), K = V or k(+1).
# Each returns [N]: one divergence per position; the loss is their masked sum / N_kd.


def _kl(p_logp: torch.Tensor, q_logp: torch.Tensor) -> torch.Tensor:
    """KL(p || q) = sum_v p_v (log p_v - log q_v), [N, K] -> [N]; p_v = 0 terms are 0."""
    p_logp, q_logp = p_logp.clamp_min(LOG_FLOOR), q_logp.clamp_min(LOG_FLOOR)
    return (p_logp.exp() * (p_logp - q_logp)).sum(-1)


def _mix(a_logp: torch.Tensor, b_logp: torch.Tensor, w: float) -> torch.Tensor:
    """log(w p_a + (1 - w) p_b), computed in log space; 0 < w < 1."""
    return torch.logaddexp(a_logp + math.log(w), b_logp + math.log1p(-w))


def forward_kl(s_logp: torch.Tensor, t_logp: torch.Tensor) -> torch.Tensor:
    """KL(p_T || p_S) (Hinton et al. 2015): mode-covering; the student pays where the teacher has
    mass. Gradient w.r.t. the student logits z: p_S - p_T (at T = 1)."""
    return _kl(t_logp, s_logp)


def reverse_kl(s_logp: torch.Tensor, t_logp: torch.Tensor) -> torch.Tensor:
    """KL(p_S || p_T) (MiniLLM, arXiv:2306.08543): mode-seeking; the student pays where IT puts
    mass the teacher does not, so a small student concentrates on the teacher's main modes."""
    return _kl(s_logp, t_logp)


def generalized_jsd(s_logp: torch.Tensor, t_logp: torch.Tensor, beta: float) -> torch.Tensor:
    """GKD's generalised Jensen-Shannon divergence (arXiv:2306.13649, Eq. 3):

        JSD(beta) = beta KL(p_T || M) + (1 - beta) KL(p_S || M),   M = beta p_T + (1 - beta) p_S

    bounded by log 2 ... 0 and symmetric at beta = 0.5. JSD(beta) itself goes to 0 at both ends;
    JSD(beta) / beta -> KL(p_T || p_S) as beta -> 0 and JSD(beta) / (1 - beta) -> KL(p_S || p_T)
    as beta -> 1 (tested), so beta = 0 and beta = 1 are DEFINED here as forward and reverse KL
    (as in TRL's GKDTrainer)."""
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"jsd beta must be in [0, 1], got {beta}")
    if beta == 0.0:
        return forward_kl(s_logp, t_logp)
    if beta == 1.0:
        return reverse_kl(s_logp, t_logp)
    m_logp = _mix(t_logp, s_logp, beta)
    return beta * _kl(t_logp, m_logp) + (1 - beta) * _kl(s_logp, m_logp)


def skew_forward_kl(s_logp: torch.Tensor, t_logp: torch.Tensor, alpha: float) -> torch.Tensor:
    """DistiLLM's skew KL (arXiv:2402.03898, Eq. 4): KL(p_T || alpha p_T + (1 - alpha) p_S).
    alpha = 0 is forward KL; alpha -> 1 goes to 0. Mixing the teacher into the student's side keeps
    the log finite where the student has ~0 mass (the gradient stays bounded)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"skew alpha must be in [0, 1], got {alpha}")
    if alpha == 0.0:
        return forward_kl(s_logp, t_logp)
    if alpha == 1.0:
        return torch.zeros(s_logp.shape[:-1], dtype=s_logp.dtype, device=s_logp.device)
    return _kl(t_logp, _mix(t_logp, s_logp, alpha))


def skew_reverse_kl(s_logp: torch.Tensor, t_logp: torch.Tensor, alpha: float) -> torch.Tensor:
    """DistiLLM's skew reverse KL: KL(p_S || alpha p_S + (1 - alpha) p_T); alpha = 0: reverse KL."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"skew alpha must be in [0, 1], got {alpha}")
    if alpha == 0.0:
        return reverse_kl(s_logp, t_logp)
    if alpha == 1.0:
        return torch.zeros(s_logp.shape[:-1], dtype=s_logp.dtype, device=s_logp.device)
    return _kl(s_logp, _mix(s_logp, t_logp, alpha))


def total_variation(s_logp: torch.Tensor, t_logp: torch.Tensor) -> torch.Tensor:
    """TVD = 1/2 sum_v |p_T - p_S| in [0, 1] (used for distillation by e.g. DistiLLM's analysis)."""
    return 0.5 * (t_logp.exp() - s_logp.exp()).abs().sum(-1)


@dataclass(frozen=True)
class KD:
    """The token-level settings a chunk needs (built from the Config once)."""
    divergence: str = "fkl"
    temperature: float = 1.0
    beta: float = 0.5   # jsd
    skew: float = 0.1   # skew_fkl / skew_rkl
    top_k: int = 0      # 0 = whole vocabulary
    tail: bool = True
    vocab: int = 0      # real vocabulary rows (len(tokenizer)); padding rows beyond are left out; 0 = all


def token_divergence(s_logp: torch.Tensor, t_logp: torch.Tensor, kd: KD) -> torch.Tensor:
    """The divergence kd.divergence, [N, K] x [N, K] -> [N]."""
    if kd.divergence == "fkl":
        return forward_kl(s_logp, t_logp)
    if kd.divergence == "rkl":
        return reverse_kl(s_logp, t_logp)
    if kd.divergence == "jsd":
        return generalized_jsd(s_logp, t_logp, kd.beta)
    if kd.divergence == "skew_fkl":
        return skew_forward_kl(s_logp, t_logp, kd.skew)
    if kd.divergence == "skew_rkl":
        return skew_reverse_kl(s_logp, t_logp, kd.skew)
    if kd.divergence == "tvd":
        return total_variation(s_logp, t_logp)
    raise ValueError(f"--divergence must be one of {DIVERGENCE_NAMES}, got {kd.divergence!r}")


def divergence_grad(s_logp: torch.Tensor, t_logp: torch.Tensor, kd: KD) -> torch.Tensor:
    """d token_divergence(s_logp, t_logp, kd) / d s_logp, [N, K] (each entry of s_logp taken as a
    free variable, as autograd takes it), written out so that the student's chunk needs no autograd
    graph (_ChunkDivergence). With P = e^s, Q = e^t (s, t clamped at LOG_FLOOR, as in _kl):

      fkl       -Q                                     (0 where s is at the floor, as the clamp does)
      rkl       P (s - t + 1)
      jsd       (1 - beta) P (s - m),       m = log M, M = beta Q + (1 - beta) P
                (the terms through m cancel: beta Q + (1 - beta) P = M)
      skew_fkl  -(1 - a) Q P / M,           M = a Q + (1 - a) P
      skew_rkl  P (s - m + 1 - a P / M),    M = a P + (1 - a) Q
      tvd       -1/2 sign(Q - P) P

    jsd at beta 0 / 1 and the skews at a = 0 are fkl / rkl, as in the forward functions; the skews
    at a = 1 are 0. Tested against autograd through token_divergence in float64."""
    s, t = s_logp.clamp_min(LOG_FLOOR), t_logp.clamp_min(LOG_FLOOR)
    kind, beta, a = kd.divergence, kd.beta, kd.skew
    if kind == "jsd" and beta in (0.0, 1.0):
        kind = "fkl" if beta == 0.0 else "rkl"
    if kind in ("skew_fkl", "skew_rkl") and a in (0.0, 1.0):
        if a == 1.0:
            return torch.zeros_like(s)
        kind = kind[5:]
    if kind == "fkl":
        return -t.exp().where(s_logp > LOG_FLOOR, 0.0)
    if kind == "rkl":
        return s.exp() * (s - t + 1)
    if kind == "jsd":
        return (1 - beta) * s.exp() * (s - _mix(t, s, beta).clamp_min(LOG_FLOOR))
    if kind == "skew_fkl":
        return -(1 - a) * (t + s - _mix(t, s, a)).exp()
    if kind == "skew_rkl":
        m = _mix(s, t, a)
        return s.exp() * (s - m.clamp_min(LOG_FLOOR) + 1 - a * (s - m).exp())
    if kind == "tvd":
        return -0.5 * (t.exp() - s.exp()).sign() * s.exp()
    raise ValueError(f"--divergence must be one of {DIVERGENCE_NAMES}, got {kd.divergence!r}")


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - e^x) for x <= 0 (the log-mass outside a set whose log-mass is x); x = 0 gives
    log(1e-30), not -inf, so the divergences stay finite."""
    return torch.log(-torch.expm1(x.clamp(max=-1e-30)))


def on_support(logp: torch.Tensor, idx: torch.Tensor, tail: bool) -> torch.Tensor:
    """A full distribution [N, V] (log-probs) restricted to the support idx [N, k]: with tail,
    [N, k+1] = the k log-probs and log(1 - their mass); without, the k renormalised."""
    sub = logp.gather(-1, idx)
    if not tail:
        return sub.log_softmax(-1)
    return torch.cat([sub, log1mexp(sub.logsumexp(-1, keepdim=True))], -1)


def teacher_topk(t_logp: torch.Tensor, k: int, tail: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The teacher's targets: (vals [N, K'], idx [N, k] or None). k <= 0 or k >= V: the full
    distribution (idx None); else its top-k, with a tail bucket when `tail` (K' = k + 1)."""
    V = t_logp.shape[-1]
    if k <= 0 or k >= V:
        return t_logp, None
    idx = t_logp.topk(k, dim=-1).indices
    return on_support(t_logp, idx, tail), idx


def token_level_loss(div: torch.Tensor, n_tokens: int, temperature: float) -> torch.Tensor:
    """L_token = T^2 / N_kd * sum_positions div (div: [n] per-position divergences of this
    micro-batch; N_kd: response tokens of the whole step over all ranks)."""
    return temperature ** 2 * div.sum() / max(n_tokens, 1)


def dpo_loss(logp_c: torch.Tensor, logp_r: torch.Tensor, ref_c: torch.Tensor, ref_r: torch.Tensor,
             beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """DPO (Rafailov et al. 2023, arXiv:2305.18290, Eq. 7), per pair:

        m = beta * [(log pi(y_c|x) - log pi_ref(y_c|x)) - (log pi(y_r|x) - log pi_ref(y_r|x))]
        L = -log sigmoid(m)

    logp_c, logp_r: [P] summed response log-probs of chosen / rejected under the student;
    ref_c, ref_r: [P] the same under the frozen reference. Returns (loss [P], margin m [P],
    detached). dL/dlogp_c = -beta sigmoid(-m) < 0: descent raises the chosen response."""
    margin = beta * ((logp_c - ref_c) - (logp_r - ref_r))
    return -F.logsigmoid(margin), margin.detach()


# ----------------------------------------------------------------------------------------------
# Models: the student (per-token log-probs + divergence, chunked), the frozen teacher, building a
# layer-dropped student, checking that teacher and student speak the same tokens


def _student_support(z: torch.Tensor, t_idx, tail: bool, kd: KD, logp=None) -> tuple[torch.Tensor, torch.Tensor]:
    """z [n, V] fp32 student logits -> (s_full [n, V_real] = log_softmax(z_real / T), s [n, K'] the
    same on the teacher's support: s_full itself, or on_support(s_full, t_idx, tail)). logp: the
    log_softmax(z) already computed, reused when it is s_full (T = 1, no padding rows)."""
    real = z[:, :kd.vocab] if 0 < kd.vocab < z.shape[-1] else z  # PITFALLS #17: no padding rows
    same = logp is not None and real is z and kd.temperature in (0.0, 1.0)
    s_full = logp if same else M.process_logits(real, kd.temperature).log_softmax(-1)
    return s_full, (s_full if t_idx is None else on_support(s_full, t_idx, tail))


class _ChunkDivergence(torch.autograd.Function):
    """The student's side for ONE chunk of positions, with a hand-written backward.

    h [n, H], w [V, H] in the compute dtype, weight: the [V, H] parameter (its gradient is returned
    in its own dtype, so the chunks' gradients add up in fp32), y [n] labels, teacher targets t_vals
    [n, K'] and t_idx [n, k] (or None: the whole vocabulary).
    Forward (no graph):  z = h w^T (fp32); logp = log_softmax(z)_y (T = 1);
                         s = log_softmax(z_real / T) on the teacher's support; div = token_divergence.
    Backward, upstream g_lp, g_div [n]; z and s recomputed once:
      g_s = g_div divergence_grad(s, t)                              [n, K']
      top-k, back to [n, V_real]: the tail bucket tau = log(1 - sum_j e^u_j) of the k gathered
        log-probs u has d tau / d u = -e^(u - tau), so g_u = g_s[:k] - g_s[k] e^(u - tau) (0 where
        log1mexp's clamp held tau, as autograd has it); without the tail, log_softmax's backward
        over the k; then scattered to the k columns
      temperature: dz_real = (g_s - p_T sum g_s) / T, p_T = e^s_full    (log_softmax's backward)
      labels: dz += g_lp (onehot(y) - p), p = softmax(z) (= p_T at T = 1: one pass for both)
      dh = dz w,  dW = dz^T h.
    Kept for the backward: only the inputs (PITFALLS #11: no [n, V] block outlives its chunk), as
    in models._ChunkLogProbs. The version before this one ran autograd through the divergence under
    activation checkpointing: every elementwise pass three times (forward, recompute, backward).
    """

    @staticmethod
    def forward(ctx, h, w, weight, y, t_vals, t_idx, kd: KD):
        z = h @ w.t()
        z = z.to(torch.promote_types(z.dtype, torch.float32))  # fp32 (float64 stays, for gradcheck)
        logp = z.log_softmax(-1)
        label_logp = logp.gather(-1, y[:, None]).squeeze(-1)
        tail = t_idx is not None and t_vals.shape[-1] > t_idx.shape[-1]
        _, s = _student_support(z, t_idx, tail, kd, logp)
        ctx.save_for_backward(h, w, y, t_vals, t_idx)
        ctx.kd, ctx.tail, ctx.weight_dtype = kd, tail, weight.dtype
        return label_logp, token_divergence(s, t_vals, kd)

    @staticmethod
    def backward(ctx, g_lp, g_div):
        h, w, y, t_vals, t_idx = ctx.saved_tensors
        kd, tail = ctx.kd, ctx.tail
        z = h @ w.t()
        z = z.to(torch.promote_types(z.dtype, torch.float32))
        s_full, s = _student_support(z, t_idx, tail, kd)
        T = kd.temperature if kd.temperature not in (0.0, 1.0) else 1.0
        p = None if T == 1.0 and s_full.shape[-1] == z.shape[-1] else z.softmax(-1)  # None: p is e^s_full
        del z  # one [n, V] block fewer held from here on (PITFALLS #11)
        g_s = divergence_grad(s, t_vals, kd).mul_(g_div[:, None])
        if t_idx is not None:  # back through on_support to the full vocabulary
            k = t_idx.shape[-1]
            u = s[:, :k]
            if tail:
                live = u.logsumexp(-1, keepdim=True) < -1e-30  # log1mexp's clamp: no gradient where it held
                g_u = g_s[:, :k] - g_s[:, k:] * (u - s[:, k:]).exp() * live
            else:
                g_u = g_s - u.exp() * g_s.sum(-1, keepdim=True)
            g_s = torch.zeros_like(s_full).scatter_(-1, t_idx, g_u)
        p_t = s_full.exp_()  # p_S at T over the real rows (in place: s_full is not needed again)
        if p is None:  # p_t is softmax(z) itself: one pass for both terms
            dz = g_s.sub_(p_t.mul_(g_s.sum(-1, keepdim=True) + g_lp[:, None]))
        else:
            dz = p.mul_(-g_lp[:, None])
            dz[:, :p_t.shape[-1]] += g_s.sub_(p_t.mul_(g_s.sum(-1, keepdim=True))).div_(T)
        dz = dz.scatter_add_(-1, y[:, None], g_lp[:, None]).to(w.dtype)
        dh = dz @ w if ctx.needs_input_grad[0] else None
        dweight = (dz.t() @ h).to(ctx.weight_dtype) if ctx.needs_input_grad[2] else None
        return dh, None, dweight, None, None, None, None


def student_chunks(h: torch.Tensor, weight: torch.Tensor, y: torch.Tensor, t_vals, t_idx, kd: KD,
                   chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The student's side over N selected positions: h [N, H] hidden states, weight [V, H], y [N]
    labels, teacher targets t_vals [N, K'] / t_idx [N, k] (or None: no divergence). Returns
    (log p_S(y) [N], divergence [N]). `chunk_size` positions at a time (_ChunkDivergence), so
    neither forward nor backward holds more than one [chunk, V] fp32 block of the student at a time.
    Under autocast the projection runs in the autocast dtype, as `h @ weight.t()` would."""
    if t_vals is None:  # no teacher targets (DPO, seq-KD rows): label log-probs only
        lp = M.label_logprobs(h, weight, y, 1.0, chunk_size)[0]
        return lp, torch.zeros_like(lp)
    if h.shape[0] == 0:
        return h.new_zeros(0, dtype=torch.float32), h.new_zeros(0, dtype=torch.float32)
    dtype, n, t_idx = M.head_dtype(h, weight), h.shape[0], None if t_idx is None else M.pad_rows(t_idx)
    h, y, t_vals = M.pad_rows(h.to(dtype)), M.pad_rows(y), M.pad_rows(t_vals)  # row counts that repeat
    w = weight.detach().to(dtype)  # the compute copy; the gradient goes to `weight`
    lps, divs = [], []
    with torch.autocast(h.device.type, enabled=False):
        for i in range(0, h.shape[0], chunk_size):
            j = slice(i, i + chunk_size)
            lp, dv = _ChunkDivergence.apply(h[j], w, weight, y[j], t_vals[j], None if t_idx is None else t_idx[j], kd)
            lps.append(lp)
            divs.append(dv)
    return torch.cat(lps)[:n], torch.cat(divs)[:n]


@torch.no_grad()
def teacher_chunks(h: torch.Tensor, weight: torch.Tensor, y: torch.Tensor, kd: KD, chunk_size: int) -> dict:
    """The teacher's side over N selected positions (h [N, H], weight [V, H], y [N]):
    {"vals" [N, K'], "idx" [N, k] or None (teacher_topk), "logp" [N] log p_T(y) at T = 1}, computed
    `chunk_size` positions at a time into preallocated outputs, so only the targets are ever held
    ([N, k+1], or one [N, V] fp32 tensor when full: no second copy from concatenating chunks)."""
    N = h.shape[0]
    V = kd.vocab if 0 < kd.vocab < weight.shape[0] else weight.shape[0]  # real rows only (PITFALLS #17)
    full = kd.top_k <= 0 or kd.top_k >= V
    vals = torch.empty(N, V if full else kd.top_k + kd.tail, dtype=torch.float32, device=h.device)
    idx = None if full else torch.empty(N, kd.top_k, dtype=torch.long, device=h.device)
    logp = torch.empty(N, dtype=torch.float32, device=h.device)
    for i in range(0, N, chunk_size):
        j = slice(i, i + chunk_size)
        logits = (M.pad_rows(h[j]) @ weight.t())[:h[j].shape[0]].float()  # a row count seen before (M.pad_rows)
        logp[j] = logits.log_softmax(-1).gather(-1, y[j, None]).squeeze(-1)
        v, ix = teacher_topk(M.process_logits(logits[:, :V], kd.temperature).log_softmax(-1), kd.top_k, kd.tail)
        vals[j] = v
        if idx is not None:
            idx[j] = ix
    return {"vals": vals, "idx": idx, "logp": logp}


def _scatter_rows(sel: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
    """[N] values at the True positions of sel [B, T-1] -> [B, T] aligned with labels (0 elsewhere,
    and at position 0, which nothing predicts)."""
    out = torch.zeros(sel.shape, dtype=flat.dtype, device=sel.device).masked_scatter(sel, flat)
    return torch.cat([out.new_zeros(sel.shape[0], 1), out], 1)


class StudentModel(M.LogProbModel):
    """The student: forward returns log p(label) per token ("logp" [B, T]) and, given teacher
    targets for the selected positions (labels[:, 1:] != IGNORE, row-major), the per-token
    divergence ("div" [B, T]). The output projection runs inside this root forward (FSDP2 gathers
    it here), chunked (student_chunks): no [B, T, V] tensor of the student ever exists."""

    def forward(self, input_ids, labels, position_ids=None, t_vals=None, t_idx=None, kd: KD = KD(),
                return_hidden: bool = False):
        out = self.lm.get_decoder()(input_ids=input_ids, position_ids=position_ids, use_cache=False)
        sel = labels[:, 1:] != C.IGNORE
        h = out.last_hidden_state[:, :-1][sel]
        if t_vals is not None and t_vals.shape[0] != h.shape[0]:
            raise ValueError(f"teacher targets for {t_vals.shape[0]} positions, student has {h.shape[0]}")
        lp, dv = student_chunks(h, self.lm.get_output_embeddings().weight, labels[:, 1:][sel], t_vals, t_idx, kd,
                                self.chunk_size)
        res = {"logp": _scatter_rows(sel, lp), "div": _scatter_rows(sel, dv)}
        if return_hidden:
            res["hidden"] = out.last_hidden_state
        return res


class TeacherModel(M.LogProbModel):
    """The frozen teacher: forward returns its targets at the selected positions (labels[:, 1:] !=
    IGNORE, row-major): {"vals" [N, K'], "idx" [N, k] or None (see teacher_topk), "logp" [B, T]
    log p_T(label) at T = 1, aligned with labels as LogProbModel's}. Computed chunk by chunk
    (teacher_chunks); never gets gradients; always in eval mode."""

    def __init__(self, lm: nn.Module, chunk_size: int = 512):
        super().__init__(lm, chunk_size)
        self.requires_grad_(False).eval()

    def train(self, mode: bool = True):  # frozen: .train() (e.g. after an eval) keeps it in eval mode
        return super().train(False)

    @torch.no_grad()
    def forward(self, input_ids, labels, position_ids=None, kd: KD = KD()):
        out = self.lm.get_decoder()(input_ids=input_ids, position_ids=position_ids, use_cache=False)
        sel = labels[:, 1:] != C.IGNORE
        t = teacher_chunks(out.last_hidden_state[:, :-1][sel], self.lm.get_output_embeddings().weight,
                           labels[:, 1:][sel], kd, self.chunk_size)
        t["logp"] = _scatter_rows(sel, t["logp"])
        return t


def frozen(lm: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Freeze a model (eval mode, no grads) and hold its weights in the compute dtype; float
    buffers (rotary inv_freq) stay fp32 so positions keep their precision."""
    bufs = {n: b.clone() for n, b in lm.named_buffers()}
    lm.requires_grad_(False).eval().to(dtype)
    for n, b in lm.named_buffers():
        if b.is_floating_point():
            b.data = bufs[n].data
    # A PyTorch trap, measured: the sampler's prefill projects hidden[:, -1:] (a non-contiguous
    # [B, 1, H] slice); for a weight WITHOUT requires_grad, matmul will not fold that into one mm
    # and runs a bmm over B expanded copies of the [V, H] head instead (6.2 s of a 17 s rollout
    # for 48 prompts on SmolLM2). A contiguous input folds again.
    lm.get_output_embeddings().register_forward_pre_hook(lambda m, args: (args[0].contiguous(), *args[1:]))
    return lm


def pick_layers(spec: str, n_layers: int) -> list[int]:
    """'15' -> 15 indices evenly spaced over 0..n-1 (first and last kept); '0,2,4' -> that list."""
    try:
        if "," in spec:
            layers = [int(x) for x in spec.split(",") if x.strip()]
        else:
            k = int(spec)
            if not 1 <= k <= n_layers:
                raise ValueError(f"--student_layers {k}: the teacher has {n_layers} layers")
            layers = [0] if k == 1 else sorted({round(i * (n_layers - 1) / (k - 1)) for i in range(k)})
    except ValueError as e:
        raise ValueError(f"--student_layers {spec!r}: {e}") from None
    if not layers or layers != sorted(set(layers)) or layers[0] < 0 or layers[-1] >= n_layers:
        raise ValueError(f"--student_layers {spec!r}: need increasing indices in 0..{n_layers - 1}")
    return layers


def block_distances(hidden: torch.Tensor, n_drop: int) -> torch.Tensor:
    """Angular distance across each block of n_drop consecutive layers (Gromov et al. 2024,
    arXiv:2403.17887, eq. 7), summed over positions:

        d_l = sum_t arccos(cos(h_l[t], h_{l+n}[t])) / pi,    l = 0 .. L-1-n

    hidden: [L+1, T, H], hidden[l] the input of layer l (hidden[L] the last layer's output).
    Dropping layers l .. l+n-1 is cheapest where d_l is smallest (0: the block does nothing to the
    direction of any position's hidden state; 0.5: it makes it orthogonal). Blocks containing the
    last layer are not candidates (its output feeds the head). Returns [L - n] (float64)."""
    L = hidden.shape[0] - 1
    h = hidden.double()
    a, b = h[:L - n_drop], h[n_drop:L]  # [L-n, T, H]: block input, block output
    cos = F.cosine_similarity(a, b, dim=-1).clamp(-1.0, 1.0)
    return (torch.arccos(cos) / math.pi).sum(-1)


def block_influence(hidden: torch.Tensor) -> torch.Tensor:
    """ShortGPT's Block Influence (Men et al. 2024, arXiv:2403.03853, eq. 1) of every layer, summed
    over positions:  BI_i = sum_t (1 - cos(h_i[t], h_{i+1}[t])).  hidden: [L+1, T, H] as in
    block_distances. The layers with the smallest BI change their input least. Returns [L] (float64)."""
    h = hidden.double()
    return (1.0 - F.cosine_similarity(h[:-1], h[1:], dim=-1)).sum(-1)


@torch.no_grad()
def skip_layer_nll(t_lm: nn.Module, ids: torch.Tensor, n_prompt: int) -> torch.Tensor:
    """Shortened LLaMA's PPL criterion (Kim et al. 2024, arXiv:2402.02834, sec. 3) on one sequence:

        nll_i = - sum_{t >= n_prompt} log p_{model without layer i}(x_t | x_<t),   i = 0 .. L-1
        nll_L = the same for the whole model

    ids: [1, T] prompt + reference; only the reference's tokens are scored. Layers 0 .. i-1 are the
    same with or without layer i, so one full forward gives every h_i (the input of layer i) and
    the run without layer i restarts from h_i at layer i+1, with the arguments (mask, rotary
    embeddings) the model passed its layers. Returns [L + 1] float64; no grad."""
    kw = {}
    hook = t_lm.model.layers[0].register_forward_pre_hook(lambda m, a, k: kw.update(k), with_kwargs=True)
    try:
        out = t_lm(ids, output_hidden_states=True, use_cache=False)
    finally:
        hook.remove()
    kw = {k: v for k, v in kw.items() if k != "hidden_states"}
    y = ids[0, n_prompt:]

    def nll(logits: torch.Tensor) -> torch.Tensor:  # logits [1, T - n_prompt, V] -> summed NLL of y
        return F.cross_entropy(logits[0].float(), y, reduction="sum").double()

    layers, L = t_lm.model.layers, t_lm.config.num_hidden_layers
    scores = []
    for i in range(L):
        h = out.hidden_states[i]  # the input of layer i (hidden_states[L] is after the final norm)
        for layer in layers[i + 1:L]:
            h = layer(h, **kw)
            h = h[0] if isinstance(h, tuple) else h
        scores.append(nll(t_lm.lm_head(t_lm.model.norm(h[:, n_prompt - 1:-1]))))  # only where y is predicted
    return torch.stack(scores + [nll(out.logits[:, n_prompt - 1:-1])]).cpu()


def choose_layers(t_lm: nn.Module, tok, cfg: Config, d, dtype=torch.float32) -> tuple[list[int], dict]:
    """--student_layers -> (teacher layer indices to keep, what decided it). A list, or --layer_choice
    even, is taken as pick_layers gives it; otherwise the teacher runs (fp32, no grad) over the first
    --layer_calib training references of every prompt source (prompt + reference through the chat
    template: training data, never the held-out sets), and n = L - N layers are dropped:
      block      the contiguous block l .. l+n-1 with the smallest mean block_distances
      influence  the n layers with the smallest mean block_influence
      ppl        the n layers whose removal (one at a time) raises the references' mean NLL least
                 (skip_layer_nll; run in the compute dtype: ~L^2/2 layer forwards per reference)
    The last layer is always kept. Rank 0's choice is used on every rank (one object gathered)."""
    n_layers = t_lm.config.num_hidden_layers
    layers = pick_layers(cfg.student_layers, n_layers)  # validates N (or the list)
    n_drop = n_layers - len(layers)
    if "," in cfg.student_layers or cfg.layer_choice == "even" or n_drop == 0:
        return layers, {"layer_choice": "list" if "," in cfg.student_layers else "even",
                        "layers_dropped": sorted(set(range(n_layers)) - set(layers))}
    block, ppl = cfg.layer_choice == "block", cfg.layer_choice == "ppl"
    tasks = load_tasks(cfg.prompts, tok, cfg.layer_calib, cfg.max_len, Counter(), "layer calibration")
    score, n_tok = 0.0, 0
    was_training = t_lm.training
    t_lm.eval()
    with torch.no_grad(), C.fwd_context(t_lm, d, dtype if ppl else torch.float32):
        for t in tasks:
            ids = text_sample(tok, t, t["reference"])["input_ids"] if t.get("reference") else t["prompt_ids"]
            ids = torch.tensor([ids[:cfg.max_len]], device=next(t_lm.parameters()).device)
            if ppl:  # only references are scored (a chat task without one adds nothing)
                if not t.get("reference") or ids.shape[1] <= len(t["prompt_ids"]):
                    continue
                score = score + skip_layer_nll(t_lm, ids, len(t["prompt_ids"]))
                n_tok += ids.shape[1] - len(t["prompt_ids"])
                continue
            # HF's hidden_states[L] is taken after the final norm: neither score uses it for a
            # layer that can be dropped (blocks end before the last layer; its BI is ignored)
            hidden = torch.stack(t_lm(ids, output_hidden_states=True).hidden_states)[:, 0]  # [L+1, T, H]
            score = score + (block_distances(hidden, n_drop) if block else block_influence(hidden)).cpu()
            n_tok += ids.shape[1]
    t_lm.train(was_training)
    if not n_tok:
        raise ValueError(f"--layer_choice {cfg.layer_choice}: no calibration tokens in {cfg.prompts}")
    score = score / n_tok  # [L - n] block distances, [L] block influences or [L + 1] NLLs, per token
    if ppl:
        score = score[:-1] - score[-1]  # [L]: how much removing each layer raises the mean NLL
    if block:
        start = int(score.argmin())
        drop = set(range(start, start + n_drop))
    else:
        drop = set(score[:-1].topk(n_drop, largest=False).indices.tolist())  # the last layer is kept
    layers = C.gather_objects([[i for i in range(n_layers) if i not in drop]], d)[0]
    return layers, {"layer_choice": cfg.layer_choice, "layer_scores": [round(float(x), 5) for x in score],
                    "layers_dropped": sorted(set(range(n_layers)) - set(layers)), "calibration_tokens": n_tok}


def make_student(teacher_lm: nn.Module, layers: list[int], intermediate: int = 0) -> nn.Module:
    """A student with the teacher's embeddings, final norm and head and a subset of its decoder
    layers (copied), optionally with a narrower MLP: the `intermediate` channels with the largest
    |gate_i| * |up_i| * |down_:,i| are kept. fp32, trainable."""
    cfg = copy.deepcopy(teacher_lm.config)
    cfg.num_hidden_layers = len(layers)
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = [cfg.layer_types[i] for i in layers]
    full = intermediate <= 0 or intermediate == cfg.intermediate_size
    if not full:
        if intermediate > cfg.intermediate_size:
            raise ValueError(f"--student_intermediate {intermediate} > the teacher's {cfg.intermediate_size}")
        cfg.intermediate_size = intermediate
    student = type(teacher_lm)(cfg)
    src = {k: v.detach().float() for k, v in teacher_lm.state_dict().items()}
    sd = {}
    for k, v in src.items():
        if ".layers." not in k:
            sd[k] = v
    for new, old in enumerate(layers):
        pre = f"model.layers.{old}."
        part = {k[len(pre):]: v for k, v in src.items() if k.startswith(pre)}
        if not full:
            g, u, dn = part["mlp.gate_proj.weight"], part["mlp.up_proj.weight"], part["mlp.down_proj.weight"]
            keep = (g.norm(dim=1) * u.norm(dim=1) * dn.norm(dim=0)).topk(intermediate).indices.sort().values
            part["mlp.gate_proj.weight"], part["mlp.up_proj.weight"] = g[keep], u[keep]
            part["mlp.down_proj.weight"] = dn[:, keep]
        sd.update({f"model.layers.{new}.{k}": v for k, v in part.items()})
    missing, unexpected = student.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and cfg.tie_word_embeddings)]
    if missing or unexpected:
        raise ValueError(f"student from teacher: missing {missing[:4]}, unexpected {unexpected[:4]}")
    return M.lean_activations(student)


def check_compatible(t_tok, s_tok, t_lm, s_lm, t_name: str, s_name: str) -> None:
    """Teacher and student must agree on the vocabulary (token for token), the special tokens and
    the chat template: anything else is an error naming both. Output layers may differ in their
    PADDING rows beyond the real vocabulary (one family, padded to different multiples): the
    divergences then compare the real rows only (KD.vocab = len(tokenizer)), PITFALLS #17."""
    who = f"teacher {t_name!r} vs student {s_name!r}"
    tv, sv = t_tok.get_vocab(), s_tok.get_vocab()
    if tv != sv:
        diff = sorted(set(tv.items()) ^ set(sv.items()), key=lambda x: x[1])[:3]
        raise ValueError(f"{who}: different vocabularies ({len(tv)} vs {len(sv)} tokens; e.g. {diff}); "
                         f"token-level distillation needs the same tokenizer")
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id", "all_special_ids"):
        if getattr(t_tok, attr) != getattr(s_tok, attr):
            raise ValueError(f"{who}: different {attr}: {getattr(t_tok, attr)} vs {getattr(s_tok, attr)}")
    if t_tok.chat_template != s_tok.chat_template:
        raise ValueError(f"{who}: different chat templates; the student would be taught a format it is "
                         f"not prompted with")
    tV, sV = t_lm.get_output_embeddings().weight.shape[0], s_lm.get_output_embeddings().weight.shape[0]
    if min(tV, sV) < len(t_tok):
        raise ValueError(f"{who}: output layers of {tV} and {sV} rows, but the tokenizer has {len(t_tok)} tokens")
    if tV != sV:  # one family, padded differently (PITFALLS #17): the divergences use the real rows only
        C.print0(f"note: {who}: output layers of {tV} and {sV} rows; the divergences use the "
                 f"{len(t_tok)} rows of the real vocabulary (KD.vocab), the padding rows are left out")


def model_id(name: str, lm: nn.Module) -> str:
    """The name and a digest of every weight: what the teacher caches are tied to."""
    h = hashlib.sha256()
    for k, v in sorted(lm.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().float().cpu().contiguous().numpy().tobytes())
    return f"{name}@{h.hexdigest()[:16]}"


def n_params(lm: nn.Module) -> int:
    return sum(p.numel() for p in lm.parameters())


# ----------------------------------------------------------------------------------------------
# Data: prompts, teacher responses (cached), samples, packing that remembers its samples


def row_task(row: dict, name: str, where: str) -> dict:
    """One JSONL row -> a task {id, domain, messages (the prompt), reference, answer?, tests?}."""
    if "messages" in row:
        msgs = row["messages"]
        last = max((i for i, m in enumerate(msgs) if m.get("role") == "assistant"), default=None)
        if last is None or not isinstance(msgs[last].get("content"), str) or last == 0:
            raise C.DataError("chat row needs a prompt and an assistant message with text content")
        return {"domain": "chat", "messages": msgs[:last], "reference": msgs[last]["content"]}
    if "question" in row:
        if "answer" not in row:
            raise C.DataError("math row needs an answer")
        return {"domain": "math", "messages": [{"role": "user", "content": row["question"]}],
                "reference": row.get("solution", ""), "answer": str(row["answer"]), "question": row["question"]}
    if "prompt" in row:
        if not row.get("tests"):
            raise C.DataError("code row needs tests")
        return {"domain": "code", "messages": [{"role": "user", "content": row["prompt"]}],
                "reference": row.get("solution", ""), "tests": row["tests"], "entry_point": row.get("entry_point")}
    raise C.DataError(f"row has none of messages / question / prompt (keys {sorted(row)[:6]})")


def load_tasks(specs: list[str], tok, limit: int, max_prompt_len: int, skipped: Counter, what: str) -> list[dict]:
    """Prompt sources name=path -> tasks with prompt ids; bad or over-long rows are printed with
    file:line and counted. No usable prompt at all is an error."""
    tasks = []
    for spec in specs:
        name, path = spec.split("=", 1) if "=" in spec else (Path(spec).stem, spec)
        p = C.resolve_path(path)
        n = 0
        for line, row in enumerate(C.read_jsonl(p), 1):
            if limit and n >= limit:
                break
            try:
                t = row_task(row, name, f"{p}:{line}")
                t["prompt_ids"] = C.chat_prompt_ids(tok, t["messages"])
            except (C.DataError, ValueError) as e:
                skipped[f"{name}_bad_row"] += 1
                C.print0(f"[{what}] skipped {p}:{line}: {e}")
                continue
            if len(t["prompt_ids"]) > max_prompt_len:
                skipped[f"{name}_prompt_too_long"] += 1
                continue
            tasks.append({"id": f"{name}:{line}", "source": name, **t})
            n += 1
    if not tasks:
        raise C.DataError(f"{what}: no usable prompts in {specs} (skipped: {dict(skipped) or 'none'})")
    return tasks


def ids_sample(prompt_ids: list[int], response_ids: list[int]) -> dict:
    """A training sample from token ids: loss on the response only (what was generated, EOS included)."""
    return {"input_ids": list(prompt_ids) + list(response_ids),
            "labels": [C.IGNORE] * len(prompt_ids) + list(response_ids)}


def text_sample(tok, task: dict, text: str) -> dict:
    """A training sample from a text response, through the chat template (EOS trained)."""
    return C.tokenize_chat(tok, task["messages"] + [{"role": "assistant", "content": text}])


def n_trained(sample: dict) -> int:
    return sum(l != C.IGNORE for l in sample["labels"][1:])


def pack_groups(samples: list[dict], max_len: int) -> tuple[list[dict], list[list[int]]]:
    """C.pack_rows plus which samples went into each row (C.pack_plan, the plan pack_rows follows),
    so per-sample teacher targets can be concatenated in row order."""
    return C.pack_rows(samples, max_len, True), C.pack_plan([len(s["input_ids"]) for s in samples], max_len, True)


def read_cache_jsonl(path: Path, header: dict) -> dict | None:
    """{id: row} of a cache written by write_cache_jsonl, None if absent; a cache made for another
    header (another teacher / settings) or a corrupt one is an error naming the file and line."""
    if not path.exists():
        return None
    lines = path.read_text().splitlines()
    if not lines:
        raise C.DataError(f"{path}: empty cache file; delete it to rebuild")
    try:
        got = json.loads(lines[0])
    except json.JSONDecodeError as e:
        raise C.DataError(f"{path}:1: corrupt cache header ({e}); delete it to rebuild") from None
    if got.get("header") != header:
        raise C.DataError(f"{path}: made for {got.get('header')}, this run needs {header}; delete it or "
                          f"use another --out_dir")
    out = {}
    for i, line in enumerate(lines[1:], 2):
        try:
            row = json.loads(line)
            out[row["id"]] = row
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise C.DataError(f"{path}:{i}: corrupt cache row ({e}); delete the file to rebuild") from None
    return out


def write_cache_jsonl(path: Path, header: dict, rows: list[dict], d) -> None:
    if d.is_main:
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in [{"header": header}, *rows]))
        tmp.replace(path)
    C.barrier(d)


def teacher_responses(teacher, tok, tasks: list[dict], cfg: Config, d, dtype, t_id: str) -> dict:
    """{task id: {"ids", "finished"}}: the teacher's greedy response to every training prompt,
    generated once (each rank its shard) and cached in out_dir/teacher_responses.jsonl, tied to the
    teacher's id and max_new_tokens. Sequence-level KD trains on these (Kim & Rush 2016)."""
    path = Path(cfg.out_dir) / "teacher_responses.jsonl"
    header = {"teacher": t_id, "max_new_tokens": cfg.max_new_tokens}
    cached = read_cache_jsonl(path, header) or {}
    todo = [t for t in tasks if t["id"] not in cached][d.rank::d.world_size]
    new = []
    with S.gathered_for_generation(teacher):
        for i in range(0, len(todo), cfg.eval_batch_size):
            chunk = todo[i:i + cfg.eval_batch_size]
            with S.sampling_model(teacher, d, dtype) as m:
                g = S.generate(m, [t["prompt_ids"] for t in chunk], cfg.max_new_tokens, tok.eos_token_id,
                               tok.pad_token_id, temperature=0.0)
            new += [{"id": t["id"], "ids": g.response_ids(j), "finished": bool(g.finished[j]),
                     "text": tok.decode(g.response_ids(j), skip_special_tokens=True)} for j, t in enumerate(chunk)]
    new = C.gather_objects(new, d)
    if new:
        cached.update({r["id"]: r for r in new})
        write_cache_jsonl(path, header, list(cached.values()), d)
    return cached


# ----------------------------------------------------------------------------------------------
# Teacher targets: live on packed rows, or cached per sample (top-k only)


def batch_on(rows: list[dict], pad_id: int, device) -> dict:
    return {k: v.to(device) for k, v in C.collate(rows, pad_id).items()}


def cache_key(samples: list[dict]) -> str:
    h = hashlib.sha256()
    for s in samples:
        h.update(np.asarray(s["input_ids"], dtype=np.int64).tobytes())
        h.update(np.asarray(s["labels"], dtype=np.int64).tobytes())
    return h.hexdigest()[:16]


def topk_cache_settings(kd: KD, t_id: str) -> dict:
    return {"teacher": t_id, "top_k": kd.top_k, "tail": kd.tail, "temperature": kd.temperature}


def read_topk_cache(path: Path, kd: KD, t_id: str) -> dict | None:
    """The cache file if it exists, checked to be readable and made by this teacher with these
    settings (called once at start-up, before any compute, and again when it is used)."""
    if not path.exists():
        return None
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file: say which and why
        raise C.DataError(f"{path}: corrupt teacher cache ({type(e).__name__}: {e}); delete it to rebuild") from None
    if not isinstance(blob, dict) or "header" not in blob or "vals" not in blob or "idx" not in blob:
        raise C.DataError(f"{path}: not a teacher cache; delete it to rebuild")
    want = topk_cache_settings(kd, t_id)
    if {k: blob["header"].get(k) for k in want} != want:
        raise C.DataError(f"{path}: made for {blob['header']}, this run needs {want}; delete it to rebuild")
    return blob


def check_caches(cfg: Config, kd: KD, t_id: str) -> None:
    """Every cache in out_dir readable and made for this teacher and these settings, checked
    before any compute (the sample digests are checked again when the caches are used)."""
    out = Path(cfg.out_dir)
    read_cache_jsonl(out / "teacher_responses.jsonl", {"teacher": t_id, "max_new_tokens": cfg.max_new_tokens})
    if cfg.teacher_cache:
        read_topk_cache(out / "teacher_topk.pt", kd, t_id)


def build_topk_cache(teacher, samples: list[dict], kd: KD, cfg: Config, d, dtype, t_id: str) -> list[tuple]:
    """Per-sample teacher targets [(vals [n_i, k+tail] fp32, idx [n_i, k] int32)], computed once
    and stored in out_dir/teacher_topk.pt with the teacher id, the top-k settings and a digest of
    the exact token ids (a mismatch or a corrupt file is an error before any compute)."""
    path = Path(cfg.out_dir) / "teacher_topk.pt"
    header = {**topk_cache_settings(kd, t_id), "samples": cache_key(samples)}
    blob = read_topk_cache(path, kd, t_id)  # teacher and settings checked there; the samples here
    if blob is not None:
        if blob["header"].get("samples") != header["samples"]:
            raise C.DataError(f"{path}: made for {blob['header']}, this run needs {header}; delete it to rebuild")
        if len(blob["vals"]) != len(samples) or any(v.shape[0] != n_trained(s) for v, s in zip(blob["vals"], samples)):
            raise C.DataError(f"{path}: its targets do not match the samples; delete it to rebuild")
        return list(zip(blob["vals"], blob["idx"]))
    mine = list(range(d.rank, len(samples), d.world_size))
    out = []
    with S.gathered_for_generation(teacher), C.fwd_context(teacher, d, dtype):
        for i in range(0, len(mine), cfg.eval_batch_size):
            part = [samples[j] for j in mine[i:i + cfg.eval_batch_size]]
            b = batch_on(part, 0, d.device)
            t = teacher(b["input_ids"], b["labels"], b["position_ids"], kd=kd)
            sizes = [n_trained(s) for s in part]
            out += [(j, v.cpu(), ix.to(torch.int32).cpu()) for j, v, ix in
                    zip(mine[i:i + cfg.eval_batch_size], t["vals"].split(sizes), t["idx"].split(sizes))]
    out = sorted(C.gather_objects(out, d), key=lambda x: x[0])
    vals, idx = [v for _, v, _ in out], [ix for _, _, ix in out]
    if d.is_main:
        torch.save({"header": header, "vals": vals, "idx": idx}, path.with_suffix(".tmp"))
        path.with_suffix(".tmp").replace(path)
    C.barrier(d)
    return list(zip(vals, idx))


# ----------------------------------------------------------------------------------------------
# Preference pairs from the teacher's judgment (built once; reference log-probs included)


def seq_logps(model, samples: list[dict], batch_size: int, pad_id: int, d, dtype) -> list[float]:
    """Summed response log-probs of each sample, one sample per row (no grad). Parameters are
    gathered once, so ranks may pass different numbers of samples (no collectives inside)."""
    out = []
    with S.gathered_for_generation(model), torch.no_grad(), C.fwd_context(model, d, dtype):
        for i in range(0, len(samples), batch_size):
            b = batch_on(samples[i:i + batch_size], pad_id, d.device)
            lp = model(b["input_ids"], b["labels"], b["position_ids"])["logp"]
            out += lp.sum(1).double().tolist()  # logp is 0 where no label
    return out


def verifier_scores(cands: list[tuple[dict, str]], cfg: Config) -> list[float | None]:
    """Verifier score of each (task, text): math 1/0 (the last attempt's answer, V.score_math),
    code the fraction of tests passed (sandbox); None where the task is not verifiable."""
    out: list[float | None] = [None] * len(cands)
    math_i = [i for i, (t, _) in enumerate(cands) if t["domain"] == "math"]
    res = V.map_with_timeout(V.score_math, [(V.split_trajectory(cands[i][1])[-1]["attempt"], cands[i][0]["answer"],
                                             cands[i][0]["question"]) for i in math_i], timeout_s=cfg.verifier_timeout_s)
    for i, (r, status, _) in zip(math_i, res):
        out[i] = r[0] if status == "ok" else 0.0
    code_i = [i for i, (t, _) in enumerate(cands) if t["domain"] == "code"]
    jobs = [{"code": sandbox.extract_code(V.split_trajectory(cands[i][1])[-1]["attempt"]), "tests": cands[i][0]["tests"],
             "entry_point": cands[i][0].get("entry_point")} for i in code_i]
    for i, (r, _) in zip(code_i, sandbox.run_code_tests_batch(jobs, cfg.code_workers, timeout_s=cfg.code_timeout_s)):
        out[i] = float(r)
    return out


def rank_pair(scores: list[float]) -> tuple[int, int] | None:
    """(chosen, rejected) = (best, worst) candidate; None when they tie (first index wins ties)."""
    best, worst = int(np.argmax(scores)), int(np.argmin(scores))
    return None if scores[best] == scores[worst] else (best, worst)


def build_pairs(student, teacher, tok, tasks: list[dict], responses: dict, cfg: Config, d, dtype,
                t_id: str, counts: Counter) -> list[dict]:
    """Teacher-ranked preference pairs, cached in out_dir/pairs.jsonl (so a resumed run keeps the
    reference log-probs of the student at the START of the stage):
      1. for each of --pref_prompts tasks (a seeded draw over all sources): --pref_samples student samples (+ the teacher's
         response with --pref_include_teacher);
      2. score: the verifier (math, code) or the teacher's mean log-prob per response token
         (--pref_scorer, auto = verifier where verifiable);
      3. chosen = best, rejected = worst; ties skipped (counted);
      4. reference log-probs of both under the starting student."""
    path = Path(cfg.out_dir) / "pairs.jsonl"
    header = {"teacher": t_id, "pref_prompts": cfg.pref_prompts, "pref_samples": cfg.pref_samples,
              "scorer": cfg.pref_scorer, "seed": cfg.seed, "include_teacher": cfg.pref_include_teacher}
    cached = read_cache_jsonl(path, header)
    if cached is not None:
        pairs = sorted(cached.values(), key=lambda r: r["n"])
        counts["pairs"] = len(pairs)
        return pairs
    order = np.random.default_rng(C.seed_for(cfg.seed, 3, 4)).permutation(len(tasks))  # a seeded mix of sources
    chosen_tasks = [tasks[i] for i in order[:cfg.pref_prompts]]
    mine = chosen_tasks[d.rank::d.world_size]
    cands = []  # (task, response ids, finished, from_teacher)
    with S.gathered_for_generation(student):  # step 1
        for i in range(0, len(mine), max(1, cfg.eval_batch_size // cfg.pref_samples)):
            chunk = mine[i:i + max(1, cfg.eval_batch_size // cfg.pref_samples)]
            gen = torch.Generator(device=d.device).manual_seed(C.seed_for(cfg.seed, 3, 1, d.rank, i))
            with S.sampling_model(student, d, dtype) as m:
                g = S.generate(m, [t["prompt_ids"] for t in chunk for _ in range(cfg.pref_samples)], cfg.max_new_tokens,
                               tok.eos_token_id, tok.pad_token_id, temperature=cfg.sample_temperature, generator=gen)
            for j, t in enumerate(chunk):
                group = [(t, g.response_ids(j * cfg.pref_samples + s), False) for s in range(cfg.pref_samples)]
                if cfg.pref_include_teacher:
                    group.append((t, responses[t["id"]]["ids"], True))
                cands.append(group)
    flat = [c for group in cands for c in group]
    texts = [tok.decode(ids, skip_special_tokens=True) for _, ids, _ in flat]
    samples = [ids_sample(t["prompt_ids"], ids) for t, ids, _ in flat]
    ver = verifier_scores([(t, x) for (t, _, _), x in zip(flat, texts)], cfg) if cfg.pref_scorer != "teacher_logp" \
        else [None] * len(flat)  # step 2
    need_t = [i for i, v in enumerate(ver) if v is None]
    if need_t and cfg.pref_scorer == "verifier":
        raise ValueError("--pref_scorer verifier: some preference prompts are not verifiable (chat); use auto")
    t_lp = dict(zip(need_t, seq_logps(teacher, [samples[i] for i in need_t], cfg.eval_batch_size, tok.pad_token_id, d, dtype)))
    scores = [v if v is not None else t_lp[i] / max(1, n_trained(samples[i])) for i, v in enumerate(ver)]
    pairs, k = [], 0
    for group in cands:  # step 3
        idx = list(range(k, k + len(group)))
        k += len(group)
        pick = rank_pair([scores[i] for i in idx])
        if pick is None:
            counts["pairs_tied"] += 1
            continue
        c, r = idx[pick[0]], idx[pick[1]]
        pairs.append({"task": flat[c][0]["id"], "chosen": samples[c], "rejected": samples[r],
                      "score_chosen": scores[c], "score_rejected": scores[r], "scorer": "verifier" if ver[c] is not None
                      else "teacher_logp", "chosen_is_teacher": flat[c][2]})
    refs = seq_logps(student, [p[x] for p in pairs for x in ("chosen", "rejected")], cfg.eval_batch_size,
                     tok.pad_token_id, d, dtype)  # step 4
    for i, p in enumerate(pairs):
        p["ref_chosen"], p["ref_rejected"] = refs[2 * i], refs[2 * i + 1]
    pairs = C.gather_objects(pairs, d)
    ties = C.all_reduce_dict({"t": counts.pop("pairs_tied", 0)}, d)["t"]
    counts["pairs_tied"], counts["pairs"] = int(ties), len(pairs)
    for n, p in enumerate(pairs):
        p["id"], p["n"] = f"pair{n}", n
    write_cache_jsonl(path, header, pairs, d)
    return pairs


# ----------------------------------------------------------------------------------------------
# One optimizer step


AHEAD_FILE = "samples_ahead.pt"  # in a checkpoint: on-policy samples drawn for steps after it (--steps_per_generation)


@dataclass
class StepData:
    """What one optimizer step trains on (the same lists on every rank).
    kd:    samples for the token-level term, each with "targets" = (vals, idx) when cached, else
           the teacher runs live on the packed rows; when `ce` is None the seq-KD CE is taken on
           these same rows (off-policy with the teacher's responses: one forward, both terms)
    ce:    teacher-response samples for seq-KD when they differ from `kd` (on-policy / dataset)
    pairs: preference pairs {chosen, rejected, ref_chosen, ref_rejected}"""
    kd: list[dict]
    ce: list[dict] | None
    pairs: list[dict]
    on_policy: bool


def kd_micro_batch(student, teacher, rows: list[dict], targets, kd: KD, w_kd: float, w_ce: float,
                   n_kd: int, n_ce: int, d, dtype, pad_id: int) -> tuple[torch.Tensor, dict]:
    """Loss of one micro-batch of packed rows: w_kd * L_token (+ w_ce * seq-KD CE on the same rows).
    targets: (vals, idx) concatenated in row order, or None = run the teacher live."""
    b = batch_on(rows, pad_id, d.device)
    empty = C.count_trained(b["labels"]) == 0
    t_vals = t_idx = None
    if w_kd > 0:
        if targets is None:
            with C.fwd_context(teacher, d, dtype):
                t = teacher(b["input_ids"], b["labels"], b["position_ids"], kd=kd)
            t_vals, t_idx = t["vals"], t["idx"]
        else:
            t_vals, t_idx = targets[0].to(d.device), None if targets[1] is None else targets[1].to(d.device).long()
    with C.fwd_context(student, d, dtype):
        out = student(b["input_ids"], b["labels"], b["position_ids"], t_vals=t_vals, t_idx=t_idx, kd=kd,
                      return_hidden=empty)
        div_sum = out["div"].sum()
        loss = w_kd * token_level_loss(out["div"], n_kd, kd.temperature) if w_kd > 0 else out["logp"].sum() * 0.0
        ce = C.masked_ce_loss(out["logp"], b["labels"], n_ce)
        if w_ce > 0:
            loss = loss + w_ce * ce
        if empty:  # keep every parameter in the graph: FSDP's reduce-scatter runs on every rank
            loss = loss + 0.0 * out["hidden"].sum()
    return loss, {"kd_div_sum": div_sum.detach(), "ce_sum": ce.detach() * n_ce}


def dpo_micro_batch(student, pairs: list[dict], w_dpo: float, beta: float, n_pairs: int, d, dtype,
                    pad_id: int) -> tuple[torch.Tensor, dict]:
    """Loss of one micro-batch of pairs: w_dpo * sum of dpo_loss / N_pairs (chosen and rejected
    interleaved as rows 2i and 2i+1; a None pair, C.rank_micro_batches' filler, is masked out)."""
    rows = [r for p in pairs for r in ((p["chosen"], p["rejected"]) if p else (C.EMPTY_ROW, C.EMPTY_ROW))]
    b = batch_on(rows, pad_id, d.device)
    empty = C.count_trained(b["labels"]) == 0
    valid = torch.tensor([p is not None for p in pairs], dtype=torch.float32, device=d.device)
    ref = torch.tensor([[p["ref_chosen"], p["ref_rejected"]] if p else [0.0, 0.0] for p in pairs],
                       dtype=torch.float32, device=d.device)
    with C.fwd_context(student, d, dtype):
        out = student(b["input_ids"], b["labels"], b["position_ids"], return_hidden=empty)
        seq = out["logp"].sum(1)  # [2P]: logp is 0 where there is no label
        loss_p, margin = dpo_loss(seq[0::2], seq[1::2], ref[:, 0], ref[:, 1], beta)
        loss = w_dpo * (loss_p * valid).sum() / max(n_pairs, 1)
        if empty:
            loss = loss + 0.0 * out["hidden"].sum()
    return loss, {"dpo_sum": (loss_p.detach() * valid).sum(), "margin_sum": (margin * valid).sum(),
                  "pair_right": ((margin > 0).float() * valid).sum(),
                  "chosen_reward_sum": (beta * (seq[0::2].detach() - ref[:, 0]) * valid).sum(),
                  "rejected_reward_sum": (beta * (seq[1::2].detach() - ref[:, 1]) * valid).sum()}


def train_step(student, teacher, opt, data: StepData, cfg: Config, kd: KD, d, dtype, pad_id: int,
               lr: float, step: int) -> dict:
    """Steps 2-5 of the module docstring for one StepData; returns the step's logged figures."""
    w_kd, w_ce, w_dpo = cfg.alpha, cfg.gamma * cfg.seqkd_weight, cfg.gamma * cfg.dpo_weight
    mbs = cfg.micro_batch_size
    # the step's work as global lists; N_kd, N_ce, N_pairs from them (no collective needed)
    kd_rows, groups = pack_groups(data.kd, cfg.max_len) if data.kd and (w_kd > 0 or data.ce is None) else ([], [])
    ce_rows = C.pack_rows(data.ce, cfg.max_len) if data.ce and w_ce > 0 else []
    n_kd = sum(n_trained(s) for s in data.kd)
    n_ce = n_kd if data.ce is None else sum(n_trained(s) for s in data.ce)
    pairs = data.pairs if w_dpo > 0 else []
    cached = bool(data.kd) and "targets" in data.kd[0]
    units = list(zip(kd_rows, groups))  # (row, its samples)
    micro = [("kd", mb) for mb in C.rank_micro_batches(units, d, mbs, (C.EMPTY_ROW, []))]
    micro += [("ce", mb) for mb in C.rank_micro_batches(ce_rows, d, mbs, C.EMPTY_ROW)]
    micro += [("dpo", mb) for mb in C.rank_micro_batches(pairs, d, mbs, None)]
    sums = Counter()
    for a, (kind, mb) in enumerate(micro):  # step 4
        if C.is_sharded(student):
            student.set_requires_gradient_sync(a == len(micro) - 1)
        if kind == "kd":
            rows, targets = [r for r, _ in mb], None
            if cached and w_kd > 0:
                parts = [data.kd[i]["targets"] for _, g in mb for i in g]
                k = parts[0][0].shape[-1] if parts else 1
                targets = (torch.cat([p[0] for p in parts]) if parts else torch.zeros(0, k),
                           torch.cat([p[1] for p in parts]) if parts else torch.zeros(0, max(1, kd.top_k), dtype=torch.int32))
            loss, st = kd_micro_batch(student, teacher, rows, targets, kd, w_kd, w_ce if data.ce is None else 0.0,
                                      n_kd, n_ce, d, dtype, pad_id)
            if data.ce is not None:  # the CE of these rows is not a training term here
                st.pop("ce_sum")
        elif kind == "ce":
            loss, st = kd_micro_batch(student, teacher, mb, None, kd, 0.0, w_ce, n_kd, n_ce, d, dtype, pad_id)
            st.pop("kd_div_sum")
        else:
            loss, st = dpo_micro_batch(student, mb, w_dpo, cfg.dpo_beta, len(pairs), d, dtype, pad_id)
        loss.backward()
        sums["loss_sum"] += float(loss.detach())
        for k, v in st.items():
            sums[k] += float(v)
    keys = ("loss_sum", "kd_div_sum", "ce_sum", "dpo_sum", "margin_sum", "pair_right", "chosen_reward_sum",
            "rejected_reward_sum")
    tot = C.all_reduce_dict({k: sums[k] for k in keys}, d)
    C.check_finite(tot["loss_sum"], step)
    gnorm = C.optimizer_step(student, opt, lr, cfg.max_grad_norm)  # step 5
    out = {"loss": tot["loss_sum"], "grad_norm": gnorm, "on_policy": int(data.on_policy), "kd_tokens": n_kd,
           "kd_rows": len(kd_rows), "micro_batches": len(micro)}
    if w_kd > 0 and n_kd:
        out["kd_div"] = tot["kd_div_sum"] / n_kd  # mean divergence per token (before T^2 and alpha)
    if n_ce and (w_ce > 0 or data.ce is None):
        out["seqkd_ce"] = tot["ce_sum"] / n_ce
    if pairs:
        P = len(pairs)
        out.update(dpo_loss=tot["dpo_sum"] / P, dpo_margin=tot["margin_sum"] / P, pair_acc=tot["pair_right"] / P,
                   chosen_reward=tot["chosen_reward_sum"] / P, rejected_reward=tot["rejected_reward_sum"] / P)
    return out


def on_policy_samples(student, tok, tasks: list[dict], cfg: Config, d, dtype, step: int) -> list[dict]:
    """Fresh student samples for the step's prompts (GKD's on-policy data): each rank samples its
    share tasks[rank::W] with a (seed, step, rank) generator; gathered back into task order."""
    mine = list(range(d.rank, len(tasks), d.world_size))
    out = []
    with S.gathered_for_generation(student):  # collective: every rank enters, with or without prompts
        if mine:
            gen = torch.Generator(device=d.device).manual_seed(C.seed_for(cfg.seed, 3, 2, step, d.rank))
            with S.sampling_model(student, d, dtype) as m:
                g = S.generate(m, [tasks[i]["prompt_ids"] for i in mine], cfg.max_new_tokens, tok.eos_token_id,
                               tok.pad_token_id, temperature=cfg.sample_temperature, generator=gen)
            out = [(i, ids_sample(tasks[i]["prompt_ids"], g.response_ids(j))) for j, i in enumerate(mine)]
    return [s for _, s in sorted(C.gather_objects(out, d), key=lambda x: x[0])]


def step_tasks(step: int, train: dict, cfg: Config) -> tuple[list[dict], bool]:
    """The step's prompts from the shuffled stream and its seeded on-/off-policy draw: a pure
    function of (seed, step)."""
    tasks = [train["tasks"][i] for i in C.epoch_stream_indices(len(train["tasks"]), step * cfg.batch_size,
                                                               cfg.batch_size, cfg.seed)]
    return tasks, bool(np.random.default_rng(C.seed_for(cfg.seed, 3, 0, step)).random() < cfg.lmbda)


def sample_ahead(step: int, student, tok, train: dict, cfg: Config, d, dtype) -> dict[int, list[dict]]:
    """On-policy samples of every on-policy step in [step, step + k) (k = --steps_per_generation,
    capped at --max_steps), from ONE sampler call on the current student: {step: its samples}.

    Why: a sampler call on a few rows is bound by reading the weights (every decode step reads them
    all whatever the row count), so k steps' rows in one call cost little more than one step's
    (stage 3 of the pipeline: 8 rows x 128 tokens, 5-8 s a call, on 2 cores). The price is
    staleness: the j-th step after `step` trains on samples of the student j updates ago, which
    the k = 1 default avoids (TRL's GRPO calls this steps_per_generation)."""
    drawn = {s: step_tasks(s, train, cfg) for s in range(step, min(step + cfg.steps_per_generation, cfg.max_steps))}
    tasks = {s: ts for s, (ts, on) in drawn.items() if on}
    flat = on_policy_samples(student, tok, [t for ts in tasks.values() for t in ts], cfg, d, dtype, step)
    out, i = {}, 0
    for s, ts in tasks.items():
        out[s], i = flat[i:i + len(ts)], i + len(ts)
    return out


def step_data(step: int, student, tok, train: dict, pairs: list[dict], cfg: Config, d, dtype,
              ahead: dict[int, list[dict]]) -> StepData:
    """Step 1 (and 3): the step's prompts, the seeded on-/off-policy draw, and the step's preference
    pairs; a pure function of (seed, step) apart from on-policy samples, which come from `ahead`
    (filled by `sample_ahead` when this step's are not there; a step's entry is removed when used)."""
    tasks, on = step_tasks(step, train, cfg)
    if on:
        if step not in ahead:
            ahead.update(sample_ahead(step, student, tok, train, cfg, d, dtype))
        kd = ahead.pop(step)
    else:
        kd = [train["off"][t["id"]] for t in tasks]
    if not on and cfg.offpolicy == "teacher":
        ce = None
    elif train["seqkd"]:
        ce = [train["seqkd"][t["id"]] for t in tasks]
    else:  # --lmbda 1 --gamma 0: prepare_data generated no teacher responses
        ce = []
    step_pairs = []
    if pairs and cfg.gamma * cfg.dpo_weight > 0:
        step_pairs = [pairs[i] for i in C.epoch_stream_indices(len(pairs), step * cfg.pairs_per_step,
                                                               cfg.pairs_per_step, cfg.seed + 1)]
    return StepData(kd=kd, ce=ce, pairs=step_pairs, on_policy=on)


# ----------------------------------------------------------------------------------------------
# Evaluation: held-out math / code (greedy, verifier), held-out KL(teacher || student), speed


def evaluate(model, tok, cfg: Config, sets: dict, d, dtype) -> dict:
    """Greedy answers to the held-out math and code prompts (each rank its shard): math accuracy of
    the last and the first attempt, share of answers with a verification, code pass rate (all
    tests of the last attempt). Decoding speed is measured apart, student and teacher alternated
    (paired_speed)."""
    was = model.training
    model.eval()
    tasks = (sets["math"] + sets["code"])[d.rank::d.world_size]
    texts = []
    with S.gathered_for_generation(model), torch.no_grad():
        for i in range(0, len(tasks), cfg.eval_batch_size):
            chunk = tasks[i:i + cfg.eval_batch_size]
            with S.sampling_model(model, d, dtype) as m:
                g = S.generate(m, [t["prompt_ids"] for t in chunk], cfg.max_new_tokens, tok.eos_token_id,
                               tok.pad_token_id, temperature=0.0)
            texts += [tok.decode(g.response_ids(j), skip_special_tokens=True) for j in range(len(chunk))]
    attempts = [V.split_trajectory(x) for x in texts]
    last = verifier_scores([(t, st[-1]["attempt"]) for t, st in zip(tasks, attempts)], cfg)
    first = list(last)  # one attempt: the first is the last, graded once
    multi = [i for i, st in enumerate(attempts) if len(st) > 1]
    for i, sc in zip(multi, verifier_scores([(tasks[i], attempts[i][0]["attempt"]) for i in multi], cfg)):
        first[i] = sc
    sums = Counter()
    for t, st, a, b in zip(tasks, attempts, last, first):
        dom = t["domain"]
        sums[f"{dom}_n"] += 1
        sums[f"{dom}_correct"] += a == 1.0
        sums[f"{dom}_first_correct"] += b == 1.0
        sums[f"{dom}_with_verification"] += any(s["verification"] is not None for s in st)
    keys = [f"{dom}_{k}" for dom in ("math", "code") for k in ("n", "correct", "first_correct", "with_verification")]
    tot = C.all_reduce_dict({k: sums[k] for k in keys}, d)
    out = {}
    for dom in ("math", "code"):
        n = tot[f"{dom}_n"]
        if n:
            out.update({f"{dom}_n": int(n), f"{dom}_acc": tot[f"{dom}_correct"] / n,
                        f"{dom}_acc_first": tot[f"{dom}_first_correct"] / n,
                        f"{dom}_with_verification": tot[f"{dom}_with_verification"] / n})
    out["examples"] = [f"Q: {tasks[0]['messages'][-1]['content']}\nA: {texts[0]}"] if tasks else []
    model.train(was)
    return out


def paired_speed(student, teacher, prompts: list[list[int]], cfg: Config, d, dtype) -> dict:
    """Decoding throughput in tokens/s of student and teacher, measured alternately in ABBA order
    (S T, T S, S T, ..., --speed_repeats calls each) so that drift of the machine hits both and a
    steady speed-up or slow-down of the machine during a pair favours neither model over the
    whole (S T S T ... gave the model timed second 0.87-0.95 in every pair of one run where the
    machine was speeding up, and 0.96-1.11 in the same run repeated): one batch of prompts, exactly
    --speed_tokens new tokens per row (no EOS stop, greedy), the same work whatever they write.
    Returns the median tokens/s of each (per process), speedup = student / teacher, and the range of
    the per-pair speed-ups (each teacher call's time / the student call's next to it: how far the
    machine's drift moves one pair, so a speed-up inside that range is noise). Measured once,
    at the end: the student's speed does not change with training, and a start and an end
    measurement minutes apart read the same 29-layer student at 260 and 229 tok/s here."""
    if not prompts:
        return {}
    times = {"student": [], "teacher": []}
    with S.gathered_for_generation(student), S.gathered_for_generation(teacher), torch.no_grad(), \
            S.sampling_model(student, d, dtype) as ms, S.sampling_model(teacher, d, dtype) as mt:
        for m in (ms, mt):
            S.generate(m, prompts[:2], 2, [-1], 0, temperature=0.0)  # warm-up (the bf16 copy, the engine)
        for i in range(max(cfg.speed_repeats, 1)):
            for name, m in (("student", ms), ("teacher", mt))[::1 if i % 2 == 0 else -1]:
                t0 = time.perf_counter()
                S.generate(m, prompts, cfg.speed_tokens, [-1], 0, temperature=0.0)
                times[name].append(time.perf_counter() - t0)
    rate = {k: len(prompts) * cfg.speed_tokens / sorted(v)[len(v) // 2] for k, v in times.items()}
    pairs = [t / s for s, t in zip(times["student"], times["teacher"])]  # the calls of one pair are adjacent
    return {"student_tok_per_s": rate["student"], "teacher_tok_per_s": rate["teacher"],
            "speedup": rate["student"] / rate["teacher"], "speedup_pairs_min": min(pairs), "speedup_pairs_max": max(pairs)}


def heldout_kl(student, teacher, samples: list[dict], cfg: Config, d, dtype, pad_id: int, vocab: int = 0) -> float:
    """Mean KL(p_teacher || p_student) per response token (T = 1, the whole vocabulary) over the
    held-out sequences, each rank its shard, sums all-reduced."""
    kd = KD(divergence="fkl", temperature=1.0, top_k=0, vocab=vocab)
    mine = samples[d.rank::d.world_size]
    tot, n = 0.0, 0
    with S.gathered_for_generation(student), S.gathered_for_generation(teacher), torch.no_grad():
        for i in range(0, len(mine), 4):  # 4 rows: the teacher's [N, V] fp32 targets stay small
            b = batch_on(mine[i:i + 4], pad_id, d.device)
            with C.fwd_context(teacher, d, dtype):
                t = teacher(b["input_ids"], b["labels"], b["position_ids"], kd=kd)
            with C.fwd_context(student, d, dtype):
                tot += float(student(b["input_ids"], b["labels"], b["position_ids"], t_vals=t["vals"], kd=kd)["div"].sum())
            n += C.count_trained(b["labels"])
    s = C.all_reduce_dict({"kl": tot, "n": n}, d)
    return s["kl"] / max(s["n"], 1)


def load_eval_sets(cfg: Config, tok, skipped: Counter) -> dict:
    """{"math": tasks, "code": tasks, "kl": samples (the held-out references through the template),
    "speed": the prompt ids of the speed measurement (the first --speed_batch math questions, also
    when the math eval is off)}."""
    sets = {"math": [], "code": [], "kl": []}
    sets["speed"] = [t["prompt_ids"] for t in load_tasks([f"math={cfg.math_test}"], tok, cfg.speed_batch, 10 ** 9,
                                                         Counter(), "speed")] if cfg.math_test and cfg.speed_batch else []
    if cfg.math_test and cfg.eval_limit > 0:
        sets["math"] = load_tasks([f"math={cfg.math_test}"], tok, cfg.eval_limit, 10 ** 9, skipped, "eval math")
    if cfg.code_test and cfg.code_eval_limit > 0:
        sets["code"] = load_tasks([f"code={cfg.code_test}"], tok, cfg.code_eval_limit, 10 ** 9, skipped, "eval code")
    for path in cfg.kl_data if cfg.kl_limit > 0 else []:
        for t in load_tasks([path], tok, cfg.kl_limit, 10 ** 9, skipped, "eval kl"):
            s = text_sample(tok, t, t["reference"])
            if len(s["input_ids"]) <= cfg.max_len and n_trained(s):
                sets["kl"].append(s)
    return sets


# ----------------------------------------------------------------------------------------------
# Main: setup -> teacher / student -> data, caches, pairs -> eval -> loop -> eval -> save


def check_config(cfg: Config) -> None:
    if cfg.divergence not in DIVERGENCE_NAMES:
        raise ValueError(f"--divergence must be one of {DIVERGENCE_NAMES}, got {cfg.divergence!r}")
    if cfg.layer_choice not in ("even", "block", "influence", "ppl"):
        raise ValueError(f"--layer_choice must be even, block, influence or ppl, got {cfg.layer_choice!r}")
    if cfg.offpolicy not in ("teacher", "dataset"):
        raise ValueError(f"--offpolicy must be teacher or dataset, got {cfg.offpolicy!r}")
    if cfg.pref_scorer not in ("verifier", "teacher_logp", "auto"):
        raise ValueError(f"--pref_scorer must be verifier, teacher_logp or auto, got {cfg.pref_scorer!r}")
    if not 0.0 <= cfg.lmbda <= 1.0:
        raise ValueError(f"--lmbda is a probability, got {cfg.lmbda}")
    if cfg.steps_per_generation < 1:
        raise ValueError(f"--steps_per_generation must be >= 1, got {cfg.steps_per_generation}")
    if cfg.alpha < 0 or cfg.gamma < 0 or cfg.alpha + cfg.gamma * (cfg.seqkd_weight + cfg.dpo_weight) <= 0:
        raise ValueError("--alpha and --gamma must be >= 0 and not both off")
    if cfg.teacher_cache and cfg.top_k <= 0:
        raise ValueError("--teacher_cache needs --top_k > 0 (the full distribution of every token would not fit on disk)")
    if cfg.kd_temperature <= 0:
        raise ValueError("--kd_temperature must be > 0")
    if cfg.max_len < cfg.max_prompt_len + cfg.max_new_tokens:
        raise ValueError(f"--max_len {cfg.max_len} < max_prompt_len + max_new_tokens "
                         f"({cfg.max_prompt_len} + {cfg.max_new_tokens}): samples would not fit a row")


def load_models(cfg: Config, ck, d, dtype):
    """(teacher, student, tok, info): the frozen teacher in the compute dtype and the student
    (from the checkpoint when resuming, else --student, else built from the teacher), checked to
    share vocabulary, special tokens and chat template, both wrapped and sharded."""
    t_name = cfg.teacher
    if t_name == "auto":
        t_name = str(C.resolve_path(STAGE2_OUT)) if C.resolve_path(STAGE2_OUT).exists() else M.EMBEDDED
    t_lm, tok = M.load_model_and_tokenizer(t_name, cfg.seed)
    how = {}  # how a student built from the teacher got its layers
    if ck is not None:
        s_name = str(ck / "model")
        s_lm, s_tok = M.load_model_and_tokenizer(s_name, cfg.seed)
    elif cfg.student:
        s_name = cfg.student
        s_lm, s_tok = M.load_model_and_tokenizer(s_name, cfg.seed + 1)
    else:
        layers, how = choose_layers(t_lm, tok, cfg, d, dtype)
        s_name = f"{t_name} layers {layers}"
        s_lm, s_tok = make_student(t_lm, layers, cfg.student_intermediate), tok
        C.print0(f"student layers ({how['layer_choice']}): dropped {how['layers_dropped']}")
    check_compatible(tok, s_tok, t_lm, s_lm, t_name, s_name)
    info = {"teacher": t_name, "student": s_name, "teacher_params": n_params(t_lm), "student_params": n_params(s_lm),
            "teacher_id": model_id(t_name, t_lm), **how}
    C.print0(f"teacher {t_name}: {info['teacher_params'] / 1e6:.1f}M parameters, {t_lm.config.num_hidden_layers} layers")
    C.print0(f"student {s_name}: {info['student_params'] / 1e6:.1f}M parameters, {s_lm.config.num_hidden_layers} layers")
    teacher = C.shard_model(TeacherModel(frozen(t_lm, dtype), cfg.chunk_size), d, dtype)
    student = C.shard_model(StudentModel(s_lm, cfg.chunk_size), d, dtype, cfg.activation_checkpointing)
    return teacher, student, tok, info


def prepare_data(cfg: Config, teacher, tok, kd: KD, d, dtype, t_id: str, skipped: Counter) -> dict:
    """Training tasks, the teacher's responses (seq-KD samples), the off-policy samples (with
    cached top-k targets when --teacher_cache); tasks whose samples do not fit max_len are dropped
    and counted. At --lmbda 1 with no sequence-level term every step trains on fresh student samples
    and no step reads the teacher's responses: they are not generated (~35 s of the pipeline's stage 3)."""
    tasks = load_tasks(cfg.prompts, tok, cfg.prompt_limit, cfg.max_prompt_len, skipped, "prompts")
    if cfg.lmbda >= 1 and cfg.gamma == 0:  # (load_tasks has already refused an empty task list)
        C.print0(f"{len(tasks)} training prompts; every step on-policy (--lmbda 1, --gamma 0): no teacher responses")
        return {"tasks": tasks, "responses": {}, "seqkd": {}, "off": {}}
    responses = teacher_responses(teacher, tok, tasks, cfg, d, dtype, t_id)
    seqkd, off, keep = {}, {}, []
    for t in tasks:
        r = responses[t["id"]]
        seqkd[t["id"]] = ids_sample(t["prompt_ids"], r["ids"])
        off[t["id"]] = seqkd[t["id"]] if cfg.offpolicy == "teacher" else text_sample(tok, t, t["reference"])
        if not n_trained(off[t["id"]]) or len(off[t["id"]]["input_ids"]) > cfg.max_len:
            skipped[f"{t['source']}_sample_unusable"] += 1
            continue
        keep.append(t)
    if not keep:
        raise C.DataError("no training prompt has a usable sample (empty teacher responses or over max_len)")
    C.print0(f"{len(keep)} training prompts; teacher responses finished (EOS) "
             f"{sum(responses[t['id']]['finished'] for t in keep)}/{len(keep)}")
    if cfg.teacher_cache and cfg.alpha > 0:
        samples = [off[t["id"]] for t in keep]
        for s, tg in zip(samples, build_topk_cache(teacher, samples, kd, cfg, d, dtype, t_id)):
            s["targets"] = tg
    return {"tasks": keep, "responses": responses, "seqkd": seqkd, "off": off}


def gap_closed(start: float, end: float, teacher: float) -> float | None:
    """Fraction of the student's gap to the teacher closed by the stage: (end - start) / (teacher - start)."""
    return (end - start) / (teacher - start) if teacher != start else None


def summarize(cfg: Config, ev: dict, info: dict, skipped: Counter, t_start: float, d) -> dict:
    s, e, t = (C.numeric(ev[k]) for k in ("start", "end", "teacher"))
    summary = {**info, "start": s, "end": e, "teacher_eval": t, "skipped": dict(skipped),
               "kl_gap_closed": gap_closed(s["heldout_kl"], e["heldout_kl"], 0.0) if "heldout_kl" in e else None,
               "math_gap_closed": gap_closed(s.get("math_acc", 0), e.get("math_acc", 0), t.get("math_acc", 0)),
               "speedup_vs_teacher": ev.get("speed", {}).get("speedup"), "speed": ev.get("speed", {}),
               "minutes_this_process": (time.time() - t_start) / 60, "examples_end": ev["end"].get("examples", [])}
    if d.is_main:
        (Path(cfg.out_dir) / "eval_summary.json").write_text(json.dumps(summary, indent=2))
    C.print_table(s, e)
    C.print0(f"teacher: math {t.get('math_acc', 0):.3f}, code {t.get('code_acc', 0):.3f}, "
             f"{ev.get('speed', {}).get('teacher_tok_per_s', 0):.0f} tok/s decoding; student speed-up "
             f"{summary['speedup_vs_teacher'] or 0:.2f}x (alternated); "
             f"held-out KL gap closed {summary['kl_gap_closed'] or 0:.2f}, math gap closed {summary['math_gap_closed']}")
    return summary


def full_eval(student, teacher, tok, cfg: Config, sets: dict, d, dtype) -> dict:
    ev = evaluate(student, tok, cfg, sets, d, dtype)
    if sets["kl"]:
        ev["heldout_kl"] = heldout_kl(student, teacher, sets["kl"], cfg, d, dtype, tok.pad_token_id, len(tok))
    return ev


def main(argv=None):
    """The stage as one story: setup -> models -> data, caches, pairs -> eval at start -> loop ->
    eval -> save. Kept in one function (a little over 80 lines) so that it reads as the script's
    outline; every step of it is a named function above."""
    t_start = time.time()
    cfg = C.parse_config(Config, argv)
    check_config(cfg)
    d = C.init_distributed(cfg.device)
    C.set_seed(cfg.seed)
    dtype = C.resolve_dtype(cfg.precision, d.device)
    out_dir = Path(cfg.out_dir)
    if d.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    C.barrier(d)
    C.print0(json.dumps(C.config_to_dict(cfg), indent=1))
    C.print0(f"world size {d.world_size}, device {d.device}, compute dtype {dtype}")
    kd = KD(cfg.divergence, cfg.kd_temperature, cfg.jsd_beta, cfg.skew_alpha, cfg.top_k, cfg.tail)

    # ---- models (the student from the newest checkpoint when resuming)
    ck = M.latest_checkpoint(out_dir) if cfg.resume else None
    teacher, student, tok, info = load_models(cfg, ck, d, dtype)
    kd = dataclasses.replace(kd, vocab=len(tok))
    check_caches(cfg, kd, info["teacher_id"])  # a stale or corrupt cache fails now, before any compute
    skipped = Counter()
    sets = load_eval_sets(cfg, tok, skipped)
    if any(t["domain"] == "code" for t in sets["code"]) or any(p.startswith("code=") for p in cfg.prompts):
        C.print0(f"code sandbox: {sandbox.check_sandbox(cfg.unsafe_code_exec)}")  # fail now, not mid-run

    # ---- data: teacher responses, off-policy samples (+ top-k cache), preference pairs
    train = prepare_data(cfg, teacher, tok, kd, d, dtype, info["teacher_id"], skipped)
    pairs = []
    if cfg.gamma * cfg.dpo_weight > 0 and cfg.pref_prompts > 0:
        if ck is not None and not (out_dir / "pairs.jsonl").exists():
            raise FileNotFoundError(f"{out_dir / 'pairs.jsonl'} is missing: the pairs' reference log-probs come "
                                    f"from the student at the START; cannot rebuild them on resume")
        pairs = build_pairs(student, teacher, tok, train["tasks"], train["responses"], cfg, d, dtype,
                            info["teacher_id"], skipped)
        C.print0(f"preference pairs: {skipped['pairs']} ({skipped['pairs_tied']} prompts tied, skipped)")

    opt = C.make_optimizer(student, cfg.lr, cfg.weight_decay)
    start_step, ev = 0, {}
    if ck is not None:
        state = M.load_checkpoint(ck, student, opt, d)
        start_step, ev = state["step"], state["eval"]
        C.print0(f"resumed from {ck} at step {start_step}")
    ahead = torch.load(ck / AHEAD_FILE) if ck is not None and (ck / AHEAD_FILE).exists() else {}  # samples drawn, not yet trained on
    log = C.MetricsLogger(out_dir, d, cfg.max_steps, cfg, cfg.wandb_project, initial_step=start_step)

    # ---- eval at the start: the teacher once, the student before training (kept in checkpoints)
    if not ev:
        t0 = time.time()
        ev["teacher"] = evaluate(teacher, tok, cfg, sets, d, dtype)
        ev["start"] = full_eval(student, teacher, tok, cfg, sets, d, dtype)
        log.log(0, {f"eval_{k}": v for k, v in C.numeric(ev["start"]).items()}
                | {f"teacher_{k}": v for k, v in C.numeric(ev["teacher"]).items()}
                | {"eval_seconds": time.time() - t0}, advance=False)
    student.train()

    # ---- loop
    for step in range(start_step, cfg.max_steps):
        t0 = time.time()
        data = step_data(step, student, tok, train, pairs, cfg, d, dtype, ahead)  # steps 1, 3
        t_data = time.time() - t0
        lr = C.lr_at(step, cfg.max_steps, cfg.warmup_steps, cfg.lr, cfg.min_lr_ratio)
        st = train_step(student, teacher, opt, data, cfg, kd, d, dtype, tok.pad_token_id, lr, step)  # steps 2, 4, 5
        log.log(step + 1, st | {"lr": lr, "data_s": t_data, "step_s": time.time() - t0})
        done = step + 1
        if cfg.eval_every and done % cfg.eval_every == 0 and done < cfg.max_steps and sets["kl"]:
            kl = heldout_kl(student, teacher, sets["kl"], cfg, d, dtype, tok.pad_token_id, len(tok))
            log.log(done, {"eval_heldout_kl": kl}, advance=False)
        if (cfg.save_every and done % cfg.save_every == 0) or done == cfg.max_steps or done == cfg.stop_after:
            M.save_checkpoint(out_dir, done, student, tok, opt, d, cfg, {"eval": ev, "skipped": dict(skipped)},
                              extra={AHEAD_FILE: ahead} if ahead else None)
        if cfg.stop_after and done == cfg.stop_after and done < cfg.max_steps:
            C.print0(f"stopping after step {done} (--stop_after); rerun to resume")
            log.close()
            C.cleanup_distributed(d)
            return None

    # ---- eval at the end, save
    t0 = time.time()
    ev["end"] = full_eval(student, teacher, tok, cfg, sets, d, dtype)
    ev["speed"] = paired_speed(student, teacher, sets["speed"], cfg, d, dtype)
    log.log(cfg.max_steps, {f"eval_{k}": v for k, v in C.numeric(ev["end"]).items()}
            | {f"speed_{k}": v for k, v in ev["speed"].items()} | {"eval_seconds": time.time() - t0}, advance=False)
    M.save_hf(student, tok, out_dir / "final", d)
    summary = summarize(cfg, ev, info, skipped, t_start, d)
    C.print0(f"done in {(time.time() - t_start) / 60:.1f} min; final student in {out_dir / 'final'}")
    log.close()
    C.cleanup_distributed(d)
    return summary


if __name__ == "__main__":
    main()
