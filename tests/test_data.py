"""Checks for the sample data in data/ and for the generator data/make_data.py."""
import importlib.util
import json
import re
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parents[1] / "data"
GENERATOR = DATA / "make_data.py"
DATASETS = ["math", "code", "chat", "agent", "pref"]
FILES = [f"{name}_{split}.jsonl" for name in DATASETS for split in ("train", "test")]


def _load_module():
    spec = importlib.util.spec_from_file_location("make_data", GENERATOR)
    module = importlib.util.module_from_spec(spec)
    dont_write, sys.dont_write_bytecode = sys.dont_write_bytecode, True  # keep data/ free of __pycache__
    try:
        spec.loader.exec_module(module)
    finally:
        sys.dont_write_bytecode = dont_write
    return module


md = _load_module()


def read(name):
    with open(DATA / name, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def key(name, row):
    """The text compared for train/test overlap (normalised like the generator does)."""
    if name in ("math",):
        return md.norm(row["question"])
    if name in ("code", "pref"):
        return md.norm(row["prompt"])
    return md.norm(md.first_user(row))


@pytest.mark.parametrize("fname", FILES)
def test_file_parses_and_is_not_empty(fname):
    lines = (DATA / fname).read_text(encoding="utf-8").split("\n")
    assert lines[-1] == "", "file must end with a newline"
    rows = [json.loads(line) for line in lines[:-1]]
    assert rows and all(isinstance(r, dict) for r in rows)


def test_expected_sizes():
    expected = {"math": (1500, 150), "code": (300, 60), "chat": (600, 60), "agent": (600, 80), "pref": (500, 100)}
    for name, (n_train, n_test) in expected.items():
        assert len(read(f"{name}_train.jsonl")) == n_train
        assert len(read(f"{name}_test.jsonl")) == n_test
    total = sum(p.stat().st_size for p in DATA.iterdir() if p.suffix in (".jsonl", ".json"))
    assert total < 3.2 * 1024 * 1024


@pytest.mark.parametrize("split", ["train", "test"])
def test_math_fields(split):
    for r in read(f"math_{split}.jsonl"):
        assert set(r) >= {"question", "solution", "answer", "difficulty", "type"}
        assert isinstance(r["answer"], str) and r["answer"] and r["question"].strip()
        assert r["difficulty"] in (1, 2, 3, 4, 5)
        lines = r["solution"].split("\n")
        assert len(lines) >= 2 and lines[-1] == f"The answer is {r['answer']}."
        assert md.re.fullmatch(r"-?\d+(\.\d+)?|-?\d+/\d+", r["answer"]), r["answer"]


@pytest.mark.parametrize("split", ["train", "test"])
def test_code_fields_and_solutions_pass(split):
    for r in read(f"code_{split}.jsonl"):
        assert set(r) >= {"prompt", "entry_point", "tests", "solution", "difficulty"}
        assert r["difficulty"] in (1, 2, 3, 4, 5)
        assert 3 <= len(r["tests"]) <= 5 and all(t.startswith("assert ") for t in r["tests"])
        assert r["prompt"].rstrip().endswith(":") and f"def {r['entry_point']}(" in r["prompt"]
        ns = {}
        exec(r["solution"], ns)
        assert callable(ns[r["entry_point"]])
        for t in r["tests"]:
            exec(t, ns)


def _check_messages(msgs):
    assert msgs and all(m["role"] in ("system", "user", "assistant", "tool") for m in msgs)
    assert [m["role"] for m in msgs if m["role"] != "tool"][-1] == "assistant"
    assert all(m["role"] != "system" for m in msgs[1:])
    assert all(isinstance(m["content"], str) for m in msgs)


@pytest.mark.parametrize("split", ["train", "test"])
def test_chat_fields(split):
    rows = read(f"chat_{split}.jsonl")
    for r in rows:
        assert r["domain"] == "chat" and r["difficulty"] in (1, 2, 3, 4, 5)
        _check_messages(r["messages"])
        roles = [m["role"] for m in r["messages"] if m["role"] != "system"]
        assert roles == ["user", "assistant"] * (len(roles) // 2)  # strict alternation
        assert all(m["content"].strip() for m in r["messages"])
    n_user = [sum(m["role"] == "user" for m in r["messages"]) for r in rows]
    assert min(n_user) == 1 and max(n_user) >= 2


@pytest.mark.parametrize("split", ["train", "test"])
def test_agent_traces_are_executable(split):
    rows = read(f"agent_{split}.jsonl")
    multi = 0
    for r in rows:
        assert r["domain"] == "agent" and r["difficulty"] in (1, 2, 3, 4, 5)
        assert sorted(t["function"]["name"] for t in r["tools"]) == ["calculator", "convert_units", "lookup"]
        msgs = r["messages"]
        _check_messages(msgs)
        calls = 0
        for i, m in enumerate(msgs):
            if m["role"] == "assistant" and m.get("tool_calls"):
                assert m["content"] == ""
                fn = m["tool_calls"][0]["function"]
                assert isinstance(fn["arguments"], dict)  # a JSON object, not a string
                tool_msg = msgs[i + 1]
                assert tool_msg["role"] == "tool" and tool_msg["name"] == fn["name"]
                assert md.run_tool(fn["name"], fn["arguments"]) == tool_msg["content"]  # the tool really returns this
                calls += 1
        assert calls >= 1
        multi += calls > 1
        task = r["task"]
        assert md.run_tool(task["tool"], task["arguments"]) == task["expected"]
        assert task["expected"] in msgs[-1]["content"]
    assert 0.1 <= multi / len(rows) <= 0.35


def test_lookup_table_json_matches_module():
    table = json.loads((DATA / "lookup_table.json").read_text(encoding="utf-8"))
    assert table == md.LOOKUP_TABLE and 35 <= len(table) <= 45


@pytest.mark.parametrize("split", ["train", "test"])
def test_pref_fields(split):
    for r in read(f"pref_{split}.jsonl"):
        assert set(r) >= {"prompt", "chosen", "rejected"}
        assert r["prompt"].strip() and r["chosen"].strip() and r["chosen"] != r["rejected"]


@pytest.mark.parametrize("name", DATASETS)
def test_train_and_test_do_not_overlap(name):
    train = {key(name, r) for r in read(f"{name}_train.jsonl")}
    test = [key(name, r) for r in read(f"{name}_test.jsonl")]
    assert len(set(test)) == len(test), "duplicate items inside the test split"
    assert not train.intersection(test)


def test_pref_train_does_not_contain_other_test_questions():
    pref_train = {key("pref", r) for r in read("pref_train.jsonl")}
    for name in ("math", "chat"):
        assert not pref_train.intersection(key(name, r) for r in read(f"{name}_test.jsonl"))


def _generate(out, seed=0):
    subprocess.run([sys.executable, str(GENERATOR), "--out", str(out), "--seed", str(seed)], check=True, capture_output=True)
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def test_generator_is_deterministic(tmp_path):
    first = _generate(tmp_path / "a")
    second = _generate(tmp_path / "b")
    assert sorted(first) == sorted(FILES + ["lookup_table.json", "math_transfer.jsonl"])
    assert first == second
    # The checked-in files are exactly what the generator produces with the default seed.
    for name, content in first.items():
        assert (DATA / name).read_bytes() == content, f"data/{name} is stale; rerun python data/make_data.py"
    assert _generate(tmp_path / "c", seed=1) != first  # the seed matters


# ----------------------------------------------------------------------------- the math transfer split

def _masked_ngrams(text, n=6):
    """Word n-grams with every number replaced by '#': the shared phrasing of two templates."""
    words = ["#" if any(ch.isdigit() for ch in w) else w for w in md.norm(text).split()]
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def _training_texts():
    """Every prompt / user turn a stage trains on (the S2R trajectories and stage 3's data are built from these)."""
    out = [r["question"] for r in read("math_train.jsonl")] + [r["prompt"] for r in read("code_train.jsonl")]
    out += [r["prompt"] for r in read("pref_train.jsonl")]
    for name in ("chat", "agent"):
        out += [m["content"] for r in read(f"{name}_train.jsonl") for m in r["messages"]
                if m["role"] == "user" and isinstance(m.get("content"), str)]
    return out


def test_transfer_split_shares_no_kind_question_or_phrasing_with_training():
    """math_transfer.jsonl: families absent from the training generators, no question equal to any
    training prompt, and no 6-word phrase (numbers masked) in common with any training prompt."""
    rows = read("math_transfer.jsonl")
    assert len(rows) == md.N_TRANSFER and len({md.norm(r["question"]) for r in rows}) == len(rows)
    assert {r["type"] for r in rows} == {k for k, _ in md.TRANSFER_TYPES}  # every family present
    assert not {k for k, _ in md.TRANSFER_TYPES} & {k for k, _ in md.MATH_TYPES}
    train = _training_texts()
    assert len(train) > 3000
    train_keys = {md.norm(t) for t in train}
    train_grams = set().union(*(_masked_ngrams(t) for t in train))
    for r in rows:
        assert md.norm(r["question"]) not in train_keys, r["question"]
        shared = _masked_ngrams(r["question"]) & train_grams
        assert not shared, (r["question"], sorted(shared)[:3])
        assert r["solution"].endswith(f"The answer is {r['answer']}.")


def test_transfer_answers_follow_from_their_solutions():
    """Each solution's arithmetic is right (every 'a op b ... = c' checked) and grades its own answer."""
    import verify as V
    for r in read("math_transfer.jsonl"):
        assert V.score_math(r["solution"], r["answer"])[0] == 1.0, r
        for expr, c in re.findall(r"(?<![\d.])((?:-?\d+ [-+*/] )+-?\d+) = (-?\d+(?:/\d+)?)(?![\d:])", r["solution"]):
            assert Fraction(eval(expr)) == Fraction(c), (r["question"], expr, c)  # noqa: S307 (digits and + - * / only)
