"""Safe extraction: hostile archives are refused with nothing written anywhere (serve mode, end to end)."""

from __future__ import annotations

import io
import tarfile

import pytest
from crnr_testlib import encode_input, header, make_tar, manifest_text, serve

MAN = ("manifest.yaml", manifest_text())
SCRIPT = ("script.sh", "echo ran")


def _info(name: str, kind: bytes, **kw) -> tarfile.TarInfo:
    i = tarfile.TarInfo(name)
    i.type = kind
    for k, v in kw.items():
        setattr(i, k, v)
    return i


def _refused(py, pyz, env, tmp, data: bytes, kind: str = "extract") -> dict:
    s = serve(py, pyz, encode_input(header(data), data), env=env)
    assert s.rc == 0
    assert s.result["status"] == "error", s.result
    assert s.result["error_kind"] == kind, s.result
    assert s.stdout == b""
    assert list(tmp.iterdir()) == [], "something was written under TMPDIR"
    return s.result


def test_tar_slip_refused(py, pyz, tmpdir_env):
    env, tmp = tmpdir_env
    r = _refused(py, pyz, env, tmp, make_tar([MAN, SCRIPT, ("../escape.txt", "x"), ("../../escape2", "y")]))
    assert ".." in r["error"]
    assert not (tmp.parent / "escape.txt").exists() and not (tmp.parent.parent / "escape2").exists()


def test_tar_slip_in_the_middle_refused(py, pyz, tmpdir_env):
    env, tmp = tmpdir_env
    _refused(py, pyz, env, tmp, make_tar([MAN, SCRIPT, ("sub/../../x", "x")]))


def test_absolute_path_refused(py, pyz, tmpdir_env, tmp_path):
    env, tmp = tmpdir_env
    target = tmp_path / "abs-target.txt"
    r = _refused(py, pyz, env, tmp, make_tar([MAN, SCRIPT, (str(target), "x")]))
    assert "absolute" in r["error"]
    assert not target.exists()


def test_symlink_refused(py, pyz, tmpdir_env, tmp_path):
    env, tmp = tmpdir_env
    outside = tmp_path / "outside"
    outside.mkdir()
    link = _info("link", tarfile.SYMTYPE, linkname=str(outside))
    r = _refused(py, pyz, env, tmp, make_tar([MAN, SCRIPT, link, ("link/pwned", "x")]))
    assert "symbolic" in r["error"]
    assert list(outside.iterdir()) == []


def test_symlinked_script_refused(py, pyz, tmpdir_env):
    env, tmp = tmpdir_env
    _refused(py, pyz, env, tmp, make_tar([MAN, _info("script.sh", tarfile.SYMTYPE, linkname="/etc/passwd")]))


def test_hardlink_refused(py, pyz, tmpdir_env, tmp_path):
    env, tmp = tmpdir_env
    victim = tmp_path / "victim"
    victim.write_text("orig")
    link = _info("hl", tarfile.LNKTYPE, linkname=str(victim))
    r = _refused(py, pyz, env, tmp, make_tar([MAN, SCRIPT, link, ("hl", "overwritten")]))
    assert "hard" in r["error"]
    assert victim.read_text() == "orig"


@pytest.mark.parametrize("kind", [tarfile.FIFOTYPE, tarfile.CHRTYPE, tarfile.BLKTYPE], ids=["fifo", "chr", "blk"])
def test_special_files_refused(py, pyz, tmpdir_env, kind):
    env, tmp = tmpdir_env
    _refused(py, pyz, env, tmp, make_tar([MAN, SCRIPT, _info("dev", kind, devmajor=1, devminor=3)]))


def test_duplicate_names_refused(py, pyz, tmpdir_env):
    env, tmp = tmpdir_env
    r = _refused(py, pyz, env, tmp, make_tar([MAN, SCRIPT, ("./script.sh", "rm -rf ~")]))
    assert "twice" in r["error"]


def test_entry_count_bomb_refused(py, pyz, tmpdir_env):
    env, tmp = tmpdir_env
    members = [MAN, SCRIPT] + [(f"f{i}", b"") for i in range(10001)]
    r = _refused(py, pyz, env, tmp, make_tar(members))
    assert "entries" in r["error"]


def test_byte_bomb_refused(py, pyz, tmpdir_env):
    env, tmp = tmpdir_env
    buf = io.BytesIO()
    size = 300 * 1024 * 1024

    class Zeros(io.RawIOBase):
        def readable(self):
            return True

        def readinto(self, b):
            b[:] = bytes(len(b))
            return len(b)

    with tarfile.open(fileobj=buf, mode="w:gz", compresslevel=1) as tar:
        for name, data in (MAN, SCRIPT):
            i = tarfile.TarInfo(name)
            i.size = len(data)
            tar.addfile(i, io.BytesIO(data.encode()))
        i = tarfile.TarInfo("zeros")
        i.size = size
        tar.addfile(i, io.BufferedReader(Zeros()))
    data = buf.getvalue()
    assert len(data) < 2 * 1024 * 1024
    r = _refused(py, pyz, env, tmp, data)
    assert "bomb" in r["error"]


def test_missing_entrypoint_refused(py, pyz, tmpdir_env):
    env, tmp = tmpdir_env
    _refused(py, pyz, env, tmp, make_tar([MAN, ("other.sh", "echo")]), "manifest")


def test_entrypoint_outside_refused(py, pyz, tmpdir_env):
    env, tmp = tmpdir_env
    man = ("manifest.yaml", manifest_text(entrypoint="../../bin/sh"))
    _refused(py, pyz, env, tmp, make_tar([man, SCRIPT]), "extract")
    man = ("manifest.yaml", manifest_text(entrypoint="/bin/sh"))
    _refused(py, pyz, env, tmp, make_tar([man, SCRIPT]), "extract")


def test_missing_manifest_refused(py, pyz, tmpdir_env):
    env, tmp = tmpdir_env
    _refused(py, pyz, env, tmp, make_tar([SCRIPT]), "manifest")


def test_not_an_archive(py, pyz, tmpdir_env):
    env, tmp = tmpdir_env
    _refused(py, pyz, env, tmp, b"this is not a tarball" * 100)


def test_subdirectories_and_modes_extracted(py, pyz):
    data = make_tar([MAN, ("script.sh", "cat lib/data.txt; [ -x lib/tool ] && echo exec; stat -c %a lib ."),
                     ("lib/data.txt", "hello\n"), ("lib/tool", "#!/bin/sh\n")])
    s = serve(py, pyz, encode_input(header(data), data))
    assert s.result["status"] == "success", s.result
    assert s.stdout.decode().split("\n")[:4] == ["hello", "exec", "700", "700"]
