"""A tiny stand-in runner zipapp that speaks the PROTOCOL.md framing (for session tests).

Behaviour comes from the header's ``fake`` object: ``emit`` ([["O"|"E", text], ...]),
``wait_eof`` (wait for stdin EOF, then answer ``cancelled``), ``ignore_eof`` (never answer).
"""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

from cronium_fab.build import RunnerArtifact

MAIN = r'''
import hashlib, json, os, struct, sys, time

def rec(kind, body):
    return kind + struct.pack(">I", len(body)) + body

def write(b):
    while b:
        b = b[os.write(1, b):]

def read_exact(n):
    parts = []
    while n:
        d = os.read(0, n)
        if not d:
            return None
        parts.append(d)
        n -= len(d)
    return b"".join(parts)

def main():
    if sys.argv[1:] != ["serve"]:
        sys.stderr.write("fake runner: usage serve\n")
        return 2
    with open(sys.argv[0], "rb") as f:
        sha = hashlib.sha256(f.read()).hexdigest()
    hello = {"magic": "CRNR", "protocol": 2, "version": "fake", "sha256": sha, "pid": os.getpid(),
             "python": "%d.%d.%d" % sys.version_info[:3]}
    write(b"CRNR" + rec(b"H", json.dumps(hello).encode()))
    line = b""
    while not line.endswith(b"\n"):
        c = os.read(0, 1)
        if not c:
            return 3
        line += c
    magic, proto, size = line.split()
    header = json.loads(read_exact(int(size)))
    payload = read_exact(header["payload_size"])
    fake = header.get("fake", {})
    for kind, text in fake.get("emit", [["O", "hello\n"], ["E", "oops\n"]]):
        write(rec(kind.encode(), struct.pack(">d", time.time()) + text.encode()))
    status = "success"
    if fake.get("ignore_eof"):
        time.sleep(3)
    if fake.get("wait_eof"):
        while os.read(0, 65536):
            pass
        status = "cancelled"
    res = {"status": status, "exit_code": 0 if status == "success" else None,
           "payload_sha256": hashlib.sha256(payload).hexdigest(), "header": header,
           "env": {k: os.environ.get(k) for k in ("XDG_CACHE_HOME", "TMPDIR")}}
    write(rec(b"R", json.dumps(res).encode()))
    return 0

sys.exit(main())
'''


def build_fake_runner(dist: Path, pad_bytes: int = 0) -> RunnerArtifact:
    """Write a fake runner zipapp, made bigger by ``pad_bytes`` of random data when asked."""
    import os

    dist.mkdir(parents=True, exist_ok=True)
    path = dist / f"fake-runner-{pad_bytes}.pyz"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("__main__.py", MAIN)
        if pad_bytes:
            zf.writestr("pad.bin", os.urandom(pad_bytes))
    data = path.read_bytes()
    return RunnerArtifact(path, hashlib.sha256(data).hexdigest(), len(data))
