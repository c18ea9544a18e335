"""The runner's light paths (start-up cost, issue 13) do what the standard modules they replace do.

``jsonc`` = ``json``, ``_FastTar`` = ``tarfile`` (or steps aside), ``lite`` = ``shutil.which`` /
``shutil.rmtree`` / ``shlex.quote``, ``execute.spawn`` = ``subprocess.Popen`` as the runner used it;
and a warm run imports none of the heavy modules.
"""

from __future__ import annotations

import hashlib
import io
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import zlib

import pytest
from crnr_testlib import (
    RUNNER_ROOT,
    _read_all,
    decode,
    encode_input,
    header,
    make_tar,
    manifest_text,
    payload,
    serve,
)

sys.path.insert(0, os.path.abspath(RUNNER_ROOT))

from cronium_runner import execute, lite  # noqa: E402
from cronium_runner.extract import _FastTar  # noqa: E402

JSON_CHECK = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
from cronium_runner import jsonc
values = [None, True, False, 0, -1, 2 ** 70, 1.5, -0.0, 1e300, float("inf"), float("-inf"), "", "a\"b\\c",
          "\u00e9\u4e2d\U0001f600\x00\x1f\u2028", [], {}, [1, [2, {"k": None}]], {"b": 1, "a": [True, "x"]},
          {"nested": {"deep": [1.25, "z", {"e": []}]}}, list(range(50)), {"\u00e9": "\u00e9"}]
for v in values:
    for ascii_ in (True, False):
        for seps in (None, (",", ":"), (", ", ": ")):
            want = json.dumps(v, ensure_ascii=ascii_, separators=seps)
            got = jsonc.dumps(v, ensure_ascii=ascii_, separators=seps)
            assert got == want, (v, ascii_, seps, got, want)
    text = json.dumps(v)
    for t in (text, "  " + text + "\n\t ", json.dumps(v, ensure_ascii=False)):
        a, b = jsonc.loads(t), json.loads(t)
        assert repr(a) == repr(b), (t, a, b)
nan = jsonc.loads("NaN")
assert nan != nan
for bad in ("", " ", "{", "[1,]", "{\"a\" 1}", "1 2", "\"abc", "nul", "\ufeff{}", "[1] x", "01", "{'a': 1}"):
    try:
        json.loads(bad)
    except ValueError as e:
        want = (type(e).__name__, str(e))
    else:
        raise AssertionError("json accepted %r" % bad)
    try:
        jsonc.loads(bad)
    except ValueError as e:
        assert (type(e).__name__, str(e)) == want, (bad, e, want)
    else:
        raise AssertionError("jsonc accepted %r" % bad)
for bad in (object(), {1j: 1}, [set()]):
    msgs = []
    for mod in (json, jsonc):
        try:
            mod.dumps(bad)
        except TypeError as e:
            msgs.append(str(e))
        else:
            raise AssertionError("no TypeError")
    assert msgs[0] == msgs[1], msgs
circ = []
circ.append(circ)
try:
    jsonc.dumps(circ)
except ValueError as e:
    assert "Circular" in str(e)
else:
    raise AssertionError("circular accepted")
