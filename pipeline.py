"""
pipeline.py: the main job. Runs stage 1 -> 2 -> 3 -> 4, each on the previous stage's final/, and
writes report.md with plots (matplotlib) into --out_dir.

    python pipeline.py                                # embedded SmolLM2-135M, generated data, defaults
    NPROC=2 python pipeline.py --device cpu           # each stage under torchrun (FSDP2), 2 processes
    python pipeline.py --stage3 "--gamma 1"           # extra flags for one stage (shlex-split): here
                                                      # stage 3 with its sequence-level terms back on
    python pipeline.py --report_only true             # rewrite report.md from finished stages
    python pipeline.py --dry_run true                 # print the four command lines, run nothing

Started again with the same command, it continues where it stopped: a stage whose final/ exists is
skipped; an unfinished one is started again with the same --out_dir, so it resumes from its newest
checkpoint (each stage's --save_every, e.g. --stage1 "--save_every 10"); a finished stage's
checkpoints are removed, its resolved config kept as run_config.json (--keep_checkpoints true keeps
them). Wall times are kept in out_dir/timings.json (a resumed stage adds the time of each attempt),
the machine's GEMM rate as each part began and ended in gemm_rates.json (the report prints both: a
wall time needs the machine's speed).

Stage by stage: 01_cold_start_sft.py (from the embedded model or --model), 02_overall_sft.py
--model <stage 1>/final (its reasoning data: stage 1's S2R trajectories, `--reasoning s2r`, beside
conversation, tool use and code: STAGE2_MIXTURE),
03_distill.py --teacher <stage 2>/final (student: a 29-layer copy, on-policy token-level KL only: STAGE_FLAGS),
04_rl.py --mode train_reward_model (a reward model on the student) then 04_rl.py --model
<stage 3>/final. Nothing clever: it builds five command lines and runs them.
"""
from __future__ import annotations

import importlib.metadata
import json
import math
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import common as C
import models as M

ROOT = Path(__file__).resolve().parent
STAGES = (  # (name, script, flag that takes the previous stage's final/)
    ("1_cold_start_sft", "01_cold_start_sft.py", "--model"),
    ("2_overall_sft", "02_overall_sft.py", "--model"),
    ("3_distill", "03_distill.py", "--teacher"),
    ("4_rl", "04_rl.py", "--model"),
)
# Flags the pipeline gives a stage before the user's --stageN flags (so the user's flags win). What
# each is for; the runs behind them are in the README section of each stage.
# - Stages 2 and 3 skip their own math and code evals: the pipeline's one eval measures every final/
#   on the same questions. Stage 2 keeps its agent eval, stage 3 its KL and decoding speed.
# - Stage 2: 36 steps at lr 1e-4, stage 1's trajectories at weight 2 (REFLECTIVE_WEIGHT). 24 steps at
#   weight 1 (the pipeline's until 2026-12-07) lost stage 1's math (23 -> 15/100, McNemar p = 0.039);
#   weight 2 at 24 steps halved agent success; at 36 steps math is kept (23 -> 22), the last attempt
#   beats the first (22 vs 17) and tool use is as before (97%, 44%), for ~1 more minute (README
#   "Stage 2"). 12 steps at 2e-4 kept less math and taught less tool use than 24 at 1e-4.
# - Stage 3: a 29-layer student, the teacher without the one layer whose input and output hidden
#   states are closest in angle (--layer_choice block). It learns on-policy only (--lmbda 1
#   --divergence rkl: it samples, and learns the reverse KL to the teacher on its own tokens), at
#   lr 2e-5 for 18 steps, with no sequence-level terms (--gamma 0: with them its verifier turned
#   into a constant). From the 22/100 teacher it kept 15/100, where training on the teacher's
#   responses kept 11. Smaller students lost the math, which lives in this 135M model's middle
#   layers (README "Stage 3"). The samples of 3 steps are drawn in one sampler call
#   (--steps_per_generation 3: 24 rows cost little more than 8, the call reads every weight per
#   token either way), at most 2 updates old.
# - Stage 4: a Bradley-Terry reward model first (RM_FLAGS), then 6 GRPO steps of 8 prompts x 8
#   samples. Responses get 128 new tokens (the eval's length: at 64 the reflective answers were
#   cut), lr 1e-5, the outcome reward only, and truncated responses are masked out of the loss.
#   The prompts are asked as the eval asks them, and the policy gradient reaches the attempts only
#   (--s2r_train attempts). Every variant that let the reward reach the verdicts turned the verifier
#   into a constant and lost math. From the on-policy student (15/100, first attempt 14), seeds 0-9
#   gave a mean of 15.4 on the last attempt and 16.4 on the first with 8 prompts a step (seeds 0-4
#   with 4 prompts: 13.4 and 13.6): RL raises the first attempt, not yet the last (README "Stage 4").
# Keys are indices into STAGES: 1 is stage 2, 2 stage 3, 3 stage 4 (stage 1 runs on its defaults).
STAGE_FLAGS = {1: ["--math_test", "", "--max_steps", "36", "--lr", "1e-4"],
               2: ["--eval_limit", "0", "--code_eval_limit", "0", "--student_layers", "29", "--layer_choice", "block",
                   "--layer_calib", "4",
                   "--lr", "2e-5", "--max_steps", "18", "--prompt_limit", "40", "--gamma", "0",
                   "--lmbda", "1", "--divergence", "rkl", "--speed_repeats", "3", "--steps_per_generation", "3"],
               3: ["--stages", "stem:data/math_train.jsonl:6", "--eval_kinds", "stem", "--s2r_reward", "outcome",
                   "--max_new_tokens", "128", "--lr", "1e-5", "--prompts_per_step", "8", "--group_size", "8",
                   "--overlong", "masked", "--math_instruction", "", "--s2r_train", "attempts",
                   "--eval_max_new_tokens", "128"]}
