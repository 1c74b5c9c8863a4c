"""Foundation checks: device-safe collectives (PITFALLS #20), the KL / importance-ratio guards of
stage 4, the one verifier time limit, default data paths from any directory, and the bf16 path
(PITFALLS #21: compared numbers pin fp32 elsewhere; bf16 is tested here where the CPU has it)."""
import json
import math
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import common as C  # noqa: E402
import models as M  # noqa: E402
import verify as V  # noqa: E402
from stage_scripts import load_script  # noqa: E402

rl = load_script("04_rl.py", "rl04_foundation")
SCRIPTS = ("01_cold_start_sft.py", "02_overall_sft.py", "03_distill.py", "04_rl.py")
NATIVE_BF16 = C.resolve_dtype("auto", torch.device("cpu")) == torch.bfloat16
needs_bf16 = pytest.mark.skipif(not NATIVE_BF16, reason="this CPU has no native bf16 (no AVX512-BF16 / AMX): "
                                                        "bf16 would be emulated, ~300x slower; auto picks fp32")


# ----------------------------------------------------------------------------------------------
# Collectives: every tensor reaches the backend on d.device (nccl rejects CPU tensors)


class _Stop(Exception):
    pass


def test_collectives_hand_the_backend_tensors_on_the_process_device(monkeypatch):
    seen = []

    def fake_all_reduce(t, op=None):
        seen.append(t.device)
        raise _Stop  # a meta tensor cannot come back: stop once the device was seen

    monkeypatch.setattr(C.dist, "all_reduce", fake_all_reduce)
    d = C.Dist(enabled=True, device=torch.device("meta"))  # stands in for cuda:N on a CPU machine
    for call in (lambda: C.all_reduce_sum(torch.ones(3), d), lambda: C.all_reduce_dict({"a": 1.0, "b": 2}, d)):
        with pytest.raises(_Stop):
            call()
    assert seen == [torch.device("meta")] * 2


def test_collectives_round_trip_values_names_and_device(monkeypatch):
    monkeypatch.setattr(C.dist, "all_reduce", lambda t, op=None: t.mul_(2))  # "two ranks" with equal values
    monkeypatch.setattr(C.dist, "all_gather_object", lambda out, obj: out.__setitem__(slice(None), [obj, obj]))
    d = C.Dist(enabled=True, world_size=2, device=torch.device("cpu"))
    x = torch.tensor([1.0, 2.5])
    y = C.all_reduce_sum(x, d)
    assert torch.equal(y, torch.tensor([2.0, 5.0])) and torch.equal(x, torch.tensor([1.0, 2.5]))  # a copy
    assert C.all_reduce_dict({"b": torch.tensor(1.5), "a": 2}, d) == {"a": 4.0, "b": 3.0}
    assert C.gather_objects([1, 2], d) == [1, 2, 1, 2]
    single = C.Dist()
    assert C.all_reduce_dict({"a": 3}, single) == {"a": 3.0} and C.gather_objects([1], single) == [1]


def test_scripts_call_no_collective_directly():
    for name in SCRIPTS:
        src = (ROOT / name).read_text()
        assert not re.search(r"\bdist\.\w+\(", src), f"{name} calls torch.distributed directly"
        assert "import torch.distributed" not in src, name


def test_module_layout_common_is_small_and_readme_counts_are_true():
    """common.py stays small (<= 700 lines) and free of stage / grading logic: it imports none of
    the modules beside it; models.py and sampler.py import no grader. The README's file table
    quotes the real line counts (a stale table is a documentation bug)."""
    imports = {f: set(re.findall(r"^\s*import (\w+)", (ROOT / f).read_text(), re.M))
               for f in ("common.py", "models.py", "sampler.py")}
    assert len((ROOT / "common.py").read_text().splitlines()) <= 700
    assert not imports["common.py"] & {"models", "sampler", "verify", "sandbox"}
    assert not (imports["models.py"] | imports["sampler.py"]) & {"verify", "sandbox"}
    readme = (ROOT / "README.md").read_text()
    for f in ("common.py", "models.py", "sampler.py", "verify.py", "pipeline.py"):
        quoted = re.search(r"\| `" + re.escape(f) + r"` \| (\d+) ", readme)
        assert quoted and int(quoted.group(1)) == len((ROOT / f).read_text().splitlines()), f
    stages = ("01_cold_start_sft.py", "02_overall_sft.py", "03_distill.py", "04_rl.py")
    quoted = re.search(r"\| " + ", ".join(f"`{f}`" for f in stages) + r" \| ([\d, ]+) \|", readme)
    assert quoted and [int(n) for n in quoted.group(1).split(",")] == [
        len((ROOT / f).read_text().splitlines()) for f in stages]


