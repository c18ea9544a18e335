"""Remote port forwards (``ssh -R 0:local_host:local_port``) over an open ``fabric.Connection``.

Used by API mode: a script on the target talks HTTP to ``127.0.0.1:<remote_port>`` on the target,
and each such TCP connection arrives here as a ``forwarded-tcpip`` channel that we relay to
``local_host:local_port`` (the helper API of this process).

Why not ``Connection.forward_remote`` (docs/FIELD_NOTES.md, "Remote forwarding"):

- it discards the port the server allocates for port 0; we always ask for port 0 and keep the
  allocated port (``RemoteForward.remote_port``), so concurrent runs on one host never collide;
- Paramiko keeps ONE tcp handler per transport, so a second forward on the same connection
  hijacks the first. Here every transport gets one dispatcher (installed once, kept for the
  transport's life) that routes each incoming channel by the server port to its ``RemoteForward``:
  several forwards on one connection work, and a channel for a port nobody owns is closed;
- a refused local connect inside Fabric's handler raises in Paramiko's transport thread and kills
  the whole transport. Our handler never raises and never blocks: it only queues the channel for
  the relay thread, which connects without blocking and closes the channel if the local side
  refuses;
- Fabric's relay reads 1 KiB at a time with a 1 s select. Ours reads 64 KiB and sleeps in
  ``epoll`` with no timeout unless a connect deadline or a full SSH window needs one.

Threads: ONE relay thread per ``RemoteForward``, multiplexing all of its channels and local
sockets with ``selectors`` (a Paramiko channel is selectable through ``fileno()``, a pipe that is
readable whenever the channel has data, EOF or is closed). Thread count therefore does not grow
with the number of concurrent requests: a run over N hosts adds N relay threads (Paramiko already
runs one thread per transport), whatever the scripts do. Per-channel threads would be simpler but
unbounded; a single process-wide thread would make one slow host's relay everyone's problem.
Concurrent relayed connections per forward are capped (``max_channels``); beyond it new ones wait
in arrival order for a slot (a burst of helper calls is served, not dropped), and beyond
``max_waiting`` waiting ones they are closed at once.

Do not mix with ``Connection.forward_remote`` on the same connection: it replaces the transport's
handler (we detect a foreign handler in ``open()`` and refuse with kind ``forwarding-conflict``).
"""

from __future__ import annotations

import collections
import contextlib
import errno
import logging
import selectors
import socket
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

import fabric
import paramiko

from .errors import RemoteError

log = logging.getLogger("cronium_fab.remote")

READ_SIZE = 64 * 1024
# Stop reading a side while this much is waiting to be written to the other (back-pressure).
BUFFER_LIMIT = 256 * 1024
# Poll interval while some channel's SSH send window is full (Paramiko gives no writable event).
WINDOW_POLL_S = 0.002


class TunnelError(RemoteError):
    """A remote forward could not be set up or was lost. ``kind``: ``forwarding-refused``,
    ``forwarding-conflict``, ``disconnected``, ``forwarding-failed``."""


class TunnelRefused(TunnelError):
    """The server refused the forward (``AllowTcpForwarding no``/``local``, or a ``PermitListen``
    rule): kind ``forwarding-refused``."""

    def __init__(self, message: str, *, host: str | None = None) -> None:
        super().__init__("forwarding-refused", message, host=host)


def _close_quietly(obj: Any) -> None:
    with contextlib.suppress(Exception):  # best effort cleanup
        obj.close()


class _NoEvent:
    """Stands in for a channel's pipe in its buffers while the channel closes."""

    def set(self) -> None:
        pass

    def clear(self) -> None:
        pass


_NO_EVENT: Any = _NoEvent()   # BufferedPipe.set_event() calls only set() and clear()


def _close_selected_channel(chan: paramiko.Channel) -> None:
    """Close a channel whose ``fileno()`` we selected on. Paramiko's ``Channel.close()`` closes the
    pipe behind ``fileno()`` under the channel's lock, while its transport thread sets that pipe
    from ``BufferedPipe.feed()`` under the buffer's lock: data arriving during the close wrote to a
    closed (or already reused) fd, and the EBADF ended the whole transport. The buffers let go of
    the pipe first, each under its own lock."""
    with contextlib.suppress(Exception):
        chan.in_buffer.set_event(_NO_EVENT)
        chan.in_stderr_buffer.set_event(_NO_EVENT)
    _close_quietly(chan)


