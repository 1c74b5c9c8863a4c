"""The code sandbox (sandbox.py, sandbox_harness.py; PITFALLS #15: a real sandbox, not eval()): real
programs score right, and a red-team suite of hostile programs neither scores nor gets out.

Every hostile case checks the same four things: the reward is 0 (or the honest score of the
program's real answers), this process survives, nothing is left behind (no process in another pid
namespace, no SysV IPC object, no file in the host's /tmp or /dev/shm, no cgroup), and the canaries
(a secret in this process's environment, a file on the host) are never read. The fork bomb and the
memory cases run in a child process inside an outer cgroup (pids, memory), so a sandbox bug there
cannot take the CI machine down.
"""
import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
import sandbox  # noqa: E402
import sandbox_harness as H  # noqa: E402
from code_problems import EQUIVALENT, PROBLEMS, mutants  # noqa: E402
from sandbox import extract_code, run_code_tests  # noqa: E402

ADD_TESTS = ["assert add(1, 2) == 3", "assert add(-1, 1) == 0", "assert add(2, 2) == 4", "assert add(0, 0) == 0"]
WRONG_ADD = "def add(a, b):\n    return 0\n"  # honest score on ADD_TESTS: 0.5


# ----------------------------------------------------------------------------------------------
# Host state: what must never change, and the canaries


def _foreign_pid_ns_processes() -> set:
    own = os.readlink("/proc/self/ns/pid")
    out = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.readlink(f"/proc/{pid}/ns/pid") != own and open(f"/proc/{pid}/stat").read().split(") ")[1][0] != "Z":
                out.add(pid)
        except OSError:
            pass
    return out


def _ipc_objects() -> set:
    out = set()
    for kind in ("shm", "msg", "sem"):
        try:
            lines = Path(f"/proc/sysvipc/{kind}").read_text().splitlines()[1:]
        except OSError:
            continue
        out |= {(kind, line.split()[1]) for line in lines if line.strip()}
    return out


def _host_files() -> set:
    return {(d, n) for d in ("/tmp", "/dev/shm") if os.path.isdir(d) for n in os.listdir(d)}


def _cgroups() -> set:
    parents = sandbox.Cgroup.parents() or {}
    return {str(p / n) for p in parents.values() for n in os.listdir(p) if n.startswith("posttrain-sandbox-")}


def snapshot() -> dict:
    return {"procs": _foreign_pid_ns_processes(), "ipc": _ipc_objects(), "files": _host_files(), "cgroups": _cgroups()}


def assert_nothing_left(before: dict) -> None:
    """Poll (teardown is asynchronous for at most a few ms) until the host is as it was."""
    for _ in range(100):
        now = snapshot()
        new = {k: now[k] - before[k] for k in now}
        if not any(new.values()):
            return
        time.sleep(0.05)
    pytest.fail(f"left behind by the sandbox: { {k: sorted(v)[:5] for k, v in new.items() if v} }")


@pytest.fixture
def canaries(monkeypatch):
    """A secret in this process's environment (and so in /proc/<pid>/environ) and two files on the
    host holding it (in /tmp and in the project), world-readable."""
    secret = "canary-" + uuid.uuid4().hex
    monkeypatch.setenv("POSTTRAIN_CANARY", secret)
    files = [Path("/tmp") / f"posttrain-canary-{uuid.uuid4().hex}", ROOT / f".canary-{uuid.uuid4().hex}"]
    for f in files:
        f.write_text(secret)
        f.chmod(0o644)
    before = snapshot()
    yield {"secret": secret, "files": files, "before": before}
    for f in files:
        f.unlink(missing_ok=True)


def check_contained(info: dict, canaries: dict) -> None:
    seen = " ".join([info["stdout_tail"], info["stderr_tail"]] + info["errors"])
    assert canaries["secret"] not in seen, "a canary was read"
    for f in canaries["files"]:
        assert f.read_text() == canaries["secret"], f"{f} was changed or removed"
    assert_nothing_left(canaries["before"])


