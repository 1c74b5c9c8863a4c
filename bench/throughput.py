"""
Benchmark: training throughput and MFU of the shared training path on this machine.

1. Measures the machine's dense matmul peak (square matmuls, sized up until one takes a while) in
   fp32 and bf16 on the chosen device.
2. --mode train (default): runs a few optimizer steps of M.LogProbModel + C.masked_ce_loss + AdamW (C.make_optimizer /
   C.optimizer_step) on random tokens, every position trained, precision from C.resolve_dtype
   (autocast: bf16 only where the hardware has it), and prints tokens/s, peak memory and
   MFU = 6 * n_params * tokens/s / measured matmul peak of the compute dtype.
   n_params counts every parameter once (the tied embedding once, as the output projection);
   6 N FLOPs per token ignores attention's T^2 term, as usual.
3. --mode generate: samples --batch prompts (held-out math questions in the chat template, ~54
   tokens on SmolLM2) for --new_tokens tokens at --temperature through the sampler every stage uses
   (sampler.sampling_model + sampler.generate: in bf16 the weight copy and the written-out decode
   step), and prints generated tokens/s and MFU = 2 N tokens/s / the measured matmul peak (it
   leaves out the prefill's FLOPs). --repeats timed runs after a warm-up; the median. Then what
   bounds it: the prefill timed alone, the decode rate as the rest of the time, and the FLOP bound
   (the peak / FLOPs per generated token, its prompt's prefill share included).
4. --mode rl_update: one forward + backward of stage 4's update (`04_rl.response_forward`) on --batch
   samples (the held-out math prompts, random response ids of lengths uniform in 10..--new_tokens),
   packed (`pack_rollout`, what the stage runs) and, alternated with it, left/right padded
   (`collate_rollout`, the layout before packing); prints the seconds and real tokens/s of each.

    python bench/throughput.py                                          # embedded model, batch 2, seq 256
    python bench/throughput.py --model tiny --batch 8 --seq 512 --steps 5
    python bench/throughput.py --device cuda --batch 16 --seq 2048      # on a GPU
    python bench/throughput.py --mode generate --batch 64 --new_tokens 96  # the sampler (speed issue's goal)
    python bench/throughput.py --mode rl_update --batch 32 --new_tokens 96 # stage 4's update, packed vs padded

The first step (first generate call) is a warm-up and is not timed. It asserts nothing: it is a benchmark.
"""
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common as C  # noqa: E402
import models as M  # noqa: E402
import sampler as S  # noqa: E402


@dataclass
class Config:
    mode: str = C.arg("train", "train (optimizer steps: tokens/s, MFU) | generate (the sampler: tokens/s) | "
                               "rl_update (stage 4's forward + backward, packed vs padded)")
    model: str = C.arg(M.EMBEDDED, "tiny | smollm2-135m-instruct | a local HF dir")
    batch: int = C.arg(2, "sequences per step")
    seq: int = C.arg(256, "tokens per sequence")
    steps: int = C.arg(3, "timed optimizer steps (after one warm-up step)")
    device: str = C.arg("auto", "auto | cpu | cuda")
    precision: str = C.arg("auto", "auto | bf16 | fp32 (auto: bf16 where native, else fp32)")
    activation_checkpointing: bool = C.arg(False, "recompute decoder layers in the backward")
    matmul_budget_s: float = C.arg(2.0, "seconds spent measuring the matmul peak, per dtype")
    seed: int = C.arg(0, "seed")
    # generate
    new_tokens: int = C.arg(96, "generate: new tokens per prompt")
    temperature: float = C.arg(0.7, "generate: sampling temperature (0 = greedy)")
    prompts: str = C.arg("data/math_test.jsonl", "generate: questions {question} used as the prompts")
    repeats: int = C.arg(3, "generate: timed generate calls (median reported)")
    pack_weights: bool = C.arg(True, "generate: the decode step's oneDNN-packed bf16 weights on CPU "
                                     "(sampler.PACK_WEIGHTS; false: the plain products, for A/B timing)")


