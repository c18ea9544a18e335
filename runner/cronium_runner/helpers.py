"""Installs the runtime helpers for a run and reads back what the script set.

The run's state is in its private ``<workdir>/.cronium/`` (input, variables, context, output, ...).
The helper programs (``lib``: cronium.py, sitecustomize.py, cronium.js, the ``cronium.*`` commands,
bash_env.sh) are the same for every run of one runner version under one interpreter, so they are
written once, into the private per-user cache (``${XDG_CACHE_HOME:-$HOME/.cache}/cronium/helpers/``,
0700, used only when ours and not writable by others, like the runner's code cache), where Python's
``__pycache__`` for them stays too. Creating a file costs far more than reading one (~0.3 ms of CPU
each on a small VM's disk), and the ~10 files and 2 compilations per run were a large part of a
run's cost. Without a usable cache, they are written into ``.cronium/lib`` as before.
"""
import os
import stat
import sys

from . import jsonc
from .lite import quote, sha256

COMMANDS = ("input", "output", "getVariable", "setVariable", "setCondition", "event", "detach")

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


_READY = ".complete"


def _write_lib(lib, final):
    """The helper programs into the existing dir ``lib``, naming ``final`` as their place."""
    _write(os.path.join(lib, "cronium.py"), _data("cronium.py"))
    _write(os.path.join(lib, "sitecustomize.py"), _SITECUSTOMIZE)
    _write(os.path.join(lib, "cronium.js"), _data("cronium.js"))
    py = sys.executable or "python3"
    for cmd in COMMANDS:
        text = "#!/bin/sh\nexec %s -I -S %s %s \"$@\"\n" % (
            quote(py), quote(os.path.join(final, "cronium.py")), cmd)
        _write(os.path.join(lib, "cronium." + cmd), text, 0o700)
    _write(os.path.join(lib, "bash_env.sh"), _data("cronium.sh").decode("utf-8").replace("@BIN@", quote(final)))
    _write(os.path.join(lib, _READY), b"")


def _private_dir(path):
    st = os.lstat(path)
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and not st.st_mode & 0o022


def _ready(lib):
    try:
        return _private_dir(lib) and os.path.isfile(os.path.join(lib, _READY))
    except OSError:
        return False


def shared_lib(key):
    """The cached helper dir for runner ``key`` (its sha256) and this interpreter; None if unusable."""
    if not key:
        return None
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    root = os.path.join(base, "cronium", "helpers")
    tag = sha256((sys.executable or "python3").encode("utf-8", "surrogateescape")).hexdigest()[:16]
    lib = os.path.join(root, "%s-%s" % (str(key)[:32], tag))
    if _ready(lib):
        return lib
    from .lite import rmtree
    tmp = None
    try:
        os.makedirs(os.path.dirname(root), 0o700, exist_ok=True)
        if not _private_dir(os.path.dirname(root)):
            return None
        os.makedirs(root, 0o700, exist_ok=True)
        if not _private_dir(root):
            return None
        tmp = "%s.%d.%s.tmp" % (lib, os.getpid(), os.urandom(4).hex())
        os.mkdir(tmp, 0o700)
        _write_lib(tmp, lib)
        try:
            os.rename(tmp, lib)         # atomic: readers see no dir or a complete one
            tmp = None
        except OSError:                 # another run was first (or a broken dir is in the way)
            if not _ready(lib):
                return None
    except OSError:
        return None
    finally:
        if tmp is not None:
            rmtree(tmp)
    return lib if _ready(lib) else None


def install(workdir, context, input_data, variables, cache_key=None):
    """Create ``.cronium/`` (state files) and find or make the helpers; return
    ``(state_dir, bindir, env_additions)``."""
    state = os.path.join(workdir, ".cronium")
    os.mkdir(state, 0o700)
    os.mkdir(os.path.join(state, "tmp"), 0o700)
    _write(os.path.join(state, "input.json"), _dump({"data": input_data}))
    _write(os.path.join(state, "variables.json"), _dump(variables))
    _write(os.path.join(state, "context.json"), _dump(context))
    lib = shared_lib(cache_key)
    if lib is None:
        lib = os.path.join(state, "lib")
        os.mkdir(lib, 0o700)
        _write_lib(lib, lib)
    bindir = lib
    bash_env = os.path.join(lib, "bash_env.sh")
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
