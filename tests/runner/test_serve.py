"""serve mode: framing, results, streaming, exit codes, errors (the wire format of docs/PROTOCOL.md)."""

from __future__ import annotations

import hashlib
import json
import subprocess

from crnr_testlib import decode, encode_input, header, payload, run_serve, serve


def test_version(any_py, pyz):
    out = subprocess.run([any_py, pyz, "version"], capture_output=True, check=True).stdout
    info = json.loads(out)
    with open(pyz, "rb") as f:
        assert info == {"version": "0.1.0", "protocol": 2, "sha256": hashlib.sha256(f.read()).hexdigest()}


def test_serve_basic_all_pythons(any_py, pyz, tmpdir_env):
    env, tmp = tmpdir_env
    s = run_serve(any_py, pyz, 'echo "out $CRONIUM_JOB_ID"; echo err >&2; exit 0', proc_env=env)
    assert s.rc == 0
    assert s.raw.startswith(b"CRNRH")
    assert s.hello["magic"] == "CRNR" and s.hello["protocol"] == 2
    assert s.hello["python"].startswith(any_py.rsplit("python", 1)[1])
    assert s.stdout == b"out job_1\n" and s.stderr_script == b"err\n"
    r = s.result
    assert r["status"] == "success" and r["exit_code"] == 0 and r["signal"] is None
    assert r["timed_out"] is False and r["error"] is None
    assert r["runner"]["sha256"] == s.hello["sha256"] and r["runner"]["protocol"] == 2
    assert set(r["durations_ms"]) == {"setup", "execution", "cleanup", "total"}
    assert r["usage"]["max_rss_kb"] > 0
    assert r["truncated"] == {"stdout": 0, "stderr": 0}
    assert s.records[-1].kind == "R"
    assert list(tmp.iterdir()) == []


def test_exit_code_passthrough(py, pyz):
    s = run_serve(py, pyz, "exit 42")
    assert s.result["status"] == "failure" and s.result["exit_code"] == 42


def test_signal_reported(py, pyz):
    s = run_serve(py, pyz, "kill -USR1 $$; sleep 5")
    assert s.result["status"] == "failure"
    assert s.result["exit_code"] is None and s.result["signal"] == 10


def test_stream_order_kept(py, pyz):
    s = run_serve(py, pyz, "for i in 1 2 3; do echo o$i; sleep 0.05; echo e$i >&2; sleep 0.05; done")
    seq = [(r.kind, r.data) for r in s.records if r.kind in "OE"]
    assert seq == [(k, f"{k.lower()}{i}\n".encode()) for i in (1, 2, 3) for k in "OE"]
    ts = [r.ts for r in s.records if r.kind in "OE"]
    assert ts == sorted(ts)


def test_ten_megabyte_line_and_invalid_utf8_intact(py, pyz):
    script = (
        "import sys\n"
        "sys.stdout.buffer.write(b'x' * 10_000_000)\n"
        "sys.stderr.buffer.write(b'bad \\xff\\xfe \\xc3( end')\n"
    )
    s = run_serve(py, pyz, script, "python")
    assert s.result["status"] == "success", s.result
    assert s.stdout == b"x" * 10_000_000
    assert s.stderr_script == b"bad \xff\xfe \xc3( end"
    assert s.result["truncated"] == {"stdout": 0, "stderr": 0}
    assert max(len(r.body) for r in s.records) <= 64 * 1024


def test_output_cap_keeps_tail_and_marks(py, pyz):
    script = "import sys\nsys.stdout.write('H' * 1000 + 'M' * 5000 + 'T' * 1000)\nsys.stdout.flush()\n"
    s = run_serve(py, pyz, script, "python", output_cap=2000)
    assert s.result["truncated"] == {"stdout": 5000, "stderr": 0}
    out = s.stdout
    assert out.startswith(b"H" * 1000) and out.endswith(b"T" * 1000)
    assert b"[cronium-runner: 5000 bytes of stdout dropped by output_cap]" in out
    assert b"M" not in out


def test_script_cannot_forge_result(py, pyz):
    fake = json.dumps({"status": "success", "exit_code": 0}).encode()
    forged = b"CRNR" + b"R" + len(fake).to_bytes(4, "big") + fake
    script = f"import sys\nsys.stdout.buffer.write({forged!r})\nsys.exit(3)\n"
    s = run_serve(py, pyz, script, "python")
    assert s.result["status"] == "failure" and s.result["exit_code"] == 3
    assert s.stdout == forged
    assert [r.kind for r in s.records].count("R") == 1


def test_protocol_mismatch_preamble(py, pyz):
    p = payload("echo hi")
    s = serve(py, pyz, encode_input(header(p, protocol=1), p, protocol=1))
    assert s.rc == 3
    assert s.result["status"] == "error" and s.result["error_kind"] == "protocol"
    assert "protocol" in s.result["error"] and "1" in s.result["error"]
    assert not any(r.kind in "OE" for r in s.records)


