"""Runtime helpers in bundled and API mode: Python, Node.js and bash, every spelling, all JSON types."""

from __future__ import annotations

import http.server
import json
import threading

import pytest
from crnr_testlib import run_serve

VALUES = {
    "s": "héllo ✓ 日本 \"quoted\"",
    "i": 42,
    "neg": -7,
    "f": 3.5,
    "t": True,
    "fl": False,
    "n": None,
    "l": [1, "two", None, {"x": []}],
    "o": {"a": {"b": [True, 1.5]}, "u": "ü", "empty": {}},
}
PRE = {"pre": {"k": [1, 2]}, "same": "unchanged"}

PY_SCRIPT = r"""
import json, sys
import cronium as mod
assert __name__ == "__main__", __name__
assert mod is cronium
values = json.loads(sys.argv[1] if len(sys.argv) > 1 else open("values.json").read())
got = {}
for n, (k, v) in enumerate(sorted(values.items())):
    (cronium.setVariable if n % 2 else mod.set_variable)(k, v)
    got[k] = cronium.get_variable(k) if n % 2 else mod.getVariable(k)
cronium.set_variable("same", "unchanged")
out = {"got": got, "input": cronium.input(), "event": cronium.event(), "pre": cronium.getVariable("pre"),
       "unknown": mod.get_variable("nope")}
cronium.output(out)
mod.setCondition(False)
cronium.set_condition(True)
"""

NODE_SCRIPT = r"""
const fs = require('fs');
const mod = require('cronium');
if (mod !== cronium) throw new Error('global and require differ');
if (require.main !== module) throw new Error('not main');
const values = JSON.parse(fs.readFileSync('values.json', 'utf8'));
(async () => {
  const got = {};
  let n = 0;
  for (const k of Object.keys(values).sort()) {
    if (n % 2) { cronium.setVariable(k, values[k]); got[k] = cronium.getVariable(k); }
    else { mod.set_variable(k, values[k]); got[k] = await mod.get_variable(k); }
    n++;
  }
  cronium.setVariable('same', 'unchanged');
  cronium.output({got, input: await cronium.input(), event: cronium.event(), pre: cronium.getVariable('pre'),
                  unknown: mod.getVariable('nope')});
  mod.set_condition(false);
  cronium.setCondition(true);
})();
"""

BASH_SCRIPT = r"""
set -e
i=0
for k in $(python3 -c 'import json;print(" ".join(sorted(json.load(open("values.json")))))'); do
  v=$(python3 -c "import json,sys;print(json.dumps(json.load(open('values.json'))[sys.argv[1]], ensure_ascii=False))" "$k")
  case $((i % 3)) in
    0) cronium_set_variable "$k" "$v" ;;
    1) cronium.setVariable "$k" "$v" ;;
    2) printf '%s' "$v" | cronium.setVariable "$k" ;;
  esac
  if [ $((i % 2)) = 0 ]; then cronium_get_variable "$k" --json >> got.jsonl; else cronium.getVariable --json "$k" >> got.jsonl; fi
  i=$((i + 1))
done
cronium_set_variable same unchanged
echo "raw:$(cronium_get_variable s)"
echo "rawnum:$(cronium.getVariable i)"
echo "unknown:[$(cronium_get_variable nope)]"
cronium_input > input.json
cronium.event > event.json
cronium_event > /dev/null
cronium.getVariable --json pre > pre.json
cronium_output '{"first": 1}'
python3 -c '
import json
got = [json.loads(l) for l in open("got.jsonl")]
keys = sorted(json.load(open("values.json")))
print(json.dumps({"got": dict(zip(keys, got)), "input": json.load(open("input.json")),
                  "event": json.load(open("event.json")), "pre": json.load(open("pre.json")), "unknown": None}))
' | cronium.output
cronium_set_condition false
cronium.setCondition true
"""


def _check(s, interp_label):
    r = s.result
    assert r["status"] == "success", (interp_label, r, s.stderr_script.decode())
    assert r["variables"] == VALUES, r["variables"]
    assert r["condition"] is True
    assert r["output_set"] is True
    out = r["output"]
    assert out["got"] == VALUES
    assert out["input"] == VALUES
    assert out["pre"] == PRE["pre"]
    assert out["unknown"] is None
    ev = out["event"]
    assert ev["eventId"] == 42 and ev["jobId"] == "job_1" and ev["serverName"] == "web-1"
    assert ev["executionId"] == "exec_job_1_7_1700000000" and ev["trigger"] == "MANUAL"
    assert ev["eventName"] == "test event" and "startTime" in ev


def _payload_files():
    return [("values.json", json.dumps(VALUES, ensure_ascii=False))]


def _run(py, pyz, script, interp, **kw):
    from crnr_testlib import payload
    p = payload(script, interp, extra_files=_payload_files())
    return run_serve(py, pyz, None, payload_bytes=p, variables=PRE, input=VALUES, **kw)


def test_python_helpers_roundtrip(any_py, pyz, script_python):
    _check(_run(any_py, pyz, PY_SCRIPT, "python", interpreters={"python": script_python}), "python")


