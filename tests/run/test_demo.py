"""`make demo` (python -m cronium_fab.demo): a real 3-host run that stays inside its .demo/ directory."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.procs import procs_with

pytestmark = pytest.mark.ssh


def test_demo_runs_keeps_to_its_own_database_and_leaves_a_usable_environment(
        tmp_path: Path, signing_keys: tuple[Path, Path], signed_runner: Path) -> None:
    key, pub = signing_keys
    elsewhere = tmp_path / "production.db"            # as if Cronium's database were configured
    env = dict(os.environ, CRONIUM_DATABASE_URL=f"sqlite:///{elsewhere}", CRONIUM_FAB_SIGNING_KEY=str(key),
               CRONIUM_FAB_PUBLIC_KEY=str(pub), CRONIUM_FAB_RUNNER=str(signed_runner))
    env.pop("CRONIUM_FAB_DATA_DIR", None)
    try:
        out = subprocess.run([sys.executable, "-m", "cronium_fab.demo"], env=env, cwd=tmp_path, capture_output=True,
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
    finally:
        stop = subprocess.run([sys.executable, "-m", "cronium_fab.demo", "--stop"], env=env, cwd=tmp_path,
                              capture_output=True, text=True, timeout=60)
    assert stop.returncode == 0, stop.stderr
    assert "stopped 3 demo host(s)" in stop.stdout
    assert procs_with(str(tmp_path / ".demo")) == []
