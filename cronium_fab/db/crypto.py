"""Cronium's at-rest encryption of credentials and env var values (docs/CRONIUM.md §5).

AES-256-GCM, key = ``ENCRYPTION_KEY`` (64 hex chars), 16-byte IV, AAD ``cronium-server-encryption``,
stored as base64(IV || ciphertext || tag). Cronium treats anything that does not decrypt as legacy
plaintext; we decide by whether GCM authentication succeeds, and refuse a value that has the shape
of a ciphertext but fails to authenticate (a wrong key must never turn ciphertext into a "key").
"""

from __future__ import annotations

import base64
import binascii
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ..errors import ConfigError, CredentialError

AAD = b"cronium-server-encryption"
IV_LEN = 16
TAG_LEN = 16


def load_key(raw: str | None = None) -> bytes | None:
    """The key from ``raw`` or ``ENCRYPTION_KEY``; None when unset. Wrong length is an error."""
    value = os.environ.get("ENCRYPTION_KEY") if raw is None else raw
    if not value:
        return None
    value = value.strip()
    try:
        key = bytes.fromhex(value)
    except ValueError:
        raise ConfigError(
            "ENCRYPTION_KEY must be 64 hexadecimal characters (32 bytes), as in Cronium's .env"
        ) from None
    if len(key) != 32:
        raise ConfigError(
            f"ENCRYPTION_KEY must be 64 hexadecimal characters (32 bytes); it has {len(value)} characters"
        )
    return key


def _ciphertext_bytes(value: str) -> bytes | None:
    """The decoded bytes when ``value`` has the shape of a Cronium ciphertext, else None."""
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return None
    return raw if len(raw) > IV_LEN + TAG_LEN else None


def encrypt(plaintext: str, key: bytes) -> str:
    iv = os.urandom(IV_LEN)
    ct = AESGCM(key).encrypt(iv, plaintext.encode(), AAD)  # ciphertext || tag
    return base64.b64encode(iv + ct).decode()


def decrypt(value: str | None, key: bytes | None, *, what: str) -> str | None:
    """Decrypt one stored value. ``what`` names it in errors ("ssh_key of server 'web1' (id 3)")."""
    if value is None or value == "":
        return value
    raw = _ciphertext_bytes(value)
    if raw is None:
        return value  # legacy plaintext (a PEM key, a short password): Cronium's fallback
    if key is None:
        if len(value) >= 50:
            raise CredentialError(
                f"{what} is encrypted but ENCRYPTION_KEY is not set: set it to Cronium's ENCRYPTION_KEY"
            )
        return value
    iv, body = raw[:IV_LEN], raw[IV_LEN:]
    try:
        # AESGCM wants 12-byte nonces by convention but accepts 16 (GCM's GHASH derivation), as Node does.
        return AESGCM(key).decrypt(iv, body, AAD).decode()
    except InvalidTag:
        if len(value) < 50:
            return value  # short base64-looking plaintext: Cronium never encrypts to under 50 chars
        raise CredentialError(
            f"{what} looks encrypted but does not decrypt with ENCRYPTION_KEY: "
            "check that ENCRYPTION_KEY is the one Cronium uses, or re-enter the credential in Cronium"
        ) from None
    except UnicodeDecodeError:
        raise CredentialError(f"{what} decrypts to bytes that are not text") from None
