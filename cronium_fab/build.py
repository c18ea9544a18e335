"""Reproducible build of the runner zipapp (``dist/cronium-runner.pyz``).

The same ``runner/`` tree always gives the same bytes: members are sorted, timestamps fixed,
permissions normalised, and nothing of the build machine (mtime, uid, ``__pycache__``) leaks in.
"""

from __future__ import annotations

import hashlib
import io
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .fsutil import atomic_write

RUNNER_NAME = "cronium-runner.pyz"
SHEBANG = b"#!/usr/bin/env python3\n"
_FIXED_DATE = (1980, 1, 1, 0, 0, 0)
_SKIP_DIRS = {"__pycache__", ".pytest_cache", "tests"}


@dataclass(frozen=True)
class RunnerArtifact:
    path: Path
    sha256: str
    size: int


def runner_source_files(src: Path) -> list[Path]:
    files = []
    for root, dirs, names in os.walk(src):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS)
        for name in sorted(names):
            if name.endswith((".pyc", ".pyo")):
                continue
            files.append(Path(root) / name)
    if not (src / "__main__.py").is_file():
        raise FileNotFoundError(f"{src}/__main__.py not found: is this the runner source directory?")
    return sorted(files, key=lambda p: p.relative_to(src).as_posix())


def build_runner_bytes(src: Path) -> bytes:
    buf = io.BytesIO()
    buf.write(SHEBANG)
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        for path in runner_source_files(src):
            info = zipfile.ZipInfo(path.relative_to(src).as_posix(), date_time=_FIXED_DATE)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = (0o100644 & 0xFFFF) << 16
            info.create_system = 3
            zf.writestr(info, path.read_bytes())
    return buf.getvalue()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_checksum_file(path: Path, digest: str) -> Path:
    """Write ``<file>.sha256`` holding ``<hex>  <basename>\\n`` (sha256sum format)."""
    out = path.with_name(path.name + ".sha256")
    atomic_write(out, f"{digest}  {path.name}\n".encode(), 0o644)
    return out


def build_runner(src: Path, dist: Path, name: str = RUNNER_NAME) -> RunnerArtifact:
    """Build ``dist/name`` and its ``.sha256`` beside it."""
    data = build_runner_bytes(src)
    dist.mkdir(parents=True, exist_ok=True)
    out = dist / name
    atomic_write(out, data, 0o755)
    digest = hashlib.sha256(data).hexdigest()
    write_checksum_file(out, digest)
    return RunnerArtifact(out, digest, len(data))
