"""The runner cache on a target: the bootstrap command (PROTOCOL.md §1) and the install command.

Layout on the target: ``${XDG_CACHE_HOME:-$HOME/.cache}/cronium/`` (0700) holds
``runner-<sha256>.pyz`` (0600), one file per runner version, never modified in place: an install
writes a temp file in the same directory, checks its digest with the host's python3, and renames
it onto the final name, so a reader sees either no file or a complete one, whatever runs at once.
"""

from __future__ import annotations

import re

# Runs under whatever python3 the host has, so it must parse on old versions (no f-strings) and
# contain no single quote (it travels inside '...' in the shell command). argv: path, sha, args...
# A warm BOOT runs the runner's __main__ from the runner's private code cache, ``code/`` beside the
# runner (the shell resolved ``${XDG_CACHE_HOME:-$HOME/.cache}/cronium``, as runner/__main__.py does,
# whose trust rule it shares: a directory of ours that others cannot write), which spares compiling
# __main__.py and hashing the runner a second time (1.1 ms of CPU a run, measured side by side).
# The interpreter's own SHA-256 (``_sha2`` from 3.12, ``_sha256`` before): hashlib would import
# OpenSSL's ``_hashlib`` on every run (~5 ms of CPU). It is slower per byte (no SHA-NI), so the
# runner uses it only below 1 MiB (runner/cronium_runner/lite.py); the runner file is smaller.
_HEAD = """\
import sys
sys.path[:] = [p for p in sys.path if p not in ("", ".")]
import os, stat
try:
    if sys.version_info >= (3, 12):
        from _sha2 import sha256
    else:
        from _sha256 import sha256
except ImportError:
    from hashlib import sha256
"""
# Whether the runner at p is ours: a regular file of this user, in a directory of this user,
# neither writable by group/other, whose sha256 is want. Shared by BOOT and PROBE.
_CACHED = """\
def cached(p, want):
    try:
        dst = os.stat(os.path.dirname(p))
        fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        if dst.st_uid != os.getuid() or dst.st_mode & 0o022:
            return False
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o022:
            return False
        h = sha256()
        while True:
            b = os.read(fd, 1 << 20)
            if not b:
                break
            h.update(b)
        return h.hexdigest() == want
    finally:
        os.close(fd)
"""
BOOT = _HEAD + """\
if sys.version_info < (3, 8):
    sys.stdout.write("CRONIUM-PYTHON-TOO-OLD %d.%d.%d\\n" % tuple(sys.version_info[:3]))
    sys.exit(0)
""" + _CACHED + """\
p, want = sys.argv[1], sys.argv[2]
if not cached(p, want):
    sys.stdout.write("CRONIUM-RUNNER-MISS\\n")
    sys.stdout.flush()
    os._exit(0)
sys.argv = [p] + sys.argv[3:]
sys.path.insert(0, p)
import marshal, zipimport
k = m = None
try:
    c = os.path.join(os.path.dirname(p), "code")
    st = os.stat(c)
    if stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and not st.st_mode & 0o022:
        with open(os.path.join(c, "%s.%s" % (want, sys.implementation.cache_tag)), "rb") as f:
            k = marshal.loads(f.read())
        m = k.get("<main>")
except Exception:
    k = m = None
g = {"__name__": "__main__", "__file__": p + "/__main__.py", "__builtins__": __builtins__,
     "__cronium_code__": (want, k if m is not None else None)}
exec(m if m is not None else zipimport.zipimporter(p).get_code("__main__"), g)
"""
# `run-event --plan`: the host's python3 version and whether the runner is cached; runs nothing else.
PROBE = _HEAD + _CACHED + """\
v = tuple(sys.version_info[:3])
sys.stdout.write("CRONIUM-PROBE %d.%d.%d %s\\n" % (v + ("cached" if cached(sys.argv[1], sys.argv[2]) else "miss",)))
"""
PROBE_RE = re.compile(r"CRONIUM-PROBE (\d+)\.(\d+)\.(\d+) (cached|miss)")

_SHA_RE = re.compile(r"^[0-9a-f]{64}$")

CACHE_DIR_SH = '"${XDG_CACHE_HOME:-$HOME/.cache}/cronium"'
INSTALLED = "CRONIUM-INSTALLED"

assert "'" not in BOOT and "'" not in PROBE


def _check_sha(sha256: str) -> str:
    if not _SHA_RE.match(sha256):
        raise ValueError(f"not a lowercase sha256 hex digest: {sha256!r}")
    return sha256


def runner_file_name(sha256: str) -> str:
    return f"runner-{_check_sha(sha256)}.pyz"


def bootstrap_command(sha256: str, mode: str = "serve") -> str:
    """The exact shell text of PROTOCOL.md §1 (``SHA`` is not secret; nothing secret is in it)."""
    sha = _check_sha(sha256)
    return (
        f"d={CACHE_DIR_SH}; command -v python3 >/dev/null 2>&1 || {{ echo CRONIUM-NO-PYTHON; exit 127; }}; "
        f"exec python3 -I -S -c '{BOOT}' \"$d/runner-{sha}.pyz\" {sha} {mode}"
    )


# Digest check on the host before the rename (the same python3 the bootstrap will use).
_VERIFY = "import hashlib,sys;sys.exit(hashlib.sha256(open(sys.argv[1],\"rb\").read()).hexdigest()!=sys.argv[2])"


def install_command(sha256: str) -> str:
    """One exec: runner bytes on stdin → temp file in the 0700 cache dir → digest check → rename.

    Prints ``CRONIUM-INSTALLED`` on success; on any failure the temp file is removed and the exit
    status is non-zero (the message is on stderr).
    """
    sha = _check_sha(sha256)
    return (
        f"d={CACHE_DIR_SH}; umask 077; mkdir -p \"$d\" && chmod 700 \"$d\" || exit 1; "
        f"t=$(mktemp \"$d/.runner-{sha}.XXXXXX\") || exit 1; "
        "trap 'rm -f \"$t\"' EXIT; trap 'exit 1' HUP INT TERM PIPE; "
        "cat > \"$t\" || exit 1; "
        f"python3 -c '{_VERIFY}' \"$t\" {sha} || {{ echo \"cronium: runner digest mismatch after upload\" >&2; exit 1; }}; "
        "chmod 0600 \"$t\" || exit 1; "
        f"mv -f \"$t\" \"$d/runner-{sha}.pyz\" || exit 1; "
        f"echo {INSTALLED}"
    )


def probe_command(sha256: str) -> str:
    """The host's python3 (``CRONIUM-PROBE x.y.z cached|miss``, or ``CRONIUM-NO-PYTHON``)."""
    sha = _check_sha(sha256)
    return (
        f"d={CACHE_DIR_SH}; command -v python3 >/dev/null 2>&1 || {{ echo CRONIUM-NO-PYTHON; exit 0; }}; "
        f"exec python3 -I -S -c '{PROBE}' \"$d/runner-{sha}.pyz\" {sha}"
    )
