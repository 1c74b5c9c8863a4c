"""
Stage 4: reinforcement learning in sub-stages (STEM -> code -> human preference), GRPO or PPO,
over a hand-written rollout loop, with a robust reward system and a Bradley-Terry reward model.

Papers
  PPO            Schulman et al. 2017, arXiv:1707.06347; GAE: Schulman et al. 2015, arXiv:1506.02438
  RLHF / RM      Ouyang et al. 2022 (InstructGPT), arXiv:2203.02155 (Bradley-Terry reward model, PPO)
  GRPO           Shao et al. 2024 (DeepSeekMath), arXiv:2402.03300
  Dr. GRPO       Liu et al. 2025, arXiv:2503.20783 (no std normalisation, constant length normaliser)
  DAPO           Yu et al. 2025, arXiv:2503.14476 (clip-higher, dynamic sampling, overlong shaping)
  S2R            Ma et al. 2025, arXiv:2502.12853 (process-level rewards for self-verification)
  KL estimators  J. Schulman, "Approximating KL Divergence", http://joschu.net/blog/kl-approx.html

One RL step (mirrored by `# step N` comments in `rl_train`), three functions:
  1. rollout(...) -> Rollout: a batch of prompts, G completions each from the shared sampler
     (`S.generate` under `S.gathered_for_generation`), the exact sampled ids kept, rewarded (verifier /
     sandbox / reward model, each under `safe_reward`); with dynamic sampling, groups whose rewards
     are all equal are dropped and refilled.
  2. score(...): the loss mask, old / reference log-probs and values, `shape_rewards` (format and
     overlong terms, KL in the reward), advantages (`group_advantages`, S2R `process_advantages`, or
     PPO's `gae` over the critic's values, `whiten`ed over the global batch).
  3. update(...): `ppo_epochs` passes over `num_minibatches` minibatches; each micro-batch loss is
     `rl_loss` (the GRPO and PPO objectives: `policy_loss` + KL + `value_loss`), normalised by the
     GLOBAL count of tokens / sequences of its optimizer step (`aggregate`), so 1 process x
     accumulation N == N processes x accumulation 1. Statistics are reduced once per step
     (`C.all_reduce_dict`); every generator is seeded through `C.seed_for`.

Deliberate simplifications (read before trusting a number)
  * The reference model for KL is a frozen copy of the policy at the start of the RUN (not of
    each sub-stage). The PPO critic is re-created at the start of every PPO sub-stage (separate
    critic) or kept (shared value head).
  * PPO treats the end of the response (EOS or truncation) as terminal: no bootstrap.
  * Minibatch k holds rows k, k + M, k + 2M, ... of each rank's rollouts (M = num_minibatches),
    the same in every epoch. Strided, not contiguous: with n_local a multiple of M, a row's global
    index has the same residue mod M as its local one, so the global minibatches (and the update)
    are the same for any world size.
  * The reward model is replicated on every rank (not sharded); the reference model and a
    separate critic are sharded like the policy.
  * Resume: a finished sub-stage (its HF dir exists) is skipped; an unfinished one continues from
    its latest --save_every checkpoint. The shared PPO value head is kept in step checkpoints but
    not in a finished sub-stage's HF dir (a resumed run re-initialises it at a sub-stage boundary).
  * S2R process rewards apply to GRPO only (PPO uses the outcome reward). Text after a final
    "Verification: correct." counts as a new attempt without an answer (outcome 0), as in stage 1's eval.
  * Each sub-stage builds a fresh AdamW (its moments start at zero): a sub-stage changes the
    reward and often the learning rate, and stale second moments from another reward would scale
    the first updates arbitrarily. The step checkpoints inside a sub-stage do keep the optimizer.
  * Entropy is logged, not optimised (the shared log-prob helper returns it detached).

Run
  python 04_rl.py                                               # short STEM sub-stage, embedded model
  python 04_rl.py --mode train_reward_model                     # Bradley-Terry RM on pref_*.jsonl
  python 04_rl.py --model runs/03_distill/final --stages \\
      "stem:data/math_train.jsonl:20 -> code:data/code_train.jsonl:10 -> pref:data/pref_train.jsonl:10"
  python 04_rl.py --stages_file stages.json   # [{"kind": "stem", "data": ..., "steps": 20, "algo": "ppo", "lr": 1e-6}, ...]
  python 04_rl.py --model runs/02_overall_sft/final --stages "stem:data/math_train.jsonl:24" \
      --max_difficulty 2 --prompts_per_step 8 --group_size 8 --max_new_tokens 96 --lr 2e-5 \
      --kl_coef 0 --micro_batch_size 8 --eval_kinds stem --eval_limit 150 --save_every 4
      # ^ the README figure (with stage 2 run from stage 1 output): math 14/150 -> 27/150
  torchrun --nproc_per_node 2 04_rl.py --algo grpo              # FSDP2 (gloo on CPU, nccl on GPU)
  python 04_rl.py --model tiny --stages "toy:data/math_train.jsonl:30" --eval_kinds toy  # seconds
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import common as C
import models as M
import sampler as S
import sandbox
import verify as V

# Stage 1's self-verification format (VERIFY_OPEN, VERDICT_OK, VERDICT_BAD, ATTEMPT_SEP) and its
# parser are defined once, in verify.py: the contract between the stages.


# ----------------------------------------------------------------------------------------------
# Config


@dataclass
class Config:
    # what to run
    mode: str = C.arg("rl", "rl (the sub-stages) | train_reward_model (Bradley-Terry RM on --pref_train)")
    model: str = C.arg(M.EMBEDDED, "policy: embedded default, 'tiny', or an HF dir (e.g. runs/03_distill/final)")
    out_dir: str = C.arg("runs/04_rl", "output dir: <i>_<kind>/ per sub-stage, final/, metrics.jsonl, summary.json")
    stages: str = C.arg("stem:data/math_train.jsonl:8",
                        "sub-stages 'kind:prompts.jsonl:steps -> ...'; kind = stem|code|pref|toy")
    stages_file: str = C.arg("", "JSON list of {kind, data, steps, <Config overrides e.g. algo, lr>}; beats --stages")
    seed: int = C.arg(0, "random seed")
    device: str = C.arg("auto", "auto | cpu | cuda")
    precision: str = C.arg("auto", "auto | bf16 | fp32 (auto = bf16 only where native)")
    max_steps: int = C.arg(-1, "cap on the steps of every sub-stage (-1 = the steps given in --stages)")
    resume: bool = C.arg(True, "skip finished sub-stages (their HF dir exists) and continue an unfinished one "
                               "from its latest step checkpoint")
    save_every: int = C.arg(0, "also checkpoint every N steps inside a sub-stage (policy, optimizer, RNG, "
                               "critic, RM normaliser) to <out_dir>/<i>_<kind>_ckpts; 0 = only at its end")
    activation_checkpointing: bool = C.arg(False, "gradient checkpointing in the decoder layers")
    wandb_project: str = C.arg("", "wandb project (offline); empty = no wandb")
    # algorithm
    algo: str = C.arg("grpo", "grpo | ppo")
    prompts_per_step: int = C.arg(2, "prompts per RL step (global, over all ranks)")
    group_size: int = C.arg(4, "G: completions sampled per prompt")
    max_new_tokens: int = C.arg(64, "generation cap: response tokens sampled at most")
    temperature: float = C.arg(0.7, "sampling temperature; log-probs are recomputed at the SAME temperature")
    top_p: float = C.arg(1.0, "nucleus sampling; < 1 makes the sampler and the trainer differ (PITFALLS #6)")
    stop_strings: list[str] = C.arg([], "extra strings that end a response (besides EOS)")
    reproducible_rollouts: bool = C.arg(False, "sample each prompt group with its own seeded generator, so "
                                        "rollouts do not depend on world size (slower: one generate per group)")
    ppo_epochs: int = C.arg(1, "passes over each batch of rollouts")
    num_minibatches: int = C.arg(1, "optimizer steps per pass (each rank's rollouts split in this many)")
    micro_batch_size: int = C.arg(4, "sequences per forward/backward (accumulation is derived)")
    clip_low: float = C.arg(0.2, "ratio clipped below at 1 - clip_low")
    clip_high: float = C.arg(0.28, "ratio clipped above at 1 + clip_high (DAPO clip-higher; = clip_low for PPO)")
    clip_ratio_c: float = C.arg(3.0, "dual-clip (Ye et al. 2020): per-token loss capped at c |A| for A < 0; "
                                "<= 1 = off (3.0 as verl)")
    max_log_ratio: float = C.arg(20.0, "logp - old_logp clamped to +-this before exp (finite in fp32)")
    tis_cap: float = C.arg(0.0, "truncated importance sampling of the trainer / sampler mismatch: each token's "
                                 "policy loss x min(pi_old / pi_sampler, tis_cap) (Yao et al. 2025); 0 = off, ~2 typical")
    loss_agg: str = C.arg("token_mean", "token_mean | seq_mean_token_mean | seq_sum_norm (Dr. GRPO)")
    loss_norm_len: int = C.arg(64, "seq_sum_norm: Dr. GRPO's constant length normaliser (the paper: the "
                                   "generation budget)")
    std_norm: bool = C.arg(True, "GRPO: divide group advantages by the group std (false = Dr. GRPO)")
    dynamic_sampling: bool = C.arg(False, "DAPO: drop groups whose rewards are all equal and refill")
    max_resample: int = C.arg(2, "dynamic sampling: refill rounds per step before keeping what we have")
    overlong: str = C.arg("none", "truncated responses: masked (no loss) | penalty (DAPO soft punishment) | none")
    overlong_max_len: int = C.arg(64, "DAPO L_max of the soft overlong penalty (-1 beyond it)")
    overlong_cache: int = C.arg(16, "DAPO soft overlong window: penalty ramps over the last N tokens")
    kl_coef: float = C.arg(0.02, "KL-to-reference coefficient (0 = no reference model)")
    kl_estimator: str = C.arg("k3", "k1 | k2 | k3: the estimator that is OPTIMISED (all three are logged)")
    kl_in: str = C.arg("loss", "loss | reward: where the KL term goes (see kl_estimators)")
    # PPO critic
    critic: str = C.arg("head", "head (value head on the policy's hidden state) | separate (value model "
                        "initialised from the policy)")
    gamma: float = C.arg(1.0, "GAE discount")
    lam: float = C.arg(0.95, "GAE lambda")
    vf_coef: float = C.arg(0.1, "value loss weight (shared head) ")
    value_clip: float = C.arg(0.2, "PPO2 value clipping range")
    critic_lr: float = C.arg(1e-5, "learning rate of a separate critic")
    whiten_adv: bool = C.arg(True, "PPO: whiten advantages over the (global) batch")
    # optimisation
    lr: float = C.arg(5e-6, "peak learning rate")
    min_lr_ratio: float = C.arg(1.0, "final lr / peak lr (1 = constant after warmup)")
    warmup_steps: int = C.arg(0, "linear warmup steps (per sub-stage)")
    weight_decay: float = C.arg(0.0, "AdamW weight decay")
    max_grad_norm: float = C.arg(1.0, "gradient clipping")
    # rewards
    reward_timeout_s: float = C.arg(10.0, "time limit of one math reward call (run in a forked worker)")
    failure_reward: float = C.arg(0.0, "reward given when a reward function raises, hangs or returns NaN/inf")
    format_weight: float = C.arg(0.1, "weight of format_reward (final-answer marker / code block)")
    overlong_weight: float = C.arg(1.0, "weight of the DAPO overlong penalty (with --overlong penalty)")
    code_all_or_nothing: bool = C.arg(False, "code reward 1 only if all tests pass (else fraction passed)")
    code_timeout_s: float = C.arg(5.0, "sandbox time limit per code run")
    code_workers: int = C.arg(0, "programs graded at once by the sandbox pool (0 = the number of cores, at most 8)")
    unsafe_code_exec: bool = C.arg(False, "run model-written code WITHOUT the bubblewrap sandbox (warned); only "
                                          "for machines where bwrap cannot run and that you can throw away")
    s2r_reward: str = C.arg("outcome", "stem rewards for self-verification responses: outcome | process | both")
    s2r_train: str = C.arg("all", "which steps of a self-verification response get a policy gradient: all | "
                                  "attempts (the verifications, verdicts included, keep what SFT taught)")
    math_instruction: str = C.arg(" Finish with 'The answer is X.'", "appended to every math question")
    max_difficulty: int = C.arg(-1, "train only on prompts whose 'difficulty' field is <= this (-1 = all; "
                                    "held-out evals are never filtered)")
    reward_model: str = C.arg("", "reward model dir for pref sub-stages (default <out_dir>/reward_model)")
    rm_norm: str = C.arg("running", "pref reward normalisation: running (mean/std) | batch | none")
    # reward model training (--mode train_reward_model)
    rm_model: str = C.arg("", "RM backbone (default: --model)")
    pref_train: str = C.arg("data/pref_train.jsonl", "RM training pairs {prompt, chosen, rejected}")
    pref_test: str = C.arg("data/pref_test.jsonl", "RM held-out pairs")
    rm_steps: int = C.arg(40, "RM optimizer steps")
    rm_batch_pairs: int = C.arg(4, "pairs per RM optimizer step (global)")
    rm_lr: float = C.arg(2e-5, "RM learning rate (backbone and head)")
    max_len: int = C.arg(256, "RM: max tokens of prompt + response (longer pairs dropped)")
    # evaluation
    eval_kinds: list[str] = C.arg(["auto"], "held-out evals after each sub-stage: stem code pref toy "
                                  "(auto = stem, code, pref if an RM exists, toy if a toy sub-stage runs)")
    eval_limit: int = C.arg(20, "held-out items per eval kind")
    eval_max_new_tokens: int = C.arg(64, "greedy response length in evals")
    math_test: str = C.arg("data/math_test.jsonl", "held-out math")
    code_test: str = C.arg("data/code_test.jsonl", "held-out code")


STAGE_KINDS = ("stem", "code", "pref", "toy")


# ----------------------------------------------------------------------------------------------
# Setup: sub-stage specs


def parse_stages(cfg: Config) -> list[dict]:
    """--stages 'kind:path:steps -> ...' or --stages_file JSON -> [{kind, data, steps, overrides}]."""
    if cfg.stages_file:
        specs = json.loads(Path(cfg.stages_file).read_text())
        if not isinstance(specs, list):
            raise ValueError(f"{cfg.stages_file}: expected a JSON list of sub-stages")
    else:
        specs = []
        for part in cfg.stages.split("->"):
            bits = part.strip().rsplit(":", 2)
            if len(bits) != 3:
                raise ValueError(f"sub-stage {part.strip()!r}: expected kind:prompts.jsonl:steps")
            specs.append({"kind": bits[0].strip(), "data": bits[1].strip(), "steps": int(bits[2].rstrip("steps"))})
    fields = {f.name for f in dataclasses.fields(Config)}
    out = []
    for s in specs:
        s = dict(s)
        kind, data, steps = s.pop("kind", None), s.pop("data", None), s.pop("steps", None)
        if kind not in STAGE_KINDS:
            raise ValueError(f"sub-stage kind {kind!r}: expected one of {STAGE_KINDS}")
        if data is None or steps is None or int(steps) < 0:
            raise ValueError(f"sub-stage {kind}: needs 'data' and 'steps' >= 0")
        unknown = set(s) - fields
        if unknown:
            raise ValueError(f"sub-stage {kind}: unknown override(s) {sorted(unknown)}")
        out.append({"kind": kind, "data": data, "steps": int(steps), "overrides": s})
    return out


def validate(cfg: Config, d: C.Dist) -> None:
    """Fail loudly on inconsistent sizes and unknown choices (STYLE rule 10)."""
    choices = {"algo": ("grpo", "ppo"), "loss_agg": ("token_mean", "seq_mean_token_mean", "seq_sum_norm"),
               "overlong": ("masked", "penalty", "none"), "kl_estimator": ("k1", "k2", "k3"),
               "kl_in": ("loss", "reward"), "critic": ("head", "separate"),
               "s2r_reward": ("outcome", "process", "both"), "s2r_train": ("all", "attempts"),
               "rm_norm": ("running", "batch", "none"),
               "mode": ("rl", "train_reward_model")}
    for k, allowed in choices.items():
        if getattr(cfg, k) not in allowed:
            raise ValueError(f"--{k} {getattr(cfg, k)!r}: expected one of {allowed}")
    if cfg.prompts_per_step % d.world_size:
        raise ValueError(f"--prompts_per_step {cfg.prompts_per_step} not divisible by world size {d.world_size}")
    local = cfg.prompts_per_step // d.world_size * cfg.group_size
    if local % (cfg.num_minibatches * cfg.micro_batch_size):
        raise ValueError(f"{local} rollouts per rank not divisible by num_minibatches {cfg.num_minibatches} "
                         f"x micro_batch_size {cfg.micro_batch_size}")
    if cfg.algo == "grpo" and cfg.group_size < 2:
        raise ValueError("GRPO needs --group_size >= 2")


# ----------------------------------------------------------------------------------------------
# Model: policy with an optional value head, scalar-head models (critic, reward model)


class ActorCritic(M.LogProbModel):
    """The policy (LogProbModel) plus a scalar value head on its last hidden state.

    Sharded as one FSDP2 root, so the head's parameters are gathered in the same forward.
    save_hf keeps only `lm.*`, so the saved policy is a plain HF model.
    """

    def __init__(self, lm: nn.Module):
        super().__init__(lm)
        self.value_head = nn.Linear(lm.config.hidden_size, 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    def forward(self, input_ids, labels, position_ids=None, attention_mask=None, temperature: float = 1.0,
                return_values: bool = False):
        out = super().forward(input_ids, labels, position_ids, attention_mask, temperature,
                              return_hidden=return_values)
        if return_values:
            v = self.value_head(out.pop("hidden")).squeeze(-1).float()  # [B, T]: V(ids[:, :t+1])
            out["values"] = shift_right(v)  # values[:, t] = V(state before label t), like logp
        return out


class ScalarHeadModel(nn.Module):
    """LM backbone + Linear(H, 1): one scalar per position (reward model, separate critic).

    forward -> [B, T] with out[:, t] = head(h_t), the score of the prefix ids[:, :t+1].
    """

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm
        self.head = nn.Linear(lm.config.hidden_size, 1)
        nn.init.normal_(self.head.weight, std=1.0 / math.sqrt(lm.config.hidden_size + 1))
        nn.init.zeros_(self.head.bias)

    def forward(self, input_ids, position_ids=None, attention_mask=None):
        h = self.lm.get_decoder()(input_ids=input_ids, position_ids=position_ids,
                                  attention_mask=attention_mask, use_cache=False).last_hidden_state
        return self.head(h).squeeze(-1).float()


def shift_right(x: torch.Tensor) -> torch.Tensor:
    """[B, T] -> [B, T] with out[:, t] = x[:, t-1], out[:, 0] = 0 (align a per-prefix score with labels)."""
    return torch.cat([x.new_zeros(x.shape[0], 1), x[:, :-1]], dim=1)


def save_scalar_model(model: nn.Module, tok, path: Path, d: C.Dist) -> None:
    """HF dir (the backbone LM, loadable by any stage) + head.pt (the scalar head). Collective
    under FSDP2 (the full state is gathered once; rank 0 writes)."""
    full, _ = M.gather_full_state(model, None)
    M.save_hf(model.lm, tok, path, d, full_state={k[3:]: v for k, v in full.items() if k.startswith("lm.")})
    if d.is_main:
        torch.save({k[5:]: v for k, v in full.items() if k.startswith("head.")}, Path(path) / "head.pt")
    C.barrier(d)


def load_scalar_model(path: str | Path) -> tuple[ScalarHeadModel, object]:
    lm, tok = M.load_model_and_tokenizer(str(path))
    m = ScalarHeadModel(lm)
    head = Path(path) / "head.pt"
    if not head.exists():
        raise FileNotFoundError(f"{head} missing: {path} is not a reward model saved by --mode train_reward_model")
    m.head.load_state_dict(torch.load(head, map_location="cpu"))
    return m, tok


# ----------------------------------------------------------------------------------------------
# Pure functions: advantages, losses, KL estimators


def group_advantages(rewards: torch.Tensor, group_size: int, std_norm: bool = True, eps: float = 1e-6):
    """GRPO group-relative advantages (Shao et al. 2024, arXiv:2402.03300, eq. in sec. 4.1.2).

        A_{g,i} = (r_{g,i} - mean_j r_{g,j}) / (std_j r_{g,j} + eps)    std_norm=True  (GRPO)
        A_{g,i} =  r_{g,i} - mean_j r_{g,j}                              std_norm=False (Dr. GRPO,
                                                                          Liu et al. arXiv:2503.20783)
    rewards: [B*G] (consecutive G samples form a group) or [B, G]; std is Bessel-corrected (as TRL).
    Mean and std are taken over the G samples of each group only. Returns (adv of the input's
    shape, stats{"zero_std_frac": fraction of groups whose rewards are all equal: zero gradient}).
    """
    shape = rewards.shape
    r = rewards.reshape(-1, group_size).double()
    mean = r.mean(1, keepdim=True)
    std = r.std(1, keepdim=True) if group_size > 1 else torch.zeros_like(mean)
    adv = r - mean
    if std_norm:
        adv = adv / (std + eps)
    zero = (r.max(1).values - r.min(1).values).abs() <= 1e-12
    return adv.to(rewards.dtype).reshape(shape), {"zero_std_frac": zero.float().mean().item()}


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float):
    """Generalised advantage estimation (Schulman et al. 2015, arXiv:1506.02438, eq. 16).

        delta_t = r_t + gamma * V_{t+1} * m_{t+1} - V_t
        A_t     = delta_t + gamma * lam * m_{t+1} * A_{t+1}          returns R_t = A_t + V_t
    rewards, values, mask: [B, T] over response tokens, right-padded (mask 1 on real tokens).
    The episode ends at the last real token (EOS or truncation: no bootstrap). Computed per
    sequence, backwards in t; nothing is averaged. Returns (adv [B, T], returns [B, T]), 0 where mask == 0.
    """
    B, T = rewards.shape
    m = mask.to(values.dtype)
    adv = torch.zeros_like(values)
    last = values.new_zeros(B)
    for t in reversed(range(T)):
        m_next = m[:, t + 1] if t + 1 < T else values.new_zeros(B)
        v_next = values[:, t + 1] if t + 1 < T else values.new_zeros(B)
        delta = rewards[:, t] + gamma * v_next * m_next - values[:, t]
        last = delta + gamma * lam * m_next * last
        adv[:, t] = last
    adv = adv * m
    return adv, (adv + values) * m


def masked_moments(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[sum, sum of squares, count] of x where mask: all-reduce these for global statistics."""
    m = mask.to(torch.float64)
    xd = x.to(torch.float64)
    return torch.stack([(xd * m).sum(), (xd * xd * m).sum(), m.sum()])


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8,
           moments: torch.Tensor | None = None) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) over the masked entries (population variance), 0 where mask == 0.

    x, mask: [B, T]. `moments` = masked_moments summed over ranks gives the GLOBAL mean / var so
    the result does not depend on how the batch is split; default: this tensor's own moments.
    shift_mean=False adds the mean back (scale only).
    """
    s, s2, n = (masked_moments(x, mask) if moments is None else moments).tolist()
    n = max(n, 1.0)
    mean = s / n
    var = max(s2 / n - mean * mean, 0.0)
    out = (x - mean) / math.sqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask.to(x.dtype)


def normaliser_count(mask: torch.Tensor, agg: str) -> torch.Tensor:
    """This rank's share of the global normaliser of `aggregate`: trained tokens (token_mean) or
    sequences with at least one trained token (the two sequence modes). Sum it over micro-batches
    and ranks of one optimizer step."""
    if agg == "token_mean":
        return mask.sum().double()
    return (mask.sum(1) > 0).sum().double()


def aggregate(x: torch.Tensor, mask: torch.Tensor, agg: str, n_global: float, norm_const: float = 1.0):
    """Reduce per-token terms x [B, T] to this micro-batch's share of a global scalar loss.

        token_mean:           sum_{i,t} m x / N_tok                  (N_tok: global trained tokens)
        seq_mean_token_mean:  sum_i (sum_t m x / sum_t m) / N_seq    (each sequence weighs the same:
                                                                       length bias, PITFALLS #2)
        seq_sum_norm:         sum_{i,t} m x / (N_seq * norm_const)   (Dr. GRPO: constant normaliser,
                                                                       --loss_norm_len)
    n_global is the count over ALL micro-batches and ranks of the optimizer step (normaliser_count
    summed), so summing the returned values over micro-batches and ranks gives the global loss
    whatever the world size or accumulation (PITFALLS #1).
    """
    m = mask.to(x.dtype)
    if agg == "token_mean":
        return (x * m).sum() / max(n_global, 1.0)
    if agg == "seq_mean_token_mean":
        return ((x * m).sum(1) / m.sum(1).clamp(min=1.0)).sum() / max(n_global, 1.0)
    if agg == "seq_sum_norm":
        return (x * m).sum() / (max(n_global, 1.0) * norm_const)
    raise ValueError(f"unknown loss aggregation {agg!r}")


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor,
                clip_low: float, clip_high: float, agg: str, n_global: float, norm_const: float = 1.0,
                clip_ratio_c: float = 3.0, max_log_ratio: float = 20.0, is_weight: torch.Tensor | None = None):
    """PPO clipped surrogate (Schulman et al. 2017, arXiv:1707.06347, eq. 7), asymmetric clip
    range (DAPO clip-higher, Yu et al. 2025, arXiv:2503.14476), dual-clip for A < 0 (Ye et al.
    2020, arXiv:1912.09729):

        rho_t = exp(clamp(logp_t - old_logp_t, -max_log_ratio, max_log_ratio))
        l_t   = max(-rho_t A_t, -clip(rho_t, 1 - clip_low, 1 + clip_high) A_t)
        l_t   = min(l_t, -clip_ratio_c A_t)                     where A_t < 0 (dual-clip; c > 1)
        l_t   = w_t l_t                                        with is_weight w (`truncated_is_weight`)
        L     = aggregate(l, mask, agg, n_global, norm_const)   (see `aggregate`)

    Why the two guards: with A < 0 the clipped objective is unbounded in rho (one stale token with
    logp - old = 30 gives a loss of 1e13), and exp overflows fp32 beyond ~88 (inf, then NaN
    gradients). Dual-clip caps the per-token loss at c |A| (its gradient is then 0); the clamp of
    the log-ratio (gradient 0 beyond it) keeps exp finite, e^20 = 4.9e8. clip_ratio_c <= 1 turns
    dual-clip off. Near on-policy (ratios ~1) neither changes anything.
    logp (with grad), old_logp: [B, T] response-token log-probs; adv: [B, T] per token or [B]
    per sequence (broadcast); mask: [B, T] float, 1 on trained tokens. Returns (loss, stats) with
    detached SUMS over masked tokens (ratio_sum, clipped, dual_clipped, tokens, and the old->new
    KL k1/k3 sums) so the caller can all-reduce them.
    """
    if adv.dim() == 1:
        adv = adv[:, None].expand_as(logp)
    assert logp.shape == old_logp.shape == adv.shape == mask.shape, (logp.shape, old_logp.shape, adv.shape)
    m = mask.to(logp.dtype)
    log_ratio = ((logp - old_logp) * m).clamp(-max_log_ratio, max_log_ratio)  # 0 on padding
    ratio = torch.exp(log_ratio)
    pg1 = -adv * ratio
    pg2 = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    per_token = torch.maximum(pg1, pg2)
    dual = torch.zeros_like(per_token, dtype=torch.bool)
    if clip_ratio_c > 1.0:
        cap = -adv * clip_ratio_c
        dual = (adv < 0) & (per_token > cap)
        per_token = torch.where(dual, cap, per_token)
    if is_weight is not None:
        per_token = per_token * is_weight.detach()
    loss = aggregate(per_token, mask, agg, n_global, norm_const)
    with torch.no_grad():
        stats = {"ratio_sum": (ratio * m).sum(), "clipped": ((pg2 > pg1).to(m.dtype) * m).sum(),
                 "dual_clipped": (dual.to(m.dtype) * m).sum(), "tokens": m.sum(),
                 "ppo_kl_k1": (-log_ratio * m).sum(), "ppo_kl_k3": ((torch.exp(-log_ratio) - 1 + log_ratio) * m).sum()}
    return loss, stats


def truncated_is_weight(old_logp: torch.Tensor, gen_logp: torch.Tensor, cap: float) -> torch.Tensor:
    """Truncated importance sampling of the trainer / sampler mismatch (Yao et al. 2025, "Your
    efficient RL framework secretly brings you off-policy RL training"; verl, OpenRLHF):

        w_t = min(pi_old(y_t) / pi_sampler(y_t), C) = exp(min(old_logp_t - gen_logp_t, log C))

    The rollout engine samples from pi_sampler (here: a bf16 weight copy, other kernels), not from
    the trainer's pi_old; weighting each token's policy loss by w makes the gradient an estimate
    under pi_old again, with the weight truncated at C to bound its variance. [B, T] -> [B, T],
    detached (a weight, not a path for gradients)."""
    return torch.exp(torch.clamp(old_logp - gen_logp, max=math.log(cap))).detach()


def kl_estimators(logp: torch.Tensor, ref_logp: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-token estimators of KL(pi || ref) from samples of pi (Schulman, "Approximating KL
    Divergence", http://joschu.net/blog/kl-approx.html), with r = ref_logp - logp:

        k1 = -r                  unbiased value, high variance, can be negative
        k2 = r^2 / 2             biased value, low variance
        k3 = exp(r) - 1 - r      unbiased value, low variance, always >= 0

    logp, ref_logp: [B, T] (logp may carry grad); returns {"k1","k2","k3"}: [B, T], nothing averaged.
    Placement matters for the GRADIENT, not only the value (PITFALLS #4; tested exactly in tests):
      * k1 in the REWARD (detached, r_t -= beta * k1_t, then the policy gradient): its expected
        gradient is exactly -beta * grad KL(pi || ref): the unbiased choice.
      * k3 in the LOSS (GRPO's choice): E_pi[grad k3] = grad KL(ref || pi), the REVERSE KL: a
        biased gradient for KL(pi || ref) (fine as a regulariser, but not what it claims).
      * k2 in the loss: E_pi[grad k2] = grad KL(pi || ref) (on-policy); k1 in the loss: expected
        gradient 0 (it only adds noise).
    k3 is computed on rc = clamp(r, -20, 20): exp(rc) - 1 - rc, so its value stays finite and
    its gradient is exactly 0 beyond the clamp (clamping only inside exp, exp(clamp(r)) - 1 - r,
    would leave d k3 / d logp = +1 there instead of -e^r: the wrong sign). verl additionally caps
    the k3 VALUE at 10; we do not: the cap would zero the gradient of every token with k3 > 10
    (r > ~2.4), the tokens that drifted furthest from the reference, and the clamp of r already
    keeps k3 finite in fp32.
    """
    r = ref_logp - logp
    rc = r.clamp(-20.0, 20.0)
    return {"k1": -r, "k2": 0.5 * r * r, "k3": torch.exp(rc) - 1 - rc}


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip: float, n_global: float):
    """Clipped value loss (PPO2 as in OpenAI baselines; Schulman et al. 2017, arXiv:1707.06347):

        V_clip = old_V + clip(V - old_V, -clip, clip)
        L_V    = sum_{i,t} m * 0.5 * max((V - R)^2, (V_clip - R)^2) / N_tok
    values (with grad), old_values, returns, mask: [B, T]; n_global: global trained tokens of the
    optimizer step. Returns (loss, stats{"vf_clipped": number of tokens where the clipped term won}).
    """
    m = mask.to(values.dtype)
    v_clip = old_values + (values - old_values).clamp(-clip, clip)
    l1, l2 = (values - returns) ** 2, (v_clip - returns) ** 2
    loss = (0.5 * torch.maximum(l1, l2) * m).sum() / max(n_global, 1.0)
    return loss, {"vf_clipped": ((l2 > l1).to(m.dtype) * m).sum().detach()}


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor, n_global: float | None = None):
    """Bradley-Terry pairwise loss of a reward model (Ouyang et al. 2022, arXiv:2203.02155, eq. 1):

        L = -(1/N) sum_i log sigmoid(r_chosen_i - r_rejected_i)
    r_chosen, r_rejected: [B] scalar rewards of the pairs; N = n_global (all pairs of the optimizer
    step over micro-batches and ranks) or B. Returns (loss, stats{"acc": fraction with r_c > r_r}).
    """
    n = float(r_chosen.shape[0]) if n_global is None else n_global
    loss = -F.logsigmoid(r_chosen - r_rejected).sum() / max(n, 1.0)
    return loss, {"acc": (r_chosen > r_rejected).float().mean().item()}


def rollout_mask(lengths: torch.Tensor, finished: torch.Tensor, T: int, overlong: str) -> torch.Tensor:
    """Loss mask [B, T] over response tokens, from what was SAMPLED (PITFALLS #7, #8).

    mask[i, t] = 1 for t < lengths[i] (lengths include the EOS that ended a finished response, so
    that EOS is trained even though pad == eos); overlong == "masked" zeroes the rows of truncated
    responses (finished == False). The same mask serves as loss numerator, normaliser and logged lengths.
    """
    mask = (torch.arange(T)[None, :] < lengths[:, None]).float()
    if overlong == "masked":
        mask = mask * finished[:, None].float()
    return mask


def running_moments_update(mean: float, var: float, count: float, b_mean: float, b_var: float,
                           b_count: float) -> tuple[float, float, float]:
    """Merge a batch's mean / population variance / count into running ones (Chan et al. 1979).

        n = n_a + n_b,  delta = mean_b - mean_a,  mean = mean_a + delta n_b / n
        var = (var_a n_a + var_b n_b + delta^2 n_a n_b / n) / n
    Returns (mean, var, count). Used to normalise reward-model scores: (r - mean) / std.
    """
    if b_count <= 0:
        return mean, var, count
    n = count + b_count
    delta = b_mean - mean
    m2 = var * count + b_var * b_count + delta * delta * count * b_count / n
    return mean + delta * b_count / n, m2 / n, n


# ----------------------------------------------------------------------------------------------
# Pure functions: rewards (strings in, floats out)


def math_reward(response: str, ref_answer: str, question: str = "") -> tuple[float, dict]:
    """1 if the response's final answer equals the reference, else 0 (V.score_math: strict
    final-answer extraction, rejects several different answers, prompt echoes, huge outputs).

    Self-verification responses (stage 1's format, parsed by V.split_trajectory: at least one
    verdict): the outcome is the correctness of the LAST attempt, each attempt graded by the same
    V.score_math (a hedged attempt with two answers scores 0), and info["steps"] holds the S2R
    steps with their rewards (see s2r_steps). Otherwise score_math over the whole response.
    """
    if len(response) > V.MAX_RESPONSE_CHARS:  # huge outputs: never parsed, never rewarded
        return 0.0, {"reason": "too_long"}
    if V.VERDICT_OK in response or V.VERDICT_BAD in response:
        steps = s2r_steps(response, ref_answer, question)
        attempts = [s for s in steps if s["kind"] == "attempt"]
        return (attempts[-1]["reward"] if attempts else 0.0), {"reason": "s2r", "steps": steps}
    r, info = V.score_math(response, ref_answer, question)
    return float(r), info


def s2r_steps(response: str, ref_answer: str, question: str = "") -> list[dict]:
    """Rewards of the steps of a self-verification response `attempt1 verification1 attempt2 ...`
    (S2R, Ma et al. 2025, arXiv:2502.12853), split by the shared parser V.split_trajectory:

      attempt:       reward 1 if V.score_math grades it correct (strict: one final answer), else 0
      verification:  reward 1 if its verdict matches the real correctness of the attempt it
                     checks, else 0 (a verification without a verdict is not a step)
    Returns [{"kind", "start", "end" (character offsets), "reward", "verdict" (verifications)}].
    """
    steps = []
    for st in V.split_trajectory(response):
        a, b = st["attempt_span"]
        if not st["attempt"].strip():
            continue
        correct = V.score_math(st["attempt"], ref_answer, question)[0]
        steps.append({"kind": "attempt", "start": a, "end": b, "reward": float(correct), "verdict": None})
        if st["verdict"] is not None:
            c, e = st["verify_span"]
            steps.append({"kind": "verify", "start": c, "end": e, "verdict": st["verdict"],
                          "reward": float(st["verdict"] == bool(correct))})
    return steps


def code_reward(response: str, tests: list[str], entry_point: str | None, all_or_nothing: bool = False,
                timeout_s: float = 5.0) -> tuple[float, dict]:
    """Fraction of the task's tests passed by the response's code (or 0/1 with all_or_nothing),
    run by sandbox.run_code_tests in a sandboxed process group (time, memory, output, filesystem limits)."""
    return sandbox.run_code_tests(sandbox.extract_code(response), tests, entry_point, timeout_s=timeout_s,
                                  all_or_nothing=all_or_nothing)


def toy_reward(response: str) -> float:
    """Toy task with a known optimum (1.0): the fraction of response characters that are lowercase
    ASCII letters (an empty response scores 0). For learning tests and debugging the loop."""
    return sum("a" <= ch <= "z" for ch in response) / len(response) if response else 0.0


def format_reward(response: str, kind: str) -> float:
    """1 if the response has the expected shape, else 0: stem = a strict final answer
    ("The answer is X." / \\boxed{}), code = a fenced code block or a `def`; other kinds: 0."""
    if kind == "stem":
        return float(V.extract_final_answer(response) is not None)
    if kind == "code":
        return float("```" in response or "def " in response)
    return 0.0


def overlong_penalty(length: int, max_len: int, cache: int) -> float:
    """DAPO soft overlong punishment (Yu et al. 2025, arXiv:2503.14476, eq. 13):

        0                                 if L <= max_len - cache
        (max_len - cache - L) / cache     if max_len - cache < L <= max_len   (ramps 0 -> -1)
        -1                                if L > max_len
    length: response tokens; max_len: the generation limit; cache: the ramp width.
    """
    if length <= max_len - cache:
        return 0.0
    if length <= max_len:
        return (max_len - cache - length) / max(cache, 1)
    return -1.0


def process_advantages(step_rewards: list[list[float]], outcome: torch.Tensor, group_size: int, mode: str,
                       std_norm: bool = True, eps: float = 1e-6) -> list[list[float]]:
    """S2R-style per-step advantages (Ma et al. 2025, arXiv:2502.12853, sec. 3.3, our adaptation).

    step_rewards: per sample (B*G, consecutive groups of G) the rewards of its steps in order
    (attempt, verification, attempt, ...); outcome: [B*G] outcome rewards. Returns per sample the
    advantage of each step (every token of a step gets its step's advantage):
      outcome:  A_{i,k} = group_advantages(outcome)_i                    (same for all steps)
      process:  A_{i,k} = (r_{i,k} - mean_j r_{j,k}) / (std_j r_{j,k} + eps), over the samples j
                of the group that HAVE a step k (same position, hence same kind); std only with
                std_norm and when at least 2 samples have a step k (else just r - mean)
      both:     the sum of the two.
    """
    if mode not in ("outcome", "process", "both"):
        raise ValueError(f"S2R mode must be outcome, process or both, got {mode!r}")
    out_adv, _ = group_advantages(outcome.double(), group_size, std_norm, eps)
    result = []
    for g0 in range(0, len(step_rewards), group_size):
        group = step_rewards[g0:g0 + group_size]
        K = max((len(s) for s in group), default=0)
        base = []
        for k in range(K):
            vals = torch.tensor([s[k] for s in group if len(s) > k], dtype=torch.float64)
            std = vals.std().item() if len(vals) > 1 else 0.0
            base.append((vals.mean().item(), std))
        for j, s in enumerate(group):
            i = g0 + j
            adv = []
            for k, r in enumerate(s):
                p = r - base[k][0]
                if std_norm and len(s) and base[k][1] > 0:
                    p = p / (base[k][1] + eps)
                o = float(out_adv[i])
                adv.append(o if mode == "outcome" else p if mode == "process" else o + p)
            result.append(adv)
    return result


def attempts_only(step_adv: list[list[float]], steps: list[list[dict]]) -> list[list[float]]:
    """Step advantages with every verification step's set to 0 (--s2r_train attempts): the policy
    gradient then reaches only the attempts, and the verifications (their verdicts, and the EOS
    after the last one, which `token_step_index` puts in the last step) keep what SFT taught them.
    Why: on a policy whose answers are mostly wrong, any reward that reaches the verdict tokens
    moves the verifier to a constant: the outcome reward's negative advantages fall on the
    "Verification: correct" closing each wrong answer (-> "incorrect" and retry until the length
    cap), a length penalty on the retries (-> "correct" at once), measured in README "Stage 4".
    step_adv, steps: per sample, as `process_advantages` returns them and `s2r_steps` lists them."""
    return [[0.0 if st[k]["kind"] == "verify" else a for k, a in enumerate(adv)] for adv, st in zip(step_adv, steps)]


def token_step_index(char_offsets: list[int], steps: list[dict]) -> list[int]:
    """Map each response token (by the character offset where it starts) to the index of the
    step containing it; tokens after the last step (e.g. the EOS) go to the last step; -1 if no steps."""
    out = []
    for off in char_offsets:
        k = -1
        for j, s in enumerate(steps):
            if off < s["end"]:
                k = j
                break
        if k == -1 and steps:
            k = len(steps) - 1
        out.append(k)
    return out


def char_offsets(tok, ids: list[int]) -> list[int]:
    """Character offset in tok.decode(ids) where each token starts (prefix decoding; decoding is
    only used to locate step boundaries, training always uses the sampled ids)."""
    return [len(tok.decode(ids[:j])) for j in range(len(ids))]


# ----------------------------------------------------------------------------------------------
# Robust reward calls: exceptions, NaN / inf and hangs become counted failures


def safe_reward(fn, *args, timeout_s: float | None = None, failure_value: float = 0.0):
    """Call a reward function so that nothing it does can crash or stall training.

    fn(*args) -> float or (float, info). Returns (value, status, info), status in
    ok | error (raised) | nan (NaN / inf / not a number) | timeout; on failure value = failure_value.
    timeout_s=None: called inline (for rewards that bound themselves, e.g. the code sandbox, which
    kills its own process group). Otherwise under V.call_with_timeout: a forked child SIGKILLed
    after timeout_s (the one time limit of the project; it stops hangs inside C code too).
    """
    if timeout_s is None:
        try:
            res, status, err = fn(*args), "ok", None
        except Exception as e:  # noqa: BLE001
            res, status, err = None, "error", repr(e)[:500]
    else:
        res, status, err = V.call_with_timeout(fn, *args, timeout_s=timeout_s)
    return reward_outcome(res, status, err, failure_value)


def reward_outcome(res, status: str, err, failure_value: float):
    """A raw reward call (result, status, error) -> (value, status, info): failures, non-numbers
    and NaN / inf become failure_value with their status (see safe_reward)."""
    if status != "ok":
        return failure_value, status, ({"error": err} if err else {})
    info = {}
    if isinstance(res, tuple):
        res, info = res[0], (res[1] if len(res) > 1 and isinstance(res[1], dict) else {})
    try:
        value = float(res)
    except (TypeError, ValueError):
        return failure_value, "nan", {"error": f"reward returned {type(res).__name__}"}
    if not math.isfinite(value):
        return failure_value, "nan", info
    return value, "ok", info


# ----------------------------------------------------------------------------------------------
# Data: prompts of each sub-stage kind


def stage_prompts(kind: str, path: str, tok, cfg: Config) -> list[dict]:
    """Rows of a prompts file -> [{"prompt_ids": [...], "row": {...}}]; the prompt is a user turn."""
    req = {"stem": ("question", "answer"), "code": ("prompt", "tests"), "pref": ("prompt",), "toy": ()}[kind]
    rows = C.read_jsonl(C.resolve_path(path), required=req)
    out = []
    for r in rows:
        if kind == "stem":
            text = r["question"] + cfg.math_instruction
        elif kind == "toy":
            text = r.get("question") or r.get("prompt") or json.dumps(r)[:200]
        else:
            text = r["prompt"]
        out.append({"prompt_ids": C.chat_prompt_ids(tok, [{"role": "user", "content": text}]), "row": r})
    return out


def select_prompts(prompts: list[dict], max_difficulty: int, path: str) -> list[dict]:
    """Keep the prompts a small policy can sometimes solve: rows with difficulty <= max_difficulty
    (-1 keeps all; a row without a 'difficulty' field is kept). A GRPO group whose G rewards are
    all 0 has zero advantage and teaches nothing, so a curriculum of reachable prompts is what makes
    a short run learn (DAPO's dynamic sampling is the online version, at the price of more sampling)."""
    if max_difficulty < 0:
        return prompts
    kept = [p for p in prompts if int(p["row"].get("difficulty", 0)) <= max_difficulty]
    if not kept:
        raise ValueError(f"{path}: no prompt has difficulty <= {max_difficulty}")
    return kept


def make_reward_fn(kind: str, cfg: Config, rm_scorer=None):
    """A batch reward for one sub-stage kind:
    fn(items, texts, ids) -> (rewards [n] list, statuses [n], infos [n])."""
    def per_sample(fn, timeout):
        def batch(items, texts, ids):
            if timeout is None:
                res = [safe_reward(fn, it["row"], t, failure_value=cfg.failure_reward) for it, t in zip(items, texts)]
            else:  # the whole batch in one guarded child (V.map_with_timeout), not one fork per reward
                raw = V.map_with_timeout(fn, [(it["row"], t) for it, t in zip(items, texts)], timeout)
                res = [reward_outcome(*r, cfg.failure_reward) for r in raw]
            return [r[0] for r in res], [r[1] for r in res], [r[2] for r in res]
        return batch

    if kind == "stem":
        try:  # import the symbolic verifier once here, not in every forked reward worker (~4 s each)
            import math_verify  # noqa: F401
        except ImportError:
            pass
        return per_sample(lambda row, t: math_reward(t, str(row["answer"]), row["question"]), cfg.reward_timeout_s)
    if kind == "code":  # the whole batch through the sandbox pool; the sandbox bounds itself
        def code_batch(items, texts, ids):
            jobs = [{"code": sandbox.extract_code(t), "tests": it["row"]["tests"],
                     "entry_point": it["row"].get("entry_point")} for it, t in zip(items, texts)]
            res = sandbox.run_code_tests_batch(jobs, cfg.code_workers, timeout_s=cfg.code_timeout_s,
                                               all_or_nothing=cfg.code_all_or_nothing)
            return [r for r, _ in res], ["ok"] * len(res), [info for _, info in res]
        return code_batch
    if kind == "toy":
        return per_sample(lambda row, t: toy_reward(t), None)
    if kind == "pref":
        if rm_scorer is None:
            raise ValueError("a pref sub-stage needs a reward model (--reward_model, or run --mode train_reward_model)")

        def batch(items, texts, ids):
            vals, st, infos = [], [], []
            try:
                scores = rm_scorer([it["prompt_ids"] for it in items], ids)
            except Exception as e:  # noqa: BLE001
                return [cfg.failure_reward] * len(items), ["error"] * len(items), [{"error": repr(e)}] * len(items)
            for s in scores:
                ok = math.isfinite(s)
                vals.append(s if ok else cfg.failure_reward)
                st.append("ok" if ok else "nan")
                infos.append({})
            return vals, st, infos
        return batch
    raise ValueError(kind)


# ----------------------------------------------------------------------------------------------
# Batching rollouts for the model: prompts left-padded, responses right-padded


def collate_rollout(prompt_ids: list[list[int]], tokens: torch.Tensor, lengths: torch.Tensor, pad_id: int):
    """Build model inputs from prompts and the EXACT sampled response ids (no re-encoding).

    prompt_ids: n lists; tokens: [n, T] sampled ids (pad after each end); lengths: [n].
    Returns input_ids / attention_mask / position_ids / labels [n, P+T] and P: prompts are
    left-padded to P, so response token t of every row sits at column P + t; labels = the response
    ids where t < length, IGNORE elsewhere; position ids count real tokens only.
    """
    n, T = tokens.shape
    P = max(len(p) for p in prompt_ids)
    ids = torch.full((n, P + T), pad_id, dtype=torch.long)
    attn = torch.zeros((n, P + T), dtype=torch.long)
    for i, p in enumerate(prompt_ids):
        ids[i, P - len(p):P] = torch.tensor(p, dtype=torch.long)
        attn[i, P - len(p):P] = 1
    ids[:, P:] = tokens
    resp = torch.arange(T)[None, :] < lengths[:, None]
    attn[:, P:] = resp.long()
    labels = torch.full_like(ids, C.IGNORE)
    labels[:, P:] = torch.where(resp, tokens, torch.full_like(tokens, C.IGNORE))
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": ids, "attention_mask": attn, "position_ids": pos, "labels": labels}, P


def pack_rollout(prompt_ids: list[list[int]], tokens: torch.Tensor, lengths: torch.Tensor, pad_id: int,
                 row_factor: int = 2):
    """The same rollout micro-batch as `collate_rollout`, packed: each (prompt + response) whole,
    several to a row of at most `row_factor` x the longest one's length, longest first
    (C.pack_plan), position ids restarting at 0 per sample so the mask is block-diagonal (PITFALLS
    #13). Why: left-padding prompts to the longest and responses to the longest computes every row
    at P + T positions; rows of 2 x the longest sample keep the attention's extra (masked) work small.
    Returns the batch (input_ids / position_ids / labels [R, L], no attention_mask) and `where`
    [n, T]: the flat index into [R * L] of response token t of sample i, -1 past its length."""
    n, T = tokens.shape
    seqs = [list(p) + tokens[i, :int(lengths[i])].tolist() for i, p in enumerate(prompt_ids)]
    order = sorted(range(n), key=lambda i: -len(seqs[i]))
    rows = [[order[j] for j in g] for g in C.pack_plan([len(seqs[i]) for i in order],
                                                       row_factor * max(len(x) for x in seqs))]
    L = max(sum(len(seqs[i]) for i in g) for g in rows)  # no column that is padding in every row,
    L = -(-L // C.LENGTH_MULTIPLE) * C.LENGTH_MULTIPLE  # but a length seen before (C.collate's docstring)
    ids = torch.full((len(rows), L), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), L), C.IGNORE, dtype=torch.long)
    pos = torch.zeros((len(rows), L), dtype=torch.long)
    where = torch.full((n, T), -1, dtype=torch.long)
    for r, group in enumerate(rows):
        c = 0
        for i in group:
            m, P = len(seqs[i]), len(prompt_ids[i])
            ids[r, c:c + m] = torch.tensor(seqs[i], dtype=torch.long)
            labels[r, c + P:c + m] = ids[r, c + P:c + m]
            pos[r, c:c + m] = torch.arange(m)
            where[i, :m - P] = r * L + c + P + torch.arange(m - P)
            c += m
        pos[r, c:] = torch.arange(L - c) + (pos[r, c - 1] + 1)  # padding continues the last sample
    return {"input_ids": ids, "position_ids": pos, "labels": labels}, where


