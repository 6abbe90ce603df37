"""Making Ed25519 keys and signing bundles (the verifying half lives in the runtime)."""

from __future__ import annotations

import os
from pathlib import Path

from jishi.errors import JishiError, SignatureError
from jishi.runtime.manifest import SIGNATURE


def keygen(prefix: str | Path, overwrite: bool = False) -> tuple[Path, Path]:
    """Write a new key pair: ``prefix`` (private, mode 600) and ``prefix.pub``."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    private = Path(prefix)
    public = private.with_name(private.name + ".pub")
    for p in (private, public):
        if p.exists() and not overwrite:
            raise JishiError(f"{p} exists; refusing to overwrite a key (remove it first, or choose another name)")
    private.parent.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, public


def load_private_key(path: str | Path):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    path = Path(path)
    try:
        key = load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as e:
        raise SignatureError(f"cannot read the private key {path}: {e}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SignatureError(f"{path} is not an Ed25519 private key (make one with `jishi keygen`)")
    return key


def sign_bundle(bundle_dir: str | Path, key_path: str | Path) -> Path:
    """Verify the bundle, then write manifest.sig for its current manifest."""
    from jishi.runtime.bundle import open_bundle

    bundle = open_bundle(bundle_dir)
    signature = sign_bytes(bundle.manifest_bytes, key_path)
    out = Path(bundle_dir) / SIGNATURE
    tmp = out.with_name(SIGNATURE + ".tmp")
    tmp.write_bytes(signature)
    os.replace(tmp, out)
    return out


def sign_bytes(data: bytes, key_path: str | Path) -> bytes:
    """The raw Ed25519 signature of ``data`` (a manifest's exact bytes) by the private key."""
    return load_private_key(key_path).sign(data)
