"""Tests for the verification components: math grading and the code sandbox."""

import os
import resource
import socket
import sys
import threading
import time
import uuid

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sandbox import extract_code, run_code_tests  # noqa: E402
from verify import extract_final_answer, math_answers_equal, score_math  # noqa: E402

V = sys.modules[run_code_tests.__module__]  # the module itself, for monkeypatching the sandbox mode


# ---------------------------------------------------------------------------
# Math: extraction
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("so the result is \\boxed{5}", "5"),
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),  # nested braces
    ("first \\boxed{3} then \\boxed{4}", "4"),  # the last box
    ("$\\boxed{ 12 }$.", "12"),
    ("\\boxed{-3}", "-3"),
    ("The answer is 3. \\boxed{4}", "4"),  # a box beats a phrase
    ("The answer is 42.", "42"),
    ("The answer is 42. Let me double check that.", "42"),
    ("the ANSWER is 3.5", "3.5"),
    ("Final answer: $3.5$", "3.5"),
    ("answer: x = 4", "x = 4"),
    ("**Answer:** 7", "7"),
    ("Answer:\n42", "42"),
    ("The final answer is $\\frac{3}{4}$. I hope it is correct.", "\\frac{3}{4}"),
    ("Final Answer: The final answer is 9. I hope it is correct.", "9"),
    ("Natalia sold 48 + 24 = 72 clips.\n#### 72", "72"),
    ("The answer is 3 ... actually the answer is 5", "5"),  # the last phrase
    ("I think it's 12", None),
    ("let me verify the answer: 3+2=5", None),  # "answer:" mid-sentence is not a marker  # no marker: strict extraction finds nothing
    ("", None),
    ("\\boxed{}", None),  # an empty box is no answer
    ("\\boxed{5", None),  # unclosed box
])
def test_extract_final_answer(text, expected):
    assert extract_final_answer(text) == expected


def test_extract_last_number_fallback_is_opt_in():
    text = "so she has 1,234 apples and 3 pears left over, then 17"
    assert extract_final_answer(text) is None
    assert extract_final_answer(text, allow_last_number=True) == "17"
    assert extract_final_answer("we get 1,234 apples", allow_last_number=True) == "1,234"
    assert extract_final_answer("no digits here", allow_last_number=True) is None


def test_extract_is_linear_on_hostile_input():
    # 50k unclosed boxes: a quadratic scanner would take minutes.
    assert extract_final_answer("\\boxed{" * 50_000) is None


# ---------------------------------------------------------------------------
# Math: equivalence
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("pred, ref, expected", [
    ("\\frac{1}{2}", "0.5", True),
    ("1,234", "1234", True),
    ("1,000", "1000", True),
    ("0.75", "3/4", True),
    ("\\dfrac{3}{4}", "0.75", True),
    ("\\tfrac34", "0.75", True),  # not a plain number: goes through math_verify
    ("-\\frac{3}{4}", "-0.75", True),
    ("50%", "50", True),  # percent convention: p% == p == p/100
    ("50\\%", "0.5", True),
    ("25%", "0.25%", False),
    ("12 km", "12", True),
    ("120 minutes", "120", True),
    ("5\\text{ km}", "5", True),
    ("6 km/h", "6", True),
    ("x = 4", "4", True),
    ("$12", "12", True),
    ("\\$12.00", "12", True),
    ("-3", "-3", True),
    ("\u22123", "-3", True),  # unicode minus
    ("-3", "3", False),
    ("4", "5", False),
    ("3x", "3", False),  # a single letter is not a unit
    ("3 pi", "3", False),
    ("2 and 3", "2", False),
    ("\\left(1, 2\\right)", "(1,2)", True),
    ("2\\sqrt{3}", "\\sqrt{12}", True),  # symbolic, via math_verify
    ("\\frac{\\pi}{2}", "\\pi/2", True),
    ("x^2+2x+1", "(x+1)^2", True),
    ("10^{3}", "1000", True),
    ("\\sqrt{2}", "1.5", False),
    ("Yes", "yes", True),
    ("", "5", False),
    ("1" * 1001, "1" * 1001, False),  # over the length cap: rejected before any parsing
])
def test_math_answers_equal(pred, ref, expected):
    assert math_answers_equal(pred, ref) is expected