RM_FLAGS = ["--mode", "train_reward_model", "--rm_steps", "20"]
# Stage 2's mixture (before stage 1's trajectories, `reflective=...:REFLECTIVE_WEIGHT`): conversation, tool use at
# 1.5 and code tasks with their reference solutions at 0.5. Stage 1 LOSES code (17 -> 9 of the 60
# held-out tasks: its 24 code trajectories are a sixth of ~100 seen samples, and its code
# verifications cannot run tests at inference). From one stage 1 output (2026-12-06, 24 steps,
# lr 1e-4; math / code / agent success on 100 / 60 / 32 held-out items): without code rows 12 / 14 /
# 50%; code:1 and agent:1: 14 / 30 / 16%; code:0.5 and agent:1.5 (this): 11 / 24 / 47%.
STAGE2_MIXTURE = ["chat=data/chat_train.jsonl:1", "agent=data/agent_train.jsonl:1.5", "code=data/code_train.jsonl:0.5"]
REFLECTIVE_WEIGHT = 2  # stage 1's S2R trajectories in stage 2's mixture (see Stage 2 above)
# The one held-out eval of every model (stage 1's eval, before the user's --eval flags): 100 of the
# 150 math test questions and all 80 of the transfer split, not stage 1's default 40 / 40: at 40 a
# stage's effect on math was 1-3 questions, inside the noise (four RL runs from one model: 1-5/40);
# +25 s per model (measured). All 60 code tasks, not 24: 24 put the embedded model at 8 and stage 1
# at 5, where 60 put them at 17 and 9 (the same models).
EVAL_FLAGS = ["--eval_limit", "100", "--eval_transfer_limit", "80", "--eval_code_limit", "60"]


@dataclass
class Config:
    out_dir: str = C.arg("runs/pipeline", "one directory per stage inside it, plus report.md and plots/")
    model: str = C.arg(M.EMBEDDED, "the starting model of stage 1")
    device: str = C.arg("auto", "passed to every stage (auto | cpu | cuda)")
    nproc: int = C.arg(int(os.environ.get("NPROC", "1")), "processes per stage: > 1 runs each under torchrun "
                                                           "(default: $NPROC, else 1)")
    stage1: str = C.arg("", "extra flags for stage 1 (one string, shlex-split)")
    stage2: str = C.arg("", "extra flags for stage 2")
    stage3: str = C.arg("", "extra flags for stage 3")
    stage4: str = C.arg("", "extra flags for stage 4 (its RL run; the reward model's: --rm)")
    rm: str = C.arg("", "extra flags for stage 4's reward-model training (04_rl.py --mode train_reward_model)")
    reasoning: str = C.arg("s2r", "stage 2's reasoning data: s2r = stage 1's S2R trajectories (the reflective "
                                  "format carried on), plain = the CoT solutions of data/math_train.jsonl (stage 2's "
                                  "own default), both (measured: README)")
    eval: str = C.arg("", "extra flags of the one held-out eval every model gets (stage 1's eval: math, the "
                          "transfer split, code; after EVAL_FLAGS; passed to stage 1 and to "
                          "`01_cold_start_sft.py --mode eval`)")
    keep_checkpoints: bool = C.arg(False, "keep the ckpt-* directories (weights + AdamW state, ~1.6 GB each on "
                                          "the default model) of stages 1-3 once their final/ is written; by "
                                          "default they are removed and the resolved config kept as run_config.json")
    report_only: bool = C.arg(False, "only (re)write the report from the stages that finished")
    dry_run: bool = C.arg(False, "print the command lines (e.g. to launch each stage on several nodes) and stop")