def test_readme_names_an_existing_test_for_every_pitfall():
    """The README's pitfall table has the 21 rows of ../shared/PITFALLS.md, and every test it names
    is a test function of the file it names (a renamed or deleted test makes the table lie)."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Known pitfalls and the tests that pin them", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| (\d+) \| [^|]+ \| (.+) \|$", section, re.M)
    assert [int(n) for n, _ in rows] == list(range(1, 22))
    for n, cited in rows:
        names = re.findall(r"`(test_\w+\.py)::(test_\w+)`", cited)
        assert names, n
        for f, name in names:
            assert re.search(rf"^def {name}\(", (ROOT / "tests" / f).read_text(), re.M), (n, f, name)


def test_seed_for_is_a_pure_function_of_its_parts():
    assert C.seed_for(0, 1, 2) == C.seed_for(0, 1, 2)
    assert len({C.seed_for(0, 1, 2), C.seed_for(0, 2, 1), C.seed_for(1, 1, 2), C.seed_for(0, 1, 3)}) == 4
    assert 0 <= C.seed_for(2 ** 40, 7) < 2 ** 62


# ----------------------------------------------------------------------------------------------
# Stage 4 guards: k3 beyond the clamp, dual-clip, log-ratio clamp


def test_k3_gradient_is_zero_beyond_the_clamp_not_plus_one():
    """Bug pinned: exp(clamp(r)) - 1 - r had d/dlogp = +1 for r = ref - logp > 20 (exact: 1 - e^r)."""
    logp = torch.tensor([0.0, -1.0], requires_grad=True)
    ref = torch.tensor([25.0, -0.5])  # r = 25 (beyond the clamp) and r = 0.5 (inside)
    k3 = rl.kl_estimators(logp, ref)["k3"]
    k3.sum().backward()
    assert logp.grad[0].item() == 0.0
    assert logp.grad[1].item() == pytest.approx(1 - math.exp(0.5), rel=1e-6)
    assert k3[0].item() == pytest.approx(math.exp(20) - 21, rel=1e-6) and math.isfinite(k3[0].item())


def _naive_policy_loss(logp, old, adv, mask, lo, hi, c, max_lr):
    """float64 loops: token-mean clipped surrogate with dual-clip."""
    tot, n = 0.0, 0.0
    for i in range(logp.shape[0]):
        for t in range(logp.shape[1]):
            if mask[i, t] == 0:
                continue
            r = math.exp(max(-max_lr, min(max_lr, float(logp[i, t]) - float(old[i, t]))))
            a = float(adv[i, t])
            loss = max(-a * r, -a * min(max(r, 1 - lo), 1 + hi))
            if a < 0 and c > 1:
                loss = min(loss, -a * c)
            tot, n = tot + loss, n + 1
    return tot / n


def test_dual_clip_and_log_ratio_clamp_match_a_float64_loop():
    g = torch.Generator().manual_seed(0)
    logp = torch.randn(4, 7, generator=g, dtype=torch.float64) * 2
    old = torch.randn(4, 7, generator=g, dtype=torch.float64) * 2
    adv = torch.randn(4, 7, generator=g, dtype=torch.float64)
    mask = (torch.rand(4, 7, generator=g) > 0.2).double()
    n = float(mask.sum())
    loss, st = rl.policy_loss(logp, old, adv, mask, 0.2, 0.28, "token_mean", n, 1.0, 3.0, 20.0)
    assert loss.item() == pytest.approx(_naive_policy_loss(logp, old, adv, mask, 0.2, 0.28, 3.0, 20.0), rel=1e-12)
    assert st["dual_clipped"] > 0  # the random ratios reach the cap: the case is exercised
    off, _ = rl.policy_loss(logp, old, adv, mask, 0.2, 0.28, "token_mean", n, 1.0, 0.0, 20.0)
    assert off.item() == pytest.approx(_naive_policy_loss(logp, old, adv, mask, 0.2, 0.28, 0.0, 20.0), rel=1e-12)
    assert off.item() > loss.item()


def test_one_stale_token_cannot_blow_up_the_loss():
    """Bug pinned: with A < 0 one token with logp - old = 30 gave a loss of ~1e13, and a difference
    above ~88 gave inf / NaN in fp32."""
    mask = torch.ones(1, 2)
    adv = torch.tensor([[-1.0, -1.0]])
    for diff in (30.0, 100.0):
        logp = torch.tensor([[diff, 0.0]], requires_grad=True)
        loss, _ = rl.policy_loss(logp, torch.zeros(1, 2), adv, mask, 0.2, 0.2, "token_mean", 2.0)
        loss.backward()
        assert loss.item() == pytest.approx((3.0 + 1.0) / 2)  # capped at c |A| = 3; the other token: 1
        assert torch.isfinite(logp.grad).all() and logp.grad[0, 0] == 0
    unguarded, _ = rl.policy_loss(torch.tensor([[30.0, 0.0]]), torch.zeros(1, 2), adv, mask, 0.2, 0.2,
                                  "token_mean", 2.0, clip_ratio_c=0.0, max_log_ratio=1e9)
    assert unguarded.item() > 1e12  # what the guards prevent


# ----------------------------------------------------------------------------------------------
# The one verifier time limit: works from any thread


def test_symbolic_grader_hang_is_bounded_from_a_worker_thread():
    """Bug pinned: math-verify's own timeout is signal-based (main thread only), so score_math on
    a power tower from a worker thread held the GIL for > 25 s; now a forked child is killed."""
    out = {}
    th = threading.Thread(target=lambda: out.update(r=V.score_math("The answer is \\boxed{9^{9^{9^9}}}.", "5")))
    th.start()
    th.join(120)  # generous: the child is killed after V.SYMBOLIC_TIMEOUT_S
    assert not th.is_alive() and out["r"][0] == 0.0


def test_call_with_timeout_kills_a_gil_holding_hang_and_reports_errors():
    value, status, err = V.call_with_timeout(pow, 9, 9 ** 9 ** 3, timeout_s=1.0)  # C code holding the GIL
    assert (value, status, err) == (None, "timeout", None)
    assert V.call_with_timeout(lambda a: a + 1, 1, timeout_s=30.0) == (2, "ok", None)
    value, status, err = V.call_with_timeout(lambda: 1 / 0, timeout_s=30.0)
    assert status == "error" and "ZeroDivisionError" in err
    value, status, err = V.call_with_timeout(os._exit, 3, timeout_s=30.0)  # the child dies silently
    assert status == "error" and "died" in err


def test_map_with_timeout_equals_call_with_timeout_item_by_item():
    """One guarded child per batch: a hang, an error and a dying item each cost only themselves;
    every other item is answered, in order, as call_with_timeout would."""
    def f(x):
        if x == "hang":
            return pow(9, 9 ** 9 ** 3)  # C code holding the GIL
        if x == "die":
            os._exit(3)
        return 1 / x
    args = [(1,), ("hang",), (2,), (0,), ("die",), (4,)]
    got = V.map_with_timeout(f, args, timeout_s=1.0)
    assert [g[1] for g in got] == ["ok", "timeout", "ok", "error", "error", "ok"]
    assert [g[0] for g in got] == [1.0, None, 0.5, None, None, 0.25]
    assert "ZeroDivisionError" in got[3][2] and "died" in got[4][2]
    assert V.map_with_timeout(f, [], timeout_s=1.0) == []
    pids = V.map_with_timeout(lambda _: os.getpid(), [(i,) for i in range(5)], timeout_s=30.0)
    assert len({p for p, _, _ in pids}) == 1 and pids[0][0] != os.getpid()  # one child for the batch


def test_every_grading_path_uses_the_one_time_limit():
    for name in ("01_cold_start_sft.py", "04_rl.py", "common.py", "verify.py"):
        src = (ROOT / name).read_text()
        assert "signal.alarm" not in src and "setitimer" not in src, name
        assert "threading.Thread(" not in src, name


# ----------------------------------------------------------------------------------------------
# Default data paths work from any working directory


@pytest.mark.slow
def test_scripts_run_from_another_directory(tmp_path):
    """Bug pinned: 04_rl.py read --math_test with read_jsonl(path), so a run started outside the
    repository failed with 'data/math_test.jsonl: file not found' even with --eval_limit 0."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for name in SCRIPTS:
        res = subprocess.run([sys.executable, str(ROOT / name), "--help"], cwd=tmp_path, env=env,
                             capture_output=True, text=True)
        assert res.returncode == 0 and ("--teacher" if name == "03_distill.py" else "--model") in res.stdout, \
            res.stderr[-2000:]
    tiny = ["--model", "tiny", "--precision", "fp32", "--device", "cpu"]
    runs = {
        "01_cold_start_sft.py": ["--objective", "plain", "--max_steps", "1", "--eval_limit", "1", "--eval_code_limit", "0",
                                 "--eval_transfer_limit", "1", "--eval_loss_limit", "1", "--eval_max_new_tokens", "2", "--max_len", "256"],
        "02_overall_sft.py": ["--max_steps", "1", "--batch_size", "2", "--eval_limit", "1", "--eval_loss_limit", "1",
                              "--agent_max_new_tokens", "2", "--math_max_new_tokens", "2", "--max_len", "2048"],
        "04_rl.py": ["--stages", "stem:data/math_train.jsonl:1", "--eval_limit", "1", "--eval_max_new_tokens", "2",
                     "--max_new_tokens", "2", "--eval_kinds", "stem", "--resume", "false"],
        "03_distill.py": ["--student_layers", "1", "--max_steps", "1", "--prompt_limit", "4", "--eval_limit", "1",
                          "--code_eval_limit", "1", "--kl_limit", "1", "--max_new_tokens", "4", "--pref_prompts", "2",
                          "--speed_batch", "2", "--speed_tokens", "2", "--max_prompt_len", "300", "--max_len", "400"],
    }
    for name, args in runs.items():
        model = ["--teacher", "tiny"] if name == "03_distill.py" else ["--model", "tiny"]
        res = subprocess.run([sys.executable, str(ROOT / name), *model, *tiny[2:], "--out_dir", str(tmp_path / name), *args],
                             cwd=tmp_path, env=env, capture_output=True, text=True)
        assert res.returncode == 0, f"{name}:\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}"
        assert (tmp_path / name / "final" / "config.json").exists(), name


