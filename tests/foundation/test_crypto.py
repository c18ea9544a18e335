"""Cronium's at-rest encryption (docs/CRONIUM.md §5): interop with Node's crypto, the plaintext fallback."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from cronium_fab.db.crypto import decrypt, encrypt, load_key
from cronium_fab.errors import ConfigError, CredentialError

KEY_HEX = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff"
KEY = bytes.fromhex(KEY_HEX)

NODE_ENCRYPT = r"""
const crypto = require('crypto');
const key = Buffer.from(process.argv[1], 'hex');
const iv = crypto.randomBytes(16);
const c = crypto.createCipheriv('aes-256-gcm', key, iv);
c.setAAD(Buffer.from('cronium-server-encryption'));
const ct = Buffer.concat([c.update(process.argv[2], 'utf8'), c.final()]);
process.stdout.write(Buffer.concat([iv, ct, c.getAuthTag()]).toString('base64'));
"""


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed: cannot check interop")
@pytest.mark.parametrize("secret", ["-----BEGIN OPENSSH PRIVATE KEY-----\nabc\n", "pw", "é✓ unicode"])
def test_decrypts_what_node_encrypts_like_cronium(secret: str) -> None:
    stored = subprocess.run(["node", "-e", NODE_ENCRYPT, KEY_HEX, secret], check=True, capture_output=True, text=True).stdout
    assert decrypt(stored, KEY, what="x") == secret


def test_round_trip_and_fresh_iv() -> None:
    a, b = encrypt("hunter2", KEY), encrypt("hunter2", KEY)
    assert a != b
    assert decrypt(a, KEY, what="x") == decrypt(b, KEY, what="x") == "hunter2"


def test_plaintext_pem_key_is_used_as_is() -> None:
    pem = "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\n-----END OPENSSH PRIVATE KEY-----\n"
    assert decrypt(pem, KEY, what="x") == pem
    assert decrypt(pem, None, what="x") == pem


def test_short_plaintext_that_looks_like_base64_is_kept() -> None:
    assert decrypt("cGFzc3dvcmQ=", KEY, what="x") == "cGFzc3dvcmQ="


def test_ciphertext_with_wrong_key_is_an_error_naming_the_server() -> None:
    stored = encrypt("-----BEGIN KEY-----", KEY)
    with pytest.raises(CredentialError, match="server 'web1'"):
        decrypt(stored, bytes(32), what="ssh_key of server 'web1' (id 3)")


def test_ciphertext_without_key_is_an_error() -> None:
    with pytest.raises(CredentialError, match="ENCRYPTION_KEY is not set"):
        decrypt(encrypt("x" * 40, KEY), None, what="password of server 'db'")


@pytest.mark.parametrize("bad", ["abc", "00" * 16, "zz" * 32, "00" * 33])
def test_wrong_encryption_key_length_is_refused(bad: str) -> None:
    with pytest.raises(ConfigError, match="64 hexadecimal"):
        load_key(bad)
