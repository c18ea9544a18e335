"""Overhead of the runner: a trivial bash payload through the runner vs ``bash -c true``.

Run by hand (not a test):  .venv/bin/python bench/bench_runner.py [-n 50] [--python /usr/bin/python3]
Prints the median wall time of each way and the milliseconds the runner adds (goal: < 60 ms at the median).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_payload() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in (("manifest.yaml", b"version: v1\ninterpreter: bash\nentrypoint: script.sh\n"),
                           ("script.sh", b"true\n")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def serve_input(payload: bytes) -> bytes:
    header = {"protocol": 2, "payload_sha256": hashlib.sha256(payload).hexdigest(), "payload_size": len(payload),
              "helper_mode": "bundled", "variables": {}, "input": None, "timeout": 30}
    body = json.dumps(header).encode()
    return f"CRONIUM-RUNNER-INPUT 1 {len(body)}\n".encode() + body + payload


def time_direct() -> float:
    t = time.perf_counter()
    subprocess.run(["bash", "-c", "true"], check=True)
    return time.perf_counter() - t


def time_hand(py: str, pyz: str, payload_path: str) -> float:
    t = time.perf_counter()
    subprocess.run([py, pyz, "run", payload_path], check=True)
    return time.perf_counter() - t


def time_serve(py: str, pyz: str, data: bytes) -> float:
    t = time.perf_counter()
    proc = subprocess.Popen([py, pyz, "serve"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    proc.stdin.write(data)
    proc.stdin.flush()
    out = proc.stdout.read()          # stdin stays open until the runner is done
    proc.wait()
    proc.stdin.close()
    elapsed = time.perf_counter() - t
    assert b'"status":"success"' in out, out[-300:]
    return elapsed


def time_bootstrap(env: dict[str, str], command: str, data: bytes) -> float:
    """What a real SSH run executes: the bootstrap command (cache check, then the runner)."""
    t = time.perf_counter()
    proc = subprocess.Popen(["sh", "-c", command], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
    proc.stdin.write(data)
    proc.stdin.flush()
    out = proc.stdout.read()
    proc.wait()
    proc.stdin.close()
    elapsed = time.perf_counter() - t
    assert b'"status":"success"' in out, out[-300:]
    return elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("-n", type=int, default=50, help="iterations per way (default 50)")
    ap.add_argument("--python", default=shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin") or sys.executable,
                    help="interpreter that runs the runner (default: the system python3)")
    args = ap.parse_args()
    from cronium_fab.build import build_runner

    with tempfile.TemporaryDirectory() as d:
        pyz = str(build_runner(ROOT / "runner", Path(d)).path)
        payload = make_payload()
        ppath = os.path.join(d, "payload.tar.gz")
        Path(ppath).write_bytes(payload)
        data = serve_input(payload)
        from cronium_fab.build import sha256_file
        from cronium_fab.remote.runner_cache import bootstrap_command, runner_file_name

        sha = sha256_file(Path(pyz))
        cache = Path(d) / "cache" / "cronium"
        cache.mkdir(parents=True, mode=0o700)
        shutil.copy(pyz, cache / runner_file_name(sha))
        (cache / runner_file_name(sha)).chmod(0o600)
        boot_env = dict(os.environ, XDG_CACHE_HOME=str(cache.parent),
                        PATH=f"{os.path.dirname(args.python)}:/usr/bin:/bin")
        ways = {"bash -c true": lambda: time_direct(),
                "runner run (hand)": lambda: time_hand(args.python, pyz, ppath),
                "runner serve": lambda: time_serve(args.python, pyz, data),
                "bootstrap + serve (as over SSH)": lambda: time_bootstrap(boot_env, bootstrap_command(sha), data)}
        for f in ways.values():   # warm up caches
            f()
        times: dict[str, list[float]] = {k: [] for k in ways}
        for _ in range(args.n):   # interleaved, so drift affects every way alike
            for k, f in ways.items():
                times[k].append(f())
        pyver = subprocess.run([args.python, "-c", "import sys; print(sys.version.split()[0])"],
                               capture_output=True, text=True).stdout.strip()
        print(f"runner python: {args.python} ({pyver}); n={args.n}")
        base = statistics.median(times["bash -c true"]) * 1000
        for k, ts in times.items():
            med = statistics.median(ts) * 1000
            p90 = sorted(ts)[int(len(ts) * 0.9) - 1] * 1000
            added = "" if k == "bash -c true" else f"   added {med - base:6.1f} ms"
            print(f"{k:20s} median {med:7.1f} ms   p90 {p90:7.1f} ms{added}")


if __name__ == "__main__":
    main()