# ----------------------------------------------------------------------------------------------
# Extraction, codec, functional behaviour


def test_extract_code():
    two_blocks = "draft:\n```python\ndef f(): return 0\n```\nfixed:\n```python\ndef f(): return 1\n```"
    assert extract_code(two_blocks) == "def f(): return 1\n"
    assert extract_code("```\nx = 1\n```") == "x = 1\n"
    assert extract_code("```py\nx = 2\n```\n```bash\nls\n```") == "x = 2\n"  # other languages ignored
    assert extract_code("def f():\n    return 3\n") == "def f():\n    return 3\n"


def test_codec_round_trips_plain_data_and_refuses_everything_else():
    from collections import Counter, OrderedDict, namedtuple
    value = [None, True, 3, -2 ** 70, 1.5, -0.0, float("inf"), 2j + 1, "s", b"\x00b", bytearray(b"x"), (1, (2,)),
             {1: "a", (2, 3): [4]}, {1, 2}, frozenset({3}), [[[]]]]
    back = H.decode(json.loads(json.dumps(H.encode(value))))
    assert back == value and [type(x) for x in back] == [type(x) for x in value]
    P = namedtuple("P", "x y")
    assert H.decode(H.encode([Counter("aab"), OrderedDict(a=1), P(1, 2)])) == [{"a": 2, "b": 1}, {"a": 1}, (1, 2)]
    assert type(H.decode(H.encode(P(1, 2)))) is tuple

    class Liar(int):
        def __eq__(self, other):
            return True
    assert type(H.decode(H.encode(Liar(5)))) is int and H.decode(H.encode(Liar(5))) != 6
    for bad in (object(), lambda: 1, iter([1]), (x for x in "a"), [1, {2: object()}]):
        with pytest.raises(H.NotPlainData):
            H.encode(bad)
    for bad in ({"pickle": "x"}, {"tuple": 1}, {"a": 1, "b": 2}, {}, {"bytes": "!!"}, {"complex": ["1", 2]}):
        with pytest.raises(ValueError):
            H.decode(bad)
    deep = []
    for _ in range(H.MAX_DEPTH + 5):
        deep = [deep]
    with pytest.raises(H.NotPlainData):
        H.encode(deep)


def test_correct_partial_and_entry_point():
    reward, info = run_code_tests("def add(a, b):\n    return a + b\n", ADD_TESTS, all_or_nothing=True)
    assert (reward, info["passed"], info["total"], info["status"], info["sandbox"]) == (1.0, 4, 4, "ok", "bwrap")
    reward, info = run_code_tests("def add(a, b):\n    return a + b if a >= 0 else 99\n", ADD_TESTS)
    assert (reward, info["passed"], info["status"]) == (0.75, 3, "ok")
    assert any("AssertionError" in e for e in info["errors"])
    assert run_code_tests("def add(a, b):\n    return a + b\n", ["assert candidate(2, 3) == 5"], "add")[0] == 1.0
    reward, info = run_code_tests("def plus(a, b):\n    return a + b\n", ["assert candidate(2, 3) == 5"], "add")
    assert (reward, info["status"]) == (0.0, "crash")


def test_syntax_error_load_error_no_tests():
    assert run_code_tests("def add(a, b)\n    return a\n", ADD_TESTS)[1]["status"] == "syntax_error"
    reward, info = run_code_tests("raise RuntimeError('at import')\n", ADD_TESTS)
    assert (reward, info["status"]) == (0.0, "crash") and "at import" in info["errors"][0]
    assert run_code_tests("x = 1", []) == (0.0, {"passed": 0, "total": 0, "status": "no_tests", "stderr_tail": "",
                                                "stdout_tail": "", "errors": [], "sandbox": None, "limits": None,
                                                "oom": False, "pgid": None})


