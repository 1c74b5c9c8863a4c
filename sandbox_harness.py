"""
sandbox_harness.py: the two programs that run INSIDE the sandboxes of sandbox.py, and the plain-data
codec they talk through. Started as `python -I -S -B -c <this file's text> runner|judge` (isolated,
no site-packages: standard library only); never imported by the trainer, importable for tests.

Two processes, two sandboxes, one pipe pair between them:

  runner (candidate side)   executes the model's code, then serves calls: it reads
                            {"call": name, "args", "kwargs"} on fd REQ_FD and answers on fd RESP_FD
                            with the return value, the arguments after the call (so in-place mutation
                            is visible) or the exception the code raised. It never sees a test.
  judge  (test side)        executes the tests in ITS OWN interpreter; every function the candidate
                            defined is a proxy that makes such a call. Verdicts go to the judge's
                            stdout, a pipe to the trainer that the candidate's process does not hold.

Only plain data crosses (None, bool, int, float, complex, str, bytes, bytearray, list, tuple, dict,
set, frozenset, nested; see `encode` / `decode`), as length-prefixed JSON, never pickle. So the
candidate cannot hand the judge an object whose __eq__ says True, patch the judge's builtins, walk
the judge's stack or write its verdicts: whatever it does, the judge sees data and compares it with
its own, unpatched Python.

What a test cannot express this way (documented in README, Sandbox): passing or returning functions,
generators, class instances or other objects (the call fails: "not plain data"); identity and
aliasing (`f(a, a)` gets two copies; `f(x) is x` is False); reading the candidate's module-level
non-function values (only callables are proxied). Mutation in place works: after each call the judge
copies the arguments' new contents into its own objects (lists, dicts, sets, bytearrays, nested).
Exceptions work: a builtin exception type raised by the candidate is raised again by the proxy
(`ValueError("msg")`), any other type as `CandidateError("TypeName: msg")`.
"""
import base64, builtins, json, os, resource, struct, sys

REQ_FD, RESP_FD = -1, -1  # judge -> runner calls, runner -> judge answers (pipe ends from the job)
MAX_MESSAGE = 8 << 20  # bytes per message: a bigger answer is a failed call, not a memory blow-up
MAX_DEPTH = 64  # nesting depth of plain data
MAX_NODES = 1_000_000  # values per message


# ----------------------------------------------------------------------------------------------
# Plain-data codec (both sides). Decoding only ever builds plain built-in types.


class NotPlainData(TypeError):
    pass


def encode(value):
    """A plain-data value -> a JSON-able tree. Subclasses of built-in types (Counter, OrderedDict,
    namedtuple, IntEnum) become their base type, as their comparisons with the base type already do;
    anything else raises NotPlainData. JSON arrays are lists; every other container is a one-key
    object {"tuple" | "set" | "frozenset" | "dict" | "bytes" | "bytearray" | "complex": ...}."""
    budget = [MAX_NODES]

    def enc(v, depth):
        budget[0] -= 1
        if depth > MAX_DEPTH or budget[0] < 0:
            raise NotPlainData("value too deep or too large")
        if v is None or type(v) in (bool, str, float):
            return v
        if isinstance(v, int):
            return int.__index__(v)
        if isinstance(v, float):
            return float.__float__(v)
        if isinstance(v, str):
            return str.__str__(v)
        if isinstance(v, complex):
            return {"complex": [complex.__complex__(v).real, complex.__complex__(v).imag]}
        if isinstance(v, bytearray):
            return {"bytearray": base64.b64encode(bytes(v)).decode()}
        if isinstance(v, bytes):
            return {"bytes": base64.b64encode(bytes.__bytes__(v) if type(v) is not bytes else v).decode()}
        if isinstance(v, list):
            return [enc(x, depth + 1) for x in list.__iter__(v)]
        if isinstance(v, tuple):
            return {"tuple": [enc(x, depth + 1) for x in tuple.__iter__(v)]}
        if isinstance(v, dict):
            return {"dict": [[enc(k, depth + 1), enc(x, depth + 1)] for k, x in dict.items(v)]}
        if isinstance(v, frozenset):
            return {"frozenset": [enc(x, depth + 1) for x in frozenset.__iter__(v)]}
        if isinstance(v, set):
            return {"set": [enc(x, depth + 1) for x in set.__iter__(v)]}
        raise NotPlainData("not plain data: %s" % type(v).__name__)

    return enc(value, 0)


