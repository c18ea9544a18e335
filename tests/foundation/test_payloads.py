"""Payloads: deterministic bytes, versioning, file modes, stale detection, tamper refusal, no secrets."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import yaml
from sqlalchemy import select

from cronium_fab.db.engine import Database
from cronium_fab.db.models import Event, RunnerPayload
from cronium_fab.errors import EventNotFound, EventNotRunnable
from cronium_fab.payloads import PayloadStore, build_payload_content
from cronium_fab.settings import Settings
from cronium_fab.signing import SignatureInvalid, SigningKeyError
from cronium_fab.testing.factories import add_event, add_server


@pytest.fixture
def store(db: Database, settings: Settings) -> PayloadStore:
    return PayloadStore(db, settings.payload_dir, signing_key=settings.signing_key, public_key=settings.public_key)


def _members(data: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}  # type: ignore[union-attr]


def test_same_content_same_bytes() -> None:
    a = build_payload_content(7, "PYTHON", "print('x')\n")
    b = build_payload_content(7, "PYTHON", "print('x')\n")
    assert a.data == b.data and a.sha256 == b.sha256
    assert build_payload_content(7, "PYTHON", "print('y')\n").sha256 != a.sha256
    assert build_payload_content(7, "BASH", "print('x')\n").sha256 != a.sha256


def test_manifest_is_cronium_format_plus_our_extension() -> None:
    members = _members(build_payload_content(3, "NODEJS", "console.log(1)").data)
    manifest = yaml.safe_load(members["manifest.yaml"])
    assert manifest["version"] == "v1" and manifest["interpreter"] == "node"
    assert manifest["entrypoint"] == "script.js" and members["script.js"] == b"console.log(1)"
    assert manifest["metadata"]["eventId"] == "3"
    assert manifest["x-cronium-fab"]["eventType"] == "NODEJS"


def test_build_writes_signed_files_private_and_a_row(store: PayloadStore, db: Database, settings: Settings) -> None:
    ev = add_event(db, content="echo one", servers=[add_server(db)])
    built = store.build(ev)
    assert built.path.name == f"event-{ev}-v1.tar.gz" and not built.changed
    assert built.path.parent.stat().st_mode & 0o777 == 0o700
    for p in (built.path, built.path.with_name(built.path.name + ".sha256"), built.path.with_name(built.path.name + ".sig")):
        assert p.stat().st_mode & 0o777 == 0o600
    assert built.path.with_name(built.path.name + ".sha256").read_text() == f"{built.sha256}  {built.path.name}\n"
    with db.session() as s:
        rows = s.scalars(select(RunnerPayload)).all()
    assert [(r.event_version, r.is_active, r.checksum, r.payload_size) for r in rows] == [(1, True, built.sha256, built.size)]


def test_rebuild_unchanged_is_a_no_op_and_change_bumps_version(store: PayloadStore, db: Database) -> None:
    ev = add_event(db, content="echo one")
    v1 = store.build(ev)
    again = store.build(ev)
    assert (again.version, again.changed, again.path) == (1, False, v1.path)
    with db.session() as s:
        s.get(Event, ev).content = "echo two"  # type: ignore[union-attr]
    v2 = store.build(ev)
    assert (v2.version, v2.changed) == (2, True)
    assert not v1.path.exists() and not v1.path.with_name(v1.path.name + ".sig").exists()
    with db.session() as s:
        assert s.get(Event, ev).payload_version == 2  # type: ignore[union-attr]
        rows = s.scalars(select(RunnerPayload).order_by(RunnerPayload.id)).all()
    assert [(r.event_version, r.is_active) for r in rows] == [(1, False), (2, True)]


def test_stale_detection_and_load_rebuilds(store: PayloadStore, db: Database) -> None:
    ev = add_event(db, content="echo one")
    with db.session() as s:
        assert store.is_stale(s, ev)
    store.build(ev)
    with db.session() as s:
        assert not store.is_stale(s, ev)
        s.get(Event, ev).content = "echo changed"  # type: ignore[union-attr]
    with db.session() as s:
        assert store.is_stale(s, ev)
    loaded = store.load_verified(ev)
    assert loaded.rebuilt and loaded.version == 2
    assert _members(loaded.content.data)["script.sh"] == b"echo changed"


def test_tampered_payload_is_refused(store: PayloadStore, db: Database) -> None:
    ev = add_event(db, content="echo safe")
    built = store.build(ev)
    data = bytearray(built.path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    built.path.write_bytes(bytes(data))
    with pytest.raises(SignatureInvalid, match=built.path.name):
        store.load_verified(ev)


def test_no_secrets_in_payload(store: PayloadStore, db: Database) -> None:
    sid = add_server(db, ssh_key="-----BEGIN OPENSSH PRIVATE KEY-----\nSECRETKEYMATERIAL\n", password="SECRETPW")
    ev = add_event(db, servers=[sid], env={"API_TOKEN": "SECRETENV"}, content="echo $API_TOKEN")
    data = _members(store.build(ev).path.read_bytes())
    blob = b"".join(data.values())
    for secret in (b"SECRETKEYMATERIAL", b"SECRETPW", b"SECRETENV"):
        assert secret not in blob


def test_bad_events_and_keys_leave_nothing_behind(store: PayloadStore, db: Database, settings: Settings) -> None:
    with pytest.raises(EventNotFound):
        store.build(424242)
    http = add_event(db, type="HTTP_REQUEST")
    with pytest.raises(EventNotRunnable):
        store.build(http)
    ev = add_event(db)
    broken = PayloadStore(db, settings.payload_dir, signing_key=settings.payload_dir / "nokey", public_key=settings.public_key)
    with pytest.raises(SigningKeyError):
        broken.build(ev)
    assert not settings.payload_dir.exists() or not any(settings.payload_dir.iterdir())
    with db.session() as s:
        assert s.scalars(select(RunnerPayload)).all() == []


def test_payload_build_command(db: Database, settings: Settings, tmp_path: Path) -> None:
    ev = add_event(db, content="echo cli")
    env = dict(os.environ, CRONIUM_DATABASE_URL=db.url, CRONIUM_FAB_SIGNING_KEY=str(settings.signing_key),
               CRONIUM_FAB_PUBLIC_KEY=str(settings.public_key), CRONIUM_FAB_PAYLOAD_DIR=str(settings.payload_dir))
    out = subprocess.run([sys.executable, "-m", "cronium_fab", "payload-build", "--event", str(ev)],
                         env=env, capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert '"version": 1' in out.stdout and (settings.payload_dir / f"event-{ev}-v1.tar.gz").exists()
    out = subprocess.run([sys.executable, "-m", "cronium_fab", "payload-build", "--event", "9999"],
                         env=env, capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 2 and "event 9999 not found" in out.stderr and "Traceback" not in out.stderr


def test_concurrent_builds_of_one_event_give_one_payload(store: PayloadStore, db: Database) -> None:
    import threading

    ev = add_event(db, content="echo concurrent")
    results, errors = [], []

    def build() -> None:
        try:
            results.append(store.build(ev))
        except Exception as exc:  # pragma: no cover - the assertion below shows it
            errors.append(exc)

    threads = [threading.Thread(target=build) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert {(r.version, r.sha256) for r in results} == {(1, results[0].sha256)}
    with db.session() as s:
        rows = s.scalars(select(RunnerPayload)).all()
    assert [r.is_active for r in rows] == [True]
    assert sorted(p.name for p in results[0].path.parent.iterdir()) == [
        f"event-{ev}-v1.tar.gz", f"event-{ev}-v1.tar.gz.sha256", f"event-{ev}-v1.tar.gz.sig"]
