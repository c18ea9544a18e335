"""Installs the runtime helpers into the run's private ``.cronium/`` dir and reads back what the script set."""
import os
import sys

from . import jsonc
from .lite import quote

COMMANDS = ("input", "output", "getVariable", "setVariable", "setCondition", "event")

_SITECUSTOMIZE = '''\
import builtins as _b
import cronium as _c
_b.cronium = _c
def _chain():
    import os, sys
    try:  # the import system's own functions: importlib.util costs ~4 ms of imports per script
        from _frozen_importlib import module_from_spec
        from _frozen_importlib_external import PathFinder
    except ImportError:
        from importlib.machinery import PathFinder
        from importlib.util import module_from_spec
    here = os.path.dirname(os.path.abspath(__file__))
    rest = [p for p in sys.path if os.path.abspath(p or ".") != here]
    spec = PathFinder.find_spec("sitecustomize", rest)
    if spec is not None and spec.loader is not None:
        mod = module_from_spec(spec)
        spec.loader.exec_module(mod)
try:
    _chain()
except Exception:
    pass
del _b, _c, _chain
'''


def _data(name):
    # The module's loader reads from the archive (zipimporter) or the source tree; pkgutil would
    # do the same but costs ~10 ms of imports at every run.
    loader = globals().get("__loader__")
    path = os.path.join(os.path.dirname(__file__), "shims", name)
    if loader is not None and hasattr(loader, "get_data"):
        try:
            return loader.get_data(path)
        except OSError:
            pass
    with open(path, "rb") as f:
        return f.read()


def _write(path, data, mode=0o600):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data if isinstance(data, bytes) else data.encode("utf-8"))


def _dump(value):
    return jsonc.dumps(value, ensure_ascii=False)


def install(workdir, context, input_data, variables):
    """Create ``.cronium/`` (files, libs, commands); return ``(state_dir, env_additions)``."""
    state = os.path.join(workdir, ".cronium")
    os.mkdir(state, 0o700)
    for sub in ("lib", "tmp"):   # lib: cronium.py, sitecustomize.py, cronium.js, cronium.* commands
        os.mkdir(os.path.join(state, sub), 0o700)
    _write(os.path.join(state, "input.json"), _dump({"data": input_data}))
    _write(os.path.join(state, "variables.json"), _dump(variables))
    _write(os.path.join(state, "context.json"), _dump(context))
    lib = os.path.join(state, "lib")
    _write(os.path.join(lib, "cronium.py"), _data("cronium.py"))
    _write(os.path.join(lib, "sitecustomize.py"), _SITECUSTOMIZE)
    _write(os.path.join(lib, "cronium.js"), _data("cronium.js"))
    bindir = lib
    py = sys.executable or "python3"
    for cmd in COMMANDS:
        text = "#!/bin/sh\nexec %s -I -S %s %s \"$@\"\n" % (
            quote(py), quote(os.path.join(lib, "cronium.py")), cmd)
        _write(os.path.join(bindir, "cronium." + cmd), text, 0o700)
    bash_env = os.path.join(state, "bash_env.sh")
    _write(bash_env, _data("cronium.sh").decode("utf-8").replace("@BIN@", quote(bindir)))
    node_opt = "--require=" + os.path.join(lib, "cronium.js")
    if " " in node_opt or '"' in node_opt:
        node_opt = '"%s"' % node_opt.replace("\\", "\\\\").replace('"', '\\"')
    env = {
        "CRONIUM_HELPER_DIR": state,
        "PYTHONPATH": lib,
        "NODE_PATH": lib,
        "NODE_OPTIONS": node_opt,
        "BASH_ENV": bash_env,
        "TMPDIR": os.path.join(state, "tmp"),
    }
    return state, bindir, env


def _load(path):
    try:
        with open(path, "r", encoding="utf-8") as f:
            return jsonc.loads(f.read())
    except (OSError, ValueError):
        return None


def collect(state, snapshot):
    """What the script set: ``(output, output_set, changed_variables, condition)``."""
    out = _load(os.path.join(state, "output.json"))
    output_set = isinstance(out, dict) and "data" in out
    variables = _load(os.path.join(state, "variables.json"))
    changed = {}
    if isinstance(variables, dict):
        for k, v in variables.items():
            if k not in snapshot or snapshot[k] != v or type(snapshot[k]) is not type(v):
                changed[k] = v
    cond = _load(os.path.join(state, "condition.json"))
    condition = cond.get("condition") if isinstance(cond, dict) else None
    if condition is not None and not isinstance(condition, bool):
        condition = bool(condition)
    return (out.get("data") if output_set else None), output_set, changed, condition
