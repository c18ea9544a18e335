"""Entry points: ``serve`` (framed stdin/stdout, PROTOCOL.md), ``run`` (hand mode) and ``version``."""
import os
import pwd
import sys
import time

from . import PROTOCOL, VERSION, RunnerError, execute, extract, helpers, jsonc, lite, protocol
from .execute import signal

SIGNAL_NAMES = {1: "SIGHUP", 2: "SIGINT", 15: "SIGTERM"}

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
DEFAULT_CAP = 10 * 1024 * 1024
INTERPRETER_NAMES = {"bash": "bash", "python": "python3", "node": "node"}
_sha_cache = []


def own_sha256():
    if not _sha_cache:
        path = getattr(globals().get("__loader__"), "archive", None) or sys.argv[0]
        try:
            with open(path, "rb") as f:
                _sha_cache.append(lite.sha256(f.read()).hexdigest())
        except (OSError, TypeError):
            _sha_cache.append(None)
    return _sha_cache[0]


def set_own_sha256(sha):
    _sha_cache[:] = [sha]


def runner_info():
    return {"version": VERSION, "protocol": PROTOCOL, "sha256": own_sha256()}


class _State:
    phase = "setup"      # setup -> running -> done
    script = None
    signalled = None


STATE = _State()


def _on_signal(signum, _frame):
    name = SIGNAL_NAMES.get(signum) or "signal %d" % signum
    STATE.signalled = STATE.signalled or name
    if STATE.phase == "running" and STATE.script is not None:
        STATE.script.cancel_reason = STATE.script.cancel_reason or "runner received " + name
    elif STATE.phase == "setup":
        STATE.phase = "done"
        raise RunnerError("cancelled", "runner received %s before the script started" % name)


def _on_child(_signum, _frame):
    pass


def _install_signals():
    r, w = os.pipe()
    os.set_blocking(w, False)
    os.set_blocking(r, False)
    signal.set_wakeup_fd(w)
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, _on_signal)
    signal.signal(signal.SIGCHLD, _on_child)
    return r


class Capper:
    """Keeps a stream within ``cap`` bytes: the first half streams live, the last half is kept as a tail."""

    def __init__(self, cap):
        self.head_left = cap // 2
        self.tail_max = cap - cap // 2
        self.tail = []
        self.tail_len = 0
        self.dropped = 0
        self.drop_ts = None

    def feed(self, ts, data):
        live = b""
        if self.head_left > 0:
            live, data = data[:self.head_left], data[self.head_left:]
            self.head_left -= len(live)
        if data:
            self.tail.append([ts, data])
            self.tail_len += len(data)
            while self.tail_len > self.tail_max:
                extra = self.tail_len - self.tail_max
                first = self.tail[0]
                self.drop_ts = self.drop_ts or first[0]
                if len(first[1]) <= extra:
                    self.tail.pop(0)
                    self.tail_len -= len(first[1])
                    self.dropped += len(first[1])
                else:
                    first[1] = first[1][extra:]
                    self.tail_len -= extra
                    self.dropped += extra
        return live


def _context(header, meta, workdir):
    def pick(hkey, mkey):
        v = header.get(hkey)
        return v if v is not None else meta.get(mkey)
    ctx = {
        "eventId": pick("event_id", "eventId"),
        "eventName": pick("event_name", "eventName"),
        "executionId": pick("execution_id", "executionId"),
        "jobId": pick("job_id", "jobId"),
        "serverId": header.get("server_id"),
        "serverName": header.get("server_name"),
        "userId": pick("user_id", "userId"),
        "trigger": pick("trigger", "trigger"),
        "eventVersion": meta.get("eventVersion"),
        "startTime": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "workDir": workdir,
    }
    if isinstance(meta.get("extra"), dict):
        ctx["extra"] = meta["extra"]
    return ctx


def _s(v):
    return "" if v is None else str(v)


