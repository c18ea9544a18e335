"""Unit tests of the pure parts of a run: aggregation, the summary table, live output, output
capping, the helper API's routes and rate limiter, destinations, row shaping."""

from __future__ import annotations

import io
import time
from http import HTTPStatus

import pytest

from cronium_fab.errors import (
    EXIT_CANCELLED,
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_PARTIAL,
    EXIT_STOPPED,
    EXIT_TIMEOUT,
    ConfigError,
)
from cronium_fab.helper_api import ApiError, TokenBucket, match_route
from cronium_fab.output import CappedBuffer, LivePrinter
from cronium_fab.records import log_output, run_exit_code
from cronium_fab.remote.connection import parse_destination
from cronium_fab.results import (
    HOST_STATES,
    RUN_STATES,
    HostResult,
    RunResult,
    aggregate_status,
    summary_table,
)


def host(name: str, status: str, exit_code: int | None = None, **kw: object) -> HostResult:
    return HostResult(server_id=None, name=name, host=f"{name}.test", execution_id=f"e-{name}",
                      status=status, exit_code=exit_code, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(("states", "cancelled", "want"), [
    (["success", "success"], False, "SUCCESS"),
    (["success", "failure"], False, "PARTIAL"),
    (["success", "timeout"], False, "PARTIAL"),
    (["timeout", "failure", "unreachable"], False, "TIMEOUT"),
    (["failure", "unreachable"], False, "FAILURE"),
    ([], False, "FAILURE"),
    (["success", "cancelled"], True, "CANCELLED"),
])
def test_aggregate_status(states: list[str], cancelled: bool, want: str) -> None:
    assert aggregate_status(states, cancelled) == want  # type: ignore[arg-type]


@pytest.mark.parametrize(("states", "stopped", "want"), [
    (["success", "failure", "skipped"], True, "STOPPED"),
    (["failure", "skipped"], True, "STOPPED"),
    (["success", "failure"], True, "PARTIAL"),       # the budget was exceeded, but nothing was left to start
    (["failure", "failure"], True, "FAILURE"),
])
def test_aggregate_status_of_a_budget_stop(states: list[str], stopped: bool, want: str) -> None:
    assert aggregate_status(states, stopped=stopped) == want  # type: ignore[arg-type]
    assert aggregate_status(states, cancelled=True, stopped=stopped) == "CANCELLED"  # type: ignore[arg-type]


def test_states_and_exit_codes() -> None:
    assert HOST_STATES == ("success", "failure", "timeout", "unreachable", "cancelled", "skipped")
    codes = {s: RunResult(s, 1, "e", "j", 1, [], [], 0, 1).exit_code for s in RUN_STATES}
    assert codes == {"SUCCESS": EXIT_OK, "FAILURE": EXIT_FAILURE, "PARTIAL": EXIT_PARTIAL,
                     "TIMEOUT": EXIT_TIMEOUT, "CANCELLED": EXIT_CANCELLED, "STOPPED": EXIT_STOPPED}


def test_every_host_state_has_a_row_status_and_every_run_status_a_log_status() -> None:
    from cronium_fab.records import EXEC_STATUS, HOST_STATE_OF_EXEC, JOB_STATUS, LOG_STATUS, host_state_of

    assert set(EXEC_STATUS) == set(HOST_STATES) and set(JOB_STATUS) == set(LOG_STATUS) == set(RUN_STATES)
    assert EXEC_STATUS["skipped"] == "skipped" and LOG_STATUS["STOPPED"] == "FAILURE"
    assert set(LOG_STATUS.values()) <= {"SUCCESS", "FAILURE", "TIMEOUT", "PARTIAL"}   # Cronium's logs.status
    for state, row in EXEC_STATUS.items():   # what we recorded wins; a row without it reads back roughly
        assert host_state_of(row, state) == state
        assert host_state_of(row, None) == HOST_STATE_OF_EXEC[row]
    assert host_state_of("running", None) == "running"


def test_summary_table_lists_hosts_errors_and_skipped() -> None:
    hosts = [host("web1", "success", 0, runner_cached=True, helper_mode="api", duration_ms=1234),
             host("db-server", "unreachable", error="connection refused", error_kind="connection-refused"),
             host("web2", "success", 0, runner_cached=False, helper_mode="bundled",
                  helper_mode_note="fell back to bundled mode: forwarding refused")]
    result = RunResult("PARTIAL", 7, "ev", "job_x", 3, hosts, [{"server_id": 9, "name": "old", "reason": "archived"}],
                       2500, 1)
    lines = summary_table(result).splitlines()
    assert lines[0] == ""
    assert lines[1].split() == ["HOST", "STATUS", "EXIT", "DURATION", "RUNNER", "HELPERS"]
    assert lines[2].split() == ["db-server", "unreachable", "-", "0.00s", "-", "-"]   # failures first
    assert lines[3].split() == ["web1", "success", "0", "1.23s", "cached", "api"]
    assert lines[4].split() == ["web2", "success", "0", "0.00s", "installed", "bundled*"]
    assert lines[2].index("unreachable") == lines[3].index("success")   # columns line up
    assert "  db-server: connection refused" in lines
    assert "  web2: * fell back to bundled mode: forwarding refused" in lines
    assert "  skipped old: archived" in lines
    assert lines[-1] == "PARTIAL: 2/3 hosts succeeded (1 unreachable) in 2.50s (job job_x, log 3)"


def test_summary_groups_identical_output_failures_first_and_scales() -> None:
    hosts = [host(f"ok{i:02}", "success", 0, stdout="same\n") for i in range(37)]
    hosts.insert(5, host("bad1", "failure", 2, stdout="".join(f"l{n}\n" for n in range(9)), stderr="boom\n"))
    hosts.append(host("odd", "success", 0, stdout="different\n"))
    hosts += [host(f"late{i}", "skipped", error="not started: 2 hosts failed, more than --max-failures 1 allows")
              for i in range(3)]
    result = RunResult("STOPPED", 7, "ev", "job_x", 9, hosts, [], 1000, 1,
                       stopped="2 hosts failed, more than --max-failures 1 allows")
    text = summary_table(result)
    lines = text.splitlines()
    assert lines[2].split()[:3] == ["bad1", "failure", "2"]
    assert sum(1 for line in lines if line.startswith("ok")) == 20          # successes beyond 20: one line
    assert "... and 18 more hosts succeeded (`cronium-fab show 9` lists them all)" in lines
    assert ("  3 hosts skipped (late0, late1, late2): not started: 2 hosts failed, more than --max-failures 1 "
            "allows") in lines
    groups = lines[lines.index("output (identical output once, failures first):") + 1:]
    assert groups[0] == "  bad1 (failure):"
    assert groups[1] == "    ... 4 earlier lines (`cronium-fab show 9 --host bad1`)"
    assert groups[2:8] == ["    | l4", "    | l5", "    | l6", "    | l7", "    | l8", "    ! boom"]
    assert groups[8].startswith("  37 hosts: same output (success): ok00, ok01, ") and groups[8].endswith("(+29 more):")
    assert groups[9] == "    | same"
    assert groups[10:12] == ["  odd (success):", "    | different"]
    assert lines[-2] == "stopped: 2 hosts failed, more than --max-failures 1 allows"
    assert lines[-1] == "STOPPED: 38/42 hosts succeeded (1 failure, 3 skipped) in 1.00s (job job_x, log 9)"


def test_live_printer_whole_lines_prefixed_and_never_mixed() -> None:
    out = io.StringIO()
    p = LivePrinter(out, ["a", "long-name"])
    p.feed("a", "stdout", b"one\ntw")
    p.feed("long-name", "stderr", b"err\n")
    p.feed("a", "stdout", b"o\n\xff\n")
    p.feed("a", "stdout", b"no newline")
    p.flush("a")
    p.close()
    assert out.getvalue().splitlines() == [
        "a         | one", "long-name ! err", "a         | two", "a         | \ufffd", "a         | no newline"]


def test_live_printer_cuts_a_huge_line_and_is_silent_without_output() -> None:
    out = io.StringIO()
    p = LivePrinter(out, ["h"])
    p.feed("h", "stdout", b"x" * 70000)
    p.close()
    assert out.getvalue() == "h | " + "x" * 70000 + "\n"
    silent = LivePrinter(None, ["h"])
    silent.feed("h", "stdout", b"a\n")
    silent.message("hello")   # nothing to write to, nothing raised


def test_a_reader_that_stops_reading_never_stalls_the_hosts() -> None:
    """A paused pager (or a caller reading our stderr only at the end): the hosts' threads go on,
    the lines that did not fit are counted and said once the reader is back, none is lost silently."""
    import threading

    class Paused(io.StringIO):
        def __init__(self) -> None:
            super().__init__()
            self.go = threading.Event()

        def write(self, text: str) -> int:
            self.go.wait()
            return super().write(text)

    out = Paused()
    p = LivePrinter(out, ["h"])
    n = LivePrinter.QUEUE_LINES * 2
    fed = threading.Thread(target=lambda: [p.feed("h", "stdout", b"line %d\n" % i) for i in range(n)])
    fed.start()
    fed.join(60)
    assert not fed.is_alive(), "feeding the printer waited on the paused reader"
    out.go.set()
    p.close()
    p.message("summary")     # after close: written directly, after everything queued
    lines = out.getvalue().splitlines()
    shown = [x for x in lines if x.startswith("h | line ")]
    notes = [x for x in lines if x.startswith("[cronium-fab: ")]
    dropped = sum(int(x.split()[1]) for x in notes)
    assert notes and len(shown) + dropped == n and lines[-1] == "summary"
    assert [int(x.split()[-1]) for x in shown] == sorted(int(x.split()[-1]) for x in shown)


def test_capped_buffer_keeps_the_tail_and_says_what_it_dropped() -> None:
    buf = CappedBuffer(10)
    for chunk in (b"0123456789", b"abc", b"de"):
        buf.add(chunk)
    assert bytes(buf.data) == b"56789abcde" and buf.dropped == 5
    assert buf.text() == "[... 5 bytes truncated ...]\n56789abcde"
    small = CappedBuffer(10)
    small.add(b"ok")
    assert small.text() == "ok"


@pytest.mark.parametrize(("path", "name", "methods", "captures"), [
    ("/health", "health", ("GET",), {}),
    ("/executions/e1/input", "executions/input", ("GET",), {"id": "e1"}),
    ("/executions/e1/variables/a%2Fb?x=1", "executions/variables", ("GET", "PUT"), {"id": "e1", "key": "a/b"}),
    ("http://127.0.0.1:9/executions/e%20x/context", "executions/context", ("GET",), {"id": "e x"}),
])
def test_match_route(path: str, name: str, methods: tuple[str, ...], captures: dict[str, str]) -> None:
    assert match_route(path) == (name, methods, captures)


@pytest.mark.parametrize("path", ["/tool-actions/execute", "/executions//input", "/executions/e1/../x/input",
                                  "executions/e1/input", "/executions/e1/input/extra", "/"])
def test_match_route_refuses_everything_else(path: str) -> None:
    with pytest.raises(ApiError) as err:
        match_route(path)
    assert err.value.status == HTTPStatus.NOT_FOUND


def test_match_route_refuses_bad_utf8() -> None:
    with pytest.raises(ApiError) as err:
        match_route("/executions/%ff/input")
    assert err.value.status == HTTPStatus.BAD_REQUEST


def test_token_bucket_bursts_then_paces() -> None:
    bucket = TokenBucket(rate=10.0, burst=3.0)
    assert [bucket.take() for _ in range(3)] == [0.0, 0.0, 0.0]
    wait = bucket.take()
    assert 0.0 < wait <= 0.1
    bucket._at -= 1.0   # one second later (no sleeping in tests): the bucket refilled, up to its burst
    assert [bucket.take() == 0.0 for _ in range(4)] == [True, True, True, False]


def test_token_bucket_is_monotonic_clock_based() -> None:
    bucket = TokenBucket(rate=1000.0, burst=1.0)
    bucket.take()
    time.sleep(0.01)
    assert bucket.take() == 0.0


@pytest.mark.parametrize(("value", "want"), [
    ("web1", (None, "web1", None)),
    ("deploy@web1", ("deploy", "web1", None)),
    ("deploy@10.0.0.5:2222", ("deploy", "10.0.0.5", 2222)),
    ("[::1]:2200", (None, "::1", 2200)),
    ("u@[fe80::1]", ("u", "fe80::1", None)),
    ("::1", (None, "::1", None)),
])
def test_parse_destination(value: str, want: tuple[str | None, str, int | None]) -> None:
    assert parse_destination(value) == want


def test_parse_destination_refuses_a_port_that_is_not_a_number() -> None:
    with pytest.raises(ConfigError, match="the port must be a number"):
        parse_destination("web1:ssh")


def test_row_shaping_exit_code_and_log_output() -> None:
    hosts = [host("a", "success", 0, stdout="hi\n"), host("b", "failure", 7, stderr="boom\n", error="exit 7"),
             host("c", "unreachable", error="refused")]
    assert run_exit_code(hosts) == 7
    assert run_exit_code([host("a", "success", 0)]) == 0
    assert run_exit_code([host("c", "unreachable")]) == 1
    assert log_output(hosts).splitlines() == [
        "=== a (a.test): success exit 0", "hi", "=== b (b.test): failure exit 7", "--- stderr ---", "boom",
        "--- error: exit 7", "=== c (c.test): unreachable", "--- error: refused"]
