"""Import the stage scripts as modules: their file names start with a digit, so `import` cannot."""
import importlib.util
import sys
from pathlib import Path

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
