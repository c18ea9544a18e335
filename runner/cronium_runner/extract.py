"""Safe extraction of a payload archive: validate every member first, then write into a private dir."""
import io
import os

from . import RunnerError
from .lite import sha256
from .manifest import load_manifest, normalise

MAX_ENTRIES = 10000
MAX_BYTES = 256 << 20
MANIFEST_NAMES = ("manifest.yaml", "manifest.yml")
FAST_MAX = 16 << 20     # archives up to this size (uncompressed) may take the fast path


class _Member(object):
    """What the checks below use of a ``tarfile.TarInfo``: a regular file or a directory."""

    def __init__(self, name, mode, size, is_dir, data):
        self.name, self.mode, self.size, self._dir, self.data = name, mode, size, is_dir, data

    def isdir(self):
        return self._dir

    def isreg(self):
        return not self._dir

    def issym(self):
        return False

    islnk = ischr = isblk = isfifo = issparse = issym


def _octal(field):
    field = field.split(b"\0", 1)[0].strip()
    return int(field or b"0", 8)


class _FastTar(object):
    """A plain (ustar, PAX or GNU) archive of regular files and directories only, gzipped or not.

    ``tarfile`` costs ~13 ms of CPU per run in imports (``shutil``, ``re``, ``copy``, ...); a
    payload the controller builds needs none of what it supports beyond this. :meth:`parse` says
    ``None`` at the first thing it does not take exactly as ``tarfile`` would (links, devices, PAX
    or GNU extension headers, non-ASCII names, a bad checksum, a truncated or trailing anything,
    another compression), and then ``tarfile`` reads the archive, with its own errors.
    """
    crnr_errors = (EOFError, OSError, ValueError)

    def __init__(self, members):
        self._members = iter(members)

    @classmethod
    def parse(cls, payload, limit=FAST_MAX):
        if payload[:2] == b"\x1f\x8b":
            import zlib
            d = zlib.decompressobj(31)
            try:
                raw = d.decompress(payload, limit + 1)
            except zlib.error:
                return None
            if not d.eof or d.unused_data or d.unconsumed_tail or len(raw) > limit:
                return None
        elif payload[:3] == b"BZh" or payload[:6] == b"\xfd7zXZ\x00" or len(payload) > limit:
            return None
        else:
            raw = payload
        members = []
        off = 0
        view = memoryview(raw)
        while True:
            block = raw[off:off + 512]
            if len(block) < 512:
                if block or not members:
                    return None      # truncated, or empty: tarfile's business
                break
            if block.count(b"\0") == 512:
                break                # end of archive (what follows is ignored, as tarfile does)
            try:
                chksum = _octal(block[148:156])
                name, prefix = block[0:100].split(b"\0", 1)[0], block[345:500].split(b"\0", 1)[0]
                mode, size = _octal(block[100:108]), _octal(block[124:136])
                name, prefix = name.decode("ascii"), prefix.decode("ascii")
            except ValueError:     # base-256 numbers, non-ASCII names, garbage
                return None
            if chksum != 256 + sum(block[:148]) + sum(block[156:]):
                return None
            kind = block[156:157]
            if kind in (b"0", b"\0") and not name.endswith("/"):
                is_dir = False
            elif kind == b"5" and size == 0:
                is_dir = True
                name = name.rstrip("/")
            else:
                return None
            if prefix:
                name = prefix + "/" + name
            start = off + 512
            if start + size > len(raw):
                return None
            members.append(_Member(name, mode, size, is_dir, view[start:start + size]))
            off = start + (size + 511) // 512 * 512
        return cls(members)

    def next(self):
        return next(self._members, None)

    def extractfile(self, member):
        return io.BytesIO(member.data)

    def close(self):
        self._members = iter(())


def _open_tarfile(payload):
    import tarfile
    try:
        tar = tarfile.open(fileobj=io.BytesIO(payload), mode="r:*")
    except (tarfile.TarError, EOFError, OSError) as e:
        raise RunnerError("extract", "payload is not a tar(.gz) archive: %s" % e)
    tar.crnr_errors = (tarfile.TarError, EOFError, OSError, ValueError)
    return tar


def _clean_name(name):
    if not name or "\0" in name:
        raise RunnerError("extract", "archive member with an empty or NUL name")
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        raise RunnerError("extract", "archive member %r has an absolute path" % name)
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise RunnerError("extract", "archive member %r escapes the work directory (..)" % name)
    return "/".join(parts)