def test_exceptions_mutation_and_keywords_cross_the_judge():
    code = ("def f(xs, key=None):\n"
            "    xs.append(key)\n"
            "    if key == 'boom':\n"
            "        raise KeyError('boom')\n"
            "    return len(xs)\n")
    tests = ["a = []\nassert f(a, key=1) == 1 and a == [1]",
             "a = [0]\ntry:\n    f(a, key='boom')\nexcept KeyError:\n    pass\nelse:\n    assert False\nassert a == [0, 'boom']",
             "assert f([], 2) == 1"]
    assert run_code_tests(code, tests)[0] == 1.0


def test_real_problems_score_one_and_their_mutants_less():
    """50 HumanEval/MBPP-style problems (tests/code_problems.py), graded in a pool of 2."""
    assert len(PROBLEMS) >= 50
    jobs = [{"code": p["solution"], "tests": p["tests"], "entry_point": p["entry_point"]} for p in PROBLEMS]
    results = sandbox.run_code_tests_batch(jobs, workers=2)
    assert [p["entry_point"] for p, (r, _) in zip(PROBLEMS, results) if r != 1.0] == []
    labelled = [(p["entry_point"], label, {"code": m, "tests": p["tests"], "entry_point": p["entry_point"]})
                for p in PROBLEMS for label, m in mutants(p["solution"])]
    assert {e for e, _, _ in labelled} == {p["entry_point"] for p in PROBLEMS}  # every problem is mutated
    results = sandbox.run_code_tests_batch([j for _, _, j in labelled], workers=2)
    survivors = {(e, label) for (e, label, _), (r, _) in zip(labelled, results) if r == 1.0}
    assert survivors == EQUIVALENT, survivors ^ EQUIVALENT


def test_concurrent_sandboxes_do_not_interfere():
    """Programs graded at once in a pool each get their own score (no shared state, no mixed-up
    pipes), including a failing one between honest ones."""
    jobs = [{"code": "def add(a, b):\n    return a + b\n" if i % 3 else WRONG_ADD, "tests": ADD_TESTS} for i in range(12)]
    results = sandbox.run_code_tests_batch(jobs, workers=4)
    assert [r for r, _ in results] == [0.5 if i % 3 == 0 else 1.0 for i in range(12)]


# ----------------------------------------------------------------------------------------------
# Red team: the findings of issue 10, one test each (each fails on the sandbox before it)


def test_1_the_result_channel_cannot_be_read_or_rewritten(canaries):
    code = ("import os, re\n"
            "def forge():\n"
            "    for fd in range(0, 256):\n"
            "        try:\n"
            "            seen = os.pread(fd, 1 << 16, 0).decode('utf-8', 'replace')\n"
            "        except OSError:\n"
            "            seen = ''\n"
            "        nonces = set(re.findall(r'\\b[0-9a-f]{32}\\b', seen))\n"
            "        try:\n"
            "            if nonces:\n"
            "                os.ftruncate(fd, 0)\n"
            "            lines = [n + ' test %d 1 ' % i for n in nonces for i in range(8)] + [n + ' done -1 1 ' for n in nonces]\n"
            "            lines += ['{\"test\": %d, \"passed\": true, \"error\": \"\"}' % i for i in range(8)] + ['{\"done\": true}']\n"
            "            os.pwrite(fd, ('\\n'.join(lines) + '\\n').encode(), 0) if nonces else os.write(fd, ('\\n'.join(lines) + '\\n').encode())\n"
            "        except OSError:\n"
            "            pass\n"
            "forge()\n"
            "def add(a, b):\n"
            "    forge()\n"
            "    return 0\n")
    reward, info = run_code_tests(code, ADD_TESTS)
    # never more than the honest score of `return 0` (0.5); here 0: its garbage on its own answer
    # pipe breaks the protocol, and a candidate that breaks the protocol has failed
    assert reward <= 0.5 and info["passed"] <= 2
    check_contained(info, canaries)


