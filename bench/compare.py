"""
bench/compare.py: this project against Hugging Face TRL on the same work, side by side.

    python bench/compare.py                        # ours only (TRL not installed): figures + tables
    /path/to/bench-venv/bin/python bench/compare.py  # with TRL (requirements-bench.txt): ratios too

1. The machine: CPU, flags, the measured GEMM peak (fp32 and bf16; square, and the shapes the stages
   use), the precision `auto` picks.
2. The fixed work, built here from seeds (no download): a BPE tokenizer trained with `tokenizers`
   (vocab 4096, ChatML), a Llama of 5M parameters (4 layers, hidden 256) saved as an HF directory,
   160 chat samples of exactly 213 tokens and 64 math prompts from data/, and a digest of it all
   (two runs with the same digest did the same work).
3. SFT: 20 optimizer steps of 8 samples through `common.sft_step` vs TRL's SFTTrainer. GRPO: N steps
   of 8 prompts x 4 samples x 64 new tokens, the math reward, through the real `04_rl.py` vs TRL's
   GRPOTrainer with the same reward function (and `grpo_every_row`: ours with the update's skipping
   of zero-gradient rows off, since on this work every reward is 0). Token-level distillation: 12 steps of 8 chats,
   generalised JSD (beta 0.5), off-policy, a teacher ~6x the student, through 03_distill's
   `train_step` vs TRL's GKDTrainer (lmbda 0). DPO: 12 steps of 8 pairs (beta 0.1, reference
   log-probs precomputed on both sides) through `train_step` vs TRL's DPOTrainer. Each run is its own process (peak RSS is its own),
   runs alternate A B A B so machine drift hits both; medians and min-max are printed.
4. Tables: training tokens/s and peak memory against sequence length, generation against the
   group size G and the batch, on the real code paths.

A benchmark prints; it asserts nothing. Run it on a quiet machine (../shared/tools/quiet-check).
"""
import argparse
import hashlib
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
SFT_LEN, SFT_BATCH, SFT_STEPS = 213, 8, 20
GRPO_PROMPTS, GRPO_G, GRPO_NEW = 8, 4, 64
KD_BATCH, KD_STEPS, KD_MAX_LEN = 8, 12, 256  # distillation and DPO: 8 chats / 8 pairs per step


# ----------------------------------------------------------------------------------------------
# The fixed work