def decode(tree):
    """The inverse of `encode`, strict: anything but the shapes `encode` writes raises ValueError."""
    budget = [MAX_NODES]

    def dec(t, depth):
        budget[0] -= 1
        if depth > MAX_DEPTH or budget[0] < 0:
            raise ValueError("value too deep or too large")
        if t is None or type(t) in (bool, int, float, str):
            return t
        if type(t) is list:
            return [dec(x, depth + 1) for x in t]
        if type(t) is not dict or len(t) != 1:
            raise ValueError("malformed message")
        (tag, body), = t.items()
        if tag in ("tuple", "set", "frozenset") and type(body) is list:
            items = [dec(x, depth + 1) for x in body]
            return {"tuple": tuple, "set": set, "frozenset": frozenset}[tag](items)
        if tag == "dict" and type(body) is list and all(type(p) is list and len(p) == 2 for p in body):
            return {dec(k, depth + 1): dec(x, depth + 1) for k, x in body}
        if tag in ("bytes", "bytearray") and type(body) is str:
            raw = base64.b64decode(body.encode(), validate=True)
            return raw if tag == "bytes" else bytearray(raw)
        if tag == "complex" and type(body) is list and len(body) == 2 and all(type(x) is float for x in body):
            return complex(body[0], body[1])
        raise ValueError("malformed message")

    return dec(tree, 0)


def send(fd, message):
    data = json.dumps(message).encode()
    if len(data) > MAX_MESSAGE:
        data = json.dumps({"error": "message over %d bytes" % MAX_MESSAGE}).encode()
    data = struct.pack(">I", len(data)) + data
    while data:
        data = data[os.write(fd, data):]


def receive(fd):
    """One message, or None at end of stream. Raises ValueError on a malformed or oversized one."""
    def exactly(n):
        chunks = []
        while n:
            chunk = os.read(fd, min(n, 1 << 20))
            if not chunk:
                return None
            chunks.append(chunk)
            n -= len(chunk)
        return b"".join(chunks)

    head = exactly(4)
    if head is None:
        return None
    (n,) = struct.unpack(">I", head)
    if n > MAX_MESSAGE:
        raise ValueError("message over %d bytes" % MAX_MESSAGE)
    body = exactly(n)
    if body is None:
        return None
    message = json.loads(body)
    if type(message) is not dict:
        raise ValueError("malformed message")
    return message


def describe(exc):
    try:
        return ("%s: %s" % (type(exc).__name__, exc)).replace("\n", " ")[:300]
    except BaseException:  # noqa: B036 - a hostile __str__ may raise anything
        return "<unprintable exception>"


def apply_limits(limits):
    """soft = hard, so the code cannot raise them again."""
    for name, value in limits.items():
        resource.setrlimit(getattr(resource, name), (value, value))


# ----------------------------------------------------------------------------------------------
# Runner: the candidate's process


def run_candidate(job):
    """Execute the candidate's code, report the names it defined, then serve calls until EOF."""
    apply_limits(job["limits"])
    me, write_exit = os.getpid(), os._exit
    namespace = {"__name__": "__candidate__", "__builtins__": builtins}
    try:
        code = compile(job["code"], "<candidate>", "exec", dont_inherit=True)
    except BaseException as exc:  # noqa: B036
        send(RESP_FD, {"syntax_error": describe(exc)})
        write_exit(0)
    del job
    try:
        exec(code, namespace)
    except BaseException as exc:  # noqa: B036 - sys.exit() during loading is a load error too
        if os.getpid() == me:
            send(RESP_FD, {"load_error": describe(exc)})
        write_exit(0)
    if os.getpid() != me:  # a child the candidate forked while loading: never speaks
        write_exit(0)
    names = sorted(k for k, v in dict.items(namespace) if isinstance(k, str) and not k.startswith("__")
                   and callable(v))
    send(RESP_FD, {"ready": names})
    while True:
        request = receive(REQ_FD)
        if request is None:
            write_exit(0)
        answer = serve(namespace, request)
        if os.getpid() != me:
            write_exit(0)
        send(RESP_FD, answer)


def serve(namespace, request):
    """One call -> {"return": value} | {"raise": [type name, message]} | {"error": ...}, with the
    arguments as they are after the call ("args", "kwargs") whenever they are still plain data."""
    try:
        fn = namespace[request["call"]]
        args, kwargs = decode(request["args"]), decode(request["kwargs"])
    except BaseException as exc:  # noqa: B036
        return {"error": "bad call: " + describe(exc)}
    try:
        answer = {"return": fn(*args, **kwargs)}
    except BaseException as exc:  # noqa: B036
        answer = {"raise": [type(exc).__name__, describe(exc).split(": ", 1)[-1]]}
    try:
        answer.update(args=encode(args), kwargs=encode(kwargs))
        if "return" in answer:
            answer["return"] = encode(answer["return"])
    except BaseException as exc:  # noqa: B036
        return {"error": "the function returned something that is not plain data (%s)" % describe(exc)}
    return answer


# ----------------------------------------------------------------------------------------------
# Judge: the tests' process


class CandidateError(Exception):
    """The candidate raised an exception that is not a built-in type: "TypeName: message"."""


class CandidateGone(BaseException):
    """The candidate's process ended or broke the protocol: no further call can succeed. A
    BaseException, so a test's `except Exception` cannot swallow it."""


