"""pipeline.py on tiny models: four stages chained through their final/ directories, the report
and its plots written, a finished stage skipped on the next run, an unfinished one run again."""
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import pipeline  # noqa: E402

TINY = {
    "stage1": "--precision fp32 --objective plain --max_steps 1 --eval_limit 1 --eval_code_limit 0 "
              "--eval_loss_limit 1 --eval_max_new_tokens 2 --max_len 256",
    "stage2": "--precision fp32 --max_steps 1 --batch_size 2 --eval_limit 1 --eval_loss_limit 1 "
              "--agent_max_new_tokens 2 --math_max_new_tokens 2 --max_len 2048",
    "stage3": "--precision fp32 --student_layers 1 --max_steps 1 --prompt_limit 4 --eval_limit 1 --code_eval_limit 1 "
              "--kl_limit 2 --max_new_tokens 4 --pref_prompts 2 --speed_batch 2 --speed_tokens 2 "
              "--max_prompt_len 300 --max_len 400",
    "stage4": "--precision fp32 --stages stem:data/math_train.jsonl:1 --eval_limit 1 --eval_max_new_tokens 2 "
              "--max_new_tokens 2 --eval_kinds stem",
}


def args(out, **kw):
    a = ["--model", "tiny", "--device", "cpu", "--out_dir", str(out)]
    for k, v in {**TINY, **kw}.items():
        a += [f"--{k}", v]
    return a


@pytest.mark.slow
def test_pipeline_chains_stages_writes_report_and_continues(tmp_path, capsys):
    out = tmp_path / "pipe"
    pipeline.main(args(out))
    for name, *_ in pipeline.STAGES:
        assert (out / name / "final" / "config.json").exists(), name
    # each stage read the previous stage's final/ (its resolved config says so)
    s2 = json.loads(next((out / "2_overall_sft").glob("ckpt-*/config.json")).read_text())
    assert s2["model"] == str(out / "1_cold_start_sft" / "final")
    s3 = json.loads(next((out / "3_distill").glob("ckpt-*/config.json")).read_text())
    assert s3["teacher"] == str(out / "2_overall_sft" / "final")
    report = (out / "report.md").read_text()
    assert "| 3 distill (student) | heldout_kl |" in report and "| total |" in report
    pngs = sorted(p.name for p in (out / "plots").glob("*.png"))
    assert pngs == ["1_cold_start_sft.png", "2_overall_sft.png", "3_distill.png", "4_rl.png"]
    assert all((out / "plots" / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    t1 = json.loads((out / "timings.json").read_text())
    assert set(t1) == {n for n, *_ in pipeline.STAGES}
    # run again after "losing" stage 4: stages 1-3 are skipped, only 4 runs (its time adds up)
    import shutil
    shutil.rmtree(out / "4_rl" / "final")
    capsys.readouterr()
    pipeline.main(args(out))
    log = capsys.readouterr().out
    assert log.count("skipped") == 3 and "4_rl: " in log and (out / "4_rl" / "final" / "config.json").exists()
    t2 = json.loads((out / "timings.json").read_text())
    assert t2["4_rl"] > t1["4_rl"] and t2["1_cold_start_sft"] == t1["1_cold_start_sft"]


def test_a_failing_stage_stops_the_pipeline_with_a_clear_message(tmp_path):
    with pytest.raises(SystemExit, match="1_cold_start_sft failed"):
        pipeline.main(args(tmp_path / "bad", stage1="--no_such_flag 1"))


def test_reflective_trajectories_join_stage_2_only_when_asked(tmp_path):
    s2r = tmp_path / "1_cold_start_sft" / "trajectories.jsonl"
    s2r.parent.mkdir()
    s2r.write_text("")
    cfg = pipeline.C.parse_config(pipeline.Config, ["--out_dir", str(tmp_path), "--reflective_weight", "2",
                                                    "--stage2", "--max_steps 3"])
    cmd = pipeline.command(cfg, 1, "prev/final")
    assert f"reflective={s2r}:2.0" in cmd and cmd.index("--data") < cmd.index("--max_steps")
    assert "--data" not in pipeline.command(cfg, 2, "x")                 # stage 3: not touched
    off = pipeline.C.parse_config(pipeline.Config, ["--out_dir", str(tmp_path)])
    assert "--data" not in pipeline.command(off, 1, "prev/final")        # default: stage 2's own mixture
