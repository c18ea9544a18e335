"""Cosign-compatible blob signatures: ECDSA P-256 over SHA-256, DER signature base64 in ``<file>.sig``.

``openssl dgst -sha256 -verify cosign.pub -signature <(base64 -d f.sig) f`` checks our signatures,
and so does ``cosign verify-blob --key cosign.pub --signature f.sig f``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from .errors import ConfigError, CroniumFabError
from .fsutil import atomic_write


class SigningKeyError(ConfigError):
    """The signing or verification key is missing, unreadable or of the wrong kind."""


class SignatureInvalid(CroniumFabError):
    """A file does not match its signature: it was altered, or signed by another key."""

    def __init__(self, path: Path, fingerprint: str, reason: str, hint: str | None = None) -> None:
        super().__init__(
            f"signature check failed for {path} with key {fingerprint}: {reason}. Refusing to use it. "
            + (hint or "If you changed it on purpose, rebuild and re-sign it (`inv build sign` for the runner, "
                        "`cronium-fab payload-build --event N` for a payload)")
        )
        self.path = path
        self.fingerprint = fingerprint
        self.reason = reason


def fingerprint(public_key: ec.EllipticCurvePublicKey) -> str:
    der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return "SHA256:" + base64.b64encode(hashlib.sha256(der).digest()).decode().rstrip("=")


def generate_keypair(key_path: Path, pub_path: Path, passphrase: bytes | None = None, *, force: bool = False) -> str:
    """Write a new P-256 key pair (private key 0600 in a 0700 directory). Returns the fingerprint."""
    if key_path.exists() and not force:
        raise SigningKeyError(f"{key_path} already exists; remove it or pass --force to replace it")
    key = ec.generate_private_key(ec.SECP256R1())
    enc: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase) if passphrase else serialization.NoEncryption()
    )
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc)
    pub = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    key_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    pub_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    atomic_write(key_path, pem, 0o600)
    atomic_write(pub_path, pub, 0o644)
    return fingerprint(key.public_key())


def load_private_key(path: Path, passphrase: bytes | None = None) -> ec.EllipticCurvePrivateKey:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SigningKeyError(
            f"cannot read signing key {path}: {exc.strerror}; create one with `inv keygen` in the project root, "
            "or set CRONIUM_FAB_SIGNING_KEY (relative paths are relative to the working directory)"
        ) from None
    try:
        key = serialization.load_pem_private_key(data, password=passphrase or None)
    except TypeError:
        raise SigningKeyError(
            f"signing key {path} is passphrase-protected: set CRONIUM_FAB_KEY_PASSPHRASE"
            if not passphrase
            else f"signing key {path} is not encrypted but a passphrase was given"
        ) from None
    except ValueError:
        raise SigningKeyError(
            f"cannot load signing key {path}: wrong passphrase or not a PEM private key"
        ) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise SigningKeyError(f"signing key {path} is not an ECDSA P-256 key (cosign's format)")
    return key


def load_public_key(path: Path) -> ec.EllipticCurvePublicKey:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SigningKeyError(
            f"cannot read public key {path}: {exc.strerror}; create keys with `inv keygen` in the project root, "
            "or set CRONIUM_FAB_PUBLIC_KEY (relative paths are relative to the working directory)"
        ) from None
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError:
        raise SigningKeyError(f"{path} is not a PEM public key") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise SigningKeyError(f"public key {path} is not an ECDSA P-256 key (cosign's format)")
    return key


def sign_bytes(data: bytes, key: ec.EllipticCurvePrivateKey) -> bytes:
    """The base64 DER signature of ``data`` (what goes into a ``.sig`` file)."""
    return base64.b64encode(key.sign(data, ec.ECDSA(hashes.SHA256())))


def sig_path_for(path: Path) -> Path:
    return path.with_name(path.name + ".sig")


def sign_file(path: Path, key: ec.EllipticCurvePrivateKey) -> Path:
    sig = sig_path_for(path)
    atomic_write(sig, sign_bytes(path.read_bytes(), key) + b"\n", 0o644)
    return sig


def verify_bytes(data: bytes, signature_b64: bytes, key: ec.EllipticCurvePublicKey, *, name: Path) -> None:
    fp = fingerprint(key)
    try:
        der = base64.b64decode(signature_b64.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise SignatureInvalid(name, fp, "the .sig file is not base64") from None
    try:
        key.verify(der, data, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise SignatureInvalid(name, fp, "the content does not match the signature") from None


def verify_file(path: Path, key: ec.EllipticCurvePublicKey, sig_path: Path | None = None) -> bytes:
    """Verify ``path`` against ``<path>.sig``; return the verified bytes (use these, not a re-read)."""
    sig_path = sig_path or sig_path_for(path)
    fp = fingerprint(key)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SignatureInvalid(path, fp, f"cannot read the file ({exc.strerror})") from None
    try:
        sig = sig_path.read_bytes()
    except OSError:
        raise SignatureInvalid(path, fp, f"signature file {sig_path} is missing") from None
    verify_bytes(data, sig, key, name=path)
    return data