def build_work(work: Path) -> str:
    """Tokenizer, model, data under `work`; returns the digest of all of it."""
    import torch
    from tokenizers import Tokenizer, decoders, models as tkm, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    import common as C
    import models as M

    work.mkdir(parents=True, exist_ok=True)
    chats = [r["messages"] for r in C.read_jsonl(ROOT / "data" / "chat_train.jsonl")]
    math = C.read_jsonl(ROOT / "data" / "math_train.jsonl")
    text = [m["content"] for c in chats for m in c] + [r["question"] for r in math]
    tk = Tokenizer(tkm.BPE(unk_token="<|endoftext|>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(text, trainers.BpeTrainer(vocab_size=4096, seed=0, show_progress=False,
                                                     special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                                     initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  pad_token="<|im_end|>", unk_token="<|endoftext|>")
    tok.chat_template = M.CHATML_TEMPLATE
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=4096,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(work / "model")
    tok.save_pretrained(work / "model")
    # SFT samples of exactly SFT_LEN tokens (chats concatenated until long enough, then cut), so
    # both trainers do the same work per step with no padding
    samples, buf = [], []
    for c in chats * 4:
        buf += tok.apply_chat_template(c, tokenize=True, return_dict=False)
        while len(buf) >= SFT_LEN and len(samples) < SFT_BATCH * SFT_STEPS:
            samples.append(buf[:SFT_LEN])
            buf = buf[SFT_LEN:]
    (work / "sft.jsonl").write_text("".join(json.dumps({"input_ids": s}) + "\n" for s in samples))
    (work / "prompts.jsonl").write_text("".join(json.dumps({"question": r["question"], "answer": r["answer"]}) + "\n"
                                                for r in math[:64]))
    # distillation: a teacher ~6x the student (8 layers x 512: 27.6M vs 4.6M parameters), the same
    # tokenizer; chats for the token-level step, preference pairs for the DPO step
    tcfg = LlamaConfig(vocab_size=len(tok), hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                       num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=4096,
                       tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                       pad_token_id=tok.pad_token_id)
    torch.manual_seed(1)
    LlamaForCausalLM(tcfg).save_pretrained(work / "teacher")
    tok.save_pretrained(work / "teacher")
    fits = [c for c in chats if len(tok.apply_chat_template(c, tokenize=True, return_dict=False)) <= KD_MAX_LEN]
    (work / "kd.jsonl").write_text("".join(json.dumps({"messages": c}) + "\n" for c in fits[:KD_BATCH * KD_STEPS]))
    pref = C.read_jsonl(ROOT / "data" / "pref_train.jsonl")[:KD_BATCH * KD_STEPS]
    (work / "pref.jsonl").write_text("".join(json.dumps({k: r[k] for k in ("prompt", "chosen", "rejected")}) + "\n"
                                             for r in pref))
    h = hashlib.sha256()
    for f in ("model/tokenizer.json", "model/model.safetensors", "teacher/model.safetensors", "sft.jsonl",
              "prompts.jsonl", "kd.jsonl", "pref.jsonl"):
        h.update((work / f).read_bytes())
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------------------------
# The runs (each in its own process: `--run NAME --work DIR`; prints one JSON line)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_ours_sft(work: Path) -> dict:
    import torch

    import common as C
    import models as M
    d = C.init_distributed("cpu")  # as the stages do: C.keep_freed_memory on the CPU
    dtype = C.resolve_dtype("auto", d.device)
    model, tok = M.load_model_and_tokenizer(str(work / "model"))
    policy = M.LogProbModel(model)
    opt = C.make_optimizer(policy, 1e-4, 0.0)
    rows = [{"input_ids": r["input_ids"], "labels": r["input_ids"], "position_ids": list(range(SFT_LEN))}
            for r in C.read_jsonl(work / "sft.jsonl")]
    times = []
    for step in range(SFT_STEPS):
        t = time.perf_counter()
        C.sft_step(policy, opt, rows[step * SFT_BATCH:(step + 1) * SFT_BATCH], d, dtype, SFT_BATCH,
                   tok.pad_token_id, 1e-4, 1.0, step)
        times.append(time.perf_counter() - t)
    step_s = statistics.median(times[1:])
    return {"step_s": step_s, "tok_s": SFT_BATCH * SFT_LEN / step_s, "rss_mib": peak_rss_mib(), "dtype": str(dtype),
            "threads": torch.get_num_threads()}


def _trl_timing_callback(times: list):
    from transformers import TrainerCallback

    class Timing(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t)
    return Timing()


def _trl_inputs(work: Path, rows_file: str):
    """What every TRL run starts from: bf16 where `--precision auto` would pick it, the student and
    its tokenizer (fp32 master weights, as ours), and the rows of work/rows_file."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import common as C
    bf16 = C.resolve_dtype("auto", torch.device("cpu")) == torch.bfloat16
    tok = AutoTokenizer.from_pretrained(work / "model")
    model = AutoModelForCausalLM.from_pretrained(work / "model", dtype=torch.float32)
    return bf16, tok, model, [json.loads(x) for x in (work / rows_file).read_text().splitlines()]


def _trl_args(out: str, bf16: bool, constant_lr: bool = True) -> dict:
    """The TrainingArguments every TRL run shares (CPU, no logging / saving, seed 0); constant_lr:
    lr 1e-4, constant, no weight decay, clip 1.0 (our SFT-like steps' settings)."""
    common = dict(output_dir=out, bf16=bf16, use_cpu=True, logging_steps=1000, save_strategy="no", report_to="none",
                  dataloader_num_workers=0, seed=0)
    return common | (dict(learning_rate=1e-4, lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=1.0)
                     if constant_lr else {})


def run_trl_sft(work: Path) -> dict:
    import torch
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    bf16, tok, model, rows = _trl_inputs(work, "sft.jsonl")
    data = Dataset.from_list(rows)
    times = []
    with tempfile.TemporaryDirectory() as out:
        args = SFTConfig(**_trl_args(out, bf16), max_steps=SFT_STEPS, per_device_train_batch_size=SFT_BATCH,
                         max_length=SFT_LEN, packing=False)
        SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok,
                   callbacks=[_trl_timing_callback(times)]).train()
    step_s = statistics.median(times[1:])
    return {"step_s": step_s, "tok_s": SFT_BATCH * SFT_LEN / step_s, "rss_mib": peak_rss_mib(), "bf16": bf16,
            "threads": torch.get_num_threads()}


def run_ours_grpo(work: Path, steps: int, every_row: bool = False) -> dict:
    sys.path.insert(0, str(ROOT / "tests"))
    from stage_scripts import load_script
    rl = load_script("04_rl.py", "rl04_bench")
    if every_row:  # see run_ours_grpo_every_row
        rl.rows_to_run = lambda rows, *args: rows
    with tempfile.TemporaryDirectory() as out:
        rl.main(["--model", str(work / "model"), "--out_dir", out, "--resume", "false",
                 "--stages", f"stem:{work / 'prompts.jsonl'}:{steps}", "--prompts_per_step", str(GRPO_PROMPTS),
                 "--group_size", str(GRPO_G), "--max_new_tokens", str(GRPO_NEW), "--temperature", "1.0",
                 "--kl_coef", "0", "--lr", "1e-6", "--micro_batch_size", str(GRPO_PROMPTS * GRPO_G),
                 "--eval_kinds", "stem", "--eval_limit", "0", "--format_weight", "0", "--dynamic_sampling", "false"])
        rows = [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "step_s" in r][1:]  # the first step warms up
    med = lambda k: statistics.median(r[k] for r in rows)  # noqa: E731
    return {"step_s": med("step_s"), "rollout_s": med("gen_s"), "reward_s": med("reward_s"),
            "train_s": med("score_s") + med("update_s"), "gen_tok_s": med("gen_tok_per_s"), "rss_mib": peak_rss_mib()}


def run_ours_grpo_every_row(work: Path, steps: int) -> dict:
    """run_ours_grpo with 04_rl.rows_to_run switched off: every row through the forward and backward.
    Why: on this work every reward is 0 (the random 5M model never answers a math question), so
    every group has advantage 0 and the stage's update skips every row (exact: their gradient is 0),
    while TRL runs its forward and backward on them. The skip is a real saving (in the pipeline's
    stage 4, 25-100% of the groups had equal rewards), but this run is the like-for-like training path."""
    return run_ours_grpo(work, steps, every_row=True)


def run_trl_grpo(work: Path, steps: int) -> dict:
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    import verify as V
    bf16, tok, model, rows = _trl_inputs(work, "prompts.jsonl")
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": r["question"]}], "answer": r["answer"]} for r in rows])
    reward_time = [0.0]

    def math_reward(completions, answer, **kw):  # the same checker as ours, in-process
        t = time.perf_counter()
        out = [V.score_math(c[0]["content"], str(a))[0] for c, a in zip(completions, answer)]
        reward_time[0] += time.perf_counter() - t
        return out
    times = []
    with tempfile.TemporaryDirectory() as out:
        args = GRPOConfig(**_trl_args(out, bf16, constant_lr=False), max_steps=steps,
                          per_device_train_batch_size=GRPO_PROMPTS * GRPO_G, num_generations=GRPO_G,
                          max_completion_length=GRPO_NEW, temperature=1.0, beta=0.0, learning_rate=1e-6)
        GRPOTrainer(model=model, reward_funcs=[math_reward], args=args, train_dataset=data, processing_class=tok,
                    callbacks=[_trl_timing_callback(times)]).train()
    return {"step_s": statistics.median(times[1:]), "reward_s": reward_time[0] / max(steps, 1), "rss_mib": peak_rss_mib()}


def _stage3():
    sys.path.insert(0, str(ROOT / "tests"))
    from stage_scripts import load_script
    return load_script("03_distill.py", "distill_bench")


def run_ours_gkd(work: Path) -> dict:
    """03_distill's real train_step, token level only: generalised JSD (beta 0.5, T = 1), off-policy
    (lmbda 0) on the dataset's chats, the teacher live on the same rows."""
    import torch

    import common as C
    import models as M
    D3 = _stage3()
    d = C.init_distributed("cpu")  # as the stages do: C.keep_freed_memory on the CPU
    dtype = C.resolve_dtype("auto", d.device)
    s_lm, tok = M.load_model_and_tokenizer(str(work / "model"))
    t_lm, _ = M.load_model_and_tokenizer(str(work / "teacher"))
    teacher, student = D3.TeacherModel(D3.frozen(t_lm, dtype)), D3.StudentModel(s_lm)
    opt = C.make_optimizer(student, 1e-4, 0.0)
    cfg = D3.Config(alpha=1.0, gamma=0.0, max_len=KD_MAX_LEN, micro_batch_size=KD_BATCH)
    kd = D3.KD(divergence="jsd", temperature=1.0, beta=0.5)
    samples = [C.tokenize_chat(tok, r["messages"]) for r in C.read_jsonl(work / "kd.jsonl")]
    times, tokens = [], []
    for step in range(KD_STEPS):
        batch = samples[step * KD_BATCH:(step + 1) * KD_BATCH]
        t = time.perf_counter()
        D3.train_step(student, teacher, opt, D3.StepData(kd=batch, ce=None, pairs=[], on_policy=False), cfg, kd, d,
                      dtype, tok.pad_token_id, 1e-4, step)
        times.append(time.perf_counter() - t)
        tokens.append(sum(len(x["input_ids"]) for x in batch))
    step_s = statistics.median(times[1:])
    return {"step_s": step_s, "tok_s": statistics.median(tokens[1:]) / step_s, "rss_mib": peak_rss_mib(),
            "dtype": str(dtype), "threads": torch.get_num_threads()}


def run_trl_gkd(work: Path) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    bf16, tok, model, rows = _trl_inputs(work, "kd.jsonl")
    teacher = AutoModelForCausalLM.from_pretrained(work / "teacher", dtype=torch.float32)
    data = Dataset.from_list(rows)
    times = []
    with tempfile.TemporaryDirectory() as out:
        args = GKDConfig(**_trl_args(out, bf16), max_steps=KD_STEPS, per_device_train_batch_size=KD_BATCH,
                         max_length=KD_MAX_LEN, lmbda=0.0, beta=0.5, temperature=1.0, seq_kd=False)
        GKDTrainer(model=model, teacher_model=teacher, args=args, train_dataset=data, processing_class=tok,
                   callbacks=[_trl_timing_callback(times)]).train()
    return {"step_s": statistics.median(times[1:]), "rss_mib": peak_rss_mib(), "bf16": bf16}


def run_ours_dpo(work: Path) -> dict:
    """03_distill's real train_step, DPO only (beta 0.1), reference log-probs computed before the
    timed steps (as the stage does when it builds its pairs)."""
    import common as C
    import models as M
    D3 = _stage3()
    d = C.init_distributed("cpu")  # as the stages do: C.keep_freed_memory on the CPU
    dtype = C.resolve_dtype("auto", d.device)
    lm, tok = M.load_model_and_tokenizer(str(work / "model"))
    student = D3.StudentModel(lm)
    opt = C.make_optimizer(student, 1e-4, 0.0)
    cfg = D3.Config(alpha=0.0, gamma=1.0, seqkd_weight=0.0, dpo_weight=1.0, dpo_beta=0.1, micro_batch_size=KD_BATCH)
    pairs = []
    for r in C.read_jsonl(work / "pref.jsonl"):
        user = [{"role": "user", "content": r["prompt"]}]
        pairs.append({x: C.tokenize_chat(tok, user + [{"role": "assistant", "content": r[x]}]) for x in ("chosen", "rejected")})
    refs = D3.seq_logps(student, [p[x] for p in pairs for x in ("chosen", "rejected")], 16, tok.pad_token_id, d, dtype)
    for i, p in enumerate(pairs):
        p["ref_chosen"], p["ref_rejected"] = refs[2 * i], refs[2 * i + 1]
    times = []
    for step in range(KD_STEPS):
        t = time.perf_counter()
        D3.train_step(student, None, opt, D3.StepData(kd=[], ce=None, pairs=pairs[step * KD_BATCH:(step + 1) * KD_BATCH],
                                                      on_policy=False), cfg, D3.KD(), d, dtype, tok.pad_token_id, 1e-4, step)
        times.append(time.perf_counter() - t)
    return {"step_s": statistics.median(times[1:]), "rss_mib": peak_rss_mib(), "dtype": str(dtype)}


def run_trl_dpo(work: Path) -> dict:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    bf16, tok, model, rows = _trl_inputs(work, "pref.jsonl")
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}],
                               "chosen": [{"role": "assistant", "content": r["chosen"]}],
                               "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in rows])
    times = []
    with tempfile.TemporaryDirectory() as out:
        args = DPOConfig(**_trl_args(out, bf16), max_steps=KD_STEPS, per_device_train_batch_size=KD_BATCH,
                         max_length=KD_MAX_LEN, beta=0.1, precompute_ref_log_probs=True)
        DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tok,
                   callbacks=[_trl_timing_callback(times)]).train()
    return {"step_s": statistics.median(times[1:]), "rss_mib": peak_rss_mib(), "bf16": bf16}


