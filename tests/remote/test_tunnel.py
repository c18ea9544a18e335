"""Remote forwards (API mode tunnel) against real sshd hosts.

The forwarded listener is on the target's loopback; our test hosts are 127.0.0.x on this machine,
so requests are made both from the target (python3 run through an exec channel) and straight from
this process to 127.0.0.1:<remote_port>.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import http.server
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import paramiko
import pytest

from cronium_fab.remote import RemoteError
from cronium_fab.remote.tunnel import RemoteForward, TunnelError, TunnelRefused, open_remote_forward

pytestmark = pytest.mark.ssh

MIB = 1024 * 1024


def _body(n: int) -> bytes:
    return (b"0123456789abcdef" * (n // 16 + 1))[:n]


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # /bytes/N -> N bytes; anything else -> "hello"
        parts = self.path.strip("/").split("/")
        body = _body(int(parts[1])) if parts[0] == "bytes" else b"hello"
        self._reply(body)

    def do_POST(self) -> None:  # the sha256 of the request body
        data = self.rfile.read(int(self.headers["Content-Length"]))
        self._reply(hashlib.sha256(data).hexdigest().encode())

    def _reply(self, body: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def http_server() -> Iterator[int]:
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    yield srv.server_address[1]
    srv.shutdown()
    srv.server_close()
    t.join(5)


def get(port: int, path: str = "/", *, method: str = "GET", body: bytes | None = None) -> bytes:
    """One request on its own connection, closed afterwards (from this process)."""
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        c.request(method, path, body=body)
        r = c.getresponse()
        assert r.status == 200
        return r.read()
    finally:
        c.close()


def exec_(conn: object, cmd: str, stdin: bytes = b"") -> tuple[int, bytes, bytes]:
    chan = conn.transport.open_session()  # type: ignore[attr-defined]
    try:
        chan.exec_command(cmd)
        if stdin:
            chan.sendall(stdin)
        chan.shutdown_write()
        out = chan.makefile("rb").read()
        err = chan.makefile_stderr("rb").read()
        return chan.recv_exit_status(), out, err
    finally:
        chan.close()


REMOTE_GET = """
import hashlib, sys, urllib.request
url = sys.argv[1]
try:
    data = urllib.request.urlopen(url, timeout=10).read()
    print(len(data), hashlib.sha256(data).hexdigest())
except Exception as e:
    print("ERROR", type(e).__name__, e)
"""


def remote_get(conn: object, port: int, path: str) -> str:
    """A request made ON THE TARGET against its 127.0.0.1:port (python3 through an exec channel)."""
    status, out, err = exec_(conn, f"python3 - http://127.0.0.1:{port}{path}", REMOTE_GET.encode())
    assert status == 0, err
    return out.decode().strip()


def expect(n: int) -> str:
    return f"{n} {hashlib.sha256(_body(n)).hexdigest()}"


def port_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
        return True
    except OSError:
        return False


def open_fds() -> int:
    """This process's sockets and pipes (Paramiko channels selected on use a pipe each)."""
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        n += target.startswith(("socket:", "pipe:"))
    return n


def settle(expected_threads: int, expected_fds: int, timeout: float = 5.0) -> tuple[int, int]:
    """Counts once they are back at the baseline, or the last counts after ``timeout``: the HTTP
    server's per-request threads and sshd's side of closed channels end a few ms after a response."""
    deadline = time.monotonic() + timeout
    while True:
        counts = threading.active_count(), open_fds()
        if counts == (expected_threads, expected_fds) or time.monotonic() > deadline:
            return counts
        time.sleep(0.02)


