"""Developer and release tasks: ``inv keygen``, ``inv build sign``, ``inv clean``, ``inv test``, ``inv lint``.

Paths come from cronium_fab.settings (env ``CRONIUM_FAB_SIGNING_KEY``, ``CRONIUM_FAB_PUBLIC_KEY``,
``CRONIUM_FAB_RUNNER``...); the signing key's passphrase, if any, from ``CRONIUM_FAB_KEY_PASSPHRASE``
(never from argv).
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from invoke import Context, Exit, task

from cronium_fab.cli import user_errors
from cronium_fab.settings import Settings


def _passphrase() -> bytes | None:
    value = os.environ.get("CRONIUM_FAB_KEY_PASSPHRASE")
    return value.encode() if value else None


@task(help={"force": "replace existing keys", "passphrase": "protect the key with CRONIUM_FAB_KEY_PASSPHRASE"})
@user_errors
def keygen(c: Context, force: bool = False, passphrase: bool = False) -> None:
    """Create the signing key pair (keys/cosign.key, keys/cosign.pub)."""
    from cronium_fab.signing import generate_keypair

    s = Settings.from_env()
    pw = _passphrase()
    if passphrase and not pw:
        raise Exit("inv keygen --passphrase: set CRONIUM_FAB_KEY_PASSPHRASE in the environment first", code=2)
    fp = generate_keypair(s.signing_key, s.public_key, pw if passphrase else None, force=force)
    print(f"wrote {s.signing_key} and {s.public_key} ({fp})")


@task
def build(c: Context) -> None:
    """Build dist/cronium-runner.pyz from runner/ (reproducible) and its .sha256."""
    from cronium_fab.build import build_runner

    s = Settings.from_env()
    art = build_runner(s.runner_src, s.runner_path.parent, s.runner_path.name)
    print(f"built {s.runner_path} ({art.size} bytes, sha256 {art.sha256})")


@task
@user_errors
def sign(c: Context) -> None:
    """Sign dist/cronium-runner.pyz (writes .sig, cosign-compatible) and check the signature."""
    from cronium_fab.signing import fingerprint, load_private_key, load_public_key, sign_file, verify_file

    s = Settings.from_env()
    if not s.runner_path.exists():
        raise Exit(f"{s.runner_path} does not exist: run `inv build` first", code=2)
    key = load_private_key(s.signing_key, _passphrase())
    sig = sign_file(s.runner_path, key)
    verify_file(s.runner_path, load_public_key(s.public_key))
    print(f"signed {s.runner_path} -> {sig} ({fingerprint(key.public_key())})")


@task
def clean(c: Context) -> None:
    """Remove build outputs (dist/) and generated payloads."""
    s = Settings.from_env()
    shutil.rmtree(s.runner_path.parent, ignore_errors=True)
    for p in Path(s.payload_dir).glob("event-*"):
        p.unlink()


@task
def lint(c: Context) -> None:
    """ruff, mypy and vermin (runner must stay Python 3.8-compatible)."""
    py = sys.executable  # the venv's tools, whether or not .venv/bin is on PATH
    c.run(f"{py} -m ruff check .")
    c.run(f"{py} -m mypy")
    c.run(f"{Path(py).parent / 'vermin'} --no-tips -t=3.8- --violations runner/")


@task
def test(c: Context) -> None:
    """The whole test suite (needs sshd and PostgreSQL; see README)."""
    c.run(f"{sys.executable} -m pytest -q", pty=False)