# ----------------------------------------------------------------------------------------------
# bf16: the compute really runs in bf16, training learns, 1 vs 2 processes agree within tolerance


def _tiny_rows(tok, n=4):
    msgs = [[{"role": "user", "content": f"Count to {i}."}, {"role": "assistant", "content": " ".join(map(str, range(i)))}]
            for i in range(3, 3 + n)]
    return C.pack_rows([C.tokenize_chat(tok, m) for m in msgs], 512, packing=False)


@needs_bf16
def test_bf16_compute_really_runs_in_bf16_and_learns():
    """TRL's distillation trainer ran fp32 under a bf16 flag; here a forward hook sees the dtype
    inside the model during C.sft_step (the path stages 1-3 train through)."""
    torch.manual_seed(0)
    lm, tok = M.load_model_and_tokenizer("tiny")
    policy = M.LogProbModel(lm)
    seen = {}
    layer = lm.model.layers[0]
    layer.self_attn.q_proj.register_forward_hook(lambda m, i, o: seen.setdefault("q_out", o.dtype) and None)
    layer.mlp.down_proj.register_forward_pre_hook(lambda m, i: seen.setdefault("down_in", i[0].dtype) and None)
    opt = C.make_optimizer(policy, 3e-3, 0.0)
    rows, d = _tiny_rows(tok), C.Dist()
    losses = [C.sft_step(policy, opt, rows, d, torch.bfloat16, 2, tok.pad_token_id, 3e-3, 1.0, s)["loss"]
              for s in range(8)]
    assert seen == {"q_out": torch.bfloat16, "down_in": torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in policy.parameters())  # master weights stay fp32
    assert losses[-1] < 0.8 * losses[0], losses