print("ok")
"""


def test_jsonc_matches_json(any_py):
    cp = subprocess.run([any_py, "-c", JSON_CHECK, os.path.abspath(RUNNER_ROOT)], capture_output=True, text=True)
    assert cp.returncode == 0 and cp.stdout.strip() == "ok", cp.stderr


# --- tar -------------------------------------------------------------------------------------
def _tar(members, fmt=tarfile.USTAR_FORMAT, gz=True) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz" if gz else "w", format=fmt) as tar:
        for m in members:
            if isinstance(m, tarfile.TarInfo):
                tar.addfile(m)
                continue
            name, data, mode = m
            info = tarfile.TarInfo(name)
            if data is None:
                info.type, info.mode = tarfile.DIRTYPE, mode
                tar.addfile(info)
            else:
                info.size, info.mode = len(data), mode
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _with_tarfile(data: bytes) -> list[tuple]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tar:
        out = []
        for m in tar:
            body = tar.extractfile(m).read() if m.isreg() else b""
            out.append((m.name, m.size, m.mode, m.isdir(), body))
        return out


def _with_fast(fast: _FastTar) -> list[tuple]:
    out = []
    while True:
        m = fast.next()
        if m is None:
            return out
        out.append((m.name, m.size, m.mode, m.isdir(), fast.extractfile(m).read() if m.isreg() else b""))


SIMPLE = [("manifest.yaml", b"version: v1\n", 0o644), ("dir", None, 0o755), ("dir/sub", None, 0o700),
          ("dir/sub/tool", b"#!/bin/sh\necho hi\n" * 100, 0o755), ("script.sh", b"true\n", 0o600),
          ("empty", b"", 0o644), ("d" * 90 + "/" + "f" * 90, b"long ustar name (prefix)", 0o644),
          ("block", b"x" * 512, 0o644), ("big", os.urandom(70000), 0o644)]


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT],
                         ids=["ustar", "gnu", "pax"])
@pytest.mark.parametrize("gz", [True, False], ids=["gz", "plain"])
def test_fast_tar_reads_what_tarfile_reads(fmt, gz):
    members = SIMPLE if fmt == tarfile.USTAR_FORMAT else [m for m in SIMPLE if len(m[0]) < 100]
    data = _tar(members, fmt, gz)
    fast = _FastTar.parse(data)
    assert fast is not None, "a plain archive must take the fast path"
    assert _with_fast(fast) == _with_tarfile(data)


def test_fast_tar_takes_the_controllers_payloads_and_the_tests_archives():
    from cronium_fab.payloads import build_payload_content

    for kind, script in (("BASH", "true"), ("PYTHON", "print('hi')\n" * 1000)):
        data = build_payload_content(7, kind, script).data
        fast = _FastTar.parse(data)
        assert fast is not None and _with_fast(fast) == _with_tarfile(data)
    data = payload("echo hi")
    assert _with_fast(_FastTar.parse(data)) == _with_tarfile(data)


def _link(kind: bytes) -> tarfile.TarInfo:
    i = tarfile.TarInfo("link")
    i.type, i.linkname = kind, "/etc/passwd"
    return i


@pytest.mark.parametrize("data", [
    _tar([("x" * 120, b"needs a PAX header", 0o644)], tarfile.PAX_FORMAT),
    _tar([("x" * 120, b"needs a GNU long name", 0o644)], tarfile.GNU_FORMAT),
    _tar([("caf\u00e9.sh", b"non-ASCII name", 0o644)], tarfile.PAX_FORMAT),
    _tar([("a", b"1", 0o644), _link(tarfile.SYMTYPE)]),
    _tar([("a", b"1", 0o644), _link(tarfile.LNKTYPE)]),
    _tar([_link(tarfile.FIFOTYPE)]),
    _tar([("a", b"1", 0o644)]) + b"trailing bytes after the gzip stream",
    _tar([("a", b"1", 0o644)])[:-9],                                     # truncated gzip
    _tar([("a", b"1" * 2000, 0o644)], gz=False)[:1200],                   # truncated member
    b"",
    b"not an archive at all",
    b"BZh91AY&SY",
], ids=["pax-header", "gnu-longname", "non-ascii", "symlink", "hardlink", "fifo", "gz-trailing",
        "gz-truncated", "truncated", "empty", "garbage", "bz2"])
def test_fast_tar_steps_aside_for_anything_else(data):
    assert _FastTar.parse(data) is None


def test_fast_tar_steps_aside_on_bad_checksum_and_size_limit():
    raw = bytearray(_tar([("a", b"1", 0o644)], gz=False))
    raw[0] ^= 1                                    # name changed, checksum not
    assert _FastTar.parse(bytes(raw)) is None
    big = _tar([("a", b"\0" * (1 << 20), 0o644)])
    assert _FastTar.parse(big, limit=1 << 19) is None
    assert _FastTar.parse(big) is not None
    assert zlib.decompress(big, 31)[:1] == b"a"


def test_refusals_are_the_same_on_the_fast_path(py, pyz, tmpdir_env):
    env, _ = tmpdir_env
    dup = make_tar([("manifest.yaml", "version: v1\ninterpreter: bash\nentrypoint: script.sh\n"),
                    ("script.sh", "true"), ("script.sh", "again")])
    assert _FastTar.parse(dup) is not None
    s = serve(py, pyz, encode_input(header(dup), dup), env=env)
    assert s.result["error_kind"] == "extract" and "appears twice" in s.result["error"]


# --- lite ------------------------------------------------------------------------------------
def test_quote_is_shlex_quote():
    for s in ["", "a", "abc-_./=:,+@%", "a b", "it's", "'", '"', "$HOME", "a\nb", "\u00e9", "*", "-x", "~"]:
        assert lite.quote(s) == shlex.quote(s), s


def test_which_is_shutil_which(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "tool").write_text("not executable")
    (b / "tool").write_text("#!/bin/sh\n")
    (b / "tool").chmod(0o755)
    (a / "dir").mkdir()
    (b / "dir").mkdir()
    (b / "dir").chmod(0o755)
    path = os.pathsep.join([str(a), str(a), str(b), "/usr/bin"])
    for name in ("tool", "dir", "sh", "no-such-tool", str(b / "tool"), str(a / "tool")):
        assert lite.which(name, path=path) == shutil.which(name, path=path), name
    assert lite.which("sh", path="") is None


def test_rmtree_removes_without_following_links(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("keep")
    tree = tmp_path / "tree"
    (tree / "a" / "b").mkdir(parents=True)
    (tree / "a" / "b" / "f").write_text("x")
    (tree / "link-to-dir").symlink_to(outside)
    (tree / "a" / "link-to-file").symlink_to(outside / "keep")
    (tree / "dangling").symlink_to(tmp_path / "nowhere")
    lite.rmtree(str(tree))
    assert not tree.exists() and (outside / "keep").read_text() == "keep"
    link = tmp_path / "link"
    link.symlink_to(outside)
    lite.rmtree(str(link))
    assert (outside / "keep").exists()
    lite.rmtree(str(tmp_path / "missing"))        # errors are ignored


def test_sha256_is_hashlibs_on_both_sides_of_the_size_rule():
    """Built-in SHA-256 under lite.SMALL_HASH (no OpenSSL import on the warm path), hashlib above
    (SHA-NI): the same digests either way."""
    for n in (0, 3, lite.SMALL_HASH - 1, lite.SMALL_HASH, 3 * lite.SMALL_HASH + 7):
        data = bytes(range(256)) * (n // 256) + b"x" * (n % 256)
        assert lite.sha256(data).hexdigest() == hashlib.sha256(data).hexdigest(), n
    if lite._small_sha256 is not None:      # CPython always has it
        assert "hashlib" not in type(lite.sha256(b"x")).__module__
        assert "hashlib" in type(lite.sha256(b"x" * lite.SMALL_HASH)).__module__


# --- spawn -----------------------------------------------------------------------------------
def _run(argv, cwd, preexec=lambda: None) -> tuple[int, bytes, bytes]:
    pid, out, err = execute.spawn(argv, cwd, {"PATH": "/usr/bin:/bin"}, preexec)
    chunks = {out: b"", err: b""}
    for fd in (out, err):
        while True:
            data = os.read(fd, 65536)
            if not data:
                break
            chunks[fd] += data
        os.close(fd)
    _, status = os.waitpid(pid, 0)
    return status, chunks[out], chunks[err]


def test_spawn_like_popen(tmp_path):
    code = ("import os, sys; print(sorted(int(f) for f in os.listdir('/proc/self/fd'))[:3]);"
            "print(os.getsid(0) == os.getpid(), os.getcwd());"
            "print(repr(sys.stdin.read())); sys.stderr.write('err')")
    leak = os.open(os.devnull, os.O_RDONLY)
    os.set_inheritable(leak, True)           # close_fds: even inheritable fds stay behind
    try:
        status, out, err = _run([sys.executable, "-I", "-S", "-c", code], str(tmp_path))
    finally:
        os.close(leak)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, err
    lines = out.decode().splitlines()
    assert lines[0] == "[0, 1, 2]"                      # only the listing's own fd beyond 0-2
    assert lines[1] == f"True {tmp_path}"
    assert lines[2] == "''" and err == b"err"
    # Python ignores SIGPIPE and SIGXFSZ; a program it starts must not (as with subprocess)
    status, out, _ = _run(["/bin/sh", "-c", "grep SigIgn /proc/self/status"], str(tmp_path))
    ignored = int(out.split()[1], 16)
    assert not ignored & (1 << 12) and not ignored & (1 << 24), out


def test_spawn_errors_like_popen(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        execute.spawn([str(tmp_path / "missing")], str(tmp_path), {}, lambda: None)
    assert e.value.filename == str(tmp_path / "missing")
    with pytest.raises(FileNotFoundError) as e:
        execute.spawn(["/bin/true"], str(tmp_path / "no-dir"), {}, lambda: None)
    assert e.value.filename == str(tmp_path / "no-dir")
    (tmp_path / "noexec").write_text("x")
    with pytest.raises(PermissionError):
        execute.spawn([str(tmp_path / "noexec")], str(tmp_path), {}, lambda: None)

    def boom():
        raise ValueError("bad limit")
    with pytest.raises(execute.SubprocessError, match="preexec_fn"):
        execute.spawn(["/bin/true"], str(tmp_path), {}, boom)
    assert _zombie_children() == []                    # every failed child was reaped


def _zombie_children():
    """Our children that ended and were never reaped (other children, e.g. test sshds, may run)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open("/proc/%s/stat" % entry) as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[1] == str(os.getpid()) and fields[0] == "Z":
                found.append(int(entry))
    return found