def open_payload(payload, header_manifest=None, manifest_sha256=None,
                 max_entries=MAX_ENTRIES, max_bytes=MAX_BYTES):
    """Validate the whole archive in memory; return ``(manifest, plan)`` without writing anything.

    ``plan`` is a list of ``(name, kind, member, tarfile)`` for :func:`write_plan`.
    """
    tar = _FastTar.parse(payload) or _open_tarfile(payload)
    seen = {}
    total = 0
    count = 0
    try:
        while True:
            try:
                m = tar.next()
            except tar.crnr_errors as e:
                raise RunnerError("extract", "corrupt archive: %s" % e)
            if m is None:
                break
            count += 1
            if count > max_entries:
                raise RunnerError("extract", "archive has more than %d entries (decompression bomb?)"
                                  % max_entries)
            name = _clean_name(m.name)
            if m.issym() or m.islnk():
                raise RunnerError("extract", "archive member %r is a %s link; links are refused"
                                  % (m.name, "symbolic" if m.issym() else "hard"))
            if m.ischr() or m.isblk() or m.isfifo() or m.issparse() or not (m.isreg() or m.isdir()):
                raise RunnerError("extract", "archive member %r is a device, FIFO or special file" % m.name)
            if not name:
                if m.isdir():
                    continue
                raise RunnerError("extract", "archive member %r has no name" % m.name)
            if name in seen:
                raise RunnerError("extract", "archive member %r appears twice" % name)
            total += max(m.size, 0)
            if total > max_bytes:
                raise RunnerError("extract", "archive expands to more than %d bytes (decompression bomb?)"
                                  % max_bytes)
            seen[name] = ("dir" if m.isdir() else "file", m)
    except BaseException:
        tar.close()
        raise
    for name in seen:
        parent = name.rsplit("/", 1)[0] if "/" in name else ""
        while parent:
            if seen.get(parent, ("dir",))[0] != "dir":
                tar.close()
                raise RunnerError("extract", "archive member %r lies under a file %r" % (name, parent))
            parent = parent.rsplit("/", 1)[0] if "/" in parent else ""
    mname = next((n for n in MANIFEST_NAMES if seen.get(n, ("",))[0] == "file"), None)
    try:
        if header_manifest is not None and manifest_sha256:
            data = _read(tar, seen[mname][1]) if mname else b""
            if not mname or sha256(data).hexdigest() != str(manifest_sha256).lower():
                raise RunnerError("digest", "manifest sha256 mismatch (header manifest not bound to the payload)")
            manifest = normalise(header_manifest, "header manifest")
        elif mname is None:
            raise RunnerError("manifest", "payload has no manifest.yaml (or manifest.yml) at its root")
        else:
            manifest = load_manifest(_read(tar, seen[mname][1]), mname)
        entry = _clean_name(manifest["entrypoint"])
        if entry in MANIFEST_NAMES or seen.get(entry, ("",))[0] != "file":
            raise RunnerError("manifest", "entrypoint %r is not a file in the archive" % manifest["entrypoint"])
        manifest["entrypoint"] = entry
    except BaseException:
        tar.close()
        raise
    plan = [(n, k, m) for n, (k, m) in sorted(seen.items())]
    return manifest, (tar, plan, max_bytes)


def _read(tar, member):
    f = tar.extractfile(member)
    try:
        return f.read(member.size + 1)
    finally:
        f.close()


def write_plan(opened, dest, tick=None):
    """Write the validated members below ``dest`` (which must exist, private and empty); ``tick()``
    is called per member and per MiB written (a big payload takes a while: it is not silence)."""
    tar, plan, max_bytes = opened
    written = 0
    try:
        for name, kind, m in plan:
            if tick is not None:
                tick()
            path = os.path.join(dest, name)
            if kind == "dir":
                os.makedirs(path, 0o700, exist_ok=True)
                continue
            parent = os.path.dirname(path)
            if parent != dest:
                os.makedirs(parent, 0o700, exist_ok=True)
            mode = 0o700 if m.mode & 0o111 else 0o600
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), mode)
            with os.fdopen(fd, "wb") as out:
                src = tar.extractfile(m)
                left = m.size
                while left > 0:
                    buf = src.read(min(left, 1 << 20))
                    if not buf:
                        raise RunnerError("extract", "archive member %r is truncated" % name)
                    written += len(buf)
                    if written > max_bytes:
                        raise RunnerError("extract", "archive expands to more than %d bytes" % max_bytes)
                    out.write(buf)
                    left -= len(buf)
                    if tick is not None:
                        tick()
    except tar.crnr_errors as e:
        raise RunnerError("extract", "cannot extract payload: %s" % e)
    finally:
        tar.close()