def test_node_helpers_roundtrip(py, pyz):
    _check(_run(py, pyz, NODE_SCRIPT, "node"), "node")


def test_bash_helpers_roundtrip(py, pyz):
    s = _run(py, pyz, BASH_SCRIPT, "bash")
    _check(s, "bash")
    text = s.stdout.decode()
    assert f"raw:{VALUES['s']}\n" in text and "rawnum:42\n" in text and "unknown:[]\n" in text


def test_path_commands_from_python(py, pyz):
    script = ("import subprocess, json\n"
              "subprocess.run(['cronium.setVariable', 'k', '[1, {\"a\": null}]'], check=True)\n"
              "print(subprocess.run(['cronium.getVariable', 'k'], capture_output=True, text=True).stdout)\n")
    s = run_serve(py, pyz, script, "python")
    assert s.result["variables"] == {"k": [1, {"a": None}]}
    assert json.loads(s.stdout) == [1, {"a": None}]


def test_input_null_when_absent(py, pyz):
    s = run_serve(py, pyz, "import cronium\nprint(repr(cronium.input()))\nprint(cronium.get_variable('x'))",
                  "python", input=None)
    assert s.stdout == b"None\nNone\n"
    s = run_serve(py, pyz, 'echo "[$(cronium_input)]"; cronium.input --json', input=None)
    assert s.stdout == b"[]\nnull\n"
    s = run_serve(py, pyz, "console.log(JSON.stringify(cronium.input()))", "node", input=None)
    assert s.stdout == b"null\n"


def test_python_traceback_points_at_script(py, pyz):
    s = run_serve(py, pyz, "x = 1\n\nraise ValueError('boom')\n", "python")
    err = s.stderr_script.decode()
    assert s.result["exit_code"] == 1
    assert 'script.py", line 3, in <module>' in err and "ValueError: boom" in err
    assert err.count('  File "') == 1 and "sitecustomize" not in err


def test_no_changes_reported_when_nothing_set(py, pyz):
    s = run_serve(py, pyz, "true", variables={"a": 1})
    r = s.result
    assert r["variables"] == {} and r["output"] is None and r["output_set"] is False and r["condition"] is None


def test_output_null_is_set(py, pyz):
    s = run_serve(py, pyz, "cronium.output null")
    assert s.result["output_set"] is True and s.result["output"] is None


def test_concurrent_set_variable_no_lost_writes(py, pyz):
    script = "for i in $(seq 1 30); do cronium.setVariable k$i $i & done; wait\n" \
             "python3 -c 'import cronium\nfor i in range(30): cronium.set_variable(\"p%d\" % i, i)' &\n" \
             "node -e 'for (let i = 0; i < 10; i++) cronium.setVariable(\"n\" + i, i)' &\nwait"
    s = run_serve(py, pyz, script)
    v = s.result["variables"]
    assert {f"k{i}": i for i in range(1, 31)}.items() <= v.items()
    assert {f"p{i}": i for i in range(30)}.items() <= v.items()
    assert {f"n{i}": i for i in range(10)}.items() <= v.items()


def test_cronium_files_in_workdir(py, pyz):
    script = 'cat .cronium/input.json; echo; cat .cronium/variables.json; echo; ' \
             'echo \'{"data": {"via": "file"}}\' > .cronium/output.json; stat -c %a .cronium .cronium/input.json'
    s = run_serve(py, pyz, script, input={"a": 1}, variables={"v": "x"})
    lines = s.stdout.decode().splitlines()
    assert json.loads(lines[0]) == {"data": {"a": 1}} and json.loads(lines[1]) == {"v": "x"}
    assert lines[2:] == ["700", "600"]
    assert s.result["output"] == {"via": "file"}


class FakeApi(http.server.BaseHTTPRequestHandler):
    store: dict = {}
    seen: list = []

    def log_message(self, *a):
        pass

    def _reply(self, code, obj):
        body = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _handle(self, method):
        n = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(n)) if n else None
        self.seen.append((method, self.path, self.headers.get("Authorization"), body))
        if self.headers.get("Authorization") != "Bearer tok-123":
            return self._reply(401, {"error": "Unauthorized", "message": "bad token"})
        prefix = "/executions/exec_job_1_7_1700000000/"
        if not self.path.startswith(prefix):
            return self._reply(403, {"error": "Forbidden", "message": "wrong execution"})
        rest = self.path[len(prefix):]
        if rest == "input" and method == "GET":
            return self._reply(200, {"success": True, "data": {"from": "api"}})
        if rest == "context" and method == "GET":
            return self._reply(200, {"success": True, "data": {"executionId": "exec_job_1_7_1700000000", "via": "api"}})
        if rest.startswith("variables/"):
            from urllib.parse import unquote
            key = unquote(rest[len("variables/"):])
            if method == "GET":
                if key not in self.store:
                    return self._reply(404, {"error": "Not Found", "message": "unknown"})
                return self._reply(200, {"success": True, "data": {"key": key, "value": self.store[key]}})
            self.store[key] = body["value"]
            return self._reply(200, {"success": True})
        if rest in ("output", "condition") and method == "POST":
            self.store["__" + rest] = body
            return self._reply(200, {"success": True})
        return self._reply(404, {"error": "Not Found", "message": self.path})

    def do_GET(self):
        self._handle("GET")

    def do_POST(self):
        self._handle("POST")

    def do_PUT(self):
        self._handle("PUT")