def test_2_the_judges_stack_frame_cannot_be_reached(canaries):
    code = ("import os, sys\n"
            "def frames():\n"
            "    f = sys._getframe(1)\n"
            "    while f is not None:\n"
            "        yield f\n"
            "        f = f.f_back\n"
            "def add(a, b):\n"
            "    for f in frames():\n"
            "        for scope in (f.f_locals, f.f_globals):\n"
            "            for name in ('report', 'emit'):\n"
            "                fn = scope.get(name)\n"
            "                if callable(fn):\n"
            "                    for i in range(8):\n"
            "                        try:\n"
            "                            fn('test', i, True) if name == 'report' else fn({'test': i, 'passed': True})\n"
            "                        except Exception:\n"
            "                            pass\n"
            "    for f in frames():\n"
            "        if callable(f.f_locals.get('report')):\n"
            "            f.f_locals['report']('done')\n"
            "            os._exit(0)\n"  # before the real verdict of this test is written
            "    return 0\n")
    reward, info = run_code_tests(code, ADD_TESTS)
    assert reward <= 0.5 and info["passed"] <= 2
    check_contained(info, canaries)


def test_3_shadowed_builtins_do_not_reach_the_tests(canaries):
    code = ("import builtins\n"
            "abs = lambda x: 0\n"
            "builtins.abs = lambda x: 0\n"
            "builtins.AssertionError = type('Quiet', (Exception,), {})\n"
            "def area(r):\n"
            "    return 3.0 * r * r\n")
    tests = ["assert abs(area(1.0) - 3.141592653589793) < 1e-6", "assert round(area(2.0), 3) == 12.566"]
    reward, info = run_code_tests(code, tests)
    assert (reward, info["passed"]) == (0.0, 0)
    check_contained(info, canaries)


def test_4_objects_equal_to_everything_do_not_cross(canaries):
    code = ("class Any:\n"
            "    __eq__ = lambda self, other: True\n"
            "    __ne__ = lambda self, other: False\n"
            "    __hash__ = lambda self: 0\n"
            "class Str(str):\n"
            "    __eq__ = lambda self, other: True\n"
            "    __hash__ = str.__hash__\n"
            "def add(a, b):\n"
            "    return Any()\n"
            "def name(x):\n"
            "    return Str('wrong')\n"
            "def pair(x):\n"
            "    return [Any(), Any()]\n")
    tests = ["assert add(1, 2) == 3", "assert name(1) == 'right'", "assert pair(1) == [1, 2]"]
    reward, info = run_code_tests(code, tests)
    assert (reward, info["passed"]) == (0.0, 0)
    assert any("not plain data" in e for e in info["errors"])
    check_contained(info, canaries)


def test_5_the_answer_key_on_disk_is_not_visible(canaries):
    task = json.loads((ROOT / "data" / "code_test.jsonl").read_text().splitlines()[0])
    key = str(ROOT / "data" / "code_test.jsonl")
    code = ("import json, os\n"
            "def find_key():\n"
            f"    paths = [{key!r}]\n"
            "    for top in ('/', '/work', '/home', '/root', '/tmp'):\n"
            "        for d, _, files in os.walk(top):\n"
            "            paths += [os.path.join(d, f) for f in files if f.endswith('_test.jsonl')]\n"
            "    for p in paths:\n"
            "        try:\n"
            "            rows = [json.loads(l) for l in open(p)]\n"
            "        except OSError:\n"
            "            continue\n"
            f"        for r in rows:\n"
            f"            if r.get('entry_point') == {task['entry_point']!r}:\n"
            "                return r['solution']\n"
            "    return None\n"
            "_sol = find_key()\n"
            "if _sol:\n"
            "    exec(_sol)\n"
            "else:\n"
            f"    def {task['entry_point']}(*args):\n"
            "        return None\n")
    reward, info = run_code_tests(code, task["tests"], task["entry_point"])
    assert reward == 0.0
    check_contained(info, canaries)


