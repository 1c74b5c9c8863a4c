"""
Benchmark: peak memory of per-token log-probs, naive full log-softmax vs common.selective_logprobs.

    naive      logits = hidden @ W^T               [B, T, V] fp32
               logp   = log_softmax(logits).gather(labels)
    selective  M.selective_logprobs(hidden, W, labels): label logit - chunked logsumexp,
               `chunk_size` rows at a time, each with a written-out backward (PITFALLS #11)

Both run forward + backward of loss = -mean(logp) from the same inputs (hidden [B, T, H] and
W [V, H] with requires_grad), every position trained. Peak memory is the increase over the memory
held right before the forward (inputs, weights), measured
  - CUDA: torch.cuda.max_memory_allocated (after reset_peak_memory_stats);
  - CPU:  peak resident set size of a fresh subprocess per method (VmHWM after resetting it through
          /proc/self/clear_refs; getrusage ru_maxrss is printed beside it). tracemalloc does not see
          torch's allocations, so it cannot be used.
Also prints the largest differences between the two methods (log-probs and both gradients).
It asserts nothing: it is a benchmark.

    python bench/logprobs_memory.py                                   # B=8, T=1024, V=49152, H=576, CPU
    python bench/logprobs_memory.py --batch 8 --seq 1024 --vocab 49152 --device cuda

On a 2-core CPU one run takes a few minutes (about 1.5 TFLOP of matmuls in all).
"""
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common as C  # noqa: E402
import models as M  # noqa: E402


@dataclass
class Config:
    batch: int = C.arg(8, "B: sequences")
    seq: int = C.arg(1024, "T: tokens per sequence (all of them get a label)")
    vocab: int = C.arg(49152, "V: vocabulary size (SmolLM2: 49152)")
    hidden: int = C.arg(576, "H: hidden size (SmolLM2-135M: 576)")
    chunk_size: int = C.arg(512, "rows per chunk of the selective path (M.selective_logprobs' default)")
    device: str = C.arg("cpu", "cpu or cuda")
    seed: int = C.arg(0, "seed of the random inputs")
    method: str = C.arg("both", "both (the parent: one fresh subprocess per method) | naive | selective (a child)")
    save: str = C.arg("", "child only: file to save logp and gradients to, for the exactness check")


# ----------------------------------------------------------------------------------------------
# The two methods


def naive_logprobs(hidden, weight, labels):
    """The full [B, T, V] fp32 log-softmax, then gather (what PITFALLS #11 warns against)."""
    return torch.log_softmax((hidden @ weight.t()).float(), dim=-1).gather(-1, labels[..., None]).squeeze(-1)


def selective_logprobs(hidden, weight, labels, chunk_size):
    return M.selective_logprobs(hidden, weight, labels, chunk_size=chunk_size)[0]


# ----------------------------------------------------------------------------------------------
# Memory measurement (CPU: resident set size of this process)


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return -1


def reset_cpu_peak() -> bool:
    """Reset this process's peak RSS (VmHWM) to the current RSS (Linux >= 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def run_child(cfg: Config) -> dict:
    torch.manual_seed(cfg.seed)
    dev = torch.device(cfg.device)
    B, T, V, H = cfg.batch, cfg.seq, cfg.vocab, cfg.hidden
    hidden = torch.randn(B, T, H, device=dev).requires_grad_()
    weight = (torch.randn(V, H, device=dev) * H ** -0.5).requires_grad_()
    labels = torch.randint(0, V, (B, T), device=dev)
    logp_fn = naive_logprobs if cfg.method == "naive" else (
        lambda h, w, y: selective_logprobs(h, w, y, cfg.chunk_size))

    # warm-up on tiny inputs: lazy imports and first-call set-up (e.g. torch.utils.checkpoint) are
    # not part of the method's memory
    h, w = torch.randn(1, 4, H, device=dev, requires_grad=True), torch.randn(16, H, device=dev, requires_grad=True)
    (-logp_fn(h, w, torch.zeros(1, 4, dtype=torch.long, device=dev)).mean()).backward()
    del h, w

    res = {"method": cfg.method}
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        res["hwm_reset"] = reset_cpu_peak()
        base = _status_kb("VmRSS") * 1024
        res["ru_maxrss_before"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    logp = logp_fn(hidden, weight, labels)
    loss = -logp.mean()
    loss.backward()
    if dev.type == "cuda":
        torch.cuda.synchronize()
        res["peak_bytes"] = torch.cuda.max_memory_allocated() - base
    else:
        res["peak_bytes"] = _status_kb("VmHWM") * 1024 - base
        res["ru_maxrss_delta_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    res["seconds"] = time.perf_counter() - t0
    if cfg.save:
        torch.save({"logp": logp.detach().cpu(), "grad_hidden": hidden.grad.cpu(), "grad_weight": weight.grad.cpu()},
                   cfg.save)
    return res


# ----------------------------------------------------------------------------------------------
# Parent: one fresh process per method, then compare


def run_method(script: str, cfg, method: str, save: str) -> dict | None:
    """Run `script --method=method` with cfg's other fields as flags in a fresh process (its peak
    RSS is its own); its last stdout line is a JSON dict. None (the failure printed) if it failed."""
    args = [f"--{k}={v}" for k, v in vars(cfg).items() if k not in ("method", "save")]
    proc = subprocess.run([sys.executable, script, *args, f"--method={method}", f"--save={save}"],
                          capture_output=True, text=True, env={**os.environ})
    if proc.returncode != 0:
        print(f"{method}: failed (exit {proc.returncode}; out of memory?)\n{proc.stderr[-2000:]}")
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def print_max_diffs(a: dict, b: dict, keys: tuple, label: str) -> None:
    for k in keys:
        diff = (a[k].double() - b[k].double()).abs().max().item()
        print(f"  max |{label}| {k:<12} {diff:.2e}  (max |value| {a[k].abs().max().item():.2e})")


def main(argv=None):
    cfg = C.parse_config(Config, argv)
    if cfg.method != "both":
        print(json.dumps(run_child(cfg)), flush=True)
        return
    B, T, V, H = cfg.batch, cfg.seq, cfg.vocab, cfg.hidden
    gib = 2 ** 30
    print(f"B={B} T={T} V={V} H={H} chunk_size={cfg.chunk_size} device={cfg.device} "
          f"(one [B, T, V] fp32 tensor = {B * T * V * 4 / gib:.2f} GiB)", flush=True)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for method in ("naive", "selective"):
            r = run_method(__file__, cfg, method, f"{tmp}/{method}.pt")
            if r is None:
                return
            results[method] = r
            extra = ""
            if "ru_maxrss_delta_bytes" in r:
                extra = f"  (ru_maxrss delta {r['ru_maxrss_delta_bytes'] / gib:.3f} GiB" + \
                        ("" if r["hwm_reset"] else "; peak reset unavailable: includes start-up") + ")"
            print(f"{method:>9}: peak {r['peak_bytes'] / gib:.3f} GiB over the inputs, "
                  f"forward+backward {r['seconds']:.1f} s{extra}", flush=True)
        a, b = torch.load(f"{tmp}/naive.pt"), torch.load(f"{tmp}/selective.pt")
    ratio = results["naive"]["peak_bytes"] / max(results["selective"]["peak_bytes"], 1)
    print(f"    ratio: naive / selective peak = {ratio:.1f}x")
    print_max_diffs(a, b, ("logp", "grad_hidden", "grad_weight"), "naive - selective")


if __name__ == "__main__":
    main()
