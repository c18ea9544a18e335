"""Benchmark: a helper call (getVariable) from a script on a local sshd host, through the SSH remote
forward vs directly against the same helper API on localhost, in the same run.

Run by hand: ``.venv/bin/python bench/bench_api_mode.py [--calls 2000]``. The script on the host is
the runner's real helper module (``runner/cronium_runner/shims/cronium.py``: one keep-alive HTTP/1.1
connection per process), sent on stdin with its environment, so the token never appears in argv.
Goals (issue 5): tunnel median ≤ 3× direct, ≥ 500 calls/s through one host's tunnel.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
import tempfile
from pathlib import Path

import paramiko

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cronium_fab.db.engine import Database  # noqa: E402
from cronium_fab.helper_api import ExecutionContext, HelperAPI  # noqa: E402
from cronium_fab.records import set_variable  # noqa: E402
from cronium_fab.remote.connection import HostTarget, SSHSettings, open_connection  # noqa: E402
from cronium_fab.remote.known_hosts import KnownHostsStore, host_entry_name  # noqa: E402
from cronium_fab.remote.tunnel import RemoteForward  # noqa: E402
from cronium_fab.testing.factories import add_user  # noqa: E402
from cronium_fab.testing.hosts import DevHostPool  # noqa: E402

SCRIPT = r'''
import os, sys, time, types, json
src = {shim!r}
def measure(endpoint, calls):
    os.environ.update({{"CRONIUM_HELPER_MODE": "api", "CRONIUM_RUNTIME_API": endpoint,
                        "CRONIUM_EXECUTION_TOKEN": {token!r}, "CRONIUM_EXECUTION_ID": {eid!r}}})
    mod = types.ModuleType("cronium"); mod.__file__ = "/nonexistent/cronium.py"
    exec(compile(src, "cronium.py", "exec"), mod.__dict__)
    assert mod.getVariable("bench") == "value"
    lat = []
    t0 = time.perf_counter()
    for _ in range(calls):
        t = time.perf_counter(); mod.getVariable("bench"); lat.append(time.perf_counter() - t)
    total = time.perf_counter() - t0
    lat.sort()
    return {{"median_ms": lat[len(lat) // 2] * 1000, "p95_ms": lat[int(len(lat) * 0.95)] * 1000,
             "calls_per_s": calls / total}}
out = {{"direct": measure({direct!r}, {calls}), "tunnel": measure({tunnel!r}, {calls}),
        "direct2": measure({direct!r}, {calls})}}
print(json.dumps(out))
'''


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=2000)
    args = ap.parse_args()
    shim = (ROOT / "runner" / "cronium_runner" / "shims" / "cronium.py").read_text()
    with tempfile.TemporaryDirectory(prefix="cfab-bench-api-") as tmp:
        work = Path(tmp)
        db = Database(f"sqlite:///{work / 'db.sqlite'}")
        db.init()
        add_user(db, "u1")
        with db.session() as s:
            set_variable(s, "u1", "bench", "value")
        pool = DevHostPool(work / "hosts")
        try:
            (host,) = pool.add_hosts(1)
            kh = work / "known_hosts"
            kind, b64 = host.host_public_key.split()[:2]
            KnownHostsStore(kh).add(host_entry_name(host.address, host.port),
                                    paramiko.PKey.from_type_string(kind, base64.b64decode(b64)))
            conn = open_connection(HostTarget(name=host.name, host=host.address, port=host.port, user=host.user,
                                              private_key=host.private_key_text, use_ssh_config=False),
                                   SSHSettings(known_hosts_path=kh, system_known_hosts=()))
            with HelperAPI(db, rate_per_s=None) as api:
                eid = "exec_bench_1"
                token = api.register_execution(ExecutionContext(execution_id=eid, job_id="job_bench", event_id=1,
                                                                event_name="bench", user_id="u1", server_id=None,
                                                                server_name=host.name))
                with RemoteForward(conn, "127.0.0.1", api.port) as fwd:
                    script = SCRIPT.format(shim=shim, token=token, eid=eid, calls=args.calls,
                                           direct=f"http://127.0.0.1:{api.port}",
                                           tunnel=f"http://127.0.0.1:{fwd.remote_port}")
                    chan = conn.transport.open_session()
                    chan.exec_command("python3 -")
                    chan.sendall(script.encode())
                    chan.shutdown_write()
                    out = b""
                    while True:
                        chunk = chan.recv(65536)
                        if not chunk:
                            break
                        out += chunk
                    err = chan.makefile_stderr().read()
                    if chan.recv_exit_status() != 0:
                        raise SystemExit(err.decode())
            conn.close()
        finally:
            pool.stop()
            db.dispose()
    r = json.loads(out)
    d, t = r["direct"], r["tunnel"]
    print(f"getVariable from a script on a local sshd host, {args.calls} calls each, keep-alive connection")
    print(f"  direct to the API   median {d['median_ms']:.3f} ms  p95 {d['p95_ms']:.3f} ms  "
          f"{d['calls_per_s']:.0f} calls/s  (again after the tunnel: median {r['direct2']['median_ms']:.3f} ms)")
    print(f"  through the tunnel  median {t['median_ms']:.3f} ms  p95 {t['p95_ms']:.3f} ms  {t['calls_per_s']:.0f} calls/s")
    print(f"  ratio tunnel/direct (median): {t['median_ms'] / d['median_ms']:.2f}x   goal <= 3x, >= 500 calls/s")


if __name__ == "__main__":
    main()
