"""The fault matrix's fast subset (bench/faults.py runs many trials of each fault in each cell):
every fault once, on real sshd hosts, half of them on SQLite in bundled mode and half on PostgreSQL
in API mode (the helper flood and the killed controller there). A trial fails on a hung
run, a wrong or unexplained host state, a script process or work dir left on a host, a controller
whose memory grew with the output, or a row left open (cronium_fab/testing/faults.py)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import text

from cronium_fab.testing import faults as fm
from cronium_fab.testing.hosts import DevHostPool
from cronium_fab.testing.pg import private_schema

pytestmark = pytest.mark.ssh

CellOf = Callable[[tuple[str, str]], fm.Cell]
CELLS = [("sqlite", "bundled"), ("postgresql", "api")]
API_CELL = {"connection refused", "sshd stopped before", "session killed", "host key changed", "cache not writable",
            "ignores SIGTERM", "200 MB output", "controller killed", "helper flood"}


@pytest.fixture(scope="module")
def fault_hosts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevHostPool]:
    with fm.hosts_pool(tmp_path_factory.mktemp("fault-hosts")) as pool:
        yield pool


@pytest.fixture(scope="module")
def cells(postgres_url: str, fault_hosts: DevHostPool, signed_runner: Path,
          signing_keys: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[CellOf]:
    """Each cell opened once, when a test first needs it."""
    opened: dict[tuple[str, str], fm.Cell] = {}
    with contextlib.ExitStack() as stack:
        def get(where: tuple[str, str]) -> fm.Cell:
            if where not in opened:
                flavour, mode = where
                work = tmp_path_factory.mktemp(f"faults-{flavour}-{mode}")
                url = (stack.enter_context(private_schema(postgres_url))
                       if flavour == "postgresql" else f"sqlite:///{work / 'cronium.db'}")
                opened[where] = fm.open_cell(flavour, mode, url, fault_hosts, work, signed_runner, signing_keys)
                stack.callback(opened[where].db.dispose)
            return opened[where]

        yield get


def _params() -> list[object]:
    out: list[object] = []
    for name in fm.FAULTS:
        marks = []
        if name in fm.NEEDS_ROOT:
            marks.append(pytest.mark.skipif(not fm.can_mount(), reason="mounts a filesystem: root only"))
        where = CELLS[1] if name in API_CELL else CELLS[0]
        out.append(pytest.param(name, where, marks=marks, id=f"{name}-{'/'.join(where)}"))
    return out


@pytest.mark.parametrize(("fault", "where"), _params())
def test_fault(cells: CellOf, fault: str, where: tuple[str, str]) -> None:
    cell = cells(where)
    t = fm.run_trial(cell, fault)
    assert not t.hung, f"{fault}: ran {t.seconds:.1f} s, bound {t.bound:.0f} s; {t.wrong_state}"
    assert t.wrong_state == [], t.wrong_state
    assert t.leftovers == [], t.leftovers
    assert t.lost_rows == [], t.lost_rows
    assert not t.rss_over, f"controller peak RSS {t.rss_kib // 1024} MiB, baseline {cell.baseline_rss_kib // 1024}"


# Faults one after another through one `serve` (kept connections): a fault must not reach the next
# trial through a connection kept from an earlier one, and stopping serve leaves no sshd session.
SERVE_SEQUENCE = ("session killed", "sshd stopped during", "host key changed", "auth refused", "never ends",
                  "setsid daemon")


@pytest.mark.timeout(600)
def test_faults_in_a_row_through_serve_with_kept_connections(
        postgres_url: str, fault_hosts: DevHostPool, signed_runner: Path, signing_keys: tuple[Path, Path],
        tmp_path: Path) -> None:
    with private_schema(postgres_url) as url:
        cell = fm.open_cell("postgresql", "api", url, fault_hosts, tmp_path, signed_runner, signing_keys, via="serve")
        try:
            for fault in SERVE_SEQUENCE:
                t = fm.run_trial(cell, fault)
                assert t.ok, f"{fault}: wrong {t.wrong_state} left {t.leftovers} lost {t.lost_rows} hung {t.hung} rss {t.rss_over}"
            with cell.db.engine.connect() as conn:
                metas = [m for (m,) in conn.execute(text("SELECT execution_metadata FROM executions"))]
            reused = sum(1 for m in metas if (json.loads(m) if isinstance(m, str) else m or {}).get("connection_reused"))
            assert reused >= len(SERVE_SEQUENCE)   # the healthy host's runs went over its kept connection
        finally:
            left = fm.close_cell(cell)
        assert left == []
