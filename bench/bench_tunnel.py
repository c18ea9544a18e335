"""Latency and throughput of a remote forward (``cronium_fab.remote.tunnel.RemoteForward``).

Run by hand (not a test):  .venv/bin/python bench/bench_tunnel.py [-n 2000] [--clients 4]

Starts one local sshd host (devhosts), a small HTTP/1.1 server in this process (like the helper
API) and a forward to it. The HTTP client runs ON THE TARGET (python3 through an exec channel, as a
script would) and times, in the same run, requests through the tunnel (127.0.0.1:<remote_port>)
and directly to the local server (reachable because the test hosts are 127.0.0.x on this machine):

- new connection per request (what one urllib call per helper does);
- keep-alive: one HTTP/1.1 connection, many requests (median latency and requests/s);
- ``--clients`` keep-alive clients at once through the one tunnel (aggregate requests/s).

Goal: tunnel median <= 3x direct, >= 500 requests/s through one tunnel.
"""

from __future__ import annotations

import argparse
import http.server
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cronium_fab.remote import HostTarget, SSHSettings, open_connection  # noqa: E402
from cronium_fab.remote.tunnel import RemoteForward  # noqa: E402
from cronium_fab.testing.hosts import start_hosts  # noqa: E402

CLIENT = r"""
import http.client, json, socket, sys, threading, time
port, mode, n, clients = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
BODY = b'{"key": "k"}'

def one_conn(times):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    c.connect()
    c.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return c

def fresh(k, times):
    for _ in range(k):
        t = time.perf_counter()
        c = one_conn(times)
        c.request("GET", "/api/variable/k")
        c.getresponse().read()
        c.close()
        times.append(time.perf_counter() - t)

def keepalive(k, times):
    c = one_conn(times)
    for _ in range(k):
        t = time.perf_counter()
        c.request("GET", "/api/variable/k")
        c.getresponse().read()
        times.append(time.perf_counter() - t)
    c.close()

fn = fresh if mode == "fresh" else keepalive
fn(20, [])  # warm-up
lists = [[] for _ in range(clients)]
ths = [threading.Thread(target=fn, args=(n, lists[i])) for i in range(clients)]
t0 = time.perf_counter()
for t in ths: t.start()
for t in ths: t.join()
wall = time.perf_counter() - t0
print(json.dumps({"times": [x for l in lists for x in l], "wall": wall}))
"""


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body are separate writes: without TCP_NODELAY on the server's socket, Nagle
    # holds the body until the client's delayed ACK (~40 ms per keep-alive request).
    disable_nagle_algorithm = True

    def do_GET(self) -> None:
        body = b'{"success": true, "data": {"key": "k", "value": 1}}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def run_client(conn: Any, port: int, mode: str, n: int, clients: int) -> dict[str, Any]:
    chan = conn.transport.open_session()
    chan.exec_command(f"python3 - {port} {mode} {n} {clients}")
    chan.sendall(CLIENT.encode())
    chan.shutdown_write()
    out = chan.makefile("rb").read()
    err = chan.makefile_stderr("rb").read()
    status = chan.recv_exit_status()
    chan.close()
    if status:
        raise SystemExit(f"client failed ({status}): {err.decode()}")
    result: dict[str, Any] = json.loads(out)
    return result


def summary(r: dict[str, Any]) -> tuple[float, float, float]:
    times = sorted(r["times"])
    med = statistics.median(times) * 1000
    p95 = times[int(len(times) * 0.95)] * 1000
    rps = len(times) / r["wall"]
    return med, p95, rps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=2000, help="requests per client per measurement")
    ap.add_argument("--clients", type=int, default=4, help="parallel keep-alive clients for the aggregate run")
    args = ap.parse_args()

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    local_port = srv.server_address[1]

    base = Path(tempfile.mkdtemp(prefix="bench-tunnel-"))
    pool = start_hosts(1, base / "hosts")
    try:
        h = pool.hosts[0]
        target = HostTarget(name=h.name, host=h.address, port=h.port, user=h.user,
                            private_key=h.private_key_text, use_ssh_config=False)
        settings = SSHSettings(host_key_policy="accept-new", known_hosts_path=base / "known_hosts",
                               system_known_hosts=())
        conn = open_connection(target, settings)
        t = time.perf_counter()
        fwd = RemoteForward(conn, "127.0.0.1", local_port, name=h.name)
        fwd.open()
        open_ms = (time.perf_counter() - t) * 1000
        print(f"forward open: {open_ms:.2f} ms (remote port {fwd.remote_port})")
        assert fwd.remote_port is not None
        print(f"{'measurement':<34} {'median ms':>10} {'p95 ms':>8} {'req/s':>8}")
        rows: dict[str, tuple[float, float, float]] = {}
        for mode, clients in (("fresh", 1), ("keepalive", 1), ("keepalive", args.clients)):
            for where, port in (("direct", local_port), ("tunnel", fwd.remote_port)):
                label = f"{mode} x{clients} {where}"
                rows[label] = med, p95, rps = summary(run_client(conn, port, mode, args.n, clients))
                print(f"{label:<34} {med:>10.3f} {p95:>8.3f} {rps:>8.0f}")
        for mode, clients in (("fresh", 1), ("keepalive", 1), ("keepalive", args.clients)):
            d = rows[f"{mode} x{clients} direct"][0]
            tu = rows[f"{mode} x{clients} tunnel"][0]
            print(f"{mode} x{clients}: tunnel/direct median = {tu / d:.2f}x")
        t = time.perf_counter()
        fwd.close()
        print(f"forward close: {(time.perf_counter() - t) * 1000:.2f} ms; "
              f"channels relayed {fwd.channels_total}, refused {fwd.channels_refused}")
        conn.close()
    finally:
        pool.stop()
        srv.shutdown()


if __name__ == "__main__":
    main()
