"""`inv build sign`: reproducible runner artifact, sha256 file, openssl-verifiable signature."""

from __future__ import annotations

import base64
import hashlib
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _inv(tmp: Path, *tasks: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, CRONIUM_FAB_RUNNER_SRC=str(ROOT / "runner"))
    return subprocess.run(
        [sys.executable, "-m", "invoke", "-r", str(ROOT), *tasks], cwd=tmp, env=env, capture_output=True, text=True
    )


def test_build_sign_twice_is_byte_identical_and_openssl_verifies(tmp_path: Path) -> None:
    assert _inv(tmp_path, "keygen").returncode == 0
    first = _inv(tmp_path, "build", "sign")
    assert first.returncode == 0, first.stderr
    pyz = tmp_path / "dist" / "cronium-runner.pyz"
    bytes1 = pyz.read_bytes()
    os.utime(ROOT / "runner" / "__main__.py")  # a touched source must not change the output
    assert _inv(tmp_path, "build", "sign").returncode == 0
    assert pyz.read_bytes() == bytes1
    digest = hashlib.sha256(bytes1).hexdigest()
    assert (tmp_path / "dist" / "cronium-runner.pyz.sha256").read_text() == f"{digest}  cronium-runner.pyz\n"
    der = tmp_path / "sig.der"
    der.write_bytes(base64.b64decode((tmp_path / "dist" / "cronium-runner.pyz.sig").read_bytes()))
    out = subprocess.run(
        ["openssl", "dgst", "-sha256", "-verify", str(tmp_path / "keys" / "cosign.pub"), "-signature", str(der), str(pyz)],
        capture_output=True, text=True,
    )
    assert out.stdout.strip() == "Verified OK"
    version = subprocess.run([sys.executable, str(pyz), "version"], capture_output=True, text=True, check=True)
    assert '"protocol": 2' in version.stdout and digest in version.stdout


def test_sign_without_key_says_what_to_do(tmp_path: Path) -> None:
    assert _inv(tmp_path, "build").returncode == 0
    out = _inv(tmp_path, "sign")
    assert out.returncode == 2
    assert "inv keygen" in out.stderr and "Traceback" not in out.stderr


def test_build_with_another_runner_name_writes_its_own_checksum(tmp_path: Path) -> None:
    env_runner = tmp_path / "out" / "custom.pyz"
    out = subprocess.run([sys.executable, "-m", "invoke", "-r", str(ROOT), "build"], cwd=tmp_path,
                         env=dict(os.environ, CRONIUM_FAB_RUNNER_SRC=str(ROOT / "runner"),
                                  CRONIUM_FAB_RUNNER=str(env_runner)), capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    digest = hashlib.sha256(env_runner.read_bytes()).hexdigest()
    assert (tmp_path / "out" / "custom.pyz.sha256").read_text() == f"{digest}  custom.pyz\n"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["custom.pyz", "custom.pyz.sha256"]
