"""A network round trip in front of local sshd hosts, for the benches (this kernel has no ``netem``).

One process (``python bench/latency.py RTT_MS``; its CPU is its own, no tool's) reads on stdin a JSON
list of ``[address, port]`` targets, listens on the same address at a new port for each, prints the
JSON list of those ports, and relays every connection with ``RTT_MS / 2`` of delay each way: bytes
received at t are sent at t + RTT/2, in order. The TCP handshake's round trip is emulated by
connecting upstream only after one RTT, so a client sees the server's banner 1.5 RTT after its
``connect()``, as over a real link. Every socket has ``TCP_NODELAY``, so the relay adds no
coalescing delay of its own. It ends when its stdin closes (its parent went away) or on SIGTERM.

``start(rtt_ms, targets)`` runs it and returns ``(process, ports)``.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path


async def _relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def send() -> None:
        while True:
            due, data = await queue.get()
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            if not data:
                if writer.can_write_eof():
                    writer.write_eof()
                return
            writer.write(data)
            await writer.drain()

    sender = asyncio.ensure_future(send())
    try:
        while True:
            data = await reader.read(65536)
            queue.put_nowait((loop.time() + delay, data))
            if not data:
                break
        await sender
    except (ConnectionError, OSError):
        sender.cancel()
    finally:
        writer.close()


async def _serve(rtt: float, targets: list[tuple[str, int]]) -> None:
    async def handle(target: tuple[str, int], reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await asyncio.sleep(rtt)   # the TCP handshake's round trip
        try:
            up_reader, up_writer = await asyncio.open_connection(*target)
        except OSError:
            writer.close()
            return
        up_writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await asyncio.gather(_relay(reader, up_writer, rtt / 2), _relay(up_reader, writer, rtt / 2),
                             return_exceptions=True)

    servers = []
    for address, port in targets:
        srv = await asyncio.start_server(lambda r, w, t=(address, port): handle(t, r, w), address, 0, backlog=512)
        servers.append(srv)
    print(json.dumps([s.sockets[0].getsockname()[1] for s in servers]), flush=True)
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    loop.add_signal_handler(signal.SIGTERM, lambda: done.done() or done.set_result(None))
    loop.add_reader(sys.stdin.fileno(), lambda: done.done() or (not sys.stdin.buffer.read1(1) and done.set_result(None)))
    await done
    os._exit(0)   # the open relays just end with the process (no cancelled-task noise)


def start(rtt_ms: float, targets: list[tuple[str, int]]) -> tuple[subprocess.Popen[bytes], list[int]]:
    proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), str(rtt_ms)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert proc.stdin and proc.stdout
    proc.stdin.write(json.dumps(targets).encode() + b"\n")
    proc.stdin.flush()
    line = proc.stdout.readline()
    if not line:
        proc.kill()
        raise SystemExit(f"the latency relay did not start (exit {proc.wait()})")
    return proc, json.loads(line)


def main() -> None:
    rtt = float(sys.argv[1]) / 1000.0
    targets = [(a, int(p)) for a, p in json.loads(sys.stdin.buffer.readline())]
    asyncio.run(_serve(rtt, targets))


if __name__ == "__main__":
    main()
