"""Cronium runtime helpers (installed by cronium-runner into the run's private .cronium/ directory).

Python: ``import cronium`` (also a builtin): input(), output(data), getVariable(key) / get_variable,
setVariable(key, value) / set_variable, setCondition(bool) / set_condition, event().
Command line (the ``cronium.*`` commands on PATH): ``cronium.py COMMAND [--json] [ARGS]``.
Bundled mode keeps state in JSON files beside this directory; API mode calls the runtime API.
"""
import fcntl
import os
import sys


class _LazyJson(object):
    """``json`` on first use: importing it (``re``, ``enum``) costs ~9 ms of CPU at the start of every
    Python script, which imports this module through sitecustomize whether it calls a helper or not."""

    def __getattr__(self, name):
        import json as real
        globals()["json"] = real
        return getattr(real, name)


json = _LazyJson()

_HERE = os.path.dirname(os.path.abspath(__file__))
STATE_DIR = os.environ.get("CRONIUM_HELPER_DIR") or os.path.dirname(_HERE)
_MISSING = object()


def _path(name):
    return os.path.join(STATE_DIR, name)


def _load(name, default=None):
    try:
        with open(_path(name), "r", encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return default


def _store(name, value):
    tmp = _path(".%s.%d.tmp" % (name, os.getpid()))
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(value, f, ensure_ascii=False)
    os.replace(tmp, _path(name))


class _Lock(object):
    def __enter__(self):
        self.fd = os.open(_path("lock"), os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


def _api_mode():
    return os.environ.get("CRONIUM_HELPER_MODE") == "api" and bool(_endpoint())


def _endpoint():
    return (os.environ.get("CRONIUM_RUNTIME_API") or os.environ.get("CRONIUM_API_ENDPOINT") or "").rstrip("/")


_conn = None  # one keep-alive HTTP/1.1 connection per process: each new one costs an SSH channel open


def _connection():
    global _conn
    if _conn is None:
        import http.client
        import urllib.parse
        u = urllib.parse.urlsplit(_endpoint())
        _conn = http.client.HTTPConnection(u.hostname or "127.0.0.1", u.port or 80,
                                           timeout=float(os.environ.get("CRONIUM_API_TIMEOUT", "30")))
        _conn.connect()
        import socket
        _conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return _conn


def _drop_connection():
    global _conn
    if _conn is not None:
        _conn.close()
        _conn = None


RETRY_BUDGET_S = 60.0   # how long helpers wait out the API's rate limit (429) before failing


def _send(method, url, data, headers, what):
    """One request on the kept-alive connection (reconnecting once if the server closed it)."""
    import http.client
    for attempt in (0, 1):
        reused = _conn is not None
        try:
            conn = _connection()
            conn.request(method, url, body=data, headers=headers)
            resp = conn.getresponse()
            raw, status, retry_after = resp.read(), resp.status, resp.getheader("Retry-After")
            if resp.will_close:
                _drop_connection()
            return status, raw, retry_after
        except (http.client.HTTPException, OSError, ValueError) as e:
            _drop_connection()
            # a kept-alive connection the server closed meanwhile: reconnect once
            if attempt == 0 and reused and isinstance(e, (http.client.RemoteDisconnected, ConnectionError,
                                                          http.client.CannotSendRequest)):
                continue
            raise RuntimeError("cronium API %s failed: %s" % (what, e))


def _api(method, path, body=_MISSING, allow_404=False):
    import time
    import urllib.parse
    token = os.environ.get("CRONIUM_EXECUTION_TOKEN") or os.environ.get("CRONIUM_API_TOKEN") or ""
    exe = os.environ.get("CRONIUM_EXECUTION_ID") or ""
    base = urllib.parse.urlsplit(_endpoint()).path.rstrip("/")
    url = "%s/executions/%s/%s" % (base, urllib.parse.quote(exe, safe=""), path)
    data = None if body is _MISSING else json.dumps(body).encode("utf-8")
    headers = {"Authorization": "Bearer " + token, "Accept": "application/json"}
    if data is not None:
        headers["Content-Type"] = "application/json"
    what = "%s %s" % (method, path)
    deadline = time.monotonic() + RETRY_BUDGET_S
    while True:
        status, raw, retry_after = _send(method, url, data, headers, what)
        if status != 429:
            break
        # Too many calls at once: the API says when to come back. A busy loop in a script slows
        # down instead of failing, up to the budget.
        try:
            wait = min(max(float(retry_after or 1), 0.05), 5.0)
        except ValueError:
            wait = 1.0
        if time.monotonic() + wait > deadline:
            break
        time.sleep(wait)
    if status == 404 and allow_404:
        return None
    if status >= 400:
        detail = raw[:300].decode("utf-8", "replace")
        raise RuntimeError("cronium API %s failed: HTTP %d %s" % (what, status, detail))
    try:
        return json.loads(raw.decode("utf-8")) if raw else None
    except ValueError:
        raise RuntimeError("cronium API %s: response is not JSON" % what)


def _data(resp):
    return resp.get("data") if isinstance(resp, dict) else None


def input():  # noqa: A001  (Cronium's name)
    """The job's input data, or None."""
    if _api_mode():
        return _data(_api("GET", "input"))
    return (_load("input.json") or {}).get("data")


def output(data=None):
    """Set this run's output (any JSON value)."""
    json.dumps(data)
    if _api_mode():
        _api("POST", "output", {"data": data})
    with _Lock():
        _store("output.json", {"data": data})


def getVariable(key):
    """The user's variable ``key``, or None when unknown."""
    key = str(key)
    if _api_mode():
        d = _data(_api("GET", "variables/" + _quote(key), allow_404=True))
        return d.get("value") if isinstance(d, dict) else None
    return (_load("variables.json") or {}).get(key)


def setVariable(key, value):
    """Create or update the user's variable ``key`` (any JSON value)."""
    key = str(key)
    json.dumps(value)
    if _api_mode():
        _api("PUT", "variables/" + _quote(key), {"value": value})
    with _Lock():
        variables = _load("variables.json") or {}
        variables[key] = value
        _store("variables.json", variables)


def setCondition(condition):
    """Mark this run's condition (for workflows)."""
    condition = _bool(condition)
    if _api_mode():
        _api("POST", "condition", {"condition": condition})
    with _Lock():
        _store("condition.json", {"condition": condition})


def event():
    """The run's context: eventId, eventName, executionId, jobId, serverId, serverName, trigger, ..."""
    if _api_mode():
        d = _data(_api("GET", "context"))
        if isinstance(d, dict):
            return d
    return _load("context.json") or {}


def _quote(key):
    import urllib.parse
    return urllib.parse.quote(key, safe="")


def _bool(v):
    if isinstance(v, str):
        low = v.strip().lower()
        if low in ("true", "1", "yes", "on", "y"):
            return True
        if low in ("false", "0", "no", "off", "n", ""):
            return False
        raise ValueError("not a boolean: %r" % v)
    return bool(v)


get_input = input
set_output = output
get_variable = getVariable
set_variable = setVariable
set_condition = setCondition
context = get_context = get_event = event


def _parse(text, strict):
    if strict:
        return json.loads(text) if text.strip() else None
    try:
        return json.loads(text)
    except ValueError:
        return text


def _print(value, as_json):
    if not as_json and isinstance(value, str):
        out = value + "\n"
    elif not as_json and value is None:
        out = ""
    else:
        out = json.dumps(value, ensure_ascii=False) + "\n"
    sys.stdout.buffer.write(out.encode("utf-8"))
    sys.stdout.flush()


def _stdin_text():
    data = sys.stdin.buffer.read() if sys.stdin is not None else b""
    text = data.decode("utf-8")
    return text[:-1] if text.endswith("\n") else text


_USAGE = """usage: cronium.<command> [--json] [args]
  cronium.input                      print the input (strings raw, others as JSON)
  cronium.output [JSON]              set the output (argument, or JSON on stdin)
  cronium.getVariable KEY            print a variable (nothing when unknown)
  cronium.setVariable KEY [VALUE]    set a variable (argument or stdin; JSON, else a string)
  cronium.setCondition true|false    set the condition
  cronium.event                      print the context as JSON
  cronium.detach [--log FILE] CMD... start CMD handed over: it outlives the run (prints its pid)
  --json: strict JSON in and out (strings quoted, null printed as null)
"""


_HELPER_ENV = ("BASH_ENV", "PYTHONPATH", "NODE_PATH", "NODE_OPTIONS", "TMPDIR")


def _handover_env():
    """The script's environment minus the run's: no CRONIUM_* (API tokens included), no helper
    wiring or work-dir paths (the work dir is removed after the run)."""
    work = os.environ.get("CRONIUM_WORK_DIR") or STATE_DIR
    ours = (_HERE, work)

    def mine(p):
        return any(p == d or p.startswith(d.rstrip("/") + "/") for d in ours if d)

    env = {}
    for k, v in os.environ.items():
        if k.startswith("CRONIUM_"):
            continue
        if k in ("PATH", "PYTHONPATH", "NODE_PATH") or k in _HELPER_ENV:
            sep = " " if k == "NODE_OPTIONS" else ":"
            v = sep.join(p for p in v.split(sep) if p and not mine(p.split("=", 1)[-1].strip('"')))
            if not v:
                continue
        env[k] = v
    return env


def detach(argv, log=None):
    """Start ``argv`` handed over on purpose: its own session, cwd $HOME, stdin /dev/null, stdout and
    stderr to ``log`` (appended; absolute path) or /dev/null, the run's environment removed. It is
    recorded in the run's registry, so the runner neither kills it nor waits for it. Returns its pid."""
    if not argv:
        raise ValueError("usage: cronium.detach [--log FILE] CMD [ARGS...]")
    if log is not None and not os.path.isabs(log):
        raise ValueError("--log needs an absolute path (the work dir is removed after the run): %r" % log)
    import subprocess   # only here: ~14 ms of imports that no other helper needs
    home = os.path.expanduser("~")
    out = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600) if log else subprocess.DEVNULL
    try:
        # no fork of this (maybe multi-threaded) interpreter running Python in the child: Popen execs
        proc = subprocess.Popen(argv, cwd=home if os.path.isdir(home) else "/", env=_handover_env(),
                                stdin=subprocess.DEVNULL, stdout=out, stderr=out, close_fds=True,
                                start_new_session=True)
    except OSError as e:
        raise OSError("%s: %s" % (argv[0], e.strerror or e))
    finally:
        if log:
            os.close(out)
    pid = proc.pid
    proc.returncode = 0      # not ours to wait for (no ResourceWarning, not kept in subprocess._active)
    try:
        with open("/proc/%d/stat" % pid, "rb") as f:
            data = f.read()
        start = data[data.rfind(b")") + 2:].split()[19].decode()
    except (OSError, IndexError):
        start = "-"           # already gone: its session (anything it left) is still handed over
    with _Lock():
        with open(_path("detached"), "a") as f:
            f.write("%d %s\n" % (pid, start))
    return pid


def main(argv):
    if argv and argv[0].replace("_", "").lower() == "detach":   # CMD's own arguments are not ours
        rest = argv[1:]
        log = None
        if rest[:1] == ["--log"] and len(rest) > 1:
            log, rest = rest[1], rest[2:]
        elif rest[:1] and rest[0].startswith("--log="):
            log, rest = rest[0][6:], rest[1:]
        if rest[:1] == ["--"]:
            rest = rest[1:]
        try:
            sys.stdout.write("%d\n" % detach(rest, log))
        except (ValueError, OSError) as e:
            sys.stderr.write("cronium.detach: %s\n" % e)
            return 127 if isinstance(e, OSError) else 2
        return 0
    strict = "--json" in argv
    args = [a for a in argv if a != "--json"]
    if not args or args[0] in ("-h", "--help", "help"):
        sys.stdout.write(_USAGE)
        return 0 if args else 2
    cmd, rest = args[0].replace("_", "").lower(), args[1:]
    try:
        if cmd in ("input", "getinput"):
            _print(input(), strict)
        elif cmd in ("output", "setoutput"):
            output(_parse(rest[0] if rest else _stdin_text(), strict))
        elif cmd in ("getvariable", "get"):
            if len(rest) != 1:
                sys.stderr.write("usage: cronium.getVariable KEY\n")
                return 2
            _print(getVariable(rest[0]), strict)
        elif cmd in ("setvariable", "set"):
            if len(rest) not in (1, 2):
                sys.stderr.write("usage: cronium.setVariable KEY [VALUE]  (value from stdin if omitted)\n")
                return 2
            setVariable(rest[0], _parse(rest[1] if len(rest) == 2 else _stdin_text(), strict))
        elif cmd in ("setcondition", "condition"):
            if len(rest) != 1:
                sys.stderr.write("usage: cronium.setCondition true|false\n")
                return 2
            setCondition(rest[0])
        elif cmd in ("event", "context", "getevent"):
            _print(event(), True)
        else:
            sys.stderr.write("cronium: unknown command %r\n%s" % (args[0], _USAGE))
            return 2
    except (ValueError, RuntimeError, OSError) as e:
        sys.stderr.write("cronium.%s: %s\n" % (args[0], e))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