# ----------------------------------------------------------------------------------------------
# The machine and the scaling tables (ours, in this process)


def machine_report() -> None:
    import platform

    import torch
    from throughput import matmul_peak

    import common as C
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor())
    flags = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in open("/proc/cpuinfo").read()]
    dev = torch.device("cpu")
    print(f"machine: {cpu}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}, flags {' '.join(flags)}; "
          f"precision auto -> {C.resolve_dtype('auto', dev)}")
    for dt in (torch.float32, torch.bfloat16):
        peak, n = matmul_peak(dev, dt, 2.0)
        shapes = []
        for m, k, n_ in ((64, 576, 1536), (64, 576, 49152), (2048, 576, 1536), (32, 256, 688), (1704, 256, 688)):
            a, b = torch.randn(m, k, dtype=dt), torch.randn(k, n_, dtype=dt)
            a @ b
            t = time.perf_counter()
            reps = 0
            while time.perf_counter() - t < 0.3:
                a @ b
                reps += 1
            shapes.append(f"{m}x{k}x{n_} {2 * m * k * n_ * reps / (time.perf_counter() - t) / 1e9:.0f}")
        print(f"  GEMM {str(dt).split('.')[-1]}: square peak {peak / 1e9:.0f} GFLOP/s (n={n}); at stage shapes "
              f"(GFLOP/s): {', '.join(shapes)}")