def launcher(cfg: Config) -> list[str]:
    return [sys.executable] if cfg.nproc <= 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(cfg.nproc)]


def command(cfg: Config, i: int, prev: str) -> list[str]:
    name, script, flag = STAGES[i]
    extra = shlex.split([cfg.stage1, cfg.stage2, cfg.stage3, cfg.stage4][i])
    carry = []
    s2r = Path(cfg.out_dir) / STAGES[0][0] / "trajectories.jsonl"
    if i == 1 and cfg.reasoning != "plain":  # keep stage 1's format in stage 2's mixture
        carry = ["--data", *STAGE2_MIXTURE, *(["reasoning=data/math_train.jsonl:1"] if cfg.reasoning == "both" else []),
                 f"reflective={s2r}:{REFLECTIVE_WEIGHT}"]
    if i == 0:  # stage 1's start / end evals are the first two rows of the pipeline's eval table
        carry = EVAL_FLAGS + shlex.split(cfg.eval)
    return launcher(cfg) + [str(ROOT / script), flag, prev, "--out_dir", str(Path(cfg.out_dir) / name),
                     "--device", cfg.device, *carry, *STAGE_FLAGS.get(i, []), *extra]


def rm_command(cfg: Config, prev: str) -> list[str]:
    """Stage 4's Bradley-Terry reward model on the student (prev), saved to 4_rl/reward_model with
    its held-out pairwise accuracy before (random head) and after (rm_eval.json)."""
    return launcher(cfg) + [str(ROOT / STAGES[3][1]), "--model", prev, "--out_dir", str(Path(cfg.out_dir) / STAGES[3][0]),
                            "--device", cfg.device, *RM_FLAGS, *shlex.split(cfg.rm)]


def rm_eval_file(out: Path) -> Path:
    """Where rm_command's run leaves its held-out pairwise accuracy (before / after)."""
    return out / STAGES[3][0] / "reward_model" / "rm_eval.json"


def eval_command(cfg: Config, model: str, out_dir: Path) -> list[str]:
    """The same held-out eval as stage 1's (math first / last attempt, transfer split, verification
    rate, verdict accuracy, code) for a later stage's final/: one table row per model."""
    return [sys.executable, str(ROOT / STAGES[0][1]), "--mode", "eval", "--model", model, "--out_dir", str(out_dir),
            "--device", cfg.device, *EVAL_FLAGS, *shlex.split(cfg.eval)]