def test_math_answers_equal_works_off_the_main_thread():
    # math_verify's timeouts use signal.alarm, which raises in non-main threads.
    results = []
    worker = threading.Thread(target=lambda: results.append(math_answers_equal("2\\sqrt{3}", "\\sqrt{12}")))
    worker.start()
    worker.join()
    assert results == [True]


# ---------------------------------------------------------------------------
# Math: reward and its anti-hacking checks
# ---------------------------------------------------------------------------

_PROMPT = ("Compute 17 + 25. For example, 1 + 1 gives \\boxed{2}. "
           "Put your final answer in \\boxed{}.")


@pytest.mark.parametrize("response, ref, prompt, reward, reason", [
    ("Half of one is \\boxed{\\frac{1}{2}}", "0.5", "", 1.0, "correct"),
    ("Final answer: $1,234$.", "1234", "", 1.0, "correct"),
    ("The answer is 50%", "50", "", 1.0, "correct"),
    ("The answer is 12 km.", "12", "", 1.0, "correct"),
    ("**Answer:** x = 4", "4", "", 1.0, "correct"),
    ("\\boxed{-7}", "-7", "", 1.0, "correct"),
    ("#### 72", "72", "", 1.0, "correct"),
    ("\\boxed{7}", "-7", "", 0.0, "wrong"),
    ("\\boxed{3}", "4", "", 0.0, "wrong"),
    # the same answer stated twice, in two spellings, is fine
    ("The answer is 0.5.\n\nSo: \\boxed{\\frac{1}{2}}", "1/2", "", 1.0, "correct"),
    ("\\boxed{5} and to confirm, \\boxed{5}", "5", "", 1.0, "correct"),
    # hack: hedging with several different final answers
    ("It is either \\boxed{3} or \\boxed{5}", "5", "", 0.0, "multiple_answers"),
    ("The answer is 3. Hmm, no. The answer is 5.", "5", "", 0.0, "multiple_answers"),
    # a box outranks marker phrases; only answers of the winning kind are compared
    ("The answer is 3.\n\\boxed{5}", "5", "", 1.0, "correct"),
    # reasoning chatter is not a final answer
    ("Let me verify the answer: 3 + 2 = 5.\nThe answer is 5.", "5", "", 1.0, "correct"),
    # hack: the right number only inside the reasoning, no committed answer
    ("17 + 25 = 42, so we get 42", "42", "", 0.0, "no_final_answer"),
    # hack: echoing the prompt (which contains a boxed example)
    (_PROMPT, "2", _PROMPT, 0.0, "echo"),
    (_PROMPT.replace(" ", "\n  ") + " ok", "2", _PROMPT, 0.0, "echo"),
    # restating a short question and then answering is not an echo
    ("What is 2+2? \\boxed{4}", "4", "What is 2+2?", 1.0, "correct"),
])
def test_score_math(response, ref, prompt, reward, reason):
    got_reward, info = score_math(response, ref, prompt)
    assert (got_reward, info["reason"]) == (reward, reason)


def test_score_math_too_long():
    assert score_math("x" * 9000 + "\\boxed{4}", "4") == (0.0, {"pred": None, "reason": "too_long"})
    assert score_math("\\boxed{4}" + " " * 100, "4", max_chars=50)[1]["reason"] == "too_long"
    assert score_math("\\boxed{4}" + " " * 100, "4", max_chars=500) == (1.0, {"pred": "4", "reason": "correct"})


def test_score_math_reports_prediction():
    assert score_math("so \\boxed{\\dfrac{1}{2}}.", "0.5") == (1.0, {"pred": "\\dfrac{1}{2}", "reason": "correct"})


# ---------------------------------------------------------------------------
# Code: extraction
# ---------------------------------------------------------------------------

