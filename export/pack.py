"""``jishi pack``: one archive of a verified (and optionally signed) bundle, for a USB stick."""

from __future__ import annotations

import os
from pathlib import Path

from jishi.runtime.archive import pack as write_tar
from jishi.runtime.bundle import open_bundle
from jishi.runtime.manifest import MANIFEST, SIGNATURE


def pack_bundle(bundle_dir: str | Path, out: str | Path, sign_key: str | Path | None = None) -> Path:
    bundle_dir, out = Path(bundle_dir), Path(out)
    if sign_key is not None:
        from jishi.export.signing import sign_bundle

        sign_bundle(bundle_dir, sign_key)
    bundle = open_bundle(bundle_dir)
    names = [MANIFEST] + ([SIGNATURE] if bundle.signed else []) + sorted(bundle.manifest.files)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    try:
        write_tar(bundle_dir, partial, names)
        os.replace(partial, out)
    finally:
        partial.unlink(missing_ok=True)
    return out