def test_request_through_forward_both_ways(ssh_hosts, connect, http_server):
    (host,) = ssh_hosts(1)
    conn = connect(host)
    with RemoteForward(conn, "127.0.0.1", http_server) as fwd:
        port = fwd.remote_port
        assert isinstance(port, int) and port > 0
        assert fwd.active
        # from this process (the target's loopback is ours)
        assert get(port, "/") == b"hello"
        assert get(port, f"/bytes/{MIB}") == _body(MIB)
        big = os.urandom(MIB)
        assert get(port, "/", method="POST", body=big) == hashlib.sha256(big).hexdigest().encode()
        # from the target itself
        assert remote_get(conn, port, "/bytes/5") == expect(5)
        assert remote_get(conn, port, f"/bytes/{MIB}") == expect(MIB)
        assert fwd.channels_refused == 0
        assert fwd.channels_total == 5
    assert not fwd.active
    assert not port_open(port)
    fwd.close()  # idempotent
    assert exec_(conn, "echo ok")[1] == b"ok\n"


def test_keep_alive_requests_on_one_tunnel_connection(ssh_hosts, connect, http_server):
    (host,) = ssh_hosts(1)
    conn = connect(host)
    with RemoteForward(conn, "127.0.0.1", http_server) as fwd:
        assert fwd.remote_port is not None
        c = http.client.HTTPConnection("127.0.0.1", fwd.remote_port, timeout=10)
        for n in (1, 70_000, 3, MIB, 0):
            c.request("GET", f"/bytes/{n}")
            assert c.getresponse().read() == _body(n)
        c.close()
        assert fwd.channels_total == 1


def test_two_connections_to_one_host_get_distinct_ports(ssh_hosts, connect, http_server):
    (host,) = ssh_hosts(1)
    conn_a, conn_b = connect(host), connect(host)
    with RemoteForward(conn_a, "127.0.0.1", http_server) as a, RemoteForward(conn_b, "127.0.0.1", http_server) as b:
        assert a.remote_port != b.remote_port
        assert get(a.remote_port, "/bytes/10") == _body(10)
        assert get(b.remote_port, "/bytes/11") == _body(11)
        assert remote_get(conn_a, b.remote_port, "/bytes/12") == expect(12)
        assert remote_get(conn_b, a.remote_port, "/bytes/13") == expect(13)


def test_two_forwards_on_one_connection_are_routed_by_port(ssh_hosts, connect, http_server):
    """Paramiko has one tcp handler per transport; ours dispatches by port, so neither hijacks the other."""
    other = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    other.daemon_threads = True
    threading.Thread(target=other.serve_forever, daemon=True).start()
    try:
        (host,) = ssh_hosts(1)
        conn = connect(host)
        a = open_remote_forward(conn, "127.0.0.1", http_server)
        b = open_remote_forward(conn, "127.0.0.1", other.server_address[1])
        assert a.remote_port != b.remote_port
        assert get(a.remote_port, "/bytes/3") == _body(3)
        assert get(b.remote_port, "/bytes/4") == _body(4)
        assert (a.channels_total, b.channels_total) == (1, 1)
        a.close()
        assert not port_open(a.remote_port)
        assert get(b.remote_port, "/bytes/5") == _body(5)  # closing a left b working
        b.close()
    finally:
        other.shutdown()
        other.server_close()


def test_forwarding_disabled_raises_tunnel_refused(ssh_hosts, connect):
    (host,) = ssh_hosts(1, allow_tcp_forwarding=False)
    conn = connect(host)
    threads = threading.active_count()
    fwd = RemoteForward(conn, "127.0.0.1", 9, name=host.name)
    with pytest.raises(TunnelRefused) as info:
        fwd.open()
    e = info.value
    assert isinstance(e, TunnelError) and isinstance(e, RemoteError)
    assert e.kind == "forwarding-refused"
    assert e.host == host.name
    assert "refused remote port forwarding" in str(e) and "AllowTcpForwarding" in str(e)
    assert fwd.remote_port is None and not fwd.active
    fwd.close()
    assert settle(threads, open_fds())[0] <= threads  # the relay thread is gone (others may end meanwhile)
    assert conn.transport.is_active()
    assert exec_(conn, "echo still")[1] == b"still\n"


