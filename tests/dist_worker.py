"""Worker for tests/test_distributed.py: the FSDP2 set-up of common.py end to end on the tiny model.

Trains `--steps` optimizer steps on fixed data (global rows per step split by C.rank_micro_batches,
loss normalised by the global trained-token count), saves a checkpoint and a final HF dir, generates
under S.gathered_for_generation, reloads the saved HF dir and checks its weights equal the trained
ones, then resumes from the checkpoint in a fresh sharded model and checks one more step matches.

    python tests/dist_worker.py --out /tmp/w1                        # 1 process, accumulation 2
    torchrun --nproc_per_node 2 tests/dist_worker.py --out /tmp/w2   # 2 processes (gloo), accumulation 1

Rank 0 writes out/result.json (losses, grad norms, generations) and out/weights.pt (trained weights).
"""
import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common as C  # noqa: E402
import models as M  # noqa: E402
import sampler as S  # noqa: E402

ROWS_PER_STEP, MICRO_BATCH, MAX_LEN, LR, MAX_GRAD_NORM = 4, 2, 160, 3e-3, 0.5


@dataclass
class WorkerConfig:  # saved with the checkpoint
    steps: int = C.arg(3, "optimizer steps")
    lr: float = C.arg(LR, "learning rate")


def full_weights(policy) -> dict[str, torch.Tensor]:
    """Unsharded fp32 copies of every parameter (a collective under FSDP2: all ranks call it)."""
    out = {}
    for name, p in policy.named_parameters():
        p = p.full_tensor() if hasattr(p, "full_tensor") else p
        out[name.removeprefix("lm.")] = p.detach().cpu().clone()
    return out


def count_all_gathers() -> dict:
    """Count FSDP2 parameter all-gathers (wraps a private torch function; skipped if it moved)."""
    counter = {"n": 0}
    try:
        from torch.distributed.fsdp._fully_shard import _fsdp_param_group as pg
        orig = pg.foreach_all_gather
    except (ImportError, AttributeError):
        counter["n"] = -1
        return counter

    def wrapped(*a, **k):
        counter["n"] += 1
        return orig(*a, **k)
    pg.foreach_all_gather = wrapped
    return counter


