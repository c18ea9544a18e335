"""cronium-runner: runs one Cronium payload on a target (see docs/PROTOCOL.md, docs/RUNNER.md).

A zipapp cannot cache bytecode, and compiling the runner on every start costs tens of milliseconds.
So the compiled modules are kept in a private per-user cache, keyed by the archive's sha256 and the
interpreter's cache tag: ``${XDG_CACHE_HOME:-$HOME/.cache}/cronium/code/<sha256>.<tag>`` (dir 0700,
ignored unless owned by us and not writable by others). Without it, plain zipimport is used.
The cache also holds this file's own code (key ``<main>``): the controller's bootstrap
(``BOOT`` in cronium_fab/remote/runner_cache.py, same path and rules) runs it from there and hands
over ``__cronium_code__`` = (sha256 it verified, the cache), so a warm run compiles nothing here.
"""
import sys


MAIN = "<main>"   # this file's code in the cache: not a module name, so never imported


def _code_cache():
    given = globals().get("__cronium_code__")   # from the bootstrap: the digest it checked, the cache
    if given and isinstance(given[1], dict):
        import os
        return os.path.dirname(os.path.abspath(__file__)), given[0], given[1]
    try:   # the rule of cronium_runner.lite.sha256 (the archive is small: built-in, no hashlib import)
        if sys.version_info >= (3, 12):
            from _sha2 import sha256
        else:
            from _sha256 import sha256
    except ImportError:
        from hashlib import sha256
    import marshal
    import os
    import stat
    archive = os.path.dirname(os.path.abspath(__file__))
    try:
        with open(archive, "rb") as f:
            sha = sha256(f.read()).hexdigest()
    except OSError:
        return None
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    cdir = os.path.join(base, "cronium", "code")
    path = os.path.join(cdir, "%s.%s" % (sha, sys.implementation.cache_tag))
    try:
        st = os.stat(cdir)
        ok = stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and not st.st_mode & 0o022
        with open(path, "rb") as f:
            codes = marshal.loads(f.read()) if ok else None
    except (OSError, ValueError, EOFError, TypeError):
        codes = None
    if not isinstance(codes, dict):
        import zipfile
        codes = {}
        with zipfile.ZipFile(archive) as z:
            for name in z.namelist():
                if name.startswith("cronium_runner/") and name.endswith(".py") and name.count("/") == 1:
                    mod = name[:-3].replace("/", ".")
                    codes[mod] = compile(z.read(name), os.path.join(archive, name), "exec", dont_inherit=True)
            codes[MAIN] = compile(z.read("__main__.py"), os.path.join(archive, "__main__.py"), "exec",
                                  dont_inherit=True)
        try:
            os.makedirs(os.path.dirname(cdir), 0o700, exist_ok=True)
            os.makedirs(cdir, 0o700, exist_ok=True)
            tmp = "%s.%d.tmp" % (path, os.getpid())
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(marshal.dumps(codes))
            os.replace(tmp, path)
        except OSError:
            pass
    return archive, sha, codes


def _install(archive, sha, codes):
    import zipimport
    try:   # the import system's own ModuleSpec: importlib.util would cost ~5 ms of imports per run
        from _frozen_importlib import ModuleSpec
    except ImportError:
        from importlib.machinery import ModuleSpec

    zi = zipimport.zipimporter(archive)

    class Loader(object):
        def find_spec(self, name, path=None, target=None):
            key = name + ".__init__" if name + ".__init__" in codes else name
            if key not in codes:
                return None
            spec = ModuleSpec(name, self, origin=archive + "/" + key.replace(".", "/") + ".py",
                              is_package=key != name)
            if key != name:
                spec.submodule_search_locations = [archive + "/" + name.replace(".", "/")]
            return spec

        def create_module(self, spec):
            return None

        def exec_module(self, module):
            name = module.__name__
            module.__file__ = module.__spec__.origin
            module.__loader__ = zi          # pkgutil.get_data reads the shims from the archive
            module.__runner_sha256__ = sha
            exec(codes.get(name + ".__init__") or codes[name], module.__dict__)

        def get_data(self, path):
            return zi.get_data(path)

    sys.meta_path.insert(0, Loader())


if __name__ == "__main__":
    try:
        _cached = _code_cache()
    except Exception:
        _cached = None
    if _cached:
        _install(*_cached)
    from cronium_runner import cli
    if _cached:
        cli.set_own_sha256(_cached[1])
    _status = cli.main(sys.argv[1:])
    try:   # everything is written (records go out unbuffered): skip the interpreter's finalization,
        sys.stdout.flush()      # ~4 ms of CPU per run; a failing flush takes the normal exit
        sys.stderr.flush()
    except Exception:
        sys.exit(_status)
    import os
    os._exit(_status)
