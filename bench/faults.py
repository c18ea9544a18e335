"""The fault matrix (issue 14): every fault x bundled/API mode x SQLite/PostgreSQL, many trials.

Run by hand (not a test; needs root for the two mount faults)::

    flock /tmp/cronium-bench.lock .venv/bin/python bench/faults.py [--trials 8] [--quick]
        [--db sqlite,postgresql] [--mode bundled,api] [--via cli,serve] [--fault NAME ...] [--json faults.json]

Each trial and its checks: ``cronium_fab/testing/faults.py``. 17 faults x 4 cells x ``--trials`` 8
= 544 trials. ``--quick``: 1 trial per fault and cell. Prints fault x trials x hung x wrong state x
leftovers x lost rows (and the controller's peak RSS, the slowest trial against its bound), then
the failures; exit 1 when any cell is not 0.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_run_event import pg_schema  # noqa: E402

from cronium_fab.build import build_runner  # noqa: E402
from cronium_fab.signing import generate_keypair, load_private_key, sign_file  # noqa: E402
from cronium_fab.testing import faults as fm  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=8, help="trials per fault and cell")
    ap.add_argument("--quick", action="store_true", help="1 trial per fault and cell")
    ap.add_argument("--db", default="sqlite,postgresql")
    ap.add_argument("--mode", default="bundled,api")
    ap.add_argument("--via", default="cli", help="cli and/or serve: trials as jobs of one `cronium-fab serve` per "
                    "cell, with its kept connections (the controller faults are the CLI's)")
    ap.add_argument("--fault", action="append", choices=sorted(fm.FAULTS), help="only these faults")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    trials_each = 1 if args.quick else args.trials
    faults = args.fault or list(fm.FAULTS)
    if not fm.can_mount():
        skipped = [f for f in faults if f in fm.NEEDS_ROOT]
        faults = [f for f in faults if f not in fm.NEEDS_ROOT]
        print(f"# not root: not run: {', '.join(skipped)}")
    work = Path(tempfile.mkdtemp(prefix="cfab-faults-"))
    try:
        return matrix(args, faults, trials_each, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def matrix(args: argparse.Namespace, faults: list[str], trials_each: int, work: Path) -> int:
    keys = (work / "keys" / "cosign.key", work / "keys" / "cosign.pub")
    generate_keypair(*keys)
    art = build_runner(ROOT / "runner", work / "dist")
    sign_file(art.path, load_private_key(keys[0]))
    trials: list[fm.Trial] = []
    stops: list[str] = []   # what a serve cell left once its serve stopped
    t0 = time.monotonic()
    with fm.hosts_pool(work / "hosts") as pool:
        for flavour in args.db.split(","):
            with pg_schema(flavour) as url:
                for mode, via in [(m, v) for v in args.via.split(",") for m in args.mode.split(",")]:
                    cw = work / f"{flavour}-{mode}-{via}"
                    cell = fm.open_cell(flavour, mode, url or f"sqlite:///{cw / 'cronium.db'}", pool, cw, art.path,
                                        keys, via=via)
                    print(f"# {cell.name}: baseline run {cell.baseline_s:.2f} s, "
                          f"peak RSS {cell.baseline_rss_kib / 1024:.0f} MiB", flush=True)
                    for fault in faults:
                        if via == "serve" and fault in fm.CONTROLLER_FAULTS:
                            continue
                        for _ in range(trials_each):
                            t = fm.run_trial(cell, fault)
                            trials.append(t)
                            if not t.ok:
                                print(f"  FAIL {fault} [{t.cell}] {t.seconds:.1f}s/{t.bound:.0f}s hung={t.hung} "
                                      f"wrong={t.wrong_state} left={t.leftovers[:3]} rows={t.lost_rows} "
                                      f"rss={t.rss_kib // 1024}MiB said={t.said}", flush=True)
                    left = fm.close_cell(cell)
                    if left:
                        stops.append(f"{cell.name}: {'; '.join(left)}")
                        print(f"  FAIL stopping {cell.name}: {left}", flush=True)
    rows = fm.summarize(trials)
    print(f"\n{len(trials)} trials in {time.monotonic() - t0:.0f} s\n")
    print("| fault | trials | hung | wrong state | leftovers | lost rows | RSS over | max s / bound | peak RSS MiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['fault']} | {r['trials']} | {r['hung']} | {r['wrong_state']} | {r['leftovers']} | "
              f"{r['lost_rows']} | {r['rss_over']} | {r['max_s']:.1f} / {r['bound_s']:.0f} | {r['max_rss_mib']:.0f} |")
    if "serve" in args.via:
        print(f"\nserve cells stopped cleanly (no sshd session left on a host): {'no: ' + '; '.join(stops) if stops else 'yes'}")
    if args.json:
        args.json.write_text(json.dumps({"trials": len(trials), "rows": rows, "serve_stops": stops}, indent=1))
    return 0 if all(t.ok for t in trials) and not stops else 1


if __name__ == "__main__":
    raise SystemExit(main())
