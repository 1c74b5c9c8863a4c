"""pipeline.py on tiny models: four stages chained through their final/ directories, the report
and its plots written, a finished stage skipped on the next run, an unfinished one run again."""
import json
import math
import os
import re
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import pipeline  # noqa: E402
from stage_scripts import load_script  # noqa: E402

TINY = {
    "eval": "--precision fp32 --eval_limit 1 --eval_code_limit 1 --eval_transfer_limit 1 --eval_loss_limit 1 "
            "--eval_max_new_tokens 2",
    "stage1": "--precision fp32 --max_steps 1 --build_math_questions 2 --build_code_questions 0 --k_samples 2 "
              "--unsampled_math_questions 1 --unsampled_code_questions 0 --sample_max_new_tokens 4 --max_len 1536",
    "stage2": "--precision fp32 --max_steps 1 --batch_size 2 --eval_limit 1 --eval_loss_limit 1 "
              "--agent_max_new_tokens 2 --math_max_new_tokens 2 --max_len 2048",
    "stage3": "--precision fp32 --student_layers 1 --max_steps 1 --prompt_limit 4 --eval_limit 1 --code_eval_limit 1 "
              "--kl_limit 2 --max_new_tokens 4 --pref_prompts 2 --speed_batch 2 --speed_tokens 2 "
              "--max_prompt_len 300 --max_len 400",
    "stage4": "--precision fp32 --stages stem:data/math_train.jsonl:1 --eval_limit 1 --eval_max_new_tokens 2 "
              "--max_new_tokens 2 --eval_kinds stem --prompts_per_step 2 --group_size 2",
    "rm": "--precision fp32 --rm_steps 1 --rm_batch_pairs 2",
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
    s2 = json.loads((out / "2_overall_sft" / "run_config.json").read_text())
    assert s2["model"] == str(out / "1_cold_start_sft" / "final")
    s3 = json.loads((out / "3_distill" / "run_config.json").read_text())
    assert s3["teacher"] == str(out / "2_overall_sft" / "final")
    assert s2["data"][-1] == f"reflective={out / '1_cold_start_sft' / 'trajectories.jsonl'}:2"  # S2R format carried on
    assert not list(out.glob("*/ckpt-*"))  # a finished stage's checkpoints are removed (--keep_checkpoints false)
    report = (out / "report.md").read_text()
    assert "| 3 distill (student) | heldout_kl |" in report and "| total |" in report
    # every model through the same eval: one row each, every cell a finite number
    table = report.split("## Every model through the same eval")[1].split("\n\n")[1].splitlines()[2:]
    assert [r.split(" | ")[0] for r in table] == ["| start (embedded)", "| after 1 cold-start SFT", "| after 2 overall SFT",
                                                  "| after 3 distill (student)", "| after 4 RL"]
    for r in table:
        cells = [c.strip() for c in r.strip("|").split("|")[1:]]
        for c, (head, _) in zip(cells, pipeline.EVAL_COLUMNS):
            assert c == "-" and "verdict" in head or math.isfinite(float(c)), (r, head)
    pngs = sorted(p.name for p in (out / "plots").glob("*.png"))
    assert pngs == ["1_cold_start_sft.png", "2_overall_sft.png", "3_distill.png", "4_rl.png", "math_by_stage.png"]
    assert all((out / "plots" / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    t1 = json.loads((out / "timings.json").read_text())
    assert set(t1) == {n for n, *_ in pipeline.STAGES} | {f"eval_{n}" for n, *_ in pipeline.STAGES[1:]} | {"4_reward_model"}
    machines = json.loads((out / "machines.json").read_text())  # what ran where: bf16 figures depend on the CPU
    assert set(machines) == set(t1) and len(set(machines.values())) == 1
    assert f"\nMachine: {pipeline.machine()}.\n" in report and f"{os.cpu_count()} cores" in report
    rates = json.loads((out / "gemm_rates.json").read_text())  # the machine's speed as each part began and ended
    assert set(rates) == set(t1) and all(len(v) == 1 and v[0]["begin"] > 0 and v[0]["end"] > 0 for v in rates.values())
    walls = report.split("| stage | wall time (min) |")[1].split("\n\n")[0].splitlines()[2:-1]
    assert len(walls) == len(t1) and all(re.fullmatch(r"\| \S+ \| [\d.]+ \| \d+ -> \d+ b?float\d+ \|", r)
                                         for r in walls), walls
    rm_row = next(x for x in report.splitlines() if x.startswith("| 4 reward model | pairwise acc"))
    assert all(0.0 <= float(c) <= 1.0 for c in rm_row.strip("|").split("|")[2:4]), rm_row
    assert "- Reward model (stage 4, on the student): held-out pairwise accuracy" in report
    student = next(x for x in report.splitlines() if x.startswith("- Distilled student vs its teacher"))
    lo, hi = (float(v) for v in re.search(r", ([\d.]+)-([\d.]+) in the alternated pairs", student).groups())
    assert 0 < lo <= hi, student  # the noise of the speed-up is shown beside it
    assert "- Held-out math, stage by stage" in report and "- Self-correction of the last model (after 4 RL)" in report
    # question by question: every consecutive pair and the final model against the embedded one, per eval
    paired = report.split("## Question by question")[1].split("\n\n")[2].splitlines()[2:]
    names = [r.split(" | ")[0] for r in paired if " | math | " in r]
    assert names == ["| start (embedded) -> after 1 cold-start SFT", "| after 1 cold-start SFT -> after 2 overall SFT",
                     "| after 2 overall SFT -> after 3 distill (student)", "| after 3 distill (student) -> after 4 RL",
                     "| start (embedded) -> after 4 RL"], paired
    for r in paired:
        cells = [c.strip() for c in r.strip("|").split("|")]
        assert re.fullmatch(r"\d+/1 \(\d+-\d+%\)", cells[2]) and (cells[6] == "< 0.001" or 0.0 <= float(cells[6]) <= 1.0), r
    ev = json.loads((out / "eval" / "4_rl" / "eval_summary.json").read_text())["eval"]  # per question = the aggregate
    resp = [json.loads(x) for x in (out / "eval" / "4_rl" / "eval_responses.jsonl").read_text().splitlines()]
    for dom in ("math", "transfer", "code"):
        rows = [r for r in resp if r["domain"] == dom]
        assert sum(r["correct"] for r in rows) / len(rows) == ev[f"{dom}_acc"], dom
        assert sum(r["first_correct"] for r in rows) / len(rows) == ev[f"{dom}_acc_first"], dom
    rl = [x for x in report.splitlines() if x.startswith("| 4 RL 1_stem |")]  # per sub-stage: its eval and reward
    assert any("math_acc (RL's own eval, n = 1, one greedy answer)" in x for x in rl), rl
    assert any("reward_mean, first -> last step" in x for x in rl), rl
    # run again after "losing" stage 4: stages 1-3 are skipped, only 4 runs (its time adds up) and is evaluated again
    import shutil
    shutil.rmtree(out / "4_rl" / "final")
    capsys.readouterr()
    pipeline.main(args(out))
    log = capsys.readouterr().out
    assert log.count("skipped") == 3 and "4_rl: " in log and (out / "4_rl" / "final" / "config.json").exists()
    assert "eval_4_rl: " in log and "eval_3_distill: " not in log
    t2 = json.loads((out / "timings.json").read_text())
    assert t2["4_rl"] > t1["4_rl"] and t2["1_cold_start_sft"] == t1["1_cold_start_sft"]
    assert t2["eval_4_rl"] > t1["eval_4_rl"] and t2["eval_3_distill"] == t1["eval_3_distill"]
    assert t2["4_reward_model"] == t1["4_reward_model"]                  # its reward model was kept
    rates2 = json.loads((out / "gemm_rates.json").read_text())
    assert len(rates2["4_rl"]) == 2 and rates2["1_cold_start_sft"] == rates["1_cold_start_sft"]  # one per attempt


@pytest.mark.parametrize("keep", [False, True])
def test_finished_stages_checkpoints_are_removed_unless_kept(tmp_path, monkeypatch, keep):
    def fake_run(cmd, what, *a, **k):  # each stage "trains": two checkpoints, an interrupted write, final/
        if what in [n for n, *_ in pipeline.STAGES]:
            sd = Path(cmd[cmd.index("--out_dir") + 1])
            for step in (2, 3):
                (sd / f"ckpt-00000{step}").mkdir(parents=True)
                (sd / f"ckpt-00000{step}" / "config.json").write_text(json.dumps({"stage": what, "step": step}))
                (sd / f"ckpt-00000{step}" / "state.json").write_text(json.dumps({"step": step}))
            (sd / "ckpt-000004.tmp").mkdir()
            (sd / "final").mkdir()
            (sd / "final" / "config.json").write_text("{}")
            (sd / "trajectories.jsonl").write_text("")
    monkeypatch.setattr(pipeline, "run", fake_run)
    cfg = pipeline.C.parse_config(pipeline.Config, ["--out_dir", str(tmp_path), "--keep_checkpoints", str(keep).lower()])
    pipeline.run_stages(cfg)
    for name, *_ in pipeline.STAGES:
        left = sorted(p.name for p in (tmp_path / name).glob("ckpt-*"))
        assert left == (["ckpt-000002", "ckpt-000003", "ckpt-000004.tmp"] if keep else []), name
        assert (tmp_path / name / "final" / "config.json").exists()
        kept = tmp_path / name / "run_config.json"       # the flags the stage ran with outlive its checkpoints
        assert kept.exists() != keep and (keep or json.loads(kept.read_text()) == {"stage": name, "step": 3})


def test_the_report_names_every_machine_a_resumed_run_went_on(tmp_path, monkeypatch):
    assert pipeline.machine_lines(tmp_path) == []  # nothing ran: nothing to name
    (tmp_path / "machines.json").write_text(json.dumps({"1_cold_start_sft": "cpu A", "2_overall_sft": "cpu B",
                                                        "eval_2_overall_sft": "cpu B"}))
    assert pipeline.machine_lines(tmp_path) == ["Machines (the run went on elsewhere):", "- cpu A: 1_cold_start_sft",
                                                "- cpu B: 2_overall_sft, eval_2_overall_sft", ""]
    desc = pipeline.machine()
    assert f"torch {torch.__version__}" in desc and "commit " in desc and f"{os.cpu_count()} cores" in desc

    def no_git(*a, **k):
        raise FileNotFoundError("git")
    monkeypatch.setattr(pipeline.subprocess, "run", no_git)  # a machine without git must not stop the pipeline
    assert pipeline.machine().endswith("; commit not a git checkout")


def test_math_checks_name_each_stage_against_its_goal():
    row = lambda acc, first=None: {"math_acc": acc, "math_acc_first": acc if first is None else first}  # noqa: E731
    rows = [("start (embedded)", row(0.01)), ("after 1 cold-start SFT", row(0.16)), ("after 2 overall SFT", row(0.07)),
            ("after 3 distill (student)", row(0.05)), ("after 4 RL", row(0.05, first=0.06))]
    math, corr = pipeline.math_checks(rows)
    assert "stage 1 cold-start SFT 0.010 -> 0.160 (up)" in math
    assert "stage 2 overall SFT 0.160 -> 0.070 (kept)" in math             # -0.09: inside the 0.10 margin
    assert "stage 3 distill (student) 0.070 -> 0.050 (kept)" in math
    assert "stage 4 RL 0.050 -> 0.050 (NOT up)" in math and "(WORSE)" in corr
    worse = rows[:2] + [("after 2 overall SFT", row(0.04))]                 # -0.12: beyond it
    assert "(lost 0.120, BEYOND the margin)" in pipeline.math_checks(worse)[0]
    assert "(no worse)" in pipeline.math_checks(rows[:2])[1]
    assert pipeline.math_checks([]) == []
    s2 = load_script("02_overall_sft.py", "s2_for_math_margin")                # one margin, two places
    assert pipeline.MATH_MARGIN == s2.Config().math_margin


def test_wilson_interval_and_exact_mcnemar_against_closed_forms_and_a_naive_reference():
    lo, hi = pipeline.wilson_interval(0, 100)                       # k = 0: [0, z^2 / (n + z^2)]
    assert lo == 0.0 and hi == pytest.approx(1.96 ** 2 / (100 + 1.96 ** 2), abs=1e-12)
    assert pipeline.wilson_interval(50, 100) == pytest.approx((0.4038, 0.5962), abs=1e-4)  # symmetric about 1/2
    lo, hi = pipeline.wilson_interval(100, 100)
    assert hi == pytest.approx(1.0, abs=1e-12) and lo == pytest.approx(1 - 1.96 ** 2 / (100 + 1.96 ** 2), abs=1e-12)
    for k, n in ((3, 40), (23, 100), (1, 7)):                         # it solves |p - k/n| = z sqrt(p (1 - p) / n)
        for end in pipeline.wilson_interval(k, n):
            assert abs(end - k / n) == pytest.approx(1.96 * (end * (1 - end) / n) ** 0.5, abs=1e-9)
    with pytest.raises(ValueError):
        pipeline.wilson_interval(0, 0)

    def naive(lost, gained):  # every outcome of n fair coins at most as likely as the one seen, in float64 loops
        n = lost + gained
        probs = [math.comb(n, i) * 0.5 ** n for i in range(n + 1)]
        return min(1.0, sum(q for q in probs if q <= probs[lost] * (1 + 1e-12)))
    assert pipeline.mcnemar_p(0, 0) == 1.0 and pipeline.mcnemar_p(3, 3) == 1.0
    assert pipeline.mcnemar_p(0, 5) == pytest.approx(2 / 32) and pipeline.mcnemar_p(5, 0) == pipeline.mcnemar_p(0, 5)
    assert pipeline.mcnemar_p(1, 9) == pytest.approx(2 * 11 / 1024)
    assert pipeline.fmt_p(pipeline.mcnemar_p(0, 23)) == "< 0.001" and pipeline.fmt_p(0.0390625) == "0.039"
    for lost, gained in ((2, 7), (10, 3), (0, 12), (14, 15), (4, 30)):  # symmetric binomial: both readings agree
        assert pipeline.mcnemar_p(lost, gained) == pytest.approx(naive(lost, gained), rel=1e-12)


def test_paired_outcomes_match_questions_by_prompt_and_skip_ungraded():
    q = lambda dom, p, ok, first=None: {"domain": dom, "prompt": p, "correct": ok, "first_correct": first}  # noqa: E731
    before = [q("math", "a", True), q("math", "b", False), q("math", "c", True), q("math", "d", None),
              q("code", "a", False), {"domain": "math", "prompt": "e", "response": "old eval: no grades"}]
    after = [q("math", "c", False), q("math", "b", True), q("math", "a", True), q("math", "d", True),
             q("math", "e", True), q("math", "f", True), q("code", "a", True)]
    assert pipeline.paired_outcomes(before, after, "math") == (3, 2, 2, 1, 1)  # a kept, b gained, c lost; d, e, f out
    assert pipeline.paired_outcomes(before, after, "code") == (1, 0, 1, 0, 1)
    assert pipeline.paired_outcomes(before, after, "transfer") == (0, 0, 0, 0, 0)
    assert pipeline.paired_outcomes(before, after, "math", "first_correct") == (0, 0, 0, 0, 0)


def test_a_failing_stage_stops_the_pipeline_with_a_clear_message(tmp_path):
    with pytest.raises(SystemExit, match="1_cold_start_sft failed"):
        pipeline.main(args(tmp_path / "bad", stage1="--no_such_flag 1"))
    done = tmp_path / "plain" / "1_cold_start_sft" / "final"  # a finished stage 1 without trajectories
    done.mkdir(parents=True)
    (done / "config.json").write_text("{}")
    with pytest.raises(SystemExit, match="--reasoning plain"):
        pipeline.main(args(tmp_path / "plain"))


def test_stage_2_reasoning_source_is_stage_1s_trajectories_by_default(tmp_path):
    s2r = tmp_path / "1_cold_start_sft" / "trajectories.jsonl"
    cfg = pipeline.C.parse_config(pipeline.Config, ["--out_dir", str(tmp_path), "--stage2", "--max_steps 3"])
    cmd = pipeline.command(cfg, 1, "prev/final")
    assert f"reflective={s2r}:{pipeline.REFLECTIVE_WEIGHT}" in cmd and cmd.index("--data") < cmd.index("--max_steps")
    assert not any("math_train" in c for c in cmd)                        # the plain CoT solutions replaced
    assert all(src in cmd for src in pipeline.STAGE2_MIXTURE) and "code=data/code_train.jsonl:0.5" in cmd
    assert "--data" not in pipeline.command(cfg, 2, "x")                 # stage 3: not touched
    both = pipeline.C.parse_config(pipeline.Config, ["--out_dir", str(tmp_path), "--reasoning", "both"])
    assert "reasoning=data/math_train.jsonl:1" in pipeline.command(both, 1, "p")
    plain = pipeline.C.parse_config(pipeline.Config, ["--out_dir", str(tmp_path), "--reasoning", "plain"])
    assert "--data" not in pipeline.command(plain, 1, "prev/final")      # stage 2's own mixture
    with pytest.raises(SystemExit, match="--reasoning"):
        pipeline.main(["--out_dir", str(tmp_path), "--reasoning", "s2"])


def test_eval_flags_reach_stage_1_and_the_eval_runs_alike(tmp_path):
    cfg = pipeline.C.parse_config(pipeline.Config, ["--out_dir", str(tmp_path), "--eval", "--eval_limit 7",
                                                    "--stage1", "--max_steps 2"])
    s1 = pipeline.command(cfg, 0, "m")
    ev = pipeline.eval_command(cfg, "x/final", tmp_path / "e")

    def last(cmd, flag):  # argparse keeps a flag's last value
        return max(i for i, x in enumerate(cmd) if x == flag)

    assert s1[last(s1, "--eval_limit") + 1] == "7" == ev[last(ev, "--eval_limit") + 1]  # the user's after EVAL_FLAGS
    assert s1[last(s1, "--eval_transfer_limit") + 1] == "80" == ev[last(ev, "--eval_transfer_limit") + 1]
    assert last(s1, "--eval_limit") < s1.index("--max_steps")           # the user's stage-1 flags come last
    s1_cfg = pipeline.C.parse_config(load_script("01_cold_start_sft.py", "s1_for_eval_flags").Config, s1[2:])
    assert (s1_cfg.eval_limit, s1_cfg.eval_transfer_limit) == (7, 80)  # what stage 1 really parses
    assert ev[ev.index("--mode") + 1] == "eval" and ev[ev.index("--model") + 1] == "x/final"


def test_dry_run_prints_the_five_commands_and_runs_nothing(tmp_path, capsys):
    pipeline.main(["--out_dir", str(tmp_path), "--dry_run", "true", "--stage4", "--group_size 16", "--rm", "--rm_steps 3"])
    lines = [x for x in capsys.readouterr().out.splitlines() if x.strip()]
    assert [next(s for _, s, _ in pipeline.STAGES if s in x) for x in lines] == \
        [s for _, s, _ in pipeline.STAGES[:3]] + [pipeline.STAGES[3][1]] * 2
    assert "--mode train_reward_model" in lines[3] and lines[3].endswith("--rm_steps 3")   # the reward model first
    assert lines[4].endswith("--group_size 16") and str(tmp_path / "3_distill" / "final") in lines[4]
    assert str(tmp_path / "3_distill" / "final") in lines[3] and "--group_size" not in lines[3]
    assert not any((tmp_path / n).exists() for n, *_ in pipeline.STAGES) and not (tmp_path / "report.md").exists()


def test_readme_gpu_full_configuration_parses_for_every_stage():
    """The README's "full configuration" command is not run here (no GPU), but every flag in it must
    exist: each stage's command line, as the pipeline builds it, parses into that stage's Config."""
    import importlib.util
    import shlex
    block = (ROOT / "README.md").read_text().split("NPROC=8 python pipeline.py --device cuda", 1)[1]
    argv = shlex.split(block.split("```", 1)[0].replace("\\\n", " "))
    cfg = pipeline.C.parse_config(pipeline.Config, ["--device", "cuda", *argv])
    for i, (_, script, _) in enumerate(pipeline.STAGES):
        spec = importlib.util.spec_from_file_location(f"_full_{i}", ROOT / script)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up
        spec.loader.exec_module(module)
        cmd = pipeline.command(cfg, i, "prev/final")
        stage_cfg = pipeline.C.parse_config(module.Config, cmd[cmd.index(str(ROOT / script)) + 1:])
        assert stage_cfg.device == "cuda"
        if i == 3:  # the reward model's command too; the CPU budget's 6 RL steps do not cap the GPU run
            rm_cmd = pipeline.rm_command(cfg, "prev/final")
            rm_cfg = pipeline.C.parse_config(module.Config, rm_cmd[rm_cmd.index(str(ROOT / script)) + 1:])
            assert rm_cfg.mode == "train_reward_model" and rm_cfg.rm_steps == 2000
            assert stage_cfg.max_steps == -1 and ":400" in stage_cfg.stages and stage_cfg.eval_kinds == ["auto"]
    assert "--eval_limit" in pipeline.eval_command(cfg, "m", ROOT / "x")