def machine() -> str:
    """What runs the pipeline, for the report: CPU (and its bf16 instructions), GPUs, library versions
    and commit. Why: in bf16 two CPUs' GEMM kernels round differently (AMX vs AVX512-BF16), so the
    same code and seeds give other figures on another machine (README); a run's figures belong to it."""
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    cpu = next((ln.split(":", 1)[1].strip() for ln in cpuinfo.splitlines() if ln.startswith("model name")),
               platform.processor() or platform.machine())
    flags = next((ln.split(":", 1)[1].split() for ln in cpuinfo.splitlines() if ln.startswith("flags")), [])
    isa = [f for f in ("amx_bf16", "avx512_bf16", "avx2") if f in flags]
    gpu = (f", {torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "")

    def git(*a: str) -> str:  # "" where git is missing or this is not a checkout (a tarball)
        try:
            return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        except OSError:
            return ""
    commit = git("rev-parse", "--short", "HEAD") or "not a git checkout"
    dirty = " with uncommitted changes" if git("status", "--porcelain", "--untracked-files=no") else ""
    return (f"{cpu}, {os.cpu_count()} cores ({', '.join(isa) or 'no AVX2'}){gpu}; torch {torch.__version__}, "
            f"transformers {importlib.metadata.version('transformers')}; commit {commit}{dirty}")


def gemm_rate(device: str, n: int = 1024, budget_s: float = 0.25) -> dict:
    """How fast this machine multiplies right now: GFLOP/s of an n x n matrix product in the compute
    precision the stages get from `--precision auto` (bf16 where native, else fp32), the median of
    the products that fit in `budget_s` (at least 5) after one warm-up. Why: one 2-core host ran
    the same code 1.5x slower in one hour than in another (its bf16 rate swung between ~600 and
    ~2,000 GFLOP/s, README "Time and machine"), so a wall time is read beside the rates measured as
    it began and as it ended. Returns {"gflops", "dtype"}."""
    dev = torch.device("cuda" if device != "cpu" and torch.cuda.is_available() else "cpu")
    dtype = C.resolve_dtype("auto", dev)
    a = torch.linspace(-1, 1, n * n, device=dev).view(n, n).to(dtype)  # no random draw
    times, start = [], time.perf_counter()
    while len(times) < 6 or time.perf_counter() - start < budget_s:
        t = time.perf_counter()
        a @ a
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return {"gflops": round(2 * n ** 3 / statistics.median(times[1:]) / 1e9, 1), "dtype": str(dtype).split(".")[-1]}


def run(cmd: list[str], what: str, timings: dict, tfile: Path, env=None, device: str = "auto") -> None:
    """Run one command, add its minutes to timings[what], the machine to machines.json[what] (kept
    on disk: a resumed run may go on elsewhere) and the GEMM rates measured just before and just
    after it to gemm_rates.json[what] (one entry per attempt); stop the pipeline on failure."""
    print(f"[pipeline] {what}: {shlex.join(cmd)}", flush=True)
    begin = gemm_rate(device)
    t0 = time.time()
    rc = subprocess.run(cmd, cwd=ROOT, env=env).returncode
    timings[what] = timings.get(what, 0.0) + (time.time() - t0) / 60
    tfile.write_text(json.dumps(timings, indent=1))
    rfile = tfile.with_name("gemm_rates.json")
    rates, rate = read_json(rfile) or {}, {"begin": begin["gflops"], "end": gemm_rate(device)["gflops"],
                                           "dtype": begin["dtype"]}
    rfile.write_text(json.dumps({**rates, what: rates.get(what, []) + [rate]}, indent=1))
    mfile = tfile.with_name("machines.json")
    mfile.write_text(json.dumps({**(read_json(mfile) or {}), what: machine()}, indent=1))
    if rc != 0:
        raise SystemExit(f"[pipeline] {what} failed (exit {rc}); fix it and run the same command again "
                         f"to continue from here")


def drop_checkpoints(stage_dir: Path) -> None:
    """A finished stage's ckpt-* directories only serve a resume that can no longer happen (final/
    exists, so the stage is skipped): remove them, keeping the newest one's resolved config (every
    flag the stage ran with) as run_config.json. Stage 4 removes its own."""
    newest = M.latest_checkpoint(stage_dir)
    if newest is not None:
        shutil.copyfile(newest / "config.json", stage_dir / "run_config.json")
    for p in stage_dir.glob("ckpt-??????*"):
        shutil.rmtree(p, ignore_errors=True)


def run_stages(cfg: Config) -> dict:
    """Run what is not finished yet; returns {stage name: minutes} (all attempts added up)."""
    if cfg.reasoning not in ("s2r", "plain", "both"):
        raise SystemExit(f"--reasoning must be s2r, plain or both, got {cfg.reasoning!r}")
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tfile = out / "timings.json"
    timings = json.loads(tfile.read_text()) if tfile.exists() else {}
    prev = cfg.model
    for i, (name, script, _) in enumerate(STAGES):
        final = out / name / "final"
        if cfg.dry_run:
            print("\n".join(shlex.join(c) for c in ([rm_command(cfg, prev)] if i == 3 else []) + [command(cfg, i, prev)]),
                  flush=True)
        elif (final / "config.json").exists():
            print(f"[pipeline] {name}: done ({final}), skipped", flush=True)
        else:
            if i == 1 and cfg.reasoning != "plain" and not (out / STAGES[0][0] / "trajectories.jsonl").exists():
                raise SystemExit("[pipeline] stage 1 wrote no trajectories.jsonl (a plain or cot_pretrain stage 1?): "
                                 "give --reasoning plain for stage 2's own reasoning data")
            env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1")) if cfg.nproc > 1 else None
            if i == 3 and not rm_eval_file(out).exists():
                run(rm_command(cfg, prev), "4_reward_model", timings, tfile, env, device=cfg.device)
            run(command(cfg, i, prev), name, timings, tfile, env, device=cfg.device)
            shutil.rmtree(out / "eval" / name, ignore_errors=True)  # an eval of an earlier final/ is stale
            if not cfg.keep_checkpoints:
                drop_checkpoints(out / name)
        if i > 0 and not cfg.dry_run and not (out / "eval" / name / "eval_summary.json").exists():
            run(eval_command(cfg, str(final), out / "eval" / name), f"eval_{name}", timings, tfile, device=cfg.device)
        prev = str(final)
    return timings


# ----------------------------------------------------------------------------------------------
# The report: what each stage exists to move, before and after, and training curves


def read_json(p: Path):
    return json.loads(p.read_text()) if p.exists() else None


def read_metrics(p: Path) -> list[dict]:
    return [json.loads(x) for x in p.read_text().splitlines() if x.strip()] if p.exists() else []


def fmt(v) -> str:
    return "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)


EVAL_COLUMNS = (  # (header, key in stage 1's eval)
    ("math", "math_acc"), ("math, 1st attempt", "math_acc_first"), ("transfer", "transfer_acc"),
    ("transfer, 1st", "transfer_acc_first"), ("verification rate", "math_with_verification"),
    ("verdict acc", "math_verdict_acc"), ("verdict acc, always 'correct'", "math_verdict_always_correct"),
    ("verdict acc, always 'incorrect'", "math_verdict_always_incorrect"),
    ("verdict acc, balanced", "math_verdict_balanced_acc"), ("code", "code_acc"))


def with_baselines(ev: dict) -> dict:
    """Add what a verifier that always says "incorrect" scores on the same verdicts (1 - always 'correct')."""
    ok = ev.get("math_verdict_always_correct")
    return {**ev, "math_verdict_always_incorrect": None if ok is None else 1.0 - ok}


ROW_LABELS = ("start (embedded)", "after 1 cold-start SFT", "after 2 overall SFT", "after 3 distill (student)",
              "after 4 RL")  # the eval table's rows: the embedded model, then each stage's output


def eval_rows(out: Path) -> list[tuple[str, dict]]:
    """(model, eval) for the embedded model and every stage's output, all through stage 1's eval."""
    rows = []
    s1 = read_json(out / STAGES[0][0] / "eval_summary.json")
    if s1:
        rows += [(ROW_LABELS[0], with_baselines(s1["start"])), (ROW_LABELS[1], with_baselines(s1["end"]))]
    for (name, *_), label in zip(STAGES[1:], ROW_LABELS[2:]):
        ev = read_json(out / "eval" / name / "eval_summary.json")
        if ev:
            rows.append((label, with_baselines(ev["eval"])))
    return rows


def plot_eval(out: Path, rows: list[tuple[str, dict]]) -> str | None:
    """plots/math_by_stage.png: held-out math (last / first attempt), transfer and verification rate per model."""
    if not rows:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    (out / "plots").mkdir(exist_ok=True)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6))
    x = list(range(len(rows)))
    panels = ((("math_acc", "math (last attempt)"), ("math_acc_first", "math (first attempt)"),
               ("transfer_acc", "transfer split"), ("code_acc", "code")),
              (("math_with_verification", "answers with a verification"), ("math_verdict_acc", "verdict accuracy"),
               ("math_verdict_always_correct", "verdict acc. of always 'correct'"),
               ("math_verdict_always_incorrect", "verdict acc. of always 'incorrect'"),
               ("math_verdict_balanced_acc", "balanced verdict acc. (constant verifiers: 0.5)")))
    for ax, keys, title in zip(axes, panels, ("held-out accuracy (greedy)", "self-verification (held-out math)")):
        for key, label in keys:
            ax.plot(x, [r.get(key) if r.get(key) is not None else float("nan") for _, r in rows], marker="o", label=label)
        ax.set_xticks(x, [m.replace("after ", "").replace(" (", "\n(") for m, _ in rows], fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.set_ylim(bottom=-0.01)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2)  # below: never over a line
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "plots" / "math_by_stage.png", dpi=90)
    plt.close(fig)
    return "plots/math_by_stage.png"