def sync_in_place(old, new):
    """Give `old` (the judge's argument) the contents of `new` (the same argument after the call),
    keeping object identity wherever the types allow, so a test that mutates and then inspects works."""
    if type(old) is list and type(new) is list:
        for i in range(min(len(old), len(new))):
            if not sync_in_place(old[i], new[i]):
                old[i] = new[i]
        del old[len(new):]
        old.extend(new[len(old):])
        return True
    if type(old) is dict and type(new) is dict:
        for k in [k for k in old if k not in new]:
            del old[k]
        for k, v in new.items():
            if not (k in old and sync_in_place(old[k], v)):
                old[k] = v
        return True
    if (type(old) is set and type(new) is set) or (type(old) is bytearray and type(new) is bytearray):
        old.clear() if type(old) is set else old.__delitem__(slice(None))
        old.update(new) if type(old) is set else old.extend(new)
        return True
    return old == new and type(old) is type(new)


def make_proxy(name):
    """A judge-side stand-in for the candidate's function `name`: one call over the pipe."""
    def proxy(*args, **kwargs):
        send(REQ_FD, {"call": name, "args": encode(list(args)), "kwargs": encode(kwargs)})
        try:
            answer = receive(RESP_FD)
        except ValueError as exc:
            raise CandidateGone("malformed answer: %s" % exc)
        if answer is None:
            raise CandidateGone("the candidate's process ended")
        try:
            new_args, new_kwargs = decode(answer.get("args", [])), decode(answer.get("kwargs", {"dict": []}))
            result = decode(answer["return"]) if "return" in answer else None
        except (ValueError, TypeError) as exc:
            raise CandidateError("malformed answer: %s" % exc)
        if type(new_args) is list and len(new_args) == len(args):
            for old, new in zip(args, new_args):
                sync_in_place(old, new)
        if type(new_kwargs) is dict:
            for k, old in kwargs.items():
                if k in new_kwargs:
                    sync_in_place(old, new_kwargs[k])
        if "raise" in answer and type(answer["raise"]) is list and len(answer["raise"]) == 2:
            kind, message = (str(x) for x in answer["raise"])
            exc_type = getattr(builtins, kind, None)
            if isinstance(exc_type, type) and issubclass(exc_type, Exception):
                raise exc_type(message)
            raise CandidateError("%s: %s" % (kind, message))
        if "return" not in answer:
            raise CandidateError(str(answer.get("error", "malformed answer"))[:300])
        return result
    proxy.__name__ = name
    return proxy


def run_judge(job):
    """Run the tests against proxies of the candidate's functions; one JSON line per verdict on
    stdout: {"test": i, "passed": bool, "error": str}, then {"done": ...}, or {"status": ...} when the
    candidate could not be loaded ("syntax_error" | "load_error") or died ("crash")."""
    out = os.fdopen(os.dup(1), "w")  # the verdict channel; a test's own prints go to stderr
    os.dup2(2, 1)

    def emit(obj):
        out.write(json.dumps(obj) + "\n")
        out.flush()

    try:
        hello = receive(RESP_FD)
    except ValueError:
        hello = None
    if not hello or "ready" not in hello:
        status = next((k for k in ("syntax_error", "load_error") if hello and k in hello), "crash")
        emit({"status": status, "error": str((hello or {}).get(status, "no answer from the candidate"))[:300]})
        return
    # the candidate's names never shadow a builtin in the tests' scope (`abs = lambda x: 0` would
    # otherwise make `assert abs(f(x) - y) < 1e-6` pass); only the entry point itself may
    names = [n for n in hello["ready"] if isinstance(n, str) and n.isidentifier()
             and (not hasattr(builtins, n) or n == job["entry_point"])]
    proxies = {n: make_proxy(n) for n in names}
    if job["entry_point"]:
        if job["entry_point"] not in proxies:
            emit({"status": "load_error", "error": "no function named %r" % job["entry_point"]})
            return
        proxies["candidate"] = proxies[job["entry_point"]]
    for i, test in enumerate(job["tests"]):
        scope = {"__name__": "__judge__", "__builtins__": builtins, **proxies}
        try:
            exec(compile(test, "<test %d>" % i, "exec", dont_inherit=True, optimize=0), scope)
            emit({"test": i, "passed": True, "error": ""})
        except CandidateGone as exc:
            emit({"test": i, "passed": False, "error": describe(exc)})
            emit({"status": "crash", "error": describe(exc)})
            return
        except Exception as exc:
            emit({"test": i, "passed": False, "error": describe(exc)})
    emit({"done": True})


def main():
    global REQ_FD, RESP_FD
    job = json.loads(sys.stdin.buffer.read())
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    REQ_FD, RESP_FD = job.pop("fds")
    if sys.argv[-1] == "runner":
        run_candidate(job)
    else:
        apply_limits(job["limits"])
        run_judge(job)


if __name__ == "__main__":
    main()