def train_step(policy, opt, step_rows, d, pad_id) -> tuple[float, float]:
    micro = C.rank_micro_batches(step_rows, d, MICRO_BATCH)
    batches = [C.collate(mb, pad_id, pad_to=MAX_LEN) for mb in micro]
    # global count of trained tokens of the whole step: local micro-batches summed over ranks
    n_tokens = int(C.all_reduce_sum(torch.tensor(sum(C.count_trained(b["labels"]) for b in batches)), d))
    loss_sum = 0.0
    for i, b in enumerate(batches):
        if C.is_sharded(policy):
            policy.set_requires_gradient_sync(i == len(batches) - 1)
        out = policy(b["input_ids"], b["labels"], position_ids=b["position_ids"])
        loss = C.masked_ce_loss(out["logp"], b["labels"], n_tokens)
        loss.backward()
        loss_sum += float(loss.detach())
    loss_sum = float(C.all_reduce_sum(torch.tensor(loss_sum), d))  # = the global token-mean loss
    gnorm = C.optimizer_step(policy, opt, LR, MAX_GRAD_NORM)
    return loss_sum, gnorm


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    out = Path(args.out)
    d = C.init_distributed("cpu")
    C.set_seed(0)

    model, tok = M.load_model_and_tokenizer("tiny", seed=0)
    rows = C.read_jsonl(Path(__file__).resolve().parents[1] / "data" / "math_train.jsonl", required=("question", "solution"))
    chats = [[{"role": "system", "content": "Solve it."}, {"role": "user", "content": r["question"]},
              {"role": "assistant", "content": r["solution"]}] for r in rows[:64]]
    samples, _ = C.fit_length([C.tokenize_chat(tok, m) for m in chats], MAX_LEN, "truncate")
    samples = samples[:ROWS_PER_STEP * (args.steps + 1)]  # fixed data: the same on every rank
    assert len(samples) == ROWS_PER_STEP * (args.steps + 1)
    data = C.pack_rows(samples, MAX_LEN, packing=False)

    policy = C.shard_model(M.LogProbModel(model), d, torch.float32)
    assert C.is_sharded(policy) == d.enabled
    opt = C.make_optimizer(policy, LR, 0.1)
    losses, gnorms = [], []
    for step in range(args.steps):
        loss, gnorm = train_step(policy, opt, data[step * ROWS_PER_STEP:(step + 1) * ROWS_PER_STEP], d, tok.pad_token_id)
        losses.append(loss)
        gnorms.append(gnorm)
        C.print0(f"step {step} loss {loss:.6f} gnorm {gnorm:.6f}")

    ck = M.save_checkpoint(out, args.steps, policy, tok, opt, d, WorkerConfig(steps=args.steps), {"sample_pos": 12})
    M.save_hf(policy, tok, out / "final", d)
    trained = full_weights(policy)

    prompts = [C.chat_prompt_ids(tok, chats[i][:-1]) for i in range(3)]
    gathers = count_all_gathers()
    with torch.no_grad():  # positive control: a plain forward all-gathers every shard group
        b = C.collate(data[:1], tok.pad_token_id)
        policy(b["input_ids"], b["labels"], position_ids=b["position_ids"])
    gathers_per_forward = gathers["n"]
    with S.gathered_for_generation(policy):
        gathers["n"] = 0
        gen = S.generate(policy, prompts, 8, eos_ids=tok.eos_token_id, pad_id=tok.pad_token_id, temperature=0.0)
        gathers_in_generate = gathers["n"]  # must be 0: parameters stay gathered for the whole rollout
    if d.enabled:  # the parameters are sharded again afterwards
        from torch.distributed.tensor import DTensor
        assert all(isinstance(p, DTensor) for p in policy.parameters())

    # the saved HF dirs reload with transformers and hold exactly the trained weights
    from transformers import AutoModelForCausalLM
    for path in (out / "final", ck / "model"):
        sd = AutoModelForCausalLM.from_pretrained(path).state_dict()
        for name, w in trained.items():
            assert sd[name].dtype == torch.float32 and torch.equal(sd[name], w), (path, name)

    # resume: fresh model from the checkpoint, sharded, optimizer restored; one more step from
    # both must give identical weights
    model2, _ = M.load_model_and_tokenizer(str(ck / "model"))
    policy2 = C.shard_model(M.LogProbModel(model2), d, torch.float32)
    opt2 = C.make_optimizer(policy2, LR, 0.1)
    state = M.load_checkpoint(M.latest_checkpoint(out), policy2, opt2, d)
    assert state == {"step": args.steps, "sample_pos": 12}, state
    extra = data[args.steps * ROWS_PER_STEP:(args.steps + 1) * ROWS_PER_STEP]
    train_step(policy, opt, extra, d, tok.pad_token_id)
    train_step(policy2, opt2, extra, d, tok.pad_token_id)
    cont, resumed = full_weights(policy), full_weights(policy2)
    resume_diff = max(float((cont[k] - resumed[k]).abs().max()) for k in cont)

    gens = [gen.response_ids(i) for i in range(len(prompts))]
    if d.enabled:  # every rank must have generated the same tokens
        all_gens = [None] * d.world_size
        torch.distributed.all_gather_object(all_gens, gens)
        assert all(g == gens for g in all_gens), all_gens
    # stage 4's update skips rows without gradient (04_rl.rows_to_run): ranks with 3 and 0 such rows
    # must still run the same number of micro-batches, or FSDP2's collectives would hang
    from stage_scripts import load_script
    rl = load_script("04_rl.py", "rl04_worker")
    mask = (torch.arange(6)[:, None] < (3 if d.rank == 0 else 0)).float().expand(6, 4)
    rows_run = C.gather_objects([len(rl.rows_to_run(list(range(6)), mask, mask, True, MICRO_BATCH, d))], d)
    if d.is_main:
        torch.save(trained, out / "weights.pt")
        (out / "result.json").write_text(json.dumps({
            "world_size": d.world_size, "losses": losses, "gnorms": gnorms, "generations": gens,
            "finished": gen.finished.tolist(), "resume_max_abs_diff": resume_diff,
            "gathers_per_forward": gathers_per_forward, "gathers_in_generate": gathers_in_generate,
            "rows_run": rows_run}))
    C.cleanup_distributed(d)


if __name__ == "__main__":
    main()