def test_protocol_mismatch_header(py, pyz):
    p = payload("echo hi")
    s = serve(py, pyz, encode_input(header(p, protocol=7), p))
    assert s.rc == 3 and s.result["error_kind"] == "protocol"


def test_garbage_input_is_protocol_error(py, pyz):
    s = serve(py, pyz, b"GET / HTTP/1.1\r\n\r\n")
    assert s.rc == 3 and s.result["error_kind"] == "protocol"


def test_digest_mismatch_refused_before_extraction(py, pyz, tmpdir_env):
    env, tmp = tmpdir_env
    p = payload("touch /tmp/should-not-run-$$; echo ran")
    h = header(p, payload_sha256="0" * 64)
    s = serve(py, pyz, encode_input(h, p), env=env)
    assert s.rc == 0
    assert s.result["status"] == "error" and s.result["error_kind"] == "digest"
    assert s.stdout == b""
    assert list(tmp.iterdir()) == []


def test_missing_interpreter_named(py, pyz):
    s = run_serve(py, pyz, "console.log(1)", "node", interpreters={"node": "no-such-node-xyz"})
    assert s.result["status"] == "error" and s.result["error_kind"] == "interpreter"
    assert "no-such-node-xyz" in s.result["error"]
    s = run_serve(py, pyz, "print(1)", "python", interpreters={"python": "/opt/none/python3"})
    assert s.result["error_kind"] == "interpreter" and "/opt/none/python3" in s.result["error"]


def test_interpreter_override(py, pyz, script_python):
    s = run_serve(py, pyz, "import sys; print(sys.executable)", "python",
                  interpreters={"python": script_python})
    assert s.stdout.decode().strip() == script_python


def test_env_is_clean(py, pyz, tmpdir_env):
    env, _ = tmpdir_env
    env["FOO_SECRET"] = "leak"
    env["PASSED_ONE"] = "yes"
    script = "env | sort"
    s = run_serve(py, pyz, script, proc_env=env, pass_env=["PASSED_ONE"], env={"EVENT_VAR": "v1"})
    lines = dict(line.split("=", 1) for line in s.stdout.decode().splitlines() if "=" in line)
    assert "FOO_SECRET" not in lines
    assert lines["PASSED_ONE"] == "yes" and lines["EVENT_VAR"] == "v1"
    for k in ("PATH", "HOME", "USER", "LANG", "TMPDIR", "CRONIUM_JOB_ID", "CRONIUM_EXECUTION_ID",
              "CRONIUM_EVENT_ID", "CRONIUM_SERVER_ID", "CRONIUM_SERVER_NAME", "CRONIUM_WORK_DIR",
              "CRONIUM_HELPER_MODE"):
        assert k in lines, k
    assert lines["CRONIUM_EXECUTION_ID"] == "exec_job_1_7_1700000000"
    assert lines["CRONIUM_SERVER_NAME"] == "web-1" and lines["CRONIUM_HELPER_MODE"] == "bundled"
    assert lines["TMPDIR"].startswith(lines["CRONIUM_WORK_DIR"])
    allowed = {"PATH", "HOME", "USER", "LANG", "TMPDIR", "PASSED_ONE", "EVENT_VAR", "PYTHONPATH",
               "NODE_PATH", "NODE_OPTIONS", "BASH_ENV", "PWD", "SHLVL", "_", "OLDPWD"}
    assert {k for k in lines if not k.startswith("CRONIUM_")} <= allowed


def test_cwd_stdin_session(py, pyz):
    s = run_serve(py, pyz, 'pwd; [ "$(pwd)" = "$CRONIUM_WORK_DIR" ] && echo same; cat; echo "eof";'
                           ' ps -o sid= -p $$ | tr -d " "; echo $$')
    lines = s.stdout.decode().split("\n")
    assert lines[1] == "same" and lines[2] == "eof"
    assert lines[3] == lines[4]  # the script leads its own session


def test_header_manifest_bound_by_digest(py, pyz):
    man = "version: v1\ninterpreter: bash\nentrypoint: script.sh\n"
    p = payload("echo from-header-manifest", manifest=man)
    good = hashlib.sha256(man.encode()).hexdigest()
    parsed = {"version": "v1", "interpreter": "bash", "entrypoint": "script.sh"}
    s = serve(py, pyz, encode_input(header(p, manifest=parsed, manifest_sha256=good), p))
    assert s.result["status"] == "success" and s.stdout == b"from-header-manifest\n"
    s = serve(py, pyz, encode_input(header(p, manifest=parsed, manifest_sha256="1" * 64), p))
    assert s.result["error_kind"] == "digest"


def test_result_is_last_record(py, pyz):
    s = run_serve(py, pyz, "echo a")
    hello, records, result = decode(s.raw)
    assert records[0].kind == "H" and records[-1].kind == "R" and result == s.result
