"""Verify a bundle directory, a .jishi archive, or an adapter archive: every hash, and the signature."""

from __future__ import annotations

import tempfile
from pathlib import Path

from jishi.runtime.adapter_delivery import ADAPTER_MANIFEST, read_adapter_dir
from jishi.runtime.archive import unpack
from jishi.runtime.bundle import open_bundle
from jishi.runtime.manifest import MANIFEST


def verify_path(path: str | Path, key: str | Path | None = None) -> str:
    """Check ``path`` (raising a JishiError on any fault) and return a one-line summary of what was checked."""
    path = Path(path)
    with tempfile.TemporaryDirectory(prefix="jishi-verify-") as tmp:
        if path.is_file():
            unpack(path, Path(tmp))
            path = Path(tmp)
        if (path / ADAPTER_MANIFEST).is_file() and not (path / MANIFEST).exists():
            am, _, signed = read_adapter_dir(path, key=key)
            what = (f"adapter {am.name} for {am.bundle}: rank {am.adapter['rank']}, {','.join(am.adapter['targets'])}, "
                    f"{sum(f.size for f in am.files.values()) / 1e6:.1f} MB")
            count = ""
        else:
            bundle = open_bundle(path, key=key)
            signed, what = bundle.signed, bundle.manifest.name
            count = f"{len(bundle.manifest.files)} files, {bundle.size / 1e6:.1f} MB, "
    if key:
        sig = f"signature valid ({Path(key).name})"
    else:
        sig = "signed (signature not checked: pass --key)" if signed else "not signed"
    return f"OK  {what}: {count}every sha256 matches; {sig}"