# bf16 tolerance, derived: bf16 keeps 8 significant bits, so each rounding has relative error
# <= u = 2^-8 ~ 3.9e-3. One process rounds under autocast (fp32 master weights cast per op), two
# processes under FSDP2's MixedPrecisionPolicy (parameters gathered as bf16, norms included), so the
# roundings fall in different places; on the tiny model's path (embedding, 2 x (attention, MLP),
# norms, head: about 8 rounded stages) the losses may differ by up to ~8u relative, 3.1e-2.
BF16_REL_TOL = 8 * 2.0 ** -8


@needs_bf16
@pytest.mark.slow
def test_bf16_one_vs_two_processes_within_the_derived_tolerance(tmp_path):
    data = ROOT / "data"
    args = ["--model", "tiny", "--precision", "bf16", "--device", "cpu", "--max_steps", "2", "--batch_size", "4",
            "--max_len", "2048", "--lr", "3e-3", "--warmup_steps", "1", "--data", f"chat={data / 'chat_train.jsonl'}:1",
            "--eval_data", f"chat={data / 'chat_test.jsonl'}", "--eval_loss_limit", "4", "--eval_limit", "0"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    script = str(ROOT / "02_overall_sft.py")
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          script, *args, "--out_dir", str(tmp_path / "two")], env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    res = subprocess.run([sys.executable, script, *args, "--out_dir", str(tmp_path / "one")], env=env,
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    one, two = (json.loads((tmp_path / k / "eval_summary.json").read_text()) for k in ("one", "two"))
    for when in ("start", "end"):
        a, b = one[when]["loss_chat"], two[when]["loss_chat"]
        assert abs(a - b) <= BF16_REL_TOL * abs(a), (when, a, b)
    assert one["end"]["loss_chat"] < one["start"]["loss_chat"]


# ----------------------------------------------------------------------------------------------
# The benchmarks still run on the shared code paths (a smoke run, no timing is checked)


@pytest.mark.slow
def test_benchmarks_run_on_the_tiny_shapes(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for cmd in (["bench/throughput.py", "--model", "tiny", "--batch", "1", "--seq", "16", "--steps", "1",
                 "--matmul_budget_s", "0.05", "--device", "cpu"],
                ["bench/throughput.py", "--mode", "generate", "--model", "tiny", "--batch", "2", "--new_tokens", "4",
                 "--repeats", "1", "--matmul_budget_s", "0.05", "--device", "cpu"],
                ["bench/throughput.py", "--mode", "rl_update", "--model", "tiny", "--batch", "3", "--new_tokens", "12",
                 "--repeats", "1", "--matmul_budget_s", "0.05", "--device", "cpu"],
                ["bench/logprobs_memory.py", "--batch", "1", "--seq", "8", "--vocab", "64", "--hidden", "16",
                 "--chunk_size", "4"],
                ["bench/rl_score.py", "--model", "tiny", "--rollouts", "1", "--rounds", "1", "--max_new_tokens", "6",
                 "--prompts_per_step", "2", "--group_size", "2", "--device", "cpu"]):
        res = subprocess.run([sys.executable, str(ROOT / cmd[0]), *cmd[1:]], cwd=tmp_path, env=env,
                             capture_output=True, text=True)
        assert res.returncode == 0, f"{cmd[0]}:\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}"
        assert "tokens/s" in res.stdout or "logprobs" in cmd[0] or "truncated" in res.stdout, res.stdout[-2000:]
        assert "generate" not in cmd or ("prefill alone" in res.stdout and "FLOP bound" in res.stdout), res.stdout


def test_compare_bench_builds_the_same_work_and_runs_our_side(tmp_path):
    """bench/compare.py: the fixed work is deterministic (same digest twice) and our SFT, GRPO,
    distillation and DPO runs go through the real code paths and report their figures (TRL's side
    needs the bench venv)."""
    sys.path.insert(0, str(ROOT / "bench"))
    import compare
    assert compare.build_work(tmp_path / "a") == compare.build_work(tmp_path / "b")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for run in (["--run", "ours_sft"], ["--run", "ours_grpo", "--grpo_steps", "2"],
                ["--run", "ours_grpo_every_row", "--grpo_steps", "2"], ["--run", "ours_gkd"], ["--run", "ours_dpo"]):
        res = subprocess.run([sys.executable, str(ROOT / "bench" / "compare.py"), *run, "--work", str(tmp_path / "a")],
                             cwd=tmp_path, env=env, capture_output=True, text=True)
        assert res.returncode == 0, res.stderr[-3000:]
        out = json.loads(res.stdout.strip().splitlines()[-1])
        assert out["step_s"] > 0 and out["rss_mib"] > 0, out


# ----------------------------------------------------------------------------------------------
# Stage 4's reward shaping and loss assembly against loops written out by hand


def test_shape_rewards_matches_a_loop():
    task = torch.tensor([1.0, 0.0, 0.5], dtype=torch.float64)
    fmt = torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64)
    lengths = torch.tensor([3, 5, 1])
    kl = torch.rand(3, 5, generator=torch.Generator().manual_seed(0)) * (torch.arange(5)[None] < lengths[:, None])
    out = rl.shape_rewards(task, fmt, lengths, kl, format_weight=0.1, overlong="penalty", overlong_weight=2.0,
                           overlong_max_len=5, overlong_cache=2, kl_coef=0.3, kl_in="reward")
    for i in range(3):
        L = int(lengths[i])
        pen = 0.0 if L <= 3 else (3 - L) / 2 if L <= 5 else -1.0  # DAPO eq. 13 with L_max 5, cache 2
        total = float(task[i]) + 0.1 * float(fmt[i]) + 2.0 * pen
        assert out["total"][i].item() == pytest.approx(total)
        assert out["seq"][i].item() == pytest.approx(total - 0.3 * float(kl[i].sum()), rel=1e-6)
        for t in range(5):
            want = -0.3 * float(kl[i, t]) + (total if t == L - 1 else 0.0)
            assert out["tok"][i, t].item() == pytest.approx(want, rel=1e-5, abs=1e-6)
    loss_in = rl.shape_rewards(task, fmt, lengths, kl, 0.1, "none", 2.0, 5, 2, 0.3, "loss")
    assert torch.equal(loss_in["seq"], loss_in["total"])  # KL in the loss: not in the reward


def test_rl_loss_is_the_sum_of_its_terms():
    g = torch.Generator().manual_seed(1)
    logp, old, ref = (torch.randn(2, 4, generator=g) * 0.3 for _ in range(3))
    adv, mask = torch.randn(2, 4, generator=g), torch.tensor([[1.0, 1, 1, 0], [1, 1, 0, 0]])
    values, old_values, returns = (torch.randn(2, 4, generator=g) for _ in range(3))
    cfg = rl.Config(kl_coef=0.2, kl_estimator="k3", kl_in="loss", loss_agg="token_mean")
    n = float(mask.sum())
    pl, _ = rl.policy_loss(logp, old, adv, mask, cfg.clip_low, cfg.clip_high, "token_mean", n, 64.0,
                           cfg.clip_ratio_c, cfg.max_log_ratio)
    k3 = rl.kl_estimators(logp, ref)["k3"]
    vl, _ = rl.value_loss(values, old_values, returns, mask, cfg.value_clip, n)
    grpo, st = rl.rl_loss(logp, old, adv, mask, n, cfg, ref_logp=ref)
    assert grpo.item() == pytest.approx((pl + 0.2 * (k3 * mask).sum() / n).item(), rel=1e-6)
    assert st["k3"].item() == pytest.approx((k3 * mask).sum().item(), rel=1e-6)
    ppo, st = rl.rl_loss(logp, old, adv, mask, n, cfg, ref_logp=ref, values=values, old_values=old_values,
                         returns=returns, n_tok=n, vf_coef=0.5)
    assert ppo.item() == pytest.approx((pl + 0.2 * (k3 * mask).sum() / n + 0.5 * vl).item(), rel=1e-6)
    reward_kl = rl.rl_loss(logp, old, adv, mask, n, rl.Config(kl_coef=0.2, kl_in="reward"), ref_logp=ref)[0]
    assert reward_kl.item() == pytest.approx(pl.item(), rel=1e-6)  # KL in the reward: not in the loss


_FAULTS = """
import resource, sys, torch
sys.path.insert(0, {root!r})
import common as C
applied = C.keep_freed_memory()
faults = [0] * 16
for i in range(16):  # a training loop's pattern: the same large tensor made and freed every step
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.ones(2 ** 24)  # 64 MiB: over glibc's largest mmap threshold
    faults[i] = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    del x
print(applied, min(faults[8:]))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_keep_freed_memory_reuses_a_freed_block_instead_of_faulting_in_a_new_one():
    """A 64 MiB tensor made and freed at every step of a loop: with C.keep_freed_memory the later
    steps reuse freed heap pages (almost no page faults: the first few steps grow the heap, since
    an aligned block does not fit exactly where its predecessor was; measured, 3-5 of them); with
    KEEP_FREED_MEMORY=0 (glibc's default: a fresh mmap per large block) all 16,384 4-KiB pages
    fault in again at every step. Counted page faults, not time."""
    out = {}
    for flag in ("1", "0"):
        r = subprocess.run([sys.executable, "-c", _FAULTS.format(root=str(ROOT))], capture_output=True, text=True,
                           env={**os.environ, "KEEP_FREED_MEMORY": flag}, check=True)
        applied, faults = r.stdout.split()
        out[flag] = (applied, int(faults))
    assert out["1"][0] == "True" and out["0"][0] == "False"
    assert out["0"][1] > 2 ** 24 * 4 // 4096 // 2  # at least half the pages faulted in afresh (huge pages: fewer)
    assert out["1"][1] < out["0"][1] // 10
