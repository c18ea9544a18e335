"""Runs the script: spawn under limits, one poll loop over its pipes, timeout/cancel, kill the whole tree."""
import errno
import os
import resource
import select
import time

try:   # the C module: ``signal`` itself imports ``enum`` (~5 ms of CPU per run); same functions
    import _signal as signal
except ImportError:  # pragma: no cover (not CPython)
    import signal

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
READ_SIZE = 64 * 1024

_RLIMITS = (
    ("cpu_seconds", "RLIMIT_CPU"),
    ("address_space_bytes", "RLIMIT_AS"),
    ("open_files", "RLIMIT_NOFILE"),
    ("file_size_bytes", "RLIMIT_FSIZE"),
    ("processes", "RLIMIT_NPROC"),
)


class _Libc(object):
    """``libc.prctl`` through ``_ctypes`` alone: ``import ctypes`` costs ~3.5 ms of CPU per run, its C
    module ~0.8 ms. Arguments are passed as C ints, as ``ctypes.CDLL(None).prctl(...)`` does."""

    def __init__(self):
        import _ctypes

        class _Function(_ctypes.CFuncPtr):
            _flags_ = _ctypes.FUNCFLAG_CDECL | _ctypes.FUNCFLAG_USE_ERRNO

        self.prctl = _Function(_ctypes.dlsym(_ctypes.dlopen(None), "prctl"))


def _libc():
    try:
        return _Libc()
    except Exception:
        pass
    try:
        import ctypes
        return ctypes.CDLL(None, use_errno=True)
    except Exception:
        return None


def become_subreaper(libc):
    """Orphans of the script re-parent to us, so we can find and kill them (Linux >= 3.4)."""
    try:
        return libc is not None and libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except Exception:
        return False


def _proc_table():
    table = {}
    try:
        names = os.listdir("/proc")
    except OSError:
        return None
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % name, "rb") as f:
                data = f.read()
        except OSError:
            continue
        fields = data[data.rfind(b")") + 2:].split()
        try:
            table[int(name)] = (int(fields[1]), int(fields[3]), fields[0])
        except (IndexError, ValueError):
            continue
    return table


def detached(path, sid):
    """Sessions handed over on purpose (``cronium.detach``, docs/RUNNER.md): the lines "PID STARTTIME"
    of the run's registry name processes started as leaders of a session of their own. Their session
    is kept while that leader lives with that start time, or, once it is gone, while anything of the
    session lives (Linux reuses no pid while it is still some process's session id), so a command that
    daemonizes itself (forks and exits) keeps its children."""
    keep = set()
    try:
        with open(path, "rb") as f:
            lines = f.read().split(b"\n")
    except (OSError, TypeError):
        return keep
    for line in lines:
        parts = line.split()
        try:
            pid = int(parts[0])
        except (ValueError, IndexError):
            continue
        if pid in (sid, 0):
            continue
        try:
            with open("/proc/%d/stat" % pid, "rb") as f:
                data = f.read()
        except OSError:
            keep.add(pid)       # the leader is gone: what is left in its session is still handed over
            continue
        fields = data[data.rfind(b")") + 2:].split()
        try:
            if len(parts) == 2 and fields[19] == parts[1] and int(fields[3]) == pid:
                keep.add(pid)
        except (ValueError, IndexError):
            continue
    return keep


def tree(sid, keep=()):
    """Live pids of the script's tree: our descendants plus anything in the script's session,
    minus the processes in the sessions ``keep`` and everything below them."""
    me = os.getpid()
    table = _proc_table()
    if table is None:
        return set()
    kids = {}
    for pid, (ppid, _sess, _st) in table.items():
        kids.setdefault(ppid, []).append(pid)
    out = set()
    stack = [me]
    while stack:
        for c in kids.get(stack.pop(), ()):
            if c not in out and table[c][1] not in keep:
                out.add(c)
                stack.append(c)
    if sid:
        out.update(pid for pid, (_p, sess, _s) in table.items() if sess == sid)
    out.discard(me)
    return set(p for p in out if p in table and table[p][2] != b"Z")


