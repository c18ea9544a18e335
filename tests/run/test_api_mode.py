"""API mode end to end: helper API in this process, remote forward per host, real sshd, both databases."""

from __future__ import annotations

import io
import json
import os
import socket
import threading
import time

import pytest
from sqlalchemy import select

from cronium_fab.db.models import Execution, UserVariable
from cronium_fab.execute import RunRequest, RunResult, run_event
from cronium_fab.testing.factories import add_event
from cronium_fab.testing.procs import session_processes, watch_argv
from tests.run.conftest import Fleet

pytestmark = pytest.mark.ssh


def _run(fleet: Fleet, event_id: int, mode: str = "api", **kw: object) -> RunResult:
    return run_event(fleet.settings, RunRequest(event_id=event_id, helper_mode=mode, **kw), out=None)  # type: ignore[arg-type]


PY_ALL = """
import cronium as mod
assert mod is cronium
cronium.setVariable("py_camel", {"a": [1, 2.5, None, True, "é"]})
cronium.set_variable("py_snake", "text")
seen = [cronium.getVariable("py_camel"), cronium.get_variable("py_snake"), cronium.getVariable("missing")]
ctx = cronium.event()
cronium.output({"seen": seen, "mode": ctx.get("helperMode"), "input": cronium.input(),
                "env": [k for k in ("CRONIUM_RUNTIME_API", "CRONIUM_EXECUTION_TOKEN", "CRONIUM_EXECUTION_ID",
                                    "CRONIUM_API_ENDPOINT", "CRONIUM_API_TOKEN") if k in __import__("os").environ]})
cronium.set_condition(True)
"""

NODE_ALL = """
const c = require('cronium');
c.setVariable('node_var', {n: 1, s: 'x', l: [true, null]});
const v = cronium.getVariable('node_var');
cronium.output({node: v, input: cronium.input(), id: cronium.event().executionId});
cronium.setCondition(false);
"""

BASH_ALL = """
cronium_set_variable bash_var "hello world"
cronium.setVariable bash_cmd 42
v1=$(cronium_get_variable bash_var)
v2=$(cronium.getVariable bash_cmd)
echo "{\\"v1\\": \\"$v1\\", \\"v2\\": $v2}" | cronium.output
cronium_set_condition true
"""


@pytest.mark.parametrize(
    ("etype", "script", "expect"),
    [
        ("PYTHON", PY_ALL, lambda o: o["seen"] == [{"a": [1, 2.5, None, True, "é"]}, "text", None]
         and o["mode"] == "api" and o["input"] == {"k": "v"} and len(o["env"]) == 5),
        ("NODEJS", NODE_ALL, lambda o: o["node"] == {"n": 1, "s": "x", "l": [True, None]} and o["input"] == {"k": "v"}),
        ("BASH", BASH_ALL, lambda o: o == {"v1": "hello world", "v2": 42}),
    ],
)
def test_helpers_in_api_mode_every_language(fleet: Fleet, ssh_hosts, etype: str, script: str, expect) -> None:  # type: ignore[no-untyped-def]
    (host,) = ssh_hosts(1)
    ev = fleet.event([host], script, type=etype)
    result = _run(fleet, ev, input={"k": "v"})
    h = result.hosts[0]
    assert h.status == "success", (h.error, h.stderr)
    assert h.helper_mode == "api" and h.helper_mode_note is None
    assert expect(h.output), h.output
    with fleet.db.session() as s:
        stored = {v.key: v.value for v in s.scalars(select(UserVariable))}
        meta = s.scalars(select(Execution)).one().execution_metadata
    assert set(h.variables) <= set(stored)
    assert meta["output"] == h.output and meta["condition"] == h.condition


def test_forwarding_refused_falls_back_in_auto_and_fails_in_api(fleet: Fleet, ssh_hosts) -> None:  # type: ignore[no-untyped-def]
    (host,) = ssh_hosts(1, allow_tcp_forwarding=False)
    ev = fleet.event([host], "cronium.setVariable('fb', 1)\ncronium.output('ok')", type="PYTHON")
    auto = _run(fleet, ev, mode="auto")
    h = auto.hosts[0]
    assert auto.status == "SUCCESS" and h.helper_mode == "bundled" and h.output == "ok"
    assert "fell back to bundled mode" in (h.helper_mode_note or "") and "forward" in (h.helper_mode_note or "").lower()
    with fleet.db.session() as s:
        assert s.scalars(select(UserVariable.value).where(UserVariable.key == "fb")).one() == "1"
    strict = _run(fleet, ev, mode="api")
    h = strict.hosts[0]
    assert strict.status == "FAILURE" and h.status == "failure" and h.error_kind == "forwarding-refused"
    assert "API mode" in (h.error or "")


def test_variable_set_on_one_host_is_read_live_by_another(fleet: Fleet, ssh_hosts) -> None:  # type: ignore[no-untyped-def]
    a, b = ssh_hosts(2)
    script = """
import time
if cronium.event()["serverName"] == "writer":
    cronium.setVariable("baton", "passed")
    cronium.output("wrote")
else:
    deadline = time.time() + 20
    while cronium.getVariable("baton") != "passed" and time.time() < deadline:
        time.sleep(0.05)
    cronium.output(cronium.getVariable("baton"))
"""
    ev = fleet.event([a, b], script, type="PYTHON", names=["writer", "reader"])
    result = _run(fleet, ev)
    assert [h.output for h in result.hosts] == ["wrote", "passed"]