def test_local_server_down_keeps_transport(ssh_hosts, connect):
    (host,) = ssh_hosts(1)
    conn = connect(host)
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    dead_port = s.getsockname()[1]
    s.close()  # nobody listens there: connects are refused
    with RemoteForward(conn, "127.0.0.1", dead_port) as fwd:
        out = remote_get(conn, fwd.remote_port, "/")
        assert out.startswith("ERROR"), out
        with pytest.raises((ConnectionError, http.client.HTTPException, OSError)):
            get(fwd.remote_port, "/")
        assert fwd.channels_refused == 2
        assert conn.transport.is_active()
        assert fwd.active
        assert exec_(conn, "echo alive")[1] == b"alive\n"


def test_refused_channels_racing_their_data_keep_the_transport(ssh_hosts, connect):
    """Closing a relayed channel closes the pipe behind its fileno() while Paramiko's transport
    thread may be feeding it data: that race used to write to a closed fd, and EBADF killed the
    whole connection (every run on it)."""
    (host,) = ssh_hosts(1)
    conn = connect(host)
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    dead_port = s.getsockname()[1]
    s.close()

    def hammer(port: int, n: int) -> None:
        for _ in range(n):
            with contextlib.suppress(OSError):
                c = socket.create_connection(("127.0.0.1", port), timeout=5)
                with contextlib.suppress(OSError):
                    for _ in range(20):   # data arriving while the channel is refused and closed
                        c.sendall(b"x" * 512)
                c.close()

    with RemoteForward(conn, "127.0.0.1", dead_port) as fwd:
        assert fwd.remote_port is not None
        threads = [threading.Thread(target=hammer, args=(fwd.remote_port, 300)) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert conn.transport.is_active()
        assert fwd.channels_refused > 0
    assert exec_(conn, "echo alive")[1] == b"alive\n"


def test_foreign_handler_is_a_conflict(ssh_hosts, connect, http_server):
    (host,) = ssh_hosts(1)
    conn = connect(host)
    foreign = conn.transport.request_port_forward("127.0.0.1", 0, handler=lambda *a: None)
    try:
        with pytest.raises(TunnelError) as info:
            RemoteForward(conn, "127.0.0.1", http_server).open()
        assert info.value.kind == "forwarding-conflict"
    finally:
        conn.transport.cancel_port_forward("127.0.0.1", foreign)


def test_not_connected(http_server):
    import fabric

    conn = fabric.Connection("127.0.0.1", port=1)
    with pytest.raises(TunnelError) as info:
        RemoteForward(conn, "127.0.0.1", http_server).open()
    assert info.value.kind == "disconnected"


def test_no_leaks_over_50_cycles(ssh_hosts, connect, http_server):
    (host,) = ssh_hosts(1)
    conn = connect(host)

    def cycle() -> int:
        with RemoteForward(conn, "127.0.0.1", http_server) as fwd:
            assert get(fwd.remote_port, "/bytes/100") == _body(100)
            return fwd.remote_port  # type: ignore[return-value]

    cycle()  # warm-up: lazily created per-transport state (our dispatcher) and imports
    base_threads, base_fds = settle(-1, -1, timeout=0.3)
    ports = set()
    for _ in range(50):
        ports.add(cycle())
    threads, fds = settle(base_threads, base_fds)
    assert (threads, fds) == (base_threads, base_fds)
    deadline = time.monotonic() + 5  # the last channel leaves Paramiko's map when sshd's CLOSE arrives
    while conn.transport._channels.values() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert conn.transport._channels.values() == []  # no channel left on the transport
    for port in list(ports)[:10]:
        assert not port_open(port)
    assert conn.transport.is_active()


def test_16_hosts_concurrently(ssh_hosts, connect, http_server):
    hosts = ssh_hosts(16)
    conns = [connect(h) for h in hosts]
    barrier = threading.Barrier(16)

    def one(conn: object) -> tuple[int, str, bytes]:
        barrier.wait(30)
        with RemoteForward(conn, "127.0.0.1", http_server) as fwd:  # type: ignore[arg-type]
            assert fwd.remote_port is not None
            barrier.wait(30)  # all 16 forwards are open at the same time
            remote = remote_get(conn, fwd.remote_port, "/bytes/20000")
            local = get(fwd.remote_port, "/bytes/30000")
            return fwd.remote_port, remote, local

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, conns))
    assert len({port for port, _, _ in results}) == 16
    for _, remote, local in results:
        assert remote == expect(20000)
        assert local == _body(30000)