def response_forward(model: nn.Module, prompt_ids, tokens, lengths, pad_id: int, temperature: float,
                     device, return_values: bool = False) -> dict:
    """Per-response-token logp / entropy (and values) [n, T] of a LogProbModel / ActorCritic on a
    rollout micro-batch, at the sampling temperature (PITFALLS #5), computed on packed rows
    (`pack_rollout`) and scattered back; 0 past each response's length. A ScalarHeadModel
    (separate critic) returns {"values"} only."""
    batch, where = pack_rollout(prompt_ids, tokens, lengths, pad_id)
    batch, where = {k: v.to(device) for k, v in batch.items()}, where.to(device)
    valid = where >= 0

    def unpack(x):  # [R, L] -> [n, T]
        return torch.where(valid, x.reshape(-1)[where.clamp(min=0)], x.new_zeros(()))
    if isinstance(model, ScalarHeadModel):
        return {"values": unpack(shift_right(model(batch["input_ids"], batch["position_ids"])))}
    kw = {"return_values": True} if return_values else {}
    out = model(batch["input_ids"], batch["labels"], position_ids=batch["position_ids"],
                temperature=temperature, **kw)
    return {k: unpack(v) for k, v in out.items()}


def rm_scores(rm: ScalarHeadModel, prompt_ids: list[list[int]], response_ids: list[list[int]], pad_id: int,
              device) -> torch.Tensor:
    """Reward model score of each (prompt + response) at its LAST REAL token, found from the
    lengths (never by searching for pad ids: pad == eos, PITFALLS #7). Right-padded batch. [n]."""
    seqs = [list(p) + list(r) for p, r in zip(prompt_ids, response_ids)]
    lens = torch.tensor([len(s) for s in seqs])
    L = int(lens.max())
    ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
    pos = torch.arange(L)[None, :].expand(len(seqs), L)
    s = rm(ids.to(device), pos.to(device))  # right padding + causal: real positions never see pads
    return s.gather(1, (lens - 1).to(device)[:, None]).squeeze(1)