MATH_MARGIN = 0.10  # how much held-out math a stage that does not target it may lose (stage 2's --math_margin)
# the stages that exist to raise math: 1 and 4 (its STEM sub-stage)
MATH_TARGETED = dict(zip(ROW_LABELS[1:], (True, False, False, True)))


def math_checks(rows: list[tuple[str, dict]]) -> list[str]:
    """The run's math goals as sentences: each stage that targets math raises it (last attempt), each
    other stage loses at most MATH_MARGIN (absolute), and the final model's last attempt is no worse
    than its first (self-verification that helps)."""
    parts = []
    for (_, a), (label, b) in zip(rows, rows[1:]):
        if label not in MATH_TARGETED or a.get("math_acc") is None or b.get("math_acc") is None:
            continue
        d = b["math_acc"] - a["math_acc"]
        verdict = ("up" if d > 0 else "NOT up") if MATH_TARGETED[label] else \
            ("kept" if d >= -MATH_MARGIN - 1e-9 else f"lost {-d:.3f}, BEYOND the margin")
        parts.append(f"{label.replace('after ', 'stage ')} {a['math_acc']:.3f} -> {b['math_acc']:.3f} ({verdict})")
    lines = [f"- Held-out math, stage by stage (the stages that target math must raise it; the others may lose "
             f"at most {MATH_MARGIN}): " + "; ".join(parts) + "."] if parts else []
    last = rows[-1][1] if rows else {}
    if last.get("math_acc") is not None and last.get("math_acc_first") is not None:
        ok = last["math_acc"] >= last["math_acc_first"]
        lines.append(f"- Self-correction of the last model ({rows[-1][0]}): last attempt {last['math_acc']:.3f} vs "
                     f"first {last['math_acc_first']:.3f} ({'no worse' if ok else 'WORSE'}).")
    return lines


