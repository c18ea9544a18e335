"""Hand mode (`run`, `version`) and Cronium's manifest format, including a Cronium-made payload."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from crnr_testlib import RUNNER_ROOT, make_tar

sys.path.insert(0, RUNNER_ROOT)
from cronium_runner import RunnerError  # noqa: E402
from cronium_runner.manifest import load_manifest, parse_yaml  # noqa: E402

CRONIUM_MANIFEST = """version: v1
interpreter: PYTHON
entrypoint: script.py
environment:
  GREETING: hello world
  PORT: 8080
metadata:
  jobId: job_1723500000_abc
  eventId: "42"
  eventVersion: 3
  createdAt: 2025-08-13T00:00:00Z
  executionId: exec_job_1723500000_abc_1_1723500000
  eventName: Nightly backup
  trigger: SCHEDULE
  inputData: {"files": ["a", "b"], "dry": true}
"""

CRONIUM_SCRIPT = """import json, os
print(json.dumps({"input": cronium.input(), "event": cronium.event(),
                  "env": [os.environ["GREETING"], os.environ["PORT"], os.environ["CRONIUM_JOB_ID"],
                          os.environ["CRONIUM_EVENT_ID"]]}))
"""


def _hand(py, pyz, tar: bytes, tmp_path, *args, env=None):
    p = tmp_path / "payload.tar.gz"
    p.write_bytes(tar)
    res = tmp_path / "result.json"
    cp = subprocess.run([py, pyz, "run", str(p), "--result", str(res), *args], capture_output=True, env=env,
                        timeout=60)
    return cp, (json.loads(res.read_text()) if res.exists() else None)


def test_cronium_made_payload_hand_mode(any_py, pyz, tmp_path):
    tar = make_tar([("manifest.yaml", CRONIUM_MANIFEST), ("script.py", CRONIUM_SCRIPT)])
    cp, res = _hand(any_py, pyz, tar, tmp_path)
    assert cp.returncode == 0, cp.stderr
    out = json.loads(cp.stdout)
    assert out["input"] == {"files": ["a", "b"], "dry": True}
    assert out["event"]["jobId"] == "job_1723500000_abc" and out["event"]["eventId"] == "42"
    assert out["event"]["eventName"] == "Nightly backup" and out["event"]["eventVersion"] == 3
    assert out["env"] == ["hello world", "8080", "job_1723500000_abc", "42"]
    assert res["status"] == "success" and res["exit_code"] == 0 and res["runner"]["version"] == "0.1.0"


def test_hand_mode_exit_codes_and_streams(py, pyz, tmp_path):
    tar = make_tar([("manifest.yaml", "version: v1\ninterpreter: bash\nentrypoint: script.sh\n"),
                    ("script.sh", "echo out; echo err >&2; printf '\\377\\n'; exit 42")])
    cp, res = _hand(py, pyz, tar, tmp_path)
    assert cp.returncode == 42 and res["exit_code"] == 42 and res["status"] == "failure"
    assert cp.stdout == b"out\n\xff\n" and cp.stderr == b"err\n"


def test_hand_mode_timeout_and_input(py, pyz, tmp_path):
    tar = make_tar([("manifest.yaml", "version: v1\ninterpreter: bash\nentrypoint: script.sh\n"),
                    ("script.sh", "cronium_input; sleep 30")])
    cp, res = _hand(py, pyz, tar, tmp_path, "--timeout", "0.5", "--input", '{"a": [1]}')
    assert cp.returncode == 124 and res["status"] == "timeout" and res["timed_out"] is True
    assert json.loads(cp.stdout) == {"a": [1]}


def test_hand_mode_keep(py, pyz, tmp_path):
    tar = make_tar([("manifest.yml", "version: v1\ninterpreter: Bash\nentrypoint: script.sh\n"),
                    ("script.sh", "touch here")])
    env = dict(os.environ, TMPDIR=str(tmp_path))
    cp, res = _hand(py, pyz, tar, tmp_path, "--keep", env=env)
    assert cp.returncode == 0
    assert os.path.exists(os.path.join(res["workdir"], "here"))
    assert b"kept" in cp.stderr


def test_hand_mode_error_message(py, pyz, tmp_path):
    tar = make_tar([("manifest.yaml", "version: v1\ninterpreter: HTTP_REQUEST\nentrypoint: x\n"), ("x", "")])
    cp, res = _hand(py, pyz, tar, tmp_path)
    assert cp.returncode == 125 and res["error_kind"] == "refused"
    assert b"refused" in cp.stderr


def test_usage(py, pyz):
    cp = subprocess.run([py, pyz], capture_output=True)
    assert cp.returncode == 2 and b"usage" in cp.stderr


@pytest.mark.parametrize("interp", ["NODEJS", "NODE", "node", "NodeJS"])
def test_node_spellings(py, pyz, tmp_path, interp):
    tar = make_tar([("manifest.yaml", f"version: v1\ninterpreter: {interp}\nentrypoint: script.js\n"),
                    ("script.js", "console.log('node', typeof cronium.getVariable)")])
    cp, _ = _hand(py, pyz, tar, tmp_path)
    assert cp.stdout == b"node function\n", cp.stderr


@pytest.mark.parametrize("manifest", [
    "version: v1\ninterpreter: http\nentrypoint: script.sh\n",
    "version: v1\ninterpreter: TOOL_ACTION\nentrypoint: script.sh\n",
    "version: v1\ninterpreter: bash\nentrypoint: script.sh\nx-cronium-fab:\n  event_type: HTTP_REQUEST\n",
    "version: v1\ninterpreter: bash\nentrypoint: script.sh\nx-cronium-fab: {event_type: TOOL_ACTION}\n",
    "version: v1\ninterpreter: bash\nentrypoint: script.sh\nx-cronium-fab:\n  eventType: TOOL_ACTION\n",
], ids=["http", "tool_action", "ext-http", "ext-tool", "ext-camel"])
def test_refused_types(py, pyz, tmp_path, manifest):
    from crnr_testlib import payload, run_serve
    s = run_serve(py, pyz, None, payload_bytes=payload("touch pwned", manifest=manifest))
    assert s.result["status"] == "error" and s.result["error_kind"] == "refused"
    assert s.stdout == b""


def test_yaml_subset():
    doc = parse_yaml("""# comment
