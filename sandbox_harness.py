"""
sandbox_harness.py: the program that runs INSIDE the sandboxed child, before and around the
candidate code (started by sandbox.py as `python -I -S -B -c <this file's text>`; never imported
by the trainer, importable for reading and linting).

It reads the job (code, tests, limits, nonce, jail) from stdin, which the parent points at an
already-unlinked file, so once read the job is gone. Verdicts go to a private file descriptor as
lines "<nonce> <kind> <index> <passed> <error>". Standard library only (`-S`: no site-packages).
"""
import builtins, json, os, re, resource, signal, sys


def enter_jail(jail):
    """Namespace mode only. We start as root, as pid 1 of fresh mount/pid/net namespaces
    (created by `unshare`), and lock ourselves in before any candidate code exists:

    1. a private, size-limited tmpfs on /tmp: the working dir, the only writable place;
    2. empty tmpfs over home directories (tokens, ssh keys, checkpoints), re-exposing the
       Python installation if it lives there (e.g. ~/.pyenv), so "nobody" can run it;
    3. every other mount read-only. The read-only flag is per mount, and these mounts are
       private copies in our own mount namespace: the host's mounts are untouched;
    4. become uid/gid "nobody": all capabilities are dropped by the kernel, and
       no_new_privs stops setuid binaries from giving them back. So nothing above can be
       undone, and RLIMIT_NPROC applies (it does not for root).
    """
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND, MS_MOVE = 1, 2, 4, 8, 32, 4096, 8192
    KEPT_FLAGS = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC,
                  "noatime": 1024, "nodiratime": 2048, "relatime": 1 << 21}

    def mount(source, target, fstype, flags, data=None):
        enc = lambda s: None if s is None else s.encode()
        if libc.mount(enc(source), enc(target), enc(fstype), flags, enc(data)) != 0:
            err = ctypes.get_errno()
            raise OSError(err, "mount %s: %s" % (target, os.strerror(err)))

    mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "size=%dm,mode=1777" % jail["scratch_mb"])
    for hidden in jail["hide"]:
        keep = jail["keep"] if (jail["keep"] or "").startswith(hidden + "/") else None
        if keep:
            os.mkdir("/tmp/.keep")
            mount(keep, "/tmp/.keep", None, MS_BIND)
        mount("tmpfs", hidden, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=755")
        if keep:
            os.makedirs(keep)
            mount("/tmp/.keep", keep, None, MS_MOVE)
            os.rmdir("/tmp/.keep")
    with open("/proc/self/mountinfo") as f:
        mounts = [line.split() for line in f]
    for fields in mounts:  # fields[4]: mount point (octal escapes), fields[5]: per-mount options
        target = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
        options = fields[5].split(",")
        if "ro" in options or target == "/tmp":
            continue
        kept = sum(flag for name, flag in KEPT_FLAGS.items() if name in options)
        mount(None, target, None, MS_REMOUNT | MS_BIND | MS_RDONLY | kept)
    os.chdir("/tmp")
    os.setgroups([])
    os.setresgid(jail["uid"], jail["uid"], jail["uid"])
    os.setresuid(jail["uid"], jail["uid"], jail["uid"])
    if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS) failed")


def apply_limits(limits):
    """Set soft = hard so the (unprivileged) candidate cannot raise them again."""
    for name, value in limits.items():
        resource.setrlimit(getattr(resource, name), (value, value))


def disable_network():
    """Make socket creation raise. Best effort only: code can re-import the C module or use ctypes."""
    import socket, _socket

    def refuse(*args, **kwargs):
        raise OSError("network access is disabled in this sandbox")

    for module in (socket, _socket):
        for name in ("socket", "socketpair", "create_connection", "create_server",
                     "fromfd", "getaddrinfo", "gethostbyname"):
            if hasattr(module, name):
                setattr(module, name, refuse)


def main():
    job = json.loads(sys.stdin.buffer.read())
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)  # the job, nonce included, can no longer be re-read
    os.close(null)
    if job["jail"]:
        enter_jail(job["jail"])  # any failure here aborts before candidate code runs
    apply_limits(job["limits"])
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # oversize writes fail with EFBIG instead of killing us
    disable_network()

    # Bind everything the verdict depends on NOW, into locals: the candidate can
    # monkeypatch modules and builtins (os.write, builtins.exec, json.dumps, ...),
    # but not these references.
    nonce, result_fd, tests, entry_point = job["nonce"], job["result_fd"], job["tests"], job["entry_point"]
    write, exit_now, getpid, fork, wait = os.write, os._exit, os.getpid, os.fork, os.wait
    compile_, exec_, len_, range_, type_ = compile, exec, len, range, type
    catch_all = BaseException

    def describe(exc):
        try:
            text = "%s: %s" % (type_(exc).__name__, exc)
        except catch_all:
            text = "<unprintable exception>"
        return text.replace("\n", " ")[:300]

    def finish():
        """Flush the candidate's buffered prints (best effort), then exit without running its atexit hooks."""
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except catch_all:
                pass
        exit_now(0)

    def report(kind, index=-1, passed=False, error=""):
        line = "%s %s %d %d %s\n" % (nonce, kind, index, 1 if passed else 0, error)
        try:
            write(result_fd, line.encode("utf-8", "replace"))
        except catch_all:
            pass

    # Reaper: this process never runs candidate code. The worker's getppid() is the
    # reaper, not the trainer; in a pid namespace the reaper is pid 1 and cannot be
    # killed from inside, and its exit tears the whole namespace down.
    worker = fork()
    if worker:
        while True:
            try:
                pid, _ = wait()
            except ChildProcessError:
                exit_now(0)
            if pid == worker:
                exit_now(0)

    me = getpid()
    try:
        code = compile_(job["code"], "<candidate>", "exec", dont_inherit=True, optimize=0)
    except catch_all as exc:
        report("syntax_error", error=describe(exc))
        finish()
    del job
    namespace = {"__name__": "__candidate__", "__builtins__": builtins}
    try:
        exec_(code, namespace)
        if entry_point:
            namespace["candidate"] = namespace[entry_point]
    except catch_all as exc:  # includes SystemExit: sys.exit() before the tests is a failure
        if getpid() == me:
            report("load_error", error=describe(exc))
        finish()
    if getpid() != me:  # a process forked by the candidate: never reports
        finish()
    for index in range_(len_(tests)):
        passed, error = False, ""
        try:
            # optimize=0: asserts are never compiled away.
            exec_(compile_(tests[index], "<test %d>" % index, "exec", dont_inherit=True, optimize=0),
                  namespace.copy())
            passed = True
        except catch_all as exc:
            error = describe(exc)
        if getpid() != me:
            finish()
        report("test", index, passed, error)
    report("done")
    finish()




if __name__ == "__main__":
    main()