# ----------------------------------------------------------------------------------------------
# Loop: one RL sub-stage = steps of rollout -> score -> update


@dataclass
class Rollout:
    """One rank's rollouts of one step. n = B x G rows: B prompts (this rank's share of
    --prompts_per_step), G = group_size samples each; rows g*G .. g*G + G-1 are prompt g's group.
    T = the longest sampled response.

    prompt_ids: n lists      the prompt ids of each row
    tokens:     [n, T] long  the EXACT sampled response ids, pad after each end (PITFALLS #10)
    gen_logp:   [n, T] fp32  the sampler's log-probs of those ids, 0 after the end
    lengths:    [n] long     response tokens, including the EOS when one was sampled
    finished:   [n] bool     True when an EOS (or stop string) was sampled; False = truncated
    rewards:    [n] fp64     the task reward (verifier, sandbox or reward model)
    items, texts, infos      prompt items, decoded responses (for rewards and logs only), reward infos
    stats                    sums over this rank: reward failures, groups sampled, zero-std groups
    """
    G: int
    prompt_ids: list
    tokens: torch.Tensor
    gen_logp: torch.Tensor
    lengths: torch.Tensor
    finished: torch.Tensor
    rewards: torch.Tensor
    items: list
    texts: list
    infos: list
    stats: dict