def test_extract_code():
    two_blocks = "draft:\n```python\ndef f(): return 0\n```\nfixed:\n```python\ndef f(): return 1\n```\n"
    assert extract_code(two_blocks) == "def f(): return 1\n"
    assert extract_code("```\nx = 1\n```") == "x = 1\n"
    assert extract_code("```py\nx = 2\n```\n```bash\nls\n```") == "x = 2\n"  # other languages ignored
    assert extract_code("def f():\n    return 3\n") == "def f():\n    return 3\n"


# ---------------------------------------------------------------------------
# Code: sandbox helpers
# ---------------------------------------------------------------------------

_ADD_TESTS = ["assert add(1, 2) == 3", "assert add(-1, 1) == 0", "assert add(2, 2) == 4", "assert add(0, 0) == 0"]


@pytest.fixture(params=["namespace", "rlimit"])
def sandbox(request, monkeypatch):
    """Run the test once per sandbox mode; yields the mode name.

    "namespace" is skipped where it is unavailable; "rlimit" forces the fallback.
    """
    if request.param == "namespace":
        if not V._namespace_sandbox_available():
            pytest.skip("namespace sandbox unavailable on this machine (needs Linux, root and unshare)")
    else:
        monkeypatch.setattr(V, "_namespace_sandbox_available", lambda: False)
    return request.param


def _sandbox_uid(mode: str) -> int:
    """The uid candidate code runs as in this mode (65534 = nobody)."""
    if mode == "namespace":
        return 65534
    uid = V._rlimit_sandbox_uid() if os.geteuid() == 0 else None
    return os.geteuid() if uid is None else uid


def _skip_unless_separate_user(mode: str, what: str) -> None:
    """Skip when the sandbox runs as this very user: then nothing but namespaces stops `what`."""
    if _sandbox_uid(mode) == os.geteuid():
        pytest.skip(f"{mode} sandbox runs as this process's own user (uid {os.geteuid()}) here: {what}")


def _proc_stat(pid: str):
    """(state, pgrp, session) of a process from /proc, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    return fields[0], int(fields[2]), int(fields[3])


def _live_sandbox_processes(pgid: int, foreign_ns_before: set) -> set:
    """Live (non-zombie) processes still in the sandbox's session/group or in a new pid namespace."""
    own_ns = os.readlink("/proc/self/ns/pid")
    alive = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        stat = _proc_stat(pid)
        if stat is None or stat[0] in ("Z", "X"):
            continue
        try:
            in_new_ns = os.readlink(f"/proc/{pid}/ns/pid") != own_ns and pid not in foreign_ns_before
        except OSError:
            continue
        if stat[1] == pgid or stat[2] == pgid or in_new_ns:
            alive.add(pid)
    return alive


def _processes_in_foreign_pid_ns() -> set:
    own_ns = os.readlink("/proc/self/ns/pid")
    found = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.readlink(f"/proc/{pid}/ns/pid") != own_ns:
                found.add(pid)
        except OSError:
            pass
    return found


def _assert_nothing_left(pgid: int, foreign_ns_before: set) -> None:
    """Poll (teardown is asynchronous) until no sandbox process is alive; fail after a while."""
    for _ in range(100):
        leftovers = _live_sandbox_processes(pgid, foreign_ns_before)
        if not leftovers:
            return
        time.sleep(0.05)
    pytest.fail(f"sandbox processes survived: {sorted(leftovers)}")


# ---------------------------------------------------------------------------
# Code: functional behaviour
# ---------------------------------------------------------------------------

def test_correct_solution(sandbox):
    reward, info = run_code_tests("def add(a, b):\n    return a + b\n", _ADD_TESTS, all_or_nothing=True)
    assert reward == 1.0
    assert (info["passed"], info["total"], info["status"], info["sandbox"]) == (4, 4, "ok", sandbox)


def test_partially_correct_solution():
    code = "def add(a, b):\n    return a + b if a >= 0 else 99\n"
    reward, info = run_code_tests(code, _ADD_TESTS)
    assert (reward, info["passed"], info["status"]) == (0.75, 3, "ok")
    assert any("AssertionError" in e for e in info["errors"])
    reward, info = run_code_tests(code, _ADD_TESTS, all_or_nothing=True)
    assert (reward, info["passed"]) == (0.0, 3)


