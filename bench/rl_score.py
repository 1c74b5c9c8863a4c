"""
Benchmark: stage 4's reference pass before the update (`04_rl.forward_old`), over the rows the loss
trains (what the stage runs: a truncated response under `--overlong masked` has an all-0 mask and
is skipped) against every row (the code before the skip), alternated, on real rollouts.

For each of --rollouts rollouts of --prompts_per_step x --group_size math responses (the pipeline's
stage-4 settings: 128 new tokens, T = 0.7, questions without the answer instruction), it times
`forward_old` with the rollout's loss mask and with an all-ones mask, --rounds times each,
alternated, and prints the medians (min-max), the truncated count and the largest / mean difference
of the reference log-probs on the trained tokens (0 up to rounding: fp32 1e-5, bf16 packs rows
differently). It asserts nothing: it is a benchmark.

    python bench/rl_score.py --model runs/pipeline/3_distill/final   # the pipeline's student
    python bench/rl_score.py --precision fp32 --rollouts 1
"""
import copy
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
import common as C  # noqa: E402
import models as M  # noqa: E402
from stage_scripts import load_script  # noqa: E402

rl = load_script("04_rl.py", "rl04_score_bench")


@dataclass
class Config:
    model: str = C.arg(M.EMBEDDED, "policy (and reference): embedded default, 'tiny', or an HF dir")
    device: str = C.arg("auto", "auto | cpu | cuda")
    precision: str = C.arg("auto", "auto | bf16 | fp32")
    rollouts: int = C.arg(2, "rollouts measured")
    rounds: int = C.arg(3, "timed calls of each variant per rollout (alternated)")
    prompts_per_step: int = C.arg(4, "prompts per rollout")
    group_size: int = C.arg(8, "responses per prompt")
    max_new_tokens: int = C.arg(128, "generation cap (responses that reach it are truncated)")
    data: str = C.arg(str(ROOT / "data/math_train.jsonl"), "math questions")
    seed: int = C.arg(0, "seed")


def main(argv=None) -> None:
    cfg = C.parse_config(Config, argv)
    d = C.init_distributed(cfg.device)
    C.set_seed(cfg.seed)
    dtype = C.resolve_dtype(cfg.precision, d.device)
    rcfg = rl.Config(model=cfg.model, prompts_per_step=cfg.prompts_per_step, group_size=cfg.group_size,
                     max_new_tokens=cfg.max_new_tokens, overlong="masked", math_instruction="")
    lm, tok = M.load_model_and_tokenizer(cfg.model, cfg.seed)
    ref = C.shard_model(M.LogProbModel(copy.deepcopy(lm)).eval().requires_grad_(False), d, dtype)
    policy = C.shard_model(rl.ActorCritic(lm), d, dtype)
    prompts = rl.stage_prompts("stem", cfg.data, tok, rcfg)
    reward_fn = rl.make_reward_fn("stem", rcfg)
    print(f"model {cfg.model}, {dtype}, {cfg.prompts_per_step} x {cfg.group_size} responses of <= "
          f"{cfg.max_new_tokens} tokens", flush=True)
    for step in range(cfg.rollouts):
        ro = rl.rollout(policy, prompts, reward_fn, rcfg, tok, d, dtype, 1, step)
        n, T = ro.tokens.shape
        mask = rl.rollout_mask(ro.lengths, ro.finished, T, "masked")
        times, out = {"trained rows": [], "every row": []}, {}
        for _ in range(cfg.rounds):
            for name, m in (("trained rows", mask), ("every row", torch.ones(n, T))):
                t0 = time.perf_counter()
                out[name] = rl.forward_old(policy, ref, None, ro, rcfg, tok, d, dtype, False, True, False, m)
                times[name].append(time.perf_counter() - t0)
        diff = (out["trained rows"]["ref_logp"] - out["every row"]["ref_logp"]).abs() * mask
        print(f"rollout {step}: {int((~ro.finished).sum())} of {n} truncated; " + "; ".join(
            f"{k} {statistics.median(v):.2f} s ({min(v):.2f}-{max(v):.2f})" for k, v in times.items())
            + f"; ref logp difference on trained tokens: max {diff.max().item():.2e}, "
              f"mean {(diff.sum() / mask.sum().clamp(min=1)).item():.2e}", flush=True)
    C.cleanup_distributed(d)


if __name__ == "__main__":
    main()
