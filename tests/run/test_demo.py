"""`make demo` (python -m cronium_fab.testing.demo): a real 3-host run that stays inside its .demo/ directory."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from cronium_fab.testing.procs import procs_with, wait_until


def _read(path: Path) -> str:
    return path.read_text() if path.exists() else ""

# With test_worker.py on one xdist worker: it starts a `cronium-fab worker` (see there).
pytestmark = [pytest.mark.ssh, pytest.mark.xdist_group("cronium-fab-worker")]


def test_demo_runs_keeps_to_its_own_database_and_leaves_a_usable_environment(
        tmp_path: Path, signing_keys: tuple[Path, Path], signed_runner: Path) -> None:
    key, pub = signing_keys
    elsewhere = tmp_path / "production.db"            # as if Cronium's database were configured
    env = dict(os.environ, CRONIUM_DATABASE_URL=f"sqlite:///{elsewhere}", CRONIUM_FAB_SIGNING_KEY=str(key),
               CRONIUM_FAB_PUBLIC_KEY=str(pub), CRONIUM_FAB_RUNNER=str(signed_runner))
    env.pop("CRONIUM_FAB_DATA_DIR", None)
    try:
        out = subprocess.run([sys.executable, "-m", "cronium_fab.testing.demo"], env=env, cwd=tmp_path, capture_output=True,
                             text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        assert "the demo ignores your CRONIUM_DATABASE_URL" in out.stderr
        assert not elsewhere.exists(), "the demo must never write into the configured database"
        assert "demo_" in out.stderr and "SUCCESS" in out.stderr        # stored variables and the summary
        env_file = tmp_path / ".demo" / "env"
        assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
        # The printed next step works from anywhere, whatever the caller's own settings.
        again = subprocess.run(["bash", "-c", f". {env_file} && cronium-fab run-event --id 1 --json"],
                               env=env, cwd="/", capture_output=True, text=True, timeout=120)
        assert again.returncode == 0, again.stderr
        doc = json.loads(again.stdout)
        assert doc["status"] == "SUCCESS" and len(doc["hosts"]) == 3
        assert not elsewhere.exists()
        # The printed worker line, as a user would type it; make demo-stop stops that worker too.
        subprocess.run(["bash", "-c", f". {env_file}; cronium-fab worker 2>>{tmp_path}/.demo/worker.log &"],
                       env=env, cwd=tmp_path, check=True, timeout=60)
        wait_until(lambda: "listening on" in _read(tmp_path / ".demo" / "worker.log"), 30)
        served = subprocess.run(["bash", "-c", f". {env_file} && cronium-fab events"], env=env, cwd="/",
                                capture_output=True, text=True, timeout=60)
        assert served.returncode == 0 and "demo-helpers" in served.stdout, served.stderr
        assert ": run " in _read(tmp_path / ".demo" / "worker.log")
    finally:
        stop = subprocess.run([sys.executable, "-m", "cronium_fab.testing.demo", "--stop"], env=env, cwd=tmp_path,
                              capture_output=True, text=True, timeout=60)
    assert stop.returncode == 0, stop.stderr
    assert "stopped 3 demo host(s)" in stop.stdout
    assert "stopped the demo's cronium-fab worker" in stop.stdout
    sock = tmp_path / ".demo" / "data" / "worker.sock"
    wait_until(lambda: not sock.exists(), 10)   # a worker removes its socket when it stops
    assert not sock.exists()
    assert "stopped;" in _read(tmp_path / ".demo" / "worker.log")
    assert procs_with(str(tmp_path / ".demo")) == []