def test_entry_point_alias():
    reward, info = run_code_tests("def add(a, b):\n    return a + b\n", ["assert candidate(2, 3) == 5"],
                                  entry_point="add")
    assert (reward, info["status"]) == (1.0, "ok")
    reward, info = run_code_tests("def plus(a, b):\n    return a + b\n", ["assert candidate(2, 3) == 5"],
                                  entry_point="add")
    assert (reward, info["status"]) == (0.0, "crash")


def test_syntax_error():
    reward, info = run_code_tests("def add(a, b)\n    return a + b\n", _ADD_TESTS)
    assert (reward, info["status"], info["passed"]) == (0.0, "syntax_error", 0)


def test_no_tests():
    assert run_code_tests("x = 1", []) == (0.0, {"passed": 0, "total": 0, "status": "no_tests", "stderr_tail": "",
                                                "stdout_tail": "", "errors": [], "sandbox": None, "pgid": None})


def test_runtime_error_fails_only_that_test():
    code = "def add(a, b):\n    if a == 2:\n        raise ValueError('boom')\n    return a + b\n"
    reward, info = run_code_tests(code, _ADD_TESTS)
    assert (reward, info["status"]) == (0.75, "ok")
    assert any("ValueError: boom" in e for e in info["errors"])


# ---------------------------------------------------------------------------
# Code: hostile candidates
# ---------------------------------------------------------------------------

def test_infinite_loop_times_out(sandbox):
    foreign_before = _processes_in_foreign_pid_ns()
    reward, info = run_code_tests("while True:\n    pass\n", ["assert True"], timeout_s=1)
    assert (reward, info["status"]) == (0.0, "timeout")
    _assert_nothing_left(info["pgid"], foreign_before)


def test_loop_inside_one_test_keeps_earlier_results():
    code = "def add(a, b):\n    while a == 2:\n        pass\n    return a + b\n"
    reward, info = run_code_tests(code, _ADD_TESTS, timeout_s=1)
    assert info["status"] == "timeout"
    assert (reward, info["passed"]) == (0.5, 2)  # tests 0, 1 reported; 2 hung; 3 never ran


def test_fork_bomb_is_contained(sandbox):
    if _sandbox_uid(sandbox) == 0:
        pytest.skip("rlimit sandbox runs as root here: RLIMIT_NPROC is not enforced for root, so a fork "
                    "bomb would only be stopped by the timeout kill; not run on the test machine")
    foreign_before = _processes_in_foreign_pid_ns()
    code = ("import os\n"
            "while True:\n"
            "    try:\n"
            "        os.fork()\n"
            "    except OSError:\n"
            "        pass\n")
    reward, info = run_code_tests(code, ["assert True"], timeout_s=1)
    assert reward == 0.0
    assert info["status"] in ("timeout", "crash")
    _assert_nothing_left(info["pgid"], foreign_before)


def test_setsid_escapee_is_killed_in_namespace_mode(sandbox):
    if sandbox != "namespace":
        pytest.skip("rlimit mode: a child that calls setsid() leaves the process group and survives "
                    "the group kill (documented limitation)")
    foreign_before = _processes_in_foreign_pid_ns()
    code = ("import os, time\n"
            "if os.fork() == 0:\n"
            "    os.setsid()\n"
            "    time.sleep(60)\n"
            "def f():\n"
            "    return 1\n")
    reward, info = run_code_tests(code, ["assert f() == 1"])
    assert (reward, info["status"]) == (1.0, "ok")
    _assert_nothing_left(info["pgid"], foreign_before)


def test_huge_allocation(sandbox):
    reward, info = run_code_tests("x = bytearray(10**10)\ndef f():\n    return 1\n", ["assert f() == 1"],
                                  memory_mb=256)
    assert (reward, info["status"]) == (0.0, "crash")
    assert any("MemoryError" in e for e in info["errors"])