def test_6_host_unix_sockets_are_unreachable(canaries):
    paths = [str(ROOT / f".sock-{uuid.uuid4().hex[:8]}"), f"/dev/shm/posttrain-sock-{uuid.uuid4().hex[:8]}"]
    abstract = f"\0posttrain-{uuid.uuid4().hex}"
    servers = []
    for addr in paths + [abstract]:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(addr)
        s.listen(1)
        s.settimeout(0.2)
        servers.append(s)
    for path in paths:
        os.chmod(path, 0o777)
    code = ("import sys\n"
            "def reach(addr):\n"
            "    sys.modules.pop('socket', None)\n"
            "    sys.modules.pop('_socket', None)\n"
            "    import socket\n"
            "    try:\n"
            "        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)\n"
            "        s.connect(addr)\n"
            "        return True\n"
            "    except OSError:\n"
            "        return False\n")
    try:
        reward, info = run_code_tests(code, [f"assert not reach({a!r})" for a in paths + [abstract]])
        assert (reward, info["status"]) == (1.0, "ok"), info
        for s in servers:
            with pytest.raises(socket.timeout):
                s.accept()
    finally:
        for s in servers:
            s.close()
        for path in paths:
            os.unlink(path)
    check_contained(info, canaries)


def test_7_sysv_ipc_objects_do_not_outlive_the_run(canaries):
    code = ("import ctypes\n"
            "libc = ctypes.CDLL(None, use_errno=True)\n"
            "def make():\n"
            "    IPC_PRIVATE, IPC_CREAT = 0, 0o1000\n"
            "    ids = [libc.shmget(IPC_PRIVATE, 1 << 20, IPC_CREAT | 0o666) for _ in range(4)]\n"
            "    ids += [libc.msgget(IPC_PRIVATE, IPC_CREAT | 0o666), libc.semget(IPC_PRIVATE, 1, IPC_CREAT | 0o666)]\n"
            "    return ids\n")
    reward, info = run_code_tests(code, ["assert all(i >= 0 for i in make())"])  # creating them works...
    assert (reward, info["status"]) == (1.0, "ok"), info
    check_contained(info, canaries)  # ...and none is left on the host afterwards


def _contained(args: dict, timeout: float = 120) -> dict:
    """run_code_tests(**args) in a child process inside an outer cgroup (pids <= 256, memory <= 3
    GiB), or under RLIMIT_NPROC where we are not root: a sandbox bug cannot exhaust the machine."""
    prog = ("import json, sys; sys.path.insert(0, %r); import sandbox\n"
            "r, info = sandbox.run_code_tests(**json.loads(sys.argv[1]))\n"
            "print(json.dumps([r, info]))\n" % str(ROOT))
    argv = [sys.executable, "-c", prog, json.dumps(args)]
    guard = sandbox.Cgroup(3072, 256) if sandbox.Cgroup.available() else None
    try:
        if guard is None:
            argv = [sys.executable, "-c", "import os, resource, sys; resource.setrlimit(resource.RLIMIT_NPROC, (256, 256)); "
                    "os.execv(sys.argv[1], sys.argv[1:])"] + argv
        out = subprocess.run((guard.join_argv() if guard else []) + argv, capture_output=True, text=True,
                             timeout=timeout)
        assert out.returncode == 0, out.stderr[-2000:]
        reward, info = json.loads(out.stdout.strip().splitlines()[-1])
        info["reward"] = reward
        return info
    finally:
        if guard:
            guard.destroy()


