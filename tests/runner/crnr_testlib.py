"""Test-side implementation of the runner wire format (docs/PROTOCOL.md), independent of cronium_fab."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import struct
import subprocess
import tarfile
import time
from dataclasses import dataclass, field

PROTOCOL = 2
RUNNER_ROOT = os.path.join(os.path.dirname(__file__), "..", "..", "runner")


def manifest_text(interpreter: str = "bash", entrypoint: str = "script.sh", extra: str = "") -> str:
    return f"version: v1\ninterpreter: {interpreter}\nentrypoint: {entrypoint}\n{extra}"


def make_tar(members: list[tarfile.TarInfo | tuple[str, bytes | str]], gz: bool = True) -> bytes:
    """A tar(.gz) from (name, data) pairs or ready TarInfo objects (for links, devices, ...)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz" if gz else "w", format=tarfile.PAX_FORMAT) as tar:
        for m in members:
            if isinstance(m, tarfile.TarInfo):
                tar.addfile(m)
                continue
            name, data = m
            raw = data.encode() if isinstance(data, str) else data
            info = tarfile.TarInfo(name)
            info.size = len(raw)
            info.mode = 0o755
            info.mtime = 1_700_000_000
            tar.addfile(info, io.BytesIO(raw))
    return buf.getvalue()


def payload(script: str | bytes, interpreter: str = "bash", entrypoint: str | None = None,
            manifest: str | None = None, extra_files: list | None = None) -> bytes:
    entry = entrypoint or {"bash": "script.sh", "python": "script.py", "node": "script.js"}.get(
        interpreter.lower(), "script.sh")
    man = manifest if manifest is not None else manifest_text(interpreter, entry)
    return make_tar([("manifest.yaml", man), (entry, script)] + list(extra_files or []))


def header(payload_bytes: bytes, **kw) -> dict:
    h = {
        "protocol": PROTOCOL,
        "payload_sha256": hashlib.sha256(payload_bytes).hexdigest(),
        "payload_size": len(payload_bytes),
        "job_id": "job_1", "execution_id": "exec_job_1_7_1700000000", "event_id": 42,
        "event_name": "test event", "server_id": 7, "server_name": "web-1", "user_id": "u1",
        "trigger": "MANUAL", "helper_mode": "bundled", "env": {}, "variables": {}, "input": None,
        "timeout": 30, "kill_grace": 2, "limits": {}, "output_cap": 10 * 1024 * 1024,
        "keep_workdir": False, "pass_env": [],
    }
    h.update(kw)
    return h


def encode_input(hdr: dict, payload_bytes: bytes, protocol: int = PROTOCOL) -> bytes:
    body = json.dumps(hdr).encode()
    return f"CRONIUM-RUNNER-INPUT {protocol} {len(body)}\n".encode() + body + payload_bytes


@dataclass
class Record:
    kind: str
    body: bytes
    ts: float | None = None
    data: bytes = b""


@dataclass
class Served:
    rc: int
    raw: bytes
    stderr: bytes
    hello: dict | None = None
    records: list[Record] = field(default_factory=list)
    result: dict | None = None

    def stream(self, kind: str) -> bytes:
        return b"".join(r.data for r in self.records if r.kind == kind)

    @property
    def stdout(self) -> bytes:
        return self.stream("O")

    @property
    def stderr_script(self) -> bytes:
        return self.stream("E")


def decode(raw: bytes) -> tuple[dict | None, list[Record], dict | None]:
    """Parse `CRNR` + records; asserts the framing is exact (result last and only once)."""
    assert raw[:4] == b"CRNR", raw[:80]
    pos, records, hello, result = 4, [], None, None
    while pos < len(raw):
        assert result is None, "bytes after the result record"
        kind = raw[pos:pos + 1].decode()
        (n,) = struct.unpack(">I", raw[pos + 1:pos + 5])
        body = raw[pos + 5:pos + 5 + n]
        assert len(body) == n, "truncated record"
        assert n <= 64 * 1024, "record over 64 KiB"
        pos += 5 + n
        rec = Record(kind, body)
        if kind in "OE":
            (rec.ts,) = struct.unpack(">d", body[:8])
            rec.data = body[8:]
        elif kind == "H":
            assert hello is None and not records
            hello = json.loads(body)
        elif kind == "R":
            result = json.loads(body)
        elif kind == "K":
            assert n == 0, "keepalive with a body"
        else:
            raise AssertionError(f"unknown record kind {kind!r}")
        records.append(rec)
    return hello, records, result


def serve(py: str, pyz: str, data: bytes, *, env: dict | None = None, keep_open: bool = True,
          timeout: float = 60, after_write=None) -> Served:
    """Run `pyz serve`, feed it `data`, keep stdin open until it ends (unless keep_open=False)."""
    proc = subprocess.Popen([py, pyz, "serve"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env)
    try:
        proc.stdin.write(data)
        proc.stdin.flush()
        if not keep_open:
            proc.stdin.close()
        if after_write is not None:
            after_write(proc)
        out, err = _read_all(proc, timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    s = Served(proc.returncode, out, err)
    s.hello, s.records, s.result = decode(out)
    return s


def _read_all(proc: subprocess.Popen, timeout: float) -> tuple[bytes, bytes]:
    import selectors
    sel = selectors.DefaultSelector()
    bufs = {proc.stdout: bytearray(), proc.stderr: bytearray()}
    for f in bufs:
        sel.register(f, selectors.EVENT_READ)
    end = time.monotonic() + timeout
    while sel.get_map():
        left = end - time.monotonic()
        if left <= 0:
            raise TimeoutError("runner did not finish")
        for key, _ in sel.select(left):
            chunk = os.read(key.fd, 1 << 16)
            if chunk:
                bufs[key.fileobj] += chunk
            else:
                sel.unregister(key.fileobj)
    proc.wait(timeout=max(end - time.monotonic(), 1))
    if proc.stdin and not proc.stdin.closed:
        with contextlib.suppress(BrokenPipeError):
            proc.stdin.close()
    return bytes(bufs[proc.stdout]), bytes(bufs[proc.stderr])


def run_serve(py: str, pyz: str, script: str | bytes, interpreter: str = "bash", *,
              proc_env: dict | None = None, payload_bytes: bytes | None = None, **hdr) -> Served:
    """Serve one script; `proc_env` is the runner's own environment, `hdr` overrides header fields."""
    p = payload_bytes if payload_bytes is not None else payload(script, interpreter)
    return serve(py, pyz, encode_input(header(p, **hdr), p), env=proc_env)


def alive(pid: int) -> bool:
    """True if pid exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return False
    return data[data.rfind(b")") + 2:][:1] != b"Z"