def test_huge_output_is_capped(sandbox):
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    code = ("import sys\n"
            "chunk = 'x' * (1 << 20)\n"
            "for _ in range(100):\n"  # try to print 100 MB
            "    try:\n"
            "        sys.stdout.write(chunk)\n"
            "        sys.stdout.flush()\n"
            "    except OSError:\n"
            "        break\n"
            "def f():\n"
            "    return 1\n")
    reward, info = run_code_tests(code, ["assert f() == 1"], max_output_bytes=5000)
    assert (reward, info["status"]) == (1.0, "ok")  # the flood did not drown the result channel
    assert 0 < len(info["stdout_tail"]) <= 5000
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before < 50 * 1024  # KiB


def test_sys_exit_before_tests():
    for code in ("import sys\nsys.exit(0)\n", "import os\nos._exit(0)\n"):
        reward, info = run_code_tests(code + "def add(a, b):\n    return a + b\n", _ADD_TESTS)
        assert (reward, info["status"], info["passed"]) == (0.0, "crash", 0), code


def test_exit_inside_function_fails_the_test():
    code = "import os\ndef add(a, b):\n    os._exit(0)\n"
    reward, info = run_code_tests(code, _ADD_TESTS)
    assert (reward, info["status"]) == (0.0, "crash")


def test_fake_result_lines_are_not_trusted():
    code = ("import json, os\n"
            "print(json.dumps({'passed': 4, 'total': 4, 'errors': []}))\n"
            "for fd in range(3, 64):\n"  # spray fake records on every descriptor we might own
            "    for line in (b'0' * 32 + b' test 0 1 \\n', b'{\"passed\": 4, \"total\": 4}\\n'):\n"
            "        try:\n"
            "            os.write(fd, line)\n"
            "        except OSError:\n"
            "            pass\n"
            "def add(a, b):\n"
            "    return 0\n")
    reward, info = run_code_tests(code, _ADD_TESTS)
    assert (reward, info["passed"], info["status"]) == (0.5, 2, "ok")  # only the two "== 0" tests really pass


def test_monkeypatching_the_harness_does_not_fake_passes():
    code = ("import builtins, json, os\n"
            "builtins.exec = lambda *args, **kwargs: None\n"
            "builtins.compile = lambda *args, **kwargs: None\n"
            "json.dumps = lambda *args, **kwargs: '1'\n"
            "def add(a, b):\n"
            "    return 0\n")
    reward, info = run_code_tests(code, _ADD_TESTS)
    assert (reward, info["passed"]) == (0.5, 2)


def test_environment_secrets_are_not_visible(sandbox, monkeypatch):
    monkeypatch.setenv("SECRET_TOKEN", "hunter2")
    code = "import os\ndef env():\n    return dict(os.environ)\n"
    reward, info = run_code_tests(code, ["assert 'SECRET_TOKEN' not in env()",
                                         "assert 'hunter2' not in str(env())"])
    assert (reward, info["status"]) == (1.0, "ok")


def test_trainer_environ_is_not_readable(sandbox, monkeypatch):
    _skip_unless_separate_user(sandbox, "/proc/<trainer>/environ is readable")
    monkeypatch.setenv("SECRET_TOKEN", "hunter2")  # os.environ writes through to /proc/self/environ
    code = ("def leak(pid):\n"
            "    try:\n"
            "        with open('/proc/%d/environ' % pid, 'rb') as f:\n"
            "            return f.read()\n"
            "    except OSError:\n"
            "        return b''\n")
    reward, info = run_code_tests(code, [f"assert b'hunter2' not in leak({os.getpid()})"])
    assert (reward, info["status"]) == (1.0, "ok")