def _build_env(header, manifest, ctx, workdir, bindir, helper_env):
    src = os.environ
    try:
        pw = pwd.getpwuid(os.getuid())
    except KeyError:
        pw = None
    env = {
        "PATH": src.get("PATH") or DEFAULT_PATH,
        "HOME": src.get("HOME") or (pw.pw_dir if pw else "/"),
        "USER": src.get("USER") or src.get("LOGNAME") or (pw.pw_name if pw else ""),
        "LANG": src.get("LANG") or "C.UTF-8",
    }
    for name in header.get("pass_env") or ():
        if isinstance(name, str) and name in src:
            env[name] = src[name]
    for source in (manifest["environment"], header.get("env") or {}):
        for k, v in source.items():
            if isinstance(k, str) and k and "=" not in k and "\0" not in k:
                env[k] = _s(v).replace("\0", "")
    env["PATH"] = bindir + ":" + env["PATH"]
    for k in ("PYTHONPATH", "NODE_PATH"):
        env[k] = helper_env[k] + (":" + env[k] if env.get(k) else "")
    env["NODE_OPTIONS"] = helper_env["NODE_OPTIONS"] + (" " + env["NODE_OPTIONS"] if env.get("NODE_OPTIONS") else "")
    for k in ("BASH_ENV", "TMPDIR", "CRONIUM_HELPER_DIR"):
        env[k] = helper_env[k]
    mode = "api" if header.get("helper_mode") == "api" else "bundled"
    env.update({
        "CRONIUM_JOB_ID": _s(ctx["jobId"]), "CRONIUM_EXECUTION_ID": _s(ctx["executionId"]),
        "CRONIUM_EVENT_ID": _s(ctx["eventId"]), "CRONIUM_EVENT_NAME": _s(ctx["eventName"]),
        "CRONIUM_SERVER_ID": _s(ctx["serverId"]), "CRONIUM_SERVER_NAME": _s(ctx["serverName"]),
        "CRONIUM_WORK_DIR": workdir, "CRONIUM_HELPER_MODE": mode,
    })
    if mode == "api":
        api = header.get("api") or {}
        endpoint, token = _s(api.get("endpoint")).rstrip("/"), _s(api.get("token"))
        if not endpoint:
            raise RunnerError("protocol", "helper_mode api needs api.endpoint in the header")
        env.update({"CRONIUM_API_ENDPOINT": endpoint, "CRONIUM_API_TOKEN": token,
                    "CRONIUM_RUNTIME_API": endpoint, "CRONIUM_EXECUTION_TOKEN": token})
    return env


def _interpreter(header, kind, path):
    override = (header.get("interpreters") or {}).get(kind)
    name = override or INTERPRETER_NAMES[kind]
    if "/" in name:
        if os.path.isfile(name) and os.access(name, os.X_OK):
            return name
        raise RunnerError("interpreter", "interpreter %r (for %s scripts) not found or not executable"
                          % (name, kind))
    found = lite.which(name, path=path)
    if not found:
        raise RunnerError("interpreter", "interpreter %r (for %s scripts) not found on PATH (%s)"
                          % (name, kind, path))
    return found


def _private_dir():
    base = os.environ.get("TMPDIR") or "/tmp"
    if not os.path.isdir(base):
        base = "/tmp"
    for _ in range(100):
        path = os.path.join(os.path.abspath(base), "cronium-run-" + os.urandom(6).hex())
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            continue
        os.chmod(path, 0o700)
        return path
    raise RunnerError("internal", "cannot create a work directory under %s" % base)


