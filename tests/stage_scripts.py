"""Import the stage scripts as modules: their file names start with a digit, so `import` cannot."""
import contextlib
import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_script(filename: str, name: str):
    """Import ROOT/filename once as module `name`, registered in sys.modules (dataclasses and
    parse_config look the module up by name)."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / filename)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name]


class Killed(Exception):
    """Raised by `killed_at_log` in place of a log call: the run dies as if killed there."""


@contextlib.contextmanager
def killed_at_log(monkeypatch, when):
    """Inside the block, the first MetricsLogger.log call with when(step, metrics) true raises
    Killed (the block must end that way), as if the run were killed before logging that step;
    afterwards logging is restored."""
    import common as C
    real_log = C.MetricsLogger.log

    def dying_log(self, step, metrics, *a, **k):
        if when(step, metrics):
            raise Killed()
        return real_log(self, step, metrics, *a, **k)

    monkeypatch.setattr(C.MetricsLogger, "log", dying_log)
    try:
        with pytest.raises(Killed):
            yield
    finally:
        monkeypatch.setattr(C.MetricsLogger, "log", real_log)
