"""Small stand-ins for ``shutil.which``, ``shutil.rmtree``, ``shlex.quote`` and ``hashlib.sha256``.

The real ones cost ``shutil`` (+ ``fnmatch``, ``bz2``, ``lzma``), ``shlex``, ``re`` and OpenSSL's
``_hashlib`` at every run (~15 ms of CPU on a small host); these do the same for the runner's uses.
"""
import os
import sys

# SHA-256, one rule for every copy of this fallback (here, runner/__main__.py and the bootstrap in
# cronium_fab/remote/runner_cache.py): the interpreter's own ``_sha2`` (``_sha256`` before 3.12) for
# inputs under SMALL_HASH, which spares the warm path hashlib's OpenSSL import (~5 ms a run);
# ``hashlib`` for larger ones: the built-in has no SHA-NI and is ~9x slower on a big payload.
SMALL_HASH = 1 << 20
try:
    if sys.version_info >= (3, 12):
        from _sha2 import sha256 as _small_sha256
    else:
        from _sha256 import sha256 as _small_sha256
except ImportError:   # built without it: OpenSSL's
    _small_sha256 = None


def sha256(data):
    """``hashlib.sha256(data)`` (see the rule above)."""
    if _small_sha256 is not None and len(data) < SMALL_HASH:
        return _small_sha256(data)
    import hashlib
    return hashlib.sha256(data)


_SAFE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_@%+=:,./-")


def quote(s):
    """``shlex.quote``: a shell word for ``s``."""
    if not s:
        return "''"
    for c in s:
        if c not in _SAFE:
            return "'" + s.replace("'", "'\"'\"'") + "'"
    return s


def _executable(path):
    return os.path.exists(path) and os.access(path, os.F_OK | os.X_OK) and not os.path.isdir(path)


def which(cmd, path=None):
    """``shutil.which(cmd, path=path)`` on POSIX."""
    if os.path.dirname(cmd):
        return cmd if _executable(cmd) else None
    if path is None:
        path = os.environ.get("PATH", None)
        if path is None:
            try:
                path = os.confstr("CS_PATH")
            except (AttributeError, ValueError):
                path = os.defpath
    if not path:
        return None
    seen = set()
    for d in path.split(os.pathsep):
        if d not in seen:
            seen.add(d)
            name = os.path.join(d, cmd)
            if _executable(name):
                return name
    return None


def rmtree(path, tick=None):
    """Remove the tree at ``path`` without following symlinks; errors are ignored (the tree may be
    half gone), like ``shutil.rmtree(path, ignore_errors=True)``. ``tick()`` is called per entry."""
    if os.path.islink(path):
        return
    try:
        with os.scandir(path) as it:
            entries = list(it)
    except OSError:
        entries = []
    for e in entries:
        if tick is not None:
            tick()
        try:
            is_dir = e.is_dir(follow_symlinks=False)
        except OSError:
            is_dir = False
        if is_dir:
            rmtree(e.path, tick)
        else:
            try:
                os.unlink(e.path)
            except OSError:
                pass
    try:
        os.rmdir(path)
    except OSError:
        pass