def test_two_concurrent_runs_on_one_host_get_different_ports(fleet: Fleet, ssh_hosts) -> None:  # type: ignore[no-untyped-def]
    (host,) = ssh_hosts(1)
    ev = fleet.event([host], "import os, time\ntime.sleep(1)\ncronium.output(os.environ['CRONIUM_RUNTIME_API'])",
                     type="PYTHON")
    results: list[RunResult] = []
    threads = [threading.Thread(target=lambda: results.append(_run(fleet, ev))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r.status for r in results] == ["SUCCESS", "SUCCESS"]
    endpoints = {r.hosts[0].output for r in results}
    assert len(endpoints) == 2 and all(str(e).startswith("http://127.0.0.1:") for e in endpoints)


def test_token_never_in_remote_argv(fleet: Fleet, ssh_hosts) -> None:  # type: ignore[no-untyped-def]
    (host,) = ssh_hosts(1)
    ev = fleet.event([host], "import time\nfor _ in range(15):\n    cronium.getVariable('x')\n    time.sleep(0.1)",
                     type="PYTHON")
    with watch_argv("eyJ") as found:  # every JWT starts with base64('{"')
        result = _run(fleet, ev)
    assert result.status == "SUCCESS" and result.hosts[0].helper_mode == "api"
    assert found == []
    assert "eyJ" not in json.dumps(result.to_dict())


def _sockets() -> int:
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}").startswith("socket:"):
                n += 1
        except OSError:
            pass
    return n


def test_no_leaked_threads_or_sockets_after_50_runs(fleet: Fleet, ssh_hosts) -> None:  # type: ignore[no-untyped-def]
    (host,) = ssh_hosts(1)
    ev = fleet.event([host], 'cronium.setVariable("n", (cronium.getVariable("n") or 0) + 1)', type="PYTHON")
    _run(fleet, ev)  # warm: runner installed, engine pools created
    threads, socks = threading.active_count(), _sockets()
    for _ in range(50):
        assert _run(fleet, ev).status == "SUCCESS"
    deadline = time.monotonic() + 5
    while (threading.active_count() > threads or _sockets() > socks) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert threading.active_count() <= threads, [t.name for t in threading.enumerate()]
    assert _sockets() <= socks
    with fleet.db.session() as s:
        assert s.scalars(select(UserVariable.value).where(UserVariable.key == "n")).one() == "51"


def test_api_port_is_closed_after_the_run(fleet: Fleet, ssh_hosts) -> None:  # type: ignore[no-untyped-def]
    (host,) = ssh_hosts(1)
    ev = fleet.event([host], "import os\ncronium.output(os.environ['CRONIUM_RUNTIME_API'])", type="PYTHON")
    endpoint = _run(fleet, ev).hosts[0].output
    port = int(str(endpoint).rsplit(":", 1)[1])
    with socket.socket() as s:
        s.settimeout(1)
        assert s.connect_ex(("127.0.0.1", port)) != 0


def test_bundled_mode_is_still_available(fleet: Fleet, ssh_hosts) -> None:  # type: ignore[no-untyped-def]
    (host,) = ssh_hosts(1)
    sid = fleet.add(host)
    ev = add_event(fleet.db, type="PYTHON", content="import os\ncronium.output(os.environ['CRONIUM_HELPER_MODE'])",
                   servers=[sid])
    h = _run(fleet, ev, mode="bundled").hosts[0]
    assert (h.helper_mode, h.output) == ("bundled", "bundled")


@pytest.mark.timeout(150)  # a hang (Paramiko waiting forever on the frozen peer) fails here
def test_frozen_host_in_api_mode_ends_unreachable_not_a_hang(fleet: Fleet, ssh_hosts, ssh_pool) -> None:  # type: ignore[no-untyped-def]
    import signal

    (host,) = ssh_hosts(1, exclusive=True)
    ev = fleet.event([host], "echo started; sleep 100", timeout_value=2)
    frozen: list[int] = []

    started = threading.Event()

    class Watch(io.StringIO):  # the live output: freeze once the script runs (not during set-up)
        def write(self, text: str) -> int:
            if "started" in text:
                started.set()
            return len(text)

    def freeze() -> None:  # SIGSTOP the host's SSH session processes: the peer neither answers nor dies
        started.wait(60)
        for pid in session_processes(host):
            os.kill(pid, signal.SIGSTOP)
            frozen.append(pid)

    t = threading.Thread(target=freeze)
    t.start()
    result = run_event(fleet.settings.with_(watchdog_margin=2.0), RunRequest(event_id=ev, helper_mode="api"),
                       out=Watch())
    t.join()
    assert frozen, "no session process was frozen"
    h = result.hosts[0]
    # the runner's heartbeat stops with the frozen session: unresponsive (before the watchdog's end)
    assert result.status == "FAILURE" and h.status == "unreachable" and h.error_kind == "unresponsive", h.error
    with fleet.db.session() as s:
        assert s.scalars(select(Execution)).one().status == "failed"
