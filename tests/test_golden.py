"""Golden runs (torchtune's recipe tests): each script's real CLI for a few steps on the tiny model
(fp32, seed 0), compared against recorded per-step figures, then stopped after step 1 and resumed:
the resumed steps must give the same figures.

The golden numbers below change, legitimately, when the tiny model's initialisation, the data
generator, the tokenizer, the sampler, the loss or the order of data / random draws changes; they
must NOT change from a refactor. Regenerate them (and say why in the commit) with
    GOLDEN_RECORD=1 python -m pytest -q -s tests/test_golden.py
which prints the new lists instead of checking. The tolerance (relative 1e-4) allows for fp32
kernels that differ between CPUs (AVX2 vs AVX512 reductions); a real change moves them by far more.
"""
import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from stage_scripts import killed_at_log, load_script  # noqa: E402

S1 = load_script("01_cold_start_sft.py", "golden_s1")
S2 = load_script("02_overall_sft.py", "golden_s2")
RL = load_script("04_rl.py", "golden_rl")
RECORD = os.environ.get("GOLDEN_RECORD") == "1"
DATA = ROOT / "data"
TINY = ["--model", "tiny", "--precision", "fp32", "--device", "cpu", "--seed", "0"]

GOLDEN = {  # per training step: the logged loss (stages 1, 2) / reward_mean and loss (stage 4)
    "01": [5.51455, 5.223309, 4.956464],
    "02": [5.548007, 5.269752, 5.010266],
    "04_reward": [0.091667, 0.104167, 0.0625],  # re-recorded: sampler.sample_categorical replaced multinomial
    "04_loss": [-0.066217, -0.043403, -0.023498],
}


def _train_rows(out: Path) -> list[dict]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r and "grad_norm" in r]


def _check(name: str, values: list[float]):
    if RECORD:
        print(f'\n    "{name}": {[float(f"{v:.7g}") for v in values]},')
        return
    assert len(values) == len(GOLDEN[name]), (name, values)
    assert values == pytest.approx(GOLDEN[name], rel=1e-4), (name, values)


S1_ARGS = TINY + ["--objective", "plain", "--max_steps", "3", "--micro_batch_size", "2", "--grad_accum", "2",
                  "--max_len", "256", "--lr", "3e-3", "--warmup_steps", "1", "--eval_limit", "0",
                  "--eval_code_limit", "0", "--eval_transfer_limit", "0", "--eval_loss_limit", "2"]


S2_ARGS = TINY + ["--max_steps", "3", "--batch_size", "4", "--micro_batch_size", "1", "--max_len", "2048",
                  "--lr", "3e-3", "--warmup_steps", "1",
                  "--data", f"chat={DATA / 'chat_train.jsonl'}:1", f"reasoning={DATA / 'math_train.jsonl'}:1",
                  "--eval_data", f"chat={DATA / 'chat_test.jsonl'}", "--eval_loss_limit", "2", "--eval_limit", "0"]


@pytest.mark.parametrize("name", ["01", "02"])
def test_golden_sft_stages_and_resume(tmp_path, name):
    main, args = {"01": (S1.main, S1_ARGS), "02": (S2.main, S2_ARGS)}[name]
    main(args + ["--out_dir", str(tmp_path / "a")])
    _check(name, [r["loss"] for r in _train_rows(tmp_path / "a")])
    assert main(args + ["--out_dir", str(tmp_path / "b"), "--stop_after", "1"]) is None
    main(args + ["--out_dir", str(tmp_path / "b")])
    a, b = _train_rows(tmp_path / "a"), _train_rows(tmp_path / "b")
    assert [r["step"] for r in b] == [1, 2, 3]
    assert [r["loss"] for r in b] == pytest.approx([r["loss"] for r in a], rel=1e-6)


RL_ARGS = TINY + ["--stages", f"toy:{DATA / 'math_train.jsonl'}:3", "--eval_kinds", "toy", "--eval_limit", "2",
                  "--eval_max_new_tokens", "4", "--prompts_per_step", "2", "--group_size", "4",
                  "--micro_batch_size", "4", "--max_new_tokens", "6", "--lr", "1e-3", "--kl_coef", "0.05",
                  "--ppo_epochs", "2", "--save_every", "1", "--resume", "false"]


def test_golden_stage4_and_resume(tmp_path, monkeypatch):
    RL.main(RL_ARGS + ["--out_dir", str(tmp_path / "a")])
    a = _train_rows(tmp_path / "a")
    _check("04_reward", [r["reward_mean"] for r in a])
    _check("04_loss", [r["loss"] for r in a])
    # killed during step 2, after the step-1 checkpoint
    with killed_at_log(monkeypatch, lambda step, metrics: step == 1 and "grad_norm" in metrics):
        RL.main(RL_ARGS + ["--out_dir", str(tmp_path / "b")])
    RL.main(RL_ARGS[:-2] + ["--resume", "true", "--out_dir", str(tmp_path / "b")])
    b = _train_rows(tmp_path / "b")
    assert [r["step"] for r in b] == [0, 1, 2]
    assert [r["reward_mean"] for r in b] == [r["reward_mean"] for r in a]
    assert [r["loss"] for r in b] == pytest.approx([r["loss"] for r in a], rel=1e-6)
