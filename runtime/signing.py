"""Ed25519 signatures over a bundle's manifest (which holds every file's sha256).

Keys are PEM files: the private key PKCS#8 (``PREFIX``, readable by its owner only),
the public key SubjectPublicKeyInfo (``PREFIX.pub``). ``manifest.sig`` holds the raw
64-byte signature of ``manifest.json``'s exact bytes.
"""

from __future__ import annotations

from pathlib import Path

from jishi.errors import SignatureError

SIGNATURE_SIZE = 64


def load_public_key(path: str | Path):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    path = Path(path)
    try:
        key = load_pem_public_key(path.read_bytes())
    except (OSError, ValueError) as e:
        raise SignatureError(f"cannot read the public key {path}: {e}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise SignatureError(f"{path} is not an Ed25519 public key (make one with `jishi keygen`)")
    return key


def verify_signature(manifest_bytes: bytes, signature: bytes | None, public_key_path: str | Path,
                     what: str = "the bundle", file: str = "manifest.sig",
                     sign_hint: str = "sign it with `jishi sign`") -> None:
    """Raise SignatureError unless ``signature`` is the key's signature of the manifest.

    ``what`` and ``file`` name what is checked in the messages (a bundle and manifest.sig, or
    an adapter and adapter.sig)."""
    from cryptography.exceptions import InvalidSignature

    key = load_public_key(public_key_path)
    if signature is None:
        raise SignatureError(f"{what} is not signed, but a key was given: refusing it ({sign_hint})")
    if len(signature) != SIGNATURE_SIZE:
        raise SignatureError(f"{file} is {len(signature)} bytes, not an Ed25519 signature ({SIGNATURE_SIZE} bytes)")
    try:
        key.verify(signature, manifest_bytes)
    except InvalidSignature:
        raise SignatureError(
            f"{what}'s signature does not match the key {Path(public_key_path).name}: it was changed after "
            "signing, or signed with another key"
        ) from None