def _pad_cat(ts: list[torch.Tensor], pad) -> torch.Tensor:
    T = max(t.shape[1] for t in ts)
    return torch.cat([F.pad(t, (0, T - t.shape[1]), value=pad) for t in ts], 0)


def sample_groups(policy, items: list[dict], cfg: Config, tok, d: C.Dist, seeds: list[int]):
    """Sample G completions for each prompt item. Returns (tokens, logp, lengths, finished)."""
    pad, eos = tok.pad_token_id, tok.eos_token_id
    stop = list(cfg.stop_strings)
    kw = dict(max_new_tokens=cfg.max_new_tokens, eos_ids=eos, pad_id=pad, temperature=cfg.temperature,
              top_p=cfg.top_p, stop_strings=stop, tok=tok if stop else None)
    if not cfg.reproducible_rollouts:
        prompts = [it["prompt_ids"] for it in items for _ in range(cfg.group_size)]
        gens = [S.generate(policy, prompts, **kw)]
    else:
        gens = [S.generate(policy, [it["prompt_ids"]] * cfg.group_size,
                           generator=torch.Generator(device=d.device).manual_seed(s), **kw) for it, s in zip(items, seeds)]
    return (_pad_cat([g.tokens for g in gens], pad), _pad_cat([g.logp for g in gens], 0.0),
            torch.cat([g.lengths for g in gens]), torch.cat([g.finished for g in gens]))


