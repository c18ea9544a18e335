"""The controller's decoder of the runner's output stream (no SSH needed)."""

from __future__ import annotations

import json
import struct

import pytest

from cronium_fab.remote.protocol import (
    Bootstrap,
    OutputDecoder,
    ProtocolError,
    Record,
    encode_input,
    encode_input_head,
)


def rec(kind: bytes, body: bytes) -> bytes:
    return kind + struct.pack(">I", len(body)) + body


HELLO = {"magic": "CRNR", "protocol": 2, "version": "1", "sha256": "x", "pid": 1, "python": "3.11.2"}
STREAM = (
    b"CRNR"
    + rec(b"H", json.dumps(HELLO).encode())
    + rec(b"O", struct.pack(">d", 1.5) + b"out\xff\n")
    + rec(b"E", struct.pack(">d", 2.5) + b"")
    + rec(b"K", b"")
    + rec(b"R", b'{"status": "success"}')
)


def decode_in_pieces(data: bytes, size: int) -> tuple[OutputDecoder, list]:
    d = OutputDecoder()
    events = []
    for i in range(0, len(data), size):
        events += d.feed(data[i : i + size])
    return d, events


@pytest.mark.parametrize("size", [1, 2, 3, 5, 7, 64, 10_000])
def test_records_decode_whatever_the_chunking(size):
    d, events = decode_in_pieces(STREAM + b"junk after", size)
    assert [e.kind for e in events] == ["H", "O", "E", "K", "R"]
    assert events[0].json == HELLO
    assert events[1] == Record("O", b"out\xff\n", ts=1.5)
    assert events[3] == Record("K", b"")
    assert events[4].json == {"status": "success"}
    assert d.finished and d.trailing == len(b"junk after")


@pytest.mark.parametrize("line", [b"CRONIUM-RUNNER-MISS\n", b"CRONIUM-NO-PYTHON\n", b"CRONIUM-PYTHON-TOO-OLD 3.6.15\n"])
@pytest.mark.parametrize("size", [1, 4, 100])
def test_bootstrap_markers(line, size):
    _, events = decode_in_pieces(line, size)
    marker = line.split()[0].decode()
    detail = line.split()[1].decode() if len(line.split()) > 1 else ""
    assert events == [Bootstrap(marker, detail)]


def test_login_shell_noise_before_output_is_skipped_and_kept():
    d, events = decode_in_pieces(b"Welcome to host\nCRONIUM-RUNNER-MISS\n", 3)
    assert events == [Bootstrap("CRONIUM-RUNNER-MISS")]
    assert d.noise == b"Welcome to host\n"
    d, events = decode_in_pieces(b"motd\n" + STREAM, 2)
    assert [e.kind for e in events] == ["H", "O", "E", "K", "R"]


def test_text_printed_by_a_script_cannot_look_like_a_marker_after_hello():
    # After CRNR everything is framed: a marker inside an O record is just output.
    body = struct.pack(">d", 0) + b"CRONIUM-RUNNER-MISS\n"
    _, events = decode_in_pieces(b"CRNR" + rec(b"H", json.dumps(HELLO).encode()) + rec(b"O", body), 1)
    assert [e.kind for e in events] == ["H", "O"]


@pytest.mark.parametrize(
    "bad",
    [
        b"CRNR" + rec(b"X", b"{}"),
        b"CRNR" + rec(b"H", b"not json"),
        b"CRNR" + rec(b"H", b'{"protocol": 1}'),
        b"CRNR" + b"O" + struct.pack(">I", 1 << 30),
        b"CRNR" + rec(b"O", b"short"),
        b"CRNR" + rec(b"K", b"x"),
    ],
)
def test_corrupt_streams_raise(bad):
    with pytest.raises(ProtocolError):
        OutputDecoder().feed(bad)


def test_no_runner_output_at_all_is_an_error_eventually():
    with pytest.raises(ProtocolError):
        OutputDecoder().feed(b"x" * 70_000)


def test_input_preamble_and_header():
    head = encode_input_head({"protocol": 2, "a": "é"})
    line, body = head.split(b"\n", 1)
    assert line == b"CRONIUM-RUNNER-INPUT 2 %d" % len(body)
    assert json.loads(body) == {"protocol": 2, "a": "é"}
    full = encode_input({"job_id": "j"}, b"PAYLOAD")
    header = json.loads(full.split(b"\n", 1)[1][: -len(b"PAYLOAD")])
    assert header["payload_size"] == 7 and header["protocol"] == 2 and full.endswith(b"PAYLOAD")