def signal_tree(sid, sig, keep=()):
    pids = tree(sid, keep)
    if sid:
        try:
            os.killpg(sid, sig)
        except OSError:
            pass
    for p in pids:
        try:
            os.kill(p, sig)
        except OSError:
            pass
    return pids


class SubprocessError(Exception):
    """An exception in the child before exec (as ``subprocess`` reports a failing preexec_fn)."""


def spawn(argv, cwd, env, preexec):
    """fork + exec like ``subprocess.Popen(argv, cwd=cwd, env=env, stdin=DEVNULL, stdout=PIPE,
    stderr=PIPE, start_new_session=True, preexec_fn=preexec, close_fds=True)``, without importing
    ``subprocess`` (~14 ms of CPU per run with what it imports). Returns ``(pid, out_fd, err_fd)``;
    raises OSError (with the file name) when the program cannot be started, as Popen does."""
    import fcntl
    fds = []
    try:
        null = os.open(os.devnull, os.O_RDONLY)
        fds.append(null)
        out_r, out_w = os.pipe()
        fds += [out_r, out_w]
        err_r, err_w = os.pipe()
        fds += [err_r, err_w]
        x_r, x_w = os.pipe()            # close-on-exec: EOF at exec, errno before it
        fds += [x_r, x_w]
        pid = os.fork()
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    if pid == 0:                        # the child: never returns
        stage = b"X"
        try:
            for fd in (out_r, err_r, x_r):
                os.close(fd)
            high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (null, out_w, err_w)]
            for i, fd in enumerate(high):
                os.dup2(fd, i)
            stage = b"C"
            os.chdir(cwd)
            stage = b"X"
            for name in ("SIGPIPE", "SIGXFSZ"):   # Python ignores them; subprocess restores them too
                if hasattr(signal, name):
                    signal.signal(getattr(signal, name), signal.SIG_DFL)
            os.setsid()
            stage = b"P"
            preexec()
            stage = b"X"
            try:
                open_fds = [int(fd) for fd in os.listdir("/proc/self/fd")]
            except OSError:
                open_fds = range(3, 4096)
            for fd in open_fds:
                if fd > 2 and fd != x_w:
                    try:
                        os.close(fd)
                    except OSError:
                        pass
            stage = b"E"
            if "/" in argv[0]:
                os.execve(argv[0], argv, env)
            else:
                os.execvpe(argv[0], argv, env)
        except BaseException as e:
            try:
                if stage == b"P":
                    os.write(x_w, b"P")
                else:
                    os.write(x_w, stage + str(getattr(e, "errno", None) or 0).encode())
            except BaseException:
                pass
        finally:
            os._exit(255)
    for fd in (null, out_w, err_w, x_w):
        os.close(fd)
    try:
        report = b""
        while True:
            part = os.read(x_r, 64)
            if not part:
                break
            report += part
    finally:
        os.close(x_r)
    if not report:
        return pid, out_r, err_r
    os.close(out_r)
    os.close(err_r)
    while True:
        try:
            os.waitpid(pid, 0)
            break
        except InterruptedError:
            continue
        except ChildProcessError:
            break
    if report[:1] == b"P":
        raise SubprocessError("Exception occurred in preexec_fn.")
    num = int(report[1:] or 0)
    if report[:1] == b"C":
        raise OSError(num, os.strerror(num), cwd)
    if report[:1] == b"E":
        raise OSError(num, os.strerror(num), argv[0])
    raise OSError(num, os.strerror(num))