def sample_and_reward(policy, pending: list, reward_fn, cfg: Config, tok, d: C.Dist, dtype, stats: dict) -> list[dict]:
    """Sample G responses for each (prompt item, seed) in `pending` with the parameters gathered
    once (PITFALLS #12), decode them for the reward only, and reward them. Returns one group each."""
    G, t0 = cfg.group_size, time.time()
    with S.gathered_for_generation(policy), torch.no_grad(), S.sampling_model(policy, d, dtype) as sampler:
        if pending:
            policy.eval()
            toks, glogp, lens, fin = sample_groups(sampler, [p for p, _ in pending], cfg, tok, d, [s for _, s in pending])
            policy.train()
    stats["gen_time"] += time.time() - t0
    if not pending:
        return []
    stats["gen_tokens"] += int(lens.sum())
    ids = [toks[i, :lens[i]].tolist() for i in range(len(lens))]
    texts = [tok.decode(x, skip_special_tokens=True) for x in ids]
    t1 = time.time()
    rew, status, infos = reward_fn([p for p, _ in pending for _ in range(G)], texts, ids)
    stats["reward_time"] += time.time() - t1
    for s in status:
        if s != "ok":
            stats[f"reward_fail_{s}"] += 1
    return [{"item": pending[g][0], "tokens": toks[g * G:(g + 1) * G], "logp": glogp[g * G:(g + 1) * G],
             "lengths": lens[g * G:(g + 1) * G], "finished": fin[g * G:(g + 1) * G], "rewards": rew[g * G:(g + 1) * G],
             "texts": texts[g * G:(g + 1) * G], "infos": infos[g * G:(g + 1) * G]} for g in range(len(pending))]


def rollout(policy, prompts: list[dict], reward_fn, cfg: Config, tok, d: C.Dist, dtype, stage_idx: int,
            step: int) -> Rollout:
    """Step 1: B prompts from the seeded stream, G samples each, rewarded. With --dynamic_sampling
    (DAPO), groups whose G rewards are all equal are dropped and refilled with new prompts, at most
    --max_resample rounds (every rank takes part in every round; ranks agree through a collective);
    when refills run out the zero-variance groups are kept (they have no gradient)."""
    B = cfg.prompts_per_step // d.world_size
    base = step * cfg.prompts_per_step + d.rank * B
    idx = C.epoch_stream_indices(len(prompts), base, B, cfg.seed + stage_idx)
    pending = [(prompts[i], C.seed_for(cfg.seed, stage_idx, base + j)) for j, i in enumerate(idx)]
    stats = {"reward_fail_error": 0, "reward_fail_nan": 0, "reward_fail_timeout": 0, "gen_time": 0.0, "reward_time": 0.0,
             "gen_tokens": 0, "groups_sampled": 0, "zero_std_groups": 0, "groups_first": 0}
    kept, rejected = [], []
    for attempt in range(cfg.max_resample + 1):
        groups = sample_and_reward(policy, pending, reward_fn, cfg, tok, d, dtype, stats)
        stats["groups_sampled"] += len(groups)
        for g in groups:
            zero = max(g["rewards"]) - min(g["rewards"]) <= 1e-12
            if attempt == 0:
                stats["zero_std_groups"] += zero
                stats["groups_first"] += 1
            (rejected if (cfg.dynamic_sampling and zero) else kept).append(g)
        missing = B - len(kept)
        if C.all_reduce_dict({"missing": missing}, d)["missing"] == 0 or attempt == cfg.max_resample:
            break
        rng = torch.Generator().manual_seed(C.seed_for(cfg.seed, stage_idx, step, d.rank, attempt))
        refill = torch.randint(len(prompts), (missing,), generator=rng).tolist()
        pending = [(prompts[i], C.seed_for(cfg.seed, stage_idx, step, d.rank, attempt, j)) for j, i in enumerate(refill)]
    kept = (kept + rejected)[:B]
    G = cfg.group_size
    return Rollout(G=G, prompt_ids=[g["item"]["prompt_ids"] for g in kept for _ in range(G)],
                   tokens=_pad_cat([g["tokens"] for g in kept], tok.pad_token_id),
                   gen_logp=_pad_cat([g["logp"] for g in kept], 0.0),
                   lengths=torch.cat([g["lengths"] for g in kept]), finished=torch.cat([g["finished"] for g in kept]),
                   rewards=torch.tensor([r for g in kept for r in g["rewards"]], dtype=torch.float64),
                   items=[g["item"] for g in kept for _ in range(G)], texts=[t for g in kept for t in g["texts"]],
                   infos=[x for g in kept for x in g["infos"]], stats=stats)


def shape_rewards(task_reward: torch.Tensor, fmt: torch.Tensor, lengths: torch.Tensor, kl_tok: torch.Tensor,
                  format_weight: float, overlong: str, overlong_weight: float, overlong_max_len: int,
                  overlong_cache: int, kl_coef: float, kl_in: str) -> dict[str, torch.Tensor]:
    """The reward each response is trained on, from its parts (pure; all [n] unless noted):

        total_i      = task_i + w_fmt * fmt_i + w_long * overlong_penalty(L_i)   (penalty: DAPO eq. 13,
                       only with overlong == "penalty")
        seq_i        = total_i - beta * sum_t kl_{i,t}          (KL in the reward; GRPO's scalar)
        tok_{i,t}    = -beta * kl_{i,t} + total_i [t == L_i - 1] (PPO: per token, [n, T]; the scalar
                       reward on the last real token, found from lengths: pad == eos, PITFALLS #7)
    task_reward, fmt: [n] fp64; lengths: [n]; kl_tok: [n, T] the chosen estimator, 0 where not
    trained (all zeros unless kl_in == "reward"); beta = kl_coef.
    """
    total = task_reward + format_weight * fmt
    if overlong == "penalty":
        total = total + overlong_weight * torch.tensor(
            [overlong_penalty(int(L), overlong_max_len, overlong_cache) for L in lengths], dtype=torch.float64)
    beta = kl_coef if kl_in == "reward" else 0.0
    tok_reward = -beta * kl_tok.double()
    tok_reward[torch.arange(len(lengths)), (lengths - 1).clamp(min=0)] += total
    return {"total": total, "seq": total - beta * kl_tok.double().sum(1), "tok": tok_reward.float()}


def micro_batch_args(ro: Rollout, mb: list[int], cfg: Config, tok, d: C.Dist) -> tuple[int, tuple]:
    """(Tm, the positional arguments of `response_forward`) for rows `mb` of a rollout, cut to
    their longest response Tm (no forward pass over columns that are padding in every row)."""
    Tm = int(ro.lengths[mb].max())
    return Tm, ([ro.prompt_ids[i] for i in mb], ro.tokens[mb, :Tm], ro.lengths[mb], tok.pad_token_id,
                cfg.temperature, d.device)