def run_payload(header, payload, sink, watch_fd=None, wake_fd=None, libc=None, umask=0o022, subreaper=False,
                hearing=None, tick=None):
    """Everything between a verified payload and the result dict. Never raises RunnerError.
    ``tick(now)`` (keepalive, rate-limited by the caller) is called through set-up and clean-up."""
    now_tick = (lambda: tick(time.monotonic())) if tick is not None else None
    t0 = time.monotonic()
    res = {
        "status": "error", "exit_code": None, "signal": None, "timed_out": False,
        "error": None, "error_kind": None, "started_at": None,
        "durations_ms": {"setup": 0, "execution": 0, "cleanup": 0, "total": 0},
        "output": None, "output_set": False, "variables": {}, "condition": None,
        "runner": runner_info(), "usage": None, "truncated": {"stdout": 0, "stderr": 0},
    }
    workdir = state = None
    script = None
    snapshot = header.get("variables") or {}
    if not isinstance(snapshot, dict):
        snapshot = {}
    t_exec = t_end = None
    try:
        try:
            manifest, opened = extract.open_payload(payload, header.get("manifest"), header.get("manifest_sha256"))
            path = (header.get("env") or {}).get("PATH") or manifest["environment"].get("PATH") \
                or os.environ.get("PATH") or DEFAULT_PATH
            interp = _interpreter(header, manifest["interpreter"], path)
            workdir = _private_dir()
            extract.write_plan(opened, workdir, now_tick)   # a slow set-up (a big payload) is not silence
            meta = manifest["metadata"]
            ctx = _context(header, meta, workdir)
            input_data = header.get("input")
            if input_data is None:
                input_data = meta.get("inputData")
            state, bindir, helper_env = helpers.install(workdir, ctx, input_data, snapshot, own_sha256())
            env = _build_env(header, manifest, ctx, workdir, bindir, helper_env)
            timeout = header.get("timeout")
            script = execute.Script(
                [interp, os.path.join(workdir, manifest["entrypoint"])], env, workdir, sink,
                timeout=float(timeout) if timeout else None, grace=header.get("kill_grace", 5.0),
                limits=header.get("limits"), watch_fd=watch_fd, wake_fd=wake_fd, umask=umask, libc=libc,
                hearing=hearing, tick=tick)
            script.subreaper = subreaper
            STATE.script = script
            STATE.phase = "running"
            try:
                script.spawn()
            except OSError as e:
                raise RunnerError("interpreter", "cannot start %s: %s" % (interp, e))
            res["started_at"] = time.time()
            t_exec = time.monotonic()
            script.run()
            t_end = time.monotonic()
        finally:
            STATE.phase = "done"
    except RunnerError as e:
        res["status"] = "cancelled" if e.kind == "cancelled" else "error"
        res["error"], res["error_kind"] = e.message, e.kind
    except Exception as e:  # never leave without a result
        res["error"], res["error_kind"] = "internal error: %s: %s" % (type(e).__name__, e), "internal"
    finally:
        if script is not None and script.pid is not None and script.status is None:
            script.cancel_reason = script.cancel_reason or "runner error"
            script.kill_all()
            script.stop()
        t_clean = time.monotonic()
        if now_tick is not None:   # a slow clean-up (a big tree, a loaded host) is not silence either
            now_tick()
        if state is not None:
            try:
                res["output"], res["output_set"], res["variables"], res["condition"] = helpers.collect(state, snapshot)
            except Exception:
                pass
        if workdir and not header.get("keep_workdir"):
            lite.rmtree(workdir, now_tick)
        elif workdir:
            res["workdir"] = workdir
    if script is not None and script.status is not None:
        st = script.status
        if os.WIFEXITED(st):
            res["exit_code"] = os.WEXITSTATUS(st)
        elif os.WIFSIGNALED(st):
            res["signal"] = os.WTERMSIG(st)
        res["timed_out"] = script.timed_out
        if script.cancelled:
            res["status"] = "cancelled"
            res["error"], res["error_kind"] = "cancelled: " + script.cancel_reason, "cancelled"
        elif script.timed_out:
            res["status"] = "timeout"
            res["error"] = "timed out after %ss" % header.get("timeout")
        else:
            res["status"] = "success" if res["exit_code"] == 0 else "failure"
        res["usage"] = script.usage()
    end = time.monotonic()
    ms = lambda a, b: int(round((b - a) * 1000)) if a is not None and b is not None else 0  # noqa: E731
    res["durations_ms"] = {"setup": ms(t0, t_exec if t_exec else t_clean), "execution": ms(t_exec, t_end),
                           "cleanup": ms(t_clean, end), "total": ms(t0, end)}
    return res


def _hello(w):
    body = dict(magic="CRNR", protocol=PROTOCOL, version=VERSION, sha256=own_sha256(), pid=os.getpid(),
                python="%d.%d.%d" % sys.version_info[:3])
    w.write(b"CRNR" + protocol.json_record(b"H", body))


def serve():
    umask = os.umask(0o077)
    w = protocol.FrameWriter(1)
    wake = _install_signals()
    try:
        return _serve(w, wake, umask)
    except RunnerError as e:  # a signal before the script started, a bad input or header value
        res = {"status": "cancelled" if e.kind == "cancelled" else "error", "exit_code": None, "signal": None,
               "timed_out": False, "error": e.message, "error_kind": e.kind, "runner": runner_info()}
        w.write(protocol.json_record(b"R", res))
        return 3 if e.kind == "protocol" else 0


