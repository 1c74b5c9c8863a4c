"""
Benchmark: peak memory of the token-level distillation loss, naive vs 03_distill's chunked path.

    naive     student logits hidden_S @ W_S^T and teacher logits hidden_T @ W_T^T, both [B, T, V]
              fp32, two log_softmaxes, KL(p_T || p_S) over the whole vocabulary (what most
              distillation code does, TRL's GKDTrainer included)
    chunked   03_distill.teacher_chunks (the teacher's targets: one [N, V] fp32 tensor, N = B x T)
              + 03_distill.student_chunks (the student's logits `chunk_size` positions at a time,
              recomputed in backward): the real functions the stage trains with
    topk      the same with --top_k 64 + tail: the teacher's targets are [N, 65]

Each method runs forward + backward of the mean forward KL from the same inputs (hidden states
[B, T, H] of student and teacher, the two heads [V, H]; the student's with requires_grad) in a
fresh subprocess; peak = peak RSS over the memory held before the forward (CPU; VmHWM reset via
/proc/self/clear_refs) or torch.cuda.max_memory_allocated (CUDA). Prints the largest difference
between naive and chunked (loss and gradients). It asserts nothing: it is a benchmark.

    python bench/distill_memory.py                      # B=8, T=1024, V=49152, H=576 (SmolLM2), CPU
    python bench/distill_memory.py --device cuda
"""
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
import common as C  # noqa: E402
import logprobs_memory as LM  # noqa: E402  (the RSS measurement helpers)


def load_stage3():
    import importlib.util
    spec = importlib.util.spec_from_file_location("distill", ROOT / "03_distill.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["distill"] = mod
    spec.loader.exec_module(mod)
    return mod


@dataclass
class Config:
    batch: int = C.arg(8, "B: sequences")
    seq: int = C.arg(1024, "T: tokens per sequence (all of them trained)")
    vocab: int = C.arg(49152, "V: vocabulary size (SmolLM2: 49152)")
    hidden: int = C.arg(576, "H: hidden size of student and teacher (SmolLM2-135M: 576)")
    chunk_size: int = C.arg(512, "positions per chunk (03_distill's default)")
    top_k: int = C.arg(64, "k of the top-k method")
    device: str = C.arg("cpu", "cpu or cuda")
    seed: int = C.arg(0, "seed of the random inputs")
    method: str = C.arg("all", "all (the parent) | naive | chunked | topk (a child)")
    save: str = C.arg("", "child only: file to save the loss and gradients to")


def naive_fkl(h_s, w_s, h_t, w_t):
    s = torch.log_softmax((h_s @ w_s.t()).float(), -1)
    with torch.no_grad():
        t = torch.log_softmax((h_t @ w_t.t()).float(), -1)
    return (t.exp() * (t - s)).sum(-1).mean()


def run_child(cfg: Config) -> dict:
    D3 = load_stage3()
    torch.manual_seed(cfg.seed)
    dev = torch.device(cfg.device)
    B, T, V, H = cfg.batch, cfg.seq, cfg.vocab, cfg.hidden
    h_s = torch.randn(B, T, H, device=dev).requires_grad_()
    w_s = (torch.randn(V, H, device=dev) * H ** -0.5).requires_grad_()
    h_t, w_t = torch.randn(B, T, H, device=dev), torch.randn(V, H, device=dev) * H ** -0.5
    y = torch.randint(0, V, (B * T,), device=dev)

    def chunked(hs, ws, ht, wt, k):
        kd = D3.KD(divergence="fkl", top_k=k)
        yy = y[:hs.shape[0] * hs.shape[1]] % ws.shape[0]  # (labels only feed log p(y), not the KL)
        t = D3.teacher_chunks(ht.reshape(-1, ht.shape[-1]), wt, yy, kd, cfg.chunk_size)
        _, div = D3.student_chunks(hs.reshape(-1, hs.shape[-1]), ws, yy, t["vals"], t["idx"], kd, cfg.chunk_size)
        return div.mean()
    fn = {"naive": naive_fkl, "chunked": lambda *a: chunked(*a, 0), "topk": lambda *a: chunked(*a, cfg.top_k)}[cfg.method]
    small = [torch.randn(1, 4, H, device=dev, requires_grad=True), torch.randn(16, H, device=dev, requires_grad=True),
             torch.randn(1, 4, H, device=dev), torch.randn(16, H, device=dev)]
    fn(*small).backward()  # warm-up: lazy imports / first-call set-up are not the method's memory
    del small
    res = {"method": cfg.method}
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        res["hwm_reset"] = LM.reset_cpu_peak()
        base = LM._status_kb("VmRSS") * 1024
    t0 = time.perf_counter()
    loss = fn(h_s, w_s, h_t, w_t)
    loss.backward()
    if dev.type == "cuda":
        torch.cuda.synchronize()
        res["peak_bytes"] = torch.cuda.max_memory_allocated() - base
    else:
        res["peak_bytes"] = LM._status_kb("VmHWM") * 1024 - base
    res["seconds"] = time.perf_counter() - t0
    if cfg.save:
        torch.save({"loss": loss.detach().cpu(), "grad_hidden": h_s.grad.cpu(), "grad_weight": w_s.grad.cpu()}, cfg.save)
    return res


def main(argv=None):
    cfg = C.parse_config(Config, argv)
    if cfg.method != "all":
        print(json.dumps(run_child(cfg)), flush=True)
        return
    B, T, V, H = cfg.batch, cfg.seq, cfg.vocab, cfg.hidden
    gib = 2 ** 30
    print(f"B={B} T={T} V={V} H={H} chunk_size={cfg.chunk_size} top_k={cfg.top_k} device={cfg.device} "
          f"(one [B, T, V] fp32 tensor = {B * T * V * 4 / gib:.2f} GiB)", flush=True)
    res = {}
    with tempfile.TemporaryDirectory() as tmp:
        for method in ("naive", "chunked", "topk"):
            r = LM.run_method(__file__, cfg, method, f"{tmp}/{method}.pt")
            if r is None:
                continue
            res[method] = r
            print(f"{method:>8}: peak {r['peak_bytes'] / gib:6.3f} GiB over the inputs, forward+backward "
                  f"{r['seconds']:.1f} s" + ("" if r.get("hwm_reset", True) else " (peak reset unavailable)"), flush=True)
        if "naive" in res and "chunked" in res:
            a, b = torch.load(f"{tmp}/naive.pt"), torch.load(f"{tmp}/chunked.pt")
            LM.print_max_diffs(a, b, ("loss", "grad_hidden", "grad_weight"), "naive - chunked")
            for m in ("chunked", "topk"):
                if m in res:
                    print(f"  naive / {m} peak: {res['naive']['peak_bytes'] / max(res[m]['peak_bytes'], 1):.1f}x")


if __name__ == "__main__":
    main()