def test_8_memory_is_capped_for_the_sandbox_as_a_whole(canaries):
    """Six processes of 100 MB each against memory_mb=256: per-process RLIMIT_AS let them all live
    (600 MB); the sandbox's cgroup must not. Where no cgroup can be made, the bound is the stated
    memory_mb x MAX_PROCS and this test is skipped."""
    if not sandbox.Cgroup.available():
        pytest.skip("no cgroup can be created here: memory is bounded per process (memory_mb x MAX_PROCS)")
    code = ("import os, time\n"
            "def held_mb():\n"
            "    r, w = os.pipe()\n"
            "    kids = []\n"
            "    for _ in range(6):\n"
            "        pid = os.fork()\n"
            "        if pid == 0:\n"
            "            block = bytearray(100 << 20)\n"
            "            for i in range(0, len(block), 4096):\n"
            "                block[i] = 1\n"
            "            os.write(w, b'1')\n"
            "            time.sleep(30)\n"
            "            os._exit(0)\n"
            "        kids.append(pid)\n"
            "    os.close(w)\n"
            "    got, end = b'', time.time() + 3\n"
            "    while time.time() < end and len(got) < 6:\n"
            "        import select\n"
            "        if select.select([r], [], [], 0.2)[0]:\n"
            "            chunk = os.read(r, 16)\n"
            "            if not chunk:\n"
            "                break\n"
            "            got += chunk\n"
            "    time.sleep(0.5)\n"  # a child that reported may have been OOM-killed since
            "    alive = sum(os.waitpid(k, os.WNOHANG) == (0, 0) for k in kids)\n"
            "    return 100 * min(len(got), alive)\n")
    info = _contained({"code": code, "tests": ["assert held_mb() <= 256"], "memory_mb": 256, "timeout_s": 10})
    assert (info["reward"], info["status"]) == (1.0, "ok"), info
    check_contained(info, canaries)


def test_9_concurrent_sandboxes_cannot_starve_each_other(canaries):
    """An honest program that forks (to compute in a child) keeps working while a sibling sandbox
    started after it holds every process it can get."""
    honest = ("import os, time\n"
              "time.sleep(1.5)\n"  # the hog starts meanwhile
              "def add(a, b):\n"
              "    r, w = os.pipe()\n"
              "    pid = os.fork()\n"
              "    if pid == 0:\n"
              "        os.write(w, str(a + b).encode())\n"
              "        os._exit(0)\n"
              "    os.waitpid(pid, 0)\n"
              "    return int(os.read(r, 64))\n")
    hog = ("import os, time\n"
           "n = 0\n"
           "while n < 10000:\n"
           "    try:\n"
           "        if os.fork() == 0:\n"
           "            time.sleep(6)\n"
           "            os._exit(0)\n"
           "        n += 1\n"
           "    except OSError:\n"
           "        break\n"
           "def held():\n"
           "    time.sleep(4)\n"
           "    return n\n")
    box = {}
    t = threading.Thread(target=lambda: box.update(honest=run_code_tests(honest, ADD_TESTS, timeout_s=10)))
    t.start()
    time.sleep(0.5)
    box["hog"] = run_code_tests(hog, ["assert held() > 0"], timeout_s=10)
    t.join()
    assert box["honest"][0] == 1.0, box["honest"][1]["errors"]
    assert box["hog"][0] == 1.0  # the hog ran too: its processes were capped, not the others'
    check_contained(box["honest"][1], canaries)
    check_contained(box["hog"][1], canaries)


def test_10_no_user_namespace_can_be_created_inside(canaries):
    code = ("import ctypes, os\n"
            "libc = ctypes.CDLL(None, use_errno=True)\n"
            "def new_userns():\n"
            "    pid = os.fork()\n"
            "    if pid == 0:\n"
            "        os._exit(0 if libc.unshare(0x10000000) == 0 else 1)\n"  # CLONE_NEWUSER
            "    return os.waitpid(pid, 0)[1] == 0\n")
    reward, info = run_code_tests(code, ["assert new_userns() is False"])
    assert (reward, info["status"]) == (1.0, "ok"), info
    check_contained(info, canaries)