def test_libc_prctl_without_ctypes():
    libc = execute._libc()
    assert libc is not None and libc.prctl(execute.PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0) == 0


# --- what a warm run imports -----------------------------------------------------------------
HEAVY = {"re", "enum", "json", "subprocess", "shutil", "shlex", "tarfile", "ctypes", "importlib.util",
         "signal", "locale", "threading", "zipfile", "gzip", "bz2", "lzma"}


def _boot_serve(py: str, runner: str, data: bytes, env: dict, *flags: str) -> tuple[dict, bytes]:
    """Serve as over SSH: the controller's bootstrap (``python3 -I -S -c BOOT``), not ``python pyz``
    (which goes through runpy and its imports)."""
    from cronium_fab.remote.runner_cache import BOOT

    with open(runner, "rb") as f:
        sha = hashlib.sha256(f.read()).hexdigest()
    proc = subprocess.Popen([py, "-I", "-S", *flags, "-c", BOOT, runner, sha, "serve"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    proc.stdin.write(data)
    proc.stdin.flush()
    out, err = _read_all(proc, 60)
    return decode(out)[2], err


def test_a_warm_run_imports_nothing_heavy(any_py, pyz, tmp_path):
    runner = tmp_path / "runner.pyz"
    shutil.copy(pyz, runner)
    runner.chmod(0o600)
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache"), TMPDIR=str(tmp_path))
    p = payload("true")
    # the manifest in the header, bound by its digest, as the controller sends it (no YAML to parse:
    # the YAML subset parser is the one part that needs ``re``)
    man = manifest_text().encode()
    data = encode_input(header(p, manifest={"version": "v1", "interpreter": "bash", "entrypoint": "script.sh"},
                               manifest_sha256=hashlib.sha256(man).hexdigest()), p)
    assert _boot_serve(any_py, str(runner), data, env)[0]["status"] == "success"   # fills the code cache
    result, err = _boot_serve(any_py, str(runner), data, env, "-X", "importtime")
    assert result["status"] == "success"
    # what the bootstrap itself imports (hashlib, zipimport) is not the runner's doing
    bare = subprocess.run([any_py, "-I", "-S", "-X", "importtime", "-c", "import os, stat, hashlib, zipimport"],
                          env=env, capture_output=True)
    imported = _imports(err) - _imports(bare.stderr)
    assert "cronium_runner.cli" in imported
    assert not imported & HEAVY, (sorted(imported & HEAVY), err.decode())


# --- the bootstrap runs __main__ from the private code cache -----------------------------------
POISON = "import os; os.write(1, b'FROM-THE-CODE-CACHE'); os._exit(0)"


def _warm_runner(any_py: str, pyz: str, tmp_path) -> tuple[str, dict, bytes, str]:
    """A runner installed where the bootstrap command puts it, its env and input, after one run
    that filled its code cache; and that file."""
    with open(pyz, "rb") as f:
        sha = hashlib.sha256(f.read()).hexdigest()
    (tmp_path / "cache" / "cronium").mkdir(parents=True, mode=0o700)
    runner = tmp_path / "cache" / "cronium" / f"runner-{sha}.pyz"
    shutil.copy(pyz, runner)
    runner.chmod(0o600)
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache"), TMPDIR=str(tmp_path))
    p = payload("echo hi")
    data = encode_input(header(p), p)
    assert _boot_serve(any_py, str(runner), data, env)[0]["status"] == "success"
    (cache,) = (tmp_path / "cache" / "cronium" / "code").iterdir()
    return str(runner), env, data, str(cache)


def _boot_stdout(any_py: str, runner: str, data: bytes, env: dict) -> bytes:
    from cronium_fab.remote.runner_cache import BOOT

    with open(runner, "rb") as f:
        sha = hashlib.sha256(f.read()).hexdigest()
    proc = subprocess.Popen([any_py, "-I", "-S", "-c", BOOT, runner, sha, "serve"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    proc.stdin.write(data)
    proc.stdin.flush()
    return _read_all(proc, 60)[0]


def _poison(any_py: str, cache: str) -> None:
    """Swap the cached __main__ for code that says where it came from (with the target's own
    interpreter: the marshal format is its own)."""
    code = ("import marshal, sys\n"
            "codes = marshal.loads(open(sys.argv[1], 'rb').read())\n"
            "assert '<main>' in codes and 'cronium_runner.cli' in codes, sorted(codes)\n"
            "codes['<main>'] = compile(sys.argv[2], 'poison', 'exec')\n"
            "open(sys.argv[1], 'wb').write(marshal.dumps(codes))\n")
    subprocess.run([any_py, "-I", "-S", "-c", code, cache, POISON], check=True)


def test_a_warm_bootstrap_runs_main_from_the_code_cache(any_py, pyz, tmp_path):
    runner, env, data, cache = _warm_runner(any_py, pyz, tmp_path)
    _poison(any_py, cache)   # stands for "compiled code came from the cache, not from __main__.py"
    assert _boot_stdout(any_py, runner, data, env) == b"FROM-THE-CODE-CACHE"


def test_the_bootstrap_ignores_a_code_cache_others_can_write(any_py, pyz, tmp_path):
    runner, env, data, cache = _warm_runner(any_py, pyz, tmp_path)
    _poison(any_py, cache)
    os.chmod(os.path.dirname(cache), 0o777)
    out = _boot_stdout(any_py, runner, data, env)
    assert b"FROM-THE-CODE-CACHE" not in out and decode(out)[2]["status"] == "success"


def test_the_bootstrap_runs_through_a_broken_code_cache(any_py, pyz, tmp_path):
    runner, env, data, cache = _warm_runner(any_py, pyz, tmp_path)
    with open(cache, "wb") as f:
        f.write(b"not marshal data")
    assert decode(_boot_stdout(any_py, runner, data, env))[2]["status"] == "success"


def _imports(stderr: bytes) -> set[str]:
    return {line.rsplit("|", 1)[1].strip() for line in stderr.decode().splitlines()
            if line.startswith("import time:") and "|" in line}


def test_a_python_script_pays_no_helper_imports(py, pyz, script_python, tmp_path):
    """``cronium`` is imported (sitecustomize) by every Python script: it must not cost json & co."""
    s = serve(py, pyz, encode_input(header(payload("pass", "python"), env={"PYTHONPROFILEIMPORTTIME": "1"},
                                           interpreters={"python": script_python}), payload("pass", "python")),
              env=dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache"), TMPDIR=str(tmp_path)))
    assert s.result["status"] == "success", s.result
    bare = subprocess.run([script_python, "-c", "pass"], env={"PYTHONPROFILEIMPORTTIME": "1", "PATH": "/usr/bin:/bin"},
                          capture_output=True)
    imported = _imports(s.stderr_script) - _imports(bare.stderr)
    assert "cronium" in imported
    assert not imported & {"json", "re", "enum", "importlib.util", "collections", "functools"}, sorted(imported)


# --- the helper programs: written once per runner version and interpreter ------------------
HELPERS_SCRIPT = ('printf "%s\\n" "$PYTHONPATH" "$BASH_ENV" "$(command -v cronium.output)"; '
                  'cronium.output \'{"n": 1}\'; cronium_set_variable k v')


def _helper_run(py, pyz, cache):
    p = payload(HELPERS_SCRIPT)
    s = serve(py, pyz, encode_input(header(p), p), env=dict(os.environ, XDG_CACHE_HOME=str(cache)))
    assert s.result["status"] == "success", (s.result, s.stderr_script)
    assert s.result["output"] == {"n": 1} and s.result["variables"] == {"k": "v"}
    lib, bash_env, command = s.stdout.decode().splitlines()
    assert bash_env == os.path.join(lib, "bash_env.sh") and command == os.path.join(lib, "cronium.output")
    return lib


def test_helpers_come_from_the_private_cache(py, pyz, tmp_path):
    cache = tmp_path / "cache"
    first = _helper_run(py, pyz, cache)
    assert first.startswith(str(cache / "cronium" / "helpers") + "/")
    assert os.stat(first).st_mode & 0o777 == 0o700
    assert _helper_run(py, pyz, cache) == first          # the next run reuses it
    assert [p for p in os.listdir(os.path.dirname(first)) if p.endswith(".tmp")] == []


def test_helpers_per_run_when_the_cache_is_not_private(py, pyz, tmp_path):
    cache = tmp_path / "cache"
    (cache / "cronium").mkdir(parents=True)
    (cache / "cronium").chmod(0o777)                      # writable by others: not trusted
    lib = _helper_run(py, pyz, cache)
    assert "/cronium-run-" in lib and lib.endswith("/.cronium/lib")
    assert not (cache / "cronium" / "helpers").exists()


def test_a_broken_helper_cache_is_not_used(py, pyz, tmp_path):
    cache = tmp_path / "cache"
    lib = _helper_run(py, pyz, cache)
    os.unlink(os.path.join(lib, ".complete"))             # e.g. half deleted by hand
    assert "/cronium-run-" in _helper_run(py, pyz, cache)