def test_killing_the_parent_does_not_reach_the_trainer(sandbox):
    code = ("import os, signal\n"
            "os.kill(os.getppid(), signal.SIGKILL)\n"
            "def f():\n"
            "    return 1\n")
    reward, info = run_code_tests(code, ["assert f() == 1"])
    # getppid() is the harness's reaper, never this process (which is still running this
    # test). In namespace mode the reaper is pid 1 of the sandbox and ignores the signal;
    # in rlimit mode it dies, the run is torn down and counts as a crash.
    if sandbox == "namespace":
        assert (reward, info["status"]) == (1.0, "ok")
    else:
        assert info["status"] in ("ok", "crash")


def test_killing_the_trainer_by_pid(sandbox):
    _skip_unless_separate_user(sandbox, "it could kill this process by pid; not run")
    code = ("import os, signal\n"
            "def attack(pid):\n"
            "    try:\n"
            "        os.kill(pid, signal.SIGKILL)\n"
            "        return 'sent'\n"
            "    except OSError as exc:\n"
            "        return type(exc).__name__\n")
    reward, info = run_code_tests(code, [f"assert attack({os.getpid()}) != 'sent'"])
    assert (reward, info["status"]) == (1.0, "ok")  # the signal could not be delivered, and we survived


def test_writes_outside_the_sandbox(sandbox):
    tmp_target = f"/tmp/sandbox_escape_{uuid.uuid4().hex}.txt"
    repo_target = os.path.join(os.path.dirname(os.path.abspath(__file__)), f"_escape_{uuid.uuid4().hex}.txt")
    code = ("def try_write(path):\n"
            "    try:\n"
            "        with open(path, 'w') as f:\n"
            "            f.write('escaped')\n"
            "        return True\n"
            "    except OSError:\n"
            "        return False\n")
    tests = ["assert try_write('inside.txt')",  # its own working dir is writable
             f"assert not try_write({repo_target!r})",
             "assert not try_write('../escape.txt')",
             f"try_write({tmp_target!r})"]  # attempted, checked from outside below
    try:
        reward, info = run_code_tests(code, tests)
        assert info["status"] == "ok"
        _skip_unless_separate_user(sandbox, "nothing stops writes outside its directory")
        assert (reward, info["passed"]) == (1.0, 4)
        assert not os.path.exists(repo_target)
        if sandbox == "rlimit":
            pytest.skip("rlimit mode: world-writable /tmp stays writable without a mount namespace")
        assert not os.path.exists(tmp_target)  # it wrote into its private tmpfs, not the host's /tmp
    finally:
        for path in (tmp_target, repo_target):
            if os.path.exists(path):
                os.remove(path)


def test_network_is_blocked(sandbox):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.settimeout(0.2)
    port = listener.getsockname()[1]
    code = ("import socket, sys\n"
            "def connect(sock_module):\n"
            "    try:\n"
            f"        sock_module.create_connection(('127.0.0.1', {port}), timeout=1)\n"
            "        return True\n"
            "    except OSError:\n"
            "        return False\n"
            "def bypass_harness():\n"  # re-importing the C module restores the real socket type
            "    del sys.modules['socket'], sys.modules['_socket']\n"
            "    import socket as fresh\n"
            "    return fresh\n")
    try:
        reward, info = run_code_tests(code, ["assert not connect(socket)",
                                             "assert not connect(bypass_harness())"])
        assert info["status"] == "ok"
        if sandbox == "rlimit":
            assert info["passed"] >= 1  # the naive attempt is refused by the harness
            pytest.skip("rlimit mode only patches the socket module, which is bypassable")
        assert reward == 1.0
        with pytest.raises(socket.timeout):
            listener.accept()
    finally:
        listener.close()


def test_sandbox_runs_unprivileged_in_namespace_mode(sandbox):
    if sandbox != "namespace":
        pytest.skip("namespace mode only")
    code = ("import os\n"
            "def facts():\n"
            "    return os.getuid(), os.getpid() > 1, os.getppid(), os.listdir('/root'), os.getcwd()\n")
    reward, info = run_code_tests(code, ["uid, _, ppid, root, cwd = facts()\n"
                                         "assert uid == 65534 and ppid == 1 and cwd == '/tmp'\n"
                                         "assert root in ([], ['.pyenv'])"])
    assert (reward, info["status"]) == (1.0, "ok"), info