def test_11_no_silent_weaker_fallback(monkeypatch, capsys):
    """Where bwrap cannot run, grading raises with how to enable it; the weaker mode exists only when
    asked for (--unsafe_code_exec), and says so."""
    sandbox._probe.cache_clear()
    monkeypatch.setattr(sandbox, "_chosen", [])
    monkeypatch.setattr(sandbox, "bwrap_path", lambda: "/nonexistent/bwrap")
    try:
        with pytest.raises(sandbox.SandboxUnavailable, match="user.max_user_namespaces"):
            run_code_tests(WRONG_ADD, ADD_TESTS)
        with pytest.raises(sandbox.SandboxUnavailable):
            sandbox.check_sandbox()
        reward, info = run_code_tests("def add(a, b):\n    return a + b\n", ADD_TESTS, unsafe=True)
        assert (reward, info["sandbox"]) == (1.0, "unsafe")
        assert "WITHOUT bubblewrap" in capsys.readouterr().err
    finally:
        sandbox._probe.cache_clear()


# ----------------------------------------------------------------------------------------------
# Red team: the classic hostile programs

CLASSIC = {
    "infinite_loop": ("while True:\n    pass\n", 0.0, "timeout"),
    "sleep": ("import time\ntime.sleep(60)\n", 0.0, "timeout"),
    "loop_in_one_test": ("def add(a, b):\n    while a == 2:\n        pass\n    return a + b\n", 0.5, "timeout"),
    "exit_0_before_tests": ("import os\nos._exit(0)\n" + WRONG_ADD, 0.0, "crash"),
    "sys_exit_before_tests": ("import sys\nsys.exit(0)\n" + WRONG_ADD, 0.0, "crash"),
    "exit_inside_the_function": ("import os\ndef add(a, b):\n    os._exit(0)\n", 0.0, "crash"),
    "orphans_left_running": ("import os, time\nfor _ in range(3):\n    if os.fork() == 0:\n        os.setsid()\n"
                             "        if os.fork() == 0:\n            time.sleep(120)\n        os._exit(0)\n" + WRONG_ADD,
                             0.5, "ok"),
    "kill_the_parent": ("import os, signal\ntry:\n    os.kill(os.getppid(), signal.SIGKILL)\nexcept OSError:\n"
                        "    pass\n" + WRONG_ADD, None, None),
    "kill_the_group": ("import os, signal\nos.killpg(0, signal.SIGKILL)\n" + WRONG_ADD, 0.0, "crash"),
    "kill_pid_1": ("import os, signal\ntry:\n    os.kill(1, signal.SIGKILL)\nexcept OSError:\n    pass\n" + WRONG_ADD,
                   None, None),
    "kill_minus_1": ("import os, signal\ntry:\n    os.kill(-1, signal.SIGKILL)\nexcept OSError:\n    pass\n" + WRONG_ADD,
                     None, None),
    "write_outside": ("import os\n"
                      "for p in ('/tmp/../escape', '/etc/escape', %r, '/dev/shm/escape', '/usr/lib/escape', '../escape'):\n"
                      "    try:\n        open(p, 'w').write('x')\n    except OSError:\n        pass\n" % str(ROOT / "escape")
                      + WRONG_ADD, 0.5, "ok"),
    "delete_parent_dirs": ("import shutil\nfor p in ('..', '/', '/tmp', %r, '/usr/lib'):\n"
                           "    shutil.rmtree(p, ignore_errors=True)\n" % str(ROOT) + WRONG_ADD, None, None),
    "read_secrets": ("import os\nfound = []\nfor d in os.listdir('/proc'):\n    try:\n"
                     "        found.append(open('/proc/%s/environ' % d, 'rb').read().decode('latin1'))\n"
                     "    except OSError:\n        pass\nfound.append(str(dict(os.environ)))\n"
                     "for d, _, fs in os.walk('/'):\n    for f in fs:\n        if 'canary' in f:\n"
                     "            try:\n                found.append(open(os.path.join(d, f)).read())\n"
                     "            except OSError:\n                pass\nprint(' '.join(found))\n"
                     "def add(a, b):\n    raise ValueError(' '.join(found)[-250:])\n", 0.0, "ok"),
    "huge_output": ("import sys\nfor _ in range(200):\n    try:\n        sys.stdout.write('x' * (1 << 20))\n"
                    "        sys.stdout.flush()\n    except OSError:\n        break\n" + WRONG_ADD, 0.5, "ok"),
    "huge_answer": ("def add(a, b):\n    return 'x' * (64 << 20)\n", 0.0, "ok"),
    "deep_answer": ("def add(a, b):\n    x = []\n    for _ in range(100000):\n        x = [x]\n    return x\n", 0.0, "ok"),
}


