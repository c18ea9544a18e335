"""Event payloads: ``manifest.yaml`` + the script as a deterministic, signed tar.gz.

Layout (Cronium's): ``payloads/event-<id>-v<version>.tar.gz`` with ``.sha256`` (``<hex>  <name>``)
and ``.sig`` (cosign-compatible) beside it, files 0600 in a 0700 directory. The same event content
gives the same bytes, so the checksum (and ``events.payload_version``) changes only when the script
or the type does. No secrets: env var values travel on the runner's stdin at run time.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from .db.engine import Database
from .db.models import Event, RunnerPayload, utcnow
from .db.queries import SCRIPT_TYPES, check_script_event, get_event
from .fsutil import atomic_write
from .signing import (
    SignatureInvalid,
    fingerprint,
    load_private_key,
    load_public_key,
    sign_bytes,
    verify_file,
)

ENTRYPOINTS = {"bash": "script.sh", "python": "script.py", "node": "script.js"}
EXTENSION_KEY = "x-cronium-fab"
_FIXED_MTIME = 0


@dataclass(frozen=True)
class PayloadContent:
    """The bytes of a payload and what the runner needs to know about them."""

    data: bytes = field(repr=False)
    sha256: str
    manifest: dict[str, Any]
    manifest_sha256: str


@dataclass(frozen=True)
class BuiltPayload:
    event_id: int
    version: int
    path: Path
    sha256: str
    size: int
    changed: bool


@dataclass(frozen=True)
class VerifiedPayload:
    """An active payload whose signature was checked; ``content.data`` are the verified bytes."""

    event_id: int
    version: int
    path: Path
    content: PayloadContent
    rebuilt: bool


def build_manifest(event_id: int, event_type: str) -> dict[str, Any]:
    interpreter = SCRIPT_TYPES[event_type.upper()]
    return {
        "version": "v1",
        "interpreter": interpreter,
        "entrypoint": ENTRYPOINTS[interpreter],
        "metadata": {"eventId": str(event_id)},
        EXTENSION_KEY: {"eventType": event_type.upper(), "protocol": 1},
    }


def _tar_member(tar: tarfile.TarFile, name: str, data: bytes, mode: int) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = mode
    info.mtime = _FIXED_MTIME
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def build_payload_content(event_id: int, event_type: str, script: str) -> PayloadContent:
    """Deterministic tar.gz of manifest + script (same inputs → same bytes)."""
    manifest = build_manifest(event_id, event_type)
    manifest_bytes = yaml.safe_dump(manifest, sort_keys=False, default_flow_style=False).encode()
    script_bytes = script.encode()
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        _tar_member(tar, "manifest.yaml", manifest_bytes, 0o644)
        _tar_member(tar, manifest["entrypoint"], script_bytes, 0o755)
    gz = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=gz, mtime=_FIXED_MTIME, compresslevel=9) as f:
        f.write(raw.getvalue())
    data = gz.getvalue()
    return PayloadContent(
        data=data,
        sha256=hashlib.sha256(data).hexdigest(),
        manifest=manifest,
        manifest_sha256=hashlib.sha256(manifest_bytes).hexdigest(),
    )


def content_for_event(event: Event) -> PayloadContent:
    check_script_event(event)
    return build_payload_content(event.id, event.type, event.content or "")


def active_payload_row(session: Session, event_id: int) -> RunnerPayload | None:
    return session.scalars(
        select(RunnerPayload)
        .where(RunnerPayload.event_id == event_id, RunnerPayload.is_active.is_(True))
        .order_by(RunnerPayload.id.desc())
    ).first()


def payload_filename(event_id: int, version: int) -> str:
    return f"event-{event_id}-v{version}.tar.gz"


class PayloadStore:
    """Payload files in one directory, their ``runner_payloads`` rows, and their signatures."""

    def __init__(
        self,
        db: Database,
        directory: Path,
        *,
        signing_key: Path,
        public_key: Path,
        passphrase: bytes | None = None,
    ) -> None:
        self.db = db
        self.directory = directory
        self.signing_key = signing_key
        self.public_key = public_key
        self.passphrase = passphrase

    # -- files -------------------------------------------------------------------------------
    def _ensure_dir(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.directory, 0o700)

    @staticmethod
    def _siblings(path: Path) -> list[Path]:
        return [path, path.with_name(path.name + ".sha256"), path.with_name(path.name + ".sig")]

    def _remove(self, path: Path) -> None:
        for p in self._siblings(path):
            p.unlink(missing_ok=True)

    def _file_matches(self, path: Path, sha256: str) -> bool:
        try:
            return hashlib.sha256(path.read_bytes()).hexdigest() == sha256
        except OSError:
            return False

    # -- build -------------------------------------------------------------------------------
    def build(self, event_id: int) -> BuiltPayload:
        """Build (or keep) the payload of an event; what ``cronium-fab payload-build`` does.

        Writes the files, inserts the ``runner_payloads`` row, marks older rows inactive, bumps
        ``events.payload_version`` only when the content changed, and removes the old files.
        On any error nothing is half-done: new files are removed and the transaction rolled back.
        """
        key = load_private_key(self.signing_key, self.passphrase)  # fail before touching anything
        written: list[Path] = []
        stale_paths: list[Path] = []
        try:
            with self.db.session() as s:
                # concurrent builders (threads or processes) queue on this lock (SQLite: the write
                # lock, db/engine.py) and the later one finds the payload already built
                event = s.scalars(select(Event).where(Event.id == event_id).with_for_update()).first()
                if event is None:
                    get_event(s, event_id)  # raises EventNotFound
                    raise AssertionError("unreachable")
                content = content_for_event(event)
                rows = s.scalars(
                    select(RunnerPayload).where(RunnerPayload.event_id == event_id).order_by(RunnerPayload.id)
                ).all()
                active = [r for r in rows if r.is_active]
                current = active[-1] if active else None
                if current is not None and current.checksum == content.sha256:
                    path = Path(current.payload_path)
                    if self._file_matches(path, content.sha256) and path.with_name(path.name + ".sig").exists():
                        return BuiltPayload(event_id, current.event_version, path, content.sha256, len(content.data), False)
                    version = current.event_version  # same content, files lost: rewrite, no bump
                    changed = False
                elif not rows:
                    version, changed = event.payload_version or 1, False
                else:
                    top = max([event.payload_version or 1, *(r.event_version for r in rows)])
                    version, changed = top + 1, True
                self._ensure_dir()
                path = (self.directory / payload_filename(event_id, version)).resolve()
                sha_path = path.with_name(path.name + ".sha256")
                atomic_write(path, content.data)
                written.append(path)
                atomic_write(sha_path, f"{content.sha256}  {path.name}\n".encode())
                atomic_write(path.with_name(path.name + ".sig"), sign_bytes(content.data, key) + b"\n")
                s.execute(
                    update(RunnerPayload).where(RunnerPayload.event_id == event_id).values(is_active=False)
                )
                s.add(
                    RunnerPayload(
                        event_id=event_id,
                        event_version=version,
                        payload_path=str(path),
                        checksum_path=str(sha_path),
                        payload_size=len(content.data),
                        checksum=content.sha256,
                        created_at=utcnow(),
                        is_active=True,
                    )
                )
                if version != event.payload_version:
                    event.payload_version = version
                    event.updated_at = utcnow()
                stale_paths = [Path(r.payload_path) for r in rows if Path(r.payload_path) != path]
        except BaseException:
            for p in written:
                self._remove(p)
            raise
        for old in stale_paths:
            self._remove(old)
        return BuiltPayload(event_id, version, path, content.sha256, len(content.data), changed)

    # -- run path ----------------------------------------------------------------------------
    @staticmethod
    def _current(row: RunnerPayload | None, content: PayloadContent) -> bool:
        return row is not None and row.checksum == content.sha256 and Path(row.payload_path).exists()

    def is_stale(self, session: Session, event_id: int) -> bool:
        """True when the event has no active payload, or its script/type changed since it was built."""
        event = get_event(session, event_id)
        return not self._current(active_payload_row(session, event_id), content_for_event(event))

    def payload_state(self, event_id: int) -> tuple[int | None, bool]:
        """The active payload's version (None: none built) and whether it holds the event's
        current script, without building anything (``run-event --plan``)."""
        with self.db.session() as s:
            expected = content_for_event(get_event(s, event_id))
            row = active_payload_row(s, event_id)
        return (row.event_version if row is not None else None), self._current(row, expected)

    def load_verified(self, event_id: int, *, _retry: bool = True) -> VerifiedPayload:
        """The event's active payload, rebuilt first when stale, with its signature verified."""
        with self.db.session() as s:
            expected = content_for_event(get_event(s, event_id))
            row = active_payload_row(s, event_id)
        rebuilt = False
        if not self._current(row, expected):
            self.build(event_id)
            rebuilt = True
            with self.db.session() as s:
                row = active_payload_row(s, event_id)
        assert row is not None
        path = Path(row.payload_path)
        pub = load_public_key(self.public_key)
        hint = (f"If nobody tampered with it (another database or checkout using the same payload directory "
                f"can overwrite it), rebuild it with `cronium-fab payload-build --event {event_id}`")
        try:
            data = verify_file(path, pub)
        except SignatureInvalid as exc:
            raise SignatureInvalid(path, exc.fingerprint, exc.reason, hint) from None
        if hashlib.sha256(data).hexdigest() != row.checksum:
            raise SignatureInvalid(path, fingerprint(pub), "the file does not match runner_payloads.checksum", hint)
        if data != expected.data:
            if _retry:
                self.build(event_id)  # the event was edited between the two reads: rebuild once
                return self.load_verified(event_id, _retry=False)
            raise SignatureInvalid(path, fingerprint(pub), "the payload does not hold the event's current script")
        return VerifiedPayload(event_id, row.event_version, path, expected, rebuilt)