def _close_channel_async(chan: paramiko.Channel) -> None:
    """Close a channel from outside the transport thread (closing sends a message, and sending
    from the transport thread during a re-key would wait for itself)."""
    threading.Thread(target=_close_quietly, args=(chan,), name="cronium-tunnel-reject", daemon=True).start()


class _Dispatcher:
    """The one ``tcp handler`` of a transport: routes ``forwarded-tcpip`` channels by server port.

    Called in Paramiko's transport thread, so it never blocks and never raises.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        # Serializes our global requests on this transport: Paramiko keeps a single
        # "global response" slot, so two concurrent tcpip-forward requests could swap ports.
        self.request_lock = threading.RLock()
        self.forwards: dict[int, RemoteForward] = {}

    def __call__(self, chan: paramiko.Channel, origin: tuple[str, int], server: tuple[str, int]) -> None:
        try:
            port = int(server[1])
            with self.lock:
                fwd = self.forwards.get(port)
                if fwd is None and port == 0 and len(self.forwards) == 1:
                    # Very old servers (SSH_BUG_DYNAMIC_RPORT) report port 0 for allocated ports.
                    fwd = next(iter(self.forwards.values()))
            if fwd is None or not fwd._accept(chan):
                _close_channel_async(chan)
        except BaseException:  # an exception here would kill the transport
            with contextlib.suppress(BaseException):
                _close_channel_async(chan)


_dispatchers: weakref.WeakKeyDictionary[paramiko.Transport, _Dispatcher] = weakref.WeakKeyDictionary()
_dispatchers_lock = threading.Lock()


def _dispatcher_for(transport: paramiko.Transport) -> _Dispatcher:
    with _dispatchers_lock:
        d = _dispatchers.get(transport)
        if d is None:
            d = _dispatchers[transport] = _Dispatcher()
        return d


def global_request_lock(transport: paramiko.Transport) -> threading.RLock:
    """The lock every global request of ours on ``transport`` holds (Paramiko keeps a single
    "global response" slot per transport, so two requests at once could swap their answers)."""
    return _dispatcher_for(transport).request_lock


class _Relay:
    """One forwarded connection: a channel and the local socket it is relayed to."""

    __slots__ = ("chan", "sock", "connected", "deadline", "to_sock", "to_chan", "chan_eof", "sock_eof",
                 "sock_shut", "chan_fd", "chan_mask", "sock_mask")

    def __init__(self, chan: paramiko.Channel, sock: socket.socket, deadline: float) -> None:
        self.chan = chan
        self.sock = sock
        self.connected = False
        self.deadline = deadline
        self.to_sock = bytearray()
        self.to_chan = bytearray()
        self.chan_eof = False  # nothing more will come from the channel
        self.sock_eof = False  # nothing more will come from the local socket
        self.sock_shut = False  # we sent FIN to the local side
        self.chan_fd = chan.fileno()
        self.chan_mask = 0
        self.sock_mask = 0


class RemoteForward:
    """A remote forward on the target: ``remote_host:<allocated port>`` → ``local_host:local_port``.

    ``open()`` (or ``with RemoteForward(...) as fwd``) asks the server for a listener on
    ``remote_host`` with port 0 and keeps the allocated port in ``remote_port``; raises
    ``TunnelRefused`` (kind ``forwarding-refused``) when sshd denies forwarding. ``close()`` cancels
    the listener, closes every relayed channel and socket and joins the relay thread; it is
    idempotent. Several forwards on one connection are fine (they are routed by port).
    """

    def __init__(
        self,
        conn: fabric.Connection,
        local_host: str,
        local_port: int,
        *,
        remote_host: str = "127.0.0.1",
        connect_timeout: float = 5.0,
        max_channels: int = 64,
        max_waiting: int = 1024,
        join_timeout: float = 5.0,
        name: str | None = None,
    ) -> None:
        self.conn = conn
        self.local_host = local_host
        self.local_port = int(local_port)
        self.remote_host = remote_host
        self.connect_timeout = connect_timeout
        self.max_channels = max_channels
        self.max_waiting = max_waiting
        self.join_timeout = join_timeout
        self.name = name or f"{conn.host}:{conn.port}"
        self.remote_port: int | None = None
        # Counters (read them after close() for exact values).
        self.channels_total = 0
        self.channels_refused = 0  # local connect failed or timed out, or over max_channels + max_waiting
        self._transport: paramiko.Transport | None = None
        self._dispatcher: _Dispatcher | None = None
        self._state_lock = threading.Lock()
        self._incoming: collections.deque[paramiko.Channel] = collections.deque()
        self._active = 0   # relayed connections open (written by the relay thread)
        self._accepting = False
        self._opened = False
        self._closed = False
        self._stop = False
        self._thread: threading.Thread | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._local_addr: tuple[int, Any] | None = None
        self._warned_refused = False
        # close() cancelled the server's listener (it said so): the connection carries nothing of
        # this forward any more and may serve another run
        self.cancelled = False

    # -- public -----------------------------------------------------------------------------

    def __enter__(self) -> RemoteForward:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def active(self) -> bool:
        t = self._transport
        return self._opened and not self._closed and t is not None and t.is_active()

    def open(self) -> int:
        """Request the forward; return (and keep in ``remote_port``) the port the server allocated."""
        with self._state_lock:
            if self._opened:
                raise TunnelError("forwarding-failed", f"host {self.name}: this RemoteForward was already opened",
                                  host=self.name)
            self._opened = True
        transport = self.conn.transport
        if transport is None or not transport.is_active():
            self._closed = True
            raise TunnelError("disconnected", f"host {self.name}: the SSH connection is not open", host=self.name)
        self._transport = transport
        try:
            info = socket.getaddrinfo(self.local_host, self.local_port, type=socket.SOCK_STREAM)[0]
        except OSError as e:
            self._closed = True
            raise TunnelError("forwarding-failed", f"host {self.name}: cannot resolve local {self.local_host!r}: {e}",
                              host=self.name) from e
        self._local_addr = (info[0], info[4])
        dispatcher = self._dispatcher = _dispatcher_for(transport)
        self._start_relay()
        try:
            with dispatcher.request_lock:
                current = getattr(transport, "_tcp_handler", None)
                if current is not None and current is not dispatcher:
                    raise TunnelError(
                        "forwarding-conflict",
                        f"host {self.name}: another remote-forward handler (Connection.forward_remote?) "
                        f"is installed on this connection; use one RemoteForward per port instead",
                        host=self.name,
                    )
                try:
                    port = transport.request_port_forward(self.remote_host, 0, handler=dispatcher)
                except paramiko.SSHException as e:
                    if not transport.is_active():
                        raise TunnelError("disconnected", f"host {self.name}: SSH connection lost while "
                                          f"requesting the remote forward ({e})", host=self.name) from e
                    if "denied" in str(e):
                        raise TunnelRefused(
                            f"host {self.name}: the server refused remote port forwarding on {self.remote_host} "
                            f"({e}); sshd has AllowTcpForwarding no/local or a PermitListen rule that excludes it",
                            host=self.name,
                        ) from e
                    raise TunnelError("forwarding-failed", f"host {self.name}: remote forward failed: {e}",
                                      host=self.name) from e
                with dispatcher.lock:
                    clash = port in dispatcher.forwards
                    if not clash:
                        dispatcher.forwards[port] = self
                if clash:
                    self._cancel(transport, port)
                    raise TunnelError("forwarding-conflict", f"host {self.name}: the server allocated port "
                                      f"{port}, which another forward on this connection already uses",
                                      host=self.name)
            self.remote_port = port
        except BaseException:
            self._closed = True
            self._stop_relay()
            raise
        log.debug("host %s: remote forward %s:%d -> %s:%d", self.name, self.remote_host, port,
                  self.local_host, self.local_port)
        return port

    def close(self) -> None:
        """Cancel the remote listener, close every relayed connection, join the relay thread."""
        with self._state_lock:
            if self._closed or not self._opened:
                self._closed = True
                return
            self._closed = True
        transport, port, dispatcher = self._transport, self.remote_port, self._dispatcher
        if transport is not None and port is not None:
            self._cancel(transport, port)
        if dispatcher is not None and port is not None:
            with dispatcher.lock:
                if dispatcher.forwards.get(port) is self:
                    del dispatcher.forwards[port]
        self._stop_relay()
        if self._thread is not None and self._thread.is_alive():
            self.cancelled = False   # its relay may still use channels of the connection

    # -- internals --------------------------------------------------------------------------

    def _cancel(self, transport: paramiko.Transport, port: int) -> None:
        if not transport.is_active():
            return
        # Not transport.cancel_port_forward(): it also clears the transport's handler, which would
        # cut off other forwards on this connection and race with a channel being dispatched.
        assert self._dispatcher is not None
        try:
            with self._dispatcher.request_lock:
                answer = transport.global_request("cancel-tcpip-forward", (self.remote_host, port), wait=True)
        except Exception as e:  # the connection may be going away; nothing to undo
            log.debug("host %s: cancel of remote forward %d failed: %s", self.name, port, e)
        else:
            self.cancelled = answer is not None

    def _accept(self, chan: paramiko.Channel) -> bool:
        """Transport thread: queue a new channel for the relay thread. False if we are closing."""
        with self._state_lock:
            if not self._accepting:
                return False
            # _active is the relay thread's count (a stale read only shifts the limit by one)
            full = self._active + len(self._incoming) >= self.max_channels + self.max_waiting
            if not full:
                self._incoming.append(chan)
        if full:
            self.channels_total += 1
            self.channels_refused += 1
            log.warning("host %s: %d tunnel connections open and %d waiting, refusing another", self.name,
                        self.max_channels, self.max_waiting)
            _close_channel_async(chan)
            return True
        self._wake()
        return True

    def _wake(self) -> None:
        w = self._wake_w
        if w is not None:
            with contextlib.suppress(OSError):  # full (already woken) or closed
                w.send(b"\0")

    def _start_relay(self) -> None:
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._accepting = True
        self._thread = threading.Thread(target=self._run, name=f"cronium-tunnel-{self.name}", daemon=True)
        self._thread.start()

    def _stop_relay(self) -> None:
        with self._state_lock:
            self._accepting = False
            self._stop = True
        self._wake()
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(self.join_timeout)
            if t.is_alive():
                log.warning("host %s: tunnel relay thread did not stop within %.1f s", self.name, self.join_timeout)

    # -- relay thread -----------------------------------------------------------------------

    def _run(self) -> None:
        sel = selectors.DefaultSelector()
        relays: set[_Relay] = set()
        blocked: set[_Relay] = set()  # relays with data waiting for the SSH window
        assert self._wake_r is not None
        sel.register(self._wake_r, selectors.EVENT_READ, None)
        try:
            while True:
                timeout: float | None = None
                if blocked:
                    timeout = WINDOW_POLL_S
                connecting = [r for r in relays if not r.connected]
                if connecting:
                    wait = max(0.0, min(r.deadline for r in connecting) - time.monotonic())
                    timeout = wait if timeout is None else min(timeout, wait)
                events = sel.select(timeout)
                for key, mask in events:
                    relay = key.data
                    if relay is None:
                        self._drain_wake()
                    elif relay in relays:
                        self._guarded(self._on_event, sel, relays, blocked, relay, key.fd, mask)
                if self._stop:
                    break
                while self._incoming and len(relays) < self.max_channels:   # the others wait for a slot
                    chan = self._incoming.popleft()
                    try:
                        self._start(sel, relays, blocked, chan)
                    except Exception:
                        log.exception("host %s: cannot relay a tunnel connection", self.name)
                        _close_quietly(chan)
                now = time.monotonic()
                for relay in connecting:
                    if not relay.connected and relay in relays and now >= relay.deadline:
                        self._refused(relay, "timed out")
                        self._finish(sel, relays, blocked, relay)
                for relay in list(blocked):
                    if relay.chan.send_ready() or relay.chan.closed:
                        self._guarded(self._on_window, sel, relays, blocked, relay, -1, 0)
        except Exception:  # log, then close everything below
            log.exception("host %s: tunnel relay failed", self.name)
        finally:
            with self._state_lock:
                self._accepting = False
                pending = list(self._incoming)
                self._incoming.clear()
            for chan in pending:
                _close_quietly(chan)
            for relay in list(relays):
                self._finish(sel, relays, blocked, relay)
            sel.close()
            assert self._wake_w is not None
            _close_quietly(self._wake_r)
            _close_quietly(self._wake_w)
            self._wake_w = None

    def _guarded(self, step: Callable[..., None], sel: selectors.BaseSelector, relays: set[_Relay],
                 blocked: set[_Relay], relay: _Relay, fd: int, mask: int) -> None:
        """Run one relay's step; a bug or surprise in one connection closes that one, not the rest."""
        try:
            step(relay, fd, mask)
            self._settle(sel, relays, blocked, relay)
        except Exception:
            log.exception("host %s: tunnel connection failed; closing it", self.name)
            self._finish(sel, relays, blocked, relay)

    def _on_event(self, relay: _Relay, fd: int, mask: int) -> None:
        if fd == relay.chan_fd:
            self._on_chan(relay)
        elif not relay.connected:
            self._on_connected(relay)
        else:
            if mask & selectors.EVENT_WRITE:
                self._flush_sock(relay)
            if mask & selectors.EVENT_READ:
                self._on_sock(relay)

    def _on_window(self, relay: _Relay, fd: int, mask: int) -> None:
        self._flush_chan(relay)

    def _drain_wake(self) -> None:
        assert self._wake_r is not None
        try:
            while self._wake_r.recv(4096):
                pass
        except OSError:
            pass

    def _start(self, sel: selectors.BaseSelector, relays: set[_Relay], blocked: set[_Relay],
               chan: paramiko.Channel) -> None:
        self.channels_total += 1
        assert self._local_addr is not None
        family, addr = self._local_addr
        try:
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError as e:
            self.channels_refused += 1
            log.warning("host %s: cannot create a socket for a tunnel connection: %s", self.name, e)
            _close_quietly(chan)
            return
        try:
            sock.setblocking(False)
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            chan.settimeout(0.0)
            relay = _Relay(chan, sock, time.monotonic() + self.connect_timeout)
        except BaseException:
            sock.close()
            raise
        relays.add(relay)
        self._active = len(relays)
        err = sock.connect_ex(addr)
        if err == 0:
            relay.connected = True
        elif err not in (errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EAGAIN):
            self._refused(relay, errno.errorcode.get(err, str(err)))
            self._finish(sel, relays, blocked, relay)
            return
        self._guarded(lambda *a: None, sel, relays, blocked, relay, -1, 0)

    def _on_connected(self, relay: _Relay) -> None:
        err = relay.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self._refused(relay, errno.errorcode.get(err, str(err)))
            relay.chan_eof = relay.sock_eof = True
            relay.to_sock.clear()
            relay.to_chan.clear()
            return
        relay.connected = True

    def _refused(self, relay: _Relay, why: str) -> None:
        self.channels_refused += 1
        relay.connected = False
        relay.deadline = -1.0  # marks it for _settle to finish
        msg = "host %s: tunnel connection to local %s:%d failed (%s); closing that channel"
        if self._warned_refused:
            log.debug(msg, self.name, self.local_host, self.local_port, why)
        else:
            self._warned_refused = True
            log.warning(msg, self.name, self.local_host, self.local_port, why)

    def _on_chan(self, relay: _Relay) -> None:
        try:
            data = relay.chan.recv(READ_SIZE)
        except TimeoutError:  # the pipe was set but the buffer is empty (already read)
            return
        except OSError:
            data = b""
        if not data:
            relay.chan_eof = True
            return
        if relay.to_sock:
            relay.to_sock += data
        else:
            relay.to_sock = bytearray(data)
            self._flush_sock(relay)

    def _on_sock(self, relay: _Relay) -> None:
        try:
            data = relay.sock.recv(READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            relay.sock_eof = relay.chan_eof = True  # reset: give up both ways
            relay.to_sock.clear()
            return
        if not data:
            relay.sock_eof = True
            return
        relay.to_chan += data
        self._flush_chan(relay)

    def _flush_sock(self, relay: _Relay) -> None:
        while relay.to_sock:
            try:
                n = relay.sock.send(relay.to_sock)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                relay.to_sock.clear()
                relay.sock_eof = relay.chan_eof = True
                return
            del relay.to_sock[:n]

    def _flush_chan(self, relay: _Relay) -> None:
        while relay.to_chan:
            try:
                n = relay.chan.send(bytes(relay.to_chan[:READ_SIZE]))
            except TimeoutError:  # the SSH window is full
                return
            except OSError:  # channel closed
                n = 0
            if n == 0:
                relay.to_chan.clear()
                relay.sock_eof = relay.chan_eof = True
                return
            del relay.to_chan[:n]

    def _settle(self, sel: selectors.BaseSelector, relays: set[_Relay], blocked: set[_Relay], relay: _Relay) -> None:
        """After any event: half-close what is done, finish the relay or update its registrations."""
        if relay not in relays:
            return
        chan, sock = relay.chan, relay.sock
        if relay.deadline < 0:  # local connect failed
            self._finish(sel, relays, blocked, relay)
            return
        if relay.connected:
            if relay.sock_eof and not relay.to_chan and not chan.eof_sent and not chan.closed:
                with contextlib.suppress(Exception):
                    chan.shutdown_write()
            if relay.chan_eof and not relay.to_sock and not relay.sock_shut:
                relay.sock_shut = True
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_WR)
            done = relay.chan_eof and relay.sock_eof and not relay.to_sock and not relay.to_chan
            if done or (chan.closed and relay.chan_eof and not relay.to_sock):
                self._finish(sel, relays, blocked, relay)
                return
        if relay.to_chan:
            blocked.add(relay)
        else:
            blocked.discard(relay)
        chan_mask = 0
        sock_mask = 0
        if relay.connected:
            if not relay.chan_eof and len(relay.to_sock) < BUFFER_LIMIT:
                chan_mask = selectors.EVENT_READ
            if not relay.sock_eof and len(relay.to_chan) < BUFFER_LIMIT:
                sock_mask |= selectors.EVENT_READ
            if relay.to_sock:
                sock_mask |= selectors.EVENT_WRITE
        else:
            sock_mask = selectors.EVENT_WRITE
        self._register(sel, chan_mask, relay.chan_fd, relay.chan_mask, relay)
        relay.chan_mask = chan_mask
        self._register(sel, sock_mask, sock, relay.sock_mask, relay)
        relay.sock_mask = sock_mask

    @staticmethod
    def _register(sel: selectors.BaseSelector, mask: int, fileobj: Any, old: int, relay: _Relay) -> None:
        if mask == old:
            return
        if not old:
            sel.register(fileobj, mask, relay)
        elif not mask:
            sel.unregister(fileobj)
        else:
            sel.modify(fileobj, mask, relay)

    def _finish(self, sel: selectors.BaseSelector, relays: set[_Relay], blocked: set[_Relay], relay: _Relay) -> None:
        relays.discard(relay)
        self._active = len(relays)
        blocked.discard(relay)
        # Unregister before closing: closing the channel closes its pipe (the fd we selected on).
        if relay.chan_mask:
            relay.chan_mask = 0
            with contextlib.suppress(Exception):
                sel.unregister(relay.chan_fd)
        if relay.sock_mask:
            relay.sock_mask = 0
            with contextlib.suppress(Exception):
                sel.unregister(relay.sock)
        _close_quietly(relay.sock)
        _close_selected_channel(relay.chan)


def open_remote_forward(
    conn: fabric.Connection, local_host: str, local_port: int, **kwargs: Any
) -> RemoteForward:
    """``RemoteForward(...)`` already opened (the caller closes it)."""
    fwd = RemoteForward(conn, local_host, local_port, **kwargs)
    fwd.open()
    return fwd