version: v1   # trailing
interpreter: 'PYTHON'
entrypoint: "script.py"
environment:
  A: "x: y # not a comment"
  B: 'it''s'
  C: 12
  D: true
  E:
  F: ~
metadata:
  inputData:
    list:
      - 1
      - two
      - {k: v}
      - name: n
        deep: [1, 2]
    text: |
      line 1
      line 2
    folded: >-
      a
      b
  extra: {}
""")
    assert doc["interpreter"] == "PYTHON" and doc["entrypoint"] == "script.py"
    assert doc["environment"] == {"A": "x: y # not a comment", "B": "it's", "C": 12, "D": True, "E": None, "F": None}
    data = doc["metadata"]["inputData"]
    assert data["list"] == [1, "two", {"k": "v"}, {"name": "n", "deep": [1, 2]}]
    assert data["text"] == "line 1\nline 2\n" and data["folded"] == "a b"
    assert doc["metadata"]["extra"] == {}


def test_manifest_normalised():
    m = load_manifest(b"version: v1\ninterpreter: NODEJS\nentrypoint: script.js\nenvironment: {A: 1, B: true}\n")
    assert m["interpreter"] == "node" and m["environment"] == {"A": "1", "B": "true"}
    for bad in (b"version: v2\ninterpreter: bash\nentrypoint: s\n", b"version: v1\ninterpreter: ruby\nentrypoint: s\n",
                b"version: v1\ninterpreter: bash\n", b"- a\n- b\n", b"version: v1\n  bad: indent\n"):
        with pytest.raises(RunnerError) as e:
            load_manifest(bad)
        assert e.value.kind == "manifest"