def test_concurrent_requests_through_one_forward(ssh_hosts, connect, http_server):
    (host,) = ssh_hosts(1)
    conn = connect(host)
    with RemoteForward(conn, "127.0.0.1", http_server) as fwd:
        port = fwd.remote_port
        assert port is not None
        fetch: Callable[[int], bytes] = lambda n: get(port, f"/bytes/{n}")  # noqa: E731
        sizes = [i * 7919 for i in range(40)]
        with ThreadPoolExecutor(20) as pool:
            assert list(pool.map(fetch, sizes)) == [_body(n) for n in sizes]
        assert fwd.channels_total == 40


def test_over_max_channels_connections_wait_for_a_slot(ssh_hosts, connect, http_server):
    (host,) = ssh_hosts(1)
    conn = connect(host)
    with RemoteForward(conn, "127.0.0.1", http_server, max_channels=1) as fwd:
        held = socket.create_connection(("127.0.0.1", fwd.remote_port), timeout=5)  # keeps the one slot
        held.sendall(b"GET /bytes/1 HTTP/1.1\r\nHost: x\r\n\r\n")
        assert held.recv(1024).startswith(b"HTTP/1.1 200")
        with ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(get, fwd.remote_port, "/bytes/2")
            time.sleep(0.5)
            assert not waiting.done()          # queued behind the held connection, not refused
            held.close()
            assert waiting.result(10) == _body(2)
        assert fwd.channels_refused == 0


def test_a_burst_of_200_connections_is_served_not_dropped(ssh_hosts, connect, http_server):
    """200 concurrent helper calls (issue 14's flood) over a 64-channel forward: all answered."""
    (host,) = ssh_hosts(1)
    conn = connect(host)
    with RemoteForward(conn, "127.0.0.1", http_server, max_channels=64) as fwd:
        with ThreadPoolExecutor(200) as pool:
            got = list(pool.map(lambda i: get(fwd.remote_port, f"/bytes/{i}"), range(200)))
        assert got == [_body(i) for i in range(200)]
        assert fwd.channels_refused == 0


def test_beyond_max_waiting_connections_are_refused(ssh_hosts, connect, http_server):
    (host,) = ssh_hosts(1)
    conn = connect(host)
    with RemoteForward(conn, "127.0.0.1", http_server, max_channels=1, max_waiting=0) as fwd:
        held = socket.create_connection(("127.0.0.1", fwd.remote_port), timeout=5)  # keeps the one slot
        held.sendall(b"GET /bytes/1 HTTP/1.1\r\nHost: x\r\n\r\n")
        assert held.recv(1024).startswith(b"HTTP/1.1 200")
        with pytest.raises((ConnectionError, http.client.HTTPException, OSError)):
            get(fwd.remote_port, "/")
        assert fwd.channels_refused == 1
        held.close()
        deadline = time.monotonic() + 5
        while True:  # the slot is free once our relay saw the close
            try:
                assert get(fwd.remote_port, "/bytes/2") == _body(2)
                break
            except (ConnectionError, http.client.HTTPException, OSError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)


def test_paramiko_errors_are_not_leaked(ssh_hosts, connect, http_server):
    """A handler that raised in the transport thread would end the transport: ours never raises."""
    (host,) = ssh_hosts(1)
    conn = connect(host)
    fwd = open_remote_forward(conn, "127.0.0.1", http_server)
    port = fwd.remote_port
    assert port is not None
    # Simulate a channel for a port nobody owns arriving at the dispatcher.
    handler = conn.transport._tcp_handler
    chan = conn.transport.open_session()
    handler(chan, ("127.0.0.1", 1), ("127.0.0.1", 1))
    handler(None, ("127.0.0.1", 1), ("127.0.0.1", port))  # garbage: must not raise nor stop the relay
    assert get(port, "/bytes/6") == _body(6)
    fwd.close()
    assert isinstance(conn.transport, paramiko.Transport) and conn.transport.is_active()
    assert exec_(conn, "echo fine")[1] == b"fine\n"