# ----------------------------------------------------------------------------------------------
# Matmul peak


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_peak(device: torch.device, dtype: torch.dtype, budget_s: float) -> tuple[float, int]:
    """Best FLOP/s of an n x n x n matmul (2 n^3 FLOPs); n doubles until one matmul takes
    budget/8 (so emulated bf16 on a CPU without it stays small), then repeats for ~budget/2."""
    max_n = 16384 if device.type == "cuda" else 4096
    n, best, dt = 128, 0.0, 0.0
    while True:
        a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
        a @ b  # warm-up
        sync(device)
        t0 = time.perf_counter()
        a @ b
        sync(device)
        dt = time.perf_counter() - t0
        best = max(best, 2 * n ** 3 / dt)
        if dt > budget_s / 8 or n >= max_n:
            break
        n *= 2
    reps = max(1, int(budget_s / 2 / max(dt, 1e-9)))
    sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    best = max(best, 2 * n ** 3 * reps / (time.perf_counter() - t0))
    return best, n


# ----------------------------------------------------------------------------------------------
# Peak memory


def reset_peak_memory(device: torch.device) -> int:
    """Reset the peak tracker; returns the memory in use now (bytes)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    try:  # peak RSS (VmHWM) := current RSS (Linux >= 4.0)
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    return _status_kb("VmRSS") * 1024


def peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated()
    return _status_kb("VmHWM") * 1024


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


# ----------------------------------------------------------------------------------------------
# Generation


def chat_prompts(cfg: Config, tok) -> list[list[int]]:
    """cfg.batch prompt id lists: the questions of cfg.prompts in the chat template, cycled."""
    rows = C.read_jsonl(C.resolve_path(cfg.prompts), required=("question",))
    return [C.chat_prompt_ids(tok, [{"role": "user", "content": rows[i % len(rows)]["question"]}])
            for i in range(cfg.batch)]


def bench_generate(cfg: Config, d, dtype, model, tok, peak: float) -> None:
    """Median tokens/s of cfg.repeats generate calls (after one warm-up) on cfg.batch chat prompts."""
    prompts = chat_prompts(cfg, tok)
    policy = M.LogProbModel(model).to(d.device)
    n_params = sum(p.numel() for p in policy.parameters())
    print(f"model {cfg.model}: {n_params / 1e6:.2f}M parameters; {cfg.batch} prompts of "
          f"{statistics.mean(map(len, prompts)):.0f} tokens on average, {cfg.new_tokens} new tokens, "
          f"T = {cfg.temperature}", flush=True)

    def run(seed: int, new_tokens: int):
        g = torch.Generator(device=d.device).manual_seed(seed)
        t0 = time.perf_counter()
        with S.sampling_model(policy, d, dtype) as m:
            out = S.generate(m, prompts, new_tokens, tok.eos_token_id, tok.pad_token_id,
                             temperature=cfg.temperature, generator=g)
        sync(d.device)
        return time.perf_counter() - t0, out

    base = reset_peak_memory(d.device)
    run(cfg.seed, 8)  # warm-up: the bf16 copy, the decode step, the allocator
    times, tokens, steps = [], [], []
    for r in range(cfg.repeats):
        dt, out = run(cfg.seed + 1 + r, cfg.new_tokens)
        times.append(dt)
        tokens.append(int(out.lengths.sum()))
        steps.append(out.tokens.shape[1])
        print(f"  run {r}: {dt:.2f} s, {tokens[-1]} tokens in {steps[-1]} decode steps "
              f"({tokens[-1] / dt:.1f} tok/s)", flush=True)
    peak_mem = peak_memory(d.device)
    tok_s = [n / t for n, t in zip(tokens, times)]
    slots_s = [cfg.batch * n / t for n, t in zip(steps, times)]  # batch x steps: an upper bound of what was computed
    gib = 2 ** 30
    print(f"generated tokens/s  {statistics.median(tok_s):10.1f}  (median; min {min(tok_s):.1f}, max {max(tok_s):.1f})")
    print(f"row-steps/s         {statistics.median(slots_s):10.1f}  (batch x decode steps; rows that finished are dropped from the batch, so fewer were computed)")
    print(f"peak memory         {peak_mem / gib:10.2f} GiB (+{(peak_mem - base) / gib:.2f} GiB over the loaded model)")
    print(f"MFU                 {100 * 2 * n_params * statistics.median(tok_s) / peak:10.1f} %  (2 N tokens/s of the "
          f"measured {dtype} matmul peak, {peak / 1e9:.1f} GFLOP/s)")
    # What bounds it: the prefill timed alone, the decode steps as the rest, and the FLOPs of both
    with torch.no_grad(), S.sampling_model(policy, d, dtype) as m:
        pre = []
        for _ in range(max(cfg.repeats, 1)):
            t0 = time.perf_counter()
            S.prefill(M.hf_model(m), prompts, tok.pad_token_id, d.device)
            sync(d.device)
            pre.append(time.perf_counter() - t0)
    t_pre, n_prompt = statistics.median(pre), sum(map(len, prompts))
    layers = sum(p.numel() for p in model.get_decoder().layers.parameters())  # prefill: the layers only
    decode_flops = 2 * (layers + model.get_output_embeddings().weight.numel())  # a decode step: layers + head
    dec_s = [n / (t - t_pre) for n, t in zip(tokens, times)]
    print(f"prefill alone       {t_pre:10.2f} s   ({n_prompt / t_pre:.0f} prompt tok/s, "
          f"{2 * layers * n_prompt / t_pre / 1e9:.0f} GFLOP/s in 2 x layer weights x prompt tokens)")
    print(f"decode (the rest)   {statistics.median(dec_s):10.1f} tok/s ({decode_flops * statistics.median(dec_s) / 1e9:.0f} "
          f"GFLOP/s in 2 x (layer + head) weights per token)")
    per_tok = decode_flops + 2 * layers * n_prompt / max(statistics.median(tokens), 1)
    print(f"FLOP bound          {peak / per_tok:10.1f} tok/s  (the measured peak / {per_tok / 1e6:.0f} MFLOP per generated "
          f"token, its prompt's prefill share included)")


def bench_rl_update(cfg: Config, d, dtype, model, tok, peak: float) -> None:
    """Stage 4's update forward + backward, packed (what it runs) vs padded, alternated, cfg.repeats
    rounds after a warm-up of each; the median seconds and real (prompt + response) tokens/s."""
    import random
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from stage_scripts import load_script
    rl = load_script("04_rl.py", "rl04_throughput")
    prompts = chat_prompts(cfg, tok)
    rng = random.Random(cfg.seed)
    lengths = torch.tensor([rng.randint(min(10, cfg.new_tokens), cfg.new_tokens) for _ in range(cfg.batch)])
    tokens = torch.randint(0, model.get_input_embeddings().weight.shape[0], (cfg.batch, cfg.new_tokens),
                           generator=torch.Generator().manual_seed(cfg.seed))
    policy = M.LogProbModel(model).to(d.device)
    real = sum(map(len, prompts)) + int(lengths.sum())
    padded, _ = rl.collate_rollout(prompts, tokens, lengths, tok.pad_token_id)
    packed, _ = rl.pack_rollout(prompts, tokens, lengths, tok.pad_token_id)
    print(f"model {cfg.model}: {cfg.batch} samples, {real} real tokens; padded {tuple(padded['input_ids'].shape)}, "
          f"packed {tuple(packed['input_ids'].shape)}", flush=True)

    def run_packed():
        with C.fwd_context(policy, d, dtype):
            out = rl.response_forward(policy, prompts, tokens, lengths, tok.pad_token_id, 1.0, d.device)
        out["logp"].float().sum().backward()

    def run_padded():
        b = {k: v.to(d.device) for k, v in padded.items()}
        with C.fwd_context(policy, d, dtype):
            out = policy(b["input_ids"], b["labels"], position_ids=b["position_ids"],
                         attention_mask=b["attention_mask"], temperature=1.0)
        out["logp"].float().sum().backward()
    times = {"packed": [], "padded": []}
    for r in range(cfg.repeats + 1):
        for name, fn in (("packed", run_packed), ("padded", run_padded)):
            t0 = time.perf_counter()
            fn()
            sync(d.device)
            if r:  # round 0 is the warm-up
                times[name].append(time.perf_counter() - t0)
    for name, ts in times.items():
        t = statistics.median(ts)
        print(f"{name:6s} forward + backward {t:8.3f} s  (min {min(ts):.3f}, max {max(ts):.3f})  "
              f"{real / t:10.1f} real tokens/s")
    print(f"speed packed / padded {statistics.median(times['padded']) / statistics.median(times['packed']):.2f}x")


# ----------------------------------------------------------------------------------------------
# Training steps


def main(argv=None):
    cfg = C.parse_config(Config, argv)
    if cfg.mode not in ("train", "generate", "rl_update"):  # before the matmul peak and the model load
        raise SystemExit(f"--mode must be train, generate or rl_update, not {cfg.mode!r}")
    d = C.init_distributed(cfg.device)
    dev = d.device
    dtype = C.resolve_dtype(cfg.precision, dev)
    C.set_seed(cfg.seed)
    S.PACK_WEIGHTS = cfg.pack_weights
    print(f"device {dev}  compute dtype {dtype}  threads {torch.get_num_threads()}  "
          f"native bf16 on this CPU: {C.cpu_has_native_bf16()}", flush=True)

    peaks = {}
    for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        flops, n = matmul_peak(dev, dt, cfg.matmul_budget_s)
        peaks[dt] = flops
        print(f"matmul peak {name}: {flops / 1e9:10.1f} GFLOP/s  (n = {n})", flush=True)

    model, tok = M.load_model_and_tokenizer(cfg.model, cfg.seed)
    if cfg.mode in ("generate", "rl_update"):
        (bench_generate if cfg.mode == "generate" else bench_rl_update)(cfg, d, dtype, model, tok, peaks[dtype])
        C.cleanup_distributed(d)
        return
    policy = C.shard_model(M.LogProbModel(model), d, dtype, cfg.activation_checkpointing)
    opt = C.make_optimizer(policy, 1e-5, 0.0)
    n_params = sum(p.numel() for p in policy.parameters())
    g = torch.Generator().manual_seed(cfg.seed)
    V = model.get_input_embeddings().weight.shape[0]
    print(f"model {cfg.model}: {n_params / 1e6:.2f}M parameters, batch {cfg.batch} x seq {cfg.seq}", flush=True)

    def step():
        ids = torch.randint(0, V, (cfg.batch, cfg.seq), generator=g).to(dev)
        with C.fwd_context(policy, d, dtype):
            out = policy(ids, ids)
        loss = C.masked_ce_loss(out["logp"], ids, C.count_trained(ids))
        loss.backward()
        C.optimizer_step(policy, opt, 1e-5, 1.0)
        return float(loss.detach())

    base = reset_peak_memory(dev)
    step()  # warm-up (allocates the optimizer state)
    sync(dev)
    t0 = time.perf_counter()
    for _ in range(cfg.steps):
        loss = step()
    sync(dev)
    elapsed = time.perf_counter() - t0
    peak = peak_memory(dev)

    tokens_per_s = cfg.batch * cfg.seq * cfg.steps / elapsed
    achieved = 6 * n_params * tokens_per_s
    gib = 2 ** 30
    print(f"loss {loss:.3f}  {elapsed / cfg.steps:.2f} s/step", flush=True)
    print(f"tokens/s        {tokens_per_s:10.1f}")
    print(f"peak memory     {peak / gib:10.2f} GiB ({'allocated by torch' if dev.type == 'cuda' else 'RSS'}; "
          f"+{(peak - base) / gib:.2f} GiB over the loaded model)")
    print(f"achieved        {achieved / 1e9:10.1f} GFLOP/s (6 N tokens/s)")
    print(f"MFU             {100 * achieved / peaks[dtype]:10.1f} %  of the measured {dtype} matmul peak "
          f"({peaks[dtype] / 1e9:.1f} GFLOP/s)")
    C.cleanup_distributed(d)


if __name__ == "__main__":
    main()
