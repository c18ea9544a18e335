"""Signatures are cosign-compatible (openssl verifies them) and tampering is refused."""

from __future__ import annotations

import base64
import subprocess
from pathlib import Path

import pytest

from cronium_fab.signing import (
    SignatureInvalid,
    SigningKeyError,
    fingerprint,
    generate_keypair,
    load_private_key,
    load_public_key,
    sign_file,
    verify_file,
)


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, Path]:
    generate_keypair(tmp_path / "k" / "cosign.key", tmp_path / "k" / "cosign.pub")
    return tmp_path / "k" / "cosign.key", tmp_path / "k" / "cosign.pub"


def test_keygen_writes_private_key_0600_in_0700_dir(keys: tuple[Path, Path]) -> None:
    key, pub = keys
    assert key.stat().st_mode & 0o777 == 0o600
    assert key.parent.stat().st_mode & 0o777 == 0o700
    assert b"PRIVATE KEY" in key.read_bytes() and b"PUBLIC KEY" in pub.read_bytes()


def test_openssl_verifies_our_signature(keys: tuple[Path, Path], tmp_path: Path) -> None:
    blob = tmp_path / "blob.bin"
    blob.write_bytes(b"runner bytes\x00\xff" * 100)
    sig = sign_file(blob, load_private_key(keys[0]))
    der = tmp_path / "sig.der"
    der.write_bytes(base64.b64decode(sig.read_bytes()))
    out = subprocess.run(
        ["openssl", "dgst", "-sha256", "-verify", str(keys[1]), "-signature", str(der), str(blob)],
        capture_output=True, text=True,
    )
    assert out.stdout.strip() == "Verified OK", out.stderr


def test_one_flipped_byte_is_refused_with_file_and_fingerprint(keys: tuple[Path, Path], tmp_path: Path) -> None:
    blob = tmp_path / "payload.tar.gz"
    blob.write_bytes(bytes(range(256)))
    sign_file(blob, load_private_key(keys[0]))
    data = bytearray(blob.read_bytes())
    data[100] ^= 0x01
    blob.write_bytes(bytes(data))
    pub = load_public_key(keys[1])
    with pytest.raises(SignatureInvalid) as err:
        verify_file(blob, pub)
    assert str(blob) in str(err.value) and fingerprint(pub) in str(err.value)


def test_signature_by_another_key_is_refused(keys: tuple[Path, Path], tmp_path: Path) -> None:
    generate_keypair(tmp_path / "other.key", tmp_path / "other.pub")
    blob = tmp_path / "f"
    blob.write_bytes(b"x")
    sign_file(blob, load_private_key(tmp_path / "other.key"))
    with pytest.raises(SignatureInvalid):
        verify_file(blob, load_public_key(keys[1]))


def test_passphrase_protected_key(tmp_path: Path) -> None:
    generate_keypair(tmp_path / "k", tmp_path / "k.pub", b"s3cret")
    assert b"ENCRYPTED" in (tmp_path / "k").read_bytes()
    with pytest.raises(SigningKeyError, match="CRONIUM_FAB_KEY_PASSPHRASE"):
        load_private_key(tmp_path / "k")
    with pytest.raises(SigningKeyError, match="wrong passphrase"):
        load_private_key(tmp_path / "k", b"nope")
    assert load_private_key(tmp_path / "k", b"s3cret")


def test_unreadable_or_wrong_kind_of_key(tmp_path: Path) -> None:
    with pytest.raises(SigningKeyError, match="inv keygen"):
        load_private_key(tmp_path / "missing.key")
    rsa = tmp_path / "rsa.key"
    subprocess.run(["openssl", "genrsa", "-out", str(rsa), "2048"], check=True, capture_output=True)
    with pytest.raises(SigningKeyError, match="P-256"):
        load_private_key(rsa)
    garbage = tmp_path / "garbage.pub"
    garbage.write_text("not a key")
    with pytest.raises(SigningKeyError):
        load_public_key(garbage)


def test_keygen_refuses_to_overwrite(keys: tuple[Path, Path]) -> None:
    with pytest.raises(SigningKeyError, match="--force"):
        generate_keypair(*keys)