@pytest.fixture
def fake_api():
    FakeApi.store = {"known": {"deep": [1, None]}}
    FakeApi.seen = []
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeApi)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}", FakeApi
    srv.shutdown()
    srv.server_close()


API_PY = r"""
import json, os, subprocess
import cronium
res = {"input": cronium.input(), "known": cronium.getVariable("known"), "unknown": cronium.get_variable("nope"),
       "event": cronium.event()}
cronium.setVariable("a/b", {"x": "ü"})
res["cmd"] = json.loads(subprocess.run(["cronium.getVariable", "--json", "a/b"], capture_output=True, text=True).stdout)
subprocess.run(["bash", "-c", "cronium_set_variable n 5 && cronium.setCondition true"], check=True)
res["node"] = json.loads(subprocess.run(["node", "-e", "console.log(JSON.stringify(cronium.getVariable('n')))"],
                                        capture_output=True, text=True).stdout)
env = {k: v for k, v in os.environ.items() if k.startswith("CRONIUM_")}
res["env"] = env
tok = os.environ["CRONIUM_API_TOKEN"].encode()
res["token_in_files"] = [os.path.join(d, f) for d, _, fs in os.walk(".") for f in fs
                         if tok in open(os.path.join(d, f), "rb").read()]
cronium.output(res)
"""


def test_api_mode(py, pyz, fake_api):
    url, api = fake_api
    s = run_serve(py, pyz, API_PY, "python", helper_mode="api", api={"endpoint": url, "token": "tok-123"},
                  variables={"known": "stale"})
    r = s.result
    assert r["status"] == "success", (r, s.stderr_script.decode())
    out = r["output"]
    assert out["input"] == {"from": "api"} and out["known"] == {"deep": [1, None]} and out["unknown"] is None
    assert out["event"]["via"] == "api"
    assert out["cmd"] == {"x": "ü"} and out["node"] == 5
    env = out["env"]
    assert env["CRONIUM_HELPER_MODE"] == "api" and env["CRONIUM_API_ENDPOINT"] == url
    assert env["CRONIUM_RUNTIME_API"] == url and env["CRONIUM_EXECUTION_TOKEN"] == "tok-123"
    assert env["CRONIUM_API_TOKEN"] == "tok-123" and env["CRONIUM_EXECUTION_ID"] == "exec_job_1_7_1700000000"
    assert out["token_in_files"] == []
    assert api.store["a/b"] == {"x": "ü"} and api.store["n"] == 5
    assert api.store["__condition"] == {"condition": True}
    assert api.store["__output"]["data"]["input"] == {"from": "api"}
    assert all(auth == "Bearer tok-123" for _, _, auth, _ in api.seen)
    assert ("GET", "/executions/exec_job_1_7_1700000000/variables/nope", "Bearer tok-123", None) in api.seen
    # the result still reports what the script set (the controller dedupes)
    assert r["variables"] == {"a/b": {"x": "ü"}, "n": 5} and r["condition"] is True and r["output_set"]


def test_api_mode_error_is_visible(py, pyz, fake_api):
    url, _ = fake_api
    s = run_serve(py, pyz, "cronium.getVariable known; echo rc=$?", helper_mode="api",
                  api={"endpoint": url, "token": "wrong"})
    assert b"rc=1" in s.stdout and b"HTTP 401" in s.stderr_script


def test_python_detach_from_a_threaded_script_hands_the_process_over(any_py, pyz, tmp_path):
    """``cronium.detach([...])`` in a script with a thread running: the command is started (exec,
    no Python in a forked child), in its own session, and outlives the run; a missing program is a
    clear OSError."""
    import os
    import signal
    import time

    from cronium_fab.testing.procs import procs_with

    tag = f"crnr-pydetach-{os.getpid()}-{time.monotonic_ns()}"
    log = tmp_path / "svc.log"
    script = (
        "import threading, time\n"
        "threading.Thread(target=time.sleep, args=(5,), daemon=True).start()\n"
        f"pid = cronium.detach(['bash', '-c', 'echo up; exec -a {tag} sleep 300'], log={str(log)!r})\n"
        "print(pid)\n"
        "try:\n"
        "    cronium.detach(['/no/such/program'])\n"
        "except OSError as e:\n"
        "    print('error:', e)\n"
    )
    s = run_serve(any_py, pyz, script, "python")
    try:
        assert s.result["status"] == "success", (s.result, s.stderr_script)
        first, second = s.stdout.decode().splitlines()
        assert second == "error: /no/such/program: No such file or directory"
        time.sleep(0.5)                    # the runner's clean-up is over: it was left alone
        (pid,) = procs_with(tag)
        assert pid == int(first) and os.getsid(pid) == pid
        assert log.read_text() == "up\n" and (log.stat().st_mode & 0o777) == 0o600
    finally:
        for p in procs_with(tag):
            os.kill(p, signal.SIGKILL)