def _serve(w, wake, umask):
    libc = execute._libc()
    subreaper = execute.become_subreaper(libc)
    _hello(w)
    header, payload = protocol.read_input(0)
    hearing = None
    try:
        cap = header.get("output_cap")
        cap = DEFAULT_CAP if cap is None else max(int(cap), 0)
    except (TypeError, ValueError):
        raise RunnerError("protocol", "header output_cap must be a whole number of bytes")
    cappers = {b"O": Capper(cap), b"E": Capper(cap)}
    hb = protocol.heartbeat(header)
    tick = None
    if hb is not None:   # stdout stalled while the controller is silent, as long as it may be = broken
        os.set_blocking(1, False)
        w.stall_s = hb[1]
        w.hearing = hearing = protocol.Hearing(0, hb[1])   # its clock starts now: the input is read

        def tick(now):
            if now - w.last >= hb[0]:
                _written(w.write(protocol.KEEPALIVE))

    def _written(ok):
        if not ok and STATE.script is not None:
            STATE.script.cancel_reason = STATE.script.cancel_reason or "stdout of the runner is broken"

    def sink(kind, ts, data):
        live = cappers[kind].feed(ts, data)
        if live:
            _written(w.write(protocol.stream_records(kind, ts, live)))

    res = run_payload(header, payload, sink, watch_fd=0, wake_fd=wake, libc=libc, umask=umask,
                      subreaper=subreaper, hearing=hearing, tick=tick)
    for kind, name in ((b"O", "stdout"), (b"E", "stderr")):
        c = cappers[kind]
        if c.dropped:
            note = "\n[cronium-runner: %d bytes of %s dropped by output_cap]\n" % (c.dropped, name)
            w.write(protocol.stream_records(kind, c.drop_ts, note.encode()))
        for ts, data in c.tail:
            w.write(protocol.stream_records(kind, ts, data))
        res["truncated"][name] = c.dropped
    w.write(protocol.json_record(b"R", res))
    return 0


HAND_USAGE = """usage: cronium-runner.pyz version
       cronium-runner.pyz run PAYLOAD.tar.gz [--input JSON] [--timeout S] [--result FILE] [--keep]
                                             [--header FILE]
"""


def hand(args):
    opts = {"--input": None, "--timeout": None, "--result": None, "--header": None}
    keep = False
    payload_path = None
    i = 0
    while i < len(args):
        a = args[i]
        if a == "--keep":
            keep = True
        elif a in opts and i + 1 < len(args):
            opts[a] = args[i + 1]
            i += 1
        elif "=" in a and a.split("=", 1)[0] in opts:
            opts[a.split("=", 1)[0]] = a.split("=", 1)[1]
        elif payload_path is None and not a.startswith("--"):
            payload_path = a
        else:
            sys.stderr.write(HAND_USAGE)
            return 2
        i += 1
    if payload_path is None:
        sys.stderr.write(HAND_USAGE)
        return 2
    header = {"protocol": PROTOCOL, "helper_mode": "bundled", "variables": {}}
    import json
    try:
        if opts["--header"]:
            with open(opts["--header"], "r", encoding="utf-8") as f:
                header.update(json.load(f))
        if opts["--input"] is not None:
            header["input"] = json.loads(opts["--input"])
        if opts["--timeout"] is not None:
            header["timeout"] = float(opts["--timeout"])
        with open(payload_path, "rb") as f:
            payload = f.read()
    except (OSError, ValueError) as e:
        sys.stderr.write("cronium-runner: %s\n" % e)
        return 2
    if keep:
        header["keep_workdir"] = True
    umask = os.umask(0o077)
    wake = _install_signals()
    libc = execute._libc()
    subreaper = execute.become_subreaper(libc)
    out = {b"O": protocol.FrameWriter(1), b"E": protocol.FrameWriter(2)}

    def sink(kind, ts, data):
        out[kind].write(data)

    try:
        res = run_payload(header, payload, sink, wake_fd=wake, libc=libc, umask=umask, subreaper=subreaper)
    except RunnerError as e:  # a signal during the very first steps
        res = {"status": "cancelled", "error": e.message, "error_kind": e.kind, "exit_code": None,
               "signal": None, "runner": runner_info()}
    if res["status"] == "error":
        sys.stderr.write("cronium-runner: %s error: %s\n" % (res["error_kind"], res["error"]))
    elif res.get("workdir"):
        sys.stderr.write("cronium-runner: work directory kept: %s\n" % res["workdir"])
    if opts["--result"]:
        with open(opts["--result"], "w", encoding="utf-8") as f:
            json.dump(res, f, indent=2, ensure_ascii=False)
            f.write("\n")
    st = res["status"]
    if st in ("success", "failure"):
        return res["exit_code"] if res["exit_code"] is not None else 128 + (res["signal"] or 0)
    return {"timeout": 124, "cancelled": 130}.get(st, 125)


def main(argv):
    if argv[:1] == ["version"]:
        sys.stdout.write(jsonc.dumps(runner_info()) + "\n")
        return 0
    if argv[:1] == ["serve"]:
        return serve()
    if argv[:1] == ["run"]:
        return hand(argv[1:])
    sys.stderr.write(HAND_USAGE)
    return 2