# ----------------------------------------------------------------------------------------------
# Is a change more than noise? Each model answers the same held-out questions, so two models are
# compared question by question (paired), not by their two accuracies alone.


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a proportion k / n (Wilson 1927; z = 1.96: 95%):

        centre = (p + z^2 / 2n) / (1 + z^2 / n),  half = z sqrt(p (1 - p) / n + z^2 / 4n^2) / (1 + z^2 / n)

    with p = k / n. Why not p +- z sqrt(p (1 - p) / n): at k = 0 (the embedded model's math) that
    interval is [0, 0], and near 0 it undercovers; Wilson's stays inside [0, 1] and is honest there."""
    if n <= 0:
        raise ValueError("wilson_interval needs n > 0")
    p, z2 = k / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * (p * (1 - p) / n + z2 / (4 * n * n)) ** 0.5 / (1 + z2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def mcnemar_p(lost: int, gained: int) -> float:
    """Exact two-sided McNemar test (McNemar 1947) of two models on the same questions: only the
    questions where exactly one of them is right say anything; if both models were equally good,
    each of those n = lost + gained questions would fall either way with probability 1/2, so

        p = min(1, 2 P[Binomial(n, 1/2) <= min(lost, gained)]),   p = 1 when n = 0.

    Small p: the change is unlikely to be noise of the questions. (It says nothing about the noise
    of training: another seed is another model; README "Stage 4" has seeds.)"""
    n, k = lost + gained, min(lost, gained)
    if n == 0:
        return 1.0
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n)


def paired_outcomes(before: list[dict], after: list[dict], domain: str, key: str = "correct") -> tuple[int, int, int, int, int]:
    """(n, right before, right after, lost, gained) over the questions of `domain` that both
    response lists answered and graded (matched on the prompt; rows without `key`, from an eval
    older than per-question grades, or graded None, are left out). lost = right before and wrong
    after, gained = wrong before and right after."""
    a = {r["prompt"]: r.get(key) for r in before if r.get("domain") == domain and r.get(key) is not None}
    pairs = [(a[r["prompt"]], r[key]) for r in after
             if r.get("domain") == domain and r.get(key) is not None and r["prompt"] in a]
    return (len(pairs), sum(x for x, _ in pairs), sum(y for _, y in pairs),
            sum(x and not y for x, y in pairs), sum(y and not x for x, y in pairs))


def fmt_p(p: float) -> str:
    return f"{p:.3f}" if p >= 0.001 else "< 0.001"


def response_files(out: Path) -> list[tuple[str, Path]]:
    """(model, its eval's responses JSONL) in eval_rows' order: the embedded model and stage 1 from
    stage 1's start / end evals, the later stages from the pipeline's eval of their final/."""
    s1 = out / STAGES[0][0]
    files = [(ROW_LABELS[0], s1 / "eval_start_responses.jsonl"), (ROW_LABELS[1], s1 / "eval_end_responses.jsonl")]
    files += [(label, out / "eval" / name / "eval_responses.jsonl") for (name, *_), label in zip(STAGES[1:], ROW_LABELS[2:])]
    return [(m, f) for m, f in files if f.exists()]


PAIRED = (("math", "correct", "math"), ("math", "first_correct", "math, 1st attempt"),
          ("transfer", "correct", "transfer"), ("code", "correct", "code"))


def paired_lines(out: Path) -> list[str]:
    """The report's question-by-question table: every consecutive pair of models, and the final
    model against the embedded one, per eval: right before / after (95% Wilson interval), questions
    lost and gained, exact McNemar p."""
    files = response_files(out)
    if len(files) < 2:
        return []
    resp = {m: read_metrics(f) for m, f in files}
    pairs = list(zip(files, files[1:])) + ([(files[0], files[-1])] if len(files) > 2 else [])
    lines = ["| models | eval | right before | right after | lost | gained | McNemar p |", "|---|---|---|---|---|---|---|"]
    def pct(k: int, n: int) -> str:
        lo, hi = wilson_interval(k, n)
        return f"{k}/{n} ({100 * lo:.0f}-{100 * hi:.0f}%)"
    for (ma, _), (mb, _) in pairs:
        for dom, key, name in PAIRED:
            n, ra, rb, lost, gained = paired_outcomes(resp[ma], resp[mb], dom, key)
            if n:
                lines.append(f"| {ma} -> {mb} | {name} | {pct(ra, n)} | {pct(rb, n)} | {lost} | {gained} | "
                             f"{fmt_p(mcnemar_p(lost, gained))} |")
    if len(lines) == 2:
        return ["No per-question grades in these responses (an eval older than `correct` / `first_correct`)."]
    return lines


def headline(out: Path, rows: list[tuple[str, dict]]) -> list[str]:
    """The sentences the run exists to show: final model vs the embedded one, student vs teacher."""
    ev = dict(rows)
    n = lambda r, k: round(r[k] * r[f"{k.split('_')[0]}_n"]) if r.get(k) is not None else "-"  # noqa: E731
    out_lines = []
    start, final = ev.get(ROW_LABELS[0]), ev.get(ROW_LABELS[4])
    if start and final:
        out_lines.append(f"- Final model vs the embedded one: math {n(start, 'math_acc')} -> {n(final, 'math_acc')} of "
                         f"{final['math_n']}, transfer split {n(start, 'transfer_acc')} -> {n(final, 'transfer_acc')} "
                         f"of {final.get('transfer_n', '-')}, code {n(start, 'code_acc')} -> {n(final, 'code_acc')} "
                         f"of {final.get('code_n', '-')}.")
    teacher, student = ev.get(ROW_LABELS[2]), ev.get(ROW_LABELS[3])
    s3 = read_json(out / STAGES[2][0] / "eval_summary.json") or {}
    if teacher and student:
        kept = f" ({student['math_acc'] / teacher['math_acc']:.0%} of it)" if teacher.get("math_acc") else ""
        sp = s3.get("speed", {})
        pairs = (f", {sp['speedup_pairs_min']:.2f}-{sp['speedup_pairs_max']:.2f} in the alternated pairs"
                 if "speedup_pairs_min" in sp else "")
        out_lines.append(f"- Distilled student vs its teacher: math {n(student, 'math_acc')} vs {n(teacher, 'math_acc')} "
                         f"of {teacher['math_n']}{kept}, decoding {fmt(s3.get('speedup_vs_teacher'))}x the teacher's "
                         f"tokens/s{pairs} ({s3.get('student_params', 0) / 1e6:.0f}M vs "
                         f"{s3.get('teacher_params', 0) / 1e6:.0f}M parameters).")
    rm = read_json(rm_eval_file(out))
    if rm:
        out_lines.append(f"- Reward model (stage 4, on the student): held-out pairwise accuracy "
                         f"{rm['rm_test_acc_before']:.2f} with its untrained head -> {rm['rm_test_acc_after']:.2f} "
                         f"({rm['n_test']} pairs).")
    return out_lines


def stage_rows(out: Path) -> list[tuple[str, str, object, object]]:
    """(stage, metric, before, after) for the metric each stage exists to move (held-out data)."""
    rows = []
    s1 = read_json(out / "1_cold_start_sft" / "eval_summary.json")
    if s1:
        for k in ("math_acc", "math_acc_first", "math_with_verification", "math_verdict_acc", "code_acc", "heldout_loss"):
            rows.append(("1 cold-start SFT", k, s1["start"].get(k), s1["end"].get(k)))
    s2 = read_json(out / "2_overall_sft" / "eval_summary.json")
    if s2:
        for k in ("agent_valid", "agent_success", "math_acc", "math_with_verification", "loss_chat", "loss_agent",
                  "loss_reasoning", "loss_reflective"):
            rows.append(("2 overall SFT", k, s2["start"].get(k), s2["end"].get(k)))
    s3 = read_json(out / "3_distill" / "eval_summary.json")
    if s3:
        for k in ("heldout_kl", "math_acc", "math_with_verification", "code_acc"):
            rows.append(("3 distill (student)", k, s3["start"].get(k), s3["end"].get(k)))
        rows.append(("3 distill", "teacher math_acc", s3.get("teacher_eval", {}).get("math_acc"), None))
        sp = s3.get("speed", {})
        rows.append(("3 distill", "decoding tok/s, teacher -> student (alternated)", sp.get("teacher_tok_per_s"),
                     sp.get("student_tok_per_s")))
        rows.append(("3 distill", "student speed-up vs teacher", None, s3.get("speedup_vs_teacher")))
    rm = read_json(rm_eval_file(out))
    if rm:
        rows.append(("4 reward model", "pairwise acc (held-out pairs)", rm["rm_test_acc_before"], rm["rm_test_acc_after"]))
    s4 = read_json(out / "4_rl" / "summary.json") or []
    steps = read_metrics(out / "4_rl" / "metrics.jsonl")
    for i, (before, after) in enumerate(zip(s4, s4[1:]), 1):  # one row per sub-stage and metric
        for k in ("math_acc", "code_pass"):
            if k in after:
                n = f", n = {after[f'{k}_n']}" if f"{k}_n" in after else ""
                rows.append((f"4 RL {after['after']}", f"{k} (RL's own eval{n}, one greedy answer)", before.get(k), after[k]))
        r = [x["reward_mean"] for x in steps if x.get("stage") == i and "reward_mean" in x]
        if r:
            rows.append((f"4 RL {after['after']}", "reward_mean, first -> last step", r[0], r[-1]))
    return rows


def plot_curves(out: Path) -> list[str]:
    """One PNG per stage: its training curves from metrics.jsonl. Returns the file names."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots = out / "plots"
    plots.mkdir(exist_ok=True)
    panels = {"1_cold_start_sft": ["loss"], "2_overall_sft": ["loss"],
              "3_distill": ["loss", "kd_div", "seqkd_ce", "eval_heldout_kl"],
              "4_rl": ["reward_mean", "verify_reward_mean", "kl_k3", "entropy", "resp_len_mean"]}
    names = []
    for stage, keys in panels.items():
        rows = read_metrics(out / stage / "metrics.jsonl")
        keys = [k for k in keys if any(k in r for r in rows)]
        if not keys:
            continue
        fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3), squeeze=False)
        for ax, k in zip(axes[0], keys):
            pts = [(r["step"], r[k]) for r in rows if isinstance(r.get(k), (int, float))]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="." if len(pts) < 40 else None)
            ax.set_title(k)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
        fig.suptitle(stage)
        fig.tight_layout()
        fig.savefig(plots / f"{stage}.png", dpi=90)
        plt.close(fig)
        names.append(f"plots/{stage}.png")
    return names


def machine_lines(out: Path) -> list[str]:
    """Where the figures come from (machines.json: what ran where), one line per machine."""
    by: dict[str, list[str]] = {}
    for what, desc in (read_json(out / "machines.json") or {}).items():
        by.setdefault(desc, []).append(what)
    if not by:
        return []
    if len(by) == 1:
        return [f"Machine: {next(iter(by))}.", ""]
    return ["Machines (the run went on elsewhere):"] + [f"- {d}: {', '.join(w)}" for d, w in by.items()] + [""]


def write_report(out: Path, timings: dict) -> Path:
    rows = eval_rows(out)
    n = {k: next((r.get(f"{k}_n") for _, r in rows if r.get(f"{k}_n")), 0) for k in ("math", "transfer", "code")}
    lines = ["# Pipeline report", "", f"Output: `{out}`. Held-out data, greedy decoding.", ""] + machine_lines(out)
    lines += [f"## Every model through the same eval ({n['math']} math, {n['transfer']} transfer-split, "
              f"{n['code']} code questions; accuracy of the last attempt unless said)", "",
              "| model | " + " | ".join(h for h, _ in EVAL_COLUMNS) + " |", "|---" * (len(EVAL_COLUMNS) + 1) + "|"]
    lines += [f"| {m} | " + " | ".join(fmt(r.get(k)) for _, k in EVAL_COLUMNS) + " |" for m, r in rows]
    lines += [""] + headline(out, rows) + math_checks(rows)
    plot = plot_eval(out, rows)
    lines += (["", f"![{plot}]({plot})"] if plot else [])
    paired = paired_lines(out)
    if paired:
        lines += ["", "## Question by question: which changes are more than the noise of the questions", "",
                  "The same questions for every model, so each pair is compared on the questions one got right and "
                  "the other wrong (exact McNemar test; small p: unlikely to be the luck of which questions were "
                  "asked). In brackets the 95% Wilson interval of each accuracy. A p here says nothing about the "
                  "seed: another training seed is another model.", ""] + paired
    lines += ["", "## Each stage's own metric (before = the stage's input model, after = its output)", "",
              "| stage | metric | before | after |", "|---|---|---|---|"]
    lines += [f"| {s} | {k} | {fmt(a)} | {fmt(b)} |" for s, k, a, b in stage_rows(out) if (a, b) != (None, None)]
    rates = read_json(out / "gemm_rates.json") or {}

    def rate(k: str) -> str:  # "begin -> end dtype" per attempt (974bf5e wrote one "gflops" reading)
        return " / ".join(f"{r['begin']:.0f} -> {r['end']:.0f} {r['dtype']}" if "end" in r else
                          f"{r['gflops']:.0f} {r['dtype']}" for r in rates.get(k, [])) or "-"
    lines += ["", "| stage | wall time (min) | GEMM rate as it began -> as it ended (GFLOP/s, `gemm_rate`) |",
              "|---|---|---|"]
    lines += [f"| {k} | {v:.1f} | {rate(k)} |" for k, v in timings.items()]
    lines += [f"| total | {sum(timings.values()):.1f} | |", "", "## Training curves", ""]
    lines += [f"![{p}]({p})" for p in plot_curves(out)]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv=None):
    cfg = C.parse_config(Config, argv)
    out = Path(cfg.out_dir)
    timings = (read_json(out / "timings.json") or {}) if cfg.report_only else run_stages(cfg)
    if cfg.dry_run:
        return
    print(f"[pipeline] report: {write_report(out, timings)}", flush=True)


if __name__ == "__main__":
    main()