@pytest.mark.parametrize("name", sorted(CLASSIC))
def test_classic_hostile_programs(name, canaries):
    code, want_reward, want_status = CLASSIC[name]
    # Only the programs meant to hang get the short budget: for the others the time-out is not what is
    # tested, and 2 s was too tight for `huge_answer` (64 MiB strings x 4 tests) on a slow CI machine.
    reward, info = run_code_tests(code, ADD_TESTS, timeout_s=2 if want_status == "timeout" else 30)
    if want_reward is not None:
        assert (reward, info["status"]) == (want_reward, want_status), info
    else:  # signals / deleting a read-only tree: whatever they do to the sandbox, never more than the honest score
        assert reward <= 0.5 and info["status"] in ("ok", "crash", "timeout"), info
    assert len(info["stdout_tail"]) <= 10000
    check_contained(info, canaries)


def test_network_to_localhost_and_outside_is_blocked(canaries):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.settimeout(0.2)
    port = listener.getsockname()[1]
    code = ("import socket\n"
            "def reach(host, port):\n"
            "    try:\n"
            "        socket.create_connection((host, port), timeout=1).close()\n"
            "        return True\n"
            "    except OSError:\n"
            "        return False\n")
    try:
        reward, info = run_code_tests(code, [f"assert not reach('127.0.0.1', {port})", "assert not reach('1.1.1.1', 53)"])
        assert (reward, info["status"]) == (1.0, "ok"), info
        with pytest.raises(socket.timeout):
            listener.accept()
    finally:
        listener.close()
    check_contained(info, canaries)


def test_fork_bomb_is_contained(canaries):
    code = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    info = _contained({"code": code, "tests": ADD_TESTS, "timeout_s": 2})
    assert (info["reward"], info["status"]) == (0.0, "timeout")
    check_contained(info, canaries)


def test_memory_bomb_is_contained(canaries):
    code = "x = []\nwhile True:\n    x.append(bytearray(16 << 20))\n" + WRONG_ADD
    info = _contained({"code": code, "tests": ADD_TESTS, "memory_mb": 256, "timeout_s": 5})
    assert (info["reward"], info["status"]) == (0.0, "crash")
    check_contained(info, canaries)


def test_runs_unprivileged_in_its_own_namespaces():
    code = ("import os\n"
            "def facts():\n"
            "    caps = [l for l in open('/proc/self/status') if l.startswith('CapEff')][0].split()[1]\n"
            "    return [os.getuid(), os.getcwd(), sorted(os.listdir('/')), caps, sum(d.isdigit() for d in os.listdir('/proc')) < 10,\n"
            "            sorted(os.environ)]\n")
    reward, info = run_code_tests(code, ["uid, cwd, top, caps, few, env = facts()\n"
                                         "assert uid == 65534 and cwd == '/tmp' and caps == '0000000000000000'\n"
                                         "assert set(top) <= {'dev', 'proc', 'tmp', 'usr', 'lib', 'lib64', 'root'}\n"
                                         "assert few and set(env) <= {'LC_ALL', 'PWD'}"])
    assert (reward, info["status"]) == (1.0, "ok"), info