def scaling_report(work: Path) -> None:
    """Training tok/s and peak RSS vs sequence length; generation tok/s vs G and batch (ours)."""
    import torch
    from throughput import peak_memory, reset_peak_memory

    import common as C
    import models as M
    import sampler as S
    d, dev = C.init_distributed("cpu"), torch.device("cpu")
    dtype = C.resolve_dtype("auto", dev)
    model, tok = M.load_model_and_tokenizer(str(work / "model"))
    policy = M.LogProbModel(model)
    opt = C.make_optimizer(policy, 1e-5, 0.0)
    print(f"\ntraining, bench model, {dtype}, 4096 tokens per step: seq len -> tok/s, peak RSS above the start")
    g = torch.Generator().manual_seed(0)
    for T in (256, 512, 1024, 2048):
        rows = [{"input_ids": (x := torch.randint(3, len(tok), (T,), generator=g).tolist()), "labels": x,
                 "position_ids": list(range(T))} for _ in range(max(1, 4096 // T))]
        C.sft_step(policy, opt, rows, d, dtype, len(rows), tok.pad_token_id, 1e-5, 1.0, 0)  # warm-up
        base = reset_peak_memory(dev)
        t = time.perf_counter()
        for step in range(3):
            C.sft_step(policy, opt, rows, d, dtype, len(rows), tok.pad_token_id, 1e-5, 1.0, step)
        dt = (time.perf_counter() - t) / 3
        print(f"  T={T:5d}: {len(rows) * T / dt:8.0f} tok/s, +{(peak_memory(dev) - base) / 2**20:6.0f} MiB")
    prompts = [C.chat_prompt_ids(tok, [{"role": "user", "content": r["question"]}])
               for r in C.read_jsonl(work / "prompts.jsonl")]
    print(f"generation, bench model, {dtype}, {GRPO_NEW} new tokens: (prompts x G) -> tok/s, peak RSS above the start")
    for B, G in ((8, 4), (8, 8), (8, 16), (16, 4), (32, 4), (64, 1)):
        ps = [p for p in prompts[:B] for _ in range(G)]
        base = reset_peak_memory(dev)
        t = time.perf_counter()
        with torch.no_grad(), S.sampling_model(policy, d, dtype) as m:
            out = S.generate(m, ps, GRPO_NEW, tok.eos_token_id, tok.pad_token_id, temperature=1.0,
                             generator=torch.Generator().manual_seed(1))
        dt = time.perf_counter() - t
        print(f"  {B:3d} x G={G:2d} ({B * G:4d} rows): {int(out.lengths.sum()) / dt:8.0f} tok/s, "
              f"+{(peak_memory(dev) - base) / 2**20:6.0f} MiB")


# ----------------------------------------------------------------------------------------------
# The driver


def child(name: str, work: Path, steps: int, python: str, trl_keep_freed_memory: bool = False) -> dict:
    env = {**os.environ, "TRL_KEEP_FREED_MEMORY": "1" if trl_keep_freed_memory else "0"}
    out = subprocess.run([python, __file__, "--run", name, "--work", str(work), "--grpo_steps", str(steps)],
                         capture_output=True, text=True, cwd=ROOT, env=env)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1][:300] if out.stderr.strip() else f"exit {out.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def summarise(results: list[dict], key: str) -> str:
    vals = [r[key] for r in results if key in r]
    if not vals:
        return "n/a"
    return f"{statistics.median(vals):.4g} ({min(vals):.4g}-{max(vals):.4g})"


def ratio(a_runs: list[dict], b_runs: list[dict], key: str) -> str:
    """Pairwise a / b of alternated runs (run i with run i): median (min-max)."""
    rs = [a[key] / b[key] for a, b in zip(a_runs, b_runs) if key in a and key in b and b[key]]
    return f"{statistics.median(rs):.2f} ({min(rs):.2f}-{max(rs):.2f})" if rs else "n/a"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=2, help="A B rounds per comparison")
    ap.add_argument("--grpo_steps", type=int, default=6)
    ap.add_argument("--work", default="", help="work directory (default: a fresh temp dir)")
    ap.add_argument("--run", default="", help=argparse.SUPPRESS)
    ap.add_argument("--skip_tables", action="store_true")
    ap.add_argument("--trl_keep_freed_memory", action="store_true",
                    help="give TRL's runs the allocator setting ours get (common.keep_freed_memory): "
                         "is the gap ours or malloc's?")
    ap.add_argument("--tasks", default="sft,grpo,grpo_every_row,gkd,dpo",
                    help="comma-separated subset of sft,grpo,grpo_every_row,gkd,dpo")
    args = ap.parse_args()
    if args.run:
        runs = {"ours_sft": run_ours_sft, "trl_sft": run_trl_sft, "ours_grpo": run_ours_grpo, "trl_grpo": run_trl_grpo,
                "ours_grpo_every_row": run_ours_grpo_every_row, "trl_grpo_every_row": run_trl_grpo,
                "ours_gkd": run_ours_gkd, "trl_gkd": run_trl_gkd, "ours_dpo": run_ours_dpo, "trl_dpo": run_trl_dpo}
        fn = runs[args.run]
        if args.run.startswith("trl_") and os.environ.get("TRL_KEEP_FREED_MEMORY") == "1":
            import common as C
            C.keep_freed_memory()
        print(json.dumps(fn(Path(args.work), args.grpo_steps) if "grpo" in args.run else fn(Path(args.work))))
        return
    machine_report()
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_work_"))
    print(f"\nwork: {work}, digest {build_work(work)} ({SFT_BATCH * SFT_STEPS} SFT samples x {SFT_LEN} tokens; "
          f"GRPO {GRPO_PROMPTS} prompts x {GRPO_G} samples x {GRPO_NEW} new tokens, math reward, {args.grpo_steps} steps; "
          f"GKD (JSD 0.5, off-policy, teacher 27.6M -> student 4.6M) and DPO (beta 0.1): {KD_STEPS} steps x "
          f"{KD_BATCH} chats / pairs)")
    have_trl = importlib.util.find_spec("trl") is not None
    if not have_trl:
        print("TRL is not installed in this interpreter: ours only (BENCHMARKS.md: the bench venv)")
    for task in [t for t in ("sft", "grpo", "grpo_every_row", "gkd", "dpo") if t in args.tasks.split(",")]:
        res = {"ours": [], "trl": []}
        for _ in range(args.rounds):  # A B A B
            res["ours"].append(child(f"ours_{task}", work, args.grpo_steps, sys.executable))
            if have_trl:
                res["trl"].append(child(f"trl_{task}", work, args.grpo_steps, sys.executable,
                                        args.trl_keep_freed_memory))
        keys = {"sft": ["step_s", "tok_s", "rss_mib"], "gkd": ["step_s", "tok_s", "rss_mib"], "dpo": ["step_s", "rss_mib"],
                "grpo": ["step_s", "rollout_s", "reward_s", "train_s", "gen_tok_s", "rss_mib"]}[task.removesuffix("_every_row")]
        print(f"\n{task.upper()}, median (min-max) of {args.rounds} alternated runs")
        print(f"  {'':6}" + "".join(f"{k:>22}" for k in keys))
        for who in ("ours", "trl") if have_trl else ("ours",):
            errs = [r["error"] for r in res[who] if "error" in r]
            print(f"  {who:6}" + "".join(f"{summarise(res[who], k):>22}" for k in keys) + (f"  errors: {errs}" if errs else ""))
        if have_trl:
            print(f"  speed ours / TRL (TRL step time / ours): {ratio(res['trl'], res['ours'], 'step_s')}x;  "
                  f"peak RSS ours / TRL: {ratio(res['ours'], res['trl'], 'rss_mib')}")
    if not args.skip_tables:
        scaling_report(work)


if __name__ == "__main__":
    main()
