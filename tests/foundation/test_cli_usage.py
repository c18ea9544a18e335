"""Usage errors: one line that says what to do, exit status 2, no traceback, nothing run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run-event", "--id", "abc"], "--id needs an event id"),
        (["run-event"], "--id is required"),
        (["run-event", "--id", "1", "--timeout", "-5"], "greater than 0"),
        (["run-event", "--id", "1", "--timeout", "soon"], "greater than 0"),
        (["run-event", "--id", "1", "--input", "{not json"], "--input is not valid JSON"),
        (["run-event", "--id", "1", "--helper-mode", "magic"], "helper mode 'magic'"),
        (["run-event", "--id", "1", "--host-key-policy", "yolo"], "host key policy 'yolo'"),
        (["payload-build", "--event", "x"], "--event needs an event id"),
        (["known-hosts-add", "127.0.0.1:notaport"], "port must be a number"),
        (["run-event", "--id", "1", "--batch", "1,0"], "--batch (each batch size) needs a whole number"),
        (["run-event", "--id", "1", "--max-failures", "x"], "--max-failures needs a whole number"),
        (["run-event", "--id", "1", "--max-unreachable", "120%"], "up to 100%"),
        (["run-event", "--id", "1", "--fail-fast", "--max-failures", "3"], "--fail-fast means a max-failures of 0"),
        (["run-event", "--id", "1", "--connect-retries", "99"], "--connect-retries needs a whole number from 0 to 10"),
        (["run-event", "--id", "1", "--plan", "--batch", "x"], "--batch"),
        (["rerun", "x"], "LOG_ID needs a run's log id"),
        (["rerun", "3", "--only", "some"], "--only must be one of all, failed, unreachable"),
        (["rerun", "3", "--batch", "0%"], "--batch"),
        (["show", "abc"], "LOG_ID needs a run's log id"),
        (["runs", "--limit", "0"], "--limit needs"),
        (["runs", "--event", "e"], "--event needs an event id"),
        (["run-event", "--id", "1", "--nope"], "No idea what '--nope' is"),   # a typo is not a FAILED run (1)
        (["bogus"], "No idea what 'bogus' is"),
    ],
)
def test_usage_errors(args: list[str], message: str, tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "cronium_fab", *args], capture_output=True, text=True, cwd=tmp_path,
                         env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert message in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / ".local").exists() or not any((tmp_path / ".local").rglob("*.db"))


def test_json_usage_error_still_prints_one_document(tmp_path: Path) -> None:
    import json

    out = subprocess.run([sys.executable, "-m", "cronium_fab", "run-event", "--id", "x", "--json"],
                         capture_output=True, text=True, cwd=tmp_path, env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert out.returncode == 2
    doc = json.loads(out.stdout)
    assert doc["status"] == "ERROR" and doc["exit_code"] == 2 and "--id" in doc["error"]


def test_reader_gone_is_a_quiet_failure_not_an_internal_error(tmp_path: Path) -> None:
    """`cronium-fab events | head -1` where head is already gone: exit 1, no traceback, no 'internal error'."""
    import os

    from cronium_fab.db.engine import Database
    from cronium_fab.testing.factories import add_event

    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "CRONIUM_FAB_DATA_DIR": str(tmp_path / "data")}
    subprocess.run([sys.executable, "-m", "cronium_fab", "db-init"], env=env, check=True, capture_output=True)
    db = Database(f"sqlite:///{tmp_path / 'data' / 'cronium.db'}")
    add_event(db, name="listed")
    db.dispose()
    r, w = os.pipe()
    os.close(r)                      # the reader is gone before anything is written
    try:
        out = subprocess.run([sys.executable, "-m", "cronium_fab", "events"], env=env, stdout=w, stderr=subprocess.PIPE,
                             text=True, cwd=tmp_path, timeout=60)
    finally:
        os.close(w)
    assert out.returncode == 1, out.stderr
    assert "internal error" not in out.stderr and "Traceback" not in out.stderr


def test_json_flag_typo_still_prints_one_document(tmp_path: Path) -> None:
    import json

    out = subprocess.run([sys.executable, "-m", "cronium_fab", "run-event", "--id", "1", "--json", "--nope"],
                         capture_output=True, text=True, cwd=tmp_path, env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert out.returncode == 2
    doc = json.loads(out.stdout)
    assert doc["status"] == "ERROR" and doc["exit_code"] == 2 and "--nope" in doc["error"]


@pytest.mark.parametrize("args", [["rerun", "x", "--json"], ["show", "0", "--json"], ["runs", "--limit", "-", "--json"],
                                  ["rerun", "1", "--json", "--nope"]])
def test_every_json_command_prints_one_document_on_a_usage_error(args: list[str], tmp_path: Path) -> None:
    import json

    out = subprocess.run([sys.executable, "-m", "cronium_fab", *args], capture_output=True, text=True, cwd=tmp_path,
                         env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert out.returncode == 2, out.stderr
    doc = json.loads(out.stdout)
    assert doc["status"] == "ERROR" and doc["exit_code"] == 2


def test_programs_the_tests_start_do_not_inherit_an_ignored_sigint() -> None:
    """Regression: a suite run as `make test &` from a script ignores SIGINT, its children inherit
    that, and `run-event` keeps an ignored SIGINT ignored (as `nohup`/`&` users expect): the Ctrl-C
    tests then failed with exit 4 (the host ran to its timeout). tests/conftest.py undoes it."""
    import subprocess
    import sys

    probe = "import signal; print(signal.getsignal(signal.SIGINT) is signal.SIG_IGN)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60).stdout
    assert out.strip() == "False"