def forward_old(policy, ref, critic, ro: Rollout, cfg: Config, tok, d: C.Dist, dtype, need_old: bool,
                use_ref: bool, shared_values: bool, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """old_logp, ref_logp, old_values [n, T] of the rollout under the current policy, the frozen
    reference and the critic, micro-batch by micro-batch, without gradients (zeros where unused).
    Rows whose loss mask `mask` [n, T] is all 0 (truncated under --overlong masked) are not run:
    every use of these tensors is multiplied by the row's mask (`rows_to_run` pads the live rows
    to the same number of micro-batches on every rank, as FSDP2's collectives need)."""
    n, T = ro.tokens.shape
    out = {"old_logp": torch.zeros(n, T), "ref_logp": torch.zeros(n, T), "old_values": torch.zeros(n, T)}
    if not (need_old or use_ref):
        return out
    rows = rows_to_run(list(range(n)), mask, mask, False, cfg.micro_batch_size, d)  # pg_only False: adv unread
    with torch.no_grad(), C.fwd_context(policy, d, dtype):
        for i in range(0, len(rows), cfg.micro_batch_size):
            mb = rows[i:i + cfg.micro_batch_size]
            Tm, args = micro_batch_args(ro, mb, cfg, tok, d)
            if need_old:
                o = response_forward(policy, *args, return_values=shared_values)
                out["old_logp"][mb, :Tm] = o["logp"].float().cpu()
                if shared_values:
                    out["old_values"][mb, :Tm] = o["values"].float().cpu()
            if use_ref:
                out["ref_logp"][mb, :Tm] = response_forward(ref, *args)["logp"].float().cpu()
            if critic is not None:
                out["old_values"][mb, :Tm] = response_forward(critic, *args)["values"].float().cpu()
    return out


def s2r_token_advantages(ro: Rollout, seq_reward: torch.Tensor, tok, cfg: Config) -> torch.Tensor:
    """[n, T] GRPO advantages of S2R responses: every token gets the advantage of the step
    (attempt / verification) it lies in (process_advantages); other responses the outcome one.
    --s2r_train attempts: the verification steps get 0 (`attempts_only`)."""
    n, T = ro.tokens.shape
    steps = [x.get("steps", []) for x in ro.infos]
    padv = process_advantages([[s["reward"] for s in st] for st in steps], seq_reward, ro.G, cfg.s2r_reward,
                              cfg.std_norm)
    if cfg.s2r_train == "attempts":
        padv = attempts_only(padv, steps)
    out_adv, _ = group_advantages(seq_reward, ro.G, cfg.std_norm)
    adv = torch.zeros(n, T)
    for i in range(n):
        L = int(ro.lengths[i])
        if not steps[i]:
            adv[i, :L] = float(out_adv[i]) if cfg.s2r_reward != "process" else 0.0
            continue
        k = token_step_index(char_offsets(tok, ro.tokens[i, :L].tolist()), steps[i])
        adv[i, :L] = torch.tensor([padv[i][j] for j in k], dtype=torch.float32)
    return adv


def score(ro: Rollout, policy, ref, critic, cfg: Config, kind: str, tok, d: C.Dist, dtype, rm_norm: dict) -> dict:
    """Step 2: the loss mask, old / reference log-probs and values, shaped rewards (reward-model
    scores normalised for pref), and advantages: GRPO group advantages (or S2R process advantages)
    of the sequence reward, or PPO's GAE over the critic's values, whitened over the global batch.
    `rm_norm` holds the running moments of the reward model's scores (updated in place)."""
    n, T = ro.tokens.shape
    use_ref = ref is not None and cfg.kl_coef > 0
    shared_values = cfg.algo == "ppo" and cfg.critic == "head"
    need_old = not single_update(cfg)
    b = {"mask": rollout_mask(ro.lengths, ro.finished, T, cfg.overlong), "use_ref": use_ref}
    b.update(forward_old(policy, ref, critic, ro, cfg, tok, d, dtype, need_old, use_ref, shared_values,
                         b["mask"]))
    task_reward = ro.rewards.clone()
    if kind == "pref" and cfg.rm_norm != "none":  # reward-model scores have no fixed scale
        s = C.all_reduce_dict({"s": ro.rewards.sum(), "s2": (ro.rewards ** 2).sum(), "c": n}, d)
        mean, var = s["s"] / s["c"], max(s["s2"] / s["c"] - (s["s"] / s["c"]) ** 2, 0.0)
        if cfg.rm_norm == "running":
            rm_norm["mean"], rm_norm["var"], rm_norm["count"] = running_moments_update(
                rm_norm["mean"], rm_norm["var"], rm_norm["count"], mean, var, s["c"])
            mean, var = rm_norm["mean"], rm_norm["var"]
        task_reward = (task_reward - mean) / math.sqrt(var + 1e-8)
    kl_tok = torch.zeros(n, T)
    if use_ref and cfg.kl_in == "reward":  # before the first update the sampler's log-probs are the old ones
        kl_tok = kl_estimators(b["old_logp"] if need_old else ro.gen_logp, b["ref_logp"])[cfg.kl_estimator] * b["mask"]
    b["fmt"] = torch.tensor([format_reward(t, kind) for t in ro.texts], dtype=torch.float64)
    r = shape_rewards(task_reward, b["fmt"], ro.lengths, kl_tok, cfg.format_weight, cfg.overlong, cfg.overlong_weight,
                      cfg.overlong_max_len, cfg.overlong_cache, cfg.kl_coef, cfg.kl_in)
    b["total"] = r["total"]
    if cfg.algo == "grpo":
        per_step = cfg.s2r_reward != "outcome" or cfg.s2r_train != "all"  # advantages differ between steps
        if kind == "stem" and per_step and any("steps" in x for x in ro.infos):
            adv = s2r_token_advantages(ro, r["seq"], tok, cfg)
        else:
            adv = group_advantages(r["seq"], ro.G, cfg.std_norm)[0].float()[:, None].expand(n, T).clone()
        b["returns"] = torch.zeros(n, T)
    else:
        real = (torch.arange(T)[None] < ro.lengths[:, None]).float()
        adv, b["returns"] = gae(r["tok"], b["old_values"], real, cfg.gamma, cfg.lam)
        if cfg.whiten_adv:
            moments = C.all_reduce_sum(masked_moments(adv, b["mask"]), d)
            adv = whiten(adv, b["mask"], moments=moments).float()
    b["adv"] = adv * b["mask"]
    b["sampler_diff"] = ((b["old_logp"] - ro.gen_logp).abs() * b["mask"]).sum().item() if need_old else None
    return b


def single_update(cfg: Config) -> bool:
    """GRPO with one optimizer step per rollout: the policy has not moved, so old_logp = logp.detach()
    (exactly on-policy) and the old-policy forward pass is skipped."""
    return cfg.algo == "grpo" and cfg.ppo_epochs * cfg.num_minibatches == 1


def rl_loss(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor, n_global: float,
            cfg: Config, ref_logp: torch.Tensor | None = None, values: torch.Tensor | None = None,
            old_values: torch.Tensor | None = None, returns: torch.Tensor | None = None,
            n_tok: float = 1.0, vf_coef: float = 1.0, gen_logp: torch.Tensor | None = None):
    """The loss of one micro-batch, assembled from the policy, KL and value terms (pure tensors;
    cfg only supplies the coefficients):

        GRPO:  L = agg(l^clip) + beta * agg(k)                         (k: --kl_estimator, kl_in == loss)
        PPO:   L = agg(l^clip) + c_v * L_V(values, old_values, returns)  [+ beta * agg(k)]
    l^clip is `policy_loss` (clipped surrogate, clip-higher, dual-clip), agg is `aggregate` with the
    GLOBAL normaliser n_global of the optimizer step, L_V is `value_loss` over n_tok global trained
    tokens; c_v = vf_coef (the shared head's --vf_coef, 1 for a separate critic). All tensors
    [b, T]; values etc. only for PPO, ref_logp only with a reference, gen_logp (the sampler's) only
    with --tis_cap > 0. Returns (loss, stats) with detached SUMS for logging.
    """
    w = truncated_is_weight(old_logp, gen_logp, cfg.tis_cap) if cfg.tis_cap > 0 and gen_logp is not None else None
    pl, stats = policy_loss(logp, old_logp, adv, mask, cfg.clip_low, cfg.clip_high, cfg.loss_agg, n_global,
                            float(cfg.loss_norm_len), cfg.clip_ratio_c, cfg.max_log_ratio, is_weight=w)
    loss = pl
    stats["pg_loss"] = pl.detach()
    if w is not None:
        stats.update(tis_weight=(w * mask).sum(), tis_capped=((w >= cfg.tis_cap) * mask).sum())
    if ref_logp is not None:
        kls = kl_estimators(logp, ref_logp)
        if cfg.kl_in == "loss":
            loss = loss + cfg.kl_coef * aggregate(kls[cfg.kl_estimator], mask, cfg.loss_agg, n_global,
                                                  float(cfg.loss_norm_len))
        stats.update({k: (kls[k].detach() * mask).sum() for k in ("k1", "k2", "k3")})
    if values is not None:
        vl, vst = value_loss(values, old_values, returns, mask, cfg.value_clip, n_tok)
        loss = loss + vf_coef * vl
        stats.update(vloss=vl.detach(), vf_clipped=vst["vf_clipped"])
    return loss, stats


def rows_to_run(rows: list[int], mask: torch.Tensor, adv: torch.Tensor, pg_only: bool, micro_batch_size: int,
                d: C.Dist) -> list[int]:
    """The rows of a minibatch the update runs forward and backward: first those that can move the
    policy, then, only to give every rank the same number of micro-batches (FSDP2's collectives
    must match), as many of the others as that takes. A row moves nothing when none of its
    tokens is trained (mask all 0: a truncated response under --overlong masked), or, when the
    loss is the policy-gradient term alone (pg_only: GRPO without a reference KL), when its
    advantage is 0 everywhere (a group whose rewards are all equal). Skipping them is exact: the
    normaliser counts every row of the minibatch before this, and their gradient is exactly 0.
    In the pipeline's stage 4 (--overlong masked) 28-97% of a step's rows were truncated, and 25-100% of
    its groups had equal rewards: each such row used to cost a full forward and backward.
    mask, adv: [n, T]; returns row indices, live ones first."""
    live = [i for i in rows if mask[i].any() and (not pg_only or bool(adv[i].any()))]
    dead = sorted(set(rows) - set(live))
    n_mb = max(C.gather_objects([-(-len(live) // micro_batch_size)], d))
    return (live + dead)[:n_mb * micro_batch_size]


def update(policy, critic, opt, critic_opt, ro: Rollout, b: dict, cfg: Config, tok, d: C.Dist, dtype,
           lr: float, gstep: int) -> dict:
    """Step 3: --ppo_epochs passes over --num_minibatches minibatches, one optimizer step each.
    Minibatch k holds rows k, k+M, ... of this rank (strided: the global minibatches do not depend
    on the world size); every micro-batch loss is divided by the GLOBAL normaliser of its optimizer
    step (all micro-batches, all ranks), so 1 process x accumulation N == N processes (PITFALLS #1).
    Returns the summed statistics of this rank (reduced by the caller) and the last grad norm."""
    n = ro.tokens.shape[0]
    mask, shared_values, one = b["mask"], cfg.algo == "ppo" and cfg.critic == "head", single_update(cfg)
    acc = {k: 0.0 for k in ("ratio_sum", "clipped", "dual_clipped", "tokens", "ppo_kl_k1", "ppo_kl_k3", "k1", "k2", "k3", "entropy",
                            "vloss", "vf_clipped", "pg_loss", "logp_diff_sampler", "loss", "train_tokens",
                            "tis_weight", "tis_capped")}
    policy.train()
    gnorm = 0.0
    for epoch in range(cfg.ppo_epochs):
        for k in range(cfg.num_minibatches):
            rows = list(range(k, n, cfg.num_minibatches))
            norms = C.all_reduce_dict({"n_global": normaliser_count(mask[rows], cfg.loss_agg),
                                       "n_tok": mask[rows].sum()}, d)
            rows = rows_to_run(rows, mask, b["adv"], cfg.algo == "grpo" and not b["use_ref"], cfg.micro_batch_size, d)
            loss_step = 0.0
            for j in range(0, len(rows), cfg.micro_batch_size):
                mb = rows[j:j + cfg.micro_batch_size]
                Tm, args = micro_batch_args(ro, mb, cfg, tok, d)
                with C.fwd_context(policy, d, dtype):
                    out = response_forward(policy, *args, return_values=shared_values)
                    vals = out["values"].float() if shared_values else None
                    if critic is not None:
                        vals = response_forward(critic, *args)["values"].float()
                logp = out["logp"].float()
                dev = lambda x: x[mb, :Tm].to(logp.device)  # noqa: E731
                m = dev(mask)
                loss, st = rl_loss(logp, logp.detach() if one else dev(b["old_logp"]), dev(b["adv"]), m,
                                   norms["n_global"], cfg,
                                   ref_logp=dev(b["ref_logp"]) if (b["use_ref"]) else None,
                                   values=vals, old_values=dev(b["old_values"]) if vals is not None else None,
                                   returns=dev(b["returns"]) if vals is not None else None, n_tok=norms["n_tok"],
                                   vf_coef=cfg.vf_coef if shared_values else 1.0, gen_logp=dev(ro.gen_logp))
                loss.backward()
                loss_step += loss.item()
                for key, v in st.items():
                    acc[key] += float(v)
                acc["loss"] += loss.item()
                acc["entropy"] += float((out["entropy"].detach() * m).sum())
                if one:  # logp before the update == old: compare with the sampler (PITFALLS #19)
                    acc["logp_diff_sampler"] += float(((logp.detach() - dev(ro.gen_logp)).abs() * m).sum())
                acc["train_tokens"] += int(args[2].sum()) + sum(len(p) for p in args[0])
            C.check_finite(C.all_reduce_dict({"loss": loss_step}, d)["loss"], gstep)
            gnorm = C.optimizer_step(policy, opt, lr, cfg.max_grad_norm)
            if critic is not None:
                C.optimizer_step(critic, critic_opt, cfg.critic_lr, cfg.max_grad_norm)
    if b["sampler_diff"] is not None:
        acc["logp_diff_sampler"] = b["sampler_diff"]
    return {"acc": acc, "grad_norm": gnorm}


def step_metrics(ro: Rollout, b: dict, up: dict, cfg: Config, d: C.Dist, t_upd: float) -> dict:
    """The logged statistics of one step: every sum reduced over ranks in ONE collective, then
    turned into means (per response, or per trained token for ratio / clip / KL / entropy)."""
    n = ro.tokens.shape[0]
    verify = [st["reward"] for x in ro.infos for st in x.get("steps", []) if st["kind"] == "verify"]
    sums = {**up["acc"], **{k: v for k, v in ro.stats.items()}, "verify_n": len(verify), "verify_right": sum(verify),
            "n": n, "r": ro.rewards.sum(), "r2": (ro.rewards ** 2).sum(), "len": ro.lengths.sum(),
            "truncated": (~ro.finished).sum(), "mask": b["mask"].sum(), "total": b["total"].sum(), "fmt": b["fmt"].sum()}
    s = C.all_reduce_dict(sums, d)
    W, N, ntok = d.world_size, max(s["n"], 1.0), max(s["tokens"], 1.0)
    n_updates = cfg.ppo_epochs * cfg.num_minibatches
    mean_r = s["r"] / N
    return {
        "algo": cfg.algo, "reward_mean": mean_r, "reward_std": math.sqrt(max(s["r2"] / N - mean_r ** 2, 0.0)),
        "total_reward_mean": s["total"] / N, "format_rate": s["fmt"] / N, "resp_len_mean": s["len"] / N,
        "trained_len_mean": s["mask"] / N, "truncated_frac": s["truncated"] / N,
        # S2R process level: verifications per response, and the fraction whose verdict was right
        "verify_per_resp": s["verify_n"] / N, "verify_reward_mean": s["verify_right"] / max(s["verify_n"], 1.0),
        "zero_std_group_frac": s["zero_std_groups"] / max(s["groups_first"], 1.0), "groups_sampled": s["groups_sampled"],
        "ratio_mean": s["ratio_sum"] / ntok, "clip_frac": s["clipped"] / ntok, "dual_clip_frac": s["dual_clipped"] / ntok,
        "ppo_kl_k1": s["ppo_kl_k1"] / ntok, "ppo_kl_k3": s["ppo_kl_k3"] / ntok,
        "kl_k1": s["k1"] / ntok, "kl_k2": s["k2"] / ntok, "kl_k3": s["k3"] / ntok, "entropy": s["entropy"] / ntok,
        # |trainer logp - sampler logp| before any update: ~1e-7 unless sampling and scoring differ
        "logp_diff_sampler": s["logp_diff_sampler"] / max(s["mask"], 1.0),
        "tis_weight_mean": s["tis_weight"] / ntok, "tis_capped_frac": s["tis_capped"] / ntok,
        "loss": s["loss"] / n_updates, "pg_loss": s["pg_loss"] / n_updates,  # mean over optimizer steps
        "value_loss": s["vloss"] / n_updates, "vf_clip_frac": s["vf_clipped"] / ntok if cfg.algo == "ppo" else 0.0,
        "reward_fail_error": s["reward_fail_error"], "reward_fail_nan": s["reward_fail_nan"],
        "reward_fail_timeout": s["reward_fail_timeout"], "grad_norm": up["grad_norm"],
        # per rank: sampled tokens / generation time; prompt + response tokens through forward+backward / update time
        "gen_tok_per_s": s["gen_tokens"] / max(s["gen_time"], 1e-9),
        "gen_s": s["gen_time"] / W, "reward_s": s["reward_time"] / W,  # parts of rollout_s
        "train_tok_per_s": s["train_tokens"] / max(t_upd, 1e-9) / W,
    }


def make_critic(policy, cfg: Config, d: C.Dist, dtype, resume_ckpt: Path | None):
    """A separate PPO value model (backbone copied from the current policy, zero head) and its
    AdamW; (None, None) unless --algo ppo --critic separate."""
    if not (cfg.algo == "ppo" and cfg.critic == "separate"):
        return None, None
    from transformers import AutoModelForCausalLM
    critic = ScalarHeadModel(AutoModelForCausalLM.from_config(policy.lm.config))
    nn.init.zeros_(critic.head.weight)
    if resume_ckpt is not None:  # every rank reads the file, before sharding
        critic.load_state_dict(torch.load(resume_ckpt / "critic.pt", map_location="cpu"))
    critic = C.shard_model(critic, d, dtype, cfg.activation_checkpointing)
    if resume_ckpt is None:  # the policy's backbone (its "lm.*" keys are the critic's too)
        full, _ = M.gather_full_state(policy, None)  # collective; under FSDP2 rank 0 holds it ...
        M.load_full_state(critic, {k: v for k, v in full.items() if k.startswith("lm.")}, d)  # ... and broadcasts
    return critic, C.make_optimizer(critic, cfg.critic_lr, cfg.weight_decay)


def rl_train(cfg: Config, kind: str, policy, ref, prompts: list[dict], reward_fn, tok, d: C.Dist, dtype,
             log: C.MetricsLogger, stage_idx: int, step0: int, ckpt_dir: Path | None = None,
             resume_ckpt: Path | None = None) -> dict:
    """Run cfg.max_steps RL steps of one sub-stage: rollout -> score -> update (`# step N` below).
    Returns {"steps", "last_rollout", "history"}.

    A fresh AdamW per sub-stage (moments reset: see "Deliberate simplifications"). With
    cfg.save_every, a checkpoint goes to ckpt_dir every N steps; resume_ckpt (one of those, whose
    model/ the policy was loaded from) continues from its step with the same optimizer, RNG, critic
    and reward normaliser, so the resumed run equals the uninterrupted one.
    """
    opt = C.make_optimizer(policy, cfg.lr, cfg.weight_decay)
    critic, critic_opt = make_critic(policy, cfg, d, dtype, resume_ckpt)
    rm_norm = {"mean": 0.0, "var": 1.0, "count": 0.0}
    history, ro, first_step = [], None, 0
    if resume_ckpt is not None:  # optimizer + RNG (+ critic) of the interrupted run
        state = M.load_checkpoint(resume_ckpt, policy, opt, d)
        first_step = int(state["step"])
        rm_norm["mean"], rm_norm["var"], rm_norm["count"] = state["rm_moments"]
        if critic is not None:
            M.load_optimizer_state(critic, critic_opt, torch.load(resume_ckpt / "critic_optimizer.pt",
                                                                  map_location="cpu", weights_only=False))
        C.print0(f"sub-stage {stage_idx}: resumed at step {first_step} from {resume_ckpt}")
    for step in range(first_step, cfg.max_steps):
        t_start = time.time()
        # step 1 rollout: G samples per prompt, exact ids kept, rewarded (dynamic sampling refills)
        ro = rollout(policy, prompts, reward_fn, cfg, tok, d, dtype, stage_idx, step)
        # step 2 score: mask, old / ref log-probs and values, shaped rewards, advantages
        t_score = time.time()
        b = score(ro, policy, ref, critic, cfg, kind, tok, d, dtype, rm_norm)
        # step 3 update: epochs x minibatches of rl_loss, each step normalised globally
        t_upd, lr = time.time(), C.lr_at(step, cfg.max_steps, cfg.warmup_steps, cfg.lr, cfg.min_lr_ratio)
        up = update(policy, critic, opt, critic_opt, ro, b, cfg, tok, d, dtype, lr, step0 + step)
        metrics = {"stage": stage_idx, "kind": kind, **step_metrics(ro, b, up, cfg, d, time.time() - t_upd),
                   "lr": lr, "step_s": time.time() - t_start, "rollout_s": t_score - t_start,
                   "score_s": t_upd - t_score, "update_s": time.time() - t_upd}
        log.log(step0 + step, metrics)
        history.append(metrics)
        if cfg.save_every and ckpt_dir is not None and (step + 1) % cfg.save_every == 0 and step + 1 < cfg.max_steps:
            extra = {}
            if critic is not None:  # collective under FSDP2: every rank gathers
                cmsd, cosd = M.gather_full_state(critic, critic_opt)
                extra = {"critic.pt": cmsd, "critic_optimizer.pt": cosd}
            M.save_checkpoint(ckpt_dir, step + 1, policy, tok, opt, d, cfg,
                              {"stage": stage_idx, "rm_moments": [rm_norm["mean"], rm_norm["var"], rm_norm["count"]]},
                              extra=extra)
    return {"steps": cfg.max_steps, "last_rollout": ro, "history": history}


# ----------------------------------------------------------------------------------------------
# Eval: held-out math accuracy, code pass rate, RM score, toy reward (greedy)


def evaluate(policy, tok, cfg: Config, d: C.Dist, dtype, kinds: list[str], rm_scorer=None) -> dict:
    """Greedy responses on held-out prompts; each rank takes items r::W, sums are all-reduced."""
    res = {}
    files = {"stem": cfg.math_test, "code": cfg.code_test, "pref": cfg.pref_test, "toy": cfg.math_test}
    for kind in kinds:
        items = stage_prompts(kind, files[kind], tok, cfg)[:cfg.eval_limit][d.rank::d.world_size]
        total, count = 0.0, float(len(items))
        if items:
            was_training = policy.training
            policy.eval()
            with S.gathered_for_generation(policy), torch.no_grad(), S.sampling_model(policy, d, dtype) as sampler:
                gen = S.generate(sampler, [it["prompt_ids"] for it in items], cfg.eval_max_new_tokens,
                                 eos_ids=tok.eos_token_id, pad_id=tok.pad_token_id, temperature=0.0)
            policy.train(was_training)
            ids = [gen.response_ids(i) for i in range(len(items))]
            texts = [tok.decode(x, skip_special_tokens=True) for x in ids]
            if kind == "pref":
                total = float(sum(rm_scorer([it["prompt_ids"] for it in items], ids)))
            else:
                fn = make_reward_fn(kind, dataclasses.replace(cfg, failure_reward=0.0))
                rewards, _, _ = fn(items, texts, ids)
                total = float(sum(rewards))
        else:  # this rank has no items but must still take part in the gather / reshard collectives
            with S.gathered_for_generation(policy):
                pass
        s = C.all_reduce_sum(torch.tensor([total, count], dtype=torch.float64), d).tolist()
        name = {"stem": "math_acc", "code": "code_pass", "pref": "rm_score", "toy": "toy_reward"}[kind]
        res[name], res[f"{name}_n"] = s[0] / max(s[1], 1.0), int(s[1])
    return res


# ----------------------------------------------------------------------------------------------
# Reward model training (--mode train_reward_model)


def pref_pairs(path: str, tok, max_len: int) -> tuple[list[tuple[list[int], list[int]]], int]:
    """{"prompt","chosen","rejected"} -> (prompt + chosen ids, prompt + rejected ids), in the SAME
    layout the RL loop scores: chat prompt ids + response ids + EOS. Over-long pairs are dropped
    (returned count)."""
    rows = C.read_jsonl(C.resolve_path(path), required=("prompt", "chosen", "rejected"))
    pairs, dropped = [], 0
    for r in rows:
        p = C.chat_prompt_ids(tok, [{"role": "user", "content": r["prompt"]}])
        c = p + tok(r["chosen"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        j = p + tok(r["rejected"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        if max(len(c), len(j)) > max_len:
            dropped += 1
            continue
        pairs.append((c, j))
    return pairs, dropped


def rm_pair_scores(rm, pairs, pad_id, device) -> tuple[torch.Tensor, torch.Tensor]:
    seqs = [c for c, _ in pairs] + [j for _, j in pairs]
    s = rm_scores(rm, [[]] * len(seqs), seqs, pad_id, device)
    return s[:len(pairs)], s[len(pairs):]


def rm_accuracy(rm, pairs, pad_id, device, d: C.Dist, dtype: torch.dtype, batch: int = 8) -> float:
    """Fraction of pairs with r(chosen) > r(rejected). Each rank scores pairs[rank::W] with the
    parameters gathered once (ranks may hold different numbers of pairs: no collective inside), in
    the precision RL scores with (`load_rm_scorer`: autocast in dtype), the pairs in order of length
    so that a batch holds little padding (SmolLM2 RM, 100 held-out pairs, 2 cores: 40 s in fp32 in
    the order of the file, 20 s in bf16, 13 s in bf16 sorted)."""
    mine = sorted(pairs[d.rank::d.world_size], key=lambda p: max(len(p[0]), len(p[1])))
    correct = 0.0
    rm.eval()
    with S.gathered_for_generation(rm), torch.no_grad(), C.fwd_context(rm, d, dtype):
        for i in range(0, len(mine), batch):
            rc, rr = rm_pair_scores(rm, mine[i:i + batch], pad_id, device)
            correct += float((rc > rr).sum())
    rm.train()
    s = C.all_reduce_sum(torch.tensor([correct, float(len(mine))], dtype=torch.float64), d).tolist()
    return s[0] / max(s[1], 1.0)


def train_reward_model(cfg: Config, d: C.Dist) -> dict:
    """Bradley-Terry reward model: backbone + scalar head on the last real token, trained on
    pref_train pairs, held-out pairwise accuracy on pref_test before and after. Saves
    <out_dir>/reward_model (HF dir + head.pt). Under torchrun the RM is sharded like the policy and
    each rank takes rm_batch_pairs / W pairs of every step; the loss is divided by the GLOBAL
    number of pairs, so the update does not depend on the world size."""
    dtype = C.resolve_dtype(cfg.precision, d.device)
    if cfg.rm_batch_pairs % d.world_size:
        raise ValueError(f"--rm_batch_pairs {cfg.rm_batch_pairs} not divisible by world size {d.world_size}")
    lm, tok = M.load_model_and_tokenizer(cfg.rm_model or cfg.model, cfg.seed)
    torch.manual_seed(cfg.seed)  # the head's init: the same on every rank and in every layout
    rm = C.shard_model(ScalarHeadModel(lm), d, dtype, cfg.activation_checkpointing)
    train, n_drop = pref_pairs(cfg.pref_train, tok, cfg.max_len)
    test, n_drop_test = pref_pairs(cfg.pref_test, tok, cfg.max_len)
    C.print0(f"RM pairs: train {len(train)} (dropped {n_drop} > {cfg.max_len} tokens), test {len(test)} "
             f"(dropped {n_drop_test})")
    acc0 = rm_accuracy(rm, test, tok.pad_token_id, d.device, d, dtype)
    opt = C.make_optimizer(rm, cfg.rm_lr, cfg.weight_decay)
    log = C.MetricsLogger(Path(cfg.out_dir) / "reward_model_logs", d, cfg.rm_steps, cfg, cfg.wandb_project)
    for step in range(cfg.rm_steps):
        idx = C.epoch_stream_indices(len(train), step * cfg.rm_batch_pairs, cfg.rm_batch_pairs, cfg.seed)
        batch = [train[i] for i in idx][d.rank::d.world_size]  # this rank's share of the global batch
        sums = torch.zeros(2, dtype=torch.float64)  # loss, correct pairs (summed over ranks below)
        for j in range(0, len(batch), cfg.micro_batch_size):
            mb = batch[j:j + cfg.micro_batch_size]
            with C.fwd_context(rm, d, dtype):
                rc, rr = rm_pair_scores(rm, mb, tok.pad_token_id, d.device)
            loss, st = bradley_terry_loss(rc, rr, n_global=float(cfg.rm_batch_pairs))
            loss.backward()
            sums += torch.tensor([loss.item(), float(st["acc"]) * len(mb)], dtype=torch.float64)
        lr = C.lr_at(step, cfg.rm_steps, cfg.warmup_steps, cfg.rm_lr, cfg.min_lr_ratio)
        gn = C.optimizer_step(rm, opt, lr, cfg.max_grad_norm)
        tot = C.all_reduce_sum(sums, d).tolist()
        log.log(step, {"rm_loss": tot[0], "rm_train_acc": tot[1] / cfg.rm_batch_pairs, "grad_norm": gn, "lr": lr})
    log.close()
    acc1 = rm_accuracy(rm, test, tok.pad_token_id, d.device, d, dtype)
    out = Path(cfg.out_dir) / "reward_model"
    save_scalar_model(rm, tok, out, d)
    res = {"rm_test_acc_before": acc0, "rm_test_acc_after": acc1, "n_train": len(train), "n_test": len(test)}
    if d.is_main:
        (out / "rm_eval.json").write_text(json.dumps(res, indent=2))
    C.print0(f"reward model: held-out pairwise accuracy {acc0:.3f} -> {acc1:.3f}; saved to {out}")
    return res


# ----------------------------------------------------------------------------------------------
# Main: sub-stages in sequence, checkpoint + held-out eval after each, summary table


def resume_point(cfg: Config, stages: list[dict], out_dir: Path, ckpt_dirs: list[Path]):
    """(model to start from, finished sub-stages, step checkpoint of the unfinished one or None):
    the last finished sub-stage's HF dir, or the latest --save_every checkpoint after it."""
    start_model, first, mid = cfg.model, 0, None
    if cfg.resume:
        for i, s in enumerate(stages, 1):
            p = out_dir / f"{i}_{s['kind']}"
            if (p / "config.json").exists():
                start_model, first = str(p), i
        if first < len(stages):
            mid = M.latest_checkpoint(ckpt_dirs[first])
            if mid is not None:
                start_model = str(mid / "model")
    return start_model, first, mid


def load_rm_scorer(rm_dir: Path, needed: bool, tok, d: C.Dist, dtype):
    """scorer(prompt_ids, response_ids) -> [n] floats of the frozen reward model at rm_dir
    (replicated on every rank), or None when no pref sub-stage needs one and none exists."""
    if not needed and not (rm_dir / "head.pt").exists():
        return None
    if not (rm_dir / "head.pt").exists():
        raise FileNotFoundError(f"pref sub-stage: no reward model at {rm_dir}; train one with "
                                f"`python 04_rl.py --mode train_reward_model` or pass --reward_model")
    rm, rm_tok = load_scalar_model(rm_dir)
    if rm_tok.get_vocab() != tok.get_vocab():
        raise ValueError(f"reward model {rm_dir} has a different tokenizer from the policy")
    rm = rm.to(d.device).eval()
    rm.requires_grad_(False)

    def scorer(prompt_ids, response_ids):
        with torch.no_grad(), C.fwd_context(rm, d, dtype):
            return rm_scores(rm, prompt_ids, response_ids, tok.pad_token_id, d.device).float().cpu().tolist()
    return scorer


def summary_table(summary: list[dict]) -> str:
    """The held-out figures after each sub-stage as a markdown table."""
    cols = ["after"] + [k for k in summary[0] if k not in ("after", "minutes")] + ["minutes"]
    lines = [" | ".join(cols), " | ".join("---" for _ in cols)]
    for row in summary:
        lines.append(" | ".join(f"{row.get(c, float('nan')):.3f}" if isinstance(row.get(c), float) and c != "minutes"
                                else str(row.get(c, "")) for c in cols))
    return "\n".join(lines)


def main(argv=None):
    """The stage as one story: setup -> resume point -> models (policy, reference, reward model) ->
    eval at start -> sub-stages (rl_train, checkpoint, eval) -> summary. Kept in one function (a
    little over 80 lines) so that it reads as the script's outline; every step of it is a named
    function above."""
    cfg = C.parse_config(Config, argv)
    d = C.init_distributed(cfg.device)
    C.set_seed(cfg.seed + d.rank)
    validate(cfg, d)
    C.print0(json.dumps(dataclasses.asdict(cfg), indent=2))
    if cfg.mode == "train_reward_model":
        res = train_reward_model(cfg, d)
        C.cleanup_distributed(d)
        return res
    stages = parse_stages(cfg)
    out_dir = Path(cfg.out_dir)
    dtype = C.resolve_dtype(cfg.precision, d.device)

    # model: when resuming, from the last finished sub-stage or the unfinished one's step checkpoint
    ckpt_dirs = [out_dir / f"{i}_{s['kind']}_ckpts" for i, s in enumerate(stages, 1)]
    start_model, first, mid = resume_point(cfg, stages, out_dir, ckpt_dirs)
    if first or mid:
        C.print0(f"resume: sub-stages 1..{first} done, starting from {start_model}")
    lm, tok = M.load_model_and_tokenizer(start_model, cfg.seed)
    stage_cfgs = [dataclasses.replace(cfg, **s["overrides"]) for s in stages]
    for sc in stage_cfgs:
        validate(sc, d)
    ref = None
    if any(sc.kl_coef > 0 for sc in stage_cfgs):  # frozen copy of the initial policy (sharded too)
        ref_lm = M.load_model_and_tokenizer(cfg.model, cfg.seed)[0] if (first or mid) else copy.deepcopy(lm)
        ref = M.LogProbModel(ref_lm).eval()
        ref.requires_grad_(False)
        ref = C.shard_model(ref, d, dtype)
    policy = ActorCritic(lm)
    if mid is not None:
        M.load_extra_state(mid, policy)  # the PPO value head
    policy = C.shard_model(policy, d, dtype, cfg.activation_checkpointing)

    kinds_run = {s["kind"] for s in stages}
    if "code" in kinds_run or "code" in cfg.eval_kinds or cfg.eval_kinds == ["auto"]:
        C.print0(f"code sandbox: {sandbox.check_sandbox(cfg.unsafe_code_exec)}")  # fail now, not mid-run
    rm_scorer = load_rm_scorer(Path(cfg.reward_model or out_dir / "reward_model"), "pref" in kinds_run, tok, d, dtype)
    kinds = cfg.eval_kinds
    if kinds == ["auto"]:
        kinds = ["stem", "code"] + (["pref"] if rm_scorer else []) + (["toy"] if "toy" in kinds_run else [])
    if cfg.max_steps >= 0:
        for s in stages:
            s["steps"] = min(s["steps"], cfg.max_steps)
    total_steps = sum(s["steps"] for s in stages)
    done_steps = sum(s["steps"] for s in stages[:first])
    mid_step = json.loads((mid / "state.json").read_text())["step"] if mid is not None else 0
    log = C.MetricsLogger(out_dir, d, total_steps, cfg, cfg.wandb_project, initial_step=done_steps + mid_step)
    summary_path = out_dir / "summary.json"

    def write_summary():
        if d.is_main:
            summary_path.write_text(json.dumps(summary, indent=2))

    # the summary of an interrupted run is continued, not restarted
    summary = json.loads(summary_path.read_text()) if (first or mid) and summary_path.exists() else []
    t0 = time.time()
    if not summary:
        ev = evaluate(policy, tok, cfg, d, dtype, kinds, rm_scorer)
        label = "start" if not (first or mid) else f"{first}_{stages[first - 1]['kind']} (resumed)" if first else "resumed"
        summary.append({"after": label, **ev, "minutes": 0.0})
        C.print0(f"eval at start: {ev}")
        write_summary()
    step0 = done_steps
    for i, (s, sc) in enumerate(zip(stages, stage_cfgs), 1):
        if i <= first:
            continue
        sc = dataclasses.replace(sc, max_steps=s["steps"])
        prompts = select_prompts(stage_prompts(s["kind"], s["data"], tok, sc), sc.max_difficulty, s["data"])
        reward_fn = make_reward_fn(s["kind"], sc, rm_scorer)
        C.print0(f"sub-stage {i}: {s['kind']} on {s['data']} ({len(prompts)} prompts) for {s['steps']} steps "
                 f"({sc.algo}, lr {sc.lr})")
        ts = time.time()
        rl_train(sc, s["kind"], policy, ref, prompts, reward_fn, tok, d, dtype, log, i, step0,
                 ckpt_dir=ckpt_dirs[i - 1], resume_ckpt=mid if i == first + 1 else None)
        step0 += s["steps"]
        M.save_hf(policy, tok, out_dir / f"{i}_{s['kind']}", d)
        if d.is_main:  # the sub-stage's HF dir now marks it finished: its step checkpoints can go
            shutil.rmtree(ckpt_dirs[i - 1], ignore_errors=True)
        ev = evaluate(policy, tok, cfg, d, dtype, kinds, rm_scorer)
        summary.append({"after": f"{i}_{s['kind']}", **ev, "minutes": round((time.time() - ts) / 60, 2)})
        C.print0(f"eval after sub-stage {i} ({s['kind']}): {ev}")
        write_summary()
    M.save_hf(policy, tok, out_dir / "final", d)
    log.close()
    C.print0(f"\nsummary ({(time.time() - t0) / 60:.1f} min)\n{summary_table(summary)}")
    C.cleanup_distributed(d)
    return summary


if __name__ == "__main__":
    main()
