"""Fixtures for the runner tests: a freshly built pyz and the CPython interpreters 3.8–3.13."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(__file__))

PYENV = Path("/root/.pyenv/versions")
VERSIONS = ["3.8", "3.9", "3.10", "3.11", "3.12", "3.13"]


def _find(ver: str) -> str | None:
    if not PYENV.is_dir():
        return None
    for d in sorted(PYENV.glob(f"{ver}.*")):
        exe = d / "bin" / f"python{ver}"
        if exe.is_file():
            return str(exe)
    return None


PYTHONS = {v: _find(v) for v in VERSIONS}
DEFAULT_PY = PYTHONS["3.8"] or sys.executable


@pytest.fixture(scope="session")
def pyz(tmp_path_factory) -> str:
    from cronium_fab.build import build_runner

    root = Path(__file__).resolve().parents[2]
    art = build_runner(root / "runner", tmp_path_factory.mktemp("dist"))
    return str(art.path)


@pytest.fixture(params=VERSIONS, ids=[f"py{v}" for v in VERSIONS])
def any_py(request) -> str:
    exe = PYTHONS[request.param]
    if exe is None:
        pytest.skip(f"CPython {request.param} not installed under {PYENV}")
    return exe


@pytest.fixture
def py() -> str:
    return DEFAULT_PY


@pytest.fixture
def script_python() -> str:
    """An absolute python3 for scripts (avoids pyenv shims that add their own env vars)."""
    return PYTHONS["3.11"] or PYTHONS["3.8"] or sys.executable


@pytest.fixture
def tmpdir_env(tmp_path) -> tuple[dict, Path]:
    """An environment whose TMPDIR is a fresh dir, to see exactly what the runner leaves there."""
    t = tmp_path / "tmp"
    t.mkdir()
    env = dict(os.environ)
    env["TMPDIR"] = str(t)
    return env, t