class Script:
    """One run of the script. ``sink(kind, ts, data)`` gets output; ``kind`` is b"O" or b"E"."""

    def __init__(self, argv, env, cwd, sink, timeout=None, grace=5.0, limits=None,
                 watch_fd=None, umask=0o022, wake_fd=None, libc=None, hearing=None, tick=None):
        self.argv, self.env, self.cwd, self.sink = argv, env, cwd, sink
        # heartbeat: with ``hearing`` (protocol.Hearing of ``watch_fd``), nothing heard for its timeout
        # cancels (the controller is frozen or cut off); ``tick(now)`` is called at least once a second,
        # also while the tree is stopped after the loop
        self.hearing, self.tick = hearing, tick
        self.timeout = timeout
        self.grace = max(float(grace), 0.0)
        self.limits = self._limits(limits or {})
        self.watch_fd, self.wake_fd = watch_fd, wake_fd
        self.umask = umask
        self.libc = libc
        self.cancel_reason = None      # set by signal handlers / stdin EOF / broken output
        self.timed_out = False
        self.cancelled = False         # the kill was started by a cancel while the script was alive
        self.status = None             # raw wait status of the main process
        self.rusage = None
        self.pid = None
        self.out_fd = self.err_fd = None
        self.subreaper = False         # set by the caller when prctl(PR_SET_CHILD_SUBREAPER) worked
        state = env.get("CRONIUM_HELPER_DIR") if env else None
        self.registry = os.path.join(state, "detached") if state else None   # cronium.detach

    def _tree(self):
        return tree(self.pid, detached(self.registry, self.pid))

    def _signal(self, sig):
        return signal_tree(self.pid, sig, detached(self.registry, self.pid))

    @staticmethod
    def _limits(limits):
        out = []
        for key, name in _RLIMITS:
            val = limits.get(key)
            if val is None or not hasattr(resource, name):
                continue
            res = getattr(resource, name)
            val = int(val)
            _soft, hard = resource.getrlimit(res)
            top = val + 1 if key == "cpu_seconds" else val
            if hard != resource.RLIM_INFINITY:
                val, top = min(val, hard), min(top, hard)
            out.append((res, val, top))
        return out

    def _preexec(self):
        os.umask(self.umask)
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        for res, soft, hard in self.limits:
            resource.setrlimit(res, (soft, hard))
        if self.libc is not None:
            self.libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)

    def spawn(self):
        self.pid, self.out_fd, self.err_fd = spawn(self.argv, self.cwd, self.env, self._preexec)
        self.started = time.monotonic()

    def _reap(self):
        while True:
            try:
                pid, status, ru = os.wait4(-1, os.WNOHANG)
            except ChildProcessError:
                return
            except InterruptedError:
                continue
            if pid == 0:
                return
            if pid == self.pid:
                self.status, self.rusage = status, ru

    def run(self):
        """The loop; returns when the main process ended and its pipes are closed (tree killed)."""
        fds = {self.out_fd: b"O", self.err_fd: b"E"}
        poller = select.poll()
        for fd in fds:
            poller.register(fd, select.POLLIN)
        if self.watch_fd is not None:
            poller.register(self.watch_fd, select.POLLIN)
        if self.wake_fd is not None:
            poller.register(self.wake_fd, select.POLLIN)
        deadline = self.started + self.timeout if self.timeout else None
        kill_at = None          # when SIGTERM was sent: SIGKILL deadline
        hard_done = None        # when SIGKILL was sent
        while True:
            self._reap()
            now = time.monotonic()
            if self.tick is not None:
                self.tick(now)
            hearing = self.hearing if self.watch_fd is not None else None
            if (hearing is not None and hearing.silent(now) and not hearing.closed
                    and not select.select([self.watch_fd], [], [], 0)[0]):
                self.cancel_reason = self.cancel_reason or (
                    "controller silent for %d s (no heartbeat on stdin: controller frozen or network cut)"
                    % (now - hearing.heard))
            if kill_at is None:
                grace = None
                if self.cancel_reason:
                    grace = min(self.grace, 1.0)
                    self.cancelled = self.status is None
                elif deadline is not None and now >= deadline and self.status is None:
                    self.timed_out = True
                    grace = self.grace
                elif self.status is not None and fds:
                    grace = min(self.grace, 2.0)   # main exited, leftovers hold the pipes
                    if self.subreaper and not self._has_children():
                        # Nothing of the tree is alive (as a subreaper, it would all be our children):
                        # the pipes are just closing. Do not scan /proc (milliseconds on a busy host).
                        kill_at = now + grace
                        grace = None
                if grace is not None:
                    self._signal(signal.SIGTERM)
                    kill_at = now + grace
            if kill_at is not None and hard_done is None and now >= kill_at:
                self.kill_all()
                hard_done = now
            if self.status is not None and not fds:
                break
            if hard_done is not None and now > hard_done + 2.0:
                break    # something outside our reach holds the pipes: give up on them
            wait = 1.0
            for t in (deadline if kill_at is None and self.status is None else None, kill_at if hard_done is None else None):
                if t is not None:
                    wait = min(wait, max(t - now, 0.0))
            if hearing is not None:
                wait = min(wait, max(hearing.heard + hearing.timeout - now, 0.0) + 0.01)
            if hard_done is not None:
                wait = min(wait, 0.05)
            try:
                events = poller.poll(int(wait * 1000) + 1)
            except InterruptedError:
                continue
            for fd, ev in events:
                if fd in fds:
                    try:
                        data = os.read(fd, READ_SIZE)
                    except OSError as e:
                        if e.errno in (errno.EAGAIN, errno.EINTR):
                            continue
                        data = b""
                    if data:
                        self.sink(fds[fd], time.time(), data)
                    else:
                        poller.unregister(fd)
                        del fds[fd]
                elif fd == self.watch_fd:
                    if self.hearing is not None:
                        data = self.hearing.listen()
                    else:
                        try:
                            data = os.read(fd, READ_SIZE)
                        except OSError:
                            data = b""
                    if not data:
                        poller.unregister(fd)
                        self.watch_fd = None
                        self.cancel_reason = self.cancel_reason or "controller closed stdin"
                elif fd == self.wake_fd:
                    try:
                        os.read(fd, 4096)
                    except OSError:
                        pass
        self.close_pipes()
        self.stop()
        self.ended = time.monotonic()

    @staticmethod
    def _has_children():
        try:
            with open("/proc/self/task/%d/children" % os.getpid(), "rb") as f:
                return bool(f.read().strip())
        except OSError:
            return True

    def _tick(self):
        if self.tick is not None:
            self.tick(time.monotonic())

    def kill_all(self):
        """SIGKILL the tree until nothing of it is left (catches forks racing the kill)."""
        for _ in range(200):
            self._tick()
            pids = self._signal(signal.SIGKILL)
            self._reap()
            if not pids:
                return
            time.sleep(0.005)

    def stop(self):
        """Leftovers after the loop: SIGTERM, a short grace, SIGKILL; then reap everything."""
        self.close_pipes()
        self._reap()
        if self.status is not None and self.subreaper and not self._has_children():
            pass    # as a subreaper, every live descendant would be a child of ours: nothing left
        elif self._tree():
            self._signal(signal.SIGTERM)
            end = time.monotonic() + min(self.grace, 2.0)
            while time.monotonic() < end and self._tree():
                self._reap()
                self._tick()
                time.sleep(0.01)
            self.kill_all()
        while self.status is None:
            try:
                pid, status, ru = os.wait4(self.pid, 0)
                self.status, self.rusage = status, ru
            except InterruptedError:
                continue
            except ChildProcessError:
                break
        self._reap()

    def close_pipes(self):
        for fd in (self.out_fd, self.err_fd):
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.out_fd = self.err_fd = None

    def usage(self):
        ru = resource.getrusage(resource.RUSAGE_CHILDREN)
        return {"max_rss_kb": int(ru.ru_maxrss), "cpu_user_s": round(ru.ru_utime, 3),
                "cpu_sys_s": round(ru.ru_stime, 3)}
